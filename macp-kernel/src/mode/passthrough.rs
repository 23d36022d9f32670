//! Dynamically registered extension modes (RegisterExtMode).
//!
//! The runtime cannot know an extension's semantics, so it enforces only the
//! structure its descriptor declares: any listed message type from a declared
//! participant is accepted and kept; the initiator's Commitment resolves.

use macp_wire::v1::{CommitmentPayload, ModeDescriptor};
use serde::{Deserialize, Serialize};

use super::{util, Message, Mode, ModeState, SessionView};
use crate::error::{KResult, KernelError};

/// A registered extension mode.
#[derive(Debug)]
pub struct PassthroughMode {
    descriptor: ModeDescriptor,
}

impl PassthroughMode {
    /// Wraps a validated descriptor.
    pub fn new(descriptor: ModeDescriptor) -> Self {
        PassthroughMode { descriptor }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PassthroughState {
    message_types: Vec<String>,
    /// (sender, message_type, payload) in acceptance order.
    messages: Vec<(String, String, Vec<u8>)>,
    committed: bool,
}

impl Mode for PassthroughMode {
    fn descriptor(&self) -> ModeDescriptor {
        self.descriptor.clone()
    }

    fn start(&self, session: SessionView<'_>) -> KResult<Box<dyn ModeState>> {
        if session.participants.is_empty() {
            return Err(KernelError::invalid("extension mode sessions need at least one participant"));
        }
        Ok(Box::new(PassthroughState {
            message_types: self.descriptor.message_types.clone(),
            messages: Vec::new(),
            committed: false,
        }))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<Box<dyn ModeState>, String> {
        Ok(Box::new(util::restore::<PassthroughState>(snapshot)?))
    }

    fn initiator_only_commitment(&self) -> bool {
        true
    }
}

impl ModeState for PassthroughState {
    fn accept(&mut self, msg: &Message<'_>) -> KResult<()> {
        if !msg.session.is_participant(msg.sender) {
            return Err(KernelError::forbidden(format!("{} is not a declared participant", msg.sender)));
        }
        if msg.message_type == "SessionStart" || !self.message_types.iter().any(|t| t == msg.message_type) {
            return Err(super::unknown_message_type(msg.session.mode, msg.message_type));
        }
        self.messages.push((msg.sender.to_string(), msg.message_type.to_string(), msg.payload.to_vec()));
        Ok(())
    }

    fn commit(&mut self, _msg: &Message<'_>, _c: &CommitmentPayload) -> KResult<()> {
        self.committed = true;
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        util::snapshot(self)
    }

    fn project(&self) -> serde_json::Value {
        serde_json::json!({
            "phase": if self.committed { "Committed" } else { "Open" },
            "message_count": self.messages.len(),
        })
    }
}
