//! The test suite every [`Storage`] backend must pass.
//!
//! A backend's own tests implement [`Harness`] (how to open it, restart it
//! cleanly and cut its power) and call [`run_all`], or single cases by name.
//! The cases use synthetic records and summaries: storage never interprets
//! a record beyond its session id and sequence number, so no kernel is
//! needed, and the same suite runs against any later backend (PostgreSQL).
//!
//! What a case checks is the contract of [`Storage`] and [`StorageRead`]:
//! synced records survive restarts and power cuts, unsynced ones survive at
//! most as a prefix, a checkpoint makes a restart start after it, history
//! reads return exactly a session's records in a range, ended sessions stay
//! readable by id and in id order until retention passes, and maintenance
//! deletes them after that (and only then).
#![allow(clippy::missing_panics_doc)]

use std::time::Duration;

use macp_wire::storage::{record::Fact, Record, SessionSummary};
use macp_wire::v1::{Envelope, SessionMetadata, SessionState};

use crate::contract::{summary_id, LoadEvent, Storage};
use crate::retention::Retention;

/// How the suite drives one backend.
pub trait Harness {
    /// The backend.
    type S: Storage;

    /// Opens the backend (not loaded yet). The first call opens an empty
    /// one; later calls reopen what [`Harness::stop`] or [`Harness::crash`]
    /// left behind. `retention` applies to the opened instance.
    fn open(&mut self, retention: Retention) -> Self::S;

    /// A clean stop: everything synced stays, the next open sees it.
    fn stop(&mut self, storage: Self::S);

    /// A power cut: synced data stays; appended but unsynced data may be
    /// lost, whole or from some point on.
    fn crash(&mut self, storage: Self::S);

    /// Starts over with an empty backend for the next case.
    fn reset(&mut self);
}

/// Runs every case against `h`, each on a fresh backend.
pub fn run_all<H: Harness>(h: &mut H) {
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {$(
            eprintln!("storage suite: {}", stringify!($case));
            h.reset();
            $case(h);
        )*};
    }
    cases!(
        synced_records_survive_a_restart,
        unsynced_records_survive_a_power_cut_at_most_as_a_prefix,
        a_checkpoint_is_where_the_next_load_starts,
        history_reads_return_a_sessions_records_in_range,
        ended_sessions_are_readable_by_id_and_in_id_order,
        summaries_handed_back_by_recovery_are_stored_once,
        retention_deletes_ended_sessions_and_only_them,
        forever_keeps_everything,
        appending_before_loading_is_refused,
        reads_work_from_another_thread,
        reads_see_only_synced_records_and_summaries,
    );
}

// ----- synthetic data ----------------------------------------------------------

/// A session id of the strict UUIDv4 shape.
pub fn sid(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// Record `seq` of session `n`, at a time derived from both.
pub fn record(n: u64, seq: u64) -> Record {
    let session_id = sid(n);
    let env = Envelope {
        macp_version: "1.0".into(),
        mode: "ext.suite.v1".into(),
        message_type: "Note".into(),
        message_id: format!("m-{n}-{seq}"),
        session_id: session_id.clone(),
        sender: "agent://suite".into(),
        timestamp_unix_ms: 0,
        payload: vec![n as u8; 16 + (seq as usize % 7)],
    };
    Record { session_id, seq, at_unix_ms: 1_000 + (n as i64) * 10 + seq as i64, fact: Some(Fact::Accepted(env)) }
}

/// A registry record (empty session id).
pub fn registry_record(seq: u64) -> Record {
    Record {
        session_id: String::new(),
        seq,
        at_unix_ms: 1_000 + seq as i64,
        fact: Some(Fact::PolicyUnregistered(format!("p{seq}"))),
    }
}

/// The summary of session `n`, ended at `ended_at` after `last_seq` records.
pub fn summary(n: u64, last_seq: u64, ended_at: i64) -> SessionSummary {
    SessionSummary {
        metadata: Some(SessionMetadata {
            session_id: sid(n),
            mode: "ext.suite.v1".into(),
            state: SessionState::Resolved as i32,
            initiator: "agent://suite".into(),
            ..Default::default()
        }),
        last_seq,
        ended_at_unix_ms: ended_at,
        message_ids: (1..=last_seq).map(|seq| format!("m-{n}-{seq}")).collect(),
        controllers: Vec::new(),
    }
}

/// What a load yielded.
#[derive(Debug, Default, PartialEq)]
pub struct Loaded {
    /// The checkpoint's open state, if one came first.
    pub checkpoint: Option<Vec<u8>>,
    /// The records after it, in order.
    pub records: Vec<Record>,
    /// Damage reports.
    pub damage: usize,
}

/// Loads `s`, collecting what it yields.
pub fn load(s: &mut dyn Storage) -> Loaded {
    let mut out = Loaded::default();
    s.load(&|| false, &mut |ev| {
        match ev {
            LoadEvent::Checkpoint { open_state } => {
                assert!(out.checkpoint.is_none() && out.records.is_empty(), "the checkpoint comes first, once");
                out.checkpoint = Some(open_state.to_vec());
            }
            LoadEvent::Record { record, .. } => out.records.push(record),
            LoadEvent::Damage(_) => out.damage += 1,
        }
        Ok(())
    })
    .expect("load");
    out
}

fn append(s: &mut dyn Storage, records: &[Record], ended: &[SessionSummary]) {
    s.append(records, ended).expect("append");
}

// ----- the cases ----------------------------------------------------------------

/// Synced records come back, in order, after a clean restart and after a
/// power cut; loading an empty backend yields nothing.
pub fn synced_records_survive_a_restart<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    assert_eq!(load(&mut s), Loaded::default(), "a new backend is empty");
    let batch1: Vec<Record> = (1..=3).flat_map(|n| (1..=2).map(move |q| record(n, q))).collect();
    append(&mut s, &batch1, &[]);
    append(&mut s, &[registry_record(1)], &[]);
    s.sync().expect("sync");
    let batch2 = vec![record(1, 3), record(4, 1)];
    append(&mut s, &batch2, &[]);
    s.sync().expect("sync");
    ctx.stop(s);
    let mut want = batch1.clone();
    want.push(registry_record(1));
    want.extend(batch2.iter().cloned());
    let mut s = ctx.open(Retention::Forever);
    assert_eq!(load(&mut s).records, want, "a clean restart keeps every synced record, in order");
    ctx.crash(s);
    let mut s = ctx.open(Retention::Forever);
    assert_eq!(load(&mut s).records, want, "a power cut keeps every synced record");
    ctx.stop(s);
}

/// Appended but unsynced records may be lost in a power cut, but what
/// survives is a prefix of them after every synced record.
pub fn unsynced_records_survive_a_power_cut_at_most_as_a_prefix<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    let synced: Vec<Record> = (1..=4).map(|q| record(1, q)).collect();
    append(&mut s, &synced, &[]);
    s.sync().expect("sync");
    let unsynced: Vec<Record> = (5..=12).map(|q| record(1, q)).collect();
    append(&mut s, &unsynced, &[]);
    ctx.crash(s);
    let mut s = ctx.open(Retention::Forever);
    let got = load(&mut s).records;
    assert!(got.len() >= synced.len(), "a synced record was lost: {} of {}", got.len(), synced.len());
    assert_eq!(&got[..synced.len()], synced.as_slice());
    let rest = &got[synced.len()..];
    assert_eq!(rest, &unsynced[..rest.len()], "what survives of the unsynced records is a prefix of them");
    // Appending continues after whatever survived.
    let next = record(1, got.len() as u64 + 1);
    append(&mut s, std::slice::from_ref(&next), &[]);
    s.sync().expect("sync");
    ctx.stop(s);
    let mut s = ctx.open(Retention::Forever);
    assert_eq!(load(&mut s).records.last(), Some(&next));
    ctx.stop(s);
}

/// After a checkpoint, a load yields the checkpoint, then only the records
/// appended after it; the records before it stay readable as history.
pub fn a_checkpoint_is_where_the_next_load_starts<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    let before = vec![record(1, 1), record(2, 1), registry_record(1), record(1, 2)];
    append(&mut s, &before, &[]);
    s.checkpoint(b"open-state-1").expect("checkpoint");
    let after = vec![record(2, 2), record(3, 1)];
    append(&mut s, &after, &[]);
    s.sync().expect("sync");
    ctx.stop(s);
    let mut s = ctx.open(Retention::Forever);
    let got = load(&mut s);
    assert_eq!(got.checkpoint.as_deref(), Some(&b"open-state-1"[..]));
    assert_eq!(got.records, after);
    let r = s.reader();
    assert_eq!(r.history(&sid(1), 0, u64::MAX).expect("history"), vec![record(1, 1), record(1, 2)]);
    assert_eq!(r.history(&sid(2), 0, u64::MAX).expect("history"), vec![record(2, 1), record(2, 2)]);
    // A second checkpoint replaces the first.
    s.checkpoint(b"open-state-2").expect("checkpoint");
    ctx.crash(s);
    let mut s = ctx.open(Retention::Forever);
    let got = load(&mut s);
    assert_eq!(got.checkpoint.as_deref(), Some(&b"open-state-2"[..]));
    assert!(got.records.is_empty());
    ctx.stop(s);
}

/// `history(session, after, upto)` returns that session's records with
/// `after < seq <= upto`, in order, and nothing of other sessions.
pub fn history_reads_return_a_sessions_records_in_range<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    for q in 1..=6 {
        append(&mut s, &[record(1, q), record(2, q)], &[]);
        s.sync().expect("sync");
    }
    let r = s.reader();
    let seqs =
        |after, upto| -> Vec<u64> { r.history(&sid(1), after, upto).expect("history").iter().map(|x| x.seq).collect() };
    assert_eq!(seqs(0, 6), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(seqs(2, 4), vec![3, 4]);
    assert_eq!(seqs(6, 9), Vec::<u64>::new());
    assert_eq!(seqs(3, 3), Vec::<u64>::new());
    assert!(r.history(&sid(1), 0, 6).expect("history").iter().all(|x| x.session_id == sid(1)));
    assert!(r.history(&sid(99), 0, 9).expect("history").is_empty(), "an unknown session has no history");
    ctx.stop(s);
}

/// Summaries appended with their session's records are readable by id
/// (one at a time and many at once) and listed in id order, through
/// restarts and checkpoints.
pub fn ended_sessions_are_readable_by_id_and_in_id_order<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    // Sessions 1..=20 end (in an order unlike their ids); 21 stays open.
    for n in (1..=20u64).rev() {
        append(&mut s, &[record(n, 1), record(n, 2)], &[summary(n, 2, 5_000 + n as i64)]);
    }
    append(&mut s, &[record(21, 1)], &[]);
    s.sync().expect("sync");
    let check = |s: &H::S| {
        let r = s.reader();
        assert_eq!(r.ended(&sid(7)).expect("ended"), Some(summary(7, 2, 5_007)));
        assert_eq!(r.ended(&sid(21)).expect("ended"), None, "an open session has no summary");
        assert_eq!(r.ended(&sid(99)).expect("ended"), None);
        // Many at once: in the order asked, a repeat answered twice.
        let asked = [sid(21), sid(7), sid(99), sid(20), sid(7)];
        let asked: Vec<&str> = asked.iter().map(String::as_str).collect();
        let many = r.ended_many(&asked).expect("ended_many");
        let one_by_one: Vec<_> = asked.iter().map(|id| r.ended(id).expect("ended")).collect();
        assert_eq!(many, one_by_one);
        assert_eq!(many[1], Some(summary(7, 2, 5_007)));
        assert_eq!(r.ended_many(&[]).expect("ended_many of nothing"), Vec::new());
        let page1 = r.list_ended(None, 8).expect("list");
        let ids: Vec<String> = page1.iter().map(|x| summary_id(x).to_string()).collect();
        assert_eq!(ids, (1..=8).map(sid).collect::<Vec<_>>());
        let page2 = r.list_ended(Some(&sid(8)), 100).expect("list");
        assert_eq!(page2.len(), 12);
        assert_eq!(summary_id(&page2[0]), sid(9));
        assert_eq!(r.history(&sid(20), 0, 2).expect("history"), vec![record(20, 1), record(20, 2)]);
    };
    check(&s);
    s.checkpoint(b"cp").expect("checkpoint");
    check(&s);
    ctx.stop(s);
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    check(&s);
    ctx.crash(s);
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    check(&s);
    ctx.stop(s);
}

/// Recovery hands back the sessions that ended while it replayed (their
/// records are already stored): the summary is stored, once.
pub fn summaries_handed_back_by_recovery_are_stored_once<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    append(&mut s, &[record(1, 1), record(1, 2)], &[summary(1, 2, 5_000)]);
    append(&mut s, &[record(2, 1), record(2, 2)], &[]);
    s.sync().expect("sync");
    ctx.crash(s);
    let mut s = ctx.open(Retention::Forever);
    let got = load(&mut s);
    assert_eq!(got.records.len(), 4);
    // As the pipeline does after replaying: both sessions' summaries again.
    append(&mut s, &[], &[summary(1, 2, 5_000), summary(2, 2, 5_001)]);
    s.sync().expect("sync");
    let r = s.reader();
    let listed = r.list_ended(None, 10).expect("list");
    assert_eq!(listed, vec![summary(1, 2, 5_000), summary(2, 2, 5_001)]);
    assert_eq!(r.history(&sid(2), 0, 9).expect("history"), vec![record(2, 1), record(2, 2)]);
    ctx.stop(s);
}

fn maintain_until_idle(s: &mut dyn Storage, now: i64) -> u64 {
    let mut deleted = 0;
    for _ in 0..10_000 {
        let m = s.maintain(now).expect("maintain");
        deleted += m.expired_sessions + m.evicted_sessions;
        if !m.more {
            // One more call must find nothing left to do.
            let again = s.maintain(now).expect("maintain");
            deleted += again.expired_sessions + again.evicted_sessions;
            if again.expired_sessions + again.evicted_sessions == 0 {
                return deleted;
            }
        }
    }
    panic!("maintenance never finished");
}

/// Past retention, an ended session (summary and records) is deleted once
/// a checkpoint follows its end; sessions within retention and open
/// sessions are untouched.
pub fn retention_deletes_ended_sessions_and_only_them<H: Harness>(ctx: &mut H) {
    let retention = Retention::For(Duration::from_secs(60));
    let mut s = ctx.open(retention);
    load(&mut s);
    // 1..=30 end at t=10s, 31..=40 at t=100s; 41 stays open.
    for n in 1..=40u64 {
        let ended_at = if n <= 30 { 10_000 } else { 100_000 };
        append(&mut s, &[record(n, 1), record(n, 2)], &[summary(n, 2, ended_at)]);
    }
    append(&mut s, &[record(41, 1)], &[]);
    s.sync().expect("sync");
    // Within retention of everything: nothing goes.
    assert_eq!(maintain_until_idle(&mut s, 60_000), 0);
    s.checkpoint(b"cp").expect("checkpoint");
    // At t=120s only the first thirty are past 60 s.
    let deleted = maintain_until_idle(&mut s, 120_000);
    assert_eq!(deleted, 30);
    let check = |s: &H::S| {
        let r = s.reader();
        for n in 1..=30 {
            assert_eq!(r.ended(&sid(n)).expect("ended"), None, "session {n} is past retention");
            assert!(r.history(&sid(n), 0, 9).expect("history").is_empty(), "session {n}'s records are gone");
        }
        for n in 31..=40 {
            assert_eq!(r.ended(&sid(n)).expect("ended"), Some(summary(n, 2, 100_000)));
            assert_eq!(r.history(&sid(n), 0, 9).expect("history").len(), 2);
        }
        assert_eq!(r.history(&sid(41), 0, 9).expect("history"), vec![record(41, 1)], "open sessions stay");
        let listed: Vec<String> =
            r.list_ended(None, 100).expect("list").iter().map(|x| summary_id(x).to_string()).collect();
        assert_eq!(listed, (31..=40).map(sid).collect::<Vec<_>>());
    };
    check(&s);
    ctx.stop(s);
    let mut s = ctx.open(retention);
    load(&mut s);
    check(&s);
    ctx.stop(s);
}

/// With retention `forever`, maintenance deletes nothing, however old.
pub fn forever_keeps_everything<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    for n in 1..=10u64 {
        append(&mut s, &[record(n, 1)], &[summary(n, 1, 1_000)]);
    }
    s.checkpoint(b"cp").expect("checkpoint");
    assert_eq!(maintain_until_idle(&mut s, i64::MAX / 2), 0);
    assert_eq!(s.reader().list_ended(None, 100).expect("list").len(), 10);
    ctx.stop(s);
}

/// Appending before the log was loaded would put records before what the
/// log already holds: refused.
pub fn appending_before_loading_is_refused<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    assert!(s.append(&[record(1, 1)], &[]).is_err(), "append before load");
    load(&mut s);
    assert!(s.append(&[record(1, 1)], &[]).is_ok());
    ctx.stop(s);
}

/// Readers are usable from other threads while the writer appends.
pub fn reads_work_from_another_thread<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    append(&mut s, &[record(1, 1)], &[]);
    s.sync().expect("sync");
    let r = s.reader();
    let t = std::thread::spawn(move || {
        let mut max = 0;
        for _ in 0..200 {
            let h = r.history(&sid(1), 0, u64::MAX).expect("history");
            assert!(h.windows(2).all(|w| w[1].seq == w[0].seq + 1), "a read saw a gap");
            max = max.max(h.len());
        }
        max
    });
    for q in 2..=100 {
        append(&mut s, &[record(1, q)], &[]);
        s.sync().expect("sync");
    }
    let seen = t.join().expect("reader thread");
    assert!(seen >= 1);
    assert_eq!(s.reader().history(&sid(1), 0, u64::MAX).expect("history").len(), 100);
    ctx.stop(s);
}

/// Readers see what a sync made durable, never what was only appended:
/// a reply released after the sync can point a reader at it, and nothing
/// a power cut could take back is ever shown.
pub fn reads_see_only_synced_records_and_summaries<H: Harness>(ctx: &mut H) {
    let mut s = ctx.open(Retention::Forever);
    load(&mut s);
    append(&mut s, &[record(1, 1), record(2, 1)], &[]);
    s.sync().expect("sync");
    append(&mut s, &[record(1, 2), record(2, 2)], &[summary(2, 2, 5_000)]);
    let r = s.reader();
    assert_eq!(r.history(&sid(1), 0, 9).expect("history"), vec![record(1, 1)], "an appended record is not shown");
    assert_eq!(r.ended(&sid(2)).expect("ended"), None, "an appended summary is not shown");
    s.sync().expect("sync");
    assert_eq!(r.history(&sid(1), 0, 9).expect("history"), vec![record(1, 1), record(1, 2)]);
    assert_eq!(r.ended(&sid(2)).expect("ended"), Some(summary(2, 2, 5_000)));
    assert_eq!(r.history(&sid(2), 0, 9).expect("history"), vec![record(2, 1), record(2, 2)]);
    ctx.stop(s);
}
