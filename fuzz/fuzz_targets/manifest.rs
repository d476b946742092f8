//! `Manifest::parse` on arbitrary text: it never panics, and a rejected
//! manifest says at least one thing, each at a line and column that exist.

#![no_main]

use std::path::Path;

use coord::agent::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Err(error) = Manifest::parse(Path::new("/fuzz/agent.toml"), text) else {
        return;
    };
    assert!(!error.diagnostics.is_empty(), "rejected without a reason");
    let lines = text.split('\n').collect::<Vec<_>>();
    for d in &error.diagnostics {
        assert!(
            (1..=lines.len()).contains(&d.line),
            "{}:{} is not a line of the text ({} lines): {}",
            d.line,
            d.column,
            lines.len(),
            d.message
        );
        let width = lines[d.line - 1].chars().count();
        assert!(
            (1..=width + 1).contains(&d.column),
            "{}:{} is past the end of its line ({width} characters): {}",
            d.line,
            d.column,
            d.message
        );
        assert!(!d.message.is_empty(), "an empty message at {}:{}", d.line, d.column);
    }
    // What the operator sees must render too.
    let _ = error.to_string();
});
