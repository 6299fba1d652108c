//! Reliable, bounded delivery over a link that can break: the part of a link that survives its TCP
//! connection.
//!
//! Frames of one direction are numbered in the order they are queued. The sender keeps each frame until
//! the receiver's [`crate::link::Frame::Received`] covers it, within a byte budget: a full backlog refuses
//! the next frame ([`Backlog::Full`]), and the caller pauses what produces them (publishers) or counts a
//! drop with its reason; memory never grows without bound. When the connection breaks, nothing is lost:
//! after the next handshake the peer says how far it got ([`LinkSession::resume`]) and the rest is sent
//! again, exactly once. If the peer is a new life of its node (restarted: it kept nothing), the session
//! starts over and the caller resynchronises from snapshots ([`Resume::Resync`]).

use std::collections::VecDeque;

use crate::NodeIdentity;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// The unacknowledged bytes would pass the budget: pause the producer, or drop and count.
    Full,
}

/// What a reconnect amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The same peer life: `resent` frames are sent again, nothing else is lost or repeated.
    Continue { resent: usize },
    /// A new life of the peer (or the first link to it): everything queued for the old one was
    /// dropped (`dropped` frames, to be counted); send it snapshots of interest and retained messages.
    Resync { dropped: usize },
}

/// One direction's sending state and the other direction's receiving state, for one peer.
#[derive(Debug)]
pub struct LinkSession {
    /// The peer life this session talks to; `None` before the first handshake.
    peer: Option<NodeIdentity>,
    /// Frames queued, sent or not, and not yet acknowledged: (sequence, bytes). Ascending, contiguous.
    unacked: VecDeque<(u64, Vec<u8>)>,
    /// Invariant: the sum of `unacked`'s byte lengths.
    unacked_bytes: usize,
    /// Frames with a sequence below this were written to the current connection.
    next_to_write: u64,
    next_seq: u64,
    budget_bytes: usize,
    /// Frames of the other direction received so far (the highest sequence, as they are contiguous).
    received: u64,
    /// `received` when it was last acknowledged to the peer.
    acked_received: u64,
}

impl LinkSession {
    pub fn new(budget_bytes: usize) -> LinkSession {
        LinkSession {
            peer: None,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            next_to_write: 1,
            next_seq: 1,
            budget_bytes,
            received: 0,
            acked_received: 0,
        }
    }

    /// Queues an encoded frame; it is written by the next [`LinkSession::poll_write`] (if connected).
    pub fn queue(&mut self, frame: Vec<u8>) -> Result<u64, Backlog> {
        // One frame always fits, however large: otherwise a big one could never leave.
        if !self.unacked.is_empty() && self.unacked_bytes + frame.len() > self.budget_bytes {
            return Err(Backlog::Full);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked_bytes += frame.len();
        self.unacked.push_back((seq, frame));
        self.check();
        Ok(seq)
    }

    /// Bytes of frames queued and not yet acknowledged (what the budget bounds).
    /// Frames queued and not yet acknowledged by the peer.
    pub fn unacked_frames(&self) -> usize {
        self.unacked.len()
    }

    pub fn backlog_bytes(&self) -> usize {
        self.unacked_bytes
    }

    /// The next frames to write to the connection, in order (each exactly once per connection).
    pub fn poll_write(&mut self) -> Option<&[u8]> {
        let first = self.unacked.front()?.0;
        let idx = usize::try_from(self.next_to_write.checked_sub(first)?).ok()?;
        let (_, bytes) = self.unacked.get(idx)?;
        self.next_to_write += 1;
        Some(bytes)
    }

    /// The peer has every frame up to `seq`: they leave the backlog.
    pub fn handle_received(&mut self, seq: u64) {
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, b) = self.unacked.pop_front().expect("checked");
            self.unacked_bytes -= b.len();
        }
        self.next_to_write = self.next_to_write.max(seq + 1);
        self.check();
    }

    /// A frame of the other direction arrived (they come in order on one connection).
    pub fn handle_frame(&mut self) {
        self.received += 1;
    }

    /// Whether to tell the peer how far this side got: every `every` frames (and by a timer, when quiet).
    pub fn ack_due(&self, every: u64) -> Option<u64> {
        (self.received >= self.acked_received + every.max(1)).then_some(self.received)
    }

    /// The acknowledgement of `received` was queued or written.
    pub fn acked(&mut self, received: u64) {
        self.acked_received = self.acked_received.max(received);
    }

    /// The peer life this session talks to (`None` before the first link opened).
    pub fn peer(&self) -> Option<&NodeIdentity> {
        self.peer.as_ref()
    }

    /// What this side received so far: sent in the handshake so that the peer resumes after it.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The connection broke: frames written to it may be lost and will be written again.
    pub fn disconnected(&mut self) {
        self.next_to_write = self.unacked.front().map_or(self.next_seq, |(s, _)| *s);
    }

    /// A new connection to `peer` opened, which reported having received our frames up to
    /// `peer_received`. Also resets what this side counts as received when the peer is a new life
    /// (its numbering starts over).
    pub fn resume(&mut self, peer: &NodeIdentity, peer_received: u64) -> Resume {
        let same_life = self.peer.as_ref() == Some(peer);
        self.peer = Some(peer.clone());
        if !same_life {
            let dropped = self.unacked.len();
            self.unacked.clear();
            self.unacked_bytes = 0;
            self.next_seq = 1;
            self.next_to_write = 1;
            self.received = 0;
            self.acked_received = 0;
            self.check();
            return Resume::Resync { dropped };
        }
        self.handle_received(peer_received);
        self.disconnected();
        Resume::Continue { resent: self.unacked.len() }
    }

    fn check(&self) {
        debug_assert_eq!(self.unacked_bytes, self.unacked.iter().map(|(_, b)| b.len()).sum::<usize>());
        debug_assert!(self.unacked.iter().zip(self.unacked.iter().skip(1)).all(|(a, b)| b.0 == a.0 + 1));
        debug_assert!(self.unacked.back().is_none_or(|(s, _)| *s + 1 == self.next_seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(incarnation: u64) -> NodeIdentity {
        NodeIdentity::new("p", ([127, 0, 0, 1], 9).into(), "z", "r", incarnation)
    }

    fn drain(s: &mut LinkSession) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while let Some(b) = s.poll_write() {
            v.push(b.to_vec());
        }
        v
    }

    #[test]
    fn the_backlog_is_bounded_in_bytes_and_freed_by_acknowledgements() {
        let mut s = LinkSession::new(100);
        assert_eq!(s.resume(&peer(1), 0), Resume::Resync { dropped: 0 });
        assert_eq!(s.queue(vec![0; 60]), Ok(1));
        assert_eq!(s.queue(vec![0; 30]), Ok(2));
        assert_eq!(s.queue(vec![0; 20]), Err(Backlog::Full));
        assert_eq!(drain(&mut s).len(), 2);
        s.handle_received(1);
        assert_eq!(s.backlog_bytes(), 30);
        assert_eq!(s.queue(vec![0; 20]), Ok(3));
        // A single frame over the budget still goes when nothing waits.
        let mut big = LinkSession::new(10);
        assert_eq!(big.queue(vec![0; 50]), Ok(1));
    }

    #[test]
    fn a_reconnect_to_the_same_life_resends_exactly_what_was_not_received() {
        let mut s = LinkSession::new(1 << 20);
        s.resume(&peer(1), 0);
        for i in 0..5u8 {
            s.queue(vec![i]).unwrap();
        }
        assert_eq!(drain(&mut s).len(), 5);
        s.disconnected();
        // The peer had frames 1-3 when the connection broke.
        assert_eq!(s.resume(&peer(1), 3), Resume::Continue { resent: 2 });
        assert_eq!(drain(&mut s), vec![vec![3u8], vec![4u8]]);
    }

    #[test]
    fn a_new_life_of_the_peer_starts_over_and_asks_for_a_resync() {
        let mut s = LinkSession::new(1 << 20);
        s.resume(&peer(1), 0);
        s.queue(vec![1]).unwrap();
        s.handle_frame();
        s.disconnected();
        assert_eq!(s.resume(&peer(2), 0), Resume::Resync { dropped: 1 });
        assert_eq!(s.received(), 0);
        assert_eq!(s.queue(vec![2]), Ok(1));
    }

    proptest! {
        /// Whatever the breaks and acknowledgements, the peer's life sees every frame exactly once, in
        /// order, when it keeps only what it received contiguously.
        #[test]
        fn every_frame_arrives_once_in_order(ops in proptest::collection::vec(0..4u8, 1..200)) {
            let mut s = LinkSession::new(1 << 30);
            s.resume(&peer(1), 0);
            let mut got: Vec<u64> = Vec::new();
            let mut in_flight: Vec<u64> = Vec::new(); // written to the current connection, not yet read
            let mut next = 0u64;
            for op in ops {
                match op {
                    0 => { next += 1; s.queue(next.to_le_bytes().to_vec()).unwrap(); }
                    1 => while let Some(b) = s.poll_write() {
                        let v = u64::from_le_bytes(b.try_into().unwrap());
                        // One connection carries each frame once, in order, after what the peer has.
                        prop_assert!(v > in_flight.last().copied().unwrap_or(got.len() as u64));
                        in_flight.push(v);
                    },
                    2 => {
                        // The peer reads what arrived and acknowledges it.
                        for v in in_flight.drain(..) {
                            if v == got.len() as u64 + 1 { got.push(v); }
                        }
                        s.handle_received(got.len() as u64);
                    }
                    _ => {
                        // The connection breaks: what was in flight is lost.
                        in_flight.clear();
                        s.disconnected();
                        s.resume(&peer(1), got.len() as u64);
                    }
                }
            }
            while let Some(b) = s.poll_write() {
                in_flight.push(u64::from_le_bytes(b.try_into().unwrap()));
            }
            for v in in_flight.drain(..) {
                if v == got.len() as u64 + 1 { got.push(v); }
            }
            prop_assert_eq!(got, (1..=next).collect::<Vec<_>>());
        }
    }
}
