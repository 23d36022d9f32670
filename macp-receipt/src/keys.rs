//! Receipt keys: the Ed25519 key that signs receipts, and the public keys
//! GetReceiptKeys publishes so holders can check receipts signed earlier.
//!
//! An operator gives them in one file (`MACP_RECEIPT_KEYS_FILE`), in either
//! of two formats:
//!
//! * a **JWK Set** (RFC 7517): `{"keys": [...]}` of Ed25519 keys
//!   (`"kty": "OKP", "crv": "Ed25519"`, `x`, optionally `kid`, `alg`
//!   `EdDSA`, `use` `sig`). The first key signs and must carry its private
//!   part `d`; the others are published only (they may carry `d` or not),
//!   which is how a key is rotated: put the new key first and keep the old
//!   one behind it until the receipts it signed no longer matter.
//! * a **PEM** file of one or more PKCS#8 `PRIVATE KEY` blocks, as
//!   `openssl genpkey -algorithm ed25519` writes them; the first signs.
//!
//! A key without a `kid` (every PEM key) is named by its RFC 7638 JWK
//! thumbprint, so the name is the same on every start and on every machine.
//! Kids must be unique: a verifier drops a `kid` that appears twice
//! (`macp-sdk-python`'s `trusted_keys_from_jwks`), which would silently stop
//! receipts from verifying.
//!
//! A file that is not exactly right is refused with the reason
//! ([`KeyFileError`]), so a typo stops the start instead of quietly turning
//! receipts unsigned. Key material never appears in messages or `Debug`
//! output.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{json, Map, Value};

use crate::b64url;

/// A receipt key file that cannot be used, with the file and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct KeyFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// The Ed25519 key that signs receipts, under its key id.
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A key from its 32-byte private seed (a JWK's `d`), named `kid`, or by
    /// its thumbprint when `kid` is `None`. The simulator and tests derive
    /// keys this way so runs are reproducible.
    pub fn from_seed(seed: &[u8], kid: Option<String>) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| format!("not a 32-byte Ed25519 private key ({e})"))?;
        Ok(Self::named(pair, kid))
    }

    /// A fresh random key (`--dev`): receipts it signs verify only while
    /// this process runs, since nothing keeps it.
    pub fn generate() -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "no randomness for a key".to_string())?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| format!("generated key rejected: {e}"))?;
        Ok(Self::named(pair, None))
    }

    fn named(pair: Ed25519KeyPair, kid: Option<String>) -> Self {
        let kid = kid.unwrap_or_else(|| thumbprint(pair.public_key().as_ref()));
        SigningKey { kid, pair }
    }

    /// The key id the JWS header names.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The 32-byte public key (a JWK's `x`).
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Pure Ed25519 over `msg`: 64 bytes, and the same bytes every time.
    pub(crate) fn sign(&self, msg: &[u8]) -> ring::signature::Signature {
        self.pair.sign(msg)
    }
}

/// A published verification key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PublicKey {
    kid: String,
    x: Vec<u8>,
}

/// What a runtime signs receipts with and publishes: an optional signing
/// key, and every key GetReceiptKeys lists (the signing key first).
#[derive(Debug, Default)]
pub struct ReceiptKeys {
    signer: Option<SigningKey>,
    published: Vec<PublicKey>,
    ephemeral: bool,
}

impl ReceiptKeys {
    /// No key: receipts carry no attestation (a verifier reports
    /// `integrity_only`) and the published set is empty.
    pub fn unsigned() -> Self {
        Self::default()
    }

    /// Signs with `key` and publishes it alone.
    pub fn signed_by(key: SigningKey) -> Self {
        let published = vec![PublicKey { kid: key.kid.clone(), x: key.public_key().to_vec() }];
        ReceiptKeys { signer: Some(key), published, ephemeral: false }
    }

    /// A fresh random key for development (`--dev` without a key file).
    pub fn ephemeral() -> Result<Self, String> {
        let mut keys = Self::signed_by(SigningKey::generate()?);
        keys.ephemeral = true;
        Ok(keys)
    }

    /// Reads a key file (JWK Set or PEM; see the module docs).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let err = |reason: String| KeyFileError { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot be read: {e}")))?;
        Self::parse(&text).map_err(err)
    }

    /// Parses the contents of a key file; the error is the reason.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim_start();
        if t.starts_with('{') {
            parse_jwks(t)
        } else if t.contains("-----BEGIN ") {
            parse_pem(t)
        } else {
            Err("neither a JWK Set (JSON) nor a PEM file of PKCS#8 private keys".into())
        }
    }

    /// The key receipts are signed with, if any.
    pub fn signer(&self) -> Option<&SigningKey> {
        self.signer.as_ref()
    }

    /// Whether receipts are signed (Initialize advertises it as
    /// `decision_receipt.signed`).
    pub fn is_signed(&self) -> bool {
        self.signer.is_some()
    }

    /// Whether the signing key was generated at start and dies with the
    /// process.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// How many keys GetReceiptKeys lists.
    pub fn published_count(&self) -> usize {
        self.published.len()
    }

    /// GetReceiptKeys' answer: a JWK Set of the public keys, signing key
    /// first, in JCS form (so it is the same text on every call). Each key
    /// is `{"alg":"EdDSA","crv":"Ed25519","kid":…,"kty":"OKP","use":"sig","x":…}`
    /// and never carries a private member. `{"keys":[]}` when unsigned.
    pub fn jwks_json(&self) -> String {
        let keys: Vec<Value> = self
            .published
            .iter()
            .map(|k| json!({"kty": "OKP", "crv": "Ed25519", "kid": k.kid, "x": b64url(&k.x), "alg": "EdDSA", "use": "sig"}))
            .collect();
        // Strings and arrays only: JCS cannot fail; plain JSON is the fallback.
        let set = json!({ "keys": keys });
        crate::jcs(&set).unwrap_or_else(|_| set.to_string())
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key: base64url SHA-256 of
/// `{"crv":"Ed25519","kty":"OKP","x":"<x>"}` (required members, sorted, no
/// whitespace; `x`'s alphabet needs no escaping).
pub fn thumbprint(public_key: &[u8]) -> String {
    let members = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64url(public_key));
    b64url(ring::digest::digest(&ring::digest::SHA256, members.as_bytes()).as_ref())
}

/// A JWK member that must be a string, if present.
fn opt_str<'a>(k: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match k.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("\"{name}\" is not a string")),
    }
}

/// A 32-byte value in unpadded base64url (`x`, `d`).
fn key_bytes(name: &str, text: &str) -> Result<Vec<u8>, String> {
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|e| format!("\"{name}\" is not unpadded base64url ({e})"))?;
    if bytes.len() != 32 {
        return Err(format!("\"{name}\" holds {} bytes; an Ed25519 key has 32", bytes.len()));
    }
    Ok(bytes)
}

fn parse_jwks(text: &str) -> Result<ReceiptKeys, String> {
    let set: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let keys = set.get("keys").and_then(Value::as_array).ok_or("not a JWK Set: no \"keys\" list")?;
    if keys.is_empty() {
        return Err("the JWK Set has no keys (leave MACP_RECEIPT_KEYS_FILE unset for unsigned receipts)".into());
    }
    let mut out = ReceiptKeys::default();
    let mut kids = BTreeSet::new();
    for (i, key) in keys.iter().enumerate() {
        let at = |reason: String| format!("key {} of {}: {reason}", i + 1, keys.len());
        let k = key.as_object().ok_or_else(|| at("not a JSON object".into()))?;
        let (kty, crv) = (opt_str(k, "kty").map_err(at)?, opt_str(k, "crv").map_err(at)?);
        if (kty, crv) != (Some("OKP"), Some("Ed25519")) {
            return Err(at(format!(
                "only Ed25519 keys (\"kty\": \"OKP\", \"crv\": \"Ed25519\") sign receipts; this one has kty {} and crv {}",
                kty.unwrap_or("(none)"),
                crv.unwrap_or("(none)")
            )));
        }
        if !matches!(opt_str(k, "alg").map_err(at)?, None | Some("EdDSA")) {
            return Err(at("\"alg\" must be \"EdDSA\" or absent".into()));
        }
        if !matches!(opt_str(k, "use").map_err(at)?, None | Some("sig")) {
            return Err(at("\"use\" must be \"sig\" or absent".into()));
        }
        let x = key_bytes("x", opt_str(k, "x").map_err(at)?.ok_or_else(|| at("no public key \"x\"".into()))?)
            .map_err(at)?;
        let kid = match opt_str(k, "kid").map_err(at)? {
            Some("") => return Err(at("\"kid\" is empty".into())),
            Some(kid) => kid.to_string(),
            None => thumbprint(&x),
        };
        if !kids.insert(kid.clone()) {
            return Err(at(format!("kid \"{kid}\" appears twice; verifiers ignore an ambiguous kid")));
        }
        let pair = match opt_str(k, "d").map_err(at)? {
            Some(d) => Some(
                Ed25519KeyPair::from_seed_and_public_key(&key_bytes("d", d).map_err(at)?, &x)
                    .map_err(|_| at("\"d\" and \"x\" are not one key pair".into()))?,
            ),
            None => None,
        };
        match (i, pair) {
            (0, Some(pair)) => out.signer = Some(SigningKey { kid: kid.clone(), pair }),
            (0, None) => return Err(at("the first key signs receipts, so it needs its private part \"d\"".into())),
            _ => {}
        }
        out.published.push(PublicKey { kid, x });
    }
    Ok(out)
}

fn parse_pem(text: &str) -> Result<ReceiptKeys, String> {
    let mut out = ReceiptKeys::default();
    // The base64 body of the block being read, and the line it began on.
    let mut block: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
            if block.is_some() {
                return Err(format!("line {n}: a BEGIN line inside another block"));
            }
            if label != "PRIVATE KEY" {
                return Err(format!(
                    "line {n}: a \"{label}\" block; expected unencrypted PKCS#8 \"PRIVATE KEY\" blocks as `openssl genpkey -algorithm ed25519` writes them"
                ));
            }
            block = Some((n, String::new()));
        } else if line.starts_with("-----END ") {
            let (start, body) = block.take().ok_or_else(|| format!("line {n}: an END line without BEGIN"))?;
            let der = STANDARD
                .decode(body.as_bytes())
                .map_err(|e| format!("the block at line {start} is not valid base64 ({e})"))?;
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                .map_err(|e| format!("the block at line {start} is not an Ed25519 PKCS#8 private key ({e})"))?;
            let key = SigningKey::named(pair, None);
            if out.published.iter().any(|p| p.kid == key.kid) {
                return Err(format!("the block at line {start} repeats an earlier key"));
            }
            out.published.push(PublicKey { kid: key.kid.clone(), x: key.public_key().to_vec() });
            out.signer.get_or_insert(key);
        } else if let Some((_, body)) = &mut block {
            body.push_str(line);
        }
        // Text outside blocks is explanatory (RFC 7468 §2) and ignored.
    }
    if let Some((start, _)) = block {
        return Err(format!("the block at line {start} has no END line"));
    }
    if out.signer.is_none() {
        return Err("no PRIVATE KEY block".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(n: u8) -> Vec<u8> {
        vec![n; 32]
    }

    fn jwk(n: u8, kid: Option<&str>, private: bool) -> Value {
        let key = SigningKey::from_seed(&seed(n), None).unwrap();
        let mut v = json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(key.public_key())});
        if let Some(kid) = kid {
            v["kid"] = json!(kid);
        }
        if private {
            v["d"] = json!(b64url(&seed(n)));
        }
        v
    }

    #[test]
    fn a_jwk_set_signs_with_its_first_key_and_publishes_all_without_private_parts() {
        let set = json!({"keys": [jwk(1, Some("new"), true), jwk(2, Some("old"), false), jwk(3, None, true)]});
        let keys = ReceiptKeys::parse(&set.to_string()).unwrap();
        assert_eq!(keys.signer().unwrap().kid(), "new");
        let published: Value = serde_json::from_str(&keys.jwks_json()).unwrap();
        let kids: Vec<&str> =
            published["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
        let third = thumbprint(SigningKey::from_seed(&seed(3), None).unwrap().public_key());
        assert_eq!(kids, ["new", "old", third.as_str()]);
        assert!(!keys.jwks_json().contains("\"d\""), "{}", keys.jwks_json());
        assert!(keys.is_signed() && !keys.is_ephemeral());
    }

    #[test]
    fn bad_jwk_sets_say_what_is_wrong() {
        let bad = |v: Value| ReceiptKeys::parse(&v.to_string()).unwrap_err();
        assert!(bad(json!({"keys": []})).contains("no keys"));
        assert!(bad(json!({"nokeys": 1})).contains("no \"keys\" list"));
        assert!(bad(json!({"keys": [jwk(1, None, false)]})).contains("needs its private part"));
        assert!(bad(json!({"keys": [jwk(1, Some("a"), true), jwk(2, Some("a"), false)]})).contains("appears twice"));
        let mut wrong_d = jwk(1, None, true);
        wrong_d["d"] = json!(b64url(&seed(9)));
        assert!(bad(json!({"keys": [wrong_d]})).contains("not one key pair"));
        let mut rsa = jwk(1, None, true);
        rsa["kty"] = json!("RSA");
        assert!(bad(json!({"keys": [rsa]})).contains("only Ed25519"));
        let mut short = jwk(1, None, true);
        short["x"] = json!("AAAA");
        assert!(bad(json!({"keys": [short]})).contains("3 bytes"));
        let mut alg = jwk(1, None, true);
        alg["alg"] = json!("ES256");
        assert!(bad(json!({"keys": [alg]})).contains("alg"));
        assert!(ReceiptKeys::parse("{not json").unwrap_err().contains("not valid JSON"));
        assert!(ReceiptKeys::parse("hello").unwrap_err().contains("neither"));
    }

    /// RFC 8037 Appendix A.3: the thumbprint of its Ed25519 example key.
    #[test]
    fn thumbprint_matches_rfc_8037() {
        let x = URL_SAFE_NO_PAD.decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap();
        assert_eq!(thumbprint(&x), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn pem_blocks_are_read_and_others_refused() {
        // PKCS#8 v1 of seed 7, the form `openssl genpkey` writes.
        let mut der =
            vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
        der.extend_from_slice(&seed(7));
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", STANDARD.encode(&der));
        let keys = ReceiptKeys::parse(&pem).unwrap();
        let expected = SigningKey::from_seed(&seed(7), None).unwrap();
        assert_eq!(keys.signer().unwrap().kid(), expected.kid());
        assert_eq!(keys.signer().unwrap().public_key(), expected.public_key());
        let public = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(ReceiptKeys::parse(public).unwrap_err().contains("\"PUBLIC KEY\" block"));
        assert!(ReceiptKeys::parse(&pem[..40]).unwrap_err().contains("no END line"));
        let twice = format!("{pem}{pem}");
        assert!(ReceiptKeys::parse(&twice).unwrap_err().contains("repeats"));
    }

    #[test]
    fn unsigned_publishes_an_empty_set() {
        assert_eq!(ReceiptKeys::unsigned().jwks_json(), r#"{"keys":[]}"#);
        assert!(!ReceiptKeys::unsigned().is_signed());
        let e = ReceiptKeys::ephemeral().unwrap();
        assert!(e.is_signed() && e.is_ephemeral() && e.published_count() == 1);
        assert!(!format!("{:?}", e).contains("pair"), "no key material in Debug output");
    }
}
