//! DIGEST §9 row 119: a storage failure acknowledges nothing, and the state
//! stays equal to what is durable, so a retry is not a duplicate. The driver
//! reopens storage and recovers from it without stopping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use macp_kernel::{Identity, Input, KernelConfig, Reply};
use macp_pipeline::CheckpointPolicy;
use macp_storage::{
    LoadEvent, LoadSummary, Maintenance, MemoryStorage, Record, SessionSummary, Storage, StorageError, StorageRead,
};
use macp_transport_grpc::driver::{Command, Driver};
use macp_transport_grpc::hub::Hub;
use macp_wire::v1::{Envelope, SessionStartPayload};
use macp_wire::Message;
use tokio::sync::oneshot;

/// The memory backend, whose sync fails while `fail` is set; what failed to
/// sync is dropped, as a crashed disk write would be.
struct Flaky {
    inner: MemoryStorage,
    fail: Arc<AtomicBool>,
}

impl Storage for Flaky {
    fn load(
        &mut self,
        cancelled: &dyn Fn() -> bool,
        visit: &mut dyn FnMut(LoadEvent<'_>) -> Result<(), StorageError>,
    ) -> Result<LoadSummary, StorageError> {
        self.inner.load(cancelled, visit)
    }
    fn append(&mut self, records: &[Record], ended: &[SessionSummary]) -> Result<(), StorageError> {
        self.inner.append(records, ended)
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        if self.fail.load(Ordering::SeqCst) {
            self.inner.crash();
            return Err(StorageError::io("fdatasync", "/flaky", std::io::Error::other("injected failure")));
        }
        self.inner.sync()
    }
    fn checkpoint(&mut self, open_state: &[u8]) -> Result<(), StorageError> {
        self.sync()?;
        self.inner.checkpoint(open_state)
    }
    fn maintain(&mut self, now_ms: i64) -> Result<Maintenance, StorageError> {
        self.inner.maintain(now_ms)
    }
    fn reader(&self) -> Arc<dyn StorageRead> {
        self.inner.reader()
    }
}

fn start() -> Envelope {
    let p = SessionStartPayload {
        participants: vec!["I".into(), "A".into()],
        mode_version: "1.0.0".into(),
        configuration_version: "cfg-1".into(),
        ttl_ms: 60_000,
        ..Default::default()
    };
    Envelope {
        macp_version: "1.0".into(),
        mode: "macp.mode.decision.v1".into(),
        message_type: "SessionStart".into(),
        message_id: "start-1".into(),
        session_id: "9b2f3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d".into(),
        sender: "I".into(),
        timestamp_unix_ms: 0,
        payload: p.encode_to_vec(),
    }
}

async fn submit(tx: &tokio::sync::mpsc::Sender<Command>, e: Envelope) -> macp_wire::v1::Ack {
    let (reply, rx) = oneshot::channel();
    let input = Input::Envelope { request: 0, identity: Identity::new("I"), envelope: e };
    tx.send(Command::Submit { input, reply, bind: None }).await.unwrap();
    match rx.await.unwrap() {
        Reply::Session { at_unix_ms, result } => macp_transport_grpc::status::ack("s", "m", at_unix_ms, result),
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test]
async fn row_119_storage_failure_acks_nothing() {
    let fail = Arc::new(AtomicBool::new(true));
    let base = MemoryStorage::default();
    let storage = Box::new(Flaky { inner: base.reopen(), fail: fail.clone() });
    let reopen = {
        let fail = fail.clone();
        Box::new(move || Ok(Box::new(Flaky { inner: base.reopen(), fail: fail.clone() }) as Box<dyn Storage>))
    };
    let (driver, tx, _) =
        Driver::recover(KernelConfig::default(), storage, reopen, Hub::default(), CheckpointPolicy::default(), &|| {
            false
        })
        .unwrap();
    let task = tokio::spawn(driver.run());
    let ack = submit(&tx, start()).await;
    assert!(!ack.ok);
    assert_eq!(ack.error.as_ref().unwrap().code, "INTERNAL_ERROR");
    fail.store(false, Ordering::SeqCst);
    let ack = submit(&tx, start()).await;
    assert!(ack.ok, "{:?}", ack.error);
    assert!(!ack.duplicate, "the failed attempt left no dedup slot");
    let ack = submit(&tx, start()).await;
    assert!(ack.ok && ack.duplicate);
    drop(tx);
    task.await.unwrap().unwrap();
}
