//! Multi-round convergence, `ext.multi_round.v1` (DIGEST §3.6; DECISIONS 8).
//!
//! A built-in *extension*, not standards-track: it is listed by
//! ListExtModes, never by ListModes. Participants `Contribute` values, and
//! may change their mind in later rounds; the session *converges* once every
//! declared participant other than the initiator has contributed and their
//! latest values are all equal. The initiator (the coordinator) then
//! resolves with a Commitment (`multi_round.converged`). Only the initiator
//! may commit, whatever the policy says; the mode evaluates no policy rules,
//! so any rules object is accepted (the trait's default `validate_rules`).
//!
//! The initiator is left out of the convergence set because the spec's own
//! vector lists the coordinator as a participant that never contributes
//! (DIGEST §0.8). If the initiator is listed it may still contribute; its
//! value is recorded but does not count.
//!
//! The seed runtime's `macp.mode.multi_round.v1` is an alias the registry
//! resolves to this mode.

use std::collections::BTreeMap;

use macp_wire::modes::multi_round::ContributePayload;
use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{util, Message, Mode, ModeState, SessionView};
use crate::error::{KResult, KernelError};

/// The canonical mode id.
pub const MODE_ID: &str = "ext.multi_round.v1";

/// The multi-round mode. Stateless: everything per session lives in its state.
#[derive(Debug, Default, Clone, Copy)]
pub struct MultiRoundMode;

/// The resolving Commitment, kept for the projection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Outcome {
    commitment_id: String,
    action: String,
    outcome_positive: bool,
}

/// Per-session state (sorted maps only, for deterministic snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MultiRoundState {
    /// Declared participants, in SessionStart order.
    participants: Vec<String>,
    /// The participants whose agreement is convergence: all but the initiator.
    required: Vec<String>,
    /// Incremented by every contribution that changes its sender's value.
    round: u64,
    /// Each contributor's latest value.
    contributions: BTreeMap<String, String>,
    /// The agreed value, once converged.
    converged_value: Option<String>,
    /// Round in which convergence was reached.
    converged_round: Option<u64>,
    commitment: Option<Outcome>,
}

fn descriptor() -> ModeDescriptor {
    util::builtin_descriptor(util::BuiltinDescriptor {
        mode: MODE_ID,
        title: "Multi-round convergence",
        description: "Participants contribute values over rounds until all of them (the initiator excepted) hold \
                      the same value; the initiator then commits the converged value.",
        determinism_class: "semantic-deterministic",
        participant_model: "peer",
        message_types: &["SessionStart", "Contribute", "Commitment"],
    })
}

impl Mode for MultiRoundMode {
    fn descriptor(&self) -> ModeDescriptor {
        descriptor()
    }

    /// Needs someone other than the initiator to converge; with nobody to
    /// wait for, the session would converge vacuously before any value.
    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        let required: Vec<String> =
            session.participants.iter().filter(|p| p.as_str() != session.initiator).cloned().collect();
        if required.is_empty() {
            return Err(KernelError::invalid(
                "a multi_round session needs at least one participant other than the initiator to contribute",
            ));
        }
        Ok(Box::new(MultiRoundState {
            participants: session.participants.to_vec(),
            required,
            round: 0,
            contributions: BTreeMap::new(),
            converged_value: None,
            converged_round: None,
            commitment: None,
        }))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String> {
        Ok(Box::new(util::restore::<MultiRoundState>(snapshot)?))
    }

    fn initiator_only_commitment(&self) -> bool {
        true
    }
}

/// Reads a Contribute value: the legacy JSON form `{"value": "…"}` first (as
/// the latest runtime does, for the seed's clients), then the protobuf
/// `ContributePayload`.
fn contributed_value(payload: &[u8]) -> KResult<String> {
    if payload.is_empty() {
        return Err(KernelError::invalid(
            "Contribute needs a payload: a ContributePayload or the JSON form {\"value\": \"...\"}",
        ));
    }
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) {
        if let Some(Value::String(v)) = m.get("value") {
            return Ok(v.clone());
        }
    }
    let p: ContributePayload = util::decode("Contribute", payload)?;
    Ok(p.value)
}

impl MultiRoundState {
    /// The common value if every required participant has contributed it.
    fn agreement(&self, contributions: &BTreeMap<String, String>) -> Option<String> {
        let mut values = self.required.iter().map(|p| contributions.get(p));
        let first = values.next()??;
        values.all(|v| v == Some(first)).then(|| first.clone())
    }

    fn phase(&self) -> &'static str {
        if self.commitment.is_some() {
            "Committed"
        } else if self.converged_value.is_some() {
            "Converged"
        } else {
            "Collecting"
        }
    }

    /// The JSON summary the spec names as multi_round's resolution.
    fn resolution(&self) -> Option<Value> {
        self.commitment.as_ref()?;
        Some(json!({
            "converged_value": self.converged_value,
            "round": self.round,
            "final": self.contributions,
        }))
    }
}

impl ModeState for MultiRoundState {
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the multi_round session has already been committed"));
        }
        if msg.message_type != "Contribute" {
            return Err(super::unknown_message_type(msg.session.mode, msg.message_type));
        }
        if !msg.session.is_participant(msg.sender) {
            return Err(KernelError::forbidden(format!(
                "{} is not a declared participant and cannot contribute",
                msg.sender
            )));
        }
        let value = contributed_value(msg.payload)?;
        if value.is_empty() {
            return Err(KernelError::invalid("Contribute needs a non-empty value"));
        }
        if let Some(v) = &self.converged_value {
            return Err(KernelError::invalid(format!(
                "the session already converged on '{v}'; it awaits the initiator's Commitment"
            )));
        }
        if self.contributions.get(msg.sender) == Some(&value) {
            // Restating one's current value changes nothing, not even the round.
            return Ok(());
        }
        self.contributions.insert(msg.sender.to_string(), value);
        self.round += 1;
        if let Some(v) = self.agreement(&self.contributions) {
            self.converged_value = Some(v);
            self.converged_round = Some(self.round);
        }
        Ok(())
    }

    fn commit(&mut self, _msg: &Message<'_>, c: &CommitmentPayload) -> KResult<()> {
        if self.commitment.is_some() {
            return Err(KernelError::invalid("the multi_round session has already been committed"));
        }
        if self.converged_value.is_none() {
            let missing: Vec<&str> =
                self.required.iter().filter(|p| !self.contributions.contains_key(*p)).map(String::as_str).collect();
            return Err(KernelError::invalid(if missing.is_empty() {
                "the contributions have not converged: the latest values still differ".to_string()
            } else {
                format!("the contributions have not converged: still waiting for {}", missing.join(", "))
            }));
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
        json!({
            "phase": self.phase(),
            "round": self.round,
            "participants": self.participants,
            "required_contributors": self.required,
            "contributions": self.contributions,
            "convergence_type": "all_equal",
            "converged": self.converged_value.is_some(),
            "converged_value": self.converged_value,
            "converged_round": self.converged_round,
            "resolution": self.resolution(),
            "commitment": self.commitment.as_ref().map(|o| json!({
                "commitment_id": o.commitment_id,
                "action": o.action,
                "outcome_positive": o.outcome_positive,
            })),
        })
    }
}
