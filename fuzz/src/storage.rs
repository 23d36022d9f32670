//! The `storage_decode` target: what recovery does with bytes read back
//! from disk. A disk returns garbage after bit rot, a torn write or an
//! operator's mistake; recovery must refuse it record by record and keep a
//! working kernel, never crash the server on restart.

use macp_kernel::macp_wire::v1::Envelope;
use macp_kernel::{record, Identity, Input, Kernel};

use crate::base;

/// Runs one input (selector byte, then the bytes; see the target file).
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            let mut k = base::kernel();
            if let Ok(r) = record::decode(rest) {
                apply(&mut k, &r);
            }
            exercise(k);
        }
        1 => {
            if let Ok(k) = Kernel::restore(base::config(), rest) {
                exercise(k);
            }
        }
        _ => {
            let mut k = if which & 0x80 != 0 { Kernel::new(base::config()) } else { base::kernel() };
            let mut data = rest;
            while data.len() >= 2 {
                let len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
                if let Ok(r) = record::decode(&data[2..2 + len]) {
                    apply(&mut k, &r);
                }
                data = &data[2 + len..];
            }
            exercise(k);
        }
    }
}

/// Applies a record; a refusal must leave the kernel unchanged (recovery
/// relies on that to skip a bad record and quarantine its session).
fn apply(k: &mut Kernel, r: &macp_kernel::macp_wire::storage::Record) {
    let before = k.snapshot();
    if k.apply_record(r).is_err() {
        assert!(k.snapshot() == before, "a refused record changed the kernel: {r:?}");
    } else {
        let again = record::decode(&record::encode(r)).expect("an applied record re-decodes");
        assert_eq!(&again, r, "an applied record changed through its encoding");
    }
}

/// Whatever state decoding produced must be a working kernel: its
/// checkpoint round-trips, and it serves a tick and an envelope to each of
/// its sessions without panicking.
fn exercise(mut k: Kernel) {
    let snap = k.snapshot();
    let restored = Kernel::restore(base::config(), &snap).expect("a kernel's own checkpoint restores");
    assert!(restored.snapshot() == snap, "a checkpoint does not round-trip");
    let sessions: Vec<(String, String, String)> =
        k.all_sessions().map(|m| (m.session_id, m.mode, m.initiator)).take(16).collect();
    let now = base::base().now_ms + 1;
    if let Some(d) = k.next_deadline() {
        k.handle(d.max(now), Input::Tick);
    }
    for (i, (sid, mode, initiator)) in sessions.into_iter().enumerate() {
        let env = Envelope {
            macp_version: "1.0".into(),
            mode,
            message_type: "Commitment".into(),
            message_id: format!("fuzz-{i}"),
            session_id: sid,
            sender: initiator.clone(),
            timestamp_unix_ms: 0,
            payload: Vec::new(),
        };
        k.handle(now, Input::Envelope { request: i as u64, identity: Identity::new(initiator), envelope: env });
    }
}
