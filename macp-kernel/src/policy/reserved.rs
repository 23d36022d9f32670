//! The reserved `policy.std.*` namespace (RFC-MACP-0012 §2.2, §5.2).
//!
//! Every id under `policy.std.` belongs to the specification. This runtime
//! pre-registers none of the three published profiles (provisioning is
//! optional), but it lets an operator register one, and only with rules that
//! resolve to exactly the canonical parameters, so that a reserved id means
//! the same thing on every runtime. Unassigned `policy.std.*` ids can never be
//! registered; a SessionStart naming one that is not registered gets
//! UNKNOWN_POLICY_VERSION like any unknown policy.

use macp_wire::v1::PolicyDescriptor;
use serde_json::{json, Value};

use crate::error::{KResult, KernelError};

/// The reserved prefix.
pub const STD_PREFIX: &str = "policy.std.";

const DECISION: &str = "macp.mode.decision.v1";

/// The canonical descriptor of a published `policy.std.*` profile, or `None`
/// for an unassigned id. All three are Decision profiles at schema version 1
/// with `require_vote_quorum: true`; two-thirds is the binary64 literal the
/// RFC pins (`0.6666666666666666`).
pub fn canonical_profile(id: &str) -> Option<PolicyDescriptor> {
    let (description, rules) = match id {
        "policy.std.majority" => (
            "Simple majority — at least half of the decisive votes approve",
            json!({"voting": {"algorithm": "majority", "threshold": 0.5, "quorum": {"type": "count", "value": 1}},
                   "commitment": {"require_vote_quorum": true}}),
        ),
        "policy.std.supermajority" => (
            "Two-thirds supermajority with a minimum of two voters",
            json!({"voting": {"algorithm": "supermajority", "threshold": 0.6666666666666666,
                              "quorum": {"type": "count", "value": 2}},
                   "commitment": {"require_vote_quorum": true}}),
        ),
        "policy.std.unanimous" => (
            "Unanimous — every declared participant approves and no reject is cast",
            json!({"voting": {"algorithm": "unanimous", "quorum": {"type": "count", "value": 1}},
                   "commitment": {"require_vote_quorum": true}}),
        ),
        _ => return None,
    };
    Some(PolicyDescriptor {
        policy_id: id.to_string(),
        mode: DECISION.to_string(),
        description: description.to_string(),
        rules: rules.to_string(),
        schema_version: 1,
        registered_at_unix_ms: 0,
    })
}

/// Admission of a descriptor whose id starts with [`STD_PREFIX`]: only an
/// assigned profile, with the canonical mode and schema version and rules
/// whose every parameter resolves to the canonical value (annotations and
/// spelled-out defaults do not matter).
pub(super) fn check_std_registration(d: &PolicyDescriptor, rules: &Value) -> KResult<()> {
    let canon = canonical_profile(&d.policy_id).ok_or_else(|| {
        KernelError::invalid_policy(format!(
            "'{}' is in the reserved policy.std. namespace and is not an assigned profile \
             (assigned: policy.std.majority, policy.std.supermajority, policy.std.unanimous); use your own \
             namespace, e.g. policy.<org>.<name>",
            d.policy_id
        ))
    })?;
    let canon_rules: Value = serde_json::from_str(&canon.rules).unwrap_or_default();
    if d.mode != canon.mode
        || d.schema_version != canon.schema_version
        || !crate::mode::decision_rules_equivalent(rules, &canon_rules)
    {
        return Err(KernelError::invalid_policy(format!(
            "'{}' is a reserved profile and may only be registered exactly as RFC-MACP-0012 §5.2 defines it: \
             mode {}, schema_version {}, rules {}",
            d.policy_id, canon.mode, canon.schema_version, canon.rules
        )));
    }
    Ok(())
}
