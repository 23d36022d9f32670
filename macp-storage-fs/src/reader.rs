//! [`StorageRead`] for the file backend: history and ended sessions, read
//! from other threads while the writer appends.
//!
//! Where a session's locations come from: the open map (open sessions), the
//! pending batch (sessions that ended since the index was last written),
//! then the index. The writer writes the index before it drops an entry
//! from the pending batch, and a reader looks at the pending batch before
//! the index, so an ended session is always in one of the two for it.
//! Records are then read with one positioned read each and checked (frame
//! checksums, and that the frame holds the expected session and sequence).

use std::ops::Bound;
use std::sync::Arc;

use macp_storage::{summary_id, Record, SessionSummary, StorageError, StorageRead};

use crate::index::{decode_summary, EndedEntry};
use crate::locs::Loc;
use crate::storage::Shared;
use crate::vfs::Vfs;

/// A reader of an [`crate::FsStorage`]; cheap to share.
pub(crate) struct FsReader<V: Vfs> {
    shared: Arc<Shared<V>>,
}

impl<V: Vfs> FsReader<V> {
    pub fn new(shared: Arc<Shared<V>>) -> Self {
        FsReader { shared }
    }

    /// The durable locations of `session_id` with `after < seq <= upto`.
    fn locations(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Loc>, StorageError> {
        let in_range = |l: &&Loc| l.seq > after && l.seq <= upto;
        {
            let view = self.shared.view()?;
            if let Some(locs) = view.open.get(session_id) {
                return Ok(locs.iter().filter(in_range).filter(|l| l.pos() < view.durable).copied().collect());
            }
            if let Some(locs) = view.pending.get(session_id).and_then(|p| p.locs.as_ref()) {
                return Ok(locs.iter().filter(in_range).copied().collect());
            }
        }
        let stored = self.shared.with_index(|ix| ix.get(session_id))?;
        Ok(stored.map(|(_, locs)| locs.iter().filter(in_range).copied().collect()).unwrap_or_default())
    }
}

impl<V: Vfs> StorageRead for FsReader<V> {
    fn history(&self, session_id: &str, after: u64, upto: u64) -> Result<Vec<Record>, StorageError> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let mut attempt = 0;
        'again: loop {
            attempt += 1;
            let locs = self.locations(session_id, after, upto)?;
            let mut out = Vec::with_capacity(locs.len());
            for l in &locs {
                match self.shared.read_record(session_id, l) {
                    Ok(r) => out.push(r),
                    // Compaction may have moved the record (and retired its
                    // old segment) since the locations were taken: look
                    // them up once more before calling it damage.
                    Err(StorageError::Damaged { .. }) if attempt == 1 => continue 'again,
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
    }

    fn ended(&self, session_id: &str) -> Result<Option<SessionSummary>, StorageError> {
        let pending = self.shared.view()?.pending.get(session_id).cloned();
        if let Some(p) = pending {
            return decode_summary(session_id, &p.summary).map(Some);
        }
        Ok(self.shared.with_index(|ix| ix.get(session_id))?.map(|(s, _)| s))
    }

    fn list_ended(&self, after: Option<&str>, limit: usize) -> Result<Vec<SessionSummary>, StorageError> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        // The pending batch first, then the index (see the module docs).
        let pending: Vec<(Box<str>, Arc<EndedEntry>)> = self
            .shared
            .view()?
            .pending
            .range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let pending = pending
            .iter()
            .map(|(k, e)| decode_summary(k, &e.summary))
            .collect::<Result<Vec<SessionSummary>, StorageError>>()?;
        let stored = self.shared.with_index(|ix| ix.list(after, limit))?;
        let mut out = Vec::with_capacity(limit.min(pending.len() + stored.len()));
        let (mut p, mut s) = (pending.into_iter().peekable(), stored.into_iter().peekable());
        while out.len() < limit {
            let next = match (p.peek(), s.peek()) {
                (Some(a), Some(b)) => match summary_id(a).cmp(summary_id(b)) {
                    std::cmp::Ordering::Less => p.next(),
                    std::cmp::Ordering::Greater => s.next(),
                    std::cmp::Ordering::Equal => {
                        s.next();
                        p.next()
                    }
                },
                (Some(_), None) => p.next(),
                (None, Some(_)) => s.next(),
                (None, None) => None,
            };
            match next {
                Some(x) => out.push(x),
                None => break,
            }
        }
        Ok(out)
    }
}
