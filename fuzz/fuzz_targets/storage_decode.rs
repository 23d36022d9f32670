//! Storage decoding: the bytes recovery reads back from disk.
//!
//! The first byte selects what the rest is:
//! * `0`: one record (`macp_kernel::record::decode`), applied to the base
//!   kernel (one started session per conformance vector);
//! * `1`: a checkpoint (`Kernel::restore`);
//! * `2`: a log, records as `len:u16-le bytes`, replayed in order.
//!
//! Whatever the bytes, decoding and replay may refuse but never panic; a
//! refused record leaves the kernel unchanged; whatever state results is a
//! working kernel whose checkpoint round-trips and which serves inputs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macp_fuzz::storage;

fuzz_target!(init: macp_fuzz::seeds::write_if_asked("storage_decode"), |data: &[u8]| storage::run(data));
