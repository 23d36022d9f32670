//! Transport security and static-token authorization: TLS with a
//! certificate generated inside the test, plaintext refused unless allowed,
//! and the grants carried by static tokens.

mod common;

use clap::Parser;
use common::*;
use macp_transport_grpc::config::Config;
use macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient;
use macp_wire::v1::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const TOKENS: &str = r#"{"tokens":[
  {"token":"tok-coord","sender":"coordinator","allowed_modes":["macp.mode.decision.v1"],"can_start_sessions":true,"max_open_sessions":1},
  {"token":"tok-worker","sender":"worker","can_start_sessions":false},
  {"token":"tok-admin","sender":"admin","can_manage_mode_registry":true}
]}"#;

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("macp-{tag}-{}-{}", std::process::id(), sid()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn tls_with_generated_certificate() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = temp_dir("tls");
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    let cfg = Config::parse_from([
        "macp-runtime",
        "--memory-only",
        "--bind-addr",
        "127.0.0.1:0",
        "--tls-cert-path",
        cert_path.to_str().unwrap(),
        "--tls-key-path",
        key_path.to_str().unwrap(),
        "--auth-tokens-json",
        TOKENS,
    ])
    .resolve()
    .expect("TLS config with tokens needs no insecure opt-in");
    let srv = Server::start_with(cfg).await;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ck.cert.pem())).domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", srv.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = MacpRuntimeServiceClient::with_interceptor(channel, Auth::Bearer("tok-admin".into()));
    let r =
        c.initialize(InitializeRequest { supported_protocol_versions: vec!["1.0".into()], ..Default::default() }).await;
    assert_eq!(r.unwrap().into_inner().selected_protocol_version, "1.0");
    let s = sid();
    let ack = send(&mut c, start_env(&s, &["admin", "A"])).await;
    assert!(ack.ok, "{:?}", ack.error);
    // A plaintext client cannot talk to the TLS listener.
    let plain = Channel::from_shared(format!("http://{}", srv.addr)).unwrap().connect().await;
    if let Ok(ch) = plain {
        let mut pc = MacpRuntimeServiceClient::new(ch);
        assert!(pc.list_modes(ListModesRequest {}).await.is_err());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plaintext_and_missing_auth_are_refused_unless_allowed() {
    let e = Config::parse_from(["macp-runtime", "--auth-tokens-json", TOKENS]).resolve().unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    let e = Config::parse_from(["macp-runtime", "--allow-insecure"]).resolve().unwrap_err();
    assert!(e.contains("authentication"), "{e}");
    assert!(Config::parse_from(["macp-runtime", "--allow-insecure", "--auth-tokens-json", TOKENS]).resolve().is_ok());
    let dev = Config::parse_from(["macp-runtime", "--dev"]).resolve().unwrap();
    assert!(dev.allow_insecure && dev.allow_dev_sender_header);
}

async fn token_server() -> Server {
    let cfg = Config::parse_from([
        "macp-runtime",
        "--memory-only",
        "--allow-insecure",
        "--bind-addr",
        "127.0.0.1:0",
        "--auth-tokens-json",
        TOKENS,
    ])
    .resolve()
    .unwrap();
    Server::start_with(cfg).await
}

#[tokio::test]
async fn can_start_sessions_false_is_forbidden() {
    let srv = token_server().await;
    let mut w = srv.bearer("tok-worker").await;
    let ack = send(&mut w, start_env(&sid(), &["worker"])).await;
    assert_eq!(code(&ack), "FORBIDDEN");
}

#[tokio::test]
async fn allowed_modes_are_enforced() {
    let srv = token_server().await;
    let mut c = srv.bearer("tok-coord").await;
    let mut e = start_env(&sid(), &["coordinator", "worker"]);
    e.mode = "macp.mode.task.v1".into();
    assert_eq!(code(&send(&mut c, e).await), "FORBIDDEN");
    assert!(send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await.ok);
}

#[tokio::test]
async fn max_open_sessions_is_enforced() {
    let srv = token_server().await;
    let mut c = srv.bearer("tok-coord").await;
    let first = sid();
    assert!(send(&mut c, start_env(&first, &["coordinator", "worker"])).await.ok);
    assert_eq!(code(&send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await), "RATE_LIMITED");
    c.cancel_session(CancelSessionRequest { session_id: first, reason: "done".into() }).await.unwrap();
    assert!(send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await.ok);
}

#[tokio::test]
async fn unknown_bearer_is_unauthenticated_without_dev_mode() {
    let srv = token_server().await;
    let mut c = srv.bearer("not-a-token").await;
    assert_eq!(code(&send(&mut c, start_env(&sid(), &["x"])).await), "UNAUTHENTICATED");
    let mut h = srv.client("dev-agent").await;
    assert_eq!(
        code(&send(&mut h, start_env(&sid(), &["x"])).await),
        "UNAUTHENTICATED",
        "x-macp-agent-id needs the dev opt-in"
    );
}

#[tokio::test]
async fn spoofed_sender_is_unauthenticated() {
    let srv = token_server().await;
    let mut c = srv.bearer("tok-coord").await;
    let mut e = start_env(&sid(), &["coordinator"]);
    e.sender = "admin".into();
    assert_eq!(code(&send(&mut c, e).await), "UNAUTHENTICATED");
}
