//! Compiles the MACP wire schema shipped by the `macp-proto` crate, plus the
//! macp-rs storage record schema, with the pure-Rust `protox` compiler so a
//! fresh machine needs no system `protoc`.
use std::path::PathBuf;

fn main() {
    let macp_dir = macp_proto::proto_dir();
    let own_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("schema");
    let files: Vec<PathBuf> = [
        "macp/v1/envelope.proto",
        "macp/v1/core.proto",
        "macp/v1/policy.proto",
        "macp/modes/decision/v1/decision.proto",
        "macp/modes/proposal/v1/proposal.proto",
        "macp/modes/task/v1/task.proto",
        "macp/modes/handoff/v1/handoff.proto",
        "macp/modes/quorum/v1/quorum.proto",
        "macp/modes/multi_round/v1/multi_round.proto",
    ]
    .iter()
    .map(|f| macp_dir.join(f))
    .chain(std::iter::once(own_dir.join("macp_rs/storage/v1/record.proto")))
    .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&macp_dir, &own_dir]).expect("compile .proto files");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut fds_bytes = Vec::new();
    prost::Message::encode(&fds, &mut fds_bytes).expect("encode descriptor set");
    std::fs::write(out.join("macp_descriptor.bin"), &fds_bytes).unwrap();
    prost_build::Config::new()
        // Maps as BTreeMap: encoding order is then deterministic (kernel rule).
        .btree_map(["."])
        .compile_fds(fds)
        .expect("generate prost types");
}
