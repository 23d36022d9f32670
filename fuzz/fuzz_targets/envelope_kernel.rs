//! Arbitrary bytes → `Envelope` decode → `Kernel::handle`, on top of a kernel
//! holding a started session of every conformance vector (see
//! `macp_fuzz::base`), with every invariant of `macp_fuzz::check` checked
//! after each envelope. Input layout: `macp_fuzz::frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macp_fuzz::check::Checked;
use macp_fuzz::frames::{self, Sender};
use macp_kernel::Input;

fuzz_target!(init: macp_fuzz::seeds::write_if_asked("envelope_kernel"), |data: &[u8]| {
    let mut k = Checked::from_base();
    for (i, frame) in frames::split(data).into_iter().enumerate().take(64) {
        k.now = k.now.saturating_add(frame.clock_step());
        let sender = frame.sender();
        let env = frame.envelope();
        if sender == Sender::Tick {
            k.handle(Input::Tick);
            continue;
        }
        let Some(envelope) = env else { continue };
        let identity = sender.identity(&envelope);
        k.handle(Input::Envelope { request: i as u64 + 1, identity, envelope });
    }
    k.finish();
});
