//! Text that coord does not control — values from etcd, what hooks and
//! plugins print — on its way into a log.

use std::fmt;

/// Shows a string with line breaks and other control characters escaped
/// (`\n`, `\u{1b}`): a newline in an etcd value or a hook's output cannot
/// start a forged log line, nor an escape sequence repaint the terminal, nor
/// a bidirectional override reorder what a reader sees. Everything else is
/// shown as it is.
///
/// ```
/// use coord::untrusted::Untrusted;
/// let note = "ok\n2026-01-01T00:00:00Z ERROR forged";
/// assert_eq!(Untrusted(note).to_string(), "ok\\n2026-01-01T00:00:00Z ERROR forged");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(f, "{}", c.escape_debug())?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// Control characters (C0, DEL, C1: newlines, escapes, NEL), the Unicode
/// line and paragraph separators, and the bidirectional controls.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::Untrusted;

    #[test]
    fn line_breaks_and_control_characters_are_escaped_and_the_rest_kept() {
        let cases = [
            (
                "plain text, unchanged: é ü 日本",
                "plain text, unchanged: é ü 日本",
            ),
            ("two\nlines", "two\\nlines"),
            ("cr\rlf\r\n", "cr\\rlf\\r\\n"),
            ("tab\tnul\0", "tab\\tnul\\0"),
            ("\x1b[31mred\x1b[0m", "\\u{1b}[31mred\\u{1b}[0m"),
            ("nel\u{85}del\u{7f}", "nel\\u{85}del\\u{7f}"),
            ("ls\u{2028}ps\u{2029}", "ls\\u{2028}ps\\u{2029}"),
            ("rlo\u{202e}gnp.exe", "rlo\\u{202e}gnp.exe"),
            ("quotes \" ' and \\ stay", "quotes \" ' and \\ stay"),
            ("", ""),
        ];
        for (input, shown) in cases {
            assert_eq!(Untrusted(input).to_string(), shown, "{input:?}");
        }
    }
}
