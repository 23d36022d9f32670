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

type Histories = Arc<RwLock<BTreeMap<String, Vec<Sequenced>>>>;

/// An in-memory journal.
#[derive(Default)]
pub struct MemoryJournal {
    records: Vec<Record>,
    histories: Histories,
}

struct MemoryHistory(Histories);

impl History for MemoryHistory {
    fn read(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Sequenced>, String> {
        let map = self.0.read().map_err(|_| "history lock poisoned".to_string())?;
        Ok(map
            .get(session_id)
            .map(|v| v.iter().filter(|s| s.seq > after && s.seq <= upto).cloned().collect())
            .unwrap_or_default())
    }
}

impl Journal for MemoryJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), String> {
        let mut map = self.histories.write().map_err(|_| "history lock poisoned".to_string())?;
        for r in records {
            if let Some(env) = history_envelope(r) {
                map.entry(r.session_id.clone())
                    .or_default()
                    .push(Sequenced { seq: r.seq, envelope: Arc::new(env.clone()) });
            }
        }
        self.records.extend_from_slice(records);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        let mut k = Kernel::new(config.clone());
        for r in &self.records {
            k.apply_record(r).map_err(|e| e.to_string())?;
        }
        Ok(k)
    }

    fn checkpoint(&mut self, _kernel: &Kernel) -> Result<(), String> {
        Ok(())
    }

    fn history(&self) -> Arc<dyn History> {
        Arc::new(MemoryHistory(self.histories.clone()))
    }
}
