//! Registrars of a few nodes wired directly (every message delivered at once, in order): the owner's
//! compare-and-swap, fencing, timeouts, wills. Networks with delays, losses and crashes are
//! `tests/registrar_sim.rs`'s.

use super::*;
use crate::link::registry::{decode, encode};
use crate::registry::owners;

mod ahead;

fn n(s: &str) -> NodeName {
    NodeName(s.into())
}

fn will(delay_s: u32) -> WillInfo {
    WillInfo { topic: "dead".into(), payload: Arc::from(&b"x"[..]), qos: 1, retain: false, delay_s }
}

struct Nodes {
    t0: Instant,
    nodes: Vec<Registrar>,
    /// Events by node index.
    events: Vec<Vec<RegistrarEvent>>,
}

impl Nodes {
    fn new(k: usize, mode: PartitionMode) -> Nodes {
        let t0 = Instant::now();
        let cfg = RegistrarConfig { partition_mode: mode, ..RegistrarConfig::default() };
        let mut nodes: Vec<Registrar> =
            (0..k).map(|i| Registrar::new(n(&format!("n{i}")), cfg.clone(), t0)).collect();
        for a in 0..k {
            for b in 0..k {
                if a != b {
                    let peer = nodes[b].name().clone();
                    nodes[a].handle_peer_up(&peer, t0);
                }
            }
        }
        let mut z = Nodes { t0, nodes, events: vec![Vec::new(); k] };
        z.pump(t0);
        z
    }

    fn idx(&self, name: &NodeName) -> Option<usize> {
        self.nodes.iter().position(|r| r.name() == name)
    }

    fn names(&self) -> Vec<NodeName> {
        self.nodes.iter().map(|r| r.name().clone()).collect()
    }

    /// Delivers every message (through its encoding) until none is left; messages to nodes in `cut`
    /// are lost.
    fn pump_cut(&mut self, now: Instant, cut: &[usize]) {
        self.deliver(now, cut, None);
    }

    fn pump(&mut self, now: Instant) {
        self.pump_cut(now, &[]);
    }

    /// [`Nodes::pump`], counting the messages by kind.
    fn pump_counted(&mut self, now: Instant, counts: &mut BTreeMap<&'static str, u32>) {
        self.deliver(now, &[], Some(counts));
    }

    fn deliver(&mut self, now: Instant, cut: &[usize], mut counts: Option<&mut BTreeMap<&'static str, u32>>) {
        loop {
            let mut moved = false;
            for a in 0..self.nodes.len() {
                while let Some((to, m)) = self.nodes[a].poll_transmit() {
                    moved = true;
                    if let Some(c) = counts.as_deref_mut() {
                        *c.entry(kind(&m)).or_default() += 1;
                    }
                    let mut body = Vec::new();
                    encode(&m, &mut body);
                    let m = decode(&body).expect("decodes");
                    let from = self.nodes[a].name().clone();
                    if let Some(b) = self.idx(&to).filter(|b| !cut.contains(b)) {
                        self.nodes[b].handle_message(&from, m, now);
                    }
                }
            }
            if !moved {
                break;
            }
        }
        for (i, r) in self.nodes.iter_mut().enumerate() {
            while let Some(e) = r.poll_event() {
                self.events[i].push(e);
            }
        }
    }

    /// `node` goes down for every other node.
    fn down(&mut self, node: usize, now: Instant) {
        let name = self.nodes[node].name().clone();
        for (i, r) in self.nodes.iter_mut().enumerate() {
            if i != node {
                r.handle_peer_down(&name, now);
            }
        }
    }

    fn granted(&self, node: usize) -> Vec<(u64, Option<Previous>, bool)> {
        self.events[node]
            .iter()
            .filter_map(|e| match e {
                RegistrarEvent::Granted { epoch, previous, provisional, .. } => {
                    Some((*epoch, previous.clone(), *provisional))
                }
                _ => None,
            })
            .collect()
    }

    fn ended(&self, node: usize) -> Vec<(u64, NodeName, bool)> {
        self.events[node]
            .iter()
            .filter_map(|e| match e {
                RegistrarEvent::EndSession { epoch, successor, discard, .. } => {
                    Some((*epoch, successor.clone(), *discard))
                }
                _ => None,
            })
            .collect()
    }

    fn wills(&self) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (i, ev) in self.events.iter().enumerate() {
            for e in ev {
                if let RegistrarEvent::PublishWill { epoch, .. } = e {
                    out.push((i, *epoch));
                }
            }
        }
        out
    }
}

fn kind(m: &RegistryMsg) -> &'static str {
    match m {
        RegistryMsg::Register { .. } => "Register",
        RegistryMsg::Granted { .. } => "Granted",
        RegistryMsg::Disconnect { .. } => "Disconnect",
        RegistryMsg::DisconnectAck { .. } => "DisconnectAck",
        RegistryMsg::EndSession { .. } => "EndSession",
        RegistryMsg::Sync(_) => "Sync",
        RegistryMsg::Replicate(_) => "Replicate",
        RegistryMsg::Forget(_) => "Forget",
        RegistryMsg::Replicated { .. } => "Replicated",
        RegistryMsg::Held(_) => "Held",
        RegistryMsg::Copy(_) => "Copy",
        RegistryMsg::Superseded { .. } => "Superseded",
    }
}

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

/// A client id whose primary and replica over `names` are the given nodes.
fn client_owned_by(names: &[NodeName], primary: usize, replica: usize) -> String {
    (0..)
        .map(|i| format!("c{i}"))
        .find(|c| {
            owners(c, names)
                == Some(Owners { primary: names[primary].clone(), replica: Some(names[replica].clone()) })
        })
        .expect("some id")
}

#[test]
fn a_lone_node_owns_every_id_and_grants_at_once() {
    let t0 = Instant::now();
    let mut r = Registrar::new(n("solo"), RegistrarConfig::default(), t0);
    let id = r.handle_connect("c", false, None, t0);
    let stamp = r.held().next().expect("held").stamp;
    assert_eq!(
        r.poll_event(),
        Some(RegistrarEvent::Granted {
            request: id,
            client: "c".into(),
            epoch: 1,
            stamp,
            previous: None,
            provisional: false
        })
    );
    assert!(r.is_current("c", 1));
    assert!(r.poll_transmit().is_none());
    r.handle_connect("c", false, None, t0);
    assert!(matches!(r.poll_event(), Some(RegistrarEvent::Granted { epoch: 2, previous: None, .. })));
    assert!(!r.is_current("c", 1), "the older connection on this node is fenced");
    assert!(r.poll_timeout().is_none(), "nothing waits");
}

#[test]
fn the_owner_serialises_a_takeover_and_fences_the_old_holder() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let now = at(z.t0, 1);
    z.nodes[1].handle_connect(&c, false, Some(will(0)), now);
    z.pump(now);
    assert_eq!(z.granted(1), vec![(1, None, false)]);
    assert_eq!(z.nodes[1].registration(&c).map(|r| r.epoch), Some(1), "the replica has a copy");
    // The same id connects on node 2, clean: node 1 ends its session without handing it over.
    z.nodes[2].handle_connect(&c, true, None, now);
    z.pump(now);
    assert_eq!(z.granted(2), vec![(2, Some(Previous { holder: n("n1"), epoch: 1 }), false)]);
    assert_eq!(z.ended(1), vec![(1, n("n2"), true)]);
    assert!(!z.nodes[1].is_current(&c, 1));
    assert!(z.nodes[2].is_current(&c, 2));
    assert_eq!(z.nodes[0].counters().takeovers, 1);
    let r = z.nodes[0].registration(&c).unwrap();
    assert_eq!(
        (r.holder.clone(), r.epoch, r.will.is_none()),
        (n("n2"), 2, true),
        "the old will went with it"
    );
}

#[test]
fn two_connects_racing_end_with_one_session() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 2);
    let now = at(z.t0, 1);
    // Both requests are in flight before either is answered.
    z.nodes[1].handle_connect(&c, false, None, now);
    z.nodes[2].handle_connect(&c, false, None, now);
    z.pump(now);
    let live: Vec<usize> = (0..3).filter(|i| z.nodes[*i].held().any(|h| *h.client == *c)).collect();
    assert_eq!(live.len(), 1, "{live:?}");
    let winner = live[0];
    let loser = 3 - winner;
    assert_eq!(z.granted(loser).len(), 1, "the loser was granted first, then ended");
    assert_eq!(z.ended(loser).len(), 1);
    assert_eq!(z.nodes[0].registration(&c).unwrap().holder, *z.nodes[winner].name());
}

#[test]
fn an_end_for_an_older_epoch_leaves_a_newer_session() {
    let t0 = Instant::now();
    let mut r = Registrar::new(n("a"), RegistrarConfig::default(), t0);
    r.handle_connect("c", false, None, t0);
    r.handle_connect("c", false, None, t0);
    while r.poll_event().is_some() {}
    let end = |epoch| RegistryMsg::EndSession {
        client: "c".into(),
        epoch,
        successor: n("b"),
        successor_epoch: 9,
        discard: false,
    };
    r.handle_message(&n("b"), end(1), t0);
    assert!(r.is_current("c", 2), "epoch 2 came after what the owner ended");
    assert_eq!(r.poll_event(), None);
    r.handle_message(&n("b"), end(2), t0);
    assert!(!r.is_current("c", 2));
    assert!(matches!(r.poll_event(), Some(RegistrarEvent::EndSession { epoch: 2, .. })));
}

#[test]
fn a_request_whose_owner_goes_down_goes_to_the_new_owner() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let now = at(z.t0, 1);
    z.nodes[2].handle_connect(&c, false, None, now);
    // The owner gets nothing: it is going down.
    z.pump_cut(now, &[0]);
    assert!(z.granted(2).is_empty());
    z.down(0, at(z.t0, 100));
    z.pump_cut(at(z.t0, 100), &[0]);
    assert_eq!(z.granted(2), vec![(1, None, false)], "granted by node 1, the new primary");
    assert_eq!(z.nodes[1].registration(&c).map(|r| r.holder.clone()), Some(n("n2")));
}

#[test]
fn an_owner_that_does_not_answer_means_refused_in_consistent_mode_and_provisional_in_available() {
    for mode in [PartitionMode::Consistent, PartitionMode::Available] {
        let mut z = Nodes::new(3, mode);
        let c = client_owned_by(&z.names(), 0, 1);
        let now = at(z.t0, 1);
        let id = z.nodes[2].handle_connect(&c, false, None, now);
        z.pump_cut(now, &[0]);
        assert_eq!(z.nodes[2].poll_timeout(), Some(now + REQUEST_TIMEOUT));
        z.nodes[2].handle_timeout(now + REQUEST_TIMEOUT - Duration::from_millis(1));
        z.pump_cut(now, &[0]);
        assert!(z.events[2].is_empty(), "not before the timeout");
        z.nodes[2].handle_timeout(now + REQUEST_TIMEOUT);
        z.pump_cut(now, &[0]);
        match mode {
            PartitionMode::Consistent => {
                assert_eq!(
                    z.events[2],
                    vec![RegistrarEvent::Refused { request: id, client: c.as_str().into() }]
                );
                assert!(z.nodes[2].held().next().is_none());
            }
            PartitionMode::Available => {
                assert_eq!(z.granted(2), vec![(1, None, true)]);
                assert!(z.nodes[2].is_current(&c, 1));
                assert_eq!(z.nodes[2].counters().provisional, 1);
            }
        }
    }
}

#[test]
fn consistent_mode_refuses_at_once_when_the_ids_owner_is_down() {
    let mut z = Nodes::new(3, PartitionMode::Consistent);
    let c = client_owned_by(&z.names(), 0, 1);
    z.down(0, at(z.t0, 1));
    let id = z.nodes[2].handle_connect(&c, false, None, at(z.t0, 2));
    z.pump(at(z.t0, 2));
    assert_eq!(z.events[2], vec![RegistrarEvent::Refused { request: id, client: c.as_str().into() }]);
    // Once the operator removes the dead member, its ids have owners again.
    z.nodes[2].handle_member_removed(&n("n0"));
    z.nodes[2].handle_connect(&c, false, None, at(z.t0, 3));
    z.pump(at(z.t0, 3));
    assert_eq!(z.granted(2), vec![(1, None, false)]);
}

#[test]
fn a_holders_loss_publishes_its_will_once_after_the_delay() {
    let mut z = Nodes::new(4, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[3].handle_connect(&c, false, Some(will(10)), at(z.t0, 1));
    z.pump(at(z.t0, 1));
    z.down(3, at(z.t0, 1_000));
    z.pump_cut(at(z.t0, 1_000), &[3]);
    let primary_deadline = z.nodes[0].poll_timeout();
    assert_eq!(primary_deadline, Some(at(z.t0, 11_000)));
    assert_eq!(z.nodes[1].poll_timeout(), None, "the replica waits for the primary, not a timer");
    for i in 0..3 {
        z.nodes[i].handle_timeout(at(z.t0, 10_999));
    }
    z.pump_cut(at(z.t0, 10_999), &[3]);
    assert!(z.wills().is_empty(), "not before the delay");
    for i in 0..3 {
        z.nodes[i].handle_timeout(at(z.t0, 11_000));
    }
    z.pump_cut(at(z.t0, 11_000), &[3]);
    assert_eq!(z.wills(), vec![(0, 1)]);
    // The primary goes down too: the replica, primary now, knows the will was published.
    z.down(0, at(z.t0, 12_000));
    for i in 1..3 {
        z.nodes[i].handle_timeout(at(z.t0, 30_000));
    }
    z.pump_cut(at(z.t0, 30_000), &[0, 3]);
    assert_eq!(z.wills(), vec![(0, 1)]);
}

#[test]
fn the_replica_publishes_when_the_primary_is_gone_too_and_a_reconnect_cancels() {
    let mut z = Nodes::new(4, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let d = client_owned_by(&z.names(), 0, 2);
    z.nodes[3].handle_connect(&c, false, Some(will(5)), at(z.t0, 1));
    z.nodes[3].handle_connect(&d, false, Some(will(5)), at(z.t0, 1));
    z.pump(at(z.t0, 1));
    // The holder and the primary owner of both ids go at once.
    z.down(3, at(z.t0, 1_000));
    z.down(0, at(z.t0, 1_000));
    z.pump_cut(at(z.t0, 1_000), &[0, 3]);
    // `d` reconnects on node 2 within its will delay: a newer registration, no will.
    z.nodes[2].handle_connect(&d, false, None, at(z.t0, 2_000));
    z.pump_cut(at(z.t0, 2_000), &[0, 3]);
    assert_eq!(z.granted(2), vec![(2, Some(Previous { holder: n("n3"), epoch: 1 }), false)]);
    for i in 1..3 {
        z.nodes[i].handle_timeout(at(z.t0, 6_000));
    }
    z.pump_cut(at(z.t0, 6_000), &[0, 3]);
    assert_eq!(z.wills(), vec![(1, 1)], "c's will by its replica, now primary; none for d");
}

#[test]
fn a_partitions_sides_resolve_on_heal() {
    let mut z = Nodes::new(2, PartitionMode::Available);
    let c = "split-client";
    // Partition: each side alone.
    z.nodes[0].handle_peer_down(&n("n1"), at(z.t0, 1));
    z.nodes[1].handle_peer_down(&n("n0"), at(z.t0, 1));
    z.nodes[0].handle_connect(c, false, None, at(z.t0, 10));
    z.nodes[1].handle_connect(c, false, None, at(z.t0, 20));
    z.pump(at(z.t0, 20));
    assert!(z.nodes[0].is_current(c, 1) && z.nodes[1].is_current(c, 1), "both sides granted epoch 1");
    // Heal: the later stamp wins (same epoch).
    z.nodes[0].handle_peer_up(&n("n1"), at(z.t0, 100));
    z.nodes[1].handle_peer_up(&n("n0"), at(z.t0, 100));
    z.pump(at(z.t0, 100));
    assert!(!z.nodes[0].is_current(c, 1));
    assert!(z.nodes[1].is_current(c, 1));
    assert_eq!(z.ended(0), vec![(1, n("n1"), false)]);
    assert!(z.nodes[0].counters().conflicts_resolved + z.nodes[1].counters().conflicts_resolved >= 1);
}

#[test]
fn a_disconnect_is_sent_again_until_an_owner_confirms_it() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, false, Some(will(0)), at(z.t0, 1));
    z.pump(at(z.t0, 1));
    z.nodes[2].handle_disconnect(&c, 1, true, at(z.t0, 2));
    z.pump_cut(at(z.t0, 2), &[0]);
    assert!(z.nodes[0].registration(&c).unwrap().connected, "lost on the way");
    z.nodes[2].handle_timeout(at(z.t0, 2) + REQUEST_TIMEOUT);
    z.pump(at(z.t0, 2) + REQUEST_TIMEOUT);
    let r = z.nodes[0].registration(&c).unwrap();
    assert!(!r.connected && r.will.is_none(), "offline, still registered, will dealt with by the holder");
    assert_eq!(z.nodes[2].poll_timeout(), None);
    assert!(z.nodes[2].is_current(&c, 1), "the offline session stays held");
    z.nodes[2].handle_disconnect(&c, 1, false, at(z.t0, 3));
    z.pump(at(z.t0, 3));
    assert!(z.nodes[0].registration(&c).is_none() && z.nodes[1].registration(&c).is_none());
}

#[test]
fn a_returning_node_drops_the_sessions_that_moved_meanwhile() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let kept = client_owned_by(&z.names(), 1, 0);
    z.nodes[2].handle_connect(&c, false, None, at(z.t0, 1));
    z.nodes[2].handle_connect(&kept, false, None, at(z.t0, 1));
    z.pump(at(z.t0, 1));
    let log: Vec<HeldSession> = z.nodes[2].held().collect();
    z.down(2, at(z.t0, 10));
    z.nodes[1].handle_connect(&c, false, None, at(z.t0, 20));
    z.pump_cut(at(z.t0, 20), &[2]);
    // Node 2 restarts with its log.
    let mut back = Registrar::new(n("n2"), RegistrarConfig::default(), at(z.t0, 30));
    for h in &log {
        back.restore(&h.client, h.epoch, h.stamp);
    }
    z.nodes[2] = back;
    for a in 0..3 {
        for b in 0..3 {
            if a != b && (a == 2 || b == 2) {
                let peer = z.nodes[b].name().clone();
                z.nodes[a].handle_peer_up(&peer, at(z.t0, 40));
            }
        }
    }
    z.pump(at(z.t0, 40));
    assert!(!z.nodes[2].is_current(&c, 1), "moved meanwhile: dropped");
    assert!(z.nodes[2].is_current(&kept, 1), "still its own: kept");
    assert_eq!(z.ended(2).len(), 1);
    assert_eq!(z.nodes[0].registration(&c).unwrap().holder, n("n1"));
}

/// Node `slot` restarts: a new registrar with `log` restored, linked with every other node again.
fn restart(z: &mut Nodes, slot: usize, log: &[HeldSession], now: Instant) {
    let name = z.nodes[slot].name().clone();
    let mut back = Registrar::new(name.clone(), RegistrarConfig::default(), now);
    for h in log {
        back.restore(&h.client, h.epoch, h.stamp);
    }
    z.nodes[slot] = back;
    z.events[slot].clear();
    for other in 0..z.nodes.len() {
        if other != slot {
            let peer = z.nodes[other].name().clone();
            z.nodes[slot].handle_peer_up(&peer, now);
            z.nodes[other].handle_peer_up(&name, now);
        }
    }
}

#[test]
fn a_holder_back_from_a_restart_within_the_will_delay_does_not_cancel_the_will() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, false, Some(will(10)), at(z.t0, 1));
    z.pump(at(z.t0, 1));
    let log: Vec<HeldSession> = z.nodes[2].held().collect();
    z.down(2, at(z.t0, 1_000));
    z.pump_cut(at(z.t0, 1_000), &[2]);
    let t = at(z.t0, 2_000);
    restart(&mut z, 2, &log, t);
    z.pump(at(z.t0, 2_000));
    assert!(z.nodes[2].is_current(&c, 1), "its persistent session is still its own");
    let r = z.nodes[0].registration(&c).unwrap();
    assert!(!r.connected && r.will.is_some(), "the restored session said nothing of the will: {r:?}");
    for i in 0..3 {
        z.nodes[i].handle_timeout(at(z.t0, 11_000));
    }
    z.pump(at(z.t0, 11_000));
    assert_eq!(z.wills(), vec![(0, 1)]);
}

#[test]
fn a_node_back_without_a_session_has_its_registration_forgotten() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, true, None, at(z.t0, 1));
    z.pump(at(z.t0, 1));
    z.down(2, at(z.t0, 1_000));
    z.pump_cut(at(z.t0, 1_000), &[2]);
    // A clean session is not in the log: the node comes back without it.
    let t = at(z.t0, 2_000);
    restart(&mut z, 2, &[], t);
    z.pump(at(z.t0, 2_000));
    assert!(z.nodes[0].registration(&c).is_none(), "{:?}", z.nodes[0].registration(&c));
    assert!(z.nodes[1].registration(&c).is_none());
    // The id registers anew above the forgotten epoch.
    z.nodes[1].handle_connect(&c, false, None, at(z.t0, 3_000));
    z.pump(at(z.t0, 3_000));
    assert_eq!(z.granted(1), vec![(2, None, false)]);
}

#[test]
fn an_ended_registrations_epochs_go_on_at_a_new_owner() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let names = z.names();
    // An id owned by n0 and n1 while n2 is away, by n2 once it is back.
    let c = (0..)
        .map(|i| format!("c{i}"))
        .find(|c| owners(c, &names).unwrap().primary == names[2] && owners(c, &names[..2]).is_some())
        .unwrap();
    z.down(2, at(z.t0, 1));
    z.pump_cut(at(z.t0, 1), &[2]);
    z.nodes[1].handle_connect(&c, true, None, at(z.t0, 2));
    z.pump_cut(at(z.t0, 2), &[2]);
    z.nodes[1].handle_disconnect(&c, 1, false, at(z.t0, 3));
    z.pump_cut(at(z.t0, 3), &[2]);
    let t = at(z.t0, 10);
    restart(&mut z, 2, &[], t);
    z.pump(at(z.t0, 10));
    z.nodes[0].handle_connect(&c, false, None, at(z.t0, 20));
    z.pump(at(z.t0, 20));
    assert_eq!(z.granted(0), vec![(2, None, false)], "n2 took the id over with its tombstone");
}

#[test]
fn a_join_moves_only_the_ids_whose_owners_changed() {
    let mut z = Nodes::new(5, PartitionMode::Available);
    // Node 4 is away while 400 clients connect on the other four.
    z.down(4, at(z.t0, 1));
    z.pump_cut(at(z.t0, 1), &[4]);
    let clients: Vec<String> = (0..400).map(|i| format!("dev-{i}")).collect();
    for (i, c) in clients.iter().enumerate() {
        z.nodes[i % 4].handle_connect(c, false, None, at(z.t0, 2));
    }
    z.pump_cut(at(z.t0, 2), &[4]);
    let four = &z.names()[..4];
    let all = z.names();
    let moved = clients.iter().filter(|c| owners(c, four) != owners(c, &all)).count();
    let before: Vec<RegistrarCounters> = z.nodes.iter().map(|r| r.counters()).collect();
    let t = at(z.t0, 3);
    restart(&mut z, 4, &[], t);
    z.pump(at(z.t0, 3));
    let rereg: u64 = (0..4).map(|i| z.nodes[i].counters().reregistrations - before[i].reregistrations).sum();
    assert_eq!(rereg as usize, moved, "each holder re-registers exactly the sessions whose owners changed");
    assert!(moved < clients.len() * 3 / 5, "about 2/5 of the ids move to or from the newcomer: {moved}");
    for c in &clients {
        let o = owners(c, &all).unwrap();
        let at_primary = z.nodes[z.idx(&o.primary).unwrap()].registration(c);
        let at_replica = z.nodes[z.idx(o.replica.as_ref().unwrap()).unwrap()].registration(c);
        assert!(at_primary.is_some() && at_primary == at_replica, "{c}: the registry is whole again");
    }
}

#[test]
fn tombstones_go_when_they_expire_without_waiting_for_anything_else() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, true, None, at(z.t0, 1));
    z.pump(at(z.t0, 1));
    z.nodes[2].handle_disconnect(&c, 1, false, at(z.t0, 2));
    z.pump(at(z.t0, 2));
    for i in 0..2 {
        assert_eq!(z.nodes[i].counters().tombstones, 1, "the owners keep the ended registration");
        assert_eq!(z.nodes[i].counters().registrations, 0);
    }
    // Nothing else waits: only the tombstone's expiry is due, and it is what removes it.
    let due = z.nodes[0].poll_timeout().expect("a timer for the tombstone");
    assert!(due > at(z.t0, 2) + TOMBSTONE_TTL && due <= at(z.t0, 3) + TOMBSTONE_TTL, "{due:?}");
    z.nodes[0].handle_timeout(due - Duration::from_millis(1));
    assert_eq!(z.nodes[0].counters().tombstones, 1, "not before");
    z.nodes[0].handle_timeout(due);
    assert_eq!(z.nodes[0].counters().tombstones, 0);
    assert_eq!(z.nodes[0].poll_timeout(), None, "no timer once none is left");
}

#[test]
#[ignore = "a measurement, not a test: cargo test --release -p shardmq-cluster -- --ignored registrar_cost"]
fn registrar_cost() {
    // A clean connect and disconnect on n0 of client `c`, every message delivered (and counted).
    fn connect_and_leave(
        z: &mut Nodes,
        c: &str,
        now: Instant,
        mut counts: Option<&mut BTreeMap<&'static str, u32>>,
    ) {
        let id = z.nodes[0].handle_connect(c, true, None, now);
        z.deliver(now, &[], counts.as_deref_mut());
        let epoch = z.events[0]
            .drain(..)
            .find_map(|e| match e {
                RegistrarEvent::Granted { request, epoch, .. } if request == id => Some(epoch),
                _ => None,
            })
            .expect("granted");
        z.nodes[0].handle_disconnect(c, epoch, false, now);
        z.deliver(now, &[], counts);
    }
    let mut z = Nodes::new(3, PartitionMode::Available);
    let t0 = z.t0;
    let n = 100_000u64;
    let t = std::time::Instant::now();
    for i in 0..n {
        connect_and_leave(&mut z, &format!("client-{i}"), t0 + Duration::from_micros(i), None);
    }
    let el = t.elapsed();
    let mut kinds = BTreeMap::new();
    for i in 0..3000u64 {
        connect_and_leave(&mut z, &format!("other-{i}"), t0 + Duration::from_micros(n + i), Some(&mut kinds));
    }
    eprintln!(
        "messages per connection: {:?}",
        kinds.iter().map(|(k, v)| (k, *v as f64 / 3000.0)).collect::<Vec<_>>()
    );
    eprintln!(
        "{:.2} us per connection (3 registrars, encode+decode included)",
        el.as_secs_f64() * 1e6 / n as f64
    );
}

#[test]
fn a_clean_connection_costs_only_the_messages_it_needs() {
    // Requester = primary owner, replica, or neither: 3, 5 and 6 messages for a connect and its clean
    // disconnect. The replica does not echo the primary's `Forget`; a grant to another node that takes
    // nothing over goes with an unacknowledged `Copy` to the replica (ahead of the grant when the
    // requester is the replica); a requester that keeps the replica gets no `DisconnectAck` (the
    // `Forget` is its answer). Only the primary's own connection waits for its replica's copy.
    let expected: [&[(&str, u32)]; 3] = [
        &[("Forget", 1), ("Replicate", 1), ("Replicated", 1)],
        &[("Copy", 1), ("Disconnect", 1), ("Forget", 1), ("Granted", 1), ("Register", 1)],
        &[
            ("Copy", 1),
            ("Disconnect", 1),
            ("DisconnectAck", 1),
            ("Forget", 1),
            ("Granted", 1),
            ("Register", 1),
        ],
    ];
    for (requester, expected) in expected.into_iter().enumerate() {
        let mut z = Nodes::new(3, PartitionMode::Available);
        let c = client_owned_by(&z.names(), 0, 1);
        let mut counts = BTreeMap::new();
        let id = z.nodes[requester].handle_connect(&c, true, None, at(z.t0, 1));
        z.pump_counted(at(z.t0, 1), &mut counts);
        assert!(
            z.events[requester]
                .iter()
                .any(|e| matches!(e, RegistrarEvent::Granted { request, .. } if *request == id)),
            "requester n{requester}"
        );
        z.nodes[requester].handle_disconnect(&c, 1, false, at(z.t0, 2));
        z.pump_counted(at(z.t0, 2), &mut counts);
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), expected.to_vec(), "requester n{requester}");
        for i in 0..2 {
            assert!(z.nodes[i].registration(&c).is_none(), "requester n{requester}: ended at owner n{i}");
            assert_eq!(z.nodes[i].counters().tombstones, 1);
        }
        // Nothing waits for an answer: past the request timeout, nobody sends anything.
        for i in 0..3 {
            z.nodes[i].handle_timeout(at(z.t0, 2) + REQUEST_TIMEOUT);
        }
        let mut later = BTreeMap::new();
        z.pump_counted(at(z.t0, 2) + REQUEST_TIMEOUT, &mut later);
        assert!(later.is_empty(), "requester n{requester}: {later:?}");
    }
}

#[test]
fn an_offline_session_costs_only_the_messages_it_needs() {
    // A persistent session made on n2 (neither owner) and left offline: neither the owner's copy of
    // the grant nor that of the change is acknowledged by its replica.
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let mut counts = BTreeMap::new();
    z.nodes[2].handle_connect(&c, false, Some(will(5)), at(z.t0, 1));
    z.pump_counted(at(z.t0, 1), &mut counts);
    z.nodes[2].handle_disconnect(&c, 1, true, at(z.t0, 2));
    z.pump_counted(at(z.t0, 2), &mut counts);
    let expected = [("Copy", 2), ("Disconnect", 1), ("DisconnectAck", 1), ("Granted", 1), ("Register", 1)];
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), expected.to_vec());
    let copy = z.nodes[1].registration(&c).expect("the replica's copy");
    assert!(!copy.connected && copy.will.is_none(), "offline, the will dealt with by the holder");
}

#[test]
fn a_takeover_by_the_replica_itself_waits_for_its_copy() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[0].handle_connect(&c, false, Some(will(0)), at(z.t0, 1));
    z.pump(at(z.t0, 1));
    // n1 keeps the replica and takes the session over from n0, the primary. Its copy is lost on the
    // way: n0 must not end its session yet (were n0 lost now, n1 would take n0's connection for lost
    // and publish its will, though the takeover had ended it).
    z.nodes[1].handle_connect(&c, false, None, at(z.t0, 2));
    let (to, m) = z.nodes[1].poll_transmit().expect("the registration");
    assert_eq!((to, kind(&m)), (n("n0"), "Register"));
    z.nodes[0].handle_message(&n("n1"), m, at(z.t0, 2));
    z.pump_cut(at(z.t0, 2), &[1]);
    assert!(z.nodes[0].is_current(&c, 1), "the takeover waits for the replica's copy");
    assert!(z.ended(0).is_empty());
    // Delivered: granted above the takeover, n0's session ends, and nothing is left waiting.
    let mut z = Nodes::new(3, PartitionMode::Available);
    z.nodes[0].handle_connect(&c, false, Some(will(0)), at(z.t0, 1));
    z.pump(at(z.t0, 1));
    z.nodes[1].handle_connect(&c, false, None, at(z.t0, 2));
    z.pump(at(z.t0, 2));
    assert_eq!(z.granted(1), vec![(2, Some(Previous { holder: n("n0"), epoch: 1 }), false)]);
    assert_eq!(z.ended(0), vec![(1, n("n1"), false)]);
    assert_eq!(z.nodes[0].poll_timeout(), None, "nothing waits");
}

#[test]
fn grants_of_one_id_reach_their_requester_in_order() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, false, None, at(z.t0, 1));
    z.pump(at(z.t0, 1));
    // n1, the replica, connects twice: a takeover from n2 (which waits for n1's copy), then a
    // reconnect (which alone would need no wait): the second grant must not overtake the first.
    z.nodes[1].handle_connect(&c, false, None, at(z.t0, 2));
    z.nodes[1].handle_connect(&c, true, None, at(z.t0, 2));
    z.pump(at(z.t0, 2));
    let epochs: Vec<u64> = z.granted(1).iter().map(|g| g.0).collect();
    assert_eq!(epochs, vec![2, 3]);
    assert!(z.nodes[1].is_current(&c, 3));
    assert_eq!(z.nodes[0].registration(&c).map(|r| r.epoch), Some(3));
}

#[test]
fn a_grant_whose_copy_the_lost_primary_never_sent_is_registered_again_by_its_holder() {
    // n2 (neither owner) connects with a will; n0, the primary, grants it and is lost before n1, its
    // replica, has the copy (nothing waited for it). n2 registers its session with n1, the new primary:
    // the will is known there, and published when n2 is lost in turn.
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, false, Some(will(0)), at(z.t0, 1));
    z.pump_cut(at(z.t0, 1), &[1]);
    assert_eq!(z.granted(2), vec![(1, None, false)]);
    assert!(z.nodes[1].registration(&c).is_none(), "the copy was lost");
    z.down(0, at(z.t0, 2));
    z.pump(at(z.t0, 2));
    let r = z.nodes[1].registration(&c).expect("registered again by its holder");
    assert_eq!((r.holder.clone(), r.epoch, r.connected, r.will.is_some()), (n("n2"), 1, true, true));
    // A connection of the id made at n1 meanwhile would have had the same epoch: the later one on the
    // hybrid logical clock wins, and the other session ends.
    z.nodes[1].handle_peer_down(&n("n2"), at(z.t0, 3));
    z.nodes[1].handle_timeout(at(z.t0, 3));
    z.pump(at(z.t0, 3));
    assert_eq!(z.wills(), vec![(1, 1)], "n2's will, published by the new primary");
}

#[test]
fn a_grant_whose_copy_was_lost_loses_to_a_later_connection_at_the_same_epoch() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, false, None, at(z.t0, 1));
    z.pump_cut(at(z.t0, 1), &[1]);
    // n0 is lost; n1 learns it first, and the client connects at n1 before n2's registration arrives.
    z.nodes[1].handle_peer_down(&n("n0"), at(z.t0, 2));
    z.nodes[1].handle_connect(&c, false, None, at(z.t0, 3));
    z.pump_cut(at(z.t0, 3), &[0]);
    assert_eq!(z.granted(1), vec![(1, None, false)], "the same epoch as n2's, unknown to n1");
    assert!(z.ended(2).is_empty(), "n2 has not re-registered yet");
    z.nodes[2].handle_peer_down(&n("n0"), at(z.t0, 4));
    z.pump_cut(at(z.t0, 4), &[0]);
    assert_eq!(z.ended(2), vec![(1, n("n1"), false)], "n2's older connection ends");
    assert!(z.nodes[1].is_current(&c, 1));
    assert!(!z.nodes[2].is_current(&c, 1));
}

#[test]
fn a_disconnect_ends_only_its_senders_registration() {
    // After a partition two registrations of an id can have the same epoch; the owner keeps n1's (the
    // winner) and n2, whose registration of epoch 1 lost, reports its client gone: n1's stays.
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[1].handle_connect(&c, false, None, at(z.t0, 1));
    z.pump(at(z.t0, 1));
    assert!(z.nodes[1].is_current(&c, 1));
    for ended in [false, true] {
        let m =
            RegistryMsg::Disconnect { request: RequestId(99), client: c.as_str().into(), epoch: 1, ended };
        z.nodes[0].handle_message(&n("n2"), m, at(z.t0, 2));
        z.pump(at(z.t0, 2));
        let r = z.nodes[0].registration(&c).expect("n1's registration stays");
        assert_eq!((r.holder.clone(), r.epoch, r.connected), (n("n1"), 1, true), "ended {ended}");
        assert!(z.nodes[1].is_current(&c, 1) && z.ended(1).is_empty());
    }
}

#[test]
fn only_what_nothing_waits_for_and_no_will_depends_on_may_wait() {
    // A connection through n2 (neither owner), clean, then its disconnect: which messages may wait a
    // moment to go with others (`poll_transmit_hinted`). With a will, its end must not wait: were the
    // owner lost before its replica heard, the replica would publish the will of a client that left.
    for with_will in [false, true] {
        let mut z = Nodes::new(3, PartitionMode::Available);
        let c = client_owned_by(&z.names(), 0, 1);
        let mut hints: Vec<(&'static str, bool)> = Vec::new();
        let mut run = |z: &mut Nodes, now: Instant| loop {
            let mut moved = false;
            for a in 0..3 {
                while let Some((to, m, can_wait)) = z.nodes[a].poll_transmit_hinted() {
                    moved = true;
                    hints.push((kind(&m), can_wait));
                    let from = z.nodes[a].name().clone();
                    let b = z.idx(&to).expect("a node");
                    z.nodes[b].handle_message(&from, m, now);
                }
            }
            if !moved {
                break;
            }
        };
        let w = with_will.then(|| will(5));
        let t0 = z.t0;
        z.nodes[2].handle_connect(&c, true, w, at(t0, 1));
        run(&mut z, at(t0, 1));
        z.nodes[2].handle_disconnect(&c, 1, false, at(t0, 2));
        run(&mut z, at(t0, 2));
        let expected = [
            ("Register", false),
            ("Copy", true),
            ("Granted", false),
            ("Disconnect", !with_will),
            ("DisconnectAck", true),
            ("Forget", !with_will),
        ];
        assert_eq!(hints, expected.to_vec(), "with will {with_will}");
        assert!(z.nodes[1].registration(&c).is_none(), "with will {with_will}: ended at the replica");
    }
}

#[test]
fn a_register_that_comes_again_is_answered_with_the_epoch_it_has() {
    // n2's registration, delivered a second time after it was granted (a link resends what it had not
    // confirmed when a cut ends): the same epoch again, not a new one that would end n2's session.
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    z.nodes[2].handle_connect(&c, false, None, at(z.t0, 1));
    let (to, register) = z.nodes[2].poll_transmit().expect("the registration");
    assert_eq!((to, kind(&register)), (n("n0"), "Register"));
    let mut body = Vec::new();
    encode(&register, &mut body);
    z.nodes[0].handle_message(&n("n2"), register, at(z.t0, 1));
    z.pump(at(z.t0, 1));
    assert!(z.nodes[2].is_current(&c, 1));
    z.nodes[0].handle_message(&n("n2"), decode(&body).expect("decodes"), at(z.t0, 2));
    z.pump(at(z.t0, 2));
    assert_eq!(z.nodes[0].registration(&c).map(|r| (r.holder.clone(), r.epoch)), Some((n("n2"), 1)));
    assert!(z.nodes[2].is_current(&c, 1), "n2's session stays");
    assert!(z.ended(2).is_empty());
}
