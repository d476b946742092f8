//! `[[service]]`: registration with health checks, withdrawal from
//! discovery while critical or in maintenance.

mod check;
mod controller;
mod template;

pub use check::{CheckResult, run as run_check};
pub use controller::{ServiceStats, ServicesController};
pub use template::template_service;
