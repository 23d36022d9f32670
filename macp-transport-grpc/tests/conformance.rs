//! Every spec conformance vector, run through the real server over gRPC
//! (the kernel runs them directly in macp-kernel/tests/conformance.rs).

mod common;

use std::path::PathBuf;

use common::*;
use macp_wire::conformance::{load_dir, run_vector, Target};
use macp_wire::v1::{
    Ack, Envelope, GetSessionRequest, PolicyDescriptor, RegisterPolicyRequest, SendRequest, SessionState,
};

struct ServerTarget {
    rt: tokio::runtime::Runtime,
    server: Server,
}

impl ServerTarget {
    fn client(&self, who: &str) -> Client {
        self.rt.block_on(self.server.bearer(who))
    }
}

impl Target for ServerTarget {
    fn register_policy(&mut self, descriptor: PolicyDescriptor) -> Result<(), String> {
        let mut c = self.client("conformance-admin");
        let r = self
            .rt
            .block_on(c.register_policy(RegisterPolicyRequest { policy_descriptor: Some(descriptor) }))
            .map_err(|e| e.to_string())?
            .into_inner();
        if r.ok {
            Ok(())
        } else {
            Err(r.error)
        }
    }

    fn send(&mut self, envelope: Envelope) -> Result<Ack, String> {
        let mut c = self.client(&envelope.sender);
        let r = self.rt.block_on(c.send(SendRequest { envelope: Some(envelope) })).map_err(|e| e.to_string())?;
        r.into_inner().ack.ok_or_else(|| "SendResponse without ack".to_string())
    }

    fn session_state(&mut self, session_id: &str) -> Result<SessionState, String> {
        let mut c = self.client(OBSERVER_TOKEN);
        let md = self
            .rt
            .block_on(c.get_session(GetSessionRequest { session_id: session_id.to_string() }))
            .map_err(|e| e.to_string())?
            .into_inner()
            .metadata
            .ok_or("GetSession without metadata")?;
        SessionState::try_from(md.state).map_err(|e| e.to_string())
    }
}

/// A static token with observer rights, so the harness can read any session.
const OBSERVER_TOKEN: &str = "conformance-observer-token";

#[test]
fn every_vector_passes_through_the_server() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let tokens = format!(r#"[{{"token":"{OBSERVER_TOKEN}","sender":"conformance-observer","is_observer":true}}]"#);
    let server = rt.block_on(Server::start(&["--auth-tokens-json", &tokens]));
    let mut target = ServerTarget { rt, server };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
    let files = load_dir(&dir).expect("vectors load");
    assert_eq!(files.len(), 33, "the spec ships 33 session vectors (conformance-next)");
    let mut failures = Vec::new();
    let mut passed = 0;
    for f in &files {
        let v = f.vector.as_ref().expect("vector parses");
        match run_vector(&f.name, v, &mut target) {
            Ok(_) => passed += 1,
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{} of {} vectors failed:\n{}", failures.len(), files.len(), failures.join("\n"));
    assert_eq!(passed, 33);
}
