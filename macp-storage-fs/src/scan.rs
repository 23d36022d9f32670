//! Reading the log tail at load: segments are read, checksummed and
//! decoded on a helper thread while the caller's thread restores the
//! checkpoint and replays records through the kernel, with a bounded
//! hand-over so memory stays bounded.
//!
//! Only the tail is read — the segments from the checkpoint's position on —
//! so this work follows the log written since the last checkpoint, never
//! the history before it.

use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use macp_storage::{Damage, DamageKind, LogPos, Record, StorageError};
use prost::Message as _;

use crate::frame::{self, FrameError, FrameKind, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::vfs::{Vfs, VfsFile};

/// Frames longer than this are not believed when reading, whatever the
/// append limit is now: a sanity bound on a length that already passed
/// its header checksum.
pub(crate) const MAX_FRAME_READ: u32 = 1 << 30;

/// One thing the reader found, in log order.
pub(crate) enum Found {
    /// A record frame whose checksums hold, decoded (`Err` if that failed;
    /// then `sid` still names its session when the identity was readable).
    Record { pos: LogPos, len: u32, sid: Range<usize>, record: Result<Box<Record>, String> },
    /// A carried copy: only its identity (`sid` is a range of the chunk's
    /// bytes).
    Carried { pos: LogPos, len: u32, sid: Range<usize>, seq: u64 },
    /// A frame whose checksums hold but whose payload is not a record.
    NotARecord { pos: LogPos, len: u64 },
    /// Damaged bytes.
    Damage(Damage),
    /// A segment was fully scanned.
    End(SegmentEnd),
}

/// Where a segment's valid data ends, as the reader found it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegmentEnd {
    pub segment: u64,
    /// The log's logical end in this segment: just past its last valid
    /// frame (or its header). Never the file size: the active segment is
    /// preallocated, so zeros follow its last frame.
    pub valid_end: u64,
    /// Last segment only: everything from here on is to be cut — a write a
    /// crash tore, or the zeros of the segment's reservation, or both.
    pub torn: Option<u64>,
    /// Just past the last non-zero byte from `torn` on (`torn` itself when
    /// only zeros follow it): the bytes past `torn` that are a torn write
    /// rather than the reservation's zeros end here. `file_len` when not
    /// torn.
    pub data_end: u64,
    pub file_len: u64,
}

/// Just past the last non-zero byte of `bytes` (0 when all are zero).
fn nonzero_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// A batch of findings over one segment's bytes.
pub(crate) struct Chunk {
    pub bytes: Arc<Vec<u8>>,
    pub found: Vec<Found>,
}

/// Findings per chunk.
const CHUNK_ITEMS: usize = 8192;
/// Chunks the reader may run ahead of the replay (bounds the decoded
/// records in flight).
pub(crate) const CHANNEL_DEPTH: usize = 32;

/// What the reader thread works from.
pub(crate) struct ReadPlan<'a, V> {
    pub vfs: &'a V,
    pub wal: &'a Path,
    /// Segments to read, ascending, from the checkpoint's on.
    pub segments: &'a [u64],
    /// Where reading starts: segment and offset (the checkpoint's position,
    /// or the start of the log).
    pub start: LogPos,
}

pub(crate) fn segment_name(n: u64) -> String {
    format!("{n:020}.seg")
}

pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n > 0)
}

/// Reads `path` from byte `from` to its end (empty if shorter).
fn read_from<V: Vfs>(vfs: &V, path: &Path, from: u64) -> Result<(Vec<u8>, u64), StorageError> {
    let f = vfs.open(path, false).map_err(|e| StorageError::io("open", path, e))?;
    let len = f.size().map_err(|e| StorageError::io("stat", path, e))?;
    let n = usize::try_from(len.saturating_sub(from))
        .map_err(|_| StorageError::io("read", path, std::io::ErrorKind::FileTooLarge.into()))?;
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, from).map_err(|e| StorageError::io("read", path, e))?;
    Ok((buf, len))
}

/// The reader thread: reads, checks and decodes the tail segments in
/// order, sending findings to the replaying thread. Stops when the
/// receiver is gone (loading failed or was cancelled).
pub(crate) fn read_segments<V: Vfs>(plan: ReadPlan<'_, V>, tx: SyncSender<Result<Chunk, StorageError>>) {
    let mut expected = plan.start.segment;
    let last = plan.segments.last().copied();
    for &n in plan.segments {
        let mut found = Vec::new();
        if n > expected {
            found.push(Found::Damage(Damage {
                segment: expected,
                offset: 0,
                len: n - expected,
                kind: DamageKind::MissingSegment,
                session_hint: None,
            }));
        }
        expected = n.saturating_add(1);
        let from = if n == plan.start.segment { plan.start.offset } else { 0 };
        let path = plan.wal.join(segment_name(n));
        let (buf, file_len) = match read_from(plan.vfs, &path, from) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        if file_len < from {
            // The segment the checkpoint points into is shorter than the
            // position it covers: the log lost its end.
            found.push(Found::Damage(Damage {
                segment: n,
                offset: file_len,
                len: 0,
                kind: DamageKind::ShortOfCheckpoint,
                session_hint: None,
            }));
            found.push(Found::End(SegmentEnd {
                segment: n,
                valid_end: file_len,
                torn: None,
                data_end: file_len,
                file_len,
            }));
            if tx.send(Ok(Chunk { bytes: Arc::new(Vec::new()), found })).is_err() {
                return;
            }
            continue;
        }
        let bytes = Arc::new(buf);
        let mut sink = |f: Found| -> bool {
            found.push(f);
            if found.len() >= CHUNK_ITEMS {
                let chunk = Chunk { bytes: bytes.clone(), found: std::mem::take(&mut found) };
                return tx.send(Ok(chunk)).is_ok();
            }
            true
        };
        if !scan_segment(n, &bytes, from, Some(n) == last, &mut sink) {
            return;
        }
        if tx.send(Ok(Chunk { bytes: bytes.clone(), found })).is_err() {
            return;
        }
    }
}

/// Scans one segment's bytes (file offset `base` onward) into findings.
/// Returns `false` if the receiver is gone.
pub(crate) fn scan_segment(
    n: u64,
    bytes: &[u8],
    base: u64,
    is_last: bool,
    sink: &mut dyn FnMut(Found) -> bool,
) -> bool {
    let max = MAX_FRAME_READ;
    let file_len = base + bytes.len() as u64;
    let mut at = 0usize;
    if base == 0 {
        at = if frame::segment_header_ok(bytes, n) {
            SEGMENT_HEADER_LEN as usize
        } else {
            match frame::find_next_header(bytes, 0, n, 0, max) {
                None if is_last => {
                    let data_end = nonzero_end(bytes) as u64;
                    let end = SegmentEnd { segment: n, valid_end: 0, torn: Some(0), data_end, file_len };
                    return sink(Found::End(end));
                }
                next => {
                    let to = next.unwrap_or(bytes.len());
                    let d = Damage {
                        segment: n,
                        offset: 0,
                        len: to as u64,
                        kind: DamageKind::BadSegmentHeader,
                        session_hint: None,
                    };
                    if !sink(Found::Damage(d)) {
                        return false;
                    }
                    to
                }
            }
        };
    }
    let mut valid_end = base + at as u64;
    while at < bytes.len() {
        let off = base + at as u64;
        let pos = LogPos::new(n, off);
        match frame::read_frame(bytes, at, n, off, max) {
            Ok((kind, payload, next)) => {
                let len = payload.len() as u32;
                let payload_at = at + FRAME_HEADER_LEN;
                let identity = frame::peek_identity(payload);
                let f = match (kind, identity) {
                    (_, None) => Found::NotARecord { pos, len: (next - at) as u64 },
                    (FrameKind::Carried, Some((sid, seq))) => {
                        Found::Carried { pos, len, sid: payload_at + sid.start..payload_at + sid.end, seq }
                    }
                    (FrameKind::Record, Some((sid, _))) => Found::Record {
                        pos,
                        len,
                        sid: payload_at + sid.start..payload_at + sid.end,
                        record: Record::decode(payload).map(Box::new).map_err(|e| e.to_string()),
                    },
                };
                if !sink(f) {
                    return false;
                }
                at = next;
                valid_end = base + next as u64;
            }
            Err((kind, header)) => {
                // The last segment's logical end: only zeros after the last
                // frame (the segment's preallocated space, see the crate
                // docs), or a write a crash tore (possibly followed by such
                // zeros) after which no valid frame follows.
                let data = if is_last { nonzero_end(&bytes[at..]) } else { 0 };
                if is_last && data == 0 {
                    let end = SegmentEnd { segment: n, valid_end, torn: Some(off), data_end: off, file_len };
                    return sink(Found::End(end));
                }
                let next = frame::find_next_header(bytes, at + 1, n, base, max);
                if next.is_none() && is_last {
                    let data_end = off + data as u64;
                    let end = SegmentEnd { segment: n, valid_end, torn: Some(off), data_end, file_len };
                    return sink(Found::End(end));
                }
                let to = next.unwrap_or(bytes.len());
                let (kind, hint) = match (kind, header) {
                    (FrameError::BadPayload, Some(h)) => {
                        let start = at + FRAME_HEADER_LEN;
                        let end = start.saturating_add(h.len as usize).min(bytes.len());
                        (DamageKind::BadChecksum, bytes.get(start..end).and_then(frame::salvage_session))
                    }
                    // The header is gone but the payload may be whole:
                    // a session record starts with its session id.
                    _ => {
                        let hint = bytes.get(at + FRAME_HEADER_LEN..to).and_then(frame::salvage_session);
                        (DamageKind::BadFrame, hint)
                    }
                };
                let d = Damage { segment: n, offset: off, len: (to - at) as u64, kind, session_hint: hint };
                if !sink(Found::Damage(d)) {
                    return false;
                }
                at = to;
            }
        }
    }
    sink(Found::End(SegmentEnd { segment: n, valid_end, torn: None, data_end: file_len, file_len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip_and_reject_junk() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("00000000000000000042.seg.tmp"), None);
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.seg"), None);
        assert_eq!(parse_segment_name(&segment_name(0)), None);
    }
}
