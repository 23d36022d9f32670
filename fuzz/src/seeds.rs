//! The seed corpus, derived from the conformance vectors.
//!
//! A fuzzer starting from nothing spends its first minutes discovering what a
//! protobuf envelope looks like. Starting from the spec's own scripted
//! sessions puts it at valid envelopes of every mode on the first input.
//! The seeds are generated (by `cargo run --example seeds`, see README.md) rather
//! than committed, so they follow the vectors when the vectors change.

use std::collections::BTreeMap;

use macp_kernel::macp_wire::storage::Record;
use macp_kernel::{record, Effect, Identity, Input};
use prost::Message as _;

use crate::base::{self, base};
use crate::frames;

/// Seeds per target name: file name → bytes.
pub type Corpus = BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>;

/// The environment variable that makes a fuzz target write its seeds
/// instead of fuzzing (see [`write_if_asked`]).
pub const WRITE_SEEDS_ENV: &str = "MACP_FUZZ_WRITE_SEEDS";

/// Called from each target's `init`: when [`WRITE_SEEDS_ENV`] names a
/// directory, writes `target`'s seeds there (replacing its files) and exits.
/// This lets `fuzz/run.sh` (and CI) produce the seed corpus with the fuzz
/// binaries it has already built, instead of a second, uninstrumented build
/// of every dependency.
pub fn write_if_asked(target: &str) {
    let Some(dir) = std::env::var_os(WRITE_SEEDS_ENV) else { return };
    let seeds = all().remove(target).unwrap_or_default();
    let n = write_dir(std::path::Path::new(&dir), &seeds);
    eprintln!("{target}: wrote {n} seeds to {}", std::path::Path::new(&dir).display());
    std::process::exit(0);
}

/// Replaces the files of `dir` with `seeds`; returns how many were written.
pub fn write_dir(dir: &std::path::Path, seeds: &BTreeMap<String, Vec<u8>>) -> usize {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
    }
    seeds.len()
}

/// Every target's seeds.
pub fn all() -> Corpus {
    let mut c = Corpus::new();
    c.insert("envelope_kernel", envelope_kernel());
    c.insert("storage_decode", storage_decode());
    c.insert("config_parse", config_parse());
    c.insert("wal_recover", wal_recover());
    c.insert("policy_definition", policy_definition());
    // `kernel_ops` reads `arbitrary`'s encoding, which has no inverse; it
    // reaches the vectors through its `Op::Vector` operation instead.
    c.insert("kernel_ops", BTreeMap::new());
    c
}

/// Each vector's messages as one multi-frame input (a millisecond apart,
/// each from its scripted sender), and each message alone.
pub fn envelope_kernel() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for s in &base().sessions {
        let stem = s.origin.trim_end_matches(".json").replace(':', "-");
        let mut all = Vec::new();
        for (i, env) in s.steps.iter().enumerate() {
            let bytes = env.encode_to_vec();
            frames::push(&mut all, frames::ctl(4), &bytes);
            let mut one = Vec::new();
            frames::push(&mut one, frames::ctl(4), &bytes);
            out.insert(format!("{stem}-m{i}"), one);
        }
        if !all.is_empty() {
            out.insert(format!("{stem}-all"), all);
        }
        let mut restart = Vec::new();
        frames::push(&mut restart, frames::ctl(0), &s.start.encode_to_vec());
        out.insert(format!("{stem}-start"), restart);
    }
    out
}

/// The records a vector's run persists, per vector.
fn vector_records() -> Vec<(String, Vec<Record>, Vec<u8>)> {
    let mut out = Vec::new();
    for s in &base().sessions {
        let mut k = base::kernel();
        let mut records = Vec::new();
        let mut now = base().now_ms;
        for env in &s.steps {
            now += 1;
            let input =
                Input::Envelope { request: 1, identity: Identity::new(env.sender.clone()), envelope: env.clone() };
            for e in k.handle(now, input) {
                if let Effect::Persist(r) = e {
                    records.push(r);
                }
            }
        }
        out.push((s.origin.trim_end_matches(".json").replace(':', "-"), records, k.snapshot()));
    }
    out
}

/// Storage decoding: single records, whole logs (length-prefixed records)
/// and checkpoints, each behind its selector byte (see the target).
pub fn storage_decode() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut base_log = vec![2u8];
    for r in &base().records {
        push_record(&mut base_log, r);
    }
    out.insert("log-base".into(), base_log);
    out.insert("checkpoint-base".into(), [&[1u8][..], &base().snapshot].concat());
    for (stem, records, snapshot) in vector_records() {
        let mut log = vec![2u8];
        for (i, r) in records.iter().enumerate() {
            push_record(&mut log, r);
            out.insert(format!("record-{stem}-{i}"), [&[0u8][..], &record::encode(r)].concat());
        }
        out.insert(format!("log-{stem}"), log);
        out.insert(format!("checkpoint-{stem}"), [&[1u8][..], &snapshot].concat());
    }
    out
}

fn push_record(out: &mut Vec<u8>, r: &Record) {
    let bytes = record::encode(r);
    out.extend_from_slice(&u16::try_from(bytes.len()).expect("a seed record fits").to_le_bytes());
    out.extend_from_slice(&bytes);
}

/// Whole policy descriptors, as protobuf (selector 1): every vector's inline
/// policy, the three reserved profiles, and what `macp-sdk-python` 0.22's
/// builders write; plus a compact-form input per standard mode (selector
/// 0, see `policy::descriptor`).
pub fn policy_definition() -> BTreeMap<String, Vec<u8>> {
    use macp_kernel::macp_wire::v1::PolicyDescriptor;
    let mut out = BTreeMap::new();
    let mut add = |name: String, d: PolicyDescriptor| {
        out.insert(name, [&[1u8][..], &d.encode_to_vec()].concat());
    };
    for (i, (_, v)) in base::vectors().iter().enumerate() {
        if let Some(p) = &v.policy {
            add(
                format!("vector-{i}"),
                macp_kernel::macp_wire::conformance::policy_descriptor(p).expect("vector policy"),
            );
        }
    }
    for id in ["policy.std.majority", "policy.std.supermajority", "policy.std.unanimous"] {
        add(id.to_string(), macp_kernel::policy::canonical_profile(id).expect("assigned profile"));
    }
    let sdk = |id: &str, mode: &str, version: u32, rules: &str| PolicyDescriptor {
        policy_id: id.into(),
        mode: mode.into(),
        description: "built by the SDK".into(),
        rules: rules.into(),
        schema_version: version,
        registered_at_unix_ms: 0,
    };
    add(
        "sdk-decision".into(),
        sdk(
            "policy.sdk.decision",
            "macp.mode.decision.v1",
            3,
            r#"{"voting":{"algorithm":"majority","threshold":0.5,"weights":{"A":1}},"objection_handling":{"critical_severity_vetoes":false,"veto_threshold":1,"critical_objection_action":"deny"},"evaluation":{"minimum_confidence":0.0,"required_before_voting":false},"commitment":{"authority":"initiator_only","designated_roles":[],"require_vote_quorum":false,"allow_decline_over_approval":false},"_note":"annotated"}"#,
        ),
    );
    add(
        "sdk-quorum".into(),
        sdk(
            "policy.sdk.quorum",
            "macp.mode.quorum.v1",
            1,
            r#"{"threshold":{"type":"n_of_m","value":1},"abstention":{"counts_toward_quorum":false,"interpretation":"neutral"},"commitment":{"authority":"initiator_only","designated_roles":[]}}"#,
        ),
    );
    add("any-shared".into(), sdk("policy.sdk.any", "*", 2, r#"{"commitment":{"authority":"any_participant"}}"#));
    for (m, rules) in [
        (0u8, r#"{"voting":{"algorithm":"unanimous"},"commitment":{"require_vote_quorum":true}}"#),
        (1, r#"{"acceptance":{"criterion":"counterparty"},"counter_proposal":{"max_rounds":2}}"#),
        (2, r#"{"assignment":{"allow_reassignment_on_reject":true},"completion":{"require_output":true}}"#),
        (3, r#"{"acceptance":{"implicit_accept_timeout_ms":5}}"#),
        (4, r#"{"threshold":{"type":"percentage","value":50}}"#),
    ] {
        // selector 0 (id policy.fuzz.a); shape: mode m, schema_version 3.
        out.insert(format!("compact-{m}"), [&[0u8, m | (3 << 3)][..], rules.as_bytes()].concat());
    }
    out
}

/// Token files, command lines and policy rules, each behind its selector
/// byte (see [`crate::config::run`]).
pub fn config_parse() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut add = |name: &str, which: u8, text: &str| {
        out.insert(name.to_string(), [&[which][..], text.as_bytes()].concat());
    };
    add("tokens-list", 0, r#"[{"token":"t1","sender":"agent://a"}]"#);
    add(
        "tokens-object",
        0x80,
        r#"{"tokens":[{"token":"t1","sender":"a","allowed_modes":["macp.mode.task.v1"],"can_start_sessions":false,"max_open_sessions":3,"can_manage_mode_registry":true,"is_observer":true},{"token":"t2","sender":"b"}]}"#,
    );
    add("args-dev", 1, "--dev --bind-addr 127.0.0.1:0 --memory-only");
    add("args-dev-refused", 1, "--dev --max-connections 0 --history-retention 1m --session-disk-retention-secs 5");
    add("args-tls", 1, "--tls-cert-path c.pem --tls-key-path k.pem --auth-tokens-json [] --session-id-policy lax");
    add(
        "args-insecure",
        1,
        "--allow-insecure --allow-dev-sender-header=false --max-payload-bytes 10 --checkpoint-every 0",
    );
    for (i, (_, v)) in base::vectors().iter().enumerate() {
        if let Some(p) = &v.policy {
            let which = 2 | ((p.schema_version as u8 % 4) << 2);
            add(&format!("rules-vector-{i}"), which, &p.rules.to_string());
        }
    }
    add(
        "rules-quorum",
        2 | (1 << 2),
        r#"{"threshold":{"type":"percentage","value":60},"abstention":{"interpretation":"implicit_reject"}}"#,
    );
    add("rules-handoff", 2 | (1 << 2), r#"{"acceptance":{"implicit_accept_timeout_ms":5}}"#);
    add(
        "rules-decision",
        2 | (2 << 2),
        r#"{"voting":{"algorithm":"weighted","weights":{"A":2.5},"threshold":0.6},"commitment":{"authority":"designated_role","designated_roles":["A"]}}"#,
    );
    add(
        "rules-task",
        2 | (1 << 2),
        r#"{"assignment":{"allow_reassignment_on_reject":true},"completion":{"require_output":true}}"#,
    );
    add("rules-proposal", 2 | (1 << 2), r#"{"acceptance":{"criterion":"counterparty"}}"#);
    out
}

/// Damage to the data directory built from the vectors' records (see
/// [`crate::wal`]): none, a flipped byte in a segment header, a frame header
/// and a payload, a torn tail, a replaced segment, a garbage checkpoint and
/// overwritten index pages.
pub fn wal_recover() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut add = |name: &str, bytes: Vec<u8>| {
        out.insert(name.to_string(), bytes);
    };
    add("untouched", vec![0, 0, 0, 0]);
    add("segment-header-byte", vec![0, 1, 9, 0, 0xff]);
    add("first-frame-header", vec![0, 0, 18, 0, 0x00]);
    add("first-frame-payload", vec![0, 0, 40, 0, 0x55, 0xaa]);
    add("last-segment-middle", vec![0, 0xff, 0, 4, 0x01]);
    add("torn-tail", vec![2, 0xff, 0, 3, 1, 2, 3]);
    add("segment-cut", vec![2, 1, 100, 0]);
    add("segment-replaced", vec![1, 2, 0, 0, b'M', b'A', b'C', b'P']);
    add("checkpoint-garbage", vec![3, 1, 2, 3, 4]);
    add("index-header", vec![4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    add("index-page", vec![4, 3, 64, 0, 0x00, 0x01, 0x02]);
    out
}
