//! The transport layer without sockets: a rustls client and a hand-built WebSocket client talk to a
//! [`Transport`] around a recording core, bytes carried by hand.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shardmq_shard::io::{Accepted, Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};
use shardmq_transport::{
    tls, ListenerKind, TlsFiles, TlsSlot, Transport, TransportConfig, TransportCounters, WsSettings,
};

/// Records what reaches it; answers every read with "ack:" + the bytes; hands a connection off when
/// it reads "handoff".
#[derive(Default)]
struct Recorder {
    reads: HashMap<ConnId, Vec<u8>>,
    identities: HashMap<ConnId, String>,
    /// Identity known when the first bytes arrived.
    identity_first: HashMap<ConnId, bool>,
    closed: Vec<ConnId>,
    out: HashMap<ConnId, Vec<u8>>,
    io: VecDeque<IoCmd<Vec<u8>>>,
}

impl Core for Recorder {
    type Mesh = ();
    type Handoff = Vec<u8>;

    fn handle_accept(&mut self, _conn: ConnId, _now: Instant) {}
    fn handle_adopt(&mut self, conn: ConnId, state: Vec<u8>, now: Instant) {
        self.handle_read(conn, &state, now);
    }
    fn handle_peer_identity(&mut self, conn: ConnId, name: &str) {
        self.identities.insert(conn, name.to_string());
    }
    fn handle_read(&mut self, conn: ConnId, data: &[u8], _now: Instant) {
        self.identity_first.entry(conn).or_insert(self.identities.contains_key(&conn));
        if data == b"handoff" {
            self.io.push_back(IoCmd::Handoff { conn, to: ShardId(1), state: b"moved".to_vec() });
            return;
        }
        self.reads.entry(conn).or_default().extend_from_slice(data);
        let o = self.out.entry(conn).or_default();
        o.extend_from_slice(b"ack:");
        o.extend_from_slice(data);
        self.io.push_back(IoCmd::Transmit(conn));
    }
    fn handle_closed(&mut self, conn: ConnId, _now: Instant) {
        self.closed.push(conn);
    }
    fn handle_backpressure(&mut self, _: ConnId, _: bool, _: Instant) {}
    fn handle_mesh(&mut self, _: ShardId, _: (), _: Instant) {}
    fn handle_timeout(&mut self, _: Instant) {}
    fn handle_shutdown(&mut self, _: Instant) {
        let conns: Vec<ConnId> = self.reads.keys().copied().collect();
        for c in conns {
            self.io.push_back(IoCmd::Close(c));
        }
    }
    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8> {
        self.out.remove(&conn).unwrap_or_default()
    }
    fn poll_io(&mut self) -> Option<IoCmd<Vec<u8>>> {
        self.io.pop_front()
    }
    fn poll_mesh(&mut self) -> Option<(ShardId, ())> {
        None
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/certs")
}

const KINDS: [ListenerKind; 4] = [ListenerKind::Mqtt, ListenerKind::Tls, ListenerKind::Ws, ListenerKind::Wss];

fn transport(client_ca: bool, cn_as_username: bool) -> Transport<Recorder> {
    let d = certs();
    let files = TlsFiles {
        cert: d.join("server.pem"),
        key: d.join("server.key"),
        client_ca: client_ca.then(|| d.join("ca.pem")),
    };
    let config = TransportConfig {
        listeners: KINDS.to_vec().into(),
        tls: Some(Arc::new(TlsSlot::new(tls::load(&files).unwrap()))),
        ws: WsSettings { path: None, max_frame_bytes: 1 << 16 },
        cn_as_username,
        counters: Arc::new(TransportCounters::default()),
    };
    Transport::new(Recorder::default(), config)
}

fn accept(t: &mut Transport<Recorder>, conn: ConnId, kind: ListenerKind) {
    let listener = KINDS.iter().position(|k| *k == kind).unwrap() as u16;
    t.handle_accept(conn, Instant::now());
    t.handle_accepted(conn, Accepted { listener, peer: None });
}

/// What the runtime would do: serve every command, collecting the bytes written per connection and
/// the connections closed and handed off.
#[derive(Default)]
struct Wire {
    written: HashMap<ConnId, Vec<u8>>,
    closed: Vec<ConnId>,
    handed_off: Vec<(ConnId, shardmq_transport::TransportHandoff<Vec<u8>>)>,
}

fn drain(t: &mut Transport<Recorder>, w: &mut Wire) {
    while let Some(cmd) = t.poll_io() {
        match cmd {
            IoCmd::Transmit(c) => {
                let b = t.take_transmit(c);
                w.written.entry(c).or_default().extend(b);
            }
            IoCmd::Close(c) => {
                let b = t.take_transmit(c);
                w.written.entry(c).or_default().extend(b);
                w.closed.push(c);
            }
            IoCmd::Handoff { conn, state, .. } => w.handed_off.push((conn, state)),
            IoCmd::PauseRead(_) | IoCmd::ResumeRead(_) => {}
        }
    }
}

fn client_config(with_cert: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(certs().join("ca.pem")).unwrap();
    roots.add(CertificateDer::from_pem_slice(&ca).unwrap()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let c = match with_cert {
        Some(name) => {
            let pem = std::fs::read(certs().join(format!("{name}.pem"))).unwrap();
            let key = std::fs::read(certs().join(format!("{name}.key"))).unwrap();
            b.with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(&pem).unwrap()],
                PrivateKeyDer::from_pem_slice(&key).unwrap(),
            )
            .unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(c)
}

fn tls_client(cert: Option<&str>) -> rustls::ClientConnection {
    rustls::ClientConnection::new(client_config(cert), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// Moves bytes both ways until neither side has anything to say; returns the plaintext the client read.
fn pump(
    t: &mut Transport<Recorder>,
    w: &mut Wire,
    conn: ConnId,
    c: &mut rustls::ClientConnection,
) -> Vec<u8> {
    let mut plain = Vec::new();
    for _ in 0..20 {
        let mut to_server = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut to_server).unwrap();
        }
        if !to_server.is_empty() {
            t.handle_read(conn, &to_server, Instant::now());
        }
        drain(t, w);
        let from_server = w.written.remove(&conn).unwrap_or_default();
        if to_server.is_empty() && from_server.is_empty() {
            break;
        }
        let mut rd = &from_server[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            if c.process_new_packets().is_err() {
                return plain;
            }
        }
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.reader().read(&mut buf) {
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&buf[..n]);
        }
    }
    plain
}

#[test]
fn tls_carries_bytes_both_ways_and_plain_connections_are_untouched() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let (plain_conn, tls_conn) = (ConnId(1), ConnId(2));
    accept(&mut t, plain_conn, ListenerKind::Mqtt);
    accept(&mut t, tls_conn, ListenerKind::Tls);
    assert_eq!(t.layered_connections(), 1);

    t.handle_read(plain_conn, b"plain", Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(w.written[&plain_conn], b"ack:plain");

    let mut c = tls_client(None);
    c.writer().write_all(b"hello").unwrap();
    let got = pump(&mut t, &mut w, tls_conn, &mut c);
    assert_eq!(got, b"ack:hello");
    assert_eq!(t.inner().reads[&tls_conn], b"hello");

    // The core closes: the client gets a close_notify.
    t.inner_mut().io.push_back(IoCmd::Close(tls_conn));
    drain(&mut t, &mut w);
    assert_eq!(w.closed, vec![tls_conn]);
    let mut rd = &w.written[&tls_conn][..];
    c.read_tls(&mut rd).unwrap();
    c.process_new_packets().unwrap();
    assert_eq!(c.reader().read(&mut [0u8; 16]).unwrap(), 0, "close_notify received");
    assert_eq!(t.layered_connections(), 0);
}

#[test]
fn mutual_tls_hands_the_certificate_name_to_the_core_before_any_bytes() {
    let mut t = transport(true, true);
    let mut w = Wire::default();
    let conn = ConnId(7);
    accept(&mut t, conn, ListenerKind::Tls);
    let mut c = tls_client(Some("client"));
    c.writer().write_all(b"connect").unwrap();
    assert_eq!(pump(&mut t, &mut w, conn, &mut c), b"ack:connect");
    assert_eq!(t.inner().identities[&conn], "alice");
    assert!(t.inner().identity_first[&conn], "identity known before the first bytes");
}

#[test]
fn a_client_without_an_accepted_certificate_is_closed_and_the_core_told() {
    for cert in [None, Some("mallory")] {
        let mut t = transport(true, true);
        let mut w = Wire::default();
        let conn = ConnId(3);
        accept(&mut t, conn, ListenerKind::Tls);
        let mut c = tls_client(cert);
        c.writer().write_all(b"connect").unwrap();
        let got = pump(&mut t, &mut w, conn, &mut c);
        assert!(got.is_empty(), "{cert:?}");
        assert_eq!(w.closed, vec![conn], "{cert:?}");
        assert_eq!(t.inner().closed, vec![conn]);
        assert!(!t.inner().reads.contains_key(&conn));
        assert!(t.inner().identities.is_empty());
        assert_eq!(t.layered_connections(), 0);
    }
}

#[test]
fn garbage_on_a_tls_port_closes_that_connection_only() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    accept(&mut t, ConnId(1), ListenerKind::Tls);
    accept(&mut t, ConnId(2), ListenerKind::Tls);
    // An MQTT CONNECT where a ClientHello belongs.
    t.handle_read(ConnId(1), b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00", Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(w.closed, vec![ConnId(1)]);
    assert_eq!(t.inner().closed, vec![ConnId(1)]);
    // The other still works.
    let mut c = tls_client(None);
    c.writer().write_all(b"x").unwrap();
    assert_eq!(pump(&mut t, &mut w, ConnId(2), &mut c), b"ack:x");
}

#[test]
fn a_handed_off_connection_keeps_its_tls_session() {
    let mut a = transport(false, false);
    let mut b = transport(false, false);
    let (mut wa, mut wb) = (Wire::default(), Wire::default());
    accept(&mut a, ConnId(1), ListenerKind::Tls);
    let mut c = tls_client(None);
    c.writer().write_all(b"handoff").unwrap();
    pump(&mut a, &mut wa, ConnId(1), &mut c);
    let (conn, state) = wa.handed_off.pop().expect("handed off");
    assert_eq!(conn, ConnId(1));
    assert_eq!(a.layered_connections(), 0);
    b.handle_adopt(ConnId(9), state, Instant::now());
    drain(&mut b, &mut wb);
    let mut rd = &wb.written.remove(&ConnId(9)).unwrap_or_default()[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
    let mut buf = [0u8; 64];
    let n = c.reader().read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ack:moved", "the adopting shard answers inside the same TLS session");
    c.writer().write_all(b"more").unwrap();
    assert_eq!(pump(&mut b, &mut wb, ConnId(9), &mut c), b"ack:more");
}

fn upgrade_request() -> &'static [u8] {
    b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
}

fn masked_binary(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [9u8, 8, 7, 6];
    let mut f = vec![0x82, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn websocket_upgrade_then_binary_frames() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let conn = ConnId(4);
    accept(&mut t, conn, ListenerKind::Ws);
    t.handle_read(conn, upgrade_request(), Instant::now());
    drain(&mut t, &mut w);
    let answer = String::from_utf8(w.written.remove(&conn).unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    t.handle_read(conn, &masked_binary(b"hi"), Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(t.inner().reads[&conn], b"hi");
    assert_eq!(w.written[&conn], b"\x82\x06ack:hi");
}

#[test]
fn websocket_over_tls() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let conn = ConnId(5);
    accept(&mut t, conn, ListenerKind::Wss);
    let mut c = tls_client(None);
    c.writer().write_all(upgrade_request()).unwrap();
    let answer = pump(&mut t, &mut w, conn, &mut c);
    assert!(answer.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&answer));
    c.writer().write_all(&masked_binary(b"hi")).unwrap();
    assert_eq!(pump(&mut t, &mut w, conn, &mut c), b"\x82\x06ack:hi");
    // Closing sends a WebSocket close frame inside the TLS session, then close_notify.
    t.inner_mut().io.push_back(IoCmd::Close(conn));
    drain(&mut t, &mut w);
    let mut rd = &w.written[&conn][..];
    c.read_tls(&mut rd).unwrap();
    c.process_new_packets().unwrap();
    let mut buf = [0u8; 16];
    let n = c.reader().read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"\x88\x00", "a close frame");
}

#[test]
fn a_text_frame_closes_the_websocket_and_the_core_hears_it() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let conn = ConnId(6);
    accept(&mut t, conn, ListenerKind::Ws);
    t.handle_read(conn, upgrade_request(), Instant::now());
    let mut text = masked_binary(b"hi");
    text[0] = 0x81;
    t.handle_read(conn, &text, Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(w.closed, vec![conn]);
    assert_eq!(t.inner().closed, vec![conn]);
    assert!(!t.inner().reads.contains_key(&conn));
}
