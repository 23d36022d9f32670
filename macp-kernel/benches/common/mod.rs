//! Inputs shared by the kernel benches.

use macp_kernel::macp_wire::v1::Envelope;

/// A UUIDv4-shaped id derived from `n`, as real clients send: the Python SDK
/// uses random UUIDv4 session and message ids, which differ in their first
/// characters, unlike a counter with a long common prefix.
pub fn uuid4(n: u64) -> String {
    macp_wire::conformance::counter_uuid_v4(n)
}

/// An envelope as a client would send it (timestamp 0: the kernel clock).
pub fn envelope(sid: &str, mode: &str, ty: &str, mid: String, sender: &str, payload: Vec<u8>) -> Envelope {
    Envelope {
        macp_version: "1.0".into(),
        mode: mode.into(),
        message_type: ty.into(),
        message_id: mid,
        session_id: sid.into(),
        sender: sender.into(),
        timestamp_unix_ms: 0,
        payload,
    }
}
