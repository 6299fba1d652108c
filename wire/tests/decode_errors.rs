//! Every decoder error path, driven by hand-built byte vectors, plus the 5.0 short forms and the
//! header-only decisions (oversize, first packet not CONNECT) that must not wait for the body.

use shardmq_wire::*;
use DecodeError::*;

const MAX: u32 = u32::MAX;
const V5: Option<Protocol> = Some(Protocol::V5);
const V311: Option<Protocol> = Some(Protocol::V311);
const V31: Option<Protocol> = Some(Protocol::V31);

fn vbi(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// Fixed header (with a correct remaining length) plus body.
fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    vbi(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// Length-prefixed string or binary field.
fn s(v: impl AsRef<[u8]>) -> Vec<u8> {
    let v = v.as_ref();
    let mut out = (v.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

/// A property block: length then contents.
fn props(contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    vbi(contents.len(), &mut out);
    out.extend_from_slice(contents);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// CONNECT with keep alive 60; `props` is the whole 5.0 property block (empty for 3.x).
fn connect(name: &str, level: u8, flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
    pkt(0x10, &cat(&[&s(name), &[level, flags, 0, 60], props, payload]))
}

fn err(bytes: &[u8], protocol: Option<Protocol>) -> DecodeError {
    match decode(bytes, protocol, MAX) {
        Err(e) => e,
        other => panic!("expected an error for {bytes:02x?}, got {other:?}"),
    }
}

fn ok(bytes: &[u8], protocol: Option<Protocol>) -> Packet<'_> {
    match decode(bytes, protocol, MAX) {
        Ok(Some((p, n))) if n == bytes.len() => p,
        other => panic!("expected a packet from {bytes:02x?}, got {other:?}"),
    }
}

// ---- fixed header ----

#[test]
fn remaining_length_of_five_bytes() {
    assert_eq!(err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], V5), MalformedLength);
    // Known malformed before the fifth byte arrives.
    assert_eq!(err(&[0x30, 0x80, 0x80, 0x80, 0x80], V5), MalformedLength);
    assert_eq!(frame(&[0x30, 0x80, 0x80, 0x80, 0x80], MAX), Err(MalformedLength));
}

#[test]
fn non_minimal_remaining_length() {
    assert_eq!(err(&[0x30, 0x80, 0x00], V5), MalformedLength);
    assert_eq!(err(&[0xC0, 0x80, 0x80, 0x00], V5), MalformedLength);
    assert_eq!(err(&[0x30, 0xFF, 0x80, 0x80, 0x00], V5), MalformedLength);
    // Non-minimal property length inside a packet.
    assert_eq!(err(&pkt(0x30, &cat(&[&s("t"), &[0x80, 0x00]])), V5), MalformedLength);
}

#[test]
fn oversize_decided_from_header_alone() {
    // 2-byte header: 2 + 100 > 50.
    assert_eq!(frame(&[0x30, 100], 50), Err(PacketTooLarge { size: 102, max: 50 }));
    assert_eq!(decode(&[0x30, 100], V5, 50), Err(PacketTooLarge { size: 102, max: 50 }));
    // 3-, 4- and 5-byte headers.
    assert_eq!(decode(&[0x30, 0x80, 0x01], V5, 130), Err(PacketTooLarge { size: 131, max: 130 }));
    assert_eq!(decode(&[0x30, 0x80, 0x80, 0x01], V5, 1000), Err(PacketTooLarge { size: 16_388, max: 1000 }));
    assert_eq!(
        decode(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], V5, 1 << 20),
        Err(PacketTooLarge { size: 268_435_460, max: 1 << 20 })
    );
    // Before CONNECT too, and before the NotConnect check.
    assert_eq!(decode(&[0x10, 0xFF, 0x7F], None, 1024), Err(PacketTooLarge { size: 16_386, max: 1024 }));
    assert_eq!(decode(&[0x30, 0xFF, 0x7F], None, 1024), Err(PacketTooLarge { size: 16_386, max: 1024 }));
    // The limit itself is allowed.
    assert_eq!(decode(&[0xC0, 0x00], V5, 2), Ok(Some((Packet::PingReq, 2))));
    assert_eq!(decode(&[0xC0, 0x00], V5, 1), Err(PacketTooLarge { size: 2, max: 1 }));
}

#[test]
fn incomplete_header_waits() {
    assert_eq!(decode(&[], V5, MAX), Ok(None));
    assert_eq!(decode(&[0x30], V5, MAX), Ok(None));
    assert_eq!(decode(&[0x30, 0x80], V5, MAX), Ok(None));
    assert_eq!(decode(&[0x30, 0x80, 0x80, 0x80], V5, MAX), Ok(None));
    assert_eq!(decode(&[0x30, 0x05, b'x'], V5, MAX), Ok(None));
}

#[test]
fn unknown_packet_types() {
    assert_eq!(err(&[0x00, 0x00], V5), UnknownPacketType(0));
    assert_eq!(err(&[0x00], None), UnknownPacketType(0));
    assert_eq!(frame(&[0x0F], MAX), Err(UnknownPacketType(0)));
    assert_eq!(err(&[0xF0, 0x00], V311), UnknownPacketType(15));
    assert_eq!(err(&[0xF0, 0x00], V31), UnknownPacketType(15));
    assert_eq!(ok(&[0xF0, 0x00], V5), Packet::Auth(Auth::default()));
}

#[test]
fn first_packet_must_be_connect() {
    assert_eq!(err(&[0x30, 0x03, 0, 1, b't'], None), NotConnect);
    assert_eq!(err(&[0xC0, 0x00], None), NotConnect);
    assert_eq!(err(&[0xF0, 0x00], None), NotConnect);
    // Decided from the header, before the body arrives.
    assert_eq!(err(&[0x30, 0x7F], None), NotConnect);
}

#[test]
fn reserved_fixed_header_flags() {
    for (first, body) in [
        (0x11u8, connect("MQTT", 4, 0x02, &[], &s("c"))[2..].to_vec()),
        (0x21, vec![0, 0]),
        (0x41, vec![0, 1]),
        (0x58, vec![0, 1]),
        (0x60, vec![0, 1]),
        (0x63, vec![0, 1]),
        (0x74, vec![0, 1]),
        (0x80, cat(&[&[0, 1], &s("a"), &[0]])),
        (0x83, cat(&[&[0, 1], &s("a"), &[0]])),
        (0x92, vec![0, 1, 0]),
        (0xA0, cat(&[&[0, 1], &s("a")])),
        (0xB1, vec![0, 1]),
        (0xC1, vec![]),
        (0xD8, vec![]),
        (0xE2, vec![]),
    ] {
        let want = InvalidFlags { packet_type: first >> 4, flags: first & 0x0F };
        assert_eq!(err(&pkt(first, &body), V311), want, "{first:#04x}");
    }
    assert_eq!(err(&pkt(0xF1, &[]), V5), InvalidFlags { packet_type: 15, flags: 1 });
}

#[test]
fn publish_flags() {
    let body = cat(&[&s("t"), &[0, 1]]);
    assert_eq!(err(&pkt(0x36, &body), V5), InvalidQos);
    assert_eq!(err(&pkt(0x36, &body), V311), InvalidQos);
    // QoS 0 with DUP: malformed in 3.1.1 and 5.0, tolerated in 3.1.
    let qos0 = cat(&[&s("t"), &[0], b"x"]);
    assert_eq!(err(&pkt(0x38, &s("t")), V311), InvalidFlags { packet_type: 3, flags: 8 });
    assert_eq!(err(&pkt(0x38, &qos0), V5), InvalidFlags { packet_type: 3, flags: 8 });
    match ok(&pkt(0x39, &s("t")), V31) {
        Packet::Publish(p) => assert!(p.dup && p.retain && p.qos == QoS::AtMostOnce),
        other => panic!("{other:?}"),
    }
}

// ---- strings ----

#[test]
fn utf8_rules() {
    assert_eq!(err(&pkt(0x30, &s([0xFF])), V311), InvalidUtf8);
    assert_eq!(err(&pkt(0x30, &s([b'a', 0xC3])), V311), InvalidUtf8);
    assert_eq!(err(&pkt(0x30, &s("a\0b")), V311), ForbiddenCharacter);
    assert_eq!(err(&connect("MQTT", 4, 0x02, &[], &s([0xED, 0xA0, 0x80])), None), InvalidUtf8);
    assert_eq!(err(&connect("MQTT", 4, 0x82, &[], &cat(&[&s("c"), &s("u\0")])), None), ForbiddenCharacter);
    let user_prop = cat(&[&[0x26], &s("k"), &s([0xFF])]);
    assert_eq!(err(&pkt(0xE0, &cat(&[&[0], &props(&user_prop)])), V5), InvalidUtf8);
}

// ---- CONNECT ----

#[test]
fn connect_protocols() {
    for (name, level, want) in
        [("MQTT", 4, Protocol::V311), ("MQTT", 5, Protocol::V5), ("MQIsdp", 3, Protocol::V31)]
    {
        let block = if want.is_v5() { vec![0] } else { vec![] };
        let bytes = connect(name, level, 0x02, &block, &s("id"));
        match ok(&bytes, None) {
            Packet::Connect(c) => {
                assert_eq!(c.protocol, want);
                assert_eq!(c.client_id, "id");
                assert!(c.clean_start);
                assert_eq!(c.keep_alive_s, 60);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(peek_protocol(&bytes), Some(want));
        // Only the name and level are needed.
        assert_eq!(peek_protocol(&bytes[..2 + 2 + name.len() + 1]), Some(want));
        assert_eq!(peek_protocol(&bytes[..2 + 2 + name.len()]), None);
    }
}

#[test]
fn connect_bad_protocol() {
    assert_eq!(err(&connect("MQTX", 4, 0x02, &[], &s("c")), None), UnknownProtocolName { level: 4 });
    assert_eq!(err(&connect("mqtt", 5, 0x02, &[0], &s("c")), None), UnknownProtocolName { level: 5 });
    assert_eq!(err(&pkt(0x10, &s("HTTP")), None), UnknownProtocolName { level: 0 });
    assert_eq!(err(&connect("MQTT", 3, 0x02, &[], &s("c")), None), UnsupportedProtocolLevel(3));
    assert_eq!(err(&connect("MQTT", 6, 0x02, &[], &s("c")), None), UnsupportedProtocolLevel(6));
    assert_eq!(err(&connect("MQIsdp", 4, 0x02, &[], &s("c")), None), UnsupportedProtocolLevel(4));
    assert_eq!(err(&pkt(0x10, &s("MQTT")), None), Truncated("protocol level"));
    assert_eq!(err(&pkt(0x10, &[0, 4, b'M']), None), Truncated("protocol name"));
    assert_eq!(peek_protocol(&connect("MQTX", 4, 0x02, &[], &s("c"))), None);
    assert_eq!(peek_protocol(&connect("MQTT", 6, 0x02, &[], &s("c"))), None);
    assert_eq!(peek_protocol(&[0x30, 0x02, 0, 0]), None);
    assert_eq!(peek_protocol(&[0x10]), None);
    // A bad CONNECT with a recognisable protocol still tells the broker which CONNACK to send.
    let bad = connect("MQTT", 5, 0x03, &[0], &s("c"));
    assert_eq!(err(&bad, None), ReservedConnectFlag);
    assert_eq!(peek_protocol(&bad), Some(Protocol::V5));
}

#[test]
fn connect_flags() {
    let c = s("c");
    assert_eq!(err(&connect("MQTT", 4, 0x01, &[], &c), None), ReservedConnectFlag);
    assert_eq!(err(&connect("MQTT", 5, 0x03, &[0], &c), None), ReservedConnectFlag);
    let will = cat(&[&c, &s("w"), &s("p")]);
    // Will QoS 3 with the will flag.
    assert_eq!(err(&connect("MQTT", 4, 0x1C, &[], &will), None), InvalidWillFlags);
    // Will QoS or retain without the will flag.
    assert_eq!(err(&connect("MQTT", 4, 0x08, &[], &c), None), InvalidWillFlags);
    assert_eq!(err(&connect("MQTT", 4, 0x10, &[], &c), None), InvalidWillFlags);
    assert_eq!(err(&connect("MQTT", 5, 0x20, &[0], &c), None), InvalidWillFlags);
    // Valid will, QoS 2 retained.
    match ok(&connect("MQTT", 4, 0x34, &[], &will), None) {
        Packet::Connect(Connect { will: Some(w), .. }) => {
            assert_eq!((w.topic, w.payload, w.qos, w.retain), ("w", &b"p"[..], QoS::ExactlyOnce, true));
        }
        other => panic!("{other:?}"),
    }
    // Will topic must be a topic name.
    let bad_will = cat(&[&c, &s("w/#"), &s("p")]);
    assert_eq!(err(&connect("MQTT", 4, 0x04, &[], &bad_will), None), InvalidTopic);
}

#[test]
fn password_without_username() {
    let payload = cat(&[&s("c"), &s("pw")]);
    assert_eq!(err(&connect("MQTT", 4, 0x40, &[], &payload), None), PasswordWithoutUsername);
    assert_eq!(err(&connect("MQIsdp", 3, 0x40, &[], &payload), None), PasswordWithoutUsername);
    match ok(&connect("MQTT", 5, 0x40, &[0], &payload), None) {
        Packet::Connect(c) => assert_eq!((c.username, c.password), (None, Some(&b"pw"[..]))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn connect_truncated_and_trailing() {
    assert_eq!(err(&pkt(0x10, &cat(&[&s("MQTT"), &[4]])), None), Truncated("connect flags"));
    assert_eq!(err(&pkt(0x10, &cat(&[&s("MQTT"), &[4, 2, 0]])), None), Truncated("keep alive"));
    assert_eq!(err(&connect("MQTT", 4, 0x02, &[], &[]), None), Truncated("client identifier"));
    assert_eq!(err(&connect("MQTT", 5, 0x02, &[], &[]), None), Truncated("property length"));
    assert_eq!(err(&connect("MQTT", 4, 0x06, &[], &s("c")), None), Truncated("will topic"));
    assert_eq!(
        err(&connect("MQTT", 4, 0x86, &[], &cat(&[&s("c"), &s("w"), &s("p")])), None),
        Truncated("user name")
    );
    assert_eq!(err(&connect("MQTT", 4, 0xC2, &[], &cat(&[&s("c"), &s("u")])), None), Truncated("password"));
    assert_eq!(err(&connect("MQTT", 4, 0x02, &[], &cat(&[&s("c"), &[9]])), None), TrailingBytes(1));
}

// ---- CONNACK ----

#[test]
fn connack_rules() {
    assert_eq!(err(&pkt(0x20, &[0x02, 0]), V311), ReservedConnAckFlags(2));
    assert_eq!(err(&pkt(0x20, &[0, 6]), V311), InvalidReasonCode(6));
    assert_eq!(err(&pkt(0x20, &[0, 0x04, 0]), V5), InvalidReasonCode(0x04));
    assert_eq!(err(&pkt(0x20, &[0, 0x8B, 0]), V5), InvalidReasonCode(0x8B));
    assert_eq!(err(&pkt(0x20, &[0, 0, 0, 1]), V311), TrailingBytes(2));
    assert_eq!(err(&pkt(0x20, &[0, 0]), V5), Truncated("property length"));
    assert_eq!(err(&pkt(0x20, &[0]), V311), Truncated("return code"));
    match ok(&pkt(0x20, &[1, 4]), V311) {
        Packet::ConnAck(a) => {
            assert_eq!((a.session_present, a.reason), (true, ReasonCode::BAD_USER_NAME_OR_PASSWORD))
        }
        other => panic!("{other:?}"),
    }
}

// ---- PUBLISH ----

#[test]
fn publish_topics() {
    assert_eq!(err(&pkt(0x30, &s("a/+")), V311), InvalidTopic);
    assert_eq!(err(&pkt(0x30, &s("#")), V311), InvalidTopic);
    assert_eq!(err(&pkt(0x30, &cat(&[&s("a#"), &[0]])), V5), InvalidTopic);
    assert_eq!(err(&pkt(0x30, &s("")), V311), InvalidTopic);
    assert_eq!(err(&pkt(0x30, &cat(&[&s(""), &[0]])), V5), InvalidTopic);
    // Empty topic with a topic alias is the 5.0 alias shorthand.
    match ok(&pkt(0x30, &cat(&[&s(""), &props(&[0x23, 0, 7]), b"payload"])), V5) {
        Packet::Publish(p) => {
            assert_eq!((p.topic, p.properties.topic_alias, p.payload), ("", Some(7), &b"payload"[..]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn publish_packet_ids() {
    assert_eq!(err(&pkt(0x32, &cat(&[&s("t"), &[0, 0]])), V311), ZeroPacketId);
    assert_eq!(err(&pkt(0x34, &cat(&[&s("t"), &[0, 0], &[0]])), V5), ZeroPacketId);
    assert_eq!(err(&pkt(0x32, &cat(&[&s("t"), &[0]])), V311), Truncated("packet identifier"));
    assert_eq!(err(&pkt(0x30, &[0, 5, b'a']), V311), Truncated("topic name"));
}

#[test]
fn payload_format_is_not_checked_by_the_codec() {
    let bytes = pkt(0x30, &cat(&[&s("t"), &props(&[0x01, 1]), &[0xFF, 0xFE]]));
    match ok(&bytes, V5) {
        Packet::Publish(p) => {
            assert_eq!((p.properties.payload_format_indicator, p.payload), (Some(1), &[0xFF, 0xFE][..]))
        }
        other => panic!("{other:?}"),
    }
}

// ---- acks ----

#[test]
fn ack_rules() {
    for first in [0x40u8, 0x50, 0x62, 0x70] {
        assert_eq!(err(&pkt(first, &[0, 0]), V311), ZeroPacketId);
        assert_eq!(err(&pkt(first, &[0]), V5), Truncated("packet identifier"));
        assert_eq!(err(&pkt(first, &[0, 1, 0]), V311), TrailingBytes(1));
        // 5.0 short forms.
        let want = Ack::new(PacketId(1), ReasonCode::SUCCESS);
        assert_eq!(ok(&pkt(first, &[0, 1]), V5), ack_of(first, want));
    }
    let want = Packet::PubAck(Ack::new(PacketId(1), ReasonCode::NO_MATCHING_SUBSCRIBERS));
    assert_eq!(ok(&pkt(0x40, &[0, 1, 0x10]), V5), want);
    let want = Packet::PubComp(Ack::new(PacketId(1), ReasonCode::PACKET_IDENTIFIER_NOT_FOUND));
    assert_eq!(ok(&pkt(0x70, &[0, 1, 0x92, 0]), V5), want);
    assert_eq!(err(&pkt(0x40, &[0, 1, 0x92]), V5), InvalidReasonCode(0x92));
    assert_eq!(err(&pkt(0x50, &[0, 1, 0x01]), V5), InvalidReasonCode(0x01));
    assert_eq!(err(&pkt(0x62, &[0, 1, 0x10]), V5), InvalidReasonCode(0x10));
    assert_eq!(err(&pkt(0x70, &[0, 1, 0x80]), V5), InvalidReasonCode(0x80));
    assert_eq!(err(&pkt(0x40, &[0, 1, 0, 5, 0x1F]), V5), Truncated("properties"));
    assert_eq!(err(&pkt(0x40, &[0, 1, 0, 2, 0x1F, 0, 0]), V5), Truncated("property value"));
    assert_eq!(err(&pkt(0x40, &[0, 1, 0, 3, 0x1F, 0, 0, 7]), V5), TrailingBytes(1));
}

fn ack_of(first: u8, a: Ack<'static>) -> Packet<'static> {
    match first >> 4 {
        4 => Packet::PubAck(a),
        5 => Packet::PubRec(a),
        6 => Packet::PubRel(a),
        _ => Packet::PubComp(a),
    }
}

// ---- SUBSCRIBE / UNSUBSCRIBE ----

#[test]
fn subscribe_rules() {
    let sub = |opts: u8, filter: &str| pkt(0x82, &cat(&[&[0, 1], &s(filter), &[opts]]));
    let sub5 = |opts: u8, filter: &str| pkt(0x82, &cat(&[&[0, 1], &[0], &s(filter), &[opts]]));
    assert_eq!(err(&pkt(0x82, &[0, 1]), V311), EmptyFilterList);
    assert_eq!(err(&pkt(0x82, &[0, 1, 0]), V5), EmptyFilterList);
    assert_eq!(err(&pkt(0x82, &cat(&[&[0, 0], &s("a"), &[0]])), V311), ZeroPacketId);
    assert_eq!(err(&sub(3, "a"), V311), InvalidQos);
    assert_eq!(err(&sub5(3, "a"), V5), InvalidQos);
    assert_eq!(err(&sub(0x04, "a"), V311), InvalidSubscriptionOptions);
    assert_eq!(err(&sub(0x80, "a"), V311), InvalidSubscriptionOptions);
    assert_eq!(err(&sub5(0x40, "a"), V5), InvalidSubscriptionOptions);
    assert_eq!(err(&sub5(0x80, "a"), V5), InvalidSubscriptionOptions);
    assert_eq!(err(&sub5(0x30, "a"), V5), InvalidSubscriptionOptions);
    assert_eq!(err(&sub5(0x04, "$share/g/a"), V5), InvalidSubscriptionOptions);
    for bad in ["a/#/b", "a+", "a/b#", "$share//a", "$share/g", "$share/g+/a", ""] {
        assert_eq!(err(&sub(0, bad), V311), InvalidTopicFilter, "{bad:?}");
    }
    assert_eq!(err(&pkt(0x82, &cat(&[&[0, 1], &s("a")])), V311), Truncated("subscription options"));
    match ok(&sub5(0x2E, "a/+"), V5) {
        Packet::Subscribe(s) => {
            let o = SubOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            };
            assert_eq!(s.filters, vec![("a/+", o)]);
        }
        other => panic!("{other:?}"),
    }
    // A subscription identifier, once.
    let with_id = |p: &[u8]| pkt(0x82, &cat(&[&[0, 1], &props(p), &s("a"), &[0]]));
    match ok(&with_id(&[0x0B, 0xFF, 0x7F]), V5) {
        Packet::Subscribe(s) => assert_eq!(s.properties.subscription_identifiers, vec![16_383]),
        other => panic!("{other:?}"),
    }
    assert_eq!(err(&with_id(&[0x0B, 1, 0x0B, 2]), V5), DuplicateProperty(0x0B));
    assert_eq!(err(&with_id(&[0x0B, 0]), V5), InvalidPropertyValue(0x0B));
    assert_eq!(err(&with_id(&[0x0B, 0xFF, 0xFF, 0xFF, 0xFF]), V5), MalformedLength);
    assert_eq!(err(&with_id(&[0x1F, 0, 0]), V5), PropertyNotAllowed(0x1F));
}

#[test]
fn unsubscribe_rules() {
    assert_eq!(err(&pkt(0xA2, &[0, 1]), V311), EmptyFilterList);
    assert_eq!(err(&pkt(0xA2, &[0, 1, 0]), V5), EmptyFilterList);
    assert_eq!(err(&pkt(0xA2, &cat(&[&[0, 0], &s("a")])), V311), ZeroPacketId);
    assert_eq!(err(&pkt(0xA2, &cat(&[&[0, 1], &s("a/#/b")])), V311), InvalidTopicFilter);
    assert_eq!(err(&pkt(0xA2, &cat(&[&[0, 1], &s("a"), &[0]])), V311), Truncated("topic filter"));
    assert_eq!(err(&pkt(0xA2, &cat(&[&[0, 1], &props(&[0x0B, 1]), &s("a")])), V5), PropertyNotAllowed(0x0B));
}

#[test]
fn suback_unsuback_rules() {
    assert_eq!(err(&pkt(0x90, &[0, 1]), V311), Truncated("reason codes"));
    assert_eq!(err(&pkt(0x90, &[0, 1, 0]), V5), Truncated("reason codes"));
    assert_eq!(err(&pkt(0x90, &[0, 1, 3]), V311), InvalidReasonCode(3));
    assert_eq!(err(&pkt(0x90, &[0, 1, 0x87]), V311), InvalidReasonCode(0x87));
    assert_eq!(err(&pkt(0x90, &[0, 1, 0, 3]), V5), InvalidReasonCode(3));
    assert_eq!(err(&pkt(0x90, &[0, 1, 0, 0x11]), V5), InvalidReasonCode(0x11));
    assert_eq!(err(&pkt(0xB0, &[0, 1, 0, 1]), V5), InvalidReasonCode(1));
    assert_eq!(err(&pkt(0xB0, &[0, 1, 0]), V5), Truncated("reason codes"));
    assert_eq!(err(&pkt(0xB0, &[0, 1, 0]), V311), TrailingBytes(1));
    assert_eq!(err(&pkt(0xB0, &[0, 0]), V311), ZeroPacketId);
    assert_eq!(
        ok(&pkt(0x90, &[0, 1, 0x80, 2]), V311),
        Packet::SubAck(SubAck {
            packet_id: PacketId(1),
            reasons: vec![ReasonCode(0x80), ReasonCode(2)],
            properties: Properties::default(),
        })
    );
}

// ---- PINGs, DISCONNECT, AUTH ----

#[test]
fn empty_packets_have_no_body() {
    assert_eq!(err(&pkt(0xC0, &[0]), V5), TrailingBytes(1));
    assert_eq!(err(&pkt(0xD0, &[0, 0]), V311), TrailingBytes(2));
    assert_eq!(err(&pkt(0xE0, &[0]), V311), TrailingBytes(1));
    assert_eq!(ok(&pkt(0xD0, &[]), V311), Packet::PingResp);
}

#[test]
fn disconnect_and_auth_short_forms() {
    assert_eq!(ok(&pkt(0xE0, &[]), V5), Packet::Disconnect(Disconnect::default()));
    let busy = Disconnect { reason: ReasonCode::SERVER_BUSY, properties: Properties::default() };
    assert_eq!(ok(&pkt(0xE0, &[0x89]), V5), Packet::Disconnect(busy.clone()));
    assert_eq!(ok(&pkt(0xE0, &[0x89, 0]), V5), Packet::Disconnect(busy));
    assert_eq!(err(&pkt(0xE0, &[0x01]), V5), InvalidReasonCode(1));
    assert_eq!(err(&pkt(0xE0, &[0x00, 0x02, 0x11, 0]), V5), Truncated("property value"));
    assert_eq!(err(&pkt(0xE0, &[0x00, 0x02, 0x21, 0, 1]), V5), PropertyNotAllowed(0x21));
    let cont = Auth { reason: ReasonCode::CONTINUE_AUTHENTICATION, properties: Properties::default() };
    assert_eq!(ok(&pkt(0xF0, &[0x18]), V5), Packet::Auth(cont.clone()));
    assert_eq!(ok(&pkt(0xF0, &[0x18, 0]), V5), Packet::Auth(cont));
    assert_eq!(err(&pkt(0xF0, &[0x04]), V5), InvalidReasonCode(4));
    let method = cat(&[&[0x19], &props(&cat(&[&[0x15], &s("SCRAM")]))]);
    match ok(&pkt(0xF0, &method), V5) {
        Packet::Auth(a) => assert_eq!(a.properties.authentication_method, Some("SCRAM")),
        other => panic!("{other:?}"),
    }
}

// ---- properties ----

/// A 5.0 DISCONNECT carrying `p`, for properties allowed there, or a CONNECT for the rest.
fn with_props(first: u8, p: &[u8]) -> (Vec<u8>, Option<Protocol>) {
    match first {
        0x10 => (connect("MQTT", 5, 0x02, &props(p), &s("c")), None),
        0x20 => (pkt(0x20, &cat(&[&[0, 0], &props(p)])), V5),
        0x30 => (pkt(0x30, &cat(&[&s("t"), &props(p)])), V5),
        _ => (pkt(0xE0, &cat(&[&[0], &props(p)])), V5),
    }
}

#[test]
fn property_errors() {
    let cases: &[(u8, &[u8], DecodeError)] = &[
        (0xE0, &[0x05, 0], UnknownProperty(0x05)),
        (0xE0, &[0x80, 0], UnknownProperty(0x80)),
        (0x10, &[0x23, 0, 1], PropertyNotAllowed(0x23)),
        (0x10, &[0x18, 0, 0, 0, 1], PropertyNotAllowed(0x18)),
        (0x30, &[0x11, 0, 0, 0, 1], PropertyNotAllowed(0x11)),
        (0xE0, &[0x1F, 0, 0, 0x1F, 0, 0], DuplicateProperty(0x1F)),
        (0x10, &[0x21, 0, 1, 0x21, 0, 1], DuplicateProperty(0x21)),
        (0x10, &[0x21, 0, 0], InvalidPropertyValue(0x21)),
        (0x10, &[0x27, 0, 0, 0, 0], InvalidPropertyValue(0x27)),
        (0x10, &[0x17, 2], InvalidPropertyValue(0x17)),
        (0x10, &[0x19, 2], InvalidPropertyValue(0x19)),
        (0x20, &[0x24, 2], InvalidPropertyValue(0x24)),
        (0x20, &[0x25, 2], InvalidPropertyValue(0x25)),
        (0x20, &[0x28, 2], InvalidPropertyValue(0x28)),
        (0x20, &[0x29, 2], InvalidPropertyValue(0x29)),
        (0x20, &[0x2A, 2], InvalidPropertyValue(0x2A)),
        (0x20, &[0x21, 0, 0], InvalidPropertyValue(0x21)),
        (0x30, &[0x23, 0, 0], InvalidPropertyValue(0x23)),
        (0x30, &[0x01, 2], InvalidPropertyValue(0x01)),
        (0x30, &[0x0B, 0], InvalidPropertyValue(0x0B)),
        (0x30, &[0x08, 0, 1, b'#'], InvalidPropertyValue(0x08)),
        (0x30, &[0x01, 1, 0x01, 1], DuplicateProperty(0x01)),
        (0x30, &[0x02, 0, 0], Truncated("property value")),
        (0xE0, &[0x1F, 0], Truncated("property value")),
        (0xE0, &[0x1F, 0, 1, 0], ForbiddenCharacter),
    ];
    for (first, p, want) in cases {
        let (bytes, protocol) = with_props(*first, p);
        assert_eq!(err(&bytes, protocol), *want, "{first:#04x} {p:02x?}");
    }
    // Property length that runs past the packet.
    assert_eq!(err(&pkt(0xE0, &[0, 9, 0x1F]), V5), Truncated("properties"));
    assert_eq!(err(&pkt(0xE0, &[0, 0x80]), V5), Truncated("property length"));
}

#[test]
fn repeatable_properties() {
    let (bytes, p) =
        with_props(0x30, &[0x0B, 1, 0x0B, 2, 0x26, 0, 1, b'k', 0, 0, 0x26, 0, 1, b'k', 0, 1, b'v']);
    match ok(&bytes, p) {
        Packet::Publish(p) => {
            assert_eq!(p.properties.subscription_identifiers, vec![1, 2]);
            assert_eq!(p.properties.user_properties, vec![("k", ""), ("k", "v")]);
        }
        other => panic!("{other:?}"),
    }
    // Will properties are separate from CONNECT's own and follow the will table.
    let will_props = props(&[0x18, 0, 0, 0, 5]);
    let payload = cat(&[&s("c"), &will_props, &s("w"), &s("p")]);
    match ok(&connect("MQTT", 5, 0x06, &props(&[0x11, 0, 0, 0, 9]), &payload), None) {
        Packet::Connect(c) => {
            assert_eq!(c.properties.session_expiry_interval_s, Some(9));
            assert_eq!(c.will.map(|w| w.properties.will_delay_interval_s), Some(Some(5)));
        }
        other => panic!("{other:?}"),
    }
    let bad_will = cat(&[&s("c"), &props(&[0x11, 0, 0, 0, 5]), &s("w"), &s("p")]);
    assert_eq!(err(&connect("MQTT", 5, 0x06, &[0], &bad_will), None), PropertyNotAllowed(0x11));
}

#[test]
fn errors_map_to_reason_codes() {
    assert_eq!(UnknownProtocolName { level: 4 }.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
    assert_eq!(UnknownProtocolName { level: 4 }.fault(), Fault::Peer);
    assert_eq!(PacketTooLarge { size: 2, max: 1 }.fault(), Fault::Limit);
    assert_eq!(ReservedConnAckFlags(2).reason_code(), ReasonCode::MALFORMED_PACKET);
}

/// Every prefix of a valid packet that ends inside it must wait for more bytes, and decoding the whole
/// thing with extra bytes after it must consume only the packet.
#[test]
fn truncation_at_every_prefix() {
    let packets: Vec<(Vec<u8>, Option<Protocol>)> = vec![
        (
            connect(
                "MQTT",
                5,
                0xF6,
                &props(&[0x11, 0, 0, 0, 9]),
                &cat(&[&s("c"), &[0], &s("w"), &s("p"), &s("u"), &s("pw")]),
            ),
            None,
        ),
        (connect("MQIsdp", 3, 0xC2, &[], &cat(&[&s("c"), &s("u"), &s("pw")])), None),
        (pkt(0x3D, &cat(&[&s("a/b"), &[0, 7], &props(&[0x23, 0, 1]), &vec![7u8; 300]])), V5),
        (pkt(0x82, &cat(&[&[0, 1], &s("a/+"), &[1], &s("$share/g/#"), &[2]])), V311),
        (pkt(0xF0, &cat(&[&[0x18], &props(&cat(&[&[0x15], &s("m")]))])), V5),
    ];
    for (bytes, protocol) in packets {
        let (p, n) = decode(&bytes, protocol, MAX).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        for i in 0..bytes.len() {
            assert_eq!(decode(&bytes[..i], protocol, MAX), Ok(None), "prefix {i} of {p:?}");
        }
        let mut more = bytes.clone();
        more.extend_from_slice(&[0xC0, 0x00]);
        assert_eq!(decode(&more, protocol, MAX), Ok(Some((p, n))));
    }
}
