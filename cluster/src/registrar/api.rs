//! What the registrar's user sees: its configuration, events and counters.

use std::sync::Arc;
use std::time::Duration;

use super::{Previous, RequestId, REQUEST_TIMEOUT};
use crate::registry::WillInfo;
use crate::retained::HlcStamp;
use crate::NodeName;

/// What a node does with a CONNECT whose owner does not answer (`--partition-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartitionMode {
    /// Grant it locally, provisionally, and reconcile when the owner is reachable again.
    #[default]
    Available,
    /// Refuse it (CONNACK 0x88 Server unavailable), as VerneMQ does by default.
    Consistent,
}

#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    pub partition_mode: PartitionMode,
    /// [`REQUEST_TIMEOUT`] unless a test wants another.
    pub request_timeout: Duration,
    /// The wall clock (ms since the Unix epoch) at `now` of [`super::Registrar::new`]: registration stamps are
    /// taken from it plus the monotonic time since.
    pub wall_ms_at_start: u64,
    /// The most tombstones kept ([`crate::registry::MAX_TOMBSTONES`] unless a test wants another).
    pub max_tombstones: usize,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        RegistrarConfig {
            partition_mode: PartitionMode::default(),
            request_timeout: REQUEST_TIMEOUT,
            wall_ms_at_start: 0,
            max_tombstones: crate::registry::MAX_TOMBSTONES,
        }
    }
}

/// What the shards must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrarEvent {
    /// The connection of `request` holds the session with `epoch`: CONNACK it (one answered ahead was
    /// answered already: its shard learns the epoch). `previous` held the
    /// session on another node (which is told to end it and hand it over). `provisional`: granted here
    /// because the owner did not answer (available mode), reconciled later. `stamp`: the registration's
    /// clock, which the node stores with the session to re-register it after a restart
    /// ([`super::Registrar::restore`]).
    Granted {
        request: RequestId,
        client: Arc<str>,
        epoch: u64,
        stamp: HlcStamp,
        previous: Option<Previous>,
        provisional: bool,
    },
    /// The owner could not be reached (consistent mode): CONNACK 0x88 Server unavailable (3.1.1: 3).
    Refused { request: RequestId, client: Arc<str> },
    /// This node's session of `client` with `epoch` is superseded by `successor`'s: close its connection
    /// (DISCONNECT 0x8E Session taken over) and hand the session over, or drop it when `discard` (the
    /// successor started clean). [`super::Registrar::is_current`] is false for it from now on.
    EndSession { client: Arc<str>, epoch: u64, successor: NodeName, successor_epoch: u64, discard: bool },
    /// The connection of `request`, answered ahead ([`super::Registrar::handle_connect_ahead`]), is
    /// older than `successor`'s registration of its id, which its owner had already: it holds nothing;
    /// close it (DISCONNECT 0x8E Session taken over).
    Superseded { request: RequestId, client: Arc<str>, successor: NodeName, successor_epoch: u64 },
    /// An owner took this node for the holder of `client`'s session, which it no longer has (it ended
    /// before the owner heard): tell `successor`, which may be waiting for it, that none comes.
    NoSession { client: Arc<str>, successor: NodeName, successor_epoch: u64 },
    /// Publish the will of `client`'s connection of `epoch`, lost with its node.
    PublishWill { client: Arc<str>, epoch: u64, will: Box<WillInfo> },
}

/// What the registrar counted, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegistrarCounters {
    /// Connections of this node granted (provisional ones included) and refused.
    pub granted: u64,
    pub refused: u64,
    pub provisional: u64,
    /// Registrations this node, as owner, gave to a node while another held the session.
    pub takeovers: u64,
    /// Sessions this node re-registered with new owners after membership changes.
    pub reregistrations: u64,
    /// Registrations this node handed to new owners after membership changes.
    pub handed_over: u64,
    pub wills_published: u64,
    /// Conflicting registrations from elsewhere this node resolved (partition heals, returning nodes).
    pub conflicts_resolved: u64,
    /// Sessions of this node ended because another node's registration superseded them.
    pub sessions_ended: u64,
    /// Gauges: the registrations this node keeps as an owner or replica, and the tombstones of ended
    /// ones it keeps for [`super::TOMBSTONE_TTL`] (at most [`crate::registry::MAX_TOMBSTONES`]).
    pub registrations: u64,
    pub tombstones: u64,
    /// Tombstones dropped before their TTL because this node kept the most it keeps.
    pub tombstones_dropped_early: u64,
}

/// A session this node holds, as it registered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSession {
    pub client: Arc<str>,
    pub epoch: u64,
    pub stamp: HlcStamp,
    pub connected: bool,
}
