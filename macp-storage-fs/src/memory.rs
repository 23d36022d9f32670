//! An in-memory [`Storage`]: for tests, the deterministic simulator and
//! `MACP_MEMORY_ONLY=1`.
//!
//! It keeps every record and honours the same contract as the filesystem
//! log — tickets, a durable position, checkpoints, history — so a driver
//! written against [`Storage`] behaves the same on both. [`MemoryStorage::crash`]
//! drops what was never synced, which lets a simulator test restarts.

use std::collections::HashMap;

use macp_wire::storage::Record;

use crate::error::StorageError;
use crate::storage::{LoadEvent, LoadSummary, LogPos, Storage};

/// Records in a `Vec`; positions are `(0, number of records)`.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    records: Vec<Record>,
    durable: usize,
    checkpoint: Option<(Vec<u8>, usize)>,
    /// Session id → indices into `records`.
    index: HashMap<String, Vec<usize>>,
    loaded: bool,
}

impl MemoryStorage {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything not synced and requires a new [`Storage::load`],
    /// as a process restart after a power cut would.
    pub fn crash(&mut self) {
        self.records.truncate(self.durable);
        for v in self.index.values_mut() {
            v.retain(|&i| i < self.durable);
        }
        self.index.retain(|_, v| !v.is_empty());
        self.loaded = false;
    }

    /// Number of records held (synced or not).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record was ever appended.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn pos(n: usize) -> LogPos {
        LogPos::new(0, n as u64)
    }
}

impl Storage for MemoryStorage {
    fn load(
        &mut self,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError> {
        if self.loaded {
            return Err(StorageError::Misuse("load called twice"));
        }
        let covered = match &self.checkpoint {
            Some((bytes, at)) => {
                visit(LoadEvent::Checkpoint { pos: Self::pos(*at), snapshot: bytes })?;
                *at
            }
            None => 0,
        };
        for (i, r) in self.records.iter().enumerate() {
            let pos = Self::pos(i);
            if i < covered {
                visit(LoadEvent::Covered { pos, session_id: &r.session_id, seq: r.seq })?;
            } else {
                visit(LoadEvent::Record { pos, record: r.clone() })?;
            }
        }
        self.loaded = true;
        Ok(LoadSummary { torn_tail: None, end: Self::pos(self.records.len()) })
    }

    fn append(&mut self, records: &[Record]) -> Result<LogPos, StorageError> {
        if !self.loaded {
            return Err(StorageError::Misuse("append before load"));
        }
        for r in records {
            if !r.session_id.is_empty() {
                self.index.entry(r.session_id.clone()).or_default().push(self.records.len());
            }
            self.records.push(r.clone());
        }
        Ok(Self::pos(self.records.len()))
    }

    fn sync(&mut self) -> Result<LogPos, StorageError> {
        if !self.loaded {
            return Err(StorageError::Misuse("sync before load"));
        }
        self.durable = self.records.len();
        Ok(Self::pos(self.durable))
    }

    fn durable(&self) -> LogPos {
        Self::pos(self.durable)
    }

    fn checkpoint(&mut self, snapshot: &[u8]) -> Result<LogPos, StorageError> {
        let at = self.sync()?;
        self.checkpoint = Some((snapshot.to_vec(), self.durable));
        Ok(at)
    }

    fn history(&self, session_id: &str, after_seq: u64) -> Result<Vec<Record>, StorageError> {
        let Some(idx) = self.index.get(session_id) else { return Ok(Vec::new()) };
        Ok(idx
            .iter()
            .filter(|&&i| i < self.durable)
            .map(|&i| &self.records[i])
            .filter(|r| r.seq > after_seq)
            .cloned()
            .collect())
    }
}
