//! `macp-runtime`: the gRPC server (skeleton; filled by the server issue).
fn main() {
    eprintln!("macp-runtime: the gRPC server is not built yet (see issue 5)");
    std::process::exit(2);
}
