//! The generic storage suite of `macp-storage` (what every backend must
//! do) on a real PostgreSQL: `stop` closes the connections properly,
//! `crash` drops them as a killed process would (nothing appended since
//! the last sync survives, the server rolls back and frees the lock).

mod common;

use common::Db;
use macp_pg_test::unique_name;
use macp_storage::suite::{self, Harness};
use macp_storage::Retention;
use macp_storage_pg::PgStorage;

struct Pg {
    db: Db,
    schema: String,
}

impl Harness for Pg {
    type S = PgStorage;

    fn open(&mut self, retention: Retention) -> PgStorage {
        PgStorage::open(&self.db.url, self.db.cfg(&self.schema, retention)).expect("open")
    }

    fn stop(&mut self, storage: PgStorage) {
        drop(storage);
    }

    fn crash(&mut self, storage: PgStorage) {
        storage.crash();
    }

    fn reset(&mut self) {
        self.schema = unique_name("suite");
    }
}

#[test]
fn passes_the_storage_suite() {
    suite::run_all(&mut Pg { db: Db::new(), schema: unique_name("suite") });
}
