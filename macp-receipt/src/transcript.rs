//! The receipt's `transcript`: a digest over the session's whole accepted
//! history, so a holder who replayed the history (a passive subscribe from
//! `after_sequence` 0 streams exactly it) can check it is the history the
//! Commitment was decided on.
//!
//! RFC-MACP-0013 leaves history digests to the implementation, so the
//! algorithm is named by a macp-rs label ([`DIGEST_ALG`]) that no
//! spec-defined name can collide with. Definition (`macp-rs-history-sha256/1`):
//!
//! 1. Take the session's accepted envelopes in sequence order, `seq` 1 to
//!    `n`: the SessionStart, every accepted message, the runtime's
//!    SessionSuspend/SessionResume envelopes, ending with the resolving
//!    Commitment — exactly what a passive subscribe replays.
//! 2. Encode each as a protobuf `macp.v1.Envelope` in the deterministic
//!    form: fields in field-number order, fields holding their default value
//!    left out. `Envelope` has no map fields, so this is what every protobuf
//!    library writes for it (Python: `SerializeToString()`, prost:
//!    `encode_to_vec()`).
//! 3. Preimage = ASCII `macp-rs-history-sha256/1:`, then for each encoding
//!    `E`: its length as 8 bytes big-endian, then `E`.
//! 4. `digest` = `sha256:` + 64 lowercase hex of SHA-256(preimage);
//!    `message_count` = `n`.
//!
//! The length prefixes make the concatenation unambiguous; the label keeps
//! this digest from ever equalling a digest of anything else.

use macp_wire::v1::Envelope;
use prost::Message as _;

/// The `digest_alg` of a receipt's `transcript`.
pub const DIGEST_ALG: &str = "macp-rs-history-sha256/1";

/// The history digest of `envelopes` (in sequence order) and how many there
/// were: the receipt's `transcript.digest` and `transcript.message_count`.
pub fn history_digest<'a>(envelopes: impl IntoIterator<Item = &'a Envelope>) -> (String, u64) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(DIGEST_ALG.as_bytes());
    ctx.update(b":");
    let mut count = 0u64;
    let mut buf = Vec::new();
    for e in envelopes {
        buf.clear();
        // Encoding into a Vec cannot fail: it grows as needed.
        let _ = e.encode(&mut buf);
        ctx.update(&(buf.len() as u64).to_be_bytes());
        ctx.update(&buf);
        count += 1;
    }
    (crate::sha256_prefixed(ctx.finish()), count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str) -> Envelope {
        Envelope { message_id: id.into(), session_id: "s".into(), ..Default::default() }
    }

    #[test]
    fn the_digest_follows_its_definition() {
        let a = env("a");
        let b = env("b");
        let mut pre = b"macp-rs-history-sha256/1:".to_vec();
        for e in [&a, &b] {
            let bytes = e.encode_to_vec();
            pre.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            pre.extend_from_slice(&bytes);
        }
        let expected = crate::sha256_prefixed(ring::digest::digest(&ring::digest::SHA256, &pre));
        assert_eq!(history_digest([&a, &b]), (expected, 2));
        assert_ne!(history_digest([&b, &a]).0, history_digest([&a, &b]).0, "order counts");
        assert_eq!(history_digest([]).1, 0);
    }
}
