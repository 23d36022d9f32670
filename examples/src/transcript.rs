//! What an example did, step by step, in a form a person can read.
//!
//! The point of the mode examples is to show the protocol, so each step
//! keeps the envelope, its decoded payload (prost's `Debug`) and the Ack the
//! runtime answered with.

use std::fmt;
use std::time::Duration;

use macp_wire::v1::{Ack, Envelope, SessionMetadata, SessionState};

/// One envelope sent and the runtime's answer.
#[derive(Clone, Debug)]
pub struct Step {
    /// The envelope as sent.
    pub envelope: Envelope,
    /// The payload, decoded, for printing.
    pub payload: String,
    /// The runtime's Ack.
    pub ack: Ack,
    /// Round-trip time of the Send.
    pub latency: Duration,
}

/// A session state's protocol name.
pub fn state_name(state: i32) -> &'static str {
    SessionState::try_from(state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN")
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.envelope;
        writeln!(f, "→ {} {} [{}] from {}", e.mode, e.message_type, e.message_id, e.sender)?;
        writeln!(f, "    payload: {}", self.payload)?;
        let a = &self.ack;
        match &a.error {
            None => write!(
                f,
                "← ack ok{} session_state={} ({:.2?})",
                if a.duplicate { " (duplicate)" } else { "" },
                state_name(a.session_state),
                self.latency
            ),
            Some(err) => write!(f, "← ack ERROR {}: {} ({:.2?})", err.code, err.message, self.latency),
        }
    }
}

/// Renders session metadata for the final report of an example.
pub fn describe_session(md: &SessionMetadata) -> String {
    let mut s = format!(
        "session {}\n  mode:          {} {}\n  state:         {}\n  initiator:     {}\n  participants:  {}\n  configuration: {}  policy: {}\n",
        md.session_id,
        md.mode,
        md.mode_version,
        state_name(md.state),
        md.initiator,
        md.participants.join(", "),
        md.configuration_version,
        if md.policy_version.is_empty() { "(default)" } else { &md.policy_version },
    );
    for a in &md.participant_activity {
        s.push_str(&format!("  activity:      {} sent {} message(s)\n", a.participant_id, a.message_count));
    }
    s
}
