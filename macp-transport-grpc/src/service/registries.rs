//! Registry RPCs: extension modes (List/Register/Unregister/Promote, and
//! WatchModeRegistry) and governance policies (Register/Unregister/Get/
//! List, and WatchPolicies).
//!
//! On a cluster node every change goes through the cluster's registry
//! table ([`crate::cluster::registries`]), so it holds on every node.
//!
//! A caller without `can_manage_mode_registry` gets a FORBIDDEN status, and
//! a policy change on a registry loaded from `MACP_POLICIES_DIR` a
//! REGISTRY_READ_ONLY (FAILED_PRECONDITION) status; every other refusal is the response's `ok=false` with the registry code
//! and reason in `error` (these responses have no code field).

use macp_kernel::{Answer, ErrorCode, Input, KernelError, ModeList, Query, Reply};
use macp_wire::v1::*;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{unexpected, RpcStream, Runtime};
use crate::driver::now_ms;
use crate::hub::RegistryEvent;
use crate::status::{error_status, registry_error, status};

/// Runs a registry mutation: `Ok(id)`, or the refusal for the response body.
async fn mutate(rt: &Runtime, input: Input) -> Result<Result<String, KernelError>, Status> {
    match rt.submit(input).await? {
        Reply::Registry(Err(e)) if e.code == ErrorCode::Forbidden => Err(status(e)),
        Reply::Registry(r) => Ok(r),
        Reply::Session { .. } => Err(unexpected("a registry change")),
    }
}

async fn modes(rt: &Runtime, list: ModeList) -> Result<Vec<ModeDescriptor>, Status> {
    match rt.ask(Query::Modes(list)).await? {
        Answer::Modes(m) => Ok(m),
        _ => Err(unexpected("a mode listing")),
    }
}

async fn policies(rt: &Runtime, mode: String) -> Result<Vec<PolicyDescriptor>, Status> {
    match rt.ask(Query::ListPolicies { mode }).await? {
        Answer::Policies(p) => Ok(p),
        _ => Err(unexpected("a policy listing")),
    }
}

pub(super) async fn list_modes(
    rt: &Runtime,
    _req: Request<ListModesRequest>,
) -> Result<Response<ListModesResponse>, Status> {
    Ok(Response::new(ListModesResponse { modes: modes(rt, ModeList::StandardsTrack).await? }))
}

pub(super) async fn list_ext_modes(
    rt: &Runtime,
    _req: Request<ListExtModesRequest>,
) -> Result<Response<ListExtModesResponse>, Status> {
    Ok(Response::new(ListExtModesResponse { modes: modes(rt, ModeList::Extensions).await? }))
}

pub(super) async fn watch_mode_registry(
    rt: &Runtime,
    _req: Request<WatchModeRegistryRequest>,
) -> Result<Response<RpcStream<WatchModeRegistryResponse>>, Status> {
    let rx = rt.watch.registry.subscribe();
    let hint = || WatchModeRegistryResponse {
        change: Some(RegistryChanged { registry: "modes".into(), observed_at_unix_ms: now_ms() }),
    };
    let first = tokio_stream::once(Ok(hint()));
    let rest = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| match e {
        Ok(RegistryEvent::Modes) => Some(Ok(hint())),
        Ok(RegistryEvent::Policies) => None,
        // A lagging watcher only needs one more hint: it re-queries anyway.
        Err(_) => Some(Ok(hint())),
    });
    Ok(Response::new(Box::pin(first.chain(rest))))
}

pub(super) async fn register_ext_mode(
    rt: &Runtime,
    req: Request<RegisterExtModeRequest>,
) -> Result<Response<RegisterExtModeResponse>, Status> {
    let identity = rt.identity(&req).await?;
    let descriptor =
        req.into_inner().mode_descriptor.ok_or_else(|| Status::invalid_argument("mode_descriptor is required"))?;
    Ok(Response::new(match mutate(rt, Input::RegisterExtMode { request: 0, identity, descriptor }).await? {
        Ok(_) => RegisterExtModeResponse { ok: true, error: String::new() },
        Err(e) => RegisterExtModeResponse { ok: false, error: registry_error(&e) },
    }))
}

pub(super) async fn unregister_ext_mode(
    rt: &Runtime,
    req: Request<UnregisterExtModeRequest>,
) -> Result<Response<UnregisterExtModeResponse>, Status> {
    let identity = rt.identity(&req).await?;
    let mode = req.into_inner().mode;
    Ok(Response::new(match mutate(rt, Input::UnregisterExtMode { request: 0, identity, mode }).await? {
        Ok(_) => UnregisterExtModeResponse { ok: true, error: String::new() },
        Err(e) => UnregisterExtModeResponse { ok: false, error: registry_error(&e) },
    }))
}

pub(super) async fn promote_mode(
    rt: &Runtime,
    req: Request<PromoteModeRequest>,
) -> Result<Response<PromoteModeResponse>, Status> {
    let identity = rt.identity(&req).await?;
    let r = req.into_inner();
    let input =
        Input::PromoteMode { request: 0, identity, mode: r.mode.clone(), promoted_mode_name: r.promoted_mode_name };
    Ok(Response::new(match mutate(rt, input).await? {
        Ok(mode) => PromoteModeResponse { ok: true, error: String::new(), mode },
        Err(e) => PromoteModeResponse { ok: false, error: registry_error(&e), mode: r.mode },
    }))
}

/// REGISTRY_READ_ONLY (FAILED_PRECONDITION) when the policy registry was
/// loaded from `MACP_POLICIES_DIR`: its files are the only way to change it.
fn refuse_if_read_only(rt: &Runtime, rpc: &str) -> Result<(), Status> {
    if rt.policies_read_only {
        return Err(error_status(
            ErrorCode::RegistryReadOnly,
            format!(
                "{rpc} refused: the policy registry is read-only (loaded from MACP_POLICIES_DIR); change the policy files and restart the runtime"
            ),
        ));
    }
    Ok(())
}

pub(super) async fn register_policy(
    rt: &Runtime,
    req: Request<RegisterPolicyRequest>,
) -> Result<Response<RegisterPolicyResponse>, Status> {
    let identity = rt.identity(&req).await?;
    refuse_if_read_only(rt, "RegisterPolicy")?;
    let descriptor =
        req.into_inner().policy_descriptor.ok_or_else(|| Status::invalid_argument("policy_descriptor is required"))?;
    Ok(Response::new(match mutate(rt, Input::RegisterPolicy { request: 0, identity, descriptor }).await? {
        Ok(_) => RegisterPolicyResponse { ok: true, error: String::new() },
        Err(e) => RegisterPolicyResponse { ok: false, error: registry_error(&e) },
    }))
}

pub(super) async fn unregister_policy(
    rt: &Runtime,
    req: Request<UnregisterPolicyRequest>,
) -> Result<Response<UnregisterPolicyResponse>, Status> {
    let identity = rt.identity(&req).await?;
    refuse_if_read_only(rt, "UnregisterPolicy")?;
    let policy_id = req.into_inner().policy_id;
    Ok(Response::new(match mutate(rt, Input::UnregisterPolicy { request: 0, identity, policy_id }).await? {
        Ok(_) => UnregisterPolicyResponse { ok: true, error: String::new() },
        Err(e) => UnregisterPolicyResponse { ok: false, error: registry_error(&e) },
    }))
}

pub(super) async fn get_policy(
    rt: &Runtime,
    req: Request<GetPolicyRequest>,
) -> Result<Response<GetPolicyResponse>, Status> {
    rt.identity(&req).await?;
    let policy_id = req.into_inner().policy_id;
    let mut answer = rt.ask(Query::GetPolicy { policy_id: policy_id.clone() }).await?;
    // On a cluster node: registered on another node a moment ago?
    if matches!(answer, Answer::Policy(None)) && rt.router.refresh_registries().await {
        answer = rt.ask(Query::GetPolicy { policy_id: policy_id.clone() }).await?;
    }
    match answer {
        Answer::Policy(Some(d)) => Ok(Response::new(GetPolicyResponse { policy_descriptor: Some(d) })),
        Answer::Policy(None) => Err(Status::not_found(format!("policy '{policy_id}' is not registered"))),
        _ => Err(unexpected("GetPolicy")),
    }
}

pub(super) async fn list_policies(
    rt: &Runtime,
    req: Request<ListPoliciesRequest>,
) -> Result<Response<ListPoliciesResponse>, Status> {
    rt.identity(&req).await?;
    let mode = req.into_inner().mode;
    Ok(Response::new(ListPoliciesResponse { descriptors: policies(rt, mode).await? }))
}

pub(super) async fn watch_policies(
    rt: &Runtime,
    _req: Request<WatchPoliciesRequest>,
) -> Result<Response<RpcStream<WatchPoliciesResponse>>, Status> {
    let mut rx = rt.watch.registry.subscribe();
    let (out, orx) = mpsc::channel(16);
    let rt = rt.clone();
    tokio::spawn(async move {
        loop {
            let Ok(descriptors) = policies(&rt, String::new()).await else { return };
            let msg = WatchPoliciesResponse { descriptors, observed_at_unix_ms: now_ms() };
            if out.send(Ok(msg)).await.is_err() {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(RegistryEvent::Policies) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Ok(RegistryEvent::Modes) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(orx))))
}
