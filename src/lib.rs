//! coord: hosts coordinating through etcd.
//!
//! The library is the etcd layer ([`etcd`]) and the primitives built on it
//! ([`presence`], [`registry`], [`config`], and with their issues lock and
//! ids).
//! [`agent`] is the declarative layer on top: manifest, reconciler, hooks.
//! The primitives know nothing of the agent. [`untrusted`] shows text
//! coord does not control (etcd values, hook output) safely in logs.

pub mod agent;
pub mod config;
pub mod coordinator;
pub mod election;
pub mod etcd;
pub mod ids;
pub mod lock;
pub mod presence;
pub mod registry;
pub mod untrusted;

pub use coordinator::{Coord, Options};
