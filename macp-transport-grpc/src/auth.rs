//! Authentication: who is calling, derived from request metadata.
//!
//! Static bearer tokens (DECISIONS 15) map a secret to an identity and its
//! grants. Dev identities exist only when explicitly enabled: then
//! `x-macp-agent-id: <id>` names the caller, and so does
//! `Authorization: Bearer <id>` when `<id>` is not a configured token (what
//! `macp-sdk-python`'s `AuthConfig.for_dev_agent` sends).

use std::collections::{BTreeMap, BTreeSet};

use macp_kernel::{Grants, Identity};
use serde::Deserialize;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// One entry of the token file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// The bearer secret.
    pub token: String,
    /// The sender this token authenticates as.
    pub sender: String,
    /// Modes the sender may use; absent or empty allows every mode.
    #[serde(default)]
    pub allowed_modes: Vec<String>,
    /// May start sessions (default true).
    #[serde(default = "yes")]
    pub can_start_sessions: bool,
    /// Most live sessions this sender may have initiated.
    #[serde(default)]
    pub max_open_sessions: Option<u32>,
    /// May change the mode and policy registries.
    #[serde(default)]
    pub can_manage_mode_registry: bool,
    /// May read and subscribe to any session.
    #[serde(default)]
    pub is_observer: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TokenFile {
    List(Vec<TokenEntry>),
    Object { tokens: Vec<TokenEntry> },
}

/// Parses the token JSON: a raw list, or an object with `tokens`.
pub fn parse_tokens(json: &str) -> Result<Vec<TokenEntry>, String> {
    let parsed: TokenFile = serde_json::from_str(json).map_err(|e| {
        format!("auth tokens JSON is invalid: {e} (expected a list of token entries, or {{\"tokens\": [...]}})")
    })?;
    let entries = match parsed {
        TokenFile::List(v) => v,
        TokenFile::Object { tokens } => tokens,
    };
    let mut seen = BTreeSet::new();
    for e in &entries {
        if e.token.is_empty() || e.sender.is_empty() {
            return Err("every token entry needs a non-empty 'token' and 'sender'".into());
        }
        // A token reaches `authenticate` through a header value read with
        // `to_str()` and trimmed, so only printable ASCII without
        // surrounding spaces can ever match: anything else would be a
        // configured credential that silently never works.
        if !e.token.bytes().all(|b| (0x20..=0x7e).contains(&b)) || e.token.trim() != e.token {
            return Err(format!(
                "token for sender '{}' can never authenticate: tokens must be printable ASCII without leading or trailing spaces",
                e.sender
            ));
        }
        if !seen.insert(e.token.as_str()) {
            return Err(format!("token for sender '{}' is listed twice", e.sender));
        }
    }
    Ok(entries)
}

/// Resolves request metadata to an identity.
#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    tokens: BTreeMap<String, Identity>,
    dev: bool,
}

impl Authenticator {
    /// Builds the authenticator; `dev` enables dev identities.
    pub fn new(entries: Vec<TokenEntry>, dev: bool) -> Self {
        let tokens = entries
            .into_iter()
            .map(|e| {
                let grants = Grants {
                    can_start_sessions: e.can_start_sessions,
                    allowed_modes: if e.allowed_modes.is_empty() {
                        None
                    } else {
                        Some(e.allowed_modes.into_iter().collect())
                    },
                    max_open_sessions: e.max_open_sessions,
                    can_manage_mode_registry: e.can_manage_mode_registry,
                    is_observer: e.is_observer,
                };
                (e.token, Identity { sender: e.sender, grants })
            })
            .collect();
        Authenticator { tokens, dev }
    }

    /// Number of configured tokens.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Whether dev identities are accepted.
    pub fn dev(&self) -> bool {
        self.dev
    }

    /// The caller's identity, or UNAUTHENTICATED (generic text: no hints
    /// about which tokens exist).
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Identity, Status> {
        let bearer = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let token = bearer.or_else(|| md.get("x-macp-token").and_then(|v| v.to_str().ok()).map(str::trim));
        if let Some(t) = token {
            if let Some(id) = self.tokens.get(t) {
                return Ok(id.clone());
            }
        }
        if self.dev {
            if let Some(agent) = md.get("x-macp-agent-id").and_then(|v| v.to_str().ok()).map(str::trim) {
                if !agent.is_empty() {
                    return Ok(dev_identity(agent));
                }
            }
            if let Some(b) = bearer {
                return Ok(dev_identity(b));
            }
        }
        Err(crate::status::error_status(macp_kernel::ErrorCode::Unauthenticated, "missing or invalid credentials"))
    }
}

fn dev_identity(agent: &str) -> Identity {
    Identity { sender: agent.to_string(), grants: Grants::full() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_formats() {
        let list = r#"[{"token":"t1","sender":"a"}]"#;
        let obj = r#"{"tokens":[{"token":"t1","sender":"a","allowed_modes":["macp.mode.task.v1"],"can_start_sessions":false,"max_open_sessions":3,"can_manage_mode_registry":true,"is_observer":true}]}"#;
        assert_eq!(parse_tokens(list).unwrap()[0].sender, "a");
        let e = &parse_tokens(obj).unwrap()[0];
        assert!(!e.can_start_sessions && e.is_observer && e.can_manage_mode_registry);
        assert_eq!(e.max_open_sessions, Some(3));
        assert!(parse_tokens("{").is_err());
        assert!(parse_tokens(r#"[{"token":"","sender":"a"}]"#).is_err());
        assert!(parse_tokens(r#"[{"token":"t","sender":"a"},{"token":"t","sender":"b"}]"#).is_err());
    }

    /// Found by the `config_parse` fuzz target: a token with a character an
    /// HTTP header value cannot carry as text (here U+FFFD), or with
    /// surrounding spaces, was accepted from the token file but could never
    /// authenticate. Such a file is now refused at startup, naming the
    /// sender, and every accepted token authenticates.
    #[test]
    fn tokens_that_no_request_can_present_are_refused() {
        for bad in ["\u{fffd}t`1", "caf\u{e9}", " padded", "padded ", "tab\\t", "del\u{7f}"] {
            let json = format!(r#"[{{"token":"{bad}","sender":"a"}}]"#);
            let err = parse_tokens(&json).expect_err(&json);
            assert!(err.contains("sender 'a' can never authenticate"), "{err}");
        }
        let ok = parse_tokens(r#"[{"token":"a b~!","sender":"a"}]"#).unwrap();
        let auth = Authenticator::new(ok, false);
        let mut md = MetadataMap::new();
        md.insert("authorization", "Bearer a b~!".parse().unwrap());
        assert_eq!(auth.authenticate(&md).unwrap().sender, "a");
        let mut md = MetadataMap::new();
        md.insert("x-macp-token", "a b~!".parse().unwrap());
        assert_eq!(auth.authenticate(&md).unwrap().sender, "a");
    }

    #[test]
    fn dev_only_when_enabled() {
        let mut md = MetadataMap::new();
        md.insert("x-macp-agent-id", "alice".parse().unwrap());
        assert!(Authenticator::new(vec![], false).authenticate(&md).is_err());
        assert_eq!(Authenticator::new(vec![], true).authenticate(&md).unwrap().sender, "alice");
        let mut md = MetadataMap::new();
        md.insert("authorization", "Bearer bob".parse().unwrap());
        assert_eq!(Authenticator::new(vec![], true).authenticate(&md).unwrap().sender, "bob");
        let tok = parse_tokens(r#"[{"token":"bob","sender":"robert","can_start_sessions":false}]"#).unwrap();
        let id = Authenticator::new(tok, true).authenticate(&md).unwrap();
        assert_eq!(id.sender, "robert");
        assert!(!id.grants.can_start_sessions);
    }
}
