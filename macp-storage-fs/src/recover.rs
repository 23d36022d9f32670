//! Recovery: rebuilding the kernel from any [`Storage`].
//!
//! The checkpoint is restored with [`Kernel::restore`], then every record
//! after it goes through [`Kernel::apply_record`] — the same code that
//! accepted it — so a record that does not apply again is corruption, not
//! something to trust. Records the checkpoint covers are not decoded; only
//! their `(session, seq)` is checked so that every session's readable
//! history is gapless and reaches the kernel's sequence number.
//!
//! A session whose history has a gap, whose record does not apply, or whose
//! damaged frame could be attributed to it, is quarantined with
//! [`Kernel::quarantine_session`] and listed in the report. The rest
//! recover. Nothing here ever falls back to an empty state: a checkpoint
//! that does not restore is an error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use macp_kernel::{Kernel, KernelConfig};

use crate::error::StorageError;
use crate::storage::{Damage, LoadEvent, LogPos, Storage, TornTail};

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
    /// The checkpoint restored, if any.
    pub checkpoint: Option<LogPos>,
    /// Records the checkpoint covered (identity-checked only).
    pub covered: u64,
    /// Records replayed through the kernel.
    pub replayed: u64,
    /// A crash-torn tail that was truncated (never acknowledged: not damage).
    pub torn_tail: Option<TornTail>,
    /// Damaged places, with segment and offset.
    pub damage: Vec<Damage>,
    /// Records that did not apply (their sessions are quarantined; a
    /// registry record is reported only).
    pub rejected: Vec<Rejected>,
    /// Sessions taken out of service, with the reason.
    pub quarantined: BTreeMap<String, String>,
    /// Where the log ends; the next append goes here.
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
        match self.checkpoint {
            Some(p) => write!(f, "checkpoint at {p}, ")?,
            None => write!(f, "no checkpoint, ")?,
        }
        write!(f, "{} covered + {} replayed records, log ends at {}", self.covered, self.replayed, self.end)?;
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

/// A rebuilt kernel and how it was rebuilt.
#[derive(Debug)]
pub struct Recovered {
    /// The kernel, equal to what the durable log describes.
    pub kernel: Kernel,
    /// What recovery found.
    pub report: RecoveryReport,
}

struct Replay {
    config: KernelConfig,
    kernel: Option<Kernel>,
    /// Session → last sequence number seen in its stored history.
    history: HashMap<String, u64>,
    /// Sessions already quarantined (their later records are skipped).
    dead: HashSet<String>,
    hints: Vec<String>,
    report: RecoveryReport,
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

    /// Checks that `seq` continues the session's stored history.
    fn track(&mut self, pos: LogPos, sid: &str, seq: u64) -> bool {
        let last = match self.history.get_mut(sid) {
            Some(last) if *last + 1 == seq => {
                *last = seq;
                return true;
            }
            Some(last) => *last,
            None if seq == 1 => {
                self.history.insert(sid.to_string(), 1);
                return true;
            }
            None => 0,
        };
        self.quarantine(sid, format!("stored history jumps from seq {last} to {seq} at {pos}"));
        false
    }

    fn event(&mut self, ev: LoadEvent<'_>) -> Result<(), StorageError> {
        match ev {
            LoadEvent::Checkpoint { pos, snapshot } => {
                self.kernel = Some(Kernel::restore(self.config.clone(), snapshot)?);
                self.report.checkpoint = Some(pos);
            }
            LoadEvent::Covered { pos, session_id, seq } => {
                self.report.covered += 1;
                if !session_id.is_empty() && !self.dead.contains(session_id) {
                    self.track(pos, session_id, seq);
                }
            }
            LoadEvent::Record { pos, record } => {
                self.report.replayed += 1;
                let sid = record.session_id.as_str();
                if !sid.is_empty() && (self.dead.contains(sid) || !self.track(pos, sid, record.seq)) {
                    return Ok(());
                }
                if let Err(e) = self.kernel().apply_record(&record) {
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
            LoadEvent::Damage(d) => {
                if let Some(s) = &d.session_hint {
                    self.hints.push(s.clone());
                }
                self.report.damage.push(d);
            }
        }
        Ok(())
    }

    /// After the log: sessions whose history stops short of (or lacks) the
    /// kernel's state, and sessions named by damaged frames.
    fn finish(mut self) -> Recovered {
        self.kernel();
        for sid in std::mem::take(&mut self.hints) {
            let known = self.history.contains_key(&sid) || self.kernel().session(&sid).is_some();
            if known {
                self.quarantine(&sid, "a damaged record of this session was found".to_string());
            }
        }
        let mut short = Vec::new();
        let mut matched = 0usize;
        if let Some(k) = &self.kernel {
            for (sid, &last) in &self.history {
                if let Some(s) = k.session(sid) {
                    matched += 1;
                    if s.seq != last {
                        short.push((sid.clone(), format!("stored history ends at seq {last}, state is at {}", s.seq)));
                    }
                }
            }
            if matched < k.session_count() {
                for m in k.all_sessions() {
                    if !self.history.contains_key(&m.session_id) {
                        short.push((m.session_id, "state exists but no stored history does".to_string()));
                    }
                }
            }
        }
        for (sid, why) in short {
            self.quarantine(&sid, why);
        }
        let kernel = self.kernel.unwrap_or_else(|| Kernel::new(self.config.clone()));
        Recovered { kernel, report: self.report }
    }
}

/// Loads `storage` and rebuilds the kernel from it (see the module docs).
///
/// Errors mean the runtime must not start: the directory is unusable, or the
/// checkpoint cannot be restored. Damage that can be isolated is not an
/// error; it is in [`Recovered::report`] with the quarantined sessions.
pub fn recover<S: Storage + ?Sized>(storage: &mut S, config: KernelConfig) -> Result<Recovered, StorageError> {
    let mut replay = Replay {
        config,
        kernel: None,
        history: HashMap::new(),
        dead: HashSet::new(),
        hints: Vec::new(),
        report: RecoveryReport::default(),
    };
    let summary = storage.load(&mut |ev| replay.event(ev))?;
    replay.report.torn_tail = summary.torn_tail;
    replay.report.end = summary.end;
    Ok(replay.finish())
}
