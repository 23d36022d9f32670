//! The throwaway PostgreSQL the tests of this binary share, and handles on
//! it: one database per test, one schema per storage.
#![allow(dead_code)]

use std::sync::Arc;

use macp_pg_test::{unique_name, PgServer};
use macp_storage::Retention;
use macp_storage_pg::{PgConfig, PgStorage, PgUrl};

/// A database of its own on the binary's shared server.
pub struct Db {
    pub server: Arc<PgServer>,
    pub name: String,
    pub url: PgUrl,
}

impl Db {
    pub fn new() -> Db {
        let server = PgServer::shared().expect("a throwaway PostgreSQL (see macp-pg-test)");
        let name = unique_name("t");
        let url = server.create_database(&name).expect("create a database").parse().expect("its URL");
        Db { server, name, url }
    }

    /// The configuration of a storage on `schema`.
    pub fn cfg(&self, schema: &str, retention: Retention) -> PgConfig {
        PgConfig { schema: schema.into(), retention, ..PgConfig::default() }
    }

    pub fn open(&self, schema: &str) -> PgStorage {
        PgStorage::open(&self.url, self.cfg(schema, Retention::Forever)).expect("open")
    }

    /// `sql` in this database, through psql (another connection).
    pub fn sql(&self, sql: &str) -> String {
        self.server.psql(&self.name, sql).expect("psql")
    }
}
