//! Transport security and static-token authorization: TLS with a
//! certificate generated inside the test, plaintext refused unless allowed,
//! and the grants carried by static tokens.

mod common;

use clap::Parser;
use common::*;
use macp_transport_grpc::config::{Config, ConfigError};
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

/// A TLS server with a certificate generated here, static tokens and
/// `extra` flags; a client channel that trusts it; the temp dir to remove.
async fn tls_server(extra: &[&str]) -> (Server, Channel, std::path::PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = temp_dir("tls");
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    let cfg = Config::parse_from(args).resolve().expect("TLS config with tokens needs no insecure opt-in");
    let srv = Server::start_with(cfg).await;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ck.cert.pem())).domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", srv.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    (srv, channel, dir)
}

#[tokio::test]
async fn tls_with_generated_certificate() {
    let (srv, channel, dir) = tls_server(&[]).await;
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

/// The connection deadlines see requests through TLS too: a stream opened
/// over TLS outlives both the handshake and the idle timeout, while a TCP
/// connection that never completes a TLS handshake is closed after the
/// handshake timeout.
#[tokio::test]
async fn tls_connections_are_held_to_the_handshake_deadline_but_streams_stay() {
    use tokio::io::AsyncReadExt;
    let (srv, channel, dir) = tls_server(&["--handshake-timeout-secs", "1", "--idle-timeout-secs", "1"]).await;
    let mut c = MacpRuntimeServiceClient::with_interceptor(channel, Auth::Bearer("tok-admin".into()));
    let mut watch = c.watch_sessions(WatchSessionsRequest {}).await.unwrap().into_inner();
    let mut silent = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), silent.read(&mut [0u8; 64])).await;
    assert!(closed.is_ok(), "a connection without a TLS handshake was kept");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "closed too early");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let s = sid();
    assert!(send(&mut c, start_env(&s, &["admin", "A"])).await.ok);
    let ev = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message()).await.unwrap();
    assert_eq!(ev.expect("the TLS stream was cut").unwrap().event.unwrap().session.unwrap().session_id, s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plaintext_and_missing_auth_are_refused_unless_allowed() {
    let e = Config::parse_from(["macp-runtime", "--auth-tokens-json", TOKENS]).resolve().unwrap_err();
    assert_eq!(e, ConfigError::NoTls);
    assert!(e.to_string().contains("MACP_ALLOW_INSECURE"), "the message names the setting: {e}");
    let e = Config::parse_from(["macp-runtime", "--allow-insecure"]).resolve().unwrap_err();
    assert_eq!(e, ConfigError::NoAuthentication);
    assert!(Config::parse_from(["macp-runtime", "--allow-insecure", "--auth-tokens-json", TOKENS]).resolve().is_ok());
    let dev = Config::parse_from(["macp-runtime", "--dev"]).resolve().unwrap();
    assert!(dev.allow_insecure && dev.allow_dev_sender_header);
}

async fn token_server() -> Server {
    Server::start_insecure(&["--auth-tokens-json", TOKENS]).await
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

/// Hostile-client finding (main 724c279): with two `authorization`
/// headers the first won, so `Bearer tok-coord` followed by `Bearer nope`
/// was accepted as the coordinator. A request with more than one credential
/// is now refused, whatever the order or the second value.
#[tokio::test]
async fn two_authorization_headers_are_unauthenticated() {
    let srv = token_server().await;
    for headers in [
        [("authorization", "Bearer tok-coord"), ("authorization", "Bearer nope")],
        [("authorization", "Bearer nope"), ("authorization", "Bearer tok-coord")],
        [("authorization", "Bearer tok-coord"), ("authorization", "Bearer tok-coord")],
        [("authorization", "Bearer tok-coord"), ("x-macp-token", "tok-admin")],
    ] {
        let mut c = srv.with_headers(&headers).await;
        assert_eq!(
            code(&send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await),
            "UNAUTHENTICATED",
            "{headers:?}"
        );
        let e = c.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{headers:?}");
    }
    // One credential still works.
    let mut c = srv.with_headers(&[("authorization", "Bearer tok-coord")]).await;
    assert!(send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await.ok);
}

/// A bearer credential plus an `x-macp-agent-id` naming someone else is a
/// conflict, refused with or without dev identities; naming the same
/// sender is fine.
#[tokio::test]
async fn agent_id_disagreeing_with_the_bearer_is_unauthenticated() {
    let srv = token_server().await;
    let mut c = srv.with_headers(&[("authorization", "Bearer tok-coord"), ("x-macp-agent-id", "admin")]).await;
    assert_eq!(code(&send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await), "UNAUTHENTICATED");
    let mut c = srv.with_headers(&[("authorization", "Bearer tok-coord"), ("x-macp-agent-id", "coordinator")]).await;
    assert!(send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await.ok);

    let dev = Server::start(&[]).await;
    let mut c = dev.with_headers(&[("authorization", "Bearer alice"), ("x-macp-agent-id", "bob")]).await;
    assert_eq!(code(&send(&mut c, start_env(&sid(), &["alice", "bob"])).await), "UNAUTHENTICATED");
    let mut c = dev.with_headers(&[("x-macp-agent-id", "bob"), ("x-macp-agent-id", "alice")]).await;
    assert_eq!(code(&send(&mut c, start_env(&sid(), &["alice", "bob"])).await), "UNAUTHENTICATED");
}

/// A token file may hold SHA-256 digests instead of the tokens: the server
/// authenticates the token whose digest is listed, with that entry's grants,
/// and the digest itself is no credential.
#[tokio::test]
async fn hashed_tokens_from_a_file_authenticate() {
    let hex = |t: &str| {
        ring::digest::digest(&ring::digest::SHA256, t.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let dir = temp_dir("hashed");
    let file = dir.join("tokens.json");
    let json = format!(
        r#"{{"tokens":[{{"token_sha256":"{}","sender":"worker","can_start_sessions":false}},{{"token_sha256":"{}","sender":"coordinator"}}]}}"#,
        hex("worker-secret"),
        hex("coord-secret")
    );
    std::fs::write(&file, json).unwrap();
    let srv = Server::start_insecure(&["--auth-tokens-file", file.to_str().unwrap()]).await;
    let mut c = srv.bearer("coord-secret").await;
    assert!(send(&mut c, start_env(&sid(), &["coordinator", "worker"])).await.ok);
    let mut w = srv.bearer("worker-secret").await;
    assert_eq!(code(&send(&mut w, start_env(&sid(), &["worker"])).await), "FORBIDDEN", "the entry's grants apply");
    let mut d = srv.bearer(&hex("coord-secret")).await;
    assert_eq!(code(&send(&mut d, start_env(&sid(), &["coordinator"])).await), "UNAUTHENTICATED");
    let _ = std::fs::remove_dir_all(dir);
}
