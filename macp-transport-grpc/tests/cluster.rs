//! Cluster mode end to end: real `macp-runtime` processes as nodes of one
//! cluster on a throwaway PostgreSQL, clients sending each request to the
//! node that serves its session (a node that does not answers
//! UNAVAILABLE, and the client tries the next: this is what forwarding
//! will do for them).
//!
//! - A node SIGKILLed mid-load: its shards are served by the survivors
//!   within the lease TTL plus a few seconds; everything acknowledged
//!   before the kill is there (GetSession, passive-subscribe replay), a
//!   resend is a duplicate, and no session has two records with one
//!   sequence number. A session TTL and a handoff's implicit acceptance
//!   that fall due while its node is dead fire after the takeover, once.
//! - A node SIGSTOPped until its shards are taken over and then resumed:
//!   it serves none of them any more, the database refuses whatever it
//!   still tries to write, and no session diverges.
//! - With a cluster secret, ListSessions, WatchSessions and WatchSignals
//!   through any node cover every node's shards, also a node's that joined
//!   (or restarted) after a watch began.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use macp_pg_test::{unique_name, PgServer};
use macp_storage_pg::shard_of;
use macp_wire::v1::*;
use prost::Message as _;
use tokio_stream::StreamExt;
use tonic::Code;

const SHARDS: u32 = 8;
const HANDOFF: &str = "macp.mode.handoff.v1";
const TTL_MS: u64 = 1000;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Node {
    id: String,
    port: u16,
    child: Child,
}

impl Node {
    fn spawn(url: &str, id: &str) -> Node {
        Self::spawn_logging(url, id, Stdio::null(), &[])
    }

    /// With its log (standard output) going to `log`, and `extra` flags.
    fn spawn_logging(url: &str, id: &str, log: Stdio, extra: &[&str]) -> Node {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_macp-runtime"))
            .args(["--dev", "--bind-addr", &addr, "--storage", "postgres", "--database-url", url])
            .args(["--node-id", id])
            .args((!extra.contains(&"--advertise-addr")).then_some(["--advertise-addr", &addr]).into_iter().flatten())
            .args(
                (!extra.contains(&"--shards"))
                    .then(|| ["--shards".to_string(), SHARDS.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(["--lease-ttl-ms", &TTL_MS.to_string()])
            .args(extra)
            .env("MACP_SESSION_START_LIMIT_PER_MINUTE", "0")
            .env("MACP_MESSAGE_LIMIT_PER_MINUTE", "0")
            .env("RUST_LOG", "warn")
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start macp-runtime");
        Node { id: id.into(), port, child }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let cont = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).stderr(Stdio::null()).status();
        let _ = cont;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One agent's clients, one per node.
struct Agent {
    clients: Vec<Client>,
}

impl Agent {
    /// Lazily connected clients: a dead node's just fail their calls.
    async fn new(ports: &[u16], who: &str) -> Agent {
        Agent { clients: ports.iter().map(|p| lazy_port(*p, who)).collect() }
    }

    /// Sends `e` to the node serving its session: each node in turn until
    /// one does not answer UNAVAILABLE (a node that does not hold the
    /// shard, one in the middle of a takeover, or a dead one), until
    /// `deadline`. `None` when none answered in time.
    async fn send(&mut self, e: &Envelope, deadline: Instant) -> Option<Ack> {
        loop {
            for c in &mut self.clients {
                let call = c.send(SendRequest { envelope: Some(e.clone()) });
                // Otherwise not served there, or the node is gone (a
                // connection cut mid-call may show as another code): the
                // outcome is unknown, and a retry is deduplicated.
                if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), call).await {
                    return r.into_inner().ack;
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get_session(&mut self, s: &str, deadline: Instant) -> SessionMetadata {
        loop {
            for c in &mut self.clients {
                let call = c.get_session(GetSessionRequest { session_id: s.into() });
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(r)) => return r.into_inner().metadata.unwrap(),
                    Ok(Err(st)) if st.code() == Code::Unavailable => {}
                    Ok(Err(st)) => panic!("GetSession {s}: {st:?}"),
                    Err(_) => {}
                }
            }
            assert!(Instant::now() < deadline, "no node answered GetSession {s} in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The message ids a passive subscribe replays from the start (the
    /// first `n` of them: the session is still open).
    async fn replay(&mut self, s: &str, n: usize, deadline: Instant) -> Vec<String> {
        loop {
            for c in &mut self.clients {
                let req = StreamSessionRequest { subscribe_session_id: s.into(), after_sequence: 0, envelope: None };
                let Ok(Ok(out)) =
                    tokio::time::timeout(Duration::from_secs(5), c.stream_session(tokio_stream::iter(vec![req]))).await
                else {
                    continue;
                };
                let mut out = out.into_inner();
                let mut ids = Vec::new();
                let mut refused = false;
                while ids.len() < n {
                    match tokio::time::timeout(Duration::from_secs(5), out.next()).await {
                        Ok(Some(Ok(StreamSessionResponse {
                            response: Some(stream_session_response::Response::Envelope(e)),
                        }))) => ids.push(e.message_id),
                        Ok(Some(Err(st))) if st.code() == Code::Unavailable => {
                            refused = true;
                            break;
                        }
                        other => panic!("replay of {s}: {other:?}"),
                    }
                }
                if !refused {
                    return ids;
                }
            }
            assert!(Instant::now() < deadline, "no node replayed {s} in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn sql(pg: &PgServer, db: &str, q: &str) -> String {
    pg.psql(db, q).expect("psql")
}

/// Waits until every shard has a holder among `nodes` with a valid lease,
/// and each of `nodes` holds at least one: right after the second node
/// joins, the first can still hold all of them.
fn wait_for_owners(pg: &PgServer, db: &str, nodes: &[&str], within: Duration) {
    let list = nodes.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(",");
    let q = format!(
        "SELECT count(*) || '/' || count(DISTINCT owner) FROM macp.macp_shards
         WHERE lease_until > clock_timestamp() AND owner IN ({list})"
    );
    let want = format!("{SHARDS}/{}", nodes.len());
    let deadline = Instant::now() + within;
    // The tables appear when the first node has joined.
    while pg.psql(db, &q).ok() != Some(want.clone()) {
        assert!(Instant::now() < deadline, "the shards were not all held by {nodes:?}, each holding some, in time");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fresh session id whose shard `node` holds (by the shard table as the
/// database has it now), so a test covers each node by construction
/// rather than by the luck of random ids.
fn sid_on(pg: &PgServer, db: &str, node: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = sid();
        if owner_of(pg, db, &s) == node {
            return s;
        }
        assert!(Instant::now() < deadline, "no shard of {node} in the table");
    }
}

/// The holder of a one-shard cluster's shard, once both nodes have joined
/// and the shard has settled on its preferred node (the same holder over
/// a whole lease TTL: several membership rounds of both nodes).
fn the_one_shards_owner(pg: &PgServer, db: &str) -> String {
    let q = "SELECT owner FROM macp.macp_shards WHERE lease_until > clock_timestamp()";
    let members = "SELECT count(*) FROM macp.macp_nodes";
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Option<(String, Instant)> = None;
    loop {
        // A node that has not joined yet has no tables to read.
        let owner = pg.psql(db, q).ok().filter(|o| !o.is_empty());
        let both = pg.psql(db, members).ok().as_deref() == Some("2");
        match (owner, &seen) {
            (Some(o), Some((s, since))) if both && *s == o => {
                if since.elapsed() >= Duration::from_millis(TTL_MS) {
                    return o;
                }
            }
            (Some(o), _) if both => seen = Some((o, Instant::now())),
            _ => seen = None,
        }
        assert!(Instant::now() < deadline, "the shard did not settle on one node");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn owner_of(pg: &PgServer, db: &str, session: &str) -> String {
    sql(pg, db, &format!("SELECT owner FROM macp.macp_shards WHERE shard = {}", shard_of(session, SHARDS)))
}

fn no_sequence_number_twice(pg: &PgServer, db: &str) {
    let twice = sql(
        pg,
        db,
        "SELECT count(*) FROM (SELECT session_id, seq FROM macp.macp_records WHERE session_id <> ''
         GROUP BY 1, 2 HAVING count(*) > 1) AS t",
    );
    assert_eq!(twice, "0", "a session has two records with one sequence number");
}

type Acked = Arc<Mutex<BTreeMap<String, Vec<Envelope>>>>;

/// Opens decision sessions and proposes in them through any node, until
/// `stop`; records what was acknowledged (a retry after an unknown
/// outcome reaches whichever node and counts once it is acknowledged).
async fn worker(ports: Vec<u16>, w: usize, acked: Acked, stop: Arc<std::sync::atomic::AtomicBool>) {
    let initiator = format!("w{w}");
    let mut i = Agent::new(&ports, &initiator).await;
    let mut a = Agent::new(&ports, "A").await;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let s = sid();
        let mut start = start_env(&s, &[&initiator, "A"]);
        start.sender = initiator.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        match i.send(&start, deadline).await {
            Some(ack) if ack.ok => acked.lock().unwrap().entry(s.clone()).or_default().push(start),
            other => panic!("SessionStart {s}: {other:?}"),
        }
        for n in 0..2 {
            let mut p = env(&s, DECISION, "Proposal", proposal(&format!("p{n}")));
            p.sender = "A".into();
            match a.send(&p, deadline).await {
                Some(ack) if ack.ok => acked.lock().unwrap().entry(s.clone()).or_default().push(p),
                other => panic!("Proposal in {s}: {other:?}"),
            }
        }
    }
}

#[test]
fn a_killed_nodes_sessions_are_served_by_the_survivors() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("cluster");
    let url = pg.create_database(&db).expect("a database");
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"].iter().map(|id| Node::spawn(&url, id)).collect();
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for p in &ports {
            connect_port(*p, "probe").await;
        }
    });
    wait_for_owners(&pg, &db, &["n1", "n2", "n3"], Duration::from_secs(30));

    let acked: Acked = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let short_lived = rt.block_on(async {
        let workers: Vec<_> =
            (0..6).map(|w| tokio::spawn(worker(ports.clone(), w, acked.clone(), stop.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // A session whose TTL falls due while its node is dead.
        let mut t = Agent::new(&ports, "T").await;
        let s = sid();
        let mut payload = start_payload(&["T", "A"]);
        payload.ttl_ms = 2500;
        let start = env(&s, DECISION, "SessionStart", payload.encode_to_vec());
        assert!(t.send(&start, Instant::now() + Duration::from_secs(10)).await.unwrap().ok);
        let victim = owner_of(&pg, &db, &s);
        // A handoff offer on the same node whose implicit acceptance falls
        // due while the node is dead (a policy registered at run time:
        // every node enforces it).
        let mut reg = connect_port(ports[0], "T").await;
        let policy = PolicyDescriptor {
            policy_id: "policy.kill.implicit".into(),
            mode: HANDOFF.into(),
            description: "implicit acceptance after 1.5 s".into(),
            rules: r#"{"acceptance":{"implicit_accept_timeout_ms":1500}}"#.into(),
            schema_version: 3,
            registered_at_unix_ms: 0,
        };
        let r = reg.register_policy(RegisterPolicyRequest { policy_descriptor: Some(policy) }).await.unwrap();
        assert!(r.get_ref().ok, "{}", r.get_ref().error);
        let handoff = sid_on(&pg, &db, &victim);
        let mut payload = start_payload(&["T", "A"]);
        payload.policy_version = "policy.kill.implicit".into();
        let start = env(&handoff, HANDOFF, "SessionStart", payload.encode_to_vec());
        assert!(t.send(&start, Instant::now() + Duration::from_secs(10)).await.unwrap().ok);
        let offer = macp_wire::modes::handoff::HandoffOfferPayload {
            handoff_id: "h1".into(),
            target_participant: "A".into(),
            scope: "support".into(),
            reason: "escalate".into(),
        };
        let offer = env(&handoff, HANDOFF, "HandoffOffer", offer.encode_to_vec());
        assert!(t.send(&offer, Instant::now() + Duration::from_secs(10)).await.unwrap().ok);
        eprintln!("killing {victim} (holds the short-lived session {s} and the handoff {handoff})");
        let n = nodes.iter_mut().find(|n| n.id == victim).unwrap();
        n.child.kill().unwrap();
        let _ = n.child.wait();
        let killed_at = Instant::now();
        // Load goes on through the survivors.
        tokio::time::sleep(Duration::from_millis(TTL_MS + 1500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in workers {
            w.await.expect("a worker");
        }
        let acked = acked.lock().unwrap().clone();
        let total: usize = acked.values().map(Vec::len).sum();
        assert!(acked.len() > 20 && total > 60, "{} sessions, {total} envelopes", acked.len());
        eprintln!("{} sessions, {total} acknowledged envelopes; verifying", acked.len());

        // Every session accepts messages again within TTL + 5 s of the kill.
        let mut a = Agent::new(&ports, "A").await;
        for s in acked.keys() {
            let mut p = env(s, DECISION, "Proposal", proposal("after"));
            p.sender = "A".into();
            let ack = a.send(&p, killed_at + Duration::from_millis(TTL_MS + 5000)).await;
            assert!(ack.as_ref().is_some_and(|a| a.ok), "session {s} after the kill: {ack:?}");
        }
        // Everything acknowledged is readable, and a resend is a duplicate.
        let later = Instant::now() + Duration::from_secs(60);
        let mut senders: BTreeMap<String, Agent> = BTreeMap::new();
        for (s, envs) in &acked {
            let md = a.get_session(s, later).await;
            assert_eq!(md.state, SessionState::Open as i32, "{s}");
            let ids = a.replay(s, envs.len(), later).await;
            let want: Vec<String> = envs.iter().map(|e| e.message_id.clone()).collect();
            assert_eq!(ids, want, "session {s} replays what was acknowledged, in order");
            for e in envs {
                if !senders.contains_key(&e.sender) {
                    senders.insert(e.sender.clone(), Agent::new(&ports, &e.sender).await);
                }
                let sender = senders.get_mut(&e.sender).unwrap();
                let ack = sender.send(e, later).await.unwrap();
                assert!(ack.ok && ack.duplicate, "resending {} in {s}: {ack:?}", e.message_id);
            }
        }
        (s, handoff)
    });
    let (short_lived, handoff) = short_lived;
    // The implicit acceptance was recorded after the takeover, once.
    rt.block_on(async {
        let mut t = Agent::new(&ports, "T").await;
        let ids = t.replay(&handoff, 3, Instant::now() + Duration::from_secs(20)).await;
        assert!(ids[2].starts_with("macp-runtime:implicit-accept:"), "{ids:?}");
    });
    let implicit = sql(
        &pg,
        &db,
        &format!(
            "SELECT count(*) FROM macp.macp_records WHERE session_id = '{handoff}'
             AND position(convert_to('macp-runtime:implicit-accept:', 'UTF8') in record) > 0"
        ),
    );
    assert_eq!(implicit, "1", "one implicit acceptance");
    // The short-lived session expired after the takeover, once.
    rt.block_on(async {
        let mut t = Agent::new(&ports, "T").await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let md = t.get_session(&short_lived, deadline).await;
            if md.state == SessionState::Expired as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "the session did not expire: {md:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let records = sql(&pg, &db, &format!("SELECT count(*) FROM macp.macp_records WHERE session_id = '{short_lived}'"));
    assert_eq!(records, "2", "SessionStart and one expiry");
    no_sequence_number_twice(&pg, &db);
}

#[test]
fn a_paused_node_is_fenced_when_it_wakes_up() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("fence");
    let url = pg.create_database(&db).expect("a database");
    let log = std::env::temp_dir().join(format!("{}.log", unique_name("p1")));
    let nodes = [
        Node::spawn_logging(&url, "p1", Stdio::from(std::fs::File::create(&log).unwrap()), &[]),
        Node::spawn(&url, "p2"),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for p in &ports {
            connect_port(*p, "probe").await;
        }
    });
    wait_for_owners(&pg, &db, &["p1", "p2"], Duration::from_secs(30));
    rt.block_on(async {
        let mut i = Agent::new(&ports, "I").await;
        let mut a = Agent::new(&ports, "A").await;
        // Sessions on p1's shards: one that goes on, one whose TTL falls
        // due while p1 is paused (its timer is what p1 would write first).
        let deadline = Instant::now() + Duration::from_secs(10);
        let (kept, expiring) = (sid_on(&pg, &db, "p1"), sid_on(&pg, &db, "p1"));
        let mut start = start_env(&kept, &["I", "A"]);
        start.sender = "I".into();
        assert!(i.send(&start, deadline).await.unwrap().ok);
        let mut payload = start_payload(&["I", "A"]);
        payload.ttl_ms = 2000;
        let mut short = env(&expiring, DECISION, "SessionStart", payload.encode_to_vec());
        short.sender = "I".into();
        assert!(i.send(&short, deadline).await.unwrap().ok);

        eprintln!("pausing p1");
        nodes[0].signal("-STOP");
        wait_for_owners(&pg, &db, &["p2"], Duration::from_secs(20));
        let mut p = env(&kept, DECISION, "Proposal", proposal("while-p1-sleeps"));
        p.sender = "A".into();
        let mut on_p2 = Agent { clients: vec![connect_port(ports[1], "A").await] };
        assert!(on_p2.send(&p, Instant::now() + Duration::from_secs(10)).await.unwrap().ok);
        // Past the short session's TTL: p2 expires it.
        tokio::time::sleep(Duration::from_millis(2500)).await;

        eprintln!("resuming p1");
        nodes[0].signal("-CONT");
        // At once, before the shards can come back to it legitimately
        // (p2 must hand them over and p1 load them at a new epoch): p1
        // serves nothing of them.
        let mut on_p1 = connect_port(ports[0], "A").await;
        let mut q = env(&kept, DECISION, "Proposal", proposal("late"));
        q.sender = "A".into();
        match on_p1.send(SendRequest { envelope: Some(q) }).await {
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
            Ok(r) => panic!("p1 accepted a message for a shard it lost: {:?}", r.into_inner()),
        }
        // The expiry p1's kernel owed the short session when it woke was
        // written under the old lease, and the database refused it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("was taken over or lapsed; the database refused the write") {
                break;
            }
            assert!(Instant::now() < deadline, "p1 never had a write refused:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let md = a.get_session(&kept, Instant::now() + Duration::from_secs(10)).await;
        assert_eq!(md.state, SessionState::Open as i32);
        let ids = a.replay(&kept, 2, Instant::now() + Duration::from_secs(10)).await;
        assert_eq!(ids, vec![start.message_id.clone(), p.message_id.clone()]);
        let md = a.get_session(&expiring, Instant::now() + Duration::from_secs(10)).await;
        assert_eq!(md.state, SessionState::Expired as i32);
    });
    let kept_records = sql(
        &pg,
        &db,
        "SELECT string_agg(session_id || ':' || seq, ',' ORDER BY session_id, seq) FROM macp.macp_records WHERE session_id <> ''",
    );
    assert_eq!(kept_records.split(',').count(), 4, "start + proposal, start + expiry: {kept_records}");
    no_sequence_number_twice(&pg, &db);
}

/// With a cluster secret, any node serves any request: each agent talks to
/// one node only, and a decision session runs through both — Sends,
/// GetSession, a passive subscriber and a stream bound by its first
/// envelope, cancel — whichever node holds the session. A client cannot
/// claim a forwarded identity itself.
#[test]
fn any_node_serves_any_session_with_a_cluster_secret() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("forward");
    let url = pg.create_database(&db).expect("a database");
    let secret = ["--cluster-secret", "a shared secret of the test cluster"];
    let nodes = [
        Node::spawn_logging(&url, "f1", Stdio::null(), &secret),
        Node::spawn_logging(&url, "f2", Stdio::null(), &secret),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for p in &ports {
            connect_port(*p, "probe").await;
        }
    });
    wait_for_owners(&pg, &db, &["f1", "f2"], Duration::from_secs(30));
    // Every node knows the other's shards once it has ticked after both
    // joined.
    std::thread::sleep(Duration::from_millis(TTL_MS / 2));
    rt.block_on(async {
        let (mut i, mut a) = (connect_port(ports[0], "I").await, connect_port(ports[1], "A").await);
        for n in 0..8 {
            // Alternately on each node's shards.
            let s = sid_on(&pg, &db, ["f1", "f2"][n % 2]);
            let start = start_env(&s, &["I", "A"]);
            assert!(send(&mut i, start.clone()).await.ok, "start {n}");
            // A passive subscriber on A's node.
            let sub = StreamSessionRequest { subscribe_session_id: s.clone(), after_sequence: 0, envelope: None };
            let (sub_tx, sub_rx) = tokio::sync::mpsc::channel(4);
            sub_tx.send(sub).await.unwrap();
            let mut watcher = connect_port(ports[1], "A").await;
            let mut stream = watcher
                .stream_session(tokio_stream::wrappers::ReceiverStream::new(sub_rx))
                .await
                .expect("subscribe through A's node")
                .into_inner();
            let p = env(&s, DECISION, "Proposal", proposal("p1"));
            let ack = send(&mut a, p.clone()).await;
            assert!(ack.ok && !ack.duplicate, "{ack:?}");
            assert!(send(&mut a, p.clone()).await.duplicate, "a resend through the other node is a duplicate");
            for want in [&start, &p] {
                let got = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
                match got.response {
                    Some(stream_session_response::Response::Envelope(e)) => assert_eq!(e.message_id, want.message_id),
                    other => panic!("{other:?}"),
                }
            }
            let md = a.get_session(GetSessionRequest { session_id: s.clone() }).await.unwrap().into_inner();
            assert_eq!(md.metadata.unwrap().state, SessionState::Open as i32);
            // A stream bound by its first envelope, on I's node: the vote
            // comes back as an Ack-less answer or an error frame, either
            // way through the proxy.
            let v = env(&s, DECISION, "Vote", vote("p1", "APPROVE"));
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(StreamSessionRequest { envelope: Some(v.clone()), ..Default::default() }).await.unwrap();
            let mut bound =
                i.stream_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), bound.next()).await.unwrap().unwrap().unwrap();
            match first.response {
                Some(stream_session_response::Response::Envelope(e)) => assert_eq!(e.message_id, v.message_id),
                other => panic!("the bound stream sees its own vote: {other:?}"),
            }
            drop(tx);
            let ack = i
                .cancel_session(CancelSessionRequest { session_id: s.clone(), reason: "done".into() })
                .await
                .expect("cancel through I's node")
                .into_inner()
                .ack
                .unwrap();
            assert!(ack.ok, "{ack:?}");
            let md = a.get_session(GetSessionRequest { session_id: s.clone() }).await.unwrap().into_inner();
            assert_eq!(md.metadata.unwrap().state, SessionState::Cancelled as i32);
        }

        // A client claiming a forwarded identity is refused.
        let forged = Auth::Headers(vec![
            ("x-macp-agent-id", "I".into()),
            ("x-macp-cluster-identity", "eyJzZW5kZXIiOiJJIn0".into()),
            ("x-macp-cluster-mac", "AAAA".into()),
        ]);
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", ports[0])).unwrap();
        let mut c = macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient::with_interceptor(
            ch.connect().await.unwrap(),
            forged,
        );
        let e = c.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    });
}

/// A node that serves no shard (two nodes, one shard) still answers
/// discovery and the registries, and forwards the sessions.
#[test]
fn a_node_without_shards_answers_discovery_and_forwards() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("noshard");
    let url = pg.create_database(&db).expect("a database");
    let extra = ["--shards", "1", "--cluster-secret", "a shared secret of the test cluster"];
    let nodes = [
        Node::spawn_logging(&url, "z1", Stdio::null(), &extra),
        Node::spawn_logging(&url, "z2", Stdio::null(), &extra),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for p in &ports {
            let mut c = connect_port(*p, "probe").await;
            let deadline = Instant::now() + Duration::from_secs(30);
            // Initialize answers as soon as the node listens.
            while let Err(e) = c
                .initialize(InitializeRequest { supported_protocol_versions: vec!["1.0".into()], ..Default::default() })
                .await
            {
                assert!(Instant::now() < deadline, "node on port {p} never answered Initialize: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let modes = c.list_modes(ListModesRequest::default()).await.expect("ListModes").into_inner();
            assert!(modes.modes.iter().any(|m| m.mode == DECISION), "{modes:?}");
        }
    });
    let owner = the_one_shards_owner(&pg, &db);
    std::thread::sleep(Duration::from_millis(TTL_MS / 2));
    let idle = if owner == "z1" { ports[1] } else { ports[0] };
    rt.block_on(async {
        let mut i = connect_port(idle, "I").await;
        let s = sid();
        assert!(send(&mut i, start_env(&s, &["I", "A"])).await.ok, "forwarded by the node without shards");
        // The node serving the one shard lists it (from that shard's
        // driver, not from the driver of the registries), and so does the
        // node without shards (asking the other).
        for &p in &ports {
            let mut c = connect_port(p, "I").await;
            let listed = c.list_sessions(ListSessionsRequest::default()).await.expect("ListSessions").into_inner();
            let ids: Vec<&str> = listed.sessions.iter().map(|m| m.session_id.as_str()).collect();
            assert_eq!(ids, [s.as_str()], "listed by the node on port {p}");
        }
    });
}

/// Rate limits are charged at the node the client talks to; the node a
/// request is forwarded to does not charge it again.
#[test]
fn a_forwarded_request_is_charged_once() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("limits");
    let url = pg.create_database(&db).expect("a database");
    let extra =
        ["--shards", "1", "--cluster-secret", "a shared secret of the test cluster", "--message-limit-per-minute", "3"];
    let nodes = [
        Node::spawn_logging(&url, "r1", Stdio::null(), &extra),
        Node::spawn_logging(&url, "r2", Stdio::null(), &extra),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for p in &ports {
            connect_port(*p, "probe").await;
        }
    });
    let owner = the_one_shards_owner(&pg, &db);
    std::thread::sleep(Duration::from_millis(TTL_MS / 2));
    let (served, idle) = if owner == "r1" { (ports[0], ports[1]) } else { (ports[1], ports[0]) };
    rt.block_on(async {
        let (mut i, mut via, mut direct) =
            (connect_port(idle, "I").await, connect_port(idle, "A").await, connect_port(served, "A").await);
        let s = sid();
        assert!(send(&mut i, start_env(&s, &["I", "A"])).await.ok);
        for n in 0..4 {
            let c = if n < 2 { &mut via } else { &mut direct };
            let ack = send(c, env(&s, DECISION, "Proposal", proposal(&format!("p{n}")))).await;
            assert!(ack.ok, "message {n}: {ack:?}");
        }
        // The fourth through the idle node is over its budget of three.
        let ack = send(&mut via, env(&s, DECISION, "Proposal", proposal("p4"))).await;
        assert!(ack.ok, "{ack:?}");
        let ack = send(&mut via, env(&s, DECISION, "Proposal", proposal("p5"))).await;
        assert_eq!(code(&ack), "RATE_LIMITED", "{ack:?}");
    });
}

/// A policy or extension mode registered on one node is enforced,
/// listed and watched on every node; a change made on two nodes at once
/// is made once; an unregistration reaches every node; a node that joins
/// later loads its shards with the registries.
#[test]
fn registries_are_cluster_wide() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("registries");
    let url = pg.create_database(&db).expect("a database");
    let secret = ["--cluster-secret", "a shared secret of the test cluster"];
    let mut nodes = vec![
        Node::spawn_logging(&url, "g1", Stdio::null(), &secret),
        Node::spawn_logging(&url, "g2", Stdio::null(), &secret),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for p in &ports {
            connect_port(*p, "probe").await;
        }
    });
    wait_for_owners(&pg, &db, &["g1", "g2"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(TTL_MS / 2));
    let policy = |id: &str, description: &str| PolicyDescriptor {
        policy_id: id.into(),
        mode: DECISION.into(),
        description: description.into(),
        rules: r#"{"voting":{"algorithm":"majority"}}"#.into(),
        schema_version: 3,
        registered_at_unix_ms: 0,
    };
    let start_with = |s: &str, policy_id: &str| {
        let mut p = start_payload(&["I", "A"]);
        p.policy_version = policy_id.into();
        env(s, DECISION, "SessionStart", p.encode_to_vec())
    };
    rt.block_on(async {
        let (mut one, mut two) = (connect_port(ports[0], "I").await, connect_port(ports[1], "I").await);
        let mut watch = two.watch_policies(WatchPoliciesRequest {}).await.unwrap().into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
        assert!(!first.descriptors.iter().any(|d| d.policy_id == "policy.c.majority"));

        // Registered on g1: at once enforceable and readable through g2,
        // for sessions of either node's shards.
        let p = policy("policy.c.majority", "majority");
        let r = one.register_policy(RegisterPolicyRequest { policy_descriptor: Some(p.clone()) }).await.unwrap();
        assert!(r.get_ref().ok, "{}", r.get_ref().error);
        assert_eq!(get_policy(&mut two, &p.policy_id).await.policy_id, p.policy_id);
        for n in 0..8 {
            let s = sid_on(&pg, &db, ["g1", "g2"][n % 2]);
            let ack = send(&mut two, start_with(&s, &p.policy_id)).await;
            assert!(ack.ok, "a session bound to the policy registered on the other node: {ack:?}");
        }
        // g2's watcher hears of it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = tokio::time::timeout_at(deadline.into(), watch.next()).await.expect("WatchPolicies on g2").unwrap();
            if m.unwrap().descriptors.iter().any(|d| d.policy_id == p.policy_id) {
                break;
            }
        }
        // Registering the same id through the other node is refused.
        let r = two.register_policy(RegisterPolicyRequest { policy_descriptor: Some(p.clone()) }).await.unwrap();
        assert!(!r.get_ref().ok && r.get_ref().error.starts_with("INVALID_POLICY_DEFINITION"), "{:?}", r.get_ref());

        // The same new id on both nodes at once: exactly one registers it.
        let (a, b) = (policy("policy.c.race", "from g1"), policy("policy.c.race", "from g2"));
        let (ra, rb) = tokio::join!(
            one.register_policy(RegisterPolicyRequest { policy_descriptor: Some(a) }),
            two.register_policy(RegisterPolicyRequest { policy_descriptor: Some(b) }),
        );
        let oks = [ra.unwrap().into_inner().ok, rb.unwrap().into_inner().ok];
        assert_eq!(oks.iter().filter(|ok| **ok).count(), 1, "{oks:?}");
        let winner = if oks[0] { "from g1" } else { "from g2" };
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in [&mut one, &mut two] {
            while get_policy(c, "policy.c.race").await.description != winner {
                assert!(Instant::now() < deadline, "both nodes settle on the registered policy");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        // Unregistered on g2: within a poll no node starts sessions with it.
        let r = two.unregister_policy(UnregisterPolicyRequest { policy_id: p.policy_id.clone() }).await.unwrap();
        assert!(r.get_ref().ok, "{}", r.get_ref().error);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut refused = 0;
        while refused < 8 {
            let ack = send(&mut one, start_with(&sid(), &p.policy_id)).await;
            if ack.ok {
                refused = 0;
                assert!(Instant::now() < deadline, "g1 still starts sessions with the unregistered policy");
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                assert_eq!(code(&ack), "UNKNOWN_POLICY_VERSION", "{ack:?}");
                refused += 1;
            }
        }

        // An extension mode registered on g1 starts sessions through g2 at
        // once; promoted on g2, g1 lists it as standards-track.
        let mode = ModeDescriptor {
            mode: "ext.cluster.note.v1".into(),
            mode_version: "1.0.0".into(),
            message_types: vec!["Note".into(), "Commitment".into()],
            terminal_message_types: vec!["Commitment".into()],
            ..Default::default()
        };
        let r = one.register_ext_mode(RegisterExtModeRequest { mode_descriptor: Some(mode.clone()) }).await.unwrap();
        assert!(r.get_ref().ok, "{}", r.get_ref().error);
        for _ in 0..4 {
            let e = env(&sid(), &mode.mode, "SessionStart", start_payload(&["I", "A"]).encode_to_vec());
            let ack = send(&mut two, e).await;
            assert!(ack.ok, "a session of the extension registered on the other node: {ack:?}");
        }
        let r = two
            .promote_mode(PromoteModeRequest { mode: mode.mode.clone(), promoted_mode_name: "acme.note.v1".into() })
            .await
            .unwrap();
        assert!(r.get_ref().ok, "{}", r.get_ref().error);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let modes = one.list_modes(ListModesRequest::default()).await.unwrap().into_inner().modes;
            let exts = one.list_ext_modes(ListExtModesRequest::default()).await.unwrap().into_inner().modes;
            if modes.iter().any(|m| m.mode == "acme.note.v1") && !exts.iter().any(|m| m.mode == mode.mode) {
                break;
            }
            assert!(Instant::now() < deadline, "g1 lists the promoted mode");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // A node joining later loads its shards with the registries.
    nodes.push(Node::spawn_logging(&url, "g3", Stdio::null(), &secret));
    let late = nodes[2].port;
    let q = "SELECT count(*) FROM macp.macp_shards WHERE owner = 'g3' AND lease_until > clock_timestamp()";
    let deadline = Instant::now() + Duration::from_secs(30);
    while sql(&pg, &db, q) == "0" {
        assert!(Instant::now() < deadline, "g3 was handed no shard");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_owners(&pg, &db, &["g1", "g2", "g3"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(TTL_MS / 2));
    rt.block_on(async {
        let mut three = connect_port(late, "I").await;
        let listed = three.list_policies(ListPoliciesRequest { mode: String::new() }).await.unwrap().into_inner();
        assert!(listed.descriptors.iter().any(|d| d.policy_id == "policy.c.race"), "{listed:?}");
        for n in 0..15 {
            // Some on the late joiner's shards, by construction.
            let s = sid_on(&pg, &db, ["g1", "g2", "g3"][n % 3]);
            let ack = send(&mut three, start_with(&s, "policy.c.race")).await;
            assert!(ack.ok, "{ack:?}");
            let e = env(&sid(), "acme.note.v1", "SessionStart", start_payload(&["I", "A"]).encode_to_vec());
            assert!(send(&mut three, e).await.ok);
        }
    });
}

/// Every session the client's agent may read, through one node in pages
/// of `page_size`, in the order returned. Pages follow each other in
/// session-id order, so an id out of order is a duplicate or a page that
/// went back.
async fn list_all(c: &mut Client, page_size: i32) -> Result<Vec<String>, tonic::Status> {
    let (mut ids, mut page_token) = (Vec::<String>::new(), String::new());
    loop {
        let r = c.list_sessions(ListSessionsRequest { page_size, page_token }).await?.into_inner();
        assert!(page_size <= 0 || r.sessions.len() <= page_size as usize, "a page longer than asked");
        ids.extend(r.sessions.into_iter().map(|m| m.session_id));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "pages out of order or repeating: {ids:?}");
        if r.next_page_token.is_empty() {
            return Ok(ids);
        }
        page_token = r.next_page_token;
    }
}

/// Polls [`list_all`] until it lists exactly `want` (a node learns the
/// others' addresses at its membership rounds, and a shard changing hands
/// is briefly listed by nobody).
async fn listed(c: &mut Client, page_size: i32, want: &std::collections::BTreeSet<String>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = list_all(c, page_size).await;
        match &got {
            Ok(ids) if ids.iter().eq(want.iter()) => return,
            _ => assert!(Instant::now() < deadline, "listed (pages of {page_size}) {got:?}, want {want:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a watch has received so far, and how it ended (if it did).
struct Watched<T> {
    items: Arc<Mutex<Vec<T>>>,
    end: Arc<Mutex<Option<Result<(), tonic::Status>>>>,
}

impl<T: Send + 'static> Watched<T> {
    fn collect(mut stream: tonic::Streaming<T>) -> Watched<T> {
        let (items, end) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(None)));
        let w = Watched { items: items.clone(), end: end.clone() };
        tokio::spawn(async move {
            let ended = loop {
                match stream.message().await {
                    Ok(Some(x)) => items.lock().unwrap().push(x),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            *end.lock().unwrap() = Some(ended);
        });
        w
    }

    /// Waits until an item satisfies `f`; fails if the watch ends first or
    /// at the deadline.
    async fn until(&self, what: &str, within: Duration, f: impl Fn(&T) -> bool) {
        let deadline = Instant::now() + within;
        while !self.items.lock().unwrap().iter().any(&f) {
            assert!(self.end.lock().unwrap().is_none(), "the watch ended before {what}: {:?}", self.end);
            assert!(Instant::now() < deadline, "{what}: not seen in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn created(e: &WatchSessionsResponse) -> Option<&str> {
    let ev = e.event.as_ref()?;
    (ev.event_type == session_lifecycle_event::EventType::Created as i32)
        .then(|| ev.session.as_ref().map(|m| m.session_id.as_str()))
        .flatten()
}

/// Sends Signals to node `to` until `watch` has received one of them: a
/// Signal has no backlog, so one sent before the watching node's stream to
/// `to` is open is lost, and the next is not.
async fn signal_reaches(to: &mut Client, watch: &Watched<WatchSignalsResponse>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = std::collections::BTreeSet::new();
    loop {
        let payload = SignalPayload { signal_type: "heartbeat".into(), ..Default::default() };
        let e = env("", "", "Signal", payload.encode_to_vec());
        assert!(send(to, e.clone()).await.ok, "{what}: the Signal was refused");
        sent.insert(e.message_id);
        let wait = Instant::now() + Duration::from_millis(300);
        while Instant::now() < wait {
            let got = |s: &WatchSignalsResponse| s.envelope.as_ref().is_some_and(|e| sent.contains(&e.message_id));
            if watch.items.lock().unwrap().iter().any(got) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(watch.end.lock().unwrap().is_none(), "{what}: the watch ended: {:?}", watch.end);
        assert!(Instant::now() < deadline, "{what}: none of {} Signals arrived", sent.len());
    }
}

/// Nodes `ids` started with `extra` flags, once each answers, and a
/// runtime for their clients.
fn listening(url: &str, ids: &[&str], extra: &[&str]) -> (Vec<Node>, tokio::runtime::Runtime) {
    let nodes: Vec<Node> = ids.iter().map(|id| Node::spawn_logging(url, id, Stdio::null(), extra)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        for n in &nodes {
            connect_port(n.port, "probe").await;
        }
    });
    (nodes, rt)
}

/// Waits until `node` holds a shard.
async fn holds_a_shard(pg: &PgServer, db: &str, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let q = format!("SELECT count(*) FROM macp.macp_shards WHERE owner = '{node}' AND lease_until > clock_timestamp()");
    while sql(pg, db, &q) == "0" {
        assert!(Instant::now() < deadline, "{node} took no shard");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A session owned by `node` (by the shard table as the database has it
/// now), started through `via` with W as a participant.
async fn start_on(pg: &PgServer, db: &str, node: &str, via: u16) -> String {
    let s = sid_on(pg, db, node);
    let mut i = Agent { clients: vec![lazy_port(via, "I")] };
    let ack = i.send(&start_env(&s, &["I", "W"]), Instant::now() + Duration::from_secs(20)).await;
    assert!(ack.as_ref().is_some_and(|a| a.ok), "start {s} on {node} via port {via}: {ack:?}");
    s
}

/// With a cluster secret, ListSessions, WatchSessions and WatchSignals
/// through any node see the whole cluster: sessions started through (and
/// served by) other nodes, in one listing or page by page; lifecycle
/// events and Signals of other nodes, also of a node that joined after the
/// watch began; each session's CREATED once. A node that cannot be
/// reached fails the listing, naming it.
#[test]
fn listings_and_watches_span_the_cluster() {
    use std::collections::BTreeSet;
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("fan");
    let url = pg.create_database(&db).expect("a database");
    let secret = ["--cluster-secret", "a shared secret of the test cluster"];
    let (mut nodes, rt) = listening(&url, &["c1", "c2"], &secret);
    let mut ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    wait_for_owners(&pg, &db, &["c1", "c2"], Duration::from_secs(30));
    rt.block_on(async {
        let mut w1 = connect_port(ports[0], "W").await;
        let sessions_on_1 =
            Watched::collect(w1.watch_sessions(WatchSessionsRequest {}).await.expect("WatchSessions").into_inner());
        let signals_on_1 =
            Watched::collect(w1.watch_signals(WatchSignalsRequest {}).await.expect("WatchSignals").into_inner());

        // Sessions served by each node, started through each node; some
        // of them ended (every node's shards list those).
        let mut all = BTreeSet::new();
        for (owner, via) in [("c1", 0), ("c2", 1), ("c1", 1), ("c2", 0)] {
            for _ in 0..3 {
                all.insert(start_on(&pg, &db, owner, ports[via]).await);
            }
        }
        let mut i = connect_port(ports[0], "I").await;
        let ended: BTreeSet<String> = all.iter().take(4).cloned().collect();
        for s in &ended {
            let r = i.cancel_session(CancelSessionRequest { session_id: s.clone(), reason: "done".into() }).await;
            assert!(r.expect("cancel").into_inner().ack.unwrap().ok);
        }
        for p in &ports {
            let mut w = connect_port(*p, "W").await;
            listed(&mut w, 0, &all, Duration::from_secs(10)).await;
            listed(&mut w, 5, &all, Duration::from_secs(10)).await;
            listed(&mut w, 1, &all, Duration::from_secs(10)).await;
        }

        // c1's watchers see what c2 serves.
        let on_2 = start_on(&pg, &db, "c2", ports[1]).await;
        all.insert(on_2.clone());
        sessions_on_1.until("c2's session created", Duration::from_secs(10), |e| created(e) == Some(&on_2)).await;
        let mut a2 = connect_port(ports[1], "A").await;
        signal_reaches(&mut a2, &signals_on_1, "a Signal sent to c2").await;

        // A node joining after the watches began.
        nodes.push(Node::spawn_logging(&url, "c3", Stdio::null(), &secret));
        ports.push(nodes[2].port);
        connect_port(ports[2], "probe").await;
        holds_a_shard(&pg, &db, "c3").await;
        let on_3 = start_on(&pg, &db, "c3", ports[2]).await;
        all.insert(on_3.clone());
        sessions_on_1.until("c3's session created", Duration::from_secs(10), |e| created(e) == Some(&on_3)).await;
        let mut a3 = connect_port(ports[2], "A").await;
        signal_reaches(&mut a3, &signals_on_1, "a Signal sent to c3").await;
        let mut w3 = connect_port(ports[2], "W").await;
        listed(&mut w3, 2, &all, Duration::from_secs(10)).await;
        listed(&mut w1, 3, &all, Duration::from_secs(10)).await;

        // c3 restarts (same id, another port) and takes its shards back at
        // once: c1's stream to it failed, is reopened, and c3's snapshot
        // announces again the open sessions it serves.
        nodes[2].child.kill().unwrap();
        let _ = nodes[2].child.wait();
        nodes[2] = Node::spawn_logging(&url, "c3", Stdio::null(), &secret);
        ports[2] = nodes[2].port;
        connect_port(ports[2], "probe").await;
        holds_a_shard(&pg, &db, "c3").await;
        let again = start_on(&pg, &db, "c3", ports[2]).await;
        all.insert(again.clone());
        sessions_on_1
            .until("restarted c3's session created", Duration::from_secs(10), |e| created(e) == Some(&again))
            .await;

        // Every session once, whichever nodes' snapshots and live feeds
        // brought it.
        let items = sessions_on_1.items.lock().unwrap().clone();
        let ids: Vec<&str> = items.iter().filter_map(created).collect();
        let unique: BTreeSet<&str> = ids.iter().copied().collect();
        assert_eq!(ids.len(), unique.len(), "a session created twice: {ids:?}");
        // (An ended session may have ended before c1's stream to its node
        // opened: its node's snapshot has open sessions only.)
        let unseen: Vec<&String> = all.iter().filter(|s| !unique.contains(s.as_str()) && !ended.contains(*s)).collect();
        assert!(unseen.is_empty(), "open sessions never announced: {unseen:?}");

        // A member the others cannot reach (it advertises an address
        // nobody listens on) fails the listing, named; once it is dead and
        // dropped from the membership, the listing is whole again.
        let nowhere = format!("127.0.0.1:{}", free_port());
        nodes.push(Node::spawn_logging(
            &url,
            "c4",
            Stdio::null(),
            &[secret[0], secret[1], "--advertise-addr", &nowhere],
        ));
        holds_a_shard(&pg, &db, "c4").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let e = loop {
            match list_all(&mut w1, 0).await {
                Err(e) => break e,
                Ok(ids) => assert!(Instant::now() < deadline, "c1 lists without asking c4: {ids:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("c4"), "{e:?}");
        nodes[3].child.kill().unwrap();
        let _ = nodes[3].child.wait();
        listed(&mut w1, 4, &all, Duration::from_millis(TTL_MS) + Duration::from_secs(10)).await;
    });
}

/// A watch's streams to the other nodes do not take the stream slots that
/// forwarded requests need: with every slot of a connection (here 4) held
/// by watches, a request through the same node is still forwarded.
#[test]
fn watches_leave_room_for_forwarding() {
    let pg = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
    let db = unique_name("slots");
    let url = pg.create_database(&db).expect("a database");
    let extra = ["--cluster-secret", "a shared secret of the test cluster", "--max-concurrent-streams", "4"];
    let (nodes, rt) = listening(&url, &["d1", "d2"], &extra);
    let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    wait_for_owners(&pg, &db, &["d1", "d2"], Duration::from_secs(30));
    rt.block_on(async {
        let mut a2 = connect_port(ports[1], "A").await;
        let mut watchers = Vec::new();
        for n in 0..4 {
            // A connection each: the client's side has the same limit.
            let mut c = connect_port(ports[0], "W").await;
            let w = Watched::collect(c.watch_signals(WatchSignalsRequest {}).await.expect("WatchSignals").into_inner());
            signal_reaches(&mut a2, &w, &format!("watch {n}: a Signal sent to d2")).await;
            watchers.push((c, w));
        }
        start_on(&pg, &db, "d2", ports[0]).await;
    });
}
