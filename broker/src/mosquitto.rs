//! The front door's rules as a mosquitto 2.0 configuration, for running the
//! fleet on an external broker.
//!
//! Two mosquitto processes. The main one (`mosquitto.conf`) has the
//! internal listener (the manager) and the service listener (mutual TLS,
//! the certificate CN as the username and the client id). The bootstrap
//! one (`bootstrap.conf`) has the bootstrap listener (server-authenticated
//! TLS) and bridges the bootstrap topics to the main one's internal
//! listener, as [`BRIDGE_USER`]: requests out, replies and service-change
//! notices in. mosquitto has one client-id namespace per process, and a
//! bootstrap client chooses its own id; in one process, a bootstrap client
//! using a connected device's id displaced the device's service
//! connection. Apart, it can displace only another bootstrap client.
//!
//! The ACLs: the manager may use every topic, the bridge the bootstrap
//! topics, a bootstrap client only its own request and reply topics
//! (patterns on its client id), and each device on the service listener
//! only its own topics in the tenants the registry gives it: its current
//! service and, during a migration, the pending one. The main ACL is
//! regenerated from the registry and mosquitto reloaded (SIGHUP) when
//! assignments change; the bootstrap one does not change.
//!
//! On the service listener mosquitto replaces the client id a client sends
//! with its certificate's CN (`use_username_as_clientid`), so a certified
//! client displaces only a connection of its own CN, whatever id it asks
//! for; the front door refuses such a CONNECT instead.
//!
//! What mosquitto cannot express and the front door does: keeping one
//! bootstrap client from displacing another of the same id, refusing a CN
//! the registry does not know at the handshake, and cutting a live session
//! when its certificate is revoked (mosquitto checks `crlfile` at a full
//! handshake; see topics.md §10.3 for what it does not check). The last is
//! done from outside by `fleet-manager mosquitto-config --watch-ms`, which
//! takes the session's client id over through the internal listener.
//!
//! A resumed TLS session skips every check of the certificate, its expiry
//! too, and mosquitto has no setting for resumption, which it leaves on (a
//! reconnecting client resumes with a ticket; a reload, which builds the
//! service listener's TLS context anew, ends the sessions from before it).
//! The files therefore include an OpenSSL configuration, [`OPENSSL_CNF`],
//! that mosquitto is to run with (`OPENSSL_CONF`): it sends no session
//! tickets, and the service listener takes TLS 1.3 only, which resumes by
//! ticket alone (TLS 1.2 would resume by session id from mosquitto's
//! cache).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where mosquitto listens and where the PKI is.
#[derive(Debug, Clone)]
pub struct MosquittoParams {
    pub internal: SocketAddr,
    pub bootstrap_tls: SocketAddr,
    pub service: SocketAddr,
    pub certs_dir: PathBuf,
    /// Directory the generated files are written to (the config refers to them by absolute path).
    pub out_dir: PathBuf,
    /// The OS user mosquitto keeps (the CA and broker keys are 0600).
    pub user: String,
    /// Largest packet the main mosquitto takes (the front door's
    /// `max_packet_size`).
    pub max_packet_size: usize,
    /// Largest packet the bootstrap mosquitto takes (the front door's
    /// `max_bootstrap_packet_size`): anyone may send one there, and each
    /// is carried to the manager.
    pub max_bootstrap_packet_size: usize,
}

/// The file, in the output directory, where the main mosquitto writes its
/// pid (`pid_file`): a command that reloads it reads it there, so that it
/// follows a mosquitto that was restarted.
pub const MAIN_PID_FILE: &str = "mosquitto.pid";
/// Where the bootstrap mosquitto writes its pid, in the output directory.
pub const BOOTSTRAP_PID_FILE: &str = "bootstrap.pid";

/// The pid of the main mosquitto of `out_dir`: the mosquitto process
/// whose configuration file (`-c`) is `out_dir`'s `mosquitto.conf`. The pid
/// in [`MAIN_PID_FILE`] is tried first; failing that (no file, one left by
/// a mosquitto that ended, or one removed by a second mosquitto of the same
/// configuration as it failed to start), every process is looked at.
/// `None` if no such mosquitto runs.
pub fn main_pid(out_dir: &Path) -> Option<u32> {
    pid_of(out_dir, MAIN_PID_FILE, "mosquitto.conf")
}

/// The pid of the bootstrap mosquitto of `out_dir` (`bootstrap.conf`),
/// found as [`main_pid`] finds the main one.
pub fn bootstrap_pid(out_dir: &Path) -> Option<u32> {
    pid_of(out_dir, BOOTSTRAP_PID_FILE, "bootstrap.conf")
}

fn pid_of(out_dir: &Path, pid_file: &str, conf: &str) -> Option<u32> {
    let conf = out_dir.join(conf);
    let from_file = std::fs::read_to_string(out_dir.join(pid_file))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    if let Some(pid) = from_file.filter(|pid| runs_conf(*pid, &conf)) {
        return Some(pid);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .find(|pid| runs_conf(*pid, &conf))
}

/// Whether process `pid` runs and is a mosquitto.
pub fn is_mosquitto(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "mosquitto")
}

/// Whether process `pid` is a mosquitto started with `conf` as its
/// configuration file (`-c` or `--config-file`; a relative path is taken
/// from the process's working directory).
pub fn runs_conf(pid: u32, conf: &Path) -> bool {
    if !is_mosquitto(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let Some(named) = args
        .windows(2)
        .find(|w| w[0] == b"-c" || w[0] == b"--config-file")
        .map(|w| PathBuf::from(String::from_utf8_lossy(w[1]).into_owned()))
    else {
        return false;
    };
    let named = if named.is_absolute() {
        named
    } else {
        match std::fs::read_link(format!("/proc/{pid}/cwd")) {
            Ok(cwd) => cwd.join(named),
            Err(_) => return false,
        }
    };
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canonical(&named) == canonical(conf)
}

/// Whether process `pid` has its own handler for SIGHUP in place. A
/// mosquitto writes its pid file before it loads its ACL, opens its
/// listeners and sets up its signals; a SIGHUP before then would end it.
pub fn takes_sighup(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 == 1) // SIGHUP is signal 1
}

/// One device's grant on the service listener.
#[derive(Debug, Clone)]
pub struct DeviceGrant {
    pub device_id: String,
    /// The services whose tenant it may use: current, and pending if migrating.
    pub services: Vec<String>,
}

/// The bootstrap mosquitto's client id and username at the main one.
/// It has a dot, so no device id (and no `provider.` prefix) is it.
pub const BRIDGE_USER: &str = "bridge.bootstrap";

/// Where [`write`] puts the bridge's secret in `bootstrap.conf`.
const BRIDGE_SECRET_MARK: &str = "@BRIDGE_SECRET@";

/// Where [`write`] puts the bridge's local client id in `bootstrap.conf`:
/// one no bootstrap client can guess, derived from the bridge's secret.
/// A client that connected with it would take the bridge's place in the
/// bootstrap mosquitto (one client-id namespace), cutting it.
const BRIDGE_LOCAL_ID_MARK: &str = "@BRIDGE_LOCAL_ID@";

fn bridge_local_id(secret: &str) -> String {
    let digest = openssl::sha::sha256(format!("fleetshift bridge local id\0{secret}").as_bytes());
    format!("local.{}", to_hex(&digest[..16]))
}

/// The topics the bootstrap mosquitto bridges: requests out to the main
/// one, replies and service-change notices in.
const BRIDGED: [(&str, &str); 9] = [
    ("out", "fleet/v1/activate/+"),
    ("out", "fleet/v1/update/+"),
    ("out", "fleet/v1/poll/+"),
    ("out", "fleet/v1/status/+"),
    ("in", "fleet/v1/activate/+/reply"),
    ("in", "fleet/v1/update/+/reply"),
    ("in", "fleet/v1/poll/+/reply"),
    ("in", "fleet/v1/status/+/reply"),
    ("in", "fleet/v1/service/change/+"),
];

/// The generated files' contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoFiles {
    /// The main mosquitto: internal and service listeners.
    pub conf: String,
    pub acl: String,
    /// The bootstrap mosquitto: the bootstrap listener, bridged to the
    /// main one's internal listener (its secret is put in by [`write`]).
    pub bootstrap_conf: String,
    pub bootstrap_acl: String,
    /// CA bundle for the service listener: root and every service CA.
    pub cafile: String,
    /// Every service CA's CRL in one file.
    pub crlfile: String,
    /// The broker certificate (`certs/broker.pem`) as it is now. It is
    /// not written anywhere: a new one (issued again for other server
    /// names, or renewed) makes the files differ, so that a watcher
    /// reloads mosquitto, which reads its certificate again on SIGHUP.
    pub server_cert: String,
}

/// `p` as an absolute path: mosquitto may run from another directory
/// (systemd starts it in `/`). Whether `p` exists yet or not.
fn abs(p: &Path) -> String {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// mosquitto's password-file line (`$7$`: PBKDF2-HMAC-SHA512, 101 rounds).
pub fn password_line(user: &str, secret: &str) -> Result<String, openssl::error::ErrorStack> {
    let mut salt = [0u8; 12];
    openssl::rand::rand_bytes(&mut salt)?;
    let mut hash = [0u8; 64];
    openssl::pkcs5::pbkdf2_hmac(
        secret.as_bytes(),
        &salt,
        101,
        openssl::hash::MessageDigest::sha512(),
        &mut hash,
    )?;
    Ok(format!(
        "{user}:$7$101${}${}\n",
        openssl::base64::encode_block(&salt),
        openssl::base64::encode_block(&hash)
    ))
}

/// The OpenSSL configuration mosquitto runs with (`OPENSSL_CONF`), written
/// as `openssl.cnf` beside `mosquitto.conf`: no TLS 1.3 session tickets
/// (`NumTickets`) and no TLS 1.2 ones (`-SessionTicket`), which with the
/// service listener's TLS 1.3 only makes every connect there a full
/// handshake. TLS 1.2 session ids still resume on the bootstrap listener,
/// which takes no certificates. It replaces the system's OpenSSL
/// configuration for mosquitto: of Debian's, it keeps the TLS 1.2 minimum.
pub const OPENSSL_CNF: &str = "\
# Generated by fleetshift: run mosquitto with OPENSSL_CONF set to this file.
# OpenSSL checks certificates only at a full handshake: no session tickets.
config_diagnostics = 1
openssl_conf = fleetshift
[fleetshift]
ssl_conf = fleetshift_ssl
[fleetshift_ssl]
system_default = fleetshift_tls
[fleetshift_tls]
MinProtocol = TLSv1.2
NumTickets = 0
Options = -SessionTicket
";

/// Whether the process `pid` runs with `OPENSSL_CONF` naming the
/// `openssl.cnf` written into `out_dir`; `None` if its environment cannot
/// be read (or is empty, as it is while the process starts).
pub fn runs_with_openssl_cnf(pid: u32, out_dir: &Path) -> Option<bool> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    if environ.is_empty() {
        return None;
    }
    let ours = out_dir.join("openssl.cnf");
    let ours = std::fs::canonicalize(&ours).unwrap_or(ours);
    Some(environ.split(|b| *b == 0).any(|var| {
        var.strip_prefix(b"OPENSSL_CONF=").is_some_and(|v| {
            let v = PathBuf::from(String::from_utf8_lossy(v).into_owned());
            std::fs::canonicalize(&v).unwrap_or(v) == ours
        })
    }))
}

/// Renders the configuration for `grants`.
pub fn render(p: &MosquittoParams, grants: &[DeviceGrant]) -> std::io::Result<MosquittoFiles> {
    let out = abs(&p.out_dir);
    let certs = abs(&p.certs_dir);
    let common = |conf: &mut String, acl_file: &str, pid_file: &str, max_packet: usize| {
        let _ = writeln!(conf, "per_listener_settings false");
        let _ = writeln!(conf, "acl_file {out}/{acl_file}");
        let _ = writeln!(conf, "pid_file {out}/{pid_file}");
        let _ = writeln!(conf, "persistence false\nlog_dest stderr");
        let _ = writeln!(conf, "user {}", p.user);
        let _ = writeln!(conf, "max_packet_size {max_packet}");
        // No client stores a message: the protocol retains nothing, and a
        // bootstrap client whose id has a '/' could otherwise leave one in
        // another's reply topic for it to find at its next subscribe.
        let _ = writeln!(conf, "retain_available false");
    };
    let mut conf = String::new();
    let _ = writeln!(
        conf,
        "# Generated by fleetshift: the front door's rules for mosquitto 2.0.\n\
         # Run with OPENSSL_CONF={out}/openssl.cnf (no TLS session resumption).\n\
         # The bootstrap listener is a mosquitto of its own: bootstrap.conf."
    );
    // One ACL for both listeners (`per_listener_settings false`): with an
    // ACL per listener, mosquitto 2.0.12 to 2.0.22 refuse every message
    // for a client that is away (its listener is forgotten at disconnect),
    // so a kept session, the manager's among them, would get nothing.
    common(&mut conf, "acl", MAIN_PID_FILE, p.max_packet_size);
    let _ = writeln!(conf, "allow_anonymous false");
    let _ = writeln!(conf, "password_file {out}/passwd");
    // The manager takes bootstrap requests at QoS 0 (topics.md §5.4); its
    // session keeps them while it is away, as it does on the embedded
    // broker.
    let _ = writeln!(conf, "queue_qos0_messages true");
    // A session kept with no connection (clean session 0) ends after a
    // day, as on the front door (`max_session_expiry_secs`).
    let _ = writeln!(conf, "persistent_client_expiration 1d");
    let _ = writeln!(
        conf,
        "\n# internal: the manager and the bootstrap bridge (username and secret)"
    );
    let _ = writeln!(conf, "listener {} {}", p.internal.port(), p.internal.ip());
    let _ = writeln!(
        conf,
        "\n# service: mutual TLS, the certificate CN is the username and the\n\
         # client id, whatever id the client sent; TLS 1.3 only, whose\n\
         # sessions resume by ticket alone, and openssl.cnf sends none"
    );
    let _ = writeln!(conf, "listener {} {}", p.service.port(), p.service.ip());
    let _ = writeln!(
        conf,
        "certfile {certs}/broker.pem\nkeyfile {certs}/broker.key\ncafile {out}/cafile.pem\ncrlfile {out}/crl.pem\n\
         require_certificate true\nuse_identity_as_username true\nuse_username_as_clientid true\ntls_version tlsv1.3"
    );

    let mut bootstrap_conf = String::new();
    let _ = writeln!(
        bootstrap_conf,
        "# Generated by fleetshift: the bootstrap listener for mosquitto 2.0, a\n\
         # mosquitto of its own, so that its clients' ids are apart from the\n\
         # service listener's: a bootstrap client cannot displace a device's\n\
         # service connection. It bridges the bootstrap topics to the main\n\
         # mosquitto (mosquitto.conf) through its internal listener.\n\
         # Run with OPENSSL_CONF={out}/openssl.cnf."
    );
    common(
        &mut bootstrap_conf,
        "bootstrap-acl",
        BOOTSTRAP_PID_FILE,
        p.max_bootstrap_packet_size,
    );
    // Its clients are to keep no session (as on fleetshift's broker); one
    // that asks for one keeps it an hour at most.
    let _ = writeln!(bootstrap_conf, "persistent_client_expiration 1h");
    let _ = writeln!(bootstrap_conf, "allow_anonymous true");
    let _ = writeln!(bootstrap_conf, "\n# bootstrap: server-authenticated TLS");
    let _ = writeln!(
        bootstrap_conf,
        "listener {} {}",
        p.bootstrap_tls.port(),
        p.bootstrap_tls.ip()
    );
    let _ = writeln!(
        bootstrap_conf,
        "certfile {certs}/broker.pem\nkeyfile {certs}/broker.key\ntls_version tlsv1.2"
    );
    let _ = writeln!(bootstrap_conf, "\nconnection fleet-main");
    let _ = writeln!(
        bootstrap_conf,
        "address {}:{}",
        p.internal.ip(),
        p.internal.port()
    );
    let _ = writeln!(
        bootstrap_conf,
        "local_clientid {BRIDGE_LOCAL_ID_MARK}\n\
         remote_clientid {BRIDGE_USER}\nremote_username {BRIDGE_USER}\n\
         remote_password {BRIDGE_SECRET_MARK}\ncleansession true\nnotifications false\n\
         bridge_protocol_version mqttv311\nrestart_timeout 1 10"
    );
    for (direction, topic) in BRIDGED {
        // At QoS 0 both ways. A flood of bootstrap requests fills the
        // bridge's queue toward the main mosquitto, and mosquitto (2.0.16
        // on, and Debian's 2.0.11 with the CVE-2023-28366 fix) then drops
        // the PUBACKs of the replies coming back: the main one's window to
        // the bridge never frees, and no QoS 1 reply passes again until
        // the bridge reconnects (eclipse/mosquitto #3542). A device sends
        // an unanswered request again (topics.md §10.1), and the manager
        // takes bootstrap requests at QoS 0 anyway.
        let _ = writeln!(bootstrap_conf, "topic {topic} {direction} 0");
    }

    let mut bootstrap_acl = String::new();
    let _ = writeln!(
        bootstrap_acl,
        "# Generated by fleetshift; see topics.md 2.3.\n\
         # Bootstrap clients: only their own request and reply topics."
    );
    for line in [
        "pattern write fleet/v1/activate/%c",
        "pattern write fleet/v1/update/%c",
        "pattern write fleet/v1/poll/%c",
        "pattern write fleet/v1/status/%c",
        "pattern read fleet/v1/activate/%c/reply",
        "pattern read fleet/v1/update/%c/reply",
        "pattern read fleet/v1/poll/%c/reply",
        "pattern read fleet/v1/status/%c/reply",
        "pattern read fleet/v1/service/change/%c",
    ] {
        let _ = writeln!(bootstrap_acl, "{line}");
    }

    let mut acl = String::new();
    let _ = writeln!(
        acl,
        "# Generated by fleetshift from the registry; see topics.md 2.3."
    );
    let _ = writeln!(
        acl,
        "\n# The bootstrap mosquitto's bridge: bootstrap requests in, replies out."
    );
    let _ = writeln!(acl, "user {BRIDGE_USER}");
    for (direction, topic) in BRIDGED {
        let access = if direction == "out" { "write" } else { "read" };
        let _ = writeln!(acl, "topic {access} {topic}");
    }
    let _ = writeln!(acl, "\nuser {}", crate::MANAGER_USER);
    let _ = writeln!(acl, "topic readwrite #");
    for g in grants {
        let d = &g.device_id;
        // Names the ACL gives to others; no device may be one (a registry
        // entry from before the name was reserved is left out).
        if [crate::MANAGER_USER, BRIDGE_USER]
            .iter()
            .any(|n| d.eq_ignore_ascii_case(n))
        {
            continue;
        }
        // Granted nothing: no line, so mosquitto refuses it everything.
        if g.services.is_empty() {
            continue;
        }
        let _ = writeln!(acl, "\nuser {d}");
        if d.starts_with(fleet_pki::grants::PROVIDER_PREFIX) {
            // A service provider reads its services' telemetry.
            for s in &g.services {
                let _ = writeln!(
                    acl,
                    "topic read {}",
                    crate::frontdoor::grants::telemetry_of_every_device(s)
                );
            }
            continue;
        }
        for s in &g.services {
            for kind in ["activate", "update", "poll", "status"] {
                let _ = writeln!(acl, "topic write /tenants/{s}/fleet/v1/{kind}/{d}");
                let _ = writeln!(acl, "topic read /tenants/{s}/fleet/v1/{kind}/{d}/reply");
            }
            let _ = writeln!(acl, "topic read /tenants/{s}/fleet/v1/service/change/{d}");
            let _ = writeln!(acl, "topic write /tenants/{s}/telemetry/{d}");
        }
    }

    let pems_in = |sub: &str| -> std::io::Result<Vec<String>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(p.certs_dir.join(sub))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "pem"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.iter().map(|f| read_named(f)).collect()
    };
    // Every root generation, then every service CA.
    let mut roots = vec![read_named(&p.certs_dir.join("root-ca.pem"))?];
    for root in fleet_pki::root_cert_files(&p.certs_dir).iter().skip(1) {
        roots.push(read_named(root)?);
    }
    let cas = pems_in("services")?;
    let mut cafile = roots.concat();
    for ca in &cas {
        cafile.push_str(ca);
    }
    // Only the CRLs of CAs in the bundle. mosquitto wants the CRL of every
    // leaf's issuer, so it then refuses every certificate of a service CA
    // retired before its end (its key stolen), whose CRL the PKI keeps a
    // while for brokers that cut sessions by it: with that CRL, a client
    // presenting the retired CA as its intermediate, which still chains to
    // the root, would pass with any serial its thief chose.
    // Each file on its own: one that does not parse costs only its CRL.
    let subjects: Vec<Vec<u8>> = roots
        .iter()
        .chain(&cas)
        .filter_map(|pem| openssl::x509::X509::from_pem(pem.as_bytes()).ok())
        .filter_map(|ca| ca.subject_name().to_der().ok())
        .collect();
    let mut crlfile = String::new();
    for crl in pems_in("crl")? {
        let issuer = openssl::x509::X509Crl::from_pem(crl.as_bytes())
            .ok()
            .and_then(|c| c.issuer_name().to_der().ok());
        if issuer.is_some_and(|issuer| subjects.contains(&issuer)) {
            crlfile.push_str(&crl);
        }
    }
    Ok(MosquittoFiles {
        conf,
        acl,
        bootstrap_conf,
        bootstrap_acl,
        cafile,
        crlfile,
        server_cert: std::fs::read_to_string(p.certs_dir.join("broker.pem")).unwrap_or_default(),
    })
}

/// A file's text; an error names the file.
fn read_named(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The services whose CA was in `before` (a CA bundle, PEM) and is not in
/// `after` though it has not expired: retired before its end, its key
/// stolen. A session with a certificate the thief made is on no CRL, so
/// the watcher cuts every principal of such a service.
pub fn services_retired_early(before: &str, after: &str) -> std::collections::BTreeSet<String> {
    let cas = |pem: &str| openssl::x509::X509::stack_from_pem(pem.as_bytes()).unwrap_or_default();
    let kept: Vec<Vec<u8>> = cas(after).iter().filter_map(|c| c.to_der().ok()).collect();
    let now = openssl::asn1::Asn1Time::days_from_now(0).ok();
    cas(before)
        .iter()
        .filter(|ca| ca.to_der().is_ok_and(|der| !kept.contains(&der)))
        .filter(|ca| now.as_ref().is_some_and(|now| ca.not_after() > now))
        .filter_map(|ca| {
            let o = ca
                .subject_name()
                .entries_by_nid(openssl::nid::Nid::ORGANIZATIONNAME)
                .next()?;
            o.data().to_string().ok()
        })
        .collect()
}

/// Each CRL in `crlfile` (PEM CRLs one after another), parsed; `None` for
/// one that does not parse.
fn crls(crlfile: &str) -> impl Iterator<Item = Option<openssl::x509::X509Crl>> + '_ {
    const BEGIN: &str = "-----BEGIN X509 CRL-----";
    crlfile
        .match_indices(BEGIN)
        .map(|(at, _)| openssl::x509::X509Crl::from_pem(&crlfile.as_bytes()[at..]).ok())
}

/// The serials `crl` revokes, spelled as the registry spells them:
/// OpenSSL's hex of whole bytes, lowercase.
fn serials_of(crl: &openssl::x509::X509CrlRef) -> impl Iterator<Item = String> + '_ {
    crl.get_revoked()
        .into_iter()
        .flatten()
        .map(|r| crate::frontdoor::trust::hex_serial(r.serial_number()))
}

/// The serials every CRL in `crlfile` revokes ([`serials_of`]). A CRL
/// that does not parse is left out.
pub fn revoked_serials(crlfile: &str) -> std::collections::BTreeSet<String> {
    crls(crlfile)
        .flatten()
        .flat_map(|crl| serials_of(&crl).collect::<Vec<_>>())
        .collect()
}

/// The serials the CRLs in `crlfile` revoke, if each of them is signed by
/// one of the CA certificates in `cafile`; `None` when `crlfile` holds no
/// CRL, one that does not parse, or one that none of them signed (another
/// PKI's).
pub fn revoked_if_signed_by(
    crlfile: &str,
    cafile: &str,
) -> Option<std::collections::BTreeSet<String>> {
    let cas = openssl::x509::X509::stack_from_pem(cafile.as_bytes()).ok()?;
    let keys: Vec<_> = cas.iter().filter_map(|ca| ca.public_key().ok()).collect();
    let mut serials = std::collections::BTreeSet::new();
    let mut any = false;
    for crl in crls(crlfile) {
        let crl = crl?;
        if !keys.iter().any(|k| crl.verify(k).unwrap_or(false)) {
            return None;
        }
        serials.extend(serials_of(&crl));
        any = true;
    }
    any.then_some(serials)
}

/// The file, in the output directory, holding the CRLs a reload of the main
/// mosquitto was last signalled with (see [`note_loaded`]).
pub const LOADED_CRL_FILE: &str = "crl.loaded.pem";

/// Records, after the main mosquitto of `out_dir` was signalled to reload,
/// the CRLs it was to load (`crlfile`, as [`write`] wrote them).
pub fn note_loaded(out_dir: &Path, crlfile: &str) -> std::io::Result<()> {
    replace(&out_dir.join(LOADED_CRL_FILE), crlfile.as_bytes())
}

/// The CRLs the main mosquitto of `out_dir` loaded, as far as the files
/// tell: `crl.pem` if the process started (`started_ms`, Unix ms) after
/// the file was last written ([`read_at_start`]), since mosquitto reads it as it starts; else
/// those its last reload was signalled with ([`note_loaded`]). `crl.pem`
/// alone proves nothing: it is written before the signal, which may not
/// follow (a watcher stopped in between, a mosquitto not running).
pub fn loaded_crls(out_dir: &Path, started_ms: Option<u64>) -> Option<String> {
    let crl = out_dir.join("crl.pem");
    match read_at_start(&crl, started_ms) {
        true => std::fs::read_to_string(crl).ok(),
        false => std::fs::read_to_string(out_dir.join(LOADED_CRL_FILE)).ok(),
    }
}

/// Whether a process that started at `started_ms` (Unix ms) read `path` as
/// it is now at its start: the file last changed before ([`changed_ms`]).
/// False if either time is unknown.
pub fn read_at_start(path: &Path, started_ms: Option<u64>) -> bool {
    matches!((changed_ms(path), started_ms), (Some(changed), Some(started)) if changed <= started)
}

/// When `path` last changed (its inode's ctime), Unix ms: unlike its
/// modification time, no copy that keeps times (`cp -p`, `rsync -a`,
/// `tar x`) sets it back.
fn changed_ms(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let secs = u64::try_from(meta.ctime()).ok()?;
    Some(secs * 1000 + u64::try_from(meta.ctime_nsec()).ok()? / 1_000_000)
}

/// Replaces `path` with `bytes` (a new file gets `mode`) through the PKI's
/// atomic write, so mosquitto never reads a half-written file and two
/// writers (a watcher and a run by hand) never rename each other's.
fn replace_with_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    fleet_pki::write_atomic(path, bytes, mode).map_err(std::io::Error::other)
}

fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_with_mode(path, bytes, 0o644)
}

/// Lowercase hex.
fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the files into `p.out_dir`. The bridge's secret is made once
/// (`bridge.secret`) and kept; the password file gets the manager's line
/// when `secret` is given, and the bridge's when it has none or the
/// bridge's secret is new.
pub fn write(
    p: &MosquittoParams,
    files: &MosquittoFiles,
    secret: Option<&str>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(&p.out_dir)?;
    replace(&p.out_dir.join("openssl.cnf"), OPENSSL_CNF.as_bytes())?;
    replace(&p.out_dir.join("acl"), files.acl.as_bytes())?;
    replace(
        &p.out_dir.join("bootstrap-acl"),
        files.bootstrap_acl.as_bytes(),
    )?;
    replace(&p.out_dir.join("cafile.pem"), files.cafile.as_bytes())?;
    // mosquitto refuses an empty CRL file, and reads its `crlfile` setting
    // only when it starts (a reload reads the file again, not the setting):
    // the PKI's root CRL (`crl/_root.crl.pem`) keeps the file from being
    // empty from the start. A PKI without any CRL configures none.
    let conf = if files.crlfile.is_empty() {
        files
            .conf
            .lines()
            .filter(|l| !l.starts_with("crlfile"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else {
        replace(&p.out_dir.join("crl.pem"), files.crlfile.as_bytes())?;
        files.conf.clone()
    };
    replace(&p.out_dir.join("mosquitto.conf"), conf.as_bytes())?;

    let secret_path = p.out_dir.join("bridge.secret");
    let (bridge_secret, new_bridge) = match std::fs::read_to_string(&secret_path) {
        Ok(s) if !s.trim().is_empty() => (s.trim().to_string(), false),
        _ => {
            let mut bytes = [0u8; 24];
            openssl::rand::rand_bytes(&mut bytes).map_err(std::io::Error::other)?;
            let s = to_hex(&bytes);
            replace_with_mode(&secret_path, s.as_bytes(), 0o600)?;
            (s, true)
        }
    };
    let bootstrap_conf = files
        .bootstrap_conf
        .replace(BRIDGE_SECRET_MARK, &bridge_secret)
        .replace(BRIDGE_LOCAL_ID_MARK, &bridge_local_id(&bridge_secret));
    replace_with_mode(
        &p.out_dir.join("bootstrap.conf"),
        bootstrap_conf.as_bytes(),
        0o600,
    )?;

    let passwd = p.out_dir.join("passwd");
    let old = std::fs::read_to_string(&passwd).unwrap_or_default();
    let user_of = |line: &str| line.split(':').next().unwrap_or_default().to_string();
    let mut lines: Vec<String> = old.lines().map(str::to_string).collect();
    let mut set = |user: &str, secret: &str| -> std::io::Result<()> {
        lines.retain(|l| user_of(l) != user);
        let line = password_line(user, secret).map_err(std::io::Error::other)?;
        lines.push(line.trim_end().to_string());
        Ok(())
    };
    if let Some(secret) = secret {
        set(crate::MANAGER_USER, secret)?;
    }
    if new_bridge || !old.lines().any(|l| user_of(l) == BRIDGE_USER) {
        set(BRIDGE_USER, &bridge_secret)?;
    }
    let new = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    if new != old || !passwd.exists() {
        replace_with_mode(&passwd, new.as_bytes(), 0o600)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters for a PKI made in `dir`, writing to `out_dir`.
    fn params(dir: &Path, out_dir: PathBuf) -> MosquittoParams {
        let certs = dir.join("certs");
        fleet_pki::Pki::open_or_create(&certs).unwrap();
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        MosquittoParams {
            internal: addr(1883),
            bootstrap_tls: addr(8884),
            service: addr(8883),
            certs_dir: certs,
            out_dir,
            user: "nobody".into(),
            max_packet_size: 256 * 1024,
            max_bootstrap_packet_size: 32 * 1024,
        }
    }

    /// CRLs written for another PKI (a directory reused) are not taken
    /// for what mosquitto loaded; this PKI's are.
    #[test]
    fn only_crls_this_pki_signed_count_as_loaded() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ours = render(&params(a.path(), a.path().join("out")), &[]).unwrap();
        let theirs = render(&params(b.path(), b.path().join("out")), &[]).unwrap();
        assert!(ours.crlfile.contains("BEGIN X509 CRL"));
        assert_eq!(
            revoked_if_signed_by(&ours.crlfile, &ours.cafile),
            Some(Default::default())
        );
        assert_eq!(revoked_if_signed_by(&theirs.crlfile, &ours.cafile), None);
        assert_eq!(revoked_if_signed_by("", &ours.cafile), None);
    }

    /// A service CA retired before its end leaves the bundle, and its CRL,
    /// which the PKI keeps a while, leaves the CRL file: mosquitto then
    /// refuses its certificates for want of a CRL, whatever chain a client
    /// presents. Its successor and the root keep theirs.
    #[test]
    fn a_retired_service_ca_leaves_the_bundle_with_its_crl() {
        let dir = tempfile::tempdir().unwrap();
        let pki = fleet_pki::Pki::open_or_create(&dir.path().join("certs")).unwrap();
        pki.write_crl("svcA", 1, &[], 1).unwrap();
        pki.roll_service_ca("svcA", 2).unwrap();
        let first = std::fs::read_to_string(pki.crl_path("svcA")).unwrap();
        let first_ca = std::fs::read_to_string(pki.service_ca_path("svcA")).unwrap();
        let second = std::fs::read_to_string(pki.crl_path_of("svcA", 2)).unwrap();
        let both = render(&params(dir.path(), dir.path().join("out")), &[]).unwrap();
        assert!(both.crlfile.contains(&first) && both.crlfile.contains(&second));
        assert!(both.cafile.contains(&first_ca));
        pki.retire_service_cas("svcA", 2).unwrap();
        assert!(pki.crl_path("svcA").exists(), "the PKI keeps it");
        let after = render(&params(dir.path(), dir.path().join("out")), &[]).unwrap();
        assert!(!after.cafile.contains(&first_ca));
        assert!(!after.crlfile.contains(&first));
        assert!(after.crlfile.contains(&second));
        let root_crl = std::fs::read_to_string(pki.root_crl_path()).unwrap();
        assert!(after.crlfile.contains(&root_crl));
        // A file there that does not parse costs no other CA its CRL.
        std::fs::write(pki.dir().join("services/junk.pem"), "not a certificate").unwrap();
        let junk = render(&params(dir.path(), dir.path().join("out")), &[]).unwrap();
        assert!(junk.crlfile.contains(&root_crl) && junk.crlfile.contains(&second));
    }

    /// `crl.pem` counts as loaded only if mosquitto started after it was
    /// written; otherwise what its last reload was signalled with does.
    #[test]
    fn the_crls_loaded_are_those_read_at_start_or_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        assert_eq!(loaded_crls(out, Some(now_ms())), None);
        let before = now_ms() - 1_000;
        std::fs::write(out.join("crl.pem"), "written").unwrap();
        let after = now_ms() + 1_000;
        // Written, never signalled: not known to be loaded.
        assert_eq!(loaded_crls(out, Some(before)), None);
        assert_eq!(loaded_crls(out, None), None);
        // Its modification time set back, as a copy that keeps times does:
        // written now all the same.
        std::fs::File::options()
            .write(true)
            .open(out.join("crl.pem"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(loaded_crls(out, Some(before)), None);
        // Read by a mosquitto that started after it was written.
        assert_eq!(loaded_crls(out, Some(after)).as_deref(), Some("written"));
        // A reload signalled with it, then a newer file not signalled.
        note_loaded(out, "written").unwrap();
        std::fs::write(out.join("crl.pem"), "newer").unwrap();
        assert_eq!(loaded_crls(out, Some(before)).as_deref(), Some("written"));
        assert_eq!(loaded_crls(out, None).as_deref(), Some("written"));
    }

    /// A configuration written for a directory not made yet, named
    /// relatively, names its files by absolute path all the same.
    #[test]
    fn files_are_named_by_absolute_path_before_they_exist() {
        let dir = tempfile::tempdir().unwrap();
        let p = params(dir.path(), PathBuf::from("not-made-yet/mq"));
        let files = render(&p, &[]).unwrap();
        for conf in [&files.conf, &files.bootstrap_conf] {
            for line in conf.lines() {
                let Some((key, value)) = line.split_once(' ') else {
                    continue;
                };
                if [
                    "acl_file",
                    "pid_file",
                    "password_file",
                    "cafile",
                    "crlfile",
                    "certfile",
                    "keyfile",
                ]
                .contains(&key)
                {
                    assert!(value.starts_with('/'), "{line}");
                }
            }
        }
        assert!(!Path::new("not-made-yet").exists());
    }

    /// Each mosquitto takes packets up to its front-door counterpart's
    /// limit, and writes its pid where a reload looks for it.
    #[test]
    fn each_mosquitto_has_its_listener_s_packet_limit_and_a_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = params(dir.path(), dir.path().join("out"));
        let files = render(&p, &[]).unwrap();
        let setting = |conf: &str, key: &str| -> Vec<String> {
            conf.lines()
                .filter_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(setting(&files.conf, "max_packet_size"), ["262144"]);
        assert_eq!(setting(&files.bootstrap_conf, "max_packet_size"), ["32768"]);
        let out = abs(&p.out_dir);
        assert_eq!(
            setting(&files.conf, "pid_file"),
            [format!("{out}/{MAIN_PID_FILE}")]
        );
        assert_eq!(
            setting(&files.bootstrap_conf, "pid_file"),
            [format!("{out}/{BOOTSTRAP_PID_FILE}")]
        );
        // No pid file, or one naming no mosquitto: nothing to reload.
        assert_eq!(main_pid(&p.out_dir), None);
        std::fs::create_dir_all(&p.out_dir).unwrap();
        let own = std::process::id();
        std::fs::write(p.out_dir.join(MAIN_PID_FILE), format!("{own}\n")).unwrap();
        assert!(!is_mosquitto(own));
        assert_eq!(main_pid(&p.out_dir), None);
        // A process that set no handler for SIGHUP would be ended by one.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let takes = takes_sighup(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!takes);
    }

    /// The bridge's secret is made once and kept; the password file holds
    /// the manager and the bridge, and a new manager secret keeps the
    /// bridge's line; only `bootstrap.conf` carries the bridge's secret.
    #[test]
    fn the_bridge_secret_is_made_once_and_the_password_file_keeps_both() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = params(dir.path(), dir.path().join("out"));
        let grant = |d: &str| DeviceGrant {
            device_id: d.into(),
            services: vec!["svcA".into()],
        };
        let files = render(&p, &[grant("dev1"), grant("Fleet-Manager")]).unwrap();
        assert!(files.bootstrap_conf.contains(BRIDGE_SECRET_MARK));
        assert!(files.acl.contains("\nuser dev1\n"));
        assert_eq!(
            files.acl.matches("\nuser ").count(),
            3,
            "the manager, the bridge and dev1 only: {}",
            files.acl
        );
        let read = |f: &str| std::fs::read_to_string(p.out_dir.join(f)).unwrap();
        let users = |passwd: String| -> Vec<String> {
            passwd
                .lines()
                .map(|l| l.split(':').next().unwrap().to_string())
                .collect()
        };

        write(&p, &files, Some("first")).unwrap();
        let secret = read("bridge.secret");
        assert_eq!(secret.len(), 48);
        let conf = read("bootstrap.conf");
        assert!(conf.contains(&format!("remote_password {secret}\n")));
        let local_id = format!("local_clientid {}\n", bridge_local_id(&secret));
        assert!(conf.contains(&local_id), "{conf}");
        assert!(!conf.contains('@'), "a mark left in: {conf}");
        assert!(!read("mosquitto.conf").contains(&secret));
        for f in ["bootstrap.conf", "bridge.secret", "passwd"] {
            let mode = std::fs::metadata(p.out_dir.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others");
        }
        assert_eq!(users(read("passwd")), [crate::MANAGER_USER, BRIDGE_USER]);

        let before = read("passwd");
        write(&p, &files, None).unwrap();
        assert_eq!(read("passwd"), before, "rewritten without a reason");
        write(&p, &files, Some("second")).unwrap();
        assert_eq!(read("bridge.secret"), secret);
        let after = read("passwd");
        assert_ne!(after, before);
        assert_eq!(users(after.clone()), [BRIDGE_USER, crate::MANAGER_USER]);
        assert!(
            after.contains(before.lines().nth(1).unwrap()),
            "bridge line changed"
        );
    }

    /// Every CRL of the concatenated file counts, the root's empty one too,
    /// and serials come out as the registry spells them (OpenSSL's hex of
    /// whole bytes, lowercase).
    #[test]
    fn revoked_serials_of_every_crl_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let pki = fleet_pki::Pki::open_or_create(dir.path()).unwrap();
        let entry = |serial_hex: &str| fleet_pki::RevokedEntry {
            serial_hex: serial_hex.into(),
            revoked_at: 1_700_000_000,
        };
        let a = pki
            .write_crl("svcA", 1, &[entry("1a2b"), entry("ff")], 1)
            .unwrap();
        let b = pki.write_crl("svcB", 1, &[entry("0c")], 2).unwrap();
        let mut file = std::fs::read_to_string(pki.root_crl_path()).unwrap();
        file += &std::fs::read_to_string(a).unwrap();
        file += "not a CRL\n";
        file += &std::fs::read_to_string(b).unwrap();
        let got: Vec<_> = revoked_serials(&file).into_iter().collect();
        assert_eq!(got, ["0c", "1a2b", "ff"]);
        assert!(revoked_serials("").is_empty());
    }

    /// A process is seen to run with the written `openssl.cnf` only when its
    /// `OPENSSL_CONF` names that file.
    #[test]
    fn openssl_conf_of_a_running_process_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("openssl.cnf"), OPENSSL_CNF).unwrap();
        let run = |conf: Option<&Path>| {
            let mut sleep = std::process::Command::new("sleep");
            sleep.arg("30").env_remove("OPENSSL_CONF");
            if let Some(conf) = conf {
                sleep.env("OPENSSL_CONF", conf);
            }
            let mut child = sleep.spawn().unwrap();
            // Read once the process has its environment.
            let started = std::time::Instant::now();
            let seen = loop {
                let seen = runs_with_openssl_cnf(child.id(), dir.path());
                if seen.is_some() || started.elapsed() > std::time::Duration::from_secs(5) {
                    break seen;
                }
                std::thread::yield_now();
            };
            child.kill().unwrap();
            child.wait().unwrap();
            seen
        };
        assert_eq!(run(Some(&dir.path().join("openssl.cnf"))), Some(true));
        assert_eq!(run(Some(&dir.path().join("other.cnf"))), Some(false));
        assert_eq!(run(None), Some(false));
        assert_eq!(runs_with_openssl_cnf(u32::MAX, dir.path()), None);
    }
}
