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
pub const SCHEMA_VERSION: u32 = 3;

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
    // 2: shards. Every log row, ended session and checkpoint belongs to a
    // shard (a single-node runtime writes shard 0 only); a cluster's shard
    // count, its members and the shards' leases.
    "ALTER TABLE macp_records ADD COLUMN shard integer NOT NULL DEFAULT 0;
    ALTER TABLE macp_records DROP CONSTRAINT macp_records_pkey;
    ALTER TABLE macp_records ADD PRIMARY KEY (shard, pos);
    ALTER TABLE macp_ended ADD COLUMN shard integer NOT NULL DEFAULT 0;
    DROP INDEX macp_ended_by_end;
    CREATE INDEX macp_ended_by_end ON macp_ended (shard, ended_at_ms, session_id);
    ALTER TABLE macp_checkpoint DROP CONSTRAINT macp_checkpoint_pkey;
    ALTER TABLE macp_checkpoint ADD COLUMN shard integer NOT NULL DEFAULT 0;
    ALTER TABLE macp_checkpoint DROP COLUMN id;
    ALTER TABLE macp_checkpoint ADD PRIMARY KEY (shard);
    CREATE TABLE macp_cluster (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        shards integer NOT NULL CHECK (shards > 0),
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE macp_nodes (
        node_id text COLLATE \"C\" PRIMARY KEY,
        advertise_addr text NOT NULL,
        started_at timestamptz NOT NULL,
        heartbeat_at timestamptz NOT NULL
    );
    CREATE TABLE macp_shards (
        shard integer PRIMARY KEY,
        owner text COLLATE \"C\",
        epoch bigint NOT NULL DEFAULT 0,
        lease_until timestamptz
    );",
    // 3: a cluster's registries (policies and extension modes), which
    // every node syncs its shards' kernels to; the version rises with
    // every change so a node notices one with a single-row read.
    "ALTER TABLE macp_cluster ADD COLUMN registry_version bigint NOT NULL DEFAULT 0;
    CREATE TABLE macp_registry (
        kind text COLLATE \"C\" NOT NULL,
        id text COLLATE \"C\" NOT NULL,
        body bytea NOT NULL,
        standards_track boolean NOT NULL DEFAULT false,
        position bigint NOT NULL,
        PRIMARY KEY (kind, id)
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
/// Serialises migrations of one schema (a transaction-level lock, in the
/// two-key space, apart from the single-node runtime's lock).
pub(crate) const MIGRATE_LOCK: &str = "SELECT pg_advisory_xact_lock(1296253776, hashtext($1::text))";
/// The cluster's shard count, if the schema is a cluster's.
pub(crate) const CLUSTER_SHARDS: &str = "SELECT shards FROM macp_cluster WHERE id";
pub(crate) const RECORD_VERSION: &str = "INSERT INTO macp_schema_version (version, applied_by) VALUES ($1, $2)";

/// The fence of a cluster node's write, as the first clauses of a `WITH`:
/// `f` locks shard `$shard`'s lease row for the transaction (`FOR SHARE`,
/// so a takeover's update waits for this commit, and this commit waits for
/// a takeover in flight and then sees its new epoch) and finds it only
/// while it names node `$node` at epoch `$epoch`, unexpired by the
/// database's clock; `ok` says whether to write: always when `$node` is
/// null (the single-node runtime, whose advisory lock keeps others out).
macro_rules! fence {
    ($shard:literal, $node:literal, $epoch:literal) => {
        concat!(
            "WITH f AS (
    SELECT 1 FROM macp_shards
    WHERE ",
            $node,
            "::text IS NOT NULL AND shard = ",
            $shard,
            "::int4 AND owner = ",
            $node,
            "::text
        AND epoch = ",
            $epoch,
            "::int8 AND lease_until > clock_timestamp()
    FOR SHARE
), ok AS (
    SELECT (",
            $node,
            "::text IS NULL OR EXISTS (SELECT 1 FROM f)) AS ok
)"
        )
    };
}

/// The clauses of a batch: records (`pos`, `session_id`, `seq`, `record`
/// arrays) and ended sessions (`session_id`, `ended_at_ms`, `ended_pos`,
/// `summary` arrays; a summary stored again replaces the old one), each
/// inserted by a data-modifying `WITH` clause of one statement, into shard
/// `$9`. A cluster node's batch is fenced (`$10` its node id, `$11` its
/// lease's epoch): the `f` clause locks the shard's lease row for the
/// transaction (`FOR SHARE`, so a takeover's update waits for this commit
/// and the new owner's load sees it) and finds it only while the lease is
/// still this node's, at this epoch, and not lapsed; otherwise nothing is
/// inserted and `ok` is false. A single-node runtime passes a null node
/// id: unfenced (its advisory lock keeps others out).
macro_rules! batch_clauses {
    () => {
        concat!(
            fence!("$9", "$10", "$11"),
            ", r AS (
    INSERT INTO macp_records (shard, pos, session_id, seq, record)
    SELECT $9::int4, u.* FROM unnest($1::int8[], $2::text[], $3::int8[], $4::bytea[]) AS u, ok WHERE ok.ok
), e AS (
    INSERT INTO macp_ended (shard, session_id, ended_at_ms, ended_pos, summary)
    SELECT $9::int4, u.* FROM unnest($5::text[], $6::int8[], $7::int8[], $8::bytea[]) AS u, ok WHERE ok.ok
    ON CONFLICT (session_id) DO UPDATE
    SET ended_at_ms = EXCLUDED.ended_at_ms, ended_pos = EXCLUDED.ended_pos, summary = EXCLUDED.summary
)"
        )
    };
}

/// One group-committed batch in one statement, so in one transaction and
/// one commit. Answers whether it was stored (false: fenced).
pub(crate) const BATCH: &str = concat!(batch_clauses!(), " SELECT ok FROM ok");

/// [`BATCH`] plus the shard's checkpoint (`$12` covers = the first log
/// position it does not cover, `$13` the open state), in the same
/// transaction.
pub(crate) const BATCH_CHECKPOINT: &str = concat!(
    batch_clauses!(),
    ", c AS (
    INSERT INTO macp_checkpoint (shard, covers, open_state) SELECT $9::int4, $12::int8, $13::bytea FROM ok WHERE ok.ok
    ON CONFLICT (shard) DO UPDATE SET covers = EXCLUDED.covers, open_state = EXCLUDED.open_state, taken_at = now()
) SELECT ok FROM ok"
);

pub(crate) const LOAD_CHECKPOINT: &str = "SELECT covers, open_state FROM macp_checkpoint WHERE shard = $1::int4";
pub(crate) const LOAD_RECORDS: &str =
    "SELECT pos, session_id, record FROM macp_records WHERE shard = $1::int4 AND pos >= $2::int8 ORDER BY pos";

/// The bytes our three tables take, indexes and TOAST included.
macro_rules! table_bytes {
    () => {
        "(pg_total_relation_size('macp_records') + pg_total_relation_size('macp_ended')
        + pg_total_relation_size('macp_checkpoint'))::int8"
    };
}

/// One bounded slice of upkeep of shard `$4`, in one statement: up to
/// `$3` ended sessions past retention (`ended_at_ms < $1`; none when `$1`
/// is null) that ended before the shard's latest checkpoint (`ended_pos <=
/// $2`), with their records; up to `$3` registry records the checkpoint
/// covers (`pos < $2`: nothing reads them once a checkpoint holds the
/// registries); then the bytes the tables take. Fenced like [`BATCH`]
/// (`$5` node id, `$6` epoch): a node that lost the shard deletes nothing.
pub(crate) const MAINTAIN: &str = concat!(
    fence!("$4", "$5", "$6"),
    ", doomed AS (
    DELETE FROM macp_ended WHERE session_id IN (
        SELECT session_id FROM macp_ended, ok
        WHERE ok.ok AND shard = $4::int4 AND ended_at_ms < $1::int8 AND ended_pos <= $2::int8
        ORDER BY ended_at_ms, session_id LIMIT $3::int8)
    RETURNING session_id
), gone AS (
    DELETE FROM macp_records r USING doomed d WHERE r.session_id = d.session_id RETURNING 1
), registry AS (
    DELETE FROM macp_records WHERE shard = $4::int4 AND pos IN (
        SELECT pos FROM macp_records, ok
        WHERE ok.ok AND shard = $4::int4 AND session_id = '' AND pos < $2::int8 ORDER BY pos LIMIT $3::int8)
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
FROM (SELECT 1) AS one LEFT JOIN macp_checkpoint c ON c.shard = 0"
);

/// Cluster statements ([`crate::Membership`]). Lease times are the
/// database's clock (`clock_timestamp()`), the one clock every node and
/// every fenced write compares against.
pub(crate) mod cluster {
    /// Whether the schema holds a single-node runtime's data (any log row
    /// or checkpoint), and whether a single-node runtime holds its lock now
    /// (`$1` + `$2`: the lock key, as [`super::TRY_LOCK`]; a transaction
    /// lock, released at commit).
    pub(crate) const SINGLE_NODE_TRACES: &str = "SELECT EXISTS (SELECT 1 FROM macp_records)
        OR EXISTS (SELECT 1 FROM macp_checkpoint), NOT pg_try_advisory_xact_lock($1::int8 + $2::int8)";
    /// Creates the cluster (`$1` shards) and its shards' lease rows.
    pub(crate) const CREATE: &str = "WITH c AS (INSERT INTO macp_cluster (shards) VALUES ($1::int4))
        INSERT INTO macp_shards (shard) SELECT generate_series(0, $1::int4 - 1)";
    /// Registers (or re-registers after a restart) node `$1` at address `$2`.
    pub(crate) const JOIN: &str = "INSERT INTO macp_nodes (node_id, advertise_addr, started_at, heartbeat_at)
        VALUES ($1::text, $2::text, clock_timestamp(), clock_timestamp())
        ON CONFLICT (node_id) DO UPDATE
        SET advertise_addr = EXCLUDED.advertise_addr, started_at = EXCLUDED.started_at,
            heartbeat_at = EXCLUDED.heartbeat_at";
    /// Gives up the leases a node's earlier process held (`$1` node id),
    /// so a restarted node need not wait for them to lapse. The next
    /// acquisition raises the epoch, which fences that earlier process.
    pub(crate) const RELEASE_ALL: &str =
        "UPDATE macp_shards SET owner = NULL, lease_until = NULL WHERE owner = $1::text";
    /// Node `$1`'s heartbeat, with its address `$2` (a node removed by an
    /// operator comes back).
    pub(crate) const HEARTBEAT: &str = JOIN;
    /// Live nodes (heartbeat within `$1` milliseconds), in id order.
    pub(crate) const MEMBERS: &str = "SELECT node_id, advertise_addr FROM macp_nodes
        WHERE heartbeat_at > clock_timestamp() - make_interval(secs => $1::int8 / 1000.0)
        ORDER BY node_id";
    /// Extends node `$1`'s leases on shards `$2` at epochs `$3` by `$4`
    /// milliseconds, each only while still its own at that epoch and not
    /// lapsed; answers the shards renewed.
    pub(crate) const RENEW: &str = "UPDATE macp_shards s
        SET lease_until = clock_timestamp() + make_interval(secs => $4::int8 / 1000.0)
        FROM unnest($2::int4[], $3::int8[]) AS h(shard, epoch),
            (SELECT shard FROM macp_shards WHERE shard = ANY($2::int4[]) ORDER BY shard FOR NO KEY UPDATE) AS l
        WHERE s.shard = l.shard AND s.shard = h.shard AND s.epoch = h.epoch AND s.owner = $1::text
            AND s.lease_until > clock_timestamp()
        RETURNING s.shard";
    /// Node `$1` takes those of shards `$2` that nobody holds or whose
    /// lease lapsed, for `$3` milliseconds, each at a new epoch; answers
    /// the shards taken and their epochs.
    pub(crate) const ACQUIRE: &str = "UPDATE macp_shards s
        SET owner = $1::text, epoch = s.epoch + 1,
            lease_until = clock_timestamp() + make_interval(secs => $3::int8 / 1000.0)
        FROM (SELECT shard FROM macp_shards
            WHERE shard = ANY($2::int4[])
                AND (owner IS NULL OR lease_until IS NULL OR lease_until <= clock_timestamp())
            ORDER BY shard FOR NO KEY UPDATE) AS l
        WHERE s.shard = l.shard
            AND (s.owner IS NULL OR s.lease_until IS NULL OR s.lease_until <= clock_timestamp())
        RETURNING s.shard, s.epoch";
    /// Node `$1` gives up shards `$2` held at epochs `$3`.
    pub(crate) const RELEASE: &str = "UPDATE macp_shards s SET owner = NULL, lease_until = NULL
        FROM unnest($2::int4[], $3::int8[]) AS h(shard, epoch),
            (SELECT shard FROM macp_shards WHERE shard = ANY($2::int4[]) ORDER BY shard FOR NO KEY UPDATE) AS l
        WHERE s.shard = l.shard AND s.shard = h.shard AND s.epoch = h.epoch AND s.owner = $1::text";
    /// Every shard with a valid lease, and its holder.
    pub(crate) const OWNERS: &str = "SELECT shard, owner, epoch FROM macp_shards
        WHERE owner IS NOT NULL AND lease_until > clock_timestamp() ORDER BY shard";
    /// Node `$1` leaves the membership.
    pub(crate) const LEAVE: &str = "DELETE FROM macp_nodes WHERE node_id = $1::text";
    /// The registries' version.
    pub(crate) const REGISTRY_VERSION: &str = "SELECT registry_version FROM macp_cluster WHERE id";
    /// Every registry entry, in the order they were made.
    pub(crate) const REGISTRY_ENTRIES: &str =
        "SELECT kind, id, body, standards_track FROM macp_registry ORDER BY position, kind, id";
    /// Raises the registries' version from `$1` to `$1 + 1`, locking the
    /// row until commit; no row when the version is no longer `$1`.
    pub(crate) const REGISTRY_BUMP: &str = "UPDATE macp_cluster SET registry_version = registry_version + 1
        WHERE id AND registry_version = $1::int8 RETURNING registry_version";
    /// Puts entry (`$1` kind, `$2` id) with body `$3`, standards-track `$4`,
    /// made at version `$5` (its position).
    pub(crate) const REGISTRY_PUT: &str = "INSERT INTO macp_registry (kind, id, body, standards_track, position)
        VALUES ($1::text, $2::text, $3::bytea, $4::bool, $5::int8)
        ON CONFLICT (kind, id) DO UPDATE
        SET body = EXCLUDED.body, standards_track = EXCLUDED.standards_track, position = EXCLUDED.position";
    /// Removes entry (`$1` kind, `$2` id).
    pub(crate) const REGISTRY_DELETE: &str = "DELETE FROM macp_registry WHERE kind = $1::text AND id = $2::text";
}

/// Locks the lease rows of shards `$1` for share, in shard order: the
/// first statement of a writer transaction committing several shards;
/// each shard's statement then finds its row locked already. Every
/// statement that changes lease rows ([`cluster::RENEW`],
/// [`cluster::ACQUIRE`], [`cluster::RELEASE`]) locks them in the same
/// order, in the statement itself, so a writer committing several shards
/// and a membership round changing several never each hold a row the
/// other waits for (a deadlock PostgreSQL would break by failing one of
/// them after `deadlock_timeout`). Those statements are single
/// statements on purpose: a lease-row lock held across a client round
/// trip would make writers wait on the node's own runtime.
pub(crate) const LOCK_LEASES_SHARED: &str =
    "SELECT shard FROM macp_shards WHERE shard = ANY($1::int4[]) ORDER BY shard FOR SHARE";

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
