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
