//! MQTT 5.0 properties (§2.2.2.2). One struct serves every packet type; the decoder rejects a property
//! that the packet type does not allow ([`PropertyId::allowed_in`]) and any duplicate of a property that may
//! appear once.

use crate::PacketType;

/// Property identifiers (MQTT 5.0 §2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PropertyId {
    PayloadFormatIndicator = 0x01,
    MessageExpiryInterval = 0x02,
    ContentType = 0x03,
    ResponseTopic = 0x08,
    CorrelationData = 0x09,
    SubscriptionIdentifier = 0x0B,
    SessionExpiryInterval = 0x11,
    AssignedClientIdentifier = 0x12,
    ServerKeepAlive = 0x13,
    AuthenticationMethod = 0x15,
    AuthenticationData = 0x16,
    RequestProblemInformation = 0x17,
    WillDelayInterval = 0x18,
    RequestResponseInformation = 0x19,
    ResponseInformation = 0x1A,
    ServerReference = 0x1C,
    ReasonString = 0x1F,
    ReceiveMaximum = 0x21,
    TopicAliasMaximum = 0x22,
    TopicAlias = 0x23,
    MaximumQos = 0x24,
    RetainAvailable = 0x25,
    UserProperty = 0x26,
    MaximumPacketSize = 0x27,
    WildcardSubscriptionAvailable = 0x28,
    SubscriptionIdentifierAvailable = 0x29,
    SharedSubscriptionAvailable = 0x2A,
}

impl PropertyId {
    pub fn from_u8(v: u8) -> Option<PropertyId> {
        use PropertyId::*;
        Some(match v {
            0x01 => PayloadFormatIndicator,
            0x02 => MessageExpiryInterval,
            0x03 => ContentType,
            0x08 => ResponseTopic,
            0x09 => CorrelationData,
            0x0B => SubscriptionIdentifier,
            0x11 => SessionExpiryInterval,
            0x12 => AssignedClientIdentifier,
            0x13 => ServerKeepAlive,
            0x15 => AuthenticationMethod,
            0x16 => AuthenticationData,
            0x17 => RequestProblemInformation,
            0x18 => WillDelayInterval,
            0x19 => RequestResponseInformation,
            0x1A => ResponseInformation,
            0x1C => ServerReference,
            0x1F => ReasonString,
            0x21 => ReceiveMaximum,
            0x22 => TopicAliasMaximum,
            0x23 => TopicAlias,
            0x24 => MaximumQos,
            0x25 => RetainAvailable,
            0x26 => UserProperty,
            0x27 => MaximumPacketSize,
            0x28 => WildcardSubscriptionAvailable,
            0x29 => SubscriptionIdentifierAvailable,
            0x2A => SharedSubscriptionAvailable,
            _ => return None,
        })
    }

    /// Where the property may appear (MQTT 5.0 §2.2.2.2 table). `will` selects the CONNECT will properties.
    pub fn allowed_in(self, packet: PacketType, will: bool) -> bool {
        use PacketType as T;
        use PropertyId::*;
        if will {
            return matches!(
                self,
                PayloadFormatIndicator
                    | MessageExpiryInterval
                    | ContentType
                    | ResponseTopic
                    | CorrelationData
                    | WillDelayInterval
                    | UserProperty
            );
        }
        match self {
            PayloadFormatIndicator
            | MessageExpiryInterval
            | ContentType
            | ResponseTopic
            | CorrelationData
            | TopicAlias => packet == T::Publish,
            SubscriptionIdentifier => matches!(packet, T::Publish | T::Subscribe),
            SessionExpiryInterval => matches!(packet, T::Connect | T::ConnAck | T::Disconnect),
            AssignedClientIdentifier
            | ServerKeepAlive
            | ResponseInformation
            | MaximumQos
            | RetainAvailable
            | WildcardSubscriptionAvailable
            | SubscriptionIdentifierAvailable
            | SharedSubscriptionAvailable => packet == T::ConnAck,
            AuthenticationMethod | AuthenticationData => matches!(packet, T::Connect | T::ConnAck | T::Auth),
            RequestProblemInformation | RequestResponseInformation => packet == T::Connect,
            WillDelayInterval => false,
            ServerReference => matches!(packet, T::ConnAck | T::Disconnect),
            ReasonString => !matches!(
                packet,
                T::Connect | T::Publish | T::Subscribe | T::Unsubscribe | T::PingReq | T::PingResp
            ),
            ReceiveMaximum | TopicAliasMaximum | MaximumPacketSize => {
                matches!(packet, T::Connect | T::ConnAck)
            }
            UserProperty => !matches!(packet, T::PingReq | T::PingResp),
        }
    }
}

/// All MQTT 5.0 properties; `None`/empty means absent. Strings and binary data borrow from the decoded buffer
/// (or from whatever the encoding caller owns).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties<'a> {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval_s: Option<u32>,
    pub content_type: Option<&'a str>,
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    /// In SUBSCRIBE at most one; a server-sent PUBLISH may carry several (one per matching subscription).
    /// Values are 1..=268,435,455.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval_s: Option<u32>,
    pub assigned_client_identifier: Option<&'a str>,
    pub server_keep_alive_s: Option<u16>,
    pub authentication_method: Option<&'a str>,
    pub authentication_data: Option<&'a [u8]>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval_s: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<&'a str>,
    pub server_reference: Option<&'a str>,
    pub reason_string: Option<&'a str>,
    /// Never 0 on the wire.
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    /// Never 0 on the wire.
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    /// Order-preserving; the same name may appear more than once.
    pub user_properties: Vec<(&'a str, &'a str)>,
    /// Never 0 on the wire.
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

impl Properties<'_> {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}
