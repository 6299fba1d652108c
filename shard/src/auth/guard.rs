//! Slowing down password guessing: a source address whose logins fail too often is refused for a while
//! (MQTT 5 CONNACK 0x8A Banned, 3.1.1 return code 5), the ban doubling each time it is earned again.
//!
//! Per shard: connections from one address spread over the shards, so an attacker gets at most this
//! allowance per shard, which still turns guessing from thousands of tries per second into a handful.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::ConnId;

/// Failed logins from one address within [`WINDOW`] that start a ban.
pub const MAX_FAILURES: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
pub const FIRST_BAN: Duration = Duration::from_secs(10);
pub const MAX_BAN: Duration = Duration::from_secs(600);
/// Addresses tracked before those without a ban or recent failure are forgotten.
const PRUNE_AT: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Failures {
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
    /// The next ban's length.
    next_ban: Duration,
}

/// What is known of a connection's peer before it logs in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    pub ip: Option<IpAddr>,
    /// Set when the node takes the user name from the transport (`--tls-cn-as-username`).
    pub identity: Option<Identity>,
}

/// What the transport proved of a peer whose user name it supplies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A TLS client certificate's subject CN: the user name.
    Name(Box<str>),
    /// A certificate without a CN: no user name, and the client is refused rather than taken at the
    /// name it claims.
    Missing,
}

/// The peers of connections that have not logged in yet, and the failures per address.
#[derive(Debug, Default)]
pub struct Logins {
    /// Only until CONNECT: an established connection does not pay for its address.
    peers: HashMap<ConnId, Peer>,
    by_ip: HashMap<IpAddr, Failures>,
}

impl Logins {
    pub fn connected(&mut self, conn: ConnId, ip: IpAddr) {
        self.peers.entry(conn).or_default().ip = Some(ip);
    }

    /// The connection's transport proved `name`, or nothing (see [`Peer::identity`]).
    pub fn identified(&mut self, conn: ConnId, name: Option<&str>) {
        let identity = match name {
            Some(n) => Identity::Name(n.into()),
            None => Identity::Missing,
        };
        self.peers.entry(conn).or_default().identity = Some(identity);
    }

    /// Sets what a handed-off connection brought along.
    pub fn restore(&mut self, conn: ConnId, peer: Peer) {
        if peer != Peer::default() {
            self.peers.insert(conn, peer);
        }
    }

    /// What is known of the connection's peer, forgotten here (CONNECT, handoff or close).
    pub fn take(&mut self, conn: ConnId) -> Peer {
        self.peers.remove(&conn).unwrap_or_default()
    }

    /// Whether logins from `ip` are refused now.
    pub fn banned(&self, ip: IpAddr, now: Instant) -> bool {
        self.by_ip.get(&ip).and_then(|f| f.banned_until).is_some_and(|until| now < until)
    }

    /// A failed login from `ip`; returns the ban it starts, if it starts one.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.by_ip.len() >= PRUNE_AT {
            self.by_ip.retain(|_, f| {
                f.banned_until.is_some_and(|u| now < u) || now.duration_since(f.window_start) < WINDOW
            });
        }
        let f = self.by_ip.entry(ip).or_insert(Failures {
            window_start: now,
            count: 0,
            banned_until: None,
            next_ban: FIRST_BAN,
        });
        if now.duration_since(f.window_start) >= WINDOW {
            f.window_start = now;
            f.count = 0;
        }
        f.count += 1;
        if f.count < MAX_FAILURES {
            return None;
        }
        let ban = f.next_ban;
        f.banned_until = Some(now + ban);
        f.next_ban = (ban * 2).min(MAX_BAN);
        f.window_start = now;
        f.count = 0;
        Some(ban)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_failures_ban_the_address_for_a_doubling_while() {
        let mut l = Logins::default();
        let (ip, other): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 1..MAX_FAILURES {
            assert_eq!(l.failed(ip, t0), None, "failure {i}");
        }
        assert!(!l.banned(ip, t0));
        assert_eq!(l.failed(ip, t0), Some(FIRST_BAN));
        assert!(l.banned(ip, t0) && !l.banned(other, t0), "only that address");
        assert!(!l.banned(ip, t0 + FIRST_BAN));
        let t1 = t0 + FIRST_BAN;
        for _ in 1..MAX_FAILURES {
            l.failed(ip, t1);
        }
        assert_eq!(l.failed(ip, t1), Some(FIRST_BAN * 2), "earned again: twice as long");
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_ban() {
        let mut l = Logins::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 * MAX_FAILURES {
            // 8 per window at most, below the 10 that ban.
            let at = t0 + WINDOW / 8 * (i + 1);
            assert_eq!(l.failed(ip, at), None);
        }
    }

    #[test]
    fn an_address_is_kept_only_until_login() {
        let mut l = Logins::default();
        l.connected(ConnId(1), "::1".parse().unwrap());
        l.identified(ConnId(1), Some("alice"));
        let p = l.take(ConnId(1));
        assert_eq!(p.ip, Some("::1".parse().unwrap()));
        assert_eq!(p.identity, Some(Identity::Name("alice".into())));
        assert_eq!(l.take(ConnId(1)), Peer::default());
    }
}
