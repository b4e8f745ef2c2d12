//! Manager configuration: a serde struct with documented defaults, loaded
//! from an optional TOML file plus `FLEET_*` environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Broker the manager connects to as an MQTT client: `mqtt://host:port`.
    /// With `serve --embedded-broker` it is not used: the manager connects
    /// to the embedded broker's internal listener.
    pub broker_url: String,
    /// MQTT client id of the manager.
    pub client_id: String,
    /// Username and password at the broker (fleetshift's broker: user
    /// `fleet-manager` and the internal secret; see `broker_password_file`).
    pub broker_username: Option<String>,
    pub broker_password: Option<String>,
    /// File holding the broker password, read at start when
    /// `broker_password` is not set.
    pub broker_password_file: Option<PathBuf>,
    /// sled database directory.
    pub data_dir: PathBuf,
    /// PKI directory (see `certs/README.md`).
    pub certs_dir: PathBuf,
    /// The host names and IP addresses devices reach the broker by, which
    /// their TLS clients check: the broker certificate (`broker.pem`)
    /// names exactly these, with `localhost`, `127.0.0.1` and `::1`, and
    /// is issued again at start when they change. A list in TOML; in the
    /// environment, `FLEET_SERVER_NAMES=broker.example.com,10.0.0.7`.
    /// `[]` leaves the local names only; an empty variable counts as
    /// unset. [default: unset, the certificate keeps the names it has]
    #[serde(deserialize_with = "names_list")]
    pub server_names: Option<Vec<String>>,
    /// Operator HTTP API; loopback only unless changed on purpose.
    pub admin_listen: SocketAddr,
    /// Serve the operator API over TLS, with the broker's certificate
    /// (`certs/broker.pem`, which names `server_names`): clients check it
    /// against `certs/root-ca.pem` and reach it as `https://`. Off by
    /// default; with it, `GET /v1/health` is HTTPS too.
    pub admin_tls: bool,
    /// The operator API's bearer token: every route but `GET /v1/health`
    /// asks for it. Created (64 hex digits, mode 0600) by `serve` and
    /// `pki-init` when missing; the operator commands read it from here.
    /// [default: `{certs_dir}/admin.token`]
    pub admin_token_file: Option<PathBuf>,
    /// Lifetime of a device certificate.
    pub cert_lifetime_days: u32,
    /// Accept activations without a factory-key signature from devices
    /// registered without a key. Off by default; every use is logged.
    pub open_enrollment: bool,
    /// Failed authentications per device id within `failure_window_secs`
    /// before further failing requests are answered `rate_limited` (a
    /// request that authenticates is always served).
    pub max_auth_failures: usize,
    pub failure_window_secs: u64,
    /// Certificates the manager issues one device within
    /// `certificate_window_secs`; an `update` past that is answered
    /// `rate_limited` and issues nothing. A device needs one per service
    /// change and renewal (an identical retry is answered from the reply
    /// cache), and every certificate it no longer uses is revoked and
    /// stays in its CRL until it expires, so the limit bounds how fast one
    /// device can grow the CRLs every broker loads. Counted in memory: a
    /// restart of the manager, or an operator's reset of the device,
    /// starts the count again.
    pub max_certificates_per_device: usize,
    pub certificate_window_secs: u64,
    /// Largest clock difference accepted in a request timestamp.
    pub max_clock_skew_ms: u64,
    /// Handler threads working on requests at once.
    pub workers: usize,
    /// A request that has waited this long for a worker is answered `busy`
    /// instead of being carried out (topics.md §5.4): under a load the
    /// manager cannot keep up with, the requests it serves are still
    /// answered within a device's reply timeout (10 s for the reference
    /// device), and the rest learn to come back later at once.
    pub shed_after_ms: u64,
    /// A superseded certificate is revoked when its device reports from the
    /// new one, or after this many seconds at the latest.
    pub revoke_superseded_after_secs: u64,
    /// Service-change notices sent per second when an operator moves many
    /// devices at once (each notice leads to a re-key and a reconnect). A
    /// device gets two, on its tenant's topic and its bootstrap topic; the
    /// operator's request returns once the change is recorded, and the
    /// notices follow at this pace. A change carried in a poll reply counts
    /// too, and so does a notice sent again (after a restart, after
    /// `online`), unless a poll reply announced the change to its device
    /// within the last minute (topics.md §7.4, "Pace").
    pub max_notices_per_sec: usize,
    /// mTLS service endpoint announced in service-change notices, if any.
    pub service_endpoint: Option<String>,
    /// The broker `serve --embedded-broker` starts (its `certs_dir` is
    /// taken from `certs_dir` above).
    pub broker: fleet_broker::BrokerConfig,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            broker_url: "mqtt://127.0.0.1:1883".into(),
            client_id: "fleet-manager".into(),
            broker_username: None,
            broker_password: None,
            broker_password_file: None,
            data_dir: PathBuf::from("fleet-data/manager"),
            certs_dir: PathBuf::from("certs"),
            server_names: None,
            admin_listen: "127.0.0.1:8080".parse().expect("valid address"),
            admin_tls: false,
            admin_token_file: None,
            cert_lifetime_days: 30,
            open_enrollment: false,
            max_auth_failures: 10,
            failure_window_secs: 300,
            max_certificates_per_device: 10,
            certificate_window_secs: 3_600,
            max_clock_skew_ms: fleet_protocol::MAX_CLOCK_SKEW_MS,
            workers: 8,
            shed_after_ms: 5_000,
            revoke_superseded_after_secs: 120,
            max_notices_per_sec: 200,
            service_endpoint: None,
            broker: fleet_broker::BrokerConfig::default(),
        }
    }
}

impl ManagerConfig {
    /// Defaults, then `file` (TOML) if given, then `FLEET_*` variables
    /// (`FLEET_ADMIN_LISTEN=127.0.0.1:9000`; the embedded broker's with
    /// `__`: `FLEET_BROKER__METRICS_LISTEN=127.0.0.1:9883`).
    pub fn load(file: Option<&Path>) -> anyhow::Result<ManagerConfig> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            // Read it ourselves: the config crate looks names up without
            // their extension.
            let text = std::fs::read_to_string(file)
                .map_err(|e| config::ConfigError::Message(format!("{}: {e}", file.display())))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let mut cfg: ManagerConfig = builder
            .add_source(fleet_broker::config::environment::<ManagerConfig>(
                "FLEET",
                "fleet-manager",
            ))
            .build()?
            .try_deserialize()?;
        // As `broker` says: shown as it is used.
        cfg.broker.certs_dir = cfg.certs_dir.clone();
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.broker_url.starts_with("mqtt://"),
            "broker_url must be mqtt://host:port, got {}",
            self.broker_url
        );
        anyhow::ensure!(
            self.cert_lifetime_days > 0,
            "cert_lifetime_days must be positive"
        );
        anyhow::ensure!(self.workers > 0, "workers must be positive");
        anyhow::ensure!(self.shed_after_ms > 0, "shed_after_ms must be positive");
        anyhow::ensure!(
            self.max_auth_failures > 0,
            "max_auth_failures must be positive"
        );
        anyhow::ensure!(
            self.max_certificates_per_device > 0,
            "max_certificates_per_device must be positive"
        );
        self.broker_names()?;
        if let Some(endpoint) = &self.service_endpoint {
            fleet_protocol::topic::parse_endpoint(endpoint)
                .map_err(|e| anyhow::anyhow!("service_endpoint: {e}"))?;
        }
        Ok(())
    }

    /// `server_names` as the broker certificate takes them.
    pub fn broker_names(&self) -> anyhow::Result<Option<fleet_pki::ServerNames>> {
        self.server_names
            .as_deref()
            .map(fleet_pki::ServerNames::with_local)
            .transpose()
            .map_err(|e| anyhow::anyhow!("server_names: {e}"))
    }

    /// Where the operator API's token is: `admin_token_file`, else
    /// `{certs_dir}/admin.token`.
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.certs_dir.join("admin.token"))
    }

    /// `(host, port)` of `broker_url`.
    pub fn broker_host_port(&self) -> anyhow::Result<(String, u16)> {
        let rest = self.broker_url.trim_start_matches("mqtt://");
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("broker_url {} has no port", self.broker_url))?;
        Ok((host.trim_matches(['[', ']']).to_string(), port.parse()?))
    }
}

/// A list, or one string of names separated by commas (as an environment
/// variable gives it).
fn names_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        List(Vec<String>),
        Commas(String),
    }
    Ok(
        Option::<Names>::deserialize(d)?.and_then(|names| match names {
            Names::List(list) => Some(list),
            // Empty, as `FLEET_SERVER_NAMES=` leaves it: unset.
            Names::Commas(text) if text.trim().is_empty() => None,
            Names::Commas(text) => Some(
                text.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_toml_with_the_embedded_broker_section() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("manager.toml");
        std::fs::write(&file, "workers = 3\n[broker]\nmax_connections = 77\n").unwrap();
        let cfg = ManagerConfig::load(Some(&file)).unwrap();
        assert_eq!(cfg.workers, 3);
        assert_eq!(cfg.broker.max_connections, 77);
        assert_eq!(cfg.admin_listen, ManagerConfig::default().admin_listen);
        std::fs::write(&file, "workers = 0\n").unwrap();
        assert!(ManagerConfig::load(Some(&file)).is_err(), "validation runs");
    }

    #[test]
    fn server_names_are_a_list_or_names_between_commas() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("manager.toml");
        let names = |toml: &str| {
            std::fs::write(&file, toml).unwrap();
            ManagerConfig::load(Some(&file)).map(|cfg| cfg.server_names)
        };
        let both = Some(vec![
            "broker.example.com".to_string(),
            "10.0.0.7".to_string(),
        ]);
        assert_eq!(names("").unwrap(), None);
        assert_eq!(
            names("server_names = [\"broker.example.com\", \"10.0.0.7\"]\n").unwrap(),
            both
        );
        // What `FLEET_SERVER_NAMES=broker.example.com,10.0.0.7` gives.
        assert_eq!(
            names("server_names = \"broker.example.com, 10.0.0.7,\"\n").unwrap(),
            both
        );
        assert_eq!(names("server_names = []\n").unwrap(), Some(vec![]));
        // What an empty `FLEET_SERVER_NAMES=` gives: unset.
        assert_eq!(names("server_names = \" \"\n").unwrap(), None);
        let err = names("server_names = [\"broker example\"]\n").unwrap_err();
        assert!(err.to_string().contains("server_names"), "{err}");
    }
}
