//! The `$SYS` topics, as Mosquitto publishes them: node-wide values (summed over every shard's published
//! counters, see `metrics`), published by shard 0 every `Config::sys_interval_s` as retained QoS 0
//! messages through the normal retained path, so every shard's subscribers to `$SYS/#` get them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_wire::QoS;

use super::metrics::slot;
use super::{Msg, Shard, Timer};

/// Load averages over 1, 5 and 15 minutes, like Mosquitto's `load/.../1min` topics.
const LOAD_WINDOWS_S: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

/// Whether a topic is the node's own: `$SYS` (every node publishes its own values there), neither stored
/// nor sent to the cluster's other nodes.
pub(super) fn node_local(topic: &str) -> bool {
    topic.starts_with("$SYS/")
}

#[derive(Debug, Default)]
pub(super) struct SysState {
    started: Option<Instant>,
    last: Option<(Instant, u64, u64)>,
    /// Messages received and sent per minute, exponentially averaged over each of [`LOAD_WINDOWS_S`].
    load_received: [f64; 3],
    load_sent: [f64; 3],
}

impl Shard {
    /// Starts the `$SYS` publications (shard 0, when enabled): the first goes out at once, so a
    /// subscriber finds the version as soon as the node listens.
    pub fn start_sys(&mut self, now: Instant) {
        if self.id.0 == 0 && self.cfg.sys_interval_s > 0 && self.sys.started.is_none() {
            self.sys.started = Some(now);
            self.arm(now, Timer::Sys);
        }
    }

    pub(super) fn publish_sys(&mut self, now: Instant) {
        let Some(started) = self.sys.started else { return };
        if self.shutting_down || self.cfg.sys_interval_s == 0 {
            return;
        }
        self.arm(now + Duration::from_secs(self.cfg.sys_interval_s.into()), Timer::Sys);
        // This shard's own values may be up to `PUBLISH_EVERY` behind: publish them first.
        self.metrics_at = None;
        self.publish_metrics(now);
        let (mut total, mut received, mut sent, mut subs, mut bytes_in, mut bytes_out) = (0, 0, 0, 0, 0, 0);
        for m in self.shared.metrics.iter() {
            let v = m.load();
            // Mosquitto's clients/total: every client the broker knows, connected or not (sessions).
            total += v[slot::SESSIONS];
            received += v[slot::RECEIVED].iter().sum::<u64>();
            sent += v[slot::SENT].iter().sum::<u64>();
            subs += v[slot::SUBSCRIPTIONS];
            bytes_in += m.bytes[0].load(std::sync::atomic::Ordering::Relaxed);
            bytes_out += m.bytes[1].load(std::sync::atomic::Ordering::Relaxed);
        }
        if let Some((at, r0, s0)) = self.sys.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 {
                let per_min = |d: u64| d as f64 * 60.0 / dt;
                let (r, s) = (per_min(received.saturating_sub(r0)), per_min(sent.saturating_sub(s0)));
                for (i, (window, _)) in LOAD_WINDOWS_S.iter().enumerate() {
                    let keep = (-dt / window).exp();
                    self.sys.load_received[i] = self.sys.load_received[i] * keep + r * (1.0 - keep);
                    self.sys.load_sent[i] = self.sys.load_sent[i] * keep + s * (1.0 - keep);
                }
            }
        }
        self.sys.last = Some((now, received, sent));
        let connected = self.shared.connections.load(std::sync::atomic::Ordering::Relaxed);
        let mut topics: Vec<(String, String)> = vec![
            ("version".into(), format!("shardmq version {}", env!("CARGO_PKG_VERSION"))),
            ("uptime".into(), format!("{} seconds", now.saturating_duration_since(started).as_secs())),
            ("clients/connected".into(), connected.to_string()),
            ("clients/total".into(), total.to_string()),
            ("messages/received".into(), received.to_string()),
            ("messages/sent".into(), sent.to_string()),
            ("subscriptions/count".into(), subs.to_string()),
            ("retained messages/count".into(), self.retained.tree.len().to_string()),
            ("bytes/received".into(), bytes_in.to_string()),
            ("bytes/sent".into(), bytes_out.to_string()),
        ];
        for (i, (_, name)) in LOAD_WINDOWS_S.iter().enumerate() {
            topics.push((
                format!("load/messages/received/{name}"),
                format!("{:.2}", self.sys.load_received[i]),
            ));
            topics.push((format!("load/messages/sent/{name}"), format!("{:.2}", self.sys.load_sent[i])));
        }
        for (topic, value) in topics {
            let msg = Msg {
                topic: format!("$SYS/broker/{topic}").into(),
                payload: value.into_bytes().into(),
                qos: QoS::AtMostOnce,
                retain: true,
                expires_at: None,
                props: None,
                origin: None,
            };
            self.route(Arc::new(msg), now);
        }
    }
}
