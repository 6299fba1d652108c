//! Unit tests of the zone: links, the one-link rule, budgets, resumption (sans I/O, no sockets).

use super::*;

fn zone(name: &str, port: u16, now: Instant) -> Zone {
    let mut cfg = ZoneConfig::new(NodeIdentity::new(name, ([127, 0, 0, 1], port).into(), "z", "r", 1));
    cfg.secret = Some(b"s".to_vec());
    cfg.link_budget_bytes = 100;
    Zone::new(cfg, port as u64, now)
}

/// `a` dials `b` directly (no membership): returns (a's link, b's link) once the socket side
/// connected them.
fn connect(a: &mut Zone, b: &mut Zone, now: Instant) -> (LinkId, LinkId) {
    a.dial(b.me.addr, Some(b.me.name.clone()), now);
    let Some(LinkCmd::Connect { link: la, .. }) = a.poll_link() else { panic!("a connect") };
    let lb = b.next_link_id();
    b.handle_accepted(lb, now);
    a.handle_connected(la, now);
    (la, lb)
}

/// Moves bytes both ways until neither side has any.
fn pump(a: &mut Zone, la: LinkId, b: &mut Zone, lb: LinkId, now: Instant) {
    loop {
        let (ab, ba) = (a.take_link_transmit(la), b.take_link_transmit(lb));
        if ab.is_empty() && ba.is_empty() {
            return;
        }
        b.handle_link_bytes(lb, &ab, now);
        a.handle_link_bytes(la, &ba, now);
    }
}

fn forward(payload: &[u8]) -> Vec<u8> {
    let fw = link::Forward {
        qos: 0,
        retain: false,
        topic: "t",
        payload,
        properties: &[],
        ack_token: None,
        normal: true,
        groups: Vec::new(),
        expiry_s: None,
        origin: None,
    };
    let mut out = Vec::new();
    link::encode(&Frame::Forward(fw), &mut out);
    out
}

fn events(z: &mut Zone) -> Vec<ZoneEvent> {
    std::iter::from_fn(|| z.poll_event()).collect()
}

#[test]
fn send_needs_the_peer_up_and_respects_the_backlog_budget() {
    let now = Instant::now();
    let (mut a, mut b) = (zone("a", 1, now), zone("b", 2, now));
    let name_b = b.me.name.clone();
    assert_eq!(a.send(&name_b, forward(b"x")), Err(SendError::NotConnected));
    let (la, lb) = connect(&mut a, &mut b, now);
    pump(&mut a, la, &mut b, lb, now);
    assert!(events(&mut a).iter().any(|e| matches!(e, ZoneEvent::PeerUp { peer } if peer.name == name_b)));
    assert!(events(&mut b).iter().any(|e| matches!(e, ZoneEvent::PeerUp { .. })));
    // Nothing acknowledged: the 100-byte budget fills.
    let mut sent = 0;
    while a.send(&name_b, forward(&[0; 30])).is_ok() {
        sent += 1;
    }
    assert!((2..=3).contains(&sent), "{sent}");
    assert_eq!(a.send(&name_b, forward(&[0; 30])), Err(SendError::Full));
    let c = a.counters();
    assert_eq!((c.send_not_connected, c.send_full), (1, 2));
    // Delivered once, and the acknowledgement (a heartbeat) frees the budget.
    pump(&mut a, la, &mut b, lb, now);
    let frames: usize = events(&mut b)
        .into_iter()
        .map(|e| match e {
            ZoneEvent::Frames { frames, .. } => link::frames(&frames).count(),
            _ => 0,
        })
        .sum();
    assert_eq!(frames, sent);
    b.handle_timeout(now + b.cfg.heartbeat);
    pump(&mut a, la, &mut b, lb, now);
    assert!(a.send(&name_b, forward(&[0; 30])).is_ok());
}

#[test]
fn a_peer_holding_over_half_the_budget_is_congested_until_it_acknowledges() {
    let now = Instant::now();
    let (mut a, mut b) = (zone("a", 1, now), zone("b", 2, now));
    let name_b = b.me.name.clone();
    let (la, lb) = connect(&mut a, &mut b, now);
    pump(&mut a, la, &mut b, lb, now);
    assert!(!a.congested());
    a.send(&name_b, forward(&[0; 30])).unwrap();
    assert!(!a.congested(), "under half of the 100-byte budget");
    a.send(&name_b, forward(&[0; 30])).unwrap();
    assert!(a.congested(), "over half of it, nothing acknowledged");
    pump(&mut a, la, &mut b, lb, now);
    b.handle_timeout(now + b.cfg.heartbeat);
    pump(&mut a, la, &mut b, lb, now);
    assert!(!a.congested(), "acknowledged: drained");
}

#[test]
fn one_link_per_peer_the_smaller_names_newest() {
    let now = Instant::now();
    let (mut a, mut b) = (zone("a", 1, now), zone("b", 2, now));
    let (la1, lb1) = connect(&mut a, &mut b, now);
    pump(&mut a, la1, &mut b, lb1, now);
    // b (the larger name) dials too: both sides keep a's link.
    let (lb2, la2) = connect(&mut b, &mut a, now);
    pump(&mut b, lb2, &mut a, la2, now);
    assert_eq!(a.poll_link(), Some(LinkCmd::Close { link: la2 }));
    assert_eq!(b.poll_link(), Some(LinkCmd::Close { link: lb2 }));
    assert_eq!((a.peers_up().count(), b.peers_up().count()), (1, 1));
    // a dials again (its old link half-open): b replaces the old one with the newer.
    let _ = (events(&mut a), events(&mut b));
    let (la3, lb3) = connect(&mut a, &mut b, now);
    a.handle_link_closed(la1, now);
    pump(&mut a, la3, &mut b, lb3, now);
    assert_eq!(b.poll_link(), Some(LinkCmd::Close { link: lb1 }));
    let eb = events(&mut b);
    assert!(
        matches!(
            eb[..],
            [ZoneEvent::PeerDown { reason: "replaced by a newer link", .. }, ZoneEvent::PeerUp { .. }]
        ),
        "{eb:?}"
    );
    assert_eq!(b.counters().links_duplicate, 2);
}

#[test]
fn another_secret_is_refused_on_both_sides() {
    let now = Instant::now();
    let mut a = zone("a", 1, now);
    let mut cfg = ZoneConfig::new(NodeIdentity::new("b", ([127, 0, 0, 1], 2).into(), "z", "r", 1));
    cfg.secret = Some(b"other".to_vec());
    let mut b = Zone::new(cfg, 2, now);
    let (la, lb) = connect(&mut a, &mut b, now);
    pump(&mut a, la, &mut b, lb, now);
    // The closing side's last bytes (its Refuse) are still handed out after the Close.
    for (z, l) in [(&mut a, la), (&mut b, lb)] {
        assert_eq!(z.peers_up().count(), 0);
        assert!(events(z).iter().any(|e| matches!(e, ZoneEvent::Refused { .. })));
        assert_eq!(z.counters().links_refused, 1);
        assert!(std::iter::from_fn(|| z.poll_link()).any(|c| c == LinkCmd::Close { link: l }));
    }
}
