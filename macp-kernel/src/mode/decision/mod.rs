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
//! The first accepted Vote closes deliberation (RFC-MACP-0007 1.3.0 rule 6):
//! Proposal, Evaluation and Objection are then INVALID_ENVELOPE. Only
//! declared participants may send mode messages; the initiator is not an
//! implicit participant, so a session with an empty roster accepts no
//! Proposal at all (§2, FORBIDDEN).
//!
//! Enumerated values are compared case-sensitively as RFC-MACP-0007 §4
//! requires: `recommendation` ∈ {APPROVE, REVIEW, BLOCK, REJECT} and `vote` ∈
//! {APPROVE, REJECT, ABSTAIN} in UPPER_CASE; `severity` ∈ {low, medium, high,
//! critical} in lowercase; anything else, the empty string included, is
//! refused (the 0.1.13 `decision.proto` comments).
//!
//! A Commitment is eligible once at least one Proposal exists (rule 5, no
//! exceptions); then the bound policy's decision rules (RFC-MACP-0012 §4.1,
//! RFC-MACP-0007 §6.2) are evaluated under the policy's own schema version
//! ([`evaluate`]) and any unmet rule denies it with POLICY_DENIED, listing
//! every reason as a structured denial. The kernel has already checked the
//! commitment authority.

use std::collections::BTreeMap;

use macp_wire::modes::decision::{EvaluationPayload, ObjectionPayload, ProposalPayload, VotePayload};
use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};

use super::{util, Message, Mode, ModeState, SessionView};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::policy::InvalidRules;

mod evaluate;
mod rules;

use evaluate::evaluate;
pub(crate) use rules::equivalent as rules_equivalent;
use rules::DecisionRules;

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

    fn validate_rules(&self, rules: &serde_json::Value, _schema_version: u32) -> Result<(), InvalidRules> {
        DecisionRules::admit(rules)
    }

    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        // A policy is validated when it is registered, but a `*` policy from
        // an older log, or one restored from elsewhere, could still carry rules
        // this mode cannot evaluate: refuse the session up front rather than
        // failing every Commitment later. Only evaluability is checked here,
        // never today's admission floors (RFC-MACP-0012 §8 item 4).
        if let Err(e) = &*DecisionRules::of_policy(session.policy) {
            return Err(KernelError::new(
                ErrorCode::InvalidPolicyDefinition,
                format!("policy '{}' has invalid decision rules: {e}", session.policy.id()),
            ));
        }
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
    /// Moderate.
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
    /// Severity.
    pub severity: Severity,
    /// Who objected.
    pub sender: String,
}

/// The per-session Decision state: a pure function of the accepted history,
/// kept in ordered collections so snapshots are byte-stable.
///
/// The collections live out of line ([`Records`], reached through `Deref`)
/// and are allocated with the first Proposal: a session that has only
/// started (most open sessions) keeps a 16-byte state instead of 104 bytes of
/// empty collections (issue 15). Snapshots have the same bytes as when the
/// collections were fields of this struct.
#[derive(Clone, Debug, Default)]
pub struct DecisionState {
    phase: Phase,
    records: Option<Box<Records>>,
}

/// What a Decision session has accepted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Records {
    proposals: BTreeMap<String, ProposalRecord>,
    /// proposal_id → voter → vote.
    votes: BTreeMap<String, BTreeMap<String, VoteRecord>>,
    evaluations: Vec<EvaluationRecord>,
    objections: Vec<ObjectionRecord>,
}

/// What a state without records reads.
static NO_RECORDS: Records =
    Records { proposals: BTreeMap::new(), votes: BTreeMap::new(), evaluations: Vec::new(), objections: Vec::new() };

impl std::ops::Deref for DecisionState {
    type Target = Records;

    fn deref(&self) -> &Records {
        self.records.as_deref().unwrap_or(&NO_RECORDS)
    }
}

impl std::ops::DerefMut for DecisionState {
    /// Allocates the records on first use.
    fn deref_mut(&mut self) -> &mut Records {
        self.records.get_or_insert_with(Box::default)
    }
}

impl PartialEq for DecisionState {
    /// No records and empty records are the same state.
    fn eq(&self, other: &Self) -> bool {
        self.phase == other.phase && **self == **other
    }
}

/// The snapshot layout (the fields of the state before [`Records`] moved
/// out of line), borrowed for writing.
#[derive(Serialize)]
struct DecisionSnapRef<'a> {
    phase: Phase,
    proposals: &'a BTreeMap<String, ProposalRecord>,
    votes: &'a BTreeMap<String, BTreeMap<String, VoteRecord>>,
    evaluations: &'a [EvaluationRecord],
    objections: &'a [ObjectionRecord],
}

/// [`DecisionSnapRef`], owned for reading (and for tests, writing).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct DecisionSnap {
    phase: Phase,
    proposals: BTreeMap<String, ProposalRecord>,
    votes: BTreeMap<String, BTreeMap<String, VoteRecord>>,
    evaluations: Vec<EvaluationRecord>,
    objections: Vec<ObjectionRecord>,
}

impl Serialize for DecisionState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        DecisionSnapRef {
            phase: self.phase,
            proposals: &self.proposals,
            votes: &self.votes,
            evaluations: &self.evaluations,
            objections: &self.objections,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DecisionState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = DecisionSnap::deserialize(deserializer)?;
        let records =
            Records { proposals: s.proposals, votes: s.votes, evaluations: s.evaluations, objections: s.objections };
        Ok(DecisionState { phase: s.phase, records: (records != NO_RECORDS).then(|| Box::new(records)) })
    }
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
        let severity = Severity::parse(&o.severity).ok_or_else(|| {
            KernelError::invalid(format!(
                "Objection severity '{}' is not one of low, medium, high, critical (lowercase, case-sensitive; \
                 it is required)",
                o.severity
            ))
        })?;
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
        let denials = evaluate(msg.session.policy, msg.session.participants, self, commitment.outcome_positive);
        if !denials.is_empty() {
            return Err(KernelError::policy_denied(denials));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout the state had when its collections were fields of its
    /// own: snapshots must keep these bytes.
    type Inline = DecisionSnap;

    #[test]
    fn records_are_allocated_with_the_first_and_snapshots_keep_their_bytes() {
        let fresh = DecisionState::default();
        assert!(fresh.records.is_none());
        let empty = Inline {
            phase: Phase::Proposal,
            proposals: BTreeMap::new(),
            votes: BTreeMap::new(),
            evaluations: Vec::new(),
            objections: Vec::new(),
        };
        assert_eq!(util::snapshot(&fresh), util::snapshot(&empty));
        let back: DecisionState = util::restore(&util::snapshot(&fresh)).unwrap();
        assert!(back.records.is_none(), "an empty snapshot restores without records");
        assert_eq!(back, fresh);

        let mut s = DecisionState { phase: Phase::Voting, ..DecisionState::default() };
        let p =
            ProposalRecord { proposal_id: "p1".into(), option: "o".into(), rationale: "r".into(), sender: "a".into() };
        s.proposals.insert("p1".into(), p.clone());
        s.votes
            .entry("p1".into())
            .or_default()
            .insert("b".into(), VoteRecord { vote: Ballot::Approve, reason: "ok".into() });
        assert!(s.records.is_some());
        let inline = Inline {
            phase: Phase::Voting,
            proposals: [("p1".to_string(), p)].into_iter().collect(),
            votes: s.votes.clone(),
            evaluations: Vec::new(),
            objections: Vec::new(),
        };
        assert_eq!(util::snapshot(&s), util::snapshot(&inline));
        let back: DecisionState = util::restore(&util::snapshot(&s)).unwrap();
        assert_eq!(back, s);
        assert_ne!(back, fresh);
    }
}
