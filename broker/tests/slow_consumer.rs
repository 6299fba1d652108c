//! Black-box: a subscriber that stops reading must not stall other subscribers or the broker.
//! Boots the real `shardmq` binary on port 0 and talks to it with blocking clients built on our codec.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardmq_wire::{
    decode, encode, Ack, Connect, Packet, PacketId, Properties, Protocol, Publish, QoS, ReasonCode,
    SubOptions, Subscribe,
};

struct Broker {
    child: Child,
    port: u16,
}

impl Broker {
    fn start(args: &[&str]) -> Broker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .args(["--listen", "127.0.0.1:0", "--cores", "2", "--log-level", "warn", "--in-memory"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start shardmq");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .split_whitespace()
            .find_map(|w| w.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
            .unwrap_or_else(|| panic!("no port in startup line {line:?}"));
        Broker { child, port }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                if !std::thread::panicking() {
                    assert!(status.success(), "broker exited with {status}");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        if !std::thread::panicking() {
            panic!("broker did not stop within 5 s of SIGTERM");
        }
    }
}

struct Client {
    s: TcpStream,
    rx: Vec<u8>,
}

impl Client {
    fn connect(port: u16, id: &str) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s, rx: Vec::new() };
        c.send(&Packet::Connect(Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive_s: 0,
            client_id: id,
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }));
        c.next(|p| assert!(matches!(p, Packet::ConnAck(a) if a.reason == ReasonCode::SUCCESS)));
        c
    }

    fn send(&mut self, p: &Packet<'_>) {
        let mut buf = Vec::new();
        encode(p, Protocol::V5, &mut buf).unwrap();
        self.s.write_all(&buf).unwrap();
    }

    fn next<R>(&mut self, f: impl FnOnce(&Packet<'_>) -> R) -> R {
        loop {
            if let Some((p, n)) = decode(&self.rx, Some(Protocol::V5), u32::MAX).unwrap() {
                let r = f(&p);
                self.rx.drain(..n);
                return r;
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read from broker");
            assert!(n > 0, "broker closed the connection");
            self.rx.extend_from_slice(&chunk[..n]);
        }
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) {
        let opts = SubOptions { qos, ..Default::default() };
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId(1),
            filters: vec![(filter, opts)],
            properties: Properties::default(),
        }));
        self.next(|p| assert!(matches!(p, Packet::SubAck(_))));
    }
}

#[test]
fn a_stalled_subscriber_does_not_stall_the_others() {
    // 4 MiB of queued bytes per session: the QoS 0 subscriber is held up to a quarter of it.
    let broker = Broker::start(&["--max-queued", "100", "--max-queued-bytes", "4194304"]);
    // Neither stalled client reads from here on. QoS 1: the in-flight window fills, then the bounded queue
    // drops its oldest. QoS 0: the socket buffers fill, the runtime reports backpressure, the core holds
    // up to 1 MiB more for that client and then drops further messages for it alone.
    let mut stalled = Client::connect(broker.port, "stalled");
    stalled.subscribe("load/#", QoS::AtLeastOnce);
    let mut stalled0 = Client::connect(broker.port, "stalled0");
    stalled0.subscribe("load/#", QoS::AtMostOnce);
    let mut live = Client::connect(broker.port, "live");
    live.subscribe("load/#", QoS::AtLeastOnce);
    let mut publisher = Client::connect(broker.port, "pub");

    let payload = vec![b'x'; 4096];
    let count = 6000u16; // 24 MB: far more than the stalled client's socket buffers hold.
    let started = Instant::now();
    for i in 1..=count {
        publisher.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "load/t",
            packet_id: Some(PacketId(i)),
            payload: &payload,
            properties: Properties::default(),
        }));
        publisher.next(|p| assert!(matches!(p, Packet::PubAck(a) if a.packet_id == PacketId(i))));
        let pid = live.next(|p| match p {
            Packet::Publish(m) => m.packet_id.unwrap(),
            p => panic!("expected PUBLISH, got {p:?}"),
        });
        live.send(&Packet::PubAck(Ack::new(pid, ReasonCode::SUCCESS)));
        assert!(started.elapsed() < Duration::from_secs(60), "delivery stalled at message {i}");
    }
    // The broker still serves new clients promptly.
    let t = Instant::now();
    let _fresh = Client::connect(broker.port, "fresh");
    assert!(t.elapsed() < Duration::from_secs(2));
    // What the broker holds for the stalled clients is bounded (24 MB were published to them).
    let status = std::fs::read_to_string(format!("/proc/{}/status", broker.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(rss_kib < 40 * 1024, "broker RSS grew to {rss_kib} KiB");
    drop((stalled, stalled0));
}
