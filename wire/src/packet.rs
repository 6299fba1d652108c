//! Packet types. Every borrowed field points into the buffer given to [`crate::decode`].

use crate::{Properties, ReasonCode};

/// Protocol level carried in CONNECT. 3.1 ("MQIsdp", level 3) is accepted with 3.1.1 semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    V31,
    V311,
    V5,
}

impl Protocol {
    pub fn is_v5(self) -> bool {
        matches!(self, Protocol::V5)
    }
    /// Protocol level byte on the wire.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V31 => 3,
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT packet identifier; never 0 on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PacketId(pub u16);

/// Control packet type (the high nibble of the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    pub fn from_u8(v: u8) -> Option<PacketType> {
        use PacketType::*;
        Some(match v {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            15 => Auth,
            _ => return None,
        })
    }
}

// CONNECT carries two property blocks and dwarfs the rest; boxing it would cost an allocation per
// connection for a value that lives on the stack for one decode call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    ConnAck(ConnAck<'a>),
    Publish(Publish<'a>),
    PubAck(Ack<'a>),
    PubRec(Ack<'a>),
    PubRel(Ack<'a>),
    PubComp(Ack<'a>),
    Subscribe(Subscribe<'a>),
    SubAck(SubAck<'a>),
    Unsubscribe(Unsubscribe<'a>),
    UnsubAck(UnsubAck<'a>),
    PingReq,
    PingResp,
    Disconnect(Disconnect<'a>),
    /// MQTT 5.0 only.
    Auth(Auth<'a>),
}

impl Packet<'_> {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    pub protocol: Protocol,
    /// "Clean Start" in 5.0, "Clean Session" in 3.1.1.
    pub clean_start: bool,
    pub keep_alive_s: u16,
    /// May be empty (the server assigns one, or refuses in 3.1.1 when `clean_start` is false).
    pub client_id: &'a str,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (5.0): will delay, payload format, message expiry, content type, response topic,
    /// correlation data, user properties.
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck<'a> {
    pub session_present: bool,
    /// The 5.0 reason code. For 3.1/3.1.1 the encoder maps it to the 3.1.1 return code
    /// ([`ReasonCode::to_v3_connack`]) and the decoder maps a return code back ([`ReasonCode::from_v3_connack`]).
    pub reason: ReasonCode,
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in 5.0 when a topic alias is present.
    pub topic: &'a str,
    /// `Some` exactly when `qos > 0`.
    pub packet_id: Option<PacketId>,
    pub payload: &'a [u8],
    pub properties: Properties<'a>,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack<'a> {
    pub packet_id: PacketId,
    /// Always `Success` for 3.1.1.
    pub reason: ReasonCode,
    pub properties: Properties<'a>,
}

impl Ack<'_> {
    pub fn new(packet_id: PacketId, reason: ReasonCode) -> Self {
        Ack { packet_id, reason, properties: Properties::default() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: QoS,
    /// 5.0 only (always false in 3.1.1).
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe<'a> {
    pub packet_id: PacketId,
    /// At least one entry (an empty SUBSCRIBE is a protocol error).
    pub filters: Vec<(&'a str, SubOptions)>,
    /// Subscription identifier and user properties.
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck<'a> {
    pub packet_id: PacketId,
    /// One per filter. For 3.1.1 only 0x00, 0x01, 0x02 and 0x80 exist; the encoder maps any
    /// code >= 0x80 to 0x80.
    pub reasons: Vec<ReasonCode>,
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    pub packet_id: PacketId,
    pub filters: Vec<&'a str>,
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck<'a> {
    pub packet_id: PacketId,
    /// 5.0 only: one per filter. Empty for 3.1.1 (the packet has no payload).
    pub reasons: Vec<ReasonCode>,
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect<'a> {
    /// 5.0 only; 3.1.1 DISCONNECT has no variable header.
    pub reason: ReasonCode,
    pub properties: Properties<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth<'a> {
    pub reason: ReasonCode,
    pub properties: Properties<'a>,
}
