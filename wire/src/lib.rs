//! `shardmq-wire`: the MQTT 3.1, 3.1.1 and 5.0 packet codec shared by the broker, the load generator and the
//! fuzz targets.
//!
//! What it does:
//! - decodes every control packet type from a byte slice, borrowing strings and payloads from the input
//!   ([`decode`]), with strict validation (remaining-length encoding, reserved flags, UTF-8 and U+0000 in
//!   strings, property placement and duplicates, packet id 0 on QoS > 0, wildcards in PUBLISH topics);
//! - rejects a packet larger than the caller's limit from its fixed header alone, before anything is
//!   allocated or buffered ([`frame`]);
//! - encodes every packet type into a caller-provided `Vec<u8>` ([`encode`]);
//! - validates topic names and filters and splits shared-subscription filters ([`topic`]).
//!
//! What it does not do: I/O, session state, flow control, topic matching or any policy decision. Direction
//! rules (a server must not receive CONNACK) are the caller's, because the same codec serves both ends.
//! It depends on no other workspace crate.

mod decode;
mod decode_props;
mod encode;
mod error;
mod packet;
mod properties;
mod reason;
pub mod topic;

pub use decode::{decode, frame, peek_protocol, Frame};
pub use decode_props::decode_publish_properties;
pub use encode::{encode, encode_publish_properties, encoded_len};
pub use error::{DecodeError, EncodeError, Fault};
pub use packet::*;
pub use properties::{Properties, PropertyId};
pub use reason::ReasonCode;

/// The largest value a Variable Byte Integer can carry (MQTT 5.0 §1.5.5): the absolute maximum packet body.
pub const MAX_REMAINING_LENGTH: u32 = 268_435_455;
