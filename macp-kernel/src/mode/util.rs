//! Small helpers every mode needs: payload decoding and state snapshots.

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{KResult, KernelError};

/// Decodes a protobuf payload, mapping failure to INVALID_ENVELOPE with the
/// message type in the text so a client knows which payload was wrong.
pub fn decode<M: prost::Message + Default>(message_type: &str, payload: &[u8]) -> KResult<M> {
    M::decode(payload).map_err(|e| KernelError::invalid(format!("{message_type} payload does not decode: {e}")))
}

/// Encodes a protobuf message (for runtime-emitted payloads).
pub fn encode<M: prost::Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

/// Serializes a mode state deterministically (postcard over serde; states
/// use `BTreeMap`/`Vec`, never hash maps, so the bytes are stable).
pub fn snapshot<T: Serialize>(state: &T) -> Vec<u8> {
    postcard::to_stdvec(state).unwrap_or_default()
}

/// Inverse of [`snapshot`].
pub fn restore<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("mode state snapshot does not decode: {e}"))
}

/// Rejects an empty (after trim) required string field.
pub fn require(field: &str, value: &str, what: &str) -> KResult<()> {
    if value.trim().is_empty() {
        Err(KernelError::invalid(format!("{what}: '{field}' must not be empty")))
    } else {
        Ok(())
    }
}

/// What differs between the built-in modes' descriptors.
pub struct BuiltinDescriptor<'a> {
    /// Mode id.
    pub mode: &'a str,
    /// Human title.
    pub title: &'a str,
    /// One-paragraph description.
    pub description: &'a str,
    /// RFC determinism class.
    pub determinism_class: &'a str,
    /// RFC participant model.
    pub participant_model: &'a str,
    /// Every message type, SessionStart and Commitment included, in order.
    pub message_types: &'a [&'a str],
}

/// The descriptor of a built-in mode. Built-ins share their version
/// (1.0.0), their single terminal message type (Commitment) and their
/// schema source (the MACP protobuf module), so those are fixed here and a
/// mode states only what is its own.
pub fn builtin_descriptor(d: BuiltinDescriptor<'_>) -> macp_wire::v1::ModeDescriptor {
    macp_wire::v1::ModeDescriptor {
        mode: d.mode.to_string(),
        mode_version: BUILTIN_MODE_VERSION.to_string(),
        title: d.title.to_string(),
        description: d.description.to_string(),
        determinism_class: d.determinism_class.to_string(),
        participant_model: d.participant_model.to_string(),
        message_types: d.message_types.iter().map(|t| t.to_string()).collect(),
        terminal_message_types: vec!["Commitment".to_string()],
        schema_uris: [("protobuf".to_string(), "buf.build/multiagentcoordinationprotocol/macp".to_string())]
            .into_iter()
            .collect(),
    }
}

/// The version every built-in mode implements.
pub const BUILTIN_MODE_VERSION: &str = "1.0.0";
