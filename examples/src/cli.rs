//! Command-line plumbing the example programs share, so each program's
//! `main` is one call.

use std::process::ExitCode;

use clap::{Args, Parser};

use crate::client::{Agents, AuthMode, DEFAULT_ADDR};
use crate::modes::{run_session, Mode};
use crate::transcript::{describe_session, state_name};

/// Where the runtime is and how to authenticate: every program takes these.
#[derive(Clone, Debug, Args)]
pub struct Connection {
    /// Runtime address (`host:port`).
    #[arg(long, env = "MACP_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// How dev identities are sent.
    #[arg(long, value_enum, default_value_t = AuthMode::AgentHeader)]
    pub auth: AuthMode,
}

impl Connection {
    /// Connects and returns the agents' shared connection.
    pub async fn agents(&self) -> crate::Result<Agents> {
        Agents::connect(&self.addr, self.auth).await
    }
}

/// Flags of a mode example.
#[derive(Clone, Debug, Parser)]
#[command(about = "Runs one complete MACP session against a dev-mode runtime, acting as every agent")]
pub struct ModeArgs {
    #[command(flatten)]
    /// The runtime.
    pub connection: Connection,
}

/// The whole `main` of a mode example: parse flags, run the session,
/// print the transcript and the final state. Exits non-zero when the
/// session did not resolve.
pub async fn mode_main(mode: Mode) -> ExitCode {
    let args = ModeArgs::parse();
    println!("{} session against {} (auth {})\n", mode.id(), args.connection.addr, args.connection.auth.as_str());
    let agents = match args.connection.agents().await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    match run_session(&agents, mode, |step| println!("{step}\n")).await {
        Ok(run) => {
            println!("final state (GetSession):\n{}", describe_session(&run.final_state));
            let state = state_name(run.final_state.state);
            if state == "SESSION_STATE_RESOLVED" {
                ExitCode::SUCCESS
            } else {
                eprintln!("session ended in {state}, expected RESOLVED");
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(e),
    }
}

/// Prints an error and returns a failing exit code.
pub fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
