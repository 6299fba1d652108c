//! The message-flow engine behind `fanin`, `fanout`, `pairs`, `shared`, `pub` and `sub`: a [`Plan`] names
//! publishers (topic, pace, message cap) and subscribers (filter); [`run`] connects them all, publishes
//! for the run's duration, drains in-flight messages and reports what arrived, how fast and how late.
//!
//! One thread per subscriber and one or two per publisher (the second reads QoS 1/2 acks), over blocking
//! sockets: simple and accurate for tens to a few hundred clients. Connection scaling is `conn`'s job.
//!
//! Pacing is open-loop on a fixed schedule: a publisher that falls behind sends the backlog at once rather
//! than stretching the schedule, so a stalled broker shows up as latency, not as a silently lower rate.

use crate::client::{encode_publish, Client, Dial, Writer};
use crate::host::{HostNoise, HostProbe};
use crate::payload::{self, now_ns, Stamp};
use crate::procfs::{BrokerProbe, BrokerUsage};
use crate::stats::{self, lost, LatencySummary, Received, SeqSet};
use anyhow::Result;
use hdrhistogram::Histogram;
use serde::Serialize;
use shardmq_wire::{Packet, PacketId, Protocol, QoS, ReasonCode};
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub struct PubSpec {
    pub topic: String,
    /// Messages per second for this publisher; `None` is as fast as the window and socket allow.
    pub rate: Option<f64>,
    /// Stop after this many messages even if the duration has not run out.
    pub max_msgs: Option<u64>,
}

pub struct Plan {
    pub scenario: String,
    /// Where publishers connect, and subscribers too unless `sub_addrs` names others.
    pub addr: SocketAddrV4,
    /// Where subscribers connect instead, round-robin (subscriber i to `sub_addrs[i % len]`): the nodes of
    /// a cluster or bridged brokers, so that every message crosses between brokers. Empty: `addr`.
    pub sub_addrs: Vec<SocketAddrV4>,
    pub protocol: Protocol,
    pub qos: QoS,
    /// Payload size in bytes (at least the 16-byte header).
    pub payload: usize,
    pub duration: Duration,
    pub publishers: Vec<PubSpec>,
    /// One subscriber per filter.
    pub subscribers: Vec<String>,
    /// Deliveries each published message should cause (subscribers per topic).
    pub copies_per_msg: u64,
    /// Every subscriber must receive every message (fan-out) rather than one of them (shared, fan-in).
    pub each_receiver: bool,
    /// Most QoS 1/2 messages in flight per publisher; further capped by the broker's Receive Maximum.
    pub window: u16,
    pub broker_pid: Option<u32>,
    /// Further broker processes sampled like `broker_pid` (the other nodes of a cluster): CPU per message
    /// on every node a message passes through.
    pub peer_pids: Vec<u32>,
    /// Print a line per second to stderr.
    pub progress: bool,
    /// End the run once this many messages arrived (the `sub` smoke test).
    pub stop_after_delivered: Option<u64>,
    /// Credentials and TLS for every connection.
    pub dial: Dial,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub scenario: String,
    pub protocol: u8,
    pub qos: u8,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub subscribers: usize,
    /// Seconds from the first publish to the stop signal; rates are per this window.
    pub window_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    /// `sent * copies_per_msg`: what a lossless broker delivers.
    pub expected: u64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    /// QoS 1/2 only: acknowledged messages that never arrived.
    pub lost: Option<u64>,
    pub duplicates: u64,
    pub latency_us: LatencySummary,
    pub per_subscriber: Vec<u64>,
    pub per_subscriber_min: u64,
    pub per_subscriber_max: u64,
    /// CPU from just before the first publish to the end of the drain, per message delivered in that time.
    pub broker: Option<BrokerUsage>,
    /// The same for each of `peer_pids`, in order; per message delivered, like `broker`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<BrokerUsage>,
    /// The host's own noise over the window (see [`crate::host`]).
    pub host: HostNoise,
    pub errors: Vec<String>,
}

/// What is sampled beside the clients over the measurement window.
pub(crate) struct Probes {
    broker: Option<BrokerProbe>,
    peers: Vec<BrokerProbe>,
    host: HostProbe,
}

impl Probes {
    pub(crate) fn start(plan: &Plan) -> Self {
        Self::of(plan.broker_pid, &plan.peer_pids)
    }

    pub(crate) fn of(broker_pid: Option<u32>, peer_pids: &[u32]) -> Self {
        Probes {
            broker: broker_pid.map(BrokerProbe::start),
            peers: peer_pids.iter().map(|&p| BrokerProbe::start(p)).collect(),
            host: HostProbe::start(),
        }
    }

    /// The broker's usage per `count` (messages, or connections) and the host's noise.
    pub(crate) fn finish(self, count: u64) -> (Option<BrokerUsage>, HostNoise) {
        (self.broker.map(|p| p.finish(count)), self.host.finish())
    }
}

impl Plan {
    /// The address subscriber `i` connects to.
    pub fn sub_addr(&self, i: usize) -> SocketAddrV4 {
        if self.sub_addrs.is_empty() {
            self.addr
        } else {
            self.sub_addrs[i % self.sub_addrs.len()]
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dups: AtomicU64,
    pub(crate) publishers_done: AtomicUsize,
    pub(crate) stop_pub: AtomicBool,
    pub(crate) stop_read: AtomicBool,
    pub(crate) errors: Mutex<Vec<String>>,
}

impl Counters {
    pub(crate) fn error(&self, who: &str, e: impl std::fmt::Display) {
        if let Ok(mut v) = self.errors.lock() {
            v.push(format!("{who}: {e}"));
        }
    }
}

/// Total and since-last-progress-line latencies of one subscriber.
pub(crate) struct Hists {
    pub(crate) total: Histogram<u64>,
    pub(crate) interval: Histogram<u64>,
}

impl Hists {
    pub(crate) fn new() -> Mutex<Hists> {
        Mutex::new(Hists { total: stats::new_histogram(), interval: stats::new_histogram() })
    }
}

struct Inflight {
    count: usize,
    /// Sequence number behind each packet id still in flight.
    seq_of: Vec<u32>,
    acked: SeqSet,
}

pub fn run(plan: &Plan) -> Result<RunReport> {
    if plan.dial.tls.is_some() && plan.qos != QoS::AtMostOnce && !plan.publishers.is_empty() {
        // A QoS 1/2 publisher reads acknowledgements in a second thread; a TLS session cannot be split.
        anyhow::bail!("over TLS this scenario runs at QoS 0 only (pairs and fanout run any QoS)");
    }
    let c = Counters::default();
    let tag = format!("smq{}", std::process::id());
    let mut subs = Vec::new();
    for (i, filter) in plan.subscribers.iter().enumerate() {
        let mut cl = Client::connect(plan.sub_addr(i), &format!("{tag}-s{i}"), plan.protocol, &plan.dial)?;
        cl.subscribe(filter, plan.qos)?;
        subs.push(cl);
    }
    let mut pubs = Vec::new();
    for i in 0..plan.publishers.len() {
        pubs.push(Client::connect(plan.addr, &format!("{tag}-p{i}"), plan.protocol, &plan.dial)?);
    }
    let hists: Vec<Mutex<Hists>> = subs.iter().map(|_| Hists::new()).collect();
    let probes = Probes::start(plan);
    let t0 = Instant::now();

    let (received, counts, acked, window, at_stop) = thread::scope(|s| {
        let c = &c;
        let sub_handles: Vec<_> = subs
            .into_iter()
            .zip(&hists)
            .enumerate()
            .map(|(i, (cl, h))| s.spawn(move || subscriber(i, cl, c, h)))
            .collect();
        let pub_handles: Vec<_> = pubs
            .into_iter()
            .zip(&plan.publishers)
            .enumerate()
            .map(|(i, (cl, spec))| s.spawn(move || publisher(i as u32, cl, spec, plan, c)))
            .collect();

        wait_for_end(plan, t0, c, &hists);
        c.stop_pub.store(true, Relaxed);
        let window = t0.elapsed();
        let at_stop = (c.sent.load(Relaxed), c.delivered.load(Relaxed));
        drain(plan, c);
        c.stop_read.store(true, Relaxed);
        let acked: HashMap<u32, SeqSet> = pub_handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| (i as u32, h.join().unwrap_or_default()))
            .collect();
        let (received, counts): (Vec<Received>, Vec<u64>) =
            sub_handles.into_iter().map(|h| h.join().unwrap_or_default()).unzip();
        (received, counts, acked, window, at_stop)
    });

    Ok(report(plan, c, &hists, &received, counts, &acked, window, at_stop, probes))
}

/// The summary of a finished run, shared by this engine and the epoll one ([`crate::pairs`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn report(
    plan: &Plan,
    c: Counters,
    hists: &[Mutex<Hists>],
    received: &[Received],
    counts: Vec<u64>,
    acked: &HashMap<u32, SeqSet>,
    window: Duration,
    at_stop: (u64, u64),
    probes: Probes,
) -> RunReport {
    let mut total = stats::new_histogram();
    for h in hists {
        if let Ok(h) = h.lock() {
            let _ = total.add(&h.total);
        }
    }
    let delivered = c.delivered.load(Relaxed);
    let sent = c.sent.load(Relaxed);
    let secs = window.as_secs_f64().max(1e-9);
    let errors = c.errors.into_inner().unwrap_or_default();
    RunReport {
        scenario: plan.scenario.clone(),
        protocol: plan.protocol.level(),
        qos: plan.qos as u8,
        payload_bytes: plan.payload.max(payload::HEADER_LEN),
        publishers: plan.publishers.len(),
        subscribers: plan.subscribers.len(),
        window_s: secs,
        sent,
        acked: c.acked.load(Relaxed),
        delivered,
        expected: sent * plan.copies_per_msg,
        sent_per_s: at_stop.0 as f64 / secs,
        delivered_per_s: at_stop.1 as f64 / secs,
        // Loss needs both ends in this process: `pub` and `sub` alone cannot tell.
        lost: (plan.qos != QoS::AtMostOnce && !plan.publishers.is_empty() && !plan.subscribers.is_empty())
            .then(|| lost(acked, received, plan.each_receiver)),
        duplicates: c.dups.load(Relaxed),
        latency_us: LatencySummary::of(&total),
        per_subscriber_min: counts.iter().copied().min().unwrap_or(0),
        per_subscriber_max: counts.iter().copied().max().unwrap_or(0),
        per_subscriber: counts,
        broker: probes.broker.map(|p| p.finish(delivered)),
        peers: probes.peers.iter().map(|p| p.finish(delivered)).collect(),
        host: probes.host.finish(),
        errors,
    }
}

/// Waits for in-flight messages after publishing stops: until every expected copy arrived and every
/// QoS 1/2 message was acknowledged, or nothing moved for a second, or the longer of five seconds and the
/// run's duration passed (an overloaded broker may still be working through a backlog as long as the run).
pub(crate) fn drain(plan: &Plan, c: &Counters) {
    let deadline = Instant::now() + plan.duration.max(Duration::from_secs(5));
    let mut seen = (u64::MAX, u64::MAX);
    let mut still_since = Instant::now();
    while Instant::now() < deadline {
        let sent = c.sent.load(Relaxed);
        let now = (c.delivered.load(Relaxed), c.acked.load(Relaxed));
        let acks_done = plan.qos == QoS::AtMostOnce || now.1 >= sent;
        let all_in = plan.subscribers.is_empty() || now.0 >= sent * plan.copies_per_msg;
        if acks_done && all_in {
            return;
        }
        if now != seen {
            seen = now;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_secs(1) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the run's duration is over, every publisher is done or enough was delivered, printing a
/// progress line every second when the plan asks for it.
pub(crate) fn wait_for_end(plan: &Plan, t0: Instant, c: &Counters, hists: &[Mutex<Hists>]) {
    let mut last = (0u64, Instant::now());
    while t0.elapsed() < plan.duration
        && (plan.publishers.is_empty() || c.publishers_done.load(Relaxed) < plan.publishers.len())
        && plan.stop_after_delivered.is_none_or(|n| c.delivered.load(Relaxed) < n)
    {
        thread::sleep(Duration::from_millis(20).min(plan.duration.saturating_sub(t0.elapsed())));
        if plan.progress && last.1.elapsed() >= Duration::from_secs(1) {
            last = progress_line(t0, last, c, hists);
        }
    }
}

pub(crate) fn progress_line(
    t0: Instant,
    last: (u64, Instant),
    c: &Counters,
    hists: &[Mutex<Hists>],
) -> (u64, Instant) {
    let mut merged = stats::new_histogram();
    for h in hists {
        if let Ok(mut h) = h.lock() {
            let _ = merged.add(&h.interval);
            h.interval.reset();
        }
    }
    let delivered = c.delivered.load(Relaxed);
    let rate = (delivered - last.0) as f64 / last.1.elapsed().as_secs_f64();
    let p99 = if merged.is_empty() { 0 } else { merged.value_at_quantile(0.99) };
    eprintln!(
        "[{:6.1}s] sent {:>10} delivered {:>10} {:>10.0} msg/s p99 {:>8} us",
        t0.elapsed().as_secs_f64(),
        c.sent.load(Relaxed),
        delivered,
        rate,
        p99
    );
    (delivered, Instant::now())
}

enum Ev {
    /// (pid, seq, sent_ns) of a benchmark message, or `None` for a foreign payload.
    Msg(Option<Stamp>, QoS, Option<PacketId>),
    Rel(PacketId),
    Disconnect(ReasonCode),
    Other,
}

fn subscriber(i: usize, mut cl: Client, c: &Counters, h: &Mutex<Hists>) -> (Received, u64) {
    let w = cl.writer();
    let who = format!("subscriber {i}");
    let mut received = Received::new();
    let mut count = 0u64;
    while !c.stop_read.load(Relaxed) {
        let ev = cl.poll(|p| match p {
            Packet::Publish(m) => Ev::Msg(payload::decode(m.payload), m.qos, m.packet_id),
            Packet::PubRel(a) => Ev::Rel(a.packet_id),
            Packet::Disconnect(d) => Ev::Disconnect(d.reason),
            _ => Ev::Other,
        });
        let r = match ev {
            Ok(None) | Ok(Some(Ev::Other)) => Ok(()),
            Ok(Some(Ev::Msg(stamp, qos, id))) => {
                let now = now_ns();
                count += 1;
                c.delivered.fetch_add(1, Relaxed);
                if let Some(st) = stamp {
                    let us = now.saturating_sub(st.sent_ns) / 1000;
                    if let Ok(mut h) = h.lock() {
                        stats::record(&mut h.total, us);
                        stats::record(&mut h.interval, us);
                    }
                    if !received.entry(st.publisher).or_default().insert(st.seq) {
                        c.dups.fetch_add(1, Relaxed);
                    }
                }
                match (qos, id) {
                    (QoS::AtLeastOnce, Some(id)) => w.ack(Packet::PubAck, id),
                    (QoS::ExactlyOnce, Some(id)) => w.ack(Packet::PubRec, id),
                    _ => Ok(()),
                }
            }
            Ok(Some(Ev::Rel(id))) => w.ack(Packet::PubComp, id),
            Ok(Some(Ev::Disconnect(r))) => {
                Err(anyhow::anyhow!("DISCONNECT from broker, reason 0x{:02x}", r.0))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            c.error(&who, e);
            return (received, count);
        }
    }
    w.disconnect();
    (received, count)
}

enum AckEv {
    /// PUBACK or PUBCOMP: the message is done.
    Done(PacketId, ReasonCode),
    Rec(PacketId, ReasonCode),
    Disconnect(ReasonCode),
    Other,
}

/// Publishes per `spec` and returns the sequence numbers the broker acknowledged (empty at QoS 0).
fn publisher(id: u32, mut cl: Client, spec: &PubSpec, plan: &Plan, c: &Counters) -> SeqSet {
    let w = cl.writer();
    let window = usize::from(plan.window.min(cl.server_receive_max).max(1));
    let inflight = Mutex::new(Inflight { count: 0, seq_of: vec![0; 65536], acked: SeqSet::default() });
    let freed = Condvar::new();
    let who = format!("publisher {id}");
    thread::scope(|s| {
        if plan.qos != QoS::AtMostOnce {
            s.spawn(|| ack_reader(&who, &mut cl, &w, &inflight, &freed, c));
        }
        if let Err(e) = publish_loop(id, spec, plan, c, &w, window, &inflight, &freed) {
            c.error(&who, e);
        }
        c.publishers_done.fetch_add(1, Relaxed);
    });
    w.disconnect();
    inflight.into_inner().map(|i| i.acked).unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn publish_loop(
    id: u32,
    spec: &PubSpec,
    plan: &Plan,
    c: &Counters,
    w: &Writer,
    window: usize,
    inflight: &Mutex<Inflight>,
    freed: &Condvar,
) -> Result<()> {
    let mut body = payload::encode(Stamp { publisher: id, seq: 0, sent_ns: 0 }, plan.payload);
    let mut out = Vec::with_capacity(body.len() + spec.topic.len() + 16);
    let start = Instant::now();
    let mut seq: u32 = 0;
    let mut next_id: u16 = 0;
    while !c.stop_pub.load(Relaxed) && spec.max_msgs.is_none_or(|m| u64::from(seq) < m) {
        if let Some(rate) = spec.rate {
            let due_at = Duration::from_secs_f64(f64::from(seq) / rate);
            let elapsed = start.elapsed();
            if due_at > elapsed {
                // Short sleeps so a stop request is noticed promptly even at low rates.
                thread::sleep((due_at - elapsed).min(Duration::from_millis(10)));
                continue;
            }
        }
        let pid = if plan.qos == QoS::AtMostOnce {
            None
        } else {
            let mut st = inflight.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            while st.count >= window && !c.stop_pub.load(Relaxed) {
                st = freed
                    .wait_timeout(st, Duration::from_millis(50))
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .0;
            }
            if st.count >= window {
                break;
            }
            next_id = next_id % 65535 + 1;
            st.seq_of[usize::from(next_id)] = seq;
            st.count += 1;
            Some(PacketId(next_id))
        };
        payload::write_header(&mut body, Stamp { publisher: id, seq, sent_ns: now_ns() });
        encode_publish(&mut out, w.protocol(), &spec.topic, plan.qos, pid, &body)?;
        if !w.send_raw_unless(&out, &c.stop_pub)? {
            // The run ended while the broker took nothing from this publisher.
            break;
        }
        seq += 1;
        c.sent.fetch_add(1, Relaxed);
    }
    Ok(())
}

fn ack_reader(
    who: &str,
    cl: &mut Client,
    w: &Writer,
    inflight: &Mutex<Inflight>,
    freed: &Condvar,
    c: &Counters,
) {
    while !c.stop_read.load(Relaxed) {
        let ev = cl.poll(|p| match p {
            Packet::PubAck(a) | Packet::PubComp(a) => AckEv::Done(a.packet_id, a.reason),
            Packet::PubRec(a) => AckEv::Rec(a.packet_id, a.reason),
            Packet::Disconnect(d) => AckEv::Disconnect(d.reason),
            _ => AckEv::Other,
        });
        let release = |id: PacketId, ok: bool| {
            if let Ok(mut st) = inflight.lock() {
                st.count = st.count.saturating_sub(1);
                if ok {
                    let seq = st.seq_of[usize::from(id.0)];
                    st.acked.insert(seq);
                    c.acked.fetch_add(1, Relaxed);
                }
            }
            freed.notify_one();
        };
        let r = match ev {
            Ok(None) | Ok(Some(AckEv::Other)) => Ok(()),
            Ok(Some(AckEv::Done(id, reason))) => {
                release(id, !reason.is_error());
                Ok(())
            }
            Ok(Some(AckEv::Rec(id, reason))) if reason.is_error() => {
                release(id, false);
                Ok(())
            }
            Ok(Some(AckEv::Rec(id, _))) => w.ack(Packet::PubRel, id),
            Ok(Some(AckEv::Disconnect(r))) => {
                Err(anyhow::anyhow!("DISCONNECT from broker, reason 0x{:02x}", r.0))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            c.error(who, e);
            // Unblock the publisher: nothing more will be acknowledged on this connection.
            c.stop_pub.store(true, Relaxed);
            freed.notify_all();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn plan(sub_ports: &[u16]) -> Plan {
        let at = |p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
        Plan {
            scenario: "t".into(),
            addr: at(1000),
            sub_addrs: sub_ports.iter().map(|&p| at(p)).collect(),
            protocol: Protocol::V5,
            qos: QoS::AtMostOnce,
            payload: 16,
            duration: Duration::from_secs(1),
            publishers: Vec::new(),
            subscribers: Vec::new(),
            copies_per_msg: 1,
            each_receiver: false,
            window: 1,
            broker_pid: None,
            peer_pids: Vec::new(),
            progress: false,
            stop_after_delivered: None,
            dial: Dial::default(),
        }
    }

    #[test]
    fn a_publisher_ends_with_the_run_when_the_broker_stops_reading() {
        use std::io::{Read, Write};
        // A "broker" that acknowledges the CONNECT and then never reads again, for longer than the test
        // may take.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let fake = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            thread::sleep(Duration::from_secs(8));
        });
        let mut p = plan(&[]);
        p.addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        p.protocol = Protocol::V311;
        p.payload = 1024;
        p.duration = Duration::from_millis(300);
        p.copies_per_msg = 0;
        p.publishers = vec![PubSpec { topic: "t".into(), rate: None, max_msgs: None }];
        let t = Instant::now();
        let r = run(&p).unwrap();
        assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
        assert!(r.sent > 0 && r.errors.is_empty(), "{r:?}");
        drop(fake);
    }

    #[test]
    fn subscribers_connect_round_robin_to_sub_addrs_else_to_addr() {
        let p = plan(&[]);
        assert_eq!((p.sub_addr(0).port(), p.sub_addr(7).port()), (1000, 1000));
        let p = plan(&[2000, 3000, 1000]);
        let ports: Vec<u16> = (0..5).map(|i| p.sub_addr(i).port()).collect();
        assert_eq!(ports, [2000, 3000, 1000, 2000, 3000]);
    }
}
