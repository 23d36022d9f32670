//! The keys JWTs are verified with: a JSON Web Key Set given inline
//! (`MACP_AUTH_JWKS_JSON`) or fetched over HTTPS (`MACP_AUTH_JWKS_URL`).
//!
//! # Refresh
//! A fetched key set is refreshed in the background every
//! `MACP_AUTH_JWKS_TTL_SECS` (default 300), so the request path only reads
//! the cached set. The one exception is a token whose `kid` the cached set
//! does not have, which is how an identity provider's key rotation first
//! shows up: that request waits for a refresh, but
//! - single-flight: concurrent requests share one fetch (they queue on one
//!   lock and find the new keys when they get it);
//! - rate-limited: at most one such refresh per [`KID_REFRESH_INTERVAL`],
//!   so tokens with made-up `kid`s cannot turn the runtime into a load
//!   generator against the identity provider;
//! - bounded: a fetch gives up after [`FETCH_TIMEOUT`].
//!
//! While the endpoint is down (or serves something unusable) the last good
//! key set stays in use and the failure is logged at warn; the background
//! task retries every [`RETRY_INTERVAL`] (or the TTL, if shorter) until a
//! fetch succeeds.
//!
//! # The HTTPS client
//! A fetch is one `GET` every few minutes, so it uses hyper's low-level
//! HTTP/1.1 client connection over tokio-rustls (ring provider): both are
//! already compiled into the runtime for tonic, so the JWKS client adds no
//! HTTP or TLS crate. hyper-util's pooled client with hyper-rustls would add
//! a connector crate and a pool this never reuses; reqwest would add some
//! forty crates (URL parsing, IDNA tables, ...) and picks aws-lc-rs as its
//! TLS backend by default. Consequences of the choice: HTTPS only, no HTTP
//! proxy, no redirects (a JWKS URL is configured, not discovered). Trust
//! anchors are the platform's (via `rustls-native-certs`, which honours
//! `SSL_CERT_FILE`/`SSL_CERT_DIR`), or exactly the certificates of the PEM
//! file `MACP_AUTH_JWKS_CA_FILE` when that is set (a private identity
//! provider, or tests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

/// Longest a JWKS fetch (connect, TLS, request, body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two refreshes triggered by an unknown `kid`.
pub const KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Retry interval of the background refresh after a failed fetch.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Why a key set could not be loaded or refreshed.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The document is not a JWKS.
    #[error("JWKS is not a JSON object with a 'keys' list: {0}")]
    Json(#[source] serde_json::Error),
    /// Nothing in it can verify a token with the allowed algorithms.
    #[error("JWKS has no key usable with the allowed algorithms ({0})")]
    NoUsableKeys(String),
    /// `MACP_AUTH_JWKS_URL` is not an `https://` URL with a host.
    #[error("MACP_AUTH_JWKS_URL must be an https:// URL with a host name: {0}")]
    Url(String),
    /// `MACP_AUTH_JWKS_CA_FILE` cannot be read.
    #[error("cannot read MACP_AUTH_JWKS_CA_FILE {}: {reason}", path.display())]
    CaFile {
        /// The configured file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// No trust anchor to verify the endpoint's certificate with.
    #[error("no trusted CA certificates to verify the JWKS endpoint with (set MACP_AUTH_JWKS_CA_FILE, or install the system's CA certificates)")]
    NoTrustAnchors,
    /// The endpoint could not be reached or answered badly.
    #[error("fetching the JWKS failed: {0}")]
    Fetch(String),
    /// An unknown `kid` asked for a refresh too soon after the last one.
    #[error("unknown key id and the JWKS was refreshed less than {}s ago", KID_REFRESH_INTERVAL.as_secs())]
    RefreshRateLimited,
}

/// One verification key and what it may verify.
struct Key {
    decoding: DecodingKey,
    /// The algorithms this key can verify (from its type and curve, or its
    /// `alg` when the JWK names one), intersected with the allowed ones.
    algs: Vec<Algorithm>,
}

/// A parsed key set: keys by `kid`, plus keys without one.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Vec<Key>>,
    unnamed: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document, keeping the signature keys usable with
    /// `allowed` algorithms. Keys of unknown types or curves, encryption
    /// keys, and (unless an HS algorithm is allowed) symmetric keys are
    /// skipped, so one exotic key does not make a provider's set unusable.
    pub fn parse(json: &str, allowed: &[Algorithm]) -> Result<KeySet, JwksError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc = serde_json::from_str(json).map_err(JwksError::Json)?;
        let mut set = KeySet::default();
        let mut skipped = 0usize;
        for value in doc.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                skipped += 1;
                continue;
            };
            let algs: Vec<Algorithm> = key_algorithms(&jwk).into_iter().filter(|a| allowed.contains(a)).collect();
            let decoding = if algs.is_empty() { None } else { DecodingKey::from_jwk(&jwk).ok() };
            let Some(decoding) = decoding else {
                skipped += 1;
                continue;
            };
            let key = Key { decoding, algs };
            match jwk.common.key_id {
                Some(kid) => set.by_kid.entry(kid).or_default().push(key),
                None => set.unnamed.push(key),
            }
        }
        if set.is_empty() {
            return Err(JwksError::NoUsableKeys(format!("{} skipped", macp_kernel::text::Count::of(skipped, "key"))));
        }
        if skipped > 0 {
            debug!(skipped, "JWKS: skipped keys that cannot verify tokens with the allowed algorithms");
        }
        Ok(set)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.by_kid.values().map(Vec::len).sum::<usize>() + self.unnamed.len()
    }

    /// Whether the set has no usable key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether some key carries this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// The keys that may verify a token with this `kid` (exactly the keys
    /// with that id) or without one (every key), for algorithm `alg`.
    pub fn candidates<'a>(&'a self, kid: Option<&str>, alg: Algorithm) -> impl Iterator<Item = &'a DecodingKey> + 'a {
        let keys: Box<dyn Iterator<Item = &'a Key> + 'a> = match kid {
            Some(kid) => Box::new(self.by_kid.get(kid).into_iter().flatten()),
            None => Box::new(self.by_kid.values().flatten().chain(self.unnamed.iter())),
        };
        keys.filter(move |k| k.algs.contains(&alg)).map(|k| &k.decoding)
    }
}

/// The algorithms a JWK can verify: by its type and curve, narrowed to its
/// `alg` when it names one; none for encryption keys.
fn key_algorithms(jwk: &Jwk) -> Vec<Algorithm> {
    use Algorithm::*;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))) {
        return Vec::new();
    }
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![EdDSA],
        AlgorithmParameters::OctetKeyPair(_) => vec![],
        AlgorithmParameters::OctetKey(_) => vec![HS256, HS384, HS512],
    };
    match jwk.common.key_algorithm {
        None => by_type,
        Some(named) => match Algorithm::from_str(&named.to_string()) {
            Ok(a) if by_type.contains(&a) => vec![a],
            _ => vec![],
        },
    }
}

/// Where a fetched key set comes from and how it is refreshed.
#[derive(Clone, Debug)]
pub struct RemoteJwks {
    /// The `https://` URL.
    pub url: String,
    /// How long a fetched set is used before the background refresh.
    pub ttl: Duration,
    /// PEM file whose certificates are the only trust anchors (else the
    /// platform's).
    pub ca_file: Option<PathBuf>,
}

/// The key cache: the current set, and for a fetched set the refresh
/// machinery described in the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Jwks {
    shared: Arc<Shared>,
}

struct Shared {
    current: RwLock<Arc<KeySet>>,
    remote: Option<Remote>,
}

struct Remote {
    fetcher: Fetcher,
    ttl: Duration,
    allowed: Vec<Algorithm>,
    /// Held for the duration of every fetch: the single-flight lock.
    refresh: tokio::sync::Mutex<RefreshState>,
}

#[derive(Default)]
struct RefreshState {
    last_kid_refresh: Option<Instant>,
    last_success: Option<Instant>,
}

impl Jwks {
    /// A fixed key set (`MACP_AUTH_JWKS_JSON`).
    pub fn inline(json: &str, allowed: &[Algorithm]) -> Result<Jwks, JwksError> {
        let set = KeySet::parse(json, allowed)?;
        info!(keys = set.len(), "JWT keys loaded from MACP_AUTH_JWKS_JSON");
        Ok(Jwks { shared: Arc::new(Shared { current: RwLock::new(Arc::new(set)), remote: None }) })
    }

    /// A fetched key set (`MACP_AUTH_JWKS_URL`): checks the URL and the
    /// trust anchors, tries a first fetch (a failure is logged, not fatal:
    /// the identity provider being down must not keep the runtime from
    /// starting, and JWTs work as soon as a fetch succeeds), and starts the
    /// background refresh, which ends when the last clone is dropped.
    /// Must be called inside a tokio runtime.
    pub async fn remote(cfg: RemoteJwks, allowed: &[Algorithm]) -> Result<Jwks, JwksError> {
        let fetcher = Fetcher::new(&cfg.url, cfg.ca_file.as_deref())?;
        let ttl = cfg.ttl.max(Duration::from_secs(1));
        let remote = Remote {
            fetcher,
            ttl,
            allowed: allowed.to_vec(),
            refresh: tokio::sync::Mutex::new(RefreshState::default()),
        };
        let jwks = Jwks {
            shared: Arc::new(Shared { current: RwLock::new(Arc::new(KeySet::default())), remote: Some(remote) }),
        };
        let delay = if jwks.refresh().await.is_ok() { ttl } else { RETRY_INTERVAL.min(ttl) };
        tokio::spawn(refresh_loop(Arc::downgrade(&jwks.shared), delay));
        Ok(jwks)
    }

    /// The current key set (lock held only to clone an `Arc`).
    pub fn current(&self) -> Arc<KeySet> {
        match self.shared.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether keys are fetched (and so can be refreshed on an unknown kid).
    pub fn is_remote(&self) -> bool {
        self.shared.remote.is_some()
    }

    /// The refresh for a token whose `kid` the cached set lacks (or, for a
    /// token without `kid`, for an empty set): waits for any fetch in
    /// flight, and fetches only if that did not help and the rate limit
    /// allows. Returns the set to verify with.
    pub async fn refresh_for(&self, kid: Option<&str>) -> Result<Arc<KeySet>, JwksError> {
        let Some(remote) = &self.shared.remote else { return Ok(self.current()) };
        let mut state = remote.refresh.lock().await;
        let set = self.current();
        if kid.map_or(!set.is_empty(), |kid| set.has_kid(kid)) {
            return Ok(set);
        }
        if state.last_kid_refresh.is_some_and(|t| t.elapsed() < KID_REFRESH_INTERVAL) {
            return Err(JwksError::RefreshRateLimited);
        }
        state.last_kid_refresh = Some(Instant::now());
        self.fetch_and_install(remote, &mut state).await
    }

    /// A scheduled refresh (startup, TTL): single-flight with the others.
    async fn refresh(&self) -> Result<Arc<KeySet>, JwksError> {
        let Some(remote) = &self.shared.remote else { return Ok(self.current()) };
        let mut state = remote.refresh.lock().await;
        self.fetch_and_install(remote, &mut state).await
    }

    async fn fetch_and_install(&self, remote: &Remote, state: &mut RefreshState) -> Result<Arc<KeySet>, JwksError> {
        let result = match remote.fetcher.get().await {
            Ok(body) => KeySet::parse(&body, &remote.allowed),
            Err(e) => Err(e),
        };
        match result {
            Ok(set) => {
                let set = Arc::new(set);
                debug!(keys = set.len(), url = %remote.fetcher.url, "JWKS refreshed");
                match self.shared.current.write() {
                    Ok(mut g) => *g = set.clone(),
                    Err(poisoned) => *poisoned.into_inner() = set.clone(),
                }
                state.last_success = Some(Instant::now());
                Ok(set)
            }
            Err(e) => {
                let cached = self.current().len();
                let age = state.last_success.map(|t| t.elapsed().as_secs());
                warn!(
                    url = %remote.fetcher.url,
                    error = %e,
                    cached_keys = cached,
                    cached_age_secs = ?age,
                    "JWKS refresh failed; keeping the cached keys"
                );
                Err(e)
            }
        }
    }
}

async fn refresh_loop(shared: Weak<Shared>, first_delay: Duration) {
    let mut delay = first_delay;
    loop {
        tokio::time::sleep(delay).await;
        let Some(shared) = shared.upgrade() else { return };
        let jwks = Jwks { shared };
        let ttl = jwks.shared.remote.as_ref().map_or(delay, |r| r.ttl);
        delay = match jwks.refresh().await {
            Ok(_) => ttl,
            Err(_) => RETRY_INTERVAL.min(ttl),
        };
    }
}

/// An HTTPS GET of one URL, with a fixed trust store.
struct Fetcher {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl Fetcher {
    fn new(url: &str, ca_file: Option<&Path>) -> Result<Fetcher, JwksError> {
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| JwksError::Url(e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(JwksError::Url(format!("'{url}' is not https")));
        }
        let authority = uri.authority().ok_or_else(|| JwksError::Url(format!("'{url}' has no host")))?.clone();
        if authority.as_str().contains('@') {
            return Err(JwksError::Url("credentials in the URL are not supported".into()));
        }
        // `Authority::host` keeps IPv6 brackets; the socket and SNI want them off.
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| JwksError::Url(format!("'{host}' is not a valid host name")))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let roots = trust_anchors(ca_file)?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| JwksError::Fetch(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Fetcher {
            url: url.to_string(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_string(),
            host,
            path,
            server_name,
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// The body of a `200 OK` answer to `GET url`.
    async fn get(&self) -> Result<String, JwksError> {
        match tokio::time::timeout(FETCH_TIMEOUT, self.get_unbounded()).await {
            Ok(r) => r,
            Err(_) => Err(JwksError::Fetch(format!("no answer within {}s", FETCH_TIMEOUT.as_secs()))),
        }
    }

    async fn get_unbounded(&self) -> Result<String, JwksError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| JwksError::Fetch(format!("{what}: {e}"));
        let tcp =
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| fail("connect", &e))?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| fail("TLS", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| fail("HTTP", &e))?;
        let request = http::Request::get(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, concat!("macp-runtime/", env!("CARGO_PKG_VERSION")))
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail("request", &e))?;
        let exchange = async {
            let response = sender.send_request(request).await.map_err(|e| fail("HTTP", &e))?;
            if response.status() != http::StatusCode::OK {
                return Err(JwksError::Fetch(format!("HTTP status {}", response.status())));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| fail("body", &*e))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| JwksError::Fetch("body is not UTF-8".into()))
        };
        // The connection future does the I/O: drive it alongside the
        // exchange. If it ends first without error (the server closed the
        // connection after the whole answer, as asked), the answer is
        // already buffered and the exchange finishes on its own.
        tokio::pin!(conn, exchange);
        tokio::select! {
            body = &mut exchange => body,
            closed = &mut conn => match closed {
                Ok(()) => exchange.await,
                Err(e) => Err(fail("HTTP", &e)),
            },
        }
    }
}

fn trust_anchors(ca_file: Option<&Path>) -> Result<RootCertStore, JwksError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_err = |reason: String| JwksError::CaFile { path: path.to_path_buf(), reason };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))?;
            for cert in certs {
                roots.add(cert.map_err(|e| ca_err(e.to_string()))?).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                warn!(error = %e, "loading the system's CA certificates");
            }
            roots.add_parsable_certificates(found.certs);
        }
    }
    if roots.is_empty() {
        return Err(JwksError::NoTrustAnchors);
    }
    Ok(roots)
}
