//! Node-to-node forwarding: a request for a session whose shard another
//! node holds is sent on to that node, with the identity this node
//! authenticated.
//!
//! The identity travels in two headers: `x-macp-cluster-identity` (the
//! sender and its grants, the forwarding node and the time, as base64url
//! JSON) and `x-macp-cluster-mac`, an HMAC-SHA256 of the first under the
//! cluster's shared secret (`MACP_CLUSTER_SECRET`). A node accepts a
//! forwarded identity only with a valid MAC made within the last
//! [`MAX_AGE_MS`], so a client cannot claim one: without the secret it
//! cannot make the MAC. (A forwarded request seen on the wire could be
//! replayed for that long: run node-to-node traffic over TLS, or a
//! private network.)

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use macp_kernel::{Grants, Identity};
use ring::hmac;
use serde_json::{json, Value};
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::pb::macp_runtime_service_client::MacpRuntimeServiceClient;

/// The header holding a forwarded identity.
pub const IDENTITY_HEADER: &str = "x-macp-cluster-identity";
/// The header holding its MAC.
pub const MAC_HEADER: &str = "x-macp-cluster-mac";
/// [`IDENTITY_HEADER`] parsed once, for the lookup every request makes.
pub static IDENTITY_KEY: std::sync::LazyLock<MetadataKey<Ascii>> =
    std::sync::LazyLock::new(|| MetadataKey::from_static(IDENTITY_HEADER));
/// [`MAC_HEADER`] parsed once, for the lookup every request makes.
pub static MAC_KEY: std::sync::LazyLock<MetadataKey<Ascii>> =
    std::sync::LazyLock::new(|| MetadataKey::from_static(MAC_HEADER));
/// How old a forwarded identity may be when it arrives (clock skew
/// between nodes included).
pub const MAX_AGE_MS: i64 = 30_000;

/// The cluster's shared secret, as the key that makes and checks MACs.
#[derive(Clone)]
pub struct ClusterKey(hmac::Key);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// The key of `secret` (at least 16 bytes; checked by the configuration).
    pub fn new(secret: &[u8]) -> Self {
        ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// The two headers carrying `identity` from node `node` at `now_ms`.
    pub fn stamp(&self, md: &mut MetadataMap, identity: &Identity, node: &str, now_ms: i64) {
        let g = &identity.grants;
        let body = json!({
            "v": 1,
            "node": node,
            "at": now_ms,
            "sender": identity.sender,
            "can_start_sessions": g.can_start_sessions,
            "allowed_modes": g.allowed_modes,
            "max_open_sessions": g.max_open_sessions,
            "can_manage_mode_registry": g.can_manage_mode_registry,
            "is_observer": g.is_observer,
        });
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body.to_string());
        let mac = hmac::sign(&self.0, encoded.as_bytes());
        let mac = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.as_ref());
        // Both are base64url: always valid header values.
        if let (Ok(id), Ok(mac)) = (MetadataValue::try_from(encoded), MetadataValue::try_from(mac)) {
            md.insert(IDENTITY_HEADER, id);
            md.insert(MAC_HEADER, mac);
        }
    }

    /// The identity a forwarding node vouched for, if `md` carries one:
    /// `None` without the header, `Some(Err(why))` when it does not hold.
    pub fn verify(&self, md: &MetadataMap, now_ms: i64) -> Option<Result<Identity, &'static str>> {
        let id = md.get(IDENTITY_HEADER)?;
        Some(self.check(id.to_str().ok(), md.get(MAC_HEADER).and_then(|m| m.to_str().ok()), now_ms))
    }

    fn check(&self, id: Option<&str>, mac: Option<&str>, now_ms: i64) -> Result<Identity, &'static str> {
        let (Some(id), Some(mac)) = (id, mac) else { return Err("a forwarded identity without its MAC") };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mac = b64.decode(mac).map_err(|_| "a malformed forwarded-identity MAC")?;
        hmac::verify(&self.0, id.as_bytes(), &mac).map_err(|_| "a forwarded identity with a wrong MAC")?;
        let body: Value = b64
            .decode(id)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("a malformed forwarded identity")?;
        let at = body["at"].as_i64().ok_or("a forwarded identity without its time")?;
        if (now_ms - at).abs() > MAX_AGE_MS {
            return Err("a forwarded identity too old (or from a node whose clock is off)");
        }
        let sender = body["sender"].as_str().filter(|s| !s.is_empty()).ok_or("a forwarded identity without sender")?;
        let allowed_modes = match &body["allowed_modes"] {
            Value::Null => None,
            Value::Array(v) => Some(v.iter().filter_map(|m| m.as_str().map(str::to_string)).collect()),
            _ => return Err("a malformed forwarded identity"),
        };
        let grants = Grants {
            can_start_sessions: body["can_start_sessions"].as_bool().unwrap_or(false),
            allowed_modes,
            max_open_sessions: body["max_open_sessions"].as_u64().map(|n| n.min(u64::from(u32::MAX)) as u32),
            can_manage_mode_registry: body["can_manage_mode_registry"].as_bool().unwrap_or(false),
            is_observer: body["is_observer"].as_bool().unwrap_or(false),
        };
        Ok(Identity { sender: sender.to_string(), grants })
    }
}

/// A client of another node's gRPC service.
pub type PeerClient = MacpRuntimeServiceClient<Channel>;

/// This node's side of forwarding: the key, its own id, and lazily
/// connected channels per peer address: one for requests, one for the
/// streams of cluster-wide watches.
#[derive(Debug)]
pub struct Forwarder {
    key: ClusterKey,
    node_id: String,
    tls: Option<ClientTlsConfig>,
    peers: Mutex<HashMap<String, Channel>>,
    /// Watch streams last as long as their watch: on a connection of
    /// their own, they cannot take the stream slots (the peer's
    /// `MACP_MAX_CONCURRENT_STREAMS`) forwarded requests need.
    watches: Mutex<HashMap<String, Channel>>,
}

impl Forwarder {
    /// Forwards as node `node_id`, over TLS when `tls` is given.
    pub fn new(key: ClusterKey, node_id: &str, tls: Option<ClientTlsConfig>) -> Self {
        Forwarder {
            key,
            node_id: node_id.to_string(),
            tls,
            peers: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// A client of the node at `addr` (host:port).
    pub fn client(&self, addr: &str) -> Result<PeerClient, tonic::Status> {
        self.client_in(&self.peers, addr)
    }

    /// A client of the node at `addr` for the long-lived streams of
    /// cluster-wide watches (see `watches`).
    pub fn watch_client(&self, addr: &str) -> Result<PeerClient, tonic::Status> {
        self.client_in(&self.watches, addr)
    }

    fn client_in(&self, channels: &Mutex<HashMap<String, Channel>>, addr: &str) -> Result<PeerClient, tonic::Status> {
        let mut peers = channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = peers.get(addr) {
            return Ok(MacpRuntimeServiceClient::new(ch.clone()));
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let unreachable =
            |e: tonic::transport::Error| tonic::Status::unavailable(format!("cannot reach cluster node {addr}: {e}"));
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(unreachable)?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(unreachable)?;
        }
        let ch = endpoint.tcp_nodelay(true).connect_lazy();
        peers.insert(addr.to_string(), ch.clone());
        Ok(MacpRuntimeServiceClient::new(ch))
    }

    /// `message` as a request to another node, carrying `identity`.
    pub fn request<T>(&self, message: T, identity: &Identity) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        self.key.stamp(req.metadata_mut(), identity, &self.node_id, crate::driver::now_ms());
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        let mut id = Identity::new("alice");
        id.grants.allowed_modes = Some(["macp.mode.decision.v1".to_string()].into_iter().collect());
        id.grants.max_open_sessions = Some(3);
        id.grants.is_observer = true;
        id.grants.can_manage_mode_registry = false;
        id
    }

    #[test]
    fn an_identity_stamped_with_the_key_comes_back_whole() {
        let key = ClusterKey::new(b"0123456789abcdef0123");
        let mut md = MetadataMap::new();
        key.stamp(&mut md, &identity(), "n1", 1_000_000);
        assert_eq!(key.verify(&md, 1_000_500), Some(Ok(identity())));
        assert_eq!(key.verify(&MetadataMap::new(), 1_000_000), None, "no header, nothing to say");
    }

    #[test]
    fn forged_stale_or_altered_identities_are_refused() {
        let key = ClusterKey::new(b"0123456789abcdef0123");
        let other = ClusterKey::new(b"another secret of the same size");
        let mut md = MetadataMap::new();
        other.stamp(&mut md, &identity(), "n1", 1_000_000);
        assert_eq!(key.verify(&md, 1_000_000), Some(Err("a forwarded identity with a wrong MAC")));

        let mut md = MetadataMap::new();
        key.stamp(&mut md, &identity(), "n1", 1_000_000);
        assert!(matches!(key.verify(&md, 1_000_000 + MAX_AGE_MS + 1), Some(Err(_))), "too old");
        // A client swapping in another sender keeps the old MAC.
        let mut forged = MetadataMap::new();
        key.stamp(&mut forged, &Identity::new("mallory"), "n1", 1_000_000);
        let mut md2 = md.clone();
        md2.insert(IDENTITY_HEADER, forged.get(IDENTITY_HEADER).unwrap().clone());
        assert_eq!(key.verify(&md2, 1_000_000), Some(Err("a forwarded identity with a wrong MAC")));
        md.remove(MAC_HEADER);
        assert_eq!(key.verify(&md, 1_000_000), Some(Err("a forwarded identity without its MAC")));
    }
}
