//! `macp-pg-test`: a throwaway PostgreSQL server for scripts (the Python
//! SDK interop pass on the PostgreSQL backend, `tests/interop/run.sh`).
//!
//! Starts a server as [`macp_pg_test::PgServer::start`] does, creates one
//! database, prints its URL on the first line of stdout, and keeps the
//! server until its stdin closes; then stops the server and deletes its
//! directory. Closing stdin rather than a signal ends it, so the clean-up
//! runs however the calling script ends (its end closes the pipe).
//!
//! Exit codes: 0 after a clean stop, 2 when the server could not start (the
//! reason on stderr).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let started = macp_pg_test::PgServer::start()
        .and_then(|pg| pg.create_database(&macp_pg_test::unique_name("macp")).map(|url| (pg, url)));
    let (pg, url) = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("macp-pg-test: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout();
    if writeln!(out, "{url}").and_then(|()| out.flush()).is_err() {
        return ExitCode::from(2);
    }
    // Until the caller closes our stdin (or goes away).
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    drop(pg);
    ExitCode::SUCCESS
}
