//! The binary protocol of a TCP link between two nodes of a zone: frames, and the handshake that opens
//! a link.
//!
//! Every frame is `length varint | type u8 | body`, the length counting type and body. The hot frame,
//! [`Frame::Forward`] (a PUBLISH passed to a peer whose interest may match), costs at most 16 bytes on top
//! of its topic, payload and properties: length (≤ 4), type, flags, topic length (≤ 2), the publisher's
//! origin (shard and session key: 2 to 4 bytes for up to 128 shards and 2^21 sessions per shard), an
//! optional acknowledgement token (≤ 4 for tokens below 2^28); the payload's length is what the frame's
//! leaves. The link sequence is implicit:
//! frames of one direction are numbered from 1 in the order sent (TCP keeps it), and [`Frame::Received`]
//! reports how far the receiver got, which is what a reconnect resumes from.
//!
//! Application frames (what the broker's gateway sends through [`crate::zone::Zone::send`]): `Forward`,
//! `Stored`, [`Frame::Interest`] (an encoded [`crate::router::Announce`]), [`Frame::Retained`] (a
//! retained update replicated to peers) and [`Frame::Registry`] (a session registry message, see
//! [`registry`]). `Received` is the link's own control frame and is not numbered.
//!
//! Opening a link: each side sends [`Frame::Hello`] (magic, version, its identity, a fresh nonce, and
//! the name of the registry's hash, [`crate::registry::REGISTRY_HASH`]: nodes that would compute
//! different owners for a client id must not link); then
//! each sends [`Frame::Proof`], an HMAC with the cluster secret over both nonces and both identities, or
//! an empty proof when the cluster has no secret. A wrong magic, version or proof ends the link with
//! [`Frame::Refuse`] carrying the reason, logged on both sides ([`Handshake`]).

pub mod registry;

use ring::hmac;

use crate::bytes::{ReadError, Reader};
use crate::registry::REGISTRY_HASH;
use crate::NodeIdentity;

pub const LINK_MAGIC: [u8; 4] = *b"SMQL";
/// Bumped with any incompatible change of the frames below or of the rules of their exchanges (6: a
/// `Registry` frame carries one or more messages; registry message 11, `Copy`, is a copy nobody
/// acknowledges; a disconnect whose requester keeps the replica is answered by its `Forget`. 7: a
/// `Register` may be of a connection answered ahead, or of one that ended already; registry message
/// 12, `Superseded`).
pub const LINK_VERSION: u16 = 7;
/// A frame longer than this is refused (a forwarded PUBLISH is at most the broker's maximum packet size,
/// 256 MiB by the protocol; snapshots are sent in parts below it).
pub const MAX_FRAME: usize = 300 << 20;

const T_HELLO: u8 = 1;
const T_PROOF: u8 = 2;
const T_REFUSE: u8 = 3;
const T_FORWARD: u8 = 4;
const T_STORED: u8 = 5;
const T_RECEIVED: u8 = 6;
const T_INTEREST: u8 = 7;
const T_RETAINED: u8 = 8;
const T_CONGESTION: u8 = 9;
const T_REGISTRY: u8 = 10;
const T_SESSION: u8 = 11;
const T_SESSION_SETTLED: u8 = 12;

/// A PUBLISH forwarded to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward<'a> {
    pub qos: u8,
    pub retain: bool,
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// MQTT 5 properties as encoded on the wire (empty: none).
    pub properties: &'a [u8],
    /// Set when the publisher's acknowledgement waits for the peer to store the message: the peer answers
    /// [`Frame::Stored`] with it.
    pub ack_token: Option<u32>,
    /// Deliver to the receiving node's matching non-shared subscriptions.
    pub normal: bool,
    /// Shared subscriptions (full `$share/group/filter` strings) whose one-member delivery of this
    /// message the receiving node makes.
    pub groups: Vec<&'a str>,
    /// The message expiry interval left, in seconds (MQTT 5), when the publisher set one.
    pub expiry_s: Option<u32>,
    /// The publishing session on the sending node (its shard and session key), when it has one: the
    /// receiver reports congestion for it ([`Frame::Congestion`]) so that the sender pauses that
    /// publisher, as shards do for each other.
    pub origin: Option<OriginRef>,
}

/// A publishing session of the sending node: the shard that owns it and its key there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginRef {
    pub shard: u16,
    pub session: u64,
}

/// A retained update replicated to a peer: last writer wins by (`stamp`, `node`), see
/// [`crate::retained`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained<'a> {
    /// The update's hybrid logical clock stamp ([`crate::retained::HlcStamp`]).
    pub stamp: u64,
    /// The node that wrote it.
    pub node: &'a str,
    pub qos: u8,
    pub topic: &'a str,
    /// Empty when the update clears the topic.
    pub payload: &'a [u8],
    pub properties: &'a [u8],
    pub expiry_s: Option<u32>,
    /// The update deletes the retained message (a tombstone).
    pub clear: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello {
        version: u16,
        identity: NodeIdentity,
        nonce: [u8; 16],
        /// The session registry's hash ([`REGISTRY_HASH`]); empty from a peer too old to send one (its
        /// version is refused first).
        registry_hash: &'a str,
    },
    Proof {
        tag: Vec<u8>,
    },
    Refuse {
        reason: &'a str,
    },
    Forward(Forward<'a>),
    /// The answer to a forward that carried `token`: stored (`ok`) or refused by the peer's log.
    Stored {
        token: u32,
        ok: bool,
    },
    /// The receiver has every frame of this direction up to `seq`. Also the first frame after the
    /// proof (the resume frame, see [`crate::zone`]) and the heartbeat of an idle link.
    Received {
        seq: u64,
    },
    /// An encoded [`crate::router::Announce`] (interest snapshot, deltas or acknowledgement).
    Interest(&'a [u8]),
    Retained(Retained<'a>),
    /// Every subscriber on the receiving node of the last message from `origin` (a publisher of the node
    /// this frame goes to) is congested (`true`), or no longer (`false`).
    Congestion {
        origin: OriginRef,
        congested: bool,
    },
    /// The body of a session registry message ([`registry::RegistryMsg`], [`registry::decode`]).
    Registry(&'a [u8]),
    /// A session handed to the node that took it over: its client id, the registry epoch of the
    /// connection it goes to, and the session's state (empty when there was none to move).
    Session {
        client: &'a str,
        epoch: u64,
        state: &'a [u8],
    },
    /// To the node a session came from: every node of the zone now routes the session's subscriptions
    /// here, so the old node may stop forwarding what still reaches it for the session.
    SessionSettled {
        client: &'a str,
        epoch: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("link frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("malformed link frame: {0}")]
    Malformed(&'static str),
    #[error("unknown link frame type {0}")]
    UnknownType(u8),
    #[error("not a shardmq cluster link (bad magic)")]
    BadMagic,
    #[error("peer speaks link version {0}, this node {LINK_VERSION}")]
    Version(u16),
    #[error("peer's session registry hash is {0:?}, this node's {REGISTRY_HASH:?}")]
    RegistryHash(String),
    #[error("peer's proof does not match the cluster secret")]
    WrongSecret,
    #[error("peer refused the link: {0}")]
    Refused(String),
    #[error("unexpected {0} frame during the handshake")]
    Unexpected(&'static str),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of a frame whose body (after its type byte) is `body_len` long, as [`encode`] writes it.
pub fn framed_len(body_len: usize) -> usize {
    varint_len(body_len as u64 + 1) + 1 + body_len
}

/// Bytes of an encoded varint (lengths and numbers inside frames).
pub fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

impl From<ReadError> for LinkError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Short { .. } => LinkError::Malformed("short"),
            ReadError::VarintTooLong => LinkError::Malformed("varint too long"),
        }
    }
}

fn bytes<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], LinkError> {
    let n = r.varint()?;
    Ok(r.take(usize::try_from(n).map_err(|_| LinkError::Malformed("length"))?)?)
}

fn str<'a>(r: &mut Reader<'a>) -> Result<&'a str, LinkError> {
    std::str::from_utf8(bytes(r)?).map_err(|_| LinkError::Malformed("not UTF-8"))
}

fn u32_of(v: u64, what: &'static str) -> Result<u32, LinkError> {
    u32::try_from(v).map_err(|_| LinkError::Malformed(what))
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

const F_RETAIN: u8 = 0x04;
const F_PROPS: u8 = 0x08;
const F_TOKEN: u8 = 0x10;
/// Not for the receiver's non-shared subscriptions (only for `groups`): a plain forward sets no flag.
const F_NOT_NORMAL: u8 = 0x20;
const F_GROUPS: u8 = 0x40;
const F_EXPIRY: u8 = 0x80;

const R_CLEAR: u8 = 0x04;
const R_EXPIRY: u8 = 0x08;

/// Appends `f`, framed, to `out`.
pub fn encode(f: &Frame<'_>, out: &mut Vec<u8>) {
    // Frames whose body is given whole are written straight into `out`.
    let whole = match f {
        Frame::Interest(b) => Some((T_INTEREST, b)),
        Frame::Registry(b) => Some((T_REGISTRY, b)),
        _ => None,
    };
    if let Some((ty, b)) = whole {
        put_varint(out, b.len() as u64 + 1);
        out.push(ty);
        out.extend_from_slice(b);
        return;
    }
    let mut body = Vec::new();
    let ty = match f {
        Frame::Hello { version, identity, nonce, registry_hash } => {
            body.extend_from_slice(&LINK_MAGIC);
            body.extend_from_slice(&version.to_le_bytes());
            put_identity(&mut body, identity);
            body.extend_from_slice(nonce);
            put_bytes(&mut body, registry_hash.as_bytes());
            T_HELLO
        }
        Frame::Proof { tag } => {
            put_bytes(&mut body, tag);
            T_PROOF
        }
        Frame::Refuse { reason } => {
            put_bytes(&mut body, reason.as_bytes());
            T_REFUSE
        }
        Frame::Forward(fw) => return encode_forward(fw, out),
        Frame::Stored { token, ok } => {
            put_varint(&mut body, *token as u64);
            body.push(*ok as u8);
            T_STORED
        }
        Frame::Received { seq } => {
            put_varint(&mut body, *seq);
            T_RECEIVED
        }
        Frame::Interest(_) | Frame::Registry(_) => unreachable!("written above"),
        Frame::Session { client, epoch, state } => {
            put_bytes(&mut body, client.as_bytes());
            put_varint(&mut body, *epoch);
            body.extend_from_slice(state);
            T_SESSION
        }
        Frame::SessionSettled { client, epoch } => {
            put_bytes(&mut body, client.as_bytes());
            put_varint(&mut body, *epoch);
            T_SESSION_SETTLED
        }
        Frame::Congestion { origin, congested } => {
            put_varint(&mut body, origin.shard as u64);
            put_varint(&mut body, origin.session);
            body.push(*congested as u8);
            T_CONGESTION
        }
        Frame::Retained(r) => {
            let mut flags = r.qos & 0x03;
            if r.clear {
                flags |= R_CLEAR;
            }
            if r.expiry_s.is_some() {
                flags |= R_EXPIRY;
            }
            body.push(flags);
            put_varint(&mut body, r.stamp);
            put_bytes(&mut body, r.node.as_bytes());
            put_bytes(&mut body, r.topic.as_bytes());
            put_bytes(&mut body, r.properties);
            if let Some(e) = r.expiry_s {
                put_varint(&mut body, e as u64);
            }
            // The payload is the rest of the frame.
            body.extend_from_slice(r.payload);
            T_RETAINED
        }
    };
    put_varint(out, body.len() as u64 + 1);
    out.push(ty);
    out.extend_from_slice(&body);
}

/// The hot path: written straight into `out`, no intermediate buffer.
fn encode_forward(fw: &Forward<'_>, out: &mut Vec<u8>) {
    let mut flags = fw.qos & 0x03;
    if fw.retain {
        flags |= F_RETAIN;
    }
    if !fw.properties.is_empty() {
        flags |= F_PROPS;
    }
    if fw.ack_token.is_some() {
        flags |= F_TOKEN;
    }
    if !fw.normal {
        flags |= F_NOT_NORMAL;
    }
    if !fw.groups.is_empty() {
        flags |= F_GROUPS;
    }
    if fw.expiry_s.is_some() {
        flags |= F_EXPIRY;
    }
    // Type and flags, then the lengths (the payload's is what the frame's leaves), then the origin.
    let origin = |o: &OriginRef| varint_len(o.shard as u64 + 1) + varint_len(o.session);
    let mut header = 2 + varint_len(fw.topic.len() as u64) + fw.origin.as_ref().map_or(1, origin);
    if let Some(t) = fw.ack_token {
        header += varint_len(t as u64);
    }
    if !fw.properties.is_empty() {
        header += varint_len(fw.properties.len() as u64);
    }
    if let Some(e) = fw.expiry_s {
        header += varint_len(e as u64);
    }
    if !fw.groups.is_empty() {
        header += varint_len(fw.groups.len() as u64);
        header += fw.groups.iter().map(|g| varint_len(g.len() as u64) + g.len()).sum::<usize>();
    }
    let len = header + fw.topic.len() + fw.payload.len() + fw.properties.len();
    put_varint(out, len as u64);
    out.push(T_FORWARD);
    out.push(flags);
    put_varint(out, fw.topic.len() as u64);
    // The origin's shard plus one (0: no origin, and no session follows).
    match fw.origin {
        Some(o) => {
            put_varint(out, o.shard as u64 + 1);
            put_varint(out, o.session);
        }
        None => out.push(0),
    }
    if let Some(t) = fw.ack_token {
        put_varint(out, t as u64);
    }
    if !fw.properties.is_empty() {
        put_varint(out, fw.properties.len() as u64);
    }
    if let Some(e) = fw.expiry_s {
        put_varint(out, e as u64);
    }
    if !fw.groups.is_empty() {
        put_varint(out, fw.groups.len() as u64);
        for g in &fw.groups {
            put_bytes(out, g.as_bytes());
        }
    }
    out.extend_from_slice(fw.topic.as_bytes());
    out.extend_from_slice(fw.properties);
    out.extend_from_slice(fw.payload);
}

fn put_identity(out: &mut Vec<u8>, id: &NodeIdentity) {
    put_bytes(out, id.name.0.as_bytes());
    put_bytes(out, id.addr.to_string().as_bytes());
    put_bytes(out, id.zone.as_bytes());
    put_bytes(out, id.region.as_bytes());
    out.extend_from_slice(&id.incarnation.to_le_bytes());
}

fn read_identity(r: &mut Reader<'_>) -> Result<NodeIdentity, LinkError> {
    let name = str(r)?;
    let addr = str(r)?.parse().map_err(|_| LinkError::Malformed("node address"))?;
    let zone = str(r)?;
    let region = str(r)?;
    let incarnation = u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
    if name.is_empty() {
        return Err(LinkError::Malformed("empty node name"));
    }
    Ok(NodeIdentity::new(name, addr, zone, region, incarnation))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` until it is complete, else the frame and the
/// bytes it took. Never panics, whatever the bytes.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, LinkError> {
    let mut r = Reader::new(buf);
    let len = match r.varint() {
        Ok(l) => l,
        Err(_) if buf.len() < 10 => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let len = usize::try_from(len).map_err(|_| LinkError::TooLong(usize::MAX))?;
    if len > MAX_FRAME {
        return Err(LinkError::TooLong(len));
    }
    if len == 0 {
        return Err(LinkError::Malformed("empty frame"));
    }
    let start = r.pos();
    let Some(end) = start.checked_add(len).filter(|e| *e <= buf.len()) else { return Ok(None) };
    let mut f = Reader::new(&buf[start..end]);
    let frame = match f.u8()? {
        T_HELLO => {
            if f.take(4)? != LINK_MAGIC {
                return Err(LinkError::BadMagic);
            }
            let version = u16::from_le_bytes(f.take(2)?.try_into().expect("2 bytes"));
            let identity = read_identity(&mut f)?;
            let nonce: [u8; 16] = f.take(16)?.try_into().expect("16 bytes");
            // Before version 4 a Hello ended here; such a peer is refused for its version.
            let registry_hash = if f.is_done() { "" } else { str(&mut f)? };
            Frame::Hello { version, identity, nonce, registry_hash }
        }
        T_PROOF => Frame::Proof { tag: bytes(&mut f)?.to_vec() },
        T_REFUSE => Frame::Refuse { reason: str(&mut f)? },
        T_FORWARD => {
            let flags = f.u8()?;
            if flags & 0x03 == 3 {
                return Err(LinkError::Malformed("forward flags"));
            }
            let topic_len = f.varint()? as usize;
            let origin = match f.varint()? {
                0 => None,
                s => Some(OriginRef {
                    shard: u16::try_from(s - 1).map_err(|_| LinkError::Malformed("origin shard"))?,
                    session: f.varint()?,
                }),
            };
            let ack_token = if flags & F_TOKEN != 0 {
                Some(u32::try_from(f.varint()?).map_err(|_| LinkError::Malformed("token"))?)
            } else {
                None
            };
            let props_len = if flags & F_PROPS != 0 { f.varint()? as usize } else { 0 };
            let expiry_s = if flags & F_EXPIRY != 0 { Some(u32_of(f.varint()?, "expiry")?) } else { None };
            let mut groups = Vec::new();
            if flags & F_GROUPS != 0 {
                let n = f.varint()?;
                for _ in 0..n {
                    // Each group takes at least one byte, so a lying count ends at the frame's end.
                    groups.push(str(&mut f)?);
                }
            }
            let topic = std::str::from_utf8(f.take(topic_len)?).map_err(|_| LinkError::Malformed("topic"))?;
            let properties = f.take(props_len)?;
            let payload = f.take(end - start - f.pos())?;
            Frame::Forward(Forward {
                qos: flags & 0x03,
                retain: flags & F_RETAIN != 0,
                topic,
                payload,
                properties,
                ack_token,
                normal: flags & F_NOT_NORMAL == 0,
                groups,
                expiry_s,
                origin,
            })
        }
        T_CONGESTION => {
            let shard = u16::try_from(f.varint()?).map_err(|_| LinkError::Malformed("origin shard"))?;
            let session = f.varint()?;
            let congested = match f.u8()? {
                0 => false,
                1 => true,
                _ => return Err(LinkError::Malformed("congestion flag")),
            };
            Frame::Congestion { origin: OriginRef { shard, session }, congested }
        }
        T_STORED => {
            let token = u32::try_from(f.varint()?).map_err(|_| LinkError::Malformed("token"))?;
            Frame::Stored { token, ok: f.u8()? != 0 }
        }
        T_RECEIVED => Frame::Received { seq: f.varint()? },
        T_INTEREST => Frame::Interest(f.take(len - 1)?),
        T_REGISTRY => Frame::Registry(f.take(len - 1)?),
        T_SESSION => {
            let start = f.pos();
            let n = f.varint()?;
            let n = usize::try_from(n).map_err(|_| LinkError::Malformed("session client id"))?;
            let client =
                std::str::from_utf8(f.take(n)?).map_err(|_| LinkError::Malformed("session client id"))?;
            let epoch = f.varint()?;
            let used = f.pos() - start;
            let rest = (len - 1).checked_sub(used).ok_or(LinkError::Malformed("session frame"))?;
            Frame::Session { client, epoch, state: f.take(rest)? }
        }
        T_SESSION_SETTLED => {
            let n = f.varint()?;
            let n = usize::try_from(n).map_err(|_| LinkError::Malformed("settled client id"))?;
            let client =
                std::str::from_utf8(f.take(n)?).map_err(|_| LinkError::Malformed("settled client id"))?;
            Frame::SessionSettled { client, epoch: f.varint()? }
        }
        T_RETAINED => {
            let flags = f.u8()?;
            if flags & !(0x03 | R_CLEAR | R_EXPIRY) != 0 || flags & 0x03 == 3 {
                return Err(LinkError::Malformed("retained flags"));
            }
            let stamp = f.varint()?;
            let node = str(&mut f)?;
            let topic = str(&mut f)?;
            let properties = bytes(&mut f)?;
            let expiry_s = if flags & R_EXPIRY != 0 { Some(u32_of(f.varint()?, "expiry")?) } else { None };
            let payload = f.take(end - start - f.pos())?;
            Frame::Retained(Retained {
                stamp,
                node,
                qos: flags & 0x03,
                topic,
                payload,
                properties,
                expiry_s,
                clear: flags & R_CLEAR != 0,
            })
        }
        t => return Err(LinkError::UnknownType(t)),
    };
    if !f.is_done() {
        return Err(LinkError::Malformed("trailing bytes"));
    }
    Ok(Some((frame, end)))
}

/// The whole frames of `buf`, back to back (as [`crate::ZoneEvent::Frames`] carries them), in order; an
/// error ends the iteration.
pub fn frames(buf: &[u8]) -> impl Iterator<Item = Result<Frame<'_>, LinkError>> + '_ {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at >= buf.len() {
            return None;
        }
        match decode(&buf[at..]) {
            Ok(Some((f, n))) => {
                at += n;
                Some(Ok(f))
            }
            Ok(None) => {
                failed = true;
                Some(Err(LinkError::Malformed("incomplete frame")))
            }
            Err(e) => {
                failed = true;
                Some(Err(e))
            }
        }
    })
}

/// What one side of a link opening does next.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Keep reading.
    Continue,
    /// The link is open with this peer.
    Open(NodeIdentity),
    /// Refused: send what `poll_transmit` has (a Refuse frame) and close. The error says why (log it).
    Refused(LinkError),
}

/// One side of a link's handshake, sans I/O: bytes in, bytes out.
pub struct Handshake {
    me: NodeIdentity,
    secret: Option<hmac::Key>,
    my_nonce: [u8; 16],
    peer: Option<(NodeIdentity, [u8; 16])>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
}

impl Handshake {
    /// `nonce` must be fresh for every link (the caller draws it from the OS: this core has no
    /// randomness of its own, so simulations replay).
    pub fn new(me: NodeIdentity, secret: Option<&[u8]>, nonce: [u8; 16]) -> Handshake {
        let mut out = Vec::new();
        encode(
            &Frame::Hello {
                version: LINK_VERSION,
                identity: me.clone(),
                nonce,
                registry_hash: REGISTRY_HASH,
            },
            &mut out,
        );
        Handshake {
            me,
            secret: secret.map(|s| hmac::Key::new(hmac::HMAC_SHA256, s)),
            my_nonce: nonce,
            peer: None,
            out,
            inbuf: Vec::new(),
        }
    }

    pub fn take_transmit(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The proof one side sends: over (sender's nonce, receiver's nonce, sender, receiver), so it cannot
    /// be replayed on another link or reflected back.
    fn proof(
        &self,
        from: &NodeIdentity,
        from_nonce: &[u8; 16],
        to: &NodeIdentity,
        to_nonce: &[u8; 16],
    ) -> Vec<u8> {
        let Some(key) = &self.secret else { return Vec::new() };
        let mut data = Vec::new();
        data.extend_from_slice(b"shardmq-link-v1");
        data.extend_from_slice(from_nonce);
        data.extend_from_slice(to_nonce);
        put_identity(&mut data, from);
        put_identity(&mut data, to);
        hmac::sign(key, &data).as_ref().to_vec()
    }

    fn refuse(&mut self, e: LinkError) -> HandshakeStep {
        encode(&Frame::Refuse { reason: &e.to_string() }, &mut self.out);
        HandshakeStep::Refused(e)
    }

    /// Bytes from the peer. Bytes after the handshake (the first data frames) stay in `leftover`.
    pub fn handle_bytes(&mut self, data: &[u8]) -> HandshakeStep {
        self.inbuf.extend_from_slice(data);
        loop {
            let (frame, used) = match decode(&self.inbuf) {
                Ok(Some((f, n))) => (owned(f), n),
                Ok(None) => return HandshakeStep::Continue,
                Err(e) => return self.refuse(e),
            };
            self.inbuf.drain(..used);
            match (frame, self.peer.clone()) {
                (OwnedHandshakeFrame::Refuse(reason), _) => {
                    return HandshakeStep::Refused(LinkError::Refused(reason));
                }
                (OwnedHandshakeFrame::Hello { version, identity, nonce, registry_hash }, None) => {
                    if version != LINK_VERSION {
                        return self.refuse(LinkError::Version(version));
                    }
                    if registry_hash != REGISTRY_HASH {
                        return self.refuse(LinkError::RegistryHash(registry_hash));
                    }
                    let tag = self.proof(&self.me, &self.my_nonce, &identity, &nonce);
                    encode(&Frame::Proof { tag }, &mut self.out);
                    self.peer = Some((identity, nonce));
                }
                (OwnedHandshakeFrame::Proof(tag), Some((peer, peer_nonce))) => {
                    let want = self.proof(&peer, &peer_nonce, &self.me, &self.my_nonce);
                    let ok = want.len() == tag.len()
                        && want.iter().zip(&tag).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
                    if !ok {
                        return self.refuse(LinkError::WrongSecret);
                    }
                    return HandshakeStep::Open(peer);
                }
                (OwnedHandshakeFrame::Hello { .. }, Some(_)) => {
                    return self.refuse(LinkError::Unexpected("second Hello"))
                }
                (OwnedHandshakeFrame::Proof(_), None) => {
                    return self.refuse(LinkError::Unexpected("Proof before Hello"))
                }
                (OwnedHandshakeFrame::Other(what), _) => return self.refuse(LinkError::Unexpected(what)),
            }
        }
    }

    /// Bytes received past the handshake (data frames the peer sent right after its proof).
    pub fn leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.inbuf)
    }
}

enum OwnedHandshakeFrame {
    Hello { version: u16, identity: NodeIdentity, nonce: [u8; 16], registry_hash: String },
    Proof(Vec<u8>),
    Refuse(String),
    Other(&'static str),
}

fn owned(f: Frame<'_>) -> OwnedHandshakeFrame {
    match f {
        Frame::Hello { version, identity, nonce, registry_hash } => {
            OwnedHandshakeFrame::Hello { version, identity, nonce, registry_hash: registry_hash.to_string() }
        }
        Frame::Proof { tag } => OwnedHandshakeFrame::Proof(tag),
        Frame::Refuse { reason } => OwnedHandshakeFrame::Refuse(reason.to_string()),
        Frame::Forward(_) => OwnedHandshakeFrame::Other("Forward"),
        Frame::Stored { .. } => OwnedHandshakeFrame::Other("Stored"),
        Frame::Received { .. } => OwnedHandshakeFrame::Other("Received"),
        Frame::Interest(_) => OwnedHandshakeFrame::Other("Interest"),
        Frame::Retained(_) => OwnedHandshakeFrame::Other("Retained"),
        Frame::Congestion { .. } => OwnedHandshakeFrame::Other("Congestion"),
        Frame::Registry(_) => OwnedHandshakeFrame::Other("Registry"),
        Frame::Session { .. } => OwnedHandshakeFrame::Other("Session"),
        Frame::SessionSettled { .. } => OwnedHandshakeFrame::Other("SessionSettled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(name: &str, port: u16) -> NodeIdentity {
        NodeIdentity::new(name, ([127, 0, 0, 1], port).into(), "z", "r", 7)
    }

    /// Runs two handshakes against each other; returns what each side ended with.
    fn pair(sa: Option<&[u8]>, sb: Option<&[u8]>) -> (HandshakeStep, HandshakeStep) {
        let mut a = Handshake::new(id("a", 1), sa, [1; 16]);
        let mut b = Handshake::new(id("b", 2), sb, [2; 16]);
        let (mut ra, mut rb) = (HandshakeStep::Continue, HandshakeStep::Continue);
        for _ in 0..4 {
            let to_b = a.take_transmit();
            let to_a = b.take_transmit();
            if ra == HandshakeStep::Continue && !to_a.is_empty() {
                ra = a.handle_bytes(&to_a);
            }
            if rb == HandshakeStep::Continue && !to_b.is_empty() {
                rb = b.handle_bytes(&to_b);
            }
        }
        (ra, rb)
    }

    #[test]
    fn framed_len_is_what_encode_writes() {
        for n in [0usize, 1, 126, 127, 128, 300, 20_000, 3 << 20] {
            let body = vec![7u8; n];
            let mut out = Vec::new();
            encode(&Frame::Registry(&body), &mut out);
            assert_eq!(framed_len(n), out.len(), "registry body {n}");
            for (client, epoch) in [("c", 0u64), ("a-longer-client-id", 1 << 40)] {
                out.clear();
                encode(&Frame::Session { client, epoch, state: &body }, &mut out);
                let session_body = varint_len(client.len() as u64) + client.len() + varint_len(epoch) + n;
                assert_eq!(framed_len(session_body), out.len(), "session {client} {epoch} {n}");
            }
        }
    }

    #[test]
    fn a_handshake_opens_with_the_same_secret_or_none() {
        assert_eq!(
            pair(Some(b"s"), Some(b"s")),
            (HandshakeStep::Open(id("b", 2)), HandshakeStep::Open(id("a", 1)))
        );
        assert_eq!(pair(None, None), (HandshakeStep::Open(id("b", 2)), HandshakeStep::Open(id("a", 1))));
    }

    #[test]
    fn another_secret_or_none_is_refused_on_both_sides() {
        for (sa, sb) in [(Some(&b"s"[..]), Some(&b"t"[..])), (Some(&b"s"[..]), None), (None, Some(&b"s"[..]))]
        {
            let (ra, rb) = pair(sa, sb);
            assert!(matches!(ra, HandshakeStep::Refused(_)), "{ra:?}");
            assert!(matches!(rb, HandshakeStep::Refused(_)), "{rb:?}");
        }
    }

    #[test]
    fn another_version_is_refused_with_a_reason() {
        let mut a = Handshake::new(id("a", 1), None, [1; 16]);
        let mut hello = Vec::new();
        encode(
            &Frame::Hello { version: 9, identity: id("b", 2), nonce: [0; 16], registry_hash: REGISTRY_HASH },
            &mut hello,
        );
        let _ = a.take_transmit();
        assert_eq!(a.handle_bytes(&hello), HandshakeStep::Refused(LinkError::Version(9)));
        let out = a.take_transmit();
        let (f, _) = decode(&out).unwrap().unwrap();
        assert!(matches!(f, Frame::Refuse { reason } if reason.contains('9')));
    }

    #[test]
    fn another_registry_hash_is_refused_with_a_reason() {
        let mut a = Handshake::new(id("a", 1), None, [1; 16]);
        let _ = a.take_transmit();
        let mut hello = Vec::new();
        let other = Frame::Hello {
            version: LINK_VERSION,
            identity: id("b", 2),
            nonce: [0; 16],
            registry_hash: "md5",
        };
        encode(&other, &mut hello);
        assert_eq!(a.handle_bytes(&hello), HandshakeStep::Refused(LinkError::RegistryHash("md5".into())));
        let out = a.take_transmit();
        assert!(
            matches!(decode(&out).unwrap().unwrap().0, Frame::Refuse { reason } if reason.contains("md5"))
        );
    }

    #[test]
    fn a_forward_costs_at_most_16_bytes_of_framing() {
        // Up to 128 shards and 2^21 sessions per shard, the origin takes at most 4 bytes.
        let far = Some(OriginRef { shard: 100, session: (1 << 21) - 1 });
        for (topic_len, payload_len, token, origin) in [
            (10, 64, None, None),
            (10, 64, None, Some(OriginRef { shard: 0, session: 1 })),
            (100, 1000, Some(5), Some(OriginRef { shard: 3, session: 500 })),
            (1000, 100_000, Some(1 << 27), far),
        ] {
            let topic = "t".repeat(topic_len);
            let payload = vec![7u8; payload_len];
            let fw = Forward {
                qos: 1,
                retain: true,
                topic: &topic,
                payload: &payload,
                properties: &[],
                ack_token: token,
                normal: true,
                groups: Vec::new(),
                expiry_s: None,
                origin,
            };
            let mut out = Vec::new();
            encode(&Frame::Forward(fw.clone()), &mut out);
            let framing = out.len() - topic_len - payload_len;
            assert!(framing <= 16, "{framing} bytes of framing");
            assert_eq!(decode(&out).unwrap().unwrap(), (Frame::Forward(fw), out.len()));
        }
    }

    #[test]
    fn frames_round_trip_and_incomplete_ones_wait() {
        let frames = vec![
            Frame::Hello { version: LINK_VERSION, identity: id("n", 5), nonce: [3; 16], registry_hash: "h" },
            Frame::Registry(b"\x08\x01c\x01"),
            Frame::Session { client: "c1", epoch: 7, state: b"state" },
            Frame::Session { client: "", epoch: 1, state: b"" },
            Frame::SessionSettled { client: "c1", epoch: 9 },
            Frame::Proof { tag: vec![1, 2, 3] },
            Frame::Refuse { reason: "no" },
            Frame::Forward(Forward {
                qos: 2,
                retain: false,
                topic: "a/b",
                payload: b"x",
                properties: &[1, 2],
                ack_token: Some(9),
                normal: true,
                groups: Vec::new(),
                expiry_s: None,
                origin: Some(OriginRef { shard: 2, session: u64::MAX }),
            }),
            Frame::Forward(Forward {
                qos: 1,
                retain: false,
                topic: "a/c",
                payload: b"",
                properties: &[],
                ack_token: None,
                normal: false,
                groups: vec!["$share/g1/a/+", "$share/g2/#"],
                expiry_s: Some(3600),
                origin: None,
            }),
            Frame::Congestion { origin: OriginRef { shard: 65535, session: 7 }, congested: true },
            Frame::Congestion { origin: OriginRef { shard: 0, session: 0 }, congested: false },
            Frame::Stored { token: 77, ok: false },
            Frame::Received { seq: 1 << 40 },
            Frame::Interest(b"\x02\x01"),
            Frame::Interest(b""),
            Frame::Retained(Retained {
                stamp: 1 << 50,
                node: "n1",
                qos: 1,
                topic: "r/t",
                payload: b"hello",
                properties: &[3],
                expiry_s: Some(60),
                clear: false,
            }),
            Frame::Retained(Retained {
                stamp: 5,
                node: "n2",
                qos: 0,
                topic: "r/t",
                payload: b"",
                properties: &[],
                expiry_s: None,
                clear: true,
            }),
        ];
        for f in frames {
            let mut out = Vec::new();
            encode(&f, &mut out);
            for cut in 0..out.len() {
                assert_eq!(decode(&out[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
            assert_eq!(decode(&out), Ok(Some((f, out.len()))));
        }
    }

    #[test]
    fn extended_forwards_and_retained_updates_round_trip_through_the_cost_check() {
        // A forward with groups and an expiry still decodes to exactly itself, and its framing grows only
        // by what it carries.
        let fw = Forward {
            qos: 0,
            retain: false,
            topic: "t",
            payload: b"p",
            properties: &[],
            ack_token: None,
            normal: true,
            groups: vec!["$share/g/t"],
            expiry_s: Some(10),
            origin: None,
        };
        let mut out = Vec::new();
        encode(&Frame::Forward(fw.clone()), &mut out);
        assert!(out.len() - 2 - "$share/g/t".len() <= 16 + 4);
        assert_eq!(decode(&out), Ok(Some((Frame::Forward(fw), out.len()))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b);
            // The same bytes behind each frame type, with a valid length, reach every decoder.
            for ty in 1..=11u8 {
                let mut framed = Vec::new();
                put_varint(&mut framed, b.len() as u64 + 1);
                framed.push(ty);
                framed.extend_from_slice(&b);
                let _ = decode(&framed);
            }
            let mut h = Handshake::new(id("a", 1), Some(b"s"), [1; 16]);
            let _ = h.handle_bytes(&b);
        }
    }
}
