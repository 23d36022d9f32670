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

use std::io;
use std::ops::Range;

use macp_storage::LogPos;

use crate::locs::OpenMap;
use crate::vfs::VfsFile;

/// First bytes of a format-2 checkpoint.
const MAGIC: &[u8; 8] = b"MACPCKP2";
pub(crate) const HEADER_LEN: usize = 52;

/// Length and CRC32C of one section of the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Section {
    pub len: u64,
    pub crc: u32,
}

impl Section {
    /// The section holding `bytes`.
    pub fn of(bytes: &[u8]) -> Section {
        Section { len: bytes.len() as u64, crc: crc32c::crc32c(bytes) }
    }
}

/// The header of a checkpoint covering the log up to `pos`, whose two
/// sections follow it.
pub(crate) fn header(pos: LogPos, open_state: Section, locations: Section) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&pos.segment.to_le_bytes());
    b[16..24].copy_from_slice(&pos.offset.to_le_bytes());
    b[24..32].copy_from_slice(&open_state.len.to_le_bytes());
    b[32..40].copy_from_slice(&locations.len.to_le_bytes());
    b[40..44].copy_from_slice(&open_state.crc.to_le_bytes());
    b[44..48].copy_from_slice(&locations.crc.to_le_bytes());
    let hc = crc32c::crc32c(&b[..48]);
    b[48..].copy_from_slice(&hc.to_le_bytes());
    b
}

/// The locations section of the open sessions.
pub(crate) fn locations(open: &OpenMap) -> Vec<u8> {
    let mut locs = Vec::with_capacity(open.sessions() * 48 + open.locations() * 8);
    open.encode_into(&mut locs);
    locs
}

/// Encodes a checkpoint covering the log up to `pos` in one buffer (the
/// file [`SectionWriter`] and [`header`] write piece by piece).
#[cfg(test)]
pub(crate) fn encode(pos: LogPos, open_state: &[u8], open: &OpenMap) -> Vec<u8> {
    let locs = locations(open);
    let mut b = header(pos, Section::of(open_state), Section::of(&locs)).to_vec();
    b.extend_from_slice(open_state);
    b.extend_from_slice(&locs);
    b
}

/// Writes a section into a file from a given offset on, in chunks of
/// [`SectionWriter::CHUNK`] bytes, keeping its length and CRC32C: the open
/// state is streamed into the checkpoint file this way instead of being
/// built in memory first (a checkpoint of 100,000 open sessions held ~70 MB
/// that the allocator kept resident afterwards; issue 15).
pub(crate) struct SectionWriter<'a, F: VfsFile> {
    file: &'a F,
    offset: u64,
    chunk: usize,
    buf: Vec<u8>,
    section: Section,
}

impl<'a, F: VfsFile> SectionWriter<'a, F> {
    /// Bytes written to the file at a time.
    pub const CHUNK: usize = 256 << 10;

    /// A section starting at `offset` of `file`.
    pub fn new(file: &'a F, offset: u64) -> Self {
        Self::with_chunk(file, offset, Self::CHUNK)
    }

    fn with_chunk(file: &'a F, offset: u64, chunk: usize) -> Self {
        SectionWriter { file, offset, chunk, buf: Vec::with_capacity(chunk), section: Section::default() }
    }

    /// Appends `b` to the file.
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.file.write_all_at(b, self.offset)?;
        self.section.crc = crc32c::crc32c_append(self.section.crc, b);
        self.section.len += b.len() as u64;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn write_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.put(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    /// Writes what is buffered; returns the section and the offset after it.
    pub fn finish(mut self) -> io::Result<(Section, u64)> {
        self.write_buffered()?;
        Ok((self.section, self.offset))
    }
}

impl<F: VfsFile> io::Write for SectionWriter<'_, F> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.buf.len() + b.len() > self.chunk {
            self.write_buffered()?;
        }
        if b.len() >= self.chunk {
            // Large pieces go straight to the file (the buffer is empty now).
            self.put(b)?;
        } else {
            self.buf.extend_from_slice(b);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

    /// The streamed file is byte for byte the one-buffer encoding, however
    /// the writes are cut against the chunk size.
    #[test]
    fn a_streamed_checkpoint_is_the_encoded_one() {
        use crate::vfs::{SimFs, Vfs};
        use std::io::Write;
        let mut open = OpenMap::default();
        open.push("s1", Loc { seq: 1, segment: 2, offset: 16, len: 30 });
        open.push("s2", Loc { seq: 1, segment: 2, offset: 90, len: 12 });
        let state: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let pos = LogPos::new(3, 99);
        let fs = SimFs::new();
        for (chunk, piece) in [(64, 1), (64, 5), (64, 64), (64, 200), (4096, 333)] {
            let path = std::path::Path::new("/ckp");
            let f = fs.open(path, true).expect("create");
            f.set_len(0).expect("truncate");
            let mut w = SectionWriter::with_chunk(&f, HEADER_LEN as u64, chunk);
            for p in state.chunks(piece) {
                w.write_all(p).expect("write");
            }
            let (section, at) = w.finish().expect("finish");
            assert_eq!(section, Section::of(&state));
            assert_eq!(at, (HEADER_LEN + state.len()) as u64);
            let locs = locations(&open);
            f.write_all_at(&locs, at).expect("locations");
            f.write_all_at(&header(pos, section, Section::of(&locs)), 0).expect("header");
            let file = fs.read_file(path).expect("written");
            assert_eq!(file, encode(pos, &state, &open), "chunk {chunk}, pieces of {piece}");
            let p = parse(&file).expect("valid");
            assert_eq!(&file[p.open_state], &state[..]);
        }
    }

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
