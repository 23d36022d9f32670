//! W3C trace context: a request's `traceparent` header becomes a `tracing`
//! span around the request, so every log line the request causes carries
//! the caller's trace id (`request{trace_id=… parent_id=… rpc=…}`) and an
//! operator can find one agent call in the server log by the id the SDK
//! (which sends `traceparent`) or the caller's tracer reports.
//!
//! Only requests that carry a valid `traceparent` get a span: the others
//! pay one header lookup, not a span per request on the hot path. A header
//! that does not parse is ignored, as the W3C spec asks (the request is
//! served; the server just does not join the caller's trace).
//!
//! Exporting spans to an OpenTelemetry collector is the cargo feature
//! `otlp` ([`crate::otlp`]): with it, and `OTEL_EXPORTER_OTLP_ENDPOINT` set,
//! this span is exported as a child of the caller's span, and requests
//! without a `traceparent` get a (root) span too.

use std::fmt;

use tracing::Span;

/// The header name.
pub const TRACEPARENT: &str = "traceparent";
/// [`TRACEPARENT`] as a parsed name: a lookup by `&str` would parse it on
/// every request.
const TRACEPARENT_NAME: http::HeaderName = http::HeaderName::from_static(TRACEPARENT);

/// The ids of a valid `traceparent` (lowercase hex, as sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent<'a> {
    /// 32 hex digits, not all zero.
    pub trace_id: &'a str,
    /// The caller's span: 16 hex digits, not all zero.
    pub parent_id: &'a str,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl<'a> TraceParent<'a> {
    /// Parses `version-trace_id-parent_id-flags` (W3C Trace Context §3.2):
    /// version `00` has exactly these four fields; a later version may
    /// append more, which are ignored; version `ff` is invalid.
    pub fn parse(value: &'a str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let parent_id = parts.next()?;
        let flags = parts.next()?;
        if !is_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !is_hex(trace_id, 32) || !is_hex(parent_id, 16) || !is_hex(flags, 2) {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceParent { trace_id, parent_id, flags })
    }
}

impl fmt::Display for TraceParent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

/// Lowercase hex of exactly `len` digits (the spec forbids uppercase).
fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The span a request runs in when it carries a valid `traceparent`.
/// (With OTLP export on, every request gets one.)
pub fn request_span(headers: &http::HeaderMap, path: &str) -> Option<Span> {
    let tp = headers.get(&TRACEPARENT_NAME).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
    let Some(tp) = tp else {
        #[cfg(feature = "otlp")]
        if crate::otlp::exporting() {
            return Some(tracing::info_span!("request", rpc = %path));
        }
        return None;
    };
    let span = tracing::info_span!(
        "request",
        trace_id = %tp.trace_id,
        parent_id = %tp.parent_id,
        sampled = tp.flags & 1 == 1,
        rpc = %path
    );
    #[cfg(feature = "otlp")]
    crate::otlp::set_remote_parent(&span, &tp);
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_examples() {
        let tp = TraceParent::parse(VALID).unwrap();
        assert_eq!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id, "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), VALID);
        // A later version may carry more fields.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra").is_some());
    }

    #[test]
    fn invalid_headers_are_ignored() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
