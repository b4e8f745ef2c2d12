//! End-to-end tests: a real rumqttd broker on loopback, the real manager on
//! a sled store in a temporary directory, real certificates.

mod bad_input;
mod disk;
mod external;
mod frontdoor;
mod lifecycle;
mod mqtt5;
mod operator;
mod overload;
mod python_device;
mod restart;
mod rollover;
mod secrecy;
mod wire;
