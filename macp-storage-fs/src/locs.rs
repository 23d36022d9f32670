//! Where records sit in the log, and the map of open sessions' records.
//!
//! A [`Loc`] names one record frame (segment, offset, payload length) and
//! the record's sequence number, so a history read is one positioned read
//! per record and needs no scan. [`OpenMap`] holds the locations of every
//! session that has not ended — in memory, bounded by open sessions — and
//! is written into every checkpoint, so a restart reads it back instead of
//! scanning history. When a session ends its locations move into the
//! ended-session index (`index.rs`) and leave memory.
//!
//! Per segment the map also counts how many open records (and bytes) it
//! holds: a segment still referenced by an open session cannot be retired,
//! and compaction decides from these counts whether carrying the few open
//! records out of an old segment is worth it.

use hashbrown::HashMap;
use std::collections::BTreeMap;

use macp_storage::session_key::{KeyRef, SessionKey};
use macp_storage::LogPos;

use crate::frame::FRAME_HEADER_LEN;

/// One record frame in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// The record's sequence number in its session.
    pub seq: u64,
    /// Segment number.
    pub segment: u64,
    /// Offset of the frame header in the segment.
    pub offset: u64,
    /// Payload length (the frame is [`FRAME_HEADER_LEN`] longer).
    pub len: u32,
}

impl Loc {
    /// The frame's position.
    pub fn pos(&self) -> LogPos {
        LogPos::new(self.segment, self.offset)
    }

    /// Bytes the frame takes in its segment.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.len)
    }
}

/// How much of one segment open sessions still use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SegUse {
    /// Open records in the segment.
    pub refs: u64,
    /// Their frame bytes.
    pub bytes: u64,
}

/// One open session's record locations: most open sessions have only
/// their SessionStart, held inline instead of in a one-element vector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Locs {
    One(Loc),
    Many(Vec<Loc>),
}

impl Locs {
    fn as_slice(&self) -> &[Loc] {
        match self {
            Locs::One(l) => std::slice::from_ref(l),
            Locs::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Loc] {
        match self {
            Locs::One(l) => std::slice::from_mut(l),
            Locs::Many(v) => v,
        }
    }

    fn push(&mut self, loc: Loc) {
        match self {
            Locs::One(first) => *self = Locs::Many(vec![*first, loc]),
            Locs::Many(v) => v.push(loc),
        }
    }

    fn into_vec(self) -> Vec<Loc> {
        match self {
            Locs::One(l) => vec![l],
            Locs::Many(v) => v,
        }
    }

    fn from_vec(mut v: Vec<Loc>) -> Locs {
        if v.len() == 1 {
            Locs::One(v[0])
        } else {
            v.shrink_to_fit();
            Locs::Many(v)
        }
    }
}

/// Session id → locations of its records, for sessions that have not ended.
///
/// A `hashbrown` map rather than std's, for its `Equivalent` lookups: the
/// key is a [`SessionKey`], and a `&str` id is looked up as a [`KeyRef`]
/// without building a key.
#[derive(Debug, Default)]
pub(crate) struct OpenMap {
    sessions: HashMap<SessionKey, Locs>,
    by_segment: BTreeMap<u64, SegUse>,
    locs: usize,
}

impl OpenMap {
    fn count(&mut self, loc: &Loc, add: bool) {
        // Appends go to the newest segment: look there first.
        let u = match self.by_segment.last_entry() {
            Some(e) if *e.key() == loc.segment => e.into_mut(),
            _ => self.by_segment.entry(loc.segment).or_default(),
        };
        if add {
            u.refs += 1;
            u.bytes += loc.frame_len();
        } else {
            u.refs = u.refs.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(loc.frame_len());
            if u.refs == 0 {
                self.by_segment.remove(&loc.segment);
            }
        }
    }

    /// Adds a record's location (log order within a session).
    pub fn push(&mut self, session_id: &str, loc: Loc) {
        match self.sessions.get_mut(&KeyRef::of(session_id)) {
            Some(v) => v.push(loc),
            None => {
                self.sessions.insert(SessionKey::new(session_id), Locs::One(loc));
            }
        }
        self.locs += 1;
        self.count(&loc, true);
    }

    /// The locations of an open session.
    pub fn get(&self, session_id: &str) -> Option<&[Loc]> {
        self.sessions.get(&KeyRef::of(session_id)).map(Locs::as_slice)
    }

    /// Removes a session (it ended) and returns its locations.
    pub fn take(&mut self, session_id: &str) -> Option<Vec<Loc>> {
        let locs = self.sessions.remove(&KeyRef::of(session_id))?.into_vec();
        self.locs -= locs.len();
        for l in &locs {
            self.count(l, false);
        }
        Some(locs)
    }

    /// Moves record `seq` of a session to `to` (a carried copy). Returns
    /// whether the record was found.
    pub fn relocate(&mut self, session_id: &str, to: Loc) -> bool {
        let Some(v) = self.sessions.get_mut(&KeyRef::of(session_id)).map(Locs::as_mut_slice) else { return false };
        let i = match v.binary_search_by_key(&to.seq, |l| l.seq) {
            Ok(i) => i,
            Err(_) => match v.iter().position(|l| l.seq == to.seq) {
                Some(i) => i,
                None => return false,
            },
        };
        let from = std::mem::replace(&mut v[i], to);
        self.count(&from, false);
        self.count(&to, true);
        true
    }

    /// Open sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Open records.
    pub fn locations(&self) -> usize {
        self.locs
    }

    /// How much open sessions use of `segment`.
    pub fn segment_use(&self, segment: u64) -> SegUse {
        self.by_segment.get(&segment).copied().unwrap_or_default()
    }

    /// Segments holding open records, with their use.
    pub fn used_segments(&self) -> impl Iterator<Item = (u64, SegUse)> + '_ {
        self.by_segment.iter().map(|(s, u)| (*s, *u))
    }

    /// Every open record in `segment`, in segment order (compaction's
    /// work list). One pass over the map.
    pub fn records_in(&self, segment: u64) -> Vec<(Box<str>, Loc)> {
        let mut out: Vec<(Box<str>, Loc)> = Vec::new();
        for (sid, locs) in &self.sessions {
            for l in locs.as_slice().iter().filter(|l| l.segment == segment) {
                out.push((sid.text(), *l));
            }
        }
        out.sort_by_key(|(_, l)| l.offset);
        out
    }

    /// Appends the map's encoding (the checkpoint's location section).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        put_varint(out, self.sessions.len() as u64);
        for (sid, locs) in &self.sessions {
            let sid = sid.text();
            put_varint(out, sid.len() as u64);
            out.extend_from_slice(sid.as_bytes());
            encode_locs(out, locs.as_slice());
        }
    }

    /// Decodes [`OpenMap::encode_into`]; `Err` says what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<OpenMap, String> {
        let mut map = OpenMap::default();
        let mut i = 0usize;
        let n = get_varint(bytes, &mut i).ok_or("session count")?;
        for _ in 0..n {
            let len = get_varint(bytes, &mut i).and_then(|l| usize::try_from(l).ok()).ok_or("session id length")?;
            let end = i.checked_add(len).ok_or("session id length")?;
            let sid = bytes.get(i..end).and_then(|b| std::str::from_utf8(b).ok()).ok_or("session id")?;
            i = end;
            let locs = decode_locs(bytes, &mut i)?;
            if map.sessions.contains_key(&KeyRef::of(sid)) {
                return Err(format!("session {sid} appears twice"));
            }
            for l in &locs {
                map.count(l, true);
            }
            map.locs += locs.len();
            map.sessions.insert(SessionKey::new(sid), Locs::from_vec(locs));
        }
        if i != bytes.len() {
            return Err("trailing bytes after the last session".into());
        }
        Ok(map)
    }
}

/// Appends a location list: count, then `seq, segment, offset, len` each.
pub(crate) fn encode_locs(out: &mut Vec<u8>, locs: &[Loc]) {
    put_varint(out, locs.len() as u64);
    for l in locs {
        put_varint(out, l.seq);
        put_varint(out, l.segment);
        put_varint(out, l.offset);
        put_varint(out, u64::from(l.len));
    }
}

/// Reads a location list written by [`encode_locs`] at `bytes[*i..]`.
pub(crate) fn decode_locs(bytes: &[u8], i: &mut usize) -> Result<Vec<Loc>, String> {
    let n = get_varint(bytes, i).ok_or("location count")?;
    // Each location takes at least 4 bytes: a count beyond that is damage,
    // not a reason to allocate.
    if n > (bytes.len() / 4) as u64 {
        return Err(format!("location count {n} exceeds the data"));
    }
    let mut locs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut next = || get_varint(bytes, i).ok_or("location");
        let (seq, segment, offset) = (next()?, next()?, next()?);
        let len = u32::try_from(next()?).map_err(|_| "location length")?;
        locs.push(Loc { seq, segment, offset, len });
    }
    Ok(locs)
}

/// LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint at `bytes[*i..]`, advancing `i`.
pub(crate) fn get_varint(bytes: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for k in 0..10 {
        let b = *bytes.get(*i)?;
        *i += 1;
        v |= u64::from(b & 0x7f) << (7 * k);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The map answers for a canonical UUID id, for its uppercase spelling
        /// (a different id, kept as text) and for other text, each apart.
        #[test]
        fn uuid_keys_round_trip_and_stay_apart_from_text(b in any::<[u8; 16]>(), other in "[a-zA-Z0-9_-]{0,40}") {
            let id = SessionKey::Uuid(b).to_string();
            let upper = id.to_uppercase();
            let mut m = OpenMap::default();
            m.push(&id, loc(1, 1, 16));
            if upper != id {
                m.push(&upper, loc(1, 1, 64));
                prop_assert_eq!(m.get(&upper).map(<[Loc]>::len), Some(1));
            }
            if other != id && other != upper {
                prop_assert_eq!(m.get(&other), None);
                m.push(&other, loc(1, 2, 16));
                m.push(&other, loc(2, 2, 64));
                prop_assert_eq!(m.get(&other).map(<[Loc]>::len), Some(2));
            }
            prop_assert_eq!(m.get(&id), Some(&[loc(1, 1, 16)][..]));
            let back = OpenMap::decode(&{ let mut v = Vec::new(); m.encode_into(&mut v); v }).unwrap();
            prop_assert_eq!(back.sessions(), m.sessions());
            prop_assert_eq!(back.get(&id), m.get(&id));
            prop_assert_eq!(m.take(&id), Some(vec![loc(1, 1, 16)]));
            prop_assert_eq!(m.get(&id), None);
        }
    }

    fn loc(seq: u64, segment: u64, offset: u64) -> Loc {
        Loc { seq, segment, offset, len: 40 }
    }

    #[test]
    fn counts_follow_pushes_moves_and_ends() {
        let mut m = OpenMap::default();
        m.push("a", loc(1, 1, 16));
        m.push("a", loc(2, 2, 16));
        m.push("b", loc(1, 1, 72));
        assert_eq!(m.segment_use(1), SegUse { refs: 2, bytes: 112 });
        assert!(m.relocate("a", loc(1, 3, 16)));
        assert_eq!(m.segment_use(1).refs, 1);
        assert_eq!(m.segment_use(3).refs, 1);
        assert_eq!(m.records_in(1), vec![("b".into(), loc(1, 1, 72))]);
        assert_eq!(m.take("a").map(|v| v.len()), Some(2));
        assert_eq!((m.sessions(), m.locations()), (1, 1));
        assert_eq!(m.used_segments().map(|(s, _)| s).collect::<Vec<_>>(), vec![1]);
        let mut buf = Vec::new();
        m.encode_into(&mut buf);
        let back = OpenMap::decode(&buf).expect("decodes");
        assert_eq!(back.get("b"), Some(&[loc(1, 1, 72)][..]));
        assert_eq!(back.segment_use(1), m.segment_use(1));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = OpenMap::decode(&bytes);
            let mut i = 0;
            let _ = decode_locs(&bytes, &mut i);
        }
    }
}
