//! Policy definitions as RegisterPolicy receives them: admission must be
//! total, and whatever it admits must replay and evaluate (see
//! `macp_fuzz::policy`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: macp_fuzz::seeds::write_if_asked("policy_definition"), |data: &[u8]| {
    let _ = macp_fuzz::policy::run(data);
});
