//! The shard's record types and their payload encoding: a small, explicit little-endian format (fixed
//! width integers, `u32` length before every string and byte string), versioned through the log's
//! segment format. Decoding never trusts a length: every read is bounds-checked and a bad record is an
//! error naming what was wrong, never a panic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_storage::RecordType;
use shardmq_wire::{Protocol, QoS, SubOptions};

use crate::core::msg::{Msg, MsgProps};

/// A persistent session: client id, protocol, expiry, will and subscriptions. The latest version wins.
pub const SESSION: RecordType = RecordType(1);
/// A session ended (expired, clean start, or no longer persistent): drop everything it had.
pub const SESSION_END: RecordType = RecordType(2);
/// A message and the persistent sessions of this shard it was queued for, each with its packet id.
pub const MESSAGE: RecordType = RecordType(3);
/// A session is done with a message (acknowledged, refused, expired or dropped from a full queue).
pub const DONE: RecordType = RecordType(4);
/// QoS 2 to a client: PUBREC received, PUBREL sent; after a restart PUBREL is resent, not the PUBLISH.
pub const RELEASED: RecordType = RecordType(5);
/// QoS 2 from a client: PUBLISH routed and PUBREC sent; a resend of the same packet id is not routed again.
pub const INBOUND_QOS2: RecordType = RecordType(6);
/// QoS 2 from a client: PUBREL received; the packet id is free again.
pub const INBOUND_QOS2_DONE: RecordType = RecordType(7);
/// A retained message (written by the topic's owner shard).
pub const RETAIN: RecordType = RecordType(8);
/// A retained message was cleared.
pub const RETAIN_DELETE: RecordType = RecordType(9);
/// One subscription of a stored session added, changed or removed, on top of the session's latest
/// SESSION record (its `base` version): O(1) log bytes per SUBSCRIBE instead of the whole record.
pub const SUB: RecordType = RecordType(10);

/// Names for `shardmq inspect`.
pub fn type_name(t: RecordType) -> &'static str {
    match t {
        SESSION => "session",
        SESSION_END => "session_end",
        MESSAGE => "message",
        DONE => "done",
        RELEASED => "released",
        INBOUND_QOS2 => "inbound_qos2",
        INBOUND_QOS2_DONE => "inbound_qos2_done",
        RETAIN => "retain",
        RETAIN_DELETE => "retain_delete",
        SUB => "subscription",
        _ => "unknown",
    }
}

/// Converts between the monotonic clock the core runs on and Unix milliseconds, which is what deadlines
/// must be stored as to mean anything after a restart.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    pub base: Instant,
    pub base_unix_ms: u64,
}

impl WallClock {
    pub fn unix_ms(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.base) {
            Some(d) => self.base_unix_ms.saturating_add(d.as_millis() as u64),
            None => self.base_unix_ms.saturating_sub(self.base.duration_since(at).as_millis() as u64),
        }
        .max(1)
    }

    /// The instant of a stored deadline; one already past is "now" (`base`).
    pub fn instant(&self, unix_ms: u64) -> Instant {
        self.base + Duration::from_millis(unix_ms.saturating_sub(self.base_unix_ms))
    }
}

#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.u8(1).str(s),
            None => self.u8(0),
        }
    }
}

pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

pub type DecResult<T> = Result<T, String>;

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> DecResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("truncated: {n} bytes wanted at offset {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> DecResult<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> DecResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    pub fn u32(&mut self) -> DecResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> DecResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn bytes(&mut self) -> DecResult<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> DecResult<&'a str> {
        std::str::from_utf8(self.bytes()?).map_err(|e| format!("invalid UTF-8: {e}"))
    }
    pub fn opt_str(&mut self) -> DecResult<Option<Box<str>>> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.str()?.into()),
        })
    }
    pub fn qos(&mut self) -> DecResult<QoS> {
        let v = self.u8()?;
        QoS::from_u8(v).ok_or_else(|| format!("invalid QoS {v}"))
    }
    pub fn bool(&mut self) -> DecResult<bool> {
        Ok(self.u8()? != 0)
    }
    /// A count of items that each take at least `min_item` bytes: bounded by what is left, so a damaged
    /// count cannot make the decoder reserve gigabytes.
    pub fn count(&mut self, min_item: usize) -> DecResult<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() - self.pos {
            return Err(format!("count {n} exceeds the record"));
        }
        Ok(n)
    }
    /// Bytes consumed so far.
    /// Bytes not read yet (a record may end before fields later builds added).
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn end(&self) -> DecResult<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.buf.len() - self.pos))
        }
    }
}

pub fn put_protocol(e: &mut Enc, p: Protocol) {
    e.u8(match p {
        Protocol::V31 => 3,
        Protocol::V311 => 4,
        Protocol::V5 => 5,
    });
}

pub fn get_protocol(d: &mut Dec<'_>) -> DecResult<Protocol> {
    match d.u8()? {
        3 => Ok(Protocol::V31),
        4 => Ok(Protocol::V311),
        5 => Ok(Protocol::V5),
        v => Err(format!("invalid protocol level {v}")),
    }
}

pub fn put_sub_options(e: &mut Enc, o: SubOptions) {
    let bits = o.qos as u8
        | (o.no_local as u8) << 2
        | (o.retain_as_published as u8) << 3
        | (o.retain_handling & 3) << 4;
    e.u8(bits);
}

pub fn get_sub_options(d: &mut Dec<'_>) -> DecResult<SubOptions> {
    let b = d.u8()?;
    let qos = QoS::from_u8(b & 3).ok_or_else(|| format!("invalid subscription options {b:#x}"))?;
    Ok(SubOptions {
        qos,
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: (b >> 4) & 3,
    })
}

pub fn put_props(e: &mut Enc, p: Option<&MsgProps>) {
    let Some(p) = p else {
        e.u8(0);
        return;
    };
    e.u8(1);
    e.u8(p.payload_format_indicator.map_or(0xff, |v| v));
    e.opt_str(p.content_type.as_deref());
    e.opt_str(p.response_topic.as_deref());
    match &p.correlation_data {
        Some(c) => e.u8(1).bytes(c),
        None => e.u8(0),
    };
    e.u32(p.user_properties.len() as u32);
    for (k, v) in &p.user_properties {
        e.str(k).str(v);
    }
}

pub fn get_props(d: &mut Dec<'_>) -> DecResult<Option<Box<MsgProps>>> {
    if d.u8()? == 0 {
        return Ok(None);
    }
    let pfi = d.u8()?;
    let content_type = d.opt_str()?;
    let response_topic = d.opt_str()?;
    let correlation_data = match d.u8()? {
        0 => None,
        _ => Some(d.bytes()?.into()),
    };
    let n = d.count(8)?;
    let mut user_properties = Vec::with_capacity(n);
    for _ in 0..n {
        user_properties.push((d.str()?.into(), d.str()?.into()));
    }
    Ok(Some(Box::new(MsgProps {
        payload_format_indicator: (pfi != 0xff).then_some(pfi),
        content_type,
        response_topic,
        correlation_data,
        user_properties,
    })))
}

/// Topic, payload, QoS, retain flag, expiry and properties of a message.
pub fn put_msg(e: &mut Enc, m: &Msg, clock: &WallClock) {
    e.str(&m.topic).bytes(&m.payload).u8(m.qos as u8).u8(m.retain as u8);
    e.u64(m.expires_at.map_or(0, |t| clock.unix_ms(t)));
    put_props(e, m.props.as_deref());
}

pub fn get_msg(d: &mut Dec<'_>, clock: &WallClock) -> DecResult<Msg> {
    let topic = d.str()?.into();
    let payload = d.bytes()?.into();
    let qos = d.qos()?;
    let retain = d.bool()?;
    let expires = d.u64()?;
    let props = get_props(d)?;
    Ok(Msg {
        topic,
        payload,
        qos,
        retain,
        expires_at: (expires != 0).then(|| clock.instant(expires)),
        props,
        origin: None,
    })
}

/// A retained message as its record stores it (the store encodes it in place with `put_msg`).
#[cfg(test)]
pub fn retain_record(m: &Msg, clock: &WallClock) -> Vec<u8> {
    let mut e = Enc::default();
    put_msg(&mut e, m, clock);
    e.0
}

/// Whether a stored retained message is the one currently held for its topic (compaction liveness).
pub fn same_retained(payload: &[u8], current: &Arc<Msg>, clock: &WallClock) -> bool {
    let mut d = Dec::new(payload);
    match get_msg(&mut d, clock) {
        Ok(m) => m.payload == current.payload && m.qos == current.qos && m.props == current.props,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> WallClock {
        WallClock { base: Instant::now(), base_unix_ms: 1_800_000_000_000 }
    }

    #[test]
    fn messages_round_trip_with_every_property() {
        let c = clock();
        let m = Msg {
            topic: "a/b".into(),
            payload: b"xyz".to_vec().into(),
            qos: QoS::ExactlyOnce,
            retain: true,
            expires_at: Some(c.base + Duration::from_secs(30)),
            props: Some(Box::new(MsgProps {
                payload_format_indicator: Some(1),
                content_type: Some("text/plain".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(b"c".to_vec().into()),
                user_properties: vec![("k".into(), "v".into())],
            })),
            origin: None,
        };
        let buf = retain_record(&m, &c);
        let mut d = Dec::new(&buf);
        let back = get_msg(&mut d, &c).unwrap();
        d.end().unwrap();
        assert_eq!(back.topic, m.topic);
        assert_eq!(back.payload, m.payload);
        assert_eq!(back.qos, m.qos);
        assert!(back.retain);
        assert_eq!(back.props, m.props);
        assert_eq!(back.expires_at, m.expires_at);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let c = clock();
        let m = Msg {
            topic: "t".into(),
            payload: vec![7; 20].into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            expires_at: None,
            props: Some(Box::new(MsgProps {
                user_properties: vec![("a".into(), "b".into())],
                ..Default::default()
            })),
            origin: None,
        };
        let buf = retain_record(&m, &c);
        for n in 0..buf.len() {
            assert!(get_msg(&mut Dec::new(&buf[..n]), &c).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn damaged_counts_and_values_are_refused() {
        let mut e = Enc::default();
        e.u32(u32::MAX);
        assert!(Dec::new(&e.0).count(1).is_err());
        assert!(Dec::new(&[9]).qos().is_err());
        assert!(get_protocol(&mut Dec::new(&[6])).is_err());
        assert!(get_sub_options(&mut Dec::new(&[3])).is_err());
        let mut e = Enc::default();
        e.bytes(&[0xff, 0xfe]);
        assert!(Dec::new(&e.0).str().is_err());
    }

    #[test]
    fn sub_options_round_trip() {
        for bits in 0u8..64 {
            let Ok(o) = get_sub_options(&mut Dec::new(&[bits])) else { continue };
            let mut e = Enc::default();
            put_sub_options(&mut e, o);
            assert_eq!(e.0, [bits]);
        }
    }

    #[test]
    fn wall_clock_maps_deadlines_both_ways() {
        let c = clock();
        let later = c.base + Duration::from_millis(1500);
        assert_eq!(c.unix_ms(later), c.base_unix_ms + 1500);
        assert_eq!(c.instant(c.base_unix_ms + 1500), later);
        assert_eq!(c.instant(c.base_unix_ms - 10_000), c.base, "a past deadline is due now");
    }
}
