//! Handoff mode, `macp.mode.handoff.v1` (RFC-MACP-0010; DIGEST §3.4).
//!
//! The session initiator is the current owner of some responsibility and
//! offers it to one declared participant at a time. The target accepts or
//! declines; the owner may attach context to its offers at any time (also
//! after the answer: "late context"). An answer only makes the session
//! eligible; the owner's Commitment (`handoff.accepted`, `handoff.declined`)
//! resolves it.
//!
//! One offer may be outstanding at a time and none may follow an accepted
//! one: ownership moves at most once per session (RFC §5.5, latest runtime).
//!
//! **Implicit accept.** When the bound policy sets
//! `acceptance.implicit_accept_timeout_ms > 0`, an offer that is still
//! unanswered that long after it was accepted by the runtime counts as
//! accepted. The mode asks for a timer ([`ModeState::next_deadline`]) and,
//! when it fires, proposes a runtime-emitted `HandoffAccept` with
//! `implicit = true` ([`ModeState::on_timer`]), which the kernel records like
//! any other accepted envelope, so the acceptance is in the history and
//! replays. A client may never send `implicit = true` (INVALID_ENVELOPE: the
//! field is structurally reserved to the runtime, whoever sends it). If a
//! Commitment is processed before the timer was serviced, due offers are
//! treated as accepted at the Commitment's acceptance time, as the latest
//! runtime does, so the outcome never depends on when the driver ticked.

use std::collections::BTreeMap;

use macp_wire::modes::handoff::{
    HandoffAcceptPayload, HandoffContextPayload, HandoffDeclinePayload, HandoffOfferPayload,
};
use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{util, Message, Mode, ModeState, RuntimeMessage, SessionView};
use crate::error::{ErrorCode, KResult, KernelError};
use crate::policy::rules::{admit_common, Level, Shape, SHARED_COMMITMENT};
use crate::policy::InvalidRules;

/// The canonical mode id.
pub const MODE_ID: &str = "macp.mode.handoff.v1";

/// Message-id prefix of runtime-emitted implicit accepts. Client messages may
/// not use it, so a client can never occupy the id the runtime will need
/// (the kernel skips a runtime message whose id is already taken).
pub const IMPLICIT_ACCEPT_ID_PREFIX: &str = "macp-runtime:implicit-accept:";

/// The handoff mode. Stateless: everything per session lives in its state.
#[derive(Debug, Default, Clone, Copy)]
pub struct HandoffMode;

/// The closed shape of a Handoff `rules` object (RFC-MACP-0012 §4.5).
const SHAPE: Shape = Shape {
    keys: &[
        ("acceptance", Level::Object(&Shape { keys: &[("implicit_accept_timeout_ms", Level::Leaf)] })),
        ("commitment", Level::Object(&SHARED_COMMITMENT)),
    ],
};

/// Reads `acceptance.implicit_accept_timeout_ms` (0 = off) out of a policy's
/// `rules`. Type-level only; unknown keys are ignored.
fn parse_timeout(rules: &Value) -> Result<i64, String> {
    if !rules.is_object() {
        return Err("handoff policy rules must be a JSON object".into());
    }
    let acceptance = match rules.get("acceptance") {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(format!("rules.acceptance must be an object, got {other}")),
    };
    match acceptance.get("implicit_accept_timeout_ms") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if v >= 0 => Ok(v),
            _ => Err(format!(
                "rules.acceptance.implicit_accept_timeout_ms must be a whole number of milliseconds >= 0, got {n}"
            )),
        },
        Some(other) => Err(format!(
            "rules.acceptance.implicit_accept_timeout_ms must be a whole number of milliseconds >= 0, got {other}"
        )),
    }
}

/// What became of an offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Disposition {
    Offered,
    Accepted,
    Declined,
}

impl Disposition {
    fn as_str(self) -> &'static str {
        match self {
            Disposition::Offered => "Offered",
            Disposition::Accepted => "Accepted",
            Disposition::Declined => "Declined",
        }
    }
}

/// One offer, keyed by `handoff_id` in [`HandoffState::offers`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Offer {
    target_participant: String,
    offered_by: String,
    scope: String,
    reason: String,
    disposition: Disposition,
    accepted_by: Option<String>,
    declined_by: Option<String>,
    /// The reason given with the accept or decline.
    outcome_reason: String,
    /// Runtime acceptance time of the offer: the implicit-accept clock.
    offered_at_ms: i64,
    answered_at_ms: Option<i64>,
    /// Accepted by the runtime because the target did not answer in time.
    implicit: bool,
}

/// One piece of context attached to an offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Context {
    sender: String,
    content_type: String,
    context: Vec<u8>,
    at_ms: i64,
}

/// The resolving Commitment, kept for the projection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Outcome {
    commitment_id: String,
    action: String,
    outcome_positive: bool,
}

/// Per-session handoff state (sorted maps only, for deterministic snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct HandoffState {
    /// From the bound policy; 0 disables implicit accepts.
    implicit_accept_timeout_ms: i64,
    offers: BTreeMap<String, Offer>,
    contexts: BTreeMap<String, Vec<Context>>,
    commitment: Option<Outcome>,
}

fn descriptor() -> ModeDescriptor {
    util::builtin_descriptor(util::BuiltinDescriptor {
        mode: MODE_ID,
        title: "Handoff",
        description: "Transfers responsibility from the current owner (the initiator) to one declared participant \
                      through offers that the target accepts or declines; the owner commits the outcome.",
        determinism_class: "context-frozen",
        participant_model: "delegated",
        message_types: &[
            "SessionStart",
            "HandoffOffer",
            "HandoffContext",
            "HandoffAccept",
            "HandoffDecline",
            "Commitment",
        ],
    })
}

impl Mode for HandoffMode {
    fn descriptor(&self) -> ModeDescriptor {
        descriptor()
    }

    fn validate_rules(&self, rules: &Value, _schema_version: u32) -> Result<(), InvalidRules> {
        admit_common(rules, &SHAPE, "handoff")?;
        parse_timeout(rules).map(|_| ()).map_err(InvalidRules)
    }

    /// The owner hands off to someone else, so it must be listed and there
    /// must be at least one other participant.
    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        if session.participants.len() < 2 {
            return Err(KernelError::invalid(
                "a handoff session needs at least 2 participants: the current owner (the initiator) and a target",
            ));
        }
        if !session.is_participant(session.initiator) {
            return Err(KernelError::invalid(format!(
                "the initiator {} is the current owner and must be a declared participant of a handoff session",
                session.initiator
            )));
        }
        // `*` policies are only checked against the Decision schema when they
        // are registered, so the handoff section is checked here too.
        let implicit_accept_timeout_ms = parse_timeout(&session.policy.rules)
            .map_err(|e| KernelError::new(ErrorCode::InvalidPolicyDefinition, e))?;
        Ok(Box::new(HandoffState {
            implicit_accept_timeout_ms,
            offers: BTreeMap::new(),
            contexts: BTreeMap::new(),
            commitment: None,
        }))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String> {
        Ok(Box::new(util::restore::<HandoffState>(snapshot)?))
    }
}

impl HandoffState {
    fn phase(&self) -> &'static str {
        let any = |d: Disposition| self.offers.values().any(|o| o.disposition == d);
        if self.commitment.is_some() {
            "Committed"
        } else if any(Disposition::Accepted) {
            "Accepted"
        } else if any(Disposition::Offered) {
            "Offered"
        } else if any(Disposition::Declined) {
            "Declined"
        } else {
            "AwaitingOffer"
        }
    }

    /// When an offer made at `offered_at_ms` is implicitly accepted, if the
    /// policy enables implicit accepts.
    fn due_at(&self, offered_at_ms: i64) -> Option<i64> {
        (self.implicit_accept_timeout_ms > 0).then(|| offered_at_ms.saturating_add(self.implicit_accept_timeout_ms))
    }

    /// Offers still unanswered whose implicit accept is due at `now_ms`,
    /// earliest first (ties by id).
    fn due_offers(&self, now_ms: i64) -> Vec<(&String, &Offer)> {
        let mut due: Vec<(i64, &String, &Offer)> = self
            .offers
            .iter()
            .filter(|(_, o)| o.disposition == Disposition::Offered)
            .filter_map(|(id, o)| self.due_at(o.offered_at_ms).filter(|d| *d <= now_ms).map(|d| (d, id, o)))
            .collect();
        due.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        due.into_iter().map(|(_, id, o)| (id, o)).collect()
    }

    fn offer(&self, message_type: &str, handoff_id: &str) -> KResult<&Offer> {
        util::require("handoff_id", handoff_id, message_type)?;
        self.offers.get(handoff_id).ok_or_else(|| {
            KernelError::invalid(format!("{message_type} refers to handoff '{handoff_id}', which was never offered"))
        })
    }

    fn on_offer(&mut self, msg: &Message<'_>) -> KResult<()> {
        if msg.sender != msg.session.initiator {
            return Err(KernelError::forbidden(format!(
                "only the current owner (the initiator {}) may send HandoffOffer",
                msg.session.initiator
            )));
        }
        let p: HandoffOfferPayload = util::decode(msg.message_type, msg.payload)?;
        util::require("handoff_id", &p.handoff_id, "HandoffOffer")?;
        util::require("target_participant", &p.target_participant, "HandoffOffer")?;
        if self.offers.contains_key(&p.handoff_id) {
            return Err(KernelError::invalid(format!(
                "handoff_id '{}' was already used; a new offer needs a new handoff_id",
                p.handoff_id
            )));
        }
        if !msg.session.is_participant(&p.target_participant) {
            return Err(KernelError::invalid(format!(
                "target_participant {} is not a declared participant",
                p.target_participant
            )));
        }
        if p.target_participant == msg.sender {
            return Err(KernelError::invalid("the owner cannot hand off to itself"));
        }
        if let Some((id, o)) = self.offers.iter().find(|(_, o)| o.disposition == Disposition::Offered) {
            return Err(KernelError::invalid(format!(
                "offer '{id}' to {} is still outstanding; wait for its answer before offering again",
                o.target_participant
            )));
        }
        if let Some((id, o)) = self.offers.iter().find(|(_, o)| o.disposition == Disposition::Accepted) {
            return Err(KernelError::invalid(format!(
                "offer '{id}' was already accepted by {}; ownership has moved",
                o.target_participant
            )));
        }
        self.offers.insert(
            p.handoff_id,
            Offer {
                target_participant: p.target_participant,
                offered_by: msg.sender.to_string(),
                scope: p.scope,
                reason: p.reason,
                disposition: Disposition::Offered,
                accepted_by: None,
                declined_by: None,
                outcome_reason: String::new(),
                offered_at_ms: msg.accepted_at_ms,
                answered_at_ms: None,
                implicit: false,
            },
        );
        Ok(())
    }

    fn on_context(&mut self, msg: &Message<'_>) -> KResult<()> {
        let p: HandoffContextPayload = util::decode(msg.message_type, msg.payload)?;
        let offer = self.offer(msg.message_type, &p.handoff_id)?;
        if offer.offered_by != msg.sender {
            return Err(KernelError::forbidden(format!(
                "only {}, who made offer '{}', may attach context to it",
                offer.offered_by, p.handoff_id
            )));
        }
        self.contexts.entry(p.handoff_id).or_default().push(Context {
            sender: msg.sender.to_string(),
            content_type: p.content_type,
            context: p.context,
            at_ms: msg.accepted_at_ms,
        });
        Ok(())
    }

    /// Checks shared by client accepts and declines: the offer exists, the
    /// sender is its target, it is unanswered, and `named` (accepted_by /
    /// declined_by), if set, is the sender.
    fn check_answer(&self, msg: &Message<'_>, handoff_id: &str, field: &str, named: &str) -> KResult<()> {
        let offer = self.offer(msg.message_type, handoff_id)?;
        if offer.target_participant != msg.sender {
            return Err(KernelError::forbidden(format!(
                "offer '{handoff_id}' was made to {}; only it may answer",
                offer.target_participant
            )));
        }
        if offer.disposition != Disposition::Offered {
            return Err(KernelError::invalid(format!(
                "offer '{handoff_id}' was already {}; it cannot be answered again",
                offer.disposition.as_str().to_lowercase()
            )));
        }
        if !named.is_empty() && named != msg.sender {
            return Err(KernelError::invalid(format!(
                "{} {field} is {named}, but it was sent by {}; an agent may only answer for itself",
                msg.message_type, msg.sender
            )));
        }
        Ok(())
    }

    fn on_accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        let p: HandoffAcceptPayload = util::decode(msg.message_type, msg.payload)?;
        self.check_answer(msg, &p.handoff_id, "accepted_by", &p.accepted_by)?;
        if p.implicit {
            return Err(KernelError::invalid(
                "HandoffAccept with implicit=true is emitted only by the runtime; send implicit=false",
            ));
        }
        self.answer(&p.handoff_id, Disposition::Accepted, msg.sender, p.reason, msg.accepted_at_ms, false);
        Ok(())
    }

    fn on_decline(&mut self, msg: &Message<'_>) -> KResult<()> {
        let p: HandoffDeclinePayload = util::decode(msg.message_type, msg.payload)?;
        self.check_answer(msg, &p.handoff_id, "declined_by", &p.declined_by)?;
        self.answer(&p.handoff_id, Disposition::Declined, msg.sender, p.reason, msg.accepted_at_ms, false);
        Ok(())
    }

    /// A runtime-emitted implicit accept, live or replayed: valid only if it
    /// is exactly what [`ModeState::on_timer`] would have proposed.
    fn on_implicit_accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        if msg.message_type != "HandoffAccept" {
            return Err(KernelError::invalid(format!(
                "the runtime emits only implicit HandoffAccept in handoff sessions, not {}",
                msg.message_type
            )));
        }
        let p: HandoffAcceptPayload = util::decode(msg.message_type, msg.payload)?;
        if !p.implicit {
            return Err(KernelError::invalid("a runtime-emitted HandoffAccept must be implicit"));
        }
        let offer = self.offer(msg.message_type, &p.handoff_id)?;
        if offer.disposition != Disposition::Offered {
            return Err(KernelError::invalid(format!("offer '{}' was already answered", p.handoff_id)));
        }
        if !p.accepted_by.is_empty() && p.accepted_by != offer.target_participant {
            return Err(KernelError::invalid(format!(
                "an implicit accept of '{}' can only be on behalf of its target {}",
                p.handoff_id, offer.target_participant
            )));
        }
        match self.due_at(offer.offered_at_ms) {
            None => return Err(KernelError::invalid("the bound policy does not enable implicit accepts")),
            Some(due) if msg.accepted_at_ms < due => {
                return Err(KernelError::invalid(format!(
                    "the implicit accept of '{}' is not due before {due}",
                    p.handoff_id
                )))
            }
            Some(_) => {}
        }
        let target = offer.target_participant.clone();
        self.answer(&p.handoff_id, Disposition::Accepted, &target, p.reason, msg.accepted_at_ms, true);
        Ok(())
    }

    fn answer(&mut self, id: &str, d: Disposition, by: &str, reason: String, at: i64, implicit: bool) {
        if let Some(o) = self.offers.get_mut(id) {
            o.disposition = d;
            match d {
                Disposition::Accepted => o.accepted_by = Some(by.to_string()),
                Disposition::Declined => o.declined_by = Some(by.to_string()),
                Disposition::Offered => {}
            }
            o.outcome_reason = reason;
            o.answered_at_ms = Some(at);
            o.implicit = implicit;
        }
    }
}

fn implicit_reason(timeout_ms: i64) -> String {
    format!("implicit accept: the target did not answer within {timeout_ms} ms")
}

impl ModeState for HandoffState {
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the handoff session has already been committed"));
        }
        if msg.runtime_emitted {
            return self.on_implicit_accept(msg);
        }
        if msg.message_id.starts_with(IMPLICIT_ACCEPT_ID_PREFIX) {
            return Err(KernelError::invalid(format!(
                "message ids starting with '{IMPLICIT_ACCEPT_ID_PREFIX}' are reserved for the runtime"
            )));
        }
        let known = matches!(msg.message_type, "HandoffOffer" | "HandoffContext" | "HandoffAccept" | "HandoffDecline");
        if !known {
            return Err(super::unknown_message_type(msg.session.mode, msg.message_type));
        }
        if !msg.session.is_participant(msg.sender) {
            return Err(KernelError::forbidden(format!("{} is not a declared participant", msg.sender)));
        }
        // Every handler runs all of its checks before its first mutation, so
        // an `Err` leaves the state untouched.
        match msg.message_type {
            "HandoffOffer" => self.on_offer(msg),
            "HandoffContext" => self.on_context(msg),
            "HandoffAccept" => self.on_accept(msg),
            _ => self.on_decline(msg),
        }
    }

    fn commit(&mut self, msg: &Message<'_>, c: &CommitmentPayload) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the handoff session has already been committed"));
        }
        if !msg.runtime_emitted && msg.message_id.starts_with(IMPLICIT_ACCEPT_ID_PREFIX) {
            return Err(KernelError::invalid(format!(
                "message ids starting with '{IMPLICIT_ACCEPT_ID_PREFIX}' are reserved for the runtime"
            )));
        }
        // Offers whose implicit accept fell due before this Commitment count
        // as accepted even if no tick has delivered the timer yet.
        let due: Vec<String> = self.due_offers(msg.accepted_at_ms).into_iter().map(|(id, _)| id.clone()).collect();
        let answered = self.offers.values().any(|o| o.disposition != Disposition::Offered);
        if !answered && due.is_empty() {
            return Err(KernelError::invalid(if self.offers.is_empty() {
                "a handoff Commitment needs an offer that was accepted or declined; nothing was offered yet"
            } else {
                "a handoff Commitment needs an offer that was accepted or declined; the offer is still unanswered"
            }));
        }
        let timeout = self.implicit_accept_timeout_ms;
        for id in due {
            let target = self.offers[&id].target_participant.clone();
            let at = self.offers[&id].offered_at_ms.saturating_add(timeout);
            self.answer(&id, Disposition::Accepted, &target, implicit_reason(timeout), at, true);
        }
        self.commitment = Some(Outcome {
            commitment_id: c.commitment_id.clone(),
            action: c.action.clone(),
            outcome_positive: c.outcome_positive,
        });
        Ok(())
    }

    fn next_deadline(&self) -> Option<i64> {
        if self.commitment.is_some() {
            return None;
        }
        self.offers
            .values()
            .filter(|o| o.disposition == Disposition::Offered)
            .filter_map(|o| self.due_at(o.offered_at_ms))
            .min()
    }

    fn on_timer(&self, _session: SessionView<'_>, now_ms: i64) -> Vec<RuntimeMessage> {
        if self.commitment.is_some() {
            return Vec::new();
        }
        self.due_offers(now_ms)
            .into_iter()
            .map(|(id, o)| RuntimeMessage {
                message_type: "HandoffAccept".into(),
                payload: util::encode(&HandoffAcceptPayload {
                    handoff_id: id.clone(),
                    accepted_by: o.target_participant.clone(),
                    reason: implicit_reason(self.implicit_accept_timeout_ms),
                    implicit: true,
                }),
                message_id: format!("{IMPLICIT_ACCEPT_ID_PREFIX}{id}"),
            })
            .collect()
    }

    fn snapshot(&self) -> Vec<u8> {
        util::snapshot(self)
    }

    fn project(&self) -> Value {
        let offers: serde_json::Map<String, Value> = self
            .offers
            .iter()
            .map(|(id, o)| {
                (
                    id.clone(),
                    json!({
                        "handoff_id": id,
                        "target_participant": o.target_participant,
                        "offered_by": o.offered_by,
                        "scope": o.scope,
                        "reason": o.reason,
                        "disposition": o.disposition.as_str(),
                        "accepted_by": o.accepted_by,
                        "declined_by": o.declined_by,
                        "outcome_reason": o.outcome_reason,
                        "offered_at_ms": o.offered_at_ms,
                        "answered_at_ms": o.answered_at_ms,
                        "implicit": o.implicit,
                    }),
                )
            })
            .collect();
        let contexts: serde_json::Map<String, Value> = self
            .contexts
            .iter()
            .map(|(id, cs)| {
                let items: Vec<Value> = cs
                    .iter()
                    .map(|c| {
                        json!({
                            "sender": c.sender,
                            "content_type": c.content_type,
                            "size_bytes": c.context.len(),
                            "at_ms": c.at_ms,
                        })
                    })
                    .collect();
                (id.clone(), Value::Array(items))
            })
            .collect();
        json!({
            "phase": self.phase(),
            "offers": offers,
            "contexts": contexts,
            "implicit_accept_timeout_ms": self.implicit_accept_timeout_ms,
            "commitment": self.commitment.as_ref().map(|o| json!({
                "commitment_id": o.commitment_id,
                "action": o.action,
                "outcome_positive": o.outcome_positive,
            })),
        })
    }
}
