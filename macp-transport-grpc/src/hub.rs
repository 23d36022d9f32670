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
    /// Session lifecycle events (WatchSessions).
    pub lifecycle: broadcast::Sender<SessionLifecycleEvent>,
    /// Ambient signals and progress (WatchSignals).
    pub signals: broadcast::Sender<WatchSignalsResponse>,
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

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("sessions", &self.sessions.len()).finish_non_exhaustive()
    }
}

impl Hub {
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
            Broadcast::Lifecycle { event, session, observed_at_unix_ms } => {
                use macp_wire::v1::session_lifecycle_event::EventType;
                if matches!(event, EventType::Resolved | EventType::Expired | EventType::Cancelled) {
                    // Nothing more can enter this history: end the feeds so
                    // passive subscribers' streams finish.
                    let ended = self.sessions.remove(&session.session_id);
                    if let (Some(m), Some(subs)) = (&self.metrics, ended) {
                        m.subscribers_finished(subs.len());
                    }
                }
                let _ = self.lifecycle.send(SessionLifecycleEvent {
                    event_type: event as i32,
                    session: Some(*session),
                    observed_at_unix_ms,
                });
            }
            Broadcast::Signal { envelope } => {
                let _ = self
                    .signals
                    .send(WatchSignalsResponse { envelope: Some((*envelope).clone()), sender_authenticated: true });
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
