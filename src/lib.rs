//! coord: hosts coordinating through etcd.
//!
//! The library is [`Coord`] — one handle owning the connection, the session
//! lease and a read cache, from which a service gets its registry, locks,
//! config center, instance ids and elections ([`coordinator`]) — over the
//! primitives ([`registry`], [`lock`], [`config`], [`ids`], [`election`],
//! [`presence`], with agents' [`labels`], staged [`rollout`]s) and the
//! etcd layer under them all ([`etcd`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use coord::{Coord, Options};
//! let coord = Coord::connect(Options::from_env()).await?;
//! let guard = coord.locks().lock("reports").await?;
//! println!("fencing token {}", guard.token());
//! guard.release().await?;
//! coord.close().await;
//! # Ok(()) }
//! ```
//!
//! [`agent`] is the declarative layer on top: manifest, reconciler, hooks.
//! The primitives know nothing of the agent. [`untrusted`] shows text
//! coord does not control (etcd values, hook output) safely in logs.
#![warn(missing_docs)]

// The agent is the `coord run` program's layer, not the library's API:
// its items are documented where they say why, not each one.
#[allow(missing_docs)]
pub mod agent;
pub mod config;
pub mod coordinator;
pub mod election;
pub mod etcd;
pub mod ids;
pub mod labels;
pub mod lock;
pub mod presence;
pub mod registry;
pub mod rollout;
pub mod untrusted;

pub use coordinator::{Coord, Options};
