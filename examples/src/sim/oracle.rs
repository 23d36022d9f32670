//! The simulator's invariants, checked against an independent record of
//! what is durable.
//!
//! The oracle keeps its own *shadow* kernel: the replay of exactly the
//! records known to be on disk (synced, or found to have survived a crash),
//! plus the summaries of the sessions that ended in that replay and each
//! session's durable records. It never trusts the storage backend or the
//! live pipeline; it checks them:
//!
//! * **no acknowledged record lost**: a reply is released only after a sync,
//!   so every record it covers is durable; after every restart the recovered
//!   kernel must equal the shadow plus some prefix of the records that were
//!   unsynced at the crash, and every acknowledged message must be found —
//!   in the kernel if its session is open, in storage if it ended (unless
//!   retention was allowed to delete it);
//! * **replay equals live state**: after every commit the live kernel's
//!   snapshot and timers equal the shadow's;
//! * **ended sessions answer from storage**: every ended session within
//!   retention reads back from storage with exactly the summary the shadow
//!   computed and exactly its durable records; reads (GetSession probes)
//!   answer what the shadow says, and a session is never deleted before its
//!   retention passed;
//! * **exactly one resolution per resolved session**: along the durable
//!   history a session enters RESOLVED at most once; every Commitment a
//!   client saw accepted is its session's resolution; at most one RESOLVED
//!   event is broadcast per session;
//! * **nothing accepted after a terminal state**: no durable record follows
//!   a session's terminal record, and every accepted envelope is covered by
//!   a record;
//! * **what-if replay agrees**: every ended session's stored history,
//!   replayed by WhatIfReplay under the policy it was recorded under,
//!   applies every entry, never diverges and ends as storage says.
//! * **receipts verify and never change**: when a session resolves in the
//!   durable history, the receipt `macp_receipt::issue` makes from that
//!   history verifies with the run's key; after the next crash and
//!   recovery, and again at the end (after a last crash), the receipt issued
//!   from what storage returns is byte-identical to it (until retention may
//!   have deleted the session).

use std::collections::{BTreeMap, BTreeSet};

use macp_kernel::macp_wire::storage::{record::Fact, Record, SessionSummary};
use macp_kernel::macp_wire::v1::{session_lifecycle_event::EventType, SessionState};
use macp_kernel::{Answer, Broadcast, ErrorCode, Kernel, KernelConfig, Reply};
use macp_receipt::{ReceiptKeys, SigningKey, Verdict};
use macp_storage::{Retention, StorageRead};

use super::rng::Rng;
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
    retention: Retention,
    shadow: Kernel,
    durable_records: usize,
    /// Each session's durable records, in order.
    histories: BTreeMap<String, Vec<Record>>,
    /// Summaries of the sessions that ended in the durable history.
    ended: BTreeMap<String, SessionSummary>,
    /// Records appended but unsynced at the last crash.
    maybe: Vec<Record>,
    resolutions: BTreeMap<String, u32>,
    committed: BTreeMap<String, Vec<u8>>,
    resolved_broadcasts: BTreeMap<String, u32>,
    /// Session ids started again after retention deleted their first session.
    reincarnated: u64,
    acked: Vec<Acked>,
    /// The latest server time storage upkeep ran at: retention may have
    /// deleted what ended before it by more than the retention period.
    maintained_at: Option<i64>,
    /// The run's receipt signing key, fixed so receipts are reproducible,
    /// and the key set a holder would verify with.
    receipt_keys: ReceiptKeys,
    receipt_jwks: String,
    /// Each resolved session's receipt, issued from the durable history
    /// when it resolved.
    receipts: BTreeMap<String, String>,
    /// Sessions resolved since the last recovery, whose receipts the next
    /// recovery checks against storage. (Checking every receipt at every
    /// recovery doubled the run time; the end of the run checks them all.)
    receipts_unchecked: BTreeSet<String>,
}

impl Oracle {
    /// An oracle for a server starting empty with `config` and `retention`.
    pub fn new(config: KernelConfig, retention: Retention) -> Self {
        let receipt_keys = match SigningKey::from_seed(&[0x5e; 32], Some("sim".into())) {
            Ok(key) => ReceiptKeys::signed_by(key),
            Err(_) => ReceiptKeys::unsigned(),
        };
        Oracle {
            receipt_jwks: receipt_keys.jwks_json(),
            receipt_keys,
            receipts: BTreeMap::new(),
            receipts_unchecked: BTreeSet::new(),
            shadow: Kernel::new(config.clone()),
            config,
            retention,
            durable_records: 0,
            histories: BTreeMap::new(),
            ended: BTreeMap::new(),
            maybe: Vec::new(),
            resolutions: BTreeMap::new(),
            committed: BTreeMap::new(),
            resolved_broadcasts: BTreeMap::new(),
            reincarnated: 0,
            acked: Vec::new(),
            maintained_at: None,
        }
    }

    /// Records known durable so far.
    pub fn durable_records(&self) -> usize {
        self.durable_records
    }

    /// Session ids started again after retention deleted their first
    /// session.
    pub fn reincarnated(&self) -> u64 {
        self.reincarnated
    }

    /// Sessions whose Commitment a client saw accepted.
    pub fn commitments(&self) -> usize {
        self.committed.len()
    }

    /// Whether retention may have deleted an ended session by now.
    fn may_be_deleted(&self, sid: &str) -> bool {
        match (self.ended.get(sid), self.maintained_at) {
            (Some(s), Some(at)) => self.retention.expired(s.ended_at_unix_ms, at),
            _ => false,
        }
    }

    /// A session id to probe: mostly one the history knows, sometimes one
    /// it does not.
    pub fn known_session(&self, rng: &mut Rng) -> Option<String> {
        let known: Vec<&String> = self.histories.keys().collect();
        if known.is_empty() || rng.chance(0.1) {
            return Some(format!("00000000-0000-4000-8000-{:012x}", 0xdead_0000 + rng.below(16)));
        }
        Some(known[rng.index(known.len())].clone())
    }

    /// Applies one durable record to the shadow, checking the history rules.
    fn apply_durable(&mut self, r: &Record) -> Result<(), Violation> {
        let sid = r.session_id.clone();
        if matches!(r.fact, Some(Fact::Started(_))) && self.may_be_deleted(&sid) {
            // Past retention an ended session is forgotten, its id with it
            // (remembering every id ever used would grow without bound): a
            // SessionStart with that id — a very late retry, or a reuse —
            // starts a new session. The old one's facts leave the model.
            self.ended.remove(&sid);
            self.histories.remove(&sid);
            self.resolutions.remove(&sid);
            self.committed.remove(&sid);
            self.resolved_broadcasts.remove(&sid);
            self.receipts.remove(&sid);
            self.acked.retain(|a| a.session_id != sid);
            self.reincarnated += 1;
        }
        if !sid.is_empty() && self.ended.contains_key(&sid) {
            return Err(violation(
                "nothing-accepted-after-terminal",
                format!("durable record seq {} of session {sid} follows its terminal record: {r:?}", r.seq),
            ));
        }
        let ended = match self.shadow.apply_record(r) {
            Ok(e) => e,
            Err(e) => {
                return Err(violation("replay-equals-live", format!("durable record {r:?} does not replay: {e}")))
            }
        };
        self.durable_records += 1;
        if !sid.is_empty() {
            self.histories.entry(sid.clone()).or_default().push(r.clone());
        }
        if let Some(summary) = ended {
            let resolved = summary.metadata.as_ref().is_some_and(|m| m.state == SessionState::Resolved as i32);
            if resolved {
                let n = self.resolutions.entry(sid.clone()).or_default();
                *n += 1;
                if *n > 1 {
                    return Err(violation("one-resolution", format!("session {sid} resolved a second time by {r:?}")));
                }
                let receipt = self.receipt_of(&sid, self.histories.get(&sid).map_or(&[][..], Vec::as_slice))?;
                match macp_receipt::verify(&receipt, &self.receipt_jwks) {
                    Ok(Verdict::Attested { .. }) => {}
                    other => {
                        return Err(violation(
                            "receipts",
                            format!("session {sid}'s receipt does not verify: {other:?}"),
                        ))
                    }
                }
                self.receipts.insert(sid.clone(), receipt);
                self.receipts_unchecked.insert(sid.clone());
            }
            self.ended.insert(sid, summary);
        }
        Ok(())
    }

    /// The receipt of resolved session `sid` issued from `history`.
    fn receipt_of(&self, sid: &str, history: &[Record]) -> Result<String, Violation> {
        macp_receipt::issue(history, &self.config.runtime_id, self.receipt_keys.signer())
            .map_err(|e| violation("receipts", format!("no receipt for resolved session {sid}: {e}")))
    }

    /// Each of `sids` that resolved and that storage still holds gets, from
    /// its stored history, exactly the receipt issued when it resolved.
    fn check_receipts<'a>(
        &self,
        sids: impl IntoIterator<Item = &'a String>,
        reader: &dyn StorageRead,
    ) -> Result<(), Violation> {
        for sid in sids {
            let Some(issued) = self.receipts.get(sid) else { continue };
            if self.may_be_deleted(sid) {
                continue;
            }
            let history = reader
                .history(sid, 0, u64::MAX)
                .map_err(|e| violation("receipts", format!("reading {sid}'s history: {e}")))?;
            if self.receipt_of(sid, &history)? != *issued {
                return Err(violation(
                    "receipts",
                    format!("session {sid}'s receipt issued from storage differs from the one issued when it resolved"),
                ));
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
                    "the live kernel differs from the replay of its {} durable records ({} vs {} open sessions)",
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

    /// A GetSession probe (as an observer) was answered after a commit: it
    /// must say what the durable history says.
    pub fn on_probe(&self, sid: &str, answer: &Answer, _now: i64, _reader: &dyn StorageRead) -> Result<(), Violation> {
        let Answer::Session(got) = answer else {
            return Err(violation("ended-sessions-answer-from-storage", format!("a GetSession probe got {answer:?}")));
        };
        let expected = match self.shadow.session(sid) {
            Some(s) => Some(s.metadata()),
            None => self.ended.get(sid).and_then(|e| e.metadata.clone()),
        };
        match (got, expected) {
            (Ok(m), Some(e)) if *m == e => Ok(()),
            (Err(e), None) if e.code == ErrorCode::SessionNotFound => Ok(()),
            (Err(e), Some(_)) if e.code == ErrorCode::SessionNotFound && self.may_be_deleted(sid) => Ok(()),
            (got, expected) => Err(violation(
                "ended-sessions-answer-from-storage",
                format!("GetSession {sid} answered {got:?}; the durable history says {expected:?}"),
            )),
        }
    }

    /// Storage upkeep ran at server time `now`.
    pub fn on_maintained(&mut self, now: i64) {
        self.maintained_at = Some(self.maintained_at.map_or(now, |t| t.max(now)));
    }

    /// A power cut: `unsynced` (appended, not synced) may or may not have
    /// reached the disk.
    pub fn on_crash(&mut self, unsynced: Vec<Record>) {
        self.maybe = unsynced;
    }

    /// Whether an acknowledged record is still found: in the kernel if its
    /// session is open, else in storage's summary of it.
    fn find_acked(&self, a: &Acked, kernel: &Kernel, reader: &dyn StorageRead) -> Result<bool, Violation> {
        if let Some(s) = kernel.session(&a.session_id) {
            return Ok(s.seq >= a.seq && a.message_id.as_ref().is_none_or(|m| s.seen.contains(m)));
        }
        let summary = reader
            .ended(&a.session_id)
            .map_err(|e| violation("no-acked-record-lost", format!("reading session {}: {e}", a.session_id)))?;
        Ok(match summary {
            Some(s) => {
                s.last_seq >= a.seq && a.message_id.as_ref().is_none_or(|m| s.message_ids.binary_search(m).is_ok())
            }
            None => self.may_be_deleted(&a.session_id),
        })
    }

    /// After a restart: the recovered kernel must be the durable history
    /// plus some prefix of what was unsynced, and every acknowledged message
    /// must be found. The surviving prefix becomes durable history.
    pub fn on_recover(&mut self, recovered: &Kernel, reader: &dyn StorageRead) -> Result<usize, Violation> {
        let target = recovered.snapshot();
        let deadline = recovered.next_deadline();
        let maybe = std::mem::take(&mut self.maybe);
        let mut candidate = Kernel::restore(self.config.clone(), &self.shadow.snapshot())
            .map_err(|e| violation("replay-equals-live", format!("the shadow's checkpoint does not restore: {e}")))?;
        // Which prefix of the unsynced records survived? The kernel's
        // snapshot holds open sessions only, so a prefix that starts and
        // ends a session looks like the one without it: among the prefixes
        // that match, take the longest whose last record storage holds.
        let stored = |r: &Record| -> Result<bool, Violation> {
            if r.session_id.is_empty() {
                return Ok(true);
            }
            let h = reader
                .history(&r.session_id, r.seq.saturating_sub(1), r.seq)
                .map_err(|e| violation("no-acked-record-lost", format!("reading {}: {e}", r.session_id)))?;
            Ok(h.first() == Some(r))
        };
        let mut found = None;
        for k in 0..=maybe.len() {
            if k > 0 && candidate.apply_record(&maybe[k - 1]).is_err() {
                break;
            }
            if candidate.snapshot() == target
                && candidate.next_deadline() == deadline
                && (k == 0 || stored(&maybe[k - 1])?)
            {
                found = Some(k);
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
        for a in &self.acked {
            if !self.find_acked(a, recovered, reader)? {
                return Err(violation(
                    "no-acked-record-lost",
                    format!(
                        "acknowledged record seq {} ({:?}) of session {} is missing after recovery",
                        a.seq, a.message_id, a.session_id
                    ),
                ));
            }
        }
        let unchecked = std::mem::take(&mut self.receipts_unchecked);
        self.check_receipts(&unchecked, reader)?;
        Ok(k)
    }

    /// The end-of-run checks on the final recovered pipeline: every ended
    /// session reads back exactly from storage (or was deleted after its
    /// retention), and every accepted Commitment is its session's
    /// resolution.
    pub fn finish(&self, kernel: &Kernel, reader: &dyn StorageRead, _now: i64) -> Result<(), Violation> {
        let bad = |d: String| violation("ended-sessions-answer-from-storage", d);
        for (sid, expected) in &self.ended {
            let got = reader.ended(sid).map_err(|e| bad(format!("reading session {sid}: {e}")))?;
            let history = reader.history(sid, 0, u64::MAX).map_err(|e| bad(format!("reading {sid}'s history: {e}")))?;
            match got {
                Some(s) if s == *expected => {
                    if Some(&history) != self.histories.get(sid) {
                        return Err(bad(format!(
                            "session {sid}'s stored history ({} records) differs from its durable history ({} records)",
                            history.len(),
                            self.histories.get(sid).map_or(0, Vec::len)
                        )));
                    }
                    self.check_what_if(sid, &history, &s, kernel)?;
                }
                Some(s) => return Err(bad(format!("session {sid} reads back as {s:?}, expected {expected:?}"))),
                None if self.may_be_deleted(sid) => {
                    if !history.is_empty() {
                        return Err(bad(format!(
                            "session {sid} was deleted but {} of its records remain",
                            history.len()
                        )));
                    }
                }
                None => return Err(bad(format!("ended session {sid} is gone before its retention passed"))),
            }
            if kernel.session(sid).is_some() {
                return Err(bad(format!("ended session {sid} is still held by the kernel")));
            }
        }
        for (sid, payload) in &self.committed {
            let resolved = self
                .ended
                .get(sid)
                .is_some_and(|s| s.metadata.as_ref().is_some_and(|m| m.state == SessionState::Resolved as i32));
            let commitment = self.histories.get(sid).and_then(|h| h.last()).and_then(|r| match &r.fact {
                Some(Fact::Accepted(e)) if e.message_type == "Commitment" => Some(e.payload.clone()),
                _ => None,
            });
            if !resolved || commitment.as_deref() != Some(payload.as_slice()) {
                return Err(violation(
                    "one-resolution",
                    format!("session {sid} had a Commitment accepted but did not resolve with it"),
                ));
            }
        }
        for (sid, summary) in &self.ended {
            let resolved = summary.metadata.as_ref().is_some_and(|m| m.state == SessionState::Resolved as i32);
            let n = self.resolutions.get(sid).copied().unwrap_or(0);
            if resolved != (n == 1) {
                return Err(violation("one-resolution", format!("session {sid} ended after {n} resolutions")));
            }
        }
        self.check_receipts(self.receipts.keys(), reader)?;
        let ended: BTreeSet<&String> = self.ended.keys().collect();
        for m in kernel.all_sessions() {
            if ended.contains(&m.session_id) {
                return Err(bad(format!("session {} is both open and ended", m.session_id)));
            }
        }
        Ok(())
    }

    /// WhatIfReplay of an ended session's stored history under the policy
    /// it was recorded under (`macp_kernel::what_if`) must agree with the
    /// recording: every entry applied, no divergence, no denial, and the
    /// final state and resolution storage keeps for the session.
    fn check_what_if(
        &self,
        sid: &str,
        history: &[Record],
        summary: &SessionSummary,
        kernel: &Kernel,
    ) -> Result<(), Violation> {
        let bad = |d: String| violation("what-if-replay-agrees", format!("session {sid}: {d}"));
        let recorded = match history.first().map(|r| &r.fact) {
            Some(Some(Fact::Started(st))) => st.policy.clone().unwrap_or_else(macp_kernel::policy::default_policy),
            _ => return Err(bad("the stored history does not start with a SessionStart".into())),
        };
        let last = history.last().map_or(0, |r| r.seq);
        let r = macp_kernel::what_if::replay(history, last, &recorded, kernel.modes(), &self.config.runtime_id)
            .map_err(|e| bad(format!("replay under the recorded policy failed: {e}")))?;
        let applied = macp_kernel::macp_wire::v1::what_if_entry_outcome::Kind::Applied as i32;
        if let Some(e) = r.entries.iter().find(|e| e.recorded.as_ref().is_none_or(|o| o.kind != applied)) {
            return Err(bad(format!("entry {} was not applied on replay: {e:?}", e.history_index)));
        }
        if r.first_divergence.is_some() || !r.denials.is_empty() || r.recorded != r.candidate {
            return Err(bad(format!("diverged at {:?} with {} denial(s)", r.first_divergence, r.denials.len())));
        }
        let outcome = r.recorded.unwrap_or_default();
        let state = summary.metadata.as_ref().map_or(0, |m| m.state);
        if outcome.state != state {
            return Err(bad(format!("replay ends in state {}, storage says {state}", outcome.state)));
        }
        if let Some(payload) = self.committed.get(sid) {
            if outcome.resolution != *payload {
                return Err(bad("replay resolves with another Commitment than the accepted one".into()));
            }
        }
        Ok(())
    }

    /// Every session's mode and final state: open ones from the kernel,
    /// ended ones from the durable history.
    pub fn final_states(&self, kernel: &Kernel, _reader: &dyn StorageRead) -> Vec<(String, SessionState)> {
        let mut out: Vec<(String, SessionState)> = kernel
            .all_sessions()
            .map(|m| (m.mode, SessionState::try_from(m.state).unwrap_or(SessionState::Unspecified)))
            .collect();
        out.extend(
            self.ended
                .values()
                .filter_map(|s| s.metadata.as_ref())
                .map(|m| (m.mode.clone(), SessionState::try_from(m.state).unwrap_or(SessionState::Unspecified))),
        );
        out
    }
}
