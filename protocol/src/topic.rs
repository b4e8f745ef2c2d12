//! Topic names: the only place a topic string is built or parsed.
//!
//! Bootstrap traffic lives at `fleet/v1/...`; once a device holds a service
//! certificate its manager traffic moves inside its tenant,
//! `/tenants/{service_id}/fleet/v1/...`, next to its service traffic.

use std::fmt;

use crate::ProtocolError;

/// Topic namespace of this protocol version.
pub const NAMESPACE: &str = "fleet/v1";

/// The request families a device sends; each has a reply topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Activate,
    Update,
    Poll,
    Status,
}

impl RequestKind {
    pub const ALL: [RequestKind; 4] = [Self::Activate, Self::Update, Self::Poll, Self::Status];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Activate => "activate",
            Self::Update => "update",
            Self::Poll => "poll",
            Self::Status => "status",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a topic carries, without its tenant prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// `fleet/v1/{kind}/{device_id}`: device → manager.
    Request(RequestKind, String),
    /// `fleet/v1/{kind}/{device_id}/reply`: manager → device.
    Reply(RequestKind, String),
    /// `fleet/v1/service/change/{device_id}`: manager → device.
    ServiceChange(String),
    /// `telemetry/{device_id}`: device → its service (tenant topics only).
    Telemetry(String),
}

/// A full topic: an optional tenant (the service id) and a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    pub tenant: Option<String>,
    pub route: Route,
}

impl Topic {
    pub fn bootstrap(route: Route) -> Self {
        Topic {
            tenant: None,
            route,
        }
    }

    pub fn in_tenant(tenant: &str, route: Route) -> Self {
        Topic {
            tenant: Some(tenant.to_owned()),
            route,
        }
    }

    /// The topic a reply to a request on `self` goes to: same tenant, same device.
    pub fn reply_topic(&self) -> Option<Topic> {
        match &self.route {
            Route::Request(kind, device) => Some(Topic {
                tenant: self.tenant.clone(),
                route: Route::Reply(*kind, device.clone()),
            }),
            _ => None,
        }
    }

    pub fn device_id(&self) -> &str {
        match &self.route {
            Route::Request(_, d)
            | Route::Reply(_, d)
            | Route::ServiceChange(d)
            | Route::Telemetry(d) => d,
        }
    }

    /// Parses a topic. Ids are checked with [`validate_device_id`] and
    /// [`validate_service_id`], so a parsed topic never carries a wildcard.
    pub fn parse(topic: &str) -> Result<Topic, ProtocolError> {
        let bad = || ProtocolError::BadTopic(topic.to_owned());
        let (tenant, rest) = match topic.strip_prefix("/tenants/") {
            Some(rest) => {
                let (tenant, rest) = rest.split_once('/').ok_or_else(bad)?;
                validate_service_id(tenant).map_err(|_| bad())?;
                (Some(tenant.to_owned()), rest)
            }
            None => (None, topic),
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let route = match parts.as_slice() {
            ["fleet", "v1", "service", "change", device] => {
                Route::ServiceChange(device.to_string())
            }
            ["fleet", "v1", kind, device] => Route::Request(
                RequestKind::parse(kind).ok_or_else(bad)?,
                device.to_string(),
            ),
            ["fleet", "v1", kind, device, "reply"] => Route::Reply(
                RequestKind::parse(kind).ok_or_else(bad)?,
                device.to_string(),
            ),
            ["telemetry", device] if tenant.is_some() => Route::Telemetry(device.to_string()),
            _ => return Err(bad()),
        };
        let parsed = Topic { tenant, route };
        validate_device_id(parsed.device_id()).map_err(|_| bad())?;
        Ok(parsed)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(tenant) = &self.tenant {
            write!(f, "/tenants/{tenant}/")?;
        }
        match &self.route {
            Route::Request(kind, d) => write!(f, "{NAMESPACE}/{kind}/{d}"),
            Route::Reply(kind, d) => write!(f, "{NAMESPACE}/{kind}/{d}/reply"),
            Route::ServiceChange(d) => write!(f, "{NAMESPACE}/service/change/{d}"),
            Route::Telemetry(d) => write!(f, "telemetry/{d}"),
        }
    }
}

/// Filters the manager subscribes to: every device request, bootstrap and in
/// every tenant.
pub fn manager_filters() -> [String; 2] {
    [
        format!("{NAMESPACE}/+/+"),
        format!("/tenants/+/{NAMESPACE}/+/+"),
    ]
}

/// The manager's name at the broker (username and client id), which no
/// device may take: on a broker that names a client by its certificate's
/// CN (mosquitto's `use_identity_as_username`), a device of that name
/// would be given the manager's grants.
pub const RESERVED_DEVICE_ID: &str = "fleet-manager";

/// Device ids: 1–64 of `A-Z a-z 0-9 - _`. No `/`, `+`, `#` or `.` (rumqttd
/// joins tenant and client id with a dot), and not
/// [`RESERVED_DEVICE_ID`] in any case.
pub fn validate_device_id(id: &str) -> Result<(), ProtocolError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !id.eq_ignore_ascii_case(RESERVED_DEVICE_ID);
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::BadId(id.to_owned()))
    }
}

/// Service ids: 1–32 of `A-Z a-z 0-9` (they are rumqttd tenant ids and
/// certificate O values).
pub fn validate_service_id(id: &str) -> Result<(), ProtocolError> {
    let ok = (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::BadId(id.to_owned()))
    }
}

/// A service endpoint as a service-change notice carries it (topics.md
/// §3.5.6): `mqtts://HOST:PORT`. HOST is a DNS name (dot-separated labels
/// of 1–63 `A-Z a-z 0-9 -`, none starting or ending with `-`, 253 bytes in
/// all), an IPv4 address in dotted decimal, or an IPv6 address in
/// brackets; PORT is 1–65535 in decimal digits. Returns the host (an IPv6
/// address without its brackets), which is also the name the device checks
/// the broker's certificate against, and the port.
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), ProtocolError> {
    let bad = || ProtocolError::BadEndpoint(endpoint.to_owned());
    let rest = endpoint.strip_prefix("mqtts://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let port = digits
        .then(|| port.parse::<u16>().ok())
        .flatten()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        v6
    } else {
        let dns_label = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let ok = if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            host.parse::<std::net::Ipv4Addr>().is_ok()
        } else {
            host.len() <= 253 && host.split('.').all(dns_label)
        };
        if !ok {
            return Err(bad());
        }
        host
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_as_notices_carry_them() {
        for (endpoint, host, port) in [
            ("mqtts://127.0.0.1:8883", "127.0.0.1", 8883),
            (
                "mqtts://broker.example.com:8883",
                "broker.example.com",
                8883,
            ),
            ("mqtts://localhost:1", "localhost", 1),
            ("mqtts://[::1]:65535", "::1", 65535),
            ("mqtts://x-1.b2:8883", "x-1.b2", 8883),
        ] {
            assert_eq!(
                parse_endpoint(endpoint).unwrap(),
                (host.to_string(), port),
                "{endpoint}"
            );
        }
        let long_label = format!("mqtts://{}:8883", "a".repeat(64));
        for bad in [
            "127.0.0.1:8883",
            "mqtt://127.0.0.1:8883",
            "mqtts://127.0.0.1",
            "mqtts://127.0.0.1:",
            "mqtts://127.0.0.1:0",
            "mqtts://127.0.0.1:65536",
            "mqtts://127.0.0.1:+88",
            "mqtts://127.0.0.1:008883",
            "mqtts://:8883",
            "mqtts://300.1.1.1:8883",
            "mqtts://1.2.3:8883",
            "mqtts://::1:8883",
            "mqtts://[::g]:8883",
            "mqtts://-a.example:8883",
            "mqtts://a..example:8883",
            "mqtts://a_b.example:8883",
            "mqtts://host/path:8883",
            "mqtts://user@host:8883",
            "mqtts://h\u{e9}te:8883",
            &long_label,
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn round_trips_every_route() {
        let routes = [
            Route::Request(RequestKind::Activate, "dev-1".into()),
            Route::Reply(RequestKind::Update, "dev_2".into()),
            Route::ServiceChange("d3".into()),
        ];
        for route in routes {
            for tenant in [None, Some("svcA".to_string())] {
                let t = Topic {
                    tenant,
                    route: route.clone(),
                };
                assert_eq!(Topic::parse(&t.to_string()).unwrap(), t);
            }
        }
        let t = Topic::in_tenant("weather", Route::Telemetry("dev1".into()));
        assert_eq!(t.to_string(), "/tenants/weather/telemetry/dev1");
        assert_eq!(Topic::parse("/tenants/weather/telemetry/dev1").unwrap(), t);
    }

    #[test]
    fn exact_strings() {
        let t = Topic::bootstrap(Route::Request(RequestKind::Activate, "dev1".into()));
        assert_eq!(t.to_string(), "fleet/v1/activate/dev1");
        assert_eq!(
            t.reply_topic().unwrap().to_string(),
            "fleet/v1/activate/dev1/reply"
        );
        let t = Topic::in_tenant("A", Route::ServiceChange("dev1".into()));
        assert_eq!(t.to_string(), "/tenants/A/fleet/v1/service/change/dev1");
    }

    #[test]
    fn rejects_wildcards_and_junk() {
        for bad in [
            "fleet/v1/activate/+",
            "fleet/v1/activate/#",
            "fleet/v1/nope/dev1",
            "fleet/v2/activate/dev1",
            "/tenants/a-b/fleet/v1/update/dev1",
            "telemetry/dev1",
            "fleet/v1/activate/a.b",
            "fleet/v1/activate/",
            "fleet/v1/activate/fleet-manager",
            "/tenants/A/telemetry/Fleet-Manager",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad} parsed");
        }
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Parsing never panics, and whatever parses prints back the same.
        #[test]
        fn parse_display_agree(s in "(/tenants/[a-zA-Z0-9+#]{0,6}/)?(fleet/v1/[a-z+#]{0,8}/[a-zA-Z0-9_#+.-]{0,8}(/reply)?|telemetry/[a-z0-9+]{0,5}|fleet/v1/service/change/[a-z0-9#]{0,4})") {
            if let Ok(t) = Topic::parse(&s) {
                prop_assert_eq!(t.to_string(), s.clone());
                prop_assert!(!s.contains('+') && !s.contains('#'));
            }
        }
    }
}
