//! `macp-bench`: a closed-loop load generator for a local MACP runtime.
//! Prints a table and one JSON line; see `macp_examples::bench`.
//!
//! ```sh
//! cargo run --release -p macp-examples --bin macp-bench -- \
//!     --workload decision --concurrency 16 --duration 10s --warmup 2s
//! # open 100,000 sessions and leave them open (for RSS and restart measurements)
//! macp-bench --workload open-sessions --sessions 100000 --concurrency 64
//! # wait until a (re)starting server answers and has recovered two sessions
//! macp-bench probe --timeout 600s --expect-session <id> --expect-session <id>
//! # what an ended session still answers, and that it is gone past retention
//! macp-bench retention-check --retention 30s
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use macp_examples::bench::{open_sessions, parse_duration, probe, run, BenchConfig, OpenConfig, ProbeConfig, Workload};
use macp_examples::client::{AuthMode, DEFAULT_ADDR};
use macp_examples::retention::{check, RetentionConfig};

#[derive(Parser)]
#[command(
    name = "macp-bench",
    about = "Closed-loop load generator for a local MACP runtime (loopback only)",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Runtime address; must resolve to loopback.
    #[arg(long, env = "MACP_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Concurrent closed-loop workers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections the workers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Measured time (e.g. 10s, 500ms, 1m). Not used by open-sessions.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Unmeasured warm-up before it. Not used by open-sessions.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// How dev identities are sent.
    #[arg(long, value_enum, default_value_t = AuthMode::AgentHeader)]
    auth: AuthMode,
    /// What each worker sends.
    #[arg(long, value_enum, default_value_t = CliWorkload::Decision)]
    workload: CliWorkload,
    /// open-sessions: how many sessions to open (and leave open, TTL 1 h).
    #[arg(long, default_value_t = 100_000)]
    sessions: u64,
    /// The server's process id (a server on this machine): report its CPU
    /// time in the measured window, and per Send. Not used by open-sessions.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Threads the load generator runs on. 1 (a single-threaded runtime)
    /// leaves the most CPU to a server on the same machine; raise it only
    /// when the generator, not the server, is the limit (its own CPU shows
    /// in `time macp-bench ...`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    client_threads: u16,
}

/// The workloads of `--workload`: the timed ones of `bench::run`, plus
/// `open-sessions`, which is count-bound (`bench::open_sessions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CliWorkload {
    /// A full decision session per worker iteration (5 Sends).
    Decision,
    /// Ambient Signals.
    Signals,
    /// SessionStart only.
    Starts,
    /// Open exactly --sessions sessions and leave them open; prints the ids of
    /// the first and the last one for `probe --expect-session`.
    OpenSessions,
}

#[derive(Subcommand)]
enum Command {
    /// Wait until a server answers (and has recovered given sessions); print how long that took.
    ///
    /// Retries connect + Initialize (+ GetSession of each --expect-session, as
    /// its initiator, which must be OPEN) until all succeed, and prints the
    /// time since the probe started. Started together with a server, that is
    /// the server's time to ready, recovery included. Exits non-zero if the
    /// server was not ready within --timeout.
    Probe {
        /// Runtime address; must resolve to loopback.
        #[arg(long, env = "MACP_ADDR", default_value = DEFAULT_ADDR)]
        addr: String,
        /// Give up after this long.
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        timeout: Duration,
        /// How dev identities are sent.
        #[arg(long, value_enum, default_value_t = AuthMode::AgentHeader)]
        auth: AuthMode,
        /// A session opened by `--workload open-sessions` that must have been
        /// recovered (repeatable).
        #[arg(long = "expect-session")]
        expect_sessions: Vec<String>,
    },
    /// Check what an ended session still answers, end to end (after a soak).
    ///
    /// Runs one decision session to resolution; checks GetSession (RESOLVED),
    /// a passive subscribe replay (every envelope, identical) and a resent
    /// message id (duplicate). With --retention, waits until the session is
    /// past it and checks the documented codes. Leaves one session open and
    /// prints its id, for `probe --expect-session` after a restart.
    RetentionCheck {
        /// Runtime address; must resolve to loopback.
        #[arg(long, env = "MACP_ADDR", default_value = DEFAULT_ADDR)]
        addr: String,
        /// How dev identities are sent.
        #[arg(long, value_enum, default_value_t = AuthMode::AgentHeader)]
        auth: AuthMode,
        /// The server's history retention (omit for forever).
        #[arg(long, value_parser = parse_duration)]
        retention: Option<Duration>,
        /// How long past the retention deletion may take.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        grace: Duration,
    },
}

/// mimalloc, as in the server: with the system allocator the load
/// generator spent about a tenth of its time in malloc's arena locks, CPU
/// the server under test did not get (BENCHMARKS.md, "Eighth rerun").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let a = Args::parse();
    // The load generator must cost less than the server it measures: on
    // the shared cores of a benchmark machine every microsecond it spends
    // is one the server does not get. One thread (the default) has no lock
    // contention on the shared HTTP/2 connection and no wake-ups between
    // workers: 24 -> 10 us of client CPU per Signal.
    let mut runtime = if a.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(a.client_threads.into());
        b
    };
    match runtime.enable_all().build() {
        Ok(rt) => rt.block_on(run_command(a)),
        Err(e) => {
            eprintln!("macp-bench: cannot start a runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(a: Args) -> ExitCode {
    let printed = match a.command {
        Some(Command::Probe { addr, timeout, auth, expect_sessions }) => {
            probe(ProbeConfig { addr, timeout, auth, expect_sessions }).await.map(|r| {
                print!("{}", r.table());
                println!("{}", r.json());
                r.ready
            })
        }
        Some(Command::RetentionCheck { addr, auth, retention, grace }) => {
            check(RetentionConfig { addr, auth, retention, grace }).await.map(|r| {
                print!("{}", r.table());
                println!("{}", r.json());
                r.ok(retention)
            })
        }
        None => match a.workload {
            CliWorkload::OpenSessions => open_sessions(OpenConfig {
                addr: a.addr,
                sessions: a.sessions,
                concurrency: a.concurrency,
                connections: a.connections,
                auth: a.auth,
            })
            .await
            .map(|r| {
                print!("{}", r.table());
                println!("{}", r.json());
                r.opened == r.config.sessions
            }),
            CliWorkload::Decision => run_timed(a, Workload::Decision).await,
            CliWorkload::Signals => run_timed(a, Workload::Signals).await,
            CliWorkload::Starts => run_timed(a, Workload::Starts).await,
        },
    };
    match printed {
        Ok(true) => ExitCode::SUCCESS,
        // The report is printed; it says what fell short.
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("macp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a timed workload (`bench::run`) and prints its report.
async fn run_timed(a: Args, workload: Workload) -> macp_examples::Result<bool> {
    let cfg = BenchConfig {
        addr: a.addr,
        concurrency: a.concurrency,
        connections: a.connections,
        duration: a.duration,
        warmup: a.warmup,
        auth: a.auth,
        workload,
        server_pid: a.server_pid,
    };
    let r = run(cfg).await?;
    print!("{}", r.table());
    println!("{}", r.json());
    Ok(true)
}
