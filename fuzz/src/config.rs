//! The configuration-parsing entry points of the `config_parse` target.
//!
//! Configuration is attacker-adjacent input: token files are edited by hand,
//! environment variables come from deployment templates, and policy rules
//! arrive over RegisterPolicy from any registry admin. None of it may crash
//! the server, and what parses must mean what it says.

use macp_kernel::macp_wire::v1::{Envelope, PolicyDescriptor, SessionStartPayload};
use macp_kernel::{Effect, Identity, Input, Kernel, KernelConfig, Reply};
use macp_transport_grpc::auth::{parse_tokens, Authenticator};
use macp_transport_grpc::config::{Config, ConfigError};
use prost::Message as _;
use tonic::metadata::{MetadataMap, MetadataValue};

/// Which parser the first input byte selects.
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match which % 3 {
        0 => tokens(&text, which & 0x80 != 0),
        1 => server_args(&text),
        _ => policy_rules(&text, u32::from(which >> 2) % 4),
    }
}

/// The static token file (`MACP_AUTH_TOKENS_JSON`). Whatever parses must
/// authenticate: every accepted plaintext token, presented as a bearer token
/// and as `x-macp-token`, resolves to its own sender with its own grants
/// (a `token_sha256` entry cannot be presented: only its preimage could).
pub fn tokens(text: &str, dev: bool) {
    use macp_transport_grpc::auth::TokenSecret;
    let Ok(entries) = parse_tokens(text) else { return };
    let auth = Authenticator::new(entries.clone(), dev).expect("parsed entries index without duplicates");
    assert_eq!(auth.token_count(), entries.len(), "duplicate tokens were accepted");
    for e in &entries {
        let TokenSecret::Plain(token) = &e.secret else { continue };
        for (header, value) in [("authorization", format!("Bearer {token}")), ("x-macp-token", token.clone())] {
            let Ok(v) = MetadataValue::try_from(value.as_str()) else { continue };
            let mut md = MetadataMap::new();
            md.insert(header, v);
            let id = now(auth.authenticate(&md))
                .unwrap_or_else(|s| panic!("the token of {} does not authenticate via {header}: {s}", e.sender));
            assert_eq!(id.sender, e.sender, "a token authenticates as someone else via {header}");
            assert_eq!(id.grants.can_start_sessions, e.can_start_sessions);
            assert_eq!(id.grants.max_open_sessions, e.max_open_sessions);
        }
    }
}

/// Runs a future that must not wait: static tokens resolve without I/O (only
/// a JWT with an unknown key id waits, for a JWKS refresh).
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("static-token authentication waited"),
    }
}

/// The server command line (whitespace-separated arguments, NUL-free).
/// Parsing and [`Config::resolve`] may refuse, never panic. What resolves
/// has TLS or allows plaintext and has some way to authenticate; `--dev`
/// never leaves the server without transport or without identities (it may
/// still be refused for settings it does not touch, such as a half TLS pair
/// or a zero connection cap).
pub fn server_args(text: &str) {
    use clap::Parser as _;
    let args: Vec<&str> = text.split(|c: char| c.is_whitespace() || c == '\0').filter(|a| !a.is_empty()).collect();
    let argv = std::iter::once("macp-runtime").chain(args.iter().copied());
    let Ok(cfg) = Config::try_parse_from(argv) else { return };
    let dev = cfg.dev;
    match cfg.resolve() {
        Ok(c) => {
            assert!(c.allow_insecure || c.tls(), "resolved without TLS and without allowing plaintext");
            let tokens = c.auth_tokens_json.is_some() || c.auth_tokens_file.is_some();
            assert!(tokens || c.jwt() || c.allow_dev_sender_header, "resolved with no way to authenticate");
            assert!(c.max_connections > 0 && c.handshake_timeout_secs > 0);
        }
        Err(e) => assert!(
            !dev || !matches!(e, ConfigError::NoTls | ConfigError::NoAuthentication),
            "--dev allows plaintext and dev identities, yet: {e}"
        ),
    }
}

/// Governance policy rules (RegisterPolicy): registered for each mode; when
/// accepted, a session of that mode is started under it and asked to commit,
/// so the rules are also evaluated, not just validated.
pub fn policy_rules(rules: &str, schema_version: u32) {
    const MODES: [&str; 7] = [
        "*",
        "macp.mode.decision.v1",
        "macp.mode.proposal.v1",
        "macp.mode.task.v1",
        "macp.mode.handoff.v1",
        "macp.mode.quorum.v1",
        "ext.multi_round.v1",
    ];
    let now = 1_700_000_000_000;
    let mut k = Kernel::new(KernelConfig::default());
    for (i, mode) in MODES.iter().enumerate() {
        let id = format!("policy.fuzz.{i}");
        let d = PolicyDescriptor {
            policy_id: id.clone(),
            mode: (*mode).into(),
            description: "fuzz".into(),
            rules: rules.into(),
            schema_version,
            registered_at_unix_ms: 0,
        };
        let before = k.snapshot();
        let reply = reply_of(
            k.handle(now, Input::RegisterPolicy { request: 1, identity: Identity::new("admin"), descriptor: d }),
        );
        if !matches!(reply, Reply::Registry(Ok(_))) {
            assert!(k.snapshot() == before, "a refused policy changed the kernel");
            continue;
        }
        let session_modes: Vec<&str> = if *mode == "*" { MODES[1..].to_vec() } else { vec![mode] };
        for (j, m) in session_modes.iter().enumerate() {
            let sid = format!("00000000-0000-4000-8000-{:06x}{:06x}", i, j);
            let start = SessionStartPayload {
                intent: String::new(),
                participants: vec!["I".into(), "A".into(), "B".into()],
                mode_version: "1.0.0".into(),
                configuration_version: "cfg-1".into(),
                policy_version: id.clone(),
                ttl_ms: 60_000,
                ..Default::default()
            };
            let env = |t: &str, mid: &str, sender: &str, payload: Vec<u8>| Envelope {
                macp_version: "1.0".into(),
                mode: (*m).into(),
                message_type: t.into(),
                message_id: mid.into(),
                session_id: sid.clone(),
                sender: sender.into(),
                timestamp_unix_ms: 0,
                payload,
            };
            let start_env = env("SessionStart", "s", "I", start.encode_to_vec());
            k.handle(now, Input::Envelope { request: 2, identity: Identity::new("I"), envelope: start_env });
            let c = macp_kernel::macp_wire::v1::CommitmentPayload {
                commitment_id: "c".into(),
                action: "fuzz".into(),
                authority_scope: "fuzz".into(),
                reason: String::new(),
                mode_version: "1.0.0".into(),
                policy_version: id.clone(),
                configuration_version: "cfg-1".into(),
                outcome_positive: true,
                supersedes: None,
            };
            k.handle(
                now,
                Input::Envelope {
                    request: 3,
                    identity: Identity::new("I"),
                    envelope: env("Commitment", "c", "I", c.encode_to_vec()),
                },
            );
        }
    }
    let snap = k.snapshot();
    let restored = Kernel::restore(KernelConfig::default(), &snap).expect("a live checkpoint restores");
    assert!(restored.snapshot() == snap, "a restored checkpoint differs");
}

fn reply_of(effects: Vec<Effect>) -> Reply {
    effects
        .into_iter()
        .find_map(|e| match e {
            Effect::Reply { reply, .. } => Some(reply),
            _ => None,
        })
        .expect("a reply")
}

#[cfg(test)]
mod tests {
    /// Refusals `--dev` does not lift (a half TLS pair, a zero connection
    /// cap, disagreeing retention settings, JWT keys without an issuer) are
    /// refusals, not oracle failures; CI's fuzzer once found the oracle
    /// claiming `--dev` always resolves.
    #[test]
    fn dev_may_still_be_refused_for_settings_it_does_not_touch() {
        for args in [
            "--dev --max-connections 0",
            "--dev --handshake-timeout-secs 0",
            "--dev --history-retention 1m --session-disk-retention-secs 5",
            "--dev --auth-jwks-url https://k",
            "--dev --tls-cert-path c.pem",
            "--dev",
            "--allow-insecure",
            "--allow-insecure --auth-tokens-json []",
        ] {
            super::server_args(args);
        }
    }
}
