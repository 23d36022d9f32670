//! What the PostgreSQL backend promises beyond the generic suite: a batch
//! is one transaction, the schema is versioned and a newer one refused,
//! one writer per schema, bounded upkeep, damage reported where it is,
//! byte-ordered listing whatever the locale, and errors an operator can
//! act on (without the password).

mod common;

use std::time::{Duration, Instant};

use common::Db;
use macp_pg_test::unique_name;
use macp_storage::suite::{self, record, registry_record, sid, summary};
use macp_storage::{summary_id, DamageKind, LoadEvent, Record, Retention, Storage, StorageError};
use macp_storage_pg::{PgConfig, PgStorage, PgUrl, SCHEMA_VERSION};

/// Opening creates the schema at the current version, once; a schema a
/// newer macp-rs migrated is refused and left as it is.
#[test]
fn a_schema_newer_than_this_build_is_refused() {
    let db = Db::new();
    let schema = unique_name("newer");
    let versions =
        || db.sql(&format!("SELECT string_agg(version::text, ',' ORDER BY version) FROM {schema}.macp_schema_version"));
    drop(db.open(&schema));
    drop(db.open(&schema));
    let all: Vec<String> = (1..=SCHEMA_VERSION).map(|v| v.to_string()).collect();
    assert_eq!(versions(), all.join(","), "each migration ran once");
    let future = SCHEMA_VERSION + 1;
    db.sql(&format!(
        "INSERT INTO {schema}.macp_schema_version (version, applied_by) VALUES ({future}, 'a newer macp-rs')"
    ));
    let e = PgStorage::open(&db.url, db.cfg(&schema, Retention::Forever)).unwrap_err();
    match &e {
        StorageError::NewerFormat { found, supported } => assert_eq!((*found, *supported), (future, SCHEMA_VERSION)),
        other => panic!("expected NewerFormat, got {other:?}"),
    }
    assert!(e.to_string().contains("upgrade macp-rs"), "{e}");
    assert!(versions().ends_with(&format!(",{future}")), "nothing was changed");
}

/// Tables named like ours but not made by us are never initialised over;
/// other tables in the schema are none of our business.
#[test]
fn a_schema_with_foreign_tables_named_like_ours_is_refused() {
    let db = Db::new();
    let foreign = unique_name("foreign");
    db.sql(&format!("CREATE SCHEMA {foreign}; CREATE TABLE {foreign}.macp_records (id int)"));
    let e = PgStorage::open(&db.url, db.cfg(&foreign, Retention::Forever)).unwrap_err();
    assert!(matches!(e, StorageError::NotADataDir { .. }), "{e:?}");
    assert!(e.to_string().contains("macp_records"), "{e}");
    let shared = unique_name("shared");
    db.sql(&format!("CREATE SCHEMA {shared}; CREATE TABLE {shared}.orders (id int)"));
    let mut s = db.open(&shared);
    suite::load(&mut s);
}

/// One writer per schema: a second one is refused after the lock wait; a
/// clean stop frees the lock at once, a killed writer as soon as the
/// server notices; another schema has a lock of its own.
#[test]
fn a_second_writer_is_refused_by_the_lock() {
    let db = Db::new();
    let schema = unique_name("lock");
    let first = db.open(&schema);
    let quick = PgConfig { lock_wait: Duration::from_millis(300), ..db.cfg(&schema, Retention::Forever) };
    let t = Instant::now();
    let e = PgStorage::open(&db.url, quick.clone()).unwrap_err();
    assert!(matches!(e, StorageError::Locked(_)), "{e:?}");
    assert!(t.elapsed() >= Duration::from_millis(300), "it waited for the lock first");
    let msg = e.to_string();
    assert!(msg.contains(&schema) && msg.contains("locked by another macp-rs process"), "{msg}");
    drop(db.open(&unique_name("other")));
    drop(first);
    let second = PgStorage::open(&db.url, quick).expect("the lock is free after a clean stop");
    second.crash();
    drop(PgStorage::open(&db.url, db.cfg(&schema, Retention::Forever)).expect("the lock is free after a crash"));
}

/// A group-committed batch is one transaction: nothing of it is in the
/// database before `sync`, all of it after (written by one transaction),
/// nothing of it after a crash before `sync`, and nothing of it when the
/// statement fails half-way (which poisons the backend).
#[test]
fn a_batch_is_one_transaction() {
    let db = Db::new();
    let schema = unique_name("tx");
    let count = |table: &str| db.sql(&format!("SELECT count(*) FROM {schema}.{table}"));
    let writers = || {
        db.sql(&format!(
            "SELECT count(DISTINCT x) FROM (SELECT xmin::text FROM {schema}.macp_records
             UNION ALL SELECT xmin::text FROM {schema}.macp_ended) t(x)"
        ))
    };
    let mut s = db.open(&schema);
    suite::load(&mut s);
    let batch: Vec<Record> = (1..=300).map(|n| record(n, 1)).collect();
    let ended: Vec<_> = (1..=50).map(|n| summary(n, 1, 5_000)).collect();
    s.append(&batch[..100], &ended[..10]).unwrap();
    s.append(&batch[100..], &ended[10..]).unwrap();
    assert_eq!((count("macp_records"), count("macp_ended")), ("0".into(), "0".into()), "appending sends nothing");
    s.sync().unwrap();
    assert_eq!((count("macp_records"), count("macp_ended")), ("300".into(), "50".into()));
    assert_eq!(writers(), "1", "two appends, one sync: one transaction");
    s.append(&[record(1, 2), record(2, 2)], &[summary(1, 2, 5_001)]).unwrap();
    s.sync().unwrap();
    assert_eq!(writers(), "2", "the next batch is a transaction of its own");

    // A crash between append and sync: nothing of that batch.
    let lost: Vec<Record> = (1..=100).map(|n| record(n, 3)).collect();
    s.append(&lost, &[summary(60, 1, 6_000)]).unwrap();
    s.crash();
    let mut s = db.open(&schema);
    assert_eq!(suite::load(&mut s).records.len(), 302);
    assert_eq!(count("macp_ended"), "50");

    // A batch whose statement fails half-way (the summary breaks a rule
    // PostgreSQL enforces) leaves none of its records either.
    db.sql(&format!("ALTER TABLE {schema}.macp_ended ADD CONSTRAINT refuse_70 CHECK (session_id <> '{}')", sid(70)));
    s.append(&[record(70, 1), record(71, 1)], &[summary(71, 1, 7_000), summary(70, 1, 7_000)]).unwrap();
    let e = s.sync().unwrap_err();
    assert!(matches!(e, StorageError::Io { op: "commit", .. }), "{e:?}");
    assert!(e.to_string().contains("refuse_70") && e.to_string().contains("23514"), "PostgreSQL's reason: {e}");
    assert!(matches!(s.append(&[record(72, 1)], &[]), Err(StorageError::Poisoned)));
    assert!(matches!(s.sync(), Err(StorageError::Poisoned)));
    assert!(matches!(s.checkpoint(b"x"), Err(StorageError::Poisoned)));
    drop(s);
    assert_eq!((count("macp_records"), count("macp_ended")), ("302".into(), "50".into()));
    db.sql(&format!("ALTER TABLE {schema}.macp_ended DROP CONSTRAINT refuse_70"));
    let mut s = db.open(&schema);
    assert_eq!(suite::load(&mut s).records.len(), 302, "reloading after the failure finds the last good batch");
    s.append(&[record(70, 1)], &[summary(70, 1, 7_000)]).unwrap();
    s.sync().expect("and the backend works again");
}

/// A record that no longer decodes is damage at its log position, with
/// its session, while loading; a history read that meets it fails, naming
/// the place. The rest loads.
#[test]
fn undecodable_rows_are_reported_as_damage() {
    let db = Db::new();
    let schema = unique_name("damage");
    let mut s = db.open(&schema);
    suite::load(&mut s);
    s.append(&[record(1, 1), record(1, 2), record(2, 1)], &[]).unwrap();
    s.sync().unwrap();
    drop(s);
    db.sql(&format!("UPDATE {schema}.macp_records SET record = '\\xffffffff' WHERE pos = 2"));
    let mut s = db.open(&schema);
    let mut events = Vec::new();
    s.load(&|| false, &mut |ev| {
        events.push(match ev {
            LoadEvent::Record { pos, record } => {
                format!("record {} {} at {}", record.session_id, record.seq, pos.offset)
            }
            LoadEvent::Damage(d) => {
                assert!(matches!(d.kind, DamageKind::Undecodable(_)), "{d:?}");
                format!("damage at {} ({} bytes) of {:?}", d.offset, d.len, d.session_hint)
            }
            LoadEvent::Checkpoint { .. } => "checkpoint".into(),
        });
        Ok(())
    })
    .unwrap();
    let want = vec![
        format!("record {} 1 at 1", sid(1)),
        format!("damage at 2 (4 bytes) of Some({:?})", sid(1)),
        format!("record {} 1 at 3", sid(2)),
    ];
    assert_eq!(events, want);
    let r = s.reader();
    let e = r.history(&sid(1), 0, 9).unwrap_err();
    assert!(matches!(&e, StorageError::Damaged { place, .. } if place == "log position 2"), "{e:?}");
    assert_eq!(r.history(&sid(2), 0, 9).unwrap(), vec![record(2, 1)]);
}

/// Each `maintain` call deletes at most `maintain_sessions` expired
/// sessions, says when there is more, deletes nothing that ended after the
/// latest checkpoint, and drops the registry records the checkpoint
/// covers; it reports the tables' size and no segments.
#[test]
fn upkeep_is_bounded_per_call() {
    let db = Db::new();
    let schema = unique_name("upkeep");
    let retention = Retention::For(Duration::from_secs(60));
    let cfg = PgConfig { maintain_sessions: 10, ..db.cfg(&schema, retention) };
    let mut s = PgStorage::open(&db.url, cfg).unwrap();
    suite::load(&mut s);
    for n in 1..=35 {
        s.append(&[record(n, 1), record(n, 2)], &[summary(n, 2, 1_000)]).unwrap();
    }
    s.append(&[registry_record(1), registry_record(2), record(99, 1)], &[]).unwrap();
    s.sync().unwrap();
    let m = s.maintain(1_000_000).unwrap();
    assert_eq!((m.expired_sessions, m.more), (0, false), "nothing goes before a checkpoint follows the end");
    assert_eq!((m.segments, m.retention_cutoff_ms), (None, Some(940_000)));
    assert!(m.bytes > 0);
    s.checkpoint(b"cp").unwrap();
    let mut calls = Vec::new();
    loop {
        let m = s.maintain(1_000_000).unwrap();
        calls.push((m.expired_sessions, m.more));
        if !m.more {
            break;
        }
    }
    assert_eq!(calls, vec![(10, true), (10, true), (10, true), (5, false)]);
    assert_eq!(db.sql(&format!("SELECT string_agg(session_id, ',') FROM {schema}.macp_records")), sid(99));
    assert_eq!(db.sql(&format!("SELECT count(*) FROM {schema}.macp_ended")), "0");
    drop(s);
    let mut s = db.open(&schema);
    let loaded = suite::load(&mut s);
    assert_eq!((loaded.checkpoint.as_deref(), loaded.records.len()), (Some(&b"cp"[..]), 0));
    assert_eq!(s.reader().history(&sid(99), 0, 9).unwrap(), vec![record(99, 1)], "open sessions stay");
}

/// Ended sessions list in byte order (as the kernel pages its open
/// sessions) even in a database whose collation orders otherwise.
#[test]
fn ended_sessions_list_in_byte_order_whatever_the_collation() {
    let db = Db::new();
    let icu = unique_name("icu");
    db.server
        .psql("postgres", &format!("CREATE DATABASE {icu} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"))
        .expect("an ICU database");
    let ids = ["b-2", "B-1", "a-1", "a1", "A-2", "ab"];
    let locale_order = db
        .server
        .psql(&icu, &format!("SELECT string_agg(x, ',' ORDER BY x) FROM unnest(array['{}']) x", ids.join("','")));
    let mut bytes = ids.map(String::from).to_vec();
    bytes.sort();
    assert_ne!(
        locale_order.unwrap(),
        bytes.join(","),
        "the database's own order must differ for this test to mean anything"
    );
    let url: PgUrl = db.server.url(&icu).parse().unwrap();
    let mut s = PgStorage::open(&url, PgConfig::default()).unwrap();
    suite::load(&mut s);
    let summaries: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut x = summary(i as u64, 1, 1_000);
            x.metadata.as_mut().unwrap().session_id = id.to_string();
            x
        })
        .collect();
    s.append(&[], &summaries).unwrap();
    s.sync().unwrap();
    let r = s.reader();
    let listed: Vec<String> = r.list_ended(None, 100).unwrap().iter().map(|x| summary_id(x).to_string()).collect();
    assert_eq!(listed, bytes);
    let page: Vec<String> = r.list_ended(Some("B-1"), 2).unwrap().iter().map(|x| summary_id(x).to_string()).collect();
    assert_eq!(page, bytes[2..4].to_vec());
}

/// A libpq-style string over the server's Unix socket works too.
#[test]
fn connects_over_a_unix_socket() {
    let db = Db::new();
    let url: PgUrl = db.server.socket_url(&db.name).parse().unwrap();
    let mut s = PgStorage::open(&url, db.cfg(&unique_name("unix"), Retention::Forever)).unwrap();
    suite::load(&mut s);
    s.append(&[record(1, 1)], &[]).unwrap();
    s.sync().unwrap();
    assert_eq!(s.reader().history(&sid(1), 0, 1).unwrap(), vec![record(1, 1)]);
}

/// A database that cannot be reached is an error naming the operation and
/// the place, never the password; a reader of a dropped storage is closed.
#[test]
fn errors_name_the_place_but_not_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url: PgUrl = format!("postgres://macp:s3cret@127.0.0.1:{port}/nowhere").parse().unwrap();
    let e = PgStorage::open(&url, PgConfig::default()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StorageError::Io { op: "connect", .. }), "{e:?}");
    assert!(msg.contains(&format!("postgres://macp@127.0.0.1:{port}/nowhere schema macp")), "{msg}");
    assert!(!msg.contains("s3cret") && !format!("{e:?}").contains("s3cret"), "{msg}");

    let db = Db::new();
    let s = db.open(&unique_name("closed"));
    let r = s.reader();
    drop(s);
    assert!(matches!(r.ended(&sid(1)), Err(StorageError::Closed)));
}

/// Reader connections that were ended (a server restart, an operator) are
/// opened again; the writer is not involved.
#[test]
fn reader_connections_come_back_after_being_ended() {
    let db = Db::new();
    let mut s = db.open(&unique_name("readers"));
    suite::load(&mut s);
    s.append(&[record(1, 1)], &[]).unwrap();
    s.sync().unwrap();
    let r = s.reader();
    assert_eq!(r.history(&sid(1), 0, 9).unwrap(), vec![record(1, 1)]);
    let readers = |what: &str| {
        db.sql(&format!(
            "SELECT {what} FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'macp-rs reader'",
            db.name
        ))
    };
    assert_eq!(readers("count(pg_terminate_backend(pid))"), "2");
    // Until the client has seen the connections go, a read may fail.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    while answered < 4 {
        match r.history(&sid(1), 0, 9) {
            Ok(h) => {
                assert_eq!(h, vec![record(1, 1)]);
                answered += 1;
            }
            Err(e) => {
                assert!(matches!(e, StorageError::Io { .. }), "{e:?}");
                answered = 0;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(Instant::now() < deadline, "the readers did not come back");
    }
    assert_eq!(readers("count(*)"), "2", "both reader connections are open again");
    s.append(&[record(1, 2)], &[]).unwrap();
    s.sync().expect("the writer was not involved");
}

/// Every row of the schema's three tables, as one fingerprint.
fn fingerprint(db: &Db, schema: &str) -> String {
    db.sql(&format!(
        "SELECT md5(concat(
            (SELECT string_agg(pos || session_id || seq || encode(record, 'hex'), ',' ORDER BY pos) FROM {schema}.macp_records),
            (SELECT string_agg(session_id || ended_at_ms || ended_pos || encode(summary, 'hex'), ',' ORDER BY session_id) FROM {schema}.macp_ended),
            (SELECT string_agg(covers || encode(open_state, 'hex') || taken_at, ',') FROM {schema}.macp_checkpoint)))"
    ))
}

/// A read-only storage (macp-admin's) opens beside a writer that holds the
/// schema's lock, without waiting for or taking the lock; everything it
/// reads — info, the whole log, loading, its reader — is one snapshot,
/// whatever the writer commits afterwards; and it writes nothing: writes
/// are refused, the summaries recovery hands back are dropped, the tables
/// are unchanged, and the writer goes on.
#[test]
fn a_read_only_storage_reads_one_snapshot_beside_the_writer() {
    let db = Db::new();
    let schema = unique_name("ro");
    let mut w = db.open(&schema);
    suite::load(&mut w);
    w.append(&[record(1, 1), record(1, 2), record(2, 1)], &[summary(1, 2, 5_000)]).unwrap();
    w.checkpoint(b"cp").unwrap();
    w.append(&[record(2, 2), record(3, 1)], &[]).unwrap();
    w.sync().unwrap();

    let quick = PgConfig { lock_wait: Duration::from_millis(300), ..db.cfg(&schema, Retention::Forever) };
    let mut ro = PgStorage::open_read_only(&db.url, quick).expect("opens while the writer holds the lock");
    w.append(&[record(3, 2), record(4, 1)], &[summary(2, 2, 6_000)]).unwrap();
    w.sync().unwrap();
    let written = fingerprint(&db, &schema);

    let info = ro.info().unwrap();
    assert_eq!(info.schema_version, SCHEMA_VERSION);
    assert_eq!((info.records, info.first_pos, info.last_pos, info.ended_sessions), (5, Some(1), Some(5), 1));
    let cp = info.checkpoint.expect("the checkpoint");
    assert_eq!((cp.covers, cp.bytes), (4, 2));
    assert!(info.bytes > 0);
    let mut scanned = Vec::new();
    ro.scan_log(&mut |ev| {
        scanned.push(match ev {
            LoadEvent::Checkpoint { open_state } => format!("checkpoint {open_state:?}"),
            LoadEvent::Record { pos, record } => format!("{}#{} at {}", record.session_id, record.seq, pos.offset),
            LoadEvent::Damage(d) => format!("damage {d}"),
        });
        Ok(())
    })
    .unwrap();
    let want: Vec<String> = std::iter::once(format!("checkpoint {:?}", b"cp"))
        .chain(
            [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]
                .iter()
                .enumerate()
                .map(|(i, (n, q))| format!("{}#{q} at {}", sid(*n), i + 1)),
        )
        .collect();
    assert_eq!(scanned, want, "the whole log of the snapshot, from its first position");
    let loaded = suite::load(&mut ro);
    assert_eq!(loaded.checkpoint.as_deref(), Some(&b"cp"[..]));
    assert_eq!(
        loaded.records,
        vec![record(2, 2), record(3, 1)],
        "the records after the checkpoint, as of the snapshot"
    );
    let r = ro.reader();
    assert_eq!(r.history(&sid(3), 0, 9).unwrap(), vec![record(3, 1)], "not the writer's later record");
    assert_eq!(r.ended(&sid(2)).unwrap(), None, "nor its later summary");
    assert_eq!(r.ended_many(&[&sid(1), &sid(2)]).unwrap(), vec![Some(summary(1, 2, 5_000)), None]);
    assert_eq!(r.list_ended(None, 10).unwrap(), vec![summary(1, 2, 5_000)]);

    assert!(matches!(ro.append(&[record(9, 1)], &[]), Err(StorageError::Misuse(_))));
    ro.append(&[], &[summary(3, 2, 7_000)]).expect("summaries handed back by recovery are taken");
    ro.sync().expect("and there is nothing to sync");
    assert!(matches!(ro.checkpoint(b"x"), Err(StorageError::Misuse(_))));
    assert!(matches!(ro.maintain(i64::MAX), Err(StorageError::Misuse(_))));
    assert_eq!(r.ended(&sid(3)).unwrap(), None, "a dropped summary is not read back either");

    // What PostgreSQL shows of it: one connection in a transaction holding
    // a snapshot (xmin) that never got a transaction id (it wrote
    // nothing), and no advisory lock; the writer's lock is still there.
    let activity = |what: &str, app: &str| {
        db.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity a WHERE datname = '{}' AND application_name = '{app}' AND {what}",
            db.name
        ))
    };
    assert_eq!(
        activity(
            "state = 'idle in transaction' AND backend_xid IS NULL AND backend_xmin IS NOT NULL",
            "macp-rs read-only"
        ),
        "1"
    );
    let locks = "EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory')";
    assert_eq!(activity(locks, "macp-rs read-only"), "0");
    assert_eq!(activity(locks, "macp-rs writer"), "1");
    assert_eq!(fingerprint(&db, &schema), written, "the tables are as the writer left them");
    w.append(&[record(4, 2)], &[]).unwrap();
    w.sync().expect("the writer was not disturbed");
}

/// A read-only storage creates and migrates nothing: a missing schema, one
/// without our tables, one whose schema only a writer would bring to this
/// build's version, and one a newer macp-rs migrated are refused, and left
/// as they were.
#[test]
fn a_read_only_storage_refuses_a_schema_it_cannot_read() {
    let db = Db::new();
    let open = |schema: &str| PgStorage::open_read_only(&db.url, db.cfg(schema, Retention::Forever)).unwrap_err();
    let missing = unique_name("missing");
    let e = open(&missing);
    assert!(matches!(e, StorageError::NotADataDir { .. }) && e.to_string().contains("there is no schema"), "{e}");
    assert_eq!(db.sql(&format!("SELECT count(*) FROM pg_namespace WHERE nspname = '{missing}'")), "0", "not created");

    let empty = unique_name("empty");
    db.sql(&format!("CREATE SCHEMA {empty}"));
    let e = open(&empty);
    assert!(matches!(e, StorageError::NotADataDir { .. }) && e.to_string().contains("holds no macp-rs tables"), "{e}");
    assert_eq!(db.sql(&format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{empty}'")), "0");

    let unmigrated = unique_name("old");
    db.sql(&format!(
        "CREATE SCHEMA {unmigrated}; CREATE TABLE {unmigrated}.macp_schema_version (version integer PRIMARY KEY, applied_at timestamptz, applied_by text)"
    ));
    let e = open(&unmigrated);
    assert!(e.to_string().contains("version 0, older than this build's"), "{e}");

    let newer = unique_name("newer");
    drop(db.open(&newer));
    let future = SCHEMA_VERSION + 1;
    db.sql(&format!(
        "INSERT INTO {newer}.macp_schema_version (version, applied_by) VALUES ({future}, 'a newer macp-rs')"
    ));
    match open(&newer) {
        StorageError::NewerFormat { found, supported } => assert_eq!((found, supported), (future, SCHEMA_VERSION)),
        other => panic!("expected NewerFormat, got {other:?}"),
    }
}

/// A schema at version 1 (before shards) is migrated in place: its log,
/// ended sessions and checkpoint become shard 0's and load as before.
#[test]
fn a_version_1_schema_is_migrated_with_its_data() {
    let db = Db::new();
    let schema = unique_name("v1");
    let mut s = db.open(&schema);
    suite::load(&mut s);
    s.append(&[record(1, 1), record(1, 2)], &[summary(1, 2, 1_000)]).unwrap();
    s.checkpoint(b"open state").unwrap();
    s.append(&[record(2, 1)], &[]).unwrap();
    s.sync().unwrap();
    drop(s);
    // Back to what version 1 looked like.
    db.sql(&format!(
        "SET search_path = {schema};
        DROP TABLE macp_cluster, macp_nodes, macp_shards, macp_registry;
        ALTER TABLE macp_records DROP CONSTRAINT macp_records_pkey;
        ALTER TABLE macp_records DROP COLUMN shard;
        ALTER TABLE macp_records ADD PRIMARY KEY (pos);
        DROP INDEX macp_ended_by_end;
        ALTER TABLE macp_ended DROP COLUMN shard;
        CREATE INDEX macp_ended_by_end ON macp_ended (ended_at_ms, session_id);
        ALTER TABLE macp_checkpoint DROP CONSTRAINT macp_checkpoint_pkey;
        ALTER TABLE macp_checkpoint DROP COLUMN shard;
        ALTER TABLE macp_checkpoint ADD COLUMN id boolean PRIMARY KEY DEFAULT true CHECK (id);
        DELETE FROM macp_schema_version WHERE version > 1;"
    ));
    let mut s = db.open(&schema);
    let loaded = suite::load(&mut s);
    assert_eq!(loaded.checkpoint.as_deref(), Some(&b"open state"[..]));
    assert_eq!(loaded.records, vec![record(2, 1)]);
    assert_eq!(s.reader().history(&sid(1), 0, 9).unwrap(), vec![record(1, 1), record(1, 2)]);
    assert!(s.reader().ended(&sid(1)).unwrap().is_some());
    s.append(&[record(2, 2)], &[]).unwrap();
    s.sync().unwrap();
    let versions =
        db.sql(&format!("SELECT string_agg(version::text, ',' ORDER BY version) FROM {schema}.macp_schema_version"));
    assert_eq!(versions, "1,2,3");
    assert_eq!(db.sql(&format!("SELECT count(*) FROM {schema}.macp_records WHERE shard = 0")), "4");
    let registry = db.sql(&format!("SELECT registry_version FROM {schema}.macp_cluster"));
    assert_eq!(registry, "", "a single-node schema has no cluster row, only the column");
}
