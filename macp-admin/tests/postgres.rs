//! `macp-admin --database-url` against a server on PostgreSQL: a real
//! server (in-process, `--storage postgres` on a throwaway PostgreSQL from
//! macp-pg-test) runs the known workload, then the binary reads its
//! database. No mocks.
//!
//! - beside the running server: `export` equals what passive subscribe
//!   returns from it, `history` and `sessions` answer as for a data
//!   directory, `inspect` describes the tables, `verify` says healthy, and
//!   the server goes on undisturbed; `verify` stays healthy while the
//!   server writes, since it reads one snapshot;
//! - nothing the tool does changes a row;
//! - in a copy of the database with one record row overwritten, `verify`
//!   says damaged (exit 1) and names the row's log position; a checkpoint
//!   that does not restore is damage too; sessions deleted by retention
//!   are not, but leave the full replay impossible;
//! - refused (exit 2): DATA_DIR and --database-url together, neither, a
//!   database without the macp schema (which stays without it), a schema
//!   from a newer macp-rs, an unreachable server, a URL that does not
//!   parse; the password in the URL is never printed.

#[path = "../../macp-transport-grpc/tests/common/mod.rs"]
mod common;
mod support;

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use macp_pg_test::{unique_name, PgServer};
use support::*;

/// A server on the database at `url` that checkpoints every few records,
/// so the database has a checkpoint and records after it; its rate limits
/// leave room for the test that writes while `verify` reads.
async fn server_on(url: &str) -> Server {
    let limits = ["--session-start-limit-per-minute", "100000", "--message-limit-per-minute", "100000"];
    server_with(&[&["--storage", "postgres", "--database-url", url][..], &limits].concat()).await
}

/// A new database on the shared throwaway server, and its URL with a
/// password in it (the server trusts loopback and ignores it; no output
/// may show it).
fn database(pg: &PgServer, tag: &str) -> (String, String) {
    let name = unique_name(tag);
    let url = pg.create_database(&name).expect("a database");
    let with_password = url.replacen("postgres@", "postgres:s3cret@", 1);
    assert_ne!(url, with_password);
    (name, with_password)
}

/// Every row of the macp schema, as one fingerprint.
fn fingerprint(pg: &PgServer, db: &str) -> String {
    pg.psql(
        db,
        "SELECT md5(concat(
            (SELECT string_agg(pos || session_id || seq || encode(record, 'hex'), ',' ORDER BY pos) FROM macp.macp_records),
            (SELECT string_agg(session_id || ended_at_ms || ended_pos || encode(summary, 'hex'), ',' ORDER BY session_id)
                FROM macp.macp_ended),
            (SELECT string_agg(covers || encode(open_state, 'hex') || taken_at, ',') FROM macp.macp_checkpoint),
            (SELECT string_agg(version || applied_by, ',' ORDER BY version) FROM macp.macp_schema_version)))",
    )
    .expect("psql")
}

/// The output, checked not to show the password.
fn shown(out: &Output) -> String {
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(!all.contains("s3cret"), "the password was printed: {all}");
    all
}

/// `verify --database-url url`, which must exit with `code`; its report.
fn verify_exits(url: &str, code: i32) -> String {
    let out = admin(&["verify", "--database-url", url]);
    let report = shown(&out);
    assert_eq!(out.status.code(), Some(code), "{report}");
    report
}

/// A copy of database `from` (no connection may be open to it: those of a
/// stopped server may take a moment to go).
fn copy_database(pg: &PgServer, from: &str, tag: &str) -> String {
    let name = unique_name(tag);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pg.psql("postgres", &format!("CREATE DATABASE {name} TEMPLATE {from}")) {
            Ok(_) => return name,
            Err(e) if Instant::now() < deadline && e.to_string().contains("being accessed by other users") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("copying {from}: {e}"),
        }
    }
}

/// Beside the running server the commands answer as for a data directory,
/// one snapshot keeps `verify` whole while the server writes, and nothing
/// the tool does changes a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_runtimes_database_reads_beside_it_as_it_streams_without_a_write() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let (db, url) = database(&pg, "admin");
    let server = server_on(&url).await;
    let w = workload(&server).await;
    let streamed = streamed(&server, &w).await;
    let src = ["--database-url", url.as_str()];

    // Beside the running server: not refused, and the same answers as for
    // a data directory; export equals passive subscribe from the server.
    let out_file = std::env::temp_dir().join(format!("{}.jsonl", unique_name("macp_admin_pg")));
    check_reads(&src, &w, &streamed, &out_file);
    let v = inspect_json(&src);
    assert_eq!(v["schema_version"], macp_storage_pg::SCHEMA_VERSION);
    assert_eq!(v["checkpoint"]["present"], true, "{v}");
    assert!(v["checkpoint"]["covers"].as_u64().unwrap() > 1, "{v}");
    assert_eq!(v["log"]["first_position"], 1);
    assert_eq!(v["log"]["records"], v["log"]["last_position"], "no gaps: {v}");
    assert_eq!(v["ended_sessions"], 4);
    assert!(v["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["clean"], true);
    assert!(v["database"].as_str().unwrap().ends_with(&format!("/{db} schema macp")), "{v}");
    assert!(v.get("segments").is_none(), "a database has no segments");
    let out = admin_on("inspect", &src, &[]);
    let report = shown(&out);
    let version = format!("schema       version {}", macp_storage_pg::SCHEMA_VERSION);
    assert!(report.contains(&version) && report.contains("positions 1 to"), "{report}");
    let report = verify_exits(&url, 0);
    assert!(report.contains("healthy") && report.contains("compared with a full replay"), "{report}");
    // MACP_DATABASE_URL works as the flag does.
    let out = admin_with(&["sessions", "--state", "open"], &[("MACP_DATABASE_URL", &url)]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert!(text(&out.stdout).starts_with(&w.open), "{}", text(&out.stdout));

    // The server was not disturbed: the open session goes on.
    let mut i = server.client("I").await;
    let ack = send(&mut i, env(&w.open, DECISION, "Commitment", commitment())).await;
    assert!(ack.ok, "{:?}", ack.error);

    // verify while the server writes: one snapshot, so the checkpoint, the
    // whole log and recovery agree however the server moves on meanwhile.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (writing, mut a) = (writing.clone(), server.client("A").await);
        let mut i = server.client("I").await;
        tokio::spawn(async move {
            let mut sent = 0u32;
            while writing.load(Ordering::Relaxed) && sent < 400 {
                let s = start_session(&mut i).await;
                assert!(send(&mut a, env(&s, DECISION, "Proposal", proposal("busy"))).await.ok);
                sent += 1;
            }
            sent
        })
    };
    for _ in 0..3 {
        let u = url.clone();
        let out =
            tokio::task::spawn_blocking(move || admin(&["verify", "--database-url", &u, "--json"])).await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
        assert_eq!(lines(&out)[0]["checkpoint_compared"], true);
    }
    writing.store(false, Ordering::Relaxed);
    let sent = writer.await.expect("the writer");
    assert!(sent > 0, "the server was writing while verify ran");
    drop(i);
    server.stop().await;

    // Nothing the tool does writes a row.
    let before = fingerprint(&pg, &db);
    for cmd in [&["inspect"][..], &["verify"], &["sessions"], &["history", w.resolved[0].as_str()]] {
        let out = admin(&[&cmd[..1], &src[..], &cmd[1..]].concat());
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {}", shown(&out));
    }
    let out = admin_on("export", &src, &["--out", "-"]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    assert_eq!(fingerprint(&pg, &db), before, "the tool wrote to the database");
    let _ = std::fs::remove_file(&out_file);
}

/// Damage in copies of a server's database: named where it is, exit 1;
/// retention's deletions are not damage; a newer schema is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_position_of_a_row_that_does_not_decode() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let (db, url) = database(&pg, "damage");
    let server = server_on(&url).await;
    let w = workload(&server).await;
    server.stop().await;
    verify_exits(&url, 0);

    // In a copy, the Proposal of the first session no longer decodes.
    let copy = copy_database(&pg, &db, "damaged");
    let copy_url = url.replacen(&format!("/{db}"), &format!("/{copy}"), 1);
    let sql = format!("SELECT pos FROM macp.macp_records WHERE session_id = '{}' AND seq = 2", w.resolved[0]);
    let pos = pg.psql(&copy, &sql).expect("psql");
    pg.psql(&copy, &format!("UPDATE macp.macp_records SET record = '\\xffffffff' WHERE pos = {pos}")).expect("psql");
    let report = verify_exits(&copy_url, 1);
    assert!(report.contains(&format!("DAMAGE macp_records position {pos}: the row does not decode")), "{report}");
    assert!(report.contains(&w.resolved[0]), "the session is named: {report}");
    assert!(report.trim_end().ends_with("DAMAGED"), "{report}");
    let out = admin(&["verify", "--database-url", &copy_url, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = &lines(&out)[0];
    assert_eq!(v["healthy"], false);
    let first = &v["problems"][0];
    assert_eq!((first["file"].as_str(), first["position"].as_u64()), (Some("macp_records"), pos.parse().ok()), "{v}");
    // history of that session fails, naming the place; the original is whole.
    let out = admin(&["history", "--database-url", &copy_url, &w.resolved[0]]);
    assert_eq!(out.status.code(), Some(2));
    assert!(shown(&out).contains(&format!("log position {pos}")), "{}", text(&out.stderr));
    verify_exits(&url, 0);

    // A checkpoint whose open state does not restore is damage: the server
    // would not start.
    pg.psql(&copy, "UPDATE macp.macp_checkpoint SET open_state = '\\xff00ff00'").expect("psql");
    let report = verify_exits(&copy_url, 1);
    assert!(report.contains("DAMAGE macp_checkpoint: does not restore"), "{report}");
    assert!(report.contains("recovery fails, so the server would not start"), "{report}");

    // Retention deletes ended sessions with their records: no damage, but
    // past the gap in the positions the full replay is not possible.
    let retained = copy_database(&pg, &db, "retained");
    let sid = &w.resolved[0];
    pg.psql(
        &retained,
        &format!("DELETE FROM macp.macp_records WHERE session_id = '{sid}'; DELETE FROM macp.macp_ended WHERE session_id = '{sid}'"),
    )
    .expect("psql");
    let retained_url = url.replacen(&format!("/{db}"), &format!("/{retained}"), 1);
    let report = verify_exits(&retained_url, 0);
    assert!(report.contains("note: log positions 1 to 3 were deleted (retention)"), "{report}");
    assert!(report.contains("3 ended sessions checked; checkpoint not compared"), "{report}");

    // A schema a newer macp-rs migrated is refused.
    let newer = copy_database(&pg, &db, "newer");
    let future = macp_storage_pg::SCHEMA_VERSION + 1;
    pg.psql(
        &newer,
        &format!("INSERT INTO macp.macp_schema_version (version, applied_by) VALUES ({future}, 'a newer macp-rs')"),
    )
    .expect("psql");
    let newer_url = url.replacen(&format!("/{db}"), &format!("/{newer}"), 1);
    let out = admin(&["inspect", "--database-url", &newer_url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(shown(&out).contains("newer than this runtime understands"), "{}", text(&out.stderr));
}

/// What the tool cannot read is refused with exit 2 and the reason, and
/// never with the password.
#[test]
fn refusals_say_why_without_the_password() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let (db, url) = database(&pg, "empty");

    // A database no runtime has used: no macp schema, and none made.
    for cmd in ["inspect", "verify", "sessions", "export"] {
        let args: &[&str] = if cmd == "export" { &["--out", "-"] } else { &[] };
        let out = admin_on(cmd, &["--database-url", &url], args);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = shown(&out);
        assert!(err.contains("is not a macp-rs database: there is no schema macp"), "{cmd}: {err}");
        assert!(err.contains(&format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port())), "names the place: {err}");
    }
    let out = admin(&["history", "--database-url", &url, "some-session"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'macp'").unwrap(), "0");

    // Exactly one of DATA_DIR and --database-url.
    let dir = std::env::temp_dir();
    let d = dir.to_str().unwrap();
    let out = admin(&["sessions", d, "--database-url", &url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(shown(&out).contains("give DATA_DIR or --database-url, not both"), "{}", text(&out.stderr));
    let out = admin_with(&["inspect", d], &[("MACP_DATABASE_URL", &url)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(shown(&out).contains("MACP_DATABASE_URL is set in the environment"), "{}", text(&out.stderr));
    let out = admin(&["history", d, "--database-url", &url, "some-session"]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    let out = admin(&["verify"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(shown(&out).contains("give DATA_DIR, or --database-url"), "{}", text(&out.stderr));

    // An unreachable server, a URL that does not parse.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = admin(&["inspect", "--database-url", &format!("postgres://macp:s3cret@127.0.0.1:{port}/macp")]);
    assert_eq!(out.status.code(), Some(2));
    let err = shown(&out);
    assert!(err.contains(&format!("connect postgres://macp@127.0.0.1:{port}/macp schema macp")), "{err}");
    let out = admin(&["sessions", "--database-url", "postgres://macp:s3cret@h:notaport/macp"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(shown(&out).contains("the database URL does not parse"), "{}", text(&out.stderr));
}
