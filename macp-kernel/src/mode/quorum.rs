//! Quorum mode, `macp.mode.quorum.v1` (RFC-MACP-0011; DIGEST §3.5, §6.3).
//!
//! The initiator (the coordinator) asks once for approval of an action with
//! an `ApprovalRequest` naming how many approvals it needs. Each declared
//! participant casts at most one ballot: `Approve`, `Reject` or `Abstain`.
//! The session becomes eligible for a Commitment as soon as the outcome is
//! decided either way: enough approvals, or so few ballots left that the
//! threshold can no longer be reached. The coordinator then commits
//! `quorum.approved` or `quorum.rejected`.
//!
//! Policy (RFC-MACP-0012 §4.2): `threshold{type: n_of_m|percentage, value}`
//! with `value > 0` *replaces* the request's `required_approvals`, both for
//! eligibility and for the gate on a positive Commitment (which then needs
//! `approvals >= threshold`, POLICY_DENIED otherwise); a threshold above the
//! electorate is unreachable, which makes the session eligible for a negative
//! Commitment. `n_of_m` counts approvals; `percentage` is an integer 1–100 of
//! the participants declared at SessionStart, rounded **up** in exact integer
//! arithmetic (`(value × n + 99) / 100`), so 50 % of 3 needs 2. `abstention`
//! is informational.
//!
//! Admission takes only the current vocabulary (integer values, no
//! `weighted` type, no `count` alias); a descriptor stored before that still
//! evaluates as it always did: `count` and `weighted` as approval counts, a
//! fractional value rounded up.

use std::collections::BTreeMap;

use macp_wire::modes::quorum::{AbstainPayload, ApprovalRequestPayload, ApprovePayload, RejectPayload};
use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{util, Message, Mode, ModeState, SessionView};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::policy::rules::{admit_common, kind, opt_bool, opt_section, Level, Shape, SHARED_COMMITMENT};
use crate::policy::{Denial, DenialCode, InvalidRules};

/// The canonical mode id.
pub const MODE_ID: &str = "macp.mode.quorum.v1";

/// The quorum mode. Stateless: everything per session lives in its state.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuorumMode;

/// A policy threshold resolved against the session's participant count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Threshold {
    /// `n_of_m`, `percentage` or `weighted`, as written in the policy.
    kind: String,
    /// The value as written, kept for the projection.
    value_text: String,
    /// Approvals it requires in this session.
    required: u32,
}

fn kind_of(v: &Value) -> &'static str {
    kind(v)
}

/// The closed shape of a Quorum `rules` object (RFC-MACP-0012 §4.2).
const SHAPE: Shape = Shape {
    keys: &[
        ("threshold", Level::Object(&Shape { keys: &[("type", Level::Leaf), ("value", Level::Leaf)] })),
        (
            "abstention",
            Level::Object(&Shape { keys: &[("counts_toward_quorum", Level::Leaf), ("interpretation", Level::Leaf)] }),
        ),
        ("commitment", Level::Object(&SHARED_COMMITMENT)),
    ],
};

/// RegisterPolicy admission against the current quorum schema: closed
/// objects, `threshold.type` ∈ {n_of_m, percentage}, `threshold.value` a
/// whole number > 0 (≤ 100 for a percentage), typed `abstention`.
fn admit(rules: &Value) -> Result<(), InvalidRules> {
    admit_common(rules, &SHAPE, "quorum")?;
    if let Some(t) = opt_section(rules, "threshold")? {
        match t.get("type") {
            None => {}
            Some(Value::String(s)) if s == "n_of_m" || s == "percentage" => {}
            Some(v) => {
                return Err(InvalidRules::new(format!(
                    "rules.threshold.type must be \"n_of_m\" or \"percentage\", got {v} ('weighted' is reserved \
                     and has no semantics; 'count' is not an alias)"
                )))
            }
        }
        let value = match t.get("value") {
            Some(Value::Number(n)) => n.as_u64().filter(|v| *v > 0).ok_or_else(|| {
                InvalidRules::new(format!("rules.threshold.value must be a whole number > 0, got {n}"))
            })?,
            Some(v) => {
                return Err(InvalidRules::new(format!(
                    "rules.threshold.value must be a whole number > 0, got {}",
                    kind(v)
                )))
            }
            None => return Err(InvalidRules::new("rules.threshold needs a value (a whole number > 0)")),
        };
        if t.get("type").and_then(Value::as_str) == Some("percentage") && value > 100 {
            return Err(InvalidRules::new(format!(
                "rules.threshold.value is a percentage and must be 1 to 100, got {value}"
            )));
        }
    }
    if let Some(a) = opt_section(rules, "abstention")? {
        opt_bool(a, "rules.abstention", "counts_toward_quorum")?;
    }
    parse_rules(rules).map(|_| ()).map_err(InvalidRules)
}

/// Type-level checks of stored quorum rules (what evaluation needs).
/// Returns the threshold type and value when a threshold with `value > 0` is
/// set (0 or absent: none). Unknown keys are ignored, and the legacy `count`
/// alias and `weighted` type still evaluate, as approval counts, so recorded
/// sessions replay.
fn parse_rules(rules: &Value) -> Result<Option<(String, f64)>, String> {
    let obj = rules.as_object().ok_or("quorum policy rules must be a JSON object")?;
    if let Some(a) = obj.get("abstention").filter(|v| !v.is_null()) {
        let a = a.as_object().ok_or_else(|| format!("rules.abstention must be an object, got {}", kind_of(a)))?;
        match a.get("counts_toward_quorum") {
            None | Some(Value::Null) | Some(Value::Bool(_)) => {}
            Some(v) => {
                return Err(format!("rules.abstention.counts_toward_quorum must be true or false, got {}", kind_of(v)))
            }
        }
        match a.get("interpretation") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if ["neutral", "implicit_reject", "ignored"].contains(&s.as_str()) => {}
            Some(v) => {
                return Err(format!(
                    "rules.abstention.interpretation must be one of neutral, implicit_reject, ignored; got {v}"
                ))
            }
        }
    }
    let Some(t) = obj.get("threshold").filter(|v| !v.is_null()) else { return Ok(None) };
    let t = t.as_object().ok_or_else(|| format!("rules.threshold must be an object, got {}", kind_of(t)))?;
    let kind = match t.get("type") {
        None | Some(Value::Null) => "n_of_m".to_string(),
        Some(Value::String(s)) if ["n_of_m", "count", "percentage", "weighted"].contains(&s.as_str()) => s.clone(),
        Some(v) => return Err(format!("rules.threshold.type must be one of n_of_m, percentage, weighted; got {v}")),
    };
    let value = match t.get("value") {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("rules.threshold.value must be a finite number >= 0, got {n}"))?,
        Some(v) => return Err(format!("rules.threshold.value must be a number, got {}", kind_of(v))),
    };
    if kind == "percentage" && value > 100.0 {
        return Err(format!("rules.threshold.value is a percentage and must be at most 100, got {value}"));
    }
    Ok((value > 0.0).then_some((kind, value)))
}

/// Approvals a threshold requires among `participants` voters.
fn required_for(kind: &str, value: f64, participants: usize) -> u32 {
    let n = match kind {
        // RFC-MACP-0012 §4.2: ceil(value × n / 100) in exact integers.
        // Values are whole at admission (≤ 100); a fractional one can only
        // come from a descriptor stored earlier and keeps its old rounding.
        "percentage" if value.fract() == 0.0 => {
            let v = value as u128;
            ((v * participants as u128).div_ceil(100)).min(u128::from(u32::MAX)) as f64
        }
        // Multiplying first keeps whole results exact (70 × 10 / 100 = 7,
        // where 0.7 × 10 is 7.000000000000001 and would round up to 8).
        "percentage" => (value * participants as f64 / 100.0).ceil(),
        _ => value.ceil(),
    };
    n.min(u32::MAX as f64) as u32
}

/// A ballot choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Choice {
    Approve,
    Reject,
    Abstain,
}

impl Choice {
    fn as_str(self) -> &'static str {
        match self {
            Choice::Approve => "Approve",
            Choice::Reject => "Reject",
            Choice::Abstain => "Abstain",
        }
    }
}

/// One participant's ballot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Ballot {
    choice: Choice,
    reason: String,
    at_ms: i64,
}

/// The session's single approval request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Request {
    request_id: String,
    action: String,
    summary: String,
    details: Vec<u8>,
    required_approvals: u32,
    requested_at_ms: i64,
}

/// The resolving Commitment, kept for the projection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Outcome {
    commitment_id: String,
    action: String,
    outcome_positive: bool,
}

/// Per-session quorum state (sorted maps only, for deterministic snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct QuorumState {
    /// |participants|: the size of the voter pool.
    participant_count: u32,
    /// The policy threshold, if it overrides `required_approvals`.
    threshold: Option<Threshold>,
    request: Option<Request>,
    ballots: BTreeMap<String, Ballot>,
    commitment: Option<Outcome>,
}

fn descriptor() -> ModeDescriptor {
    util::builtin_descriptor(util::BuiltinDescriptor {
        mode: MODE_ID,
        title: "Quorum",
        description: "Collects one Approve, Reject or Abstain ballot per participant on a single approval request; \
                      the coordinator commits once the required approvals are reached or can no longer be.",
        determinism_class: "semantic-deterministic",
        participant_model: "quorum",
        message_types: &["SessionStart", "ApprovalRequest", "Approve", "Reject", "Abstain", "Commitment"],
    })
}

impl Mode for QuorumMode {
    fn descriptor(&self) -> ModeDescriptor {
        descriptor()
    }

    fn validate_rules(&self, rules: &Value, _schema_version: u32) -> Result<(), InvalidRules> {
        admit(rules)
    }

    /// The voter pool is the declared participants; the coordinator may stay
    /// outside it. The threshold is resolved against the pool once, here.
    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        let participant_count = u32::try_from(session.participants.len())
            .map_err(|_| KernelError::invalid("too many participants for a quorum session"))?;
        // `*` policies are only checked against the Decision schema when they
        // are registered, so the quorum sections are checked here too.
        let threshold = parse_rules(&session.policy.rules)
            .map_err(|e| KernelError::new(ErrorCode::InvalidPolicyDefinition, e))?
            .map(|(kind, value)| Threshold {
                required: required_for(&kind, value, session.participants.len()),
                value_text: value.to_string(),
                kind,
            });
        Ok(Box::new(QuorumState {
            participant_count,
            threshold,
            request: None,
            ballots: BTreeMap::new(),
            commitment: None,
        }))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String> {
        Ok(Box::new(util::restore::<QuorumState>(snapshot)?))
    }
}

/// The vote arithmetic at one point in time.
struct Tally {
    required: u32,
    approvals: u32,
    rejections: u32,
    abstentions: u32,
    remaining: u32,
}

impl Tally {
    fn reached(&self) -> bool {
        self.approvals >= self.required
    }

    fn unreachable(&self) -> bool {
        u64::from(self.approvals) + u64::from(self.remaining) < u64::from(self.required)
    }
}

impl QuorumState {
    /// Approvals needed: the policy threshold if set, else the request's.
    fn required(&self) -> Option<u32> {
        match (&self.threshold, &self.request) {
            (Some(t), _) => Some(t.required),
            (None, Some(r)) => Some(r.required_approvals),
            (None, None) => None,
        }
    }

    fn tally(&self) -> Option<Tally> {
        self.request.as_ref()?;
        let count = |c: Choice| self.ballots.values().filter(|b| b.choice == c).count() as u32;
        Some(Tally {
            required: self.required().unwrap_or(0),
            approvals: count(Choice::Approve),
            rejections: count(Choice::Reject),
            abstentions: count(Choice::Abstain),
            remaining: self.participant_count.saturating_sub(self.ballots.len() as u32),
        })
    }

    fn phase(&self) -> &'static str {
        if self.commitment.is_some() {
            "Committed"
        } else if self.request.is_some() {
            "Voting"
        } else {
            "AwaitingRequest"
        }
    }

    fn on_request(&mut self, msg: &Message<'_>) -> KResult<()> {
        if msg.sender != msg.session.initiator {
            return Err(KernelError::forbidden(format!(
                "only the coordinator (the initiator {}) may send ApprovalRequest",
                msg.session.initiator
            )));
        }
        let p: ApprovalRequestPayload = util::decode(msg.message_type, msg.payload)?;
        if let Some(r) = &self.request {
            return Err(KernelError::invalid(format!(
                "this session already carries approval request '{}'; a quorum session has exactly one",
                r.request_id
            )));
        }
        util::require("request_id", &p.request_id, "ApprovalRequest")?;
        if p.required_approvals == 0 || p.required_approvals > self.participant_count {
            return Err(KernelError::invalid(format!(
                "required_approvals must be between 1 and the {} declared participants; got {}",
                self.participant_count, p.required_approvals
            )));
        }
        self.request = Some(Request {
            request_id: p.request_id,
            action: p.action,
            summary: p.summary,
            details: p.details,
            required_approvals: p.required_approvals,
            requested_at_ms: msg.accepted_at_ms,
        });
        Ok(())
    }

    fn on_ballot(&mut self, msg: &Message<'_>, choice: Choice) -> KResult<()> {
        if !msg.session.is_participant(msg.sender) {
            return Err(KernelError::forbidden(format!(
                "{} is not a declared participant and cannot vote",
                msg.sender
            )));
        }
        let (request_id, reason) = match choice {
            Choice::Approve => {
                let p: ApprovePayload = util::decode(msg.message_type, msg.payload)?;
                (p.request_id, p.reason)
            }
            Choice::Reject => {
                let p: RejectPayload = util::decode(msg.message_type, msg.payload)?;
                (p.request_id, p.reason)
            }
            Choice::Abstain => {
                let p: AbstainPayload = util::decode(msg.message_type, msg.payload)?;
                (p.request_id, p.reason)
            }
        };
        let request = self.request.as_ref().ok_or_else(|| {
            KernelError::invalid(format!(
                "{} before the ApprovalRequest: there is nothing to vote on",
                msg.message_type
            ))
        })?;
        if request_id != request.request_id {
            return Err(KernelError::invalid(format!(
                "{} refers to request '{request_id}', but this session's request is '{}'",
                msg.message_type, request.request_id
            )));
        }
        if let Some(b) = self.ballots.get(msg.sender) {
            return Err(KernelError::invalid(format!(
                "{} already cast a ballot ({}); each participant votes once",
                msg.sender,
                b.choice.as_str()
            )));
        }
        self.ballots.insert(msg.sender.to_string(), Ballot { choice, reason, at_ms: msg.accepted_at_ms });
        Ok(())
    }
}

impl ModeState for QuorumState {
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the quorum session has already been committed"));
        }
        // Every handler runs all of its checks before its first mutation, so
        // an `Err` leaves the state untouched.
        match msg.message_type {
            "ApprovalRequest" => self.on_request(msg),
            "Approve" => self.on_ballot(msg, Choice::Approve),
            "Reject" => self.on_ballot(msg, Choice::Reject),
            "Abstain" => self.on_ballot(msg, Choice::Abstain),
            other => Err(super::unknown_message_type(msg.session.mode, other)),
        }
    }

    fn commit(&mut self, _msg: &Message<'_>, c: &CommitmentPayload) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the quorum session has already been committed"));
        }
        let t = self.tally().ok_or_else(|| {
            KernelError::invalid("a quorum Commitment needs an ApprovalRequest and its ballots first")
        })?;
        if !t.reached() && !t.unreachable() {
            return Err(KernelError::invalid(format!(
                "the outcome is not decided yet: {} of {} required, {} still to vote",
                t.approvals,
                crate::text::Count::of(t.required, "approval"),
                crate::text::Count::of(t.remaining, "participant")
            )));
        }
        if c.outcome_positive {
            if let Some(th) = &self.threshold {
                if t.approvals < th.required {
                    let voters: Vec<&String> = self.ballots.keys().collect();
                    return Err(KernelError::policy_denied(vec![Denial::new(
                        DenialCode::ThresholdNotMet,
                        format!(
                            "threshold ({} {}) needs {} for a positive commitment; there {}",
                            th.kind,
                            th.value_text,
                            crate::text::Count::of(th.required, "approval"),
                            if t.approvals == 1 { "is 1".to_string() } else { format!("are {}", t.approvals) }
                        ),
                    )
                    .with_participants(
                        voters
                            .into_iter()
                            .filter(|w| self.ballots.get(*w).is_some_and(|b| b.choice != Choice::Approve))
                            .cloned(),
                    )]));
                }
            }
        }
        self.commitment = Some(Outcome {
            commitment_id: c.commitment_id.clone(),
            action: c.action.clone(),
            outcome_positive: c.outcome_positive,
        });
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        util::snapshot(self)
    }

    fn project(&self) -> Value {
        let ballots: serde_json::Map<String, Value> = self
            .ballots
            .iter()
            .map(|(who, b)| (who.clone(), json!({"ballot": b.choice.as_str(), "reason": b.reason, "at_ms": b.at_ms})))
            .collect();
        let tally = self.tally().map(|t| {
            json!({
                "required": t.required,
                "approvals": t.approvals,
                "rejections": t.rejections,
                "abstentions": t.abstentions,
                "remaining": t.remaining,
                "reached": t.reached(),
                "unreachable": t.unreachable(),
            })
        });
        json!({
            "phase": self.phase(),
            "participant_count": self.participant_count,
            "request": self.request.as_ref().map(|r| json!({
                "request_id": r.request_id,
                "action": r.action,
                "summary": r.summary,
                "details_bytes": r.details.len(),
                "required_approvals": r.required_approvals,
                "requested_at_ms": r.requested_at_ms,
            })),
            "threshold": self.threshold.as_ref().map(|t| json!({
                "type": t.kind,
                "value": t.value_text,
                "required": t.required,
            })),
            "ballots": ballots,
            "tally": tally,
            "eligible": self.tally().is_some_and(|t| t.reached() || t.unreachable()),
            "commitment": self.commitment.as_ref().map(|o| json!({
                "commitment_id": o.commitment_id,
                "action": o.action,
                "outcome_positive": o.outcome_positive,
            })),
        })
    }
}
