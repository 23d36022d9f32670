//! The deciding half of the kernel: admission.
//!
//! Each input is checked against the configuration, the caller's grants and
//! the current [`State`], and everything it makes happen is built as storage
//! [`Record`]s. A record takes effect only through [`Tx::commit`], which
//! applies it with [`State::apply`] (the evolving half, shared with
//! recovery) and, if it applies, emits it for persistence. Checks that
//! depend on things outside the record (grants, duplicates, quotas, the
//! clock's skew) run here, before the record is built, and are never
//! replayed; checks that depend only on the record and the state run inside
//! `apply`, live and in recovery alike.
//!
//! Imports run one way: admission reads and commits to the state; the state
//! knows nothing of admission.

mod control;
mod envelope;
mod registry;
mod timers;

use macp_wire::storage::{Record, SessionSummary};
use macp_wire::v1::SessionState;

pub(crate) use self::envelope::{admit_ambient, is_ambient};
use crate::config::KernelConfig;
use crate::error::KResult;
use crate::io::{Broadcast, Effect, Input, Reply, RequestId};
use crate::state::ended::EndedSessions;
use crate::state::{Prepared, State};

/// One input's view of the state: it may read everything and change
/// anything only by committing a record. Effects leave in driver order:
/// every `Persist` as it is committed, then the reply, then the broadcasts.
pub(crate) struct Tx<'a> {
    state: &'a mut State,
    storage: &'a dyn EndedSessions,
    out: &'a mut Vec<Effect>,
    broadcasts: Vec<Broadcast>,
}

impl<'a> Tx<'a> {
    fn new(state: &'a mut State, storage: &'a dyn EndedSessions, out: &'a mut Vec<Effect>) -> Self {
        let broadcasts = state.take_broadcast_buffer();
        Tx { state, storage, out, broadcasts }
    }

    /// The state as it is now (after everything committed so far).
    pub fn state(&self) -> &State {
        self.state
    }

    /// Applies a freshly built record and, if it applies, emits it for
    /// persistence. The record is persisted only when it applied, so a
    /// rejected message leaves neither state nor log behind. Returns the
    /// session's state afterwards (`Open` for registry records).
    pub fn commit(&mut self, record: Record) -> KResult<SessionState> {
        self.commit_with(record, None)
    }

    /// [`Tx::commit`] for a SessionStart whose payload and policy admission
    /// already worked out.
    pub fn commit_with(&mut self, record: Record, prepared: Option<Prepared>) -> KResult<SessionState> {
        let applied = self.state.apply_with(&record, Some(&mut self.broadcasts), prepared)?;
        self.out.push(Effect::Persist(record));
        if let Some(summary) = applied.ended {
            self.out.push(Effect::Ended(Box::new(summary)));
        }
        Ok(applied.state)
    }

    /// The summary of an ended session the working set no longer holds,
    /// from the cache or from storage.
    pub fn ended(&mut self, session_id: &str) -> KResult<Option<&SessionSummary>> {
        self.state.ended_summary(session_id, self.storage)
    }

    /// See [`State::mode_timer_fired`].
    pub fn mode_timer_fired(&mut self, session_id: &str, now: i64) {
        self.state.mode_timer_fired(session_id, now);
    }

    /// Queues a broadcast that is not the result of a record (a Signal).
    pub fn broadcast(&mut self, b: Broadcast) {
        self.broadcasts.push(b);
    }

    /// Answers the request, then releases the broadcasts.
    fn finish(self, reply: Option<(RequestId, Reply)>) {
        if let Some((request, reply)) = reply {
            self.out.push(Effect::Reply { request, reply });
        }
        let mut broadcasts = self.broadcasts;
        self.out.extend(broadcasts.drain(..).map(Effect::Broadcast));
        self.state.return_broadcast_buffer(broadcasts);
    }
}

/// Processes one input (see [`crate::Kernel::handle`]).
pub(crate) fn handle(
    config: &KernelConfig,
    state: &mut State,
    storage: &dyn EndedSessions,
    now: i64,
    input: Input,
    out: &mut Vec<Effect>,
) {
    let mut tx = Tx::new(state, storage, out);
    let reply = match input {
        Input::Envelope { request, identity, envelope } => {
            let result = envelope::admit(config, &mut tx, now, &identity, envelope);
            Some((request, Reply::Session { at_unix_ms: now, result }))
        }
        Input::Control { request, identity, op, session_id, reason } => {
            let result = control::admit(config, &mut tx, now, &identity, op, &session_id, reason);
            Some((request, Reply::Session { at_unix_ms: now, result }))
        }
        Input::RegisterPolicy { request, identity, descriptor } => {
            Some((request, Reply::Registry(registry::register_policy(&mut tx, now, &identity, descriptor))))
        }
        Input::UnregisterPolicy { request, identity, policy_id } => {
            Some((request, Reply::Registry(registry::unregister_policy(&mut tx, now, &identity, policy_id))))
        }
        Input::RegisterExtMode { request, identity, descriptor } => {
            Some((request, Reply::Registry(registry::register_mode(&mut tx, now, &identity, descriptor))))
        }
        Input::UnregisterExtMode { request, identity, mode } => {
            Some((request, Reply::Registry(registry::unregister_mode(&mut tx, now, &identity, mode))))
        }
        Input::PromoteMode { request, identity, mode, promoted_mode_name } => {
            Some((request, Reply::Registry(registry::promote_mode(&mut tx, now, &identity, mode, promoted_mode_name))))
        }
        Input::Tick => {
            timers::tick(config, &mut tx, now);
            None
        }
    };
    tx.finish(reply);
}
