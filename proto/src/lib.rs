//! Wire types for macp-rs.
//!
//! The MACP schema is taken verbatim from the crates.io crate `macp-proto`
//! =0.1.13 (names, field numbers and types exactly as published), because real
//! clients such as `macp-sdk-python` speak exactly that schema. Types are
//! generated once here so every crate (kernel, storage, gRPC adapter) shares
//! one definition. Module nesting mirrors the protobuf packages, so
//! cross-package references resolve; short aliases follow.
#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant, missing_docs)]

/// Generated code, nested by protobuf package.
pub mod generated {
    /// The `macp.*` packages.
    pub mod macp {
        /// `macp.v1`: envelope, core service messages and policy descriptors.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/macp.v1.rs"));
        }
        /// Payload messages of the coordination modes.
        pub mod modes {
            /// `macp.modes.decision.v1` (RFC-MACP-0007).
            pub mod decision {
                /// Version 1.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/macp.modes.decision.v1.rs"));
                }
            }
            /// `macp.modes.proposal.v1` (RFC-MACP-0008).
            pub mod proposal {
                /// Version 1.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/macp.modes.proposal.v1.rs"));
                }
            }
            /// `macp.modes.task.v1` (RFC-MACP-0009).
            pub mod task {
                /// Version 1.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/macp.modes.task.v1.rs"));
                }
            }
            /// `macp.modes.handoff.v1` (RFC-MACP-0010).
            pub mod handoff {
                /// Version 1.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/macp.modes.handoff.v1.rs"));
                }
            }
            /// `macp.modes.quorum.v1` (RFC-MACP-0011).
            pub mod quorum {
                /// Version 1.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/macp.modes.quorum.v1.rs"));
                }
            }
            /// `macp.modes.multi_round.v1` (the `ext.multi_round.v1` extension).
            pub mod multi_round {
                /// Version 1.
                pub mod v1 {
                    include!(concat!(env!("OUT_DIR"), "/macp.modes.multi_round.v1.rs"));
                }
            }
        }
    }
    /// The `macp_rs.*` packages: macp-rs's own schemas.
    pub mod macp_rs {
        /// Storage records.
        pub mod storage {
            /// Version 1 (`schema/macp_rs/storage/v1/record.proto`).
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/macp_rs.storage.v1.rs"));
            }
        }
    }
}

/// `macp.v1` under a short name: every crate imports from here.
pub use generated::macp::v1;

/// Mode payload packages under short names.
pub mod modes {
    pub use crate::generated::macp::modes::decision::v1 as decision;
    pub use crate::generated::macp::modes::handoff::v1 as handoff;
    pub use crate::generated::macp::modes::multi_round::v1 as multi_round;
    pub use crate::generated::macp::modes::proposal::v1 as proposal;
    pub use crate::generated::macp::modes::quorum::v1 as quorum;
    pub use crate::generated::macp::modes::task::v1 as task;
}

/// Storage records under a short name.
pub use generated::macp_rs::storage::v1 as storage;

/// The encoded `FileDescriptorSet` of every schema above: the gRPC adapter
/// generates its service from it and serves it for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/macp_descriptor.bin"));

pub use prost::Message;

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod uuid_text;
