//! JSON Schema checks of a value before it is written.

use std::fmt;

use super::{Error, to_json};

/// One way a value fails its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where in the value, as a JSON pointer (`/port`, `/hosts/0`; empty
    /// for the value as a whole).
    pub path: String,
    /// Why, in the validator's words.
    pub reason: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "at the top level: {}", self.reason)
        } else {
            write!(f, "at {}: {}", self.path, self.reason)
        }
    }
}

pub(super) fn list(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(Violation::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A compiled JSON Schema. Remote `$ref`s are not fetched (the validator is
/// built without HTTP or file resolving), so a schema must be
/// self-contained.
pub struct Schema {
    validator: jsonschema::Validator,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema").finish_non_exhaustive()
    }
}

impl Schema {
    /// Compiles `schema`; the error says why it is not a valid schema.
    pub fn new(schema: &serde_json::Value) -> Result<Schema, String> {
        jsonschema::validator_for(schema)
            .map(|validator| Schema { validator })
            .map_err(|e| e.to_string())
    }

    /// Every violation of the schema by `value`, in the validator's order.
    pub fn violations(&self, value: &serde_json::Value) -> Vec<Violation> {
        self.validator
            .iter_errors(value)
            .map(|e| Violation {
                path: e.instance_path().to_string(),
                reason: e.to_string(),
            })
            .collect()
    }

    /// Checks the bytes about to be written at `key`, read as
    /// [`to_json`] reads them (JSON, else a string).
    ///
    /// ```
    /// use coord::config::{Error, Schema};
    /// let schema = Schema::new(&serde_json::json!({
    ///     "type": "object",
    ///     "properties": { "port": { "type": "integer" } }
    /// })).expect("a valid schema");
    /// schema.check("/app/db", br#"{"port": 5432}"#).expect("valid");
    /// match schema.check("/app/db", br#"{"port": "x"}"#) {
    ///     Err(Error::SchemaViolation { violations, .. }) => assert_eq!(violations[0].path, "/port"),
    ///     other => panic!("{other:?}"),
    /// }
    /// ```
    pub fn check(&self, key: &str, raw: &[u8]) -> Result<(), Error> {
        let violations = self.violations(&to_json(raw));
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Error::SchemaViolation {
                key: key.to_owned(),
                violations,
            })
        }
    }
}
