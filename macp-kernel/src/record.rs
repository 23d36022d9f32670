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
