//! Read-only questions and their answers.
//!
//! A driver hands the kernel a [`Query`] and gets an [`Answer`]; nothing
//! changes. The read-access rule — a session is visible to its initiator,
//! its declared participants and observers — lives here once
//! ([`may_read`]) and every session query applies it, so a listing or a
//! watch never reveals another tenant's sessions.

use macp_wire::storage::SessionSummary;
use macp_wire::v1::{ModeDescriptor, PolicyDescriptor, SessionMetadata};

use crate::error::{ErrorCode, KResult, KernelError};
use crate::io::Identity;
use crate::session::Session;
use crate::state::ended::{summary_session_id, EndedSessions};
use crate::state::State;

/// A question for [`crate::Kernel::answer`].
#[derive(Clone, Debug, PartialEq)]
pub enum Query {
    /// GetSession: one session's metadata.
    GetSession {
        /// Who asks.
        identity: Identity,
        /// Which session.
        session_id: String,
    },
    /// ListSessions: a page of sessions in id order.
    ListSessions {
        /// Who asks; only sessions it may read are listed.
        identity: Identity,
        /// Requested page size (≤ 0: the default).
        page_size: i32,
        /// The previous page's token; empty for the first page.
        page_token: String,
        /// Most encoded bytes of metadata a page may carry: a page ends early
        /// (with a next-page token) rather than outgrow the transport's
        /// message limit. A page always holds at least one session.
        byte_budget: usize,
    },
    /// WatchSessions' initial sync: every open or suspended session
    /// `identity` may read (ended sessions are history, not news).
    VisibleSessions {
        /// Who asks.
        identity: Identity,
    },
    /// Passive subscribe (or binding a stream): may `identity` read the
    /// session, and how far does its history reach now?
    Subscribe {
        /// Who asks.
        identity: Identity,
        /// Which session.
        session_id: String,
    },
    /// A view of the mode registry.
    Modes(ModeList),
    /// Every mode id a SessionStart may name (Initialize, GetManifest).
    ModeIds,
    /// GetPolicy.
    GetPolicy {
        /// The policy id.
        policy_id: String,
    },
    /// ListPolicies (empty `mode`: all).
    ListPolicies {
        /// Filter by mode.
        mode: String,
    },
}

/// Which view of the mode registry [`Query::Modes`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeList {
    /// Standards-track modes (ListModes).
    StandardsTrack,
    /// Extensions (ListExtModes).
    Extensions,
}

/// Where a subscription starts: history up to `upto` is read from storage,
/// live envelopes after it follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscribePoint {
    /// Sequence number of the session's last accepted record.
    pub upto: u64,
    /// Whether more can still happen (OPEN or SUSPENDED): a terminal
    /// session's history is all there will ever be.
    pub live: bool,
}

/// A page of ListSessions.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionPage {
    /// The sessions, in id order.
    pub sessions: Vec<SessionMetadata>,
    /// Token of the next page; empty on the last page.
    pub next_page_token: String,
}

/// The answer to a [`Query`], one variant per kind of question.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// For [`Query::GetSession`].
    Session(KResult<SessionMetadata>),
    /// For [`Query::ListSessions`].
    Page(KResult<SessionPage>),
    /// For [`Query::VisibleSessions`].
    Sessions(Vec<SessionMetadata>),
    /// For [`Query::Subscribe`].
    Subscription(KResult<SubscribePoint>),
    /// For [`Query::Modes`].
    Modes(Vec<ModeDescriptor>),
    /// For [`Query::ModeIds`].
    ModeIds(Vec<String>),
    /// For [`Query::GetPolicy`]: `None` when no such policy is registered.
    Policy(Option<PolicyDescriptor>),
    /// For [`Query::ListPolicies`].
    Policies(Vec<PolicyDescriptor>),
}

/// Largest ListSessions page; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: usize = 1000;
/// ListSessions page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// The read-access rule: the initiator, a declared participant, or an
/// observer may read a session (GetSession, ListSessions, WatchSessions,
/// passive subscribe).
pub fn may_read(identity: &Identity, initiator: &str, participants: &[String]) -> bool {
    identity.grants.is_observer || identity.sender == initiator || participants.contains(&identity.sender)
}

/// [`may_read`] for a session's metadata (lifecycle events).
pub fn may_read_metadata(identity: &Identity, m: &SessionMetadata) -> bool {
    may_read(identity, &m.initiator, &m.participants)
}

/// A session as a read sees it: held (open or suspended), or ended.
// One lives per read and none is stored: boxing the summary would only add
// an allocation (clippy 1.95 flags the size difference).
#[allow(clippy::large_enum_variant)]
enum Found<'a> {
    Held(&'a Session),
    Ended(SessionSummary),
}

impl Found<'_> {
    fn metadata(&self) -> SessionMetadata {
        match self {
            Found::Held(s) => s.metadata(),
            Found::Ended(e) => e.metadata.clone().unwrap_or_default(),
        }
    }
}

fn forbidden(identity: &Identity, session_id: &str) -> KernelError {
    KernelError::forbidden(format!(
        "{} is neither a participant nor an observer of session {session_id}",
        identity.sender
    ))
}

/// The session if `identity` may read it: SESSION_NOT_FOUND or FORBIDDEN
/// otherwise.
fn readable<'a>(
    state: &'a State,
    storage: &dyn EndedSessions,
    identity: &Identity,
    session_id: &str,
) -> KResult<Found<'a>> {
    if let Some(s) = state.session(session_id) {
        if !may_read(identity, &s.initiator, &s.participants) {
            return Err(forbidden(identity, session_id));
        }
        return Ok(Found::Held(s));
    }
    let e = state
        .peek_ended(session_id, storage)?
        .ok_or_else(|| KernelError::new(ErrorCode::SessionNotFound, format!("session {session_id} does not exist")))?;
    let m = e.metadata.as_ref();
    if !m.is_some_and(|m| may_read_metadata(identity, m)) {
        return Err(forbidden(identity, session_id));
    }
    Ok(Found::Ended(e))
}

/// GetSession: the metadata, if `identity` may read the session.
pub(crate) fn get_session(
    state: &State,
    storage: &dyn EndedSessions,
    identity: &Identity,
    session_id: &str,
) -> KResult<SessionMetadata> {
    readable(state, storage, identity, session_id).map(|f| f.metadata())
}

/// Answers `q` from `state` and, for ended sessions, `storage`.
pub(crate) fn answer(state: &State, storage: &dyn EndedSessions, q: &Query) -> Answer {
    match q {
        Query::GetSession { identity, session_id } => {
            Answer::Session(get_session(state, storage, identity, session_id))
        }
        Query::ListSessions { identity, page_size, page_token, byte_budget } => {
            Answer::Page(list_sessions(state, storage, identity, *page_size, page_token, *byte_budget))
        }
        Query::VisibleSessions { identity } => Answer::Sessions(
            state
                .sessions_after(None)
                .filter(|s| may_read(identity, &s.initiator, &s.participants))
                .map(Session::metadata)
                .collect(),
        ),
        Query::Subscribe { identity, session_id } => {
            Answer::Subscription(readable(state, storage, identity, session_id).map(|f| match f {
                Found::Held(s) => SubscribePoint { upto: s.seq, live: !s.is_terminal() },
                Found::Ended(e) => SubscribePoint { upto: e.last_seq, live: false },
            }))
        }
        Query::Modes(ModeList::StandardsTrack) => Answer::Modes(state.modes().standards_track()),
        Query::Modes(ModeList::Extensions) => Answer::Modes(state.modes().extensions()),
        Query::ModeIds => Answer::ModeIds(state.modes().all_ids()),
        Query::GetPolicy { policy_id } => Answer::Policy(state.policies().get(policy_id).cloned()),
        Query::ListPolicies { mode } => Answer::Policies(state.policies().list(mode)),
    }
}

/// Ended sessions read from storage per step while filling a page.
const ENDED_READ: usize = 256;
/// Most sessions a page looks at (held and ended together) before it ends
/// early with a next-page token: a caller who may read few of many sessions
/// pages through them instead of making one call scan them all.
const MAX_SCAN: usize = 10_000;

/// ListSessions, paged in session-id order over open sessions (held) and
/// ended ones (storage). `page_token` is the opaque token of the previous
/// page; a malformed one is INVALID_REQUEST. The page size is clamped to
/// [`MAX_PAGE_SIZE`], and a page ends early once its metadata would pass
/// `byte_budget` encoded bytes or it looked at [`MAX_SCAN`] sessions.
fn list_sessions(
    state: &State,
    storage: &dyn EndedSessions,
    identity: &Identity,
    page_size: i32,
    page_token: &str,
    byte_budget: usize,
) -> KResult<SessionPage> {
    use prost::Message as _;
    let size = if page_size <= 0 { DEFAULT_PAGE_SIZE } else { (page_size as usize).min(MAX_PAGE_SIZE) };
    let after = if page_token.is_empty() {
        None
    } else {
        Some(decode_token(page_token).ok_or_else(|| {
            KernelError::new(
                ErrorCode::InvalidRequest,
                "page_token is not a token this runtime issued; start again with an empty page_token",
            )
        })?)
    };
    let mut held = state.sessions_after(after.as_deref()).peekable();
    let mut ended: std::collections::VecDeque<SessionSummary> = Default::default();
    let mut ended_after = after.clone();
    let mut ended_done = false;
    let mut sessions: Vec<SessionMetadata> = Vec::new();
    let mut bytes = 0usize;
    let mut scanned = 0usize;
    // The id of the last session looked at: the next page starts after it.
    let mut last_seen: Option<String> = None;
    let more = loop {
        if ended.is_empty() && !ended_done {
            let page = storage.list(ended_after.as_deref(), ENDED_READ)?;
            ended_done = page.len() < ENDED_READ;
            ended_after = page.last().map(|e| summary_session_id(e).to_string()).or(ended_after);
            ended.extend(page);
        }
        let next_held = held.peek().map(|s| &*s.id);
        let next_ended = ended.front().map(summary_session_id);
        let take_held = match (next_held, next_ended) {
            (None, None) => break false,
            (Some(h), Some(e)) => h <= e,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if sessions.len() == size || scanned == MAX_SCAN {
            break true;
        }
        let metadata = if take_held {
            let Some(s) = held.next() else { break false };
            last_seen = Some(s.id.to_string());
            may_read(identity, &s.initiator, &s.participants).then(|| s.metadata())
        } else {
            let Some(e) = ended.pop_front() else { break false };
            let id = summary_session_id(&e).to_string();
            if next_held == Some(id.as_str()) {
                // Held and in storage at once cannot happen; prefer the held one.
                continue;
            }
            last_seen = Some(id);
            e.metadata.filter(|m| may_read_metadata(identity, m))
        };
        scanned += 1;
        let Some(m) = metadata else { continue };
        // Field tag + length prefix + the message, as the response encodes it.
        let len = m.encoded_len() + 8;
        if !sessions.is_empty() && bytes + len > byte_budget {
            // This one goes on the next page.
            last_seen = sessions.last().map(|m| m.session_id.clone());
            break true;
        }
        bytes += len;
        sessions.push(m);
    };
    let next_page_token = match (more, last_seen) {
        (true, Some(id)) => encode_token(&id),
        _ => String::new(),
    };
    Ok(SessionPage { sessions, next_page_token })
}

fn encode_token(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(t: &str) -> Option<String> {
    if t.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..t.len()).step_by(2).map(|i| t.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    String::from_utf8(bytes?).ok()
}
