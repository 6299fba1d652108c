//! `shardmq-transport`: TLS and WebSocket for client connections, inside the shard that owns them.
//!
//! [`Transport`] wraps a sans-I/O [`Core`] (the shard) and is one itself: ciphertext and WebSocket frames
//! come in through `handle_read`, MQTT bytes go on to the shard; the shard's output is framed and
//! encrypted in `take_transmit`. Each listener has a [`ListenerKind`]; a connection from a plain MQTT
//! listener costs one hash lookup per read and nothing else. The TLS and WebSocket state of a connection
//! travels with it when the shard hands it to the owner of its client id.
//!
//! - TLS (rustls, ring provider; TLS 1.3 and 1.2): settings from PEM files ([`tls::load`]), replaced on
//!   SIGHUP through a [`TlsSlot`] (connections accepted after the reload use the new ones), optional
//!   client certificates (mutual TLS), whose subject CN can stand for the user name.
//! - WebSocket (tungstenite): the upgrade with subprotocol `mqtt`, binary frames in and out.
//!
//! What it does not do: touch sockets or clocks (a stalled handshake is ended by the shard's CONNECT
//! timeout, which runs from the accept), certificate revocation lists, OCSP, or ALPN.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use shardmq_shard::io::{Accepted, Core, IoCmd, WakeFn};
use shardmq_shard::{ConnId, ShardId};

pub mod tls;
pub mod ws;

pub use tls::{TlsError, TlsFiles, TlsSlot};
pub use ws::WsSettings;

use tls::{ShardTls, TlsLayer};
use ws::WsLayer;

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    fn tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    fn ws(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

/// Node-wide counts of what the transports did (relaxed atomics: one increment per handshake, never
/// per message).
#[derive(Debug, Default)]
pub struct TransportCounters {
    pub tls_handshakes: AtomicU64,
    pub tls_failures: AtomicU64,
    pub ws_upgrades: AtomicU64,
    pub ws_refused: AtomicU64,
    /// WebSocket connections ended for a protocol breach (text frame, oversized or malformed frame).
    pub ws_protocol_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The transports of one node, shared by its shards.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The kind of each listener, by its index in the runtime's list of listen addresses.
    pub listeners: Arc<[ListenerKind]>,
    /// Required when any listener is `Tls` or `Wss`.
    pub tls: Option<Arc<TlsSlot>>,
    pub ws: WsSettings,
    /// Use the subject CN of a client's certificate as its user name (`--tls-cn-as-username`).
    pub cn_as_username: bool,
    pub counters: Arc<TransportCounters>,
}

impl TransportConfig {
    /// Whether any listener needs this layer at all.
    pub fn needed(&self) -> bool {
        self.listeners.iter().any(|k| *k != ListenerKind::Mqtt)
    }
}

/// The transport state of one connection that is not plain MQTT over TCP.
#[derive(Debug)]
struct Stack {
    tls: Option<Box<TlsLayer>>,
    ws: Option<Box<WsLayer>>,
    /// WebSocket-level output (the upgrade's answer, pongs) of a connection without TLS, waiting for
    /// `take_transmit`. With TLS it waits, encrypted, inside rustls.
    pending: Vec<u8>,
    /// The connection is being closed: the next `take_transmit` adds the closing frames and forgets it.
    closing: bool,
}

/// Output produced while reading, for the next `take_transmit`: encrypted and kept by rustls, or in
/// `pending` without TLS.
fn stash(tls: &mut Option<Box<TlsLayer>>, pending: &mut Vec<u8>, bytes: &[u8]) {
    match tls {
        Some(tls) => tls.buffer(bytes),
        None => pending.extend_from_slice(bytes),
    }
}

impl Stack {
    fn has_output(&self) -> bool {
        !self.pending.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }
}

/// A connection's transport state, carried with it to another shard.
#[derive(Debug)]
pub struct TransportHandoff<H> {
    stack: Option<Box<Stack>>,
    inner: H,
}

/// A [`Core`] with TLS and WebSocket in front of it (see the crate docs).
pub struct Transport<C: Core> {
    inner: C,
    config: TransportConfig,
    tls: Option<ShardTls>,
    /// Connections that are not plain MQTT over TCP.
    conns: ahash::HashMap<ConnId, Stack>,
    /// Our own commands (handshake output, closes), served before the inner core's.
    cmds: VecDeque<IoCmd<TransportHandoff<C::Handoff>>>,
    /// Scratch: decrypted bytes of one read.
    plain: Vec<u8>,
    /// Scratch: MQTT bytes of one read's WebSocket messages.
    mqtt: Vec<u8>,
    /// Scratch: WebSocket output of one read.
    ws_out: Vec<u8>,
    /// The `now` of the latest `handle_accept`, which the runtime calls right before `handle_accepted`
    /// (that one has no clock reading of its own).
    accepted_at: Option<Instant>,
}

impl<C: Core> Transport<C> {
    pub fn new(inner: C, config: TransportConfig) -> Transport<C> {
        let tls = config.tls.clone().map(ShardTls::new);
        Transport {
            inner,
            config,
            tls,
            conns: Default::default(),
            cmds: VecDeque::new(),
            plain: Vec::new(),
            mqtt: Vec::new(),
            ws_out: Vec::new(),
            accepted_at: None,
        }
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// Connections with a TLS or WebSocket layer.
    pub fn layered_connections(&self) -> usize {
        self.conns.len()
    }

    fn new_stack(&mut self, kind: ListenerKind) -> Result<Stack, String> {
        let tls = if kind.tls() {
            let shard_tls = self.tls.as_mut().ok_or("a TLS listener without TLS settings")?;
            Some(Box::new(TlsLayer::new(shard_tls.config()).map_err(|e| e.to_string())?))
        } else {
            None
        };
        let ws = kind.ws().then(|| Box::new(WsLayer::new(&self.config.ws)));
        Ok(Stack { tls, ws, pending: Vec::new(), closing: false })
    }

    /// Ends a connection whose transport failed: the core hears it closed (an abnormal end: its will
    /// applies), and the runtime sends what is pending (an alert, an HTTP answer, a close frame) and
    /// closes the socket.
    fn fail(&mut self, conn: ConnId, why: &dyn std::fmt::Display, now: Instant) {
        tracing::debug!(conn = conn.0, %why, "connection closed by its transport");
        if let Some(s) = self.conns.get_mut(&conn) {
            s.closing = true;
        }
        self.inner.handle_closed(conn, now);
        self.cmds.push_back(IoCmd::Close(conn));
    }

    fn read_layered(&mut self, conn: ConnId, data: &[u8], now: Instant) {
        let Some(stack) = self.conns.get_mut(&conn) else { return };
        if stack.closing {
            return;
        }
        let counters = &self.config.counters;
        // Which buffer holds the MQTT bytes: the read itself, `plain` or `mqtt`.
        enum Source {
            Data,
            Plain,
            Mqtt,
        }
        let mut identity = None;
        let mut transmit = false;
        let outcome: Result<Source, String> = 'layers: {
            self.plain.clear();
            let mut source = Source::Data;
            if let Some(tls) = &mut stack.tls {
                let was_handshaking = tls.is_handshaking();
                let result = tls.decrypt(data, &mut self.plain);
                transmit |= tls.wants_write();
                if let Err(e) = result {
                    bump(&counters.tls_failures);
                    break 'layers Err(e.to_string());
                }
                if was_handshaking && !tls.is_handshaking() {
                    bump(&counters.tls_handshakes);
                    tracing::trace!(conn = conn.0, version = ?tls.protocol_version(), "TLS handshake done");
                    if self.config.cn_as_username {
                        identity = Some(tls.peer_common_name());
                    }
                }
                source = Source::Plain;
            }
            if let Some(ws) = &mut stack.ws {
                let input: &[u8] = if matches!(source, Source::Plain) { &self.plain } else { data };
                let was_open = ws.is_open();
                self.mqtt.clear();
                self.ws_out.clear();
                let result = ws.read(input, &mut self.mqtt, &mut self.ws_out);
                if !self.ws_out.is_empty() {
                    stash(&mut stack.tls, &mut stack.pending, &self.ws_out);
                    transmit = true;
                }
                if let Err(end) = result {
                    match end {
                        ws::WsEnd::Refused(_) => bump(&counters.ws_refused),
                        ws::WsEnd::TextFrame | ws::WsEnd::Protocol(_) => bump(&counters.ws_protocol_errors),
                        ws::WsEnd::Closed => {}
                    }
                    break 'layers Err(end.to_string());
                }
                if !was_open && ws.is_open() {
                    bump(&counters.ws_upgrades);
                }
                source = Source::Mqtt;
            }
            Ok(source)
        };
        if transmit {
            self.cmds.push_back(IoCmd::Transmit(conn));
        }
        let source = match outcome {
            Ok(s) => s,
            Err(why) => {
                self.fail(conn, &why, now);
                return;
            }
        };
        if let Some(name) = identity {
            self.inner.handle_peer_identity(conn, name.as_deref());
        }
        let mqtt: &[u8] = match source {
            Source::Data => data,
            Source::Plain => &self.plain,
            Source::Mqtt => &self.mqtt,
        };
        if !mqtt.is_empty() {
            self.inner.handle_read(conn, mqtt, now);
        }
    }

    /// Frames and encrypts the core's output for a layered connection.
    fn wrap_output(stack: &mut Stack, plain: Vec<u8>) -> Vec<u8> {
        let mut framed = std::mem::take(&mut stack.pending);
        match &mut stack.ws {
            Some(ws) => {
                ws.write(plain, &mut framed);
                if stack.closing {
                    ws.close(&mut framed);
                }
            }
            None if framed.is_empty() => framed = plain,
            None => framed.extend_from_slice(&plain),
        }
        match &mut stack.tls {
            Some(tls) => {
                if stack.closing {
                    tls.buffer(&framed);
                    tls.close();
                    framed.clear();
                }
                let mut out = Vec::new();
                tls.encrypt(&framed, &mut out);
                out
            }
            None => framed,
        }
    }
}

impl<C: Core> Core for Transport<C> {
    type Mesh = C::Mesh;

    fn mesh_can_wait(m: &Self::Mesh) -> bool {
        C::mesh_can_wait(m)
    }
    type Handoff = TransportHandoff<C::Handoff>;

    fn handle_accept(&mut self, conn: ConnId, now: Instant) {
        self.accepted_at = Some(now);
        self.inner.handle_accept(conn, now);
    }

    fn handle_accepted(&mut self, conn: ConnId, from: Accepted) {
        let kind = self.config.listeners.get(from.listener as usize).copied().unwrap_or(ListenerKind::Mqtt);
        if kind != ListenerKind::Mqtt {
            match self.new_stack(kind) {
                Ok(stack) => {
                    self.conns.insert(conn, stack);
                }
                Err(why) => {
                    tracing::error!(conn = conn.0, %why, "cannot set up the connection's transport");
                    self.inner.handle_accepted(conn, from);
                    // Set by the `handle_accept` that came just before.
                    let Some(now) = self.accepted_at else { return };
                    self.fail(conn, &why, now);
                    return;
                }
            }
        }
        self.inner.handle_accepted(conn, from);
    }

    fn handle_peer_identity(&mut self, conn: ConnId, name: Option<&str>) {
        self.inner.handle_peer_identity(conn, name);
    }

    fn handle_adopt(&mut self, conn: ConnId, state: Self::Handoff, now: Instant) {
        if let Some(stack) = state.stack {
            if stack.has_output() {
                self.cmds.push_back(IoCmd::Transmit(conn));
            }
            self.conns.insert(conn, *stack);
        }
        self.inner.handle_adopt(conn, state.inner, now);
    }

    fn handle_read(&mut self, conn: ConnId, data: &[u8], now: Instant) {
        if self.conns.is_empty() || !self.conns.contains_key(&conn) {
            self.inner.handle_read(conn, data, now);
        } else {
            self.read_layered(conn, data, now);
        }
    }

    fn handle_closed(&mut self, conn: ConnId, now: Instant) {
        self.conns.remove(&conn);
        self.inner.handle_closed(conn, now);
    }

    fn handle_backpressure(&mut self, conn: ConnId, blocked: bool, now: Instant) {
        self.inner.handle_backpressure(conn, blocked, now);
    }

    fn handle_mesh(&mut self, from: ShardId, msg: Self::Mesh, now: Instant) {
        self.inner.handle_mesh(from, msg, now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now);
    }

    fn handle_shutdown(&mut self, now: Instant) {
        self.inner.handle_shutdown(now);
    }

    fn handle_commit(&mut self, now: Instant) {
        self.inner.handle_commit(now);
    }

    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8> {
        let plain = self.inner.take_transmit(conn);
        let Some(stack) = self.conns.get_mut(&conn) else { return plain };
        let out = Self::wrap_output(stack, plain);
        if stack.closing {
            self.conns.remove(&conn);
        }
        out
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.inner.recycle(buf);
    }

    fn poll_io(&mut self) -> Option<IoCmd<Self::Handoff>> {
        if let Some(cmd) = self.cmds.pop_front() {
            return Some(cmd);
        }
        Some(match self.inner.poll_io()? {
            IoCmd::Transmit(conn) => IoCmd::Transmit(conn),
            IoCmd::Close(conn) => {
                if let Some(s) = self.conns.get_mut(&conn) {
                    s.closing = true;
                }
                IoCmd::Close(conn)
            }
            IoCmd::Handoff { conn, to, state } => {
                let stack = self.conns.remove(&conn).map(Box::new);
                IoCmd::Handoff { conn, to, state: TransportHandoff { stack, inner: state } }
            }
            IoCmd::PauseRead(conn) => IoCmd::PauseRead(conn),
            IoCmd::ResumeRead(conn) => IoCmd::ResumeRead(conn),
        })
    }

    fn poll_mesh(&mut self) -> Option<(ShardId, Self::Mesh)> {
        self.inner.poll_mesh()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    fn set_waker(&mut self, wake: WakeFn) {
        self.inner.set_waker(wake);
    }
}
