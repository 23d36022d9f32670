//! Memory per open session: how much resident memory the kernel needs to
//! hold `N` open decision sessions (the "100,000 open sessions in ≤ 100 MB"
//! target is for the whole server; this isolates the kernel's share).
//!
//! Each session is opened with a SessionStart like the Python SDK's (UUIDv4
//! session and message ids, an initiator plus two participants, a one-hour
//! TTL); the RSS growth is reported, then again after one Proposal in each
//! session (mode state, a second dedup and activity entry). Inputs are
//! generated one at a time and the effects dropped, so the resident-set
//! growth is the kernel's state (plus allocator slack).
//!
//! Run: `cargo bench -p macp-kernel --bench memory` (optionally
//! `-- 100000` for the session count). Linux only (reads /proc/self/status).

mod common;

use common::{envelope, uuid4};
use macp_kernel::macp_wire::modes::decision;
use macp_kernel::macp_wire::v1::{Envelope, SessionStartPayload};
use macp_kernel::macp_wire::Message;
use macp_kernel::{Effect, Identity, Input, Kernel, KernelConfig};

/// The allocator the `macp-runtime` binary uses.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NOW: i64 = 1_700_000_000_000;
const MODE: &str = "macp.mode.decision.v1";

/// Resident set size in bytes, from /proc/self/status.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn send(k: &mut Kernel, who: &str, env: Envelope) {
    let effects = k.handle(NOW, Input::Envelope { request: 0, identity: Identity::new(who), envelope: env });
    for e in effects {
        if let Effect::Reply { reply, .. } = e {
            assert!(reply.error().is_none(), "refused: {:?}", reply.error());
        }
    }
}

fn main() {
    let n: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100_000);
    let proposal =
        decision::ProposalPayload { proposal_id: "p1".into(), option: "ship it".into(), ..Default::default() }
            .encode_to_vec();
    let mut k = Kernel::new(KernelConfig::default());
    let before = rss_bytes();
    let sid = |i: u64| uuid4(3 * i);
    let who = |i: u64, role: &str| format!("agent-{i}-{role}");
    for i in 0..n {
        let initiator = who(i, "coordinator");
        let start = SessionStartPayload {
            intent: "choose a deployment plan".into(),
            participants: vec![who(i, "a"), who(i, "b")],
            mode_version: "1.0.0".into(),
            configuration_version: "cfg-1".into(),
            ttl_ms: 3_600_000,
            ..Default::default()
        }
        .encode_to_vec();
        send(&mut k, &initiator, envelope(&sid(i), MODE, "SessionStart", uuid4(3 * i + 1), &initiator, start));
    }
    report(n, "open decision sessions (SessionStart only)", before, rss_bytes());
    // A checkpoint serializes the state, streamed as the server's file
    // store does (Kernel::write_snapshot); what it leaves resident is the
    // server's cost of checkpointing.
    let mut counted = Counted(0);
    k.write_snapshot(&mut counted).expect("counting never fails");
    report(n, "  ... after a checkpoint of them", before, rss_bytes());
    println!("  (checkpoint: {:.1} MB)", counted.0 as f64 / 1e6);
    for i in 0..n {
        let a = who(i, "a");
        send(&mut k, &a, envelope(&sid(i), MODE, "Proposal", uuid4(3 * i + 2), &a, proposal.clone()));
    }
    report(n, "  ... after one Proposal in each", before, rss_bytes());
    println!("(size_of::<Session>() = {} bytes)", std::mem::size_of::<macp_kernel::session::Session>());
    assert_eq!(k.session_count() as u64, n);
}

/// A writer that only counts the bytes (the checkpoint's size).
struct Counted(u64);

impl std::io::Write for Counted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn report(n: u64, what: &str, before: u64, after: u64) {
    let grew = after.saturating_sub(before);
    println!("{n} {what}: RSS +{:.1} MB, {} bytes per session", grew as f64 / 1e6, grew / n.max(1));
}
