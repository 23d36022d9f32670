//! Where the data commands read: a data directory, or the PostgreSQL
//! database of a server run with `--storage postgres`.

use std::fmt;
use std::path::PathBuf;

use macp_storage::StorageError;
use macp_storage_pg::{PgConfig, PgStorage, PgUrl};

use crate::AdminError;

/// The data commands' `DATA_DIR` and `--database-url`, exactly one of
/// which says where to read.
#[derive(clap::Args, Debug)]
pub struct Where {
    /// The data directory (MACP_DATA_DIR of the server); or, for a server
    /// on PostgreSQL, --database-url instead.
    data_dir: Option<PathBuf>,
    /// The database of a server run with `--storage postgres` (its
    /// MACP_DATABASE_URL: `postgres://user:password@host:port/database` or
    /// libpq's `host=... dbname=...`), instead of DATA_DIR. Read in one
    /// read-only snapshot, beside the running server if there is one.
    #[arg(long, env = "MACP_DATABASE_URL", hide_env_values = true, value_name = "URL")]
    database_url: Option<DatabaseUrl>,
}

/// `--database-url` as given: parsed by [`Where::source`], not by the
/// argument parser, whose error message would repeat the value, password
/// and all; and never shown by `Debug`.
#[derive(Clone)]
struct DatabaseUrl(String);

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_string()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

/// Where to read, resolved.
pub enum Source {
    /// A data directory (the file backend).
    Dir(PathBuf),
    /// The schema `macp` of a PostgreSQL database.
    Db(Box<PgUrl>),
}

impl Where {
    /// Exactly one of `DATA_DIR` and `--database-url` (or
    /// `MACP_DATABASE_URL`), the URL parsed: a usage error otherwise, which
    /// never repeats the URL.
    pub fn source(&self) -> Result<Source, AdminError> {
        match (&self.data_dir, &self.database_url) {
            (Some(dir), None) => Ok(Source::Dir(dir.clone())),
            (None, Some(url)) => {
                PgUrl::parse(&url.0).map(|u| Source::Db(Box::new(u))).map_err(|e| AdminError::Usage(e.to_string()))
            }
            (Some(_), Some(_)) => {
                let from_env = std::env::var_os("MACP_DATABASE_URL").is_some();
                Err(AdminError::Usage(format!(
                    "give DATA_DIR or --database-url, not both{}",
                    if from_env {
                        " (MACP_DATABASE_URL is set in the environment: unset it to read a data directory)"
                    } else {
                        ""
                    }
                )))
            }
            (None, None) => Err(AdminError::Usage(
                "where is the data? give DATA_DIR, or --database-url (MACP_DATABASE_URL) for a server on PostgreSQL"
                    .into(),
            )),
        }
    }
}

impl fmt::Display for Source {
    /// The directory, or the database without its password, and the schema.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dir(dir) => write!(f, "{}", dir.display()),
            Source::Db(url) => write!(f, "{url} schema {}", PgConfig::default().schema),
        }
    }
}

/// Opens the database read-only: one snapshot, no lock, nothing written
/// (`PgStorage::open_read_only`), in the schema the server uses. A
/// database without a macp-rs schema this build reads is refused as such.
pub fn open_db(url: &PgUrl) -> Result<PgStorage, AdminError> {
    PgStorage::open_read_only(url, PgConfig::default()).map_err(|e| match e {
        StorageError::NotADataDir { path, reason } => AdminError::NotOurs { place: path.display().to_string(), reason },
        e => e.into(),
    })
}
