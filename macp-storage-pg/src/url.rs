//! The database URL: parsed once, shown without its password.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::config::{Host, SslMode};

/// Where the database is: a `postgres://user:password@host:port/database`
/// URL or a libpq-style `host=... dbname=...` string, parsed when the
/// configuration is read so a typo stops the start before anything opens.
///
/// Its [`Display`](fmt::Display) and [`Debug`] forms never show the
/// password (`postgres://user@host:port/database`), so it can go into logs
/// and error messages as it is.
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
    shown: String,
}

/// Why a database URL was refused. The messages never repeat the URL: it
/// may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum BadPgUrl {
    /// Not a connection string at all.
    #[error("the database URL does not parse (expected postgres://user:password@host:port/database or host=... dbname=...): {}", causes(.0))]
    Syntax(#[source] tokio_postgres::Error),
    /// No host and no host address: nothing to connect to.
    #[error("the database URL names no host (postgres://user@HOST:port/database)")]
    NoHost,
    /// `sslmode=require`: this build connects over plain TCP and Unix
    /// sockets only, and must not pretend otherwise.
    #[error("the database URL requires TLS (sslmode=require), which this build does not support yet: connect over a Unix socket, loopback, or a network you trust")]
    TlsRequired,
}

/// The error and its causes on one line: tokio-postgres's own message is
/// only the kind ("invalid connection string"), the reason is its cause.
fn causes(e: &tokio_postgres::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl PgUrl {
    /// Parses a URL or key=value string.
    pub fn parse(s: &str) -> Result<PgUrl, BadPgUrl> {
        let config = tokio_postgres::Config::from_str(s).map_err(BadPgUrl::Syntax)?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(BadPgUrl::NoHost);
        }
        if config.get_ssl_mode() == SslMode::Require {
            return Err(BadPgUrl::TlsRequired);
        }
        let shown = shown(&config);
        Ok(PgUrl { config, shown })
    }

    /// The client's configuration (password included).
    pub(crate) fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

/// `postgres://user@host1,host2:port/database`, without the password.
fn shown(c: &tokio_postgres::Config) -> String {
    let mut hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if hosts.is_empty() {
        hosts = c.get_hostaddrs().iter().map(|a| a.to_string()).collect();
    }
    let ports: Vec<String> = c.get_ports().iter().map(|p| p.to_string()).collect();
    let mut s = String::from("postgres://");
    if let Some(user) = c.get_user() {
        s.push_str(user);
        s.push('@');
    }
    s.push_str(&hosts.join(","));
    if !ports.is_empty() {
        s.push(':');
        s.push_str(&ports.join(","));
    }
    s.push('/');
    s.push_str(c.get_dbname().unwrap_or(""));
    s
}

impl FromStr for PgUrl {
    type Err = BadPgUrl;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PgUrl::parse(s)
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_shown() {
        let u = PgUrl::parse("postgres://macp:s3cret@db.example:6543/runtime").unwrap();
        assert_eq!(u.to_string(), "postgres://macp@db.example:6543/runtime");
        assert!(!format!("{u:?}").contains("s3cret"));
        assert_eq!(u.config().get_password(), Some(&b"s3cret"[..]), "but it is used");
        let kv = PgUrl::parse("host=/run/postgresql user=macp password=s3cret dbname=rt").unwrap();
        assert_eq!(kv.to_string(), "postgres://macp@/run/postgresql/rt");
    }

    #[test]
    fn bad_urls_are_refused_without_repeating_them() {
        for (url, want) in [
            ("postgres://macp:s3cret@h/db?sslmode=require", "TLS"),
            ("postgres://macp:s3cret@h:notaport/db", "does not parse"),
            ("user=macp password=s3cret dbname=db", "no host"),
            ("postgres://macp:s3cret@h/db?bogus=1", "unknown option `bogus`"),
        ] {
            let e = PgUrl::parse(url).unwrap_err();
            let msg = format!("{e} {:?}", std::error::Error::source(&e).map(|s| s.to_string()));
            assert!(msg.contains(want), "{url}: {msg}");
            assert!(!msg.contains("s3cret"), "{url}: {msg}");
        }
    }
}
