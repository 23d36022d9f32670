//! # macp-pg-test
//!
//! Tests only: a throwaway PostgreSQL server for the tests of the
//! PostgreSQL storage backend (`macp-storage-pg`), of the server on it
//! (`macp-transport-grpc`), and of anything later built on PostgreSQL
//! (cluster mode). No mock and no shared server: every test binary starts
//! its own from the PostgreSQL binaries installed on the machine, in a
//! temporary directory, and stops it and deletes the directory when done.
//!
//! ```no_run
//! let pg = macp_pg_test::PgServer::shared().expect("a throwaway PostgreSQL");
//! let url = pg.create_database(&macp_pg_test::unique_name("demo")).expect("a database");
//! // ... connect to `url` ...
//! ```
//!
//! ## How the server is started, and why
//!
//! - **Binaries**: `$MACP_PG_BINDIR` if set; else Debian's layout
//!   (`/usr/lib/postgresql/<major>/bin`, the newest major first), which is
//!   what `apt-get install postgresql` gives; else `initdb` and `pg_ctl` on
//!   the `PATH`. When none is found and the tests run as root on Debian,
//!   the package is installed (`apt-get install postgresql`, once per test
//!   binary; `MACP_PG_NO_INSTALL=1` forbids it), so `cargo test` works on
//!   a fresh machine. Otherwise missing binaries are an error that says how
//!   to install them: a test that silently skipped would pass without
//!   testing anything.
//! - **User**: PostgreSQL refuses to run as root. As root, `initdb` and
//!   `pg_ctl` run as `$MACP_PG_TEST_USER`, else the `postgres` user the
//!   Debian package creates, else `nobody`, through `runuser`; the
//!   temporary directory is handed to that user. As anyone else they run
//!   as that user.
//! - **Cluster**: `initdb --no-sync` (a throwaway cluster need not survive
//!   a power cut of the machine before its first checkpoint), trust
//!   authentication, superuser `postgres`, UTF-8 with the C locale. The
//!   server itself keeps `fsync = on` and `synchronous_commit = on`, so a
//!   commit costs what it costs in production.
//! - **Network**: loopback only (`127.0.0.1` on a free port, found by
//!   binding port 0; retried on another port if taken meanwhile) and a
//!   Unix socket in the temporary directory (under `/tmp` when root, or
//!   when `$TMPDIR` is too long for a socket path; else `$TMPDIR`).
//! - **Lifetime**: [`PgServer`] stops the server (`pg_ctl stop -m
//!   immediate`) and deletes the directory when dropped, also when a test
//!   panics. [`PgServer::shared`] gives every test of one test binary the
//!   same server while any of them holds it, so a binary pays for one
//!   `initdb` (about a second); each test isolates itself in its own
//!   database ([`PgServer::create_database`]) or schema ([`unique_name`]).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Superuser of the throwaway cluster.
pub const SUPERUSER: &str = "postgres";

/// Why a throwaway server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum PgTestError {
    /// No PostgreSQL server binaries on this machine.
    #[error("PostgreSQL's server binaries (initdb, pg_ctl) were not found (looked in {searched}); install them (Debian: apt-get install -y postgresql) or point MACP_PG_BINDIR at them")]
    NotInstalled {
        /// Where they were looked for.
        searched: String,
    },
    /// Running as root without a user to run PostgreSQL as.
    #[error("running as root, PostgreSQL must run as an unprivileged user, and user '{0}' does not exist (set MACP_PG_TEST_USER)")]
    NoUser(String),
    /// A file-system or process call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A PostgreSQL tool exited with an error.
    #[error("{what} failed ({status}):\n{output}")]
    Failed {
        /// The command.
        what: String,
        /// Its exit status.
        status: String,
        /// What it printed (and the server log's tail, for a failed start).
        output: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PgTestError {
    let what = what.into();
    move |source| PgTestError::Io { what, source }
}

/// A running throwaway PostgreSQL server; dropping it stops the server and
/// deletes its directory.
#[derive(Debug)]
pub struct PgServer {
    /// The temporary directory: data directory, log, Unix socket.
    root: PathBuf,
    bin: PathBuf,
    /// `(name, uid, gid)` of the user the server runs as, when we are root.
    run_as: Option<(String, u32, u32)>,
    port: u16,
    started: bool,
}

impl PgServer {
    /// Creates a cluster in a new temporary directory and starts it.
    pub fn start() -> Result<PgServer, PgTestError> {
        let bin = find_bindir()?;
        let run_as = if running_as_root() { Some(test_user()?) } else { None };
        // The server's user must reach the directory (a root-only TMPDIR
        // would not do), and its socket path must stay within the 107
        // bytes a Unix socket address holds.
        let tmp = std::env::temp_dir();
        let base = if run_as.is_some() || tmp.as_os_str().len() > 60 { PathBuf::from("/tmp") } else { tmp };
        let root = base.join(unique_name("macp-pg"));
        std::fs::DirBuilder::new().mode(0o700).create(&root).map_err(io_err(format!("creating {}", root.display())))?;
        // From here on, dropping `server` removes the directory.
        let mut server = PgServer { root, bin, run_as, port: 0, started: false };
        if let Some((_, uid, gid)) = &server.run_as {
            std::os::unix::fs::chown(&server.root, Some(*uid), Some(*gid))
                .map_err(io_err(format!("handing {} to the server's user", server.root.display())))?;
        }
        let data = server.data_dir();
        server.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-locale".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let mut conf = String::from("\n# macp-pg-test\n");
        let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
        let _ = writeln!(conf, "unix_socket_directories = '{}'", server.root.display());
        let _ = writeln!(conf, "fsync = on\nsynchronous_commit = on");
        let _ = writeln!(conf, "shared_buffers = 32MB\nmax_connections = 100\nlogging_collector = off");
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).map_err(io_err("reading postgresql.conf"))?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text).map_err(io_err("writing postgresql.conf"))?;
        let log = server.root.join("server.log");
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let started = server.run(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "-o".as_ref(),
                    format!("-p {port}").as_ref(),
                    "start".as_ref(),
                ],
            );
            match started {
                Ok(_) => {
                    server.port = port;
                    server.started = true;
                    return Ok(server);
                }
                // Most likely the port was taken between probing and
                // starting: try another.
                Err(PgTestError::Failed { what, status, mut output }) => {
                    output.push_str("\nserver log:\n");
                    output.push_str(&std::fs::read_to_string(&log).unwrap_or_default());
                    last = Some(PgTestError::Failed { what, status, output });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| PgTestError::NotInstalled { searched: "pg_ctl".into() }))
    }

    /// The server every test of this test binary shares while any of them
    /// holds it (started on first use; stopped when the last holder drops
    /// it, and started anew if a later test asks again).
    pub fn shared() -> Result<Arc<PgServer>, PgTestError> {
        static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = shared.upgrade() {
            return Ok(s);
        }
        let s = Arc::new(PgServer::start()?);
        *shared = Arc::downgrade(&s);
        Ok(s)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// A `postgres://` URL of `database` over TCP, as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A key=value connection string of `database` over the Unix socket.
    pub fn socket_url(&self, database: &str) -> String {
        format!("host={} port={} user={SUPERUSER} dbname={database}", self.root.display(), self.port)
    }

    /// Creates database `name` (an identifier: letters, digits, `_`) and
    /// returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, PgTestError> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// Runs `sql` in `database` with `psql` as the superuser and returns
    /// what it printed (unaligned, tuples only: one row a line, columns
    /// separated by `|`).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, PgTestError> {
        let port = self.port.to_string();
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &port])
            .args(["-U", SUPERUSER, "-d", database, "-c", sql])
            .output()
            .map_err(io_err("running psql"))?;
        check("psql", out).map(|o| String::from_utf8_lossy(&o.stdout).trim_end().to_string())
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Runs server tool `tool` as the server's user.
    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<Output, PgTestError> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some((user, _, _)) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        // The user may not be allowed into the caller's working directory.
        let out = cmd.args(args).current_dir(&self.root).output().map_err(io_err(format!("running {tool}")))?;
        check(tool, out)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.started {
            let data = self.data_dir();
            let stop = ["-D".as_ref(), data.as_os_str(), "-m".as_ref(), "immediate".as_ref(), "-w".as_ref()];
            let mut args: Vec<&std::ffi::OsStr> = stop.to_vec();
            args.push("stop".as_ref());
            if let Err(e) = self.run("pg_ctl", &args) {
                eprintln!("macp-pg-test: stopping the throwaway PostgreSQL in {} failed: {e}", self.root.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn check(what: &str, out: Output) -> Result<Output, PgTestError> {
    if out.status.success() {
        return Ok(out);
    }
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(PgTestError::Failed { what: what.to_string(), status: out.status.to_string(), output })
}

/// A name unique in this process and among processes running at once
/// (pid and a counter), usable unquoted as a database or schema name:
/// `prefix` followed by `_<pid>_<n>`. Lowercase `prefix` only.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}_{}_{n}", prefix.replace('-', "_"), std::process::id())
}

fn free_port() -> Result<u16, PgTestError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("probing for a free port"))?;
    l.local_addr().map(|a| a.port()).map_err(io_err("probing for a free port"))
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the process's effective user.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// `(name, uid, gid)` of the user to run the server as, when root.
fn test_user() -> Result<(String, u32, u32), PgTestError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    let lookup = |name: &str| {
        passwd.lines().find_map(|line| {
            let mut f = line.split(':');
            if f.next()? != name {
                return None;
            }
            let uid = f.nth(1)?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            Some((name.to_string(), uid, gid))
        })
    };
    match std::env::var("MACP_PG_TEST_USER") {
        Ok(name) => lookup(&name).ok_or(PgTestError::NoUser(name)),
        Err(_) => lookup("postgres").or_else(|| lookup("nobody")).ok_or_else(|| PgTestError::NoUser("nobody".into())),
    }
}

/// The directory holding `initdb`, `pg_ctl` and `psql`.
fn find_bindir() -> Result<PathBuf, PgTestError> {
    match find_installed() {
        Err(PgTestError::NotInstalled { searched }) if may_install() => {
            install_with_apt().map_err(|output| PgTestError::Failed {
                what: format!("installing PostgreSQL (not found in {searched}): apt-get install postgresql"),
                status: "error".into(),
                output,
            })?;
            find_installed()
        }
        found => found,
    }
}

/// Whether a missing PostgreSQL may be installed here: as root, with
/// Debian's apt-get, unless `MACP_PG_NO_INSTALL` is set. So the README's
/// test command works on a fresh machine, as `.ci/run` does.
fn may_install() -> bool {
    running_as_root() && std::env::var_os("MACP_PG_NO_INSTALL").is_none() && Path::new("/usr/bin/apt-get").is_file()
}

/// `apt-get install postgresql` (after an `apt-get update` if the package
/// lists are stale); once per process, whichever test gets here first.
fn install_with_apt() -> Result<(), String> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut done = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return Ok(());
    }
    let apt = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let install = ["install", "-y", "-qq", "--no-install-recommends", "postgresql"];
    eprintln!("macp-pg-test: PostgreSQL is not installed; apt-get install postgresql");
    if apt(&install).is_err() {
        apt(&["update", "-qq"])?;
        apt(&install)?;
    }
    *done = true;
    Ok(())
}

fn find_installed() -> Result<PathBuf, PgTestError> {
    let has_tools = |d: &Path| ["initdb", "pg_ctl", "psql"].iter().all(|t| d.join(t).is_file());
    if let Some(d) = std::env::var_os("MACP_PG_BINDIR") {
        let d = PathBuf::from(d);
        return if has_tools(&d) {
            Ok(d)
        } else {
            Err(PgTestError::NotInstalled { searched: format!("MACP_PG_BINDIR={}", d.display()) })
        };
    }
    let debian = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir(debian)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    majors.sort_by_key(|m| std::cmp::Reverse(m.0));
    if let Some((_, d)) = majors.into_iter().find(|(_, d)| has_tools(d)) {
        return Ok(d);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|d| has_tools(d))
        .ok_or_else(|| PgTestError::NotInstalled { searched: format!("{}/<major>/bin and PATH", debian.display()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server starts, answers SQL with fsync on, creates databases,
    /// and is gone (directory and all) once dropped.
    #[test]
    fn starts_answers_and_cleans_up() {
        let pg = PgServer::start().expect("start");
        assert_eq!(pg.psql("postgres", "SHOW fsync").unwrap(), "on");
        let db = unique_name("t");
        let url = pg.create_database(&db).unwrap();
        assert!(url.ends_with(&format!(":{}/{db}", pg.port())), "{url}");
        assert_eq!(pg.psql(&db, "SELECT 1 + 1").unwrap(), "2");
        let err = pg.psql(&db, "SELECT * FROM no_such_table").unwrap_err();
        assert!(matches!(err, PgTestError::Failed { .. }), "{err:?}");
        let root = pg.socket_dir().to_path_buf();
        assert!(root.join(".s.PGSQL.".to_string() + &pg.port().to_string()).exists(), "the Unix socket is there");
        drop(pg);
        assert!(!root.exists(), "the directory is deleted");
    }
}
