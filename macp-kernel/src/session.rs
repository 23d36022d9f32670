//! One session's state as the kernel keeps it.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use compact_str::CompactString;
use macp_wire::uuid_text;
use macp_wire::v1::{ParticipantActivity, SessionMetadata, SessionState};

use crate::error::{ErrorCode, KernelError};
use crate::mode::{ModeState, SessionView};
use crate::policy::BoundPolicy;

/// A participant's accepted-message activity (SessionMetadata field 10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Acceptance time of the sender's latest accepted message.
    pub last_message_at_unix_ms: i64,
    /// How many of its messages were accepted.
    pub message_count: u32,
}

/// Message ids a session has accepted (duplicate detection).
///
/// Most sessions see a handful of messages, and a `BTreeSet` allocates a
/// whole 11-slot node for its first entry; a sorted `Vec` holds them in
/// about a tenth of the space. Past [`SeenIds::SMALL`] entries the ids move to
/// a `BTreeSet`, so long sessions keep logarithmic inserts. A session that
/// has only started (most open sessions) holds its one id without a vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeenIds {
    /// Exactly one id, a canonical UUID (what the SDKs send), as its 16
    /// bytes: most open sessions hold just their SessionStart's id, and
    /// as text it cost an allocation of 48 bytes besides the enum.
    OneUuid([u8; 16]),
    /// Exactly one id, any other text.
    One(Box<str>),
    /// None, or two up to [`SeenIds::SMALL`] ids, sorted.
    Small(Vec<String>),
    /// More. Boxed: long sessions are rare, and an unboxed set would make
    /// every session's `SeenIds` a word larger.
    Large(Box<BTreeSet<String>>),
}

impl Default for SeenIds {
    fn default() -> Self {
        SeenIds::Small(Vec::new())
    }
}

impl SeenIds {
    /// The size at which the sorted vector becomes a B-tree.
    pub const SMALL: usize = 32;

    /// Whether `id` was accepted.
    pub fn contains(&self, id: &str) -> bool {
        match self {
            SeenIds::OneUuid(b) => uuid_text::parse(id) == Some(*b),
            SeenIds::One(x) => **x == *id,
            SeenIds::Small(v) => v.binary_search_by(|x| x.as_str().cmp(id)).is_ok(),
            SeenIds::Large(set) => set.contains(id),
        }
    }

    /// Records `id`; returns whether it was new.
    pub fn insert(&mut self, id: &str) -> bool {
        match self {
            SeenIds::Small(v) if v.is_empty() => {
                *self = match uuid_text::parse(id) {
                    Some(b) => SeenIds::OneUuid(b),
                    None => SeenIds::One(id.into()),
                };
                true
            }
            SeenIds::OneUuid(_) | SeenIds::One(_) if self.contains(id) => false,
            SeenIds::OneUuid(b) => {
                let first = uuid_text::format(b);
                *self = SeenIds::two(first, id);
                true
            }
            SeenIds::One(x) => {
                let first = std::mem::take(x).into_string();
                *self = SeenIds::two(first, id);
                true
            }
            SeenIds::Small(v) => match v.binary_search_by(|x| x.as_str().cmp(id)) {
                Ok(_) => false,
                Err(at) if v.len() < Self::SMALL => {
                    // Exact growth: most sessions stay at a few ids, and
                    // doubling would reserve room for four from the start.
                    v.reserve_exact(1);
                    v.insert(at, id.to_string());
                    true
                }
                Err(_) => {
                    let mut set: BTreeSet<String> = std::mem::take(v).into_iter().collect();
                    set.insert(id.to_string());
                    *self = SeenIds::Large(Box::new(set));
                    true
                }
            },
            SeenIds::Large(set) => {
                if set.contains(id) {
                    false
                } else {
                    set.insert(id.to_string())
                }
            }
        }
    }

    /// Two distinct ids, sorted.
    fn two(first: String, second: &str) -> SeenIds {
        let mut v = Vec::with_capacity(2);
        v.push(first);
        let at = usize::from(v[0].as_str() < second);
        v.insert(at, second.to_string());
        SeenIds::Small(v)
    }

    /// The ids in sorted order (checkpoints).
    pub fn iter(&self) -> Box<dyn Iterator<Item = Cow<'_, str>> + '_> {
        match self {
            SeenIds::OneUuid(b) => Box::new(std::iter::once(Cow::Owned(uuid_text::format(b)))),
            SeenIds::One(x) => Box::new(std::iter::once(Cow::Borrowed(&**x))),
            SeenIds::Small(v) => Box::new(v.iter().map(|x| Cow::Borrowed(x.as_str()))),
            SeenIds::Large(set) => Box::new(set.iter().map(|x| Cow::Borrowed(x.as_str()))),
        }
    }

    /// How many ids.
    pub fn len(&self) -> usize {
        match self {
            SeenIds::OneUuid(_) | SeenIds::One(_) => 1,
            SeenIds::Small(v) => v.len(),
            SeenIds::Large(set) => set.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<String> for SeenIds {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        let mut seen = SeenIds::default();
        for id in iter {
            seen.insert(&id);
        }
        seen
    }
}

/// What a SessionStart binds its session to besides the policy: the
/// canonical mode id and the mode and configuration versions.
///
/// Shared (`Arc`) between sessions bound to the same three: a fleet opens
/// many sessions with the same binding, and three inline strings in every
/// session were 72 of its bytes (issue 15). The kernel's [`BindingCache`]
/// hands out the shared copies.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    /// Canonical mode id (aliases resolved).
    pub mode: CompactString,
    /// Bound mode version.
    pub mode_version: CompactString,
    /// Bound configuration version.
    pub configuration_version: CompactString,
}

/// Shared [`Binding`]s for new and restored sessions.
///
/// Bounded: configuration versions are free text from the SessionStart,
/// so the cache forgets everything once it holds [`BindingCache::CAP`]
/// bindings instead of growing with whatever clients send (sessions keep
/// their own `Arc`s; only later sharing is lost). Sharing is invisible to
/// the kernel's behaviour: a binding never changes after the start. A
/// B-tree, not a hash set: the kernel takes no random hasher seed.
#[derive(Debug, Default)]
pub struct BindingCache {
    shared: BTreeSet<Arc<Binding>>,
}

impl BindingCache {
    /// Bindings kept for sharing before the cache starts over.
    pub const CAP: usize = 256;

    /// The shared copy of a binding (a new one if none is cached).
    pub fn get(&mut self, mode: &str, mode_version: &str, configuration_version: &str) -> Arc<Binding> {
        let wanted = Binding {
            mode: mode.into(),
            mode_version: mode_version.into(),
            configuration_version: configuration_version.into(),
        };
        if let Some(b) = self.shared.get(&wanted) {
            return b.clone();
        }
        if self.shared.len() >= Self::CAP {
            self.shared.clear();
        }
        let b = Arc::new(wanted);
        self.shared.insert(b.clone());
        b
    }
}

/// A session.
///
/// Kept compact, because the kernel holds one per open session and 100,000
/// of them must fit in the server's 100 MB (issue 15): the id is one shared
/// allocation (the session map and the timer index hold the same `Arc`), so
/// is the initiator (its activity entry and the per-initiator quota key
/// share it), mode and versions are one [`Binding`] shared across
/// sessions, and lists that never grow are boxed slices with no spare capacity.
#[derive(Debug)]
pub struct Session {
    /// Session id, shared with the session map's key and the timer index.
    pub id: Arc<str>,
    /// Mode, mode version and configuration version, shared with every
    /// session bound to the same three ([`Binding`]).
    pub binding: Arc<Binding>,
    /// The frozen policy, shared with the registry entry it was bound from.
    pub policy: Arc<BoundPolicy>,
    /// Sender of the SessionStart, shared with its activity entry and the
    /// per-initiator quota key.
    pub initiator: Arc<str>,
    /// Declared participants, as given.
    pub participants: Box<[String]>,
    /// What most sessions leave at its default (the SessionStart's context
    /// id and extension keys, suspension bookkeeping, the resolution, the
    /// mode timer floor), kept out of line and allocated when first set:
    /// read through [`Session::rare`], changed through [`Session::rare_mut`].
    pub rare: Option<Box<Rare>>,
    /// Acceptance time of the SessionStart.
    pub started_at_ms: i64,
    /// Current absolute TTL deadline (moves on resume).
    pub deadline_ms: i64,
    /// Resolved suspension cap.
    pub max_suspend_ms: i64,
    /// Lifecycle state.
    pub state: SessionState,
    /// Sequence number of the last record (1-based; SessionStart is 1).
    pub seq: u64,
    /// Accepted message ids (dedup).
    pub seen: SeenIds,
    /// Activity per sender, sorted by sender. A vector, not a map: senders
    /// are the initiator and declared participants (a bounded, usually tiny
    /// set), and a B-tree's first node would cost ten times the space.
    pub activity: Vec<(Arc<str>, Activity)>,
    /// Only the initiator may commit (mode-fixed authority).
    pub initiator_only_commitment: bool,
    /// The mode's state.
    pub mode_state: Box<dyn ModeState>,
    /// The due time under which the session is indexed in the timer set.
    pub timer_at: Option<i64>,
}

/// The parts of a session most sessions leave at their defaults
/// ([`Session::rare`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Rare {
    /// Opaque context reference of the SessionStart, verbatim.
    pub context_id: String,
    /// Extension keys of the SessionStart, sorted.
    pub extension_keys: Vec<String>,
    /// When the current suspension began.
    pub suspended_at_ms: Option<i64>,
    /// Suspended time already banked by earlier suspensions.
    pub suspended_total_ms: i64,
    /// Payload bytes of the resolving Commitment.
    pub resolution: Option<Box<[u8]>>,
    /// Mode deadlines at or before this time are ignored: they fired and the
    /// mode still reports them (a mode bug), and re-firing would spin the
    /// driver. Not part of the state proper (never persisted).
    pub mode_timer_floor: i64,
}

/// What a session without [`Rare`] parts reads.
static NO_RARE: Rare = Rare::DEFAULT;

impl Default for Rare {
    fn default() -> Self {
        Rare::DEFAULT
    }
}

impl Rare {
    /// Nothing set: no context id or extension keys, never suspended, not
    /// resolved, no mode timer floor.
    pub const DEFAULT: Rare = Rare {
        context_id: String::new(),
        extension_keys: Vec::new(),
        suspended_at_ms: None,
        suspended_total_ms: 0,
        resolution: None,
        mode_timer_floor: i64::MIN,
    };

    /// The rare parts of a session as its SessionStart leaves them: `None`
    /// when the context id and the extension keys are both empty.
    pub fn of_start(context_id: String, extension_keys: Vec<String>) -> Option<Box<Rare>> {
        (!context_id.is_empty() || !extension_keys.is_empty())
            .then(|| Box::new(Rare { context_id, extension_keys, ..Rare::default() }))
    }
}

impl Session {
    /// The rare parts (defaults when none were ever set).
    pub fn rare(&self) -> &Rare {
        self.rare.as_deref().unwrap_or(&NO_RARE)
    }

    /// The rare parts, for a change (allocated on first use).
    pub fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Opaque context reference of the SessionStart, verbatim.
    pub fn context_id(&self) -> &str {
        &self.rare().context_id
    }

    /// Extension keys of the SessionStart, sorted.
    pub fn extension_keys(&self) -> &[String] {
        &self.rare().extension_keys
    }

    /// When the current suspension began.
    pub fn suspended_at_ms(&self) -> Option<i64> {
        self.rare().suspended_at_ms
    }

    /// Ends a suspension at `at` (if one is running), banking its time.
    pub fn bank_suspension(&mut self, at: i64) {
        if let Some(since) = self.suspended_at_ms() {
            let r = self.rare_mut();
            r.suspended_at_ms = None;
            r.suspended_total_ms = r.suspended_total_ms.saturating_add(at - since);
        }
    }

    /// The view handed to modes.
    pub fn view(&self) -> SessionView<'_> {
        SessionView {
            session_id: &self.id,
            mode: &self.binding.mode,
            initiator: &self.initiator,
            participants: &self.participants,
            mode_version: &self.binding.mode_version,
            configuration_version: &self.binding.configuration_version,
            policy: &self.policy,
        }
    }

    /// Whether the session can never change again.
    pub fn is_terminal(&self) -> bool {
        matches!(self.state, SessionState::Resolved | SessionState::Expired | SessionState::Cancelled)
    }

    /// Counts toward `max_open_sessions` (OPEN or SUSPENDED).
    pub fn is_live(&self) -> bool {
        matches!(self.state, SessionState::Open | SessionState::Suspended)
    }

    /// Whether `who` may read the session (GetSession, passive subscribe):
    /// the initiator or a declared participant; observers are decided by the
    /// caller from the identity's grants.
    pub fn can_read(&self, who: &str) -> bool {
        who == &*self.initiator || self.participants.iter().any(|p| p == who)
    }

    /// When a suspended session passes its suspension cap.
    pub fn suspend_cap_deadline(&self) -> Option<i64> {
        let r = self.rare();
        r.suspended_at_ms.map(|at| at.saturating_add(self.max_suspend_ms.saturating_sub(r.suspended_total_ms)))
    }

    /// The earliest time at which a tick has work for this session.
    /// Expiry is strict (`now > deadline`), hence the `+ 1`.
    pub fn next_timer(&self) -> Option<i64> {
        match self.state {
            SessionState::Open => {
                let ttl = self.deadline_ms.saturating_add(1);
                Some(match self.mode_state.next_deadline().filter(|m| *m > self.rare().mode_timer_floor) {
                    Some(m) => m.min(ttl),
                    None => ttl,
                })
            }
            SessionState::Suspended => self.suspend_cap_deadline().map(|d| d.saturating_add(1)),
            _ => None,
        }
    }

    /// SessionMetadata as the wire reports it.
    pub fn metadata(&self) -> SessionMetadata {
        SessionMetadata {
            session_id: String::from(&*self.id),
            mode: self.binding.mode.as_str().to_owned(),
            state: self.state as i32,
            started_at_unix_ms: self.started_at_ms,
            expires_at_unix_ms: self.deadline_ms,
            mode_version: self.binding.mode_version.as_str().to_owned(),
            configuration_version: self.binding.configuration_version.as_str().to_owned(),
            policy_version: self.policy.id().to_string(),
            participants: self.participants.to_vec(),
            participant_activity: self
                .activity
                .iter()
                .map(|(who, a)| ParticipantActivity {
                    participant_id: String::from(&**who),
                    last_message_at_unix_ms: a.last_message_at_unix_ms,
                    message_count: a.message_count,
                })
                .collect(),
            initiator: String::from(&*self.initiator),
            context_id: self.context_id().to_string(),
            extension_keys: self.extension_keys().to_vec(),
        }
    }

    /// SESSION_NOT_OPEN naming the state the session is in.
    pub fn not_open(&self) -> KernelError {
        KernelError::new(
            ErrorCode::SessionNotOpen,
            format!("session {} is {}", self.id, self.state.as_str_name().trim_start_matches("SESSION_STATE_")),
        )
    }

    /// `who` as a shared name: the initiator's own `Arc` when it is the
    /// initiator, else a new one.
    pub fn name(&self, who: &str) -> Arc<str> {
        if who == &*self.initiator {
            self.initiator.clone()
        } else {
            who.into()
        }
    }

    /// Records an accepted message from `sender`.
    pub fn touch(&mut self, sender: &str, message_id: &str, at: i64) {
        self.seen.insert(message_id);
        let i = match self.activity.binary_search_by(|(w, _)| (**w).cmp(sender)) {
            Ok(i) => i,
            Err(i) => {
                self.activity.reserve_exact(1); // bounded by the participants
                self.activity.insert(i, (self.name(sender), Activity::default()));
                i
            }
        };
        let a = &mut self.activity[i].1;
        a.last_message_at_unix_ms = at;
        a.message_count = a.message_count.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn start_extras_are_stored_only_when_present() {
        assert!(Rare::of_start(String::new(), Vec::new()).is_none());
        let e = Rare::of_start("ctx-1".into(), Vec::new()).expect("a context id is kept");
        assert_eq!((e.context_id.as_str(), e.extension_keys.len()), ("ctx-1", 0));
        let e = Rare::of_start(String::new(), vec!["x.a".into()]).expect("extension keys are kept");
        assert_eq!(*e, Rare { extension_keys: vec!["x.a".into()], ..Rare::default() });
        assert_eq!(Rare::default(), NO_RARE, "what is read without rare parts is the default");
        assert_eq!(e.extension_keys, ["x.a"]);
    }

    /// A session is allocated once per open session: at 100,000 of them
    /// each mimalloc size class step above 256 bytes costs 6.4 MB.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_session_fits_the_256_byte_size_class() {
        assert!(std::mem::size_of::<Session>() <= 256, "{} bytes", std::mem::size_of::<Session>());
        assert_eq!(std::mem::size_of::<SeenIds>(), 24, "the large variant is boxed");
    }

    proptest! {
        /// SeenIds answers exactly like a BTreeSet, across the switch from
        /// the sorted vector to the B-tree. Ids are a mix of canonical
        /// UUIDs (held as bytes while alone), ids like them but not
        /// canonical (text) and other text.
        #[test]
        fn seen_ids_behave_like_a_set(ids in proptest::collection::vec(0u16..200, 0..120)) {
            let mut seen = SeenIds::default();
            let mut model = BTreeSet::new();
            for id in ids {
                let id = match id % 3 {
                    0 => format!("m-{id}"),
                    1 => format!("00000000-0000-4000-8000-{id:012x}"),
                    _ => format!("00000000-0000-4000-8000-{id:012X}A"),
                };
                prop_assert_eq!(seen.contains(&id), model.contains(&id));
                prop_assert_eq!(seen.insert(&id), model.insert(id.clone()));
                prop_assert!(seen.contains(&id));
                prop_assert_eq!(seen.len(), model.len());
            }
            prop_assert_eq!(seen.iter().collect::<Vec<_>>(), model.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(matches!(seen, SeenIds::OneUuid(_)), model.len() == 1 && model.iter().all(|m| uuid_text::parse(m).is_some()));
            prop_assert_eq!(matches!(seen, SeenIds::Large(_)), model.len() > SeenIds::SMALL);
        }
    }
}

#[cfg(test)]
mod binding_tests {
    use super::*;

    /// Sessions bound alike share one `Binding`; a different configuration
    /// version gets its own; the cache stays within its cap whatever
    /// clients send, and what it hands out is always the binding asked for.
    #[test]
    fn bindings_are_shared_and_the_cache_is_bounded() {
        let mut cache = BindingCache::default();
        let a = cache.get("macp.mode.decision.v1", "1.0.0", "cfg-1");
        let b = cache.get("macp.mode.decision.v1", "1.0.0", "cfg-1");
        assert!(Arc::ptr_eq(&a, &b));
        let c = cache.get("macp.mode.decision.v1", "1.0.0", "cfg-2");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(&*c.configuration_version, "cfg-2");
        for i in 0..3 * BindingCache::CAP {
            let v = format!("cfg-{i}");
            let got = cache.get("macp.mode.task.v1", "1.0.0", &v);
            assert_eq!(
                (&*got.mode, &*got.mode_version, &*got.configuration_version),
                ("macp.mode.task.v1", "1.0.0", &*v)
            );
            assert!(cache.shared.len() <= BindingCache::CAP);
        }
        assert_eq!(&*a.configuration_version, "cfg-1");
    }
}
