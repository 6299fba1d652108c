//! Counters a shard publishes for the node's metrics endpoint and `$SYS` topics.
//!
//! A shard keeps its counters as plain integers (`Counters`) and copies them, with relaxed stores, into
//! its own [`ShardMetrics`] slot of [`super::NodeShared`] at most every [`PUBLISH_EVERY`] (and once more
//! after the last change, through its deadline): whoever reads them (the metrics thread, shard 0 for
//! `$SYS`) only loads atomics, so a scrape never waits for a shard nor a shard for a scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shardmq_storage::FLUSH_BUCKETS_US;
use shardmq_wire::QoS;

use super::Shard;

/// Staleness of the published values: far below any scrape interval, and rare enough that the stores
/// cost nothing next to the events between them.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Whether a series only grows (Prometheus `counter`) or goes up and down (`gauge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One exported series of a shard: its name, extra labels (`reason="qos0"`, or empty) and help text.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    pub name: &'static str,
    pub labels: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn s(name: &'static str, labels: &'static str, kind: Kind, help: &'static str) -> Series {
    Series { name, labels, kind, help }
}
use Kind::{Counter as C, Gauge as G};

/// Every series a shard publishes, in slot order ([`Shard::metric_values`] fills them in that order).
pub const SERIES: [Series; 26] = [
    s("shardmq_connections_open", "", G, "MQTT connections open on the shard (CONNECT done or not)."),
    s("shardmq_connections_total", "", C, "CONNECTs accepted."),
    s("shardmq_connections_refused_total", "reason=\"unavailable\"", C, "CONNECTs refused, by reason."),
    s("shardmq_connections_refused_total", "reason=\"client_id\"", C, "CONNECTs refused, by reason."),
    s("shardmq_connections_refused_total", "reason=\"auth\"", C, "CONNECTs refused, by reason."),
    s("shardmq_connections_refused_total", "reason=\"invalid\"", C, "CONNECTs refused, by reason."),
    s("shardmq_protocol_errors_total", "", C, "Connections closed for a protocol error."),
    s("shardmq_messages_received_total", "qos=\"0\"", C, "PUBLISH packets received from clients."),
    s("shardmq_messages_received_total", "qos=\"1\"", C, "PUBLISH packets received from clients."),
    s("shardmq_messages_received_total", "qos=\"2\"", C, "PUBLISH packets received from clients."),
    s("shardmq_messages_sent_total", "qos=\"0\"", C, "PUBLISH packets sent to clients."),
    s("shardmq_messages_sent_total", "qos=\"1\"", C, "PUBLISH packets sent to clients."),
    s("shardmq_messages_sent_total", "qos=\"2\"", C, "PUBLISH packets sent to clients."),
    s("shardmq_messages_dropped_total", "reason=\"qos0\"", C, "Messages dropped, by reason."),
    s("shardmq_messages_dropped_total", "reason=\"queue_full\"", C, "Messages dropped, by reason."),
    s("shardmq_messages_dropped_total", "reason=\"queue_bytes\"", C, "Messages dropped, by reason."),
    s("shardmq_messages_dropped_total", "reason=\"expired\"", C, "Messages dropped, by reason."),
    s("shardmq_messages_dropped_total", "reason=\"no_member\"", C, "Messages dropped, by reason."),
    s("shardmq_messages_dropped_total", "reason=\"too_large\"", C, "Messages dropped, by reason."),
    s("shardmq_sessions", "", G, "Sessions (online and offline) owned by the shard."),
    s("shardmq_subscriptions", "", G, "Subscriptions held by the shard's sessions."),
    s("shardmq_retained_messages", "", G, "Retained messages (every shard holds a replica of all)."),
    s("shardmq_mesh_messages_out_total", "", C, "Messages sent to other shards or the cluster gateway."),
    s("shardmq_publisher_pauses_total", "", C, "Publishers paused by flow control."),
    s("shardmq_storage_errors_total", "", C, "Log writes or flushes that failed."),
    s("shardmq_log_bytes_written_total", "", C, "Bytes of records appended to the shard's log."),
];

/// Flush-latency histogram slots: one per bucket of `FLUSH_BUCKETS_US` and the rest (not cumulative),
/// then the count and the sum in microseconds.
pub const FLUSH_SLOTS: usize = FLUSH_BUCKETS_US.len() + 3;

/// Slot indexes the `$SYS` publisher reads.
pub(super) mod slot {
    pub const SESSIONS: usize = 19;
    pub const RECEIVED: std::ops::Range<usize> = 7..10;
    pub const SENT: std::ops::Range<usize> = 10..13;
    pub const SUBSCRIPTIONS: usize = 20;
}

/// One shard's published values; aligned so that two shards never write the same cache line.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct ShardMetrics {
    values: [AtomicU64; SERIES.len()],
    flush: [AtomicU64; FLUSH_SLOTS],
    /// MQTT bytes in and out as the core counts them, for `$SYS` (the endpoint exports the runtime's).
    pub(super) bytes: [AtomicU64; 2],
}

impl ShardMetrics {
    /// The last published flush-latency histogram (see [`FLUSH_SLOTS`]).
    pub fn load_flush(&self) -> [u64; FLUSH_SLOTS] {
        std::array::from_fn(|i| self.flush[i].load(Ordering::Relaxed))
    }

    /// The last published values, in [`SERIES`] order.
    pub fn load(&self) -> [u64; SERIES.len()] {
        std::array::from_fn(|i| self.values[i].load(Ordering::Relaxed))
    }
}

/// Index of the `refused` counter for a CONNACK reason.
pub(super) fn refusal_index(reason: shardmq_wire::ReasonCode) -> usize {
    use shardmq_wire::ReasonCode as R;
    match reason {
        R::SERVER_UNAVAILABLE | R::QUOTA_EXCEEDED | R::SERVER_BUSY => 0,
        R::CLIENT_IDENTIFIER_NOT_VALID => 1,
        R::BAD_AUTHENTICATION_METHOD | R::NOT_AUTHORIZED | R::BAD_USER_NAME_OR_PASSWORD => 2,
        _ => 3,
    }
}

pub(super) fn qos_index(q: QoS) -> usize {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

impl Shard {
    /// The shard's values in [`SERIES`] order.
    pub fn metric_values(&self) -> [u64; SERIES.len()] {
        let c = &self.counters;
        [
            self.conns.len() as u64,
            c.connects,
            c.refused[0],
            c.refused[1],
            c.refused[2],
            c.refused[3],
            c.protocol_errors,
            c.publishes_in_qos[0],
            c.publishes_in_qos[1],
            c.publishes_in_qos[2],
            c.deliveries_qos[0],
            c.deliveries_qos[1],
            c.deliveries_qos[2],
            c.dropped_qos0,
            c.dropped_queue_full,
            c.dropped_queue_bytes,
            c.dropped_expired,
            c.dropped_no_member,
            c.dropped_too_large,
            self.sessions.map.len() as u64,
            self.routing.subs.len() as u64,
            self.retained.tree.len() as u64,
            c.mesh_out,
            c.publisher_pauses,
            self.storage_errors(),
            self.log_stats().bytes_appended,
        ]
    }

    /// Copies the counters into the shared slot if [`PUBLISH_EVERY`] passed since the last copy;
    /// otherwise leaves a deadline (`poll_timeout`) so that the last change is published even if the
    /// shard then goes idle.
    pub(super) fn publish_metrics(&mut self, now: Instant) {
        if self.metrics_at.is_some_and(|at| now < at) {
            self.metrics_pending = true;
            return;
        }
        self.metrics_pending = false;
        self.metrics_at = Some(now + PUBLISH_EVERY);
        let Some(slot) = self.shared.metrics.get(self.id.index()) else { return };
        for (a, v) in slot.values.iter().zip(self.metric_values()) {
            a.store(v, Ordering::Relaxed);
        }
        slot.bytes[0].store(self.counters.bytes_in, Ordering::Relaxed);
        slot.bytes[1].store(self.counters.bytes_out, Ordering::Relaxed);
        let log = self.log_stats();
        let flush = log.flush_buckets.iter().copied().chain([log.flushes, log.flush_us_sum]);
        for (a, v) in slot.flush.iter().zip(flush) {
            a.store(v, Ordering::Relaxed);
        }
    }

    /// When the shard must wake to publish a change it held back.
    pub(super) fn metrics_deadline(&self) -> Option<Instant> {
        self.metrics_pending.then_some(self.metrics_at).flatten()
    }
}

impl super::Counters {
    /// One PUBLISH written to a client at `qos`.
    pub(super) fn delivered(&mut self, qos: QoS) {
        self.deliveries += 1;
        self.deliveries_qos[qos_index(qos)] += 1;
    }
}
