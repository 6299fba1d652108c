//! Packet encoding into a caller-provided `Vec<u8>` ([`encode`]) and exact size computation without
//! allocating ([`encoded_len`]).
//!
//! What it does: writes any [`Packet`] in the 3.1, 3.1.1 or 5.0 layout, dropping what the older layouts
//! cannot carry (properties, most reason codes) and using the 5.0 short forms for successful acks. It checks
//! only what would otherwise produce an unframeable packet: field and packet sizes, and the PUBLISH packet
//! identifier matching its QoS.
//!
//! What it does not do: validate content (topic syntax, property placement, reason-code tables). The caller
//! builds packets from its own state; the decoder is where untrusted input is checked.

use crate::{EncodeError, Packet, Properties, Protocol, QoS, ReasonCode, MAX_REMAINING_LENGTH};

type Result<T> = std::result::Result<T, EncodeError>;

/// Where encoded bytes go: the output vector, or a counter for the sizing pass. One body writer serves
/// both, so the size can never disagree with what is written.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn byte(&mut self, b: u8) {
        self.put(&[b]);
    }
}

struct Count(usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Appends `packet` to `out` in `protocol`'s layout and returns the number of bytes written. On error `out`
/// is unchanged. CONNECT is written in the layout of its own `protocol` field, mirroring the decoder.
pub fn encode(packet: &Packet<'_>, protocol: Protocol, out: &mut Vec<u8>) -> Result<usize> {
    let remaining = remaining_len(packet, protocol)?;
    let start = out.len();
    out.reserve(1 + varint_len(remaining) + remaining as usize);
    out.push(first_byte(packet, protocol));
    let written = varint(out, remaining).and_then(|()| body(packet, protocol, out));
    if let Err(e) = written {
        out.truncate(start);
        return Err(e);
    }
    Ok(out.len() - start)
}

/// The number of bytes [`encode`] would write, with the same errors.
pub fn encoded_len(packet: &Packet<'_>, protocol: Protocol) -> Result<usize> {
    let remaining = remaining_len(packet, protocol)?;
    Ok(1 + varint_len(remaining) + remaining as usize)
}

fn remaining_len(packet: &Packet<'_>, protocol: Protocol) -> Result<u32> {
    let mut count = Count(0);
    body(packet, protocol, &mut count)?;
    match u32::try_from(count.0) {
        Ok(n) if n <= MAX_REMAINING_LENGTH => Ok(n),
        _ => Err(EncodeError::TooLarge(count.0)),
    }
}

fn first_byte(packet: &Packet<'_>, protocol: Protocol) -> u8 {
    let flags = match packet {
        Packet::Publish(p) => {
            // DUP on QoS 0 is malformed from 3.1.1 on; 3.1 peers get it as given.
            let dup = p.dup && (p.qos != QoS::AtMostOnce || protocol == Protocol::V31);
            u8::from(dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain)
        }
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    (packet.packet_type() as u8) << 4 | flags
}

fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn varint<S: Sink>(s: &mut S, mut v: u32) -> Result<()> {
    if v > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge(v as usize));
    }
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            s.byte(byte);
            return Ok(());
        }
        s.byte(byte | 0x80);
    }
}

fn u16<S: Sink>(s: &mut S, v: u16) {
    s.put(&v.to_be_bytes());
}

fn u32<S: Sink>(s: &mut S, v: u32) {
    s.put(&v.to_be_bytes());
}

fn binary<S: Sink>(s: &mut S, bytes: &[u8]) -> Result<()> {
    let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::FieldTooLong(bytes.len()))?;
    u16(s, len);
    s.put(bytes);
    Ok(())
}

fn string<S: Sink>(s: &mut S, v: &str) -> Result<()> {
    binary(s, v.as_bytes())
}

fn body<S: Sink>(packet: &Packet<'_>, protocol: Protocol, s: &mut S) -> Result<()> {
    let v5 = protocol.is_v5();
    match packet {
        Packet::Connect(c) => {
            let v5 = c.protocol.is_v5();
            string(s, if c.protocol == Protocol::V31 { "MQIsdp" } else { "MQTT" })?;
            s.byte(c.protocol.level());
            let mut flags = u8::from(c.clean_start) << 1;
            if let Some(w) = &c.will {
                flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
            }
            flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
            s.byte(flags);
            u16(s, c.keep_alive_s);
            if v5 {
                properties(s, &c.properties)?;
            }
            string(s, c.client_id)?;
            if let Some(w) = &c.will {
                if v5 {
                    properties(s, &w.properties)?;
                }
                string(s, w.topic)?;
                binary(s, w.payload)?;
            }
            if let Some(u) = c.username {
                string(s, u)?;
            }
            if let Some(p) = c.password {
                binary(s, p)?;
            }
        }
        Packet::ConnAck(a) => {
            s.byte(u8::from(a.session_present));
            if v5 {
                s.byte(a.reason.0);
                properties(s, &a.properties)?;
            } else {
                s.byte(a.reason.to_v3_connack());
            }
        }
        Packet::Publish(p) => {
            string(s, p.topic)?;
            match (p.qos, p.packet_id) {
                (QoS::AtMostOnce, None) => {}
                (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(id)) => u16(s, id.0),
                _ => return Err(EncodeError::PacketIdMismatch),
            }
            if v5 {
                properties(s, &p.properties)?;
            }
            s.put(p.payload);
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            u16(s, a.packet_id.0);
            if v5 {
                reason_and_props(s, a.reason, &a.properties, true)?;
            }
        }
        Packet::Subscribe(sub) => {
            u16(s, sub.packet_id.0);
            if v5 {
                properties(s, &sub.properties)?;
            }
            for (filter, o) in &sub.filters {
                string(s, filter)?;
                let mut byte = o.qos as u8;
                if v5 {
                    byte |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 0b11) << 4;
                }
                s.byte(byte);
            }
        }
        Packet::SubAck(a) => {
            u16(s, a.packet_id.0);
            if v5 {
                properties(s, &a.properties)?;
            }
            for r in &a.reasons {
                // 3.1.1 has one failure code; anything that is not a granted QoS becomes it.
                let code = if v5 || r.0 <= 2 { r.0 } else { 0x80 };
                s.byte(code);
            }
        }
        Packet::Unsubscribe(u) => {
            u16(s, u.packet_id.0);
            if v5 {
                properties(s, &u.properties)?;
            }
            for filter in &u.filters {
                string(s, filter)?;
            }
        }
        Packet::UnsubAck(a) => {
            u16(s, a.packet_id.0);
            if v5 {
                properties(s, &a.properties)?;
                for r in &a.reasons {
                    s.byte(r.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                reason_and_props(s, d.reason, &d.properties, true)?;
            }
        }
        Packet::Auth(a) => {
            if !v5 {
                return Err(EncodeError::NotInProtocol(if protocol == Protocol::V31 {
                    "3.1"
                } else {
                    "3.1.1"
                }));
            }
            // The spec only sanctions leaving out AUTH's property length together with the reason code.
            reason_and_props(s, a.reason, &a.properties, false)?;
        }
    }
    Ok(())
}

/// The 5.0 tail of acks, DISCONNECT and AUTH: nothing for Success without properties; otherwise the reason
/// code, then the properties unless there are none and `short_ok` allows leaving their length out.
fn reason_and_props<S: Sink>(
    s: &mut S,
    reason: ReasonCode,
    props: &Properties<'_>,
    short_ok: bool,
) -> Result<()> {
    let empty = props.is_empty();
    if reason == ReasonCode::SUCCESS && empty {
        return Ok(());
    }
    s.byte(reason.0);
    if !(empty && short_ok) {
        properties(s, props)?;
    }
    Ok(())
}

/// Property length then the properties, in identifier order.
fn properties<S: Sink>(s: &mut S, p: &Properties<'_>) -> Result<()> {
    let mut count = Count(0);
    property_list(&mut count, p)?;
    let len = u32::try_from(count.0).map_err(|_| EncodeError::TooLarge(count.0))?;
    varint(s, len)?;
    property_list(s, p)
}

fn property_list<S: Sink>(s: &mut S, p: &Properties<'_>) -> Result<()> {
    fn byte<S: Sink>(s: &mut S, id: u8, v: Option<u8>) {
        if let Some(v) = v {
            s.put(&[id, v]);
        }
    }
    fn two<S: Sink>(s: &mut S, id: u8, v: Option<u16>) {
        if let Some(v) = v {
            s.byte(id);
            u16(s, v);
        }
    }
    fn four<S: Sink>(s: &mut S, id: u8, v: Option<u32>) {
        if let Some(v) = v {
            s.byte(id);
            u32(s, v);
        }
    }
    fn text<S: Sink>(s: &mut S, id: u8, v: Option<&str>) -> Result<()> {
        v.map_or(Ok(()), |v| {
            s.byte(id);
            string(s, v)
        })
    }
    fn bin<S: Sink>(s: &mut S, id: u8, v: Option<&[u8]>) -> Result<()> {
        v.map_or(Ok(()), |v| {
            s.byte(id);
            binary(s, v)
        })
    }
    byte(s, 0x01, p.payload_format_indicator);
    four(s, 0x02, p.message_expiry_interval_s);
    text(s, 0x03, p.content_type)?;
    text(s, 0x08, p.response_topic)?;
    bin(s, 0x09, p.correlation_data)?;
    for &id in &p.subscription_identifiers {
        s.byte(0x0B);
        varint(s, id)?;
    }
    four(s, 0x11, p.session_expiry_interval_s);
    text(s, 0x12, p.assigned_client_identifier)?;
    two(s, 0x13, p.server_keep_alive_s);
    text(s, 0x15, p.authentication_method)?;
    bin(s, 0x16, p.authentication_data)?;
    byte(s, 0x17, p.request_problem_information);
    four(s, 0x18, p.will_delay_interval_s);
    byte(s, 0x19, p.request_response_information);
    text(s, 0x1A, p.response_information)?;
    text(s, 0x1C, p.server_reference)?;
    text(s, 0x1F, p.reason_string)?;
    two(s, 0x21, p.receive_maximum);
    two(s, 0x22, p.topic_alias_maximum);
    two(s, 0x23, p.topic_alias);
    byte(s, 0x24, p.maximum_qos);
    byte(s, 0x25, p.retain_available);
    for (k, v) in &p.user_properties {
        s.byte(0x26);
        string(s, k)?;
        string(s, v)?;
    }
    four(s, 0x27, p.maximum_packet_size);
    byte(s, 0x28, p.wildcard_subscription_available);
    byte(s, 0x29, p.subscription_identifier_available);
    byte(s, 0x2A, p.shared_subscription_available);
    Ok(())
}

/// Appends a PUBLISH property block (length, then the properties) for `p`: what a cluster link carries
/// with a forwarded message, so the receiving node decodes it with [`crate::decode_publish_properties`].
pub fn encode_publish_properties(p: &Properties<'_>, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    properties(out, p).inspect_err(|_| out.truncate(start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ack, ConnAck, Disconnect, PacketId, Publish, SubAck};

    fn enc(p: &Packet<'_>, proto: Protocol) -> Vec<u8> {
        let mut out = Vec::new();
        let n = encode(p, proto, &mut out).unwrap();
        assert_eq!(n, out.len());
        assert_eq!(encoded_len(p, proto), Ok(n));
        out
    }

    #[test]
    fn varint_encoding() {
        for (v, want) in [
            (0u32, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = Vec::new();
            varint(&mut out, v).unwrap();
            assert_eq!(out, want);
            assert_eq!(varint_len(v), want.len());
        }
        assert_eq!(varint(&mut Vec::new(), 268_435_456), Err(EncodeError::TooLarge(268_435_456)));
    }

    #[test]
    fn short_forms() {
        let ack = Packet::PubAck(Ack::new(PacketId(7), ReasonCode::SUCCESS));
        assert_eq!(enc(&ack, Protocol::V5), [0x40, 2, 0, 7]);
        let ack = Packet::PubRec(Ack::new(PacketId(7), ReasonCode::NO_MATCHING_SUBSCRIBERS));
        assert_eq!(enc(&ack, Protocol::V5), [0x50, 3, 0, 7, 0x10]);
        assert_eq!(enc(&ack, Protocol::V311), [0x50, 2, 0, 7]);
        let rel = Packet::PubRel(Ack::new(PacketId(1), ReasonCode::SUCCESS));
        assert_eq!(enc(&rel, Protocol::V311), [0x62, 2, 0, 1]);
        assert_eq!(enc(&Packet::Disconnect(Disconnect::default()), Protocol::V5), [0xE0, 0]);
        let d = Packet::Disconnect(Disconnect { reason: ReasonCode::SERVER_BUSY, ..Default::default() });
        assert_eq!(enc(&d, Protocol::V5), [0xE0, 1, 0x89]);
        assert_eq!(enc(&d, Protocol::V311), [0xE0, 0]);
        assert_eq!(enc(&Packet::PingReq, Protocol::V5), [0xC0, 0]);
    }

    #[test]
    fn v3_mappings() {
        let ca = Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::BANNED,
            properties: Properties::default(),
        });
        assert_eq!(enc(&ca, Protocol::V311), [0x20, 2, 0, 5]);
        assert_eq!(enc(&ca, Protocol::V5), [0x20, 3, 0, 0x8A, 0]);
        let sa = Packet::SubAck(SubAck {
            packet_id: PacketId(2),
            reasons: vec![ReasonCode(1), ReasonCode(0x97), ReasonCode(0x80)],
            properties: Properties::default(),
        });
        assert_eq!(enc(&sa, Protocol::V311), [0x90, 5, 0, 2, 1, 0x80, 0x80]);
    }

    #[test]
    fn errors_leave_output_untouched() {
        let mut out = vec![1, 2, 3];
        let bad = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t",
            packet_id: None,
            payload: b"",
            properties: Properties::default(),
        });
        assert_eq!(encode(&bad, Protocol::V5, &mut out), Err(EncodeError::PacketIdMismatch));
        let long = "x".repeat(65_536);
        let bad = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: &long,
            packet_id: None,
            payload: b"",
            properties: Properties::default(),
        });
        assert_eq!(encode(&bad, Protocol::V5, &mut out), Err(EncodeError::FieldTooLong(65_536)));
        assert_eq!(encoded_len(&bad, Protocol::V5), Err(EncodeError::FieldTooLong(65_536)));
        let auth = Packet::Auth(Default::default());
        assert_eq!(encode(&auth, Protocol::V311, &mut out), Err(EncodeError::NotInProtocol("3.1.1")));
        let big = vec![0u8; MAX_REMAINING_LENGTH as usize];
        let bad = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t",
            packet_id: None,
            payload: &big,
            properties: Properties::default(),
        });
        assert_eq!(
            encode(&bad, Protocol::V311, &mut out),
            Err(EncodeError::TooLarge(MAX_REMAINING_LENGTH as usize + 3))
        );
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn dup_dropped_on_qos0() {
        let p = Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: "t",
            packet_id: None,
            payload: b"x",
            properties: Properties::default(),
        });
        assert_eq!(enc(&p, Protocol::V311)[0], 0x31);
        assert_eq!(enc(&p, Protocol::V31)[0], 0x39);
    }
}
