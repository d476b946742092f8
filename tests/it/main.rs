//! Integration tests: one binary (so etcd helpers compile once), talking
//! to real etcd processes started on free loopback ports.
//!
//! etcd must be installed (`apt-get install etcd-server`, or ETCD_BIN);
//! without it every test here fails and says so.

mod support;

mod architecture;
mod cache;
mod check;
mod cli;
mod config;
mod coordinator;
mod deploy;
mod destination;
mod dns;
mod election;
mod examples;
mod faults;
mod files;
mod fleet;
mod guarded;
mod hooks;
mod host_inotify;
mod ids;
mod interop;
mod locks;
mod manifest;
mod messages;
mod packaging;
mod presence;
mod proxy;
mod reconcile;
mod registry;
mod render;
mod rollout;
mod services;
mod session;
mod shared_etcd;
mod status;
mod supervised;
mod tasks;
mod tls;
mod wasm;
