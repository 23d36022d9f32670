//! Cluster membership and shard leases, kept in the same database as the
//! data: what lets several runtime nodes share one schema without two of
//! them ever writing the same session.
//!
//! ```text
//!   session id ──shard_of──► shard (0..shards, fixed when the cluster is created)
//!   shard ──lease (owner, epoch, lease_until)──► node          macp_shards
//!   node ──heartbeat──► macp_nodes        desired owner: rendezvous hash over live nodes
//!
//!   every write of a shard (PgStorage::open_shard) commits only if, in its
//!   own transaction, the lease row still says: this node, this epoch, not lapsed
//! ```
//!
//! Temporal's shape: a fixed number of shards, each owned through a lease
//! whose fencing token (the epoch) the database checks on every write.
//! Nothing here is consensus: PostgreSQL serialises the lease updates, and
//! the epoch makes a node that lost a lease unable to write, however late
//! it wakes up (a paused process, a partitioned host). Every lease time is
//! the database's clock; a node only ever trusts its own lease for less
//! time than the database grants it ([`Lease::valid_until`] counts from
//! before the renewal was sent).
//!
//! A node calls [`Membership::tick`] every quarter of the lease TTL. A tick
//! heartbeats, renews the leases the node holds, reports those it lost,
//! those a live node is now the better home for (rebalancing after a node
//! joins: hand them over with [`Membership::release`] once nothing of
//! them is in flight), and takes the shards that should be its own and
//! that nobody holds or whose lease lapsed (a node that died: after at
//! most one TTL). Which node should hold a shard is rendezvous hashing
//! ([`preferred_owner`]): every node computes the same answer from the
//! same live membership, and a node joining or leaving moves only the
//! shards it gains or loses.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use macp_storage::StorageError;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::schema::{self, cluster as sql};
use crate::storage::PgConfig;
use crate::url::PgUrl;
use crate::worker::{connect, migrate, schema_oid, within, Conn, Place, Start};

/// The shard count a new cluster gets unless configured otherwise
/// (`MACP_SHARDS`): enough shards to spread over a few dozen nodes, few
/// enough that each carries a useful share of sessions.
pub const DEFAULT_SHARDS: u32 = 64;
/// The most shards a cluster can have.
pub const MAX_SHARDS: u32 = 65_536;
/// The shortest lease TTL accepted: a node must renew within it, and one
/// renewal is a round trip to the database.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(200);

/// The shard of a session: the first 8 bytes of the SHA-256 of its id,
/// read big-endian, modulo the shard count. Stable across versions,
/// platforms and languages, so a client can compute it too.
pub fn shard_of(session_id: &str, shards: u32) -> u32 {
    (hash64(&[session_id.as_bytes()]) % u64::from(shards.max(1))) as u32
}

/// The node of `nodes` that should hold `shard`: the one with the highest
/// score SHA-256(node id, 0x00, shard as 4 big-endian bytes) (rendezvous
/// hashing). `None` when there are no nodes.
pub fn preferred_owner<'a>(shard: u32, nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes.into_iter().max_by_key(|n| (hash64(&[n.as_bytes(), &[0], &shard.to_be_bytes()]), *n))
}

fn hash64(parts: &[&[u8]]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// What a node writes one shard under: handed to
/// [`crate::PgStorage::open_shard`], which checks it on every write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLease {
    /// The node holding the lease.
    pub node_id: String,
    /// The shard.
    pub shard: u32,
    /// The fencing epoch: raised at every acquisition of the shard, so a
    /// write made under an older one is refused.
    pub epoch: i64,
}

/// A lease this node holds, as it sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The fencing epoch.
    pub epoch: i64,
    /// Until when the node may act on it: the TTL counted from before the
    /// request that granted or renewed it was sent, so never later than
    /// the database's own `lease_until`. After it the node serves nothing
    /// of the shard (its writes would be refused anyway).
    pub valid_until: Instant,
}

/// A live node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its id (`MACP_NODE_ID`).
    pub node_id: String,
    /// Where its peers reach it (`MACP_ADVERTISE_ADDR`).
    pub advertise_addr: String,
}

/// What one [`Membership::tick`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Shards this node just took (load them from storage, then serve).
    pub acquired: Vec<ShardLease>,
    /// Shards this node held and holds no more (taken over after its lease
    /// lapsed): drop them at once; any write of them is refused.
    pub lost: Vec<u32>,
    /// Shards still this node's that another live node should hold:
    /// stop taking work for them, let what is in flight commit, drop them,
    /// then [`Membership::release`] them.
    pub hand_over: Vec<u32>,
    /// The live nodes, in id order.
    pub members: Vec<Member>,
    /// For every shard with a valid lease, its holder's node id (a shard
    /// missing here is between owners: retry shortly).
    pub owners: BTreeMap<u32, String>,
}

/// The settings of a cluster node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster (a second process with the
    /// same id takes the first one's shards away).
    pub node_id: String,
    /// The address peers forward requests to.
    pub advertise_addr: String,
    /// The shard count: stored when the cluster is created, and every node
    /// must agree with it.
    pub shards: u32,
    /// How long a lease lasts without renewal: how long the shards of a
    /// node that died stay unserved.
    pub lease_ttl: Duration,
}

/// Why joining or running the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The database failed or refused (see the storage error).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The node was configured with a different shard count than the
    /// cluster was created with.
    #[error(
        "the cluster in {place} was created with {stored} shards, this node is configured with {configured}: \
         every node must use the cluster's shard count (MACP_SHARDS={stored})"
    )]
    ShardCount {
        /// Where the cluster's data is.
        place: String,
        /// The stored count.
        stored: u32,
        /// This node's setting.
        configured: u32,
    },
    /// The schema holds a single-node runtime's data, or one runs on it.
    #[error("{place} cannot become a cluster's schema: {reason}")]
    NotACluster {
        /// Where.
        place: String,
        /// Why.
        reason: &'static str,
    },
    /// A setting is out of range.
    #[error("invalid cluster setting: {0}")]
    Config(&'static str),
}

/// This node's membership: its connection to the cluster's tables and the
/// leases it holds. See the module docs.
pub struct Membership {
    conn: Conn,
    place: Place,
    cfg: ClusterConfig,
    timeout: Duration,
    held: BTreeMap<u32, Lease>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("cfg", &self.cfg).field("held", &self.held).finish_non_exhaustive()
    }
}

impl Membership {
    /// Joins the cluster in `pg.schema` of `url`, creating it (with
    /// `cfg.shards` shards) if this is its first node: migrates the
    /// schema, checks the shard count, registers the node, and gives up
    /// leases an earlier process of this node id held. Holds no shard yet:
    /// call [`Membership::tick`].
    pub async fn join(url: &PgUrl, pg: &PgConfig, cfg: ClusterConfig) -> Result<Membership, ClusterError> {
        if cfg.node_id.is_empty() || cfg.node_id.len() > 128 {
            return Err(ClusterError::Config("the node id must be 1 to 128 bytes"));
        }
        if cfg.advertise_addr.is_empty() {
            return Err(ClusterError::Config("the advertise address must not be empty"));
        }
        if cfg.shards == 0 || cfg.shards > MAX_SHARDS {
            return Err(ClusterError::Config("the shard count must be 1 to 65536"));
        }
        if cfg.lease_ttl < MIN_LEASE_TTL {
            return Err(ClusterError::Config("the lease TTL must be at least 200 ms"));
        }
        let place = Place(format!("{url} schema {}", pg.schema).into());
        let start = Start {
            url: url.clone(),
            cfg: pg.clone(),
            place: place.clone(),
            read_only: false,
            cluster: Some(None),
            writers: 1,
        };
        let t = pg.timeout;
        let mut conn = connect(&start, "cluster").await?;
        let oid = schema_oid(&conn.client, &start).await?;
        migrate(&mut conn.client, &start).await?;
        let tx = within(&place, "join the cluster", t, conn.client.transaction()).await?;
        within(&place, "join the cluster", t, tx.execute(schema::MIGRATE_LOCK, &[&pg.schema])).await?;
        let row = within(&place, "join the cluster", t, tx.query_opt(schema::CLUSTER_SHARDS, &[])).await?;
        let stored: Option<i32> = row.map(|r| r.try_get(0)).transpose().map_err(place.db("join the cluster"))?;
        match stored {
            Some(n) if n as u32 != cfg.shards => {
                return Err(ClusterError::ShardCount {
                    place: place.0.to_string(),
                    stored: n.max(0) as u32,
                    configured: cfg.shards,
                });
            }
            Some(_) => {}
            None => {
                let traces = [&schema::LOCK_CLASS as &(dyn ToSql + Sync), &oid];
                let row = within(&place, "join the cluster", t, tx.query_one(sql::SINGLE_NODE_TRACES, &traces)).await?;
                let (data, locked): (bool, bool) = (
                    row.try_get(0).map_err(place.db("join the cluster"))?,
                    row.try_get(1).map_err(place.db("join the cluster"))?,
                );
                if locked {
                    let reason = "a single-node runtime is running on it";
                    return Err(ClusterError::NotACluster { place: place.0.to_string(), reason });
                }
                if data {
                    let reason = "it holds a single-node runtime's data (give the cluster a schema of its own)";
                    return Err(ClusterError::NotACluster { place: place.0.to_string(), reason });
                }
                let shards = cfg.shards as i32;
                within(&place, "create the cluster", t, tx.execute(sql::CREATE, &[&shards])).await?;
            }
        }
        within(&place, "join the cluster", t, tx.execute(sql::JOIN, &[&cfg.node_id, &cfg.advertise_addr])).await?;
        within(&place, "join the cluster", t, tx.execute(sql::RELEASE_ALL, &[&cfg.node_id])).await?;
        within(&place, "join the cluster", t, tx.commit()).await?;
        Ok(Membership { conn, place, cfg, timeout: t, held: BTreeMap::new() })
    }

    /// The node's settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// The leases this node holds, by shard.
    pub fn held(&self) -> &BTreeMap<u32, Lease> {
        &self.held
    }

    /// The lease to open `shard`'s storage under, if this node holds it.
    pub fn lease_for(&self, shard: u32) -> Option<ShardLease> {
        self.held.get(&shard).map(|l| ShardLease { node_id: self.cfg.node_id.clone(), shard, epoch: l.epoch })
    }

    fn client(&self) -> &Client {
        &self.conn.client
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// One round of membership: heartbeat, renew, rebalance, acquire. See
    /// the module docs and [`Tick`]. On an error nothing is known about
    /// the leases beyond [`Lease::valid_until`]: keep serving until then,
    /// and tick again.
    pub async fn tick(&mut self) -> Result<Tick, ClusterError> {
        let (place, t, ttl) = (self.place.clone(), self.timeout, self.ttl_ms());
        let me = self.cfg.node_id.clone();
        let sent = Instant::now();
        within(&place, "heartbeat", t, self.client().execute(sql::HEARTBEAT, &[&me, &self.cfg.advertise_addr])).await?;
        let rows = within(&place, "read the members", t, self.client().query(sql::MEMBERS, &[&ttl])).await?;
        let members = rows
            .iter()
            .map(|r| Ok(Member { node_id: r.try_get(0)?, advertise_addr: r.try_get(1)? }))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(place.db("read the members"))?;

        // Renew what is held; what was not renewed is lost.
        let mut tick = Tick::default();
        if !self.held.is_empty() {
            let (shards, epochs) = self.held_columns();
            let params: [&(dyn ToSql + Sync); 4] = [&me, &shards, &epochs, &ttl];
            let rows = within(&place, "renew the leases", t, self.client().query(sql::RENEW, &params)).await?;
            let renewed: Vec<i32> =
                rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>().map_err(place.db("renew the leases"))?;
            let valid_until = sent + self.cfg.lease_ttl;
            let before = std::mem::take(&mut self.held);
            for (shard, lease) in before {
                if renewed.contains(&(shard as i32)) {
                    self.held.insert(shard, Lease { epoch: lease.epoch, valid_until });
                } else {
                    tick.lost.push(shard);
                }
            }
        }

        // The shards that should be this node's, by the live membership
        // (which includes this node: its heartbeat is fresh).
        let mut live: Vec<&str> = members.iter().map(|m| m.node_id.as_str()).collect();
        if !live.contains(&me.as_str()) {
            live.push(&me);
        }
        let mut want = Vec::new();
        for shard in 0..self.cfg.shards {
            let mine = preferred_owner(shard, live.iter().copied()) == Some(me.as_str());
            if mine && !self.held.contains_key(&shard) {
                want.push(shard as i32);
            } else if !mine && self.held.contains_key(&shard) {
                tick.hand_over.push(shard);
            }
        }
        if !want.is_empty() {
            let sent = Instant::now();
            let params: [&(dyn ToSql + Sync); 3] = [&me, &want, &ttl];
            let rows = within(&place, "acquire leases", t, self.client().query(sql::ACQUIRE, &params)).await?;
            for r in &rows {
                let shard: i32 = r.try_get(0).map_err(place.db("acquire leases"))?;
                let epoch: i64 = r.try_get(1).map_err(place.db("acquire leases"))?;
                let shard = shard as u32;
                self.held.insert(shard, Lease { epoch, valid_until: sent + self.cfg.lease_ttl });
                tick.acquired.push(ShardLease { node_id: me.clone(), shard, epoch });
            }
        }
        let rows = within(&place, "read the owners", t, self.client().query(sql::OWNERS, &[])).await?;
        for r in &rows {
            let shard: i32 = r.try_get(0).map_err(place.db("read the owners"))?;
            let owner: String = r.try_get(1).map_err(place.db("read the owners"))?;
            tick.owners.insert(shard as u32, owner);
        }
        tick.members = members;
        Ok(tick)
    }

    fn held_columns(&self) -> (Vec<i32>, Vec<i64>) {
        self.held.iter().map(|(s, l)| (*s as i32, l.epoch)).unzip()
    }

    /// Gives up `shards` (after [`Tick::hand_over`] named them and the
    /// node dropped them), so their preferred owner can take them at its
    /// next tick instead of waiting for the lease to lapse.
    pub async fn release(&mut self, shards: &[u32]) -> Result<(), ClusterError> {
        let (mut ids, mut epochs) = (Vec::new(), Vec::new());
        for s in shards {
            if let Some(l) = self.held.remove(s) {
                ids.push(*s as i32);
                epochs.push(l.epoch);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let params: [&(dyn ToSql + Sync); 3] = [&self.cfg.node_id, &ids, &epochs];
        within(&self.place, "release leases", self.timeout, self.client().execute(sql::RELEASE, &params)).await?;
        Ok(())
    }

    /// Leaves the cluster cleanly: releases every lease and removes the
    /// node from the membership, so the others take its shards at their
    /// next tick rather than after the TTL.
    pub async fn leave(mut self) -> Result<(), ClusterError> {
        let all: Vec<u32> = self.held.keys().copied().collect();
        self.release(&all).await?;
        within(&self.place, "leave the cluster", self.timeout, self.client().execute(sql::LEAVE, &[&self.cfg.node_id]))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_the_documented_hash() {
        // SHA-256("") starts e3b0c44298fc1c14.
        assert_eq!(shard_of("", u32::MAX), (0xe3b0_c442_98fc_1c14u64 % u64::from(u32::MAX)) as u32);
        // SHA-256("abc") starts ba7816bf8f01cfea.
        assert_eq!(shard_of("abc", 64), (0xba78_16bf_8f01_cfeau64 % 64) as u32);
        assert_eq!(shard_of("abc", 1), 0);
        assert_eq!(shard_of("abc", 0), 0, "a zero count is treated as one shard");
    }

    #[test]
    fn sessions_spread_over_the_shards() {
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[shard_of(&format!("session-{i}"), 64) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "1,000 expected per shard, got {min}..{max}");
    }

    #[test]
    fn rendezvous_moves_only_what_a_joining_node_gains() {
        let two = ["node-a", "node-b"];
        let three = ["node-a", "node-b", "node-c"];
        let mut moved = 0;
        let mut per_node = BTreeMap::new();
        for shard in 0..64 {
            let before = preferred_owner(shard, two).unwrap();
            let after = preferred_owner(shard, three).unwrap();
            if before != after {
                assert_eq!(after, "node-c", "shard {shard} moved between old nodes");
                moved += 1;
            }
            *per_node.entry(after).or_insert(0) += 1;
        }
        assert!(moved > 10 && moved < 32, "about a third of the shards move to the new node: {moved}");
        assert!(per_node.values().all(|n| *n > 10), "{per_node:?}");
        assert_eq!(preferred_owner(3, []), None);
        // Order of the membership does not matter.
        for shard in 0..64 {
            assert_eq!(preferred_owner(shard, three), preferred_owner(shard, ["node-c", "node-a", "node-b"]));
        }
    }
}
