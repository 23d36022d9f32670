//! Recovery: rebuilding the kernel from any [`Storage`].
//!
//! The checkpoint (open state) is restored with [`Kernel::restore`], then
//! every record after it goes through [`Kernel::apply_record`] — the same
//! code that accepted it — so a record that does not apply again is
//! corruption, not something to trust. Sessions that end during the replay
//! are handed back to storage with their summaries (storing one twice is
//! harmless). Ended sessions need no replay at all: they are read from
//! storage when asked for, which is why restart time follows open sessions
//! and the log tail, not history.
//!
//! A session whose record does not apply, or whose damaged record could be
//! attributed to it, is quarantined with [`Kernel::quarantine_session`] and
//! listed in the report; every other session recovers. Nothing here ever
//! falls back to an empty state: a checkpoint that does not restore is an
//! error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use macp_kernel::text::Count;
use macp_kernel::{Kernel, KernelConfig, SnapshotError};
use macp_storage::{Damage, LoadEvent, LogPos, Storage, StorageError, TornTail};

use crate::pipeline::{CheckpointPolicy, Pipeline};

/// A record that failed to apply during replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Where it is.
    pub pos: LogPos,
    /// Its session (empty for registry records).
    pub session_id: String,
    /// Its sequence number.
    pub seq: u64,
    /// The kernel's reason.
    pub reason: String,
}

/// What recovery did and found: log it, and alert on anything unclean.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Whether a checkpoint was restored.
    pub checkpoint: bool,
    /// Records replayed through the kernel.
    pub replayed: u64,
    /// Sessions that ended during the replay (handed back to storage).
    pub ended: u64,
    /// Open and suspended sessions after recovery.
    pub open_sessions: usize,
    /// A crash-torn tail that was truncated (never acknowledged: not damage).
    pub torn_tail: Option<TornTail>,
    /// Damaged places, with segment and offset.
    pub damage: Vec<Damage>,
    /// Records that did not apply (their sessions are quarantined; a
    /// registry record is reported only).
    pub rejected: Vec<Rejected>,
    /// Sessions taken out of service, with the reason.
    pub quarantined: BTreeMap<String, String>,
    /// Where the log ends; the next append goes there.
    pub end: LogPos,
}

impl RecoveryReport {
    /// No damage, no rejected record, no quarantine (a torn tail is normal
    /// after a crash and does not count).
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && self.rejected.is_empty() && self.quarantined.is_empty()
    }
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} replayed, {} open, {} ended during replay, log ends at {}",
            if self.checkpoint { "checkpoint restored" } else { "no checkpoint" },
            Count::of(self.replayed, "record"),
            Count::of(self.open_sessions, "session"),
            Count::of(self.ended, "session"),
            self.end
        )?;
        if let Some(t) = &self.torn_tail {
            write!(
                f,
                "; torn tail truncated at segment {} offset {} ({} bytes)",
                t.segment, t.offset, t.dropped_bytes
            )?;
        }
        for d in &self.damage {
            write!(f, "; DAMAGE {d}")?;
        }
        for r in &self.rejected {
            write!(f, "; REJECTED record {}#{} at {}: {}", r.session_id, r.seq, r.pos, r.reason)?;
        }
        for (s, why) in &self.quarantined {
            write!(f, "; QUARANTINED session {s}: {why}")?;
        }
        Ok(())
    }
}

/// Why recovery could not rebuild the state: the runtime must not start.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Storage could not be read (or loading was cancelled).
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The checkpoint does not restore.
    #[error("checkpoint: {0}")]
    Snapshot(#[from] SnapshotError),
}

/// How to recover.
pub struct RecoverOptions<'a> {
    /// Checkpoint policy of the pipeline built.
    pub policy: CheckpointPolicy,
    /// Polled while loading: when it turns true, recovery stops with
    /// [`StorageError::Cancelled`] (a shutdown signal during a long
    /// recovery).
    pub cancelled: &'a dyn Fn() -> bool,
}

impl Default for RecoverOptions<'_> {
    fn default() -> Self {
        RecoverOptions { policy: CheckpointPolicy::default(), cancelled: &|| false }
    }
}

/// How many sessions may end during replay before the kernel's ended cache
/// is trimmed back to its configured size.
const SETTLE_EVERY: u64 = 256;

struct Replay {
    config: KernelConfig,
    kernel: Option<Kernel>,
    ended: Vec<macp_storage::SessionSummary>,
    dead: BTreeSet<String>,
    hints: Vec<String>,
    report: RecoveryReport,
    /// Set when the checkpoint did not restore (loading stops there).
    snapshot_error: Option<SnapshotError>,
}

impl Replay {
    fn kernel(&mut self) -> &mut Kernel {
        let config = &self.config;
        self.kernel.get_or_insert_with(|| Kernel::new(config.clone()))
    }

    fn quarantine(&mut self, sid: &str, why: String) {
        if self.dead.insert(sid.to_string()) {
            self.kernel().quarantine_session(sid);
            self.report.quarantined.insert(sid.to_string(), why);
        }
    }

    fn event(&mut self, ev: LoadEvent<'_>) -> Result<(), StorageError> {
        match ev {
            LoadEvent::Checkpoint { open_state } => match Kernel::restore(self.config.clone(), open_state) {
                Ok(k) => {
                    self.kernel = Some(k);
                    self.report.checkpoint = true;
                }
                Err(e) => {
                    self.snapshot_error = Some(e);
                    return Err(StorageError::Misuse("the checkpoint does not restore"));
                }
            },
            LoadEvent::Record { pos, record } => {
                self.report.replayed += 1;
                let sid = record.session_id.as_str();
                if !sid.is_empty() && self.dead.contains(sid) {
                    return Ok(());
                }
                match self.kernel().apply_record(&record) {
                    Ok(Some(summary)) => {
                        self.report.ended += 1;
                        self.ended.push(summary);
                        // The summaries are kept here until storage has
                        // them; the kernel need not keep the whole ended
                        // sessions too, so its cache stays bounded however
                        // long the replayed tail is.
                        if self.report.ended % SETTLE_EVERY == 0 {
                            self.kernel().settle_ended();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.report.rejected.push(Rejected {
                            pos,
                            session_id: record.session_id.clone(),
                            seq: record.seq,
                            reason: e.to_string(),
                        });
                        if !record.session_id.is_empty() {
                            let sid = record.session_id.clone();
                            self.quarantine(&sid, format!("record seq {} at {pos} does not apply: {e}", record.seq));
                        }
                    }
                }
            }
            LoadEvent::Damage(d) => {
                if let Some(s) = &d.session_hint {
                    self.hints.push(s.clone());
                }
                self.report.damage.push(d);
            }
        }
        Ok(())
    }
}

/// Loads `storage` and rebuilds the pipeline from it (see the module docs).
///
/// Errors mean the runtime must not start: storage is unusable, the
/// checkpoint cannot be restored, or recovery was cancelled. Damage that can
/// be isolated is not an error; it is in the report with the quarantined
/// sessions.
pub fn recover<T, Q>(
    config: KernelConfig,
    storage: &mut dyn Storage,
    options: RecoverOptions<'_>,
) -> Result<(Pipeline<T, Q>, RecoveryReport), RecoveryError> {
    let mut replay = Replay {
        config,
        kernel: None,
        ended: Vec::new(),
        dead: BTreeSet::new(),
        hints: Vec::new(),
        report: RecoveryReport::default(),
        snapshot_error: None,
    };
    let loaded = storage.load(options.cancelled, &mut |ev| replay.event(ev));
    if let Some(e) = replay.snapshot_error.take() {
        return Err(RecoveryError::Snapshot(e));
    }
    let summary = loaded?;
    replay.report.torn_tail = summary.torn_tail;
    replay.report.end = summary.end;
    for sid in std::mem::take(&mut replay.hints) {
        if replay.kernel().session(&sid).is_some() {
            replay.quarantine(&sid, "a damaged record of this session was found".to_string());
        }
    }
    let mut kernel = replay.kernel.take().unwrap_or_else(|| Kernel::new(replay.config.clone()));
    // Sessions that ended in the replayed tail: storage may have lost their
    // summaries with the crash, so hand them back (durably) before serving.
    if !replay.ended.is_empty() {
        storage.append(&[], &replay.ended)?;
        storage.sync()?;
    }
    kernel.settle_ended();
    replay.report.open_sessions = kernel.session_count();
    let replayed = replay.report.replayed;
    let reader = storage.reader();
    let pipeline = Pipeline::recovered(kernel, reader, options.policy, replayed);
    Ok((pipeline, replay.report))
}
