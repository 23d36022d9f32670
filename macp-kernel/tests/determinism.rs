//! The kernel is a pure function: the same inputs give byte-identical effects,
//! and replaying the persisted records rebuilds identical state (metadata,
//! dedup sets, mode state).

mod common;

use common::*;
use macp_kernel::macp_wire::modes::decision::{ProposalPayload, VotePayload};
use macp_kernel::macp_wire::v1::{ModeDescriptor, SessionStartPayload};
use macp_kernel::macp_wire::Message;
use std::collections::BTreeMap;

use macp_kernel::macp_wire::storage::SessionSummary;
use macp_kernel::{
    record, ControlOp, Effect, EndedSessions, Identity, Input, KResult, Kernel, KernelConfig, NoEnded, Query,
};
use proptest::prelude::*;

const SIDS: [&str; 3] =
    ["00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002", "session_token_abcdefghijkl"];
const WHO: [&str; 4] = ["I", "A", "B", "X"];
const EXT: &str = "ext.notes.v1";

#[derive(Clone, Debug)]
enum Op {
    Start { sid: usize, who: usize, ext: bool, ttl: i64, max_suspend: i64 },
    Proposal { sid: usize, who: usize, pid: u8, mid: u8 },
    Vote { sid: usize, who: usize, pid: u8, approve: bool, mid: u8 },
    Note { sid: usize, who: usize, mid: u8 },
    Commit { sid: usize, who: usize, positive: bool, mid: u8 },
    Garbage { sid: usize, who: usize, bytes: Vec<u8>, mid: u8 },
    Control { sid: usize, who: usize, op: u8 },
    Advance { ms: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..SIDS.len();
    let w = 0..WHO.len();
    prop_oneof![
        (
            s.clone(),
            w.clone(),
            any::<bool>(),
            prop_oneof![Just(50i64), Just(1_000), Just(60_000)],
            prop_oneof![Just(0i64), Just(30)]
        )
            .prop_map(|(sid, who, ext, ttl, max_suspend)| Op::Start { sid, who, ext, ttl, max_suspend }),
        (s.clone(), w.clone(), 0..3u8, 0..6u8).prop_map(|(sid, who, pid, mid)| Op::Proposal { sid, who, pid, mid }),
        (s.clone(), w.clone(), 0..3u8, any::<bool>(), 0..6u8).prop_map(|(sid, who, pid, approve, mid)| Op::Vote {
            sid,
            who,
            pid,
            approve,
            mid
        }),
        (s.clone(), w.clone(), 0..6u8).prop_map(|(sid, who, mid)| Op::Note { sid, who, mid }),
        (s.clone(), w.clone(), any::<bool>(), 0..6u8).prop_map(|(sid, who, positive, mid)| Op::Commit {
            sid,
            who,
            positive,
            mid
        }),
        (s.clone(), w.clone(), proptest::collection::vec(any::<u8>(), 0..12), 0..6u8)
            .prop_map(|(sid, who, bytes, mid)| Op::Garbage { sid, who, bytes, mid }),
        (s, w, 0..3u8).prop_map(|(sid, who, op)| Op::Control { sid, who, op }),
        (0i64..200).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn to_input(op: &Op, request: u64) -> Option<Input> {
    let mode_of = |sid: usize| if sid == 2 { EXT } else { DECISION };
    let send = |sid: usize, who: usize, t: &str, mid: u8, payload: Vec<u8>| Input::Envelope {
        request,
        identity: Identity::new(WHO[who]),
        envelope: env(SIDS[sid], mode_of(sid), t, &format!("m{mid}"), "", payload),
    };
    Some(match op.clone() {
        Op::Start { sid, who, ext, ttl, max_suspend } => {
            let p = SessionStartPayload { ttl_ms: ttl, max_suspend_ms: max_suspend, ..default_start() };
            let mode = if ext || sid == 2 { EXT } else { DECISION };
            Input::Envelope { request, identity: Identity::new(WHO[who]), envelope: start_env(SIDS[sid], mode, "", &p) }
        }
        Op::Proposal { sid, who, pid, mid } => send(
            sid,
            who,
            "Proposal",
            mid,
            ProposalPayload { proposal_id: format!("p{pid}"), option: "o".into(), ..Default::default() }
                .encode_to_vec(),
        ),
        Op::Vote { sid, who, pid, approve, mid } => send(
            sid,
            who,
            "Vote",
            mid,
            VotePayload {
                proposal_id: format!("p{pid}"),
                vote: if approve { "APPROVE" } else { "REJECT" }.into(),
                reason: String::new(),
            }
            .encode_to_vec(),
        ),
        Op::Note { sid, who, mid } => send(sid, who, "Note", mid, b"note".to_vec()),
        Op::Commit { sid, who, positive, mid } => send(
            sid,
            who,
            "Commitment",
            mid,
            commitment(if positive { "decision.selected" } else { "decision.rejected" }, positive).encode_to_vec(),
        ),
        Op::Garbage { sid, who, bytes, mid } => send(sid, who, "Vote", mid, bytes),
        Op::Control { sid, who, op } => Input::Control {
            request,
            identity: Identity::new(WHO[who]),
            op: [ControlOp::Cancel, ControlOp::Suspend, ControlOp::Resume][op as usize],
            session_id: SIDS[sid].to_string(),
            reason: "r".into(),
        },
        Op::Advance { .. } => return None,
    })
}

fn register_ext() -> Input {
    Input::RegisterExtMode {
        request: 0,
        identity: Identity::new("admin"),
        descriptor: ModeDescriptor {
            mode: EXT.into(),
            mode_version: "1.0.0".into(),
            message_types: vec!["SessionStart".into(), "Note".into(), "Commitment".into()],
            terminal_message_types: vec!["Commitment".into()],
            ..Default::default()
        },
    }
}

/// Runs ops against a fresh kernel; returns every effect.
fn run(ops: &[Op]) -> (Kernel, Vec<Effect>) {
    let cfg = KernelConfig { session_id_policy: macp_kernel::SessionIdPolicy::Strict, ..Default::default() };
    let mut k = Kernel::new(cfg);
    let mut now = T0;
    let mut effects = k.handle(now, register_ext());
    for (i, op) in ops.iter().enumerate() {
        match to_input(op, i as u64 + 1) {
            Some(input) => effects.extend(k.handle(now, input)),
            None => {
                if let Op::Advance { ms } = op {
                    now += ms;
                }
                if k.next_deadline().is_some_and(|d| d <= now) {
                    effects.extend(k.handle(now, Input::Tick));
                }
            }
        }
    }
    (k, effects)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn same_inputs_same_effects_and_replay_rebuilds_state(ops in proptest::collection::vec(op(), 1..60)) {
        let (k1, e1) = run(&ops);
        let (k2, e2) = run(&ops);
        prop_assert_eq!(&e1, &e2);
        let bytes = |e: &[Effect]| -> Vec<Vec<u8>> {
            e.iter().filter_map(|x| if let Effect::Persist(r) = x { Some(record::encode(r)) } else { None }).collect()
        };
        prop_assert_eq!(bytes(&e1), bytes(&e2));
        prop_assert_eq!(k1.snapshot(), k2.snapshot());

        // Replay through encode/decode, as storage would: the same state and
        // the same summaries of the sessions that ended.
        let mut k3 = Kernel::new(KernelConfig::default());
        let mut replayed_ends = Vec::new();
        for b in bytes(&e1) {
            let r = record::decode(&b).expect("record decodes");
            replayed_ends.extend(k3.apply_record(&r).expect("a persisted record replays"));
        }
        prop_assert_eq!(k3.snapshot(), k1.snapshot());
        let live_ends: Vec<SessionSummary> =
            e1.iter().filter_map(|x| if let Effect::Ended(s) = x { Some((**s).clone()) } else { None }).collect();
        prop_assert_eq!(replayed_ends, live_ends);

        // And from a checkpoint taken at the end.
        let k4 = Kernel::restore(KernelConfig::default(), &k1.snapshot()).expect("checkpoint restores");
        prop_assert_eq!(k4.snapshot(), k1.snapshot());
        prop_assert_eq!(k4.next_deadline(), k1.next_deadline());

        // The streamed checkpoint is the same bytes, in whatever pieces.
        let mut streamed = Vec::new();
        k1.write_snapshot(&mut streamed).expect("a Vec takes every write");
        prop_assert_eq!(streamed, k1.snapshot());
    }
}

/// Ended sessions as storage would keep them: every summary the kernel
/// hands out, by session id.
#[derive(Default)]
struct MapEnded(BTreeMap<String, SessionSummary>);

impl EndedSessions for MapEnded {
    fn get(&self, id: &str) -> KResult<Option<SessionSummary>> {
        Ok(self.0.get(id).cloned())
    }
    fn list(&self, after: Option<&str>, limit: usize) -> KResult<Vec<SessionSummary>> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(self.0.range::<str, _>((lower, Bound::Unbounded)).map(|(_, s)| s.clone()).take(limit).collect())
    }
}

/// Runs ops against a kernel that keeps no ended session in memory once
/// settled (cache size 0), with storage holding every summary, settling
/// after every input as the pipeline does after each commit.
fn run_forgetful(ops: &[Op]) -> (Kernel, Vec<Effect>, MapEnded) {
    let cfg = KernelConfig { ended_cache: 0, ..Default::default() };
    let mut k = Kernel::new(cfg);
    let mut store = MapEnded::default();
    let mut now = T0;
    let mut effects = Vec::new();
    let step = |k: &mut Kernel, store: &mut MapEnded, now: i64, input: Input, effects: &mut Vec<Effect>| {
        let start = effects.len();
        k.handle_with(now, input, store, effects);
        for e in &effects[start..] {
            if let Effect::Ended(s) = e {
                store.0.insert(s.metadata.as_ref().unwrap().session_id.clone(), (**s).clone());
            }
        }
        k.settle_ended();
    };
    step(&mut k, &mut store, now, register_ext(), &mut effects);
    for (i, op) in ops.iter().enumerate() {
        match to_input(op, i as u64 + 1) {
            Some(input) => step(&mut k, &mut store, now, input, &mut effects),
            None => {
                if let Op::Advance { ms } = op {
                    now += ms;
                }
                if k.next_deadline().is_some_and(|d| d <= now) {
                    step(&mut k, &mut store, now, Input::Tick, &mut effects);
                }
            }
        }
    }
    (k, effects, store)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The working set: a kernel that forgets every ended session (and reads
    /// it back from storage) answers every input exactly as one that keeps
    /// them all in memory, and holds none of them itself.
    #[test]
    fn forgetting_ended_sessions_changes_no_answer(ops in proptest::collection::vec(op(), 1..80)) {
        let (k1, e1) = run(&ops);
        let (k2, e2, store) = run_forgetful(&ops);
        prop_assert_eq!(&e1, &e2);
        prop_assert_eq!(k1.snapshot(), k2.snapshot());
        prop_assert_eq!(k2.cached_ended_count(), 0);
        // Reads agree too, for every session and every reader.
        for sid in SIDS {
            for who in WHO {
                let q = Query::GetSession { identity: Identity::new(who), session_id: sid.to_string() };
                let a1 = k1.answer(&q, &NoEnded);
                let a2 = k2.answer(&q, &store);
                prop_assert_eq!(a1, a2);
            }
        }
    }
}

/// Guards the property test against vacuity: the generator must produce
/// workloads in which sessions start, messages are accepted, sessions
/// resolve and records persist — otherwise "identical effects" is trivial.
#[test]
fn generated_workloads_exercise_the_kernel() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut accepted, mut persisted, mut resolved) = (0, 0, 0);
    for _ in 0..200 {
        let ops = proptest::collection::vec(op(), 1..60).new_tree(&mut runner).unwrap().current();
        let (k, effects) = run(&ops);
        for e in &effects {
            match e {
                Effect::Persist(_) => persisted += 1,
                Effect::Reply { reply: macp_kernel::Reply::Session { result: Ok(_), .. }, .. } => accepted += 1,
                _ => {}
            }
        }
        resolved += SIDS
            .iter()
            .filter(|s| k.session_state(s) == Some(macp_kernel::macp_wire::v1::SessionState::Resolved))
            .count();
    }
    eprintln!("accepted {accepted}, persisted {persisted}, resolved {resolved}");
    assert!(accepted > 500, "accepted {accepted}");
    assert!(persisted > 500, "persisted {persisted}");
    assert!(resolved > 10, "resolved {resolved}");
}
