//! The checkpoint file (data-directory format 2).
//!
//! ```text
//! "MACPCKP2" | covered segment u64 | covered offset u64
//!            | open_state len u64 | locations len u64
//!            | open_state crc32c u32 | locations crc32c u32 | header crc32c u32
//! open_state bytes (opaque: the kernel's open state)
//! locations  (the open sessions' record locations, see `locs.rs`)
//! ```
//!
//! Everything in the log before the covered position is inside the open
//! state, or belongs to a session that had ended before it (and is in the
//! ended-session index, which is made durable before the file is written).
//! The locations let a restart answer history reads of open sessions without
//! scanning the log. Both sections follow open sessions only, so the file's
//! size does too.

use std::ops::Range;

use macp_storage::LogPos;

use crate::locs::OpenMap;

/// First bytes of a format-2 checkpoint.
const MAGIC: &[u8; 8] = b"MACPCKP2";
const HEADER_LEN: usize = 52;

/// Encodes a checkpoint covering the log up to `pos`.
pub(crate) fn encode(pos: LogPos, open_state: &[u8], open: &OpenMap) -> Vec<u8> {
    let mut locs = Vec::with_capacity(open.sessions() * 48 + open.locations() * 8);
    open.encode_into(&mut locs);
    let mut b = Vec::with_capacity(HEADER_LEN + open_state.len() + locs.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&pos.segment.to_le_bytes());
    b.extend_from_slice(&pos.offset.to_le_bytes());
    b.extend_from_slice(&(open_state.len() as u64).to_le_bytes());
    b.extend_from_slice(&(locs.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(open_state).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(&locs).to_le_bytes());
    let hc = crc32c::crc32c(&b);
    b.extend_from_slice(&hc.to_le_bytes());
    b.extend_from_slice(open_state);
    b.extend_from_slice(&locs);
    b
}

/// A parsed checkpoint: the covered position, where the open state lies in
/// the file's bytes, and the open sessions' locations.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub pos: LogPos,
    pub open_state: Range<usize>,
    pub open: OpenMap,
}

/// Parses a checkpoint file; `Err` says why it cannot be trusted.
pub(crate) fn parse(b: &[u8]) -> Result<Parsed, String> {
    let h = b.get(..HEADER_LEN).ok_or("shorter than its header")?;
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let u32_at = |i: usize| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&h[i..i + 4]);
        u32::from_le_bytes(a)
    };
    if &h[..8] != MAGIC {
        return Err(if h.starts_with(b"MACPCKP") {
            format!("checkpoint format '{}' is not format 2", String::from_utf8_lossy(&h[..8]))
        } else {
            "bad magic".into()
        });
    }
    if crc32c::crc32c(&h[..48]) != u32_at(48) {
        return Err("header checksum mismatch".into());
    }
    let (state_len, locs_len) = (u64_at(24), u64_at(32));
    let body = (b.len() - HEADER_LEN) as u64;
    if state_len.checked_add(locs_len) != Some(body) {
        return Err(format!("section lengths {state_len} + {locs_len} do not match the file's {body} bytes"));
    }
    // Both fit in the file, so they fit in usize.
    let state = HEADER_LEN..HEADER_LEN + state_len as usize;
    let locs = &b[state.end..];
    if crc32c::crc32c(&b[state.clone()]) != u32_at(40) {
        return Err("open state checksum mismatch".into());
    }
    if crc32c::crc32c(locs) != u32_at(44) {
        return Err("locations checksum mismatch".into());
    }
    let open = OpenMap::decode(locs).map_err(|e| format!("locations do not decode: {e}"))?;
    Ok(Parsed { pos: LogPos::new(u64_at(8), u64_at(16)), open_state: state, open })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locs::Loc;

    #[test]
    fn roundtrip_and_every_bit_flip_is_detected() {
        let mut open = OpenMap::default();
        open.push("s1", Loc { seq: 1, segment: 2, offset: 16, len: 30 });
        let b = encode(LogPos::new(3, 99), b"state", &open);
        let p = parse(&b).expect("valid");
        assert_eq!(p.pos, LogPos::new(3, 99));
        assert_eq!(&b[p.open_state], b"state");
        assert_eq!(p.open.get("s1").map(<[Loc]>::len), Some(1));
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(parse(&d).is_err(), "flip at {i} undetected");
        }
        assert!(parse(&b[..b.len() - 1]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(b"MACPCKP1 an old checkpoint of format 1 .......................").is_err());
    }
}
