//! This node's own requests ([`Registrar`]'s requester side): its clients' registrations (waited for,
//! or answered ahead), their disconnects, and the answers the owners give them: grants, ends of a
//! session by a newer registration, and the loss of a connection answered ahead to one that is newer
//! by clock.

use std::sync::Arc;
use std::time::Instant;

use super::requests::{Op, Pending};
use super::{Held, PartitionMode, Previous, Registrar, RegistrarEvent, RegistryMsg, RequestId, AHEAD_DELAY};
use crate::registry::{owners, Registration, WillInfo};
use crate::NodeName;

impl Registrar {
    /// A client connected here: register it with its owner. The answer comes as an event
    /// ([`RegistrarEvent::Granted`] or [`RegistrarEvent::Refused`]) naming the returned id.
    pub fn handle_connect(
        &mut self,
        client: &str,
        clean_start: bool,
        will: Option<WillInfo>,
        now: Instant,
    ) -> RequestId {
        self.connect(client.into(), clean_start, will, false, now)
    }

    /// A client connected here and was answered (CONNACK) without waiting for its registration: a clean
    /// start whose session ends with its connection and that has no will, in
    /// [`PartitionMode::Available`]. Registered as by [`Registrar::handle_connect`] but [`AHEAD_DELAY`]
    /// later, ordered by its clock at the owner; its grant ([`RegistrarEvent::Granted`]) only tells the
    /// shard its epoch, and its loss to a newer connection comes as [`RegistrarEvent::Superseded`]. Its
    /// end is reported by [`Registrar::handle_disconnect_ahead`].
    pub fn handle_connect_ahead(&mut self, client: Arc<str>, now: Instant) -> RequestId {
        debug_assert_eq!(self.cfg.partition_mode, PartitionMode::Available);
        self.connect(client, true, None, true, now)
    }

    pub(super) fn connect(
        &mut self,
        client: Arc<str>,
        clean_start: bool,
        will: Option<WillInfo>,
        ahead: bool,
        now: Instant,
    ) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let stamp = self.hlc.stamp(self.wall_ms(now));
        let op =
            Op::Register { clean_start, stamp, will: will.map(Box::new), ahead, ended: false, sent: false };
        if ahead {
            // Sent after a moment, unless the connection ends first: then it goes as one message with
            // its end (see `handle_disconnect_ahead`).
            let p = Pending { client, op, owner: self.me.clone(), deadline: now + AHEAD_DELAY };
            self.pending.insert(id, p);
            return id;
        }
        // A registration answered ahead for the same client waiting for its moment goes first: the
        // owner must see this node's connections of a client in the order they came.
        let unsent: Vec<RequestId> = self
            .pending
            .of(&client)
            .filter(|(_, p)| matches!(p.op, Op::Register { sent: false, .. }))
            .map(|(id, _)| id)
            .collect();
        for earlier in unsent {
            self.send_request(earlier, now);
        }
        let p = Pending { client, op, owner: self.me.clone(), deadline: now };
        self.pending.insert(id, p);
        self.send_request(id, now);
        self.drain_local(now);
        id
    }

    /// The client of `epoch` disconnected; `session_kept`: its session persists here (offline). Ignored
    /// for an epoch this node no longer holds.
    pub fn handle_disconnect(&mut self, client: &str, epoch: u64, session_kept: bool, now: Instant) {
        if !self.is_current(client, epoch) {
            return;
        }
        let had_will = if session_kept {
            let h = self.held.get_mut(client).expect("current");
            h.connected = false;
            h.will.take().is_some()
        } else {
            self.held.remove(client).is_some_and(|h| h.will.is_some())
        };
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let op = Op::Disconnect { epoch, ended: !session_kept, had_will };
        self.pending.insert(id, Pending { client: client.into(), op, owner: self.me.clone(), deadline: now });
        self.send_request(id, now);
        self.drain_local(now);
    }

    /// The connection of `client` registered here ahead of its answer with `request`
    /// ([`Registrar::handle_connect_ahead`]) went, and its session with it. Its registration ends as soon
    /// as it is granted; one sent after the delay goes now, as one message with its end. Nothing when
    /// the request no longer holds the session (superseded, or a later connection's grant replaced it).
    pub fn handle_disconnect_ahead(&mut self, client: &str, request: RequestId, now: Instant) {
        if let Some(Op::Register { ended, sent, .. }) = self.pending.get_mut(request).map(|p| &mut p.op) {
            *ended = true;
            if !*sent {
                self.send_request(request, now);
                self.drain_local(now);
            }
            return;
        }
        let held = self.held.get(client).filter(|h| h.connected && h.request == Some(request));
        if let Some(epoch) = held.map(|h| h.epoch) {
            self.handle_disconnect(client, epoch, false, now);
        }
    }

    /// Sends (again) request `id` to its client's primary owner, or refuses it in consistent mode when
    /// the owner over every known member is down.
    pub(super) fn send_request(&mut self, id: RequestId, now: Instant) {
        let p = self.pending.get(id).expect("pending");
        let client = p.client.clone();
        if self.cfg.partition_mode == PartitionMode::Consistent && matches!(p.op, Op::Register { .. }) {
            let expected = owners(&client, &self.known).expect("this node is known");
            if !self.is_up(&expected.primary) {
                return self.refuse(id);
            }
        }
        let owner = self.owners_of(&client).primary;
        let deadline = now + self.cfg.request_timeout;
        let p = self.pending.get_mut(id).expect("pending");
        p.owner = owner.clone();
        p.deadline = deadline;
        if let Op::Register { sent, .. } = &mut p.op {
            *sent = true;
        }
        let m = match &p.op {
            Op::Register { clean_start, stamp, will, ahead, ended, .. } => RegistryMsg::Register {
                known: self
                    .table
                    .get(&client)
                    .map_or(0, |r| r.epoch)
                    .max(self.held.get(&client).map_or(0, |h| h.epoch)),
                request: id,
                client,
                clean_start: *clean_start,
                stamp: *stamp,
                will: will.clone(),
                ahead: *ahead,
                ended: *ended,
            },
            Op::Disconnect { epoch, ended, .. } => {
                RegistryMsg::Disconnect { request: id, client, epoch: *epoch, ended: *ended }
            }
        };
        // A disconnect late at the owner keeps the registration connected a moment longer: harmless
        // without a will (were this node lost meanwhile, the owners would have none to publish).
        // Nor for the registration of a connection answered ahead that has ended already (what it does
        // at the owner, end sessions of its id elsewhere, the client's CONNACK did not wait for). One
        // still connected goes at once: until the owner has it, a connection of its id elsewhere lives on.
        let can_wait = matches!(
            p.op,
            Op::Disconnect { had_will: false, .. } | Op::Register { ahead: true, ended: true, .. }
        );
        self.send_hinted(&owner, m, can_wait);
    }

    pub(super) fn refuse(&mut self, id: RequestId) {
        let p = self.pending.remove(id).expect("pending");
        self.superseded.remove(&p.client);
        self.counters.refused += 1;
        self.events.push_back(RegistrarEvent::Refused { request: id, client: p.client });
    }

    /// Available mode, no answer from the owner: this node grants the connection an epoch above every
    /// one it knows of, and tells the owner (conflicts resolve by the registry's rules).
    pub(super) fn grant_provisionally(&mut self, id: RequestId, now: Instant) {
        let p = self.pending.remove(id).expect("pending");
        let Op::Register { stamp, will, ended, .. } = p.op else {
            unreachable!("only registrations are granted")
        };
        let known = self.table.get(&p.client).map_or(0, |r| r.epoch);
        let held = self.held.get(&p.client).map_or(0, |h| h.epoch);
        let floor = self.superseded.remove(&p.client).map_or(0, |s| s.2);
        let epoch = known.max(held).max(floor) + 1;
        self.counters.granted += 1;
        self.counters.provisional += 1;
        self.held.insert(
            p.client.clone(),
            Held {
                epoch,
                stamp,
                connected: true,
                will,
                unconfirmed: true,
                restored: false,
                request: Some(id),
            },
        );
        self.events.push_back(RegistrarEvent::Granted {
            request: id,
            client: p.client.clone(),
            epoch,
            stamp,
            previous: None,
            provisional: true,
        });
        self.reregister(&p.client);
        if ended {
            self.handle_disconnect(&p.client, epoch, false, now);
        }
        self.drain_local(now);
    }

    /// Sends the session this node holds of `client` to its primary owner.
    pub(super) fn reregister(&mut self, client: &Arc<str>) {
        let Some(h) = self.held.get_mut(client) else { return };
        let r = Registration {
            client: client.clone(),
            holder: self.me.clone(),
            epoch: h.epoch,
            stamp: h.stamp,
            connected: h.connected,
            will: h.will.clone(),
        };
        h.unconfirmed = false;
        let m = if h.restored { RegistryMsg::Held(r) } else { RegistryMsg::Sync(r) };
        self.counters.reregistrations += 1;
        let primary = self.owners_of(client).primary;
        self.send(&primary, m);
    }

    pub(super) fn granted(
        &mut self,
        from: &NodeName,
        request: RequestId,
        client: Arc<str>,
        epoch: u64,
        previous: Option<Previous>,
        now: Instant,
    ) {
        let answered = self.pending.get(request).is_some_and(|p| matches!(p.op, Op::Register { .. }));
        if !answered {
            // A late answer (the request was re-sent, granted provisionally, or refused meanwhile): the
            // owner registered this node for a connection it did not take. The session it holds, if
            // any, is re-registered (same holder: the merge keeps one); if none, the owner is told to
            // drop the registration.
            if self.held.contains_key(&client) {
                self.reregister(&client);
            } else {
                let id = RequestId(self.next_request);
                self.next_request += 1;
                let op = Op::Disconnect { epoch, ended: true, had_will: true };
                self.pending.insert(id, Pending { client, op, owner: self.me.clone(), deadline: now });
                self.send_request(id, now);
            }
            return;
        }
        let p = self.pending.remove(request).expect("answered");
        let Op::Register { stamp, will, ended, .. } = p.op else { unreachable!("checked") };
        self.counters.granted += 1;
        // A later connect of the same client here may have been answered first (the owner's replica
        // changed in between): this grant is then superseded by it as soon as it is given.
        let newer = self.held.get(&client).map(|h| h.epoch).filter(|e| *e > epoch);
        if newer.is_none() {
            self.held.insert(
                client.clone(),
                Held {
                    epoch,
                    stamp,
                    connected: true,
                    will,
                    unconfirmed: false,
                    restored: false,
                    request: Some(request),
                },
            );
        }
        self.events.push_back(RegistrarEvent::Granted {
            request,
            client: client.clone(),
            epoch,
            stamp,
            previous,
            provisional: false,
        });
        if let Some(successor_epoch) = newer {
            self.counters.sessions_ended += 1;
            self.events.push_back(RegistrarEvent::EndSession {
                client,
                epoch,
                successor: self.me.clone(),
                successor_epoch,
                discard: false,
            });
            return;
        }
        if let Some((until, successor, successor_epoch)) = self.superseded.remove(&client) {
            if until >= epoch {
                self.session_superseded(client, until, successor, successor_epoch, false, now);
                return;
            }
        }
        // Granted by a node that is not the id's primary any more (the membership changed while the
        // grant waited for its replica): the grant was handed to the new primary with the rest, which may
        // have had a newer registration from the other side of a healed partition and tried to end this
        // one before it could reach this node. Re-registered with the primary of now, which ends it
        // if it lost (registrar simulation, seed 109066). The sender, not the request's owner, is what
        // counts: a request sent again to the new primary still takes the old one's grant if it comes
        // first.
        if *from != self.me && self.owners_of(&client).primary != *from {
            self.reregister(&client);
        }
        // A connection answered ahead that went before its grant came.
        if ended {
            self.handle_disconnect(&client, epoch, false, now);
        }
    }

    /// An owner says this node's sessions of `client` up to `epoch` lost to `successor`'s.
    pub(super) fn session_superseded(
        &mut self,
        client: Arc<str>,
        epoch: u64,
        successor: NodeName,
        successor_epoch: u64,
        discard: bool,
        now: Instant,
    ) {
        // A registration of this client still waiting for its grant may be the one the message names
        // (the owner replaced it before answering): its grant is ended as soon as it arrives.
        if self.pending.registering(&client) {
            let e = self.superseded.entry(client.clone()).or_insert((0, successor.clone(), successor_epoch));
            if epoch >= e.0 {
                *e = (epoch, successor.clone(), successor_epoch);
            }
        }
        // Epochs this node holds for one client only grow, so a newer one than the message names is
        // a later connection the owner did not know of yet: it stays.
        if let Some(h) = self.held.get(&client).filter(|h| h.epoch <= epoch) {
            let held_epoch = h.epoch;
            self.held.remove(&client);
            // As an owner too, this node's own registration of the session is over: whoever sent the
            // end has the winner, and a copy here must not name this node as the holder any more.
            let mine = self.table.get(&client).filter(|r| r.holder == self.me && r.epoch <= epoch).cloned();
            if let Some(r) = mine {
                let at = self.hlc.stamp(self.wall_ms(now));
                self.table.ended(&client, r.epoch, at);
                self.forget_at_owners(r);
            }
            self.counters.sessions_ended += 1;
            self.events.push_back(RegistrarEvent::EndSession {
                client,
                epoch: held_epoch,
                successor,
                successor_epoch,
                discard,
            });
        } else if !self.held.contains_key(&client)
            && !self.pending.registering(&client)
            && successor != self.me
        {
            // Nothing here (any more): the session ended here before the owner heard, and the owner
            // took this node for its holder when it granted the successor (a client that left this node
            // and at once connected to another), or another owner's end of a session already handed
            // over. The successor may be waiting for this node's hand-over: it is told there is none
            // (a second one, after the session, changes nothing there). Without it, its CONNACK would
            // wait for the hand-over's timeout.
            self.events.push_back(RegistrarEvent::NoSession { client, successor, successor_epoch });
        }
    }

    /// A registration of `client` requested here was answered without a grant (it ended before its
    /// owner had it, or lost to a newer one): an end the owners sent while it waited concerned it, not
    /// a registration requested after it.
    pub(super) fn registration_gone(&mut self, client: &Arc<str>) {
        if !self.pending.registering(client) {
            self.superseded.remove(client);
        }
    }

    /// The owner says the connection of `request`, answered ahead, lost to `successor`'s newer one.
    pub(super) fn superseded_ahead(
        &mut self,
        request: RequestId,
        client: Arc<str>,
        successor: NodeName,
        successor_epoch: u64,
    ) {
        let ours = self.pending.get(request).is_some_and(|p| matches!(p.op, Op::Register { .. }));
        if !ours {
            return;
        }
        let p = self.pending.remove(request).expect("checked");
        let Op::Register { ended, .. } = p.op else { unreachable!("checked") };
        self.registration_gone(&client);
        // Only the connection of that request ends: not one that came after it here (registering, or
        // granted already).
        let later =
            self.pending.of(&client).any(|(id, p)| id > request && matches!(p.op, Op::Register { .. }))
                || self.held.get(&client).is_some_and(|h| h.request.is_some_and(|r| r > request));
        if !ended && !later {
            self.counters.sessions_ended += 1;
            self.events.push_back(RegistrarEvent::Superseded { request, client, successor, successor_epoch });
        }
    }
}
