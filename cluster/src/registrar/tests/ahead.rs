//! Connections answered ahead of their registration ([`Registrar::handle_connect_ahead`]).

use super::*;

fn ahead_events(z: &Nodes, node: usize) -> Vec<(NodeName, u64)> {
    z.events[node]
        .iter()
        .filter_map(|e| match e {
            RegistrarEvent::Superseded { successor, successor_epoch, .. } => {
                Some((successor.clone(), *successor_epoch))
            }
            _ => None,
        })
        .collect()
}

/// A connection that comes and goes within [`AHEAD_DELAY`] costs its registration and an
/// acknowledgement, and leaves nothing at its owners.
#[test]
fn a_connection_that_ends_before_its_registration_goes_costs_one_round_trip() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let now = at(z.t0, 1);
    let r = z.nodes[2].handle_connect_ahead(c.as_str().into(), now);
    let mut counts = BTreeMap::new();
    z.pump_counted(now, &mut counts);
    assert!(counts.is_empty(), "it waits: {counts:?}");
    let later = now + AHEAD_DELAY / 3;
    z.nodes[2].handle_disconnect_ahead(&c, r, later);
    z.pump_counted(later, &mut counts);
    assert_eq!(counts, BTreeMap::from([("Register", 1), ("DisconnectAck", 1)]));
    for i in 0..3 {
        assert!(z.nodes[i].registration(&c).is_none(), "node {i}");
        assert_eq!(z.nodes[i].counters().tombstones, 0, "node {i}");
    }
    assert!(z.nodes[2].poll_timeout().is_none(), "nothing left to wait for");
    assert!(z.events[2].is_empty(), "nothing for the shard: {:?}", z.events[2]);
}

/// One that lasts is registered after [`AHEAD_DELAY`], as any connection (its grant is its node's
/// business), and its end, before or after the grant, ends its registration.
#[test]
fn a_connection_that_lasts_is_registered_after_the_delay_and_its_end_follows() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let now = at(z.t0, 1);
    let request = z.nodes[2].handle_connect_ahead(c.as_str().into(), now);
    let due = z.nodes[2].poll_timeout().expect("a timer for it");
    assert!(due <= now + AHEAD_DELAY, "{:?}", due - now);
    z.nodes[2].handle_timeout(due);
    z.pump(due);
    assert!(
        matches!(z.events[2][..], [RegistrarEvent::Granted { request: r, epoch: 1, .. }] if r == request)
    );
    assert!(z.nodes[2].is_current(&c, 1));
    let r = z.nodes[0].registration(&c).expect("registered");
    assert!(r.connected && r.holder == n("n2"));
    z.nodes[2].handle_disconnect_ahead(&c, request, due);
    z.pump(due);
    assert!(z.nodes[0].registration(&c).is_none() && z.nodes[1].registration(&c).is_none(), "ended");

    // Its end while its registration is on its way: ended as soon as it is granted.
    let now = at(z.t0, 100);
    let r = z.nodes[2].handle_connect_ahead(c.as_str().into(), now);
    z.nodes[2].handle_timeout(now + AHEAD_DELAY);
    z.nodes[2].handle_disconnect_ahead(&c, r, now + AHEAD_DELAY);
    z.pump(now + AHEAD_DELAY);
    assert!(z.nodes[0].registration(&c).is_none(), "ended after its grant");
    assert!(!z.nodes[2].held().any(|h| *h.client == *c));
    assert!(z.nodes[2].poll_timeout().is_none_or(|t| t > now + REQUEST_TIMEOUT), "nothing pending");
}

/// The registration of a connection answered ahead that reaches the owner after a newer connection's
/// (by clock) changes nothing there: still connected, it is superseded; gone already, it is only
/// acknowledged.
#[test]
fn an_ahead_connection_older_than_the_owners_registration_loses() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let early = at(z.t0, 5);
    z.nodes[2].handle_connect_ahead(c.as_str().into(), early);
    let newer = at(z.t0, 8);
    z.nodes[1].handle_connect(&c, true, None, newer);
    z.pump(newer);
    assert_eq!(z.granted(1), vec![(1, None, false)]);
    let due = early + AHEAD_DELAY;
    z.nodes[2].handle_timeout(due);
    z.pump(due);
    assert_eq!(ahead_events(&z, 2), vec![(n("n1"), 1)], "superseded by node 1's registration");
    assert!(z.ended(1).is_empty(), "node 1 keeps its session");
    assert!(z.nodes[1].is_current(&c, 1));
    assert_eq!(z.nodes[0].registration(&c).map(|r| (r.holder.clone(), r.epoch)), Some((n("n1"), 1)));
    assert!(!z.nodes[2].held().any(|h| *h.client == *c) && z.nodes[2].poll_timeout().is_none());

    // Ended before it went: only acknowledged.
    let early = at(z.t0, 20);
    let r = z.nodes[2].handle_connect_ahead(c.as_str().into(), early);
    z.nodes[1].handle_connect(&c, true, None, at(z.t0, 21));
    z.pump(at(z.t0, 21));
    z.nodes[2].handle_disconnect_ahead(&c, r, at(z.t0, 22));
    z.pump(at(z.t0, 22));
    assert_eq!(ahead_events(&z, 2).len(), 1, "no other");
    assert!(z.ended(1).is_empty(), "node 1's sessions stay");
    assert!(z.nodes[1].is_current(&c, 2));
    assert_eq!(z.nodes[0].registration(&c).map(|r| (r.holder.clone(), r.epoch)), Some((n("n1"), 2)));
}

/// A connection answered ahead takes over a session of its id elsewhere that is older, as any clean
/// start does: that node drops it.
#[test]
fn an_ahead_connection_discards_an_older_session_elsewhere() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let now = at(z.t0, 1);
    z.nodes[1].handle_connect(&c, false, Some(will(0)), now);
    z.pump(now);
    let later = at(z.t0, 2);
    z.nodes[2].handle_connect_ahead(c.as_str().into(), later);
    z.nodes[2].handle_timeout(later + AHEAD_DELAY);
    z.pump(later + AHEAD_DELAY);
    assert_eq!(z.ended(1), vec![(1, n("n2"), true)], "dropped, not handed over");
    assert!(z.nodes[2].is_current(&c, 2));

    // Gone before its registration went: the older session goes all the same.
    let c = client_owned_by(&z.names(), 1, 0);
    z.nodes[0].handle_connect(&c, false, None, at(z.t0, 30));
    z.pump(at(z.t0, 30));
    let r = z.nodes[2].handle_connect_ahead(c.as_str().into(), at(z.t0, 31));
    z.nodes[2].handle_disconnect_ahead(&c, r, at(z.t0, 32));
    z.pump(at(z.t0, 32));
    assert!(z.ended(0).iter().any(|e| *e == (1, n("n2"), true)), "{:?}", z.ended(0));
    assert!(z.nodes[1].registration(&c).is_none(), "and nothing stays registered");
}

/// A node's connections of one client reach the owner in the order they came: a CONNECT that waits for
/// its registration sends the registration answered ahead before it first; and one answered ahead
/// that reaches the owner after a later connection of its own node's loses to it.
#[test]
fn a_nodes_connections_of_a_client_register_in_the_order_they_came() {
    let mut z = Nodes::new(3, PartitionMode::Available);
    let c = client_owned_by(&z.names(), 0, 1);
    let first = z.nodes[2].handle_connect_ahead(c.as_str().into(), at(z.t0, 1));
    let second = z.nodes[2].handle_connect(&c, false, Some(will(0)), at(z.t0, 2));
    z.pump(at(z.t0, 2));
    let granted: Vec<(RequestId, u64)> = z.events[2]
        .iter()
        .filter_map(|e| match e {
            RegistrarEvent::Granted { request, epoch, .. } => Some((*request, *epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(granted, vec![(first, 1), (second, 2)]);
    assert!(z.nodes[2].is_current(&c, 2));
    // The first connection's end (its shard ran the second CONNECT) leaves the second's registration.
    z.nodes[2].handle_disconnect_ahead(&c, first, at(z.t0, 3));
    z.pump(at(z.t0, 3));
    assert!(z.nodes[2].is_current(&c, 2));
    let r = z.nodes[0].registration(&c).expect("registered");
    assert!(r.connected && r.epoch == 2 && r.will.is_some());
}
