//! Many devices in one process, started at a paced rate (rumqttc clients
//! that all connect at once stall on timeouts).

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::DeviceConfig;
use crate::DeviceEvent;

/// The id of the `index`th device of a fleet: `{prefix}-{index:05}`.
pub fn fleet_device_id(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index:05}")
}

/// A fleet: `count` devices `{prefix}-{first_index:05}` onwards, each
/// configured like `template` with its own id.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub prefix: String,
    pub count: usize,
    pub first_index: usize,
    /// Devices started per second (must be positive).
    pub connects_per_sec: f64,
    /// Everything but `device_id`, which is replaced per device.
    pub template: DeviceConfig,
}

/// How the fleet ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetReport {
    /// Devices started (fewer than `count` if shutdown came during the ramp).
    pub started: usize,
    /// Devices that stopped on shutdown.
    pub stopped: usize,
    /// Devices that ended with a final error: (device id, error).
    pub failed: Vec<(String, String)>,
}

/// Provisions `count` devices and returns (device id, factory public key SEC1).
pub fn provision_fleet(
    store_root: &Path,
    prefix: &str,
    first_index: usize,
    count: usize,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    (first_index..first_index + count)
        .map(|i| {
            let id = fleet_device_id(prefix, i);
            let key = crate::provision(store_root, &id)?;
            Ok((id, key))
        })
        .collect()
}

/// Runs the fleet until `shutdown` is cancelled (or every device has ended
/// with a final error). Every device reports on `events`.
pub async fn run_fleet(
    cfg: FleetConfig,
    events: UnboundedSender<(String, DeviceEvent)>,
    shutdown: CancellationToken,
) -> anyhow::Result<FleetReport> {
    anyhow::ensure!(
        cfg.connects_per_sec.is_finite() && cfg.connects_per_sec > 0.0,
        "connects_per_sec must be positive"
    );
    let period = Duration::from_secs_f64(1.0 / cfg.connects_per_sec);
    let mut pace = tokio::time::interval(period);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tracker = TaskTracker::new();
    let mut handles = Vec::with_capacity(cfg.count);
    for i in cfg.first_index..cfg.first_index + cfg.count {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = pace.tick() => {}
        }
        let mut device = cfg.template.clone();
        device.device_id = fleet_device_id(&cfg.prefix, i);
        let id = device.device_id.clone();
        let handle = tracker.spawn(crate::run_device(
            device,
            events.clone(),
            shutdown.child_token(),
        ));
        handles.push((id, handle));
    }
    tracker.close();
    let mut report = FleetReport {
        started: handles.len(),
        ..FleetReport::default()
    };
    info!(started = report.started, "fleet started");
    for (id, handle) in handles {
        match handle.await {
            Ok(Ok(())) => report.stopped += 1,
            Ok(Err(e)) => report.failed.push((id, format!("{e:#}"))),
            Err(e) => {
                warn!(device_id = %id, error = %e, "device task panicked");
                report.failed.push((id, e.to_string()));
            }
        }
    }
    tracker.wait().await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_zero_padded() {
        assert_eq!(fleet_device_id("sim", 7), "sim-00007");
        assert_eq!(fleet_device_id("sim", 123456), "sim-123456");
    }

    #[test]
    fn provisions_a_range() {
        let root = tempfile::tempdir().unwrap();
        let devices = provision_fleet(root.path(), "sim", 3, 2).unwrap();
        let ids: Vec<_> = devices.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["sim-00003", "sim-00004"]);
        assert_ne!(devices[0].1, devices[1].1);
        // Idempotent.
        assert_eq!(provision_fleet(root.path(), "sim", 3, 2).unwrap(), devices);
    }
}
