//! A minimal blocking MQTT client: CONNECT/CONNACK and SUBSCRIBE/SUBACK done synchronously, then a packet
//! reader ([`Client::poll`]) and a cloneable, lock-protected writer ([`Writer`]) so that one thread can
//! publish while another reads acknowledgements on the same connection (plain TCP only: over TLS the
//! reader goes through the writer's lock, see [`crate::tls`]).
//!
//! It implements only what the benchmarks need: clean sessions, no will, no retained messages, no
//! reconnects, no keep-alive pings (keep alive 0), no topic aliases; a user name and password and TLS
//! when a [`Dial`] asks for them.

use crate::tls::Tls;
use anyhow::{anyhow, bail, Context, Result};
use rustls::{ClientConnection, StreamOwned};
use shardmq_wire::{
    decode, encode, Ack, ConnAck, Connect, Disconnect, Packet, PacketId, Properties, Protocol, Publish, QoS,
    ReasonCode, SubOptions, Subscribe,
};
use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections made by this process so far; picks each one's source address.
static CONN_INDEX: AtomicU64 = AtomicU64::new(0);

/// How long the synchronous handshakes may take before the run is declared broken.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn protocol_from(v: u8) -> Result<Protocol> {
    match v {
        3 | 4 => Ok(Protocol::V311),
        5 => Ok(Protocol::V5),
        _ => bail!("--protocol must be 3 (3.1.1) or 5"),
    }
}

/// How every connection of a run is made: credentials for its CONNECT, and TLS or plain TCP.
#[derive(Clone, Default)]
pub struct Dial {
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<Tls>,
}

impl Dial {
    /// `(user name, password)` as the CONNECT carries them.
    pub fn credentials(&self) -> (Option<&str>, Option<&[u8]>) {
        (self.username.as_deref(), self.password.as_deref().map(str::as_bytes))
    }
}

/// The CONNECT every benchmark client sends: clean start, keep alive 0 so no pings are needed, and the
/// largest Receive Maximum so the broker's flow control, not ours, limits delivery; the user name and
/// password of `credentials` (see [`Dial::credentials`]).
pub fn connect_packet<'a>(
    client_id: &'a str,
    protocol: Protocol,
    credentials: (Option<&'a str>, Option<&'a [u8]>),
) -> Packet<'a> {
    let properties = if protocol.is_v5() {
        Properties { receive_maximum: Some(65535), ..Default::default() }
    } else {
        Properties::default()
    };
    Packet::Connect(Connect {
        protocol,
        clean_start: true,
        keep_alive_s: 0,
        client_id,
        will: None,
        username: credentials.0,
        password: credentials.1,
        properties,
    })
}

/// [`connect_packet`] for a session that outlives its connection: clean start 0 (3.1.1: clean session 0)
/// and, in MQTT 5, a Session Expiry Interval of `expiry_s` (0 in 5 means the session ends with the
/// connection, so a persistent session needs one).
pub fn session_connect_packet<'a>(
    client_id: &'a str,
    protocol: Protocol,
    credentials: (Option<&'a str>, Option<&'a [u8]>),
    expiry_s: u32,
) -> Packet<'a> {
    let mut p = connect_packet(client_id, protocol, credentials);
    if let Packet::Connect(c) = &mut p {
        c.clean_start = false;
        if protocol.is_v5() {
            c.properties.session_expiry_interval_s = Some(expiry_s);
        }
    }
    p
}

/// What a CONNACK said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub reason: ReasonCode,
    pub session_present: bool,
}

/// A connection's byte stream: a TCP socket or a TLS session over one.
pub enum Io {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.read(buf),
            Io::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.write(buf),
            Io::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Tcp(s) => s.flush(),
            Io::Tls(s) => s.flush(),
        }
    }
}

/// A connection handed over to an event loop: the socket, its TLS session if any, and the bytes (plain
/// text) already read past the handshake.
pub struct Parts {
    pub sock: TcpStream,
    pub tls: Option<Box<ClientConnection>>,
    pub left: Vec<u8>,
}

/// The write half: encodes under a lock so whole packets from different threads never interleave.
#[derive(Clone)]
pub struct Writer {
    stream: Arc<Mutex<Io>>,
    protocol: Protocol,
}

impl Writer {
    pub fn send(&self, packet: &Packet<'_>) -> Result<()> {
        let mut buf = Vec::with_capacity(64);
        encode(packet, self.protocol, &mut buf)?;
        self.send_raw(&buf)
    }

    /// Writes already-encoded packets; lets a publisher reuse its buffer. Fails when the broker took
    /// nothing for [`HANDSHAKE_TIMEOUT`].
    pub fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        if self.write_until(bytes, |since| since.elapsed() > HANDSHAKE_TIMEOUT)? {
            Ok(())
        } else {
            bail!("write: the broker took nothing for {} s", HANDSHAKE_TIMEOUT.as_secs())
        }
    }

    /// [`Writer::send_raw`] that gives up, returning `false`, once `stop` is set while the broker takes
    /// nothing: a publisher flooding a broker that stopped reading still ends with the run. What was
    /// written of the packet by then stays written.
    pub fn send_raw_unless(&self, bytes: &[u8], stop: &AtomicBool) -> Result<bool> {
        self.write_until(bytes, |_| stop.load(Ordering::Relaxed))
    }

    /// Writes `bytes`, retrying after each write timeout of the socket until `give_up(last progress)`.
    fn write_until(&self, bytes: &[u8], give_up: impl Fn(Instant) -> bool) -> Result<bool> {
        let mut s = self.stream.lock().map_err(|_| anyhow!("writer lock poisoned"))?;
        let mut off = 0;
        let mut progress = Instant::now();
        while off < bytes.len() {
            match s.write(&bytes[off..]) {
                Ok(0) => bail!("write: connection closed"),
                Ok(n) => {
                    off += n;
                    progress = Instant::now();
                }
                Err(e) if crate::tls::timed_out(&e) => {
                    if give_up(progress) {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e).context("write"),
            }
        }
        Ok(true)
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn ack(&self, kind: fn(Ack<'static>) -> Packet<'static>, id: PacketId) -> Result<()> {
        self.send(&kind(Ack::new(id, ReasonCode::SUCCESS)))
    }

    /// Sends DISCONNECT unless the broker takes nothing for a second (a broker still working through a
    /// flood); errors are ignored.
    pub fn disconnect(&self) {
        let mut buf = Vec::with_capacity(4);
        if encode(&Packet::Disconnect(Disconnect::default()), self.protocol, &mut buf).is_ok() {
            let _ = self.write_until(&buf, |since| since.elapsed() > Duration::from_secs(1));
        }
    }
}

pub struct Client {
    /// The socket's read half; `None` over TLS, whose session is read through the writer's lock.
    read: Option<TcpStream>,
    writer: Writer,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The broker's Receive Maximum (65535 when it sent none, as the specification says).
    pub server_receive_max: u16,
}

impl Client {
    pub fn connect(addr: SocketAddrV4, client_id: &str, protocol: Protocol, dial: &Dial) -> Result<Client> {
        let mut c = Client::open(addr, protocol, dial)?;
        let ack = c.handshake(&connect_packet(client_id, protocol, dial.credentials()))?;
        if ack.reason.is_error() {
            bail!("CONNACK refused: reason 0x{:02x}", ack.reason.0);
        }
        Ok(c)
    }

    /// The TCP connection (and TLS handshake), no CONNECT yet: see [`Client::handshake`].
    pub fn open(addr: SocketAddrV4, protocol: Protocol, dial: &Dial) -> Result<Client> {
        let index = CONN_INDEX.fetch_add(1, Ordering::Relaxed);
        let mut sock =
            crate::net::connect_blocking(addr, index).with_context(|| format!("connect {addr}"))?;
        let (read, io) = match &dial.tls {
            None => (Some(sock.try_clone()?), Io::Tcp(sock)),
            Some(tls) => {
                let conn = crate::tls::handshake(tls, &mut sock, Instant::now() + HANDSHAKE_TIMEOUT)?;
                (None, Io::Tls(Box::new(StreamOwned::new(conn, sock))))
            }
        };
        Ok(Client {
            read,
            writer: Writer { stream: Arc::new(Mutex::new(io)), protocol },
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            server_receive_max: 65535,
        })
    }

    /// Sends `connect` (a CONNECT) and reads until the CONNACK, whatever it says; fails only when none
    /// came within the handshake timeout or the connection broke.
    pub fn handshake(&mut self, connect: &Packet<'_>) -> Result<Accepted> {
        self.writer.send(connect)?;
        let (accepted, receive_max) = self.wait_for(|p| match p {
            Packet::ConnAck(ConnAck { reason, properties, session_present }) => Some((
                Accepted { reason: *reason, session_present: *session_present },
                properties.receive_maximum,
            )),
            _ => None,
        })?;
        self.server_receive_max = receive_max.unwrap_or(65535);
        Ok(accepted)
    }

    /// The socket (the writer's clone is dropped), its TLS session and any bytes already read past the
    /// handshake, for an event loop to take over the connection. Fails while a [`Writer`] of it lives.
    pub fn into_parts(self) -> Result<Parts> {
        let left = self.buf[self.start..self.end].to_vec();
        let io = Arc::try_unwrap(self.writer.stream)
            .map_err(|_| anyhow!("connection still shared with a writer"))?
            .into_inner()
            .map_err(|_| anyhow!("writer lock poisoned"))?;
        Ok(match (io, self.read) {
            (_, Some(sock)) => Parts { sock, tls: None, left },
            (Io::Tls(s), None) => {
                let s = *s;
                Parts { sock: s.sock, tls: Some(Box::new(s.conn)), left }
            }
            (Io::Tcp(sock), None) => Parts { sock, tls: None, left },
        })
    }

    /// DISCONNECT and, over TLS, close_notify; then the socket closes. Errors are ignored: the broker may
    /// have gone.
    pub fn close(self) {
        self.writer.disconnect();
        if let Ok(mut io) = self.writer.stream.lock() {
            if let Io::Tls(s) = &mut *io {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        }
    }

    pub fn writer(&self) -> Writer {
        self.writer.clone()
    }

    pub fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<()> {
        let sub = Subscribe {
            packet_id: PacketId(1),
            filters: vec![(filter, SubOptions { qos, ..Default::default() })],
            properties: Properties::default(),
        };
        self.writer.send(&Packet::Subscribe(sub))?;
        let reasons = self.wait_for(|p| match p {
            Packet::SubAck(a) => Some(a.reasons.clone()),
            _ => None,
        })?;
        match reasons.first() {
            Some(r) if !r.is_error() => Ok(()),
            r => bail!("SUBACK refused {filter}: {r:?}"),
        }
    }

    /// Reads until `pick` accepts a packet; anything else arriving during a handshake is dropped.
    fn wait_for<T>(&mut self, mut pick: impl FnMut(&Packet<'_>) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(Some(v)) = self.poll(&mut pick)? {
                return Ok(v);
            }
        }
        bail!("timed out waiting for the broker")
    }

    /// Hands the next complete packet to `f`. `Ok(None)` when nothing arrived within the read timeout;
    /// an error when the connection closed or sent something undecodable.
    pub fn poll<R>(&mut self, f: impl FnOnce(&Packet<'_>) -> R) -> Result<Option<R>> {
        loop {
            let protocol = Some(self.writer.protocol);
            match decode(&self.buf[self.start..self.end], protocol, shardmq_wire::MAX_REMAINING_LENGTH)? {
                Some((packet, n)) => {
                    let r = f(&packet);
                    self.start += n;
                    return Ok(Some(r));
                }
                None => {
                    // Compact, then grow only for a packet bigger than the whole buffer.
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    if self.end == self.buf.len() {
                        self.buf.resize(self.buf.len() * 2, 0);
                    }
                }
            }
            let got = match &mut self.read {
                Some(s) => s.read(&mut self.buf[self.end..]),
                // One thread per TLS connection (see the module docs): the lock is not contended.
                None => match self.writer.stream.lock() {
                    Ok(mut io) => io.read(&mut self.buf[self.end..]),
                    Err(_) => bail!("connection lock poisoned"),
                },
            };
            match got {
                Ok(0) => bail!("connection closed by broker"),
                Ok(n) => self.end += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Encodes a PUBLISH into `out` (cleared first).
pub fn encode_publish(
    out: &mut Vec<u8>,
    protocol: Protocol,
    topic: &str,
    qos: QoS,
    id: Option<PacketId>,
    payload: &[u8],
) -> Result<()> {
    out.clear();
    let p = Publish {
        dup: false,
        qos,
        retain: false,
        topic,
        packet_id: id,
        payload,
        properties: Properties::default(),
    };
    encode(&Packet::Publish(p), protocol, out)?;
    Ok(())
}
