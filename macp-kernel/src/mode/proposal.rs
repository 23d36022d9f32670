//! `macp.mode.proposal.v1` (RFC-MACP-0008): peers negotiate over proposals
//! and counter-proposals until one is accepted by the required parties, or a
//! terminal rejection ends the negotiation, and an authority commits.
//!
//! Every declared participant may Propose, CounterPropose, Accept and Reject;
//! only a proposal's author may Withdraw it. A counter-proposal is a new live
//! proposal and does not retire the one it supersedes (RFC §5.2a).
//!
//! The phase is recomputed after every accepted message, as in the latest
//! reference runtime:
//! * `TerminalRejected` while any terminal rejection stands;
//! * else `Converged` when some live proposal meets the acceptance criterion;
//! * else `Negotiating`;
//! * `Committed` once a Commitment is accepted.
//!
//! Negotiation may continue in `TerminalRejected` (the authority may choose
//! not to bind a terminal rejection, RFC §5.6). A Commitment is eligible in
//! `Converged` or `TerminalRejected`; a *positive* one additionally needs a
//! live proposal that meets the criterion, since there is otherwise nothing
//! to bind (RFC §6).
//!
//! Policy rules (RFC-MACP-0012 §4.3): `acceptance.criterion`,
//! `counter_proposal.max_rounds` and `rejection.terminal_on_any_reject`.

use std::collections::BTreeMap;

use macp_wire::modes::proposal::{
    AcceptPayload, CounterProposalPayload, ProposalPayload, RejectPayload, WithdrawPayload,
};
use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};

use super::{util, Message, Mode, ModeState, SessionView};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::policy::rules::{admit_common, Level, Shape, SHARED_COMMITMENT};
use crate::policy::{BoundPolicy, Denial, DenialCode, InvalidRules};

/// The canonical mode id.
pub const MODE_ID: &str = "macp.mode.proposal.v1";

/// The Proposal mode itself (stateless; sessions hold [`ProposalState`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProposalMode;

impl Mode for ProposalMode {
    fn descriptor(&self) -> ModeDescriptor {
        util::builtin_descriptor(util::BuiltinDescriptor {
            mode: MODE_ID,
            title: "Proposal",
            description: "Peers exchange proposals and counter-proposals until the required parties accept \
                          the same live proposal or a terminal rejection is recorded; an authorized Commitment \
                          binds the outcome.",
            determinism_class: "semantic-deterministic",
            participant_model: "peer",
            message_types: &[
                "SessionStart",
                "Proposal",
                "CounterProposal",
                "Accept",
                "Reject",
                "Withdraw",
                "Commitment",
            ],
        })
    }

    fn validate_rules(&self, rules: &serde_json::Value, _schema_version: u32) -> Result<(), InvalidRules> {
        admit_common(rules, &SHAPE, "proposal")?;
        ProposalRules::parse(rules).map(|_| ()).map_err(InvalidRules)
    }

    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        // Mode-agnostic (`*`) policies are validated against the decision
        // schema only, so their proposal section is first checked here: a
        // session never starts under rules it cannot evaluate.
        rules_of(session.policy)?;
        Ok(Box::new(ProposalState::default()))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String> {
        Ok(Box::new(util::restore::<ProposalState>(snapshot)?))
    }
}

// ----- policy rules ----------------------------------------------------------

/// The closed shape of a Proposal `rules` object (RFC-MACP-0012 §4.3).
const SHAPE: Shape = Shape {
    keys: &[
        ("acceptance", Level::Object(&Shape { keys: &[("criterion", Level::Leaf)] })),
        ("counter_proposal", Level::Object(&Shape { keys: &[("max_rounds", Level::Leaf)] })),
        ("rejection", Level::Object(&Shape { keys: &[("terminal_on_any_reject", Level::Leaf)] })),
        ("commitment", Level::Object(&SHARED_COMMITMENT)),
    ],
};

/// `acceptance.criterion`: whose accepts make a proposal converge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Criterion {
    /// Every declared participant (the base RFC rule).
    #[default]
    AllParties,
    /// Every declared participant except the proposal's author.
    Counterparty,
    /// The session initiator.
    Initiator,
}

/// The proposal rule schema (`proposal-rules.schema.json`) as JSON shapes;
/// unknown keys are ignored so mode-agnostic policies can carry sections
/// for other modes.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRules {
    acceptance: Option<RawAcceptance>,
    counter_proposal: Option<RawCounter>,
    rejection: Option<RawRejection>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAcceptance {
    criterion: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCounter {
    max_rounds: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRejection {
    terminal_on_any_reject: Option<bool>,
}

/// Proposal rules with the schema defaults filled in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ProposalRules {
    criterion: Criterion,
    /// 0 = unlimited counter-proposals.
    max_rounds: u32,
    terminal_on_any_reject: bool,
}

impl ProposalRules {
    fn parse(rules: &serde_json::Value) -> Result<Self, String> {
        if !rules.is_object() {
            return Err("rules must be a JSON object".into());
        }
        let raw: RawRules = serde_json::from_value(rules.clone())
            .map_err(|e| format!("rules do not match the proposal schema: {e}"))?;
        let criterion = match raw.acceptance.and_then(|a| a.criterion).as_deref().unwrap_or("all_parties") {
            "all_parties" => Criterion::AllParties,
            "counterparty" => Criterion::Counterparty,
            "initiator" => Criterion::Initiator,
            other => {
                return Err(format!(
                    "acceptance.criterion '{other}' is not one of all_parties, counterparty, initiator"
                ))
            }
        };
        Ok(ProposalRules {
            criterion,
            max_rounds: raw.counter_proposal.and_then(|c| c.max_rounds).unwrap_or(0),
            terminal_on_any_reject: raw.rejection.and_then(|r| r.terminal_on_any_reject).unwrap_or(false),
        })
    }
}

fn rules_of(policy: &BoundPolicy) -> KResult<ProposalRules> {
    ProposalRules::parse(&policy.rules).map_err(|e| {
        KernelError::new(
            ErrorCode::InvalidPolicyDefinition,
            format!("policy '{}' has invalid proposal rules: {e}", policy.id()),
        )
    })
}

// ----- state -----------------------------------------------------------------

/// Where a Proposal session is (recomputed after every message).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// No live proposal meets the acceptance criterion, and no terminal
    /// rejection stands.
    #[default]
    Negotiating,
    /// Some live proposal meets the acceptance criterion.
    Converged,
    /// A terminal rejection stands (it wins over convergence).
    TerminalRejected,
    /// A Commitment was accepted.
    Committed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Negotiating => "Negotiating",
            Phase::Converged => "Converged",
            Phase::TerminalRejected => "TerminalRejected",
            Phase::Committed => "Committed",
        }
    }
}

/// Whether a proposal can still be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Disposition {
    /// Open for Accept and Reject.
    Live,
    /// Withdrawn by its author; can never be accepted or committed.
    Withdrawn,
}

impl Disposition {
    fn as_str(self) -> &'static str {
        match self {
            Disposition::Live => "Live",
            Disposition::Withdrawn => "Withdrawn",
        }
    }
}

/// A proposal or counter-proposal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalEntry {
    /// Unique across proposals and counter-proposals.
    pub proposal_id: String,
    /// Its author, the only sender who may withdraw it.
    pub proposer: String,
    /// Live or withdrawn.
    pub disposition: Disposition,
    /// For a counter-proposal, the proposal it answers; empty otherwise.
    pub supersedes_proposal_id: String,
    /// Short title.
    pub title: String,
    /// Summary.
    pub summary: String,
}

/// A Reject that ends the negotiation unless its proposal is withdrawn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalRejection {
    /// The rejected proposal.
    pub proposal_id: String,
    /// Who rejected it.
    pub sender: String,
    /// Why.
    pub reason: String,
}

/// The per-session Proposal state, kept in ordered collections so snapshots
/// are byte-stable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposalState {
    phase: Phase,
    proposals: BTreeMap<String, ProposalEntry>,
    /// participant → the proposal they currently accept.
    accepts: BTreeMap<String, String>,
    terminal_rejections: Vec<TerminalRejection>,
    /// Counter-proposals accepted so far (for `counter_proposal.max_rounds`).
    counter_proposals: u32,
}

/// The message types this mode defines, besides SessionStart and Commitment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Proposal,
    CounterProposal,
    Accept,
    Reject,
    Withdraw,
}

impl ProposalState {
    /// The live proposal `id`, or INVALID_ENVELOPE saying why not.
    fn live(&self, message_type: &str, id: &str) -> KResult<&ProposalEntry> {
        match self.proposals.get(id) {
            None => Err(KernelError::invalid(format!(
                "{message_type} references proposal '{id}', which does not exist in this session"
            ))),
            Some(p) if p.disposition == Disposition::Withdrawn => {
                Err(KernelError::invalid(format!("{message_type} references proposal '{id}', which was withdrawn")))
            }
            Some(p) => Ok(p),
        }
    }

    fn check_new_id(&self, message_type: &str, id: &str) -> KResult<()> {
        util::require("proposal_id", id, message_type)?;
        if self.proposals.contains_key(id) {
            return Err(KernelError::invalid(format!(
                "proposal_id '{id}' is already used in this session; proposal and counter-proposal ids must be unique"
            )));
        }
        Ok(())
    }

    /// Whether live proposal `p` meets the acceptance criterion.
    fn meets(&self, p: &ProposalEntry, session: &SessionView<'_>, criterion: Criterion) -> bool {
        if p.disposition != Disposition::Live {
            return false;
        }
        let accepts = |who: &str| self.accepts.get(who).is_some_and(|a| *a == p.proposal_id);
        match criterion {
            Criterion::AllParties => session.participants.iter().all(|w| accepts(w)),
            // At least one counterparty must exist and accept: a proposer
            // alone never converges with themselves.
            Criterion::Counterparty => {
                let mut others = session.participants.iter().filter(|w| **w != p.proposer).peekable();
                others.peek().is_some() && others.all(|w| accepts(w))
            }
            Criterion::Initiator => accepts(session.initiator),
        }
    }

    /// The first live proposal (in id order) that meets the criterion.
    fn converged(&self, session: &SessionView<'_>, criterion: Criterion) -> Option<&ProposalEntry> {
        self.proposals.values().find(|p| self.meets(p, session, criterion))
    }

    fn recompute(&mut self, session: &SessionView<'_>, criterion: Criterion) {
        self.phase = if !self.terminal_rejections.is_empty() {
            Phase::TerminalRejected
        } else if self.converged(session, criterion).is_some() {
            Phase::Converged
        } else {
            Phase::Negotiating
        };
    }

    /// Validates one message and returns the change it makes, without
    /// touching the state, so a rejection leaves the state as it was.
    fn plan(&self, msg: &Message<'_>, kind: Kind, rules: &ProposalRules) -> KResult<Change> {
        Ok(match kind {
            Kind::Proposal => {
                let p: ProposalPayload = util::decode("Proposal", msg.payload)?;
                self.check_new_id("Proposal", &p.proposal_id)?;
                Change::Add(ProposalEntry {
                    proposal_id: p.proposal_id,
                    proposer: msg.sender.to_string(),
                    disposition: Disposition::Live,
                    supersedes_proposal_id: String::new(),
                    title: p.title,
                    summary: p.summary,
                })
            }
            Kind::CounterProposal => {
                let c: CounterProposalPayload = util::decode("CounterProposal", msg.payload)?;
                self.check_new_id("CounterProposal", &c.proposal_id)?;
                util::require("supersedes_proposal_id", &c.supersedes_proposal_id, "CounterProposal")?;
                if !self.proposals.contains_key(&c.supersedes_proposal_id) {
                    return Err(KernelError::invalid(format!(
                        "CounterProposal supersedes proposal '{}', which does not exist in this session",
                        c.supersedes_proposal_id
                    )));
                }
                if rules.max_rounds > 0 && self.counter_proposals >= rules.max_rounds {
                    return Err(KernelError::invalid(format!(
                        "the policy allows at most {} counter-proposal(s) (counter_proposal.max_rounds); {} already made",
                        rules.max_rounds, self.counter_proposals
                    )));
                }
                Change::Add(ProposalEntry {
                    proposal_id: c.proposal_id,
                    proposer: msg.sender.to_string(),
                    disposition: Disposition::Live,
                    supersedes_proposal_id: c.supersedes_proposal_id,
                    title: c.title,
                    summary: c.summary,
                })
            }
            Kind::Accept => {
                let a: AcceptPayload = util::decode("Accept", msg.payload)?;
                self.live("Accept", &a.proposal_id)?;
                Change::Accept(a.proposal_id)
            }
            Kind::Reject => {
                let r: RejectPayload = util::decode("Reject", msg.payload)?;
                self.live("Reject", &r.proposal_id)?;
                let terminal = r.terminal || rules.terminal_on_any_reject;
                Change::Reject { proposal_id: r.proposal_id, terminal, reason: r.reason }
            }
            Kind::Withdraw => {
                let w: WithdrawPayload = util::decode("Withdraw", msg.payload)?;
                let p = self.proposals.get(&w.proposal_id).ok_or_else(|| {
                    KernelError::invalid(format!(
                        "Withdraw references proposal '{}', which does not exist in this session",
                        w.proposal_id
                    ))
                })?;
                if p.proposer != msg.sender {
                    return Err(KernelError::forbidden(format!(
                        "only {}, the author of proposal '{}', may withdraw it",
                        p.proposer, w.proposal_id
                    )));
                }
                if p.disposition == Disposition::Withdrawn {
                    return Err(KernelError::invalid(format!("proposal '{}' is already withdrawn", w.proposal_id)));
                }
                Change::Withdraw(w.proposal_id)
            }
        })
    }

    fn apply(&mut self, sender: &str, change: Change) {
        match change {
            Change::Add(entry) => {
                if !entry.supersedes_proposal_id.is_empty() {
                    self.counter_proposals += 1;
                }
                self.proposals.insert(entry.proposal_id.clone(), entry);
            }
            Change::Accept(id) => {
                self.accepts.insert(sender.to_string(), id);
            }
            Change::Reject { proposal_id, terminal, reason } => {
                // A Reject is the sender's latest stance on that proposal, so
                // it replaces an Accept of the same proposal: a stale accept
                // must not carry a convergence the sender has refused.
                if self.accepts.get(sender).is_some_and(|a| *a == proposal_id) {
                    self.accepts.remove(sender);
                }
                if terminal {
                    self.terminal_rejections.push(TerminalRejection {
                        proposal_id,
                        sender: sender.to_string(),
                        reason,
                    });
                }
            }
            Change::Withdraw(id) => {
                if let Some(p) = self.proposals.get_mut(&id) {
                    p.disposition = Disposition::Withdrawn;
                }
                self.accepts.retain(|_, a| *a != id);
                self.terminal_rejections.retain(|r| r.proposal_id != id);
            }
        }
    }
}

/// A validated change, applied only once every check has passed.
enum Change {
    Add(ProposalEntry),
    Accept(String),
    Reject { proposal_id: String, terminal: bool, reason: String },
    Withdraw(String),
}

impl ModeState for ProposalState {
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        // Authorization first: outsiders are FORBIDDEN whatever they send.
        if !msg.session.is_participant(msg.sender) {
            return Err(KernelError::forbidden(format!(
                "{} is not a declared participant; only declared participants may send {}",
                msg.sender, msg.message_type
            )));
        }
        let kind = match msg.message_type {
            "Proposal" => Kind::Proposal,
            "CounterProposal" => Kind::CounterProposal,
            "Accept" => Kind::Accept,
            "Reject" => Kind::Reject,
            "Withdraw" => Kind::Withdraw,
            other => return Err(super::unknown_message_type(MODE_ID, other)),
        };
        if self.phase == Phase::Committed {
            return Err(KernelError::invalid("the negotiation is already committed"));
        }
        let rules = rules_of(msg.session.policy)?;
        let change = self.plan(msg, kind, &rules)?;
        self.apply(msg.sender, change);
        self.recompute(&msg.session, rules.criterion);
        Ok(())
    }

    fn commit(&mut self, msg: &Message<'_>, commitment: &CommitmentPayload) -> KResult<()> {
        let rules = rules_of(msg.session.policy)?;
        match self.phase {
            Phase::Converged | Phase::TerminalRejected => {}
            Phase::Negotiating => {
                return Err(KernelError::invalid(
                    "no live proposal has been accepted by the required parties and no terminal Reject stands; \
                     the session cannot resolve yet (RFC-MACP-0008 §5.6)",
                ))
            }
            Phase::Committed => return Err(KernelError::invalid("the negotiation is already committed")),
        }
        if commitment.outcome_positive && self.converged(&msg.session, rules.criterion).is_none() {
            return Err(KernelError::invalid(
                "a positive Commitment needs a live proposal accepted by the required parties; only a terminal \
                 rejection stands, which supports a negative Commitment",
            ));
        }
        if commitment.outcome_positive && rules.max_rounds > 0 && self.counter_proposals > rules.max_rounds {
            // No code of the SDK's set names a round limit; clients read an
            // unknown reason as `unspecified` anyway.
            return Err(KernelError::policy_denied(vec![Denial::new(
                DenialCode::Unspecified,
                format!(
                    "{} counter-proposals exceed counter_proposal.max_rounds {}",
                    self.counter_proposals, rules.max_rounds
                ),
            )]));
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
                        "proposer": p.proposer,
                        "disposition": p.disposition.as_str(),
                        "supersedes_proposal_id": p.supersedes_proposal_id,
                        "title": p.title,
                        "summary": p.summary,
                    }),
                )
            })
            .collect();
        let terminal_rejections: Vec<Value> = self
            .terminal_rejections
            .iter()
            .map(|r| json!({ "proposal_id": r.proposal_id, "sender": r.sender, "reason": r.reason }))
            .collect();
        json!({
            "phase": self.phase.as_str(),
            "accepts": self.accepts,
            "proposals": proposals,
            "terminal_rejections": terminal_rejections,
            "counter_proposals": self.counter_proposals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rule_schema() {
        let p = |v| ProposalRules::parse(&v);
        assert_eq!(p(json!({})).unwrap(), ProposalRules::default());
        let r = p(json!({"acceptance": {"criterion": "counterparty"}, "counter_proposal": {"max_rounds": 2},
                          "rejection": {"terminal_on_any_reject": true}}))
        .unwrap();
        assert_eq!(
            r,
            ProposalRules { criterion: Criterion::Counterparty, max_rounds: 2, terminal_on_any_reject: true }
        );
        assert!(p(json!({"acceptance": {"criterion": "everyone"}})).is_err());
        assert!(p(json!({"acceptance": {"criterion": "Initiator"}})).is_err());
        assert!(p(json!({"counter_proposal": {"max_rounds": -1}})).is_err());
        assert!(p(json!({"counter_proposal": {"max_rounds": 1.5}})).is_err());
        assert!(p(json!({"rejection": {"terminal_on_any_reject": "yes"}})).is_err());
        assert!(p(json!({"voting": {"algorithm": "majority"}})).is_ok(), "other modes' sections pass");
    }
}
