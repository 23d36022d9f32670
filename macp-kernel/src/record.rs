//! The binary encoding of storage records.
//!
//! A record is the protobuf encoding of `macp_rs.storage.v1.Record`
//! (`proto/schema/macp_rs/storage/v1/record.proto`): stable field numbers,
//! readable by any protobuf library, and deterministic here because records
//! contain no maps. Framing (length, checksum) is the storage backend's job.

use macp_wire::storage::Record;
use prost::Message as _;

/// Encodes a record.
pub fn encode(record: &Record) -> Vec<u8> {
    record.encode_to_vec()
}

/// Decodes a record.
pub fn decode(bytes: &[u8]) -> Result<Record, prost::DecodeError> {
    Record::decode(bytes)
}

/// The envelope a record contributes to its session's accepted history
/// (what passive subscribers replay), if any: SessionStart, accepted
/// messages and the runtime-emitted control envelopes. Expiry and registry
/// records carry none.
pub fn history_envelope(r: &Record) -> Option<&macp_wire::v1::Envelope> {
    use macp_wire::storage::record::Fact;
    match r.fact.as_ref()? {
        Fact::Started(s) => s.envelope.as_ref(),
        Fact::Accepted(e) | Fact::Cancelled(e) | Fact::Suspended(e) | Fact::Resumed(e) => Some(e),
        _ => None,
    }
}

/// Takes the envelope out of a record (see [`history_envelope`]).
pub fn into_history_envelope(r: Record) -> Option<macp_wire::v1::Envelope> {
    use macp_wire::storage::record::Fact;
    match r.fact? {
        Fact::Started(s) => s.envelope,
        Fact::Accepted(e) | Fact::Cancelled(e) | Fact::Suspended(e) | Fact::Resumed(e) => Some(e),
        _ => None,
    }
}
