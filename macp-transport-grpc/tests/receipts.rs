//! Decision receipts through the server: GetDecisionReceipt and
//! GetReceiptKeys with each way of configuring keys (a JWK Set, an openssl
//! PEM key, `--dev`'s ephemeral key, none), byte-identical receipts across
//! calls and restarts, and every error code.
//!
//! Signatures are checked here with ring directly, against the keys
//! GetReceiptKeys publishes, independently of `macp_receipt::verify`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Parser;
use common::*;
use macp_transport_grpc::config::Config;
use macp_wire::v1::*;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::Code;

/// A directory removed however the test ends.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("macp-receipts-{tag}-{}-{}", std::process::id(), sid()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn registry_code(e: &tonic::Status) -> &str {
    e.metadata().get(macp_transport_grpc::status::ERROR_CODE_KEY).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// A decision session I/A/B resolved by I's Commitment; its id and the
/// Commitment's ack.
async fn resolved(i: &mut Client, a: &mut Client) -> (String, Ack) {
    let s = start_session(i).await;
    assert!(send(a, env(&s, DECISION, "Proposal", proposal("p1"))).await.ok);
    let ack = send(i, env(&s, DECISION, "Commitment", commitment())).await;
    assert!(ack.ok, "{:?}", ack.error);
    (s, ack)
}

async fn receipt(c: &mut Client, s: &str) -> Result<String, tonic::Status> {
    c.get_decision_receipt(GetDecisionReceiptRequest { session_id: s.to_string() })
        .await
        .map(|r| r.into_inner().receipt_json)
}

async fn keys(c: &mut Client) -> Value {
    serde_json::from_str(&c.get_receipt_keys(GetReceiptKeysRequest {}).await.unwrap().into_inner().jwks_json).unwrap()
}

/// Checks the receipt's JWS the way a holder would, with ring and the
/// published keys: header `{"alg":"EdDSA","kid":…}`, detached JCS body.
/// Returns the kid that signed it.
fn verify_with_ring(receipt_json: &str, jwks: &Value) -> String {
    let mut receipt: Value = serde_json::from_str(receipt_json).unwrap();
    let attestations = receipt.as_object_mut().unwrap().remove("attestations").unwrap();
    assert_eq!(attestations.as_array().unwrap().len(), 1, "{attestations}");
    assert_eq!(attestations[0]["type"], "jws");
    let jws = attestations[0]["jws"].as_str().unwrap();
    let parts: Vec<&str> = jws.split('.').collect();
    assert_eq!((parts.len(), parts[1]), (3, ""), "detached payload: {jws}");
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header.as_object().unwrap().len(), 2, "{header}");
    assert_eq!(header["alg"], "EdDSA");
    let kid = header["kid"].as_str().unwrap();
    let key = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid).expect("the signing key is published");
    assert_eq!((&key["kty"], &key["crv"]), (&json!("OKP"), &json!("Ed25519")));
    assert!(key.get("d").is_none(), "no private member is published: {key}");
    let x = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
    let body = serde_json_canonicalizer::to_vec(&receipt).unwrap();
    let signing_input = format!("{}.{}", parts[0], URL_SAFE_NO_PAD.encode(body));
    let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &x)
        .verify(signing_input.as_bytes(), &sig)
        .expect("the signature verifies");
    assert_eq!(
        macp_receipt::verify(receipt_json, &jwks.to_string()),
        Ok(macp_receipt::Verdict::Attested { kid: kid.to_string() })
    );
    kid.to_string()
}

/// Every envelope of the session, as a passive subscriber replays them.
async fn replayed_history(c: &mut Client, s: &str) -> Vec<Envelope> {
    let req = StreamSessionRequest { subscribe_session_id: s.to_string(), after_sequence: 0, envelope: None };
    let reqs = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    let mut stream = c.stream_session(reqs).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap() {
        match item.unwrap().response {
            Some(stream_session_response::Response::Envelope(e)) => out.push(e),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    out
}

async fn capability(c: &mut Client) -> DecisionReceiptCapability {
    let init = InitializeRequest { supported_protocol_versions: vec!["1.0".into()], ..Default::default() };
    c.initialize(init).await.unwrap().into_inner().capabilities.unwrap().decision_receipt.unwrap()
}

#[tokio::test]
async fn a_resolved_session_gets_a_receipt_that_verifies_against_the_published_keys() {
    let srv = Server::start(&[]).await; // --dev: an ephemeral key
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    assert_eq!(capability(&mut i).await, DecisionReceiptCapability { get_decision_receipt: true, signed: true });
    let (s, ack) = resolved(&mut i, &mut a).await;
    let r = receipt(&mut a, &s).await.unwrap();
    let jwks = keys(&mut a).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    verify_with_ring(&r, &jwks);
    let v: Value = serde_json::from_str(&r).unwrap();
    assert_eq!(v["receipt_format"], "macp-receipt/1");
    assert_eq!((v["session_id"].as_str(), v["mode"].as_str()), (Some(s.as_str()), Some(DECISION)));
    let c: CommitmentPayload = prost::Message::decode(commitment().as_slice()).unwrap();
    let hash = macp_kernel::commitment_hash::commitment_hash(&c).unwrap();
    assert_eq!(v["commitment_hash"], hash.as_str(), "the resolving Commitment's hash");
    assert_eq!(v["commitment"]["commitment_id"], "c1");
    // issued_at is the Commitment's acceptance time, to the millisecond.
    let ms = ack.accepted_at_unix_ms % 1000;
    assert!(v["issued_at"].as_str().unwrap().ends_with(&format!(".{ms:03}Z")), "{} vs {}", v["issued_at"], ms);
    // A holder who replays the history can check it is the one decided on.
    let history = replayed_history(&mut a, &s).await;
    let (digest, n) = macp_receipt::transcript::history_digest(&history);
    assert_eq!(
        v["transcript"],
        json!({"digest_alg": "macp-rs-history-sha256/1", "digest": digest, "message_count": n})
    );
    assert_eq!(n, 3);
    // Every call serves the same bytes.
    assert_eq!(receipt(&mut i, &s).await.unwrap(), r);
}

#[tokio::test]
async fn receipts_are_byte_identical_after_a_restart_and_a_jwk_set_signs_with_its_first_key() {
    let d = dir("restart");
    let key = |n: u8| macp_receipt::SigningKey::from_seed(&[n; 32], None).unwrap();
    let (new, old) = (key(1), key(2));
    let set = json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "kid": "2026-new", "x": URL_SAFE_NO_PAD.encode(new.public_key()), "d": URL_SAFE_NO_PAD.encode([1u8; 32])},
        {"kty": "OKP", "crv": "Ed25519", "kid": "2025-old", "x": URL_SAFE_NO_PAD.encode(old.public_key()), "use": "sig"},
    ]});
    let keys_file = d.0.join("receipt-keys.json");
    std::fs::write(&keys_file, set.to_string()).unwrap();
    let data = d.0.join("data");
    let args = |data: &Path| {
        let mut a = vec!["macp-runtime", "--dev", "--bind-addr", "127.0.0.1:0", "--receipt-keys-file"];
        a.push(keys_file.to_str().unwrap());
        a.extend(["--data-dir", data.to_str().unwrap()]);
        Config::parse_from(a).resolve().unwrap()
    };
    let srv = Server::start_with(args(&data)).await;
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    let (s, _) = resolved(&mut i, &mut a).await;
    let before = receipt(&mut a, &s).await.unwrap();
    let jwks = keys(&mut a).await;
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, ["2026-new", "2025-old"], "both published, the signing key first");
    assert_eq!(verify_with_ring(&before, &jwks), "2026-new");
    srv.stop().await;

    // After a restart the session is read back from storage.
    let srv = Server::start_with(args(&data)).await;
    let mut a = srv.client("A").await;
    assert_eq!(receipt(&mut a, &s).await.unwrap(), before, "byte-identical after a restart");
    assert_eq!(keys(&mut a).await, jwks);
    srv.stop().await;
}

/// The RFC 7638 thumbprint of an Ed25519 public key, computed here from
/// the RFC's text, not with the crate under test.
fn thumbprint(x: &[u8]) -> String {
    let members = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, URL_SAFE_NO_PAD.encode(x));
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, members.as_bytes()))
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl").args(args).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[tokio::test]
async fn an_openssl_generated_pem_key_signs_under_its_thumbprint() {
    let d = dir("pem");
    let pem = d.0.join("receipt-key.pem");
    let pem_arg = pem.to_str().unwrap();
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", pem_arg]);
    // The public key as openssl derives it: a SubjectPublicKeyInfo whose
    // last 32 bytes are the key.
    let spki = openssl(&["pkey", "-in", pem_arg, "-pubout", "-outform", "DER"]);
    let x = &spki[spki.len() - 32..];
    let srv = Server::start(&["--receipt-keys-file", pem_arg]).await;
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    let (s, _) = resolved(&mut i, &mut a).await;
    let jwks = keys(&mut a).await;
    assert_eq!(jwks["keys"][0]["x"], URL_SAFE_NO_PAD.encode(x).as_str());
    assert_eq!(verify_with_ring(&receipt(&mut a, &s).await.unwrap(), &jwks), thumbprint(x));
}

#[tokio::test]
async fn without_a_key_receipts_are_unsigned_and_signed_false_is_advertised() {
    let srv = Server::start_insecure(&["--allow-dev-sender-header"]).await;
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    assert_eq!(capability(&mut i).await, DecisionReceiptCapability { get_decision_receipt: true, signed: false });
    assert_eq!(i.get_receipt_keys(GetReceiptKeysRequest {}).await.unwrap().into_inner().jwks_json, r#"{"keys":[]}"#);
    let (s, _) = resolved(&mut i, &mut a).await;
    let r = receipt(&mut a, &s).await.unwrap();
    let v: Value = serde_json::from_str(&r).unwrap();
    assert_eq!(v["attestations"], json!([]));
    assert_eq!(macp_receipt::verify(&r, r#"{"keys":[]}"#), Ok(macp_receipt::Verdict::IntegrityOnly));
    assert_eq!(receipt(&mut i, &s).await.unwrap(), r);
}

#[tokio::test]
async fn receipt_errors_carry_registry_codes() {
    let srv = Server::start(&[]).await;
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    let expect = |r: Result<String, tonic::Status>, code: Code, registry: &str| {
        let e = r.unwrap_err();
        assert_eq!((e.code(), registry_code(&e)), (code, registry), "{e:?}");
    };
    expect(receipt(&mut i, &sid()).await, Code::NotFound, "SESSION_NOT_FOUND");
    expect(receipt(&mut i, "").await, Code::NotFound, "SESSION_NOT_FOUND");
    let open = start_session(&mut i).await;
    expect(receipt(&mut i, &open).await, Code::FailedPrecondition, "RECEIPT_UNAVAILABLE");
    let cancelled = start_session(&mut i).await;
    let cancel = CancelSessionRequest { session_id: cancelled.clone(), reason: "no".into() };
    i.cancel_session(cancel).await.unwrap();
    let e = receipt(&mut i, &cancelled).await.unwrap_err();
    assert_eq!(registry_code(&e), "RECEIPT_UNAVAILABLE");
    assert!(e.message().contains("cancelled"), "{}", e.message());
    let (s, _) = resolved(&mut i, &mut a).await;
    let mut outsider = srv.client("Z").await;
    expect(receipt(&mut outsider, &s).await, Code::PermissionDenied, "FORBIDDEN");
    // Both RPCs need authentication; the keys need nothing more.
    let mut anonymous = srv.anonymous().await;
    expect(receipt(&mut anonymous, &s).await, Code::Unauthenticated, "UNAUTHENTICATED");
    let e = anonymous.get_receipt_keys(GetReceiptKeysRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(outsider.get_receipt_keys(GetReceiptKeysRequest {}).await.is_ok());
}

/// The memory backend drops the oldest ended sessions past its history
/// limit (once a checkpoint covers their end); the kernel may still know
/// such a session, but its history is gone, so no receipt can be issued.
#[tokio::test]
async fn a_receipt_whose_history_is_gone_is_history_unavailable() {
    let srv = Server::start(&["--memory-history-limit", "1", "--checkpoint-every", "1"]).await;
    let (mut i, mut a) = (srv.client("I").await, srv.client("A").await);
    let (s, _) = resolved(&mut i, &mut a).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match receipt(&mut a, &s).await {
            Err(e) if registry_code(&e) == "HISTORY_UNAVAILABLE" => {
                assert_eq!(e.code(), Code::FailedPrecondition);
                break;
            }
            Err(e) if registry_code(&e) == "SESSION_NOT_FOUND" => {
                panic!("the kernel forgot the session before its history was found missing: {e:?}")
            }
            other => {
                assert!(other.is_ok(), "{other:?}");
                assert!(Instant::now() < deadline, "the history was never dropped");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_bad_key_file_stops_the_start_with_the_file_and_the_reason() {
    let d = dir("bad");
    let start = |file: PathBuf| async move {
        let cfg = Config::parse_from([
            "macp-runtime",
            "--dev",
            "--memory-only",
            "--receipt-keys-file",
            file.to_str().unwrap(),
        ])
        .resolve()
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        macp_transport_grpc::server::serve(cfg, listener, std::future::pending()).await.unwrap_err().to_string()
    };
    let bad = d.0.join("keys.json");
    std::fs::write(&bad, r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#).unwrap();
    let e = start(bad.clone()).await;
    assert!(e.contains("MACP_RECEIPT_KEYS_FILE") && e.contains(bad.to_str().unwrap()), "{e}");
    assert!(e.contains("\"x\" holds 3 bytes"), "{e}");
    let missing = d.0.join("missing.pem");
    let e = start(missing.clone()).await;
    assert!(e.contains(missing.to_str().unwrap()) && e.contains("cannot be read"), "{e}");
}
