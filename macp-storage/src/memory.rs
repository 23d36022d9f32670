//! The in-memory backend: what `MACP_MEMORY_ONLY=1` runs on, and what tests
//! and the simulator use when files do not matter.
//!
//! It honours the whole contract — durability at `sync`, checkpoints, the
//! log after the checkpoint, ended sessions readable by id — so a driver
//! written against [`Storage`] behaves the same on it as on disk; only the
//! process lifetime bounds durability. [`MemoryStorage::crash`] drops what
//! was never synced and requires a new `load`, which lets tests and the
//! simulator restart on it.
//!
//! Memory is bounded: an ended session's history has no other home here, so
//! it is kept until retention passes or until the ended sessions together
//! exceed [`MemoryConfig::history_limit_bytes`]; then the oldest ended
//! sessions go first (counted in [`Maintenance::evicted_sessions`]). Open
//! sessions are never evicted. A session becomes deletable only once a
//! checkpoint was taken after it ended, so the log after the checkpoint
//! never names a deleted session.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use macp_wire::storage::{Record, SessionSummary};
use prost::Message as _;

use crate::contract::{summary_id, LoadEvent, LoadSummary, LogPos, Maintenance, Storage, StorageRead};
use crate::error::StorageError;
use crate::retention::Retention;

/// Limits of the memory backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// How long an ended session stays readable.
    pub retention: Retention,
    /// Most bytes (encoded records and summaries) the ended sessions may
    /// hold together; the oldest go first past it.
    pub history_limit_bytes: u64,
    /// Whether the store can be loaded again ([`MemoryStorage::crash`] or
    /// [`MemoryStorage::reopen`], then [`Storage::load`]), as tests and the
    /// simulator do. A memory-only server never loads twice — nothing
    /// survives its process — so it turns this off: checkpoints then keep
    /// no copy of the open state ([`Storage::needs_open_state`] is false,
    /// so the pipeline does not even serialize it) and the log after a
    /// checkpoint is not indexed. With 100,000 open sessions that copy was
    /// about 70 MB of the server's memory and a second-long stall per
    /// checkpoint.
    pub restartable: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { retention: Retention::Forever, history_limit_bytes: 256 << 20, restartable: true }
    }
}

/// Ended sessions deleted per [`Storage::maintain`] call at most, so one
/// call never stalls the driver for long.
const MAINTAIN_BATCH: usize = 4096;

/// One session's durable records and, once it ended, its summary, both
/// kept encoded: an ended session's history is read rarely (passive
/// subscribe replay, WhatIf, a restart) and held for the whole retention,
/// so its memory is what [`MemoryConfig::history_limit_bytes`] counts, not
/// three or four times that in decoded structs.
#[derive(Debug, Default)]
struct History {
    /// The records, length-delimited, in order.
    records: Vec<u8>,
    /// Bytes charged to this session: encodings plus [`PER_SESSION_BYTES`].
    bytes: u64,
    /// The encoded summary, once the session ended.
    summary: Option<Box<[u8]>>,
    /// The summary's end time (retention and eviction order).
    ended_at: i64,
    /// The checkpoint generation in which the session ended.
    ended_in: u64,
}

/// What a session costs besides its encodings (map entries, the id twice):
/// charged so the history limit holds for many small sessions too.
const PER_SESSION_BYTES: u64 = 160;

impl History {
    fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let mut buf = &self.records[..];
        std::iter::from_fn(move || if buf.is_empty() { None } else { Record::decode_length_delimited(&mut buf).ok() })
    }

    fn summary(&self) -> Option<SessionSummary> {
        self.summary.as_deref().and_then(|b| SessionSummary::decode(b).ok())
    }
}

#[derive(Debug, Default)]
struct Inner {
    sessions: BTreeMap<String, History>,
    /// Ended sessions by (end time, id): retention and eviction order.
    by_end: BTreeSet<(i64, String)>,
    /// Registry records after the checkpoint (session records after the
    /// checkpoint are found through `tail`).
    registry_tail: Vec<Record>,
    /// `(session id, seq)` of every durable record after the checkpoint, in
    /// log order; empty session id means the next registry record.
    tail: Vec<(String, u64)>,
    checkpoint: Option<Vec<u8>>,
    /// Checkpoints taken so far.
    generation: u64,
    /// Bytes held by ended sessions.
    ended_bytes: u64,
    /// Bytes held by open sessions.
    open_bytes: u64,
}

impl Inner {
    /// Stores a synced record; `restartable` (the store's
    /// [`MemoryConfig::restartable`]) says whether the log index (`tail`,
    /// `registry_tail`) a later load replays is kept.
    fn add_record(&mut self, r: Record, restartable: bool) {
        if r.session_id.is_empty() {
            if restartable {
                self.tail.push((String::new(), r.seq));
                self.registry_tail.push(r);
            }
            return;
        }
        if restartable {
            self.tail.push((r.session_id.clone(), r.seq));
        }
        let fresh = !self.sessions.contains_key(&r.session_id);
        let h = self.sessions.entry(r.session_id.clone()).or_default();
        let before = h.records.len();
        // prost grows the Vec piece by piece while it encodes, doubling it
        // to the next power of two: a session's first record (all an open
        // session has) would hold up to twice its size. Reserve exactly for
        // it; later records grow the Vec amortized, as before.
        let len = r.encoded_len();
        let need = len + prost::length_delimiter_len(len);
        if h.records.is_empty() {
            h.records.reserve_exact(need);
        } else {
            h.records.reserve(need);
        }
        // Encoding into a Vec cannot fail.
        let _ = r.encode_length_delimited(&mut h.records);
        let bytes = (h.records.len() - before) as u64 + if fresh { PER_SESSION_BYTES } else { 0 };
        h.bytes += bytes;
        if h.summary.is_some() {
            self.ended_bytes += bytes;
        } else {
            self.open_bytes += bytes;
        }
    }

    fn add_summary(&mut self, s: SessionSummary) {
        let id = summary_id(&s).to_string();
        let generation = self.generation;
        let fresh = !self.sessions.contains_key(&id);
        let h = self.sessions.entry(id.clone()).or_default();
        if fresh {
            h.bytes = PER_SESSION_BYTES;
            self.open_bytes += PER_SESSION_BYTES;
        }
        let encoded = s.encode_to_vec().into_boxed_slice();
        let sbytes = encoded.len() as u64;
        let ended_at = s.ended_at_unix_ms;
        match h.summary.replace(encoded) {
            Some(old) => {
                self.by_end.remove(&(h.ended_at, id.clone()));
                self.ended_bytes = self.ended_bytes - old.len() as u64 + sbytes;
            }
            None => {
                // An ended session's records are final: drop the spare
                // capacity the appends left.
                h.records.shrink_to_fit();
                self.open_bytes -= h.bytes;
                self.ended_bytes += h.bytes + sbytes;
                h.ended_in = generation;
            }
        }
        h.ended_at = ended_at;
        self.by_end.insert((ended_at, id));
    }

    fn delete(&mut self, id: &str) {
        if let Some(h) = self.sessions.remove(id) {
            if let Some(s) = &h.summary {
                self.by_end.remove(&(h.ended_at, id.to_string()));
                self.ended_bytes -= h.bytes + s.len() as u64;
            } else {
                self.open_bytes -= h.bytes;
            }
        }
    }

    /// The oldest ended session that may be deleted now (ended before the
    /// latest checkpoint), if `pred` accepts its end time.
    fn oldest_deletable(&self, pred: impl Fn(i64) -> bool) -> Option<String> {
        self.by_end
            .iter()
            .take_while(|(at, _)| pred(*at))
            .find(|(_, id)| self.sessions.get(id).is_some_and(|h| h.ended_in < self.generation))
            .map(|(_, id)| id.clone())
    }
}

/// The in-memory backend. See the module docs.
#[derive(Debug)]
pub struct MemoryStorage {
    config: MemoryConfig,
    inner: Arc<RwLock<Inner>>,
    /// Appended, not yet synced.
    pending_records: Vec<Record>,
    pending_ended: Vec<SessionSummary>,
    loaded: bool,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new(config: MemoryConfig) -> Self {
        MemoryStorage {
            config,
            inner: Arc::new(RwLock::new(Inner::default())),
            pending_records: Vec::new(),
            pending_ended: Vec::new(),
            loaded: false,
        }
    }

    /// Forgets everything not synced and requires a new [`Storage::load`],
    /// as a process restart after a power cut would (tests, the simulator).
    pub fn crash(&mut self) {
        self.pending_records.clear();
        self.pending_ended.clear();
        self.loaded = false;
    }

    /// Another handle on the same stored data, not loaded: what a restart
    /// would find if memory survived it (tests of recovery paths). Nothing
    /// appended to `self` but unsynced is visible to it.
    pub fn reopen(&self) -> MemoryStorage {
        MemoryStorage {
            config: self.config.clone(),
            inner: self.inner.clone(),
            pending_records: Vec::new(),
            pending_ended: Vec::new(),
            loaded: false,
        }
    }

    /// Changes the limits (tests reopen one store under other settings).
    /// [`MemoryConfig::restartable`] is fixed when the store is created.
    pub fn set_config(&mut self, config: MemoryConfig) {
        self.config = MemoryConfig { restartable: self.config.restartable, ..config };
    }

    /// Bytes held by ended sessions (their records and summaries).
    pub fn ended_bytes(&self) -> u64 {
        self.inner.read().map_or(0, |i| i.ended_bytes)
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, Inner>, StorageError> {
        self.inner.write().map_err(|_| StorageError::Poisoned)
    }
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl Storage for MemoryStorage {
    fn load(
        &mut self,
        cancelled: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError> {
        if self.loaded {
            return Err(StorageError::Misuse("load called twice"));
        }
        let inner = self.inner.read().map_err(|_| StorageError::Poisoned)?;
        if !self.config.restartable && (inner.generation > 0 || !inner.sessions.is_empty()) {
            return Err(StorageError::Misuse("a memory store that is not restartable cannot be loaded again"));
        }
        if let Some(cp) = &inner.checkpoint {
            visit(LoadEvent::Checkpoint { open_state: cp })?;
        }
        let mut registry = inner.registry_tail.iter();
        for (i, (sid, seq)) in inner.tail.iter().enumerate() {
            if i % 1024 == 0 && cancelled() {
                return Err(StorageError::Cancelled);
            }
            let record = if sid.is_empty() {
                registry.next().cloned()
            } else {
                inner.sessions.get(sid).and_then(|h| h.records().find(|r| r.seq == *seq))
            };
            let record = record.ok_or(StorageError::Damaged {
                place: format!("record {i}"),
                reason: format!("the log names record {seq} of session '{sid}' but it is gone"),
            })?;
            visit(LoadEvent::Record { pos: LogPos::new(0, i as u64), record })?;
        }
        let end = LogPos::new(0, inner.tail.len() as u64);
        drop(inner);
        self.loaded = true;
        Ok(LoadSummary { torn_tail: None, end })
    }

    fn append(&mut self, records: &[Record], ended: &[SessionSummary]) -> Result<(), StorageError> {
        if !self.loaded {
            return Err(StorageError::Misuse("append before load"));
        }
        self.pending_records.extend_from_slice(records);
        self.pending_ended.extend_from_slice(ended);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        if !self.loaded {
            return Err(StorageError::Misuse("sync before load"));
        }
        if self.pending_records.is_empty() && self.pending_ended.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.pending_records);
        let ended = std::mem::take(&mut self.pending_ended);
        let restartable = self.config.restartable;
        let mut inner = self.write()?;
        for r in records {
            inner.add_record(r, restartable);
        }
        for s in ended {
            inner.add_summary(s);
        }
        Ok(())
    }

    fn checkpoint(&mut self, open_state: &[u8]) -> Result<(), StorageError> {
        self.sync()?;
        let mut inner = self.write()?;
        inner.checkpoint = self.config.restartable.then(|| open_state.to_vec());
        inner.tail.clear();
        inner.registry_tail.clear();
        inner.generation += 1;
        Ok(())
    }

    fn maintain(&mut self, now_ms: i64) -> Result<Maintenance, StorageError> {
        let cap = self.config.history_limit_bytes;
        let cutoff = self.config.retention.cutoff(now_ms);
        let mut inner = self.write()?;
        let mut m = Maintenance::default();
        for _ in 0..MAINTAIN_BATCH {
            if let Some(id) = cutoff.and_then(|c| inner.oldest_deletable(|at| at < c)) {
                inner.delete(&id);
                m.expired_sessions += 1;
            } else if inner.ended_bytes > cap {
                let Some(id) = inner.oldest_deletable(|_| true) else { break };
                inner.delete(&id);
                m.evicted_sessions += 1;
            } else {
                break;
            }
        }
        m.more = (m.expired_sessions + m.evicted_sessions) as usize == MAINTAIN_BATCH;
        m.bytes = inner.ended_bytes + inner.open_bytes;
        m.retention_cutoff_ms = cutoff;
        Ok(m)
    }

    fn reader(&self) -> Arc<dyn StorageRead> {
        Arc::new(MemoryReader(self.inner.clone()))
    }

    fn sync_waits(&self) -> bool {
        false
    }

    fn needs_open_state(&self) -> bool {
        self.config.restartable
    }
}

struct MemoryReader(Arc<RwLock<Inner>>);

impl StorageRead for MemoryReader {
    fn history(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Record>, StorageError> {
        let inner = self.0.read().map_err(|_| StorageError::Poisoned)?;
        let Some(h) = inner.sessions.get(session_id) else { return Ok(Vec::new()) };
        Ok(h.records().filter(|r| r.seq > after && r.seq <= upto).collect())
    }

    fn ended(&self, session_id: &str) -> Result<Option<SessionSummary>, StorageError> {
        let inner = self.0.read().map_err(|_| StorageError::Poisoned)?;
        Ok(inner.sessions.get(session_id).and_then(History::summary))
    }

    fn list_ended(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionSummary>, StorageError> {
        use std::ops::Bound;
        let inner = self.0.read().map_err(|_| StorageError::Poisoned)?;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        Ok(inner
            .sessions
            .range::<str, _>((lower, Bound::Unbounded))
            .filter_map(|(_, h)| h.summary())
            .take(limit)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{self, record, summary, Harness};

    #[derive(Default)]
    struct Mem(Option<MemoryStorage>);

    impl Harness for Mem {
        type S = MemoryStorage;
        fn open(&mut self, retention: Retention) -> MemoryStorage {
            let mut s = self.0.take().unwrap_or_default();
            s.set_config(MemoryConfig { retention, ..MemoryConfig::default() });
            s
        }
        fn stop(&mut self, mut s: MemoryStorage) {
            s.crash();
            self.0 = Some(s);
        }
        fn crash(&mut self, mut s: MemoryStorage) {
            s.crash();
            self.0 = Some(s);
        }
        fn reset(&mut self) {
            self.0 = None;
        }
    }

    #[test]
    fn passes_the_storage_suite() {
        suite::run_all(&mut Mem::default());
    }

    /// A store that is not restartable (the memory-only server's) keeps no
    /// copy of the open state and no index of the log, still deletes ended
    /// sessions after a checkpoint, and refuses to be loaded again rather
    /// than come back empty.
    #[test]
    fn a_store_that_is_not_restartable_keeps_no_open_state() {
        let retention = Retention::For(std::time::Duration::from_millis(10));
        let config = MemoryConfig { retention, restartable: false, ..MemoryConfig::default() };
        let mut s = MemoryStorage::new(config.clone());
        assert!(!s.needs_open_state());
        assert!(MemoryStorage::new(MemoryConfig::default()).needs_open_state());
        suite::load(&mut s);
        s.append(&[record(1, 1), record(1, 2), record(2, 1)], &[summary(1, 2, 1_000)]).unwrap();
        s.checkpoint(b"").unwrap();
        {
            let inner = s.inner.read().unwrap();
            assert!(inner.checkpoint.is_none() && inner.tail.is_empty() && inner.registry_tail.is_empty());
        }
        let r = s.reader();
        assert_eq!(r.history(&suite::sid(1), 0, 9).unwrap().len(), 2, "history is still served");
        let m = s.maintain(2_000).unwrap();
        assert_eq!(m.expired_sessions, 1, "retention still deletes after a checkpoint");
        assert!(r.ended(&suite::sid(1)).unwrap().is_none());
        assert_eq!(r.history(&suite::sid(2), 0, 9).unwrap().len(), 1, "open sessions stay");
        s.crash();
        let e = s.load(&|| false, &mut |_| Ok(())).unwrap_err();
        assert!(matches!(e, StorageError::Misuse(_)), "{e:?}");
        s.set_config(MemoryConfig::default());
        assert!(!s.needs_open_state(), "restartable is fixed at creation");
    }

    /// A session's first record is stored in an allocation of its size (an
    /// open session usually has just that one), and later ones still append
    /// and read back in order.
    #[test]
    fn a_first_record_takes_no_spare_capacity() {
        let mut s = MemoryStorage::new(MemoryConfig { restartable: false, ..MemoryConfig::default() });
        suite::load(&mut s);
        s.append(&[record(1, 1)], &[]).unwrap();
        s.sync().unwrap();
        {
            let inner = s.inner.read().unwrap();
            let h = &inner.sessions[&suite::sid(1)];
            assert_eq!(h.records.capacity(), h.records.len());
            let len = record(1, 1).encoded_len();
            assert_eq!(h.records.len(), len + prost::length_delimiter_len(len), "one length-delimited record");
        }
        s.append(&[record(1, 2), record(1, 3)], &[]).unwrap();
        s.sync().unwrap();
        let got = s.reader().history(&suite::sid(1), 0, 9).unwrap();
        assert_eq!(got, vec![record(1, 1), record(1, 2), record(1, 3)]);
    }

    /// Past the history limit the oldest ended sessions go first, and only
    /// ended ones; the store stays within the limit.
    #[test]
    fn the_history_limit_evicts_the_oldest_ended_sessions() {
        let mut s = MemoryStorage::new(MemoryConfig {
            retention: Retention::Forever,
            history_limit_bytes: 20_000,
            ..MemoryConfig::default()
        });
        suite::load(&mut s);
        for n in 1..=200u64 {
            s.append(&[record(n, 1), record(n, 2)], &[summary(n, 2, 1_000 + n as i64)]).unwrap();
        }
        s.append(&[record(500, 1)], &[]).unwrap();
        s.checkpoint(b"cp").unwrap();
        let before = s.ended_bytes();
        assert!(before > 20_000, "the test must start over the limit ({before})");
        let mut evicted = 0;
        loop {
            let m = s.maintain(0).unwrap();
            evicted += m.evicted_sessions;
            if !m.more {
                break;
            }
        }
        assert!(evicted > 0 && evicted < 200, "evicted {evicted}");
        assert!(s.ended_bytes() <= 20_000, "{} bytes left", s.ended_bytes());
        let r = s.reader();
        let kept: Vec<u64> = (1..=200).filter(|n| r.ended(&suite::sid(*n)).unwrap().is_some()).collect();
        assert_eq!(kept.len() as u64, 200 - evicted);
        assert_eq!(kept.first().copied(), Some(evicted + 1), "the oldest went first");
        assert_eq!(r.history(&suite::sid(500), 0, 9).unwrap().len(), 1, "open sessions are never evicted");
    }
}
