//! Following sessions without taking part in them.
//!
//! Two read-only views exist: a *passive subscribe* on StreamSession (set
//! `subscribe_session_id`, optionally `after_sequence`) replays a session's
//! accepted history and then follows it live, ending when the session is
//! terminal; WatchSessions sends a CREATED event per visible session, then
//! every lifecycle change. Both need the caller to be able to read the
//! session (participant, initiator or observer).

use std::ops::ControlFlow;

use macp_wire::v1::{
    session_lifecycle_event::EventType, stream_session_response, Envelope, MacpError, SessionLifecycleEvent,
    StreamSessionRequest, WatchSessionsRequest,
};
use tokio_stream::StreamExt;

use crate::client::Client;
use crate::transcript::state_name;

/// One item of a passive session subscription.
#[derive(Clone, Debug)]
pub enum SessionItem {
    /// An accepted envelope, in history order.
    Envelope(Envelope),
    /// An inline error frame (not expected on a passive stream, but part of
    /// the protocol, so it is surfaced rather than hidden).
    Error(MacpError),
}

/// Subscribes to `session_id` and calls `on_item` for every envelope after
/// `after_sequence` (0 = from SessionStart) until the stream ends (the
/// session reached a terminal state) or `on_item` breaks. Returns how many
/// items were delivered.
pub async fn follow_session(
    client: &mut Client,
    session_id: &str,
    after_sequence: u64,
    mut on_item: impl FnMut(&SessionItem) -> ControlFlow<()>,
) -> crate::Result<u64> {
    let req = StreamSessionRequest { subscribe_session_id: session_id.into(), after_sequence, envelope: None };
    // The request side stays open (pending): closing it would end the call
    // before the server has streamed anything live.
    let requests = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    let mut stream = client.stream_session(requests).await?.into_inner();
    let mut n = 0;
    while let Some(frame) = stream.next().await {
        let item = match frame?.response {
            Some(stream_session_response::Response::Envelope(e)) => SessionItem::Envelope(e),
            Some(stream_session_response::Response::Error(e)) => SessionItem::Error(e),
            None => continue,
        };
        n += 1;
        if on_item(&item).is_break() {
            break;
        }
    }
    Ok(n)
}

/// Watches session lifecycle events visible to the caller until `on_event`
/// breaks or the server ends the stream.
pub async fn watch_sessions(
    client: &mut Client,
    mut on_event: impl FnMut(&SessionLifecycleEvent) -> ControlFlow<()>,
) -> crate::Result<()> {
    let mut stream = client.watch_sessions(WatchSessionsRequest {}).await?.into_inner();
    while let Some(msg) = stream.next().await {
        if let Some(ev) = msg?.event {
            if on_event(&ev).is_break() {
                break;
            }
        }
    }
    Ok(())
}

/// One line for a session item.
pub fn describe_item(item: &SessionItem) -> String {
    match item {
        SessionItem::Envelope(e) => {
            format!(
                "envelope {} {} [{}] from {} ({} payload bytes)",
                e.mode,
                e.message_type,
                e.message_id,
                e.sender,
                e.payload.len()
            )
        }
        SessionItem::Error(e) => format!("error {}: {}", e.code, e.message),
    }
}

/// One line for a lifecycle event.
pub fn describe_event(ev: &SessionLifecycleEvent) -> String {
    let kind = EventType::try_from(ev.event_type).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
    match &ev.session {
        Some(s) => format!(
            "{kind} session {} ({}) state={} at {}",
            s.session_id,
            s.mode,
            state_name(s.state),
            ev.observed_at_unix_ms
        ),
        None => format!("{kind} (no session) at {}", ev.observed_at_unix_ms),
    }
}
