//! The sans-I/O MQTT core of one shard.
//!
//! A [`Shard`] owns the connections its runtime accepted (or adopted), the sessions whose client ids hash to
//! it, its share of the subscription index, a replica of the retained messages and a view of which other
//! shards have subscribers for which filters. It takes bytes, cross-core messages and `now`, and hands out
//! bytes, I/O commands, cross-core messages and its next deadline (the [`Core`] trait); it never touches a
//! socket or a clock, so everything here runs under a deterministic test harness.
//!
//! Cross-shard rules (the invariants the rest of the module relies on):
//! - a client id is owned by exactly one shard ([`owner_of`]); a connection that lands elsewhere is handed
//!   to the owner right after its CONNECT, so takeover and session state are always shard-local;
//! - a publish crosses to another shard only if that shard announced interest in a matching filter, or
//!   added interest whose announcement has not arrived yet (its interest generation is ahead: see
//!   `interest_gen`), so a publish routed after a SUBSCRIBE was processed anywhere in the node never
//!   misses it; a SUBACK that adds interest is also sent only after every other shard acknowledged it;
//! - retained messages are replicated to every shard, serialised through an owner shard per topic
//!   ([`owner_of`] on the topic), so replicas apply the same sequence for a topic and converge.

mod backpressure;
mod clients;
mod conn;
mod connect;
mod error;
mod interest_gen;
pub mod metrics;
mod msg;
mod persist;
mod register;
mod route;
mod session;
mod suback_wait;
mod sys;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{HashMap, HashMapExt};
use shardmq_wire::{Packet, Protocol};

use self::conn::Conn;
pub use self::error::ProtocolError;
pub use self::interest_gen::InterestGens;
use self::interest_gen::SeenGens;
pub use self::msg::{Delivery, Msg, MsgProps, Origin, SessionKey};
pub use self::persist::{
    inspect_node, open_node, read_meta, type_name, Boot, BootError, Exported, Meta, Recovered, Replay,
    SessionTransfer, ShardReport, StorageConfig, Store, StoredSession, TransferError, WallClock,
    FORWARDING_TIMEOUT,
};
pub use self::register::{HeldRegistration, RegisterOutcome, RegisteredWill, SessionOf, ZoneRegistration};
use self::route::{Interest, SubRef};
pub use self::route::{InterestDelta, SharedKey};
use self::session::Session;
use crate::io::{Core, IoCmd};
pub use crate::placement::owner_of;
use crate::retained::RetainedTree;
use crate::trie::TopicTrie;
use crate::{ConnId, ShardId};

/// Limits and defaults of a node, identical on every shard.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node-wide cap on connected clients; the next CONNECT is refused (MQTT 5: 0x97, 3.1.1: 3).
    pub max_connections: usize,
    /// Largest packet accepted from a client (and advertised to MQTT 5 clients).
    pub max_packet_size: u32,
    /// Receive Maximum advertised to clients (QoS 2 publishes awaiting PUBREL) and cap on QoS 1/2
    /// messages in flight to a client.
    pub max_inflight: u16,
    /// Messages queued per offline session beyond the in-flight window; the oldest is dropped (and counted)
    /// first. Online sessions pause their publishers at half of this (see `backpressure`) and hold up to
    /// 16 × this before dropping.
    pub max_queued: usize,
    /// Bytes (topic + payload) queued per offline session beyond the in-flight window, applied like
    /// `max_queued`: the oldest is dropped (and counted) first; online sessions pause their publishers
    /// at half of this and hold up to 16 × this before dropping. The newest message is always kept.
    pub max_queued_bytes: usize,
    /// MQTT 5 clients asking for keep alive 0 or above this get Server Keep Alive = this.
    pub max_keepalive_s: u16,
    /// A connection that has not completed CONNECT by then is closed.
    pub connect_timeout_ms: u64,
    /// Topic names and filters with more levels are refused.
    pub max_topic_levels: usize,
    /// Topic Alias Maximum advertised to MQTT 5 clients (0 disables client-to-server aliases).
    pub max_topic_alias: u16,
    /// Cap on the session expiry interval a client may ask for. MQTT 3.1.1 persistent sessions (no
    /// expiry of their own) get exactly this, and sessions restored from the log are capped too.
    pub max_session_expiry_s: u32,
    /// Subscriptions one session may hold; a SUBSCRIBE beyond it is refused for that filter (MQTT 5:
    /// 0x97 Quota exceeded, 3.1.1: 0x80 Failure). Re-subscribing to a held filter is always allowed.
    pub max_subscriptions: usize,
    /// Aliases the server may use towards a client (bounded by the client's Topic Alias Maximum).
    pub max_outbound_alias: u16,
    /// Seconds between `$SYS` publications (shard 0 publishes them); 0: none.
    pub sys_interval_s: u32,
    /// The node is part of a cluster: mesh endpoint `ShardId(shards)` is its cluster gateway, which
    /// takes part in the mesh like a shard without connections or sessions (it is never an owner of
    /// anything): it hears every interest announcement and retained update, announces the zone's
    /// shared-group members as its own, and gets the publishes the peers may want (see `route`).
    pub cluster_gateway: bool,
    /// With `cluster_gateway`, in a zone that prefers availability: a CONNECT that starts clean, whose
    /// session ends with its connection and that has no will is answered without waiting for its
    /// registration, which follows (see `register`).
    pub register_ahead: bool,
    /// Put into the client ids the node assigns (`shardmq-<this>-<shard>-<n>`): in a zone, the node's
    /// name, so that no two nodes assign the same id (a v5 client may come back with it to any node).
    /// Empty on a single node (`shardmq-<shard>-<n>`).
    pub assigned_id_scope: Arc<str>,
    /// Password file, ACL and whether anonymous clients are accepted; `None`: anyone may connect and do
    /// anything (the broker decides when that is allowed, see `--allow-anonymous`).
    pub auth: Option<Arc<crate::auth::Auth>>,
}

impl Config {
    /// Whether ACL checks apply: without an ACL file they are skipped entirely.
    pub(crate) fn acl_on(&self) -> bool {
        self.auth.as_ref().is_some_and(|a| a.acl.is_some())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 1_000_000,
            max_packet_size: 1024 * 1024,
            max_inflight: 64,
            max_queued: 1000,
            // 64 MiB: never reached by the count bound's 1000 messages below 64 KiB each (typical traffic
            // is unaffected), while 1000 messages at the 1 MiB packet limit would hold 1 GiB offline and
            // 16 GiB online per session.
            max_queued_bytes: 64 << 20,
            max_keepalive_s: 3600,
            connect_timeout_ms: 10_000,
            max_topic_levels: 32,
            max_topic_alias: 64,
            max_session_expiry_s: u32::MAX,
            max_outbound_alias: 64,
            // Far above what devices and typical applications hold, and it bounds what one client can
            // make a shard keep (each filter: a trie entry, an interest entry, its share of the session
            // record rewritten on every SUBSCRIBE) to well under a megabyte.
            max_subscriptions: 1000,
            sys_interval_s: 0,
            cluster_gateway: false,
            register_ahead: false,
            assigned_id_scope: Arc::from(""),
            auth: None,
        }
    }
}

/// State every shard of a node shares: atomics only, never locked.
#[derive(Debug)]
pub struct NodeShared {
    /// Clients with an accepted CONNECT, node-wide.
    pub connections: AtomicUsize,
    /// How much interest each shard has added (see `interest_gen`).
    interest: InterestGens,
    /// The password file's and ACL's current contents (replaced on reload); starts as `Config::auth`.
    pub auth: crate::auth::AuthSlot,
    /// Each shard's published counters, by shard index (see `metrics`).
    pub metrics: Box<[metrics::ShardMetrics]>,
}

impl NodeShared {
    pub fn new(shards: u16) -> NodeShared {
        NodeShared {
            connections: AtomicUsize::new(0),
            interest: InterestGens::new(shards),
            auth: crate::auth::AuthSlot::default(),
            metrics: (0..shards).map(|_| metrics::ShardMetrics::default()).collect(),
        }
    }

    /// With the auth settings the node starts with (`Config::auth`).
    pub fn with_auth(shards: u16, auth: Option<Arc<crate::auth::Auth>>) -> NodeShared {
        NodeShared { auth: crate::auth::AuthSlot::new(auth), ..NodeShared::new(shards) }
    }
}

/// Counters of one shard, for logs and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub connects: u64,
    pub connects_refused: u64,
    /// Refusals by reason (see `metrics::refusal_index`).
    pub refused: [u64; 4],
    pub protocol_errors: u64,
    pub publishes_in: u64,
    pub publishes_in_qos: [u64; 3],
    pub deliveries: u64,
    pub deliveries_qos: [u64; 3],
    /// QoS 0 messages dropped because the client was offline or not reading.
    pub dropped_qos0: u64,
    /// Queued messages dropped (oldest first) because a session's queue was full.
    pub dropped_queue_full: u64,
    /// Queued messages dropped (oldest first) because a session's queued bytes reached the byte bound.
    pub dropped_queue_bytes: u64,
    /// Messages dropped because their Message Expiry Interval passed before delivery.
    pub dropped_expired: u64,
    /// Shared-subscription messages that found no member (the group emptied while they were in flight).
    pub dropped_no_member: u64,
    /// Messages not sent because they exceeded the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// CONNECTs refused for their credentials (or for having none).
    pub auth_refused: u64,
    /// CONNECTs refused because their address failed to log in too often (included in `auth_refused`).
    pub logins_banned: u64,
    /// Publishes and deliveries the ACL did not allow.
    pub denied_by_acl: u64,
    pub handoffs: u64,
    pub mesh_out: u64,
    /// Times a publisher was paused because everything it published met congestion (see `backpressure`).
    pub publisher_pauses: u64,
    /// MQTT bytes received from and handed out for clients (the runtime counts what the sockets moved;
    /// these feed `$SYS/broker/bytes/...`, which the shards publish).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Sessions moved to another node, and moved here from one (see `persist::transfer`); moved
    /// sessions that could not be installed.
    pub sessions_exported: u64,
    pub sessions_imported: u64,
    pub sessions_import_failed: u64,
    /// CONNECTs held for the zone's registry, refused by it, and gone on without its answer.
    pub registrations: u64,
    pub registrations_refused: u64,
    pub registrations_timed_out: u64,
    /// Sessions ended here because a connection on another node took them over.
    pub sessions_taken_elsewhere: u64,
    /// Wills of clients of a lost node this shard published for the zone's registry.
    pub lost_wills_published: u64,
    /// Wills of sessions restored from the log on a clustered node, left to the zone's registry (whose
    /// owners publish the wills of a lost node's clients) instead of published here too.
    pub restored_wills_left_to_zone: u64,
    /// Sessions that lost to one of this shard (see `Mesh::MergeSession`) whose messages were handed to
    /// it, the messages, and those that found no session here to take them (dropped, logged).
    pub sessions_merged: u64,
    pub merged_messages: u64,
    pub sessions_merge_failed: u64,
    /// Messages that reached a session after it moved to another node, forwarded there.
    pub forwarded_after_move: u64,
}

/// Who asks for a durability answer: the publishing shard and its token (see `persist`).
pub type AckRequest = Option<(ShardId, u64)>;

/// Messages between shards of one node.
#[derive(Debug)]
pub enum Mesh {
    /// Deliver `msg` to this shard's matching non-shared subscribers (when `normal`) and to one local
    /// member of each listed shared-subscription group.
    Deliver {
        msg: Arc<Msg>,
        normal: bool,
        groups: Vec<SharedKey>,
        /// A shard with no member left already passed it on once; it is not passed on again.
        rerouted: bool,
        /// Answer [`Mesh::Stored`] to this shard once what this message added to the log is durable.
        ack: AckRequest,
    },
    /// A retained-message update. `apply == false`: sent to the topic's owner shard, which applies it
    /// and fans it out with `apply == true` to every other shard.
    Retain {
        msg: Arc<Msg>,
        apply: bool,
        ack: AckRequest,
    },
    /// Answer to a Deliver/Retain that carried `ack`: the receiver's records for it are durable (`ok`;
    /// false: its log refused them). `forwarded`: it passed the message on to that many shards, whose
    /// answers (with `rerouted`) come too.
    Stored {
        token: u64,
        ok: bool,
        forwarded: u32,
        rerouted: bool,
    },
    /// The sender's subscriber counts changed; `token` asks for an [`Mesh::InterestAck`]. `generation`:
    /// the sender's interest generation once these deltas are applied (see `interest_gen`).
    Interest {
        deltas: Vec<InterestDelta>,
        token: Option<u64>,
        generation: u64,
    },
    InterestAck {
        token: u64,
    },
    /// From the cluster gateway: every publish routed from here on goes to the gateway too (`on`: some
    /// peer has interest, which only the gateway can match), or no longer. `token` asks for an
    /// [`Mesh::InterestAck`] once applied, so the peer's SUBACK waits for it. The first `on` is also
    /// answered with [`Mesh::RetainedHeld`].
    ForwardAll {
        on: bool,
        token: Option<u64>,
    },
    /// To the cluster gateway: the retained messages this shard owns as the gateway starts (restored from
    /// the log, or published before). They predate every update the zone may have made meanwhile.
    RetainedHeld {
        msgs: Vec<Arc<Msg>>,
    },
    /// To the cluster gateway, as the gateway starts (before the answer to its first `ForwardAll`): the
    /// sessions this shard restored from its log, offline, with the registration each had, for the
    /// zone's registry (they re-register as peers come up; one that moved meanwhile is ended here).
    SessionsHeld {
        sessions: Vec<HeldRegistration>,
    },
    /// From the cluster gateway: the names of the nodes this node has a link with (sorted), on every
    /// change. Shards keep it for what the cluster asks of them (session ownership, next).
    Peers {
        up: Vec<Arc<str>>,
    },
    /// Every subscriber on the sending shard of the last message from `session` (a session of the
    /// receiving shard) is congested (`true`), or no longer (`false`).
    Congestion {
        session: SessionKey,
        congested: bool,
    },
    /// Shard to gateway: a CONNECT for `client` waits until the zone's registry records that this node
    /// holds its session (see `register`).
    Register {
        token: u64,
        client: Arc<str>,
        clean_start: bool,
        will: Option<Box<RegisteredWill>>,
        /// The CONNECT was answered already ([`Config::register_ahead`]): no answer is wanted.
        ahead: bool,
    },
    /// Gateway to shard: publish the will of a client whose node was lost (this node is one of its
    /// id's owners, see `register`).
    PublishWill {
        will: Box<RegisteredWill>,
    },
    /// Gateway to shard: the answer to [`Mesh::Register`] `token`.
    Registered {
        token: u64,
        outcome: RegisterOutcome,
    },
    /// Gateway to shard: a connection on another node took over this node's session of `client`: end it
    /// (DISCONNECT 0x8E to its connected client), exporting it (`export`, unless the new connection
    /// started clean), and answer [`Mesh::Exported`].
    EndSession {
        client: Arc<str>,
        export: bool,
        /// Which registration ends: a session here with a newer one stays (its answer exports nothing).
        of: SessionOf,
    },
    /// Gateway to shard: the connection of `client` registered ahead with `token` ([`Mesh::Register`])
    /// got `registration`.
    RegisteredAhead {
        client: Arc<str>,
        token: u64,
        registration: ZoneRegistration,
    },
    /// Gateway to shard: a session of `transfer`'s client id that lost to this node's (the other side of
    /// a healed partition, or one moved here after its CONNECT went on without it): its undelivered
    /// QoS 1/2 messages go to the session here (see `persist::transfer`).
    MergeSession {
        transfer: Box<SessionTransfer>,
    },
    /// Shard to gateway: every other endpoint of this node routes the subscriptions of `client`'s session,
    /// moved here from another node, to this shard now; the gateway tells the node it came from, which
    /// stops forwarding to it what still reaches the session there (see `persist::transfer`).
    Settled {
        client: Arc<str>,
    },
    /// Gateway to shard: the node `client`'s session moved to routes its subscriptions itself now: the
    /// forwarding stub left here by the move ends.
    EndForwarding {
        client: Arc<str>,
    },
    /// Shard to gateway: the answer to [`Mesh::EndSession`], with the session exported, if there was one
    /// to export.
    Exported {
        client: Arc<str>,
        state: Option<Box<SessionTransfer>>,
    },
    /// Shard to gateway: the connection of `client`'s session went (`kept`: the session stays here,
    /// offline), or the session ended (`kept == false`).
    Unregister {
        client: Arc<str>,
        /// The registration of the connection that went: its epoch, or the token of a connection
        /// registered ahead whose epoch the shard was not told ([`ZoneRegistration::ahead`]).
        registration: ZoneRegistration,
        kept: bool,
    },
}

/// What travels with a socket handed to the owner shard of its client id: every byte received from the
/// CONNECT on, so the owner decodes the CONNECT itself and nothing is lost.
#[derive(Debug)]
pub struct Handoff {
    pub bytes: Vec<u8>,
    /// The client's address and proven identity, for the owner's login checks (see `auth::guard`).
    pub peer: crate::auth::guard::Peer,
}

/// The timer heap is never compacted below this size: compacting a small heap saves nothing.
const TIMER_COMPACT_MIN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Connect(ConnId),
    /// Ends a publisher pause that no clearing event ended (see `backpressure`).
    Unpause(ConnId),
    KeepAlive(ConnId),
    Will(SessionKey),
    Expiry(SessionKey),
    /// Sends the next batch of retained messages owed after a SUBACK (see `route::pump_retained`).
    Retained(SessionKey),
    /// Publishes the `$SYS` topics (shard 0 only; see `sys`).
    Sys,
}

/// A SUBACK waiting for every other shard to acknowledge new interest.
#[derive(Debug)]
struct PendingSubAck {
    conn: ConnId,
    session: SessionKey,
    packet: Vec<u8>,
    /// Filters whose retained messages go out right after the SUBACK.
    retained: Vec<route::RetainedRequest>,
}

/// The retained messages this shard holds (a replica of the node's), and what is still owed of them.
struct RetainedState {
    tree: RetainedTree<Arc<Msg>>,
    /// Expiry deadlines of retained messages with a Message Expiry Interval, by topic, so that each is
    /// evicted when it expires (the same instant on every replica, as the message carries it) rather
    /// than kept until a subscriber looks. Entries of messages since replaced or cleared are stale, and
    /// dropped when the heap doubles (as the timer heap).
    expiry: BinaryHeap<Reverse<(Instant, Box<str>)>>,
    /// Heap size at which `expiry` is compacted next. Invariant: at least [`TIMER_COMPACT_MIN`].
    expiry_compact_at: usize,
    /// Retained messages still owed to sessions after their SUBACK, by topic, sent in batches as flow
    /// control allows (`route::pump_retained`). Kept here rather than in `Session`: only sessions that
    /// just subscribed to filters with many retained matches have an entry.
    owed: HashMap<SessionKey, VecDeque<route::OwedRetained>>,
}

/// The shard's timers.
#[derive(Debug)]
struct TimerHeap {
    /// Entries are never removed when what they guard changes (a reconnect, a closed connection): a
    /// stale one is harmless when it fires (`fire` re-checks the state), and `arm` compacts the heap to
    /// the live entries (see `timer_live`) once it doubles, so its size follows live state, not history.
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// Heap size at which `arm` compacts next. Invariant: at least [`TIMER_COMPACT_MIN`].
    compact_at: usize,
}

/// The sessions of the client ids this shard owns.
struct SessionTable {
    /// Boxed values: the map runs at 45–90% load, and empty buckets would otherwise cost as much as a
    /// live session.
    map: HashMap<SessionKey, Box<Session>>,
    by_client: clients::ClientIndex,
    next_key: u64,
    /// Client ids assigned to clients that sent none (a counter that restarts with the process).
    assigned_ids: u64,
    /// With an ACL file: the rules of each session's client as of its last CONNECT (rebuilt on reload,
    /// and for a session restored from the log from the user name stored with it). Beside the sessions
    /// rather than in them, so that a node without an ACL pays nothing per session.
    acls: HashMap<SessionKey, Box<crate::auth::ClientAcl>>,
    /// The password file and ACL in force here, and the generation of `NodeShared::auth` it is.
    auth: Option<Arc<crate::auth::Auth>>,
    auth_generation: u64,
    /// Peer addresses until login, and failed logins per address (see `auth::guard`).
    logins: crate::auth::guard::Logins,
    /// CONNECTs waiting for the zone's registry (see `register`).
    registrations: register::Registrations,
}

/// What the core hands the runtime and the other shards, until they take it.
struct Outputs {
    io: VecDeque<IoCmd<Handoff>>,
    mesh: VecDeque<(ShardId, Mesh)>,
    /// Final bytes of connections closed by the core (a DISCONNECT or refusing CONNACK), until the
    /// runtime takes them with `take_transmit` before closing the socket.
    closing: HashMap<ConnId, Vec<u8>>,
}

/// Who has interest in what, inside the node, and the state of publishes and SUBACKs on their way
/// through it (see `route`).
struct Routing {
    /// Local subscriptions, keyed by the filter without any `$share/group/` prefix.
    subs: TopicTrie<SubRef>,
    /// Every shard's subscriber counts (this one's included) per filter and group.
    interest: TopicTrie<Interest>,
    /// The interest generation of each shard that `interest` reflects.
    seen: SeenGens,
    rr: RoundRobin,
    scratch: Scratch,
    /// SUBACKs waiting for the other shards to acknowledge new interest, by token.
    pending_subacks: suback_wait::SubAckWaits,
    /// The cluster gateway asked for every publish (see [`Mesh::ForwardAll`]).
    forward_all: bool,
    /// The zone's other nodes this node is linked with, as the gateway last told (see [`Mesh::Peers`]).
    peers: Vec<Arc<str>>,
}

/// Round-robin positions of shared groups.
#[derive(Debug, Default)]
struct RoundRobin {
    /// Per group, when choosing a shard for a publish from here.
    shared: HashMap<SharedKey, u64>,
    /// Per group, when choosing a member on this shard.
    member: HashMap<SharedKey, u64>,
}

/// Buffers routing reuses per publish (no allocation per message); empty between uses.
#[derive(Debug, Default)]
struct Scratch {
    shards: Vec<bool>,
    /// Per shard: a matching subscription there belongs to a persistent session (see `persist`).
    durable: Vec<bool>,
    shared: Vec<(SharedKey, ShardId, u32, bool)>,
    hits: Vec<(SessionKey, shardmq_wire::QoS, bool, u32)>,
    members: Vec<u32>,
}

/// Publisher backpressure state (see `backpressure`).
#[derive(Debug, Default)]
struct PauseState {
    /// Publishers (anywhere) this shard reported as facing congestion here.
    throttling: ahash::HashSet<Origin>,
    /// Local connections paused by flow control.
    paused_conns: ahash::HashSet<ConnId>,
    /// Connections resumed during the current call whose buffered bytes still need handling.
    to_resume: Vec<ConnId>,
}

pub struct Shard {
    id: ShardId,
    shards: u16,
    cfg: Arc<Config>,
    /// What every shard of the node shares (atomics only).
    shared: Arc<NodeShared>,
    /// Boxed values: the maps run at 45–90% load, and empty buckets would otherwise cost as much as
    /// a live connection or session.
    conns: HashMap<ConnId, Box<Conn>>,
    sessions: SessionTable,
    routing: Routing,
    retained: RetainedState,
    next_token: u64,
    timers: TimerHeap,
    out: Outputs,
    counters: Counters,
    shutting_down: bool,
    pauses: PauseState,
    /// The shard's log; `None` runs in memory only.
    store: Option<Box<persist::Store>>,
    /// Set while routing a publish whose acknowledgement waits for the shards it reaches.
    ack_ctx: Option<persist::AckCtx>,
    /// When the counters may next be published, and whether a change waits for it (see `metrics`).
    metrics_at: Option<Instant>,
    metrics_pending: bool,
    sys: sys::SysState,
}

impl Shard {
    pub fn new(id: ShardId, shards: u16, cfg: Arc<Config>, shared: Arc<NodeShared>) -> Shard {
        debug_assert!(id.0 < shards.max(1));
        let auth = cfg.auth.clone();
        Shard {
            id,
            shards: shards.max(1),
            cfg,
            shared,
            conns: HashMap::new(),
            sessions: SessionTable {
                map: HashMap::new(),
                by_client: clients::ClientIndex::new(),
                next_key: 1,
                assigned_ids: 0,
                acls: HashMap::new(),
                auth: auth.clone(),
                auth_generation: 0,
                logins: crate::auth::guard::Logins::default(),
                registrations: register::Registrations::default(),
            },
            routing: Routing {
                subs: TopicTrie::new(),
                interest: TopicTrie::new(),
                seen: SeenGens::new(shards),
                rr: RoundRobin::default(),
                scratch: Scratch::default(),
                pending_subacks: suback_wait::SubAckWaits::default(),
                forward_all: false,
                peers: Vec::new(),
            },
            retained: RetainedState {
                tree: RetainedTree::new(),
                expiry: BinaryHeap::new(),
                expiry_compact_at: TIMER_COMPACT_MIN,
                owed: HashMap::new(),
            },
            next_token: 1,
            timers: TimerHeap { heap: BinaryHeap::new(), compact_at: TIMER_COMPACT_MIN },
            out: Outputs { io: VecDeque::new(), mesh: VecDeque::new(), closing: HashMap::new() },
            counters: Counters::default(),
            shutting_down: false,
            pauses: PauseState::default(),
            store: None,
            ack_ctx: None,
            metrics_at: None,
            metrics_pending: false,
            sys: sys::SysState::default(),
        }
    }

    pub fn id(&self) -> ShardId {
        self.id
    }
    pub fn counters(&self) -> Counters {
        self.counters
    }
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
    pub fn session_count(&self) -> usize {
        self.sessions.map.len()
    }
    pub fn retained_count(&self) -> usize {
        self.retained.tree.len()
    }

    /// Takes the node's reloaded password file and ACL, if they changed since this shard last looked
    /// (one atomic load otherwise), and rebuilds the rules of every session's client under the new ACL.
    fn refresh_auth(&mut self) {
        let generation = self.shared.auth.generation();
        if generation == self.sessions.auth_generation {
            return;
        }
        self.sessions.auth_generation = generation;
        let Some(auth) = self.shared.auth.current() else { return };
        for (key, acl) in self.sessions.acls.iter_mut() {
            let Some(s) = self.sessions.map.get(key) else { continue };
            if let Some(new) = auth.client_acl(&s.client_id, acl.username()) {
                *acl = new;
            }
        }
        self.sessions.auth = Some(auth);
    }

    /// The zone's other nodes this node is linked with (sorted names; empty when not clustered).
    pub fn cluster_peers(&self) -> &[Arc<str>] {
        &self.routing.peers
    }

    /// The retained messages whose topic this shard owns (it stores them), unexpired or not; `$SYS` ones
    /// are the node's own (see `sys`).
    fn owned_retained(&mut self) -> Vec<Arc<Msg>> {
        let (me, n) = (self.id, self.shards);
        let mut out = Vec::new();
        self.retained.tree.retain(|topic, m| {
            if owner_of(topic, n) == me && !sys::node_local(topic) {
                out.push(m.clone());
            }
            true
        });
        out
    }

    /// Entries in the timer heap, live or stale.
    #[cfg(test)]
    pub(crate) fn timer_count(&self) -> usize {
        self.timers.heap.len()
    }

    /// Messages queued (beyond the in-flight window) for the session of `client_id`. For tests.
    #[cfg(test)]
    pub(crate) fn queued_for(&self, client_id: &str) -> usize {
        let key = self.sessions.by_client.get(client_id, &self.sessions.map);
        key.and_then(|k| self.sessions.map.get(&k)).map_or(0, |s| s.qos().queue.len())
    }

    /// Retained messages owed to the session of `client_id` and not sent yet. For tests.
    #[cfg(test)]
    pub(crate) fn retained_owed_for(&self, client_id: &str) -> usize {
        let key = self.sessions.by_client.get(client_id, &self.sessions.map);
        key.and_then(|k| self.retained.owed.get(&k)).map_or(0, VecDeque::len)
    }

    /// Entries in the retained-expiry index, live or stale.
    #[cfg(test)]
    pub(crate) fn retained_expiry_count(&self) -> usize {
        self.retained.expiry.len()
    }

    /// Entries of `shared_rr` and `member_rr`.
    #[cfg(test)]
    pub(crate) fn round_robin_counts(&self) -> (usize, usize) {
        (self.routing.rr.shared.len(), self.routing.rr.member.len())
    }

    fn arm(&mut self, at: Instant, t: Timer) {
        self.timers.heap.push(Reverse((at, t)));
        if self.timers.heap.len() > self.timers.compact_at {
            self.compact_timers();
        }
    }

    /// Drops stale and duplicate timer entries. Runs when the heap doubled since the last compaction, so
    /// its O(n log n) is amortised to O(log n) per `arm`.
    fn compact_timers(&mut self) {
        let mut v = std::mem::take(&mut self.timers.heap).into_vec();
        v.retain(|Reverse((at, t))| self.timer_live(*at, *t));
        v.sort_unstable();
        v.dedup();
        self.timers.heap = BinaryHeap::from(v);
        self.timers.compact_at = (self.timers.heap.len() * 2).max(TIMER_COMPACT_MIN);
        debug_assert!(self.timers.compact_at >= TIMER_COMPACT_MIN);
    }

    /// Whether firing the entry could still do anything. Session timers are live only at the deadline
    /// the session holds now (a reconnect resets it, the next disconnect arms a new one); connection
    /// timers while their connection is there and in the state they guard.
    fn timer_live(&self, at: Instant, t: Timer) -> bool {
        match t {
            Timer::Connect(c) => self.conns.get(&c).is_some_and(|c| !c.is_active()),
            Timer::Unpause(c) => self.conns.get(&c).is_some_and(|c| c.paused),
            Timer::KeepAlive(c) => self.conns.get(&c).is_some_and(|c| c.keepalive_deadline().is_some()),
            Timer::Will(k) => self.sessions.map.get(&k).is_some_and(|s| s.will_at() == Some(at)),
            Timer::Expiry(k) => self.sessions.map.get(&k).is_some_and(|s| s.expires_at == Some(at)),
            Timer::Retained(k) => self.retained.owed.contains_key(&k),
            Timer::Sys => true,
        }
    }

    fn send_mesh(&mut self, to: ShardId, m: Mesh) {
        debug_assert_ne!(to, self.id, "a shard never sends mesh messages to itself");
        self.counters.mesh_out += 1;
        self.out.mesh.push_back((to, m));
    }

    /// Every other mesh endpoint: the other shards and the cluster gateway, if any.
    fn other_shards(&self) -> impl Iterator<Item = ShardId> + 'static {
        let me = self.id;
        (0..self.mesh_size()).map(ShardId).filter(move |s| *s != me)
    }

    /// The cluster gateway's mesh id, when the node is clustered.
    fn gateway(&self) -> Option<ShardId> {
        self.cfg.cluster_gateway.then_some(ShardId(self.shards))
    }

    /// Shards plus the gateway: the endpoints interest announcements and retained updates go to.
    fn mesh_size(&self) -> u16 {
        self.shards + self.cfg.cluster_gateway as u16
    }

    fn fire(&mut self, t: Timer, now: Instant) {
        match t {
            Timer::Connect(c) => {
                if self.sessions.registrations.is_held(c) {
                    self.registration_timed_out(c, now);
                } else if self.conns.get(&c).is_some_and(|c| !c.is_active()) {
                    self.close_conn(c, Some(ProtocolError::ConnectTimeout), now);
                }
            }
            Timer::Unpause(c) => self.unpause_timer(c, now),
            Timer::KeepAlive(c) => {
                let Some(conn) = self.conns.get(&c) else { return };
                if let Some(deadline) = conn.keepalive_deadline() {
                    // A paused publisher's PINGREQs wait unread in its socket: it is not overdue.
                    if deadline <= now && !conn.paused {
                        self.close_conn(c, Some(ProtocolError::KeepAliveTimeout), now);
                    } else {
                        self.arm(deadline, Timer::KeepAlive(c));
                    }
                }
            }
            Timer::Will(k) | Timer::Expiry(k) => self.settle_offline(k, now),
            Timer::Retained(k) => self.pump_retained(k, now),
            Timer::Sys => self.publish_sys(now),
        }
    }
}

impl Core for Shard {
    type Mesh = Mesh;
    type Handoff = Handoff;

    fn mesh_can_wait(m: &Mesh) -> bool {
        // The registration of a connection answered ahead, and its end: nothing waits for them.
        matches!(m, Mesh::Register { ahead: true, .. })
            || matches!(m, Mesh::Unregister { registration, .. } if registration.ahead_token().is_some())
    }

    fn handle_accept(&mut self, conn: ConnId, now: Instant) {
        if self.shutting_down {
            self.out.io.push_back(IoCmd::Close(conn));
            return;
        }
        self.conns.insert(conn, Box::new(Conn::new(conn, now)));
        self.arm(now + Duration::from_millis(self.cfg.connect_timeout_ms), Timer::Connect(conn));
    }

    fn handle_accepted(&mut self, conn: ConnId, from: crate::io::Accepted) {
        if let (true, Some(ip)) = (self.conns.contains_key(&conn), from.peer) {
            self.sessions.logins.connected(conn, ip);
        }
    }

    fn handle_peer_identity(&mut self, conn: ConnId, name: Option<&str>) {
        if self.conns.get(&conn).is_some_and(|c| !c.is_active()) {
            self.sessions.logins.identified(conn, name);
        }
    }

    fn handle_adopt(&mut self, conn: ConnId, state: Handoff, now: Instant) {
        self.refresh_auth();
        self.handle_accept(conn, now);
        if self.conns.contains_key(&conn) {
            self.sessions.logins.restore(conn, state.peer);
        }
        if self.conns.contains_key(&conn) {
            // Not `handle_read`: these bytes were counted by the shard that received them.
            self.read(conn, &state.bytes, now);
            self.run_deferred(now);
        }
    }

    fn handle_read(&mut self, conn: ConnId, data: &[u8], now: Instant) {
        self.refresh_auth();
        self.counters.bytes_in += data.len() as u64;
        self.read(conn, data, now);
        self.run_deferred(now);
    }

    fn handle_closed(&mut self, conn: ConnId, now: Instant) {
        self.conn_gone(conn, true, now);
        // The socket is gone: nothing will take its last bytes.
        self.out.closing.remove(&conn);
    }

    fn handle_backpressure(&mut self, conn: ConnId, blocked: bool, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.blocked = blocked;
        if !blocked {
            c.blocked_bytes = 0;
            if let Some(k) = c.session() {
                self.pump(k, now);
            }
            self.decongested(now);
        }
        self.run_deferred(now);
    }

    fn handle_mesh(&mut self, from: ShardId, msg: Mesh, now: Instant) {
        self.refresh_auth();
        match msg {
            Mesh::Deliver { msg, normal, groups, rerouted, ack } => {
                self.begin_remote_ack(ack);
                let tally = self.deliver_local(&msg, normal, &groups, rerouted, now);
                self.answer_stored(ack, rerouted, now);
                if let Some(origin) = msg.origin {
                    self.report_congestion(origin, tally, now);
                }
            }
            Mesh::Retain { msg, apply, ack } => {
                if apply {
                    self.apply_retained(msg);
                } else {
                    self.begin_remote_ack(ack);
                    self.own_retained(msg);
                    self.answer_stored(ack, false, now);
                }
            }
            Mesh::Stored { token, ok, forwarded, rerouted } => {
                self.on_stored(token, ok, forwarded, rerouted, now)
            }
            Mesh::Interest { deltas, token, generation } => {
                let grew = deltas.iter().any(|d| d.members > 0);
                for d in deltas {
                    self.apply_interest(from, d);
                }
                self.routing.seen.applied(from, generation);
                if grew {
                    self.interest_grew(now);
                }
                if let Some(token) = token {
                    self.send_mesh(from, Mesh::InterestAck { token });
                }
            }
            Mesh::InterestAck { token } => self.interest_acked(token, now),
            Mesh::ForwardAll { on, token } => {
                debug_assert_eq!(Some(from), self.gateway(), "only the gateway asks for every publish");
                let first = on && !self.routing.forward_all;
                self.routing.forward_all = on && self.gateway() == Some(from);
                if first && self.routing.forward_all {
                    // Before the answer: the gateway serves its peers only once every shard answered,
                    // and restored sessions must be known to its registrar before a peer is.
                    let sessions = self.held_registrations();
                    self.send_mesh(from, Mesh::SessionsHeld { sessions });
                }
                if let Some(token) = token {
                    self.send_mesh(from, Mesh::InterestAck { token });
                }
                if first && self.routing.forward_all {
                    let msgs = self.owned_retained();
                    self.send_mesh(from, Mesh::RetainedHeld { msgs });
                }
            }
            Mesh::Peers { up } => self.routing.peers = up,
            // Only the gateway is sent these.
            Mesh::RetainedHeld { .. } | Mesh::SessionsHeld { .. } => {}
            Mesh::Congestion { session, congested } => self.set_congested(session, from, congested, now),
            Mesh::Registered { token, outcome } => self.registered(token, outcome, now),
            Mesh::EndSession { client, export, of } => self.taken_over_elsewhere(client, export, of, now),
            Mesh::RegisteredAhead { client, token, registration } => {
                self.registered_ahead(&client, token, registration)
            }
            Mesh::PublishWill { will } => self.publish_lost_will(&will, now),
            Mesh::MergeSession { transfer } => self.merge_lost_session(&transfer, now),
            Mesh::EndForwarding { client } => self.end_forwarding(&client, now),
            // Only the gateway registers client ids and moves sessions.
            Mesh::Register { .. }
            | Mesh::Unregister { .. }
            | Mesh::Exported { .. }
            | Mesh::Settled { .. } => {}
        }
        self.run_deferred(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.refresh_auth();
        while let Some(Reverse((at, _))) = self.timers.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, t))) = self.timers.heap.pop() else { break };
            self.fire(t, now);
        }
        self.evict_expired_retained(now);
        self.run_deferred(now);
    }

    fn handle_shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        // The same counters as the metrics endpoint, for a node run without one: every drop the policies
        // allow is counted.
        let c = &self.counters;
        tracing::info!(
            shard = self.id.0,
            connects = c.connects,
            connects_refused = c.connects_refused,
            protocol_errors = c.protocol_errors,
            publishes_in = c.publishes_in,
            deliveries = c.deliveries,
            dropped_qos0 = c.dropped_qos0,
            dropped_queue_full = c.dropped_queue_full,
            dropped_queue_bytes = c.dropped_queue_bytes,
            dropped_expired = c.dropped_expired,
            auth_refused = c.auth_refused,
            denied_by_acl = c.denied_by_acl,
            dropped_too_large = c.dropped_too_large,
            dropped_no_member = c.dropped_no_member,
            handoffs = c.handoffs,
            publisher_pauses = c.publisher_pauses,
            storage_errors = self.storage_errors(),
            "shard counters at shutdown"
        );
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in ids {
            self.close_conn(c, Some(ProtocolError::ShuttingDown), now);
        }
        self.store_shutdown();
    }

    fn handle_commit(&mut self, now: Instant) {
        self.commit(now);
        self.run_deferred(now);
    }

    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8> {
        let out = match self.conns.get_mut(&conn) {
            Some(c) => c.take_out(),
            None => self.out.closing.remove(&conn).unwrap_or_default(),
        };
        self.counters.bytes_out += out.len() as u64;
        out
    }

    fn poll_io(&mut self) -> Option<IoCmd<Handoff>> {
        self.out.io.pop_front()
    }

    fn set_waker(&mut self, wake: crate::io::WakeFn) {
        self.start_background_flush(wake);
    }

    fn poll_mesh(&mut self) -> Option<(ShardId, Mesh)> {
        self.out.mesh.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let retained = self.retained.expiry.peek().map(|Reverse((at, _))| *at);
        let timer = match (self.timers.heap.peek().map(|Reverse((at, _))| *at), retained) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        [timer, self.store_deadline(), self.metrics_deadline()].into_iter().flatten().min()
    }
}

type IoQueue = VecDeque<IoCmd<Handoff>>;

/// Why a packet loop stopped early.
enum ReadStep {
    Continue,
    /// The connection was closed or handed off: stop reading its bytes.
    Stop,
}

/// Encodes `pkt` for a connection; used by every path that answers a client.
fn encode_into(out: &mut Vec<u8>, pkt: &Packet<'_>, protocol: Protocol) {
    if let Err(e) = shardmq_wire::encode(pkt, protocol, out) {
        // Every packet the core builds is within protocol limits; reaching this is a bug, not bad input.
        debug_assert!(false, "core built an unencodable packet: {e}");
        tracing::error!(error = %e, "failed to encode an outgoing packet");
    }
}

fn inc(c: &AtomicUsize) -> usize {
    c.fetch_add(1, Ordering::AcqRel)
}
fn dec(c: &AtomicUsize) {
    c.fetch_sub(1, Ordering::AcqRel);
}
