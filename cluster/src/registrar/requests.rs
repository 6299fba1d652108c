//! The requests a node waits on answers for (its clients' registrations and disconnects), by request id
//! and by client id: most registry messages ask whether a client has one, so that is not a scan.

use std::collections::BTreeMap;

use ahash::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::RequestId;
use crate::registry::WillInfo;
use crate::retained::HlcStamp;
use crate::NodeName;

#[derive(Debug)]
pub(super) enum Op {
    Register {
        clean_start: bool,
        stamp: HlcStamp,
        will: Option<Box<WillInfo>>,
        /// The connection was answered (CONNACK) before its registration (see
        /// `Registrar::handle_connect_ahead`): nothing here waits for the grant.
        ahead: bool,
        /// An ahead connection that ended before its grant came: the grant is followed at once by the
        /// end of its registration. Sent as one (`Register` marked ended) when the connection ended
        /// before its registration went.
        ended: bool,
        /// Sent to an owner at least once (an ahead registration waits [`super::AHEAD_DELAY`] first).
        sent: bool,
    },
    /// `had_will`: the connection had a will (its disconnect must not wait: see `send_request`).
    Disconnect { epoch: u64, ended: bool, had_will: bool },
}

#[derive(Debug)]
pub(super) struct Pending {
    pub client: Arc<str>,
    pub op: Op,
    /// Where it was sent last.
    pub owner: NodeName,
    pub deadline: Instant,
}

#[derive(Debug, Default)]
pub(super) struct Requests {
    /// In id order, which is the order they were made: what timers and re-sends go through.
    by_id: BTreeMap<RequestId, Pending>,
    /// Invariant: exactly the ids of `by_id`, each once, under its client (checked in debug builds).
    by_client: HashMap<Arc<str>, Vec<RequestId>>,
}

impl Requests {
    pub fn insert(&mut self, id: RequestId, p: Pending) {
        self.by_client.entry(p.client.clone()).or_default().push(id);
        let replaced = self.by_id.insert(id, p);
        debug_assert!(replaced.is_none(), "request ids are not reused");
    }

    pub fn remove(&mut self, id: RequestId) -> Option<Pending> {
        let p = self.by_id.remove(&id)?;
        if let Some(ids) = self.by_client.get_mut(&p.client) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_client.remove(&p.client);
            }
        }
        Some(p)
    }

    pub fn get(&self, id: RequestId) -> Option<&Pending> {
        self.by_id.get(&id)
    }

    pub fn get_mut(&mut self, id: RequestId) -> Option<&mut Pending> {
        self.by_id.get_mut(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RequestId, &Pending)> {
        self.by_id.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Pending> {
        self.by_id.values()
    }

    /// The requests of `client`, oldest first.
    pub fn of<'a>(&'a self, client: &str) -> impl Iterator<Item = (RequestId, &'a Pending)> + 'a {
        debug_assert_eq!(
            self.by_client.get(client).map_or(0, |ids| ids.len()),
            self.by_id.values().filter(|p| &*p.client == client).count()
        );
        self.by_client.get(client).into_iter().flatten().map(|id| (*id, &self.by_id[id]))
    }

    /// Whether a registration of `client` waits for its answer.
    pub fn registering(&self, client: &str) -> bool {
        self.of(client).any(|(_, p)| matches!(p.op, Op::Register { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(client: &str, op: Op) -> Pending {
        Pending { client: client.into(), op, owner: NodeName("n".into()), deadline: Instant::now() }
    }

    #[test]
    fn requests_are_found_by_client_until_removed() {
        let mut r = Requests::default();
        let reg = || Op::Register {
            clean_start: true,
            stamp: HlcStamp(1),
            will: None,
            ahead: false,
            ended: false,
            sent: true,
        };
        r.insert(RequestId(1), req("a", reg()));
        r.insert(RequestId(2), req("a", Op::Disconnect { epoch: 1, ended: true, had_will: false }));
        r.insert(RequestId(3), req("b", reg()));
        assert!(r.registering("a") && r.registering("b") && !r.registering("c"));
        assert_eq!(r.of("a").map(|(id, _)| id).collect::<Vec<_>>(), vec![RequestId(1), RequestId(2)]);
        assert!(r.remove(RequestId(1)).is_some());
        assert!(!r.registering("a"), "only its disconnect is left");
        assert_eq!(r.of("a").count(), 1);
        assert!(r.remove(RequestId(1)).is_none());
        r.remove(RequestId(2));
        r.remove(RequestId(3));
        assert!(r.by_client.is_empty() && r.by_id.is_empty());
    }
}
