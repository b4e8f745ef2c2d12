//! Broker configuration, with the defaults a single-machine deployment uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frontdoor::Limits;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Bootstrap listener over server-authenticated TLS: devices without a
    /// certificate activate and fetch their first one here.
    pub bootstrap_tls_listen: Option<SocketAddr>,
    /// The same over plain TCP. For development only; off by default.
    pub bootstrap_plain_listen: Option<SocketAddr>,
    /// Mutual-TLS service listener.
    pub service_listen: Option<SocketAddr>,
    /// Internal listener for the manager (username and secret). Keep it on loopback.
    pub internal_listen: SocketAddr,
    /// HTTP listener serving the front door's counters at `GET /metrics`
    /// (Prometheus text format). Off unless set, e.g. `127.0.0.1:9883`.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of `root-ca.pem`, `broker.pem`, `broker.key`, `services/`
    /// and `crl/` (see `certs/README.md`).
    pub certs_dir: PathBuf,
    /// File holding the internal listener's secret for user
    /// `fleet-manager`; created (mode 0600) if missing. Default:
    /// `{certs_dir}/internal.secret`.
    pub internal_secret_file: Option<PathBuf>,
    /// Largest MQTT packet accepted, checked on the fixed header before the
    /// packet is read. Larger than the protocol's own message limit on
    /// purpose, so an oversized request reaches the manager and is answered
    /// `too_large`.
    pub max_packet_size: usize,
    /// The same on the bootstrap listeners, where anyone may connect: a
    /// request there is at most 16 KiB (`topics.md` §3.2), and a packet
    /// read in part is held until the rest comes, so every bootstrap
    /// connection sending one large packet and stalling would hold
    /// `max_bootstrap_connections` times this. At most `max_packet_size`.
    pub max_bootstrap_packet_size: usize,
    /// Most connections held at once on the device listeners (bootstrap
    /// and service).
    pub max_connections: usize,
    /// Most of those on the bootstrap listeners (TLS and plain) at once. A
    /// device holds one only while it activates or takes a certificate, so
    /// a flood of clients that connect there and idle cannot take the
    /// service listener's slots. At most `max_connections`.
    pub max_bootstrap_connections: usize,
    /// Connections held at once on the internal listener, apart from
    /// `max_connections`, so that no flood on the device listeners keeps
    /// the manager from connecting.
    pub max_internal_connections: usize,
    /// Time a client has to send CONNECT once the connection (and TLS) is up.
    pub connect_timeout_ms: u64,
    /// Time a client has to finish the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Connections whose TLS handshake has not finished (on the plain
    /// bootstrap listener: that have sent nothing yet) counted at once; at
    /// most half of `max_connections`. One more tells the oldest of them,
    /// from the source address (IPv6: /64) with the most, to close, if it
    /// is older than `pending_min_age_ms`: it is closed if its client owes
    /// the next message (the ClientHello, or the answer to the server's
    /// flight), and otherwise left to finish and no longer counted. So a
    /// flood of connections that stop talking holds about this many slots
    /// of `max_connections` (plus what it opens within
    /// `pending_min_age_ms`), not all of them, and a flood from one
    /// address closes its own connections rather than the slow handshakes
    /// of other addresses. A new connection that finds its listener full
    /// has one older than `pending_min_age_ms` closed for it in much the
    /// same way (`topics.md` §1), so a flood that fills the listeners
    /// faster than that keeps devices out for no longer.
    pub max_pending_handshakes: usize,
    /// A handshake younger than this is never the one closed for others
    /// (see `max_pending_handshakes`): a device's handshake takes a few
    /// round trips, so a flood cannot close it while it runs. The limit is
    /// exceeded meanwhile, by what arrives within this time. Set it above
    /// the slowest device's handshake (its round trips and its own
    /// signature): at 0 any pending handshake may be closed for another,
    /// one still in its first round trip too.
    pub pending_min_age_ms: u64,
    /// When the bootstrap listeners are full and no pending handshake can
    /// be closed for a newcomer, a bootstrap session (its handshake done,
    /// or on the plain listener its first bytes come) is: of the sources
    /// with a session that has sent nothing for at least this long, the
    /// one with the most sessions (the newcomer counted with its own)
    /// loses the oldest such. A device sends its requests, and its
    /// retries, well within this, so clients that connect and idle cannot
    /// keep the bootstrap listeners from others. With none that silent,
    /// the source with the most sessions loses its oldest if it has more
    /// than the newcomer's source (with the newcomer) and more than its
    /// share of the slots, so clients that keep talking cannot either.
    pub bootstrap_session_min_age_ms: u64,
    /// Whether the service listener gives each client a TLS session ticket
    /// to resume its next connection with. A ticket is taken only if the
    /// certificate in it passes every check of a full handshake again.
    pub service_session_tickets: bool,
    /// Whether grant files (`certs/grants/`) are kept in memory between
    /// handshakes, each read again when inotify reports it changed. Turn
    /// it off when `certs_dir` is on a network file system written from
    /// another host, whose changes inotify does not see; every handshake
    /// then reads the file.
    pub grant_cache: bool,
    /// Longest silence allowed to a client that asks for no keep-alive, and
    /// the cap on 1.5 × the keep-alive it asks for.
    pub max_idle_secs: u64,
    /// Longest a session is kept once its connection has ended, in
    /// seconds: an MQTT 3.1.1 session with clean session 0 is kept this
    /// long, and an MQTT 5 Session Expiry Interval is cut to it (the
    /// CONNACK says so). A session whose time passes with no connection
    /// of its identity is ended, with what it held for the client.
    pub max_session_expiry_secs: u64,
    /// New connections per second accepted from one source address, and the burst.
    pub connects_per_sec_per_source: f64,
    pub connect_burst_per_source: f64,
    /// PUBLISHes per second a device connection (bootstrap or service
    /// listener) may send, and the burst; one more ends the connection
    /// (MQTT 5: DISCONNECT 0x96). A certified device's are counted over
    /// all its connections, so that reconnecting does not refill them. A
    /// Will counts, and one over the pace is dropped; a certified device's
    /// connection with a Will leaves the pace's last token to Wills. A device sends a request now and then
    /// and its telemetry; a flood of requests would keep the manager from
    /// answering anyone. Providers and the manager are not limited.
    pub publishes_per_sec_per_device: f64,
    pub publish_burst_per_device: f64,
    /// PUBLISHes per second the bootstrap listeners take from one source
    /// address (IPv6: /64) over all its connections, and the burst; a
    /// connection whose PUBLISH finds none left is closed (MQTT 5:
    /// DISCONNECT 0x96). Each bootstrap PUBLISH is a request the manager
    /// answers, and a device makes a few in its life: the default lets a
    /// fleet behind one address onboard a hundred devices a second, and
    /// keeps one address's thousands of connections, each within its own
    /// pace, from flooding the manager.
    pub bootstrap_publishes_per_sec_per_source: f64,
    pub bootstrap_publish_burst_per_source: f64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            bootstrap_tls_listen: Some("127.0.0.1:8884".parse().expect("valid address")),
            bootstrap_plain_listen: None,
            service_listen: Some("127.0.0.1:8883".parse().expect("valid address")),
            internal_listen: "127.0.0.1:1883".parse().expect("valid address"),
            metrics_listen: None,
            certs_dir: PathBuf::from("certs"),
            internal_secret_file: None,
            max_packet_size: 256 * 1024,
            max_bootstrap_packet_size: 32 * 1024,
            max_connections: 18_000,
            max_bootstrap_connections: 4_096,
            max_internal_connections: 64,
            connect_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            max_pending_handshakes: 1_024,
            pending_min_age_ms: 1_000,
            bootstrap_session_min_age_ms: 10_000,
            service_session_tickets: true,
            grant_cache: true,
            max_idle_secs: 300,
            max_session_expiry_secs: 86_400,
            connects_per_sec_per_source: 2_000.0,
            connect_burst_per_source: 5_000.0,
            publishes_per_sec_per_device: 20.0,
            publish_burst_per_device: 50.0,
            bootstrap_publishes_per_sec_per_source: 500.0,
            bootstrap_publish_burst_per_source: 1_000.0,
        }
    }
}

impl BrokerConfig {
    /// Defaults, then `file` (TOML) if given, then `FLEET_BROKER_*` variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<BrokerConfig, config::ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            // Read it ourselves: the config crate looks names up without
            // their extension.
            let text = std::fs::read_to_string(file)
                .map_err(|e| config::ConfigError::Message(format!("{}: {e}", file.display())))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        builder
            .add_source(environment::<BrokerConfig>("FLEET_BROKER", "fleet-broker"))
            .build()?
            .try_deserialize()
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections,
            max_bootstrap_connections: self.max_bootstrap_connections.min(self.max_connections),
            max_internal_connections: self.max_internal_connections,
            max_packet_size: self.max_packet_size,
            max_bootstrap_packet_size: self.max_bootstrap_packet_size.min(self.max_packet_size),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            handshake_timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
            max_pending: self
                .max_pending_handshakes
                .min(self.max_connections / 2)
                .max(1),
            pending_min_age: Duration::from_millis(self.pending_min_age_ms),
            bootstrap_session_min_age: Duration::from_millis(self.bootstrap_session_min_age_ms),
            max_idle: Duration::from_secs(self.max_idle_secs),
            max_session_expiry: Duration::from_secs(self.max_session_expiry_secs),
            connects_per_sec_per_source: self.connects_per_sec_per_source,
            connect_burst_per_source: self.connect_burst_per_source,
            publishes_per_sec_per_device: self.publishes_per_sec_per_device,
            publish_burst_per_device: self.publish_burst_per_device,
            bootstrap_publishes_per_sec_per_source: self.bootstrap_publishes_per_sec_per_source,
            bootstrap_publish_burst_per_source: self.bootstrap_publish_burst_per_source,
        }
    }

    pub fn secret_path(&self) -> PathBuf {
        self.internal_secret_file
            .clone()
            .unwrap_or_else(|| self.certs_dir.join("internal.secret"))
    }
}

/// The config crate's source for the `{prefix}_*` environment variables
/// that name a setting of `T`: the name after `{prefix}_`, in lower case,
/// with `__` between a section and its key (`FLEET_BROKER__MAX_CONNECTIONS`
/// is `broker.max_connections` for the manager). Any other `{prefix}_*`
/// variable is left alone, and said so on standard error: it may be
/// another program's (fleet-broker's `FLEET_BROKER_*` beside
/// fleet-manager's `FLEET_*`, or the manager's `FLEET_BROKER_USERNAME`
/// beside fleet-broker), or misspelt.
pub fn environment<T: Serialize + Default>(prefix: &str, program: &str) -> config::Environment {
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let (settings, ignored) = settings_in::<T>(prefix, vars);
    for name in ignored {
        eprintln!("{program}: ignoring {name}: not one of its settings");
    }
    source(prefix, settings)
}

/// The config crate's source for `settings` (variables of `prefix`).
fn source(prefix: &str, settings: config::Map<String, String>) -> config::Environment {
    config::Environment::with_prefix(prefix)
        .prefix_separator("_")
        .separator("__")
        .source(Some(settings))
}

/// Of `vars`, those [`environment`] takes, and the names of the other
/// `{prefix}_*` ones.
fn settings_in<T: Serialize + Default>(
    prefix: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> (config::Map<String, String>, Vec<String>) {
    // Every field, set or not (JSON has `null` for an unset one).
    let defaults = serde_json::to_value(T::default()).unwrap_or_default();
    let is_setting = |key: &str| {
        let mut at = &defaults;
        for part in key.split("__") {
            match at.get(part) {
                Some(v) => at = v,
                None => return false,
            }
        }
        !at.is_object()
    };
    let start = format!("{prefix}_");
    let (mut settings, mut ignored) = (config::Map::new(), Vec::new());
    for (name, value) in vars {
        // The prefix in any case, as the config crate takes it.
        let Some(key) = name
            .get(..start.len())
            .filter(|p| p.eq_ignore_ascii_case(&start))
            .map(|_| &name[start.len()..])
        else {
            continue;
        };
        if is_setting(&key.to_lowercase()) {
            settings.insert(name, value);
        } else {
            ignored.push(name);
        }
    }
    ignored.sort();
    (settings, ignored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker's config from the environment `vars` alone: the config,
    /// the variables taken and those left alone, each sorted.
    fn from_environment(vars: &[(&str, &str)]) -> (BrokerConfig, Vec<String>, Vec<String>) {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let (settings, ignored) = settings_in::<BrokerConfig>("FLEET_BROKER", vars);
        let mut taken: Vec<_> = settings.keys().cloned().collect();
        taken.sort();
        let cfg = config::Config::builder()
            .add_source(source("FLEET_BROKER", settings))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        (cfg, taken, ignored)
    }

    #[test]
    fn only_the_environment_s_own_settings_are_taken() {
        let (cfg, taken, ignored) = from_environment(&[
            ("FLEET_BROKER_MAX_CONNECTIONS", "5"),
            ("FLEET_BROKER_METRICS_LISTEN", "127.0.0.1:9883"),
            // The manager's, beside fleet-broker.
            ("FLEET_BROKER_USERNAME", "fleet-manager"),
            ("FLEET_BROKER_PASSWORD_FILE", "certs/internal.secret"),
            ("FLEET_BROKER_MAX_CONECTIONS", "5"),
            ("fleet_broker_max_idle_secs", "60"),
            ("HOME", "/root"),
        ]);
        assert_eq!(
            taken,
            [
                "FLEET_BROKER_MAX_CONNECTIONS",
                "FLEET_BROKER_METRICS_LISTEN",
                "fleet_broker_max_idle_secs"
            ]
        );
        assert_eq!(
            ignored,
            [
                "FLEET_BROKER_MAX_CONECTIONS",
                "FLEET_BROKER_PASSWORD_FILE",
                "FLEET_BROKER_USERNAME"
            ]
        );
        assert_eq!(cfg.max_connections, 5);
        assert_eq!(cfg.max_idle_secs, 60);
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9883".parse().unwrap()));
    }

    #[test]
    fn an_environment_value_is_read_as_its_setting_s_type() {
        let (cfg, _, _) = from_environment(&[
            // A text setting keeps its digits as written (a password or a
            // directory named `0123` is not the number 123).
            ("FLEET_BROKER_CERTS_DIR", "0123"),
            ("FLEET_BROKER_GRANT_CACHE", "false"),
            ("FLEET_BROKER_CONNECTS_PER_SEC_PER_SOURCE", "2.5"),
        ]);
        assert_eq!(cfg.certs_dir, PathBuf::from("0123"));
        assert!(!cfg.grant_cache);
        assert_eq!(cfg.connects_per_sec_per_source, 2.5);
    }

    #[test]
    fn loads_toml_over_defaults() {
        let dir = std::env::temp_dir().join(format!("fleet-broker-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("broker.toml");
        std::fs::write(
            &file,
            "max_connections = 123\nbootstrap_tls_listen = \"127.0.0.1:9999\"\n",
        )
        .unwrap();
        let cfg = BrokerConfig::load(Some(&file)).unwrap();
        assert_eq!(cfg.max_connections, 123);
        assert_eq!(
            cfg.bootstrap_tls_listen,
            Some("127.0.0.1:9999".parse().unwrap())
        );
        assert_eq!(cfg.service_listen, BrokerConfig::default().service_listen);
        assert!(BrokerConfig::load(Some(&dir.join("missing.toml"))).is_err());
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        assert!(
            BrokerConfig::load(Some(&file)).is_err(),
            "unknown keys are refused"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
