//! A cluster's registries: the governance policies and extension modes
//! every node of the cluster serves, kept in `macp_registry` as the
//! *desired* state.
//!
//! Each shard's kernel records its own registry changes in its own log
//! (sessions bind to the policy recorded at their SessionStart, so a
//! shard replays identically wherever it is loaded). What makes those
//! per-shard registries one cluster-wide registry is this table: a node
//! validates a change against its own synced copy, writes it here only if
//! nobody changed the registries since that copy was taken (the version
//! check of [`ClusterRegistry::change`]), and every node brings each
//! shard it serves to the table's state whenever the version moves.
//!
//! Entries are opaque here (a kind, an id, the descriptor's bytes and
//! whether the mode is standards-track): interpreting them is the
//! runtime's business, as records are.

use std::time::Duration;

use macp_storage::StorageError;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;

use crate::cluster::ClusterError;
use crate::schema::cluster as sql;
use crate::storage::PgConfig;
use crate::url::PgUrl;
use crate::worker::{connect, within, Conn, Place, Start};

/// What a registry entry registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RegistryKind {
    /// A governance policy (the body is a `PolicyDescriptor`).
    Policy,
    /// An extension mode (the body is a `ModeDescriptor`).
    Mode,
}

impl RegistryKind {
    fn as_str(self) -> &'static str {
        match self {
            RegistryKind::Policy => "policy",
            RegistryKind::Mode => "mode",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "policy" => Some(RegistryKind::Policy),
            "mode" => Some(RegistryKind::Mode),
            _ => None,
        }
    }
}

/// One registered policy or mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryEntry {
    /// Policy or mode.
    pub kind: RegistryKind,
    /// The policy id or the mode id.
    pub id: String,
    /// The descriptor, protobuf-encoded.
    pub body: Vec<u8>,
    /// For a mode: promoted to standards-track.
    pub standards_track: bool,
}

/// The registries as of one version, entries in the order they were made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistrySnapshot {
    /// Rises with every change.
    pub version: i64,
    /// Every entry.
    pub entries: Vec<RegistryEntry>,
}

/// One step of a registry change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOp {
    /// Adds or replaces an entry.
    Put(RegistryEntry),
    /// Removes an entry (nothing if there is none).
    Delete {
        /// Policy or mode.
        kind: RegistryKind,
        /// Its id.
        id: String,
    },
}

/// A node's handle on the cluster's registries: one connection of its
/// own (opened again when lost), used by one change or read at a time.
pub struct ClusterRegistry {
    start: Start,
    conn: Mutex<Option<Conn>>,
    timeout: Duration,
}

impl std::fmt::Debug for ClusterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRegistry").field("place", &self.start.place.0).finish_non_exhaustive()
    }
}

impl ClusterRegistry {
    /// The registries of the cluster in `pg.schema` of `url`, which must
    /// exist already ([`crate::Membership::join`] creates and migrates it).
    /// Connects on first use.
    pub fn new(url: &PgUrl, pg: &PgConfig) -> Self {
        let place = Place(format!("{url} schema {}", pg.schema).into());
        let start =
            Start { url: url.clone(), cfg: pg.clone(), place, read_only: false, cluster: Some(None), writers: 1 };
        ClusterRegistry { timeout: pg.timeout, start, conn: Mutex::new(None) }
    }

    async fn with_conn<'a>(
        &self,
        guard: &'a mut tokio::sync::MutexGuard<'_, Option<Conn>>,
    ) -> Result<&'a mut Conn, StorageError> {
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            **guard = Some(connect(&self.start, "registry").await?);
        }
        Ok(guard.as_mut().expect("connected just above"))
    }

    /// The registries' current version (one single-row read: how a node
    /// notices a change made elsewhere).
    pub async fn version(&self) -> Result<i64, ClusterError> {
        let mut guard = self.conn.lock().await;
        let conn = self.with_conn(&mut guard).await?;
        let place = &self.start.place;
        let row =
            within(place, "read the registry version", self.timeout, conn.client.query_one(sql::REGISTRY_VERSION, &[]))
                .await;
        let row = self.forget_on_error(&mut guard, row)?;
        Ok(row.try_get(0).map_err(place.db("read the registry version"))?)
    }

    /// Every entry and the version they are as of, read in one snapshot.
    pub async fn load(&self) -> Result<RegistrySnapshot, ClusterError> {
        let mut guard = self.conn.lock().await;
        let conn = self.with_conn(&mut guard).await?;
        let r = Self::read_all(&self.start.place, self.timeout, conn).await;
        Ok(self.forget_on_error(&mut guard, r)?)
    }

    async fn read_all(place: &Place, t: Duration, conn: &mut Conn) -> Result<RegistrySnapshot, StorageError> {
        const OP: &str = "read the registries";
        let tx = within(
            place,
            OP,
            t,
            conn.client
                .build_transaction()
                .read_only(true)
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .start(),
        )
        .await?;
        let version: i64 =
            within(place, OP, t, tx.query_one(sql::REGISTRY_VERSION, &[])).await?.try_get(0).map_err(place.db(OP))?;
        let rows = within(place, OP, t, tx.query(sql::REGISTRY_ENTRIES, &[])).await?;
        let mut entries = Vec::with_capacity(rows.len());
        for r in rows {
            let kind: String = r.try_get(0).map_err(place.db(OP))?;
            let Some(kind) = RegistryKind::parse(&kind) else { continue };
            entries.push(RegistryEntry {
                kind,
                id: r.try_get(1).map_err(place.db(OP))?,
                body: r.try_get(2).map_err(place.db(OP))?,
                standards_track: r.try_get(3).map_err(place.db(OP))?,
            });
        }
        within(place, OP, t, tx.commit()).await?;
        Ok(RegistrySnapshot { version, entries })
    }

    /// Applies `ops` in one transaction if the registries are still at
    /// version `expected` (the version the caller validated the change
    /// against): `Some(new version)`; `None`, changing nothing, when
    /// another change came first (sync to it, validate again, retry).
    pub async fn change(&self, expected: i64, ops: &[RegistryOp]) -> Result<Option<i64>, ClusterError> {
        let mut guard = self.conn.lock().await;
        let conn = self.with_conn(&mut guard).await?;
        let r = Self::write(&self.start.place, self.timeout, conn, expected, ops).await;
        Ok(self.forget_on_error(&mut guard, r)?)
    }

    async fn write(
        place: &Place,
        t: Duration,
        conn: &mut Conn,
        expected: i64,
        ops: &[RegistryOp],
    ) -> Result<Option<i64>, StorageError> {
        const OP: &str = "change the registries";
        let tx = within(place, OP, t, conn.client.transaction()).await?;
        let Some(row) = within(place, OP, t, tx.query_opt(sql::REGISTRY_BUMP, &[&expected])).await? else {
            return Ok(None);
        };
        let version: i64 = row.try_get(0).map_err(place.db(OP))?;
        for op in ops {
            match op {
                RegistryOp::Put(e) => {
                    let params: [&(dyn ToSql + Sync); 5] =
                        [&e.kind.as_str(), &e.id, &e.body, &e.standards_track, &version];
                    within(place, OP, t, tx.execute(sql::REGISTRY_PUT, &params)).await?;
                }
                RegistryOp::Delete { kind, id } => {
                    within(place, OP, t, tx.execute(sql::REGISTRY_DELETE, &[&kind.as_str(), id])).await?;
                }
            }
        }
        within(place, OP, t, tx.commit()).await?;
        Ok(Some(version))
    }

    /// Drops the connection after a failure (a timeout may leave it
    /// mid-statement), so the next call opens a fresh one.
    fn forget_on_error<T>(
        &self,
        guard: &mut tokio::sync::MutexGuard<'_, Option<Conn>>,
        r: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        if r.is_err() {
            if let Some(c) = guard.take() {
                c.task.abort();
            }
        }
        r
    }
}
