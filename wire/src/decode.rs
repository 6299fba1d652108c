//! Packet decoding: the fixed header ([`frame`]), whole packets ([`decode`]) and a protocol sniffer for a
//! CONNECT that fails to decode ([`peek_protocol`]).
//!
//! What it does: parses one packet from the front of a byte slice, borrowing strings and payloads from it,
//! and rejects everything the MQTT 3.1, 3.1.1 and 5.0 specifications call malformed, plus protocol errors
//! that are visible in a single packet (packet id 0, wildcard PUBLISH topics, invalid reason codes, ...).
//! A packet over the caller's size limit is refused from its fixed header alone, before its body is
//! buffered.
//!
//! What it does not do: direction rules (which side may send which packet), session or flow-control state
//! (topic alias ranges, receive maximum, duplicate CONNECT), or checks that need configuration such as
//! client-identifier rules. It never panics and never allocates more than the input it was given.

use crate::decode_props::{properties, varint, Reader};
use crate::topic::{parse_shared, valid_topic_filter, valid_topic_name};
use crate::{
    Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, PacketId, PacketType, Properties, Protocol,
    Publish, QoS, ReasonCode, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe, Will,
};

type Result<T> = std::result::Result<T, DecodeError>;

/// A parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Control packet type: the high nibble of the first byte (never 0).
    pub packet_type: u8,
    /// The low nibble of the first byte, not yet validated.
    pub flags: u8,
    /// Bytes taken by the fixed header: 2 to 5.
    pub header_len: usize,
    pub remaining_len: u32,
}

impl Frame {
    /// Fixed header plus body: the bytes the whole packet occupies.
    pub fn total_len(&self) -> usize {
        self.header_len + self.remaining_len as usize
    }
}

/// Reads the fixed header at the start of `buf`.
///
/// `Ok(None)` until the remaining-length integer is complete. A packet whose total size would exceed
/// `max_packet_size` is rejected here, so the caller never has to buffer it.
pub fn frame(buf: &[u8], max_packet_size: u32) -> Result<Option<Frame>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = first >> 4;
    if packet_type == 0 {
        return Err(DecodeError::UnknownPacketType(0));
    }
    let Some((remaining_len, n)) = varint(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let header_len = 1 + n;
    let size = header_len as u64 + u64::from(remaining_len);
    if size > u64::from(max_packet_size) {
        return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
    }
    Ok(Some(Frame { packet_type, flags: first & 0x0F, header_len, remaining_len }))
}

/// Decodes one packet from the front of `buf`.
///
/// Returns the packet and the bytes it occupied, or `Ok(None)` while the packet is incomplete. `protocol` is
/// the connection's protocol, `None` before CONNECT: then only CONNECT is accepted. CONNECT itself always
/// decodes with the protocol named in it, whatever `protocol` says. Header errors (bad flags, a
/// non-CONNECT first packet, oversize) are reported as soon as the fixed header is complete.
pub fn decode<'a>(
    buf: &'a [u8],
    protocol: Option<Protocol>,
    max_packet_size: u32,
) -> Result<Option<(Packet<'a>, usize)>> {
    let Some(f) = frame(buf, max_packet_size)? else {
        return Ok(None);
    };
    let ty = PacketType::from_u8(f.packet_type).ok_or(DecodeError::UnknownPacketType(f.packet_type))?;
    let protocol = match protocol {
        Some(p) => p,
        None if ty == PacketType::Connect => Protocol::V5, // unused: CONNECT names its own protocol
        None => return Err(DecodeError::NotConnect),
    };
    check_header(ty, f.flags, protocol)?;
    let total = f.total_len();
    let Some(body) = buf.get(f.header_len..total) else {
        return Ok(None);
    };
    let packet = decode_body(ty, f.flags, Reader::new(body), protocol)?;
    Ok(Some((packet, total)))
}

/// The protocol named by the CONNECT at the start of `buf`, if its name and level are recognisable. Lets the
/// broker answer a CONNECT that fails to decode with a CONNACK in the client's format. Needs only the
/// fixed header, protocol name and level, not the whole packet.
pub fn peek_protocol(buf: &[u8]) -> Option<Protocol> {
    if buf.first()? >> 4 != PacketType::Connect as u8 {
        return None;
    }
    let (remaining_len, n) = varint(buf.get(1..)?).ok()??;
    let end = (1 + n).saturating_add(remaining_len as usize).min(buf.len());
    let mut r = Reader::new(buf.get(1 + n..end)?);
    let name = r.binary("protocol name").ok()?;
    let level = r.u8("protocol level").ok()?;
    recognise(name, Some(level)).ok()
}

fn recognise(name: &[u8], level: Option<u8>) -> Result<Protocol> {
    let known = matches!(name, b"MQTT" | b"MQIsdp");
    match (name, level) {
        (b"MQTT", Some(4)) => Ok(Protocol::V311),
        (b"MQTT", Some(5)) => Ok(Protocol::V5),
        (b"MQIsdp", Some(3)) => Ok(Protocol::V31),
        (_, Some(level)) if known => Err(DecodeError::UnsupportedProtocolLevel(level)),
        (_, None) if known => Err(DecodeError::Truncated("protocol level")),
        (_, level) => Err(DecodeError::UnknownProtocolName { level: level.unwrap_or(0) }),
    }
}

/// Fixed-header rules that do not need the body.
fn check_header(ty: PacketType, flags: u8, protocol: Protocol) -> Result<()> {
    let invalid = DecodeError::InvalidFlags { packet_type: ty as u8, flags };
    match ty {
        PacketType::Publish => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::InvalidQos);
            }
            // 3.1 did not forbid DUP on QoS 0, and old clients set it.
            if qos == 0 && flags & 0b1000 != 0 && protocol != Protocol::V31 {
                return Err(invalid);
            }
            Ok(())
        }
        PacketType::Auth if !protocol.is_v5() => Err(DecodeError::UnknownPacketType(ty as u8)),
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe if flags != 0b0010 => {
            Err(invalid)
        }
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => Ok(()),
        _ if flags != 0 => Err(invalid),
        _ => Ok(()),
    }
}

fn decode_body<'a>(ty: PacketType, flags: u8, mut r: Reader<'a>, protocol: Protocol) -> Result<Packet<'a>> {
    let v5 = protocol.is_v5();
    let packet = match ty {
        PacketType::Connect => Packet::Connect(connect(&mut r)?),
        PacketType::ConnAck => Packet::ConnAck(connack(&mut r, v5)?),
        PacketType::Publish => Packet::Publish(publish(&mut r, flags, v5)?),
        PacketType::PubAck => Packet::PubAck(ack(&mut r, ty, v5)?),
        PacketType::PubRec => Packet::PubRec(ack(&mut r, ty, v5)?),
        PacketType::PubRel => Packet::PubRel(ack(&mut r, ty, v5)?),
        PacketType::PubComp => Packet::PubComp(ack(&mut r, ty, v5)?),
        PacketType::Subscribe => Packet::Subscribe(subscribe(&mut r, v5)?),
        PacketType::SubAck => Packet::SubAck(suback(&mut r, v5)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        PacketType::UnsubAck => Packet::UnsubAck(unsuback(&mut r, v5)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => {
            let (reason, properties) = reason_and_props(&mut r, ty, v5)?;
            Packet::Disconnect(Disconnect { reason, properties })
        }
        PacketType::Auth => {
            let (reason, properties) = reason_and_props(&mut r, ty, v5)?;
            Packet::Auth(Auth { reason, properties })
        }
    };
    r.finish()?;
    Ok(packet)
}

fn packet_id(r: &mut Reader<'_>) -> Result<PacketId> {
    match r.u16("packet identifier")? {
        0 => Err(DecodeError::ZeroPacketId),
        id => Ok(PacketId(id)),
    }
}

fn v5_properties<'a>(r: &mut Reader<'a>, ty: PacketType, v5: bool) -> Result<Properties<'a>> {
    if v5 {
        properties(r, ty, false)
    } else {
        Ok(Properties::default())
    }
}

fn reason(r: &mut Reader<'_>, ty: PacketType) -> Result<ReasonCode> {
    let code = r.u8("reason code")?;
    if reason_valid(ty, code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::InvalidReasonCode(code))
    }
}

/// Reason codes each 5.0 packet type may carry (MQTT 5.0 §3.x.2.1 tables). A code from a later revision is
/// rejected rather than passed through: 5.0 defines these lists as closed.
fn reason_valid(ty: PacketType, code: u8) -> bool {
    use PacketType as T;
    match ty {
        T::ConnAck => {
            matches!(code, 0x00 | 0x80..=0x8A | 0x8C | 0x90 | 0x95 | 0x97 | 0x99..=0x9D | 0x9F)
        }
        T::PubAck | T::PubRec => matches!(code, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99),
        T::PubRel | T::PubComp => matches!(code, 0x00 | 0x92),
        T::SubAck => {
            matches!(code, 0x00..=0x02 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2)
        }
        T::UnsubAck => matches!(code, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91),
        T::Disconnect => matches!(
            code,
            0x00 | 0x04 | 0x80..=0x83 | 0x87 | 0x89 | 0x8B | 0x8D..=0x90 | 0x93..=0xA2
        ),
        T::Auth => matches!(code, 0x00 | 0x18 | 0x19),
        _ => false,
    }
}

fn connect<'a>(r: &mut Reader<'a>) -> Result<Connect<'a>> {
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level").ok();
    let protocol = recognise(name, level)?;
    let v5 = protocol.is_v5();

    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::ReservedConnectFlag);
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if will_qos == 3 || (!will_flag && (will_qos != 0 || will_retain)) {
        return Err(DecodeError::InvalidWillFlags);
    }
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive_s = r.u16("keep alive")?;
    let properties = v5_properties(r, PacketType::Connect, v5)?;
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let properties = if v5 { properties_will(r)? } else { Properties::default() };
        let topic = r.string("will topic")?;
        if !valid_topic_name(topic) {
            return Err(DecodeError::InvalidTopic);
        }
        let payload = r.binary("will payload")?;
        let qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidWillFlags)?;
        Some(Will { topic, payload, qos, retain: will_retain, properties })
    } else {
        None
    };
    let username = if username_flag { Some(r.string("user name")?) } else { None };
    let password = if password_flag { Some(r.binary("password")?) } else { None };
    Ok(Connect { protocol, clean_start, keep_alive_s, client_id, will, username, password, properties })
}

fn properties_will<'a>(r: &mut Reader<'a>) -> Result<Properties<'a>> {
    properties(r, PacketType::Connect, true)
}

fn connack<'a>(r: &mut Reader<'a>, v5: bool) -> Result<ConnAck<'a>> {
    let ack_flags = r.u8("connack flags")?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::ReservedConnAckFlags(ack_flags));
    }
    let reason = if v5 {
        reason(r, PacketType::ConnAck)?
    } else {
        let code = r.u8("return code")?;
        ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidReasonCode(code))?
    };
    let properties = v5_properties(r, PacketType::ConnAck, v5)?;
    Ok(ConnAck { session_present: ack_flags & 0x01 != 0, reason, properties })
}

fn publish<'a>(r: &mut Reader<'a>, flags: u8, v5: bool) -> Result<Publish<'a>> {
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQos)?;
    let topic = r.string("topic name")?;
    if topic.contains(['+', '#']) {
        return Err(DecodeError::InvalidTopic);
    }
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(packet_id(r)?) };
    let properties = v5_properties(r, PacketType::Publish, v5)?;
    // An empty topic is how 5.0 says "use the topic this alias was bound to".
    if topic.is_empty() && properties.topic_alias.is_none() {
        return Err(DecodeError::InvalidTopic);
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        payload: r.rest(),
        properties,
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. In 5.0 the reason code and then the properties may be left off.
fn ack<'a>(r: &mut Reader<'a>, ty: PacketType, v5: bool) -> Result<Ack<'a>> {
    let packet_id = packet_id(r)?;
    let mut ack = Ack::new(packet_id, ReasonCode::SUCCESS);
    if v5 && !r.is_empty() {
        ack.reason = reason(r, ty)?;
        if !r.is_empty() {
            ack.properties = properties(r, ty, false)?;
        }
    }
    Ok(ack)
}

/// DISCONNECT and AUTH: in 5.0 an empty body means Success with no properties, and a lone reason code means
/// no properties. 3.1.1 DISCONNECT has no body at all.
fn reason_and_props<'a>(
    r: &mut Reader<'a>,
    ty: PacketType,
    v5: bool,
) -> Result<(ReasonCode, Properties<'a>)> {
    if !v5 || r.is_empty() {
        return Ok((ReasonCode::SUCCESS, Properties::default()));
    }
    let reason = reason(r, ty)?;
    let properties = if r.is_empty() { Properties::default() } else { properties(r, ty, false)? };
    Ok((reason, properties))
}

fn topic_filter<'a>(r: &mut Reader<'a>) -> Result<&'a str> {
    let filter = r.string("topic filter")?;
    if !valid_topic_filter(filter) {
        return Err(DecodeError::InvalidTopicFilter);
    }
    Ok(filter)
}

fn subscribe<'a>(r: &mut Reader<'a>, v5: bool) -> Result<Subscribe<'a>> {
    let packet_id = packet_id(r)?;
    let properties = v5_properties(r, PacketType::Subscribe, v5)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = topic_filter(r)?;
        let options = sub_options(r.u8("subscription options")?, v5)?;
        // No Local on a shared subscription is a protocol error (MQTT 5.0 §3.8.3.1).
        if options.no_local && parse_shared(filter).is_some() {
            return Err(DecodeError::InvalidSubscriptionOptions);
        }
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptyFilterList);
    }
    Ok(Subscribe { packet_id, filters, properties })
}

fn sub_options(byte: u8, v5: bool) -> Result<SubOptions> {
    let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
    if byte & reserved != 0 {
        return Err(DecodeError::InvalidSubscriptionOptions);
    }
    let retain_handling = (byte >> 4) & 0b11;
    if retain_handling == 3 {
        return Err(DecodeError::InvalidSubscriptionOptions);
    }
    Ok(SubOptions {
        qos: QoS::from_u8(byte & 0b11).ok_or(DecodeError::InvalidQos)?,
        no_local: byte & 0b0100 != 0,
        retain_as_published: byte & 0b1000 != 0,
        retain_handling,
    })
}

fn suback<'a>(r: &mut Reader<'a>, v5: bool) -> Result<SubAck<'a>> {
    let packet_id = packet_id(r)?;
    let properties = v5_properties(r, PacketType::SubAck, v5)?;
    let reasons = reason_list(r, PacketType::SubAck, v5)?;
    Ok(SubAck { packet_id, reasons, properties })
}

/// The payload of SUBACK/UNSUBACK: one code per filter, so at least one.
fn reason_list(r: &mut Reader<'_>, ty: PacketType, v5: bool) -> Result<Vec<ReasonCode>> {
    if r.is_empty() {
        return Err(DecodeError::Truncated("reason codes"));
    }
    r.rest()
        .iter()
        .map(|&code| {
            let ok = if v5 { reason_valid(ty, code) } else { matches!(code, 0x00..=0x02 | 0x80) };
            if ok {
                Ok(ReasonCode(code))
            } else {
                Err(DecodeError::InvalidReasonCode(code))
            }
        })
        .collect()
}

fn unsubscribe<'a>(r: &mut Reader<'a>, v5: bool) -> Result<Unsubscribe<'a>> {
    let packet_id = packet_id(r)?;
    let properties = v5_properties(r, PacketType::Unsubscribe, v5)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(topic_filter(r)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::EmptyFilterList);
    }
    Ok(Unsubscribe { packet_id, filters, properties })
}

fn unsuback<'a>(r: &mut Reader<'a>, v5: bool) -> Result<UnsubAck<'a>> {
    let packet_id = packet_id(r)?;
    if !v5 {
        return Ok(UnsubAck { packet_id, reasons: Vec::new(), properties: Properties::default() });
    }
    let properties = properties(r, PacketType::UnsubAck, false)?;
    let reasons = reason_list(r, PacketType::UnsubAck, true)?;
    Ok(UnsubAck { packet_id, reasons, properties })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = u32::MAX;

    #[test]
    fn frame_reads_header_only() {
        assert_eq!(frame(&[], MAX), Ok(None));
        assert_eq!(frame(&[0x30], MAX), Ok(None));
        assert_eq!(frame(&[0x30, 0x80], MAX), Ok(None));
        let f = frame(&[0x32, 0x80, 0x01], MAX).unwrap().unwrap();
        assert_eq!(f, Frame { packet_type: 3, flags: 2, header_len: 3, remaining_len: 128 });
        assert_eq!(f.total_len(), 131);
        assert_eq!(frame(&[0x00, 0x00], MAX), Err(DecodeError::UnknownPacketType(0)));
        assert_eq!(frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], MAX), Err(DecodeError::MalformedLength));
        assert_eq!(frame(&[0x30, 0x80, 0x00], MAX), Err(DecodeError::MalformedLength));
        let f = frame(&[0x30, 0x7F, 0xAA], 129).unwrap().unwrap();
        assert_eq!(f.total_len(), 129);
        assert_eq!(frame(&[0x30, 0x7F], 128), Err(DecodeError::PacketTooLarge { size: 129, max: 128 }));
    }

    #[test]
    fn protocol_recognition() {
        assert_eq!(recognise(b"MQTT", Some(4)), Ok(Protocol::V311));
        assert_eq!(recognise(b"MQTT", Some(5)), Ok(Protocol::V5));
        assert_eq!(recognise(b"MQIsdp", Some(3)), Ok(Protocol::V31));
        assert_eq!(recognise(b"MQIsdp", Some(5)), Err(DecodeError::UnsupportedProtocolLevel(5)));
        assert_eq!(recognise(b"MQTT", None), Err(DecodeError::Truncated("protocol level")));
        assert_eq!(recognise(b"", Some(4)), Err(DecodeError::UnknownProtocolName { level: 4 }));
        assert_eq!(recognise(b"MQTTX", None), Err(DecodeError::UnknownProtocolName { level: 0 }));
    }

    #[test]
    fn header_flag_rules() {
        use PacketType as T;
        assert_eq!(check_header(T::Publish, 0b1011, Protocol::V5), Ok(()));
        assert_eq!(check_header(T::Publish, 0b0110, Protocol::V31), Err(DecodeError::InvalidQos));
        assert_eq!(check_header(T::Publish, 0b1001, Protocol::V31), Ok(()));
        assert_eq!(check_header(T::Auth, 0, Protocol::V311), Err(DecodeError::UnknownPacketType(15)));
        for ty in [T::PubRel, T::Subscribe, T::Unsubscribe] {
            assert_eq!(check_header(ty, 0b0010, Protocol::V5), Ok(()));
            assert!(check_header(ty, 0, Protocol::V5).is_err());
        }
        assert!(check_header(T::PingReq, 0b0010, Protocol::V5).is_err());
    }

    #[test]
    fn reason_tables_are_closed() {
        // Counts from the MQTT 5.0 tables, so an accidental widening of a range shows up.
        let count = |ty| (0..=255u8).filter(|&c| reason_valid(ty, c)).count();
        assert_eq!(count(PacketType::ConnAck), 22);
        assert_eq!(count(PacketType::PubAck), 9);
        assert_eq!(count(PacketType::PubRec), 9);
        assert_eq!(count(PacketType::PubRel), 2);
        assert_eq!(count(PacketType::PubComp), 2);
        assert_eq!(count(PacketType::SubAck), 12);
        assert_eq!(count(PacketType::UnsubAck), 7);
        assert_eq!(count(PacketType::Disconnect), 29);
        assert_eq!(count(PacketType::Auth), 3);
        assert_eq!(count(PacketType::Publish), 0);
    }

    #[test]
    fn peek_needs_only_name_and_level() {
        let head = [0x10, 0x7F, 0, 4, b'M', b'Q', b'T', b'T', 5];
        assert_eq!(peek_protocol(&head), Some(Protocol::V5));
        assert_eq!(peek_protocol(&head[..8]), None);
        // A remaining length too short to hold the level means the level is not part of this packet.
        assert_eq!(peek_protocol(&[0x10, 0x06, 0, 4, b'M', b'Q', b'T', b'T', 5]), None);
        assert_eq!(peek_protocol(&[0x20, 0x7F, 0, 4, b'M', b'Q', b'T', b'T', 5]), None);
        assert_eq!(peek_protocol(&[]), None);
    }
}
