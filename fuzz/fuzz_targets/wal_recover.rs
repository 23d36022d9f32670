//! `macp-storage-fs` recovery on a damaged data directory: segment and frame
//! decoding, resynchronisation, torn-tail truncation, quarantine and
//! checkpoint handling (see `macp_fuzz::wal`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        macp_fuzz::seeds::write_if_asked("wal_recover");
        macp_fuzz::wal::contain_index_panics();
    },
    |data: &[u8]| macp_fuzz::wal::run(data)
);
