//! Progress of long operations on a terminal; nothing when piped.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `total` units drawn on stderr. indicatif draws nothing when
/// stderr is not a terminal (its draw target checks), so scripts, CI and
/// pipes see no progress output at all.
pub fn bar(total: u64, what: &str, bytes: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let template =
        if bytes { "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})" } else { "{msg} [{bar:40}] {pos}/{len} ({eta})" };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}
