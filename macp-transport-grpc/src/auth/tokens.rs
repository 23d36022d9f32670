//! Static bearer tokens: the seed runtime's token file, and how a presented
//! token is found in it.
//!
//! # Format
//! A JSON list, or `{"tokens": [...]}`, of entries:
//!
//! ```json
//! {"tokens": [
//!   {"token": "demo-coordinator-token", "sender": "coordinator",
//!    "allowed_modes": ["macp.mode.decision.v1"], "can_start_sessions": true,
//!    "max_open_sessions": 25},
//!   {"token_sha256": "<64 hex digits: SHA-256 of the token>", "sender": "worker",
//!    "can_start_sessions": false}
//! ]}
//! ```
//!
//! Each entry has exactly one of `token` (the secret itself) or
//! `token_sha256` (the lowercase or uppercase hex SHA-256 of the secret's
//! bytes, e.g. `printf %s "$TOKEN" | sha256sum`), so the file on disk need
//! not hold usable credentials. The grant fields are those of the seed:
//! `allowed_modes` (absent or empty: every mode), `can_start_sessions`
//! (default true), `max_open_sessions` (default unlimited),
//! `can_manage_mode_registry` and `is_observer` (default false).
//!
//! # Comparison
//! Tokens are indexed by their SHA-256 digest and a presented token is
//! hashed before the lookup. Nothing ever compares the presented string with
//! a configured one, so the time a refusal takes says nothing about how much
//! of a guess was right: at most it depends on the digest of the guess,
//! which an attacker cannot steer towards the digest of a real token. (The
//! map is a `HashMap`, keyed by SipHash with a per-process random key, so
//! even bucket placement is not predictable from outside.)
//!
//! # Secrecy
//! No error message or `Debug` output of this module contains a token or
//! its digest: JSON errors are reported by position and field name only,
//! never with serde's text, which quotes the offending value.

use std::collections::{BTreeSet, HashMap};

use macp_kernel::{Grants, Identity};
use serde::Deserialize;

/// A configured token secret: the token itself, or its SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSecret {
    /// The token as a client presents it.
    Plain(String),
    /// The SHA-256 of the token's bytes (`token_sha256`).
    Sha256([u8; 32]),
}

impl TokenSecret {
    /// The lookup key: the digest a presented token must hash to.
    fn digest(&self) -> [u8; 32] {
        match self {
            TokenSecret::Plain(t) => sha256(t.as_bytes()),
            TokenSecret::Sha256(d) => *d,
        }
    }
}

/// Never prints the secret, so an entry can be logged or put in a panic
/// message safely.
impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSecret::Plain(_) => f.write_str("Plain(<redacted>)"),
            TokenSecret::Sha256(_) => f.write_str("Sha256(<redacted>)"),
        }
    }
}

/// One validated entry of the token file: a secret, the sender it
/// authenticates as, and that sender's grants.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// The secret (plaintext or SHA-256).
    pub secret: TokenSecret,
    /// The sender this token authenticates as.
    pub sender: String,
    /// Modes the sender may use; empty allows every mode.
    pub allowed_modes: Vec<String>,
    /// May start sessions.
    pub can_start_sessions: bool,
    /// Most live sessions this sender may have initiated.
    pub max_open_sessions: Option<u32>,
    /// May change the mode and policy registries.
    pub can_manage_mode_registry: bool,
    /// May read and subscribe to any session.
    pub is_observer: bool,
}

impl TokenEntry {
    /// The kernel grants this entry confers.
    pub fn grants(&self) -> Grants {
        grants(
            self.allowed_modes.clone(),
            self.can_start_sessions,
            self.max_open_sessions,
            self.can_manage_mode_registry,
            self.is_observer,
        )
    }
}

/// The one mapping from the seed's scope fields to kernel grants, shared by
/// static tokens and JWT `macp_scopes` so both mean the same: an empty
/// `allowed_modes` allows every mode.
pub(crate) fn grants(
    allowed_modes: Vec<String>,
    can_start_sessions: bool,
    max_open_sessions: Option<u32>,
    can_manage_mode_registry: bool,
    is_observer: bool,
) -> Grants {
    Grants {
        can_start_sessions,
        allowed_modes: if allowed_modes.is_empty() { None } else { Some(allowed_modes.into_iter().collect()) },
        max_open_sessions,
        can_manage_mode_registry,
        is_observer,
    }
}

/// Why a token file was refused. Messages name entries by position and
/// sender, never by token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// Not JSON at all.
    #[error("auth tokens JSON is not valid JSON (line {line}, column {column}); expected a list of token entries, or {{\"tokens\": [...]}}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// JSON, but not a list of entries.
    #[error("auth tokens JSON must be a list of token entries, or an object {{\"tokens\": [...]}}")]
    Shape,
    /// An entry has a field this runtime does not know (likely a typo that
    /// would silently change a grant).
    #[error("token entry {index}: unknown field '{field}'")]
    UnknownField {
        /// 0-based position of the entry.
        index: usize,
        /// The unknown field's name.
        field: String,
    },
    /// An entry's fields have the wrong types.
    #[error("token entry {index}{}: a field has the wrong type (token, token_sha256 and sender are strings, allowed_modes a list of strings, max_open_sessions a non-negative integer, the other fields true or false)", sender_suffix(.sender))]
    FieldType {
        /// 0-based position of the entry.
        index: usize,
        /// Its sender, when that field could be read.
        sender: Option<String>,
    },
    /// Neither or both of `token` and `token_sha256`, or an empty sender.
    #[error("token entry {index}{}: needs a non-empty 'sender' and exactly one of 'token' or 'token_sha256'", sender_suffix(.sender))]
    Incomplete {
        /// 0-based position of the entry.
        index: usize,
        /// Its sender, when set.
        sender: Option<String>,
    },
    /// A plaintext token that no request can present.
    #[error("token for sender '{sender}' can never authenticate: tokens must be printable ASCII without leading or trailing spaces")]
    Unpresentable {
        /// The entry's sender.
        sender: String,
    },
    /// `token_sha256` is not 64 hex digits.
    #[error("token_sha256 for sender '{sender}' must be 64 hexadecimal digits (the SHA-256 of the token)")]
    BadDigest {
        /// The entry's sender.
        sender: String,
    },
    /// The same secret twice (possibly once as plaintext, once hashed).
    #[error("token for sender '{sender}' is listed twice")]
    Duplicate {
        /// The sender of the second occurrence.
        sender: String,
    },
}

fn sender_suffix(sender: &Option<String>) -> String {
    sender.as_ref().map(|s| format!(" (sender '{s}')")).unwrap_or_default()
}

#[derive(Deserialize)]
struct RawEntry {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    sender: String,
    #[serde(default)]
    allowed_modes: Vec<String>,
    #[serde(default = "yes")]
    can_start_sessions: bool,
    #[serde(default)]
    max_open_sessions: Option<u32>,
    #[serde(default)]
    can_manage_mode_registry: bool,
    #[serde(default)]
    is_observer: bool,
}

fn yes() -> bool {
    true
}

const FIELDS: [&str; 8] = [
    "token",
    "token_sha256",
    "sender",
    "allowed_modes",
    "can_start_sessions",
    "max_open_sessions",
    "can_manage_mode_registry",
    "is_observer",
];

/// Parses the token JSON: a raw list, or an object with `tokens`. Every
/// returned entry can authenticate, and no secret is listed twice.
pub fn parse_tokens(json: &str) -> Result<Vec<TokenEntry>, TokenFileError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| TokenFileError::Syntax { line: e.line(), column: e.column() })?;
    let list = match value {
        serde_json::Value::Array(v) => v,
        serde_json::Value::Object(mut o) if o.len() == 1 => match o.remove("tokens") {
            Some(serde_json::Value::Array(v)) => v,
            _ => return Err(TokenFileError::Shape),
        },
        _ => return Err(TokenFileError::Shape),
    };
    let mut entries = Vec::with_capacity(list.len());
    let mut seen = BTreeSet::new();
    for (index, item) in list.into_iter().enumerate() {
        let entry = entry(index, item)?;
        if !seen.insert(entry.secret.digest()) {
            return Err(TokenFileError::Duplicate { sender: entry.sender });
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn entry(index: usize, item: serde_json::Value) -> Result<TokenEntry, TokenFileError> {
    let serde_json::Value::Object(obj) = &item else { return Err(TokenFileError::Shape) };
    if let Some(field) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(TokenFileError::UnknownField { index, field: field.clone() });
    }
    let sender_hint = obj.get("sender").and_then(|s| s.as_str()).filter(|s| !s.is_empty()).map(str::to_string);
    let raw: RawEntry =
        serde_json::from_value(item).map_err(|_| TokenFileError::FieldType { index, sender: sender_hint.clone() })?;
    let secret = match (raw.token, raw.token_sha256) {
        _ if raw.sender.is_empty() => return Err(TokenFileError::Incomplete { index, sender: None }),
        (Some(t), None) if !t.is_empty() => {
            // A token reaches `authenticate` through a header value read
            // with `to_str()` and trimmed, so only printable ASCII without
            // surrounding spaces can ever match: anything else would be a
            // configured credential that silently never works.
            if !t.bytes().all(|b| (0x20..=0x7e).contains(&b)) || t.trim() != t {
                return Err(TokenFileError::Unpresentable { sender: raw.sender });
            }
            TokenSecret::Plain(t)
        }
        (None, Some(hex)) => match parse_hex32(&hex) {
            Some(d) => TokenSecret::Sha256(d),
            None => return Err(TokenFileError::BadDigest { sender: raw.sender }),
        },
        _ => return Err(TokenFileError::Incomplete { index, sender: sender_hint }),
    };
    Ok(TokenEntry {
        secret,
        sender: raw.sender,
        allowed_modes: raw.allowed_modes,
        can_start_sessions: raw.can_start_sessions,
        max_open_sessions: raw.max_open_sessions,
        can_manage_mode_registry: raw.can_manage_mode_registry,
        is_observer: raw.is_observer,
    })
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The configured static tokens, indexed by digest (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct StaticTokens {
    by_digest: HashMap<[u8; 32], Identity>,
}

impl StaticTokens {
    /// Indexes `entries`; refuses a secret listed twice (also across
    /// `MACP_AUTH_TOKENS_JSON` and `MACP_AUTH_TOKENS_FILE`), which would
    /// otherwise make one of the two senders silently unreachable.
    pub fn new(entries: Vec<TokenEntry>) -> Result<Self, TokenFileError> {
        let mut by_digest = HashMap::with_capacity(entries.len());
        for e in entries {
            let identity = Identity { sender: e.sender.clone(), grants: e.grants() };
            if by_digest.insert(e.secret.digest(), identity).is_some() {
                return Err(TokenFileError::Duplicate { sender: e.sender });
            }
        }
        Ok(StaticTokens { by_digest })
    }

    /// The identity of a presented token, if it is configured.
    pub fn lookup(&self, presented: &str) -> Option<&Identity> {
        if self.by_digest.is_empty() {
            return None;
        }
        self.by_digest.get(&sha256(presented.as_bytes()))
    }

    /// Number of configured tokens.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

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
        assert!(matches!(
            parse_tokens(r#"[{"token":"t","sendr":"a"}]"#),
            Err(TokenFileError::UnknownField { index: 0, .. })
        ));
    }

    #[test]
    fn hashed_tokens_authenticate_like_plain_ones() {
        let digest = hex(sha256(b"s3cret-worker"));
        let upper = hex(sha256(b"s3cret-loud")).to_uppercase();
        let json = format!(
            r#"[{{"token_sha256":"{digest}","sender":"worker","can_start_sessions":false}},
                {{"token_sha256":"{upper}","sender":"loud"}}]"#
        );
        let tokens = StaticTokens::new(parse_tokens(&json).unwrap()).unwrap();
        let id = tokens.lookup("s3cret-worker").unwrap();
        assert_eq!(id.sender, "worker");
        assert!(!id.grants.can_start_sessions);
        assert!(tokens.lookup(&digest).is_none(), "the digest itself is not a credential");
        assert!(tokens.lookup("s3cret-worke").is_none());
        assert_eq!(tokens.lookup("s3cret-loud").unwrap().sender, "loud", "uppercase hex works too");
    }

    #[test]
    fn the_same_secret_hashed_and_plain_is_a_duplicate() {
        let json = format!(r#"[{{"token":"t","sender":"a"}},{{"token_sha256":"{}","sender":"b"}}]"#, hex(sha256(b"t")));
        assert!(matches!(parse_tokens(&json), Err(TokenFileError::Duplicate { sender }) if sender == "b"));
        // Across two sources (JSON and file): caught when indexing.
        let a = parse_tokens(r#"[{"token":"t","sender":"a"}]"#).unwrap();
        let b = parse_tokens(r#"[{"token":"t","sender":"b"}]"#).unwrap();
        assert!(StaticTokens::new(a.into_iter().chain(b).collect()).is_err());
    }

    #[test]
    fn bad_entries_are_refused_without_quoting_secrets() {
        for (json, want) in [
            (r#"[{"token":"sekrit","token_sha256":"00","sender":"a"}]"#, "exactly one of"),
            (r#"[{"sender":"a"}]"#, "exactly one of"),
            (r#"[{"token":"sekrit"}]"#, "non-empty 'sender'"),
            (r#"[{"token_sha256":"sekrit","sender":"a"}]"#, "64 hexadecimal digits"),
            (r#"[{"token":"sekrit","sender":"a","max_open_sessions":"sekrit"}]"#, "wrong type"),
            (r#"[{"token":["sekrit"],"sender":"a"}]"#, "wrong type"),
            (r#"{"tokens":"sekrit"}"#, "must be a list"),
            (r#"["sekrit"]"#, "must be a list"),
            (r#"[{"token":"sekrit","sender":"a"}"#, "not valid JSON"),
        ] {
            let err = parse_tokens(json).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: {err}");
            assert!(!err.contains("sekrit"), "{json}: the error quotes the secret: {err}");
        }
        let e = parse_tokens(r#"[{"token":"sekrit","sender":"a"}]"#).unwrap();
        assert!(!format!("{e:?}").contains("sekrit"), "Debug prints the secret");
    }

    /// Found by the `config_parse` fuzz target: a token with a character an
    /// HTTP header value cannot carry as text (here U+FFFD), or with
    /// surrounding spaces, was accepted from the token file but could never
    /// authenticate. Such a file is now refused at startup, naming the
    /// sender.
    #[test]
    fn tokens_that_no_request_can_present_are_refused() {
        for bad in ["\u{fffd}t`1", "caf\u{e9}", " padded", "padded ", "tab\\t", "del\u{7f}"] {
            let json = format!(r#"[{{"token":"{bad}","sender":"a"}}]"#);
            let err = parse_tokens(&json).expect_err(&json).to_string();
            assert!(err.contains("sender 'a' can never authenticate"), "{err}");
        }
    }
}
