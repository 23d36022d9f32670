//! Authentication: who is calling, derived from request metadata.
//!
//! # Credentials
//! A request carries at most one bearer credential: one `authorization:
//! Bearer <credential>` header, or one `x-macp-token: <credential>` header
//! (the seed runtime's alternative). It is resolved, in order:
//! 1. as a static token ([`tokens`], DECISIONS 15), looked up by digest;
//! 2. when JWTs are configured and the credential looks like one, as a JWT
//!    ([`jwt`], keys from [`jwks`]) — a JWT-shaped credential that fails
//!    verification is refused, never taken as a dev identity;
//! 3. with dev identities enabled (`MACP_ALLOW_DEV_SENDER_HEADER`), as the
//!    name of a dev agent (what `macp-sdk-python`'s
//!    `AuthConfig.for_dev_agent` sends).
//!
//! Without a bearer credential, `x-macp-agent-id: <id>` names a dev agent
//! when dev identities are enabled. With one, `x-macp-agent-id` is a claim
//! about who the caller is and must name the sender the credential
//! authenticates: a disagreement is refused whatever the dev setting.
//!
//! Ambiguity is refused rather than resolved by header order: two
//! `authorization` headers, both `authorization` and `x-macp-token`, two of
//! either, two `x-macp-agent-id` headers, or an `authorization` header that
//! is not a non-empty `Bearer` credential are UNAUTHENTICATED.
//!
//! # What a refusal says
//! The client always gets UNAUTHENTICATED with the same generic text (no
//! hint about which tokens, keys or checks exist). The reason goes to the
//! log: `debug` for the everyday (no credential, unknown static token),
//! `warn` for what suggests an attack or a misconfiguration (an invalid
//! JWT, conflicting credentials). No log line or error message contains a
//! credential, and attacker-chosen strings are logged escaped (`?`).
//!
//! # Why `authenticate` is async
//! A JWT may name a key the cached set does not have yet; only then does
//! authentication wait, for one rate-limited, single-flight JWKS refresh
//! ([`jwks`]). Static tokens and dev identities resolve without waiting.

pub mod jwks;
pub mod jwt;
pub mod tokens;

use std::sync::LazyLock;

use macp_kernel::{Grants, Identity};
use tonic::metadata::{Ascii, MetadataKey, MetadataMap};
use tonic::Status;
use tracing::{debug, warn};

use crate::cluster::forward::{self, ClusterKey};

pub use jwt::{JwtError, JwtSettings, JwtVerifier};
pub use tokens::{parse_tokens, StaticTokens, TokenEntry, TokenFileError, TokenSecret};

/// Why a request was not authenticated (for the log; the client only sees
/// UNAUTHENTICATED).
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    /// No credential at all (or only `x-macp-agent-id` without dev mode).
    #[error("no credentials")]
    Missing,
    /// More than one credential, or more than one header of a kind.
    #[error("more than one credential ({0})")]
    Ambiguous(&'static str),
    /// An `authorization` header that is not `Bearer <credential>`, or a
    /// credential header that is not visible ASCII.
    #[error("malformed {0} header")]
    Malformed(&'static str),
    /// A bearer credential that is no static token (and no JWT or dev
    /// identity applies).
    #[error("unknown bearer token")]
    UnknownToken,
    /// The JWT was refused.
    #[error("JWT refused: {0}")]
    Jwt(#[from] JwtError),
    /// `x-macp-agent-id` names someone else than the credential.
    #[error("x-macp-agent-id {claimed:?} disagrees with the authenticated sender {sender:?}")]
    AgentIdMismatch {
        /// What the header claimed.
        claimed: String,
        /// Who the credential authenticates.
        sender: String,
    },
    /// A forwarded-identity header that does not hold (no cluster secret
    /// here, a wrong MAC, too old).
    #[error("forwarded identity refused: {0}")]
    Forwarded(&'static str),
}

impl AuthFailure {
    /// Everyday failures are logged at debug, the rest at warn.
    fn is_routine(&self) -> bool {
        matches!(self, AuthFailure::Missing | AuthFailure::UnknownToken)
    }
}

/// Resolves request metadata to an identity.
#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    tokens: StaticTokens,
    jwt: Option<JwtVerifier>,
    dev: bool,
    /// A cluster node's shared secret: identities forwarded by other nodes
    /// are accepted when their MAC holds (see [`crate::cluster::forward`]).
    cluster: Option<ClusterKey>,
}

impl Authenticator {
    /// Static tokens only; `dev` enables dev identities. Refuses a secret
    /// listed twice.
    pub fn new(entries: Vec<TokenEntry>, dev: bool) -> Result<Self, TokenFileError> {
        Ok(Authenticator { tokens: StaticTokens::new(entries)?, jwt: None, dev, cluster: None })
    }

    /// Also accepts identities other nodes of the cluster forward, made
    /// with `key`.
    pub fn with_cluster_key(mut self, key: ClusterKey) -> Self {
        self.cluster = Some(key);
        self
    }

    /// Also accepts JWTs verified by `verifier`.
    pub fn with_jwt(mut self, verifier: JwtVerifier) -> Self {
        self.jwt = Some(verifier);
        self
    }

    /// Number of configured static tokens.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The JWT verifier, when JWTs are accepted.
    pub fn jwt(&self) -> Option<&JwtVerifier> {
        self.jwt.as_ref()
    }

    /// Whether dev identities are accepted.
    pub fn dev(&self) -> bool {
        self.dev
    }

    /// The caller's identity, or UNAUTHENTICATED with a generic message
    /// (the reason is logged, see the module docs).
    pub async fn authenticate(&self, md: &MetadataMap) -> Result<Identity, Status> {
        match self.identify(md).await {
            Ok(id) => Ok(id),
            Err(reason) => {
                if reason.is_routine() {
                    debug!(%reason, "request not authenticated");
                } else {
                    warn!(%reason, "request not authenticated");
                }
                Err(crate::status::error_status(
                    macp_kernel::ErrorCode::Unauthenticated,
                    "missing or invalid credentials",
                ))
            }
        }
    }

    /// [`Self::authenticate`] with the reason for a refusal.
    pub async fn identify(&self, md: &MetadataMap) -> Result<Identity, AuthFailure> {
        // A forwarded identity is never ignored: it holds, or the request
        // is refused (a client sending the header gets no further).
        if md.contains_key(&*forward::IDENTITY_KEY) || md.contains_key(&*forward::MAC_KEY) {
            let Some(key) = &self.cluster else {
                return Err(AuthFailure::Forwarded("a forwarded identity, but this runtime has no cluster secret"));
            };
            return match key.verify(md, crate::driver::now_ms()) {
                Some(r) => r.map_err(AuthFailure::Forwarded),
                None => Err(AuthFailure::Forwarded("a forwarded-identity MAC without the identity")),
            };
        }
        let presented = Presented::from_metadata(md)?;
        let identity = match presented.bearer {
            Some(credential) => self.resolve_bearer(credential).await?,
            None => match presented.agent_id {
                Some(agent) if self.dev => return Ok(dev_identity(agent)),
                _ => return Err(AuthFailure::Missing),
            },
        };
        match presented.agent_id {
            Some(claimed) if claimed != identity.sender => {
                Err(AuthFailure::AgentIdMismatch { claimed: claimed.to_string(), sender: identity.sender })
            }
            _ => Ok(identity),
        }
    }

    async fn resolve_bearer(&self, credential: &str) -> Result<Identity, AuthFailure> {
        if let Some(id) = self.tokens.lookup(credential) {
            return Ok(id.clone());
        }
        if let Some(jwt) = &self.jwt {
            if jwt::looks_like_jwt(credential) {
                // Boxed: verification may fetch a JWKS, and that future
                // (about 5 KB) would otherwise sit in the state of every
                // request's future, JWT or not, and be moved with it.
                return Ok(Box::pin(jwt.verify(credential)).await?);
            }
        }
        if self.dev {
            return Ok(dev_identity(credential));
        }
        Err(AuthFailure::UnknownToken)
    }
}

/// The credentials a request presents, after the ambiguity checks.
struct Presented<'a> {
    bearer: Option<&'a str>,
    agent_id: Option<&'a str>,
}

impl<'a> Presented<'a> {
    fn from_metadata(md: &'a MetadataMap) -> Result<Self, AuthFailure> {
        let authorization = single(md, &AUTHORIZATION)?;
        let x_token = single(md, &X_MACP_TOKEN)?;
        let agent_id = single(md, &X_MACP_AGENT_ID)?.filter(|a| !a.is_empty());
        let bearer = match (authorization, x_token) {
            (Some(_), Some(_)) => return Err(AuthFailure::Ambiguous("authorization and x-macp-token")),
            (Some(value), None) => Some(bearer_credential(value).ok_or(AuthFailure::Malformed("authorization"))?),
            (None, Some(token)) if !token.is_empty() => Some(token),
            (None, _) => None,
        };
        Ok(Presented { bearer, agent_id })
    }
}

/// The credential headers' names, parsed once. A lookup by `&str` parses
/// and validates the name on every call, and every request looks up
/// these three (and the two forwarded-identity headers).
static AUTHORIZATION: LazyLock<MetadataKey<Ascii>> = LazyLock::new(|| MetadataKey::from_static("authorization"));
static X_MACP_TOKEN: LazyLock<MetadataKey<Ascii>> = LazyLock::new(|| MetadataKey::from_static("x-macp-token"));
static X_MACP_AGENT_ID: LazyLock<MetadataKey<Ascii>> = LazyLock::new(|| MetadataKey::from_static("x-macp-agent-id"));

/// The one value of a credential header (trimmed), refusing repeats and
/// values that are not visible ASCII.
fn single<'a>(md: &'a MetadataMap, key: &'static MetadataKey<Ascii>) -> Result<Option<&'a str>, AuthFailure> {
    let name = key.as_str();
    let mut values = md.get_all(key).iter();
    let Some(first) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(AuthFailure::Ambiguous(name));
    }
    first.to_str().map(|v| Some(v.trim())).map_err(|_| AuthFailure::Malformed(name))
}

/// `Bearer <credential>` (scheme case-insensitive, RFC 9110 §11.1).
fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

fn dev_identity(agent: &str) -> Identity {
    Identity { sender: agent.to_string(), grants: Grants::full() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(headers: &[(&'static str, &str)]) -> MetadataMap {
        let mut md = MetadataMap::new();
        for (k, v) in headers {
            md.append(*k, v.parse().unwrap());
        }
        md
    }

    async fn who(auth: &Authenticator, headers: &[(&'static str, &str)]) -> Result<String, AuthFailure> {
        auth.identify(&md(headers)).await.map(|i| i.sender)
    }

    #[tokio::test]
    async fn static_tokens_via_either_header() {
        let auth = Authenticator::new(parse_tokens(r#"[{"token":"a b~!","sender":"a"}]"#).unwrap(), false).unwrap();
        assert_eq!(who(&auth, &[("authorization", "Bearer a b~!")]).await.unwrap(), "a");
        assert_eq!(who(&auth, &[("authorization", "bearer  a b~! ")]).await.unwrap(), "a");
        assert_eq!(who(&auth, &[("x-macp-token", "a b~!")]).await.unwrap(), "a");
        assert!(matches!(who(&auth, &[("authorization", "Bearer nope")]).await, Err(AuthFailure::UnknownToken)));
        assert!(matches!(who(&auth, &[]).await, Err(AuthFailure::Missing)));
    }

    #[tokio::test]
    async fn dev_only_when_enabled() {
        let agent = [("x-macp-agent-id", "alice")];
        assert!(who(&Authenticator::new(vec![], false).unwrap(), &agent).await.is_err());
        assert_eq!(who(&Authenticator::new(vec![], true).unwrap(), &agent).await.unwrap(), "alice");
        let bob = [("authorization", "Bearer bob")];
        assert_eq!(who(&Authenticator::new(vec![], true).unwrap(), &bob).await.unwrap(), "bob");
        let tok = parse_tokens(r#"[{"token":"bob","sender":"robert","can_start_sessions":false}]"#).unwrap();
        let id = Authenticator::new(tok, true).unwrap().identify(&md(&bob)).await.unwrap();
        assert_eq!(id.sender, "robert");
        assert!(!id.grants.can_start_sessions);
    }

    #[tokio::test]
    async fn ambiguous_credentials_are_refused() {
        let tok = parse_tokens(r#"[{"token":"t-alice","sender":"alice"},{"token":"t-bob","sender":"bob"}]"#).unwrap();
        for dev in [false, true] {
            let auth = Authenticator::new(tok.clone(), dev).unwrap();
            for headers in [
                &[("authorization", "Bearer t-alice"), ("authorization", "Bearer nope")][..],
                &[("authorization", "Bearer t-alice"), ("authorization", "Bearer t-alice")],
                &[("authorization", "Bearer t-alice"), ("x-macp-token", "t-bob")],
                &[("x-macp-token", "t-alice"), ("x-macp-token", "t-alice")],
                &[("authorization", "Bearer t-alice"), ("x-macp-agent-id", "bob")],
                &[("x-macp-agent-id", "alice"), ("x-macp-agent-id", "bob")],
                &[("authorization", "Basic dC1hbGljZQ==")],
                &[("authorization", "Bearer ")],
                &[("authorization", "t-alice")],
            ] {
                assert!(who(&auth, headers).await.is_err(), "dev={dev}: {headers:?} was accepted");
            }
            // Agreeing claims are fine.
            let agree = [("authorization", "Bearer t-alice"), ("x-macp-agent-id", "alice")];
            assert_eq!(who(&auth, &agree).await.unwrap(), "alice");
        }
    }
}
