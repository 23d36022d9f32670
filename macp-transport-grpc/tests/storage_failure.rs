//! DIGEST §9 row 119: a storage failure acknowledges nothing, and the state
//! stays equal to what is durable, so a retry is not a duplicate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use macp_kernel::{Identity, Input, Kernel, KernelConfig, Reply};
use macp_transport_grpc::driver::{Command, Driver, History, Journal};
use macp_transport_grpc::hub::Hub;
use macp_transport_grpc::journal::MemoryJournal;
use macp_wire::storage::Record;
use macp_wire::v1::{Envelope, SessionStartPayload};
use macp_wire::Message;
use tokio::sync::oneshot;

/// A memory journal whose sync fails while `fail` is set; what failed to
/// sync is dropped, as a crashed disk write would be.
struct FlakyJournal {
    durable: MemoryJournal,
    pending: Vec<Record>,
    fail: Arc<AtomicBool>,
}

impl Journal for FlakyJournal {
    fn append(&mut self, records: Vec<Record>) -> Result<(), String> {
        self.pending.extend(records);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        let batch = std::mem::take(&mut self.pending);
        if self.fail.load(Ordering::SeqCst) {
            return Err("injected fdatasync failure".into());
        }
        self.durable.append(batch)
    }
    fn recover(&mut self, config: &KernelConfig) -> Result<Kernel, String> {
        self.pending.clear();
        self.durable.recover(config)
    }
    fn checkpoint(&mut self, _kernel: &Kernel) -> Result<(), String> {
        Ok(())
    }
    fn history(&self) -> Arc<dyn History> {
        self.durable.history()
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
    let journal = FlakyJournal { durable: MemoryJournal::default(), pending: Vec::new(), fail: fail.clone() };
    let (driver, tx) = Driver::new(Kernel::new(KernelConfig::default()), Box::new(journal), Hub::default(), 0);
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
