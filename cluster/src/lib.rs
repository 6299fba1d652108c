//! `shardmq-cluster`: the sans-I/O core of a zone of shardmq nodes.
//!
//! What it does (so far): a node's identity in the cluster ([`NodeIdentity`]: name, address, zone,
//! region and an incarnation that changes on every restart, so a restarted node is a new member and its
//! old self is declared down); membership of one zone by SWIM ([`Membership`], on `foca`), with every
//! gossip datagram framed, versioned and authenticated with the cluster secret ([`frame`]); and node-level
//! interest ([`interest`]): BinaryFuse8 summaries of exact filters plus wildcard lists, with 0 ↔ 1 deltas
//! between snapshots and no false negatives; and the link protocol ([`link`]): frames (a forwarded PUBLISH
//! in at most 16 bytes of framing) and the handshake that opens a link (version, identities, a proof of the
//! cluster secret over both nonces); and retained replicas ([`retained`]): last writer wins by (hybrid
//! logical clock, node name), with tombstones, converging in any delivery order; and the part of a link
//! that outlives its connection ([`session`]): numbered frames kept within a byte budget until
//! acknowledged, resent exactly once after a reconnect, or a resync when the peer restarted; and the
//! zone's interest routing ([`router`]): snapshots to peers that come up, deltas after, the peers a publish
//! goes to, and SUBACKs that wait until every peer up has the new interest (or is down, or timed out). Like the
//! shard core, it takes datagrams, timer deadlines and `now`, and hands out datagrams to send, member
//! events and its next deadline; it never touches a socket or a clock, so a whole zone runs in one
//! process under a seeded simulation (`tests/sim.rs`).
//!
//! What it does not do yet: drive links over sockets (connect, backoff, timers), shared-group weights
//! across nodes, retained snapshots for joining nodes, or anything the broker binary drives (no
//! flags are wired to it yet). Those build on this (issue "Cluster, one zone").

pub mod frame;
mod identity;
pub mod interest;
pub mod link;
mod membership;
pub mod retained;
pub mod router;
pub mod session;

pub use identity::{NodeIdentity, NodeName};
pub use membership::{Membership, MembershipConfig, MembershipCounters, MembershipEvent};
