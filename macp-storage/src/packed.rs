//! Records as the memory store holds them: each one LZ4-compressed against
//! the store's dictionary when that makes it shorter.
//!
//! Why: in a memory-only server the stored history is the largest cost of
//! an open session after the kernel's state, and records of one
//! deployment repeat each other — the same modes, message types, intents,
//! policy and sender prefixes, and within a SessionStart the initiator's
//! name again in the participant list. Compressed against an earlier
//! SessionStart a benchmark SessionStart went from about 270 to about 120
//! bytes (issue 15: 100,000 open sessions in 100 MiB). LZ4 (`lz4_flex`,
//! pure Rust, no unsafe with the `safe-*` features) compresses a record of
//! that size in about a microsecond; history is decompressed only when it
//! is read (replay to a subscriber, WhatIf, a restart of a test store).
//!
//! A frame is `varint((raw length << 2) | kind)`, then for compressed
//! kinds `varint(stored length)`, then the stored bytes. Kinds: raw bytes,
//! LZ4 without a dictionary (before the store had one), LZ4 against the
//! dictionary. The dictionary never changes once chosen, so every frame
//! stays readable for the store's lifetime.

use prost::encoding::{decode_varint, encode_varint, encoded_len_varint};

use lz4_flex::block::{compress_into, compress_into_with_dict, decompress_into, decompress_into_with_dict};

const RAW: u64 = 0;
const LZ4: u64 = 1;
const LZ4_DICT: u64 = 2;

/// Largest record taken as the dictionary: LZ4 looks back 64 KiB at most,
/// and a small dictionary keeps each compression cheap.
pub(crate) const MAX_DICT_LEN: usize = 2048;

/// Appends `raw` to `out` as one frame; `scratch` is reused between calls.
/// `first` says the frame opens an allocation of its own, which is then
/// made exactly as large as the frame.
pub(crate) fn push(out: &mut Vec<u8>, raw: &[u8], dict: Option<&[u8]>, scratch: &mut Vec<u8>, first: bool) {
    scratch.clear();
    scratch.resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
    let compressed = match dict {
        Some(d) => compress_into_with_dict(raw, scratch, d).map(|n| (n, LZ4_DICT)),
        None => compress_into(raw, scratch).map(|n| (n, LZ4)),
    };
    let (stored, kind) = match compressed {
        Ok((n, kind)) if n + encoded_len_varint(n as u64) < raw.len() => (&scratch[..n], kind),
        _ => (raw, RAW),
    };
    let head = ((raw.len() as u64) << 2) | kind;
    let mut need = encoded_len_varint(head) + stored.len();
    if kind != RAW {
        need += encoded_len_varint(stored.len() as u64);
    }
    if first {
        out.reserve_exact(need);
    } else {
        out.reserve(need);
    }
    encode_varint(head, out);
    if kind != RAW {
        encode_varint(stored.len() as u64, out);
    }
    out.extend_from_slice(stored);
}

/// The next frame of `buf`, decompressed into `scratch`; `None` at the end
/// or on bytes that are not a frame (which [`push`] never writes).
pub(crate) fn next<'s>(buf: &mut &[u8], dict: Option<&[u8]>, scratch: &'s mut Vec<u8>) -> Option<&'s [u8]> {
    if buf.is_empty() {
        return None;
    }
    let head = decode_varint(buf).ok()?;
    let (raw_len, kind) = (usize::try_from(head >> 2).ok()?, head & 3);
    let stored_len = if kind == RAW { raw_len } else { usize::try_from(decode_varint(buf).ok()?).ok()? };
    let stored = buf.get(..stored_len)?;
    *buf = &buf[stored_len..];
    scratch.clear();
    match kind {
        RAW => scratch.extend_from_slice(stored),
        LZ4 | LZ4_DICT => {
            // LZ4 expands a byte into at most 255, so a larger length is
            // damage; checked before it sizes an allocation.
            if raw_len > stored.len().saturating_mul(255) {
                return None;
            }
            scratch.resize(raw_len, 0);
            let n = match (kind, dict) {
                (LZ4_DICT, Some(d)) => decompress_into_with_dict(stored, scratch, d).ok()?,
                (LZ4_DICT, None) => return None,
                _ => decompress_into(stored, scratch).ok()?,
            };
            if n != raw_len {
                return None;
            }
        }
        _ => return None,
    }
    Some(&scratch[..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any sequence of byte strings reads back as written, with or
        /// without a dictionary, whichever way each one was stored.
        #[test]
        fn frames_read_back_as_written(
            records in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..300),
                    "[a-c]{0,400}".prop_map(String::into_bytes),
                ],
                0..12,
            ),
            dict in proptest::option::of("[a-c]{0,200}".prop_map(String::into_bytes)),
        ) {
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            for (i, r) in records.iter().enumerate() {
                push(&mut out, r, dict.as_deref(), &mut scratch, i == 0);
            }
            let mut buf = &out[..];
            let mut read = Vec::new();
            while let Some(r) = next(&mut buf, dict.as_deref(), &mut scratch) {
                read.push(r.to_vec());
            }
            prop_assert_eq!(read, records);
        }
    }

    proptest! {
        /// Bytes that are not frames (damaged memory, a bug) end the read
        /// or read as some bytes; they never panic.
        #[test]
        fn any_bytes_read_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            dict in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..100)),
        ) {
            let mut buf = &bytes[..];
            let mut scratch = Vec::new();
            let mut frames = 0;
            while next(&mut buf, dict.as_deref(), &mut scratch).is_some() {
                frames += 1;
                prop_assert!(frames <= bytes.len(), "every frame consumes input");
            }
        }
    }

    /// A record like the dictionary takes a fraction of its size; one that
    /// does not compress is stored as it is, one varint longer.
    #[test]
    fn similar_records_shrink_and_random_ones_do_not_grow() {
        let dict = b"macp.mode.decision.v1 SessionStart bench-open-1111 participants bench-open-1111-p".to_vec();
        let similar = b"macp.mode.decision.v1 SessionStart bench-open-2222 participants bench-open-2222-p";
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        push(&mut out, similar, Some(&dict), &mut scratch, true);
        assert!(out.len() < similar.len() / 2, "{} of {}", out.len(), similar.len());
        let random: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut out = Vec::new();
        push(&mut out, &random, Some(&dict), &mut scratch, true);
        assert_eq!(out.len(), random.len() + encoded_len_varint((random.len() as u64) << 2));
        assert_eq!(out.capacity(), out.len(), "a first frame takes no spare capacity");
        assert_eq!(next(&mut &out[..], Some(&dict), &mut scratch), Some(&random[..]));
        assert_eq!(next(&mut &b"\x09\x05ab"[..], Some(&dict), &mut scratch), None, "a frame cut short");
    }
}
