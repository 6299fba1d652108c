//! Membership of one zone: SWIM through `foca`, without I/O.
//!
//! The node's runtime owns one UDP socket for gossip and calls [`Membership::handle_datagram`] with what it
//! receives, [`Membership::handle_timeout`] when [`Membership::poll_timeout`] is due, and sends what
//! [`Membership::poll_transmit`] hands out; [`Membership::poll_event`] says which nodes came up or went
//! down. Every datagram is framed and, with a cluster secret, authenticated ([`crate::frame`]); what fails
//! is counted by reason and never reaches foca.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use foca::{Foca, Notification, PostcardCodec, Runtime, Timer};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::frame::{self, FrameError, Secret};
use crate::NodeIdentity;

/// What the node learns about the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node (in one of its lives) is a member.
    Up(NodeIdentity),
    /// A node is down: it stopped answering, left, or was replaced by a newer life of itself.
    Down(NodeIdentity),
    /// This node was declared down by the others (a partition, a long pause) and rejoined as a new life.
    Renamed { old: NodeIdentity, new: NodeIdentity },
}

/// Timing of failure detection. The defaults suit a LAN: a silent node is suspected after a missed probe
/// round and declared down `suspect_to_down` later.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub probe_period: Duration,
    /// How long a direct probe may take before indirect probes are sent.
    pub probe_rtt: Duration,
    pub suspect_to_down: Duration,
    pub gossip_period: Duration,
    /// The zone's expected size (sets how often an update is retransmitted).
    pub expected_members: u32,
    /// Largest datagram: foca does not fragment, so what it sends must fit an unfragmented UDP packet.
    pub max_datagram: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(200),
            suspect_to_down: Duration::from_millis(1500),
            gossip_period: Duration::from_millis(200),
            expected_members: 16,
            max_datagram: 1400,
        }
    }
}

impl MembershipConfig {
    fn foca(&self) -> foca::Config {
        let n = NonZeroU32::new(self.expected_members.max(1)).expect("at least 1");
        let mut c = foca::Config::new_lan(n);
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.suspect_to_down_after = self.suspect_to_down;
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: NonZeroUsize::new(3).expect("3"),
        });
        // Keep announcing to members believed down: a healed partition or a restarted seed rejoins
        // without an operator.
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(2),
            num_members: NonZeroUsize::new(2).expect("2"),
        });
        // Our frame and tag come on top of foca's datagram.
        let room = self.max_datagram.saturating_sub(frame::HEADER_LEN + frame::TAG_LEN).max(512);
        c.max_packet_size = NonZeroUsize::new(room).expect("non-zero");
        c
    }
}

/// Counters of one node's membership, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MembershipCounters {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// Refused before foca saw them, by reason (see [`FrameError::reason`]).
    pub refused_bad_frame: u64,
    pub refused_version: u64,
    pub refused_secret: u64,
    /// Well framed and authentic, but foca could not use it (undecodable, or for another identity).
    pub refused_by_swim: u64,
}

/// What foca asks for during one call, collected and applied after it returns.
#[derive(Default)]
struct Effects {
    sends: Vec<(NodeIdentity, Vec<u8>)>,
    timers: Vec<(Duration, Timer<NodeIdentity>)>,
    events: Vec<MembershipEvent>,
    /// Foca said whether its identity is known to an active member (`Active`) or not (`Idle`, and after
    /// a rejoin or when defunct).
    active: Option<bool>,
}

impl Runtime<NodeIdentity> for Effects {
    fn notify(&mut self, n: Notification<'_, NodeIdentity>) {
        match n {
            Notification::MemberUp(id) => self.events.push(MembershipEvent::Up(id.clone())),
            Notification::MemberDown(id) => self.events.push(MembershipEvent::Down(id.clone())),
            Notification::Rename(old, new) => {
                self.events.push(MembershipEvent::Renamed { old: old.clone(), new: new.clone() })
            }
            // This node's own standing: known to an active member, or not (yet, or any more).
            Notification::Active => self.active = Some(true),
            Notification::Idle | Notification::Defunct | Notification::Rejoin(_) => self.active = Some(false),
        }
    }

    fn send_to(&mut self, to: NodeIdentity, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<NodeIdentity>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// One node's view of its zone.
pub struct Membership {
    foca: Foca<NodeIdentity, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    secret: Option<Secret>,
    /// Due instant and a sequence number (foca's timers must fire in submission order when due together).
    timers: BTreeMap<(Instant, u64), Timer<NodeIdentity>>,
    next_timer: u64,
    transmit: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<MembershipEvent>,
    counters: MembershipCounters,
    /// Whether an active member knows this node's current identity (foca's `Active`; false until it
    /// joined, and again after it was declared down and rejoined as a new life until someone answers).
    active: bool,
}

impl Membership {
    /// `seed` feeds foca's random choices (whom to probe and gossip to): a simulation passes its own, a
    /// node anything unpredictable.
    pub fn new(
        me: NodeIdentity,
        config: &MembershipConfig,
        secret: Option<Secret>,
        seed: u64,
        now: Instant,
    ) -> Membership {
        let foca = Foca::new(me, config.foca(), StdRng::seed_from_u64(seed), PostcardCodec);
        let mut m = Membership {
            foca,
            secret,
            timers: BTreeMap::new(),
            next_timer: 0,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            counters: MembershipCounters::default(),
            active: false,
        };
        // Starts the probe and gossip rounds even before anyone is known.
        let mut fx = Effects::default();
        if let Err(e) = m.foca.handle_timer(Timer::ProbeRandomMember(Default::default()), &mut fx) {
            tracing::debug!(error = %e, "first probe round");
        }
        m.apply(fx, now);
        m
    }

    pub fn identity(&self) -> &NodeIdentity {
        self.foca.identity()
    }

    pub fn counters(&self) -> MembershipCounters {
        self.counters
    }

    /// The members this node believes up (itself excluded).
    pub fn members(&self) -> impl Iterator<Item = &NodeIdentity> {
        self.foca.iter_members().map(|m| m.id())
    }

    /// Asks the node listening at `addr` (a `--join` target) to let this one in. Repeat until a member
    /// answers: a seed that is not up yet simply does not reply.
    pub fn join(&mut self, addr: SocketAddr, now: Instant) {
        let mut fx = Effects::default();
        if let Err(e) = self.foca.announce(NodeIdentity::seed(addr), &mut fx) {
            tracing::debug!(%addr, error = %e, "announce");
        }
        self.apply(fx, now);
    }

    /// A gossip datagram arrived.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        self.counters.datagrams_in += 1;
        let body = match frame::open(self.secret.as_ref(), datagram) {
            Ok(b) => b,
            Err(e) => {
                let c = &mut self.counters;
                match e {
                    FrameError::Version(_) => c.refused_version += 1,
                    FrameError::Unauthenticated | FrameError::UnexpectedSecret | FrameError::WrongSecret => {
                        c.refused_secret += 1
                    }
                    FrameError::BadMagic | FrameError::Truncated => c.refused_bad_frame += 1,
                }
                // One line per power of two, per node: a misconfigured peer must not flood the log.
                let refused = c.refused_version + c.refused_secret + c.refused_bad_frame;
                if refused.is_power_of_two() {
                    tracing::warn!(%from, reason = e.reason(), refused, "gossip datagram refused: {e}");
                }
                return;
            }
        };
        let mut fx = Effects::default();
        if let Err(e) = self.foca.handle_data(body, &mut fx) {
            self.counters.refused_by_swim += 1;
            tracing::debug!(%from, error = %e, "gossip not applied");
        }
        self.apply(fx, now);
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            let mut fx = Effects::default();
            if let Err(e) = self.foca.handle_timer(timer, &mut fx) {
                tracing::debug!(error = %e, "membership timer");
            }
            self.apply(fx, now);
        }
    }

    /// Tells the others this node is leaving (a graceful shutdown), so they need not wait for probes.
    /// The node stays defunct afterwards (it answers no probe); drop it once the datagrams are sent.
    pub fn leave(&mut self, now: Instant) {
        let mut fx = Effects::default();
        if let Err(e) = self.foca.leave_cluster(&mut fx) {
            tracing::debug!(error = %e, "leaving the cluster");
        }
        self.apply(fx, now);
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// Whether an active member knows this node's current identity. A node that is not must announce
    /// itself (see `Zone`): foca stops its periodic work when it rejoins as a new life, and gossip addressed
    /// to the old lives of members that rejoined too is not accepted.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn apply(&mut self, fx: Effects, now: Instant) {
        if let Some(active) = fx.active {
            self.active = active;
        }
        for (to, body) in fx.sends {
            let mut d = Vec::with_capacity(body.len() + frame::HEADER_LEN + frame::TAG_LEN);
            frame::seal(self.secret.as_ref(), &body, &mut d);
            self.counters.datagrams_out += 1;
            self.transmit.push_back((to.addr, d));
        }
        for (after, t) in fx.timers {
            self.timers.insert((now + after, self.next_timer), t);
            self.next_timer += 1;
        }
        for e in fx.events {
            // The stand-in of a `--join` target never becomes a member by itself, but keep the rule
            // explicit: only named nodes are reported.
            let named = match &e {
                MembershipEvent::Up(id) | MembershipEvent::Down(id) => !id.name.0.is_empty(),
                MembershipEvent::Renamed { .. } => true,
            };
            if named {
                self.events.push_back(e);
            }
        }
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("me", self.foca.identity())
            .field("members", &self.foca.num_members())
            .field("timers", &self.timers.len())
            .finish()
    }
}
