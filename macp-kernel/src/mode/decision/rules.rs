//! The Decision rule schema (`decision-rules.schema.json`, RFC-MACP-0012
//! §4.1), read two ways:
//!
//! * [`DecisionRules::admit`] — RegisterPolicy: closed objects, value domains
//!   and every floor of the current schema (`threshold > 0` for every
//!   algorithm, `majority` ≥ 0.5, `supermajority` > 0.5 and required, a
//!   non-empty `weights` map of positive weights, …).
//! * [`DecisionRules::from_stored`] — a descriptor already bound to a session
//!   or recorded in the log: types and enumerations only, because they are
//!   what evaluation needs. Floors added since a descriptor was admitted
//!   never apply to it (§8 item 4), so stored sessions replay identically.
//!
//! Unknown keys are ignored by `from_stored` (annotations, and the sections of
//! other modes a `*` policy written before closed objects might carry).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::policy::rules::{check_closed, check_commitment_authority, Level, Shape, SHARED_COMMITMENT};
use crate::policy::{parse_authority, BoundPolicy, InvalidRules};

/// `voting.algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Algorithm {
    /// No voting constraint: `outcome_positive` is taken at face value.
    None,
    /// Approve share of decisive votes ≥ `threshold` (default 0.5).
    Majority,
    /// Approve share ≥ `threshold` (> 0.5).
    Supermajority,
    /// Every declared participant approves and nobody rejects.
    Unanimous,
    /// Weighted approve share ≥ `threshold`; the `weights` map is the electorate.
    Weighted,
    /// More approvals than rejections; a tie fails.
    Plurality,
}

impl Algorithm {
    pub(super) fn name(self) -> &'static str {
        match self {
            Algorithm::None => "none",
            Algorithm::Majority => "majority",
            Algorithm::Supermajority => "supermajority",
            Algorithm::Unanimous => "unanimous",
            Algorithm::Weighted => "weighted",
            Algorithm::Plurality => "plurality",
        }
    }
}

/// `voting.quorum.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum QuorumKind {
    /// At least `value` voters.
    Count,
    /// At least `value` percent of the declared participants voted.
    Percentage,
}

/// `objection_handling.critical_objection_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum VetoAction {
    /// Deny the Commitment.
    Deny,
    /// Deny it too; only an operator-facing annotation, never visible on
    /// the wire (RFC-MACP-0012 §4.1: `deny` and `hold` are indistinguishable).
    Hold,
    /// Deny a positive Commitment but authorize a negative one.
    FinalizeDecline,
}

/// Decision rules with the schema defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct DecisionRules {
    pub algorithm: Algorithm,
    /// As written; `None` keeps the legacy meaning of an omitted threshold
    /// (0.5, or exactly two thirds under a stored `supermajority`).
    pub threshold: Option<f64>,
    pub quorum_kind: QuorumKind,
    pub quorum_value: f64,
    /// The weighted electorate; a participant not in it has weight 0.
    pub weights: BTreeMap<String, f64>,
    pub critical_severity_vetoes: bool,
    pub veto_threshold: u32,
    pub veto_action: VetoAction,
    pub minimum_confidence: f64,
    pub required_before_voting: bool,
    pub require_vote_quorum: bool,
    pub allow_decline_over_approval: bool,
}

// ----- shapes (closed objects) ------------------------------------------------

const QUORUM: Shape = Shape { keys: &[("type", Level::Leaf), ("value", Level::Leaf)] };
const VOTING: Shape = Shape {
    keys: &[
        ("algorithm", Level::Leaf),
        ("threshold", Level::Leaf),
        ("quorum", Level::Object(&QUORUM)),
        ("weights", Level::OpenMap),
    ],
};
const OBJECTIONS: Shape = Shape {
    keys: &[
        ("critical_severity_vetoes", Level::Leaf),
        ("veto_threshold", Level::Leaf),
        ("critical_objection_action", Level::Leaf),
    ],
};
const EVALUATION: Shape =
    Shape { keys: &[("minimum_confidence", Level::Leaf), ("required_before_voting", Level::Leaf)] };
const COMMITMENT: Shape = Shape {
    keys: &[
        (SHARED_COMMITMENT.keys[0].0, Level::Leaf),
        (SHARED_COMMITMENT.keys[1].0, Level::Leaf),
        ("require_vote_quorum", Level::Leaf),
        ("allow_decline_over_approval", Level::Leaf),
    ],
};
/// The closed shape of a Decision `rules` object.
const SHAPE: Shape = Shape {
    keys: &[
        ("voting", Level::Object(&VOTING)),
        ("objection_handling", Level::Object(&OBJECTIONS)),
        ("evaluation", Level::Object(&EVALUATION)),
        ("commitment", Level::Object(&COMMITMENT)),
    ],
};

// ----- JSON shapes for typing -----------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRules {
    voting: Option<RawVoting>,
    objection_handling: Option<RawObjections>,
    evaluation: Option<RawEvaluation>,
    commitment: Option<RawCommitment>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawVoting {
    algorithm: Option<String>,
    threshold: Option<f64>,
    quorum: Option<RawQuorum>,
    weights: Option<BTreeMap<String, f64>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawQuorum {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawObjections {
    critical_severity_vetoes: Option<bool>,
    veto_threshold: Option<u32>,
    critical_objection_action: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawEvaluation {
    minimum_confidence: Option<f64>,
    required_before_voting: Option<bool>,
}

/// `authority` and `designated_roles` are type-checked here and interpreted
/// by the kernel ([`crate::policy::parse_authority`]).
#[derive(Deserialize, Default)]
#[serde(default)]
#[allow(dead_code)]
struct RawCommitment {
    authority: Option<String>,
    designated_roles: Option<Vec<String>>,
    require_vote_quorum: Option<bool>,
    allow_decline_over_approval: Option<bool>,
}

fn typed(rules: &Value) -> Result<RawRules, String> {
    if !rules.is_object() {
        return Err("rules must be a JSON object".into());
    }
    serde_json::from_value(rules.clone()).map_err(|e| format!("rules do not match the decision schema: {e}"))
}

impl DecisionRules {
    /// [`DecisionRules::from_stored`] of a bound policy, read once per
    /// policy and shared by every session bound to it.
    pub(super) fn of_policy(policy: &BoundPolicy) -> Arc<Result<Self, String>> {
        policy.derived(|p| Arc::new(Self::from_stored(&p.rules)))
    }

    /// Reads the rules of a stored descriptor: types and enumerations, with
    /// defaults. Never applies admission floors.
    pub(super) fn from_stored(rules: &Value) -> Result<Self, String> {
        let raw = typed(rules)?;
        let voting = raw.voting.unwrap_or_default();
        let algorithm = match voting.algorithm.as_deref().unwrap_or("none") {
            "none" => Algorithm::None,
            "majority" => Algorithm::Majority,
            "supermajority" => Algorithm::Supermajority,
            "unanimous" => Algorithm::Unanimous,
            "weighted" => Algorithm::Weighted,
            "plurality" => Algorithm::Plurality,
            other => {
                return Err(format!(
                    "voting.algorithm '{other}' is not one of none, majority, supermajority, unanimous, weighted, \
                     plurality (case-sensitive)"
                ))
            }
        };
        let quorum = voting.quorum.unwrap_or_default();
        let quorum_kind = match quorum.kind.as_deref().unwrap_or("count") {
            "count" => QuorumKind::Count,
            "percentage" => QuorumKind::Percentage,
            other => return Err(format!("voting.quorum.type '{other}' is not one of count, percentage")),
        };
        let objections = raw.objection_handling.unwrap_or_default();
        let veto_action = match objections.critical_objection_action.as_deref().unwrap_or("deny") {
            "deny" => VetoAction::Deny,
            "hold" => VetoAction::Hold,
            "finalize_decline" => VetoAction::FinalizeDecline,
            other => {
                return Err(format!(
                    "objection_handling.critical_objection_action '{other}' is not one of deny, finalize_decline, hold"
                ))
            }
        };
        let evaluation = raw.evaluation.unwrap_or_default();
        let commitment = raw.commitment.unwrap_or_default();
        Ok(DecisionRules {
            algorithm,
            threshold: voting.threshold,
            quorum_kind,
            quorum_value: quorum.value.unwrap_or(0.0),
            weights: voting.weights.unwrap_or_default(),
            critical_severity_vetoes: objections.critical_severity_vetoes.unwrap_or(false),
            veto_threshold: objections.veto_threshold.unwrap_or(1),
            veto_action,
            minimum_confidence: evaluation.minimum_confidence.unwrap_or(0.0),
            required_before_voting: evaluation.required_before_voting.unwrap_or(false),
            require_vote_quorum: commitment.require_vote_quorum.unwrap_or(false),
            allow_decline_over_approval: commitment.allow_decline_over_approval.unwrap_or(false),
        })
    }

    /// RegisterPolicy admission against the current Decision schema.
    pub(super) fn admit(rules: &Value) -> Result<(), InvalidRules> {
        check_closed(rules, &SHAPE, "decision")?;
        check_commitment_authority(rules)?;
        let raw = typed(rules).map_err(InvalidRules)?;
        let r = Self::from_stored(rules).map_err(InvalidRules)?;
        let voting = raw.voting.unwrap_or_default();
        let bad = |m: String| Err(InvalidRules(m));
        if let Some(t) = voting.threshold {
            if !(t > 0.0 && t <= 1.0) {
                return bad(format!(
                    "voting.threshold must be greater than 0 and at most 1 (a threshold of 0 approves even an \
                     all-REJECT round); got {t}"
                ));
            }
        }
        match (r.algorithm, voting.threshold) {
            (Algorithm::Majority, Some(t)) if t < 0.5 => {
                return bad(format!(
                    "voting.threshold {t} is below 0.5, which is no majority; use 'weighted' with equal weights \
                     for a lower bar"
                ))
            }
            (Algorithm::Supermajority, None) => {
                return bad("voting.algorithm 'supermajority' needs an explicit voting.threshold above 0.5 \
                            (e.g. 0.6666666666666666 for two thirds)"
                    .into())
            }
            (Algorithm::Supermajority, Some(t)) if t <= 0.5 => {
                return bad(format!("voting.threshold {t} must be above 0.5 for a supermajority"))
            }
            _ => {}
        }
        if !r.quorum_value.is_finite() || r.quorum_value < 0.0 {
            return bad(format!("voting.quorum.value must be a number ≥ 0; got {}", r.quorum_value));
        }
        if r.quorum_kind == QuorumKind::Percentage && r.quorum_value > 100.0 {
            return bad(format!("voting.quorum.value {} is a percentage and must not exceed 100", r.quorum_value));
        }
        if let Some(w) = &voting.weights {
            if w.is_empty() {
                return bad("voting.weights must not be empty when present; leave it out, or list every voter \
                            with a weight > 0"
                    .into());
            }
            if let Some((who, w)) = w.iter().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
                return bad(format!(
                    "voting.weights['{who}'] must be a number > 0, got {w}; a participant without a vote is \
                     expressed by leaving it out of the map"
                ));
            }
        } else if r.algorithm == Algorithm::Weighted {
            return bad("voting.algorithm 'weighted' needs a voting.weights map (participant id → weight > 0)".into());
        }
        if r.veto_threshold < 1 {
            return bad("objection_handling.veto_threshold must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&r.minimum_confidence) {
            return bad(format!("evaluation.minimum_confidence must be in [0, 1]; got {}", r.minimum_confidence));
        }
        Ok(())
    }

    /// Every parameter resolved to the value evaluation uses, for comparing
    /// two rule sets by meaning (an omitted threshold and an explicit 0.5 are
    /// the same policy; annotations never matter).
    fn resolved(mut self) -> Self {
        if self.threshold.is_none() {
            self.threshold = Some(0.5);
        }
        self
    }
}

/// Whether two Decision `rules` documents mean the same policy: every
/// parameter, explicit or defaulted, resolves to the same value, and the
/// commitment authority is the same (RFC-MACP-0012 §2.2 semantic equality,
/// used for the reserved `policy.std.*` profiles).
pub(crate) fn equivalent(a: &Value, b: &Value) -> bool {
    match (DecisionRules::from_stored(a), DecisionRules::from_stored(b), parse_authority(a), parse_authority(b)) {
        (Ok(x), Ok(y), Ok(ax), Ok(ay)) => x.resolved() == y.resolved() && ax == ay,
        _ => false,
    }
}
