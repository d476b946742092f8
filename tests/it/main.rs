//! Integration tests: one binary (so etcd helpers compile once), talking
//! to real etcd processes started on free loopback ports.
//!
//! etcd must be installed (`apt-get install etcd-server`, or ETCD_BIN);
//! without it every test here fails and says so.

mod support;

mod architecture;
mod cache;
mod cli;
mod config;
mod deploy;
mod faults;
mod files;
mod hooks;
mod ids;
mod locks;
mod manifest;
mod presence;
mod reconcile;
mod registry;
mod services;
mod session;
mod status;
mod tasks;
mod tls;
mod wasm;
