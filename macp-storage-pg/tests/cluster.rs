//! Cluster membership and shard leases on a real PostgreSQL: nodes split
//! the shards and rebalance as they join and leave, a dead node's shards
//! are taken after its lease TTL, and the database refuses every write a
//! node makes under a lease it no longer holds (the fencing epoch), so a
//! paused node that wakes up cannot change a shard someone else serves.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Db;
use macp_pg_test::unique_name;
use macp_storage::suite::{self, record, sid, Harness};
use macp_storage::{Retention, Storage, StorageError};
use macp_storage_pg::{
    preferred_owner, shard_of, ClusterConfig, ClusterError, ClusterRegistry, Membership, PgHost, PgStorage,
    RegistryEntry, RegistryKind, RegistryOp, ShardLease, Tick,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn node(id: &str, shards: u32, ttl: Duration) -> ClusterConfig {
    ClusterConfig { node_id: id.into(), advertise_addr: format!("{id}.test:50051"), shards, lease_ttl: ttl }
}

fn join(rt: &tokio::runtime::Runtime, db: &Db, schema: &str, cfg: ClusterConfig) -> Membership {
    rt.block_on(Membership::join(&db.url, &db.cfg(schema, Retention::Forever), cfg)).expect("join")
}

fn tick(rt: &tokio::runtime::Runtime, m: &mut Membership) -> Tick {
    rt.block_on(m.tick()).expect("tick")
}

fn held(m: &Membership) -> BTreeSet<u32> {
    m.held().keys().copied().collect()
}

/// The shard storage of `lease`, loaded.
fn open_shard(db: &Db, schema: &str, lease: ShardLease) -> PgStorage {
    let mut s = PgStorage::open_shard(&db.url, db.cfg(schema, Retention::Forever), lease).expect("open the shard");
    suite::load(&mut s);
    s
}

/// Rows of `shard` in the log.
fn rows(db: &Db, schema: &str, shard: u32) -> String {
    db.sql(&format!("SELECT count(*) FROM {schema}.macp_records WHERE shard = {shard}"))
}

/// The generic storage suite, on one shard of a cluster's schema, written
/// under a lease of a node that keeps it.
#[test]
fn the_storage_suite_passes_on_a_shard() {
    struct Shard {
        db: Db,
        schema: String,
        rt: tokio::runtime::Runtime,
        lease: Option<ShardLease>,
        member: Option<Membership>,
    }
    impl Shard {
        fn lease(&mut self) -> ShardLease {
            if self.lease.is_none() {
                let mut m = join(&self.rt, &self.db, &self.schema, node("suite", 4, Duration::from_secs(300)));
                let t = tick(&self.rt, &mut m);
                assert_eq!(t.acquired.len(), 4, "the only node takes every shard");
                self.lease = m.lease_for(2);
                self.member = Some(m);
            }
            self.lease.clone().unwrap()
        }
    }
    impl Harness for Shard {
        type S = PgStorage;
        fn open(&mut self, retention: Retention) -> PgStorage {
            let lease = self.lease();
            PgStorage::open_shard(&self.db.url, self.db.cfg(&self.schema, retention), lease).expect("open")
        }
        fn stop(&mut self, storage: PgStorage) {
            drop(storage);
        }
        fn crash(&mut self, storage: PgStorage) {
            storage.crash();
        }
        fn reset(&mut self) {
            self.schema = unique_name("suite");
            self.lease = None;
            self.member = None;
        }
    }
    let mut h = Shard { db: Db::new(), schema: unique_name("suite"), rt: rt(), lease: None, member: None };
    suite::run_all(&mut h);
    // Everything went to shard 2 of the last case's schema.
    let others = h.db.sql(&format!("SELECT count(*) FROM {}.macp_records WHERE shard <> 2", h.schema));
    assert_eq!(others, "0");
}

/// Nodes split the shards by rendezvous hashing: a joining node gets its
/// share once the holder hands it over, a leaving node's shards go to the
/// others at once, and no shard ever has two holders.
#[test]
fn nodes_split_the_shards_and_rebalance() {
    let (db, rt, schema) = (Db::new(), rt(), unique_name("split"));
    let ttl = Duration::from_secs(60);
    let mut a = join(&rt, &db, &schema, node("node-a", 16, ttl));
    let t = tick(&rt, &mut a);
    assert_eq!(t.acquired.len(), 16, "{t:?}");
    assert!(t.acquired.iter().all(|l| l.epoch == 1 && l.node_id == "node-a"));
    assert_eq!(t.members.len(), 1);

    let mut b = join(&rt, &db, &schema, node("node-b", 16, ttl));
    let t = tick(&rt, &mut b);
    assert!(t.acquired.is_empty(), "every shard is held: {t:?}");
    assert_eq!(t.owners.len(), 16);
    let theirs: BTreeSet<u32> =
        (0..16).filter(|s| preferred_owner(*s, ["node-a", "node-b"]) == Some("node-b")).collect();
    assert!(!theirs.is_empty() && theirs.len() < 16, "{theirs:?}");

    let t = tick(&rt, &mut a);
    assert_eq!(t.hand_over.iter().copied().collect::<BTreeSet<_>>(), theirs, "a hands over b's share");
    assert!(t.lost.is_empty() && t.acquired.is_empty());
    rt.block_on(a.release(&t.hand_over)).unwrap();
    let t = tick(&rt, &mut b);
    assert_eq!(t.acquired.iter().map(|l| l.shard).collect::<BTreeSet<_>>(), theirs);
    assert!(t.acquired.iter().all(|l| l.epoch == 2), "a second acquisition raises the epoch: {t:?}");
    assert_eq!(held(&a).intersection(&held(&b)).count(), 0);
    assert_eq!(held(&a).len() + held(&b).len(), 16);
    assert_eq!(t.owners.values().filter(|o| *o == "node-b").count(), theirs.len());
    assert!(tick(&rt, &mut a).hand_over.is_empty(), "balanced");

    rt.block_on(b.leave()).unwrap();
    let t = tick(&rt, &mut a);
    assert_eq!(t.acquired.iter().map(|l| l.shard).collect::<BTreeSet<_>>(), theirs, "back at once");
    assert_eq!(held(&a).len(), 16);
    assert_eq!(t.members.len(), 1);
}

/// A node that stops renewing (dead, or paused) loses its shards after the
/// TTL: the survivor takes them at a new epoch and finds everything the
/// first node committed, and the database refuses what the first node
/// writes afterwards, whether or not someone took the shard yet.
#[test]
fn a_lapsed_lease_is_taken_over_and_fences_its_old_holder() {
    let (db, rt, schema) = (Db::new(), rt(), unique_name("fence"));
    let ttl = Duration::from_millis(700);
    let mut a = join(&rt, &db, &schema, node("node-a", 8, ttl));
    tick(&rt, &mut a);
    assert_eq!(held(&a).len(), 8);
    let session = sid(7);
    let shard = shard_of(&session, 8);
    let lease_a = a.lease_for(shard).unwrap();
    let mut sa = open_shard(&db, &schema, lease_a.clone());
    sa.append(&[record(7, 1), record(7, 2)], &[]).unwrap();
    sa.sync().expect("a writes under its lease");

    // a is paused: no tick. Its lease lapses; its next write is refused
    // even though nobody has taken the shard yet.
    std::thread::sleep(ttl + Duration::from_millis(200));
    sa.append(&[record(7, 3)], &[]).unwrap();
    match sa.sync() {
        Err(StorageError::Fenced { shard: s, epoch }) => assert_eq!((s, epoch), (shard, lease_a.epoch)),
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(matches!(sa.sync(), Err(StorageError::Poisoned)), "a refused write poisons the storage");
    assert_eq!(rows(&db, &schema, shard), "2");

    // b joins and, a's heartbeat being stale, takes every shard.
    let mut b = join(&rt, &db, &schema, node("node-b", 8, ttl));
    let t = tick(&rt, &mut b);
    assert_eq!(t.members.len(), 1, "a is not live: {t:?}");
    assert_eq!(t.acquired.len(), 8);
    let lease_b = b.lease_for(shard).unwrap();
    assert_eq!(lease_b.epoch, lease_a.epoch + 1);
    let mut sb = PgStorage::open_shard(&db.url, db.cfg(&schema, Retention::Forever), lease_b).unwrap();
    let loaded = suite::load(&mut sb);
    assert_eq!(loaded.records, vec![record(7, 1), record(7, 2)], "b finds what a committed");
    sb.append(&[record(7, 3)], &[]).unwrap();
    sb.sync().unwrap();

    // a wakes up: a fresh storage under its old lease is refused too, and
    // its next tick reports the shards lost and takes none back.
    let mut sa = open_shard(&db, &schema, lease_a);
    sa.append(&[record(7, 4)], &[]).unwrap();
    assert!(matches!(sa.sync(), Err(StorageError::Fenced { .. })));
    assert!(matches!(sa.checkpoint(b"state"), Err(StorageError::Poisoned)));
    let mut sa = open_shard(&db, &schema, a.lease_for(shard).unwrap());
    assert!(matches!(sa.checkpoint(b"state"), Err(StorageError::Fenced { .. })), "checkpoints are fenced");
    let t = tick(&rt, &mut a);
    assert_eq!(t.lost.len(), 8, "{t:?}");
    assert!(held(&a).is_empty());
    assert!(t.acquired.is_empty(), "b is live and holds them all (a's share is still b's): {t:?}");
    assert_eq!(
        sb.reader().history(&session, 0, 10).unwrap(),
        vec![record(7, 1), record(7, 2), record(7, 3)],
        "nothing a wrote after losing the lease is there"
    );
    let checkpoints = db.sql(&format!("SELECT count(*) FROM {schema}.macp_checkpoint"));
    assert_eq!(checkpoints, "0");
}

/// A write in flight holds the lease row: a takeover waits for it to
/// commit, so the new holder's load includes it.
#[test]
fn a_takeover_waits_for_the_write_in_flight() {
    let (db, rt, schema) = (Db::new(), rt(), unique_name("inflight"));
    let ttl = Duration::from_millis(500);
    let mut a = join(&rt, &db, &schema, node("node-a", 1, ttl));
    tick(&rt, &mut a);
    // Another connection locks the lease row as a commit does, keeps it
    // past the lease's end, and notes when it let go.
    let lock = format!(
        "BEGIN; SELECT 1 FROM {schema}.macp_shards WHERE shard = 0 FOR SHARE; SELECT pg_sleep(1.5);
         CREATE TABLE {schema}.let_go AS SELECT clock_timestamp() AS at; COMMIT;"
    );
    let server = db.server.clone();
    let name = db.name.clone();
    let holder = std::thread::spawn(move || server.psql(&name, &lock).unwrap());
    std::thread::sleep(Duration::from_millis(600));
    let mut b = join(&rt, &db, &schema, node("node-b", 1, ttl));
    let t = tick(&rt, &mut b);
    assert_eq!(t.acquired.len(), 1, "{t:?}");
    let let_go = db.sql(&format!("SELECT to_regclass('{schema}.let_go') IS NOT NULL"));
    assert_eq!(let_go, "t", "b's takeover returned only after the lock holder committed");
    holder.join().unwrap();

    // The other way round: a commit locks the lease row, so it waits for a
    // takeover in flight (here: a transaction holding the row for update)
    // and then sees the lease changed.
    let mut sb = open_shard(&db, &schema, b.lease_for(0).unwrap());
    db.sql(&format!("UPDATE {schema}.macp_shards SET lease_until = now() + interval '1 hour'"));
    let steal = format!(
        "BEGIN; UPDATE {schema}.macp_shards SET epoch = epoch + 1 WHERE shard = 0; SELECT pg_sleep(1);
         CREATE TABLE {schema}.stolen AS SELECT 1; COMMIT;"
    );
    let (server, name) = (db.server.clone(), db.name.clone());
    let thief = std::thread::spawn(move || server.psql(&name, &steal).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    sb.append(&[record(1, 1)], &[]).unwrap();
    assert!(matches!(sb.sync(), Err(StorageError::Fenced { shard: 0, .. })), "the commit saw the new epoch");
    assert_eq!(db.sql(&format!("SELECT to_regclass('{schema}.stolen') IS NOT NULL")), "t");
    thief.join().unwrap();
    assert_eq!(rows(&db, &schema, 0), "0");
}

/// A single-node runtime's schema and a cluster's are kept apart, and
/// every node must agree on the shard count.
#[test]
fn single_node_and_cluster_schemas_refuse_each_other() {
    let (db, rt) = (Db::new(), rt());
    let ttl = Duration::from_secs(10);
    let single = unique_name("single");
    {
        let mut s = db.open(&single);
        suite::load(&mut s);
        let e = rt.block_on(Membership::join(&db.url, &db.cfg(&single, Retention::Forever), node("n", 4, ttl)));
        match e {
            Err(ClusterError::NotACluster { reason, .. }) => assert!(reason.contains("single-node runtime is running")),
            other => panic!("expected NotACluster, got {other:?}"),
        }
        s.append(&[record(1, 1)], &[]).unwrap();
        s.sync().unwrap();
    }
    let e = rt.block_on(Membership::join(&db.url, &db.cfg(&single, Retention::Forever), node("n", 4, ttl)));
    match e {
        Err(ClusterError::NotACluster { reason, .. }) => assert!(reason.contains("data"), "{reason}"),
        other => panic!("expected NotACluster, got {other:?}"),
    }

    let clustered = unique_name("cluster");
    let mut m = join(&rt, &db, &clustered, node("n", 4, ttl));
    let e = PgStorage::open(&db.url, db.cfg(&clustered, Retention::Forever)).unwrap_err();
    assert!(matches!(e, StorageError::NotADataDir { .. }) && e.to_string().contains("4 shards"), "{e}");
    let e = rt.block_on(Membership::join(&db.url, &db.cfg(&clustered, Retention::Forever), node("m", 8, ttl)));
    match e {
        Err(e @ ClusterError::ShardCount { stored: 4, configured: 8, .. }) => {
            assert!(e.to_string().contains("MACP_SHARDS=4"), "{e}")
        }
        other => panic!("expected ShardCount, got {other:?}"),
    }
    tick(&rt, &mut m);
    let lease = ShardLease { node_id: "n".into(), shard: 9, epoch: 1 };
    let e = PgStorage::open_shard(&db.url, db.cfg(&clustered, Retention::Forever), lease).unwrap_err();
    assert!(matches!(e, StorageError::Misuse(_)), "{e:?}");
    let lease = ShardLease { node_id: "n".into(), shard: 0, epoch: 1 };
    let e = PgStorage::open_shard(&db.url, db.cfg(&single, Retention::Forever), lease).unwrap_err();
    assert!(matches!(e, StorageError::NotADataDir { .. }), "{e:?}");
    for bad in [node("", 4, ttl), node("n", 0, ttl), node("n", 4, Duration::from_millis(10))] {
        let e = rt.block_on(Membership::join(&db.url, &db.cfg(&clustered, Retention::Forever), bad));
        assert!(matches!(e, Err(ClusterError::Config(_))), "{e:?}");
    }
}

/// A node restarted under the same id takes its shards back at once (at
/// new epochs) instead of waiting for its old leases to lapse, and the old
/// process, should it still run, can no longer write.
#[test]
fn a_restarted_node_takes_its_shards_back_at_once() {
    let (db, rt, schema) = (Db::new(), rt(), unique_name("restart"));
    let ttl = Duration::from_secs(60);
    let mut old = join(&rt, &db, &schema, node("node-a", 4, ttl));
    tick(&rt, &mut old);
    let mut s = open_shard(&db, &schema, old.lease_for(1).unwrap());
    let mut new = join(&rt, &db, &schema, node("node-a", 4, ttl));
    let t = tick(&rt, &mut new);
    assert_eq!(t.acquired.len(), 4);
    assert!(t.acquired.iter().all(|l| l.epoch == 2));
    s.append(&[record(1, 1)], &[]).unwrap();
    assert!(matches!(s.sync(), Err(StorageError::Fenced { shard: 1, epoch: 1 })));
    assert_eq!(tick(&rt, &mut old).lost.len(), 4);
}

/// The suite again, on shard storages sharing a host's connections (one
/// writer connection for all shards), each case on a fresh cluster.
#[test]
fn the_storage_suite_passes_on_a_hosts_shard() {
    struct Hosted {
        db: Db,
        schema: String,
        rt: tokio::runtime::Runtime,
        member: Option<(Membership, PgHost)>,
    }
    impl Harness for Hosted {
        type S = PgStorage;
        fn open(&mut self, retention: Retention) -> PgStorage {
            if self.member.is_none() {
                let mut m = join(&self.rt, &self.db, &self.schema, node("suite", 4, Duration::from_secs(300)));
                tick(&self.rt, &mut m);
                let host = PgHost::open(&self.db.url, self.db.cfg(&self.schema, retention), 1).expect("host");
                self.member = Some((m, host));
            }
            let (m, host) = self.member.as_ref().unwrap();
            // Another shard on the same connection, busy beside this one.
            let mut other = host.shard(m.lease_for(1).unwrap());
            suite::load(&mut other);
            other.append(&[record(7_777, 1)], &[]).unwrap();
            other.sync().unwrap();
            host.shard(m.lease_for(3).unwrap())
        }
        fn stop(&mut self, storage: PgStorage) {
            drop(storage);
        }
        fn crash(&mut self, storage: PgStorage) {
            storage.crash();
        }
        fn reset(&mut self) {
            self.schema = unique_name("hosted");
            self.member = None;
        }
    }
    let mut h = Hosted { db: Db::new(), schema: unique_name("hosted"), rt: rt(), member: None };
    suite::run_all(&mut h);
}

/// A host's writer connection that the database ends (a restart, an
/// operator) is opened again for the next write; the write that found it
/// gone fails and poisons only its own shard storage.
#[test]
fn a_hosts_lost_writer_connection_comes_back() {
    let (db, rt, schema) = (Db::new(), rt(), unique_name("lost"));
    let mut m = join(&rt, &db, &schema, node("n", 2, Duration::from_secs(300)));
    tick(&rt, &mut m);
    let host = PgHost::open(&db.url, db.cfg(&schema, Retention::Forever), 1).unwrap();
    let mut s0 = host.shard(m.lease_for(0).unwrap());
    suite::load(&mut s0);
    s0.append(&[record(1, 1)], &[]).unwrap();
    s0.sync().unwrap();
    let ended = db.sql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'macp-rs writer' AND datname = '{}'",
        db.name
    ));
    assert_eq!(ended, "1");
    std::thread::sleep(Duration::from_millis(200));
    let mut s1 = host.shard(m.lease_for(1).unwrap());
    suite::load(&mut s1);
    s1.append(&[record(2, 1)], &[]).unwrap();
    s1.sync().expect("a new connection serves the next request");
    let mut s0 = host.shard(m.lease_for(0).unwrap());
    assert_eq!(suite::load(&mut s0).records, vec![record(1, 1)]);
    assert_eq!(rows(&db, &schema, 1), "1");
}

/// Shards writing at once through one host connection share
/// transactions; a shard whose lease was taken is refused alone, the
/// others' commits go through.
#[test]
fn shards_committing_together_are_fenced_each_on_its_own() {
    let (db, rt, schema) = (Db::new(), rt(), unique_name("group"));
    let mut m = join(&rt, &db, &schema, node("n", 4, Duration::from_secs(300)));
    tick(&rt, &mut m);
    let host = std::sync::Arc::new(PgHost::open(&db.url, db.cfg(&schema, Retention::Forever), 1).unwrap());
    // Shard 3 is taken over behind the node's back.
    db.sql(&format!("UPDATE {schema}.macp_shards SET epoch = epoch + 1, owner = 'other' WHERE shard = 3"));
    let threads: Vec<_> = (0..4u32)
        .map(|shard| {
            let (host, lease) = (host.clone(), m.lease_for(shard).unwrap());
            std::thread::spawn(move || {
                let mut s = host.shard(lease);
                suite::load(&mut s);
                for seq in 1..=50 {
                    s.append(&[record(u64::from(shard) * 1000 + 1, seq)], &[]).unwrap();
                    if let Err(e) = s.sync() {
                        return Err((seq, e));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for (shard, t) in threads.into_iter().enumerate() {
        match (shard, t.join().unwrap()) {
            (3, Err((1, StorageError::Fenced { shard: 3, .. }))) => {}
            (3, other) => panic!("shard 3: expected its first commit fenced, got {other:?}"),
            (_, r) => r.expect("the other shards commit"),
        }
    }
    for shard in 0..3 {
        assert_eq!(rows(&db, &schema, shard), "50");
    }
    assert_eq!(rows(&db, &schema, 3), "0");
}

/// The registry table takes a change only at the version it was validated
/// against: of two nodes changing it from the same version, the second is
/// told to read it again, and nothing of its change is written.
#[test]
fn a_registry_change_applies_only_at_the_version_it_was_made_against() {
    let db = Db::new();
    let schema = unique_name("registry");
    let rt = rt();
    let _m = join(&rt, &db, &schema, node("r1", 2, Duration::from_secs(60)));
    let cfg = db.cfg(&schema, Retention::Forever);
    let (one, two) = (ClusterRegistry::new(&db.url, &cfg), ClusterRegistry::new(&db.url, &cfg));
    let entry = |kind, id: &str, body: &[u8], standards_track| RegistryEntry {
        kind,
        id: id.into(),
        body: body.to_vec(),
        standards_track,
    };
    rt.block_on(async {
        assert_eq!(one.version().await.unwrap(), 0);
        let put = RegistryOp::Put(entry(RegistryKind::Policy, "p", b"one", false));
        assert_eq!(one.change(0, &[put]).await.unwrap(), Some(1));
        let late = RegistryOp::Put(entry(RegistryKind::Policy, "q", b"two", false));
        assert_eq!(two.change(0, std::slice::from_ref(&late)).await.unwrap(), None, "made against version 0");
        let snap = two.load().await.unwrap();
        assert_eq!(snap.version, 1);
        assert_eq!(snap.entries, vec![entry(RegistryKind::Policy, "p", b"one", false)]);
        // Again at the version read: applied; entries keep the order they were made in.
        let mode = RegistryOp::Put(entry(RegistryKind::Mode, "ext.a.v1", b"m", true));
        assert_eq!(two.change(1, &[late, mode]).await.unwrap(), Some(2));
        let delete = RegistryOp::Delete { kind: RegistryKind::Policy, id: "p".into() };
        assert_eq!(one.change(2, &[delete]).await.unwrap(), Some(3));
        let snap = one.load().await.unwrap();
        assert_eq!(snap.version, 3);
        assert_eq!(
            snap.entries,
            vec![entry(RegistryKind::Mode, "ext.a.v1", b"m", true), entry(RegistryKind::Policy, "q", b"two", false)]
        );
        assert_eq!(two.version().await.unwrap(), 3);
    });
}

/// Writers committing several shards in one transaction and membership
/// rounds renewing those shards' leases, all at once: both lock the lease
/// rows in shard order, so neither ever waits for the other in a cycle
/// (PostgreSQL would fail one of them as a deadlock after a second). Every
/// commit and every round succeeds.
#[test]
fn group_commits_and_lease_renewals_never_deadlock() {
    let (db, rt, schema) = (Db::new(), rt(), unique_name("nodeadlock"));
    let shards = 16;
    let mut m = join(&rt, &db, &schema, node("n", shards, Duration::from_secs(300)));
    assert_eq!(tick(&rt, &mut m).acquired.len(), shards as usize);
    let host = std::sync::Arc::new(PgHost::open(&db.url, db.cfg(&schema, Retention::Forever), 2).unwrap());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..shards)
        .map(|shard| {
            let (host, lease, stop) = (host.clone(), m.lease_for(shard).unwrap(), stop.clone());
            std::thread::spawn(move || {
                let mut s = host.shard(lease);
                suite::load(&mut s);
                let mut seq = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    s.append(&[record(u64::from(shard) * 100_000 + 1, seq)], &[]).unwrap();
                    s.sync().unwrap_or_else(|e| panic!("shard {shard}, commit {seq}: {e}"));
                }
                seq
            })
        })
        .collect();
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while std::time::Instant::now() < until {
        let t = rt.block_on(m.tick()).expect("a membership round");
        assert!(t.lost.is_empty(), "{t:?}");
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let commits: u64 = writers.into_iter().map(|w| w.join().expect("a writer")).sum();
    assert!(rounds > 10 && commits > 100, "{rounds} rounds, {commits} commits");
}
