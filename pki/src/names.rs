//! The names the broker's server certificate carries: those devices and
//! tools reach the broker by, which their TLS client checks against the
//! certificate (a DNS name, or an IP address when they connect to one).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use openssl::x509::X509Ref;

use crate::PkiError;

/// Always in the broker certificate, so that tools on the broker's own
/// host reach it as they always could.
const LOCAL_DNS: &[&str] = &["localhost"];
const LOCAL_IPS: &[IpAddr] = &[
    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
];

/// A set of DNS names and IP addresses for the broker certificate's
/// subjectAltName. DNS names are kept in lower case (names compare without
/// case); a leftmost `*` label is a wildcard, as TLS clients read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNames {
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
}

impl ServerNames {
    /// `localhost`, `127.0.0.1` and `::1`, and each of `names`: an IP
    /// address if it reads as one, else a DNS name (letters, digits and
    /// hyphens in labels of 1 to 63 characters, 253 in all, no label
    /// starting or ending with a hyphen; `*.` in front for a wildcard).
    pub fn with_local<S: AsRef<str>>(names: &[S]) -> Result<ServerNames, PkiError> {
        let mut out = ServerNames {
            dns: LOCAL_DNS.iter().map(|d| d.to_string()).collect(),
            ips: LOCAL_IPS.iter().copied().collect(),
        };
        for name in names {
            let name = name.as_ref().trim();
            // `[::1]`, as in a URL, is accepted too.
            let bare = name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .unwrap_or(name);
            if let Ok(ip) = bare.parse::<IpAddr>() {
                // `::ffff:10.0.0.7` is how a client reaching 10.0.0.7 has it.
                let ip = ip.to_canonical();
                // A listener's "every address", or a group: no client
                // reaches a broker by either.
                if ip.is_unspecified() || ip.is_multicast() {
                    return Err(PkiError::BadServerName(name.to_string()));
                }
                out.ips.insert(ip);
            } else if is_dns_name(name) {
                out.dns.insert(name.to_ascii_lowercase());
            } else {
                return Err(PkiError::BadServerName(name.to_string()));
            }
        }
        Ok(out)
    }

    /// What `cert` names in its subjectAltName (anything but DNS names and
    /// IP addresses left out).
    pub fn of(cert: &X509Ref) -> ServerNames {
        let mut out = ServerNames {
            dns: BTreeSet::new(),
            ips: BTreeSet::new(),
        };
        for name in cert.subject_alt_names().iter().flatten() {
            if let Some(dns) = name.dnsname() {
                out.dns.insert(dns.to_ascii_lowercase());
            } else if let Some(ip) = name.ipaddress() {
                let ip = match ip.len() {
                    4 => <[u8; 4]>::try_from(ip).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(ip).ok().map(IpAddr::from),
                    _ => None,
                };
                out.ips.extend(ip);
            }
        }
        out
    }

    pub fn dns(&self) -> impl Iterator<Item = &str> {
        self.dns.iter().map(String::as_str)
    }

    pub fn ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.ips.iter()
    }
}

impl fmt::Display for ServerNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dns = self.dns.iter().map(|d| d.to_string());
        let all: Vec<String> = dns.chain(self.ips.iter().map(IpAddr::to_string)).collect();
        f.write_str(&all.join(" "))
    }
}

/// A host name as RFC 1123 has it, with an optional `*.` in front of at
/// least two labels (`*.example.com`, not `*.com`).
fn is_dns_name(name: &str) -> bool {
    let (host, wildcard) = match name.strip_prefix("*.") {
        Some(host) => (host, true),
        None => (name, false),
    };
    if wildcard && !host.contains('.') {
        return false;
    }
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    (1..=253).contains(&name.len())
        && host.split('.').all(label)
        // A name of digits only is an address that did not parse.
        && !host.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_as_addresses_or_host_names_and_nothing_else() {
        let names = ServerNames::with_local(&[
            "Fleet.Example.COM",
            "::ffff:10.0.0.7",
            "[fd00::7]",
            "*.brokers.example.com",
            "localhost",
        ])
        .unwrap();
        assert_eq!(
            names.to_string(),
            "*.brokers.example.com fleet.example.com localhost 10.0.0.7 127.0.0.1 ::1 fd00::7"
        );
        for bad in [
            "",
            "broker example",
            "-broker.example",
            "broker-.example",
            "broker..example",
            "10.0.0.300",
            "a.*.example",
            "broker.example/path",
            "mqtts://broker.example",
            &"a".repeat(64),
            "0.0.0.0",
            "::",
            "[::]",
            "224.0.0.1",
            "ff02::1",
            "*.lan",
        ] {
            assert!(
                matches!(ServerNames::with_local(&[bad]), Err(PkiError::BadServerName(n)) if n == bad.trim()),
                "{bad:?} accepted"
            );
        }
        assert_eq!(
            ServerNames::with_local::<&str>(&[]).unwrap().to_string(),
            "localhost 127.0.0.1 ::1"
        );
    }
}
