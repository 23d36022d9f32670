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

use std::collections::{BTreeSet, HashMap as StdHashMap};
use std::sync::{Arc, RwLock};

use hashbrown::HashMap;
use macp_wire::storage::record::Fact;
use macp_wire::storage::{Record, SessionSummary};
use macp_wire::v1::PolicyDescriptor;
use prost::Message as _;

use crate::contract::{summary_id, LoadEvent, LoadSummary, LogPos, Maintenance, Storage, StorageRead};
use crate::error::StorageError;
use crate::packed;
use crate::retention::Retention;
use crate::session_key::{KeyRef, SessionKey};

/// Limits of the memory backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// How long an ended session stays readable.
    pub retention: Retention,
    /// Most bytes (records as stored, compressed, and encoded summaries)
    /// the ended sessions may hold together; the oldest go first past it.
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
///
/// Every open session has one, so it is kept small (issue 15: 100,000 open
/// sessions in 100 MiB): the records are stored without what the session
/// has once ([`strip`]: the session id, which is the map's key, in the
/// record and in its envelope; the SessionStart's policy descriptor, shared
/// through [`Inner::policies`]), each compressed against the store's
/// dictionary ([`crate::packed`]), and the end of a session is out of line.
#[derive(Debug, Default)]
struct History {
    /// The records, stripped ([`strip`]) and packed ([`crate::packed`]),
    /// in order.
    records: Vec<u8>,
    /// The policy the SessionStart froze, if it named one.
    policy: Option<Arc<PolicyDescriptor>>,
    /// Set when the session ended.
    ended: Option<Box<Ended>>,
}

/// What an ended session has besides its records.
#[derive(Debug)]
struct Ended {
    /// The encoded summary.
    summary: Box<[u8]>,
    /// The summary's end time (retention and eviction order).
    at: i64,
    /// The checkpoint generation in which the session ended.
    generation: u64,
}

/// What a session costs besides its encodings (map entries, the id twice):
/// charged so the history limit holds for many small sessions too.
const PER_SESSION_BYTES: u64 = 160;

impl History {
    /// Bytes charged to this session besides its summary.
    fn charged(&self) -> u64 {
        self.records.len() as u64 + PER_SESSION_BYTES
    }

    /// The records of session `id`, as they were appended; `dict` is the
    /// store's dictionary.
    fn records<'a>(&'a self, id: &'a str, dict: Option<&'a [u8]>) -> impl Iterator<Item = Record> + 'a {
        let mut buf = &self.records[..];
        let mut scratch = Vec::new();
        std::iter::from_fn(move || {
            let mut r = Record::decode(packed::next(&mut buf, dict, &mut scratch)?).ok()?;
            restore(&mut r, id, self.policy.as_deref());
            Some(r)
        })
    }

    fn summary(&self) -> Option<SessionSummary> {
        self.ended.as_ref().and_then(|e| SessionSummary::decode(&e.summary[..]).ok())
    }
}

/// The envelope a session record carries, if any.
fn envelope_of(fact: &mut Option<Fact>) -> Option<&mut macp_wire::v1::Envelope> {
    match fact {
        Some(Fact::Started(s)) => s.envelope.as_mut(),
        Some(Fact::Accepted(e) | Fact::Cancelled(e) | Fact::Suspended(e) | Fact::Resumed(e)) => Some(e),
        _ => None,
    }
}

/// Takes out of a session's record what the store keeps once per session:
/// the session id (the map's key; the envelope's copy only when it is the
/// same id, which the kernel guarantees for every session record) and a
/// SessionStart's policy descriptor; both are returned (the policy to be
/// shared). [`restore`] puts them back.
fn strip(r: &mut Record) -> (String, Option<PolicyDescriptor>) {
    let id = std::mem::take(&mut r.session_id);
    let policy = match &mut r.fact {
        Some(Fact::Started(s)) => s.policy.take(),
        _ => None,
    };
    if let Some(e) = envelope_of(&mut r.fact) {
        if e.session_id == id {
            e.session_id.clear();
        }
    }
    (id, policy)
}

/// Puts back what [`strip`] took out of a record of session `id`.
fn restore(r: &mut Record, id: &str, policy: Option<&PolicyDescriptor>) {
    r.session_id = id.to_owned();
    if let (Some(Fact::Started(s)), Some(p)) = (&mut r.fact, policy) {
        s.policy = Some(p.clone());
    }
    if let Some(e) = envelope_of(&mut r.fact) {
        if e.session_id.is_empty() {
            e.session_id = id.to_owned();
        }
    }
}

/// The history of `id` in `sessions`, created (and charged to
/// `open_bytes`) if it has none yet.
fn history_mut<'s>(sessions: &'s mut HashMap<SessionKey, History>, open_bytes: &mut u64, id: &str) -> &'s mut History {
    if !sessions.contains_key(&KeyRef::of(id)) {
        sessions.insert(SessionKey::new(id), History::default());
        *open_bytes += PER_SESSION_BYTES;
    }
    sessions.get_mut(&KeyRef::of(id)).expect("inserted above")
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<SessionKey, History>,
    /// Ended sessions by (end time, id): retention and eviction order.
    by_end: BTreeSet<(i64, Box<str>)>,
    /// Ended sessions by id: the order [`StorageRead::list_ended`] pages in.
    ended_ids: BTreeSet<Box<str>>,
    /// The policy descriptors sessions froze, one copy per distinct
    /// descriptor, keyed by its encoding; dropped with its last session.
    policies: StdHashMap<Box<[u8]>, Arc<PolicyDescriptor>>,
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
    /// What records are compressed against: the first SessionStart record
    /// of at most [`packed::MAX_DICT_LEN`] bytes (stripped), kept for the
    /// store's lifetime.
    dict: Option<Box<[u8]>>,
    /// Buffers reused by every append.
    encoded: Vec<u8>,
    scratch: Vec<u8>,
}

impl Inner {
    /// The shared copy of `policy`.
    fn intern(&mut self, policy: PolicyDescriptor) -> Arc<PolicyDescriptor> {
        let key = policy.encode_to_vec().into_boxed_slice();
        self.policies.entry(key).or_insert_with(|| Arc::new(policy)).clone()
    }

    /// Stores a synced record; `restartable` (the store's
    /// [`MemoryConfig::restartable`]) says whether the log index (`tail`,
    /// `registry_tail`) a later load replays is kept.
    fn add_record(&mut self, mut r: Record, restartable: bool) {
        if r.session_id.is_empty() {
            if restartable {
                self.tail.push((String::new(), r.seq));
                self.registry_tail.push(r);
            }
            return;
        }
        let (id, policy) = strip(&mut r);
        if restartable {
            self.tail.push((id.clone(), r.seq));
        }
        let policy = policy.map(|p| self.intern(p));
        let Inner { sessions, open_bytes, ended_bytes, dict, encoded, scratch, .. } = self;
        encoded.clear();
        // Encoding into a Vec cannot fail.
        let _ = r.encode(encoded);
        if dict.is_none() && matches!(r.fact, Some(Fact::Started(_))) && encoded.len() <= packed::MAX_DICT_LEN {
            *dict = Some(encoded.as_slice().into());
        }
        let h = history_mut(sessions, open_bytes, &id);
        if policy.is_some() {
            h.policy = policy;
        }
        let before = h.records.len();
        // A session's first record (all an open session has) gets an
        // allocation of exactly its size; later ones grow it amortized.
        let first = h.records.is_empty();
        packed::push(&mut h.records, encoded, dict.as_deref(), scratch, first);
        let bytes = (h.records.len() - before) as u64;
        if h.ended.is_some() {
            *ended_bytes += bytes;
        } else {
            *open_bytes += bytes;
        }
    }

    fn add_summary(&mut self, s: SessionSummary) {
        let id: Box<str> = summary_id(&s).into();
        let generation = self.generation;
        let encoded = s.encode_to_vec().into_boxed_slice();
        let sbytes = encoded.len() as u64;
        let at = s.ended_at_unix_ms;
        let h = history_mut(&mut self.sessions, &mut self.open_bytes, &id);
        match &mut h.ended {
            // A summary written again replaces the first and keeps the
            // generation the session ended in.
            Some(e) => {
                let old_at = std::mem::replace(&mut e.at, at);
                let old = std::mem::replace(&mut e.summary, encoded);
                self.by_end.remove(&(old_at, id.clone()));
                self.ended_bytes = self.ended_bytes - old.len() as u64 + sbytes;
            }
            None => {
                // An ended session's records are final: drop the spare
                // capacity the appends left.
                h.records.shrink_to_fit();
                let charged = h.charged();
                h.ended = Some(Box::new(Ended { summary: encoded, at, generation }));
                self.open_bytes -= charged;
                self.ended_bytes += charged + sbytes;
                self.ended_ids.insert(id.clone());
            }
        }
        self.by_end.insert((at, id));
    }

    fn delete(&mut self, id: &str) {
        let Some(h) = self.sessions.remove(&KeyRef::of(id)) else { return };
        match &h.ended {
            Some(e) => {
                self.by_end.remove(&(e.at, id.into()));
                self.ended_ids.remove(id);
                self.ended_bytes -= h.charged() + e.summary.len() as u64;
            }
            None => self.open_bytes -= h.charged(),
        }
        if let Some(p) = h.policy {
            // This session's copy and the table's: the table's is the last.
            if Arc::strong_count(&p) == 2 {
                self.policies.remove(&p.encode_to_vec()[..]);
            }
        }
    }

    /// The oldest ended session that may be deleted now (ended before the
    /// latest checkpoint), if `pred` accepts its end time.
    fn oldest_deletable(&self, pred: impl Fn(i64) -> bool) -> Option<Box<str>> {
        self.by_end
            .iter()
            .take_while(|(at, _)| pred(*at))
            .find(|(_, id)| {
                self.sessions
                    .get(&KeyRef::of(id))
                    .and_then(|h| h.ended.as_ref())
                    .is_some_and(|e| e.generation < self.generation)
            })
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
                inner
                    .sessions
                    .get(&KeyRef::of(sid))
                    .and_then(|h| h.records(sid, inner.dict.as_deref()).find(|r| r.seq == *seq))
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
        let Some(h) = inner.sessions.get(&KeyRef::of(session_id)) else { return Ok(Vec::new()) };
        Ok(h.records(session_id, inner.dict.as_deref()).filter(|r| r.seq > after && r.seq <= upto).collect())
    }

    fn ended(&self, session_id: &str) -> Result<Option<SessionSummary>, StorageError> {
        let inner = self.0.read().map_err(|_| StorageError::Poisoned)?;
        Ok(inner.sessions.get(&KeyRef::of(session_id)).and_then(History::summary))
    }

    fn list_ended(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionSummary>, StorageError> {
        use std::ops::Bound;
        let inner = self.0.read().map_err(|_| StorageError::Poisoned)?;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        Ok(inner
            .ended_ids
            .range::<str, _>((lower, Bound::Unbounded))
            .filter_map(|id| inner.sessions.get(&KeyRef::of(id)).and_then(History::summary))
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
            let h = &inner.sessions[&KeyRef::of(&suite::sid(1))];
            assert_eq!(h.records.capacity(), h.records.len());
            let mut stripped = record(1, 1);
            strip(&mut stripped);
            let len = stripped.encoded_len();
            assert!(h.records.len() <= len + 3, "one record, at most a frame header longer");
            assert!(len + sid_len() <= record(1, 1).encoded_len(), "the session id is not stored with the record");
        }
        s.append(&[record(1, 2), record(1, 3)], &[]).unwrap();
        s.sync().unwrap();
        let got = s.reader().history(&suite::sid(1), 0, 9).unwrap();
        assert_eq!(got, vec![record(1, 1), record(1, 2), record(1, 3)]);
    }

    /// A SessionStart record, with its envelope and frozen policy.
    fn started(n: u64, policy: &PolicyDescriptor) -> Record {
        let mut r = record(n, 1);
        let Some(Fact::Accepted(env)) = r.fact.take() else { unreachable!("suite records carry envelopes") };
        r.fact = Some(Fact::Started(macp_wire::storage::SessionStarted {
            envelope: Some(env),
            policy: Some(policy.clone()),
            max_suspend_ms: 5,
            deadline_unix_ms: 7,
            canonical_mode: "ext.suite.v1".into(),
        }));
        r
    }

    /// Records are stored without the session id and the policy, and read
    /// back whole: sessions that froze the same policy share one copy,
    /// which goes with the last of them; an envelope naming another
    /// session keeps its id.
    #[test]
    fn records_read_back_whole_and_share_their_policy() {
        let mut s = MemoryStorage::new(MemoryConfig { restartable: false, ..MemoryConfig::default() });
        suite::load(&mut s);
        let policy = |id: &str| PolicyDescriptor {
            policy_id: id.into(),
            mode: "*".into(),
            description: "a policy".into(),
            rules: "{}".into(),
            schema_version: 3,
            registered_at_unix_ms: 9,
        };
        let (a, b) = (policy("p.a"), policy("p.b"));
        let mut odd = record(3, 2);
        if let Some(Fact::Accepted(e)) = &mut odd.fact {
            e.session_id = "another session".into();
        }
        let written = [started(1, &a), record(1, 2), started(2, &a), started(3, &b), odd];
        s.append(&written, &[]).unwrap();
        s.sync().unwrap();
        let r = s.reader();
        let mut read = Vec::new();
        for n in 1..=3 {
            read.extend(r.history(&suite::sid(n), 0, 9).unwrap());
        }
        assert_eq!(read, written);
        assert_eq!(s.inner.read().unwrap().policies.len(), 2, "one copy per distinct policy");
        s.append(&[], &[summary(1, 2, 1_000), summary(2, 1, 1_000)]).unwrap();
        s.checkpoint(b"").unwrap();
        s.set_config(MemoryConfig {
            retention: Retention::For(std::time::Duration::from_millis(1)),
            ..s.config.clone()
        });
        s.maintain(5_000).unwrap();
        assert!(r.history(&suite::sid(1), 0, 9).unwrap().is_empty());
        let inner = s.inner.read().unwrap();
        assert_eq!(inner.policies.len(), 1, "p.a went with its last session");
        assert_eq!(inner.policies.values().next().map(|p| p.policy_id.as_str()), Some("p.b"));
    }

    fn sid_len() -> usize {
        suite::sid(1).len()
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
