//! Who a node is in the cluster.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A node's name: unique in the cluster (`--node-name`, the host name by default).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeName(pub Arc<str>);

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One life of a node: what gossip carries and what members are told apart by.
///
/// Two identities with the same name are the same node in different lives; the one with the higher
/// `incarnation` wins (a restart picks a new, higher one, e.g. its start time in milliseconds), so the
/// cluster declares the old life down instead of confusing the two.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub name: NodeName,
    /// Where its gossip (UDP) and links (TCP) listen.
    pub addr: SocketAddr,
    pub zone: Arc<str>,
    pub region: Arc<str>,
    pub incarnation: u64,
}

impl NodeIdentity {
    pub fn new(name: &str, addr: SocketAddr, zone: &str, region: &str, incarnation: u64) -> NodeIdentity {
        NodeIdentity {
            name: NodeName(name.into()),
            addr,
            zone: zone.into(),
            region: region.into(),
            incarnation,
        }
    }

    /// A stand-in for a node known only by its address (a `--join` target): gossip sent to it reaches
    /// whatever node listens there, which answers with its real identity.
    pub(crate) fn seed(addr: SocketAddr) -> NodeIdentity {
        NodeIdentity::new("", addr, "", "", 0)
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.incarnation)
    }
}

impl foca::Identity for NodeIdentity {
    /// Lives of one node share its listening address (and a `--join` target is known by nothing else):
    /// two identities at one address are two lives of one node, and the newer one wins.
    type Addr = SocketAddr;

    /// Declared down while alive (a partition, a long pause): rejoin as a new life.
    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity { incarnation: self.incarnation.wrapping_add(1).max(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}
