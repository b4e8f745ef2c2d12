pub mod alerts;
pub mod bridge;
#[cfg(feature = "console")] // fleetshift: axum only with the console
pub mod console;
pub mod local;
pub mod meters;
pub mod network;
pub mod remote;
pub mod timer;
