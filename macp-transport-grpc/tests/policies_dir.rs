//! The read-only policy registry (`MACP_POLICIES_DIR` / `--policies-dir`):
//! policies from files are listed and enforced, the registry refuses changes
//! with REGISTRY_READ_ONLY, a bad file stops the start naming the file, and
//! a restart with the same directory reaches the same state while sessions
//! bound before a file changed keep the policy they were bound to.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Parser;
use common::*;
use macp_transport_grpc::config::Config;
use macp_transport_grpc::service::ERROR_CODE_KEY;
use macp_wire::v1::*;
use macp_wire::Message;
use tonic::Code;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("macp-policies-{tag}-{}-{}", std::process::id(), sid()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const UNANIMOUS: &str = r#"{
  "_comment": "kept in version control",
  "policy_id": "policy.team.unanimous",
  "mode": "macp.mode.decision.v1",
  "description": "Every decisive vote must approve.",
  "rules": {"voting": {"algorithm": "unanimous"}},
  "schema_version": 3
}"#;

const MAJORITY: &str = r#"{
  "policy_id": "policy.team.vote",
  "mode": "macp.mode.decision.v1",
  "description": "A majority of decisive votes decides.",
  "rules": "{\"voting\":{\"algorithm\":\"majority\"}}",
  "schema_version": 3
}"#;

/// A decision session I/A/B bound to `policy`, with a proposal, A
/// approving and B rejecting; returns the id and I's Commitment ack.
async fn split_vote_commit(i: &mut Client, a: &mut Client, b: &mut Client, policy: &str) -> (String, Ack) {
    let s = sid();
    let mut p = start_payload(&["I", "A", "B"]);
    p.policy_version = policy.into();
    let ack = send(i, env(&s, DECISION, "SessionStart", p.encode_to_vec())).await;
    assert!(ack.ok, "{:?}", ack.error);
    assert!(send(a, env(&s, DECISION, "Proposal", proposal("p1"))).await.ok);
    assert!(send(a, env(&s, DECISION, "Vote", vote("p1", "APPROVE"))).await.ok);
    assert!(send(b, env(&s, DECISION, "Vote", vote("p1", "REJECT"))).await.ok);
    let ack = send(i, env(&s, DECISION, "Commitment", commitment())).await;
    (s, ack)
}

fn policy_ids(r: ListPoliciesResponse) -> Vec<String> {
    r.descriptors.into_iter().map(|d| d.policy_id).collect()
}

#[tokio::test]
async fn file_policies_are_listed_enforced_and_read_only() {
    let dir = TempDir::new("enforced");
    dir.write("unanimous.json", UNANIMOUS);
    dir.write("vote.json", MAJORITY);
    dir.write("README.md", "not a policy: only *.json files are read");
    let srv = Server::start(&["--policies-dir", dir.path()]).await;
    let (mut i, mut a, mut b) = (srv.client("I").await, srv.client("A").await, srv.client("B").await);

    let ids = policy_ids(i.list_policies(ListPoliciesRequest::default()).await.unwrap().into_inner());
    assert_eq!(ids, ["policy.default", "policy.team.unanimous", "policy.team.vote"]);
    let d = get_policy(&mut i, "policy.team.unanimous").await;
    assert_eq!((d.mode.as_str(), d.schema_version), (DECISION, 3));
    assert_eq!(d.rules, r#"{"voting":{"algorithm":"unanimous"}}"#);

    // Enforced: a split vote cannot be committed under unanimity…
    let (_, ack) = split_vote_commit(&mut i, &mut a, &mut b, "policy.team.unanimous").await;
    assert_eq!(code(&ack), "POLICY_DENIED", "{:?}", ack.error);
    // …and can under the (inclusive) majority policy.
    let (_, ack) = split_vote_commit(&mut i, &mut a, &mut b, "policy.team.vote").await;
    assert!(ack.ok, "{:?}", ack.error);

    // Read-only: both mutations refused with REGISTRY_READ_ONLY.
    let mut admin = srv.client("admin").await;
    let p = PolicyDescriptor {
        policy_id: "policy.adhoc".into(),
        mode: "*".into(),
        description: "d".into(),
        rules: "{}".into(),
        schema_version: 3,
        registered_at_unix_ms: 0,
    };
    let e = admin.register_policy(RegisterPolicyRequest { policy_descriptor: Some(p) }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.metadata().get(ERROR_CODE_KEY).unwrap(), "REGISTRY_READ_ONLY");
    assert!(e.message().contains("MACP_POLICIES_DIR"), "{}", e.message());
    let e =
        admin.unregister_policy(UnregisterPolicyRequest { policy_id: "policy.team.vote".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.metadata().get(ERROR_CODE_KEY).unwrap(), "REGISTRY_READ_ONLY");
    let after = policy_ids(i.list_policies(ListPoliciesRequest::default()).await.unwrap().into_inner());
    assert_eq!(after, ids, "nothing changed");

    let init = InitializeRequest { supported_protocol_versions: vec!["1.0".into()], ..Default::default() };
    let caps = i.initialize(init).await.unwrap().into_inner().capabilities.unwrap().policy_registry.unwrap();
    assert!(!caps.register_policy && caps.list_policies, "a file-loaded registry is advertised as such");
}

#[tokio::test]
async fn an_empty_directory_leaves_only_the_default_policy() {
    let dir = TempDir::new("empty");
    let srv = Server::start(&["--policies-dir", dir.path()]).await;
    let mut i = srv.client("I").await;
    let ids = policy_ids(i.list_policies(ListPoliciesRequest::default()).await.unwrap().into_inner());
    assert_eq!(ids, ["policy.default"]);
}

/// The start error for a directory, through `serve` itself.
async fn start_error(dir: &Path) -> String {
    let cfg = Config::parse_from(["macp-runtime", "--dev", "--memory-only", "--policies-dir", dir.to_str().unwrap()])
        .resolve()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = macp_transport_grpc::server::serve(cfg, listener, std::future::pending())
        .await
        .expect_err("the start must fail");
    e.to_string()
}

#[tokio::test]
async fn a_bad_file_stops_the_start_naming_the_file_and_the_reason() {
    let cases: [(&str, &[u8], &str); 5] = [
        ("broken.json", b"{\"policy_id\": ", "not valid JSON"),
        ("binary.json", &[0xff, 0xfe, 0x00], "cannot read"),
        (
            "undescribed.json",
            br#"{"policy_id":"p","mode":"*","rules":{},"schema_version":3}"#,
            "description is required",
        ),
        (
            "reserved.json",
            br#"{"policy_id":"policy.default","mode":"*","description":"d","schema_version":1}"#,
            "reserved",
        ),
        (
            "typo.json",
            br#"{"policy_id":"p","mode":"*","description":"d","schema_version":3,"rule":{}}"#,
            "unknown key 'rule'",
        ),
    ];
    for (name, text, reason) in cases {
        let dir = TempDir::new("bad");
        dir.write("good.json", UNANIMOUS);
        let bad = dir.0.join(name);
        std::fs::write(&bad, text).unwrap();
        let e = start_error(&dir.0).await;
        assert!(e.contains(bad.to_str().unwrap()) && e.contains(reason), "{name}: {e}");
    }
    let dir = TempDir::new("dup");
    let first = dir.write("a.json", UNANIMOUS);
    let second = dir.write("b.json", UNANIMOUS);
    let e = start_error(&dir.0).await;
    assert!(e.contains(second.to_str().unwrap()) && e.contains(first.to_str().unwrap()), "{e}");
    assert!(e.contains("already defined"), "{e}");
    let e = start_error(&dir.0.join("missing")).await;
    assert!(e.contains("missing") && e.contains("cannot list"), "{e}");
}

#[test]
fn the_binary_exits_non_zero_on_a_bad_file() {
    let dir = TempDir::new("exit");
    let bad = dir.write("bad.json", "[]");
    let out = Command::new(env!("CARGO_BIN_EXE_macp-runtime"))
        .args(["--dev", "--memory-only", "--bind-addr", "127.0.0.1:0"])
        .env("MACP_POLICIES_DIR", dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run macp-runtime");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(bad.to_str().unwrap()) && stderr.contains("one JSON object"), "{stderr}");
}

#[tokio::test]
async fn a_restart_with_the_same_directory_reaches_the_same_state() {
    let data = TempDir::new("data");
    let dir = TempDir::new("restart");
    dir.write("vote.json", MAJORITY);
    let start = || async {
        let args = ["macp-runtime", "--dev", "--bind-addr", "127.0.0.1:0", "--data-dir", data.path()];
        let mut args = args.to_vec();
        args.extend(["--policies-dir", dir.path()]);
        Server::start_with(Config::parse_from(args).resolve().unwrap()).await
    };
    let list = |srv: &Server| {
        let addr = srv.addr;
        async move {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let mut c = macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient::new(ch);
            let mut req = tonic::Request::new(ListPoliciesRequest::default());
            req.metadata_mut().insert("x-macp-agent-id", "I".parse().unwrap());
            c.list_policies(req).await.unwrap().into_inner()
        }
    };

    let srv = start().await;
    let first = list(&srv).await;
    // A session bound to the majority policy, left open after the votes.
    let (mut i, mut a, mut b) = (srv.client("I").await, srv.client("A").await, srv.client("B").await);
    let s = sid();
    let mut p = start_payload(&["I", "A", "B"]);
    p.policy_version = "policy.team.vote".into();
    assert!(send(&mut i, env(&s, DECISION, "SessionStart", p.encode_to_vec())).await.ok);
    assert!(send(&mut a, env(&s, DECISION, "Proposal", proposal("p1"))).await.ok);
    assert!(send(&mut a, env(&s, DECISION, "Vote", vote("p1", "APPROVE"))).await.ok);
    assert!(send(&mut b, env(&s, DECISION, "Vote", vote("p1", "REJECT"))).await.ok);
    srv.stop().await;

    // Same directory: same registry, registration times included.
    let srv = start().await;
    assert_eq!(list(&srv).await, first);
    srv.stop().await;

    // The file now demands unanimity. The registry follows the file, but
    // the open session keeps the policy it was bound to: its split vote
    // still commits.
    dir.write("vote.json", &MAJORITY.replace(r#"\"majority\""#, r#"\"unanimous\""#));
    let srv = start().await;
    let changed = list(&srv).await;
    let vote = changed.descriptors.iter().find(|d| d.policy_id == "policy.team.vote").unwrap();
    assert!(vote.rules.contains("unanimous"), "{vote:?}");
    let mut i = srv.client("I").await;
    let ack = send(&mut i, env(&s, DECISION, "Commitment", commitment())).await;
    assert!(ack.ok, "the session was bound to the majority policy: {:?}", ack.error);
    let (mut a, mut b) = (srv.client("A").await, srv.client("B").await);
    let (_, ack) = split_vote_commit(&mut i, &mut a, &mut b, "policy.team.vote").await;
    assert_eq!(code(&ack), "POLICY_DENIED", "a new session binds the changed file");
    srv.stop().await;

    // The file is removed: so is the policy.
    std::fs::remove_file(dir.0.join("vote.json")).unwrap();
    let srv = start().await;
    assert_eq!(policy_ids(list(&srv).await), ["policy.default"]);
    srv.stop().await;
}
