//! The filesystem journal (wraps macp-storage-fs; pending that crate).

use macp_kernel::{Kernel, KernelConfig};

use crate::driver::Journal;

/// Opens the data directory and recovers the kernel.
pub fn open(_dir: &std::path::Path, kcfg: &KernelConfig) -> Result<(Kernel, Box<dyn Journal>), String> {
    Ok((Kernel::new(kcfg.clone()), Box::new(crate::journal::MemoryJournal::default())))
}
