//! The session registration protocol of a zone, sans I/O: one [`Registrar`] per node, driven by the
//! node's gateway (connects and disconnects from its shards, membership changes and registry frames
//! from its zone), answering with registry messages for peers ([`crate::link::registry`]) and events
//! for the shards (issue "Cluster sessions"; the rules it applies are [`crate::registry`]'s).
//!
//! **Registering.** A CONNECT on this node ([`Registrar::handle_connect`]) becomes a `Register` request
//! to the client id's primary owner (rendezvous hashing over the members up, this node included; a
//! request to itself is handled in place). The owner compare-and-swaps the registration (an epoch above
//! every one it and the requester know of, holder = the requesting node), copies it to the replica and,
//! once the replica acknowledged the copy, answers `Granted` and, when another node held the session,
//! tells that node to end it (`EndSession`: the shard closes the connection with DISCONNECT 0x8E and
//! hands the session over, or drops it when the new connection started clean). Waiting for the replica
//! makes a grant survive the owner's loss: the replica, primary then, continues the epochs. (A grant that
//! takes no session from another node goes without waiting, its copy unacknowledged (`Copy`), when the
//! requester keeps the replica itself (the copy goes ahead of the grant on the same link), or when the
//! id had no registration at the owner and the requester is another node, which registers its session
//! again should the owner be lost first: every clean connection of a storm. So do the owner's copies of
//! later changes.) The
//! owner handles requests one at a time, so two CONNECTs racing on two nodes end with the later one
//! holding the session and the other told to end. A node stops delivering for an epoch that is no longer its
//! current one ([`Registrar::is_current`], the fencing query).
//!
//! **Answered ahead.** In [`PartitionMode::Available`] a clean start with no will whose session ends with
//! its connection is answered (CONNACK) at once ([`Registrar::handle_connect_ahead`]): nothing the zone
//! keeps depends on it. Its registration waits [`AHEAD_DELAY`]; a connection that ends meanwhile goes
//! as one `Register` marked ended, which an owner with no registration of the id only acknowledges, so
//! that a connection that comes and goes costs one message and its acknowledgement. Such a
//! registration is ordered against others of its id by its clock (newest wins), as those made on both
//! sides of a partition are, not by the owner's order: one older than the owner's registration changes
//! nothing there, and if its connection is still there, the owner says it lost (`Superseded`). The
//! clocks of one node agree with themselves; those of two nodes order connections their skew apart
//! as they say. A CONNECT that waits for its registration sends an earlier registration of the same
//! client answered ahead first, so that the owner sees one node's connections in the order they came.
//!
//! A request that comes again (sent anew after a membership change, or resent by its link after a cut)
//! is answered with the epoch its registration has, not granted anew: a registration is recognised by
//! its holder and the stamp of its connection.
//!
//! **Messages that can wait.** Acknowledgements, the end of a connection without a will (and the
//! owners' copies of it) and the copy of a new registration are marked so
//! ([`Registrar::poll_transmit_hinted`]): the gateway holds them a few milliseconds to send several
//! together. The end of a connection with a will never waits.
//!
//! **Requests that get no answer.** A request whose owner goes down is sent again to the new owner
//! once the membership changed. One that gets no answer in [`REQUEST_TIMEOUT`] (the owner is up but
//! does not answer) is refused in [`PartitionMode::Consistent`] (the shard answers CONNACK 0x88, 3.1.1:
//! 3), which also refuses at once when the id's owner over every member known (up or not) is down; in
//! [`PartitionMode::Available`] (the default) the node grants it itself, provisionally, and re-registers
//! it with the owner at the next membership change (where conflicts resolve as after a partition).
//!
//! **Membership changes.** On a peer up or down each node hands the registrations it owned whose owners
//! changed to their new owners (`Sync`; [`RegistryTable::rebalance`]), tombstones of ended ones
//! included (`Forget`: epochs go on above them), and re-registers the sessions it holds whose owners
//! changed, so the registry is whole again after one round of messages. A node merging a registration
//! from elsewhere ([`RegistryTable::merge`]: epoch, then hybrid logical clock, then node name) tells the
//! loser's holder to end its session, and the sender of a loser what won. This is also what reconciles
//! the sides of a healed partition, and a node that comes back with its log ([`Registrar::restore`],
//! re-registered with `Held`): its sessions that moved meanwhile are ended there, never resurrected,
//! and registrations naming it for sessions it no longer has are forgotten (a primary owner shows a
//! peer that comes up the registrations naming it). A registration naming a node above the session it
//! holds (a grant whose answer was lost) is forgotten too, and supersedes that session.
//!
//! **Who says what.** Registrations only ever merge forward (epoch, clock, name), and a copy from
//! elsewhere can only take a client for disconnected, never for connected again; but a running holder
//! is the authority on its own session (its `Sync` says whether the client is connected, and a
//! disconnect takes the will out), and the primary's copy is the authority for its replica.
//!
//! **Wills.** A registration carries the client's will while it is connected. When its holder goes
//! down, the owners mark the registrations it made before (by hybrid logical clock, against when they
//! saw it go) as disconnected, and the primary owner
//! publishes their wills ([`RegistrarEvent::PublishWill`]) once the delay has passed, unless a newer
//! registration replaced them meanwhile; the replica publishes only if it has become the primary (the
//! primary went down too). The publisher copies "published" to the replica. A will is so published
//! once, with two windows of one link delay each where the owners cannot know better: the primary
//! going down just after publishing (its copy is lost with the link; the replica publishes again), and
//! a client's normal disconnect still on its way to the owners when its holder's link goes (the owners
//! publish the will as for a lost connection). A connection the holder made while its link with the
//! owners was already gone but not yet seen gone can be taken for lost (and its will published) by
//! owners that cannot reach it; its holder corrects "connected" when they meet again. The delay
//! counts from when the publishing owner learnt
//! of the loss or received the registration (a will may come late after owner changes, never early).
//!
//! What it does not do: sockets, clocks (`now` comes in) or randomness; moving the session itself (the
//! shards do that on `EndSession`/`Granted`); publishing wills of clients that disconnected normally (the
//! holder's shard does). Sessions held only by a node that is down are unreachable until it returns.
//! Tombstones are forgotten after [`TOMBSTONE_TTL`], or earlier past [`crate::registry::MAX_TOMBSTONES`]
//! (the oldest first, under a storm of clean connections): a copy of an ended registration older than
//! that (a node partitioned away for longer) could come back as an offline registration.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::link::registry::{Previous, RegistryMsg, RequestId};
use crate::registry::{owners, Merged, Owners, Registration, RegistryTable, WillInfo};
use crate::retained::{Hlc, HlcStamp};
use crate::NodeName;

mod api;
mod requester;
mod requests;
#[cfg(test)]
mod tests;
mod wills;

use requests::{Op, Requests};

pub use api::{HeldSession, PartitionMode, RegistrarConfig, RegistrarCounters, RegistrarEvent};

/// How long a request waits for its owner's answer before the node decides without it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a registration answered ahead ([`Registrar::handle_connect_ahead`]) waits before it is
/// sent: a connection that ends meanwhile goes as one message with its end, which an owner with no
/// registration of the id only acknowledges.
pub const AHEAD_DELAY: Duration = Duration::from_millis(5);

/// How long an ended registration's tombstone is kept (pruned when timers run): far longer than any
/// copy of it can stay in flight.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Held {
    epoch: u64,
    stamp: HlcStamp,
    connected: bool,
    /// The will while connected.
    will: Option<Box<WillInfo>>,
    /// Not confirmed by an owner (granted provisionally, or restored from the log): re-registered at
    /// the next membership change whether its owners changed or not.
    unconfirmed: bool,
    /// Restored from the log ([`Registrar::restore`]): this life knows nothing of its last connection.
    restored: bool,
    /// The request that made it (none when restored): how the end of a connection answered ahead
    /// names it ([`Registrar::handle_disconnect_ahead`]).
    request: Option<RequestId>,
}

/// Messages to send, and to whom.
type Answers = Vec<(NodeName, RegistryMsg)>;

pub struct Registrar {
    me: NodeName,
    cfg: RegistrarConfig,
    started: Instant,
    hlc: Hlc,
    /// The peers up (this node is a member too, not listed).
    up: BTreeSet<NodeName>,
    /// Every member seen up, this node included, until removed: whom consistent mode expects.
    known: BTreeSet<NodeName>,
    /// Peers seen going down (and not up since), with this node's clock then: registrations they made
    /// before are of connections lost with them.
    lost: BTreeMap<NodeName, HlcStamp>,
    /// The registrations this node owns or replicates.
    table: RegistryTable,
    held: BTreeMap<Arc<str>, Held>,
    /// This node's requests waiting for an answer.
    pending: Requests,
    next_request: u64,
    /// Highest epoch an `EndSession` named for a client whose registration was still pending here: a
    /// grant at or below it is ended as soon as it arrives.
    superseded: BTreeMap<Arc<str>, (u64, NodeName, u64)>,
    /// Registrations this node granted as primary owner whose answers (`Granted`, `EndSession`) wait
    /// for the replica's acknowledgement, by (client, epoch): the replica, the answers.
    awaiting: BTreeMap<(Arc<str>, u64), (NodeName, Answers)>,
    /// Wills due after their holder's loss: when, by (client, epoch).
    wills: BTreeMap<(Arc<str>, u64), Instant>,
    /// Messages for peers; `true`: it may wait a moment for others to the same peer (see
    /// [`Registrar::poll_transmit_hinted`]).
    out: VecDeque<(NodeName, RegistryMsg, bool)>,
    /// Messages to this node itself (it owns the id), handled before a call returns.
    local: VecDeque<RegistryMsg>,
    events: VecDeque<RegistrarEvent>,
    counters: RegistrarCounters,
    /// The owners of the id looked up last: handling one message asks for them several times, each
    /// time three rendezvous hashes or more. Invariant: cleared whenever `up` changes.
    owners_memo: RefCell<Option<(String, Owners)>>,
}

impl Registrar {
    pub fn new(me: NodeName, cfg: RegistrarConfig, now: Instant) -> Registrar {
        let table = RegistryTable::with_max_tombstones(cfg.max_tombstones);
        Registrar {
            known: BTreeSet::from([me.clone()]),
            me,
            cfg,
            started: now,
            hlc: Hlc::default(),
            up: BTreeSet::new(),
            lost: BTreeMap::new(),
            table,
            held: BTreeMap::new(),
            pending: Requests::default(),
            next_request: 1,
            superseded: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            wills: BTreeMap::new(),
            out: VecDeque::new(),
            local: VecDeque::new(),
            events: VecDeque::new(),
            counters: RegistrarCounters::default(),
            owners_memo: RefCell::new(None),
        }
    }

    pub fn name(&self) -> &NodeName {
        &self.me
    }

    pub fn counters(&self) -> RegistrarCounters {
        RegistrarCounters {
            registrations: self.table.len() as u64,
            tombstones: self.table.tombstones() as u64,
            tombstones_dropped_early: self.table.tombstones_dropped_early(),
            ..self.counters
        }
    }

    /// Whether this node's session of `client` with `epoch` is still the one it holds: deliver for it
    /// only then.
    pub fn is_current(&self, client: &str, epoch: u64) -> bool {
        self.held.get(client).is_some_and(|h| h.epoch == epoch)
    }

    /// Whether this node holds `client`'s session with `epoch` or a later one of its own: a session
    /// sent to this node for `epoch` belongs to the one it holds now.
    pub fn holds_since(&self, client: &str, epoch: u64) -> bool {
        self.held.get(client).is_some_and(|h| h.epoch >= epoch)
    }

    /// The sessions this node holds, by client id (what its log keeps).
    pub fn held(&self) -> impl Iterator<Item = HeldSession> + '_ {
        self.held.iter().map(|(c, h)| HeldSession {
            client: c.clone(),
            epoch: h.epoch,
            stamp: h.stamp,
            connected: h.connected,
        })
    }

    /// The registration of `client` this node keeps as an owner or replica, if any.
    pub fn registration(&self, client: &str) -> Option<&Registration> {
        self.table.get(client)
    }

    /// The registrations this node keeps, in no particular order.
    pub fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.table.iter()
    }

    /// A session restored from this node's log after a restart, before any peer is up: offline, held
    /// with the epoch it had, and re-registered with its owners as peers come up (ended then if it moved
    /// meanwhile). The will of a client that was connected when the node stopped is its owners' to
    /// publish (they saw the node go down); a re-registration does not cancel it.
    ///
    /// A session this node already holds or registers (its client connected again before the restored
    /// ones were handed over) is not touched: that connection's registration is the newer one.
    pub fn restore(&mut self, client: &str, epoch: u64, stamp: HlcStamp) {
        debug_assert!(epoch >= 1);
        self.hlc.observe(stamp);
        if self.pending.registering(client) || self.held.contains_key(client) {
            return;
        }
        let h = Held {
            epoch,
            stamp,
            connected: false,
            will: None,
            unconfirmed: true,
            restored: true,
            request: None,
        };
        self.held.insert(client.into(), h);
    }

    fn wall_ms(&self, now: Instant) -> u64 {
        self.cfg.wall_ms_at_start + now.saturating_duration_since(self.started).as_millis() as u64
    }

    fn members(&self) -> impl Iterator<Item = &NodeName> + Clone {
        self.up.iter().chain(std::iter::once(&self.me))
    }

    fn owners_of(&self, client: &str) -> Owners {
        let mut memo = self.owners_memo.borrow_mut();
        match &mut *memo {
            Some((c, o)) if c == client => {
                debug_assert_eq!(Some(&*o), owners(client, self.members()).as_ref());
                o.clone()
            }
            _ => {
                let o = owners(client, self.members()).expect("this node is a member");
                let mut c = memo.take().map(|(c, _)| c).unwrap_or_default();
                c.clear();
                c.push_str(client);
                *memo = Some((c, o.clone()));
                o
            }
        }
    }

    fn is_up(&self, node: &NodeName) -> bool {
        *node == self.me || self.up.contains(node)
    }

    /// A peer's link is up (the gateway's `PeerUp`).
    pub fn handle_peer_up(&mut self, node: &NodeName, now: Instant) {
        if *node == self.me || self.up.contains(node) {
            return;
        }
        let before: Vec<NodeName> = self.members().cloned().collect();
        self.up.insert(node.clone());
        *self.owners_memo.get_mut() = None;
        self.lost.remove(node);
        self.known.insert(node.clone());
        // What this node, as primary owner, says `node` holds: a node back from a restart forgets what
        // it no longer has (and says so), one back from a partition keeps it.
        let mut named: Vec<Registration> = self
            .table
            .iter()
            .filter(|r| r.holder == *node && self.owners_of(&r.client).primary == self.me)
            .cloned()
            .collect();
        named.sort_by(|a, b| a.client.cmp(&b.client));
        for r in named {
            self.send(node, RegistryMsg::Sync(r));
        }
        self.membership_changed(&before, now);
    }

    /// A peer's link is down (the gateway's `PeerDown`).
    pub fn handle_peer_down(&mut self, node: &NodeName, now: Instant) {
        if !self.up.contains(node) {
            return;
        }
        let before: Vec<NodeName> = self.members().cloned().collect();
        self.up.remove(node);
        *self.owners_memo.get_mut() = None;
        // Registrations whose replica went: answered now (the new owners get them as they move).
        let released: Vec<(Arc<str>, u64)> =
            self.awaiting.iter().filter(|(_, (r, _))| r == node).map(|(k, _)| k.clone()).collect();
        for k in released {
            self.answer(&k);
        }
        let at = self.hlc.stamp(self.wall_ms(now));
        self.lost.insert(node.clone(), at);
        self.membership_changed(&before, now);
    }

    /// A member left the zone for good (an operator removed it): consistent mode stops expecting it.
    pub fn handle_member_removed(&mut self, node: &NodeName) {
        if *node != self.me {
            self.known.remove(node);
        }
    }

    /// A registry message from a peer (decoded from a [`crate::link::Frame::Registry`]).
    pub fn handle_message(&mut self, from: &NodeName, m: RegistryMsg, now: Instant) {
        self.on_message(from, m, now);
        self.drain_local(now);
    }

    /// Timers: requests past their deadline, wills due.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Ahead registrations due soon go with those due now (one wake-up for several).
        let soon = now + AHEAD_DELAY / 2;
        let late: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.deadline <= now || (p.deadline <= soon && matches!(p.op, Op::Register { sent: false, .. }))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let resend = match self.pending.get(id).expect("pending").op {
                // Waited its moment: it goes.
                Op::Register { sent: false, .. } => true,
                // The connection ended: nothing waits for a grant, but the owner must hear (the client
                // started clean: a session of its id elsewhere goes).
                Op::Register { ended: true, .. } => true,
                Op::Register { .. } => false,
                Op::Disconnect { .. } => true,
            };
            if resend {
                // A disconnect is sent again until an owner confirms it.
                self.send_request(id, now);
            } else if self.cfg.partition_mode == PartitionMode::Consistent {
                self.refuse(id);
            } else {
                self.grant_provisionally(id, now);
            }
        }
        self.fire_wills(now);
        self.prune(now);
        self.drain_local(now);
    }

    fn prune(&mut self, now: Instant) {
        let horizon = self.wall_ms(now).saturating_sub(TOMBSTONE_TTL.as_millis() as u64);
        self.table.prune(HlcStamp::new(horizon, 0));
    }

    /// When [`Registrar::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let requests = self.pending.values().map(|p| p.deadline);
        // A will not due here (another node is its primary owner) waits for a membership change, not a
        // timer.
        let wills = self
            .wills
            .iter()
            .filter(|((client, _), _)| self.owners_of(client).primary == self.me)
            .map(|(_, due)| *due);
        // Tombstones go when the oldest expires (without this timer they would wait for a late request
        // or a membership change, and a steady stream of clean connections would pile them up).
        let prune = self.table.oldest_tombstone().map(|at| {
            let expires_ms = at.wall_ms() + TOMBSTONE_TTL.as_millis() as u64;
            self.started + Duration::from_millis(expires_ms.saturating_sub(self.cfg.wall_ms_at_start) + 1)
        });
        requests.chain(wills).chain(prune).min()
    }

    /// The next message for a peer, to send in a [`crate::link::Frame::Registry`]
    /// ([`crate::link::registry::frames`]). Messages for a peer that is not up may be dropped: what they
    /// said is repeated after the next membership change.
    pub fn poll_transmit(&mut self) -> Option<(NodeName, RegistryMsg)> {
        self.out.pop_front().map(|(to, m, _)| (to, m))
    }

    /// [`Registrar::poll_transmit`], saying whether the message may wait a moment (a few milliseconds)
    /// to go with others to the same peer: nothing waits for it, and were the sender lost meanwhile,
    /// no will would be published wrongly for it (an acknowledgement, the disconnect of a connection
    /// without a will and the owners' copies of its end, the copy of a new registration that its holder
    /// would register again). At a few thousand connections a second, each of these woke a peer's
    /// cluster thread by itself; held, they go together. One that cannot wait takes those before it
    /// along, in order.
    pub fn poll_transmit_hinted(&mut self) -> Option<(NodeName, RegistryMsg, bool)> {
        self.out.pop_front()
    }

    /// Whether [`Registrar::poll_transmit`] or [`Registrar::poll_event`] has something.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.events.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<RegistrarEvent> {
        self.events.pop_front()
    }

    fn send(&mut self, to: &NodeName, m: RegistryMsg) {
        self.send_hinted(to, m, false)
    }

    /// [`Registrar::send`] of a message that may wait (see [`Registrar::poll_transmit_hinted`]).
    fn send_can_wait(&mut self, to: &NodeName, m: RegistryMsg) {
        self.send_hinted(to, m, true)
    }

    fn send_hinted(&mut self, to: &NodeName, m: RegistryMsg, can_wait: bool) {
        if *to == self.me {
            self.local.push_back(m);
        } else if self.up.contains(to) {
            self.out.push_back((to.clone(), m, can_wait));
        }
    }

    fn drain_local(&mut self, now: Instant) {
        while let Some(m) = self.local.pop_front() {
            let me = self.me.clone();
            self.on_message(&me, m, now);
        }
    }

    fn on_message(&mut self, from: &NodeName, m: RegistryMsg, now: Instant) {
        match m {
            RegistryMsg::Register { request, client, clean_start, stamp, will, known, ahead, ended } => {
                self.hlc.observe(stamp);
                // The registration of a connection answered ahead comes a moment after its CONNACK (see
                // `handle_connect_ahead`): another connection of the id may have been registered
                // meanwhile. Such a connection is ordered by its clock, as registrations made on both
                // sides of a partition are: one older than the registration here changes nothing (it
                // must not take over a client that moved on, to another node or to a later connection
                // here), and if still there, its connection ends. The clocks of one node never
                // disagree; those of two nodes can misjudge connections their skew apart.
                // One that ended, of an id with no registration here, leaves nothing behind either.
                // What the table has of the id, looked up once: its epoch, whether this request made it
                // already (below), whether it is newer by clock than this request.
                let current = self
                    .table
                    .get(&client)
                    .map(|r| (r.epoch, r.holder == *from && r.stamp == stamp, r.stamp > stamp));
                let newer = current.is_some_and(|c| c.2);
                if ahead && ended && (newer || current.is_none()) {
                    self.send_can_wait(from, RegistryMsg::DisconnectAck { request });
                    return;
                }
                if ahead && newer {
                    let r = self.table.get(&client).expect("looked up above");
                    let (successor, successor_epoch) = (r.holder.clone(), r.epoch);
                    self.send(from, RegistryMsg::Superseded { request, client, successor, successor_epoch });
                    return;
                }
                // The registration this request made already (the same holder and connection stamp): it
                // came again, sent anew after a membership change or delivered late by a link that
                // resent it after a cut. Answered with the epoch it has, not granted anew: a new epoch
                // for a request its holder already had answered would name a connection it does not
                // have, which would end the session it does (node simulation, seed 150912).
                // (Not while its grant waits for the replica: that answer comes, with what it took over.)
                if let Some((epoch, true, _)) = current {
                    if !self.awaits(&client) {
                        let m = RegistryMsg::Granted { request, client, epoch, previous: None };
                        self.send_hinted(from, m, ahead);
                    }
                    return;
                }
                // No registration of the id here (none yet, or only its tombstone): the replica has none
                // either that a lost copy would leave standing.
                let fresh = current.is_none();
                let r = self.table.register(&client, from, stamp, will, known);
                debug_assert!(r.epoch > known, "a grant goes above every epoch its requester knows of");
                let previous =
                    r.previous.as_ref().map(|p| Previous { holder: p.holder.clone(), epoch: p.epoch });
                let granted =
                    RegistryMsg::Granted { request, client: client.clone(), epoch: r.epoch, previous };
                let mut answers = vec![(from.clone(), granted)];
                if let Some(prev) = r.previous {
                    self.counters.takeovers += 1;
                    answers.push(end_message(&prev, from, r.epoch, clean_start));
                }
                let o = self.owners_of(&client);
                match o.replica.filter(|rep| o.primary == self.me && *rep != self.me) {
                    Some(replica)
                        if (replica == *from || (fresh && *from != self.me))
                            && answers.len() == 1
                            && !self.awaits(&client) =>
                    {
                        // Nothing waits for the replica's acknowledgement when the grant takes no
                        // session from another node and either:
                        // - the requester keeps the replica itself: the copy goes ahead of the grant on
                        //   the same link, so the grant never arrives without it;
                        // - or the id had no registration here (a new one, as for every clean connection
                        //   of a storm), and the requester is another node. Were this node lost before
                        //   the replica has the copy, the replica has no registration of the id that the
                        //   copy would have replaced (one whose will it could publish, or whose holder
                        //   it could take for the session's), and the requester, alive since it holds
                        //   the session, registers it again with the new primary, will included; a
                        //   registration of the id made meanwhile at the same epoch is told apart by its
                        //   clock, as after a partition.
                        // Not while an earlier grant of the id waits for its replica: grants of one id
                        // must reach their requester in order. A requester that is this node waits:
                        // holder and primary lost at once would leave no one who knows its will.
                        // The copy can wait (the holder registers again should it be lost), unless it
                        // must go ahead of the grant on the same link: the grant takes it along.
                        let copy = self.table.get(&client).expect("registered").clone();
                        self.send_can_wait(&replica, RegistryMsg::Copy(copy));
                        self.send_answers(answers, ahead);
                    }
                    Some(replica) => {
                        // Answered once the replica has it: a grant, and the takeover it makes, survive
                        // this node's loss (the replica continues the epochs, and knows the will of a
                        // connection that moved is no longer due).
                        let copy = self.table.get(&client).expect("registered").clone();
                        self.send(&replica, RegistryMsg::Replicate(copy));
                        self.awaiting.insert((client, r.epoch), (replica, answers));
                    }
                    None => {
                        self.copy_to_owners(&client);
                        self.send_answers(answers, ahead);
                    }
                }
            }
            RegistryMsg::Granted { request, client, epoch, previous } => {
                self.granted(from, request, client, epoch, previous, now)
            }
            RegistryMsg::Disconnect { request, client, epoch, ended } => {
                // Only the sender's own registration: after a partition two registrations of an id can
                // have the same epoch (each side went on from the last it knew), and the one that lost the
                // conflict must not end the winner's (registrar simulation, seed 63826).
                let own = self.table.get(&client).filter(|r| r.epoch == epoch && r.holder == *from).cloned();
                // Sent to this node as the id's primary, but it is no longer (a member came up and it
                // handed the registration over): unanswered, it goes again to the primary of now at its
                // timeout. Acknowledged, it would be lost, and the new primary would keep the client
                // connected (registrar simulation, seed 72214).
                if own.is_none() && self.owners_of(&client).primary != self.me {
                    return;
                }
                let ending = own.clone().filter(|_| ended);
                // A requester that keeps the replica learns from the `Forget` it gets anyway: that is
                // its acknowledgement (see `Forget`).
                let forget_answers =
                    ending.is_some() && self.owners_of(&client).contains(from) && *from != self.me;
                if !forget_answers {
                    self.send_can_wait(from, RegistryMsg::DisconnectAck { request });
                }
                // The other owners' copies of the end can wait when the registration has no will: were
                // this node lost first, the replica would take the client for connected a while longer,
                // with no will to publish for it.
                let can_wait = own.as_ref().is_some_and(|r| r.will.is_none());
                if let Some(r) = ending {
                    let at = self.hlc.stamp(self.wall_ms(now));
                    self.table.ended(&client, epoch, at);
                    self.forget_at_owners_hinted(r, None, can_wait);
                } else if !ended && own.is_some() {
                    self.table.disconnected(&client, epoch);
                    self.copy_to_owners_hinted(&client, can_wait);
                }
            }
            RegistryMsg::DisconnectAck { request } => {
                let done = |op: &Op| matches!(op, Op::Disconnect { .. } | Op::Register { ended: true, .. });
                if self.pending.get(request).is_some_and(|p| done(&p.op)) {
                    let p = self.pending.remove(request).expect("checked");
                    if matches!(p.op, Op::Register { .. }) {
                        self.registration_gone(&p.client);
                    }
                }
            }
            RegistryMsg::EndSession { client, epoch, successor, successor_epoch, discard } => {
                self.session_superseded(client, epoch, successor, successor_epoch, discard, now)
            }
            RegistryMsg::Sync(r)
            | RegistryMsg::Replicate(r)
            | RegistryMsg::Held(r)
            | RegistryMsg::Copy(r)
                if self.phantom(&r) =>
            {
                // A registration naming this node for a session it does not hold (it lost it in a
                // restart, or ended it and the owners have not heard yet), or above the one it holds
                // (granted for a connect it refused or granted itself meanwhile, the answer lost): gone.
                // A session held here below it is superseded by it, as by a newer connect here: it
                // ends too, so that no connection runs under a registration it does not have.
                self.hlc.observe(r.stamp);
                let me = self.me.clone();
                self.session_superseded(r.client.clone(), r.epoch, me, r.epoch, false, now);
                let at = self.hlc.stamp(self.wall_ms(now));
                self.table.ended_elsewhere(r.clone(), at);
                self.send(from, RegistryMsg::Forget(r.clone()));
                self.forget_at_owners_but(r, Some(from));
            }
            RegistryMsg::Held(mut r) => {
                // A session restored from its holder's log says nothing about the connection it had:
                // the owners saw the holder go, and its will is theirs to publish (or was).
                let same = self.table.get(&r.client).filter(|c| (c.epoch, c.stamp) == (r.epoch, r.stamp));
                if let Some(c) = same {
                    r.connected = c.connected;
                    r.will = c.will.clone();
                }
                self.sync(from, r, false, now);
            }
            RegistryMsg::Sync(r) => {
                // A running holder's word on its own session: connected, or disconnected with its will
                // dealt with.
                let word = r.holder == *from;
                self.sync(from, r, word, now);
            }
            RegistryMsg::Replicate(r) => self.replica_copy(from, r, true, now),
            RegistryMsg::Copy(r) => self.replica_copy(from, r, false, now),
            RegistryMsg::Superseded { request, client, successor, successor_epoch } => {
                self.superseded_ahead(request, client, successor, successor_epoch)
            }
            RegistryMsg::Replicated { client, epoch } => {
                let done: Vec<(Arc<str>, u64)> = self
                    .awaiting
                    .range((client.clone(), 0)..=(client.clone(), epoch))
                    .filter(|(_, (replica, _))| replica == from)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in done {
                    self.answer(&k);
                }
            }
            RegistryMsg::Forget(r) => {
                self.hlc.observe(r.stamp);
                // The end of the registration a disconnect here reported: that disconnect is done.
                let mine = r.holder == self.me;
                let done: Vec<RequestId> = self
                    .pending
                    .of(&r.client)
                    .filter(|(_, p)| {
                        mine && matches!(p.op, Op::Disconnect { epoch, ended: true, .. } if epoch == r.epoch)
                    })
                    .map(|(id, _)| id)
                    .collect();
                for id in done {
                    self.pending.remove(id);
                }
                let at = self.hlc.stamp(self.wall_ms(now));
                let last = r.clone();
                if let Some(removed) = self.table.ended_elsewhere(r, at) {
                    if removed.holder != last.holder {
                        self.counters.conflicts_resolved += 1;
                        self.end_session(&removed, &last.holder, last.epoch, false);
                    }
                    // The other owners may have the registration this one removed; the sender ended it.
                    self.forget_at_owners_but(last, Some(from));
                }
            }
        }
    }

    /// The primary's copy of `client`'s registration (`Replicate`, or `Copy` when nothing waits for
    /// the acknowledgement: see `Register`). The primary dealt with conflicts; a copy is merged silently,
    /// unless it lost here (the primary learns what won, and ends the loser).
    fn replica_copy(&mut self, from: &NodeName, r: Registration, acknowledge: bool, now: Instant) {
        self.hlc.observe(r.stamp);
        let (client, epoch) = (r.client.clone(), r.epoch);
        let word = (r.epoch, r.stamp, r.connected);
        match self.table.merge(r) {
            Merged::Ended { last } => self.send(from, RegistryMsg::Forget(last)),
            Merged::Rejected { winner } if self.table.is_ended(&client) => {
                self.send(from, RegistryMsg::Forget(winner))
            }
            Merged::Rejected { winner } => self.send(from, RegistryMsg::Sync(winner)),
            Merged::Recorded | Merged::Replaced { .. } => {
                self.table.set_connected(&client, word.0, word.1, word.2);
            }
        }
        if self.own_word(&client) {
            self.copy_to_owners(&client);
        }
        self.note_loss(&client, now);
        if acknowledge {
            self.send(from, RegistryMsg::Replicated { client, epoch });
        }
    }

    /// A registration from elsewhere to merge (`Sync`, `Held`); `word`: its holder sent it and says
    /// whether its client is connected.
    fn sync(&mut self, from: &NodeName, r: Registration, word: bool, now: Instant) {
        self.hlc.observe(r.stamp);
        let client = r.client.clone();
        let before = self.table.get(&client).cloned();
        let said = (r.epoch, r.stamp, r.connected);
        // A copy of an id without a tombstone here, not newer than a tombstone this node dropped: it may
        // be that registration's, brought back (even from its holder: a word sent before the session
        // ended can arrive after the tombstone went). If it is what the table has now, its holder is
        // shown it, as to a peer that comes up, and answers `Forget` if it has no such session (see
        // `phantom`). What the table had before does not vouch for it: it may be such a copy too (an
        // older epoch of the id, from another node, came first: registrar simulation, seed 26088).
        let doubtful = !self.table.is_ended(&client) && r.epoch <= self.table.epoch_floor();
        let shown = doubtful.then(|| r.clone());
        self.merge(from, r);
        if let Some(r) = shown.filter(|r| self.table.get(&r.client) == Some(r) && before.as_ref() != Some(r))
        {
            self.show_holder(r, now);
        }
        if word {
            let (epoch, stamp, connected) = said;
            if connected {
                self.table.set_connected(&client, epoch, stamp, true);
            } else if self.table.get(&client).is_some_and(|c| c.stamp == stamp) {
                self.table.disconnected(&client, epoch);
            }
        }
        self.own_word(&client);
        // Only a change is passed on: two nodes whose views of the owners differ for a moment would
        // otherwise send one registration back and forth.
        if self.table.get(&client) != before.as_ref() {
            self.copy_to_owners(&client);
        }
        self.note_loss(&client, now);
    }

    /// Asks `r`'s holder whether it has that session: a peer answers `Forget` if not (see `phantom`); a
    /// registration naming this node is checked in place.
    fn show_holder(&mut self, r: Registration, now: Instant) {
        if r.holder == self.me {
            if self.phantom(&r) {
                let at = self.hlc.stamp(self.wall_ms(now));
                self.table.ended_elsewhere(r.clone(), at);
                self.forget_at_owners_but(r, None);
            }
        } else if self.up.contains(&r.holder) {
            let holder = r.holder.clone();
            self.send(&holder, RegistryMsg::Sync(r));
        }
    }

    /// A registration here naming this node as the holder of the session it holds: whether the client is
    /// connected is this node's to say. Returns whether that changed the registration.
    fn own_word(&mut self, client: &Arc<str>) -> bool {
        let Some(h) = self.held.get(client).filter(|h| !h.restored) else { return false };
        let mine = self
            .table
            .get(client)
            .is_some_and(|r| r.holder == self.me && (r.epoch, r.stamp) == (h.epoch, h.stamp));
        if !mine {
            false
        } else if h.connected {
            self.table.set_connected(client, h.epoch, h.stamp, true)
        } else {
            self.table.disconnected(client, h.epoch)
        }
    }

    /// Whether `r` names this node as the holder of a session it does not hold with that epoch or a
    /// later one, nor waits a grant for.
    fn phantom(&self, r: &Registration) -> bool {
        r.holder == self.me
            && self.held.get(&r.client).is_none_or(|h| h.epoch < r.epoch)
            && !self.pending.registering(&r.client)
    }

    /// A grant (first) and the end of the session it took over (second, if any). The grant of a
    /// connection answered `ahead` can wait: nothing waits for it. The end of the session taken over
    /// cannot: until it arrives, the client id has two live sessions.
    fn send_answers(&mut self, answers: Answers, ahead: bool) {
        for (i, (to, m)) in answers.into_iter().enumerate() {
            self.send_hinted(&to, m, ahead && i == 0);
        }
    }

    /// Tells `loser`'s holder that its session lost to `winner`'s registration.
    fn end_session(&mut self, loser: &Registration, winner: &NodeName, winner_epoch: u64, discard: bool) {
        let (to, m) = end_message(loser, winner, winner_epoch, discard);
        self.send(&to, m);
    }

    /// Whether a grant of `client` made here waits for its replica's acknowledgement.
    fn awaits(&self, client: &Arc<str>) -> bool {
        self.awaiting.range((client.clone(), 0)..).next().is_some_and(|((c, _), _)| c == client)
    }

    /// Sends the answers of a registration its replica now has (or that waits for no replica any more).
    fn answer(&mut self, key: &(Arc<str>, u64)) {
        let Some((_, answers)) = self.awaiting.remove(key) else { return };
        for (to, m) in answers {
            self.send(&to, m);
        }
    }

    /// Merges a registration from `from`; the loser of a conflict is told to end its session, and the
    /// sender of one that lost learns the winner (or that the winner ended), so its table converges too.
    fn merge(&mut self, from: &NodeName, r: Registration) {
        match self.table.merge(r.clone()) {
            Merged::Recorded => {}
            Merged::Ended { last } => {
                if *from != self.me {
                    self.send(from, RegistryMsg::Forget(last));
                }
            }
            Merged::Replaced { loser } => {
                self.counters.conflicts_resolved += 1;
                self.end_session(&loser, &r.holder, r.epoch, false);
            }
            Merged::Rejected { winner } => {
                self.counters.conflicts_resolved += 1;
                self.end_session(&r, &winner.holder, winner.epoch, false);
                if *from != self.me {
                    let m = if self.table.is_ended(&r.client) {
                        RegistryMsg::Forget(winner)
                    } else {
                        RegistryMsg::Sync(winner)
                    };
                    self.send(from, m);
                }
            }
        }
    }

    /// After a change of `client`'s registration here: the other owners get it, as a silent copy from
    /// the primary, or to merge (conflicts included) from a node that is not the primary.
    fn copy_to_owners(&mut self, client: &Arc<str>) {
        self.copy_to_owners_hinted(client, false)
    }

    fn copy_to_owners_hinted(&mut self, client: &Arc<str>, can_wait: bool) {
        let Some(r) = self.table.get(client).cloned() else { return };
        let o = self.owners_of(client);
        let primary = o.primary == self.me;
        let me = self.me.clone();
        // A registration of a session restored here goes as `Held`: this node's word on it is no word.
        let restored = r.holder == me && self.held.get(client).is_some_and(|h| h.restored);
        for to in std::iter::once(o.primary).chain(o.replica).filter(|n| *n != me) {
            // Nothing waits for the replica's word on a change (only a grant does, see `Register`).
            let m = if primary {
                RegistryMsg::Copy(r.clone())
            } else if restored {
                RegistryMsg::Held(r.clone())
            } else {
                RegistryMsg::Sync(r.clone())
            };
            self.send_hinted(&to, m, can_wait);
        }
    }

    /// Registration `r` ended here: the other owners drop it too.
    fn forget_at_owners(&mut self, r: Registration) {
        self.forget_at_owners_but(r, None)
    }

    /// [`Registrar::forget_at_owners`], except to `but` (which told this node).
    fn forget_at_owners_but(&mut self, r: Registration, but: Option<&NodeName>) {
        self.forget_at_owners_hinted(r, but, false)
    }

    fn forget_at_owners_hinted(&mut self, r: Registration, but: Option<&NodeName>, can_wait: bool) {
        let o = self.owners_of(&r.client);
        let me = self.me.clone();
        for to in std::iter::once(o.primary).chain(o.replica).filter(|n| *n != me && Some(n) != but) {
            self.send_hinted(&to, RegistryMsg::Forget(r.clone()), can_wait);
        }
    }

    /// After the members up changed from `before`: registrations and sessions whose owners changed go
    /// to their new owners, requests to an owner that went down go to the new one, wills of clients
    /// whose holder went down become due.
    fn membership_changed(&mut self, before: &[NodeName], now: Instant) {
        let after: Vec<NodeName> = self.members().cloned().collect();
        let me = self.me.clone();
        self.prune(now);
        // Losses first, so that what moves to new owners says so.
        let mut lost: Vec<Arc<str>> = self
            .table
            .iter()
            .filter(|r| r.connected && !self.is_up(&r.holder))
            .map(|r| r.client.clone())
            .collect();
        lost.sort();
        for c in lost {
            self.note_loss(&c, now);
        }
        for (o, r) in self.table.rebalance(&me, before, &after) {
            self.counters.handed_over += 1;
            for to in std::iter::once(o.primary).chain(o.replica).filter(|n| *n != me) {
                self.send(&to, RegistryMsg::Sync(r.clone()));
            }
        }
        for (o, r) in self.table.rebalance_ended(&me, before, &after) {
            for to in std::iter::once(o.primary).chain(o.replica).filter(|n| *n != me) {
                self.send(&to, RegistryMsg::Forget(r.clone()));
            }
        }
        let moved: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(c, h)| h.unconfirmed || owners(c, before) != owners(c, &after))
            .map(|(c, _)| c.clone())
            .collect();
        for c in moved {
            self.reregister(&c);
        }
        let orphaned: Vec<RequestId> =
            self.pending.iter().filter(|(_, p)| !self.is_up(&p.owner)).map(|(id, _)| *id).collect();
        for id in orphaned {
            self.send_request(id, now);
        }
        self.fire_wills(now);
        self.drain_local(now);
    }
}

/// The message telling `loser`'s holder that its session lost to `winner`'s registration.
fn end_message(
    loser: &Registration,
    winner: &NodeName,
    winner_epoch: u64,
    discard: bool,
) -> (NodeName, RegistryMsg) {
    debug_assert!(loser.holder != *winner);
    let m = RegistryMsg::EndSession {
        client: loser.client.clone(),
        epoch: loser.epoch,
        successor: winner.clone(),
        successor_epoch: winner_epoch,
        discard,
    };
    (loser.holder.clone(), m)
}
