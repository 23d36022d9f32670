//! Error statuses name their MACP registry code in `macp-error-code`
//! metadata, which `macp-sdk-python` reads into `MacpTransportError.macp_code`
//! and `macp_error_code()` (several registry codes share one gRPC status).
//! Found by the interop suite (tests/interop/): without it, the SDK reported
//! `macp_code=None` for every status from this runtime.

mod common;

use std::time::Duration;

use common::*;
use macp_transport_grpc::service::ERROR_CODE_KEY;
use macp_wire::v1::*;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

const T: Duration = Duration::from_secs(5);

fn macp_code(s: &Status) -> &str {
    s.metadata().get(ERROR_CODE_KEY).and_then(|v| v.to_str().ok()).unwrap_or("<none>")
}

#[track_caller]
fn check(s: Status, status: Code, registry: &str) {
    assert_eq!((s.code(), macp_code(&s)), (status, registry), "{s:?}");
}

async fn subscribe_error(c: &mut Client, s: &str) -> Status {
    let req = StreamSessionRequest { subscribe_session_id: s.to_string(), ..Default::default() };
    let reqs = tokio_stream::iter(vec![req]).chain(tokio_stream::pending());
    let mut out = c.stream_session(reqs).await.unwrap().into_inner();
    tokio::time::timeout(T, out.next()).await.expect("in time").expect("an item").expect_err("a status")
}

#[tokio::test]
async fn error_statuses_carry_the_registry_code() {
    let srv = Server::start(&[]).await;
    let mut i = srv.client("I").await;
    let mut z = srv.client("Z").await;
    let s = start_session(&mut i).await;

    let get = |sid: &str| GetSessionRequest { session_id: sid.to_string() };
    check(i.get_session(get(&sid())).await.unwrap_err(), Code::NotFound, "SESSION_NOT_FOUND");
    check(z.get_session(get(&s)).await.unwrap_err(), Code::PermissionDenied, "FORBIDDEN");
    let mut anon = srv.anonymous().await;
    check(anon.get_session(get(&s)).await.unwrap_err(), Code::Unauthenticated, "UNAUTHENTICATED");

    let cancel = |sid: &str| CancelSessionRequest { session_id: sid.to_string(), reason: "r".into() };
    check(z.cancel_session(cancel(&s)).await.unwrap_err(), Code::PermissionDenied, "FORBIDDEN");
    check(i.cancel_session(cancel(&sid())).await.unwrap_err(), Code::NotFound, "SESSION_NOT_FOUND");

    // On a streaming call the status comes after the response headers.
    check(subscribe_error(&mut z, &s).await, Code::PermissionDenied, "FORBIDDEN");
    check(subscribe_error(&mut i, &sid()).await, Code::NotFound, "SESSION_NOT_FOUND");

    let init = InitializeRequest { supported_protocol_versions: vec!["2.0".into()], ..Default::default() };
    check(i.initialize(init).await.unwrap_err(), Code::FailedPrecondition, "UNSUPPORTED_PROTOCOL_VERSION");

    // A malformed non-envelope request is INVALID_REQUEST (SDK 0.22 table).
    let list = ListSessionsRequest { page_size: 1, page_token: "not a token".into() };
    check(i.list_sessions(list).await.unwrap_err(), Code::InvalidArgument, "INVALID_REQUEST");
}

/// Every registry code has its gRPC status, including the control-plane
/// codes `macp-sdk-python` 0.22 knows; the status carries the code.
#[test]
fn the_new_control_plane_codes_map_like_the_sdk_expects() {
    use macp_kernel::{ErrorCode, KernelError};
    use macp_transport_grpc::status::status as status_of;
    for (code, status, name) in [
        (ErrorCode::ReceiptUnavailable, Code::FailedPrecondition, "RECEIPT_UNAVAILABLE"),
        (ErrorCode::HistoryUnavailable, Code::FailedPrecondition, "HISTORY_UNAVAILABLE"),
        (ErrorCode::RegistryReadOnly, Code::FailedPrecondition, "REGISTRY_READ_ONLY"),
        (ErrorCode::StreamLagged, Code::ResourceExhausted, "STREAM_LAGGED"),
        (ErrorCode::InvalidRequest, Code::InvalidArgument, "INVALID_REQUEST"),
        (ErrorCode::PolicyDenied, Code::PermissionDenied, "POLICY_DENIED"),
        (ErrorCode::UnknownPolicyVersion, Code::NotFound, "UNKNOWN_POLICY_VERSION"),
    ] {
        check(status_of(KernelError::new(code, "m")), status, name);
    }
}
