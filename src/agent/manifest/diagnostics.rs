//! Located manifest errors, all reported at once.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a manifest, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in one manifest file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    pub diagnostics: Vec<Diagnostic>,
}

impl ManifestError {
    /// A manifest that could not be read at all.
    pub fn unreadable(file: &Path, cause: &std::io::Error) -> Self {
        ManifestError {
            file: file.to_owned(),
            diagnostics: vec![Diagnostic {
                line: 1,
                column: 1,
                message: format!("cannot read the manifest: {cause}"),
            }],
        }
    }
}

impl ManifestError {
    /// One problem found after parsing (a plugin that does not load).
    pub fn at(file: &Path, location: super::Location, message: impl Into<String>) -> Self {
        ManifestError {
            file: file.to_owned(),
            diagnostics: vec![Diagnostic {
                line: location.line,
                column: location.column,
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ManifestError {
    /// `file:line:col: error: message`, one per line: the format compilers
    /// use, so editors and CI annotate the right place.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file.display(),
                d.line,
                d.column,
                d.message
            )?;
        }
        Ok(())
    }
}

/// Collects diagnostics against one source text.
#[derive(Debug)]
pub(crate) struct Diagnostics<'s> {
    source: &'s str,
    items: Vec<(usize, String)>,
}

impl<'s> Diagnostics<'s> {
    pub(crate) fn new(source: &'s str) -> Self {
        Diagnostics {
            source,
            items: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.items.push((span.start, message.into()));
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The line and column of a byte offset span's start.
    pub(crate) fn locate(&self, span: Range<usize>) -> super::Location {
        let (line, column) = position(self.source, span.start);
        super::Location { line, column }
    }

    pub(crate) fn into_error(mut self, file: &Path) -> ManifestError {
        self.items.sort_by_key(|(offset, _)| *offset);
        self.items.dedup();
        let diagnostics = self
            .items
            .into_iter()
            .map(|(offset, message)| {
                let (line, column) = position(self.source, offset);
                Diagnostic {
                    line,
                    column,
                    message,
                }
            })
            .collect();
        ManifestError {
            file: file.to_owned(),
            diagnostics,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn position(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::position;

    #[test]
    fn positions_count_lines_and_characters_from_one() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(position(src, 0), (1, 1));
        assert_eq!(position(src, 6), (2, 1));
        assert_eq!(position(src, 9), (2, 3));
    }
}
