//! Who a connection is, and what it may publish and subscribe to: the
//! grants of `topics.md` §2.3, as code.
//!
//! Device grants are exact topics, never filters: a subscription is granted
//! only if it parses as one concrete topic of the device's own, so no
//! wildcard (`#`, `+/#`, `$share/g/#`) can widen it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleet_pki::grants::grants_dir;
use fleet_protocol::{Route, Topic};
use inotify::{EventMask, Inotify, WatchMask};
use tracing::debug;

/// The registry's grant files (`certs/grants/{principal}`, written by the
/// manager), read once each and kept until the kernel reports a change.
///
/// Every lookup first reads what inotify has queued for the directory and
/// forgets the files it names. inotify queues an event within the system
/// call that changes the file, so a grant the manager has written (or
/// withdrawn) before it sends the reply that relies on it is seen by every
/// handshake after that, as when each handshake read the file; what is
/// saved is the open, stat, read and close (four to five system calls per
/// handshake) and the parsing. If the directory cannot be watched (it does
/// not exist yet, or inotify is unavailable), every lookup reads the file.
/// A lost event (queue overflow) or the directory moved or removed forgets
/// everything and watches again. A watch follows the directory it was set
/// on, so if another directory takes its path (a parent renamed, a symlink
/// pointed elsewhere) the events stop without a word: [`GrantFiles::check_dir`],
/// which the trust watcher calls every [`super::trust::RELOAD_EVERY`],
/// notices that and starts afresh.
pub struct GrantFiles {
    certs_dir: PathBuf,
    /// Off: every lookup reads the file.
    enabled: bool,
    state: Mutex<Cache>,
}

struct Cache {
    watch: Option<Inotify>,
    /// Device and inode of the directory watched.
    watched: Option<(u64, u64)>,
    /// When a watch was last tried for, while there is none.
    tried: Option<Instant>,
    /// Principal → the services its file lists (empty: no file).
    files: HashMap<String, Vec<String>>,
    events: Vec<u8>,
}

/// At most this many principals are kept; past it, all are forgotten.
const GRANT_FILES_MAX: usize = 200_000;

/// How often a directory that could not be watched is tried again.
const WATCH_RETRY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for GrantFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantFiles")
            .field("certs_dir", &self.certs_dir)
            .finish_non_exhaustive()
    }
}

impl GrantFiles {
    /// Grant files under `certs_dir`, kept in memory if `enabled`.
    pub fn new(certs_dir: &Path, enabled: bool) -> Self {
        GrantFiles {
            certs_dir: certs_dir.to_owned(),
            enabled,
            state: Mutex::new(Cache {
                watch: None,
                watched: None,
                tried: None,
                files: HashMap::new(),
                events: vec![0; 4096],
            }),
        }
    }

    /// Whether the registry grants `principal` the service `service_id`;
    /// an error if its grant file cannot be read (it is read again next
    /// time).
    pub fn is_granted(&self, principal: &str, service_id: &str) -> Result<bool, String> {
        let read = || {
            fleet_pki::grants::read_grants(&self.certs_dir, principal).map_err(|e| e.to_string())
        };
        let granted = |services: &[String]| services.iter().any(|s| s == service_id);
        if !self.enabled {
            return read().map(|services| granted(&services));
        }
        let mut cache = self.state.lock().unwrap_or_else(|p| p.into_inner());
        cache.catch_up(&self.certs_dir);
        if cache.watch.is_none() {
            drop(cache);
            return read().map(|services| granted(&services));
        }
        if let Some(services) = cache.files.get(principal) {
            return Ok(granted(services));
        }
        let services = read()?;
        let answer = granted(&services);
        if cache.files.len() >= GRANT_FILES_MAX {
            cache.files.clear();
        }
        cache.files.insert(principal.to_owned(), services);
        Ok(answer)
    }

    /// Starts afresh if the grants directory's path no longer leads to the
    /// directory watched.
    pub fn check_dir(&self) {
        if !self.enabled {
            return;
        }
        let now = dir_id(&self.certs_dir);
        let mut cache = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if cache.watch.is_some() && now != cache.watched {
            debug!("grants directory replaced; reading grant files afresh");
            cache.files.clear();
            cache.watch = None;
            cache.tried = None;
        }
    }
}

/// Device and inode of `certs/grants`, following symlinks as the watch does.
fn dir_id(certs_dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(grants_dir(certs_dir))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Cache {
    /// Forgets every file inotify reports changed; watches the directory
    /// if it is not watched yet.
    fn catch_up(&mut self, certs_dir: &Path) {
        let Some(watch) = self.watch.as_mut() else {
            // Tried again at most once a second: without the directory,
            // each try is three system calls of its own.
            if self.tried.map_or(true, |t| t.elapsed() >= WATCH_RETRY) {
                self.tried = Some(Instant::now());
                self.watch_afresh(certs_dir);
            }
            return;
        };
        let mut lost = false;
        loop {
            match watch.read_events(&mut self.events) {
                Ok(events) => {
                    let mut any = false;
                    for e in events {
                        any = true;
                        match e.name.and_then(|n| n.to_str()) {
                            Some(name) if !e.mask.contains(EventMask::ISDIR) => {
                                self.files.remove(name);
                            }
                            _ => {
                                lost |= e.mask.intersects(
                                    EventMask::Q_OVERFLOW
                                        | EventMask::IGNORED
                                        | EventMask::DELETE_SELF
                                        | EventMask::MOVE_SELF,
                                );
                            }
                        }
                    }
                    if !any {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(error = %e, "grant watch failed; reading grant files directly");
                    lost = true;
                    break;
                }
            }
        }
        if lost {
            self.watch_afresh(certs_dir);
        }
    }

    /// Forgets every file and watches the directory at `certs/grants` now.
    fn watch_afresh(&mut self, certs_dir: &Path) {
        self.files.clear();
        self.watched = dir_id(certs_dir);
        self.watch = watch_grants(certs_dir);
    }
}

/// An inotify watch on `certs/grants`, or `None` if it cannot be set.
fn watch_grants(certs_dir: &Path) -> Option<Inotify> {
    let inotify = Inotify::init().ok()?;
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    inotify.watches().add(grants_dir(certs_dir), mask).ok()?;
    Some(inotify)
}

/// `/tenants/{svc}/telemetry/+`: the filter a service provider reads its
/// devices' telemetry with.
pub fn telemetry_of_every_device(service_id: &str) -> String {
    format!("/tenants/{service_id}/telemetry/+")
}

/// The identity a connection proved (or, on the bootstrap listener, claimed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A device on the bootstrap listener, under the device id it connected
    /// with. Everything it can reach is sealed, signed or its own.
    Bootstrap { device_id: String },
    /// A device on the service listener, proven by its certificate:
    /// CN = device id, O = service id.
    Device {
        device_id: String,
        service_id: String,
        serial: String,
    },
    /// A service provider on the service listener, proven by its
    /// certificate: CN = `provider.{name}`, O = the service it serves. It
    /// reads its service's telemetry and nothing else.
    Provider { name: String, service_id: String },
    /// The manager, on the internal listener, with its credential; several
    /// clients may share one credential under different client ids.
    Manager { name: String, client_id: String },
}

impl Identity {
    /// The client id the router knows this connection by. Each kind of
    /// identity has its own namespace, so no spelling of a client id on one
    /// listener reaches a session of another. Bootstrap connections get a
    /// fresh id each, so a claimed device id never displaces anyone.
    pub fn router_client_id(&self, connection: u64) -> String {
        match self {
            // Dots: the router refuses `/`, `+`, `#` and `$` in client ids,
            // and device and service ids never contain a dot.
            Identity::Bootstrap { device_id } => format!("b.{device_id}.{connection}"),
            Identity::Device {
                device_id,
                service_id,
                ..
            } => format!("d.{service_id}.{device_id}"),
            Identity::Provider { name, service_id } => format!("p.{service_id}.{name}"),
            Identity::Manager { name, client_id } => format!("m.{name}.{client_id}"),
        }
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Identity::Manager { .. } => !topic.is_empty() && !topic.contains(['+', '#']),
            Identity::Bootstrap { device_id } => matches!(
                Topic::parse(topic),
                Ok(Topic { tenant: None, route: Route::Request(_, d) }) if d == *device_id
            ),
            Identity::Device {
                device_id,
                service_id,
                ..
            } => match Topic::parse(topic) {
                Ok(Topic {
                    tenant: Some(t),
                    route: Route::Request(_, d) | Route::Telemetry(d),
                }) => t == *service_id && d == *device_id,
                _ => false,
            },
            Identity::Provider { .. } => false,
        }
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Identity::Manager { .. } => !filter.is_empty(),
            Identity::Bootstrap { device_id } => matches!(
                Topic::parse(filter),
                Ok(Topic { tenant: None, route: Route::Reply(_, d) | Route::ServiceChange(d) }) if d == *device_id
            ),
            Identity::Device {
                device_id,
                service_id,
                ..
            } => match Topic::parse(filter) {
                Ok(Topic {
                    tenant: Some(t),
                    route: Route::Reply(_, d) | Route::ServiceChange(d),
                }) => t == *service_id && d == *device_id,
                _ => false,
            },
            // Its tenant's telemetry: every device's (exactly this filter,
            // the one wildcard granted to anyone but the manager) or one
            // device's.
            Identity::Provider { service_id, .. } => {
                filter == telemetry_of_every_device(service_id)
                    || matches!(
                        Topic::parse(filter),
                        Ok(Topic { tenant: Some(t), route: Route::Telemetry(_) }) if t == *service_id
                    )
            }
        }
    }

    pub fn label(&self) -> String {
        match self {
            Identity::Bootstrap { device_id } => format!("bootstrap:{device_id}"),
            Identity::Device {
                device_id,
                service_id,
                ..
            } => format!("device:{service_id}/{device_id}"),
            Identity::Provider { name, service_id } => format!("provider:{service_id}/{name}"),
            Identity::Manager { name, client_id } => format!("manager:{name}/{client_id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_pki::grants::{add_grant, write_grants};

    fn cached(files: &GrantFiles, principal: &str) -> bool {
        files.state.lock().unwrap().files.contains_key(principal)
    }

    /// Every change to a grant file is seen by the next lookup, though
    /// lookups are answered from memory in between.
    #[test]
    fn grant_files_are_kept_until_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let files = GrantFiles::new(d, true);
        // No grants directory yet: read each time, nothing kept.
        assert!(!files.is_granted("dev1", "svcA").unwrap());
        assert!(!cached(&files, "dev1"));
        add_grant(d, "dev1", "svcA").unwrap();
        // The directory appeared: watched from the next try on.
        files.state.lock().unwrap().tried = None;
        assert!(files.is_granted("dev1", "svcA").unwrap());
        assert!(cached(&files, "dev1"));
        assert!(files.is_granted("dev1", "svcA").unwrap());
        assert!(!files.is_granted("dev1", "svcB").unwrap());
        for round in 0..3 {
            // Replaced by rename (the manager's way).
            add_grant(d, "dev1", "svcB").unwrap();
            assert!(files.is_granted("dev1", "svcB").unwrap(), "round {round}");
            // Withdrawn: the file removed.
            write_grants(d, "dev1", &[]).unwrap();
            assert!(!files.is_granted("dev1", "svcA").unwrap(), "round {round}");
            assert!(!files.is_granted("dev1", "svcB").unwrap(), "round {round}");
            // Edited in place.
            std::fs::write(grants_dir(d).join("dev1"), "svcA\n").unwrap();
            assert!(files.is_granted("dev1", "svcA").unwrap(), "round {round}");
            assert!(!files.is_granted("dev1", "svcB").unwrap(), "round {round}");
        }
        // The directory removed and made again: everything is read again.
        assert!(files.is_granted("dev1", "svcA").unwrap());
        std::fs::remove_dir_all(grants_dir(d)).unwrap();
        assert!(!files.is_granted("dev1", "svcA").unwrap());
        add_grant(d, "dev1", "svcC").unwrap();
        files.state.lock().unwrap().tried = None;
        assert!(files.is_granted("dev1", "svcC").unwrap());
        assert!(!files.is_granted("dev1", "svcA").unwrap());
        write_grants(d, "dev1", &[]).unwrap();
        assert!(!files.is_granted("dev1", "svcC").unwrap());
    }

    /// A grant file that cannot be read is an error, not a refusal, whether
    /// lookups are kept in memory or not; it is read again next time.
    #[test]
    fn an_unreadable_grant_file_is_an_error() {
        for enabled in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            add_grant(d, "dev2", "svcA").unwrap();
            let files = GrantFiles::new(d, enabled);
            // A directory where the file should be: reading it fails.
            std::fs::create_dir(grants_dir(d).join("dev1")).unwrap();
            assert!(files.is_granted("dev1", "svcA").is_err(), "{enabled}");
            assert!(!cached(&files, "dev1"));
            assert!(files.is_granted("dev2", "svcA").unwrap(), "{enabled}");
            std::fs::remove_dir(grants_dir(d).join("dev1")).unwrap();
            add_grant(d, "dev1", "svcA").unwrap();
            assert!(files.is_granted("dev1", "svcA").unwrap(), "{enabled}");
        }
    }

    /// The certs directory renamed away and a new one put in its place: the
    /// old grants directory lives on, watched, with no event; the periodic
    /// check notices.
    #[test]
    fn a_grants_directory_that_another_takes_the_place_of_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        add_grant(&certs, "dev1", "svcA").unwrap();
        let files = GrantFiles::new(&certs, true);
        assert!(files.is_granted("dev1", "svcA").unwrap());
        assert!(cached(&files, "dev1"));
        std::fs::rename(&certs, dir.path().join("certs.old")).unwrap();
        add_grant(&certs, "dev1", "svcB").unwrap();
        files.check_dir();
        assert!(
            files.is_granted("dev1", "svcB").unwrap(),
            "the new directory unseen"
        );
        assert!(!files.is_granted("dev1", "svcA").unwrap());
        write_grants(&certs, "dev1", &[]).unwrap();
        assert!(!files.is_granted("dev1", "svcB").unwrap());
    }

    fn boot() -> Identity {
        Identity::Bootstrap {
            device_id: "dev1".into(),
        }
    }

    fn dev() -> Identity {
        Identity::Device {
            device_id: "dev1".into(),
            service_id: "svcA".into(),
            serial: "01".into(),
        }
    }

    #[test]
    fn provider_grants() {
        let id = Identity::Provider {
            name: "weather".into(),
            service_id: "svcA".into(),
        };
        for ok in ["/tenants/svcA/telemetry/+", "/tenants/svcA/telemetry/dev1"] {
            assert!(id.may_subscribe(ok), "{ok}");
        }
        for no in [
            "#",
            "+/#",
            "/tenants/svcA/#",
            "/tenants/svcA/telemetry/#",
            "/tenants/svcA/+/+",
            "/tenants/svcB/telemetry/+",
            "/tenants/+/telemetry/+",
            "/tenants/svcA/fleet/v1/poll/dev1/reply",
            "/tenants/svcA/fleet/v1/service/change/dev1",
            "$share/g//tenants/svcA/telemetry/+",
            "fleet/v1/+/+",
        ] {
            assert!(!id.may_subscribe(no), "{no}");
        }
        for no in [
            "/tenants/svcA/telemetry/dev1",
            "/tenants/svcA/fleet/v1/poll/dev1",
            "/tenants/svcA/fleet/v1/service/change/dev1",
        ] {
            assert!(!id.may_publish(no), "{no}");
        }
        assert_eq!(id.router_client_id(7), "p.svcA.weather");
    }

    #[test]
    fn bootstrap_grants() {
        let id = boot();
        for ok in [
            "fleet/v1/activate/dev1",
            "fleet/v1/update/dev1",
            "fleet/v1/poll/dev1",
            "fleet/v1/status/dev1",
        ] {
            assert!(id.may_publish(ok), "{ok}");
        }
        for no in [
            "fleet/v1/activate/dev2",
            "fleet/v1/activate/dev1/reply",
            "fleet/v1/service/change/dev1",
            "/tenants/svcA/fleet/v1/update/dev1",
            "/tenants/svcA/telemetry/dev1",
            "fleet/v1/activate/+",
            "anything",
        ] {
            assert!(!id.may_publish(no), "{no}");
        }
        for ok in [
            "fleet/v1/activate/dev1/reply",
            "fleet/v1/update/dev1/reply",
            "fleet/v1/service/change/dev1",
        ] {
            assert!(id.may_subscribe(ok), "{ok}");
        }
        for no in [
            "#",
            "+/#",
            "fleet/#",
            "fleet/v1/+/dev1/reply",
            "fleet/v1/activate/+/reply",
            "fleet/v1/activate/dev2/reply",
            "$share/g/#",
            "$share/g/fleet/v1/activate/dev1/reply",
            "/tenants/svcA/fleet/v1/service/change/dev1",
            "fleet/v1/activate/dev1",
            "",
        ] {
            assert!(!id.may_subscribe(no), "{no}");
        }
    }

    #[test]
    fn device_grants() {
        let id = dev();
        for ok in [
            "/tenants/svcA/fleet/v1/update/dev1",
            "/tenants/svcA/telemetry/dev1",
            "/tenants/svcA/fleet/v1/status/dev1",
        ] {
            assert!(id.may_publish(ok), "{ok}");
        }
        for no in [
            "/tenants/svcB/telemetry/dev1",
            "/tenants/svcA/telemetry/dev2",
            "fleet/v1/update/dev1",
            "/tenants/svcA/fleet/v1/service/change/dev1",
            "/tenants/svcA/fleet/v1/update/dev1/reply",
        ] {
            assert!(!id.may_publish(no), "{no}");
        }
        for ok in [
            "/tenants/svcA/fleet/v1/update/dev1/reply",
            "/tenants/svcA/fleet/v1/service/change/dev1",
        ] {
            assert!(id.may_subscribe(ok), "{ok}");
        }
        for no in [
            "/tenants/svcA/#",
            "/tenants/+/fleet/v1/service/change/dev1",
            "/tenants/svcA/telemetry/dev1",
            "/tenants/svcB/fleet/v1/service/change/dev1",
            "fleet/v1/service/change/dev1",
            "$share/g//tenants/svcA/fleet/v1/service/change/dev1",
        ] {
            assert!(!id.may_subscribe(no), "{no}");
        }
    }

    #[test]
    fn namespaces_never_collide() {
        let b = boot().router_client_id(1);
        let d = dev().router_client_id(1);
        let m = Identity::Manager {
            name: "dev1".into(),
            client_id: "dev1".into(),
        }
        .router_client_id(1);
        assert!(b != d && d != m && b != m);
        assert_ne!(boot().router_client_id(1), boot().router_client_id(2));
        assert_eq!(
            dev().router_client_id(1),
            dev().router_client_id(2),
            "a device's reconnect replaces its own session"
        );
    }
}
