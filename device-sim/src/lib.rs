//! fleetshift device simulator: the device side of the protocol, one or
//! thousands of devices in one process.
//!
//! A device powers on, loads its secure-element store, activates with its
//! factory key on the plain bootstrap listener if it has no device-auth
//! UUID yet, obtains a certificate for its service (CSR mode or a
//! manager-generated key), then lives on the mutual-TLS service listener
//! inside its tenant: it reports `online`, polls once for changes missed
//! while offline, publishes telemetry, and follows signed service-change
//! notices by re-keying for the new service and reconnecting there. Every
//! manager message is checked against the pinned manager key, the CRC, the
//! device id and the request nonce; notices also against a persisted
//! sequence number.
//!
//! # Layout
//! - [`config`]: [`DeviceConfig`], [`Endpoint`], [`KeyMode`].
//! - [`store`]: the per-device secure-element directory and [`provision`].
//! - [`requests`]: building activate, update, poll and status requests (pure).
//! - [`replies`]: verifying replies and notices, unsealing secrets, checking chains (pure).
//! - [`link`]: one MQTT connection; a task polls the rumqttc event loop and
//!   forwards packets over a channel.
//! - `device`: the state machine behind [`run_device`].
//! - [`fleet`]: [`run_fleet`], many devices at a paced start rate.

pub mod config;
mod device;
pub mod fleet;
pub mod link;
pub mod replies;
pub mod requests;
pub mod store;
#[cfg(test)]
mod testutil;

use std::path::Path;

use fleet_protocol::Status;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::{
    parse_renew_window, DeviceConfig, Endpoint, KeyMode, DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TELEMETRY_INTERVAL, RENEW_WINDOW, UNKNOWN_CA_PATIENCE,
};
pub use device::{backoff, is_retriable, DeviceError, Failure, MAX_BUSY_RETRIES, MAX_REPUBLISH};
pub use fleet::{fleet_device_id, provision_fleet, run_fleet, FleetConfig, FleetReport};

/// What a device reports as it goes; sent as `(device_id, event)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The manager accepted the activation and assigned this service.
    Activated { service_id: String },
    /// A certificate (and key) for this service is stored.
    CertificateInstalled {
        service_id: String,
        serial_hex: String,
    },
    /// Connected (mutual TLS) and subscribed on this service's listener.
    Connected { service_id: String },
    /// Telemetry record `seq` was handed to the MQTT client.
    Telemetry { service_id: String, seq: u64 },
    /// A service change is complete: connected to the new service and
    /// `change_applied` reported there.
    ChangeAccepted {
        change_id: String,
        service_id: String,
    },
    /// A service-change notice was ignored (forged, replayed, misdirected) and reported.
    NoticeRejected { reason: String },
    /// A stage failed. Retried with backoff unless final, in which case
    /// [`run_device`] returns the error right after this event.
    Failed {
        stage: String,
        status: Option<Status>,
        error: String,
    },
}

/// Creates the device's store with a fresh factory key if it has none and
/// returns the factory public key (SEC1 uncompressed, 65 bytes), which the
/// manager's pre-registration needs. Idempotent.
pub fn provision(store_root: &Path, device_id: &str) -> anyhow::Result<Vec<u8>> {
    Ok(store::provision(store_root, device_id)?)
}

/// Runs one device until `shutdown` is cancelled (returns `Ok`) or a final
/// error (returns it, after a [`DeviceEvent::Failed`]). Transient errors
/// (connection lost, no reply, `rate_limited`, `internal`) are retried with
/// jittered backoff and reported as `Failed` events too.
pub async fn run_device(
    cfg: DeviceConfig,
    events: UnboundedSender<(String, DeviceEvent)>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let span = tracing::info_span!("device", device_id = %cfg.device_id);
    async move {
        let id = cfg.device_id.clone();
        let device = match device::Device::load(cfg, events.clone(), shutdown).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "device could not start");
                let _ = events.send((
                    id,
                    DeviceEvent::Failed {
                        stage: "load".into(),
                        status: None,
                        error: e.to_string(),
                    },
                ));
                return Err(anyhow::Error::new(e).context("load"));
            }
        };
        device
            .run()
            .await
            .map_err(|f| anyhow::Error::new(f.error).context(f.stage))
    }
    .instrument(span)
    .await
}
