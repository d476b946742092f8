//! Which names the DNS server answers, and what each one asks for.
//!
//! Under the zone (`[dns] domain`, `coord` by default):
//!
//! | name | what |
//! |---|---|
//! | `<service>.service.<domain>` | the service's listed instances |
//! | `_<service>._tcp.service.<domain>` | the same, in RFC 2782's form |
//! | `<value>.<key>.<service>.service.<domain>` | those whose metadata `key` is `value` |
//! | `<instance>.<service>.service.<domain>` | one instance (the target of its SRV record) |
//! | `<agent>.agent.<domain>` | the agent's address, from its presence record |
//!
//! Services, instances, agents, metadata keys and values are matched by
//! their [`label`]: coord's names may hold characters a DNS label should
//! not (an agent named after its FQDN gives instance ids with dots).

use hickory_server::proto::rr::{LowerName, Name};

/// What a query name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    /// The zone itself, `service.<domain>` or `agent.<domain>`: names that
    /// exist and hold nothing to look up.
    Apex,
    Service {
        service: String,
    },
    Filtered {
        service: String,
        key: String,
        value: String,
    },
    Instance {
        service: String,
        instance: String,
    },
    Agent {
        agent: String,
    },
    /// In the zone, but no name coord gives out: NXDOMAIN.
    Unknown,
    /// Not in the zone: coord is no recursive resolver (REFUSED).
    Outside,
}

/// The zone's name and how query names are read against it.
#[derive(Debug, Clone)]
pub struct Zone {
    name: Name,
    lower: LowerName,
}

impl Zone {
    /// The zone `domain` (validated by the manifest: labels of letters,
    /// digits and `-`).
    pub fn new(domain: &str) -> Result<Zone, String> {
        let mut name = Name::from_ascii(domain).map_err(|e| format!("`{domain}`: {e}"))?;
        name.set_fqdn(true);
        let lower = LowerName::new(&name);
        Ok(Zone { name, lower })
    }

    /// The zone's name, fully qualified.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// What `query` asks for.
    pub fn question(&self, query: &LowerName) -> Question {
        if !self.lower.zone_of(query) {
            return Question::Outside;
        }
        let inside = usize::from(query.num_labels() - self.lower.num_labels());
        // Lower-cased already (a LowerName); leftmost first.
        let labels: Vec<&[u8]> = query.iter().take(inside).collect();
        let Some(labels) = labels
            .iter()
            .map(|l| std::str::from_utf8(l).ok())
            .collect::<Option<Vec<&str>>>()
        else {
            return Question::Unknown;
        };
        let owned = |s: &str| s.to_owned();
        match labels.as_slice() {
            [] | ["service"] | ["agent"] => Question::Apex,
            [service, "service"] => Question::Service {
                service: owned(service),
            },
            [service, proto, "service"] if service.starts_with('_') && proto.starts_with('_') => {
                Question::Service {
                    service: owned(&service[1..]),
                }
            }
            [instance, service, "service"] => Question::Instance {
                service: owned(service),
                instance: owned(instance),
            },
            [value, key, service, "service"] => Question::Filtered {
                service: owned(service),
                key: owned(key),
                value: owned(value),
            },
            [agent, "agent"] => Question::Agent {
                agent: owned(agent),
            },
            _ => Question::Unknown,
        }
    }

    /// `<instance>.<service>.service.<domain>.`: an SRV record's target.
    pub fn instance_name(&self, service: &str, instance: &str) -> Option<Name> {
        Name::from_labels([instance.as_bytes(), service.as_bytes(), b"service"])
            .ok()?
            .append_domain(&self.name)
            .ok()
    }

    /// `hostmaster.<domain>.` and `ns.<domain>.`, for the SOA record that
    /// negative answers carry.
    pub fn soa_names(&self) -> (Name, Name) {
        let under = |label: &str| {
            Name::from_labels([label.as_bytes()])
                .and_then(|n| n.append_domain(&self.name))
                .unwrap_or_else(|_| self.name.clone())
        };
        (under("ns"), under("hostmaster"))
    }
}

/// How one of coord's names (a service, an instance id, an agent, a
/// metadata key or value) reads as a DNS label: lower case, anything but
/// letters, digits, `-` and `_` as `-`, at most 63 bytes. Two names with
/// one label answer together.
pub fn label(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(63);
    if out.is_empty() {
        out.push('-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(zone: &Zone, name: &str) -> Question {
        let name = Name::from_ascii(name).expect("name");
        zone.question(&LowerName::new(&name))
    }

    #[test]
    fn names_are_read_against_the_zone_case_blind() {
        let zone = Zone::new("coord").expect("zone");
        let service = |s: &str| Question::Service { service: s.into() };
        assert_eq!(ask(&zone, "API.service.coord."), service("api"));
        assert_eq!(ask(&zone, "_api._tcp.service.coord."), service("api"));
        assert_eq!(
            ask(&zone, "eu-1.zone.api.service.coord."),
            Question::Filtered {
                service: "api".into(),
                key: "zone".into(),
                value: "eu-1".into()
            }
        );
        assert_eq!(
            ask(&zone, "web-01-api.api.service.coord."),
            Question::Instance {
                service: "api".into(),
                instance: "web-01-api".into()
            }
        );
        assert_eq!(
            ask(&zone, "web-01.agent.coord."),
            Question::Agent {
                agent: "web-01".into()
            }
        );
        assert_eq!(ask(&zone, "coord."), Question::Apex);
        assert_eq!(ask(&zone, "service.coord."), Question::Apex);
        assert_eq!(ask(&zone, "api.nodes.coord."), Question::Unknown);
        assert_eq!(ask(&zone, "example.com."), Question::Outside);
        assert_eq!(ask(&zone, "xcoord."), Question::Outside);

        let deep = Zone::new("coord.example.internal").expect("zone");
        assert_eq!(
            ask(&deep, "api.service.coord.example.internal."),
            service("api")
        );
        assert_eq!(ask(&deep, "api.service.coord."), Question::Outside);
    }

    #[test]
    fn labels_keep_only_what_dns_names_carry() {
        assert_eq!(label("web-01.example.com-api"), "web-01-example-com-api");
        assert_eq!(label("API_v2"), "api_v2");
        assert_eq!(label(&"x".repeat(80)).len(), 63);
    }
}
