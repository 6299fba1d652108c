//! What the transport tests share: a recording core, a transport around it with every listener kind,
//! a runtime stand-in that serves commands, and a rustls client pumped by hand.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::{HashMap, VecDeque};
use std::io::Read;
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
pub struct Recorder {
    pub reads: HashMap<ConnId, Vec<u8>>,
    pub identities: HashMap<ConnId, String>,
    /// Identity known when the first bytes arrived.
    pub identity_first: HashMap<ConnId, bool>,
    pub closed: Vec<ConnId>,
    pub out: HashMap<ConnId, Vec<u8>>,
    pub io: VecDeque<IoCmd<Vec<u8>>>,
}

impl Core for Recorder {
    type Mesh = ();
    type Handoff = Vec<u8>;

    fn handle_accept(&mut self, _conn: ConnId, _now: Instant) {}
    fn handle_adopt(&mut self, conn: ConnId, state: Vec<u8>, now: Instant) {
        self.handle_read(conn, &state, now);
    }
    fn handle_peer_identity(&mut self, conn: ConnId, name: Option<&str>) {
        self.identities.insert(conn, name.unwrap_or("<none>").to_string());
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

pub fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/certs")
}

pub const KINDS: [ListenerKind; 4] =
    [ListenerKind::Mqtt, ListenerKind::Tls, ListenerKind::Ws, ListenerKind::Wss];

pub fn transport(client_ca: bool, cn_as_username: bool) -> Transport<Recorder> {
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

pub fn accept(t: &mut Transport<Recorder>, conn: ConnId, kind: ListenerKind) {
    let listener = KINDS.iter().position(|k| *k == kind).unwrap() as u16;
    t.handle_accept(conn, Instant::now());
    t.handle_accepted(conn, Accepted { listener, peer: None });
}

/// What the runtime would do: serve every command, collecting the bytes written per connection and
/// the connections closed and handed off.
#[derive(Default)]
pub struct Wire {
    pub written: HashMap<ConnId, Vec<u8>>,
    pub closed: Vec<ConnId>,
    pub handed_off: Vec<(ConnId, shardmq_transport::TransportHandoff<Vec<u8>>)>,
}

pub fn drain(t: &mut Transport<Recorder>, w: &mut Wire) {
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

pub fn client_config(with_cert: Option<&str>) -> Arc<rustls::ClientConfig> {
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

pub fn tls_client(cert: Option<&str>) -> rustls::ClientConnection {
    rustls::ClientConnection::new(client_config(cert), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// Moves bytes both ways until neither side has anything to say; returns the plaintext the client read.
pub fn pump(
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

pub fn upgrade_request() -> &'static [u8] {
    b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
}

pub fn masked_binary(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [9u8, 8, 7, 6];
    let mut f = vec![0x82, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}
