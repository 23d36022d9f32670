//! Admission-time shape checks shared by every mode's rule schema
//! (RFC-MACP-0012 §4, 1.4.0-draft): rule objects are **closed**.
//!
//! A misspelt key (`veto_threshhold`) would otherwise leave the parameter at
//! its default and govern sessions by a policy nobody wrote, so every object
//! level of a `rules` document may carry only the keys its mode defines, plus:
//!
//! * annotations — keys starting with `_` or `$`, legal at every closed level
//!   and ignored by every evaluator;
//! * vendor extensions — `x-…` keys, legal only when the runtime implements
//!   them (listed in [`RULE_EXTENSIONS`], which the gRPC service advertises as
//!   `PolicyRegistryCapability.rule_extensions`). This runtime implements
//!   none, so every `x-` key is refused rather than silently ignored.
//!
//! Maps whose keys are data (`voting.weights`: participant ids) are not
//! closed levels; an `_` key there names a participant.
//!
//! These checks run only when a descriptor is admitted (RegisterPolicy).
//! A descriptor already stored with a session or in the registry log is
//! never re-checked (RFC-MACP-0012 §8 item 4): replay must not depend on how
//! strict admission has become since.

use serde_json::{Map, Value};

/// Vendor-extension rule keys this runtime implements (none yet). A
/// descriptor using any other `x-` key is refused at admission.
pub const RULE_EXTENSIONS: &[&str] = &[];

/// Why a `rules` document is not admissible: a message naming the offending
/// path and what would be accepted instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRules(pub String);

impl InvalidRules {
    /// An error from anything printable.
    pub fn new(message: impl Into<String>) -> Self {
        InvalidRules(message.into())
    }
}

impl From<InvalidRules> for crate::error::KernelError {
    fn from(e: InvalidRules) -> Self {
        crate::error::KernelError::invalid_policy(e.0)
    }
}

/// One closed object level of a rule schema: the keys it defines.
#[derive(Debug)]
pub struct Shape {
    /// Defined keys and what their values are.
    pub keys: &'static [(&'static str, Level)],
}

/// What the value under a defined key is, as far as closedness goes.
#[derive(Debug)]
pub enum Level {
    /// A scalar or array; its type is the mode's typed parser's business.
    Leaf,
    /// Another closed object level.
    Object(&'static Shape),
    /// A map whose keys are data, not parameter names (`voting.weights`).
    OpenMap,
}

/// The `commitment` section every standard mode shares (§4):
/// `authority` and `designated_roles`.
pub const SHARED_COMMITMENT: Shape = Shape { keys: &[("authority", Level::Leaf), ("designated_roles", Level::Leaf)] };

/// Whether a key belongs to the annotation namespace (`^[_$]`).
pub fn is_annotation(key: &str) -> bool {
    key.starts_with('_') || key.starts_with('$')
}

/// Checks that `rules` uses only the keys `shape` defines, at every level,
/// apart from annotations and implemented vendor extensions. `mode` names
/// the schema in messages.
pub fn check_closed(rules: &Value, shape: &Shape, mode: &str) -> Result<(), InvalidRules> {
    let obj = rules.as_object().ok_or_else(|| InvalidRules::new("rules must be a JSON object"))?;
    walk(obj, shape, "rules", mode)
}

fn walk(obj: &Map<String, Value>, shape: &Shape, path: &str, mode: &str) -> Result<(), InvalidRules> {
    for (key, value) in obj {
        if is_annotation(key) {
            continue;
        }
        if key.starts_with("x-") {
            if RULE_EXTENSIONS.contains(&key.as_str()) {
                continue;
            }
            return Err(InvalidRules::new(format!(
                "{path}.{key} is a vendor extension this runtime does not implement (it implements {}); \
                 remove it, or use an annotation key starting with '_' for inert metadata",
                if RULE_EXTENSIONS.is_empty() { "none".to_string() } else { RULE_EXTENSIONS.join(", ") }
            )));
        }
        let Some((_, level)) = shape.keys.iter().find(|(k, _)| *k == key) else {
            let defined: Vec<&str> = shape.keys.iter().map(|(k, _)| *k).collect();
            return Err(InvalidRules::new(format!(
                "{path}.{key} is not defined by the {mode} rule schema (defined here: {}); rule objects are \
                 closed, so check the spelling, or start the key with '_' or '$' if it is an annotation",
                if defined.is_empty() { "nothing".to_string() } else { defined.join(", ") }
            )));
        };
        let here = format!("{path}.{key}");
        match level {
            Level::Leaf => {}
            Level::Object(inner) => match value {
                Value::Object(m) => walk(m, inner, &here, mode)?,
                other => return Err(InvalidRules::new(format!("{here} must be an object, got {}", kind(other)))),
            },
            Level::OpenMap => {
                if !value.is_object() {
                    return Err(InvalidRules::new(format!("{here} must be an object, got {}", kind(value))));
                }
            }
        }
    }
    Ok(())
}

/// The admission checks every standard mode shares: closed objects against
/// `shape`, and a satisfiable `commitment.authority`.
pub fn admit_common(rules: &Value, shape: &Shape, mode: &str) -> Result<(), InvalidRules> {
    check_closed(rules, shape, mode)?;
    check_commitment_authority(rules)
}

/// A short description of a JSON value's type for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Admission check of the shared `commitment` section's values:
/// `authority` is one of the three values, and `designated_role` names at
/// least one non-blank role (§4, 1.3.0: an authority no sender can satisfy is
/// refused in all five modes).
pub fn check_commitment_authority(rules: &Value) -> Result<(), InvalidRules> {
    let Some(c) = rules.get("commitment") else { return Ok(()) };
    let c = c
        .as_object()
        .ok_or_else(|| InvalidRules::new(format!("rules.commitment must be an object, got {}", kind(c))))?;
    let authority = match c.get("authority") {
        None => "initiator_only",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(InvalidRules::new(format!("rules.commitment.authority must be a string, got {}", kind(other))))
        }
    };
    let roles = match c.get("designated_roles") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|r| {
                r.as_str().ok_or_else(|| {
                    InvalidRules::new(format!("rules.commitment.designated_roles must hold strings, got {}", kind(r)))
                })
            })
            .collect::<Result<Vec<&str>, _>>()?,
        Some(other) => {
            return Err(InvalidRules::new(format!(
                "rules.commitment.designated_roles must be an array of strings, got {}",
                kind(other)
            )))
        }
    };
    match authority {
        "initiator_only" | "any_participant" => Ok(()),
        "designated_role" if !roles.is_empty() && roles.iter().all(|r| !r.trim().is_empty()) => Ok(()),
        "designated_role" => Err(InvalidRules::new(
            "rules.commitment.authority 'designated_role' needs a non-empty designated_roles list of non-blank ids; \
             otherwise no sender could ever commit",
        )),
        other => Err(InvalidRules::new(format!(
            "rules.commitment.authority '{other}' is not one of initiator_only, any_participant, designated_role"
        ))),
    }
}

/// Reads an optional boolean at admission: absent is fine, anything but a
/// boolean is refused.
pub fn opt_bool(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<bool>, InvalidRules> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(InvalidRules::new(format!("{path}.{key} must be true or false, got {}", kind(other)))),
    }
}

/// Reads an optional non-negative integer at admission.
pub fn opt_uint(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<u64>, InvalidRules> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| InvalidRules::new(format!("{path}.{key} must be a whole number ≥ 0, got {n}"))),
        Some(other) => Err(InvalidRules::new(format!("{path}.{key} must be a whole number ≥ 0, got {}", kind(other)))),
    }
}

/// The object under `key` at admission, if present (`null` is refused: the
/// schemas type every section as an object).
pub fn opt_section<'a>(obj: &'a Value, key: &str) -> Result<Option<&'a Map<String, Value>>, InvalidRules> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(InvalidRules::new(format!("rules.{key} must be an object, got {}", kind(other)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const INNER: Shape = Shape { keys: &[("a", Level::Leaf), ("weights", Level::OpenMap)] };
    const OUTER: Shape =
        Shape { keys: &[("voting", Level::Object(&INNER)), ("commitment", Level::Object(&SHARED_COMMITMENT))] };

    fn check(v: Value) -> Result<(), InvalidRules> {
        check_closed(&v, &OUTER, "test")
    }

    #[test]
    fn closed_levels_refuse_unknown_keys_and_allow_annotations() {
        assert!(check(json!({})).is_ok());
        assert!(check(json!({"voting": {"a": 1, "_why": "x", "$comment": 2}, "_top": [1]})).is_ok());
        let e = check(json!({"voting": {"aa": 1}})).unwrap_err();
        assert!(
            e.0.starts_with("rules.voting.aa is not defined by the test rule schema (defined here: a, weights)"),
            "{e}"
        );
        let e = check(json!({"votin": {}})).unwrap_err();
        assert!(e.0.starts_with("rules.votin is not defined"), "{e}");
        // Keys of an open map are data: anything goes, `_` included.
        assert!(check(json!({"voting": {"weights": {"_agent": 1, "x-y": 2}}})).is_ok());
        let e = check(json!({"voting": {"weights": [1]}})).unwrap_err();
        assert_eq!(e.0, "rules.voting.weights must be an object, got an array");
        let e = check(json!({"voting": null})).unwrap_err();
        assert_eq!(e.0, "rules.voting must be an object, got null");
        assert_eq!(check(json!([])).unwrap_err().0, "rules must be a JSON object");
    }

    #[test]
    fn vendor_extensions_are_refused_until_implemented() {
        let e = check(json!({"x-com.example.audit": {}})).unwrap_err();
        assert!(e.0.contains("vendor extension this runtime does not implement (it implements none)"), "{e}");
        let e = check(json!({"commitment": {"x-acme.k": true}})).unwrap_err();
        assert!(e.0.starts_with("rules.commitment.x-acme.k"), "{e}");
    }

    #[test]
    fn designated_role_needs_roles() {
        assert!(check_commitment_authority(&json!({})).is_ok());
        assert!(check_commitment_authority(&json!({"commitment": {"authority": "any_participant"}})).is_ok());
        assert!(check_commitment_authority(
            &json!({"commitment": {"authority": "designated_role", "designated_roles": ["a"]}})
        )
        .is_ok());
        for bad in [
            json!({"commitment": {"authority": "designated_role"}}),
            json!({"commitment": {"authority": "designated_role", "designated_roles": []}}),
            json!({"commitment": {"authority": "designated_role", "designated_roles": [" "]}}),
            json!({"commitment": {"authority": "anyone"}}),
            json!({"commitment": {"authority": 1}}),
            json!({"commitment": {"designated_roles": "a"}}),
            json!({"commitment": []}),
        ] {
            assert!(check_commitment_authority(&bad).is_err(), "{bad}");
        }
    }
}
