//! Trace context (issue 14 item 3): a request's W3C `traceparent` becomes
//! the span its log lines are written in, so the caller's trace id is in
//! the server log line for that request — and only in that request's.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use macp_wire::v1::GetSessionRequest;
use tracing_subscriber::fmt::MakeWriter;

const TOKENS: &str = r#"[{"token":"tok-a","sender":"a"}]"#;
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// Every formatted log line of this test process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).map(str::to_string).collect()
    }
}

#[tokio::test]
async fn the_callers_trace_id_is_in_the_requests_log_line() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter("macp_transport_grpc=debug")
        .with_writer(logs.clone())
        .with_ansi(false)
        .init();
    let server = Server::start_insecure(&["--auth-tokens-json", TOKENS]).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");

    // An unknown token is refused; the refusal is logged (debug) while the
    // request is being served, so in its span.
    let mut traced =
        server.with_headers(&[("authorization", "Bearer not-a-token"), ("traceparent", traceparent.as_str())]).await;
    let e = traced.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut untraced = server.with_headers(&[("authorization", "Bearer also-not-a-token")]).await;
    untraced.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();
    // A malformed traceparent is ignored (the request is still served).
    let mut malformed = server
        .with_headers(&[("authorization", "Bearer third"), ("traceparent", "00-nothex-00f067aa0ba902b7-01")])
        .await;
    malformed.get_session(GetSessionRequest { session_id: sid() }).await.unwrap_err();

    let refusals = logs.lines_with("request not authenticated");
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    let with_id: Vec<&String> = refusals.iter().filter(|l| l.contains(TRACE_ID)).collect();
    assert_eq!(with_id.len(), 1, "exactly the traced request carries the trace id: {refusals:#?}");
    let line = with_id[0];
    assert!(line.contains(&format!("request{{trace_id={TRACE_ID} parent_id={PARENT_ID}")), "{line}");
    assert!(line.contains(PARENT_ID), "the caller's span id is logged as the parent: {line}");
    assert!(line.contains("GetSession"), "the span names the RPC: {line}");
    server.stop().await;
}
