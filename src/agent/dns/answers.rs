//! What each name answers, from an [`Index`] of the cached registry.
//!
//! The index is built from the cache's snapshots of the services, health
//! and agents prefixes once per change, never per query; a query only
//! looks up and shuffles.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

use super::names::{Question, Zone, label};
use crate::etcd::CacheSnapshot;
use crate::presence::Agent;
use crate::registry::{self, Instance};

/// Where an instance is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Ip(IpAddr),
    /// A host name (`db.internal:5432`): answered with a CNAME.
    Host(Name),
}

/// One instance, as DNS gives it out.
#[derive(Debug, Clone)]
struct Entry {
    /// Its label (see [`label`]).
    label: String,
    /// Listed for discovery and not critical or in maintenance.
    serving: bool,
    /// `None` when its address is not `host:port` DNS can carry.
    target: Option<(Target, u16)>,
    weight: u16,
    /// `key=value` strings, keys and values as labels for filters.
    metadata: Vec<(String, String, String)>,
}

/// The registry as DNS reads it: services and agents by label.
#[derive(Debug, Default)]
pub struct Index {
    /// Every service with a discovery entry or a health record.
    services: HashMap<String, Vec<Entry>>,
    /// Every present agent, with the address its record publishes.
    agents: HashMap<String, Option<IpAddr>>,
}

impl Index {
    /// Reads the cached `services`, `health` and `agents` prefixes of
    /// `namespace`.
    pub fn build(
        namespace: &str,
        services: &CacheSnapshot,
        health: &CacheSnapshot,
        agents: &CacheSnapshot,
    ) -> Index {
        let sp = registry::services_prefix(namespace);
        let hp = registry::health_prefix(namespace);
        let ap = crate::presence::prefix(namespace);
        let instances = registry::instances(
            namespace,
            None,
            services.under(&sp).cloned(),
            health.under(&hp).cloned(),
        );
        let mut index = Index::default();
        for i in instances {
            let entry = entry(&i);
            index
                .services
                .entry(label(&i.service))
                .or_default()
                .push(entry);
        }
        for kv in agents.under(&ap) {
            if let Some(agent) = Agent::from_kv(namespace, kv) {
                let address = agent
                    .record
                    .and_then(|r| r.address)
                    .and_then(|a| a.parse().ok());
                let slot = index.agents.entry(label(&agent.name)).or_default();
                *slot = slot.or(address);
            }
        }
        index
    }

    /// The answer to `question` for records of type `qtype`, each with
    /// `ttl`.
    pub fn answer(&self, zone: &Zone, query: &Name, qtype: RecordType, ttl: u32) -> Answer {
        let question = zone.question(&query.into());
        let mut out = Answer::new(ResponseCode::NoError);
        match question {
            Question::Outside => return Answer::new(ResponseCode::Refused),
            Question::Unknown => return out.negative(zone, ResponseCode::NXDomain, ttl),
            Question::Apex => {
                if qtype == RecordType::SOA && query == zone.name() {
                    out.answers.push(soa(zone, ttl));
                }
            }
            Question::Agent { agent } => match self.agents.get(&agent) {
                None => return out.negative(zone, ResponseCode::NXDomain, ttl),
                Some(Some(ip)) => {
                    if let Some(r) = address(query, *ip, qtype, ttl) {
                        out.answers.push(r);
                    }
                }
                Some(None) => {}
            },
            Question::Instance { service, instance } => {
                let Some(entries) = self.services.get(&service) else {
                    return out.negative(zone, ResponseCode::NXDomain, ttl);
                };
                let found: Vec<&Entry> = entries.iter().filter(|e| e.label == instance).collect();
                if found.is_empty() {
                    return out.negative(zone, ResponseCode::NXDomain, ttl);
                }
                let serving: Vec<&Entry> = found.into_iter().filter(|e| e.serving).collect();
                out.instances(zone, query, &service, &serving, qtype, ttl);
            }
            Question::Service { service } => {
                let Some(entries) = self.services.get(&service) else {
                    return out.negative(zone, ResponseCode::NXDomain, ttl);
                };
                let serving: Vec<&Entry> = entries.iter().filter(|e| e.serving).collect();
                out.instances(zone, query, &service, &serving, qtype, ttl);
            }
            Question::Filtered {
                service,
                key,
                value,
            } => {
                let Some(entries) = self.services.get(&service) else {
                    return out.negative(zone, ResponseCode::NXDomain, ttl);
                };
                let matching: Vec<&Entry> = entries
                    .iter()
                    .filter(|e| e.metadata.iter().any(|(k, v, _)| *k == key && *v == value))
                    .collect();
                if matching.is_empty() {
                    return out.negative(zone, ResponseCode::NXDomain, ttl);
                }
                let serving: Vec<&Entry> = matching.into_iter().filter(|e| e.serving).collect();
                out.instances(zone, query, &service, &serving, qtype, ttl);
            }
        }
        if out.answers.is_empty() {
            return out.negative(zone, ResponseCode::NoError, ttl);
        }
        out
    }

    /// How many services and agents it knows.
    pub fn len(&self) -> (usize, usize) {
        (self.services.len(), self.agents.len())
    }
}

/// What to send back.
#[derive(Debug, Clone)]
pub struct Answer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    /// The zone's SOA on a negative answer (NXDOMAIN or no records), so
    /// resolvers cache the absence no longer than the TTL.
    pub authorities: Vec<Record>,
    /// Addresses of SRV targets, so a client needs no second query.
    pub additionals: Vec<Record>,
}

impl Answer {
    pub fn new(code: ResponseCode) -> Answer {
        Answer {
            code,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }

    fn negative(mut self, zone: &Zone, code: ResponseCode, ttl: u32) -> Answer {
        self.code = code;
        self.answers.clear();
        self.additionals.clear();
        self.authorities = vec![soa(zone, ttl)];
        self
    }

    /// Records for the serving instances `entries` at `query`, shuffled.
    fn instances(
        &mut self,
        zone: &Zone,
        query: &Name,
        service: &str,
        entries: &[&Entry],
        qtype: RecordType,
        ttl: u32,
    ) {
        let mut entries: Vec<&Entry> = entries.to_vec();
        entries.shuffle(&mut rand::rng());
        match qtype {
            RecordType::A | RecordType::AAAA | RecordType::ANY | RecordType::CNAME => {
                let ips: Vec<IpAddr> = entries
                    .iter()
                    .filter_map(|e| match &e.target {
                        Some((Target::Ip(ip), _)) => Some(*ip),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    // Only host names: one CNAME (a name holds at most one,
                    // and nothing beside it), a different one per query.
                    let host = entries.iter().find_map(|e| match &e.target {
                        Some((Target::Host(h), _)) => Some(h.clone()),
                        _ => None,
                    });
                    if let Some(host) = host {
                        self.answers.push(Record::from_rdata(
                            query.clone(),
                            ttl,
                            RData::CNAME(CNAME(host)),
                        ));
                    }
                } else {
                    self.answers
                        .extend(ips.iter().filter_map(|ip| address(query, *ip, qtype, ttl)));
                }
            }
            RecordType::SRV => {
                for e in entries {
                    let (Some((target, port)), Some(name)) =
                        (&e.target, zone.instance_name(service, &e.label))
                    else {
                        continue;
                    };
                    self.answers.push(Record::from_rdata(
                        query.clone(),
                        ttl,
                        RData::SRV(SRV::new(1, e.weight, *port, name.clone())),
                    ));
                    let extra = match target {
                        Target::Ip(IpAddr::V4(ip)) => RData::A(A(*ip)),
                        Target::Ip(IpAddr::V6(ip)) => RData::AAAA(AAAA(*ip)),
                        Target::Host(h) => RData::CNAME(CNAME(h.clone())),
                    };
                    self.additionals.push(Record::from_rdata(name, ttl, extra));
                }
            }
            RecordType::TXT => {
                for e in entries.iter().filter(|e| !e.metadata.is_empty()) {
                    let strings = e.metadata.iter().map(|(_, _, s)| s.clone()).collect();
                    self.answers.push(Record::from_rdata(
                        query.clone(),
                        ttl,
                        RData::TXT(TXT::new(strings)),
                    ));
                }
            }
            _ => {}
        }
    }
}

/// An A or AAAA record for `ip` when `qtype` asks for its family.
fn address(query: &Name, ip: IpAddr, qtype: RecordType, ttl: u32) -> Option<Record> {
    let data = match (ip, qtype) {
        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(v4)),
        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(v6)),
        _ => return None,
    };
    Some(Record::from_rdata(query.clone(), ttl, data))
}

fn soa(zone: &Zone, ttl: u32) -> Record {
    let (ns, hostmaster) = zone.soa_names();
    // Serial 1: the zone has no versions a secondary could transfer.
    let data = SOA::new(ns, hostmaster, 1, 3600, 600, 86400, ttl);
    Record::from_rdata(zone.name().clone(), ttl, RData::SOA(data))
}

/// The most a TXT character-string holds.
const TXT_STRING_LIMIT: usize = 255;

fn entry(i: &Instance) -> Entry {
    let serving = i.is_listed() && i.health.as_ref().is_none_or(|h| h.status.serves());
    let target = i.addr().and_then(target);
    let weight = i.weight().clamp(1, u32::from(u16::MAX)) as u16;
    let metadata = i
        .metadata()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let value = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let mut text = format!("{k}={value}");
                    let mut cut = text.len().min(TXT_STRING_LIMIT);
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                    (label(k), label(&value), text)
                })
                .collect()
        })
        .unwrap_or_default();
    Entry {
        label: label(&i.id),
        serving,
        target,
        weight,
        metadata,
    }
}

/// `host:port` as a target: an IP address (`10.0.0.5:80`, `[::1]:80`) or
/// a host name.
fn target(addr: &str) -> Option<(Target, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some((Target::Ip(ip), port));
    }
    let mut name = Name::from_ascii(host).ok()?;
    name.set_fqdn(true);
    Some((Target::Host(name), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_ips_or_host_names() {
        assert_eq!(
            target("10.0.0.5:8080"),
            Some((Target::Ip("10.0.0.5".parse().expect("ip")), 8080))
        );
        assert_eq!(
            target("[::1]:53"),
            Some((Target::Ip("::1".parse().expect("ip")), 53))
        );
        assert_eq!(
            target("db.internal:5432"),
            Some((
                Target::Host(Name::from_ascii("db.internal.").expect("name")),
                5432
            ))
        );
        assert_eq!(target("no-port"), None);
    }
}
