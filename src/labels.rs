//! Agent labels (`zone = "eu-1"`, `role = "edge"`) and the selectors that
//! pick agents by them (`zone=eu-1,role!=canary`).
//!
//! Parsed here and nowhere else: the manifest checks `[agent] labels` with
//! [`check`], and every selector — `coord agents --select`, a staged
//! rollout — goes through [`Selector`]'s `FromStr`, whose error says where
//! in the text it went wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// An agent's labels, by key.
pub type Labels = BTreeMap<String, String>;

/// The longest label key or value.
pub const MAX_LEN: usize = 63;

/// Why a label key or value is not one: `None` when it is.
fn invalid(text: &str, what: &str) -> Option<String> {
    if text.is_empty() {
        return Some(format!("a label {what} cannot be empty"));
    }
    if text.len() > MAX_LEN {
        return Some(format!(
            "label {what} `{text}` is longer than {MAX_LEN} characters"
        ));
    }
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Some(format!(
            "label {what} `{text}` has `{c}`: use letters, digits, `-`, `_` and `.`"
        ));
    }
    None
}

/// Checks one label: `Err` says what is wrong with the key or the value.
pub fn check(key: &str, value: &str) -> Result<(), String> {
    match invalid(key, "key").or_else(|| invalid(value, "value")) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// `k=v,k2=v2`, keys in order: how labels are shown.
pub fn show(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How a term compares a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `k=v`: the agent has label `k` with value `v`.
    Equals,
    /// `k!=v`: the agent has no label `k`, or another value.
    NotEquals,
}

/// One `k=v` or `k!=v` of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// The label key.
    pub key: String,
    /// How it is compared.
    pub op: Op,
    /// The value compared with.
    pub value: String,
}

/// Terms joined by `,`: an agent matches when every term does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<Term>,
}

/// A selector that does not parse, with where (byte offsets in the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector `{text}` at column {}: {reason}", at.start + 1)]
pub struct SelectorError {
    /// The selector as given.
    pub text: String,
    /// The part that is wrong.
    pub at: Range<usize>,
    /// Why.
    pub reason: String,
}

impl Selector {
    /// The terms, in the order given.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// Whether an agent with `labels` is selected.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.terms.iter().all(|t| {
            let has = labels.get(&t.key) == Some(&t.value);
            match t.op {
                Op::Equals => has,
                Op::NotEquals => !has,
            }
        })
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Selector, SelectorError> {
        let error = |at: Range<usize>, reason: String| SelectorError {
            text: text.to_owned(),
            at,
            reason,
        };
        if text.trim().is_empty() {
            return Err(error(
                0..text.len(),
                "it is empty: write terms like `zone=eu-1,role!=canary`".into(),
            ));
        }
        let mut terms = Vec::new();
        let mut start = 0;
        for part in text.split(',') {
            let span = start..start + part.len();
            start = span.end + 1;
            // Offsets of the trimmed term inside `text`.
            let lead = part.len() - part.trim_start().len();
            let term = part.trim();
            let at = span.start + lead;
            if term.is_empty() {
                return Err(error(
                    span,
                    "an empty term (two commas, or one at an end)".into(),
                ));
            }
            let (key, op, value, value_at) = if let Some((k, v)) = term.split_once("!=") {
                (k, Op::NotEquals, v, at + k.len() + 2)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, Op::Equals, v, at + k.len() + 1)
            } else {
                return Err(error(
                    at..at + term.len(),
                    format!("`{term}` is not `key=value` or `key!=value`"),
                ));
            };
            let (key, value) = (key.trim_end(), value.trim_start());
            if let Some(why) = invalid(key, "key") {
                return Err(error(at..at + key.len().max(1), why));
            }
            let value_at = value_at + (term.len() - (value_at - at) - value.len());
            if let Some(why) = invalid(value, "value") {
                return Err(error(value_at..value_at + value.len().max(1), why));
            }
            terms.push(Term {
                key: key.to_owned(),
                op,
                value: value.to_owned(),
            });
        }
        Ok(Selector { terms })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            let op = match t.op {
                Op::Equals => "=",
                Op::NotEquals => "!=",
            };
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}{op}{}", t.key, t.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn terms_must_all_match_and_not_equals_matches_an_absent_label() {
        let s: Selector = "zone=eu-1, role!=canary".parse().expect("parses");
        assert_eq!(s.to_string(), "zone=eu-1,role!=canary");
        assert!(s.matches(&labels(&[("zone", "eu-1"), ("role", "edge")])));
        assert!(s.matches(&labels(&[("zone", "eu-1")])));
        assert!(!s.matches(&labels(&[("zone", "eu-1"), ("role", "canary")])));
        assert!(!s.matches(&labels(&[("zone", "eu-2")])));
    }

    #[test]
    fn errors_point_at_the_wrong_part() {
        let e = "zone=eu-1,,role=x"
            .parse::<Selector>()
            .expect_err("refused");
        assert_eq!(e.at, 10..10);
        let e = "zone=eu-1,role".parse::<Selector>().expect_err("refused");
        assert_eq!(e.at, 10..14);
        let e = "zone=eu 1".parse::<Selector>().expect_err("refused");
        assert_eq!(e.at, 5..9, "{e}");
        let e = "zo/ne=x".parse::<Selector>().expect_err("refused");
        assert_eq!(e.at, 0..5, "{e}");
        assert!(e.to_string().contains("column 1"), "{e}");
        assert!("".parse::<Selector>().is_err());
    }
}
