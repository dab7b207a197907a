//! Live status: an in-process fan-out from committed store writes to the pages that watch a
//! verification (DESIGN §3.5). The HTTP side (WebSocket and Server-Sent Events) is in
//! [`crate::http::watch`].
//!
//! The store calls [`Hub::publish`] with every committed verification change (after its fsync
//! for every synced write, see [`crate::store::Store::on_commit`]); a change for a verification
//! nobody watches costs one hash lookup. Each watched verification has one
//! `tokio::sync::watch` channel holding the latest [`Snapshot`]: watchers only ever need the
//! newest state, so a slow watcher never queues messages, it skips to the latest. No
//! connection polls the store.
//!
//! Bounds: at most `watch.max_connections` watchers in all and `watch.max_per_verification` on
//! one verification; a watcher lives at most until its verification is final (the watch token
//! expires with the verification).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, watch};

use crate::clock::UnixTime;
use crate::id::VerificationId;
use crate::store::Change;
use crate::verification::{DeliveryStatus, Status};

/// `[watch]`: live-status connections on the public listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    /// Most open watch connections (WebSocket and SSE together).
    pub max_connections: usize,
    /// Most open watch connections on one verification.
    pub max_per_verification: usize,
    /// Keep-alive interval: a WebSocket ping or an SSE comment, seconds.
    pub ping_interval_seconds: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            max_connections: 10_000,
            max_per_verification: 8,
            ping_interval_seconds: 20,
        }
    }
}

impl WatchConfig {
    /// The keep-alive interval (at least one second).
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_seconds.max(1))
    }
}

/// What a watcher is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The verification's stored status.
    pub status: Status,
    /// Its mail's delivery status.
    pub delivery: DeliveryStatus,
    /// When a pending verification turns expired.
    pub expires_at: UnixTime,
}

impl Snapshot {
    /// The status as of `now`: a pending verification past its expiry is expired even before
    /// the sweeper has written that down.
    pub fn status_at(&self, now: UnixTime) -> Status {
        if self.status == Status::Pending && now >= self.expires_at {
            Status::Expired
        } else {
            self.status
        }
    }

    /// The message sent to watchers: `{"id", "status", "final", "delivery", "expires_at"}`.
    pub fn message(&self, id: VerificationId, now: UnixTime) -> String {
        let status = self.status_at(now);
        json!({
            "id": id.to_string(),
            "status": status.as_str(),
            "final": status.is_final(),
            "delivery": delivery_str(self.delivery),
            "expires_at": self.expires_at.to_rfc3339(),
        })
        .to_string()
    }
}

impl From<&Change> for Snapshot {
    fn from(c: &Change) -> Self {
        Snapshot {
            status: c.status,
            delivery: c.delivery,
            expires_at: c.expires_at,
        }
    }
}

fn delivery_str(d: DeliveryStatus) -> &'static str {
    match d {
        DeliveryStatus::Queued => "queued",
        DeliveryStatus::Retrying => "retrying",
        DeliveryStatus::Sent => "sent",
        DeliveryStatus::Failed => "failed",
    }
}

/// Why a watcher was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `watch.max_connections` reached.
    Total,
    /// `watch.max_per_verification` reached.
    PerVerification,
    /// The daemon is shutting down.
    ShuttingDown,
}

impl Refused {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerVerification => "per_verification",
            Refused::ShuttingDown => "shutting_down",
        }
    }
}

/// Watch metrics.
#[derive(Clone)]
pub struct WatchMetrics {
    /// Open watch connections by transport.
    pub connections: IntGaugeVec,
    /// Watchers refused by reason.
    pub refused: IntCounterVec,
    /// Status messages sent by transport.
    pub messages: IntCounterVec,
}

impl WatchMetrics {
    /// Registers the watch metrics.
    ///
    /// # Errors
    /// Duplicate registration (a bug).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let connections = IntGaugeVec::new(
            Opts::new(
                "watch_connections",
                "Open live-status connections by transport",
            ),
            &["transport"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "watch_refused_total",
                "Live-status connections refused by reason",
            ),
            &["reason"],
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "watch_messages_total",
                "Status messages sent to watchers by transport",
            ),
            &["transport"],
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        for t in ["websocket", "sse"] {
            connections.with_label_values(&[t]);
            messages.with_label_values(&[t]);
        }
        for r in [
            Refused::Total,
            Refused::PerVerification,
            Refused::ShuttingDown,
        ] {
            refused.with_label_values(&[r.as_str()]);
        }
        Ok(WatchMetrics {
            connections,
            refused,
            messages,
        })
    }
}

struct Channel {
    tx: watch::Sender<Option<Snapshot>>,
    watchers: usize,
}

#[derive(Default)]
struct Table {
    channels: HashMap<VerificationId, Channel>,
    total: usize,
}

struct Inner {
    table: Mutex<Table>,
    cfg: WatchConfig,
    metrics: WatchMetrics,
    shutdown: watch::Receiver<bool>,
    drained: Notify,
}

/// The fan-out hub; cheap to clone.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

impl Hub {
    /// A hub whose watchers end when `shutdown` turns true.
    pub fn new(cfg: WatchConfig, metrics: WatchMetrics, shutdown: watch::Receiver<bool>) -> Self {
        Hub(Arc::new(Inner {
            table: Mutex::new(Table::default()),
            cfg,
            metrics,
            shutdown,
            drained: Notify::new(),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &WatchConfig {
        &self.0.cfg
    }

    /// The metrics.
    pub fn metrics(&self) -> &WatchMetrics {
        &self.0.metrics
    }

    /// A receiver that turns true when the daemon shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.0.shutdown.clone()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table holds plain counters: a panic elsewhere cannot leave it inconsistent.
        self.0
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a watcher of `id`. Subscribe before reading the current state from the store:
    /// a change committed in between is then delivered, never lost.
    ///
    /// # Errors
    /// [`Refused`] at a bound or during shutdown.
    pub fn subscribe(&self, id: VerificationId) -> Result<Subscription, Refused> {
        if *self.0.shutdown.borrow() {
            return Err(Refused::ShuttingDown);
        }
        let mut t = self.table();
        if t.total >= self.0.cfg.max_connections {
            return Err(Refused::Total);
        }
        let rx = match t.channels.get_mut(&id) {
            Some(c) if c.watchers >= self.0.cfg.max_per_verification => {
                return Err(Refused::PerVerification);
            }
            Some(c) => {
                c.watchers += 1;
                c.tx.subscribe()
            }
            None => {
                let (tx, rx) = watch::channel(None);
                t.channels.insert(id, Channel { tx, watchers: 1 });
                rx
            }
        };
        t.total += 1;
        Ok(Subscription {
            hub: self.clone(),
            id,
            rx,
        })
    }

    /// Hands committed changes to their watchers (called on the store's writer thread).
    pub fn publish(&self, changes: &[Change]) {
        let t = self.table();
        if t.channels.is_empty() {
            return;
        }
        for c in changes {
            if let Some(ch) = t.channels.get(&c.id) {
                ch.tx.send_replace(Some(Snapshot::from(c)));
            }
        }
    }

    /// Open watchers.
    pub fn watchers(&self) -> usize {
        self.table().total
    }

    /// Waits until every watcher has gone (after shutdown told them to), at most `deadline`.
    pub async fn drained(&self, deadline: Duration) {
        let wait = async {
            loop {
                let notified = self.0.drained.notified();
                if self.watchers() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
    }

    fn leave(&self, id: VerificationId) {
        let mut t = self.table();
        if let Some(c) = t.channels.get_mut(&id) {
            c.watchers = c.watchers.saturating_sub(1);
            if c.watchers == 0 {
                t.channels.remove(&id);
            }
        }
        t.total = t.total.saturating_sub(1);
        if t.total == 0 {
            self.0.drained.notify_waiters();
        }
    }
}

/// One admitted watcher; leaving the hub happens on drop.
pub struct Subscription {
    hub: Hub,
    id: VerificationId,
    /// The latest snapshot published for this verification (`None` until the first change).
    pub rx: watch::Receiver<Option<Snapshot>>,
}

impl Subscription {
    /// The verification watched.
    pub fn id(&self) -> VerificationId {
        self.id
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(max_total: usize, max_per: usize) -> (Hub, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        let cfg = WatchConfig {
            max_connections: max_total,
            max_per_verification: max_per,
            ping_interval_seconds: 20,
        };
        let m = WatchMetrics::register(&Registry::new()).expect("metrics");
        (Hub::new(cfg, m, rx), tx)
    }

    fn change(id: VerificationId, status: Status) -> Change {
        Change {
            id,
            status,
            delivery: DeliveryStatus::Sent,
            expires_at: UnixTime(10_000),
        }
    }

    #[test]
    fn bounds_are_enforced_and_released_on_drop() {
        let (hub, _stop) = hub(3, 2);
        let a = VerificationId::from_bytes([1; 16]);
        let b = VerificationId::from_bytes([2; 16]);
        let a1 = hub.subscribe(a).expect("a1");
        let a2 = hub.subscribe(a).expect("a2");
        assert_eq!(hub.subscribe(a).err(), Some(Refused::PerVerification));
        let b1 = hub.subscribe(b).expect("b1");
        assert_eq!(hub.subscribe(b).err(), Some(Refused::Total));
        assert_eq!(hub.watchers(), 3);
        drop(a1);
        drop(a2);
        assert_eq!(hub.watchers(), 1);
        assert!(!hub.table().channels.contains_key(&a), "empty channel kept");
        let _a3 = hub.subscribe(a).expect("room again");
        drop(b1);
    }

    #[test]
    fn publish_reaches_only_watchers_of_that_verification() {
        let (hub, _stop) = hub(10, 10);
        let a = VerificationId::from_bytes([1; 16]);
        let b = VerificationId::from_bytes([2; 16]);
        let mut sa = hub.subscribe(a).expect("a");
        let mut sb = hub.subscribe(b).expect("b");
        hub.publish(&[change(a, Status::Verified)]);
        assert!(sa.rx.has_changed().expect("open"));
        assert_eq!(
            sa.rx.borrow_and_update().map(|s| s.status),
            Some(Status::Verified)
        );
        assert!(!sb.rx.has_changed().expect("open"));
        assert!(sb.rx.borrow_and_update().is_none());
    }

    #[test]
    fn a_slow_watcher_sees_only_the_latest_state() {
        let (hub, _stop) = hub(10, 10);
        let a = VerificationId::from_bytes([1; 16]);
        let mut s = hub.subscribe(a).expect("a");
        hub.publish(&[change(a, Status::Pending), change(a, Status::Verified)]);
        assert_eq!(
            s.rx.borrow_and_update().map(|s| s.status),
            Some(Status::Verified)
        );
    }

    #[test]
    fn no_new_watchers_after_shutdown() {
        let (hub, stop) = hub(10, 10);
        stop.send(true).expect("send");
        assert_eq!(
            hub.subscribe(VerificationId::from_bytes([1; 16])).err(),
            Some(Refused::ShuttingDown)
        );
    }

    #[test]
    fn pending_past_expiry_reads_as_expired_and_final() {
        let s = Snapshot {
            status: Status::Pending,
            delivery: DeliveryStatus::Queued,
            expires_at: UnixTime(5_000),
        };
        let id = VerificationId::from_bytes([7; 16]);
        let before: serde_json::Value =
            serde_json::from_str(&s.message(id, UnixTime(4_999))).expect("json");
        assert_eq!(before["status"], "pending");
        assert_eq!(before["final"], false);
        assert_eq!(before["delivery"], "queued");
        let after: serde_json::Value =
            serde_json::from_str(&s.message(id, UnixTime(5_000))).expect("json");
        assert_eq!(after["status"], "expired");
        assert_eq!(after["final"], true);
        assert_eq!(after["id"], id.to_string());
    }

    #[tokio::test]
    async fn drained_returns_when_the_last_watcher_leaves() {
        let (hub, _stop) = hub(10, 10);
        let s = hub
            .subscribe(VerificationId::from_bytes([1; 16]))
            .expect("s");
        let h = hub.clone();
        let waiter = tokio::spawn(async move {
            h.drained(Duration::from_secs(5)).await;
            h.watchers()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
        assert_eq!(waiter.await.expect("join"), 0);
    }
}
