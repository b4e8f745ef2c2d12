//! Who a connection is, and what it may publish and subscribe to: the
//! grants of `topics.md` §2.3, as code.
//!
//! Device grants are exact topics, never filters: a subscription is granted
//! only if it parses as one concrete topic of the device's own, so no
//! wildcard (`#`, `+/#`, `$share/g/#`) can widen it.

use fleet_protocol::{Route, Topic};

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
