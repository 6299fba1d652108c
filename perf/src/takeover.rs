//! `takeover`: how long a client waits to get its session back when it reconnects while its old
//! connection is still open, CONNECT sent to CONNACK read. The same client ids connect alternately to two
//! ports (two nodes of a zone: the session moves between nodes; twice the same port: a takeover on one
//! node), each time with clean start 0, so every CONNACK after the first must say "session present". The
//! old connection must then get DISCONNECT (MQTT 5: reason 0x8E, session taken over) or be closed.
//!
//! Optionally each session holds a QoS 1 subscription and, before each takeover, `queued` QoS 1 messages
//! sent to it and left unacknowledged by the old connection (so a real session, with messages in flight,
//! moves); the new connection must get them again, and acknowledges them. Publishing and that check are
//! outside the timed window.
//!
//! `sessions` (see [`create`]) makes many persistent sessions and leaves them offline: each client connects
//! with clean start 0, optionally subscribes, and disconnects, a few at a time.

use crate::client::{encode_publish, session_connect_packet, Client, Dial};
use crate::stats::{self, LatencySummary};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use shardmq_wire::{Packet, PacketId, Protocol, QoS, ReasonCode};
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

/// Most failures kept verbatim in a report.
const MAX_ERRORS: usize = 10;

/// How long the old connection has, after the new one's CONNACK, to be told or closed; and how long the
/// new one has to get the messages queued for the session again.
const AFTERMATH: Duration = Duration::from_secs(2);

pub struct TakeoverPlan {
    /// Where each client id connects first, and every second time.
    pub addr: SocketAddrV4,
    /// Where it connects in between (the same address: takeovers on one node).
    pub other: SocketAddrV4,
    pub protocol: Protocol,
    pub dial: Dial,
    /// Client ids taken over in turn.
    pub ids: usize,
    /// Takeovers in all (over every id).
    pub count: u64,
    /// Most time for the takeovers (setup excluded).
    pub duration: Duration,
    /// QoS 1 messages sent to each session before each takeover (needs `subscribe`).
    pub queued: u16,
    /// Each session subscribes (QoS 1) to its own topic.
    pub subscribe: bool,
    /// MQTT 5 Session Expiry Interval.
    pub expiry_s: u32,
    pub progress: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TakeoverReport {
    pub scenario: String,
    pub protocol: u8,
    /// The two ports differ.
    pub cross: bool,
    pub ids: usize,
    pub queued: u16,
    /// Takeovers tried, and those whose CONNACK accepted the connection (each one timed).
    pub attempted: u64,
    pub accepted: u64,
    pub window_s: f64,
    /// CONNECT written to CONNACK read, accepted takeovers only.
    pub latency_us: LatencySummary,
    /// Takeovers that went wrong, by reason: `no_session` (accepted without session present), `refused`
    /// (an error CONNACK), `no_connack`, `connect` (TCP), `old_still_open` (the old connection neither told
    /// nor closed), `old_wrong_reason` (DISCONNECT with another reason than 0x8E), `publish`.
    pub failures: BTreeMap<String, u64>,
    /// How the old connections ended: DISCONNECT 0x8E, or closed without one (3.1.1 has no server
    /// DISCONNECT).
    pub old_disconnected: u64,
    pub old_closed: u64,
    /// Messages sent to the sessions before takeovers, received again by the new connections, and not.
    pub messages_sent: u64,
    pub messages_received: u64,
    pub messages_missing: u64,
    pub errors: Vec<String>,
}

/// How an old connection ended after its session was taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldEnd {
    Disconnect(ReasonCode),
    Closed,
    StillOpen,
}

/// Reads `old` until a DISCONNECT, its close, or `deadline`; anything else (messages for the session) is
/// dropped unacknowledged.
pub fn old_end(old: &mut Client, deadline: Instant) -> OldEnd {
    loop {
        match old.poll(|p| match p {
            Packet::Disconnect(d) => Some(d.reason),
            _ => None,
        }) {
            Ok(Some(Some(reason))) => return OldEnd::Disconnect(reason),
            Ok(_) if Instant::now() >= deadline => return OldEnd::StillOpen,
            Ok(_) => {}
            Err(_) => return OldEnd::Closed,
        }
    }
}

struct Session {
    id: String,
    topic: String,
    /// Which of the two addresses it is connected to now.
    side: usize,
    conn: Option<Client>,
}

struct Tally {
    report: TakeoverReport,
    hist: hdrhistogram::Histogram<u64>,
}

impl Tally {
    fn fail(&mut self, reason: &str, detail: Option<String>) {
        *self.report.failures.entry(reason.into()).or_default() += 1;
        if let Some(d) = detail {
            if self.report.errors.len() < MAX_ERRORS {
                self.report.errors.push(d);
            }
        }
    }
}

pub fn run(plan: &TakeoverPlan) -> Result<TakeoverReport> {
    if plan.ids == 0 {
        bail!("--ids must be positive");
    }
    if plan.queued > 0 && !plan.subscribe {
        bail!("--queued needs the sessions to subscribe");
    }
    let addrs = [plan.addr, plan.other];
    let tag = format!("smqt{}", std::process::id());
    let connect = |id: &str, side: usize| -> Result<(Client, crate::client::Accepted, Duration)> {
        let mut c = Client::open(addrs[side], plan.protocol, &plan.dial)?;
        let p = session_connect_packet(id, plan.protocol, plan.dial.credentials(), plan.expiry_s);
        let t = Instant::now();
        let a = c.handshake(&p)?;
        Ok((c, a, t.elapsed()))
    };
    let mut sessions = Vec::with_capacity(plan.ids);
    for i in 0..plan.ids {
        let id = format!("{tag}-{i}");
        let (mut c, a, _) = connect(&id, 0)?;
        if a.reason.is_error() {
            bail!("{id}: first CONNECT refused: reason 0x{:02x}", a.reason.0);
        }
        let topic = format!("bench/takeover/{tag}/{i}");
        if plan.subscribe {
            c.subscribe(&topic, QoS::AtLeastOnce)?;
        }
        sessions.push(Session { id, topic, side: 0, conn: Some(c) });
    }
    // Messages for a session are published on the node that holds it: acknowledged there once queued for
    // it, so none is still on its way to the old node when the takeover starts.
    let mut publishers: [Option<Client>; 2] = [None, None];
    let mut t = Tally {
        report: TakeoverReport {
            scenario: "takeover".into(),
            protocol: plan.protocol.level(),
            cross: plan.addr != plan.other,
            ids: plan.ids,
            queued: plan.queued,
            ..Default::default()
        },
        hist: stats::new_histogram(),
    };
    let t0 = Instant::now();
    let mut last = t0;
    let mut buf = Vec::new();
    for k in 0..plan.count {
        if t0.elapsed() >= plan.duration {
            break;
        }
        if plan.progress && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            crate::guard::progress(format_args!("[{:6.1}s] {k} takeovers", t0.elapsed().as_secs_f64()));
        }
        let s = &mut sessions[k as usize % plan.ids];
        if plan.queued > 0 {
            let side = s.side;
            if publishers[side].is_none() {
                let id = format!("{tag}-pub{side}");
                publishers[side] = Some(Client::connect(addrs[side], &id, plan.protocol, &plan.dial)?);
            }
            let p = publishers[side].as_mut().expect("connected above");
            match publish_acked(p, &s.topic, plan.queued, &mut buf) {
                Ok(()) => t.report.messages_sent += plan.queued as u64,
                Err(e) => {
                    t.fail("publish", Some(format!("{e:#}")));
                    publishers[side] = None;
                }
            }
        }
        let to = if plan.addr == plan.other { 0 } else { 1 - s.side };
        t.report.attempted += 1;
        let (mut new, a, took) = match connect(&s.id, to) {
            Ok(v) => v,
            Err(e) => {
                let reason = if format!("{e:#}").starts_with("connect ") { "connect" } else { "no_connack" };
                t.fail(reason, Some(format!("{}: {e:#}", s.id)));
                continue;
            }
        };
        if a.reason.is_error() {
            t.fail("refused", Some(format!("{}: CONNACK 0x{:02x}", s.id, a.reason.0)));
            continue;
        }
        t.report.accepted += 1;
        stats::record(&mut t.hist, took.as_micros() as u64);
        if !a.session_present {
            t.fail("no_session", None);
        }
        if let Some(mut old) = s.conn.take() {
            match old_end(&mut old, Instant::now() + AFTERMATH) {
                OldEnd::Disconnect(r) if r == ReasonCode::SESSION_TAKEN_OVER => {
                    t.report.old_disconnected += 1
                }
                OldEnd::Disconnect(r) => {
                    t.fail("old_wrong_reason", Some(format!("{}: DISCONNECT 0x{:02x}", s.id, r.0)))
                }
                OldEnd::Closed => t.report.old_closed += 1,
                OldEnd::StillOpen => t.fail("old_still_open", None),
            }
        }
        if plan.queued > 0 {
            let got = receive_acking(&mut new, &s.topic, plan.queued, Instant::now() + AFTERMATH);
            t.report.messages_received += got as u64;
            t.report.messages_missing += plan.queued.saturating_sub(got) as u64;
        }
        s.conn = Some(new);
        s.side = to;
    }
    t.report.window_s = t0.elapsed().as_secs_f64();
    t.report.latency_us = LatencySummary::of(&t.hist);
    for s in sessions {
        if let Some(c) = s.conn {
            c.close();
        }
    }
    for p in publishers.into_iter().flatten() {
        p.close();
    }
    Ok(t.report)
}

/// Publishes `n` QoS 1 messages to `topic` and waits for every PUBACK.
fn publish_acked(p: &mut Client, topic: &str, n: u16, buf: &mut Vec<u8>) -> Result<()> {
    let w = p.writer();
    for i in 1..=n {
        encode_publish(buf, w.protocol(), topic, QoS::AtLeastOnce, Some(PacketId(i)), &[0u8; 16])?;
        w.send_raw(buf)?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut acked = 0;
    while acked < n {
        if Instant::now() >= deadline {
            bail!("{} of {n} PUBACKs in 10 s", acked);
        }
        if p.poll(|pk| matches!(pk, Packet::PubAck(a) if !a.reason.is_error()))? == Some(true) {
            acked += 1;
        }
    }
    Ok(())
}

/// Reads QoS 1 messages on `topic` (acknowledging each) until `want` came or `deadline`; how many came.
fn receive_acking(c: &mut Client, topic: &str, want: u16, deadline: Instant) -> u16 {
    let w = c.writer();
    let mut got = 0u16;
    while got < want && Instant::now() < deadline {
        let r = c.poll(|pk| match pk {
            Packet::Publish(p) => Some((p.topic == topic, p.packet_id)),
            _ => None,
        });
        match r {
            Ok(Some(Some((mine, id)))) => {
                if let Some(id) = id {
                    let _ = w.ack(Packet::PubAck, id);
                }
                got += mine as u16;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    got
}

pub struct SessionsPlan {
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
    pub dial: Dial,
    /// Client ids `<prefix>-<i>`, i in `0..count`.
    pub prefix: String,
    pub count: u64,
    pub threads: usize,
    /// Each session subscribes (QoS 1) to `bench/sessions/<prefix>/<i>` before it disconnects.
    pub subscribe: bool,
    pub expiry_s: u32,
    /// Most time for the whole run.
    pub duration: Duration,
    pub progress: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionsReport {
    pub scenario: String,
    pub protocol: u8,
    pub threads: usize,
    pub requested: u64,
    /// Sessions made (CONNACK accepted, subscribed if asked, DISCONNECT sent).
    pub created: u64,
    /// Of them, those the broker already had (session present).
    pub already_present: u64,
    pub window_s: f64,
    /// `created / window_s`.
    pub rate: f64,
    /// TCP connect to CONNACK.
    pub connect_latency_us: LatencySummary,
    pub failures: BTreeMap<String, u64>,
    pub errors: Vec<String>,
}

/// Makes `count` offline persistent sessions, `threads` clients at a time (so at most `threads` sockets
/// are open), each connected, subscribed if asked and disconnected in turn.
pub fn create(plan: &SessionsPlan) -> Result<SessionsReport> {
    if plan.threads == 0 {
        bail!("--threads must be positive");
    }
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let per_thread = thread::scope(|sc| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|_| {
                let (next, stop) = (&next, &stop);
                sc.spawn(move || {
                    let mut hist = stats::new_histogram();
                    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
                    let mut errors = Vec::new();
                    let mut present = 0u64;
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        if i >= plan.count || stop.load(Relaxed) {
                            break;
                        }
                        let id = format!("{}-{i}", plan.prefix);
                        let started = Instant::now();
                        match one_session(plan, &id, i) {
                            Ok(p) => {
                                stats::record(&mut hist, started.elapsed().as_micros() as u64);
                                present += p as u64;
                            }
                            Err(e) => {
                                let msg = format!("{e:#}");
                                *failures.entry(reason_of(&msg)).or_default() += 1;
                                if errors.len() < MAX_ERRORS {
                                    errors.push(format!("{id}: {msg}"));
                                }
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    (hist, failures, errors, present)
                })
            })
            .collect();
        let _stop = crate::guard::StopOnDrop(&stop);
        let mut last = Instant::now();
        while !handles.iter().all(|h| h.is_finished()) {
            if t0.elapsed() >= plan.duration {
                stop.store(true, Relaxed);
            }
            if plan.progress && last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                crate::guard::progress(format_args!(
                    "[{:6.1}s] {} sessions",
                    t0.elapsed().as_secs_f64(),
                    next.load(Relaxed)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("session thread panicked")))
            .collect::<Vec<_>>()
    });
    let window_s = t0.elapsed().as_secs_f64();
    let mut r = SessionsReport {
        scenario: "sessions".into(),
        protocol: plan.protocol.level(),
        threads: plan.threads,
        requested: plan.count,
        window_s,
        ..Default::default()
    };
    let mut hist = stats::new_histogram();
    for t in per_thread {
        let (h, f, e, p) = t?;
        let _ = hist.add(&h);
        for (k, v) in f {
            *r.failures.entry(k).or_default() += v;
        }
        r.errors.extend(e);
        r.already_present += p;
    }
    r.errors.truncate(MAX_ERRORS);
    r.created = hist.len();
    r.rate = r.created as f64 / window_s.max(1e-9);
    r.connect_latency_us = LatencySummary::of(&hist);
    Ok(r)
}

/// One session made and left; whether the broker already had it.
fn one_session(plan: &SessionsPlan, id: &str, i: u64) -> Result<bool> {
    let mut c = Client::open(plan.addr, plan.protocol, &plan.dial)?;
    let a =
        c.handshake(&session_connect_packet(id, plan.protocol, plan.dial.credentials(), plan.expiry_s))?;
    if a.reason.is_error() {
        bail!("CONNACK refused: reason 0x{:02x}", a.reason.0);
    }
    if plan.subscribe {
        c.subscribe(&format!("bench/sessions/{}/{i}", plan.prefix), QoS::AtLeastOnce)?;
    }
    c.close();
    Ok(a.session_present)
}

/// The reason a failure is counted under: its message up to the first colon or digit, so that messages
/// differing only in an address or number fall together.
pub fn reason_of(msg: &str) -> String {
    let end = msg.find(|c: char| c == ':' || c.is_ascii_digit()).unwrap_or(msg.len());
    let r = msg[..end].trim();
    if r.is_empty() {
        "other".into()
    } else {
        r.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn failures_fall_together_by_reason() {
        assert_eq!(reason_of("connect 127.0.0.1:1883: refused"), "connect");
        assert_eq!(reason_of("CONNACK refused: reason 0x87"), "CONNACK refused");
        assert_eq!(reason_of("timed out waiting for the broker"), "timed out waiting for the broker");
        assert_eq!(reason_of("42"), "other");
    }

    /// A fake broker's side of one connection: accepts, sends `bytes`, then closes or holds it.
    fn old_end_after(bytes: &'static [u8], close: bool, protocol: Protocol) -> OldEnd {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(bytes).unwrap();
            if !close {
                thread::sleep(Duration::from_millis(600));
            }
        });
        let mut c = Client::open(addr, protocol, &Dial::default()).unwrap();
        let end = old_end(&mut c, Instant::now() + Duration::from_millis(300));
        server.join().unwrap();
        end
    }

    #[test]
    fn how_an_old_connection_ended() {
        // A message for the session first (QoS 0 PUBLISH "t", payload "x"), then DISCONNECT 0x8E (5.0).
        const PUB_THEN_8E: &[u8] = &[0x30, 0x05, 0x00, 0x01, b't', 0x00, b'x', 0xe0, 0x02, 0x8e, 0x00];
        assert_eq!(
            old_end_after(PUB_THEN_8E, false, Protocol::V5),
            OldEnd::Disconnect(ReasonCode::SESSION_TAKEN_OVER)
        );
        assert_eq!(old_end_after(&[], true, Protocol::V311), OldEnd::Closed);
        assert_eq!(old_end_after(&[], false, Protocol::V311), OldEnd::StillOpen);
    }
}
