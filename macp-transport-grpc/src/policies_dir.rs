//! The read-only policy registry: governance policies loaded from a
//! directory of JSON files (`MACP_POLICIES_DIR` / `--policies-dir`), so a
//! team keeps its policies in version control and reviews changes to them
//! like code, instead of registering them by hand at run time.
//!
//! Each `*.json` file in the directory (not its subdirectories) holds one
//! policy, written as the `PolicyDescriptor` RegisterPolicy takes:
//! `policy_id`, `mode`, `description`, `rules` and `schema_version` (the
//! proto3 JSON names `policyId`, `schemaVersion` are accepted too). `rules`
//! may be the rules object itself or, as on the wire, a string holding it.
//! Keys starting with `_` are comments; `registered_at_unix_ms` is ignored,
//! as RegisterPolicy ignores it. Every file passes the kernel's RegisterPolicy
//! admission ([`PolicyRegistry::admit`]) before the runtime touches its
//! storage, and any bad file — unreadable, not JSON, not a valid policy, or
//! an id another file already defines — stops the start with the file's
//! path and the reason.
//!
//! ## How the files reach sessions: recorded, not injected
//!
//! Once storage is recovered, the server makes the recorded registry equal
//! the directory ([`plan`]): it records an UnregisterPolicy for every
//! registered policy the directory no longer has (or has changed) and a
//! RegisterPolicy for every file policy not yet registered exactly so, then
//! serves with RegisterPolicy/UnregisterPolicy refused as
//! REGISTRY_READ_ONLY. The alternative — inserting the policies into the
//! kernel at every start without recording them — was rejected because the
//! kernel's checkpoints, its recovery after a storage failure and the
//! simulator all rebuild the registry from records; a second, unrecorded
//! source would have to be threaded through each of them and kept out of
//! checkpoints. Recording the changes keeps one source of truth:
//!
//! * a restart with the same directory records nothing (every policy is
//!   already registered exactly so) and reaches the same state, registration
//!   times included;
//! * a changed file is a new registration from that start on, and sessions
//!   recorded earlier replay identically, because every SessionStart record
//!   carries the descriptor it was bound to (see `macp_kernel::policy`):
//!   they never read the registry again.
//!
//! Policies registered through the RPC before the directory was configured
//! are unregistered by that sync: with a directory, the directory is the
//! registry.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use macp_kernel::mode::ModeRegistry;
use macp_kernel::policy::{PolicyRegistry, DEFAULT_POLICY_ID};
use macp_kernel::{Identity, Input};
use macp_wire::v1::PolicyDescriptor;
use serde_json::Value;

/// A policy file that stops the start: which file, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFileError {
    /// The file (or the directory, when it cannot be listed).
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for PolicyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for PolicyFileError {}

/// A policy read from the directory, with the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct FilePolicy {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// The descriptor, as RegisterPolicy would receive it.
    pub descriptor: PolicyDescriptor,
}

/// Reads and validates every `*.json` file of `dir`, in file-name order.
/// Runs before storage is opened, so a bad file stops the start having
/// changed nothing; the server then records the result (see [`plan`]).
pub fn load(dir: &Path) -> Result<Vec<FilePolicy>, PolicyFileError> {
    let at = |path: &Path, reason: String| PolicyFileError { path: path.to_path_buf(), reason };
    let entries = std::fs::read_dir(dir).map_err(|e| at(dir, format!("cannot list the policies directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| at(dir, format!("cannot list the policies directory: {e}")))?.path();
        if path.extension().is_some_and(|x| x == "json") && !path.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    let modes = ModeRegistry::with_builtins();
    let mut registry = PolicyRegistry::default();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut out = Vec::with_capacity(files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| at(&path, format!("cannot read: {e}")))?;
        let descriptor = parse(&text).map_err(|reason| at(&path, reason))?;
        if let Some(first) = seen.get(&descriptor.policy_id) {
            return Err(at(
                &path,
                format!("policy id '{}' is already defined in {}", descriptor.policy_id, first.display()),
            ));
        }
        registry.admit(&descriptor, &modes).map_err(|e| at(&path, e.to_string()))?;
        registry.insert(descriptor.clone()).map_err(|e| at(&path, e.to_string()))?;
        seen.insert(descriptor.policy_id.clone(), path.clone());
        out.push(FilePolicy { path, descriptor });
    }
    Ok(out)
}

/// Parses one policy file (see the module docs for the format).
fn parse(text: &str) -> Result<PolicyDescriptor, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err("a policy file holds one JSON object (a PolicyDescriptor)".into());
    };
    let mut d = PolicyDescriptor::default();
    for (key, value) in &fields {
        match key.as_str() {
            k if k.starts_with('_') => {}
            "policy_id" | "policyId" => d.policy_id = string(key, value)?,
            "mode" => d.mode = string(key, value)?,
            "description" => d.description = string(key, value)?,
            "rules" => d.rules = rules(value)?,
            "schema_version" | "schemaVersion" => d.schema_version = schema_version(value)?,
            "registered_at_unix_ms" | "registeredAtUnixMs" => {}
            other => {
                return Err(format!(
                    "unknown key '{other}': a policy file has policy_id, mode, description, rules and schema_version \
                     (keys starting with '_' are comments)"
                ))
            }
        }
    }
    Ok(d)
}

fn string(key: &str, v: &Value) -> Result<String, String> {
    v.as_str().map(str::to_string).ok_or_else(|| format!("'{key}' must be a string"))
}

/// `rules`: the object itself, or a string holding it (as on the wire).
fn rules(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Object(_) => serde_json::to_string(v).map_err(|e| format!("'rules' cannot be written out: {e}")),
        _ => Err("'rules' must be a JSON object (or a string holding one)".into()),
    }
}

fn schema_version(v: &Value) -> Result<u32, String> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| "'schema_version' must be a non-negative integer (1, 2 or 3)".to_string())
}

/// Whether two descriptors define the same policy (the registration time
/// is the runtime's, not part of the definition).
fn same_definition(a: &PolicyDescriptor, b: &PolicyDescriptor) -> bool {
    PolicyDescriptor { registered_at_unix_ms: 0, ..a.clone() }
        == PolicyDescriptor { registered_at_unix_ms: 0, ..b.clone() }
}

/// The registry changes that make `registered` (the recovered registry)
/// equal the directory's `wanted` policies, as kernel inputs from
/// `operator`: unregistrations first (a changed policy is unregistered and
/// registered again under the same id), then registrations in file order.
/// Empty when they already agree, so a restart with the same directory
/// records nothing.
pub fn plan(registered: &[PolicyDescriptor], wanted: &[FilePolicy], operator: &Identity) -> Vec<Input> {
    let wanted: Vec<&PolicyDescriptor> = wanted.iter().map(|w| &w.descriptor).collect();
    plan_descriptors(registered, &wanted, operator)
}

/// [`plan`] for wanted policies from any source (a cluster's registry
/// table as well as the directory).
pub fn plan_descriptors(
    registered: &[PolicyDescriptor],
    wanted: &[&PolicyDescriptor],
    operator: &Identity,
) -> Vec<Input> {
    let keep = |d: &PolicyDescriptor| {
        d.policy_id == DEFAULT_POLICY_ID || wanted.iter().any(|w| w.policy_id == d.policy_id && same_definition(w, d))
    };
    let unregister = registered.iter().filter(|d| !keep(d)).map(|d| Input::UnregisterPolicy {
        request: 0,
        identity: operator.clone(),
        policy_id: d.policy_id.clone(),
    });
    let register = wanted
        .iter()
        .filter(|w| w.policy_id != DEFAULT_POLICY_ID && !registered.iter().any(|d| same_definition(d, w)))
        .map(|w| Input::RegisterPolicy { request: 0, identity: operator.clone(), descriptor: (*w).clone() });
    unregister.chain(register).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A schema-3 decision policy (shared with other modules' tests).
    pub(crate) fn descriptor(id: &str, rules: &str) -> PolicyDescriptor {
        PolicyDescriptor {
            policy_id: id.into(),
            mode: "macp.mode.decision.v1".into(),
            description: "d".into(),
            rules: rules.into(),
            schema_version: 3,
            registered_at_unix_ms: 0,
        }
    }

    #[test]
    fn parses_both_rule_spellings_comments_and_proto_json_names() {
        let a = parse(
            r#"{"_comment": "team policy", "policy_id": "p", "mode": "*", "description": "d",
                "rules": {"voting": {"algorithm": "majority"}}, "schema_version": 3}"#,
        )
        .unwrap();
        assert_eq!((a.policy_id.as_str(), a.schema_version), ("p", 3));
        assert_eq!(a.rules, r#"{"voting":{"algorithm":"majority"}}"#);
        let b = parse(r#"{"policyId": "p", "mode": "*", "rules": "{}", "schemaVersion": 1}"#).unwrap();
        assert_eq!((b.policy_id.as_str(), b.rules.as_str(), b.schema_version), ("p", "{}", 1));
        for bad in [
            "[]",
            "{",
            r#"{"policy_id": 1}"#,
            r#"{"rules": [1]}"#,
            r#"{"schema_version": -1}"#,
            r#"{"schema_version": "3"}"#,
            r#"{"polcy_id": "typo"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn the_plan_converges_and_is_empty_once_converged() {
        let op = Identity::new("op");
        let default = macp_kernel::policy::default_policy();
        let file = |d: PolicyDescriptor| FilePolicy { path: PathBuf::from("f.json"), descriptor: d };
        let wanted = vec![file(descriptor("keep", "{}")), file(descriptor("changed", r#"{"x":1}"#))];
        let mut registered_keep = descriptor("keep", "{}");
        registered_keep.registered_at_unix_ms = 42;
        let registered = vec![default.clone(), registered_keep, descriptor("changed", "{}"), descriptor("gone", "{}")];
        let steps: Vec<String> = plan(&registered, &wanted, &op)
            .into_iter()
            .map(|i| match i {
                Input::UnregisterPolicy { policy_id, .. } => format!("-{policy_id}"),
                Input::RegisterPolicy { descriptor, .. } => format!("+{}", descriptor.policy_id),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(steps, ["-changed", "-gone", "+changed"]);
        let converged = vec![default, descriptor("keep", "{}"), descriptor("changed", r#"{"x":1}"#)];
        assert!(plan(&converged, &wanted, &op).is_empty());
    }
}
