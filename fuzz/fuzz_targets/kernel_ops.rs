//! Structured operation sequences (`macp_fuzz::ops`, decoded with
//! `arbitrary`) across every mode: starts, typed mode messages, commitments,
//! control operations, registry changes, clock moves in both directions,
//! ticks, resends and restarts from checkpoints, with the invariants of
//! `macp_fuzz::check` checked after every operation and replay equivalence
//! at the end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macp_fuzz::check::Checked;
use macp_fuzz::ops::{Interpreter, Op, Step};

fuzz_target!(init: macp_fuzz::seeds::write_if_asked("kernel_ops"), |ops: Vec<Op>| {
    let mut k = Checked::from_base();
    let mut interp = Interpreter::default();
    for op in ops.iter().take(128) {
        match interp.step(op, k.now) {
            Step::Input(input) => {
                k.handle(input);
            }
            Step::Advance(ms) => k.now = k.now.saturating_add(ms),
            Step::Restart => k.restart_from_checkpoint(),
            Step::Nothing => {}
        }
    }
    k.finish();
});
