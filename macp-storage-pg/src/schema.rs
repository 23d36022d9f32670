//! The tables, their migrations, and every statement the backend runs.
//!
//! All names start with `macp_` and live in the configured schema (the
//! connection's `search_path` is set to it alone), so the SQL below names
//! tables unqualified. Session ids are `COLLATE "C"`: ended sessions are
//! listed in session-id order, and that order must be byte order, the
//! order the kernel pages its own open sessions in, whatever the
//! database's locale.

/// The schema version this build writes and reads. A database at a newer
/// version is refused ([`macp_storage::StorageError::NewerFormat`]).
pub const SCHEMA_VERSION: u32 = 1;

/// The migration table: one row per applied migration.
pub(crate) const VERSION_TABLE: &str = "macp_schema_version";

pub(crate) const CREATE_VERSION_TABLE: &str = "CREATE TABLE macp_schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL
)";

/// Migrations in order: `MIGRATIONS[i]` takes the schema from version `i`
/// to `i + 1`. Each runs in the one transaction that also records it, so a
/// crash mid-migration leaves the previous version whole.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the log, ended sessions, the checkpoint.
    "CREATE TABLE macp_records (
        pos bigint PRIMARY KEY,
        session_id text COLLATE \"C\" NOT NULL,
        seq bigint NOT NULL,
        record bytea NOT NULL
    );
    CREATE INDEX macp_records_by_session ON macp_records (session_id, seq);
    CREATE TABLE macp_ended (
        session_id text COLLATE \"C\" PRIMARY KEY,
        ended_at_ms bigint NOT NULL,
        ended_pos bigint NOT NULL,
        summary bytea NOT NULL
    );
    CREATE INDEX macp_ended_by_end ON macp_ended (ended_at_ms, session_id);
    CREATE TABLE macp_checkpoint (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        covers bigint NOT NULL,
        open_state bytea NOT NULL,
        taken_at timestamptz NOT NULL DEFAULT now()
    );",
];

/// First half of the advisory-lock key ("MACP"); the second half is the
/// schema's oid, so each schema of each database has a lock of its own.
pub(crate) const LOCK_CLASS: i64 = 0x4d41_4350 << 32;

pub(crate) const SCHEMA_OID: &str = "SELECT oid::int8 FROM pg_namespace WHERE nspname = $1";
pub(crate) const TRY_LOCK: &str = "SELECT pg_try_advisory_lock($1::int8 + $2::int8)";
pub(crate) const UNLOCK: &str = "SELECT pg_advisory_unlock_all()";
/// Our tables present in the schema.
pub(crate) const OUR_TABLES: &str =
    "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 AND tablename LIKE 'macp\\_%' ORDER BY 1";
pub(crate) const CURRENT_VERSION: &str = "SELECT coalesce(max(version), 0)::int8 FROM macp_schema_version";
pub(crate) const RECORD_VERSION: &str = "INSERT INTO macp_schema_version (version, applied_by) VALUES ($1, $2)";

/// The clauses of a batch: records (`pos`, `session_id`, `seq`, `record`
/// arrays) and ended sessions (`session_id`, `ended_at_ms`, `ended_pos`,
/// `summary` arrays; a summary stored again replaces the old one), each
/// inserted by a data-modifying `WITH` clause of one statement.
macro_rules! batch_clauses {
    () => {
        "WITH r AS (
    INSERT INTO macp_records (pos, session_id, seq, record)
    SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[], $4::bytea[])
), e AS (
    INSERT INTO macp_ended (session_id, ended_at_ms, ended_pos, summary)
    SELECT * FROM unnest($5::text[], $6::int8[], $7::int8[], $8::bytea[])
    ON CONFLICT (session_id) DO UPDATE
    SET ended_at_ms = EXCLUDED.ended_at_ms, ended_pos = EXCLUDED.ended_pos, summary = EXCLUDED.summary
)"
    };
}

/// One group-committed batch in one statement, so in one transaction and
/// one commit.
pub(crate) const BATCH: &str = concat!(batch_clauses!(), " SELECT 1");

/// [`BATCH`] plus the checkpoint (`covers` = the first log position it
/// does not cover, the open state), in the same transaction.
pub(crate) const BATCH_CHECKPOINT: &str = concat!(
    batch_clauses!(),
    ", c AS (
    INSERT INTO macp_checkpoint (id, covers, open_state) VALUES (true, $9::int8, $10::bytea)
    ON CONFLICT (id) DO UPDATE SET covers = EXCLUDED.covers, open_state = EXCLUDED.open_state, taken_at = now()
) SELECT 1"
);

pub(crate) const LOAD_CHECKPOINT: &str = "SELECT covers, open_state FROM macp_checkpoint WHERE id";
pub(crate) const LOAD_RECORDS: &str =
    "SELECT pos, session_id, record FROM macp_records WHERE pos >= $1::int8 ORDER BY pos";

/// The bytes our three tables take, indexes and TOAST included.
macro_rules! table_bytes {
    () => {
        "(pg_total_relation_size('macp_records') + pg_total_relation_size('macp_ended')
        + pg_total_relation_size('macp_checkpoint'))::int8"
    };
}

/// One bounded slice of upkeep, in one statement: up to `$3` ended
/// sessions past retention (`ended_at_ms < $1`; none when `$1` is null)
/// that ended before the latest checkpoint (`ended_pos <= $2`), with their
/// records; up to `$3` registry records the checkpoint covers (`pos < $2`:
/// nothing reads them once a checkpoint holds the registries); then the
/// bytes the tables take.
pub(crate) const MAINTAIN: &str = concat!(
    "WITH doomed AS (
    DELETE FROM macp_ended WHERE session_id IN (
        SELECT session_id FROM macp_ended
        WHERE ended_at_ms < $1::int8 AND ended_pos <= $2::int8
        ORDER BY ended_at_ms, session_id LIMIT $3::int8)
    RETURNING session_id
), gone AS (
    DELETE FROM macp_records r USING doomed d WHERE r.session_id = d.session_id RETURNING 1
), registry AS (
    DELETE FROM macp_records WHERE pos IN (
        SELECT pos FROM macp_records WHERE session_id = '' AND pos < $2::int8 ORDER BY pos LIMIT $3::int8)
    RETURNING 1
) SELECT (SELECT count(*) FROM doomed)::int8, (SELECT count(*) FROM registry)::int8,
    ",
    table_bytes!()
);

/// What [`crate::PgInfo`] reports, in one row: the schema version, the
/// log's row count and first and last positions, the ended sessions, the
/// tables' bytes, and the checkpoint (null columns when there is none).
pub(crate) const INFO: &str = concat!(
    "SELECT (SELECT coalesce(max(version), 0) FROM macp_schema_version)::int8,
    (SELECT count(*) FROM macp_records)::int8, (SELECT min(pos) FROM macp_records)::int8,
    (SELECT max(pos) FROM macp_records)::int8, (SELECT count(*) FROM macp_ended)::int8,
    ",
    table_bytes!(),
    ",
    c.covers, octet_length(c.open_state)::int8, (extract(epoch FROM c.taken_at) * 1000)::int8
FROM (SELECT 1) AS one LEFT JOIN macp_checkpoint c ON c.id"
);

pub(crate) const HISTORY: &str = "SELECT pos, seq, record FROM macp_records
    WHERE session_id = $1::text AND seq > $2::int8 AND seq <= $3::int8 ORDER BY seq, pos";
pub(crate) const ENDED: &str = "SELECT summary FROM macp_ended WHERE session_id = $1::text";
pub(crate) const ENDED_MANY: &str = "SELECT session_id, summary FROM macp_ended WHERE session_id = ANY($1::text[])";
pub(crate) const LIST_FIRST: &str = "SELECT summary FROM macp_ended ORDER BY session_id LIMIT $1::int8";
pub(crate) const LIST_AFTER: &str =
    "SELECT summary FROM macp_ended WHERE session_id > $1::text ORDER BY session_id LIMIT $2::int8";

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("macp"), "\"macp\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn every_version_has_its_migration() {
        assert_eq!(MIGRATIONS.len() as u32, SCHEMA_VERSION);
    }
}
