//! Connecting to a runtime and authenticating as dev agents.
//!
//! A dev-mode runtime (`macp-runtime --dev`) believes whoever a request says
//! it is, through `x-macp-agent-id: <agent>` or `Authorization: Bearer
//! <agent>`. That is what lets one example program play every agent of a
//! session. All agents share one HTTP/2 connection ([`Agents`]); each gets a
//! client whose interceptor stamps its identity on every call.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use clap::ValueEnum;
use macp_transport_grpc::pb::macp_runtime_service_client::MacpRuntimeServiceClient;
use macp_wire::v1::{Ack, Envelope, SendRequest};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Where the examples look for a runtime unless told otherwise: the
/// server's own default bind address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";

/// How a dev identity is presented. Both are accepted by a `--dev` runtime;
/// `bearer` is what the Python SDK sends, `agent-header` is the explicit form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// `x-macp-agent-id: <agent>`.
    #[default]
    AgentHeader,
    /// `Authorization: Bearer <agent>`.
    Bearer,
}

impl AuthMode {
    /// The flag spelling, for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::AgentHeader => "agent-header",
            AuthMode::Bearer => "bearer",
        }
    }
}

/// Stamps `agent`'s credentials on a request. Used per request by the load
/// generator (which changes identity per session) and by [`Auth`].
pub fn authorize<T>(req: &mut Request<T>, mode: AuthMode, agent: &str) -> Result<(), Status> {
    let md = req.metadata_mut();
    match mode {
        AuthMode::AgentHeader => {
            let v = MetadataValue::try_from(agent).map_err(|_| Status::invalid_argument("agent id is not ASCII"))?;
            md.insert("x-macp-agent-id", v);
        }
        AuthMode::Bearer => {
            let v = MetadataValue::try_from(format!("Bearer {agent}"))
                .map_err(|_| Status::invalid_argument("agent id is not ASCII"))?;
            md.insert("authorization", v);
        }
    }
    Ok(())
}

/// A request interceptor carrying one identity (or none, for probing what
/// an unauthenticated caller gets).
#[derive(Clone, Debug)]
pub struct Auth {
    mode: AuthMode,
    agent: Option<String>,
}

impl Auth {
    /// Authenticates as `agent`.
    pub fn agent(mode: AuthMode, agent: impl Into<String>) -> Self {
        Auth { mode, agent: Some(agent.into()) }
    }

    /// Sends no credentials.
    pub fn anonymous() -> Self {
        Auth { mode: AuthMode::AgentHeader, agent: None }
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(agent) = &self.agent {
            authorize(&mut req, self.mode, agent)?;
        }
        Ok(req)
    }
}

/// A runtime client bound to one identity.
pub type Client = MacpRuntimeServiceClient<InterceptedService<Channel, Auth>>;

/// Turns `host:port` (or a full `http://…` URI) into the URI tonic wants.
pub fn endpoint_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Opens one HTTP/2 connection to the runtime at `addr`.
pub async fn connect(addr: &str) -> crate::Result<Channel> {
    let endpoint = Endpoint::from_shared(endpoint_uri(addr))?.tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e} (is `macp-runtime --dev` running?)").into())
}

/// Resolves `addr` and insists every address is loopback. The load
/// generator and the fuzzer refuse anything else: they are meant to hammer
/// a local test server, never somebody's deployment.
pub fn require_loopback(addr: &str) -> crate::Result<SocketAddr> {
    let hostport = addr.split("://").last().unwrap_or(addr).trim_end_matches('/');
    let addrs: Vec<SocketAddr> =
        hostport.to_socket_addrs().map_err(|e| format!("cannot resolve '{addr}': {e}"))?.collect();
    let first = *addrs.first().ok_or_else(|| format!("'{addr}' resolves to nothing"))?;
    if let Some(bad) = addrs.iter().find(|a| !is_loopback(a.ip())) {
        return Err(format!("refusing to target {bad}: only loopback addresses are allowed").into());
    }
    Ok(first)
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Every agent of a session, over one shared connection.
#[derive(Clone, Debug)]
pub struct Agents {
    channel: Channel,
    mode: AuthMode,
}

impl Agents {
    /// Wraps an open connection; `mode` says how identities are presented.
    pub fn new(channel: Channel, mode: AuthMode) -> Self {
        Agents { channel, mode }
    }

    /// Connects to `addr` and wraps the connection.
    pub async fn connect(addr: &str, mode: AuthMode) -> crate::Result<Self> {
        Ok(Self::new(connect(addr).await?, mode))
    }

    /// A client that acts as `agent`. Cheap: it clones the channel handle.
    pub fn client(&self, agent: &str) -> Client {
        MacpRuntimeServiceClient::with_interceptor(self.channel.clone(), Auth::agent(self.mode, agent))
    }

    /// A client without credentials.
    pub fn anonymous(&self) -> Client {
        MacpRuntimeServiceClient::with_interceptor(self.channel.clone(), Auth::anonymous())
    }

    /// How identities are presented.
    pub fn auth_mode(&self) -> AuthMode {
        self.mode
    }
}

/// Sends one envelope and returns its Ack. A transport-level failure is an
/// error; a refusal by the runtime is an Ack with `ok == false`.
pub async fn send(client: &mut Client, envelope: Envelope) -> Result<Ack, Status> {
    let resp = client.send(SendRequest { envelope: Some(envelope) }).await?;
    resp.into_inner().ack.ok_or_else(|| Status::internal("SendResponse without an ack"))
}

/// The error code of an Ack, or `""` when it was accepted.
pub fn ack_code(ack: &Ack) -> &str {
    ack.error.as_ref().map(|e| e.code.as_str()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(require_loopback("127.0.0.1:50051").is_ok());
        assert!(require_loopback("http://[::1]:50051").is_ok());
        assert!(require_loopback("localhost:1").is_ok());
        assert!(require_loopback("10.0.0.1:50051").is_err());
        assert!(require_loopback("8.8.8.8:53").is_err());
        assert_eq!(endpoint_uri("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(endpoint_uri("http://x:1"), "http://x:1");
    }
}
