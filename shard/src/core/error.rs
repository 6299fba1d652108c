//! Why the core closes a connection, classified by fault, and the one mapping from those errors to the
//! reason codes a client is told (MQTT 5 DISCONNECT / CONNACK, or the 3.1.1 CONNACK return code).

use shardmq_wire::{DecodeError, Fault, ReasonCode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes could not be decoded (malformed, over a size limit, wrong protocol).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A well-formed packet that breaks a protocol rule.
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    /// A well-formed packet the server may not receive (CONNACK, SUBACK, PINGRESP...).
    #[error("client sent a server-to-client packet")]
    WrongDirection,
    #[error("second CONNECT on a connection")]
    SecondConnect,
    #[error("topic alias {0} is invalid")]
    TopicAlias(u16),
    #[error("receive maximum exceeded")]
    ReceiveMaximumExceeded,
    #[error("topic name invalid: {0}")]
    TopicName(&'static str),
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    #[error("keep alive timeout")]
    KeepAliveTimeout,
    #[error("session taken over by another connection")]
    SessionTakenOver,
    #[error("server shutting down")]
    ShuttingDown,
    #[error("enhanced authentication is not supported")]
    AuthNotSupported,
    #[error("session expiry changed from 0 at DISCONNECT")]
    SessionExpiryAfterZero,
    /// The shard's log refused a write (disk full, or stopped after an I/O error): what the client asked
    /// for cannot be made durable, so it is not acknowledged.
    #[error("storage full or failing: the request cannot be made durable")]
    StorageUnavailable,
}

impl ProtocolError {
    pub fn fault(&self) -> Fault {
        match self {
            ProtocolError::Decode(e) => e.fault(),
            ProtocolError::ConnectTimeout
            | ProtocolError::KeepAliveTimeout
            | ProtocolError::SessionTakenOver
            | ProtocolError::ShuttingDown
            | ProtocolError::StorageUnavailable => Fault::Limit,
            _ => Fault::Peer,
        }
    }

    /// The MQTT 5 reason code sent to the client (DISCONNECT, or CONNACK before a session exists).
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ProtocolError::Decode(e) => e.reason_code(),
            ProtocolError::Violation(_) | ProtocolError::WrongDirection | ProtocolError::SecondConnect => {
                ReasonCode::PROTOCOL_ERROR
            }
            ProtocolError::SessionExpiryAfterZero => ReasonCode::PROTOCOL_ERROR,
            ProtocolError::TopicAlias(_) => ReasonCode::TOPIC_ALIAS_INVALID,
            ProtocolError::ReceiveMaximumExceeded => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
            ProtocolError::TopicName(_) => ReasonCode::TOPIC_NAME_INVALID,
            ProtocolError::ConnectTimeout => ReasonCode::MAXIMUM_CONNECT_TIME,
            ProtocolError::KeepAliveTimeout => ReasonCode::KEEP_ALIVE_TIMEOUT,
            ProtocolError::SessionTakenOver => ReasonCode::SESSION_TAKEN_OVER,
            ProtocolError::ShuttingDown => ReasonCode::SERVER_SHUTTING_DOWN,
            ProtocolError::AuthNotSupported => ReasonCode::BAD_AUTHENTICATION_METHOD,
            ProtocolError::StorageUnavailable => ReasonCode::QUOTA_EXCEEDED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_an_error_reason_code() {
        let all = [
            ProtocolError::Decode(DecodeError::MalformedLength),
            ProtocolError::Decode(DecodeError::PacketTooLarge { size: 10, max: 5 }),
            ProtocolError::Violation("x"),
            ProtocolError::WrongDirection,
            ProtocolError::SecondConnect,
            ProtocolError::TopicAlias(3),
            ProtocolError::ReceiveMaximumExceeded,
            ProtocolError::TopicName("x"),
            ProtocolError::ConnectTimeout,
            ProtocolError::KeepAliveTimeout,
            ProtocolError::SessionTakenOver,
            ProtocolError::ShuttingDown,
            ProtocolError::AuthNotSupported,
            ProtocolError::SessionExpiryAfterZero,
            ProtocolError::StorageUnavailable,
        ];
        for e in all {
            assert!(e.reason_code().is_error(), "{e:?} maps to a success code");
        }
        assert_eq!(
            ProtocolError::Decode(DecodeError::PacketTooLarge { size: 10, max: 5 }).reason_code(),
            ReasonCode::PACKET_TOO_LARGE
        );
        assert_eq!(ProtocolError::SessionTakenOver.reason_code(), ReasonCode::SESSION_TAKEN_OVER);
        assert_eq!(ProtocolError::ShuttingDown.reason_code(), ReasonCode::SERVER_SHUTTING_DOWN);
        assert_eq!(ProtocolError::KeepAliveTimeout.reason_code(), ReasonCode::KEEP_ALIVE_TIMEOUT);
        assert_eq!(ProtocolError::TopicAlias(0).reason_code(), ReasonCode::TOPIC_ALIAS_INVALID);
        assert_eq!(ProtocolError::SecondConnect.fault(), Fault::Peer);
        assert_eq!(ProtocolError::StorageUnavailable.reason_code(), ReasonCode::QUOTA_EXCEEDED);
        assert_eq!(ProtocolError::StorageUnavailable.fault(), Fault::Limit);
    }
}
