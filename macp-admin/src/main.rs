//! # macp-admin
//!
//! The operator's tool for macp-rs: look into a data directory or a
//! server's PostgreSQL database, check it, export it, and watch a running
//! server, without writing code.
//!
//! ```text
//! macp-admin inspect  DATA_DIR [--json]          format, segments, checkpoint, sessions by mode and state, size
//! macp-admin verify   DATA_DIR [--json]          every checksum + a full replay through the kernel; exit 0 healthy, 1 damaged
//! macp-admin sessions DATA_DIR [--state S] [--mode M] [--json]
//! macp-admin history  DATA_DIR SESSION_ID        accepted history as JSON lines, payloads decoded
//! macp-admin export   DATA_DIR --out FILE        every session's history as JSON lines
//! macp-admin tail     --addr URL [--token T | --dev-sender S]
//! macp-admin receipt  --addr URL SESSION_ID [--verify]
//! ```
//!
//! Every data command takes `--database-url URL` (or `MACP_DATABASE_URL`)
//! instead of `DATA_DIR` for a server run with `--storage postgres`:
//! `macp-admin history --database-url postgres://macp@db:5432/macp SESSION_ID`.
//! Exactly one of the two: both (also `DATA_DIR` while `MACP_DATABASE_URL`
//! is set), or neither, is a usage error (exit 2). Put the flag before or
//! after the positional arguments, not between them.
//!
//! ## Reading a data directory never writes to it
//!
//! The data-directory commands open the directory with
//! `FsStorage::open_read_only` (macp-storage-fs): the same file backend and
//! the same recovery (`macp_pipeline::recover`) the server runs, over a file
//! system whose files are opened read-only and whose writes (truncating a
//! torn tail, redb's bookkeeping) stay in memory. They take the directory's
//! `LOCK` file **shared**: while a server holds it (exclusively) they refuse
//! with exit code 2 and say so — stop the server or work on a copy
//! (`cp -a`); while they hold it, a server refuses to start on the
//! directory rather than write under a reader. A copy without a `LOCK`
//! file is read without one.
//!
//! ## Reading a database never writes to it, even beside its server
//!
//! With `--database-url` the commands open the server's schema (`macp`)
//! with `PgStorage::open_read_only` (macp-storage-pg) and run the same
//! recovery over it, so `sessions`, `history` and `export` print exactly
//! what they print for a data directory. That storage uses one connection
//! with `default_transaction_read_only` on and one `REPEATABLE READ READ
//! ONLY` transaction for the whole command: every read sees one snapshot,
//! consistent while the server goes on writing, so there is no need to
//! stop the server. It takes no advisory lock (the server's is not
//! touched), creates nothing and migrates nothing: a database without the
//! macp schema, or with one this build does not read (older, newer), is
//! refused with exit 2. The password of the URL is never printed.
//!
//! On a database, `inspect` reports the schema version, the log's rows and
//! positions, the checkpoint (the position it covers up to, its size, when
//! it was taken), the ended sessions kept, the tables' size
//! (`pg_total_relation_size`), and the sessions by mode and state (there
//! are no segments). `verify` decodes every row of the log (one that does
//! not decode is `DAMAGE macp_records position N`), replays them all and
//! compares with the checkpoint while the positions run from 1 without a
//! gap (rows deleted by retention make a note, not damage), runs the
//! server's recovery, reads back every ended session, and checks that
//! every session the replay saw end has its summary; its JSON names a
//! problem's row as `file` (the table) and `position`.
//!
//! ## Exit codes
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success; for `verify`: healthy (a torn tail, which recovery truncates, is reported but healthy) |
//! | 1 | `verify`: damage found; `receipt --verify`: the receipt does not verify |
//! | 2 | usage error, I/O error, not a data directory (or not a macp-rs database), locked by a running server, server or database unreachable |
//!
//! ## JSON lines
//!
//! `history` and `export` write one JSON object per accepted record:
//! `session_id`, `seq`, `at_unix_ms`, `kind` (`started`, `accepted`,
//! `cancelled`, `suspended`, `resumed`, `expired`), and for records that
//! carry one the `envelope` with its fields, `payload_base64` (the exact
//! bytes) and `payload` (the payload decoded by message type into proto3
//! JSON from the wire schema, or `null` with `payload_error` when it does
//! not decode). The envelopes, in order, are what passive subscribe
//! (StreamSession from `after_sequence` 0) returns for the session.
//!
//! ## Dependencies added for it
//!
//! - `indicatif` (no default features): progress of `verify` and `export`
//!   on a terminal; it draws nothing when stderr is not a terminal, so
//!   piped and scripted runs stay quiet.
//! - `prost-reflect` (feature `serde`): decoding payloads by message type
//!   into proto3 JSON from the descriptor set macp-wire already embeds,
//!   instead of a hand-written converter per message type.
#![forbid(unsafe_code)]

mod data;
mod json;
mod progress;
mod remote;
mod source;
mod verify;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use source::Where;

/// Operator CLI for macp-rs data directories, databases and running servers.
#[derive(Parser, Debug)]
#[command(name = "macp-admin", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Format version, segments, checkpoint, open and ended sessions by mode
    /// and state, total size (for a database: schema version, log
    /// positions, checkpoint, sessions, the tables' size).
    Inspect {
        #[command(flatten)]
        from: Where,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Checks every checksum of every segment (every row of a database
    /// decodes) and replays the whole log through the kernel, compared with
    /// the checkpoint. Exit code 0: healthy; 1: damaged; 2: could not check.
    Verify {
        #[command(flatten)]
        from: Where,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists sessions (open and ended).
    Sessions {
        #[command(flatten)]
        from: Where,
        /// Only sessions in this state (open, suspended, resolved, expired,
        /// cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only sessions of this mode (e.g. macp.mode.decision.v1).
        #[arg(long)]
        mode: Option<String>,
        /// One JSON object per line instead of text columns.
        #[arg(long)]
        json: bool,
    },
    /// A session's accepted history as JSON lines, payloads decoded.
    #[command(allow_missing_positional = true)]
    History {
        #[command(flatten)]
        from: Where,
        /// The session.
        session_id: String,
    },
    /// Every session's history (open and ended) as JSON lines.
    Export {
        #[command(flatten)]
        from: Where,
        /// Where to write (`-` for stdout).
        #[arg(long)]
        out: PathBuf,
    },
    /// Follows a running server: lifecycle events (WatchSessions) and every
    /// session's accepted envelopes (passive StreamSession), as JSON lines.
    Tail {
        #[command(flatten)]
        conn: remote::Conn,
        /// Stop after this many lines (default: follow until interrupted).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Fetches a session's decision receipt (GetDecisionReceipt).
    Receipt {
        #[command(flatten)]
        conn: remote::Conn,
        /// The session.
        session_id: String,
        /// Verify it against the server's keys (GetReceiptKeys); exit 1 if
        /// it does not verify.
        #[arg(long)]
        verify: bool,
    },
}

/// Why a command could not do its work (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The storage layer refused or failed.
    #[error("{0}")]
    Storage(#[from] macp_storage::StorageError),
    /// The database holds no macp-rs schema this build can read (missing,
    /// not ours, or at a version only a server migrates).
    #[error("{place} is not a macp-rs database: {reason}")]
    NotOurs {
        /// The database without its password, and the schema.
        place: String,
        /// What was found instead.
        reason: String,
    },
    /// Recovery could not rebuild the state.
    #[error("{0}")]
    Recovery(#[from] macp_pipeline::RecoveryError),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// The server could not be reached or refused.
    #[error("{0}")]
    Remote(String),
    /// The command line asks for something that cannot be.
    #[error("{0}")]
    Usage(String),
}

/// What a command ended with, besides errors.
pub enum Outcome {
    /// Exit 0.
    Ok,
    /// Exit 1: damage found, or a receipt that does not verify.
    Failed,
}

fn run(cli: Cli) -> Result<Outcome, AdminError> {
    match cli.command {
        Command::Inspect { from, json } => data::inspect(&from.source()?, json).map(|()| Outcome::Ok),
        Command::Verify { from, json } => verify::verify(&from.source()?, json),
        Command::Sessions { from, state, mode, json } => {
            data::sessions(&from.source()?, state.as_deref(), mode.as_deref(), json).map(|()| Outcome::Ok)
        }
        Command::History { from, session_id } => data::history(&from.source()?, &session_id).map(|()| Outcome::Ok),
        Command::Export { from, out } => data::export(&from.source()?, &out).map(|()| Outcome::Ok),
        Command::Tail { conn, limit } => remote::tail(&conn, limit).map(|()| Outcome::Ok),
        Command::Receipt { conn, session_id, verify } => remote::receipt(&conn, &session_id, verify),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Err(AdminError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "macp-admin: {e}");
            ExitCode::from(2)
        }
    }
}
