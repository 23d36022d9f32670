//! JWT bearer tokens, compatible with the reference runtime's variables and
//! claims.
//!
//! Enabled by `MACP_AUTH_ISSUER` with a key source (`MACP_AUTH_JWKS_JSON`
//! or `MACP_AUTH_JWKS_URL`, see [`super::jwks`]). A token is accepted when
//! - its header's `alg` is in `MACP_AUTH_JWT_ALGS` (default `RS256,ES256,EdDSA`;
//!   the HS algorithms only when listed, since a shared secret in a JWKS
//!   would otherwise become a signing key; `none` can never be listed);
//! - a key of the set verifies its signature: the key with the token's
//!   `kid`, or, for a token without `kid`, any key usable with its `alg`;
//! - `iss` equals `MACP_AUTH_ISSUER`, `aud` is or contains
//!   `MACP_AUTH_AUDIENCE` (default `macp-runtime`), `exp` is in the future
//!   and `nbf` (when present) in the past, both within
//!   `MACP_AUTH_LEEWAY_SECS` (default 30) of clock skew; `sub`, `iss`, `aud`
//!   and `exp` must be present.
//!
//! `sub` is the sender. The optional `macp_scopes` claim carries the static
//! token fields `allowed_modes`, `can_start_sessions`, `max_open_sessions`,
//! `can_manage_mode_registry`, `is_observer`, with the same defaults (as in
//! the reference runtime: every mode, may start sessions, unlimited, no
//! registry rights, not an observer) and the same mapping to grants (an
//! empty `allowed_modes` list allows every mode, as in a token file).
//!
//! Verification uses the `jsonwebtoken` crate; nothing here parses or
//! checks JOSE structures by hand.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use macp_kernel::Identity;
use serde::Deserialize;

use super::jwks::{Jwks, JwksError};

/// The algorithms accepted when `MACP_AUTH_JWT_ALGS` is not set.
pub const DEFAULT_ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// A bad `MACP_AUTH_JWT_ALGS` entry.
#[derive(Debug, thiserror::Error)]
pub enum AlgorithmError {
    /// `none` (unsigned tokens) is never accepted.
    #[error("the JWT algorithm 'none' (unsigned tokens) can never be allowed")]
    None,
    /// Not a JWS signature algorithm this runtime verifies.
    #[error("unknown JWT algorithm '{0}' (expected RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384 or HS512)")]
    Unknown(String),
}

/// Parses one algorithm name (case-insensitive), for the
/// `MACP_AUTH_JWT_ALGS` list.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, AlgorithmError> {
    use Algorithm::*;
    let name = name.trim();
    let all = [HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA];
    if name.eq_ignore_ascii_case("none") {
        return Err(AlgorithmError::None);
    }
    all.into_iter()
        .find(|a| format!("{a:?}").eq_ignore_ascii_case(name))
        .ok_or_else(|| AlgorithmError::Unknown(name.into()))
}

/// What a token must satisfy besides its signature.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Accepted header `alg`s.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
}

/// Why a JWT was refused. Logged, never sent to the client; no variant
/// carries the token.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The header is not a JOSE header this runtime knows (this includes
    /// `alg: none`, which is not an algorithm it knows).
    #[error("malformed token header: {0}")]
    Header(#[source] jsonwebtoken::errors::Error),
    /// `alg` is known but not allowed.
    #[error("algorithm {0:?} is not in MACP_AUTH_JWT_ALGS")]
    AlgorithmNotAllowed(Algorithm),
    /// No key has the token's `kid`, even after a refresh (or the refresh
    /// was not possible).
    #[error("no key with kid {kid:?}{}", .refresh.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    UnknownKid {
        /// The token's `kid` (attacker-controlled: printed escaped).
        kid: String,
        /// Why the refresh did not help, if one was attempted and failed.
        refresh: Option<JwksError>,
    },
    /// No key in the set can verify this algorithm.
    #[error("no key can verify {0:?} tokens")]
    NoKey(Algorithm),
    /// The signature or a claim check failed (expired, not yet valid,
    /// wrong issuer or audience, missing claim, bad signature...).
    #[error("{0}")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    /// `sub` is empty.
    #[error("empty 'sub' claim")]
    EmptySubject,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    macp_scopes: Option<Scopes>,
}

/// The `macp_scopes` claim; absent fields take the reference runtime's
/// defaults.
#[derive(Deserialize, Default)]
struct Scopes {
    #[serde(default)]
    allowed_modes: Option<Vec<String>>,
    #[serde(default)]
    can_start_sessions: Option<bool>,
    #[serde(default)]
    max_open_sessions: Option<u32>,
    #[serde(default)]
    can_manage_mode_registry: Option<bool>,
    #[serde(default)]
    is_observer: Option<bool>,
}

/// Verifies JWTs against the settings and a key cache.
#[derive(Clone)]
pub struct JwtVerifier {
    settings: JwtSettings,
    validations: Vec<(Algorithm, Validation)>,
    jwks: Jwks,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `settings` using the keys of `jwks`.
    pub fn new(settings: JwtSettings, jwks: Jwks) -> Self {
        let validations = settings
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.algorithms = vec![alg];
                v.leeway = settings.leeway.as_secs();
                v.validate_exp = true;
                v.validate_nbf = true;
                v.validate_aud = true;
                v.set_issuer(&[&settings.issuer]);
                v.set_audience(&[&settings.audience]);
                v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                (alg, v)
            })
            .collect();
        JwtVerifier { settings, validations, jwks }
    }

    /// The settings in force.
    pub fn settings(&self) -> &JwtSettings {
        &self.settings
    }

    /// The identity a token proves, or why it proves nothing. Waits for the
    /// network only when the token names a `kid` the cached key set lacks
    /// (see [`super::jwks`]).
    pub async fn verify(&self, token: &str) -> Result<Identity, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(JwtError::Header)?;
        let alg = header.alg;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == alg) else {
            return Err(JwtError::AlgorithmNotAllowed(alg));
        };
        let mut keys = self.jwks.current();
        let kid = header.kid.as_deref();
        let missing = match kid {
            Some(kid) => !keys.has_kid(kid),
            None => keys.is_empty(),
        };
        if missing && self.jwks.is_remote() {
            match self.jwks.refresh_for(kid).await {
                Ok(k) => keys = k,
                Err(e) => {
                    return Err(match kid {
                        Some(kid) => JwtError::UnknownKid { kid: kid.into(), refresh: Some(e) },
                        None => JwtError::NoKey(alg),
                    })
                }
            }
        }
        if let Some(kid) = kid {
            if !keys.has_kid(kid) {
                return Err(JwtError::UnknownKid { kid: kid.into(), refresh: None });
            }
        }
        let mut last = None;
        for key in keys.candidates(kid, alg) {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => return identity(data.claims),
                // Only a signature failure can depend on the key: try the
                // next one. Claim failures are the same under every key.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => last = Some(e),
                Err(e) => return Err(JwtError::Invalid(e)),
            }
        }
        Err(last.map_or(JwtError::NoKey(alg), JwtError::Invalid))
    }
}

fn identity(claims: Claims) -> Result<Identity, JwtError> {
    if claims.sub.is_empty() {
        return Err(JwtError::EmptySubject);
    }
    let s = claims.macp_scopes.unwrap_or_default();
    let grants = super::tokens::grants(
        s.allowed_modes.unwrap_or_default(),
        s.can_start_sessions.unwrap_or(true),
        s.max_open_sessions,
        s.can_manage_mode_registry.unwrap_or(false),
        s.is_observer.unwrap_or(false),
    );
    Ok(Identity { sender: claims.sub, grants })
}

/// Whether a bearer credential has the shape of a compact JWS
/// (`header.payload.signature`, the header a base64url JSON object): such a
/// credential that matches no static token is verified as a JWT, never
/// taken as a dev identity.
pub fn looks_like_jwt(token: &str) -> bool {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .is_ok_and(|h| h.trim_ascii_start().first() == Some(&b'{'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names() {
        assert_eq!(parse_algorithm("rs256").unwrap(), Algorithm::RS256);
        assert_eq!(parse_algorithm(" EdDSA ").unwrap(), Algorithm::EdDSA);
        assert_eq!(parse_algorithm("HS256").unwrap(), Algorithm::HS256);
        assert!(matches!(parse_algorithm("none"), Err(AlgorithmError::None)));
        assert!(matches!(parse_algorithm("NONE"), Err(AlgorithmError::None)));
        assert!(matches!(parse_algorithm("ES512"), Err(AlgorithmError::Unknown(_))));
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJhbGciOiJub25lIn0.e30."));
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.e30.c2ln"));
        assert!(!looks_like_jwt("svc.team.prod"), "a dotted dev id is not a JWT");
        assert!(!looks_like_jwt("demo-coordinator-token"));
        assert!(!looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.e30.c2ln.more"));
    }
}
