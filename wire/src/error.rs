//! Codec errors, classified by fault so callers can map them to the protocol's reason codes in one place.

use crate::ReasonCode;

/// Who is to blame for an error; drives logging level and counters in the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The bytes are not a well-formed MQTT packet.
    Malformed,
    /// Well-formed, but the peer broke a protocol rule.
    Peer,
    /// A configured limit was exceeded.
    Limit,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed remaining length")]
    MalformedLength,
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: u64, max: u32 },
    #[error("unknown packet type {0}")]
    UnknownPacketType(u8),
    #[error("reserved fixed-header flags {flags:#06b} for packet type {packet_type}")]
    InvalidFlags { packet_type: u8, flags: u8 },
    #[error("packet truncated: {0}")]
    Truncated(&'static str),
    #[error("{0} bytes left over after the packet")]
    TrailingBytes(usize),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string contains a forbidden character (U+0000 or a non-character)")]
    ForbiddenCharacter,
    /// `level` is the protocol level byte that followed the name (0 if the packet ended first), so the
    /// broker can still pick a CONNACK format.
    #[error("unknown protocol name (protocol level {level})")]
    UnknownProtocolName { level: u8 },
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("reserved CONNECT flag set")]
    ReservedConnectFlag,
    #[error("invalid will flags")]
    InvalidWillFlags,
    #[error("password without user name (3.1.1)")]
    PasswordWithoutUsername,
    #[error("invalid QoS 3")]
    InvalidQos,
    #[error("packet identifier 0")]
    ZeroPacketId,
    #[error("invalid topic name")]
    InvalidTopic,
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    #[error("SUBSCRIBE or UNSUBSCRIBE without topic filters")]
    EmptyFilterList,
    #[error("reserved subscription option bits set")]
    InvalidSubscriptionOptions,
    #[error("unknown property {0:#04x}")]
    UnknownProperty(u8),
    #[error("property {0:#04x} is not allowed in this packet")]
    PropertyNotAllowed(u8),
    #[error("property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    #[error("invalid value for property {0:#04x}")]
    InvalidPropertyValue(u8),
    #[error("invalid reason code {0:#04x}")]
    InvalidReasonCode(u8),
    #[error("reserved CONNACK acknowledge flags {0:#04x}")]
    ReservedConnAckFlags(u8),
}

impl DecodeError {
    pub fn fault(&self) -> Fault {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => Fault::Limit,
            UnsupportedProtocolLevel(_) | UnknownProtocolName { .. } | NotConnect => Fault::Peer,
            _ => Fault::Malformed,
        }
    }

    /// The 5.0 reason code a server sends (in CONNACK or DISCONNECT) for this error.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            UnsupportedProtocolLevel(_) | UnknownProtocolName { .. } => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            InvalidTopic => ReasonCode::TOPIC_NAME_INVALID,
            InvalidTopicFilter => ReasonCode::TOPIC_FILTER_INVALID,
            NotConnect | EmptyFilterList | ZeroPacketId => ReasonCode::PROTOCOL_ERROR,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("remaining length {0} exceeds 268,435,455")]
    TooLarge(usize),
    #[error("string or binary field of {0} bytes exceeds 65,535")]
    FieldTooLong(usize),
    #[error("QoS > 0 PUBLISH without packet identifier, or QoS 0 with one")]
    PacketIdMismatch,
    #[error("packet type not valid for protocol {0}")]
    NotInProtocol(&'static str),
}
