//! Decoding primitives shared by the packet decoders: a bounds-checked cursor over one packet body, the
//! Variable Byte Integer, MQTT UTF-8 strings, and the MQTT 5.0 property block with its placement, duplicate
//! and value rules.
//!
//! What it does not do: know packet layouts (that is `decode.rs`) or allocate anything sized by a length
//! field; every length is checked against the bytes actually present before it is used.

use crate::topic::valid_topic_name;
use crate::{DecodeError, PacketType, Properties, PropertyId, MAX_REMAINING_LENGTH};

type Result<T> = std::result::Result<T, DecodeError>;

/// Reads a Variable Byte Integer from the start of `buf`. `Ok(None)` when `buf` ends inside the integer, so
/// the fixed-header reader can wait for more bytes while body readers turn it into `Truncated`.
///
/// A fourth byte with the continuation bit and a non-minimal encoding (a multi-byte integer ending in 0x00,
/// e.g. 0x80 0x00) are both malformed: MQTT requires the minimum number of bytes.
pub(crate) fn varint(buf: &[u8]) -> Result<Option<(u32, usize)>> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(DecodeError::MalformedLength);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::MalformedLength)
}

/// Validates an MQTT UTF-8 string (§1.5.4). Only U+0000 is rejected beyond UTF-8 itself: other control and
/// non-characters are "SHOULD NOT" in the spec, and refusing them would break clients that use them.
pub(crate) fn utf8(bytes: &[u8]) -> Result<&str> {
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    if bytes.contains(&0) {
        return Err(DecodeError::ForbiddenCharacter);
    }
    Ok(s)
}

/// A cursor over one packet body (or property block). Every read names what it was reading so a short
/// packet reports `Truncated("what")`.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let (head, tail) = self.buf.split_first_chunk::<N>().ok_or(DecodeError::Truncated(what))?;
        self.buf = tail;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u32> {
        let (value, n) = varint(self.buf)?.ok_or(DecodeError::Truncated(what))?;
        self.take(n, what)?;
        Ok(value)
    }

    /// Two-byte length followed by that many bytes.
    pub(crate) fn binary(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    pub(crate) fn string(&mut self, what: &'static str) -> Result<&'a str> {
        utf8(self.binary(what)?)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(&self) -> Result<()> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Reads a property block (length + properties) for `packet`; `will` selects the CONNECT will properties.
pub(crate) fn properties<'a>(r: &mut Reader<'a>, packet: PacketType, will: bool) -> Result<Properties<'a>> {
    let len = r.varint("property length")?;
    let block = r.take(len as usize, "properties")?;
    let mut r = Reader::new(block);
    let mut props = Properties::default();
    // Identifiers are all below 64, so one bit each tracks what has been seen.
    let mut seen: u64 = 0;
    while !r.is_empty() {
        let raw = r.u8("property identifier")?;
        let id = PropertyId::from_u8(raw).ok_or(DecodeError::UnknownProperty(raw))?;
        if !id.allowed_in(packet, will) {
            return Err(DecodeError::PropertyNotAllowed(raw));
        }
        // A server sends one subscription identifier per matching subscription in PUBLISH; everywhere else
        // it is single-valued.
        let repeatable = id == PropertyId::UserProperty
            || (id == PropertyId::SubscriptionIdentifier && packet == PacketType::Publish && !will);
        let bit = 1u64 << raw;
        if !repeatable && seen & bit != 0 {
            return Err(DecodeError::DuplicateProperty(raw));
        }
        seen |= bit;
        read_property(&mut r, id, &mut props)?;
    }
    Ok(props)
}

fn read_property<'a>(r: &mut Reader<'a>, id: PropertyId, p: &mut Properties<'a>) -> Result<()> {
    use PropertyId::*;
    const WHAT: &str = "property value";
    let invalid = DecodeError::InvalidPropertyValue(id as u8);
    let flag = |v: u8| if v <= 1 { Ok(v) } else { Err(invalid.clone()) };
    let nonzero16 = |v: u16| if v != 0 { Ok(v) } else { Err(invalid.clone()) };
    match id {
        PayloadFormatIndicator => p.payload_format_indicator = Some(flag(r.u8(WHAT)?)?),
        MessageExpiryInterval => p.message_expiry_interval_s = Some(r.u32(WHAT)?),
        ContentType => p.content_type = Some(r.string(WHAT)?),
        ResponseTopic => {
            // A response topic is a topic name: the responder publishes to it, so wildcards are an error.
            let topic = r.string(WHAT)?;
            if !valid_topic_name(topic) {
                return Err(invalid);
            }
            p.response_topic = Some(topic);
        }
        CorrelationData => p.correlation_data = Some(r.binary(WHAT)?),
        SubscriptionIdentifier => {
            let v = r.varint(WHAT)?;
            if v == 0 || v > MAX_REMAINING_LENGTH {
                return Err(invalid);
            }
            p.subscription_identifiers.push(v);
        }
        SessionExpiryInterval => p.session_expiry_interval_s = Some(r.u32(WHAT)?),
        AssignedClientIdentifier => p.assigned_client_identifier = Some(r.string(WHAT)?),
        ServerKeepAlive => p.server_keep_alive_s = Some(r.u16(WHAT)?),
        AuthenticationMethod => p.authentication_method = Some(r.string(WHAT)?),
        AuthenticationData => p.authentication_data = Some(r.binary(WHAT)?),
        RequestProblemInformation => p.request_problem_information = Some(flag(r.u8(WHAT)?)?),
        WillDelayInterval => p.will_delay_interval_s = Some(r.u32(WHAT)?),
        RequestResponseInformation => p.request_response_information = Some(flag(r.u8(WHAT)?)?),
        ResponseInformation => p.response_information = Some(r.string(WHAT)?),
        ServerReference => p.server_reference = Some(r.string(WHAT)?),
        ReasonString => p.reason_string = Some(r.string(WHAT)?),
        ReceiveMaximum => p.receive_maximum = Some(nonzero16(r.u16(WHAT)?)?),
        TopicAliasMaximum => p.topic_alias_maximum = Some(r.u16(WHAT)?),
        TopicAlias => p.topic_alias = Some(nonzero16(r.u16(WHAT)?)?),
        MaximumQos => p.maximum_qos = Some(flag(r.u8(WHAT)?)?),
        RetainAvailable => p.retain_available = Some(flag(r.u8(WHAT)?)?),
        UserProperty => {
            let key = r.string(WHAT)?;
            let value = r.string(WHAT)?;
            p.user_properties.push((key, value));
        }
        MaximumPacketSize => {
            let v = r.u32(WHAT)?;
            if v == 0 {
                return Err(invalid);
            }
            p.maximum_packet_size = Some(v);
        }
        WildcardSubscriptionAvailable => p.wildcard_subscription_available = Some(flag(r.u8(WHAT)?)?),
        SubscriptionIdentifierAvailable => p.subscription_identifier_available = Some(flag(r.u8(WHAT)?)?),
        SharedSubscriptionAvailable => p.shared_subscription_available = Some(flag(r.u8(WHAT)?)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries() {
        let cases: [(&[u8], u32); 8] = [
            (&[0x00], 0),
            (&[0x7F], 127),
            (&[0x80, 0x01], 128),
            (&[0xFF, 0x7F], 16_383),
            (&[0x80, 0x80, 0x01], 16_384),
            (&[0xFF, 0xFF, 0x7F], 2_097_151),
            (&[0x80, 0x80, 0x80, 0x01], 2_097_152),
            (&[0xFF, 0xFF, 0xFF, 0x7F], 268_435_455),
        ];
        for (bytes, want) in cases {
            assert_eq!(varint(bytes), Ok(Some((want, bytes.len()))), "{bytes:?}");
        }
        assert_eq!(varint(&[]), Ok(None));
        assert_eq!(varint(&[0x80]), Ok(None));
        assert_eq!(varint(&[0xFF, 0xFF, 0xFF]), Ok(None));
        assert_eq!(varint(&[0xFF, 0xFF, 0xFF, 0xFF]), Err(DecodeError::MalformedLength));
        assert_eq!(varint(&[0x80, 0x00]), Err(DecodeError::MalformedLength));
        assert_eq!(varint(&[0xFF, 0x80, 0x00]), Err(DecodeError::MalformedLength));
    }

    #[test]
    fn strings() {
        assert_eq!(utf8(b"ok"), Ok("ok"));
        assert_eq!(utf8(b"a\0"), Err(DecodeError::ForbiddenCharacter));
        assert_eq!(utf8(&[0xC0, 0x80]), Err(DecodeError::InvalidUtf8));
        // UTF-16 surrogates encoded as UTF-8 are ill-formed.
        assert_eq!(utf8(&[0xED, 0xA0, 0x80]), Err(DecodeError::InvalidUtf8));
        let mut r = Reader::new(&[0, 3, b'a', b'b']);
        assert_eq!(r.string("s"), Err(DecodeError::Truncated("s")));
    }

    fn props(bytes: &[u8], packet: PacketType) -> Result<Properties<'_>> {
        let mut r = Reader::new(bytes);
        let p = properties(&mut r, packet, false)?;
        r.finish()?;
        Ok(p)
    }

    #[test]
    fn property_rules() {
        use DecodeError::*;
        let p = props(&[5, 0x26, 0, 1, b'k', 0], PacketType::PubAck);
        assert_eq!(p, Err(Truncated("property value")));
        let p = props(&[10, 0x26, 0, 1, b'k', 0, 1, b'v', 0x1F, 0, 0], PacketType::PubAck).unwrap();
        assert_eq!(p.user_properties, vec![("k", "v")]);
        assert_eq!(p.reason_string, Some(""));
        assert_eq!(props(&[2, 0x01, 0], PacketType::PubAck), Err(PropertyNotAllowed(0x01)));
        assert_eq!(props(&[2, 0x05, 0], PacketType::PubAck), Err(UnknownProperty(0x05)));
        assert_eq!(props(&[2, 0x01, 2], PacketType::Publish), Err(InvalidPropertyValue(0x01)));
        assert_eq!(props(&[4, 0x01, 1, 0x01, 1], PacketType::Publish), Err(DuplicateProperty(0x01)));
        let p = props(&[4, 0x0B, 1, 0x0B, 2], PacketType::Publish).unwrap();
        assert_eq!(p.subscription_identifiers, vec![1, 2]);
        assert_eq!(props(&[4, 0x0B, 1, 0x0B, 2], PacketType::Subscribe), Err(DuplicateProperty(0x0B)));
        assert_eq!(props(&[2, 0x0B, 0], PacketType::Subscribe), Err(InvalidPropertyValue(0x0B)));
        assert_eq!(props(&[3, 0x0B, 0x80, 0x00], PacketType::Subscribe), Err(MalformedLength));
        assert_eq!(props(&[5, 0x08, 0, 2, b'a', b'+'], PacketType::Publish), Err(InvalidPropertyValue(0x08)));
        assert_eq!(props(&[9], PacketType::Publish), Err(Truncated("properties")));
        assert_eq!(props(&[0x80], PacketType::Publish), Err(Truncated("property length")));
    }
}

/// Decodes a whole PUBLISH property block written by [`crate::encode_publish_properties`]: every
/// property a PUBLISH may carry is checked as in a received packet, and trailing bytes are refused.
pub fn decode_publish_properties(block: &[u8]) -> Result<Properties<'_>> {
    let mut r = Reader::new(block);
    let p = properties(&mut r, PacketType::Publish, false)?;
    r.finish()?;
    Ok(p)
}

#[cfg(test)]
mod publish_block_tests {
    use crate::{decode_publish_properties, encode_publish_properties, DecodeError, Properties};

    #[test]
    fn publish_properties_round_trip() {
        let p = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval_s: Some(30),
            content_type: Some("text/plain"),
            response_topic: Some("r/t"),
            correlation_data: Some(b"c"),
            user_properties: vec![("k", "v"), ("k", "w")],
            ..Properties::default()
        };
        let mut out = Vec::new();
        encode_publish_properties(&p, &mut out).unwrap();
        assert_eq!(decode_publish_properties(&out).unwrap(), p);
        let mut empty = Vec::new();
        encode_publish_properties(&Properties::default(), &mut empty).unwrap();
        assert_eq!(empty, [0]);
        assert_eq!(decode_publish_properties(&empty).unwrap(), Properties::default());
    }

    #[test]
    fn publish_properties_refuse_bad_blocks() {
        // Session Expiry Interval (0x11) is not a PUBLISH property; a trailing byte; a short block.
        assert!(matches!(
            decode_publish_properties(&[5, 0x11, 0, 0, 0, 1]),
            Err(DecodeError::PropertyNotAllowed(0x11))
        ));
        assert!(decode_publish_properties(&[0, 0]).is_err());
        assert!(decode_publish_properties(&[3, 0x01]).is_err());
        assert!(decode_publish_properties(&[]).is_err());
    }
}
