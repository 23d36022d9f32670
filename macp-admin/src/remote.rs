//! The commands that talk to a running server: `tail` and `receipt`.

use std::collections::BTreeSet;
use std::io::Write as _;

use macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient;
use macp_wire::v1::{
    session_lifecycle_event::EventType, stream_session_response, GetDecisionReceiptRequest, GetReceiptKeysRequest,
    StreamSessionRequest, WatchSessionsRequest,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::{json as j, AdminError, Outcome};

/// Where the server is and who we are to it.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The server (`http://host:port`, `https://…`, or `host:port`).
    #[arg(long, env = "MACP_ADMIN_ADDR")]
    addr: String,
    /// A bearer token (`Authorization: Bearer …`); an observer identity
    /// sees every session.
    #[arg(long, env = "MACP_ADMIN_TOKEN", conflicts_with = "dev_sender")]
    token: Option<String>,
    /// A dev identity (`x-macp-agent-id`), for a server started with --dev.
    #[arg(long)]
    dev_sender: Option<String>,
    /// PEM file of the CA that signed the server's certificate (`https://`
    /// addresses).
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,
}

#[derive(Clone)]
struct Auth(Option<(&'static str, MetadataValue<tonic::metadata::Ascii>)>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some((k, v)) = &self.0 {
            req.metadata_mut().insert(*k, v.clone());
        }
        Ok(req)
    }
}

type Client = MacpRuntimeServiceClient<InterceptedService<Channel, Auth>>;

async fn connect(conn: &Conn) -> Result<Client, AdminError> {
    let uri = if conn.addr.contains("://") { conn.addr.clone() } else { format!("http://{}", conn.addr) };
    let bad = |e: &dyn std::fmt::Display| AdminError::Usage(format!("{e}"));
    let mut endpoint = Endpoint::from_shared(uri.clone()).map_err(|e| bad(&e))?;
    if uri.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
        if let Some(path) = &conn.ca_cert {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(path)?));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(&e))?;
    }
    let channel =
        endpoint.connect().await.map_err(|e| AdminError::Remote(format!("cannot connect to {}: {e}", conn.addr)))?;
    let auth = match (&conn.token, &conn.dev_sender) {
        (Some(t), _) => Some(("authorization", format!("Bearer {t}"))),
        (None, Some(s)) => Some(("x-macp-agent-id", s.clone())),
        (None, None) => None,
    };
    let auth = match auth {
        Some((k, v)) => Some((k, MetadataValue::try_from(v).map_err(|_| bad(&"credentials must be ASCII"))?)),
        None => None,
    };
    Ok(MacpRuntimeServiceClient::with_interceptor(channel, Auth(auth)))
}

fn runtime() -> Result<tokio::runtime::Runtime, AdminError> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn remote(e: Status) -> AdminError {
    AdminError::Remote(format!("{:?}: {}", e.code(), e.message()))
}

/// `tail`: one JSON line per lifecycle event (`{"event": …}`) and per
/// accepted envelope (`{"envelope": …}`); every session the caller may see
/// is followed with a passive subscribe from its start.
pub fn tail(conn: &Conn, limit: Option<u64>) -> Result<(), AdminError> {
    runtime()?.block_on(async {
        let client = connect(conn).await?;
        let mut watch = client.clone().watch_sessions(WatchSessionsRequest {}).await.map_err(remote)?.into_inner();
        let (tx, mut rx) = mpsc::channel::<serde_json::Value>(1024);
        let mut followed = BTreeSet::new();
        let mut printed = 0u64;
        let mut stdout = std::io::stdout();
        loop {
            tokio::select! {
                ev = watch.next() => {
                    let Some(ev) = ev else { break };
                    let Some(ev) = ev.map_err(remote)?.event else { continue };
                    let kind = EventType::try_from(ev.event_type).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
                    let session = ev.session.as_ref();
                    let line = json!({
                        "event": kind.trim_start_matches("EVENT_TYPE_").to_ascii_lowercase(),
                        "observed_at_unix_ms": ev.observed_at_unix_ms,
                        "session": session.map(|m| j::session(m, None, None)),
                    });
                    if let Some(m) = session {
                        if followed.insert(m.session_id.clone()) {
                            tokio::spawn(follow(client.clone(), m.session_id.clone(), tx.clone()));
                        }
                    }
                    printed += 1;
                    writeln!(stdout, "{line}")?;
                }
                Some(line) = rx.recv() => {
                    printed += 1;
                    writeln!(stdout, "{line}")?;
                }
                _ = tokio::signal::ctrl_c() => break,
            }
            stdout.flush()?;
            if limit.is_some_and(|l| printed >= l) {
                break;
            }
        }
        Ok(())
    })
}

/// Follows one session's accepted envelopes until the stream ends.
async fn follow(mut client: Client, session_id: String, tx: mpsc::Sender<serde_json::Value>) {
    let req = StreamSessionRequest { subscribe_session_id: session_id.clone(), after_sequence: 0, envelope: None };
    let requests = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    let mut stream = match client.stream_session(requests).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            let _ = tx.send(json!({"session_id": session_id, "error": e.message()})).await;
            return;
        }
    };
    while let Some(frame) = stream.next().await {
        let line = match frame.map(|f| f.response) {
            Ok(Some(stream_session_response::Response::Envelope(e))) => {
                json!({"session_id": session_id, "envelope": j::envelope(&e)})
            }
            Ok(Some(stream_session_response::Response::Error(e))) => {
                json!({"session_id": session_id, "error": e.message, "code": e.code})
            }
            Ok(None) => continue,
            Err(e) => json!({"session_id": session_id, "error": e.message()}),
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

/// `receipt`: prints the receipt JSON; with `verify`, checks it against the
/// server's published keys and says what vouches for it.
pub fn receipt(conn: &Conn, session_id: &str, verify: bool) -> Result<Outcome, AdminError> {
    runtime()?.block_on(async {
        let mut client = connect(conn).await?;
        let receipt = client
            .get_decision_receipt(GetDecisionReceiptRequest { session_id: session_id.into() })
            .await
            .map_err(remote)?
            .into_inner()
            .receipt_json;
        println!("{receipt}");
        if !verify {
            return Ok(Outcome::Ok);
        }
        let jwks = client.get_receipt_keys(GetReceiptKeysRequest {}).await.map_err(remote)?.into_inner().jwks_json;
        match macp_receipt::verify(&receipt, &jwks) {
            Ok(macp_receipt::Verdict::Attested { kid }) => {
                eprintln!("verified: attested by key {kid}");
                Ok(Outcome::Ok)
            }
            Ok(macp_receipt::Verdict::IntegrityOnly) => {
                eprintln!("NOT VERIFIED: the receipt is consistent but no signature verifies with the server's keys");
                Ok(Outcome::Failed)
            }
            Err(e) => {
                eprintln!("NOT VERIFIED: {e}");
                Ok(Outcome::Failed)
            }
        }
    })
}
