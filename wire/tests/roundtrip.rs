//! Property tests: every valid packet of every type survives encode → decode unchanged (3.1, 3.1.1 and
//! 5.0, with arbitrary properties allowed in that packet), sizes agree, every truncation waits for more
//! bytes, and arbitrary or mutated bytes never panic the decoder.
//!
//! Generated strings and byte fields are leaked to get `'static` borrows: simpler than mirroring every
//! packet type with an owned twin, and the leak is bounded by the number of cases.

use proptest::collection::vec;
use proptest::option::of as opt;
use proptest::prelude::*;
use shardmq_wire::*;

const MAX: u32 = u32::MAX;

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn leak_bytes(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

/// Any text MQTT allows in a string field: every scalar value but U+0000.
fn text(max: usize) -> impl Strategy<Value = &'static str> {
    vec(any::<char>().prop_filter("U+0000", |c| *c != '\0'), 0..max)
        .prop_map(|cs| leak(cs.into_iter().collect()))
}

fn bytes(max: usize) -> impl Strategy<Value = &'static [u8]> {
    vec(any::<u8>(), 0..max).prop_map(leak_bytes)
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{0,4}",
        "\\$?[A-Z]{1,3}",
        vec(any::<char>().prop_filter("reserved", |c| !matches!(*c, '\0' | '+' | '#' | '/')), 0..4)
            .prop_map(|cs| cs.into_iter().collect()),
    ]
}

fn topic_name() -> impl Strategy<Value = &'static str> {
    vec(level(), 1..5).prop_map(|ls| ls.join("/")).prop_filter("empty", |t| !t.is_empty()).prop_map(leak)
}

fn topic_filter() -> impl Strategy<Value = &'static str> {
    let lvl = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    let plain = (vec(lvl, 1..5), any::<bool>())
        .prop_map(|(mut ls, hash)| {
            if hash {
                ls.push("#".into());
            }
            ls.join("/")
        })
        .prop_filter("empty", |f| !f.is_empty());
    (opt("[a-z]{1,4}"), plain).prop_map(|(group, f)| match group {
        Some(g) => leak(format!("$share/{g}/{f}")),
        None => leak(f),
    })
}

fn flag() -> impl Strategy<Value = u8> {
    0u8..=1
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1u16..).prop_map(PacketId)
}

fn reason(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(codes).prop_map(ReasonCode)
}

// Reason-code tables copied from the MQTT 5.0 spec independently of the decoder's, as a cross-check.
const CONNACK: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99,
    0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL: &[u8] = &[0x00, 0x92];
const SUBACK: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
const UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96,
    0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH: &[u8] = &[0x00, 0x18, 0x19];
/// 5.0 codes whose 3.1.1 CONNACK return code maps back to themselves.
const CONNACK_V3: &[u8] = &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87];
const SUBACK_V3: &[u8] = &[0x00, 0x01, 0x02, 0x80];

/// Every property with a valid value, each present half the time; [`restrict`] then keeps what the packet
/// allows.
fn any_props() -> impl Strategy<Value = Properties<'static>> {
    let a = (
        opt(flag()),
        opt(any::<u32>()),
        opt(text(6)),
        opt(topic_name()),
        opt(bytes(6)),
        vec(1u32..=268_435_455, 0..3),
        opt(any::<u32>()),
        opt(text(6)),
        opt(any::<u16>()),
    );
    let b = (
        opt(text(6)),
        opt(bytes(6)),
        opt(flag()),
        opt(any::<u32>()),
        opt(flag()),
        opt(text(6)),
        opt(text(6)),
        opt(text(6)),
        opt(1u16..),
    );
    let c = (
        opt(any::<u16>()),
        opt(1u16..),
        opt(flag()),
        opt(flag()),
        vec((text(4), text(4)), 0..3),
        opt(1u32..),
        opt(flag()),
        opt(flag()),
        opt(flag()),
    );
    (a, b, c).prop_map(|(a, b, c)| Properties {
        payload_format_indicator: a.0,
        message_expiry_interval_s: a.1,
        content_type: a.2,
        response_topic: a.3,
        correlation_data: a.4,
        subscription_identifiers: a.5,
        session_expiry_interval_s: a.6,
        assigned_client_identifier: a.7,
        server_keep_alive_s: a.8,
        authentication_method: b.0,
        authentication_data: b.1,
        request_problem_information: b.2,
        will_delay_interval_s: b.3,
        request_response_information: b.4,
        response_information: b.5,
        server_reference: b.6,
        reason_string: b.7,
        receive_maximum: b.8,
        topic_alias_maximum: c.0,
        topic_alias: c.1,
        maximum_qos: c.2,
        retain_available: c.3,
        user_properties: c.4,
        maximum_packet_size: c.5,
        wildcard_subscription_available: c.6,
        subscription_identifier_available: c.7,
        shared_subscription_available: c.8,
    })
}

fn restrict(mut p: Properties<'static>, ty: PacketType, will: bool) -> Properties<'static> {
    use PropertyId::*;
    let ok = |id: PropertyId| id.allowed_in(ty, will);
    macro_rules! keep {
        ($($id:ident => $field:ident),* $(,)?) => {
            $(if !ok($id) { p.$field = Default::default(); })*
        };
    }
    keep!(
        PayloadFormatIndicator => payload_format_indicator,
        MessageExpiryInterval => message_expiry_interval_s,
        ContentType => content_type,
        ResponseTopic => response_topic,
        CorrelationData => correlation_data,
        SubscriptionIdentifier => subscription_identifiers,
        SessionExpiryInterval => session_expiry_interval_s,
        AssignedClientIdentifier => assigned_client_identifier,
        ServerKeepAlive => server_keep_alive_s,
        AuthenticationMethod => authentication_method,
        AuthenticationData => authentication_data,
        RequestProblemInformation => request_problem_information,
        WillDelayInterval => will_delay_interval_s,
        RequestResponseInformation => request_response_information,
        ResponseInformation => response_information,
        ServerReference => server_reference,
        ReasonString => reason_string,
        ReceiveMaximum => receive_maximum,
        TopicAliasMaximum => topic_alias_maximum,
        TopicAlias => topic_alias,
        MaximumQos => maximum_qos,
        RetainAvailable => retain_available,
        UserProperty => user_properties,
        MaximumPacketSize => maximum_packet_size,
        WildcardSubscriptionAvailable => wildcard_subscription_available,
        SubscriptionIdentifierAvailable => subscription_identifier_available,
        SharedSubscriptionAvailable => shared_subscription_available,
    );
    if ty == PacketType::Subscribe {
        p.subscription_identifiers.truncate(1);
    }
    p
}

fn props(ty: PacketType) -> impl Strategy<Value = Properties<'static>> {
    any_props().prop_map(move |p| restrict(p, ty, false))
}

fn will(v5: bool) -> impl Strategy<Value = Will<'static>> {
    (topic_name(), bytes(8), qos(), any::<bool>(), any_props()).prop_map(
        move |(topic, payload, qos, retain, p)| {
            let properties = if v5 { restrict(p, PacketType::Connect, true) } else { Properties::default() };
            Will { topic, payload, qos, retain, properties }
        },
    )
}

fn connect(protocol: Protocol) -> impl Strategy<Value = Packet<'static>> {
    let v5 = protocol.is_v5();
    (
        any::<bool>(),
        any::<u16>(),
        text(8),
        opt(will(v5)),
        opt(text(6)),
        opt(bytes(6)),
        props(PacketType::Connect),
    )
        .prop_map(move |(clean_start, keep_alive_s, client_id, will, username, password, p)| {
            // 3.1.1 forbids a password without a user name.
            let password = if v5 || username.is_some() { password } else { None };
            Packet::Connect(Connect {
                protocol,
                clean_start,
                keep_alive_s,
                client_id,
                will,
                username,
                password,
                properties: if v5 { p } else { Properties::default() },
            })
        })
}

fn publish(v5: bool) -> impl Strategy<Value = Packet<'static>> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        bytes(32),
        props(PacketType::Publish),
        1u16..,
    )
        .prop_flat_map(move |(dup, qos, retain, topic, id, payload, p, alias)| {
            // In 5.0 an empty topic plus a topic alias is valid.
            let empty_topic = if v5 { any::<bool>().boxed() } else { Just(false).boxed() };
            empty_topic.prop_map(move |empty| {
                let mut properties = if v5 { p.clone() } else { Properties::default() };
                let topic = if empty {
                    properties.topic_alias = Some(alias);
                    ""
                } else {
                    topic
                };
                Packet::Publish(Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    topic,
                    packet_id: (qos != QoS::AtMostOnce).then_some(id),
                    payload,
                    properties,
                })
            })
        })
}

fn ack(ty: PacketType, v5: bool) -> impl Strategy<Value = Packet<'static>> {
    let codes = if matches!(ty, PacketType::PubAck | PacketType::PubRec) { PUBACK } else { PUBREL };
    (packet_id(), reason(codes), props(ty)).prop_map(move |(id, reason, properties)| {
        let ack =
            if v5 { Ack { packet_id: id, reason, properties } } else { Ack::new(id, ReasonCode::SUCCESS) };
        match ty {
            PacketType::PubAck => Packet::PubAck(ack),
            PacketType::PubRec => Packet::PubRec(ack),
            PacketType::PubRel => Packet::PubRel(ack),
            _ => Packet::PubComp(ack),
        }
    })
}

fn sub_options(v5: bool) -> impl Strategy<Value = SubOptions> {
    (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, nl, rap, rh)| {
        if v5 {
            SubOptions { qos, no_local: nl, retain_as_published: rap, retain_handling: rh }
        } else {
            SubOptions { qos, ..Default::default() }
        }
    })
}

fn v5_or_empty(v5: bool, p: Properties<'static>) -> Properties<'static> {
    if v5 {
        p
    } else {
        Properties::default()
    }
}

fn subscribe(v5: bool) -> impl Strategy<Value = Packet<'static>> {
    (packet_id(), vec((topic_filter(), sub_options(v5)), 1..5), props(PacketType::Subscribe)).prop_map(
        move |(packet_id, mut filters, p)| {
            for (f, o) in &mut filters {
                // No Local on a shared subscription is a protocol error.
                if f.starts_with("$share/") {
                    o.no_local = false;
                }
            }
            Packet::Subscribe(Subscribe { packet_id, filters, properties: v5_or_empty(v5, p) })
        },
    )
}

fn v5_packet() -> impl Strategy<Value = Packet<'static>> {
    use PacketType as T;
    prop_oneof![
        connect(Protocol::V5),
        (any::<bool>(), reason(CONNACK), props(T::ConnAck)).prop_map(
            |(session_present, reason, properties)| {
                Packet::ConnAck(ConnAck { session_present, reason, properties })
            }
        ),
        publish(true),
        ack(T::PubAck, true),
        ack(T::PubRec, true),
        ack(T::PubRel, true),
        ack(T::PubComp, true),
        subscribe(true),
        (packet_id(), vec(reason(SUBACK), 1..5), props(T::SubAck)).prop_map(
            |(packet_id, reasons, properties)| Packet::SubAck(SubAck { packet_id, reasons, properties })
        ),
        (packet_id(), vec(topic_filter(), 1..5), props(T::Unsubscribe)).prop_map(
            |(packet_id, filters, properties)| {
                Packet::Unsubscribe(Unsubscribe { packet_id, filters, properties })
            }
        ),
        (packet_id(), vec(reason(UNSUBACK), 1..5), props(T::UnsubAck)).prop_map(
            |(packet_id, reasons, properties)| {
                Packet::UnsubAck(UnsubAck { packet_id, reasons, properties })
            }
        ),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        (reason(DISCONNECT), props(T::Disconnect))
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties })),
        (reason(AUTH), props(T::Auth))
            .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties })),
    ]
}

fn v3_packet(protocol: Protocol) -> impl Strategy<Value = Packet<'static>> {
    use PacketType as T;
    let none = Properties::default;
    prop_oneof![
        connect(protocol),
        (any::<bool>(), reason(CONNACK_V3)).prop_map(move |(session_present, reason)| {
            Packet::ConnAck(ConnAck { session_present, reason, properties: none() })
        }),
        publish(false),
        ack(T::PubAck, false),
        ack(T::PubRec, false),
        ack(T::PubRel, false),
        ack(T::PubComp, false),
        subscribe(false),
        (packet_id(), vec(reason(SUBACK_V3), 1..5)).prop_map(move |(packet_id, reasons)| Packet::SubAck(
            SubAck { packet_id, reasons, properties: none() }
        )),
        (packet_id(), vec(topic_filter(), 1..5)).prop_map(move |(packet_id, filters)| {
            Packet::Unsubscribe(Unsubscribe { packet_id, filters, properties: none() })
        }),
        packet_id().prop_map(move |packet_id| Packet::UnsubAck(UnsubAck {
            packet_id,
            reasons: Vec::new(),
            properties: none()
        })),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect(Disconnect::default())),
    ]
}

fn decode_protocol(p: &Packet<'_>, protocol: Protocol) -> Option<Protocol> {
    (!matches!(p, Packet::Connect(_))).then_some(protocol)
}

fn check_roundtrip(p: &Packet<'static>, protocol: Protocol) -> Result<(), TestCaseError> {
    // Encode after existing bytes: encode appends and reports only what it wrote.
    let mut out = vec![0xEE; 3];
    let n = encode(p, protocol, &mut out).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    prop_assert_eq!(n, out.len() - 3);
    prop_assert_eq!(encoded_len(p, protocol), Ok(n));
    let buf = &out[3..];
    let dp = decode_protocol(p, protocol);
    let decoded = decode(buf, dp, MAX);
    prop_assert_eq!(decoded, Ok(Some((p.clone(), n))));
    // A CONNECT decodes the same whatever the connection thinks its protocol is.
    if let Packet::Connect(c) = p {
        prop_assert_eq!(decode(buf, Some(Protocol::V5), MAX), Ok(Some((p.clone(), n))));
        prop_assert_eq!(peek_protocol(buf), Some(c.protocol));
    }
    // Trailing bytes of the next packet are not consumed.
    let mut two = buf.to_vec();
    two.extend_from_slice(buf);
    prop_assert_eq!(decode(&two, dp, MAX), Ok(Some((p.clone(), n))));
    // Every strict prefix is an incomplete packet, never an error.
    for i in 0..n {
        prop_assert_eq!(decode(&buf[..i], dp, MAX), Ok(None), "prefix {}", i);
    }
    // The size limit is inclusive and decided from the header.
    let f = frame(buf, n as u32).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(f.map(|f| f.total_len()), Some(n));
    let header_len = f.map_or(0, |f| f.header_len);
    prop_assert_eq!(
        decode(&buf[..header_len], dp, n as u32 - 1),
        Err(DecodeError::PacketTooLarge { size: n as u64, max: n as u32 - 1 })
    );
    Ok(())
}

/// What the fuzz target checks: anything that decodes re-encodes to something that decodes equal.
fn check_decoded_reencodes(bytes: &[u8], protocol: Option<Protocol>) -> Result<(), TestCaseError> {
    if let Ok(Some((p, used))) = decode(bytes, protocol, MAX) {
        prop_assert!(used <= bytes.len());
        let enc_protocol = match &p {
            Packet::Connect(c) => c.protocol,
            _ => protocol.unwrap_or(Protocol::V5),
        };
        let mut out = Vec::new();
        let n =
            encode(&p, enc_protocol, &mut out).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
        prop_assert_eq!(encoded_len(&p, enc_protocol), Ok(n));
        prop_assert_eq!(decode(&out, protocol, MAX), Ok(Some((p, n))));
    }
    Ok(())
}

fn any_protocol() -> impl Strategy<Value = Option<Protocol>> {
    prop_oneof![Just(None), Just(Some(Protocol::V31)), Just(Some(Protocol::V311)), Just(Some(Protocol::V5))]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn v5_packets_roundtrip(p in v5_packet()) {
        check_roundtrip(&p, Protocol::V5)?;
    }

    #[test]
    fn v311_packets_roundtrip(p in v3_packet(Protocol::V311)) {
        check_roundtrip(&p, Protocol::V311)?;
    }

    #[test]
    fn v31_packets_roundtrip(p in v3_packet(Protocol::V31)) {
        check_roundtrip(&p, Protocol::V31)?;
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..300), protocol in any_protocol()) {
        let _ = frame(&bytes, MAX);
        let _ = peek_protocol(&bytes);
        check_decoded_reencodes(&bytes, protocol)?;
    }

    /// Random bytes rarely get past the fixed header; flipping bytes of valid packets reaches the
    /// body parsers.
    #[test]
    fn mutated_packets_never_panic(
        p in v5_packet(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        protocol in any_protocol(),
    ) {
        let mut buf = Vec::new();
        encode(&p, Protocol::V5, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (i, b) in edits {
            let i = i.index(buf.len());
            buf[i] = b;
        }
        let _ = peek_protocol(&buf);
        check_decoded_reencodes(&buf, protocol)?;
    }

    #[test]
    fn mutated_v3_packets_never_panic(
        p in v3_packet(Protocol::V311),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut buf = Vec::new();
        encode(&p, Protocol::V311, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (i, b) in edits {
            let i = i.index(buf.len());
            buf[i] = b;
        }
        check_decoded_reencodes(&buf, Some(Protocol::V311))?;
        check_decoded_reencodes(&buf, Some(Protocol::V31))?;
    }
}
