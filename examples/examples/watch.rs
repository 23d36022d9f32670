//! The stream watcher: follows a session (passive StreamSession subscribe
//! with `after_sequence`) and/or the session lifecycle (WatchSessions),
//! printing every event.
//!
//! ```sh
//! # watch lifecycle events of sessions agent://alice can see
//! cargo run -p macp-examples --example watch -- --sessions
//! # replay and follow one session from its 3rd message on
//! cargo run -p macp-examples --example watch -- --as agent://alice --session <id> --after 2
//! # self-contained demo: run a decision session and watch it both ways
//! cargo run -p macp-examples --example watch -- --demo
//! ```

use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use macp_examples::cli::{fail, Connection};
use macp_examples::ids::session_id;
use macp_examples::modes::{run_session_with_id, Mode};
use macp_examples::watch::{describe_event, describe_item, follow_session, watch_sessions};
use macp_wire::v1::session_lifecycle_event::EventType;

#[derive(Parser)]
#[command(about = "Watches MACP sessions: passive stream subscribe and/or lifecycle events")]
struct Args {
    #[command(flatten)]
    connection: Connection,
    /// The identity to watch as (must be able to read the session).
    #[arg(long = "as", default_value = "agent://alice")]
    agent: String,
    /// Follow this session's stream (replay, then live, until terminal).
    #[arg(long)]
    session: Option<String>,
    /// Skip the first N envelopes of the session's history.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Print lifecycle events (WatchSessions).
    #[arg(long)]
    sessions: bool,
    /// Run a decision session in the background and watch it: lifecycle
    /// events until it resolves, then its stream from the start.
    #[arg(long)]
    demo: bool,
    /// Stop after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let timeout = args.timeout;
    let work = watch(args);
    let result = match timeout {
        Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), work).await {
            Ok(r) => r,
            Err(_) => {
                println!("(stopped after {secs} s)");
                Ok(())
            }
        },
        None => work.await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn watch(args: Args) -> macp_examples::Result<()> {
    let agents = args.connection.agents().await?;
    if args.demo {
        return demo(&agents, &args.agent).await;
    }
    if args.session.is_none() && !args.sessions {
        return Err("nothing to watch: pass --session <id>, --sessions, or --demo".into());
    }
    let follow = async {
        if let Some(sid) = &args.session {
            let mut c = agents.client(&args.agent);
            let n = follow_session(&mut c, sid, args.after, |item| {
                println!("[session] {}", describe_item(item));
                ControlFlow::Continue(())
            })
            .await?;
            println!("[session] stream ended after {n} item(s): the session is terminal");
        }
        macp_examples::Result::Ok(())
    };
    let lifecycle = async {
        if args.sessions {
            let mut c = agents.client(&args.agent);
            watch_sessions(&mut c, |ev| {
                println!("[lifecycle] {}", describe_event(ev));
                ControlFlow::Continue(())
            })
            .await?;
        }
        macp_examples::Result::Ok(())
    };
    let (a, b) = tokio::join!(follow, lifecycle);
    a.and(b)
}

async fn demo(agents: &macp_examples::client::Agents, watcher: &str) -> macp_examples::Result<()> {
    let mut c = agents.client(watcher);
    let sid = session_id();
    let runner = agents.clone();
    let demo_sid = sid.clone();
    let session = tokio::spawn(async move {
        // Give WatchSessions a moment to subscribe before the session starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        run_session_with_id(&runner, Mode::Decision, demo_sid, |_| {}).await
    });
    println!("watching lifecycle events as {watcher} while decision session {sid} runs…");
    watch_sessions(&mut c, |ev| {
        println!("[lifecycle] {}", describe_event(ev));
        let ours = ev.session.as_ref().is_some_and(|s| s.session_id == sid);
        if ours && ev.event_type != EventType::Created as i32 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await?;
    session.await??;
    println!("\nreplaying session {sid} from the start (passive subscribe, after_sequence 0):");
    let n = follow_session(&mut c, &sid, 0, |item| {
        println!("[session] {}", describe_item(item));
        ControlFlow::Continue(())
    })
    .await?;
    println!("[session] stream ended after {n} item(s): the session is terminal");
    Ok(())
}
