//! Fuzzes what a client sends to a TLS, WebSocket or WebSocket-over-TLS listener (`shardmq_transport`),
//! and a session transfer a peer node sends (`SessionTransfer::decode` then `Shard::import_session`).
//! The first byte picks the listener kind and where the input is cut into reads; for WebSocket the rest
//! follows a valid upgrade request, so the framing code is reached. Never a panic; a connection the layer
//! gives up on is closed and the core told.

#![no_main]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use shardmq_shard::core::{Config, NodeShared, SessionTransfer, Shard, WallClock};
use shardmq_shard::io::{Accepted, Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};
use shardmq_transport::{
    tls, ListenerKind, TlsFiles, TlsSlot, Transport, TransportConfig, TransportCounters, WsSettings,
};

/// Swallows everything; answers nothing.
#[derive(Default)]
struct Sink {
    io: VecDeque<IoCmd<()>>,
    closed: bool,
}

impl Core for Sink {
    type Mesh = ();
    type Handoff = ();
    fn handle_accept(&mut self, _: ConnId, _: Instant) {}
    fn handle_adopt(&mut self, _: ConnId, _: (), _: Instant) {}
    fn handle_read(&mut self, _: ConnId, _: &[u8], _: Instant) {}
    fn handle_closed(&mut self, _: ConnId, _: Instant) {
        self.closed = true;
    }
    fn handle_backpressure(&mut self, _: ConnId, _: bool, _: Instant) {}
    fn handle_mesh(&mut self, _: ShardId, _: (), _: Instant) {}
    fn handle_timeout(&mut self, _: Instant) {}
    fn handle_shutdown(&mut self, _: Instant) {}
    fn take_transmit(&mut self, _: ConnId) -> Vec<u8> {
        Vec::new()
    }
    fn poll_io(&mut self) -> Option<IoCmd<()>> {
        self.io.pop_front()
    }
    fn poll_mesh(&mut self) -> Option<(ShardId, ())> {
        None
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

/// Loaded once: parsing the PEM files per input would dominate the run.
fn config() -> TransportConfig {
    static CONFIG: std::sync::OnceLock<TransportConfig> = std::sync::OnceLock::new();
    CONFIG.get_or_init(load_config).clone()
}

fn load_config() -> TransportConfig {
    let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../transport/tests/certs");
    let files = TlsFiles { cert: d.join("server.pem"), key: d.join("server.key"), client_ca: None };
    TransportConfig {
        listeners: vec![ListenerKind::Tls, ListenerKind::Ws, ListenerKind::Wss].into(),
        tls: Some(Arc::new(TlsSlot::new(tls::load(&files).expect("test certificates")))),
        ws: WsSettings { path: None, max_frame_bytes: 4096 },
        cn_as_username: true,
        counters: Arc::new(TransportCounters::default()),
    }
}

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let now = Instant::now();

    // A session transfer from a peer: refused or installed, never a panic.
    if let Ok(t) = SessionTransfer::decode(rest) {
        let mut shard = Shard::new(ShardId(0), 1, Arc::new(Config::default()), Arc::new(NodeShared::new(1)));
        let clock = WallClock { base: now, base_unix_ms: 1_900_000_000_000 };
        let _ = shard.import_session(&t, &clock, now);
    }

    let mut t = Transport::new(Sink::default(), config());
    let listener = (first % 3) as u16;
    let conn = ConnId(1);
    t.handle_accept(conn, now);
    t.handle_accepted(conn, Accepted { listener, peer: None });
    if listener == 1 {
        t.handle_read(conn, UPGRADE, now);
    }
    let chunk = 1 + (first >> 2) as usize * 7;
    for part in rest.chunks(chunk) {
        t.handle_read(conn, part, now);
        while let Some(cmd) = t.poll_io() {
            if let IoCmd::Transmit(c) | IoCmd::Close(c) = cmd {
                let _ = t.take_transmit(c);
            }
        }
    }
    t.handle_closed(conn, now);
    assert_eq!(t.layered_connections(), 0);
});
