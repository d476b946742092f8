//! `[[file]]`: etcd data rendered into files, replaced only whole, only
//! after checks pass, and only when the content really changed.

mod controller;
mod functions;
mod render;
mod rollouts;
mod write;

pub use controller::{FileStats, FilesController};
pub use functions::RenderData;
pub use render::{Deps, Render, RenderError, Renderer, TemplateProblem};
pub use write::{WriteError, WriteOutcome, hash, write};
