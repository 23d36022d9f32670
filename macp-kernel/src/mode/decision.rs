//! `macp.mode.decision.v1` (RFC-MACP-0007): declared participants propose
//! options, evaluate and object to them, vote, and an authority commits.
//!
//! The mode follows the latest reference runtime's phase gating, which the
//! conformance vector `decision_reject_paths.json` depends on (DECISIONS 9):
//!
//! ```text
//! Proposal --first Proposal--> Evaluation --first Vote--> Voting --Commitment--> Committed
//! ```
//!
//! | message    | accepted in phase     |
//! |------------|-----------------------|
//! | Proposal   | Proposal, Evaluation  |
//! | Evaluation | Evaluation            |
//! | Objection  | Evaluation            |
//! | Vote       | Evaluation, Voting    |
//!
//! Enumerated values are compared case-sensitively as RFC-MACP-0007 §4
//! requires: `recommendation` ∈ {APPROVE, REVIEW, BLOCK, REJECT} and `vote` ∈
//! {APPROVE, REJECT, ABSTAIN} in UPPER_CASE; `severity` ∈ {low, medium, high,
//! critical} in lowercase, because that is how the RFC and the proto list it
//! and how the veto rule compares it (an empty severity means `medium`).
//!
//! A Commitment is eligible once at least one Proposal exists (RFC §5.5);
//! then the bound policy's decision rules (RFC-MACP-0012 §4.1, DIGEST §6.3)
//! are evaluated and any unmet rule denies it with POLICY_DENIED, listing
//! every reason. The kernel has already checked the commitment authority.

use std::collections::{BTreeMap, BTreeSet};

use macp_wire::modes::decision::{EvaluationPayload, ObjectionPayload, ProposalPayload, VotePayload};
use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};

use super::{util, Message, Mode, ModeState, SessionView};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::policy::{BoundPolicy, SUPPORTED_SCHEMA_VERSIONS};

/// The canonical mode id.
pub const MODE_ID: &str = "macp.mode.decision.v1";

/// The Decision mode itself (stateless; sessions hold [`DecisionState`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct DecisionMode;

impl Mode for DecisionMode {
    fn descriptor(&self) -> ModeDescriptor {
        util::builtin_descriptor(util::BuiltinDescriptor {
            mode: MODE_ID,
            title: "Decision",
            description: "Declared participants propose options, evaluate, object and vote; an authorized \
                          Commitment selects or declines an outcome under the bound governance policy.",
            determinism_class: "semantic-deterministic",
            participant_model: "declared",
            message_types: &["SessionStart", "Proposal", "Evaluation", "Objection", "Vote", "Commitment"],
        })
    }

    fn validate_rules(&self, rules: &serde_json::Value, _schema_version: u32) -> Result<(), String> {
        DecisionRules::parse(rules).map(|_| ())
    }

    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        // A policy is validated when it is registered, but a `*` policy from
        // an older log, or one restored from elsewhere, could still carry rules
        // this mode cannot evaluate: refuse the session up front rather than
        // failing every Commitment later.
        DecisionRules::parse(&session.policy.rules).map_err(|e| {
            KernelError::new(
                ErrorCode::InvalidPolicyDefinition,
                format!("policy '{}' has invalid decision rules: {e}", session.policy.id()),
            )
        })?;
        Ok(Box::new(DecisionState::default()))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String> {
        Ok(Box::new(util::restore::<DecisionState>(snapshot)?))
    }
}

// ----- state -----------------------------------------------------------------

/// Where a Decision session is in its life (the latest runtime's phases).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// No proposal yet.
    #[default]
    Proposal,
    /// At least one proposal; evaluations and objections are open.
    Evaluation,
    /// At least one vote; proposals, evaluations and objections are closed.
    Voting,
    /// A Commitment was accepted.
    Committed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Proposal => "Proposal",
            Phase::Evaluation => "Evaluation",
            Phase::Voting => "Voting",
            Phase::Committed => "Committed",
        }
    }
}

/// An `Evaluation.recommendation` (RFC-MACP-0007 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recommendation {
    /// Recommends proceeding.
    Approve,
    /// Analysed without a stance; informational only.
    Review,
    /// Advises against proceeding; advisory, never a veto.
    Block,
    /// Recommends rejecting.
    Reject,
}

impl Recommendation {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "APPROVE" => Some(Recommendation::Approve),
            "REVIEW" => Some(Recommendation::Review),
            "BLOCK" => Some(Recommendation::Block),
            "REJECT" => Some(Recommendation::Reject),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Recommendation::Approve => "APPROVE",
            Recommendation::Review => "REVIEW",
            Recommendation::Block => "BLOCK",
            Recommendation::Reject => "REJECT",
        }
    }
}

/// A `Vote.vote` (RFC-MACP-0007 §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ballot {
    /// For.
    Approve,
    /// Against; the only thing that can back a vote-gated decline.
    Reject,
    /// Neither; left out of every ratio's denominator.
    Abstain,
}

impl Ballot {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "APPROVE" => Some(Ballot::Approve),
            "REJECT" => Some(Ballot::Reject),
            "ABSTAIN" => Some(Ballot::Abstain),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Ballot::Approve => "APPROVE",
            Ballot::Reject => "REJECT",
            Ballot::Abstain => "ABSTAIN",
        }
    }
}

/// An `Objection.severity`, stored lowercase as the RFC lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    /// Minor.
    Low,
    /// The default when a sender leaves severity empty.
    Medium,
    /// Serious.
    High,
    /// Counts toward `objection_handling` vetoes.
    Critical,
}

impl Severity {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// An accepted Proposal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProposalRecord {
    /// Unique within the session.
    pub proposal_id: String,
    /// The option proposed.
    pub option: String,
    /// Why.
    pub rationale: String,
    /// Who proposed it.
    pub sender: String,
}

/// An accepted Vote (the proposal and voter are the map keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VoteRecord {
    /// The ballot.
    pub vote: Ballot,
    /// The voter's reason.
    pub reason: String,
}

/// An accepted Evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluationRecord {
    /// The evaluated proposal.
    pub proposal_id: String,
    /// The recommendation.
    pub recommendation: Recommendation,
    /// In [0, 1].
    pub confidence: f64,
    /// The evaluator's reason.
    pub reason: String,
    /// Who evaluated.
    pub sender: String,
}

/// An accepted Objection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectionRecord {
    /// The proposal objected to.
    pub proposal_id: String,
    /// The objector's reason.
    pub reason: String,
    /// Severity (empty on the wire means `medium`).
    pub severity: Severity,
    /// Who objected.
    pub sender: String,
}

/// The per-session Decision state: a pure function of the accepted history,
/// kept in ordered collections so snapshots are byte-stable.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionState {
    phase: Phase,
    proposals: BTreeMap<String, ProposalRecord>,
    /// proposal_id → voter → vote.
    votes: BTreeMap<String, BTreeMap<String, VoteRecord>>,
    evaluations: Vec<EvaluationRecord>,
    objections: Vec<ObjectionRecord>,
}

/// The message types this mode defines, besides SessionStart and Commitment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Proposal,
    Evaluation,
    Objection,
    Vote,
}

impl DecisionState {
    fn require_proposal(&self, message_type: &str, proposal_id: &str) -> KResult<()> {
        if self.proposals.contains_key(proposal_id) {
            Ok(())
        } else {
            Err(KernelError::invalid(format!(
                "{message_type} references proposal '{proposal_id}', which does not exist in this session"
            )))
        }
    }

    fn closed(&self, message_type: &str, open_in: &str) -> KernelError {
        KernelError::invalid(format!(
            "{message_type} is accepted only in phase {open_in}; the session is in phase {}",
            self.phase.as_str()
        ))
    }

    fn on_proposal(&mut self, msg: &Message<'_>) -> KResult<()> {
        if !matches!(self.phase, Phase::Proposal | Phase::Evaluation) {
            return Err(self.closed("Proposal", "Proposal or Evaluation (proposals close at the first Vote)"));
        }
        let p: ProposalPayload = util::decode("Proposal", msg.payload)?;
        util::require("proposal_id", &p.proposal_id, "Proposal")?;
        util::require("option", &p.option, "Proposal")?;
        if self.proposals.contains_key(&p.proposal_id) {
            return Err(KernelError::invalid(format!(
                "proposal_id '{}' is already used in this session; proposal ids must be unique",
                p.proposal_id
            )));
        }
        self.proposals.insert(
            p.proposal_id.clone(),
            ProposalRecord {
                proposal_id: p.proposal_id,
                option: p.option,
                rationale: p.rationale,
                sender: msg.sender.to_string(),
            },
        );
        self.phase = Phase::Evaluation;
        Ok(())
    }

    fn on_evaluation(&mut self, msg: &Message<'_>) -> KResult<()> {
        if self.phase != Phase::Evaluation {
            return Err(self.closed("Evaluation", "Evaluation (after a Proposal, before the first Vote)"));
        }
        let e: EvaluationPayload = util::decode("Evaluation", msg.payload)?;
        self.require_proposal("Evaluation", &e.proposal_id)?;
        let recommendation = Recommendation::parse(&e.recommendation).ok_or_else(|| {
            KernelError::invalid(format!(
                "Evaluation recommendation '{}' is not one of APPROVE, REVIEW, BLOCK, REJECT (case-sensitive)",
                e.recommendation
            ))
        })?;
        if !(0.0..=1.0).contains(&e.confidence) {
            return Err(KernelError::invalid(format!("Evaluation confidence {} is outside [0, 1]", e.confidence)));
        }
        // -0.0 passes the range check; store +0.0 so equal histories give
        // equal bytes whatever sign a client sent.
        let confidence = if e.confidence == 0.0 { 0.0 } else { e.confidence };
        self.evaluations.push(EvaluationRecord {
            proposal_id: e.proposal_id,
            recommendation,
            confidence,
            reason: e.reason,
            sender: msg.sender.to_string(),
        });
        Ok(())
    }

    fn on_objection(&mut self, msg: &Message<'_>) -> KResult<()> {
        if self.phase != Phase::Evaluation {
            return Err(self.closed("Objection", "Evaluation (after a Proposal, before the first Vote)"));
        }
        let o: ObjectionPayload = util::decode("Objection", msg.payload)?;
        self.require_proposal("Objection", &o.proposal_id)?;
        let severity = if o.severity.trim().is_empty() {
            Severity::Medium
        } else {
            Severity::parse(&o.severity).ok_or_else(|| {
                KernelError::invalid(format!(
                    "Objection severity '{}' is not one of low, medium, high, critical (lowercase, case-sensitive)",
                    o.severity
                ))
            })?
        };
        self.objections.push(ObjectionRecord {
            proposal_id: o.proposal_id,
            reason: o.reason,
            severity,
            sender: msg.sender.to_string(),
        });
        Ok(())
    }

    fn on_vote(&mut self, msg: &Message<'_>) -> KResult<()> {
        if !matches!(self.phase, Phase::Evaluation | Phase::Voting) {
            return Err(self.closed("Vote", "Evaluation or Voting (after a Proposal)"));
        }
        let v: VotePayload = util::decode("Vote", msg.payload)?;
        self.require_proposal("Vote", &v.proposal_id)?;
        let vote = Ballot::parse(&v.vote).ok_or_else(|| {
            KernelError::invalid(format!("Vote '{}' is not one of APPROVE, REJECT, ABSTAIN (case-sensitive)", v.vote))
        })?;
        if self.votes.get(&v.proposal_id).is_some_and(|by| by.contains_key(msg.sender)) {
            return Err(KernelError::invalid(format!(
                "{} has already voted on proposal '{}'; one vote per participant per proposal",
                msg.sender, v.proposal_id
            )));
        }
        self.votes
            .entry(v.proposal_id)
            .or_default()
            .insert(msg.sender.to_string(), VoteRecord { vote, reason: v.reason });
        self.phase = Phase::Voting;
        Ok(())
    }
}

impl ModeState for DecisionState {
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        // Authorization first (DIGEST §3.0): in Decision an undefined message
        // type fails authorization, so it is FORBIDDEN, like an outsider.
        let kind = match msg.message_type {
            "Proposal" => Kind::Proposal,
            "Evaluation" => Kind::Evaluation,
            "Objection" => Kind::Objection,
            "Vote" => Kind::Vote,
            other => {
                return Err(KernelError::forbidden(format!(
                    "message type '{other}' is not defined by {MODE_ID}; nobody may send it"
                )))
            }
        };
        if !msg.session.is_participant(msg.sender) {
            return Err(KernelError::forbidden(format!(
                "{} is not a declared participant; only declared participants may send {}",
                msg.sender, msg.message_type
            )));
        }
        if self.phase == Phase::Committed {
            return Err(KernelError::invalid("the decision is already committed"));
        }
        // Each handler validates everything before its single mutation, so an
        // error leaves the state untouched.
        match kind {
            Kind::Proposal => self.on_proposal(msg),
            Kind::Evaluation => self.on_evaluation(msg),
            Kind::Objection => self.on_objection(msg),
            Kind::Vote => self.on_vote(msg),
        }
    }

    fn commit(&mut self, msg: &Message<'_>, commitment: &CommitmentPayload) -> KResult<()> {
        if self.phase == Phase::Committed {
            return Err(KernelError::invalid("the decision is already committed"));
        }
        if self.proposals.is_empty() {
            return Err(KernelError::invalid(
                "a Decision session cannot resolve before at least one Proposal exists (RFC-MACP-0007 §5.5)",
            ));
        }
        let reasons = evaluate_policy(msg.session.policy, msg.session.participants, self, commitment.outcome_positive);
        if !reasons.is_empty() {
            return Err(KernelError::policy_denied(reasons));
        }
        self.phase = Phase::Committed;
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        util::snapshot(self)
    }

    fn project(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let proposals: Map<String, Value> = self
            .proposals
            .iter()
            .map(|(id, p)| {
                (
                    id.clone(),
                    json!({
                        "proposal_id": p.proposal_id,
                        "option": p.option,
                        "rationale": p.rationale,
                        "sender": p.sender,
                    }),
                )
            })
            .collect();
        let votes: Map<String, Value> = self
            .votes
            .iter()
            .map(|(pid, by)| {
                let by: Map<String, Value> = by
                    .iter()
                    .map(|(who, v)| (who.clone(), json!({ "vote": v.vote.as_str(), "reason": v.reason })))
                    .collect();
                (pid.clone(), Value::Object(by))
            })
            .collect();
        let evaluations: Vec<Value> = self
            .evaluations
            .iter()
            .map(|e| {
                json!({
                    "proposal_id": e.proposal_id,
                    "recommendation": e.recommendation.as_str(),
                    "confidence": e.confidence,
                    "reason": e.reason,
                    "sender": e.sender,
                })
            })
            .collect();
        let objections: Vec<Value> = self
            .objections
            .iter()
            .map(|o| {
                json!({
                    "proposal_id": o.proposal_id,
                    "reason": o.reason,
                    "severity": o.severity.as_str(),
                    "sender": o.sender,
                })
            })
            .collect();
        json!({
            "phase": self.phase.as_str(),
            "proposals": proposals,
            "votes": votes,
            "evaluations": evaluations,
            "objections": objections,
        })
    }
}

// ----- policy rules ----------------------------------------------------------

/// `voting.algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    None,
    Majority,
    Supermajority,
    Unanimous,
    Weighted,
    Plurality,
}

/// `voting.quorum.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QuorumKind {
    Count,
    Percentage,
}

/// `objection_handling.critical_objection_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VetoAction {
    Deny,
    Hold,
    FinalizeDecline,
}

/// The decision rule schema (`decision-rules.schema.json`) as JSON shapes.
/// Unknown keys are ignored: mode-agnostic (`*`) policies are checked
/// against this schema and may carry other modes' sections too.
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

/// Decision rules, type-checked and with the schema defaults filled in.
///
/// Threshold semantics (DECISIONS 12, RFC-MACP-0012 §4.1):
/// * `majority` passes when approve / (approve + reject) is **strictly more
///   than** `threshold` (default 0.5, i.e. "more than half"; exactly 50 %
///   fails). An explicit threshold below 0.5 is refused at registration,
///   since it would no longer be a majority.
/// * `supermajority` and `weighted` pass when the (weighted) share is **at
///   least** `threshold`, as the RFC words it ("at least `threshold`
///   fraction"). `supermajority` without a threshold uses 2/3, and an
///   explicit threshold must be above 0.5.
/// * `unanimous` follows the RFC ("all cast votes must approve"): no REJECT
///   among the cast votes. `plurality`: more APPROVE than REJECT.
///
/// In every algorithm votes are aggregated across all proposals and ABSTAIN
/// is left out of the denominators.
#[derive(Clone, Debug, PartialEq)]
struct DecisionRules {
    algorithm: Algorithm,
    threshold: Option<f64>,
    quorum_kind: QuorumKind,
    quorum_value: f64,
    weights: BTreeMap<String, f64>,
    critical_severity_vetoes: bool,
    veto_threshold: u32,
    veto_action: VetoAction,
    minimum_confidence: f64,
    required_before_voting: bool,
    require_vote_quorum: bool,
    allow_decline_over_approval: bool,
}

fn unit_interval(name: &str, v: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{name} must be a number in [0, 1]; got {v}"))
    }
}

impl DecisionRules {
    /// Type-checks `rules` against the decision rule schema (RFC-MACP-0012
    /// §4.1 and the RegisterPolicy constraints of DIGEST §6.2).
    fn parse(rules: &serde_json::Value) -> Result<Self, String> {
        if !rules.is_object() {
            return Err("rules must be a JSON object".into());
        }
        let raw: RawRules = serde_json::from_value(rules.clone())
            .map_err(|e| format!("rules do not match the decision schema: {e}"))?;
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
                    "voting.algorithm '{other}' is not one of none, majority, supermajority, unanimous, weighted, plurality"
                ))
            }
        };
        let threshold = voting.threshold.map(|t| unit_interval("voting.threshold", t)).transpose()?;
        match (algorithm, threshold) {
            (Algorithm::Majority, Some(t)) if t < 0.5 => {
                return Err(format!("voting.threshold {t} is below 0.5, which is no majority"))
            }
            (Algorithm::Supermajority, Some(t)) if t <= 0.5 => {
                return Err(format!("voting.threshold {t} must be above 0.5 for a supermajority"))
            }
            _ => {}
        }
        let quorum = voting.quorum.unwrap_or_default();
        let quorum_kind = match quorum.kind.as_deref().unwrap_or("count") {
            "count" => QuorumKind::Count,
            "percentage" => QuorumKind::Percentage,
            other => return Err(format!("voting.quorum.type '{other}' is not one of count, percentage")),
        };
        let quorum_value = quorum.value.unwrap_or(0.0);
        if !quorum_value.is_finite() || quorum_value < 0.0 {
            return Err(format!("voting.quorum.value must be a number ≥ 0; got {quorum_value}"));
        }
        if quorum_kind == QuorumKind::Percentage && quorum_value > 100.0 {
            return Err(format!("voting.quorum.value {quorum_value} is a percentage and must not exceed 100"));
        }
        let weights = voting.weights.unwrap_or_default();
        if let Some((who, w)) = weights.iter().find(|(_, w)| !w.is_finite() || **w < 0.0) {
            return Err(format!("voting.weights['{who}'] must be a number ≥ 0; got {w}"));
        }
        if algorithm == Algorithm::Weighted && weights.is_empty() {
            return Err("voting.algorithm 'weighted' needs a non-empty voting.weights map".into());
        }
        let objections = raw.objection_handling.unwrap_or_default();
        let veto_threshold = objections.veto_threshold.unwrap_or(1);
        if veto_threshold < 1 {
            return Err("objection_handling.veto_threshold must be at least 1".into());
        }
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
        let minimum_confidence = evaluation
            .minimum_confidence
            .map(|c| unit_interval("evaluation.minimum_confidence", c))
            .transpose()?
            .unwrap_or(0.0);
        let commitment = raw.commitment.unwrap_or_default();
        Ok(DecisionRules {
            algorithm,
            threshold,
            quorum_kind,
            quorum_value,
            weights,
            critical_severity_vetoes: objections.critical_severity_vetoes.unwrap_or(false),
            veto_threshold,
            veto_action,
            minimum_confidence,
            required_before_voting: evaluation.required_before_voting.unwrap_or(false),
            require_vote_quorum: commitment.require_vote_quorum.unwrap_or(false),
            allow_decline_over_approval: commitment.allow_decline_over_approval.unwrap_or(false),
        })
    }
}

/// The computed voting result of RFC-MACP-0007 §6.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VoteResult {
    Passed,
    Failed,
    NoVotes,
}

/// Vote counts aggregated across every proposal (the reference quirk the
/// digest documents; the Commitment payload names no proposal).
struct Tally {
    approve: u64,
    reject: u64,
    approve_weight: f64,
    reject_weight: f64,
    voters: BTreeSet<String>,
}

impl Tally {
    fn of(state: &DecisionState, weights: &BTreeMap<String, f64>) -> Self {
        let mut t = Tally { approve: 0, reject: 0, approve_weight: 0.0, reject_weight: 0.0, voters: BTreeSet::new() };
        for by in state.votes.values() {
            for (who, v) in by {
                t.voters.insert(who.clone());
                let w = weights.get(who).copied().unwrap_or(1.0);
                match v.vote {
                    Ballot::Approve => {
                        t.approve += 1;
                        t.approve_weight += w;
                    }
                    Ballot::Reject => {
                        t.reject += 1;
                        t.reject_weight += w;
                    }
                    Ballot::Abstain => {}
                }
            }
        }
        t
    }

    fn result(&self, rules: &DecisionRules) -> VoteResult {
        let cast = self.approve + self.reject;
        if cast == 0 {
            return VoteResult::NoVotes;
        }
        let passed = match rules.algorithm {
            Algorithm::None => true,
            Algorithm::Majority => match rules.threshold {
                // Exact integer form of "more than half".
                None => 2 * self.approve > cast,
                Some(t) => (self.approve as f64 / cast as f64) > t,
            },
            Algorithm::Supermajority => match rules.threshold {
                // Exact integer form of "at least two thirds".
                None => 3 * self.approve >= 2 * cast,
                Some(t) => (self.approve as f64 / cast as f64) >= t,
            },
            Algorithm::Unanimous => self.reject == 0,
            Algorithm::Weighted => {
                let total = self.approve_weight + self.reject_weight;
                total > 0.0 && self.approve_weight / total >= rules.threshold.unwrap_or(0.5)
            }
            Algorithm::Plurality => self.approve > self.reject,
        };
        if passed {
            VoteResult::Passed
        } else {
            VoteResult::Failed
        }
    }
}

/// Evaluates the bound policy against the accepted history for a Commitment
/// of the given polarity (DIGEST §6.3). Returns every unmet rule; empty
/// means the Commitment may resolve the session. Pure: depends only on the
/// rules, the state and the declared participants, never on the sender.
fn evaluate_policy(
    policy: &BoundPolicy,
    participants: &[String],
    state: &DecisionState,
    positive: bool,
) -> Vec<String> {
    let mut reasons = Vec::new();
    // 1. Schema version.
    if !SUPPORTED_SCHEMA_VERSIONS.contains(&policy.schema_version()) {
        reasons.push(format!(
            "policy '{}' has rule schema_version {}, which this runtime does not evaluate (supported: 1, 2)",
            policy.id(),
            policy.schema_version()
        ));
    }
    let rules = match DecisionRules::parse(&policy.rules) {
        Ok(r) => r,
        Err(e) => {
            reasons.push(format!("policy '{}' has invalid decision rules: {e}", policy.id()));
            return reasons;
        }
    };
    // 2. Evaluations.
    if rules.required_before_voting {
        let qualifying = state
            .evaluations
            .iter()
            .any(|e| e.recommendation != Recommendation::Review && e.confidence >= rules.minimum_confidence);
        if !qualifying {
            reasons.push(if rules.minimum_confidence > 0.0 {
                format!(
                    "evaluation.required_before_voting: no non-REVIEW Evaluation with confidence ≥ {} exists",
                    rules.minimum_confidence
                )
            } else {
                "evaluation.required_before_voting: no non-REVIEW Evaluation exists".to_string()
            });
        }
    }
    // 3. Critical-objection veto.
    let mut veto_finalizes_decline = false;
    if rules.critical_severity_vetoes {
        let critical = state.objections.iter().filter(|o| o.severity == Severity::Critical).count();
        if critical >= rules.veto_threshold as usize {
            let what = format!("{critical} critical Objection(s) reach veto_threshold {}", rules.veto_threshold);
            match rules.veto_action {
                VetoAction::Deny => reasons.push(format!("{what}: the commitment is vetoed")),
                VetoAction::Hold => {
                    reasons.push(format!("{what}: critical_objection_action 'hold' keeps the session open"))
                }
                VetoAction::FinalizeDecline if positive => reasons.push(format!(
                    "{what}: critical_objection_action 'finalize_decline' allows only a negative commitment"
                )),
                VetoAction::FinalizeDecline => veto_finalizes_decline = true,
            }
        }
    }
    // 4. Vote quorum.
    let tally = Tally::of(state, &rules.weights);
    let voters = tally.voters.len();
    if rules.require_vote_quorum {
        let met = match rules.quorum_kind {
            QuorumKind::Count => voters as f64 >= rules.quorum_value,
            QuorumKind::Percentage => voters as f64 * 100.0 >= rules.quorum_value * participants.len() as f64,
        };
        if !met {
            reasons.push(match rules.quorum_kind {
                QuorumKind::Count => {
                    format!("vote quorum not met: {voters} voter(s), {} required", rules.quorum_value)
                }
                QuorumKind::Percentage => format!(
                    "vote quorum not met: {voters} of {} participants voted, {}% required",
                    participants.len(),
                    rules.quorum_value
                ),
            });
        }
    }
    // 5. Voting algorithm and the decline-gating table (RFC-MACP-0007 §6.2).
    //    A negative commitment authorised by a finalize_decline veto is not
    //    vote-authorised, so the vote gate (and its decline guard) does not
    //    apply to it.
    if rules.algorithm != Algorithm::None && (positive || !veto_finalizes_decline) {
        let result = tally.result(&rules);
        if positive {
            match result {
                VoteResult::Passed => {}
                VoteResult::Failed => reasons.push(format!(
                    "the vote failed ({} APPROVE, {} REJECT under '{}'); a positive commitment is denied",
                    tally.approve,
                    tally.reject,
                    algorithm_name(rules.algorithm)
                )),
                VoteResult::NoVotes if rules.require_vote_quorum => reasons
                    .push("no APPROVE or REJECT votes were cast and commitment.require_vote_quorum is set".to_string()),
                VoteResult::NoVotes => {}
            }
        } else {
            if result == VoteResult::Passed && !rules.allow_decline_over_approval {
                reasons.push(format!(
                    "the vote passed ({} APPROVE, {} REJECT under '{}'); a negative commitment needs \
                     commitment.allow_decline_over_approval",
                    tally.approve,
                    tally.reject,
                    algorithm_name(rules.algorithm)
                ));
            }
            if tally.reject == 0 {
                reasons.push("decline guard: a negative commitment needs at least one REJECT vote".to_string());
            }
        }
    }
    reasons
}

fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::None => "none",
        Algorithm::Majority => "majority",
        Algorithm::Supermajority => "supermajority",
        Algorithm::Unanimous => "unanimous",
        Algorithm::Weighted => "weighted",
        Algorithm::Plurality => "plurality",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(v: serde_json::Value) -> Result<DecisionRules, String> {
        DecisionRules::parse(&v)
    }

    #[test]
    fn rule_schema() {
        assert!(rules(json!({})).is_ok());
        assert!(rules(json!({"voting": {"algorithm": "weighted"}})).is_err());
        assert!(rules(json!({"voting": {"algorithm": "weighted", "weights": {"A": 2}}})).is_ok());
        assert!(rules(json!({"voting": {"threshold": "x"}})).is_err());
        assert!(rules(json!({"voting": {"threshold": 1.5}})).is_err());
        assert!(rules(json!({"voting": {"algorithm": "supermajority", "threshold": 0.5}})).is_err());
        assert!(rules(json!({"voting": {"algorithm": "supermajority"}})).is_ok());
        assert!(rules(json!({"voting": {"algorithm": "Majority"}})).is_err());
        assert!(rules(json!({"voting": {"algorithm": "majority", "threshold": 0.4}})).is_err());
        assert!(rules(json!({"voting": {"quorum": {"type": "percentage", "value": 101}}})).is_err());
        assert!(rules(json!({"voting": {"quorum": {"type": "seats", "value": 1}}})).is_err());
        assert!(rules(json!({"objection_handling": {"veto_threshold": 0}})).is_err());
        assert!(rules(json!({"objection_handling": {"critical_objection_action": "explode"}})).is_err());
        assert!(rules(json!({"evaluation": {"minimum_confidence": -0.1}})).is_err());
        assert!(rules(json!({"commitment": {"require_vote_quorum": "yes"}})).is_err());
        assert!(rules(json!({"acceptance": {"criterion": "initiator"}})).is_ok(), "other modes' sections pass");
    }

    fn state_with(votes: &[(&str, &str, Ballot)]) -> DecisionState {
        let mut s = DecisionState::default();
        for (pid, who, b) in votes {
            s.proposals.entry(pid.to_string()).or_insert_with(|| ProposalRecord {
                proposal_id: pid.to_string(),
                option: "o".into(),
                rationale: String::new(),
                sender: "I".into(),
            });
            s.votes
                .entry(pid.to_string())
                .or_default()
                .insert(who.to_string(), VoteRecord { vote: *b, reason: String::new() });
        }
        s
    }

    fn result(r: serde_json::Value, votes: &[(&str, &str, Ballot)]) -> VoteResult {
        let r = rules(r).unwrap();
        Tally::of(&state_with(votes), &r.weights).result(&r)
    }

    #[test]
    fn algorithms() {
        use Ballot::*;
        let maj = json!({"voting": {"algorithm": "majority"}});
        assert_eq!(result(maj.clone(), &[]), VoteResult::NoVotes);
        assert_eq!(result(maj.clone(), &[("p1", "A", Abstain)]), VoteResult::NoVotes);
        assert_eq!(result(maj.clone(), &[("p1", "A", Approve), ("p1", "B", Reject)]), VoteResult::Failed);
        assert_eq!(
            result(maj.clone(), &[("p1", "A", Approve), ("p1", "B", Reject), ("p2", "A", Approve)]),
            VoteResult::Passed,
            "votes aggregate across proposals"
        );
        let sup = json!({"voting": {"algorithm": "supermajority"}});
        assert_eq!(
            result(sup.clone(), &[("p1", "A", Approve), ("p1", "B", Approve), ("p1", "C", Reject)]),
            VoteResult::Passed
        );
        assert_eq!(result(sup, &[("p1", "A", Approve), ("p1", "C", Reject)]), VoteResult::Failed);
        let una = json!({"voting": {"algorithm": "unanimous"}});
        assert_eq!(result(una.clone(), &[("p1", "A", Approve), ("p1", "B", Abstain)]), VoteResult::Passed);
        assert_eq!(result(una, &[("p1", "A", Approve), ("p1", "B", Reject)]), VoteResult::Failed);
        let w = json!({"voting": {"algorithm": "weighted", "weights": {"A": 3}, "threshold": 0.75}});
        assert_eq!(result(w.clone(), &[("p1", "A", Approve), ("p1", "B", Reject)]), VoteResult::Passed);
        assert_eq!(result(w, &[("p1", "A", Reject), ("p1", "B", Approve)]), VoteResult::Failed);
        let plu = json!({"voting": {"algorithm": "plurality"}});
        assert_eq!(result(plu.clone(), &[("p1", "A", Approve), ("p1", "B", Reject)]), VoteResult::Failed);
        assert_eq!(result(plu, &[("p1", "A", Approve)]), VoteResult::Passed);
    }
}
