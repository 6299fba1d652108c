//! `shardmq-cluster`: the sans-I/O core of a zone of shardmq nodes.
//!
//! What it does (so far), each part taking bytes, events and `now` in and handing bytes, events and its
//! next deadline out; it never touches a socket or a clock, so a whole zone runs in one process under a
//! seeded simulation (`tests/sim.rs`, and the tests of each module):
//! - [`NodeIdentity`]: name, address, zone, region and an incarnation that changes on every restart, so a
//!   restarted node is a new member and its old life is declared down;
//! - [`Membership`]: SWIM membership of one zone on `foca`, every gossip datagram framed, versioned and
//!   authenticated with the cluster secret ([`frame`]);
//! - [`interest`]: node-level interest, exact filters as BinaryFuse8 summaries and wildcard filters as
//!   lists, 0 ↔ 1 deltas between snapshots, no false negatives;
//! - [`router`]: the zone's interest routing: snapshots to peers that come up, deltas after, the peers a
//!   publish goes to, one node per shared-group message by member count across the zone, and SUBACKs
//!   that wait until every peer up has the new interest (or is down, or timed out);
//! - [`link`]: the link protocol's frames (a forwarded PUBLISH in at most 16 bytes of framing, with the
//!   shared groups a peer delivers for; interest announcements; replicated retained updates) and the
//!   handshake that opens a link (version, identities, a proof of the cluster secret over both nonces);
//! - [`session`]: the part of a link that outlives its connection: numbered frames kept within a byte
//!   budget until acknowledged, resent exactly once after a reconnect, a resync when the peer restarted;
//! - [`zone`]: one node's transport, [`Zone`]: membership for discovery, one TCP link per peer (the smaller
//!   name dials, with backoff), handshake and session resume before a peer is up, heartbeats, a peer down
//!   as soon as its link is lost or silent (never on gossip alone), `--join` retries; the socket side
//!   only moves bytes and reports connects and closes (`tests/zone_sim.rs` runs whole zones over
//!   simulated datagrams and streams);
//! - [`retained`]: retained replicas, last writer wins by (hybrid logical clock, node name), with
//!   tombstones, converging in any delivery order;
//! - [`gateway`]: the node's cluster gateway, a mesh endpoint beside its shards: node-level interest to
//!   the router, publishes forwarded to the peers that may want them and delivered from them, durability
//!   answers across nodes, retained replication, publisher backpressure across nodes (`tests/node_sim.rs`
//!   runs whole nodes, real shard cores included);
//! - [`registry`]: the session registry's rules (owners of a client id by rendezvous hashing, the
//!   registrations an owner keeps with the client's will, how two registrations of one id resolve,
//!   tombstones of ended ones);
//! - [`registrar`]: the session registration protocol of a node, [`registrar::Registrar`]: connects
//!   registered with the id's owners (compare-and-swap on the epoch, copied to the replica before the
//!   answer), takeovers (`EndSession` to the previous holder) and fencing by epoch, requests re-sent when
//!   their owner goes, refused or granted provisionally when it does not answer (`--partition-mode`),
//!   registrations moved and sessions re-registered on membership changes, conflicts after partitions
//!   or restarts ended on merge, wills of a lost node's clients published once by the owners after their
//!   delay; its messages travel in [`link::Frame::Registry`] (`tests/registrar_sim.rs` runs 3 to 5
//!   registrars over a simulated zone with crashes and partitions). The gateway drives it for the
//!   shards (`gateway::sessions`).
//!
//! What it does not do: touch sockets, clocks or the OS's randomness (the caller seeds [`Zone::new`]; the
//! socket side is the runtime's cluster thread), TLS on links, links between zones or regions, or a
//! copy of a moving session kept until its new node stored it.

mod bytes;
pub mod frame;
pub mod gateway;
mod identity;
pub mod interest;
pub mod link;
mod membership;
pub mod registrar;
pub mod registry;
pub mod retained;
pub mod router;
pub mod session;
pub mod zone;

pub use identity::{NodeIdentity, NodeName};
pub use membership::{Membership, MembershipConfig, MembershipCounters, MembershipEvent};
pub use zone::{LinkCmd, LinkId, SendError, Zone, ZoneConfig, ZoneCounters, ZoneEvent};
