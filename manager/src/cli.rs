//! The `fleet-manager` command line, as a library so tests drive it too.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::admin::{call, AdminApi, ChangeIn, Token};
use crate::ManagerConfig;

#[derive(Parser, Debug)]
#[command(
    name = "fleet-manager",
    about = "fleetshift manager: registry, CA, device lifecycle"
)]
pub struct Cli {
    /// TOML configuration file; FLEET_* environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The operator API's token, for the commands that call it [default:
    /// `admin_token_file` of --config and FLEET_* variables, else
    /// `{certs_dir}/admin.token`]
    #[arg(long, global = true)]
    admin_token_file: Option<PathBuf>,
    /// The root CA the operator API's certificate is checked against when
    /// it is served over TLS (`--admin https://...`, or `admin_tls`)
    /// [default: `{certs_dir}/root-ca.pem` of --config and FLEET_*
    /// variables]
    #[arg(long, global = true)]
    admin_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the manager (and, with --embedded-broker, the broker in this process).
    Serve {
        #[arg(long)]
        embedded_broker: bool,
    },
    /// Create the development PKI if missing (root CA, broker certificate, signing key),
    /// in --dir, else in the configuration's certs_dir, and the manager's secret at
    /// the broker's internal listener (mode 0600; `internal.secret` in --dir, else the
    /// configuration's `broker.internal_secret_file`), which an external broker's
    /// configuration takes (`mosquitto-config --secret-file`), and the operator API's
    /// token (mode 0600; `admin.token` in --dir, else the configuration's
    /// `admin_token_file`). The broker certificate names what --server-name
    /// gives, else the configuration's `server_names` (without --dir), with
    /// localhost, 127.0.0.1 and ::1; with neither, it keeps its names.
    PkiInit {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A host name or IP address devices reach the broker by (repeat
        /// for more).
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
    },
    /// Print the configuration as TOML: the defaults, overridden by --config and FLEET_* variables.
    PrintConfig,
    /// Pre-register devices from a JSON-lines file of {"device_id","factory_key_hex"}.
    Register {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        #[arg(long)]
        service: String,
        file: PathBuf,
    },
    /// Assign a new service to devices (by id, or every device of --from).
    Change {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        #[arg(long)]
        service: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        application: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
        devices: Vec<String>,
    },
    /// Show a device's state, service history and certificates.
    Show {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        device: String,
    },
    /// Show counts per service and certificate status.
    Summary {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
    },
    /// Show the generations of the fleet's root CA; with --roll, make a
    /// successor that issues from then on (service CAs made after it, and
    /// the server certificates, which carry it certified by the root
    /// before). Devices pin it from their next reply; the roots before it
    /// stay trusted until they expire. The manager rolls the root over by
    /// itself once it has less than two years left.
    RootCa {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        /// Make a successor of the root that issues now.
        #[arg(long)]
        roll: bool,
    },
    /// Show the generations of the manager's message-signing key; with
    /// --roll, make a successor, certified by the root that issues now,
    /// that signs every message from then on. Devices take it from the
    /// certificate each message carries, by the roots they pin, and
    /// accept the keys before it no more.
    SigningKey {
        /// The manager's admin API, as for `root-ca`.
        #[arg(long)]
        admin: Option<String>,
        /// Make a successor of the signing key.
        #[arg(long)]
        roll: bool,
    },
    /// Show the generations of a service's CA; with --roll, make a
    /// successor that issues from then on. The CAs before it stay trusted,
    /// each with its CRL, until they expire, so no certificate is cut
    /// short: devices move to the new CA as they renew. The manager rolls
    /// a CA over by itself once it has less than a year left.
    ServiceCa {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        service: String,
        /// Make a successor of the CA that issues now.
        #[arg(long)]
        roll: bool,
        /// For a CA key known to be stolen (with --roll, after it): revoke
        /// every certificate the generations older than the issuing one
        /// issued and retire them now (their keys deleted, no longer
        /// trusted). Devices come back through the bootstrap listener for a
        /// certificate of the issuing CA; providers need new ones
        /// (provider-add). Run again after an error, it finishes the job.
        #[arg(long)]
        retire_older: bool,
    },
    /// Write the configuration of two mosquitto 2.0 processes for running
    /// the fleet on mosquitto: OUT/mosquitto.conf (internal and service
    /// listeners, ACL from the registry, CA bundle, CRLs) and
    /// OUT/bootstrap.conf (the bootstrap listener, bridged to the first),
    /// and `openssl.cnf`, the OpenSSL configuration to run both with
    /// (OPENSSL_CONF=OUT/openssl.cnf); with --reload or --reload-pid, tell
    /// the main one to reload it.
    MosquittoConfig {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        /// The PKI's directory [default: `certs_dir` of --config and FLEET_*
        /// variables, else certs]
        #[arg(long)]
        certs: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// File with the manager's secret at the broker (written hashed to
        /// the password file); `pki-init` makes one. The manager connects
        /// with the same file (FLEET_BROKER_PASSWORD_FILE).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:1883")]
        internal: std::net::SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8884")]
        bootstrap: std::net::SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8883")]
        service: std::net::SocketAddr,
        /// Reload the main mosquitto (SIGHUP) once the files are written:
        /// the one running OUT/mosquitto.conf, found by the pid it writes
        /// to OUT/mosquitto.pid (the generated configuration's `pid_file`)
        /// or else among the processes, so that a restarted mosquitto is
        /// followed; not before it has its SIGHUP handler (one still
        /// starting would end).
        #[arg(long, conflicts_with = "reload_pid")]
        reload: bool,
        /// The same, signalling this pid while no mosquitto running
        /// OUT/mosquitto.conf is found (one started with another file).
        #[arg(long)]
        reload_pid: Option<u32>,
        /// Keep running: look at the registry and the CRLs every this many
        /// milliseconds, and write the files (and reload mosquitto) whenever
        /// they change, so that grants and revocations reach mosquitto
        /// without anyone running this again. With the secret and --reload
        /// (or --reload-pid), the live connection of a revoked certificate,
        /// or of a device or provider granted nothing now (expired, reset),
        /// is also cut (see topics.md §10.3).
        #[arg(long)]
        watch_ms: Option<u64>,
        /// With --watch-ms: a change that can wait (a grant that shrinks, a
        /// superseded certificate's CRL) reloads mosquitto at most this
        /// often; one that cannot (a grant that grows, a new service CA, a
        /// revocation) at once. Every reload costs mosquitto time with its
        /// whole ACL.
        #[arg(long, default_value_t = 5000)]
        coalesce_ms: u64,
    },
    /// Operator reset: the device may activate again.
    Reset {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        device: String,
    },
    /// A service provider's certificate: writes `{out}/provider.{name}.pem`
    /// (chain) and `.key` (0600); it connects to the service listener with
    /// client id `provider.{name}` and reads its service's telemetry.
    ProviderAdd {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        service: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Revoke every certificate of a service provider.
    ProviderRevoke {
        /// The manager's admin API, `host:port`, over TLS if `https://` is
        /// given, or --admin-ca, or `admin_tls` is set [default:
        /// `admin_listen` of --config and FLEET_* variables, else
        /// 127.0.0.1:8080]
        #[arg(long)]
        admin: Option<String>,
        name: String,
    },
}

/// How many per-item results in the documents a command printed are
/// refusals (`"ok": false` in a `results` list, as a service change
/// answers for each device).
pub fn refused(printed: &[serde_json::Value]) -> usize {
    printed
        .iter()
        .filter_map(|doc| doc["results"].as_array())
        .flatten()
        .filter(|r| r["ok"] == serde_json::Value::Bool(false))
        .count()
}

/// Runs one command; returns the JSON documents it printed (operator
/// commands print the manager's answers).
pub async fn execute(cli: Cli) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut printed = Vec::new();
    let mut print = |v: serde_json::Value| {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        printed.push(v);
    };
    // An operator command's admin API: --admin, else the configuration's;
    // its token from --admin-token-file, else the configuration's file.
    let config_path = cli.config.clone();
    let token_file = cli.admin_token_file.clone();
    let admin_ca = cli.admin_ca.clone();
    let admin_of = |given: Option<String>| -> anyhow::Result<AdminApi> {
        // Over TLS: `https://`, `--admin-ca`, or the configuration's
        // `admin_tls`. The configuration is read unless the command line
        // names everything for TLS: a bare address or `http://` is sent in
        // clear only once the configuration says the API is not on TLS, so
        // the token never goes out in clear to an API that speaks TLS.
        let https = given.as_deref().is_some_and(|a| a.starts_with("https://"));
        let complete =
            given.is_some() && token_file.is_some() && admin_ca.is_some() && config_path.is_none();
        let config = match complete {
            true => None,
            false => Some(ManagerConfig::load(config_path.as_deref())?),
        };
        let admin_tls = config.as_ref().is_some_and(|c| c.admin_tls);
        let addr = match (given, &config) {
            (Some(addr), _) => addr,
            (None, Some(config)) => {
                let local = crate::admin::reachable(config.admin_listen);
                match config.admin_tls {
                    true => format!("https://{local}"),
                    false => local.to_string(),
                }
            }
            (None, None) => unreachable!("complete only with an address"),
        };
        anyhow::ensure!(
            !(admin_tls && addr.starts_with("http://")),
            "{addr}: the operator API speaks TLS only (admin_tls): use https://, the token is not sent in clear"
        );
        let token = match (token_file.clone(), &config) {
            (Some(token), _) => token,
            (None, Some(config)) => config.admin_token_path(),
            (None, None) => unreachable!("complete only with a token file"),
        };
        let api = AdminApi::new(addr, Token::File(token));
        let tls = https || api.is_https() || admin_tls || admin_ca.is_some();
        Ok(match tls {
            true => {
                let ca = match (admin_ca.clone(), &config) {
                    (Some(ca), _) => ca,
                    (None, Some(config)) => fleet_pki::roots_pem_path(&config.certs_dir),
                    (None, None) => unreachable!("complete only with a CA"),
                };
                api.with_root(ca)
            }
            false => api,
        })
    };
    match cli.command {
        Command::Serve { embedded_broker } => {
            let mut config = ManagerConfig::load(cli.config.as_deref())?;
            let mut broker = None;
            if embedded_broker {
                // The broker starts on the certificate for `server_names`.
                let pki = fleet_pki::Pki::open_or_create(&config.certs_dir)?;
                if let Some(names) = config.broker_names()? {
                    pki.ensure_broker_cert(Some(&names))?;
                }
                let broker_config = fleet_broker::BrokerConfig {
                    certs_dir: config.certs_dir.clone(),
                    ..config.broker.clone()
                };
                let running = fleet_broker::start(&broker_config)?;
                config.broker_url = format!("mqtt://{}", running.internal_addr);
                config.broker_username = Some(running.manager_credentials.0.clone());
                config.broker_password = Some(running.manager_credentials.1.clone());
                broker = Some(running);
            }
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                fleet_broker::shutdown_signal().await;
                tracing::info!("stopping");
                signal.cancel();
            });
            crate::run(config, shutdown).await?;
            // Devices are told the broker is going (DISCONNECT 0x8B) before
            // the process exits.
            if let Some(broker) = broker {
                broker.shut_down(fleet_broker::SHUTDOWN_WAIT).await;
            }
            tracing::info!("stopped");
        }
        Command::PkiInit { dir, server_names } => {
            let (dir, secret, token, names) = match dir {
                Some(dir) => (
                    dir.clone(),
                    dir.join("internal.secret"),
                    dir.join("admin.token"),
                    None,
                ),
                None => {
                    let config = ManagerConfig::load(cli.config.as_deref())?;
                    let token = config.admin_token_path();
                    let names = config.broker_names()?;
                    (config.certs_dir, config.broker.secret_path(), token, names)
                }
            };
            let names = match server_names.is_empty() {
                true => names,
                false => Some(fleet_pki::ServerNames::with_local(&server_names)?),
            };
            let existed = dir.join("root-ca.pem").exists();
            let pki = fleet_pki::Pki::open_or_create(&dir)?;
            let how = if existed { "already there" } else { "created" };
            println!("PKI {how} in {}", pki.dir().display());
            if pki.ensure_broker_cert(names.as_ref())? || !existed {
                let pem = std::fs::read(pki.broker_cert_path())?;
                let cert = openssl::x509::X509::from_pem(&pem)?;
                let names = fleet_pki::ServerNames::of(&cert);
                println!(
                    "broker certificate {} names: {names}",
                    pki.broker_cert_path().display()
                );
            }
            for (path, what) in [
                (&secret, "internal listener secret"),
                (&token, "operator API token"),
            ] {
                let existed = path.exists();
                fleet_broker::internal_secret(path)?;
                if !existed {
                    println!("{what} created in {}", path.display());
                }
            }
        }
        Command::PrintConfig => println!(
            "{}",
            toml::to_string_pretty(&ManagerConfig::load(cli.config.as_deref())?)?
        ),
        Command::Register {
            admin,
            service,
            file,
        } => {
            let admin = admin_of(admin)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut regs = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)?;
                regs.push(json!({
                    "device_id": v["device_id"],
                    "service_id": service,
                    "factory_key_hex": v["factory_key_hex"],
                }));
            }
            print(call(&admin, "POST", "/v1/registrations", Some(&json!(regs))).await?);
        }
        Command::Change {
            admin,
            service,
            from,
            provider,
            application,
            endpoint,
            devices,
        } => {
            let admin = admin_of(admin)?;
            let from_service = from.clone();
            let body = ChangeIn {
                devices,
                from_service: from,
                service_id: service,
                provider,
                application,
                endpoint,
            };
            let answer = call(
                &admin,
                "POST",
                "/v1/service-change",
                Some(&serde_json::to_value(body)?),
            )
            .await?;
            let none = answer["results"].as_array().is_some_and(|r| r.is_empty());
            if let (true, Some(from)) = (none, from_service) {
                eprintln!("fleet-manager: no device is on service {from}");
            }
            print(answer);
        }
        Command::Show { admin, device } => {
            let admin = admin_of(admin)?;
            print(call(&admin, "GET", &format!("/v1/devices/{device}"), None).await?)
        }
        Command::Summary { admin } => {
            print(call(&admin_of(admin)?, "GET", "/v1/summary", None).await?)
        }
        Command::RootCa { admin, roll } => {
            let admin = admin_of(admin)?;
            print(match roll {
                true => call(&admin, "POST", "/v1/root-ca/roll", None).await?,
                false => call(&admin, "GET", "/v1/root-ca", None).await?,
            })
        }
        Command::SigningKey { admin, roll } => {
            let admin = admin_of(admin)?;
            print(match roll {
                true => call(&admin, "POST", "/v1/signing-key/roll", None).await?,
                false => call(&admin, "GET", "/v1/signing-key", None).await?,
            })
        }
        Command::ServiceCa {
            admin,
            service,
            roll,
            retire_older,
        } => {
            let admin = admin_of(admin)?;
            let path = format!("/v1/services/{service}/ca");
            let body = json!({ "retire_older": retire_older });
            print(match (roll, retire_older) {
                (true, _) => call(&admin, "POST", &format!("{path}/roll"), Some(&body)).await?,
                (false, true) => {
                    call(&admin, "POST", &format!("{path}/retire-older"), None).await?
                }
                (false, false) => call(&admin, "GET", &path, None).await?,
            })
        }
        Command::MosquittoConfig {
            admin,
            certs,
            out,
            secret_file,
            internal,
            bootstrap,
            service,
            reload,
            reload_pid,
            watch_ms,
            coalesce_ms,
        } => {
            let mut admin = admin_of(admin)?;
            // Over TLS, the API's certificate chains to the root of the
            // PKI that --certs names, unless --admin-ca says otherwise.
            if let (true, None, Some(certs)) = (admin.is_https(), &admin_ca, &certs) {
                admin = admin.with_root(fleet_pki::roots_pem_path(certs));
            }
            let secret = secret_file
                .map(|f| {
                    let secret = std::fs::read_to_string(&f).with_context(|| {
                        format!("reading {} (pki-init makes the secret)", f.display())
                    })?;
                    anyhow::ensure!(!secret.trim().is_empty(), "{} is empty", f.display());
                    Ok(secret.trim().to_string())
                })
                .transpose()?;
            let config = ManagerConfig::load(config_path.as_deref())?;
            let params = fleet_broker::mosquitto::MosquittoParams {
                internal,
                bootstrap_tls: bootstrap,
                service,
                certs_dir: certs.unwrap_or(config.certs_dir),
                out_dir: out,
                user: current_user(),
                max_packet_size: config.broker.max_packet_size,
                max_bootstrap_packet_size: config
                    .broker
                    .max_bootstrap_packet_size
                    .min(config.broker.max_packet_size),
            };
            let reload = match (reload_pid, reload) {
                (Some(pid), _) => Some(Reload::Pid(pid)),
                (None, true) => Some(Reload::Main),
                (None, false) => None,
            };
            let secret = secret.as_deref();
            if let Some(ms) = watch_ms {
                let stop = CancellationToken::new();
                let stopping = stop.clone();
                tokio::spawn(async move {
                    fleet_broker::shutdown_signal().await;
                    stopping.cancel();
                });
                let looks = WatchTimes {
                    every: std::time::Duration::from_millis(ms.max(100)),
                    coalesce: std::time::Duration::from_millis(coalesce_ms),
                };
                watch_mosquitto_config(&admin, &params, secret, reload, looks, stop).await?;
            } else {
                let n = write_mosquitto_config(&admin, &params, secret, reload).await?;
                print(json!({
                    "devices": n,
                    "out": params.out_dir,
                    "main": params.out_dir.join("mosquitto.conf"),
                    "bootstrap": params.out_dir.join("bootstrap.conf"),
                    "openssl_conf": params.out_dir.join("openssl.cnf"),
                }));
            }
        }
        Command::Reset { admin, device } => {
            let admin = admin_of(admin)?;
            print(call(&admin, "POST", &format!("/v1/devices/{device}/reset"), None).await?)
        }
        Command::ProviderAdd {
            admin,
            name,
            service,
            out,
        } => {
            let admin = admin_of(admin)?;
            let body = json!({ "name": name, "service_id": service });
            let got = call(&admin, "POST", "/v1/providers", Some(&body)).await?;
            let client_id = got["client_id"].as_str().context("client_id")?.to_owned();
            let chain = out.join(format!("{client_id}.pem"));
            let key = out.join(format!("{client_id}.key"));
            std::fs::create_dir_all(&out)?;
            std::fs::write(&chain, got["chain_pem"].as_str().context("chain_pem")?)?;
            write_private(&key, got["key_pem"].as_str().context("key_pem")?)?;
            print(json!({
                "client_id": client_id,
                "service_id": got["service_id"],
                "serial": got["serial"],
                "certificate": chain,
                "key": key,
            }));
        }
        Command::ProviderRevoke { admin, name } => {
            let admin = admin_of(admin)?;
            print(
                call(
                    &admin,
                    "POST",
                    &format!("/v1/providers/{name}/revoke"),
                    None,
                )
                .await?,
            )
        }
    }
    Ok(printed)
}

/// The OS user this process runs as (mosquitto keeps it to read 0600 keys).
pub fn current_user() -> String {
    std::process::Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "root".into())
}

/// Which mosquitto `mosquitto-config` reloads (SIGHUP) once it has written
/// the files: the main one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The one running the output directory's `mosquitto.conf`
    /// ([`fleet_broker::mosquitto::main_pid`]: by the pid file the
    /// generated configuration has it write, or among the processes): a
    /// mosquitto restarted since is followed.
    Main,
    /// This pid, while no such mosquitto is found.
    Pid(u32),
}

impl Reload {
    /// The pid to signal now: the main mosquitto of `out_dir`
    /// ([`fleet_broker::mosquitto::main_pid`]), else the given pid if a
    /// mosquitto runs under it. A pid under which no mosquitto runs (it
    /// ended; its pid may since be another process's) is not signalled,
    /// nor one still starting, which a SIGHUP would end: both are errors,
    /// and a watcher tries again at its next look.
    pub fn pid(self, out_dir: &std::path::Path) -> anyhow::Result<u32> {
        use fleet_broker::mosquitto::{is_mosquitto, main_pid, takes_sighup};
        let conf = out_dir.join("mosquitto.conf");
        let pid = match (main_pid(out_dir), self) {
            (Some(pid), _) => pid,
            (None, Reload::Pid(pid)) if is_mosquitto(pid) => pid,
            (None, Reload::Pid(pid)) => anyhow::bail!(
                "no mosquitto runs as pid {pid}, nor with {}",
                conf.display()
            ),
            (None, Reload::Main) => {
                anyhow::bail!("no mosquitto runs with {}", conf.display())
            }
        };
        anyhow::ensure!(
            takes_sighup(pid),
            "mosquitto (pid {pid}) is still starting: not reloaded yet"
        );
        Ok(pid)
    }
}

/// Renders the mosquitto configuration from the running manager's grants,
/// writes it, and optionally has mosquitto reload it. Returns the number
/// of devices granted.
pub async fn write_mosquitto_config(
    admin: &AdminApi,
    params: &fleet_broker::mosquitto::MosquittoParams,
    secret: Option<&str>,
    reload: Option<Reload>,
) -> anyhow::Result<usize> {
    let (files, grants) = render_from_registry(admin, params).await?;
    apply_mosquitto_config(params, &files, secret, reload)?;
    Ok(granted(&grants))
}

/// How many principals `grants` grants something (the rest are listed with
/// no service).
fn granted(grants: &[fleet_broker::mosquitto::DeviceGrant]) -> usize {
    grants.iter().filter(|g| !g.services.is_empty()).count()
}

/// Keeps the mosquitto configuration in step with the registry and the
/// CRLs: renders it every `looks.every` and, when it differs from the last
/// one written, writes it and reloads mosquitto, at once or coalesced (see
/// [`WatchTimes`]), until `stop`. Whatever fails (the manager unreachable,
/// a write, the reload) is logged and tried again at the next look.
///
/// It follows a restarted mosquitto through its pid file (see [`Reload`]):
/// the restarted one reads the files last written when it starts, and any
/// reload that failed while it was away is done at the next look.
///
/// With the manager's `secret` and a `reload`, it also cuts live
/// connections that mosquitto itself leaves open until the client
/// reconnects (see [`cut_connection`]), by principal (CN):
/// - of every certificate the CRLs newly revoke with status `revoked` (an
///   operator's reset, a provider revoked), or revoke because its device
///   never reported from the certificate that superseded it
///   (`revoked_at_grace_end`: the device may still be connected with it,
///   its reply with the newer one lost);
/// - of every principal the registry now grants nothing that had a grant
///   at the last reload (a certificate past its notAfter, a reset), and at
///   the first look of every principal granted nothing, so revocations
///   from before the watcher started are cut too;
/// - of every principal granted a service whose CA left the bundle before
///   its end (retired for a stolen key: a certificate the thief made is
///   on no CRL);
/// - at the first look, of every certificate revoked since mosquitto
///   started (less [`REVOKED_BEFORE_START_MS`]), which the CRLs it loaded
///   lacked: a superseded certificate revoked at the grace end while no
///   watcher ran leaves its principal granted, and may hold a connection;
///   and of every certificate revoked now that the CRLs mosquitto loaded
///   do not list ([`fleet_broker::mosquitto::loaded_crls`]: `crl.pem` if
///   it started after the file was written, else `crl.loaded.pem`, written
///   after each reload; with neither, or another PKI's, none of these).
///
/// It also has the bootstrap mosquitto reload when the broker certificate
/// changed since it last read it (`reload_bootstrap_if_stale`).
///
/// It cuts after the reload that applies the change (mosquitto 2.0 acts
/// on the SIGHUP at the end of its loop's pass, before it reads the cut's
/// CONNECT, sent after the signal) and again at the next look, in case
/// the client came back before mosquitto had reloaded (a
/// client that re-enrolled within that look is cut once too, and
/// reconnects). A superseded certificate whose device reported from the
/// newer one is not cut: that connection, under the same client id,
/// already displaced the old one.
pub async fn watch_mosquitto_config(
    admin: &AdminApi,
    params: &fleet_broker::mosquitto::MosquittoParams,
    secret: Option<&str>,
    reload: Option<Reload>,
    looks: WatchTimes,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // The files last written, and the (principal, service) pairs they grant.
    let mut written: Option<(fleet_broker::mosquitto::MosquittoFiles, GrantPairs)> = None;
    let mut applied_at: Option<std::time::Instant> = None;
    // Revoked serials already looked up (or in the CRLs mosquitto had when
    // the watcher started).
    let mut known: Option<std::collections::BTreeSet<String>> = None;
    // Principals cut at the last look, cut again at this one.
    let mut cut_again: Vec<String> = Vec::new();
    let cutting = secret.filter(|_| reload.is_some());
    if cutting.is_none() {
        tracing::warn!(
            "without --secret-file and --reload, connections of revoked \
             certificates, and of devices and providers granted nothing now, \
             stay open on mosquitto until their clients reconnect"
        );
    }
    // The pid reloaded last, to tell when mosquitto was restarted.
    let mut reloaded: Option<u32> = None;
    // After the first reload: the principals of certificates revoked
    // since then (ms) are to be cut, asked at every look until the manager
    // answers.
    let mut since_start: Option<u64> = None;
    loop {
        let mut to_cut = Vec::new();
        match render_from_registry(admin, params).await {
            Ok((files, grants)) => {
                // Serials the CRLs revoke that were not looked up yet: asked
                // at every look until the manager answers.
                let revoked_now = fleet_broker::mosquitto::revoked_serials(&files.crlfile);
                let mut unanswered = false;
                // At the first look, what mosquitto has loaded: the CRLs
                // it read at its start, or those its last reload was
                // signalled with (`loaded_crls`), if this PKI signed them;
                // else what is revoked now.
                let seen = known.get_or_insert_with(|| {
                    let started = fleet_broker::mosquitto::main_pid(&params.out_dir)
                        .and_then(process_started_ms);
                    fleet_broker::mosquitto::loaded_crls(&params.out_dir, started)
                        .and_then(|loaded| {
                            fleet_broker::mosquitto::revoked_if_signed_by(&loaded, &files.cafile)
                        })
                        .unwrap_or_else(|| revoked_now.clone())
                });
                let newly: std::collections::BTreeSet<String> =
                    revoked_now.difference(seen).cloned().collect();
                if !newly.is_empty() {
                    match revoked_principals(admin, |s, _| newly.contains(s)).await {
                        Some(principals) => {
                            to_cut = principals;
                            seen.extend(newly.iter().cloned());
                        }
                        None => unanswered = true,
                    }
                }
                if written.as_ref().map(|(f, _)| f) != Some(&files) {
                    let pairs = grant_pairs(&grants);
                    // Principals granted nothing now that had a grant at
                    // the last reload (all of them at the first): their
                    // connections are cut once mosquitto has reloaded.
                    let lost: Vec<String> = grants
                        .iter()
                        .filter(|g| g.services.is_empty())
                        .map(|g| g.device_id.clone())
                        .filter(|p| match &written {
                            None => true,
                            Some((_, before)) => before
                                .range((p.clone(), String::new())..)
                                .next()
                                .is_some_and(|(q, _)| q == p),
                        })
                        .chain(retired_early(
                            written.as_ref().map(|(f, _)| f),
                            &files,
                            &grants,
                        ))
                        .collect();
                    let crls = |f: &str| f.matches("-----BEGIN X509 CRL-----").count();
                    // Now, or at least `looks.coalesce` after the last
                    // reload: see `WatchTimes`.
                    let urgent = match &written {
                        None => true,
                        Some((before, before_pairs)) => {
                            files.cafile != before.cafile
                                || crls(&files.crlfile) != crls(&before.crlfile)
                                || !pairs.is_subset(before_pairs)
                                || !to_cut.is_empty()
                                || !lost.is_empty()
                                // not looked up: it may be a revocation
                                || unanswered
                        }
                    };
                    let due = applied_at.map_or(true, |t| t.elapsed() >= looks.coalesce);
                    if urgent || due {
                        let first = written.is_none();
                        // A failure is tried again at the next look.
                        match apply_mosquitto_config(
                            params,
                            &files,
                            secret.filter(|_| first),
                            reload,
                        ) {
                            Ok(pid) => {
                                if let (Some(before), Some(now)) = (reloaded, pid) {
                                    if before != now {
                                        tracing::info!(
                                            before,
                                            now,
                                            "mosquitto was restarted; reloading the new one"
                                        );
                                    }
                                }
                                reloaded = pid.or(reloaded);
                                if first {
                                    // Certificates revoked since mosquitto
                                    // started, which its CRLs lacked until
                                    // now: a client may hold a connection
                                    // with one (looked up below).
                                    since_start = pid
                                        .and_then(process_started_ms)
                                        .map(|ms| ms.saturating_sub(REVOKED_BEFORE_START_MS));
                                    if let (None, Some(pid), Some(_)) = (since_start, pid, cutting)
                                    {
                                        tracing::warn!(
                                            pid,
                                            "mosquitto's start time is not readable in /proc: \
                                             certificates revoked since it started are not cut"
                                        );
                                    }
                                }
                                tracing::info!(
                                    granted = granted(&grants),
                                    urgent,
                                    "mosquitto configuration written"
                                );
                                written = Some((files, pairs));
                                applied_at = Some(std::time::Instant::now());
                                add_cuts(&mut to_cut, lost);
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "mosquitto configuration not applied");
                                // Looked up again, and cut, once applied.
                                to_cut.clear();
                                seen.retain(|s| !newly.contains(s));
                            }
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "mosquitto configuration not rendered"),
        }
        // A reload of the bootstrap mosquitto that could not be made yet
        // (still starting, a failed signal) is tried again at every look.
        if let (Some(_), Some((files, _))) = (reload, &written) {
            reload_bootstrap_if_stale(params, &files.server_cert);
        }
        if let (Some(since), Some(_)) = (since_start, cutting) {
            let revoked = revoked_principals(admin, |_, at| at.is_some_and(|at| at >= since));
            if let Some(principals) = revoked.await {
                since_start = None;
                add_cuts(&mut to_cut, principals);
            }
        }
        if let Some(secret) = cutting {
            // Side by side, CUTS_AT_ONCE at a time: one that mosquitto does
            // not answer holds no other, and a first look that cuts
            // thousands (a fleet's expired certificates) does not open
            // thousands of connections at once.
            let mut cuts = tokio::task::JoinSet::new();
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CUTS_AT_ONCE));
            for principal in to_cut.iter().chain(&cut_again) {
                let (internal, secret) = (params.internal, secret.to_owned());
                let (principal, slots) = (principal.clone(), slots.clone());
                cuts.spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    match cut_connection(internal, &secret, &principal).await {
                        Ok(()) => tracing::info!(
                            principal,
                            "connection cut: its certificate revoked, or nothing granted"
                        ),
                        Err(err) => tracing::warn!(principal, error = %err, "connection not cut"),
                    }
                });
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = cuts.join_all() => {}
            }
            cut_again = to_cut;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(looks.every) => {}
        }
    }
}

/// Adds `principals` to `to_cut`, each once.
/// Every principal granted a service whose CA left the bundle since the
/// files last written, though it had not expired (retired for a stolen
/// key): mosquitto refuses that CA's certificates at the next handshake,
/// but a live session with one the thief made is on no CRL.
fn retired_early(
    before: Option<&fleet_broker::mosquitto::MosquittoFiles>,
    files: &fleet_broker::mosquitto::MosquittoFiles,
    grants: &[fleet_broker::mosquitto::DeviceGrant],
) -> Vec<String> {
    let Some(before) = before.filter(|b| b.cafile != files.cafile) else {
        return Vec::new();
    };
    let services = fleet_broker::mosquitto::services_retired_early(&before.cafile, &files.cafile);
    grants
        .iter()
        .filter(|g| g.services.iter().any(|s| services.contains(s)))
        .map(|g| g.device_id.clone())
        .collect()
}

fn add_cuts(to_cut: &mut Vec<String>, principals: Vec<String>) {
    for principal in principals {
        if !to_cut.contains(&principal) {
            to_cut.push(principal);
        }
    }
}

/// Connections [`watch_mosquitto_config`] cuts side by side at most.
const CUTS_AT_ONCE: usize = 64;

/// How often [`watch_mosquitto_config`] looks, and how seldom it reloads
/// mosquitto for a change that can wait.
///
/// A change reaches mosquitto at the look that sees it when something
/// needs it there: a grant that grows (a device registered, the target
/// tenant of a migration), a new service CA or its first CRL, a
/// certificate revoked (not superseded). Any other change (a grant that
/// shrinks as a device leaves its old tenant, the CRL of a superseded
/// certificate) is applied at the first look after `coalesce` has passed
/// since the last reload. Every
/// reload costs mosquitto time with its whole ACL: 0.6 s of CPU for 5,000
/// devices, with its clients' connections waiting meanwhile, and the
/// migration of 5,000 devices, reloading at every look, did not finish.
#[derive(Debug, Clone, Copy)]
pub struct WatchTimes {
    pub every: std::time::Duration,
    pub coalesce: std::time::Duration,
}

/// The (principal, service) pairs of a set of grants.
type GrantPairs = std::collections::BTreeSet<(String, String)>;

fn grant_pairs(grants: &[fleet_broker::mosquitto::DeviceGrant]) -> GrantPairs {
    grants
        .iter()
        .flat_map(|g| g.services.iter().map(|s| (g.device_id.clone(), s.clone())))
        .collect()
}

/// The principals (CNs) of the revoked certificates that `pick` takes (by
/// serial and time of revocation, ms): those revoked (not superseded), and
/// those superseded and revoked at the end of the grace period (`GET
/// /v1/revoked-certificates` lists both), asked of the manager in one
/// request; `None` if it did not answer. A manager without the request (an
/// older one) has none.
async fn revoked_principals(
    admin: &AdminApi,
    pick: impl Fn(&str, Option<u64>) -> bool,
) -> Option<Vec<String>> {
    let revoked = match call(admin, "GET", "/v1/revoked-certificates", None).await {
        Ok(v) => v,
        Err(err) if err.to_string().contains("HTTP 404") => {
            tracing::warn!("the manager lists no revoked certificates: none is cut");
            return Some(Vec::new());
        }
        Err(err) => {
            tracing::warn!(error = %err, "revoked certificates not looked up");
            return None;
        }
    };
    let mut out = Vec::new();
    for c in revoked.as_array().into_iter().flatten() {
        let (Some(serial), Some(principal)) = (c["serial"].as_str(), c["device_id"].as_str())
        else {
            continue;
        };
        if pick(serial, c["revoked_ms"].as_u64()) && !out.iter().any(|o| o == principal) {
            out.push(principal.to_string());
        }
    }
    Some(out)
}

/// When process `pid` started, in ms since the epoch: its start in clock
/// ticks after boot (`/proc/{pid}/stat`, field 22; USER_HZ, 100 a second
/// on Linux) after the boot time (`btime` in `/proc/stat`).
fn process_started_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's name (which may hold spaces and
    // parentheses) begin with the 3rd.
    let (_, fields) = stat.rsplit_once(')')?;
    let ticks: u64 = fields.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot_s: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot_s * 1000 + ticks * 10)
}

/// How far a certificate's time of revocation (the manager's clock) may be
/// before mosquitto's start (the watcher's host's clock) and still be cut
/// at the watcher's first look: the two clocks may differ a little, and
/// one cut too many costs its client a reconnect.
const REVOKED_BEFORE_START_MS: u64 = 60_000;

/// Cuts the connection mosquitto holds for client id `principal`: connects
/// to its internal listener as the manager with that client id, which
/// makes mosquitto close the connection holding it (MQTT's session
/// takeover; on the service listener a client's id is its certificate's
/// CN), and disconnects at once. A client whose certificate mosquitto's
/// CRLs now revoke cannot connect again.
pub async fn cut_connection(
    internal: std::net::SocketAddr,
    secret: &str,
    principal: &str,
) -> anyhow::Result<()> {
    use rumqttc::{ConnectReturnCode, Event, Outgoing, Packet};
    let mut opts = rumqttc::MqttOptions::new(principal, internal.ip().to_string(), internal.port());
    opts.set_credentials(fleet_broker::MANAGER_USER, secret);
    opts.set_clean_session(true);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 4);
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(ack)) = events.poll().await? {
                anyhow::ensure!(
                    ack.code == ConnectReturnCode::Success,
                    "CONNACK {:?}",
                    ack.code
                );
                break;
            }
        }
        client.disconnect().await?;
        while !matches!(events.poll().await?, Event::Outgoing(Outgoing::Disconnect)) {}
        Ok(())
    })
    .await
    .context("mosquitto did not answer within 5 s")?
}

/// Writes `files` and, with `reload`, tells the main mosquitto to reload
/// them; returns the pid it told.
fn apply_mosquitto_config(
    params: &fleet_broker::mosquitto::MosquittoParams,
    files: &fleet_broker::mosquitto::MosquittoFiles,
    secret: Option<&str>,
    reload: Option<Reload>,
) -> anyhow::Result<Option<u32>> {
    fleet_broker::mosquitto::write(params, files, secret)?;
    let Some(reload) = reload else {
        return Ok(None);
    };
    let pid = reload.pid(&params.out_dir)?;
    if fleet_broker::mosquitto::runs_with_openssl_cnf(pid, &params.out_dir) == Some(false) {
        tracing::warn!(
            pid,
            openssl_cnf = %params.out_dir.join("openssl.cnf").display(),
            "mosquitto does not run with OPENSSL_CONF set to this openssl.cnf: \
             its TLS sessions resume without their certificate checked"
        );
    }
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "could not signal mosquitto (pid {pid})");
    if let Err(err) = fleet_broker::mosquitto::note_loaded(&params.out_dir, &files.crlfile) {
        tracing::warn!(error = %err, "could not record the CRLs mosquitto was reloaded with");
    }
    reload_bootstrap_if_stale(params, &files.server_cert);
    Ok(Some(pid))
}

/// Where, in the output directory, the broker certificate the bootstrap
/// mosquitto has is recorded: the one it was last signalled to reload
/// with, or found as it started.
const BOOTSTRAP_CERT_FILE: &str = "bootstrap-cert.pem";

/// Has the bootstrap mosquitto of `params.out_dir` reload (SIGHUP) if the
/// broker certificate changed since it last read it (at its last reload
/// from here, or at its start), as the main one is at every reload: it
/// serves the same certificate.
fn reload_bootstrap_if_stale(params: &fleet_broker::mosquitto::MosquittoParams, cert: &str) {
    use fleet_broker::mosquitto::{bootstrap_pid, read_at_start, takes_sighup};
    if cert.is_empty() {
        return;
    }
    let record = params.out_dir.join(BOOTSTRAP_CERT_FILE);
    if std::fs::read_to_string(&record).is_ok_and(|had| had == cert) {
        return;
    }
    let noted = || {
        if let Err(err) = std::fs::write(&record, cert) {
            tracing::warn!(error = %err, file = %record.display(), "could not record the broker certificate");
        }
    };
    let conf = params.out_dir.join("bootstrap.conf");
    let Some(pid) = bootstrap_pid(&params.out_dir) else {
        tracing::warn!(
            conf = %conf.display(),
            "the broker certificate changed and no mosquitto runs with this bootstrap configuration: \
             a bootstrap mosquitto running with another one keeps its certificate until restarted"
        );
        noted();
        return;
    };
    if read_at_start(
        &params.certs_dir.join("broker.pem"),
        process_started_ms(pid),
    ) {
        noted();
    } else if !takes_sighup(pid) {
        tracing::info!(pid, "bootstrap mosquitto still starting: not reloaded yet");
    } else if std::process::Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
    {
        tracing::info!(
            pid,
            "broker certificate changed: bootstrap mosquitto reloaded"
        );
        noted();
    } else {
        tracing::warn!(
            pid,
            "could not signal the bootstrap mosquitto: it keeps its broker certificate"
        );
    }
}

/// The files for the registry's grants now, and how many principals they
/// grant.
async fn render_from_registry(
    admin: &AdminApi,
    params: &fleet_broker::mosquitto::MosquittoParams,
) -> anyhow::Result<(
    fleet_broker::mosquitto::MosquittoFiles,
    Vec<fleet_broker::mosquitto::DeviceGrant>,
)> {
    let grants = call(admin, "GET", "/v1/grants", None).await?;
    let grants: Vec<fleet_broker::mosquitto::DeviceGrant> = grants
        .as_array()
        .context("grants")?
        .iter()
        .map(|g| fleet_broker::mosquitto::DeviceGrant {
            device_id: g["device_id"].as_str().unwrap_or_default().to_string(),
            services: g["services"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    let files = fleet_broker::mosquitto::render(params, &grants)?;
    Ok((files, grants))
}

/// Writes a private key readable by its owner only.
fn write_private(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pem.as_bytes())
}
