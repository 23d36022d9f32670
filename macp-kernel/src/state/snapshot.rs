//! Checkpoints: the whole kernel state as deterministic bytes.
//!
//! Storage writes a checkpoint so recovery replays only the log after it.
//! The same bytes double as the kernel's fingerprint: two kernels with equal
//! snapshots are in the same state, which is how replay equivalence is
//! tested. The format is postcard over plain structs; protobuf messages
//! inside are kept as their protobuf encoding.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use macp_wire::v1::{ModeDescriptor, PolicyDescriptor, SessionState};
use prost::Message as _;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

use super::State;
use crate::session::{Activity, Rare, SeenIds, Session};

/// Bumped whenever the layout or its meaning changes. Format 2 holds open
/// and suspended sessions only (ended sessions live in storage); a format 1
/// snapshot also held ended sessions and is not restored: storage that
/// carries one replays its log instead (see `macp-storage-fs`).
const SNAPSHOT_FORMAT: u32 = 2;

/// The reading side of a checkpoint (the writing side is [`KernelSnapRef`]).
#[derive(Deserialize)]
struct KernelSnap {
    format: u32,
    registry_seq: u64,
    policies: Vec<Vec<u8>>,
    dynamic_modes: Vec<(Vec<u8>, bool)>,
    sessions: Vec<SessionSnap>,
    quarantined: Vec<String>,
}

#[derive(Deserialize)]
struct SessionSnap {
    id: String,
    mode: String,
    mode_version: String,
    configuration_version: String,
    policy: Vec<u8>,
    initiator: String,
    participants: Vec<String>,
    context_id: String,
    extension_keys: Vec<String>,
    started_at_ms: i64,
    deadline_ms: i64,
    max_suspend_ms: i64,
    state: i32,
    suspended_at_ms: Option<i64>,
    suspended_total_ms: i64,
    seq: u64,
    seen: Vec<String>,
    activity: Vec<(String, i64, u32)>,
    resolution: Option<Vec<u8>>,
    initiator_only_commitment: bool,
    mode_state: Vec<u8>,
}

/// The writing side of [`KernelSnap`]: the same layout, borrowed from the
/// kernel. Building an owned `KernelSnap` first copied the whole state (every
/// string of every session) just to serialize it, doubling a checkpoint's peak
/// memory; the copy, freed in small pieces, then stayed resident. postcard
/// encodes `&str`/`String` and slices/`Vec`s identically, so the bytes are
/// exactly those of the owned form that [`State::restore`] reads.
#[derive(Serialize)]
struct KernelSnapRef<'a> {
    format: u32,
    registry_seq: u64,
    policies: Vec<Vec<u8>>,
    dynamic_modes: Vec<(Vec<u8>, bool)>,
    sessions: SessionsRef<'a>,
    quarantined: &'a BTreeSet<String>,
}

struct SessionsRef<'a>(&'a BTreeMap<Arc<str>, Box<Session>>);

impl Serialize for SessionsRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for s in self.0.values() {
            seq.serialize_element(&session_snap(s))?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct SessionSnapRef<'a> {
    id: &'a str,
    mode: &'a str,
    mode_version: &'a str,
    configuration_version: &'a str,
    policy: Vec<u8>,
    initiator: &'a str,
    participants: &'a [String],
    context_id: &'a str,
    extension_keys: &'a [String],
    started_at_ms: i64,
    deadline_ms: i64,
    max_suspend_ms: i64,
    state: i32,
    suspended_at_ms: Option<i64>,
    suspended_total_ms: i64,
    seq: u64,
    seen: SeenRef<'a>,
    activity: ActivityRef<'a>,
    resolution: Option<&'a [u8]>,
    initiator_only_commitment: bool,
    mode_state: Vec<u8>,
}

struct SeenRef<'a>(&'a SeenIds);

impl Serialize for SeenRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for id in self.0.iter() {
            seq.serialize_element(&*id)?;
        }
        seq.end()
    }
}

struct ActivityRef<'a>(&'a [(Arc<str>, Activity)]);

impl Serialize for ActivityRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for (who, a) in self.0 {
            seq.serialize_element(&(&**who, a.last_message_at_unix_ms, a.message_count))?;
        }
        seq.end()
    }
}

/// Why a checkpoint could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes are not a snapshot of a known format.
    #[error("checkpoint does not decode: {0}")]
    Decode(String),
    /// Written by a newer macp-rs.
    #[error("checkpoint format {0} is newer than this runtime understands ({SNAPSHOT_FORMAT})")]
    NewerFormat(u32),
    /// Written by an older macp-rs in a layout this one no longer restores.
    #[error("checkpoint format {0} is older than this runtime restores ({SNAPSHOT_FORMAT}); replay the log instead")]
    OlderFormat(u32),
}

impl State {
    /// The whole state as deterministic bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let snap = self.snapshot_ref();
        // Measure first, then write into an exact allocation: growing by
        // doubling would briefly hold up to twice the checkpoint's size.
        let size = postcard::serialize_with_flavor(&snap, postcard::ser_flavors::Size::default()).unwrap_or(0);
        postcard::to_extend(&snap, Vec::with_capacity(size)).unwrap_or_default()
    }

    /// The bytes of [`State::snapshot`], written into `out` as they are
    /// produced (postcard writes small pieces: `out` should buffer).
    pub fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        postcard::to_io(&self.snapshot_ref(), out).map(|_| ()).map_err(std::io::Error::other)
    }

    fn snapshot_ref(&self) -> KernelSnapRef<'_> {
        KernelSnapRef {
            format: SNAPSHOT_FORMAT,
            registry_seq: self.registry_seq,
            policies: self.policies.all().map(|p| p.encode_to_vec()).collect(),
            dynamic_modes: self.modes.dynamic_entries().map(|(d, st)| (d.encode_to_vec(), st)).collect(),
            sessions: SessionsRef(&self.sessions),
            quarantined: &self.quarantined,
        }
    }

    /// Rebuilds a state from [`State::snapshot`] bytes.
    pub fn restore(runtime_id: &str, ended_keep: usize, bytes: &[u8]) -> Result<State, SnapshotError> {
        let snap: KernelSnap = postcard::from_bytes(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if snap.format > SNAPSHOT_FORMAT {
            return Err(SnapshotError::NewerFormat(snap.format));
        }
        if snap.format < SNAPSHOT_FORMAT {
            return Err(SnapshotError::OlderFormat(snap.format));
        }
        let dec = |e: prost::DecodeError| SnapshotError::Decode(e.to_string());
        let mut k = State::new(runtime_id, ended_keep);
        k.registry_seq = snap.registry_seq;
        k.quarantined = snap.quarantined.into_iter().collect();
        for p in snap.policies {
            k.policies
                .insert(PolicyDescriptor::decode(p.as_slice()).map_err(dec)?)
                .map_err(|e| SnapshotError::Decode(e.to_string()))?;
        }
        for (d, st) in snap.dynamic_modes {
            k.modes.restore_dynamic(ModeDescriptor::decode(d.as_slice()).map_err(dec)?, st);
        }
        for s in snap.sessions {
            let policy = k
                .policies
                .bind(&PolicyDescriptor::decode(s.policy.as_slice()).map_err(dec)?)
                .map_err(|e| SnapshotError::Decode(e.to_string()))?;
            let mode_state = k.modes.for_restore(&s.mode).restore(&s.mode_state).map_err(SnapshotError::Decode)?;
            let state = SessionState::try_from(s.state).map_err(|e| SnapshotError::Decode(e.to_string()))?;
            if !matches!(state, SessionState::Open | SessionState::Suspended) {
                return Err(SnapshotError::Decode(format!(
                    "session {} is {state:?}: a checkpoint holds open and suspended sessions only",
                    s.id
                )));
            }
            let id: Arc<str> = s.id.into();
            let session = Session {
                id: id.clone(),
                binding: k.bindings.get(&s.mode, &s.mode_version, &s.configuration_version),
                policy,
                initiator: k.shared_initiator(&s.initiator),
                participants: s.participants.into_boxed_slice(),
                rare: None,
                started_at_ms: s.started_at_ms,
                deadline_ms: s.deadline_ms,
                max_suspend_ms: s.max_suspend_ms,
                state,
                seq: s.seq,
                seen: s.seen.into_iter().collect(),
                activity: Vec::new(),
                initiator_only_commitment: s.initiator_only_commitment,
                mode_state,
                timer_at: None,
            };
            let mut session = session;
            let rare = Rare {
                context_id: s.context_id,
                extension_keys: s.extension_keys,
                suspended_at_ms: s.suspended_at_ms,
                suspended_total_ms: s.suspended_total_ms,
                resolution: s.resolution.map(Vec::into_boxed_slice),
                mode_timer_floor: i64::MIN,
            };
            session.rare = (rare != Rare::default()).then(|| Box::new(rare));
            let activity: BTreeMap<String, Activity> = s
                .activity
                .into_iter()
                .map(|(w, last, n)| (w, Activity { last_message_at_unix_ms: last, message_count: n }))
                .collect();
            session.activity = activity.into_iter().map(|(w, a)| (session.name(&w), a)).collect();
            if session.is_live() {
                *k.live_by_initiator.entry(session.initiator.clone()).or_default() += 1;
            }
            k.timers.reindex(&mut session);
            k.sessions.insert(id, Box::new(session));
        }
        Ok(k)
    }
}

fn session_snap(s: &Session) -> SessionSnapRef<'_> {
    SessionSnapRef {
        id: &s.id,
        mode: &s.binding.mode,
        mode_version: &s.binding.mode_version,
        configuration_version: &s.binding.configuration_version,
        policy: s.policy.descriptor.encode_to_vec(),
        initiator: &s.initiator,
        participants: &s.participants,
        context_id: s.context_id(),
        extension_keys: s.extension_keys(),
        started_at_ms: s.started_at_ms,
        deadline_ms: s.deadline_ms,
        max_suspend_ms: s.max_suspend_ms,
        state: s.state as i32,
        suspended_at_ms: s.rare().suspended_at_ms,
        suspended_total_ms: s.rare().suspended_total_ms,
        seq: s.seq,
        seen: SeenRef(&s.seen),
        activity: ActivityRef(&s.activity),
        resolution: s.rare().resolution.as_deref(),
        initiator_only_commitment: s.initiator_only_commitment,
        mode_state: s.mode_state.snapshot(),
    }
}
