//! The simulator's invariants, checked against an independent record of
//! what is durable.
//!
//! The oracle keeps its own *shadow* kernel: the replay of exactly the
//! records known to be on disk (synced, or found to have survived a crash).
//! It never trusts the storage backend or the live kernel; it checks them:
//!
//! * **no acknowledged record lost**: a reply is released only after a sync,
//!   so every record it covers is in the shadow; after every restart the
//!   recovered kernel must equal the shadow plus some prefix of the records
//!   that were unsynced at the crash (those may or may not have reached the
//!   disk), and every acknowledged message must be in it;
//! * **replay equals live state**: after every successful sync the live
//!   kernel's snapshot and timers equal the shadow's;
//! * **exactly one resolution per resolved session**: along the durable
//!   history a session enters RESOLVED at most once; at the end every
//!   resolved session did so exactly once, and every Commitment a client saw
//!   accepted is its resolution; at most one Commitment per session is ever
//!   acknowledged as accepted, and at most one RESOLVED event is broadcast;
//! * **nothing accepted after a terminal state**: no durable record follows a
//!   session's terminal record, and every accepted envelope is covered by a
//!   record (so acceptance after the end would show up in the log).

use std::collections::{BTreeMap, BTreeSet};

use macp_kernel::macp_wire::storage::{record::Fact, Record};
use macp_kernel::macp_wire::v1::{session_lifecycle_event::EventType, SessionState};
use macp_kernel::{Broadcast, Kernel, KernelConfig, Reply};

use super::workload::Action;

/// A broken invariant: which, and the evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The invariant's short name.
    pub invariant: &'static str,
    /// What was observed.
    pub detail: String,
}

fn violation(invariant: &'static str, detail: impl Into<String>) -> Violation {
    Violation { invariant, detail: detail.into() }
}

/// An acknowledged session record, remembered to be found after restarts.
#[derive(Clone, Debug)]
struct Acked {
    session_id: String,
    seq: u64,
    message_id: Option<String>,
}

/// The invariant checker of one run.
pub struct Oracle {
    config: KernelConfig,
    shadow: Kernel,
    durable_records: usize,
    /// Records unsynced at the last crash.
    maybe: Vec<Record>,
    resolutions: BTreeMap<String, u32>,
    terminal: BTreeSet<String>,
    committed: BTreeMap<String, Vec<u8>>,
    resolved_broadcasts: BTreeMap<String, u32>,
    acked: Vec<Acked>,
}

impl Oracle {
    /// An oracle for a server starting empty with `config`.
    pub fn new(config: KernelConfig) -> Self {
        Oracle {
            shadow: Kernel::new(config.clone()),
            config,
            durable_records: 0,
            maybe: Vec::new(),
            resolutions: BTreeMap::new(),
            terminal: BTreeSet::new(),
            committed: BTreeMap::new(),
            resolved_broadcasts: BTreeMap::new(),
            acked: Vec::new(),
        }
    }

    /// Records known durable so far.
    pub fn durable_records(&self) -> usize {
        self.durable_records
    }

    /// Sessions whose Commitment a client saw accepted.
    pub fn commitments(&self) -> usize {
        self.committed.len()
    }

    /// Applies one durable record to the shadow, checking the history rules.
    fn apply_durable(&mut self, r: &Record) -> Result<(), Violation> {
        let sid = r.session_id.clone();
        let before = self.shadow.session(&sid).map(|s| s.state);
        if !sid.is_empty() && self.terminal.contains(&sid) {
            return Err(violation(
                "nothing-accepted-after-terminal",
                format!("durable record seq {} of session {sid} follows its terminal state {before:?}: {r:?}", r.seq),
            ));
        }
        if let Err(e) = self.shadow.apply_record(r) {
            return Err(violation("replay-equals-live", format!("durable record {r:?} does not replay: {e}")));
        }
        self.durable_records += 1;
        if let Some(s) = self.shadow.session(&sid) {
            if s.state == SessionState::Resolved && before != Some(SessionState::Resolved) {
                let n = self.resolutions.entry(sid.clone()).or_default();
                *n += 1;
                if *n > 1 {
                    return Err(violation("one-resolution", format!("session {sid} resolved a second time by {r:?}")));
                }
            }
            if s.is_terminal() {
                self.terminal.insert(sid);
            }
        }
        Ok(())
    }

    /// A sync succeeded: `records` are durable now.
    pub fn on_synced(&mut self, records: &[Record]) -> Result<(), Violation> {
        records.iter().try_for_each(|r| self.apply_durable(r))
    }

    /// With nothing unsynced, the live kernel must be the replay of the
    /// durable log.
    pub fn check_live(&self, live: &Kernel) -> Result<(), Violation> {
        if live.snapshot() != self.shadow.snapshot() {
            return Err(violation(
                "replay-equals-live",
                format!(
                    "the live kernel differs from the replay of its {} durable records ({} vs {} sessions)",
                    self.durable_records,
                    live.session_count(),
                    self.shadow.session_count()
                ),
            ));
        }
        if live.next_deadline() != self.shadow.next_deadline() {
            return Err(violation(
                "replay-equals-live",
                format!(
                    "live timers {:?} differ from replayed {:?}",
                    live.next_deadline(),
                    self.shadow.next_deadline()
                ),
            ));
        }
        Ok(())
    }

    /// A reply is released to its client (after the sync that made
    /// `covers`, the records persisted while handling it, durable).
    pub fn on_release(&mut self, action: &Action, reply: &Reply, covers: &[Record]) -> Result<(), Violation> {
        for r in covers {
            if !r.session_id.is_empty() {
                let message_id = match &r.fact {
                    Some(Fact::Started(s)) => s.envelope.as_ref().map(|e| e.message_id.clone()),
                    Some(Fact::Accepted(e)) => Some(e.message_id.clone()),
                    _ => None,
                };
                self.acked.push(Acked { session_id: r.session_id.clone(), seq: r.seq, message_id });
            }
        }
        let (Action::Envelope { envelope, .. }, Reply::Session { result, .. }) = (action, reply) else { return Ok(()) };
        let carried = covers.iter().find(|r| {
            r.session_id == envelope.session_id
                && match &r.fact {
                    Some(Fact::Started(s)) => s.envelope.as_ref().is_some_and(|e| e.message_id == envelope.message_id),
                    Some(Fact::Accepted(e)) => e.message_id == envelope.message_id,
                    _ => false,
                }
        });
        let ambient = matches!(envelope.message_type.as_str(), "Signal" | "Progress");
        if matches!(result, Ok(a) if !a.duplicate) && !ambient {
            let Some(Record { fact: Some(fact), .. }) = carried else {
                return Err(violation(
                    "no-acked-record-lost",
                    format!(
                        "{} {} of session {} was acknowledged as accepted but no record carries it",
                        envelope.message_type, envelope.message_id, envelope.session_id
                    ),
                ));
            };
            if envelope.message_type == "Commitment" {
                let payload = match fact {
                    Fact::Accepted(e) => e.payload.clone(),
                    _ => Vec::new(),
                };
                if self.committed.insert(envelope.session_id.clone(), payload).is_some() {
                    return Err(violation(
                        "one-resolution",
                        format!(
                            "a second Commitment ({}) of session {} was acknowledged as accepted",
                            envelope.message_id, envelope.session_id
                        ),
                    ));
                }
            }
        } else if carried.is_some() {
            return Err(violation(
                "nothing-accepted-after-terminal",
                format!(
                    "a rejected or duplicate {} ({}) was persisted: {result:?}",
                    envelope.message_type, envelope.message_id
                ),
            ));
        }
        Ok(())
    }

    /// A broadcast is released to observers.
    pub fn on_broadcast(&mut self, b: &Broadcast) -> Result<(), Violation> {
        if let Broadcast::Lifecycle { event: EventType::Resolved, session, .. } = b {
            let n = self.resolved_broadcasts.entry(session.session_id.clone()).or_default();
            *n += 1;
            if *n > 1 {
                return Err(violation(
                    "one-resolution",
                    format!("session {} was announced RESOLVED twice", session.session_id),
                ));
            }
        }
        Ok(())
    }

    /// A power cut: `unsynced` may or may not have reached the disk.
    pub fn on_crash(&mut self, unsynced: Vec<Record>) {
        self.maybe = unsynced;
    }

    /// After a restart: the recovered kernel must be the durable history
    /// plus some prefix of what was unsynced, and hold every acknowledged
    /// message. The surviving prefix becomes durable history.
    pub fn on_recover(&mut self, recovered: &Kernel) -> Result<usize, Violation> {
        let target = recovered.snapshot();
        let deadline = recovered.next_deadline();
        let maybe = std::mem::take(&mut self.maybe);
        let mut candidate = Kernel::restore(self.config.clone(), &self.shadow.snapshot())
            .map_err(|e| violation("replay-equals-live", format!("the shadow's checkpoint does not restore: {e}")))?;
        let mut found = None;
        for k in 0..=maybe.len() {
            if k > 0 && candidate.apply_record(&maybe[k - 1]).is_err() {
                break;
            }
            if candidate.snapshot() == target && candidate.next_deadline() == deadline {
                found = Some(k);
                break;
            }
        }
        for a in &self.acked {
            let Some(s) = recovered.session(&a.session_id) else {
                return Err(violation(
                    "no-acked-record-lost",
                    format!("session {} (acknowledged record seq {}) is missing after recovery", a.session_id, a.seq),
                ));
            };
            if s.seq < a.seq || a.message_id.as_ref().is_some_and(|m| !s.seen.contains(m)) {
                return Err(violation(
                    "no-acked-record-lost",
                    format!(
                        "acknowledged record seq {} ({:?}) of session {} is missing after recovery (recovered seq {})",
                        a.seq, a.message_id, a.session_id, s.seq
                    ),
                ));
            }
        }
        let Some(k) = found else {
            return Err(violation(
                "replay-equals-live",
                format!(
                    "the recovered kernel matches neither the {} durable records nor any of them plus a prefix of the {} unsynced ones",
                    self.durable_records,
                    maybe.len()
                ),
            ));
        };
        for r in &maybe[..k] {
            self.apply_durable(r)?;
        }
        Ok(k)
    }

    /// The end-of-run checks on the final recovered kernel.
    pub fn finish(&self, kernel: &Kernel) -> Result<(), Violation> {
        for (sid, payload) in &self.committed {
            let Some(s) = kernel.session(sid) else {
                return Err(violation("one-resolution", format!("committed session {sid} is missing")));
            };
            if s.state != SessionState::Resolved || kernel.resolution(sid) != Some(payload.as_slice()) {
                return Err(violation(
                    "one-resolution",
                    format!("session {sid} had a Commitment accepted but is {:?} with another resolution", s.state),
                ));
            }
        }
        for m in kernel.all_sessions() {
            let resolved = m.state == SessionState::Resolved as i32;
            let n = self.resolutions.get(&m.session_id).copied().unwrap_or(0);
            if resolved != (n == 1) || n > 1 {
                return Err(violation(
                    "one-resolution",
                    format!("session {} is {} after {n} resolutions in its history", m.session_id, m.state),
                ));
            }
            if resolved && kernel.resolution(&m.session_id).is_none() {
                return Err(violation(
                    "one-resolution",
                    format!("resolved session {} has no resolution", m.session_id),
                ));
            }
        }
        Ok(())
    }
}
