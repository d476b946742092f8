//! `[[service]]`: registration with health checks, withdrawal from
//! discovery while critical or in maintenance.

mod check;
mod controller;

pub use check::{CheckResult, run as run_check};
pub use controller::{ServiceStats, ServicesController};
