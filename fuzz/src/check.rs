//! The invariant checker the kernel targets run every input through.
//!
//! A crash is only one kind of bug a fuzzer can find; the ones that matter
//! more for a coordination runtime are silent: an acknowledged message that
//! was never persisted, a record that does not replay, a session that accepts
//! a message after it resolved. [`Checked`] wraps a [`Kernel`] and panics (a
//! libFuzzer crash) the moment any of these happens:
//!
//! * effect order: every `Persist` comes before the `Reply`, broadcasts last;
//!   exactly one reply per request, none for a tick;
//! * an accepted (non-duplicate) session envelope is persisted in the same
//!   call, a rejected or duplicate one is not;
//! * an input that persisted nothing (a rejection, a duplicate, a signal,
//!   an idle tick) left the kernel byte-for-byte unchanged;
//! * no record is ever persisted for a session already in a terminal state,
//!   and a terminal session never changes state again, nor comes back into
//!   the working set (ended sessions are looked up in an [`EndedStore`], as
//!   the server looks them up in storage, so a restart that empties the
//!   kernel's ended-session cache forgets nothing);
//! * a resolved session has exactly one resolution, which never changes;
//! * every record survives its protobuf encoding unchanged;
//! * at the end, replaying every persisted record onto the starting state
//!   rebuilds the live kernel exactly (snapshot bytes and timers), and so does
//!   restoring the live kernel's own checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use macp_kernel::macp_wire::storage::{record::Fact, Record, SessionSummary};
use macp_kernel::macp_wire::v1::SessionState;
use macp_kernel::{record, Effect, EndedSessions, Input, KResult, Kernel, Reply};

use crate::base;

/// What storage holds of ended sessions: the summary of every [`Effect::Ended`]
/// the checked kernel emitted (retention forever). The kernel consults it
/// the way the server's kernel consults storage, for sessions its cache no
/// longer holds — after a restart from a checkpoint, none.
#[derive(Default)]
pub struct EndedStore(BTreeMap<String, SessionSummary>);

impl EndedStore {
    fn state(&self, sid: &str) -> Option<SessionState> {
        let m = self.0.get(sid)?.metadata.as_ref()?;
        SessionState::try_from(m.state).ok()
    }
}

impl EndedSessions for EndedStore {
    fn get(&self, session_id: &str) -> KResult<Option<SessionSummary>> {
        Ok(self.0.get(session_id).cloned())
    }

    fn list(&self, after: Option<&str>, limit: usize) -> KResult<Vec<SessionSummary>> {
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_string()),
            None => std::ops::Bound::Unbounded,
        };
        Ok(self.0.range((from, std::ops::Bound::Unbounded)).take(limit).map(|(_, s)| s.clone()).collect())
    }
}

/// A kernel under invariant checks, with its own clock.
pub struct Checked {
    kernel: Kernel,
    ended_store: EndedStore,
    start: Vec<u8>,
    records: Vec<Record>,
    terminal: BTreeMap<String, SessionState>,
    resolutions: BTreeMap<String, Vec<u8>>,
    /// The kernel's current snapshot when known (saves re-encoding the
    /// whole kernel before every input, which dominated the run time).
    current: Option<Vec<u8>>,
    /// The kernel clock passed to the next input. Targets move it freely,
    /// backwards too: the server reads the wall clock, which can step back.
    pub now: i64,
}

impl Checked {
    /// A checker starting from the [`base`] kernel and clock.
    pub fn from_base() -> Self {
        let b = base::base();
        Self::new(base::kernel(), b.snapshot.clone(), b.now_ms)
    }

    /// A checker around `kernel`, whose snapshot is `start`, at `now`.
    pub fn new(kernel: Kernel, start: Vec<u8>, now: i64) -> Self {
        Checked {
            kernel,
            ended_store: EndedStore::default(),
            current: Some(start.clone()),
            start,
            records: Vec::new(),
            terminal: BTreeMap::new(),
            resolutions: BTreeMap::new(),
            now,
        }
    }

    /// The kernel, for read-only queries.
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Every record persisted so far.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Runs one input and checks every per-input invariant.
    pub fn handle(&mut self, input: Input) -> Vec<Effect> {
        let (request, sent) = match &input {
            Input::Envelope { request, envelope, .. } => (Some(*request), Some(envelope.clone())),
            Input::Control { request, .. }
            | Input::RegisterPolicy { request, .. }
            | Input::UnregisterPolicy { request, .. }
            | Input::RegisterExtMode { request, .. }
            | Input::UnregisterExtMode { request, .. }
            | Input::PromoteMode { request, .. } => (Some(*request), None),
            Input::Tick => (None, None),
        };
        let before = self.current.take().unwrap_or_else(|| self.kernel.snapshot());
        let mut effects = Vec::new();
        self.kernel.handle_with(self.now, input, &self.ended_store, &mut effects);

        // Order: Persist* Reply? Broadcast*.
        let mut phase = 0;
        let mut replies = Vec::new();
        let mut persisted = Vec::new();
        let mut ended = Vec::new();
        for e in &effects {
            match e {
                Effect::Persist(r) => {
                    assert_eq!(phase, 0, "a Persist after a Reply or Broadcast: {effects:#?}");
                    persisted.push(r.clone());
                }
                Effect::Reply { request: r, reply } => {
                    assert!(phase == 0, "a second Reply or a Reply after a Broadcast: {effects:#?}");
                    phase = 1;
                    replies.push((*r, reply.clone()));
                }
                Effect::Ended(summary) => {
                    assert_eq!(phase, 0, "an Ended after a Reply or Broadcast: {effects:#?}");
                    let sid = summary.metadata.as_ref().map_or("", |m| m.session_id.as_str());
                    assert!(
                        persisted.iter().any(|r| r.session_id == sid),
                        "Ended for {sid} without a record of that session before it: {effects:#?}"
                    );
                    ended.push(sid.to_string());
                    self.ended_store.0.insert(sid.to_string(), (**summary).clone());
                }
                Effect::Broadcast(_) => phase = 2,
            }
        }
        match request {
            Some(req) => {
                assert_eq!(replies.len(), 1, "a request must get exactly one reply: {effects:#?}");
                assert_eq!(replies[0].0, req, "the reply must echo the request id");
            }
            None => assert!(replies.is_empty(), "a tick must not reply: {effects:#?}"),
        }

        for r in &persisted {
            let bytes = record::encode(r);
            let back = record::decode(&bytes).expect("a persisted record decodes");
            assert_eq!(&back, r, "a record changed through its encoding");
            if !r.session_id.is_empty() {
                if let Some(state) = self.terminal.get(&r.session_id) {
                    panic!("record {r:?} persisted for session {} already {state:?}", r.session_id);
                }
            }
        }

        if let Some((_, reply)) = replies.first() {
            let ok = reply.error().is_none();
            if let (Some(env), Reply::Session { result, .. }) = (&sent, reply) {
                let carries = persisted.iter().any(|r| {
                    r.session_id == env.session_id
                        && match &r.fact {
                            Some(Fact::Started(s)) => {
                                s.envelope.as_ref().is_some_and(|e| e.message_id == env.message_id)
                            }
                            Some(Fact::Accepted(e)) => e.message_id == env.message_id,
                            _ => false,
                        }
                });
                let ambient = matches!(env.message_type.as_str(), "Signal" | "Progress");
                if matches!(result, Ok(a) if !a.duplicate) && !ambient {
                    assert!(
                        carries,
                        "accepted {} {} was not persisted: {effects:#?}",
                        env.message_type, env.message_id
                    );
                } else {
                    assert!(!carries, "rejected or duplicate envelope was persisted: {result:?} {effects:#?}");
                }
            }
            if ok && persisted.is_empty() {
                if let Reply::Session { result: Ok(a), .. } = reply {
                    let ambient =
                        sent.as_ref().is_some_and(|e| matches!(e.message_type.as_str(), "Signal" | "Progress"));
                    assert!(
                        a.duplicate || ambient || sent.is_none(),
                        "an envelope accepted as new persisted nothing: {a:?}"
                    );
                }
            }
        }

        // Records are the only way state changes (that is what makes replay
        // work): an input that persisted nothing — a rejection, a duplicate,
        // a signal, an idle tick — must leave the kernel byte-for-byte as it
        // was.
        if persisted.is_empty() {
            let after = self.kernel.snapshot();
            assert!(after == before, "an input that persisted nothing changed the kernel: {effects:#?}");
            self.current = Some(after);
        }

        let touched: BTreeSet<&str> =
            persisted.iter().map(|r| r.session_id.as_str()).filter(|s| !s.is_empty()).collect();
        for sid in touched {
            let Some(state) = self.kernel.session_state(sid) else {
                panic!("session {sid} got a record but does not exist");
            };
            let terminal = !matches!(state, SessionState::Open | SessionState::Suspended);
            // A session leaves the working set exactly when it ends, and
            // says so with one Ended effect.
            assert_eq!(
                self.kernel.session(sid).is_none(),
                terminal,
                "session {sid} is {state:?} but the kernel holds it: {}",
                self.kernel.session(sid).is_some()
            );
            assert_eq!(
                ended.iter().any(|e| e == sid),
                terminal,
                "session {sid} became {state:?}; Ended effects: {ended:?}"
            );
            let resolution = self.kernel.resolution(sid);
            assert_eq!(
                resolution.is_some(),
                state == SessionState::Resolved,
                "session {sid} is {state:?} with resolution {resolution:?}"
            );
            if let Some(r) = resolution {
                match self.resolutions.get(sid) {
                    Some(prev) => assert_eq!(prev.as_slice(), r, "session {sid} changed its resolution"),
                    None => {
                        self.resolutions.insert(sid.to_string(), r.to_vec());
                    }
                }
            }
            if terminal {
                self.terminal.insert(sid.to_string(), state);
            }
        }
        self.records.extend(persisted);
        effects
    }

    /// Replaces the kernel by one restored from its own checkpoint, as a
    /// restart from a checkpoint would, after checking they are identical.
    pub fn restart_from_checkpoint(&mut self) {
        let snap = self.kernel.snapshot();
        let restored = Kernel::restore(base::config(), &snap).expect("a live checkpoint restores");
        assert!(restored.snapshot() == snap, "a restored checkpoint differs from the live kernel");
        assert_eq!(restored.next_deadline(), self.kernel.next_deadline(), "a restored checkpoint has other timers");
        self.kernel = restored;
        self.current = Some(snap);
    }

    /// The end-of-run checks: terminal states unchanged, replay of every
    /// record rebuilds the live kernel, and so does its checkpoint.
    pub fn finish(self) {
        for (sid, state) in &self.terminal {
            assert!(self.kernel.session(sid).is_none(), "terminal session {sid} is back in the working set");
            let now = self.kernel.session_state(sid).or_else(|| self.ended_store.state(sid));
            assert_eq!(now, Some(*state), "terminal session {sid} changed state");
        }
        if self.records.is_empty() && self.current.as_ref() == Some(&self.start) {
            // Nothing was persisted and the kernel is known to be unchanged:
            // replay would be the identity.
            return;
        }
        let mut replay = Kernel::restore(base::config(), &self.start).expect("the start snapshot restores");
        for r in &self.records {
            if let Err(e) = replay.apply_record(r) {
                panic!("record {r:?} does not replay: {e}");
            }
        }
        let live = self.kernel.snapshot();
        assert!(replay.snapshot() == live, "the replayed kernel differs from the live one");
        assert_eq!(replay.next_deadline(), self.kernel.next_deadline(), "the replayed kernel has other timers");
        let restored = Kernel::restore(base::config(), &live).expect("a live checkpoint restores");
        assert!(restored.snapshot() == live, "a restored checkpoint differs from the live kernel");
    }
}
