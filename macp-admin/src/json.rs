//! Records and envelopes as JSON, payloads decoded by message type.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use macp_wire::storage::record::Fact;
use macp_wire::storage::Record;
use macp_wire::v1::{Envelope, SessionMetadata, SessionState};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::{json, Map, Value};

fn pool() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(macp_wire::FILE_DESCRIPTOR_SET).ok()).as_ref()
}

/// The protobuf message a payload of `message_type` in `mode` holds: the
/// mode's own package first (`macp.mode.decision.v1` →
/// `macp.modes.decision.v1.<Type>Payload`), then the core ones
/// (`macp.v1.SessionStartPayload`, `CommitmentPayload`, ...).
fn payload_descriptor(mode: &str, message_type: &str) -> Option<MessageDescriptor> {
    let pool = pool()?;
    let parts: Vec<&str> = mode.split('.').collect();
    let mut candidates = Vec::new();
    if parts.len() >= 2 {
        let name = parts[parts.len() - 2];
        let version = parts[parts.len() - 1];
        candidates.push(format!("macp.modes.{name}.{version}.{message_type}Payload"));
        candidates.push(format!("macp.modes.{name}.{version}.{message_type}"));
    }
    candidates.push(format!("macp.v1.{message_type}Payload"));
    candidates.push(format!("macp.v1.{message_type}"));
    candidates.iter().find_map(|c| pool.get_message_by_name(c))
}

/// The payload decoded into proto3 JSON, or why not.
pub fn decode_payload(mode: &str, message_type: &str, payload: &[u8]) -> Result<Value, String> {
    let desc = payload_descriptor(mode, message_type)
        .ok_or_else(|| format!("no payload type known for {message_type} in mode {mode:?}"))?;
    let msg = DynamicMessage::decode(desc, payload).map_err(|e| e.to_string())?;
    serde_json::to_value(&msg).map_err(|e| e.to_string())
}

/// An envelope as JSON (see the crate docs for the fields).
pub fn envelope(e: &Envelope) -> Value {
    let mut m = Map::new();
    m.insert("macp_version".into(), json!(e.macp_version));
    m.insert("mode".into(), json!(e.mode));
    m.insert("message_type".into(), json!(e.message_type));
    m.insert("message_id".into(), json!(e.message_id));
    m.insert("session_id".into(), json!(e.session_id));
    m.insert("sender".into(), json!(e.sender));
    m.insert("timestamp_unix_ms".into(), json!(e.timestamp_unix_ms));
    m.insert("payload_base64".into(), json!(STANDARD.encode(&e.payload)));
    match decode_payload(&e.mode, &e.message_type, &e.payload) {
        Ok(v) => {
            m.insert("payload".into(), v);
        }
        Err(why) => {
            m.insert("payload".into(), Value::Null);
            m.insert("payload_error".into(), json!(why));
        }
    }
    Value::Object(m)
}

/// One accepted-history record as a JSON line's object.
pub fn record(r: &Record) -> Value {
    let mut m = Map::new();
    m.insert("session_id".into(), json!(r.session_id));
    m.insert("seq".into(), json!(r.seq));
    m.insert("at_unix_ms".into(), json!(r.at_unix_ms));
    let kind = match &r.fact {
        Some(Fact::Started(_)) => "started",
        Some(Fact::Accepted(_)) => "accepted",
        Some(Fact::Cancelled(_)) => "cancelled",
        Some(Fact::Suspended(_)) => "suspended",
        Some(Fact::Resumed(_)) => "resumed",
        Some(Fact::Expired(x)) => {
            m.insert("reason".into(), json!(x.reason));
            "expired"
        }
        Some(_) => "registry",
        None => "empty",
    };
    m.insert("kind".into(), json!(kind));
    if let Some(e) = macp_kernel::record::history_envelope(r) {
        m.insert("envelope".into(), envelope(e));
    }
    Value::Object(m)
}

/// `SESSION_STATE_RESOLVED` → `resolved`.
pub fn state_name(state: i32) -> String {
    SessionState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("SESSION_STATE_").to_ascii_lowercase())
        .unwrap_or_else(|_| format!("unknown({state})"))
}

/// A session listing line's object.
pub fn session(m: &SessionMetadata, ended_at: Option<i64>, last_seq: Option<u64>) -> Value {
    json!({
        "session_id": m.session_id,
        "mode": m.mode,
        "state": state_name(m.state),
        "started_at_unix_ms": m.started_at_unix_ms,
        "ended_at_unix_ms": ended_at,
        "last_seq": last_seq,
        "initiator": m.initiator,
        "participants": m.participants,
    })
}
