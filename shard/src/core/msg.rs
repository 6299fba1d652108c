//! Owned application messages. One `Arc<Msg>` is shared by every subscriber and every shard a publish
//! reaches, so the payload is stored once however wide the fan-out.

use std::sync::Arc;
use std::time::Instant;

use shardmq_wire::{Properties, QoS};

use crate::ShardId;

/// Where a message came from: the session that published it (for MQTT 5 No Local).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub shard: ShardId,
    pub session: SessionKey,
}

/// A session, unique within its owning shard for the life of the process (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey(pub u64);

/// The MQTT 5 properties that travel with a message to its subscribers. Boxed in [`Msg`] so that a
/// message without them (all of MQTT 3.1.1 traffic) pays one pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsgProps {
    pub payload_format_indicator: Option<u8>,
    pub content_type: Option<Box<str>>,
    pub response_topic: Option<Box<str>>,
    pub correlation_data: Option<Box<[u8]>>,
    pub user_properties: Vec<(Box<str>, Box<str>)>,
}

impl MsgProps {
    /// Copies the forwardable properties of a received PUBLISH (or will); `None` if there are none.
    pub fn from_wire(p: &Properties<'_>) -> Option<Box<MsgProps>> {
        let props = MsgProps {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type.map(Into::into),
            response_topic: p.response_topic.map(Into::into),
            correlation_data: p.correlation_data.map(Into::into),
            user_properties: p.user_properties.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        };
        if props == MsgProps::default() {
            None
        } else {
            Some(Box::new(props))
        }
    }
}

#[derive(Debug)]
pub struct Msg {
    pub topic: Box<str>,
    pub payload: Box<[u8]>,
    /// QoS the publisher sent it with; each subscriber gets `min(qos, subscription qos)`.
    pub qos: QoS,
    pub retain: bool,
    /// From the MQTT 5 Message Expiry Interval; a subscriber receives the remaining time.
    pub expires_at: Option<Instant>,
    pub props: Option<Box<MsgProps>>,
    pub origin: Option<Origin>,
}

impl Msg {
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Properties for a PUBLISH carrying this message, borrowing from it.
    /// The Message Expiry Interval left, in seconds, if it has one. Rounded up so that a message with a
    /// few ms left is not announced as already expired (0 s).
    pub fn expiry_interval_s(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left_ms = at.saturating_duration_since(now).as_millis() as u64;
            left_ms.div_ceil(1000).min(u32::MAX as u64) as u32
        })
    }

    pub fn wire_properties(&self, now: Instant) -> Properties<'_> {
        let mut p =
            Properties { message_expiry_interval_s: self.expiry_interval_s(now), ..Properties::default() };
        if let Some(m) = &self.props {
            p.payload_format_indicator = m.payload_format_indicator;
            p.content_type = m.content_type.as_deref();
            p.response_topic = m.response_topic.as_deref();
            p.correlation_data = m.correlation_data.as_deref();
            p.user_properties = m.user_properties.iter().map(|(k, v)| (&**k, &**v)).collect();
        }
        p
    }
}

/// One message on its way to one session: what the subscription(s) made of it. 40 bytes plus the shared
/// message: this is the in-memory cost of a queued message (see `persist` for what the log adds).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Msg>,
    /// MQTT 5 subscription identifiers of every matching subscription of the session.
    pub sub_ids: Box<[u32]>,
    /// The record of this delivery in the shard's log (0: not stored: QoS 0, a session that ends with
    /// its connection, or no log). Invariant: ascending along a session's in-flight window then queue.
    pub mid: u64,
    /// Packet id, chosen when the message is queued (QoS 1/2; 0 for QoS 0) so that it is the same after
    /// a restart: a QoS 2 receiver recognises a resent message by it.
    pub pid: u16,
    pub qos: QoS,
    pub retain: bool,
    /// It may have been sent before (restored after a restart): its PUBLISH carries DUP.
    pub dup: bool,
}

impl Delivery {
    pub fn new(msg: Arc<Msg>, qos: QoS, retain: bool, sub_ids: Box<[u32]>) -> Delivery {
        Delivery { msg, sub_ids, mid: 0, pid: 0, qos, retain, dup: false }
    }
}
