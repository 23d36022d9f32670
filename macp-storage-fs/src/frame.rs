//! Byte formats of the log: segment headers, record frames, and a minimal
//! protobuf reader for a record's session id and sequence number.
//!
//! A frame is a 16-byte header followed by the record's protobuf bytes:
//!
//! ```text
//! magic "MREC" | len u32 LE | payload crc32c u32 LE | header crc u32 LE
//! ```
//!
//! The magic is the frame's kind: `MREC` is a record the kernel accepted
//! (replayed at load), `MCPY` a copy of an earlier record that compaction
//! carried forward out of an old segment (never replayed: at load it only
//! moves its session's location). The header checksum covers the magic, so
//! damage cannot turn one kind into the other.
//!
//! The header checksum covers the segment number and the frame's own
//! offset as well as the first 12 header bytes. A frame is therefore valid
//! only at the place it was written: when recovery resynchronises after
//! damage it cannot be fooled by a frame embedded inside a client payload,
//! nor by a block the filesystem put in the wrong place.
//!
//! Everything here takes arbitrary bytes and returns errors, never panics.

use std::ops::Range;

/// Bytes at the start of every segment file.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"MACPSEG1";
/// Segment header: magic + segment number (u64 LE).
pub(crate) const SEGMENT_HEADER_LEN: u64 = 16;
/// Bytes at the start of a record frame.
pub(crate) const FRAME_MAGIC: &[u8; 4] = b"MREC";
/// Bytes at the start of a carried copy of a record (compaction).
pub(crate) const CARRY_MAGIC: &[u8; 4] = b"MCPY";

/// What a frame holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// A record the kernel accepted, in log order.
    Record,
    /// A copy of an earlier record, written by compaction.
    Carried,
}

impl FrameKind {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            FrameKind::Record => FRAME_MAGIC,
            FrameKind::Carried => CARRY_MAGIC,
        }
    }

    fn of(magic: &[u8]) -> Option<FrameKind> {
        if magic == FRAME_MAGIC {
            Some(FrameKind::Record)
        } else if magic == CARRY_MAGIC {
            Some(FrameKind::Carried)
        } else {
            None
        }
    }
}
/// Frame header length.
pub(crate) const FRAME_HEADER_LEN: usize = 16;

/// The segment header for segment `n`.
pub(crate) fn segment_header(n: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..].copy_from_slice(&n.to_le_bytes());
    h
}

/// Whether `bytes` start with a valid header for segment `n`.
pub(crate) fn segment_header_ok(bytes: &[u8], n: u64) -> bool {
    bytes.get(..16).is_some_and(|h| h == segment_header(n))
}

fn header_crc(segment: u64, offset: u64, head12: &[u8]) -> u32 {
    let mut pos = [0u8; 16];
    pos[..8].copy_from_slice(&segment.to_le_bytes());
    pos[8..].copy_from_slice(&offset.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&pos), head12)
}

/// Appends one frame holding `payload`, to be written at `offset` of
/// segment `segment`.
#[cfg(test)]
pub(crate) fn encode_frame(out: &mut Vec<u8>, segment: u64, offset: u64, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    out.extend_from_slice(payload);
    seal_frame(&mut out[start..], segment, offset, FrameKind::Record);
}

/// Fills in the header of a frame whose payload already follows 16
/// reserved bytes in `frame`, so records are encoded straight into the
/// write buffer without a copy.
pub(crate) fn seal_frame(frame: &mut [u8], segment: u64, offset: u64, kind: FrameKind) {
    let (h, payload) = frame.split_at_mut(FRAME_HEADER_LEN.min(frame.len()));
    if h.len() < FRAME_HEADER_LEN {
        return;
    }
    h[..4].copy_from_slice(kind.magic());
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..12].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let hc = header_crc(segment, offset, &h[..12]);
    h[12..16].copy_from_slice(&hc.to_le_bytes());
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    let s = b.get(i..i.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// A frame header that passed its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// What the frame holds.
    pub kind: FrameKind,
    /// Payload length.
    pub len: u32,
    /// Expected payload checksum.
    pub crc: u32,
}

/// Why bytes at a position are not a valid frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Not a frame header here (magic, checksum, zero or oversized length).
    BadHeader,
    /// A valid header whose payload runs past the end of the data.
    Truncated,
    /// A valid header whose payload checksum does not match.
    BadPayload,
}

/// Checks the frame header at `bytes[at..]`, which sits at `offset` in
/// segment `segment`.
pub(crate) fn parse_header(bytes: &[u8], at: usize, segment: u64, offset: u64, max_len: u32) -> Option<FrameHeader> {
    let h = bytes.get(at..at.checked_add(FRAME_HEADER_LEN)?)?;
    let kind = FrameKind::of(&h[..4])?;
    let len = u32_at(h, 4)?;
    let crc = u32_at(h, 8)?;
    let hc = u32_at(h, 12)?;
    if hc != header_crc(segment, offset, &h[..12]) || len == 0 || len > max_len {
        return None;
    }
    Some(FrameHeader { kind, len, crc })
}

/// Why a frame did not read, with its header when that much verified
/// (the header says how long the damaged payload is).
pub(crate) type FrameFailure = (FrameError, Option<FrameHeader>);

/// Reads the frame at `bytes[at..]` (file offset `offset`): its kind, its
/// payload and the index just past it.
pub(crate) fn read_frame(
    bytes: &[u8],
    at: usize,
    segment: u64,
    offset: u64,
    max_len: u32,
) -> Result<(FrameKind, &[u8], usize), FrameFailure> {
    let h = parse_header(bytes, at, segment, offset, max_len).ok_or((FrameError::BadHeader, None))?;
    let start = at + FRAME_HEADER_LEN;
    let end = start.checked_add(h.len as usize).ok_or((FrameError::Truncated, Some(h)))?;
    let payload = bytes.get(start..end).ok_or((FrameError::Truncated, Some(h)))?;
    if crc32c::crc32c(payload) != h.crc {
        return Err((FrameError::BadPayload, Some(h)));
    }
    Ok((h.kind, payload, end))
}

/// Finds the next index `>= from` where a valid frame header starts, for
/// resynchronising after damage. `base` is the file offset of `bytes[0]`.
pub(crate) fn find_next_header(bytes: &[u8], from: usize, segment: u64, base: u64, max_len: u32) -> Option<usize> {
    let mut i = from;
    while i + FRAME_HEADER_LEN <= bytes.len() {
        let window = bytes.get(i..)?;
        let rel = window.windows(4).position(|w| FrameKind::of(w).is_some())?;
        let at = i + rel;
        if parse_header(bytes, at, segment, base.wrapping_add(at as u64), max_len).is_some() {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

/// A record's identity read straight from its protobuf bytes (field 1
/// `session_id`, field 2 `seq`) without decoding the rest: loading moves a
/// carried copy's location this way.
///
/// Returns where the session id lies in `payload` (checked to be UTF-8;
/// empty for registry records) and the sequence number.
pub(crate) fn peek_identity(payload: &[u8]) -> Option<(Range<usize>, u64)> {
    let mut i = 0usize;
    let mut sid = 0..0;
    let mut seq = 0u64;
    while i < payload.len() {
        let (tag, n) = varint(payload.get(i..)?)?;
        i += n;
        let field = tag >> 3;
        match tag & 7 {
            0 => {
                let (v, n) = varint(payload.get(i..)?)?;
                i += n;
                if field == 2 {
                    seq = v;
                }
            }
            1 => i = i.checked_add(8)?,
            2 => {
                let (len, n) = varint(payload.get(i..)?)?;
                i += n;
                let end = i.checked_add(usize::try_from(len).ok()?)?;
                let body = payload.get(i..end)?;
                if field == 1 {
                    std::str::from_utf8(body).ok()?;
                    sid = i..end;
                }
                i = end;
            }
            5 => i = i.checked_add(4)?,
            _ => return None,
        }
        if field == 0 {
            return None;
        }
    }
    if i != payload.len() {
        return None;
    }
    Some((sid, seq))
}

/// Like [`peek_identity`] but tolerant of damage after the first two
/// fields: used only to guess which session a corrupt frame belonged to.
pub(crate) fn salvage_session(payload: &[u8]) -> Option<String> {
    // prost writes fields in number order, so a session record starts with
    // field 1 (tag 0x0a) followed by its length.
    if payload.first() != Some(&0x0a) {
        return None;
    }
    let (len, n) = varint(payload.get(1..)?)?;
    let end = (1 + n).checked_add(usize::try_from(len).ok()?)?;
    let body = payload.get(1 + n..end)?;
    let s = std::str::from_utf8(body).ok()?;
    let printable = !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| (0x21..0x7f).contains(&b));
    printable.then(|| s.to_string())
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use macp_wire::storage::{record::Fact, Record};
    use proptest::prelude::*;
    use prost::Message as _;

    fn rec(sid: &str, seq: u64) -> Record {
        Record { session_id: sid.into(), seq, at_unix_ms: 5, fact: Some(Fact::PolicyUnregistered("p".into())) }
    }

    #[test]
    fn frame_roundtrip_and_position_binding() {
        let payload = rec("s1", 7).encode_to_vec();
        let mut buf = vec![0u8; 16];
        encode_frame(&mut buf, 3, 16, &payload);
        let (kind, p, end) = read_frame(&buf, 16, 3, 16, 1 << 20).expect("frame");
        assert_eq!(kind, FrameKind::Record);
        assert_eq!(p, payload.as_slice());
        assert_eq!(end, buf.len());
        // The same bytes at another offset or segment are not a frame.
        assert!(read_frame(&buf, 16, 3, 17, 1 << 20).is_err());
        assert!(read_frame(&buf, 16, 4, 16, 1 << 20).is_err());
        let (sid, seq) = peek_identity(p).expect("identity");
        assert_eq!((&p[sid], seq), (&b"s1"[..], 7));
        assert_eq!(salvage_session(p).as_deref(), Some("s1"));
    }

    #[test]
    fn damaged_payload_is_detected_and_resync_finds_next_frame() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 0, &rec("a", 1).encode_to_vec());
        let second = buf.len();
        encode_frame(&mut buf, 1, second as u64, &rec("b", 1).encode_to_vec());
        buf[20] ^= 0xff;
        assert_eq!(read_frame(&buf, 0, 1, 0, 1 << 20).unwrap_err().0, FrameError::BadPayload);
        buf[1] ^= 0xff;
        assert_eq!(read_frame(&buf, 0, 1, 0, 1 << 20).unwrap_err().0, FrameError::BadHeader);
        assert_eq!(find_next_header(&buf, 1, 1, 0, 1 << 20), Some(second));
    }

    #[test]
    fn the_kind_is_covered_by_the_header_checksum() {
        let payload = rec("s1", 2).encode_to_vec();
        let mut buf = vec![0u8; FRAME_HEADER_LEN];
        buf.extend_from_slice(&payload);
        seal_frame(&mut buf, 5, 64, FrameKind::Carried);
        assert_eq!(read_frame(&buf, 0, 5, 64, 1 << 20).expect("frame").0, FrameKind::Carried);
        assert_eq!(find_next_header(&buf, 0, 5, 64, 1 << 20), Some(0));
        buf[..4].copy_from_slice(FRAME_MAGIC);
        assert!(read_frame(&buf, 0, 5, 64, 1 << 20).is_err(), "a carried copy cannot pass for a record");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), at in 0usize..600) {
            let _ = read_frame(&bytes, at, 1, at as u64, 1 << 20);
            let _ = find_next_header(&bytes, at, 1, 0, 1 << 20);
            let _ = peek_identity(&bytes);
            let _ = salvage_session(&bytes);
            let _ = segment_header_ok(&bytes, 1);
        }
    }
}
