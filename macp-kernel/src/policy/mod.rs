//! Governance policies (RFC-MACP-0012): the registry and the rules every mode
//! shares.
//!
//! A descriptor meets three different bars in its life, and keeping them apart
//! is what lets stored sessions replay identically while admission keeps
//! getting stricter:
//!
//! 1. **Admission** ([`PolicyRegistry::admit`]), once, when RegisterPolicy
//!    offers it: the current rule schemas in full — closed rule objects,
//!    floors, `description`, the reserved `policy.std.*` ids.
//! 2. **Storage** ([`PolicyRegistry::check_stored`]), whenever a recorded
//!    registration is applied (live or on replay): only what evaluation needs
//!    (a known schema version, rules that parse). A schema tightening never
//!    makes a stored descriptor unreplayable (§8 item 4).
//! 3. **Evaluation**, by the modes at Commitment time, under the
//!    `schema_version` the descriptor declares (§8 item 3): a session bound to
//!    a version-1 or -2 policy is evaluated by the legacy rules forever, one
//!    bound to version 3 by the current ones. Evaluation returns every unmet
//!    rule as a structured [`Denial`].
//!
//! A policy is resolved once, at SessionStart, and frozen on the session as a
//! [`BoundPolicy`]; later registry changes never reach a running session.
//! Mode-specific rules (voting, thresholds, …) are parsed and evaluated by the
//! modes themselves from [`BoundPolicy::rules`]; the shared
//! `commitment.authority` rule is evaluated by the kernel.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use macp_wire::v1::PolicyDescriptor;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, KResult, KernelError};
use crate::mode::ModeRegistry;

pub mod denial;
mod reserved;
pub mod rules;

pub use denial::{details_json, Denial, DenialCode};
pub use reserved::{canonical_profile, STD_PREFIX};
pub use rules::{InvalidRules, RULE_EXTENSIONS};

/// The reserved, always-registered default policy id.
pub const DEFAULT_POLICY_ID: &str = "policy.default";

/// Rule schema versions this runtime evaluates: 1 (original), 2 (adds the
/// decline fields), 3 (fail-closed empty tally, RFC-MACP-0012 1.1.0).
pub const SUPPORTED_SCHEMA_VERSIONS: [u32; 3] = [1, 2, 3];

/// Whether a descriptor of this schema version evaluates an empty decisive
/// tally fail-closed (version ≥ 3) rather than by the legacy rule that lets
/// `commitment.require_vote_quorum` alone decide (RFC-MACP-0012 §4.1).
pub const fn empty_tally_fails_closed(schema_version: u32) -> bool {
    schema_version >= 3
}

/// Who may send the resolving Commitment (`commitment.authority`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommitmentAuthority {
    /// Only the session initiator (the default).
    #[default]
    InitiatorOnly,
    /// The initiator or any declared participant.
    AnyParticipant,
    /// Exactly these agent ids.
    DesignatedRole(Vec<String>),
}

impl CommitmentAuthority {
    /// Whether `sender` holds commitment authority in a session.
    pub fn permits(&self, sender: &str, initiator: &str, participants: &[String]) -> bool {
        match self {
            CommitmentAuthority::InitiatorOnly => sender == initiator,
            CommitmentAuthority::AnyParticipant => sender == initiator || participants.iter().any(|p| p == sender),
            CommitmentAuthority::DesignatedRole(roles) => roles.iter().any(|r| r == sender),
        }
    }
}

#[derive(Deserialize, Default)]
struct CommitmentSection {
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    designated_roles: Vec<String>,
}

#[derive(Deserialize, Default)]
struct SharedRules {
    #[serde(default)]
    commitment: Option<CommitmentSection>,
}

/// Parses the shared `commitment` section of a rules object.
pub fn parse_authority(rules: &serde_json::Value) -> Result<CommitmentAuthority, String> {
    let shared: SharedRules =
        serde_json::from_value(rules.clone()).map_err(|e| format!("rules.commitment is malformed: {e}"))?;
    let Some(c) = shared.commitment else { return Ok(CommitmentAuthority::InitiatorOnly) };
    match c.authority.as_deref().unwrap_or("initiator_only") {
        "initiator_only" => Ok(CommitmentAuthority::InitiatorOnly),
        "any_participant" => Ok(CommitmentAuthority::AnyParticipant),
        "designated_role" => {
            if c.designated_roles.is_empty() || c.designated_roles.iter().any(|r| r.trim().is_empty()) {
                Err("commitment.authority 'designated_role' needs a non-empty designated_roles list".into())
            } else {
                Ok(CommitmentAuthority::DesignatedRole(c.designated_roles))
            }
        }
        other => Err(format!(
            "commitment.authority '{other}' is not one of initiator_only, any_participant, designated_role"
        )),
    }
}

/// A policy resolved at SessionStart and frozen for the session.
#[derive(Clone, Debug, PartialEq)]
pub struct BoundPolicy {
    /// The descriptor as it was when bound (recorded with the SessionStart).
    pub descriptor: PolicyDescriptor,
    /// `descriptor.rules` parsed.
    pub rules: serde_json::Value,
    /// The shared commitment-authority rule.
    pub authority: CommitmentAuthority,
    /// What a mode reads from `rules`, worked out once, on first use
    /// ([`BoundPolicy::derived`]).
    derived: Derived,
}

/// A mode's reading of a policy's rules, kept with the policy so that every
/// session bound to it shares one. Derived from the other fields alone, so
/// it takes no part in equality, and a clone starts without it.
#[derive(Default)]
struct Derived(OnceLock<Box<dyn Any + Send + Sync>>);

impl Clone for Derived {
    fn clone(&self) -> Self {
        Derived::default()
    }
}

impl PartialEq for Derived {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "Derived(set)" } else { "Derived(unset)" })
    }
}

impl BoundPolicy {
    /// Parses a descriptor that was validated at registration (or recorded
    /// with a SessionStart).
    pub fn from_descriptor(descriptor: PolicyDescriptor) -> KResult<Self> {
        let rules =
            parse_rules_json(&descriptor.rules).map_err(|e| KernelError::new(ErrorCode::InvalidPolicyDefinition, e))?;
        let authority = parse_authority(&rules).map_err(|e| KernelError::new(ErrorCode::InvalidPolicyDefinition, e))?;
        Ok(BoundPolicy { descriptor, rules, authority, derived: Derived::default() })
    }

    /// What `make` reads from this policy, computed on the first call and
    /// kept for the policy's lifetime. One mode reads one type: a call with
    /// another type than the first gets `make`'s answer uncached.
    pub(crate) fn derived<T: Any + Send + Sync + Clone>(&self, make: impl Fn(&BoundPolicy) -> T) -> T {
        match self.derived.0.get_or_init(|| Box::new(make(self)) as Box<dyn Any + Send + Sync>).downcast_ref::<T>() {
            Some(t) => t.clone(),
            None => make(self),
        }
    }

    /// The bound policy id.
    pub fn id(&self) -> &str {
        &self.descriptor.policy_id
    }

    /// The rule schema version the rules are evaluated under.
    pub fn schema_version(&self) -> u32 {
        self.descriptor.schema_version
    }
}

/// Parses a `rules` string: empty means `{}`; anything else must be a JSON
/// object (the spec says reject, where the latest reference runtime silently
/// turns bad JSON into `{}`).
pub fn parse_rules_json(rules: &str) -> Result<serde_json::Value, String> {
    if rules.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    let v: serde_json::Value = serde_json::from_str(rules).map_err(|e| format!("rules are not valid JSON: {e}"))?;
    if !v.is_object() {
        return Err("rules must be a JSON object".into());
    }
    Ok(v)
}

/// The policy registry.
///
/// Entries are parsed once, at registration, and shared (`Arc`) with every
/// session bound to them: binding a policy is then a reference-count bump
/// instead of a JSON parse and a copy per session, which matters for both
/// SessionStart throughput and the memory of many open sessions.
#[derive(Clone, Debug)]
pub struct PolicyRegistry {
    policies: BTreeMap<String, Arc<BoundPolicy>>,
}

impl Default for PolicyRegistry {
    fn default() -> Self {
        let default = BoundPolicy::from_descriptor(default_policy()).expect("the default policy parses");
        let mut policies = BTreeMap::new();
        policies.insert(DEFAULT_POLICY_ID.to_string(), Arc::new(default));
        PolicyRegistry { policies }
    }
}

/// `policy.default`: mode `*`, schema version 1, no rules — the initiator
/// decides and `outcome_positive` is taken at face value.
pub fn default_policy() -> PolicyDescriptor {
    PolicyDescriptor {
        policy_id: DEFAULT_POLICY_ID.to_string(),
        mode: "*".to_string(),
        description: "Default policy: initiator-only commitment, no voting rules.".to_string(),
        rules: "{}".to_string(),
        schema_version: 1,
        registered_at_unix_ms: 0,
    }
}

impl PolicyRegistry {
    /// Looks a policy up by id.
    pub fn get(&self, id: &str) -> Option<&PolicyDescriptor> {
        self.policies.get(id).map(|p| &p.descriptor)
    }

    /// Policies for ListPolicies: all of them for an empty filter, else those
    /// of `mode` plus the mode-agnostic (`*`) ones; sorted by id.
    pub fn list(&self, mode: &str) -> Vec<PolicyDescriptor> {
        self.policies
            .values()
            .map(|p| &p.descriptor)
            .filter(|p| mode.is_empty() || p.mode == mode || p.mode == "*")
            .cloned()
            .collect()
    }

    /// Every policy (snapshots).
    pub fn all(&self) -> impl Iterator<Item = &PolicyDescriptor> {
        self.policies.values().map(|p| &p.descriptor)
    }

    /// What a registration must satisfy whenever it is applied, live or
    /// replayed from the log: a usable id that is not taken, a mode, a schema
    /// version this runtime evaluates, and rules that parse. Nothing here may
    /// ever get stricter, or recorded registrations would stop replaying; new
    /// admission requirements belong in [`PolicyRegistry::admit`].
    pub fn check_stored(&self, d: &PolicyDescriptor) -> KResult<serde_json::Value> {
        check_id(d)?;
        if d.policy_id == DEFAULT_POLICY_ID {
            return Err(KernelError::invalid_policy("policy.default is reserved and cannot be registered"));
        }
        if self.policies.contains_key(&d.policy_id) {
            return Err(KernelError::invalid_policy(format!(
                "policy '{}' is already registered; policy ids are never reused, register a new id",
                d.policy_id
            )));
        }
        check_evaluable(d)
    }

    /// RegisterPolicy admission (RFC-MACP-0012 §2.2, §3, §4, §7): everything
    /// [`PolicyRegistry::check_stored`] requires, plus the current schema in
    /// full — a `description`, the `policy.std.*` reservation, and the rule
    /// schema of the descriptor's mode (every registered mode's for `*`,
    /// since such a policy can bind to a session of any of them): closed
    /// objects, value domains and floors. Changes nothing; every failure is
    /// INVALID_POLICY_DEFINITION with the offending field named.
    pub fn admit(&self, d: &PolicyDescriptor, modes: &ModeRegistry) -> KResult<()> {
        let rules = self.check_stored(d)?;
        check_current_schema(d, &rules, modes)
    }

    /// WhatIfReplay's admission of a candidate (RFC-MACP-0012 §8.1): the
    /// same bar as [`PolicyRegistry::admit`] except the registry's own
    /// constraints, because a candidate is never registered. Its id may be
    /// taken (replaying a session under the very policy it is bound to is
    /// the baseline a caller compares against) and may be `policy.default`.
    /// A registry is not needed for that, hence an associated function.
    pub fn admit_candidate(d: &PolicyDescriptor, modes: &ModeRegistry) -> KResult<()> {
        check_id(d)?;
        let rules = check_evaluable(d)?;
        check_current_schema(d, &rules, modes)
    }
    /// Adds a policy whose rules [`PolicyRegistry::check_stored`] accepted
    /// (or that a checkpoint recorded); fails only if the rules do not parse.
    pub fn insert(&mut self, d: PolicyDescriptor) -> KResult<()> {
        let id = d.policy_id.clone();
        self.policies.insert(id, Arc::new(BoundPolicy::from_descriptor(d)?));
        Ok(())
    }

    /// The frozen policy for a descriptor recorded with a SessionStart: the
    /// registry's shared entry when it is still the same descriptor (the
    /// normal case, live and in recovery), otherwise a fresh parse (the
    /// policy was unregistered since, or the session came from a checkpoint).
    pub fn bind(&self, d: &PolicyDescriptor) -> KResult<Arc<BoundPolicy>> {
        match self.policies.get(&d.policy_id) {
            Some(p) if p.descriptor == *d => Ok(Arc::clone(p)),
            _ => Ok(Arc::new(BoundPolicy::from_descriptor(d.clone())?)),
        }
    }

    /// Checks an UnregisterPolicy request.
    pub fn check_unregister(&self, id: &str) -> Result<(), String> {
        if id == DEFAULT_POLICY_ID {
            return Err("policy.default is reserved and cannot be unregistered".into());
        }
        if !self.policies.contains_key(id) {
            return Err(format!("policy '{id}' is not registered"));
        }
        Ok(())
    }

    /// Removes a policy; sessions bound to it keep their frozen copy.
    pub fn remove(&mut self, id: &str) {
        self.policies.remove(id);
    }

    /// Resolves `policy_version` at SessionStart for a session of `mode`.
    pub fn resolve(&self, policy_version: &str, mode: &str) -> KResult<Arc<BoundPolicy>> {
        let id = if policy_version.is_empty() { DEFAULT_POLICY_ID } else { policy_version };
        let p = self.policies.get(id).ok_or_else(|| {
            KernelError::new(ErrorCode::UnknownPolicyVersion, format!("policy '{id}' is not registered"))
        })?;
        if p.descriptor.mode != "*" && p.descriptor.mode != mode {
            return Err(KernelError::new(
                ErrorCode::InvalidPolicyDefinition,
                format!("policy '{id}' is bound to mode {}, not {mode}", p.descriptor.mode),
            ));
        }
        Ok(Arc::clone(p))
    }
}

/// A usable policy id: not blank.
fn check_id(d: &PolicyDescriptor) -> KResult<()> {
    if d.policy_id.trim().is_empty() {
        return Err(KernelError::invalid_policy("policy_id must not be empty"));
    }
    Ok(())
}

/// What evaluation needs of a descriptor, whatever registry holds it: a
/// mode, a schema version this runtime evaluates, and rules that parse
/// (with a satisfiable commitment authority). Part of
/// [`PolicyRegistry::check_stored`], so it may never get stricter.
fn check_evaluable(d: &PolicyDescriptor) -> KResult<serde_json::Value> {
    if d.mode.trim().is_empty() {
        return Err(KernelError::invalid_policy("mode must be a mode id or '*'"));
    }
    if !SUPPORTED_SCHEMA_VERSIONS.contains(&d.schema_version) {
        return Err(KernelError::invalid_policy(format!(
            "schema_version {} is not supported (supported: 1, 2, 3)",
            d.schema_version
        )));
    }
    let rules = parse_rules_json(&d.rules).map_err(KernelError::invalid_policy)?;
    parse_authority(&rules).map_err(KernelError::invalid_policy)?;
    Ok(rules)
}

/// The admission-time bar of the current rule schemas (see
/// [`PolicyRegistry::admit`]); never applied to a stored descriptor.
fn check_current_schema(d: &PolicyDescriptor, rules: &serde_json::Value, modes: &ModeRegistry) -> KResult<()> {
    if d.description.is_empty() {
        // proto3 cannot tell an absent string from an empty one, so the
        // RFC's "required" can only be enforced as "non-empty".
        return Err(KernelError::invalid_policy(
            "description is required: say in words what these governance rules are for (RFC-MACP-0012 §3)",
        ));
    }
    if d.policy_id.starts_with(STD_PREFIX) {
        reserved::check_std_registration(d, rules)?;
    }
    let checkers: Vec<_> = if d.mode == "*" {
        modes.all_ids().iter().filter_map(|m| modes.resolve(m).map(|(c, e)| (c.to_string(), e.mode.clone()))).collect()
    } else {
        modes.resolve(&d.mode).map(|(c, e)| (c.to_string(), e.mode.clone())).into_iter().collect()
    };
    for (id, mode) in checkers {
        mode.validate_rules(rules, d.schema_version).map_err(|e| {
            KernelError::invalid_policy(if d.mode == "*" {
                format!("{e} (a '*' policy must satisfy every mode's rule schema; this one fails {id}'s)")
            } else {
                e.0
            })
        })?;
    }
    Ok(())
}
