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
//! logical clock, node name), with tombstones, converging in any delivery order. Like the
//! shard core, it takes datagrams, timer deadlines and `now`, and hands out datagrams to send, member
//! events and its next deadline; it never touches a socket or a clock, so a whole zone runs in one
//! process under a seeded simulation (`tests/sim.rs`).
//!
//! What it does not do yet: running links (reconnects, resume from `Received`, bounded backlogs),
//! forwarding by interest, retained snapshots for joining nodes, or anything the broker binary drives (no
//! flags are wired to it yet). Those build on this (issue "Cluster, one zone").

pub mod frame;
mod identity;
pub mod interest;
pub mod link;
mod membership;
pub mod retained;

pub use identity::{NodeIdentity, NodeName};
pub use membership::{Membership, MembershipConfig, MembershipCounters, MembershipEvent};
