//! Journals the driver can run on. `MemoryJournal` backs
//! `MACP_MEMORY_ONLY=1` and tests: it keeps each session's history so
//! passive subscribe works, and "durability" is the process lifetime.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use macp_kernel::{Kernel, KernelConfig};
use macp_wire::storage::{record::Fact, Record};

use crate::driver::{History, Journal};
use crate::hub::Sequenced;

/// The envelope a record contributes to its session's history, if any.
pub fn history_envelope(r: &Record) -> Option<&macp_wire::v1::Envelope> {
    match r.fact.as_ref()? {
        Fact::Started(s) => s.envelope.as_ref(),
        Fact::Accepted(e) | Fact::Cancelled(e) | Fact::Suspended(e) | Fact::Resumed(e) => Some(e),
        _ => None,
    }
}

/// Every record, and per session the positions of the records that carry
/// its history. Records are kept once: history reads copy the envelope out,
/// which is rare (passive subscribe), where keeping a second copy of every
/// accepted envelope would double the memory of a memory-only server.
#[derive(Default)]
struct Log {
    records: Vec<Record>,
    by_session: BTreeMap<String, Vec<usize>>,
}

type SharedLog = Arc<RwLock<Log>>;

/// An in-memory journal.
#[derive(Default)]
pub struct MemoryJournal {
    log: SharedLog,
}

struct MemoryHistory(SharedLog);

impl History for MemoryHistory {
    fn read(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Sequenced>, String> {
        let log = self.0.read().map_err(|_| "history lock poisoned".to_string())?;
        let Some(positions) = log.by_session.get(session_id) else { return Ok(Vec::new()) };
        Ok(positions
            .iter()
            .map(|&i| &log.records[i])
            .filter(|r| r.seq > after && r.seq <= upto)
            .filter_map(|r| history_envelope(r).map(|e| Sequenced { seq: r.seq, envelope: Arc::new(e.clone()) }))
            .collect())
    }
}

impl Journal for MemoryJournal {
    fn append(&mut self, records: Vec<Record>) -> Result<(), String> {
        let mut log = self.log.write().map_err(|_| "history lock poisoned".to_string())?;
        for r in records {
            if history_envelope(&r).is_some() {
                let at = log.records.len();
                match log.by_session.get_mut(&r.session_id) {
                    Some(v) => v.push(at),
                    None => {
                        log.by_session.insert(r.session_id.clone(), vec![at]);
                    }
                }
            }
            log.records.push(r);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        let mut k = Kernel::new(config.clone());
        let log = self.log.read().map_err(|_| "history lock poisoned".to_string())?;
        for r in &log.records {
            k.apply_record(r).map_err(|e| e.to_string())?;
        }
        Ok(k)
    }

    fn checkpoint(&mut self, _kernel: &Kernel) -> Result<(), String> {
        Ok(())
    }

    fn history(&self) -> Arc<dyn History> {
        Arc::new(MemoryHistory(self.log.clone()))
    }
}
