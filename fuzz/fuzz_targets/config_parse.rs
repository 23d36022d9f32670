//! Configuration parsing: the static token JSON, the server command line and
//! governance policy rules JSON, selected by the first byte (see
//! `macp_fuzz::config::run`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: macp_fuzz::seeds::write_if_asked("config_parse"), |data: &[u8]| macp_fuzz::config::run(data));
