//! Kernel throughput: how many envelopes per second one kernel accepts on
//! one core, per mode, and how fast records replay (recovery speed).
//!
//! Each `step/<mode>` iteration feeds a fresh kernel the complete, valid
//! transcripts of [`SESSIONS`] sessions of that mode (SessionStart through
//! Commitment, every envelope accepted) via `Kernel::handle`, exactly as the
//! server's driver does; throughput is reported in envelopes. `replay/<mode>`
//! applies the records those transcripts produced with `apply_record`
//! (throughput in records). Building inputs and dropping the kernel are
//! outside the timed part.
//!
//! Run: `cargo bench -p macp-kernel --bench kernel` (add `-- step/decision`
//! to filter). Not run by `cargo test`.
//!
//! The bench uses mimalloc, the allocator the `macp-runtime` binary uses, so
//! it measures the kernel as the server runs it.

use std::hint::black_box;
use std::time::Duration;

mod common;

use common::{envelope, uuid4};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use macp_kernel::macp_wire::modes::{decision, handoff, multi_round, proposal, quorum, task};
use macp_kernel::macp_wire::storage::Record;
use macp_kernel::macp_wire::v1::{CommitmentPayload, SessionStartPayload};
use macp_kernel::macp_wire::Message;
use macp_kernel::{Effect, Identity, Input, Kernel, KernelConfig};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sessions per iteration: enough that session lookups see a populated map.
const SESSIONS: usize = 100;
/// The kernel clock for every input (TTLs never expire mid-run).
const NOW: i64 = 1_700_000_000_000;

/// One scripted message: sender, type, encoded payload.
type Msg = (&'static str, &'static str, Vec<u8>);

/// A mode's happy path: mode id, initiator, participants, messages after
/// the SessionStart, commitment action.
struct Script {
    name: &'static str,
    mode: &'static str,
    initiator: &'static str,
    participants: &'static [&'static str],
    messages: Vec<Msg>,
    action: &'static str,
}

fn scripts() -> Vec<Script> {
    let vote = |who| {
        (
            who,
            "Vote",
            decision::VotePayload { proposal_id: "p1".into(), vote: "APPROVE".into(), reason: String::new() }
                .encode_to_vec(),
        )
    };
    vec![
        Script {
            name: "decision",
            mode: "macp.mode.decision.v1",
            initiator: "I",
            participants: &["A", "B"],
            messages: vec![
                (
                    "A",
                    "Proposal",
                    decision::ProposalPayload { proposal_id: "p1".into(), option: "go".into(), ..Default::default() }
                        .encode_to_vec(),
                ),
                vote("A"),
                vote("B"),
            ],
            action: "decision.selected",
        },
        Script {
            name: "proposal",
            mode: "macp.mode.proposal.v1",
            initiator: "B",
            participants: &["B", "S"],
            messages: vec![
                (
                    "S",
                    "Proposal",
                    proposal::ProposalPayload { proposal_id: "p1".into(), title: "t".into(), ..Default::default() }
                        .encode_to_vec(),
                ),
                (
                    "S",
                    "Accept",
                    proposal::AcceptPayload { proposal_id: "p1".into(), reason: String::new() }.encode_to_vec(),
                ),
                (
                    "B",
                    "Accept",
                    proposal::AcceptPayload { proposal_id: "p1".into(), reason: String::new() }.encode_to_vec(),
                ),
            ],
            action: "proposal.accepted",
        },
        Script {
            name: "task",
            mode: "macp.mode.task.v1",
            initiator: "P",
            participants: &["P", "W"],
            messages: vec![
                (
                    "P",
                    "TaskRequest",
                    task::TaskRequestPayload {
                        task_id: "t1".into(),
                        title: "t".into(),
                        requested_assignee: "W".into(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
                (
                    "W",
                    "TaskAccept",
                    task::TaskAcceptPayload { task_id: "t1".into(), assignee: "W".into(), reason: String::new() }
                        .encode_to_vec(),
                ),
                (
                    "W",
                    "TaskComplete",
                    task::TaskCompletePayload {
                        task_id: "t1".into(),
                        assignee: "W".into(),
                        output: b"out".to_vec(),
                        summary: "s".into(),
                    }
                    .encode_to_vec(),
                ),
            ],
            action: "task.completed",
        },
        Script {
            name: "handoff",
            mode: "macp.mode.handoff.v1",
            initiator: "O",
            participants: &["O", "T"],
            messages: vec![
                (
                    "O",
                    "HandoffOffer",
                    handoff::HandoffOfferPayload {
                        handoff_id: "h1".into(),
                        target_participant: "T".into(),
                        scope: "s".into(),
                        reason: "r".into(),
                    }
                    .encode_to_vec(),
                ),
                (
                    "T",
                    "HandoffAccept",
                    handoff::HandoffAcceptPayload {
                        handoff_id: "h1".into(),
                        accepted_by: "T".into(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
            ],
            action: "handoff.accepted",
        },
        Script {
            name: "quorum",
            mode: "macp.mode.quorum.v1",
            initiator: "C",
            participants: &["A", "B", "D"],
            messages: vec![
                (
                    "C",
                    "ApprovalRequest",
                    quorum::ApprovalRequestPayload {
                        request_id: "r1".into(),
                        action: "a".into(),
                        required_approvals: 2,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
                (
                    "A",
                    "Approve",
                    quorum::ApprovePayload { request_id: "r1".into(), reason: String::new() }.encode_to_vec(),
                ),
                (
                    "B",
                    "Approve",
                    quorum::ApprovePayload { request_id: "r1".into(), reason: String::new() }.encode_to_vec(),
                ),
            ],
            action: "quorum.approved",
        },
        Script {
            name: "multi_round",
            mode: "ext.multi_round.v1",
            initiator: "C",
            participants: &["A", "B"],
            messages: vec![
                ("A", "Contribute", multi_round::ContributePayload { value: "x".into() }.encode_to_vec()),
                ("B", "Contribute", multi_round::ContributePayload { value: "y".into() }.encode_to_vec()),
                ("B", "Contribute", multi_round::ContributePayload { value: "x".into() }.encode_to_vec()),
            ],
            action: "multi_round.converged",
        },
    ]
}

/// The inputs of `SESSIONS` complete sessions of `s`, in order.
fn inputs(s: &Script) -> Vec<Input> {
    let start = SessionStartPayload {
        intent: "bench".into(),
        participants: s.participants.iter().map(|p| p.to_string()).collect(),
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        ttl_ms: 60_000,
        ..Default::default()
    }
    .encode_to_vec();
    let commit = CommitmentPayload {
        commitment_id: "c1".into(),
        action: s.action.into(),
        authority_scope: "bench".into(),
        reason: "bench".into(),
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        outcome_positive: true,
        ..Default::default()
    }
    .encode_to_vec();
    let mut out = Vec::new();
    let mut request = 0;
    for i in 0..SESSIONS {
        let sid = uuid4(i as u64 * 2);
        let all = std::iter::once((s.initiator, "SessionStart", start.clone()))
            .chain(s.messages.iter().cloned())
            .chain(std::iter::once((s.initiator, "Commitment", commit.clone())));
        for (j, (who, ty, payload)) in all.enumerate() {
            request += 1;
            out.push(Input::Envelope {
                request,
                identity: Identity::new(who),
                envelope: envelope(&sid, s.mode, ty, uuid4(((i * 16 + j) as u64) * 2 + 1), who, payload),
            });
        }
    }
    out
}

/// Runs `inputs` through a fresh kernel, checks every envelope was accepted
/// (a benchmark of refusals would measure the wrong thing), and returns the
/// records it persisted.
fn records(name: &str, inputs: &[Input]) -> Vec<Record> {
    let mut k = Kernel::new(KernelConfig::default());
    let mut recs = Vec::new();
    for input in inputs {
        for e in k.handle(NOW, input.clone()) {
            match e {
                Effect::Persist(r) => recs.push(r),
                Effect::Reply { reply, .. } => {
                    assert!(reply.error().is_none(), "{name}: transcript envelope refused: {:?}", reply.error())
                }
                _ => {}
            }
        }
    }
    assert_eq!(recs.len(), inputs.len(), "{name}: one record per envelope");
    recs
}

fn bench(c: &mut Criterion) {
    for s in scripts() {
        let inputs = inputs(&s);
        let recs = records(s.name, &inputs);

        let mut g = c.benchmark_group("step");
        g.throughput(Throughput::Elements(inputs.len() as u64));
        g.bench_function(s.name, |b| {
            b.iter_batched(
                || (Kernel::new(KernelConfig::default()), inputs.clone()),
                |(mut k, inputs)| {
                    for input in inputs {
                        black_box(k.handle(NOW, input));
                    }
                    k
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();

        let mut g = c.benchmark_group("replay");
        g.throughput(Throughput::Elements(recs.len() as u64));
        g.bench_function(s.name, |b| {
            b.iter_batched(
                || Kernel::new(KernelConfig::default()),
                |mut k| {
                    for r in &recs {
                        k.apply_record(black_box(r)).expect("replays");
                    }
                    k
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    // Short runs: the numbers are stable to a few percent well before the
    // defaults (5 s per benchmark), and the machine is shared.
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(20);
    targets = bench
}
criterion_main!(benches);
