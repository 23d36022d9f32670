//! Discovery RPCs: Initialize (version negotiation and capabilities),
//! GetManifest, ListRoots and WatchRoots. They need no authentication: a
//! client must be able to learn what the runtime speaks before it logs in.

use std::collections::BTreeMap;

use macp_kernel::config::PROTOCOL_VERSION;
use macp_kernel::{Answer, ErrorCode, Query};
use macp_wire::v1::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{unexpected, RpcStream, Runtime};
use crate::driver::now_ms;
use crate::status::error_status;

/// What this runtime can do, exactly as implemented: a client switches
/// features on from these flags, so none may be advertised early. A
/// registry loaded from `MACP_POLICIES_DIR` advertises `register_policy =
/// false`, as RFC-MACP-0012 §9 describes a file-loaded registry; receipts
/// are advertised as signed only when a signing key is configured.
fn capabilities(rt: &Runtime) -> Capabilities {
    let signed_receipts = rt.receipts.is_signed();
    Capabilities {
        sessions: Some(SessionsCapability { stream: true, list_sessions: true, watch_sessions: true }),
        cancellation: Some(CancellationCapability { cancel_session: true }),
        progress: Some(ProgressCapability { progress: true }),
        manifest: Some(ManifestCapability { get_manifest: true }),
        mode_registry: Some(ModeRegistryCapability { list_modes: true, list_changed: true }),
        roots: Some(RootsCapability { list_roots: true, list_changed: false }),
        policy_registry: Some(PolicyRegistryCapability {
            register_policy: !rt.policies_read_only,
            list_policies: true,
            list_changed: true,
            rule_extensions: macp_kernel::policy::RULE_EXTENSIONS.iter().map(|k| k.to_string()).collect(),
            what_if_replay: true,
        }),
        decision_receipt: Some(DecisionReceiptCapability { get_decision_receipt: true, signed: signed_receipts }),
        experimental: Some(ExperimentalCapabilities {
            features: BTreeMap::from([("ext_mode_lifecycle".to_string(), "true".to_string())]),
        }),
    }
}

async fn mode_ids(rt: &Runtime) -> Result<Vec<String>, Status> {
    match rt.ask(Query::ModeIds).await? {
        Answer::ModeIds(ids) => Ok(ids),
        _ => Err(unexpected("a mode listing")),
    }
}

pub(super) async fn initialize(
    rt: &Runtime,
    req: Request<InitializeRequest>,
) -> Result<Response<InitializeResponse>, Status> {
    let r = req.into_inner();
    if r.supported_protocol_versions.is_empty() {
        return Err(Status::invalid_argument("supported_protocol_versions must list at least one version"));
    }
    if !r.supported_protocol_versions.iter().any(|v| v == PROTOCOL_VERSION) {
        return Err(error_status(
            ErrorCode::UnsupportedProtocolVersion,
            format!(
                "this runtime speaks protocol version {PROTOCOL_VERSION}; the client offered {:?}",
                r.supported_protocol_versions
            ),
        ));
    }
    let supported_modes = mode_ids(rt).await?;
    Ok(Response::new(InitializeResponse {
        selected_protocol_version: PROTOCOL_VERSION.to_string(),
        runtime_info: Some(RuntimeInfo {
            name: "macp-rs".into(),
            title: "macp-rs runtime".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Rust runtime for the Multi-Agent Coordination Protocol".into(),
            website_url: String::new(),
        }),
        capabilities: Some(capabilities(rt)),
        supported_modes,
        instructions: "Authenticate every call; use Send for per-message acks and StreamSession (or passive subscribe) to follow a session.".into(),
    }))
}

pub(super) async fn get_manifest(
    rt: &Runtime,
    req: Request<GetManifestRequest>,
) -> Result<Response<GetManifestResponse>, Status> {
    let agent = req.into_inner().agent_id;
    let me = rt.kernel_config.runtime_id.clone();
    if !agent.is_empty() && agent != me {
        return Err(Status::not_found(format!("no manifest is known for agent '{agent}'")));
    }
    let supported_modes = mode_ids(rt).await?;
    Ok(Response::new(GetManifestResponse {
        manifest: Some(AgentManifest {
            agent_id: me,
            title: "macp-rs runtime".into(),
            description: "MACP coordination runtime: sessions, modes, governance policies, durable history".into(),
            supported_modes,
            input_content_types: vec!["application/macp-envelope+proto".into()],
            output_content_types: vec!["application/macp-envelope+proto".into()],
            metadata: BTreeMap::from([("implementation".to_string(), "macp-rs".to_string())]),
            transport_endpoints: Vec::new(),
        }),
    }))
}

pub(super) async fn list_roots(
    _rt: &Runtime,
    _req: Request<ListRootsRequest>,
) -> Result<Response<ListRootsResponse>, Status> {
    Ok(Response::new(ListRootsResponse { roots: Vec::new() }))
}

pub(super) async fn watch_roots(
    _rt: &Runtime,
    _req: Request<WatchRootsRequest>,
) -> Result<Response<RpcStream<WatchRootsResponse>>, Status> {
    let first =
        tokio_stream::once(Ok(WatchRootsResponse { change: Some(RootsChanged { observed_at_unix_ms: now_ms() }) }));
    Ok(Response::new(Box::pin(first.chain(tokio_stream::pending()))))
}
