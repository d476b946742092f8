//! A validator for staged configuration files: JSON (must parse) or
//! nginx-like (balanced braces, and every directive line ends with `;`).
//!
//! The format comes from the hook's `config` (`{"format":"json"}` or
//! `{"format":"nginx"}`), or else from the destination's name: `.json` is
//! JSON, `.conf` or a name containing `nginx` is nginx. A file of neither
//! kind is an error (not a veto): say which format it is in `config`.

wit_bindgen::generate!({
    world: "validator",
    path: "../wit/0.1.0",
});

use coord::hooks::host::config;
use exports::coord::hooks::file_validator::{Guest, Verdict};

struct ValidateConfig;

#[derive(Clone, Copy)]
enum Format {
    Json,
    Nginx,
}

impl Guest for ValidateConfig {
    fn validate(path: String, staged: Vec<u8>) -> Result<Verdict, String> {
        let format = match configured_format()? {
            Some(f) => f,
            None => format_of(&path).ok_or_else(|| {
                format!(
                    "cannot tell the format of `{path}`: set `config = {{ format = \"json\" }}` or \"nginx\""
                )
            })?,
        };
        let text = match std::str::from_utf8(&staged) {
            Ok(t) => t,
            Err(e) => {
                return Ok(Verdict::Veto(format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.valid_up_to()
                )));
            }
        };
        let problem = match format {
            Format::Json => check_json(text),
            Format::Nginx => check_nginx(text),
        };
        Ok(problem.map_or(Verdict::Accept, Verdict::Veto))
    }
}

export!(ValidateConfig);

fn configured_format() -> Result<Option<Format>, String> {
    let config: serde_json::Value =
        serde_json::from_str(&config()).map_err(|e| format!("invalid config: {e}"))?;
    match config.get("format") {
        None => Ok(None),
        Some(f) => match f.as_str() {
            Some("json") => Ok(Some(Format::Json)),
            Some("nginx") => Ok(Some(Format::Nginx)),
            _ => Err(format!(
                "invalid `format` {f} in config: use \"json\" or \"nginx\""
            )),
        },
    }
}

fn format_of(path: &str) -> Option<Format> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if name.ends_with(".json") {
        Some(Format::Json)
    } else if name.ends_with(".conf") || name.contains("nginx") {
        Some(Format::Nginx)
    } else {
        None
    }
}

fn check_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .err()
        .map(|e| {
            format!(
                "invalid JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            )
        })
}

/// Checks nginx-like syntax line by line: `#` starts a comment, quotes
/// ('…' and "…") hide braces, `;` and `#`; every line that has something
/// outside comments must end with `;`, `{` or `}`; braces must balance.
fn check_nginx(text: &str) -> Option<String> {
    let mut open: Vec<usize> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let mut quote: Option<char> = None;
        let mut escaped = false;
        let mut last: Option<char> = None;
        for c in line.chars() {
            if let Some(q) = quote {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                last = Some(c);
                continue;
            }
            match c {
                '#' => break,
                '"' | '\'' => quote = Some(c),
                '{' => open.push(n),
                // The guard pops: a `}` closes the innermost open `{`.
                '}' if open.pop().is_none() => {
                    return Some(format!("line {n}: `}}` closes nothing"));
                }
                _ => {}
            }
            if !c.is_whitespace() {
                last = Some(c);
            }
        }
        if quote.is_some() {
            return Some(format!("line {n}: unterminated quote"));
        }
        match last {
            None | Some(';' | '{' | '}') => {}
            Some(_) => {
                return Some(format!(
                    "line {n}: directive does not end with `;`: `{}`",
                    line.trim()
                ));
            }
        }
    }
    open.last()
        .map(|n| format!("line {n}: `{{` is never closed"))
}
