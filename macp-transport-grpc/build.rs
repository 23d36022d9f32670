//! Generates the `MACPRuntimeService` server and client from the descriptor
//! set compiled in `macp-wire`; messages are not regenerated but referenced
//! there (`extern_path`), so the kernel and the adapter share one set of types.
use prost::Message;

fn main() {
    let fds = prost_types::FileDescriptorSet::decode(macp_wire::FILE_DESCRIPTOR_SET).expect("descriptor set");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".macp", "::macp_wire::generated::macp")
        .extern_path(".macp_rs", "::macp_wire::generated::macp_rs")
        .compile_fds(fds)
        .expect("generate the gRPC service");
}
