//! JWT bearer authentication through the real gRPC server: keys generated
//! here (RSA with the `rsa` crate, P-256 and Ed25519 with ring), tokens
//! signed with `jsonwebtoken`, key sets given inline or served over real
//! HTTPS (rustls, certificate from rcgen) by a hyper server that rotates
//! keys and goes down.
//!
//! Every test captures the server's log (one global subscriber for this
//! binary) so refusals can be checked for their logged reason and for never
//! logging a token.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use clap::Parser;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use macp_transport_grpc::config::Config;
use macp_wire::v1::*;
use serde_json::{json, Value};

const ISS: &str = "https://issuer.test";
const AUD: &str = "macp-runtime";
const TASK: &str = "macp.mode.task.v1";

// ---- log capture -------------------------------------------------------

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log of every server in this binary, at debug level.
fn log() -> String {
    static LOG: OnceLock<LogBuf> = OnceLock::new();
    let buf = LOG.get_or_init(|| {
        let buf = LogBuf::default();
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("macp_transport_grpc=debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    });
    String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned()
}

/// Fails if any of these tokens, or a signature part of one, was logged.
fn assert_never_logged(tokens: &[&str]) {
    let log = log();
    for t in tokens {
        assert!(!log.contains(t), "a token was logged");
        if let Some(sig) = t.rsplit('.').next().filter(|s| s.len() > 16) {
            assert!(!log.contains(sig), "a token's signature was logged");
        }
    }
}

// ---- keys and tokens ---------------------------------------------------

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

struct Key {
    alg: Algorithm,
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

fn rsa_key(kid: &str) -> Key {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    // RSA generation is slow without optimisation: one key per binary.
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    let k = KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap());
    Key {
        alg: Algorithm::RS256,
        kid: kid.into(),
        enc: EncodingKey::from_rsa_der(k.to_pkcs1_der().unwrap().as_bytes()),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                    "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be())}),
    }
}

fn ec_key(kid: &str) -> Key {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as P256};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&P256, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&P256, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref(); // 0x04 || x || y
    Key {
        alg: Algorithm::ES256,
        kid: kid.into(),
        enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
    }
}

fn ed_key(kid: &str) -> Key {
    use ring::signature::{Ed25519KeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    Key {
        alg: Algorithm::EdDSA,
        kid: kid.into(),
        enc: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key().as_ref())}),
    }
}

fn hs_key(kid: &str, secret: &[u8]) -> Key {
    Key {
        alg: Algorithm::HS256,
        kid: kid.into(),
        enc: EncodingKey::from_secret(secret),
        jwk: json!({"kty": "oct", "kid": kid, "k": b64(secret)}),
    }
}

fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Valid claims for `sub`, to be edited by the test.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISS, "aud": AUD, "iat": now(), "exp": now() + 300})
}

fn sign(key: &Key, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.enc).unwrap()
}

// ---- servers -----------------------------------------------------------

async fn jwt_server(extra: &[&str]) -> Server {
    let mut args = vec!["--auth-issuer", ISS];
    args.extend_from_slice(extra);
    Server::start_insecure(&args).await
}

/// Starts a session as the holder of `token`, naming `sender` explicitly on
/// the envelope (accepted only if the token authenticates exactly `sender`).
async fn start_as(srv: &Server, token: &str, sender: &str, mode: &str) -> Ack {
    let mut c = srv.bearer(token).await;
    let mut e = start_env(&sid(), &[sender, "other"]);
    e.sender = sender.into();
    e.mode = mode.into();
    send(&mut c, e).await
}

async fn unauthenticated(srv: &Server, token: &str) -> bool {
    let mut c = srv.bearer(token).await;
    let ack_refused = code(&send(&mut c, start_env(&sid(), &["x", "y"])).await) == "UNAUTHENTICATED";
    let status = c.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
    ack_refused && status.code() == tonic::Code::Unauthenticated
}

// ---- inline key sets -----------------------------------------------------

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_authenticate_with_their_scopes() {
    log();
    let (rs, es, ed) = (rsa_key("rs-1"), ec_key("es-1"), ed_key("ed-1"));
    let srv = jwt_server(&["--auth-jwks-json", &jwks(&[&rs, &es, &ed])]).await;

    // No macp_scopes: the reference runtime's defaults (any mode, may start).
    let t_rs = sign(&rs, &claims("agent://rs"));
    assert!(start_as(&srv, &t_rs, "agent://rs", TASK).await.ok);
    assert!(start_as(&srv, &t_rs, "agent://rs", DECISION).await.ok);
    assert_eq!(code(&start_as(&srv, &t_rs, "someone-else", DECISION).await), "UNAUTHENTICATED", "sub is the sender");

    // allowed_modes and max_open_sessions.
    let mut c = claims("agent://es");
    c["macp_scopes"] = json!({"allowed_modes": [DECISION], "max_open_sessions": 1});
    let t_es = sign(&es, &c);
    assert_eq!(code(&start_as(&srv, &t_es, "agent://es", TASK).await), "FORBIDDEN");
    assert!(start_as(&srv, &t_es, "agent://es", DECISION).await.ok);
    assert_eq!(code(&start_as(&srv, &t_es, "agent://es", DECISION).await), "RATE_LIMITED");

    // can_start_sessions false; is_observer lets it read others' sessions.
    let mut c = claims("agent://ed");
    c["macp_scopes"] = json!({"can_start_sessions": false, "is_observer": true});
    let t_ed = sign(&ed, &c);
    assert_eq!(code(&start_as(&srv, &t_ed, "agent://ed", DECISION).await), "FORBIDDEN");
    let mut owner = srv.bearer(&t_rs).await;
    let s = sid();
    assert!(send(&mut owner, start_env(&s, &["agent://rs", "b"])).await.ok);
    let mut obs = srv.bearer(&t_ed).await;
    assert!(obs.get_session(GetSessionRequest { session_id: s.clone() }).await.is_ok(), "observer reads any session");
    let mut outsider = srv.bearer(&sign(&es, &claims("agent://outsider"))).await;
    assert!(outsider.get_session(GetSessionRequest { session_id: s }).await.is_err(), "non-observer does not");

    assert_never_logged(&[&t_rs, &t_es, &t_ed]);
}

#[tokio::test]
async fn invalid_tokens_are_unauthenticated_with_the_reason_logged() {
    log();
    let good = ec_key("good");
    let other = ec_key("good"); // same kid, another key
    let rs = rsa_key("rs");
    let hs = hs_key("hs", b"a shared secret of thirty-two by");
    // The JWKS even contains an HS key: HS256 is still refused by default.
    let srv = jwt_server(&["--auth-jwks-json", &jwks(&[&good, &rs, &hs]), "--auth-leeway-secs", "30"]).await;

    let valid = sign(&good, &claims("agent://a"));
    assert!(start_as(&srv, &valid, "agent://a", DECISION).await.ok, "the baseline token is valid");
    let mut c = claims("agent://skewed");
    c["exp"] = json!(now() - 5);
    assert!(start_as(&srv, &sign(&good, &c), "agent://skewed", DECISION).await.ok, "5 s past exp is within the leeway");

    let mut cases: Vec<(&str, String)> = Vec::new();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims("agent://a");
        edit(&mut c);
        sign(&good, &c)
    };
    cases.push(("ExpiredSignature", with(&|c| c["exp"] = json!(now() - 120))));
    cases.push(("ImmatureSignature", with(&|c| c["nbf"] = json!(now() + 120))));
    cases.push(("InvalidIssuer", with(&|c| c["iss"] = json!("https://evil.test"))));
    cases.push(("InvalidAudience", with(&|c| c["aud"] = json!("another-service"))));
    cases.push(("Missing required claim: exp", with(&|c| drop(c.as_object_mut().unwrap().remove("exp")))));
    cases.push(("missing field `sub`", with(&|c| drop(c.as_object_mut().unwrap().remove("sub")))));
    cases.push(("InvalidSignature", sign(&other, &claims("agent://a"))));
    cases.push(("algorithm HS256 is not in MACP_AUTH_JWT_ALGS", sign(&hs, &claims("agent://a"))));
    cases.push(("no key with kid \"nobody\"", sign(&ec_key("nobody"), &claims("agent://a"))));
    // alg none: an unsigned token.
    let unsigned =
        format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims("agent://a").to_string().as_bytes()));
    cases.push(("malformed token header", unsigned));
    // Tampered payload: another sub under the original signature.
    let parts: Vec<&str> = valid.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], b64(claims("admin").to_string().as_bytes()), parts[2]);
    cases.push(("InvalidSignature", tampered));
    // Algorithm confusion: the RSA public key's modulus as an HMAC secret.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rs".into());
    let confused = jsonwebtoken::encode(
        &header,
        &claims("agent://a"),
        &EncodingKey::from_secret(rs.jwk["n"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    cases.push(("HS256 is not in MACP_AUTH_JWT_ALGS", confused));

    for (reason, token) in &cases {
        assert!(unauthenticated(&srv, token).await, "accepted a token that should fail with {reason}");
        let log = log();
        assert!(
            log.contains(reason),
            "the log does not give the reason {reason:?}: {}",
            &log[log.len().saturating_sub(3000)..]
        );
    }
    let tokens: Vec<&str> = cases.iter().map(|(_, t)| t.as_str()).chain([valid.as_str()]).collect();
    assert_never_logged(&tokens);
}

#[tokio::test]
async fn hs256_only_when_listed() {
    log();
    let hs = hs_key("hs", b"another shared secret, 32 bytes!");
    let es = ec_key("es");
    let srv = jwt_server(&["--auth-jwks-json", &jwks(&[&hs, &es]), "--auth-jwt-algs", "HS256"]).await;
    assert!(start_as(&srv, &sign(&hs, &claims("agent://hs")), "agent://hs", DECISION).await.ok);
    assert!(unauthenticated(&srv, &sign(&es, &claims("agent://es"))).await, "ES256 is no longer listed");
    // `none` cannot be listed at all.
    let err = Config::try_parse_from(["macp-runtime", "--auth-jwt-algs", "RS256,none"]).unwrap_err().to_string();
    assert!(err.contains("'none'"), "{err}");
}

#[tokio::test]
async fn static_tokens_and_jwts_together() {
    log();
    let es = ec_key("es");
    let tokens = r#"[{"token":"static-secret","sender":"static-agent"}]"#;
    let srv =
        jwt_server(&["--auth-jwks-json", &jwks(&[&es]), "--auth-tokens-json", tokens, "--allow-dev-sender-header"])
            .await;
    assert!(start_as(&srv, "static-secret", "static-agent", DECISION).await.ok);
    assert!(start_as(&srv, &sign(&es, &claims("agent://jwt")), "agent://jwt", DECISION).await.ok);
    // Dev identities still work for a plain name...
    assert!(start_as(&srv, "dev-bob", "dev-bob", DECISION).await.ok);
    // ...but a JWT that fails is never taken as a dev identity.
    let mut c = claims("agent://late");
    c["exp"] = json!(now() - 3600);
    assert!(unauthenticated(&srv, &sign(&es, &c)).await);
    assert_never_logged(&["static-secret"]);
}

// ---- key sets over HTTPS -------------------------------------------------

/// A JWKS endpoint: HTTPS with a fresh rcgen certificate for `localhost`,
/// served by hyper. Its document can be replaced, its requests are counted,
/// and it can be stopped (the listener closes: connections are refused).
struct JwksEndpoint {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    ca_file: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl JwksEndpoint {
    async fn start(body: String) -> JwksEndpoint {
        use tokio_rustls::rustls;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!("macp-jwks-{}-{}", std::process::id(), sid()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ck.cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, b, h) = (acceptor.clone(), b.clone(), h.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (b, h) = (b.clone(), h.clone());
                        async move {
                            assert_eq!(req.uri().path(), "/.well-known/jwks.json");
                            h.fetch_add(1, Ordering::SeqCst);
                            let doc = b.lock().unwrap().clone();
                            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                                hyper::body::Bytes::from(doc),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        JwksEndpoint { addr, body, hits, ca_file, task }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/.well-known/jwks.json", self.addr.port())
    }

    fn serve(&self, doc: String) {
        *self.body.lock().unwrap() = doc;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting; the port refuses connections from now on.
    async fn stop(&self) {
        self.task.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn url_server(ep: &JwksEndpoint, ttl_secs: &str) -> Server {
    jwt_server(&[
        "--auth-jwks-url",
        &ep.url(),
        "--auth-jwks-ca-file",
        ep.ca_file.to_str().unwrap(),
        "--auth-jwks-ttl-secs",
        ttl_secs,
    ])
    .await
}

/// Waits until the server has fetched the key set `n` times.
async fn wait_hits(ep: &JwksEndpoint, n: usize) {
    for _ in 0..250 {
        if ep.hits() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the JWKS was fetched {} times, expected {n}", ep.hits());
}

#[tokio::test]
async fn rotated_keys_are_picked_up_on_an_unknown_kid_without_restart() {
    log();
    let (k1, k2) = (ec_key("k1"), ed_key("k2"));
    let ep = JwksEndpoint::start(jwks(&[&k1])).await;
    let srv = url_server(&ep, "3600").await;
    wait_hits(&ep, 1).await;
    assert!(start_as(&srv, &sign(&k1, &claims("agent://one")), "agent://one", DECISION).await.ok);
    assert_eq!(ep.hits(), 1, "served from the cache");

    // The provider rotates: k1 is retired, k2 appears. Many callers with
    // the new kid at once share one refresh.
    ep.serve(jwks(&[&k2]));
    let t2 = sign(&k2, &claims("agent://two"));
    let calls = (0..16).map(|_| {
        let (srv_addr, t2) = (srv.addr, t2.clone());
        tokio::spawn(async move {
            let ch =
                tonic::transport::Channel::from_shared(format!("http://{srv_addr}")).unwrap().connect().await.unwrap();
            let mut c =
                macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient::with_interceptor(
                    ch,
                    Auth::Bearer(t2),
                );
            send(&mut c, start_env(&sid(), &["agent://two", "x"])).await.ok
        })
    });
    for call in calls.collect::<Vec<_>>() {
        assert!(call.await.unwrap(), "a token with the new kid was refused");
    }
    assert_eq!(ep.hits(), 2, "one refresh for all callers");

    // The retired key no longer verifies, and made-up kids do not make the
    // runtime hammer the endpoint (refreshes on unknown kids are rate-limited).
    assert!(unauthenticated(&srv, &sign(&k1, &claims("agent://one"))).await);
    for i in 0..5 {
        assert!(unauthenticated(&srv, &sign(&ec_key(&format!("bogus-{i}")), &claims("agent://x"))).await);
    }
    assert_eq!(ep.hits(), 2, "unknown kids within the rate limit caused fetches");
    assert!(log().contains("rate-limited") || log().contains("refreshed less than"), "the rate limit is not logged");
}

#[tokio::test]
async fn cached_keys_are_kept_while_the_endpoint_is_down() {
    log();
    let k1 = ec_key("k1");
    let ep = JwksEndpoint::start(jwks(&[&k1])).await;
    let srv = url_server(&ep, "1").await;
    wait_hits(&ep, 1).await;
    let t1 = sign(&k1, &claims("agent://one"));
    assert!(start_as(&srv, &t1, "agent://one", DECISION).await.ok);
    wait_hits(&ep, 2).await; // the 1 s TTL refresh works while the endpoint is up
    ep.stop().await;
    // Past another TTL: the background refresh has failed at least once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(log().contains("JWKS refresh failed; keeping the cached keys"));
    assert!(start_as(&srv, &t1, "agent://one", DECISION).await.ok, "cached keys were dropped");
    // A key the cache never had cannot be fetched now: refused, and the
    // cached key still works afterwards.
    assert!(unauthenticated(&srv, &sign(&ec_key("k9"), &claims("agent://nine"))).await);
    assert!(start_as(&srv, &t1, "agent://one", DECISION).await.ok);
}

#[tokio::test]
async fn an_endpoint_with_an_untrusted_certificate_is_not_used() {
    log();
    let k1 = ec_key("k1");
    let ep = JwksEndpoint::start(jwks(&[&k1])).await;
    let stranger = JwksEndpoint::start(jwks(&[&k1])).await; // another self-signed CA
    let srv =
        jwt_server(&["--auth-jwks-url", &ep.url(), "--auth-jwks-ca-file", stranger.ca_file.to_str().unwrap()]).await;
    assert!(unauthenticated(&srv, &sign(&k1, &claims("agent://one"))).await);
    assert_eq!(ep.hits(), 0, "the TLS handshake should have failed before any request");
    assert!(log().contains("JWKS refresh failed"));
}

#[tokio::test]
async fn a_plain_http_jwks_url_is_refused_at_startup() {
    let cfg = Config::parse_from([
        "macp-runtime",
        "--memory-only",
        "--allow-insecure",
        "--auth-issuer",
        ISS,
        "--auth-jwks-url",
        "http://localhost:1/jwks",
    ])
    .resolve()
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = macp_transport_grpc::server::serve(cfg, listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
}
