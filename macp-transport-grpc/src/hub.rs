//! Fan-out of kernel broadcasts to streams and watchers.
//!
//! The driver task calls [`Hub::dispatch`] after the batch that produced the
//! broadcasts is durable. Nothing here may block the driver: session
//! subscribers have bounded queues and are dropped (with a reason their
//! stream reports) when they fall behind; watchers use tokio broadcast
//! channels whose lagging receivers learn they lagged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use macp_kernel::Broadcast;
use macp_wire::v1::{Envelope, SessionLifecycleEvent, WatchSignalsResponse};
use tokio::sync::{broadcast, mpsc};

use crate::metrics::{Dropped, Metrics};

/// Queue depth of one session subscriber; a subscriber further behind than
/// this is closed and told to resubscribe from its last sequence number.
pub const SUBSCRIBER_QUEUE: usize = 256;

/// An accepted envelope with its session sequence number.
#[derive(Clone, Debug)]
pub struct Sequenced {
    /// 1-based position in the session's history.
    pub seq: u64,
    /// The envelope.
    pub envelope: Arc<Envelope>,
}

/// The receiving half of a session subscription.
#[derive(Debug)]
pub struct SessionFeed {
    /// Live envelopes.
    pub rx: mpsc::Receiver<Sequenced>,
    /// Set when the hub dropped this subscriber for falling behind.
    pub overflowed: Arc<AtomicBool>,
}

struct Subscriber {
    tx: mpsc::Sender<Sequenced>,
    overflowed: Arc<AtomicBool>,
}

/// Registry-change notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistryEvent {
    /// The policy registry changed.
    Policies,
    /// The mode registry changed.
    Modes,
}

/// The broadcast fan-out.
pub struct Hub {
    sessions: BTreeMap<String, Vec<Subscriber>>,
    /// Session lifecycle events (WatchSessions). Events are shared
    /// (`Arc`): the channel keeps a ring of 4,096 slots, which holding the
    /// events inline made about a megabyte each, whoever watched.
    pub lifecycle: broadcast::Sender<Arc<SessionLifecycleEvent>>,
    /// Ambient signals and progress (WatchSignals), shared likewise.
    pub signals: broadcast::Sender<Arc<WatchSignalsResponse>>,
    /// Registry changes (WatchPolicies, WatchModeRegistry).
    pub registry: broadcast::Sender<RegistryEvent>,
    /// Subscriber counts, when metrics are on.
    metrics: Option<Arc<Metrics>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            sessions: BTreeMap::new(),
            lifecycle: broadcast::channel(4096).0,
            signals: broadcast::channel(4096).0,
            registry: broadcast::channel(64).0,
            metrics: None,
        }
    }
}

/// Sends an event built by `make` to a watch channel's receivers, and
/// builds nothing when there are none (`send` would drop it).
pub(crate) fn publish<T>(tx: &broadcast::Sender<Arc<T>>, make: impl FnOnce() -> T) {
    if tx.receiver_count() > 0 {
        let _ = tx.send(Arc::new(make()));
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("sessions", &self.sessions.len()).finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub of its own session subscribers whose lifecycle, signal and
    /// registry events go to this hub's watchers: a cluster node runs a
    /// driver (and a hub) per shard, and its watchers see them all.
    pub fn sharing(&self) -> Hub {
        Hub {
            sessions: BTreeMap::new(),
            lifecycle: self.lifecycle.clone(),
            signals: self.signals.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Like [`Hub::sharing`], but registry changes go nowhere: a cluster
    /// node's shards sync their registries from the node's registry
    /// driver's, which alone tells the watchers (once per change, not once
    /// per shard).
    pub fn sharing_sessions(&self) -> Hub {
        Hub { registry: broadcast::channel(1).0, ..self.sharing() }
    }

    /// Counts subscribers in `metrics` from now on.
    pub fn set_metrics(&mut self, metrics: Option<Arc<Metrics>>) {
        self.metrics = metrics;
    }

    /// Adds a live subscriber to a session.
    pub fn subscribe(&mut self, session_id: &str) -> SessionFeed {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        self.sessions
            .entry(session_id.to_string())
            .or_default()
            .push(Subscriber { tx, overflowed: overflowed.clone() });
        if let Some(m) = &self.metrics {
            m.subscriber_added();
        }
        SessionFeed { rx, overflowed }
    }

    /// A feed that is already finished (subscribing to a terminal session:
    /// its history is all there will ever be).
    pub fn finished_feed() -> SessionFeed {
        let (_, rx) = mpsc::channel(1);
        SessionFeed { rx, overflowed: Arc::new(AtomicBool::new(false)) }
    }

    /// Delivers one broadcast.
    pub fn dispatch(&mut self, b: Broadcast) {
        match b {
            Broadcast::SessionEnvelope { seq, envelope } => {
                let session_id = envelope.session_id.as_str();
                if let Some(subs) = self.sessions.get_mut(session_id) {
                    let metrics = self.metrics.as_deref();
                    subs.retain(|s| match s.tx.try_send(Sequenced { seq, envelope: envelope.clone() }) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            s.overflowed.store(true, Ordering::Release);
                            if let Some(m) = metrics {
                                m.subscriber_dropped(Dropped::Lagged);
                            }
                            false
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            if let Some(m) = metrics {
                                m.subscriber_dropped(Dropped::Closed);
                            }
                            false
                        }
                    });
                    if subs.is_empty() {
                        self.sessions.remove(session_id);
                    }
                }
            }
            Broadcast::Lifecycle { event, session, observed_at_unix_ms, .. } => {
                use macp_wire::v1::session_lifecycle_event::EventType;
                if matches!(event, EventType::Resolved | EventType::Expired | EventType::Cancelled) {
                    // Nothing more can enter this history: end the feeds so
                    // passive subscribers' streams finish.
                    let ended = self.sessions.remove(&session.session_id);
                    if let (Some(m), Some(subs)) = (&self.metrics, ended) {
                        m.subscribers_finished(subs.len());
                    }
                }
                publish(&self.lifecycle, || SessionLifecycleEvent {
                    event_type: event as i32,
                    session: Some(*session),
                    observed_at_unix_ms,
                });
            }
            Broadcast::Signal { envelope } => {
                publish(&self.signals, || WatchSignalsResponse {
                    envelope: Some((*envelope).clone()),
                    sender_authenticated: true,
                });
            }
            Broadcast::PoliciesChanged => {
                let _ = self.registry.send(RegistryEvent::Policies);
            }
            Broadcast::ModesChanged => {
                let _ = self.registry.send(RegistryEvent::Modes);
            }
        }
    }

    /// Drops subscribers whose streams ended (called now and then).
    pub fn prune(&mut self) {
        let metrics = self.metrics.as_deref();
        self.sessions.retain(|_, subs| {
            subs.retain(|s| {
                let closed = s.tx.is_closed();
                if let (true, Some(m)) = (closed, metrics) {
                    m.subscriber_dropped(Dropped::Closed);
                }
                !closed
            });
            !subs.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(session_id: &str, n: u64) -> Broadcast {
        let envelope = Envelope { session_id: session_id.into(), message_id: format!("m{n}"), ..Default::default() };
        Broadcast::SessionEnvelope { seq: n, envelope: Arc::new(envelope) }
    }

    /// The lagged and closed series of `macp_stream_subscribers_dropped_total`
    /// and the `macp_stream_subscribers` gauge, as the scrape shows them.
    fn counts(m: &Metrics) -> (String, String, String) {
        let text = m.encode();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("{prefix}: {text}"))
        };
        (
            line("macp_stream_subscribers_dropped_total{reason=\"lagged\"}"),
            line("macp_stream_subscribers_dropped_total{reason=\"closed\"}"),
            line("macp_stream_subscribers "),
        )
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_dropped_as_lagged_and_one_whose_stream_ended_as_closed() {
        let metrics = Arc::new(Metrics::new());
        let mut hub = Hub::default();
        hub.set_metrics(Some(metrics.clone()));
        let slow = hub.subscribe("s1");
        let gone = hub.subscribe("s2");
        let reader = hub.subscribe("s1");
        assert_eq!(counts(&metrics).2, "macp_stream_subscribers 3");

        // `slow` never reads: the queue holds SUBSCRIBER_QUEUE envelopes, the
        // next one drops it. `reader` drains as it goes and stays.
        let mut reader = reader;
        for n in 1..=SUBSCRIBER_QUEUE as u64 + 1 {
            hub.dispatch(envelope("s1", n));
            assert_eq!(reader.rx.try_recv().expect("the reader keeps up").seq, n);
        }
        assert!(slow.overflowed.load(Ordering::Acquire), "the slow subscriber is told it lagged");
        assert!(!reader.overflowed.load(Ordering::Acquire));
        let (lagged, closed, live) = counts(&metrics);
        assert_eq!(lagged, "macp_stream_subscribers_dropped_total{reason=\"lagged\"} 1");
        assert_eq!(closed, "macp_stream_subscribers_dropped_total{reason=\"closed\"} 0");
        assert_eq!(live, "macp_stream_subscribers 2");

        // `gone`'s stream went away: the next envelope of its session finds
        // the queue closed.
        drop(gone);
        hub.dispatch(envelope("s2", 1));
        let (lagged, closed, live) = counts(&metrics);
        assert_eq!(lagged, "macp_stream_subscribers_dropped_total{reason=\"lagged\"} 1");
        assert_eq!(closed, "macp_stream_subscribers_dropped_total{reason=\"closed\"} 1");
        assert_eq!(live, "macp_stream_subscribers 1");

        // The reader's stream ends too; a prune (no envelope needed) finds it.
        drop(reader);
        hub.prune();
        let (_, closed, live) = counts(&metrics);
        assert_eq!(closed, "macp_stream_subscribers_dropped_total{reason=\"closed\"} 2");
        assert_eq!(live, "macp_stream_subscribers 0");
        // The slow one's queue still holds what it was sent before the drop.
        let mut slow = slow;
        assert_eq!(slow.rx.try_recv().map(|s| s.seq).ok(), Some(1));
    }
}
