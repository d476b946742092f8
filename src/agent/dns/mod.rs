//! Discovery over DNS (`[dns]`): any program finds a service's healthy
//! instances with an ordinary lookup of `<service>.service.<domain>`.
//!
//! Answers come from the agent's watch cache (the services, health and
//! agents prefixes), indexed once per change, never from a round trip to
//! etcd per query. `names.rs` reads query names, `answers.rs` holds the
//! index and what each name answers, `view.rs` follows the cache across
//! reconnects, `server.rs` is hickory-server on UDP and TCP.

mod answers;
mod names;
mod server;
mod view;

pub use names::{Question, Zone, label};
pub use server::{DnsError, DnsServer, QueryResult, type_label};
pub use view::RegistryView;
