//! # macp-storage-pg
//!
//! The PostgreSQL backend of macp-rs: [`PgStorage`] implements the storage
//! contract of `macp-storage` ([`macp_storage::Storage`] to write,
//! [`macp_storage::StorageRead`] to read) on a PostgreSQL database, the
//! database our users already run, back up and replicate. Like the file
//! backend it stores records and summaries and never interprets them:
//! replaying records is `macp-pipeline`'s recovery.
//!
//! ```no_run
//! use macp_storage::Storage as _;
//! use macp_storage_pg::{PgConfig, PgStorage, PgUrl};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url: PgUrl = "postgres://macp:secret@db.internal:5432/macp".parse()?;
//! let cfg = PgConfig { retention: "30d".parse()?, ..PgConfig::default() };
//! let mut storage = PgStorage::open(&url, cfg)?;
//! // macp_pipeline::recover(kernel_config, &mut storage, options) loads it,
//! // then the pipeline appends, syncs, checkpoints; now and then:
//! let done = storage.maintain(1_700_000_000_000)?;
//! # let _ = done; Ok(()) }
//! ```
//!
//! ## Tables (schema version 3)
//!
//! All in one schema ([`PgConfig::schema`], `macp` by default, created if
//! missing); the connections' `search_path` is that schema alone.
//!
//! ```text
//! macp_schema_version  version, applied_at, applied_by: one row per migration
//! macp_records         shard, pos (the shard's log position; the two are
//!                      the primary key), session_id, seq (indexed
//!                      together: history reads), record (the protobuf
//!                      encoding of a Record)
//! macp_ended           session_id (primary key: lookups, and listing in id
//!                      order), shard, ended_at_ms (indexed with the shard
//!                      and the id: retention), ended_pos (the shard's log
//!                      position after its records), summary (the protobuf
//!                      encoding of a SessionSummary)
//! macp_checkpoint      one row per shard: covers (the first log position it
//!                      does not cover), open_state (the kernel's open
//!                      state), taken_at
//! macp_cluster         a cluster's schema only: its shard count and its
//!                      registries' version
//! macp_registry        a cluster's registries (policies, extension modes):
//!                      kind, id, body (the protobuf descriptor),
//!                      standards_track, position (the version that made it)
//! macp_nodes           a cluster's members: node_id, advertise_addr,
//!                      started_at, heartbeat_at
//! macp_shards          a cluster's leases: shard, owner, epoch, lease_until
//! ```
//!
//! A single-node runtime ([`PgStorage::open`]) keeps everything in shard 0.
//! A cluster node ([`Membership`], [`PgStorage::open_shard`]) keeps one log
//! and one checkpoint per shard, so a shard moves between nodes alone.
//! Version 1 (one log, before shards) is migrated in place: its rows
//! become shard 0's. The two kinds refuse each other's schemas (see
//! "Clusters" below).
//!
//! Session ids are `COLLATE "C"`, so ended sessions list in byte order,
//! the order the kernel pages its open sessions in, whatever the
//! database's locale.
//!
//! ## Durability and group commit
//!
//! [`macp_storage::Storage::append`] only encodes and queues: nothing is
//! sent. `sync` sends the whole batch as **one statement** (the records
//! and the summaries as arrays, `INSERT ... SELECT FROM unnest(...)`, in
//! two data-modifying `WITH` clauses), which PostgreSQL runs as one
//! transaction: one round trip and one commit per batch however many
//! Sends it carries, and either all of the batch is there or none of it.
//! `checkpoint` adds the checkpoint row to the same statement, so a
//! checkpoint and the records it covers commit together. The commit is as
//! durable as the server's `synchronous_commit` makes it (`on` by
//! default: flushed to the server's disk; `remote_apply` with a standby
//! also waits for the standby).
//!
//! Readers see only committed rows, so never anything a crash could take
//! back. A restart loads the checkpoint and then the records from its
//! position on, in log order, fetched 2,048 a round trip through a cursor
//! while the caller replays the previous chunk.
//!
//! ## Retention
//!
//! [`PgConfig::retention`] (`forever` by default). Each `maintain` call
//! is one statement deleting at most [`PgConfig::maintain_sessions`]
//! ended sessions past retention, oldest end first, with their records,
//! but only sessions whose summary lies before the latest checkpoint (so
//! replaying the log after it can never bring a deleted session back); and
//! as many registry records the checkpoint covers (the checkpoint holds
//! the registries, nothing else reads them). `more` says a bound was
//! reached. `bytes` is `pg_total_relation_size` of the three tables;
//! `segments` is `None` (there are none).
//!
//! ## Schema versions and the lock
//!
//! Opening takes a session-level advisory lock on the schema (key: "MACP"
//! and the schema's oid) on the writer connection, held until the backend
//! is dropped: a second runtime on the same schema is refused with
//! [`macp_storage::StorageError::Locked`] after waiting
//! [`PgConfig::lock_wait`] for a holder that may be going away. A process
//! that dies loses the lock as soon as PostgreSQL notices its connection
//! is gone; for a host that vanishes, the writer connection asks the
//! server for TCP keepalives that notice within about a minute. (An
//! operator in a hurry: `SELECT pg_terminate_backend(pid) FROM
//! pg_stat_activity WHERE application_name = 'macp-rs writer'`.)
//!
//! Then, in one transaction, the schema is brought to [`SCHEMA_VERSION`]:
//! every migration newer than the version recorded in
//! `macp_schema_version` runs and is recorded. A schema at a newer version
//! than this build knows is refused
//! ([`macp_storage::StorageError::NewerFormat`]), and a schema holding
//! tables named like ours without a version table is refused as not ours
//! ([`macp_storage::StorageError::NotADataDir`]), never initialised over.
//!
//! ## Reading without writing
//!
//! [`PgStorage::open_read_only`] is for tools (`macp-admin`) that inspect,
//! verify or export a runtime's database, also while that runtime runs on
//! it, the way `FsStorage::open_read_only` serves a data directory. The same
//! backend and the same recovery (`macp_pipeline::recover`) run over it, so
//! there is no second reader of the tables to keep in step.
//!
//! - **Nothing is written.** No advisory lock is taken (a running writer is
//!   neither refused nor disturbed), no schema is created, nothing is
//!   migrated: a missing schema, one without our tables, and one at an older
//!   or newer version are refused. The connection has
//!   `default_transaction_read_only` on and all its work runs in one `READ
//!   ONLY` transaction, so even a write this crate sent by mistake would be
//!   refused by PostgreSQL (that setting is a guard against our mistakes,
//!   not a permission: use a role without write grants to forbid writing).
//!   `append` with records, `checkpoint` and `maintain` are refused
//!   ([`macp_storage::StorageError::Misuse`]) before anything is sent;
//!   `append` of summaries only (recovery hands back the sessions that ended
//!   in the replayed log) is accepted and dropped, since every summary was
//!   committed with the record that ended its session.
//! - **One snapshot.** That transaction is `REPEATABLE READ`, its snapshot
//!   fixed by the first look at the schema while opening, and held until the
//!   storage is dropped: loading, [`PgStorage::scan_log`], [`PgStorage::info`]
//!   and every read of its readers see the database as it was at that moment,
//!   whatever the writer commits meanwhile, so a checkpoint, the log and the
//!   ended sessions always agree with each other. One connection serves it
//!   all, one request at a time. (A snapshot held open keeps `VACUUM` from
//!   removing rows deleted after it was taken: hold one for minutes, not
//!   days. A failed statement aborts the transaction, and every later read
//!   fails too: open a new one.)
//!
//! [`PgStorage::scan_log`] reads the checkpoint and every record from the
//! log's first position (load reads only the records after the checkpoint),
//! and [`PgStorage::info`] describes the tables: for `macp-admin verify` and
//! `inspect`.
//!
//! ## Threads
//!
//! The storage traits are synchronous, and the driver calls them from a
//! tokio task (recovery from `spawn_blocking`, later calls on a runtime
//! worker, as the file backend's `fdatasync` blocks there). A blocking
//! client that starts a runtime of its own would panic inside the
//! server's runtime, and an async client cannot be awaited from a sync
//! trait method. So the backend owns one OS thread, `macp-pg`, running a
//! current-thread tokio runtime with the writer connection and
//! [`PgConfig::readers`] reader connections. Trait methods send a request
//! over a channel and wait for the reply on a std channel (a blocking wait
//! the way a file write is one; never a tokio `blocking_recv`, which
//! panics inside a runtime). Writer requests are served in order; each
//! read runs as a task of its own on the next reader connection (queries
//! on one connection are pipelined), so reads neither wait for a commit
//! nor for each other, and never see the writer's uncommitted work.
//!
//! ## Why tokio-postgres, not sqlx
//!
//! We need one connection we control (the advisory lock lives on it),
//! prepared statements with array parameters, cursors for loading, and
//! nothing else: no pool, no compile-time query checking, no other
//! databases, no migrations framework (ours is a table and a list).
//! `tokio-postgres` is exactly the protocol client, on the tokio already
//! in the tree; sqlx would bring its pool, its runtime glue, its own
//! migration machinery and many more crates to build on a 2-core machine.
//!
//! ## Failures
//!
//! - Fail-stop, as the contract says: a failed or timed-out `sync` or
//!   `checkpoint` (or a record over [`PgConfig::max_record_bytes`])
//!   poisons the backend; every later write returns
//!   [`macp_storage::StorageError::Poisoned`] and the driver loads storage
//!   again (a new [`PgStorage`], new connections). A commit that timed out
//!   may still have committed: the reload finds out, and a client's retry
//!   with the same message id is deduplicated either way.
//! - A failed read fails that read only. A reader connection found closed
//!   (a server restart, an operator ending it) is opened again before the
//!   next read it would serve.
//! - Database errors are [`macp_storage::StorageError::Io`] naming the
//!   operation, the URL without its password plus the schema, and
//!   PostgreSQL's message with its SQLSTATE. Rows that do not decode are
//!   [`macp_storage::StorageError::Damaged`] on read, and
//!   [`macp_storage::DamageKind::Undecodable`] damage while loading
//!   (offset = log position, so recovery can quarantine the session).
//! - After the backend is dropped its readers get
//!   [`macp_storage::StorageError::Closed`].
//!
//! ## Clusters: membership, leases and fencing
//!
//! Several runtime nodes share one schema through [`Membership`] (module
//! `cluster`): a fixed shard count stored when the first node creates the
//! cluster (a node configured otherwise is refused with
//! [`ClusterError::ShardCount`]), the session → shard map [`shard_of`]
//! (SHA-256 of the id, so clients can compute it too), heartbeats in
//! `macp_nodes`, and one lease per shard in `macp_shards` with an owner,
//! an expiry and a **fencing epoch** raised at every acquisition. Which
//! live node should hold a shard is rendezvous hashing
//! ([`preferred_owner`]), so joins and leaves move only the shards they
//! must. Every write of a shard's storage ([`PgStorage::open_shard`]:
//! commit, checkpoint, upkeep) locks the shard's lease row `FOR SHARE`
//! in its own statement and stores nothing unless the row still names this
//! node, at this epoch, unexpired by the database's clock
//! ([`macp_storage::StorageError::Fenced`] otherwise). A takeover's
//! `UPDATE` of that row waits for such a commit, and a commit waits for a
//! takeover in flight and then sees the new epoch: whatever a node wrote
//! before losing the lease is loaded by the next owner, and nothing after.
//! A paused process that wakes up, a partitioned host, a second process
//! with the same node id: none can write a shard it no longer holds.
//!
//! [`ClusterRegistry`] keeps the cluster's registries (policies, extension
//! modes) in `macp_registry`, each change applied only at the version it
//! was validated against, so nodes changing them at once cannot both win.
//!
//! A cluster's schema is refused to a single-node runtime, and a schema
//! with a single-node runtime's data (or one running on it, seen through
//! its advisory lock) cannot become a cluster's.
//!
//! ## Not yet
//!
//! TLS to the database (plain TCP and Unix sockets only; `sslmode=require`
//! is refused rather than ignored). `macp-admin` reads
//! shard 0 (a single-node runtime's data) only.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod cluster;
mod registry;
mod schema;
mod storage;
mod url;
mod worker;

pub use cluster::{
    preferred_owner, shard_of, ClusterConfig, ClusterError, Lease, Member, Membership, ShardLease, Tick,
    DEFAULT_SHARDS, MAX_SHARDS, MIN_LEASE_TTL,
};
pub use registry::{ClusterRegistry, RegistryEntry, RegistryKind, RegistryOp, RegistrySnapshot};
pub use schema::SCHEMA_VERSION;
pub use storage::{PgCheckpointInfo, PgConfig, PgHost, PgInfo, PgStorage};
pub use url::{BadPgUrl, PgUrl};
