//! The input layout of the `envelope_kernel` target: a sequence of frames,
//! each one encoded `Envelope` plus a control byte.
//!
//! ```text
//! frame = ctl:u8  len:u16-le  bytes[len]      (len is cut to what is left)
//! ctl   = bits 0-2: who sends it (see [`Sender`]); bits 3-7: how far the
//!         clock moves first (an index into [`CLOCK_STEPS`])
//! ```
//!
//! Several envelopes per input let one input walk a session through its
//! phases, and the control byte lets the fuzzer choose the authenticated
//! identity and the timing (TTL expiry, implicit-accept timers, a clock that
//! steps back) without those choices being part of the protobuf bytes.

use macp_kernel::macp_wire::v1::Envelope;
use macp_kernel::{Grants, Identity};
use prost::Message as _;

/// Clock steps in milliseconds, indexed by `ctl >> 3`. Mostly small, with
/// the TTL (60 s) and implicit-accept (50 ms) boundaries and a few steps back.
pub const CLOCK_STEPS: [i64; 32] = [
    0, 0, 0, 0, 1, 1, 2, 5, 10, 25, 49, 50, 51, 100, 500, 1_000, 5_000, 10_000, 30_000, 59_000, 60_000, 61_000,
    120_000, 3_600_000, 86_400_000, -1, -10, -1_000, -60_000, 7, 13, 0,
];

/// Who a frame is sent as (`ctl & 7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The envelope's own `sender` field (0-3): the common, honest case.
    Envelope,
    /// An agent no session knows (4).
    Outsider,
    /// The envelope's sender with narrow grants: may not start sessions,
    /// only the task mode, one open session (5).
    Restricted,
    /// The runtime's reserved identity (6).
    Runtime,
    /// No envelope: a tick at the new clock (7).
    Tick,
}

impl Sender {
    /// Decodes the low three bits of a control byte.
    pub fn from_ctl(ctl: u8) -> Sender {
        match ctl & 7 {
            0..=3 => Sender::Envelope,
            4 => Sender::Outsider,
            5 => Sender::Restricted,
            6 => Sender::Runtime,
            _ => Sender::Tick,
        }
    }

    /// The identity this sender authenticates as for `env`.
    pub fn identity(self, env: &Envelope) -> Identity {
        let own = if env.sender.is_empty() { "agent://anonymous".to_string() } else { env.sender.clone() };
        match self {
            Sender::Envelope | Sender::Tick => Identity::new(own),
            Sender::Outsider => Identity::new("agent://outsider"),
            Sender::Restricted => Identity {
                sender: own,
                grants: Grants {
                    can_start_sessions: false,
                    allowed_modes: Some(["macp.mode.task.v1".to_string()].into_iter().collect()),
                    max_open_sessions: Some(1),
                    can_manage_mode_registry: false,
                    is_observer: false,
                },
            },
            Sender::Runtime => Identity::new("macp-runtime"),
        }
    }
}

/// One decoded frame.
#[derive(Clone, Debug)]
pub struct Frame<'a> {
    /// The control byte.
    pub ctl: u8,
    /// The (possibly malformed) envelope bytes.
    pub bytes: &'a [u8],
}

impl Frame<'_> {
    /// How far the clock moves before this frame.
    pub fn clock_step(&self) -> i64 {
        CLOCK_STEPS[usize::from(self.ctl >> 3)]
    }

    /// Who sends it.
    pub fn sender(&self) -> Sender {
        Sender::from_ctl(self.ctl)
    }

    /// The envelope, if the bytes decode.
    pub fn envelope(&self) -> Option<Envelope> {
        Envelope::decode(self.bytes).ok()
    }
}

/// Splits an input into frames; a trailing partial header is ignored.
pub fn split(mut data: &[u8]) -> Vec<Frame<'_>> {
    let mut out = Vec::new();
    while data.len() >= 3 {
        let ctl = data[0];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
        out.push(Frame { ctl, bytes: &data[3..3 + len] });
        data = &data[3 + len..];
    }
    out
}

/// Appends one frame to an input (seed corpus writer).
pub fn push(out: &mut Vec<u8>, ctl: u8, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("a seed envelope fits a frame");
    out.push(ctl);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The control byte for "sent as the envelope's sender, clock step index
/// `step`".
pub fn ctl(step: u8) -> u8 {
    (step & 31) << 3
}
