//! The session registry's messages between nodes ([`crate::registrar`]), carried in a
//! [`super::Frame::Registry`] link frame: its body is one or more messages back to back (a node sends
//! those for one peer together), each `type u8 | fields`, with the encoding conventions of the other
//! frames (varints, length-prefixed strings, flag bytes).
//!
//! - `Register` (1): `request | client | flags (clean start 0x01, will 0x02, answered ahead 0x04) | stamp |
//!   known epoch | [will]`
//! - `Granted` (2): `request | client | epoch | flags (previous 0x01) | [previous holder | previous epoch]`
//! - `Disconnect` (3): `request | client | epoch | ended u8`
//! - `DisconnectAck` (4): `request`
//! - `EndSession` (5): `client | epoch | successor | successor epoch | discard u8`
//! - `Sync` (6) and `Replicate` (7): a registration, `client | holder | epoch | stamp | flags (connected
//!   0x01, will 0x02) | [will]`
//! - `Forget` (8): the ended registration, as above
//! - `Replicated` (9): `client | epoch`
//! - `Held` (10): a registration, as `Sync`
//! - `Copy` (11): a registration, as `Replicate`
//! - `Superseded` (12): `request | client | successor | successor epoch`
//!
//! A will is `flags (qos in 0x03, retain 0x04) | delay_s | topic | payload`. An epoch is at least 1.

use std::sync::Arc;

use super::{bytes, put_bytes, put_varint, str, u32_of, LinkError};
use crate::bytes::Reader;
use crate::registry::{Registration, WillInfo};
use crate::retained::HlcStamp;
use crate::NodeName;

/// Names one request of a node (a registration or a disconnect) in its answer. Unique per life of the
/// requesting node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// The registration a grant replaced, held by another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Previous {
    pub holder: NodeName,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryMsg {
    /// To the owner: a client connected at the sender.
    Register {
        request: RequestId,
        client: Arc<str>,
        clean_start: bool,
        stamp: HlcStamp,
        will: Option<Box<WillInfo>>,
        /// The highest epoch of `client` the sender knows of (0: none): the grant goes above it.
        known: u64,
        /// The connection was answered before its registration (a clean start without a will whose
        /// session ends with it): nothing waits for the grant.
        ahead: bool,
        /// Such a connection that ended before its registration was sent: an owner with no
        /// registration of the id, or a newer one, only acknowledges it (`DisconnectAck`).
        ended: bool,
    },
    /// From the owner: the connection holds `epoch`; `previous` held the session elsewhere.
    Granted {
        request: RequestId,
        client: Arc<str>,
        epoch: u64,
        previous: Option<Previous>,
    },
    /// To the owner: the client of `epoch` disconnected; its session is gone when `ended`.
    Disconnect {
        request: RequestId,
        client: Arc<str>,
        epoch: u64,
        ended: bool,
    },
    DisconnectAck {
        request: RequestId,
    },
    /// To a holder: its sessions of `client` up to `epoch` are superseded by `successor`'s
    /// `successor_epoch` (a takeover, or the loser of a conflict); `discard` when the successor started
    /// clean (nothing to hand over).
    EndSession {
        client: Arc<str>,
        epoch: u64,
        successor: NodeName,
        successor_epoch: u64,
        discard: bool,
    },
    /// A registration for its owners to merge, conflicts reported to the loser: a holder re-registering,
    /// an owner handing over what moved, the sides of a healed partition. From the holder itself, it
    /// is also its word on whether the client is connected.
    Sync(Registration),
    /// The primary owner's copy of a registration it granted to its replica, merged silently (the
    /// primary dealt with conflicts); the grant's answers wait for the replica's `Replicated`.
    Replicate(Registration),
    /// The primary owner's copy to its replica that nothing waits for, merged like `Replicate` but not
    /// acknowledged: a change of a registration (disconnected, will published, handed over), or a new
    /// registration granted to another node, sent ahead of the grant, when it took no session from
    /// elsewhere (a takeover waits for the replica's `Replicated`, so that it survives the primary's
    /// loss; a connection the primary holds itself waits too, so that its will does).
    Copy(Registration),
    /// A holder re-registering a session restored from its log: like `Sync`, but it says nothing about
    /// the connection the session had (the holder's previous life had it), so it changes neither
    /// `connected` nor the will of the registration the owners have.
    Held(Registration),
    /// This registration ended (its session is gone), and any older one of its id with it.
    Forget(Registration),
    /// From the replica: it has the primary's copy of `client`'s registration of `epoch`.
    Replicated {
        client: Arc<str>,
        epoch: u64,
    },
    /// From the owner: the connection of `request`, answered ahead, is older (by clock) than
    /// `successor`'s registration of `successor_epoch`, which the owner had already: it registered
    /// nothing, and the connection ends.
    Superseded {
        request: RequestId,
        client: Arc<str>,
        successor: NodeName,
        successor_epoch: u64,
    },
}

const M_REGISTER: u8 = 1;
const M_GRANTED: u8 = 2;
const M_DISCONNECT: u8 = 3;
const M_DISCONNECT_ACK: u8 = 4;
const M_END_SESSION: u8 = 5;
const M_SYNC: u8 = 6;
const M_REPLICATE: u8 = 7;
const M_FORGET: u8 = 8;
const M_REPLICATED: u8 = 9;
const M_HELD: u8 = 10;
const M_COPY: u8 = 11;
const M_SUPERSEDED: u8 = 12;

const F_CLEAN: u8 = 0x01;
const F_WILL: u8 = 0x02;
const F_AHEAD: u8 = 0x04;
const F_ENDED: u8 = 0x08;
const F_PREVIOUS: u8 = 0x01;
const F_CONNECTED: u8 = 0x01;
const W_RETAIN: u8 = 0x04;

/// Appends the body of a `Registry` frame carrying `m` to `out`.
pub fn encode(m: &RegistryMsg, out: &mut Vec<u8>) {
    match m {
        RegistryMsg::Register { request, client, clean_start, stamp, will, known, ahead, ended } => {
            out.push(M_REGISTER);
            put_varint(out, request.0);
            put_bytes(out, client.as_bytes());
            out.push(
                if *clean_start { F_CLEAN } else { 0 }
                    | if will.is_some() { F_WILL } else { 0 }
                    | if *ahead { F_AHEAD } else { 0 }
                    | if *ended { F_ENDED } else { 0 },
            );
            put_varint(out, stamp.0);
            put_varint(out, *known);
            if let Some(w) = will {
                put_will(out, w);
            }
        }
        RegistryMsg::Granted { request, client, epoch, previous } => {
            out.push(M_GRANTED);
            put_varint(out, request.0);
            put_bytes(out, client.as_bytes());
            put_varint(out, *epoch);
            match previous {
                Some(p) => {
                    out.push(F_PREVIOUS);
                    put_bytes(out, p.holder.0.as_bytes());
                    put_varint(out, p.epoch);
                }
                None => out.push(0),
            }
        }
        RegistryMsg::Disconnect { request, client, epoch, ended } => {
            out.push(M_DISCONNECT);
            put_varint(out, request.0);
            put_bytes(out, client.as_bytes());
            put_varint(out, *epoch);
            out.push(*ended as u8);
        }
        RegistryMsg::DisconnectAck { request } => {
            out.push(M_DISCONNECT_ACK);
            put_varint(out, request.0);
        }
        RegistryMsg::EndSession { client, epoch, successor, successor_epoch, discard } => {
            out.push(M_END_SESSION);
            put_bytes(out, client.as_bytes());
            put_varint(out, *epoch);
            put_bytes(out, successor.0.as_bytes());
            put_varint(out, *successor_epoch);
            out.push(*discard as u8);
        }
        RegistryMsg::Sync(r) => {
            out.push(M_SYNC);
            put_registration(out, r);
        }
        RegistryMsg::Replicate(r) => {
            out.push(M_REPLICATE);
            put_registration(out, r);
        }
        RegistryMsg::Held(r) => {
            out.push(M_HELD);
            put_registration(out, r);
        }
        RegistryMsg::Copy(r) => {
            out.push(M_COPY);
            put_registration(out, r);
        }
        RegistryMsg::Forget(r) => {
            out.push(M_FORGET);
            put_registration(out, r);
        }
        RegistryMsg::Replicated { client, epoch } => {
            out.push(M_REPLICATED);
            put_bytes(out, client.as_bytes());
            put_varint(out, *epoch);
        }
        RegistryMsg::Superseded { request, client, successor, successor_epoch } => {
            out.push(M_SUPERSEDED);
            put_varint(out, request.0);
            put_bytes(out, client.as_bytes());
            put_bytes(out, successor.0.as_bytes());
            put_varint(out, *successor_epoch);
        }
    }
}

/// Bodies above this are closed and another frame started (far below a link frame's limit).
pub const BATCH_BYTES: usize = 64 * 1024;

/// Whole link frames ([`super::Frame::Registry`]) carrying `msgs` in order, as few as [`BATCH_BYTES`]
/// allows, ready for [`crate::Zone::send`]; with the number of messages in each.
pub fn frames<'a>(msgs: impl IntoIterator<Item = &'a RegistryMsg>) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut body = Vec::with_capacity(256);
    let mut n = 0;
    for m in msgs {
        encode(m, &mut body);
        n += 1;
        if body.len() >= BATCH_BYTES {
            out.push((whole(&body), n));
            body.clear();
            n = 0;
        }
    }
    if n > 0 {
        out.push((whole(&body), n));
    }
    out
}

fn whole(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    super::encode(&super::Frame::Registry(body), &mut out);
    out
}

fn put_will(out: &mut Vec<u8>, w: &WillInfo) {
    out.push((w.qos & 0x03) | if w.retain { W_RETAIN } else { 0 });
    put_varint(out, w.delay_s as u64);
    put_bytes(out, w.topic.as_bytes());
    put_bytes(out, &w.payload);
}

fn put_registration(out: &mut Vec<u8>, r: &Registration) {
    put_bytes(out, r.client.as_bytes());
    put_bytes(out, r.holder.0.as_bytes());
    put_varint(out, r.epoch);
    put_varint(out, r.stamp.0);
    out.push(if r.connected { F_CONNECTED } else { 0 } | if r.will.is_some() { F_WILL } else { 0 });
    if let Some(w) = &r.will {
        put_will(out, w);
    }
}

/// Decodes a body of exactly one message. Never panics, whatever the bytes.
pub fn decode(body: &[u8]) -> Result<RegistryMsg, LinkError> {
    let (m, used) = decode_next(body)?;
    if used != body.len() {
        return Err(LinkError::Malformed("trailing bytes"));
    }
    Ok(m)
}

/// The messages of a `Registry` frame's body, in order; an undecodable one ends it (what follows it
/// cannot be told apart). Never panics, whatever the bytes.
pub fn messages(body: &[u8]) -> impl Iterator<Item = Result<RegistryMsg, LinkError>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= body.len() {
            return None;
        }
        match decode_next(&body[at..]) {
            Ok((m, used)) => {
                at += used;
                Some(Ok(m))
            }
            Err(e) => {
                at = body.len();
                Some(Err(e))
            }
        }
    })
}

/// The message at the front of `body`, and how many bytes it took.
fn decode_next(body: &[u8]) -> Result<(RegistryMsg, usize), LinkError> {
    let mut r = Reader::new(body);
    let m = match r.u8()? {
        M_REGISTER => {
            let request = RequestId(r.varint()?);
            let client = client(&mut r)?;
            let flags = r.u8()?;
            if flags & !(F_CLEAN | F_WILL | F_AHEAD | F_ENDED) != 0 {
                return Err(LinkError::Malformed("register flags"));
            }
            let stamp = HlcStamp(r.varint()?);
            let known = r.varint()?;
            let will = if flags & F_WILL != 0 { Some(read_will(&mut r)?) } else { None };
            let (clean_start, ahead, ended) =
                (flags & F_CLEAN != 0, flags & F_AHEAD != 0, flags & F_ENDED != 0);
            RegistryMsg::Register { request, client, clean_start, stamp, will, known, ahead, ended }
        }
        M_GRANTED => {
            let request = RequestId(r.varint()?);
            let client = client(&mut r)?;
            let epoch = epoch(&mut r)?;
            let previous = match r.u8()? {
                0 => None,
                F_PREVIOUS => Some(Previous { holder: node(&mut r)?, epoch: self::epoch(&mut r)? }),
                _ => return Err(LinkError::Malformed("granted flags")),
            };
            RegistryMsg::Granted { request, client, epoch, previous }
        }
        M_DISCONNECT => RegistryMsg::Disconnect {
            request: RequestId(r.varint()?),
            client: client(&mut r)?,
            epoch: epoch(&mut r)?,
            ended: flag(&mut r)?,
        },
        M_DISCONNECT_ACK => RegistryMsg::DisconnectAck { request: RequestId(r.varint()?) },
        M_END_SESSION => RegistryMsg::EndSession {
            client: client(&mut r)?,
            epoch: epoch(&mut r)?,
            successor: node(&mut r)?,
            successor_epoch: epoch(&mut r)?,
            discard: flag(&mut r)?,
        },
        M_SYNC => RegistryMsg::Sync(read_registration(&mut r)?),
        M_REPLICATE => RegistryMsg::Replicate(read_registration(&mut r)?),
        M_HELD => RegistryMsg::Held(read_registration(&mut r)?),
        M_COPY => RegistryMsg::Copy(read_registration(&mut r)?),
        M_FORGET => RegistryMsg::Forget(read_registration(&mut r)?),
        M_REPLICATED => RegistryMsg::Replicated { client: client(&mut r)?, epoch: epoch(&mut r)? },
        M_SUPERSEDED => RegistryMsg::Superseded {
            request: RequestId(r.varint()?),
            client: client(&mut r)?,
            successor: node(&mut r)?,
            successor_epoch: epoch(&mut r)?,
        },
        _ => return Err(LinkError::Malformed("registry message type")),
    };
    Ok((m, r.pos()))
}

fn client(r: &mut Reader<'_>) -> Result<Arc<str>, LinkError> {
    Ok(str(r)?.into())
}

fn node(r: &mut Reader<'_>) -> Result<NodeName, LinkError> {
    let s = str(r)?;
    if s.is_empty() {
        return Err(LinkError::Malformed("empty node name"));
    }
    Ok(NodeName(s.into()))
}

fn epoch(r: &mut Reader<'_>) -> Result<u64, LinkError> {
    match r.varint()? {
        0 => Err(LinkError::Malformed("epoch 0")),
        e => Ok(e),
    }
}

fn flag(r: &mut Reader<'_>) -> Result<bool, LinkError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(LinkError::Malformed("flag")),
    }
}

fn read_will(r: &mut Reader<'_>) -> Result<Box<WillInfo>, LinkError> {
    let flags = r.u8()?;
    if flags & !(0x03 | W_RETAIN) != 0 || flags & 0x03 == 3 {
        return Err(LinkError::Malformed("will flags"));
    }
    let delay_s = u32_of(r.varint()?, "will delay")?;
    let topic = str(r)?.into();
    let payload = bytes(r)?.into();
    Ok(Box::new(WillInfo { topic, payload, qos: flags & 0x03, retain: flags & W_RETAIN != 0, delay_s }))
}

fn read_registration(r: &mut Reader<'_>) -> Result<Registration, LinkError> {
    let client = client(r)?;
    let holder = node(r)?;
    let epoch = epoch(r)?;
    let stamp = HlcStamp(r.varint()?);
    let flags = r.u8()?;
    if flags & !(F_CONNECTED | F_WILL) != 0 {
        return Err(LinkError::Malformed("registration flags"));
    }
    let will = if flags & F_WILL != 0 { Some(read_will(r)?) } else { None };
    Ok(Registration { client, holder, epoch, stamp, connected: flags & F_CONNECTED != 0, will })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{self, Frame};
    use proptest::prelude::*;

    fn n(s: &str) -> NodeName {
        NodeName(s.into())
    }

    /// The one frame that carries `m` alone.
    fn frame(m: &RegistryMsg) -> Vec<u8> {
        let mut f = frames([m]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].1, 1);
        f.remove(0).0
    }

    fn will() -> Box<WillInfo> {
        Box::new(WillInfo {
            topic: "status/dev-1".into(),
            payload: Arc::from(&b"offline"[..]),
            qos: 2,
            retain: true,
            delay_s: 30,
        })
    }

    fn samples() -> Vec<RegistryMsg> {
        let reg = |will| Registration {
            client: "dev-1".into(),
            holder: n("node-a"),
            epoch: 7,
            stamp: HlcStamp::new(1_700_000_000_000, 3),
            connected: true,
            will,
        };
        vec![
            RegistryMsg::Register {
                request: RequestId(1),
                client: "dev-1".into(),
                clean_start: true,
                stamp: HlcStamp(u64::MAX),
                will: Some(will()),
                known: 41,
                ahead: false,
                ended: false,
            },
            RegistryMsg::Register {
                request: RequestId(u64::MAX),
                client: "".into(),
                clean_start: false,
                stamp: HlcStamp(0),
                will: None,
                known: 0,
                ahead: false,
                ended: false,
            },
            RegistryMsg::Register {
                request: RequestId(5),
                client: "dev-2".into(),
                clean_start: true,
                stamp: HlcStamp(77),
                will: None,
                known: 3,
                ahead: true,
                ended: false,
            },
            RegistryMsg::Register {
                request: RequestId(6),
                client: "dev-2".into(),
                clean_start: true,
                stamp: HlcStamp(78),
                will: None,
                known: 0,
                ahead: true,
                ended: true,
            },
            RegistryMsg::Granted {
                request: RequestId(2),
                client: "dev-1".into(),
                epoch: 3,
                previous: Some(Previous { holder: n("node-b"), epoch: 2 }),
            },
            RegistryMsg::Granted { request: RequestId(2), client: "dev-1".into(), epoch: 1, previous: None },
            RegistryMsg::Disconnect { request: RequestId(9), client: "x".into(), epoch: 4, ended: true },
            RegistryMsg::Disconnect { request: RequestId(9), client: "x".into(), epoch: 4, ended: false },
            RegistryMsg::DisconnectAck { request: RequestId(9) },
            RegistryMsg::EndSession {
                client: "dev-1".into(),
                epoch: 2,
                successor: n("node-c"),
                successor_epoch: 3,
                discard: true,
            },
            RegistryMsg::Sync(reg(Some(will()))),
            RegistryMsg::Replicate(Registration { connected: false, ..reg(None) }),
            RegistryMsg::Forget(Registration { connected: false, epoch: 12, ..reg(None) }),
            RegistryMsg::Replicated { client: "dev-1".into(), epoch: 12 },
            RegistryMsg::Held(Registration { connected: false, ..reg(None) }),
            RegistryMsg::Copy(reg(Some(will()))),
            RegistryMsg::Superseded {
                request: RequestId(8),
                client: "dev-2".into(),
                successor: n("node-b"),
                successor_epoch: 4,
            },
        ]
    }

    #[test]
    fn messages_round_trip_through_a_link_frame() {
        for m in samples() {
            let bytes = frame(&m);
            let mut frames = link::frames(&bytes);
            let Some(Ok(Frame::Registry(body))) = frames.next() else {
                panic!("{m:?}: not a registry frame")
            };
            assert!(frames.next().is_none());
            assert_eq!(decode(body), Ok(m));
        }
    }

    #[test]
    fn several_messages_share_a_frame_and_come_out_in_order() {
        let msgs = samples();
        let one = frames(&msgs);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].1, msgs.len() as u64);
        let Some(Ok(Frame::Registry(body))) = link::frames(&one[0].0).next() else { panic!("a frame") };
        let got: Vec<RegistryMsg> = messages(body).map(|m| m.expect("decodes")).collect();
        assert_eq!(got, msgs);
        // A damaged message ends the frame: those before it come out, then the error, then nothing.
        let mut cut = body.to_vec();
        let first = {
            let mut b = Vec::new();
            encode(&msgs[0], &mut b);
            b.len()
        };
        cut[first] = 0xEE;
        let got: Vec<_> = messages(&cut).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Ok(msgs[0].clone()));
        assert!(got[1].is_err());
        // A long run is split into frames of at most about BATCH_BYTES, every message kept, in order.
        let big = msgs.iter().max_by_key(|m| frame(m).len()).expect("samples");
        let many: Vec<RegistryMsg> = (0..5_000).map(|_| big.clone()).collect();
        assert!(frame(big).len() * 5_000 > 2 * BATCH_BYTES);
        let split = frames(&many);
        assert!(split.len() > 1 && split.iter().all(|(f, _)| f.len() < BATCH_BYTES + 1024));
        assert_eq!(split.iter().map(|(_, n)| n).sum::<u64>(), 5_000);
        let back: Vec<RegistryMsg> = split
            .iter()
            .flat_map(|(f, _)| match link::frames(f).next() {
                Some(Ok(Frame::Registry(body))) => {
                    messages(body).map(|m| m.expect("decodes")).collect::<Vec<_>>()
                }
                _ => panic!("a registry frame"),
            })
            .collect();
        assert_eq!(back, many);
    }

    #[test]
    fn truncated_or_altered_messages_are_errors() {
        for m in samples() {
            let mut body = Vec::new();
            encode(&m, &mut body);
            for cut in 0..body.len() {
                assert!(decode(&body[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = body.clone();
            longer.push(0);
            assert_eq!(decode(&longer), Err(LinkError::Malformed("trailing bytes")));
        }
        assert!(decode(&[0]).is_err(), "unknown type");
        assert!(decode(&[M_FORGET, 1, b'c', 1, b'h', 0, 0, 0]).is_err(), "epoch 0");
        assert!(decode(&[M_REPLICATED, 1, b'c', 0]).is_err(), "epoch 0");
        assert!(decode(&[
            M_DISCONNECT_ACK,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
            0x01
        ])
        .is_err());
        // A will with QoS 3 and a registration flag that does not exist.
        let mut body = Vec::new();
        encode(
            &RegistryMsg::Sync(Registration {
                client: "c".into(),
                holder: n("h"),
                epoch: 1,
                stamp: HlcStamp(1),
                connected: true,
                will: Some(will()),
            }),
            &mut body,
        );
        let flags_at = 1 + 2 + 2 + 1 + 1;
        assert_eq!(body[flags_at], F_CONNECTED | F_WILL);
        let mut bad = body.clone();
        bad[flags_at] |= 0x80;
        assert_eq!(decode(&bad), Err(LinkError::Malformed("registration flags")));
        let mut bad = body.clone();
        bad[flags_at + 1] = 0x03;
        assert_eq!(decode(&bad), Err(LinkError::Malformed("will flags")));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(b in proptest::collection::vec(any::<u8>(), 0..120), ty in 0u8..12) {
            let _ = decode(&b);
            let mut typed = vec![ty];
            typed.extend_from_slice(&b);
            let _ = decode(&typed);
        }
    }
}
