//! Writes the seed corpus of every fuzz target (derived from the
//! conformance vectors) to `fuzz/seeds/<target>/`, replacing what is there.
//! Usage: `cargo run --manifest-path fuzz/Cargo.toml --example seeds [DIR]`.
//! (`fuzz/run.sh` gets the same files from the fuzz binaries themselves,
//! through `MACP_FUZZ_WRITE_SEEDS`, without this extra build.)

use std::path::PathBuf;

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds"));
    for (target, files) in macp_fuzz::seeds::all() {
        let dir = root.join(target);
        let n = macp_fuzz::seeds::write_dir(&dir, &files);
        println!("{target}: {n} seeds in {}", dir.display());
    }
}
