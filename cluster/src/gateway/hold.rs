//! Registry messages that can wait a moment ([`crate::registrar::Registrar::poll_transmit_hinted`]:
//! acknowledgements, the end of a connection without a will, copies its holder would register again),
//! held per peer so that several go in one frame and wake the peer once. At a few thousand connections
//! a second each connection's acknowledgements and copies otherwise woke a peer's cluster thread by
//! themselves (4.6 context switches per connection over a zone of three, against 1.1 on a single node).
//!
//! A message that cannot wait takes those held for its peer along, ahead of it, so the order per peer
//! is the registrar's; so does anything else for that peer that must come after them (a session handed
//! over). The rest go after [`HOLD`]. What is held for a peer that goes down is dropped, as it would have
//! been in its link.

use std::time::{Duration, Instant};

use crate::registrar::RegistryMsg;
use crate::NodeName;

/// How long a message that can wait is held at most.
pub const HOLD: Duration = Duration::from_millis(5);

#[derive(Debug, Default)]
pub(super) struct Hold {
    /// One entry per peer with something held (a zone has few peers: a scan is cheaper than a map).
    peers: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    to: NodeName,
    /// Invariant: not empty.
    msgs: Vec<RegistryMsg>,
    /// When the first of them was held, plus [`HOLD`].
    until: Instant,
}

impl Hold {
    /// The messages for `to` of one drain, in order: what to send now (those held for `to` first), or
    /// nothing when they can all wait (`urgent` false) and are held.
    pub fn offer(
        &mut self,
        to: &NodeName,
        msgs: Vec<RegistryMsg>,
        urgent: bool,
        now: Instant,
    ) -> Option<Vec<RegistryMsg>> {
        let i = self.peers.iter().position(|h| h.to == *to);
        if urgent || i.is_some_and(|i| self.peers[i].until <= now) {
            let mut all = i.map(|i| self.peers.swap_remove(i).msgs).unwrap_or_default();
            all.extend(msgs);
            return Some(all);
        }
        match i {
            Some(i) => self.peers[i].msgs.extend(msgs),
            None if !msgs.is_empty() => self.peers.push(Held { to: to.clone(), msgs, until: now + HOLD }),
            None => {}
        }
        None
    }

    /// What is held for `to`, to go now (ahead of something for `to` that must come after it).
    pub fn take(&mut self, to: &NodeName) -> Option<Vec<RegistryMsg>> {
        let i = self.peers.iter().position(|h| h.to == *to)?;
        Some(self.peers.swap_remove(i).msgs)
    }

    /// What has been held long enough, by peer.
    pub fn take_due(&mut self, now: Instant) -> Vec<(NodeName, Vec<RegistryMsg>)> {
        if self.peers.iter().all(|h| h.until > now) {
            return Vec::new();
        }
        let (due, keep): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.peers).into_iter().partition(|h| h.until <= now);
        self.peers = keep;
        due.into_iter().map(|h| (h.to, h.msgs)).collect()
    }

    /// Everything held, by peer (the node is leaving).
    pub fn take_all(&mut self) -> Vec<(NodeName, Vec<RegistryMsg>)> {
        std::mem::take(&mut self.peers).into_iter().map(|h| (h.to, h.msgs)).collect()
    }

    /// `to` went down: what was held for it goes, as it would have in its link. Returns how many.
    pub fn drop_peer(&mut self, to: &NodeName) -> usize {
        self.take(to).map_or(0, |m| m.len())
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers.iter().map(|h| h.until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registrar::RequestId;

    fn ack(i: u64) -> RegistryMsg {
        RegistryMsg::DisconnectAck { request: RequestId(i) }
    }

    fn ids(msgs: &[RegistryMsg]) -> Vec<u64> {
        msgs.iter()
            .map(|m| match m {
                RegistryMsg::DisconnectAck { request } => request.0,
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn what_can_wait_is_held_until_something_urgent_takes_it_along_in_order() {
        let (a, b) = (NodeName("a".into()), NodeName("b".into()));
        let t0 = Instant::now();
        let mut h = Hold::default();
        assert!(h.offer(&a, vec![ack(1), ack(2)], false, t0).is_none());
        assert!(h.offer(&b, vec![ack(10)], false, t0).is_none());
        assert!(h.offer(&a, vec![ack(3)], false, t0 + Duration::from_millis(1)).is_none());
        assert_eq!(h.next_deadline(), Some(t0 + HOLD), "from the first held");
        let now = h.offer(&a, vec![ack(4)], true, t0 + Duration::from_millis(2)).expect("urgent: sent now");
        assert_eq!(ids(&now), vec![1, 2, 3, 4]);
        assert_eq!(h.take(&a), None, "nothing left for a");
        assert_eq!(h.take_due(t0 + HOLD - Duration::from_nanos(1)), vec![]);
        let due = h.take_due(t0 + HOLD);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].0.clone(), ids(&due[0].1)), (b.clone(), vec![10]));
        assert_eq!(h.next_deadline(), None);
        assert!(h.offer(&b, vec![ack(11)], false, t0).is_none());
        let all = h.take_all();
        assert_eq!((all.len(), ids(&all[0].1)), (1, vec![11]), "leaving: everything goes");
    }

    #[test]
    fn past_its_time_what_is_held_goes_with_the_next_offer_and_a_down_peer_drops_it() {
        let a = NodeName("a".into());
        let t0 = Instant::now();
        let mut h = Hold::default();
        assert!(h.offer(&a, vec![ack(1)], false, t0).is_none());
        let late = h.offer(&a, vec![ack(2)], false, t0 + HOLD).expect("held long enough");
        assert_eq!(ids(&late), vec![1, 2]);
        assert!(h.offer(&a, vec![ack(3)], false, t0 + HOLD).is_none());
        assert_eq!(h.drop_peer(&a), 1);
        assert_eq!(h.next_deadline(), None);
        assert!(h.offer(&a, Vec::new(), false, t0).is_none());
        assert_eq!(h.next_deadline(), None, "nothing to hold");
    }
}
