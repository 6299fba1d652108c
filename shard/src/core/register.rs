//! CONNECTs held until the zone registers them (issue "Cluster sessions").
//!
//! In a zone a client id's session lives on the node its client connects to, so before a CONNECT is
//! answered the zone's registry must record that this node now holds the session, and a node that held it
//! must hand it over. On a clustered node the owner shard, once the credentials are checked, asks its
//! gateway ([`Mesh::Register`]) and holds the CONNECT (its bytes and everything the client sent after
//! them, with the connection's reading paused) until the answer ([`Mesh::Registered`]): granted, with
//! the session moved from another node if there was one, or refused (a zone that prefers consistency
//! and cannot reach the id's owner). Then the CONNECT runs again, its credentials not checked twice.
//!
//! Without an answer by the connection's CONNECT timeout the shard goes on alone, as a zone that prefers
//! availability does during a partition (counted: `registrations_timed_out`); the registry reconciles
//! when it can. Client ids the node assigns are not registered: they are this node's own.
//!
//! Where the zone prefers availability ([`super::Config::register_ahead`]), a CONNECT that starts clean,
//! has no will and whose session ends with it is not held: it runs at once, and its registration follows
//! with a token ([`ZoneRegistration::ahead`]) that names the connection until the gateway tells its epoch.
//! The registry's end of a session names the registration it ends ([`SessionOf`]), so that a connection
//! answered ahead is not closed for an older one. Not while a CONNECT of the same id is held here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use shardmq_wire::{Protocol, ReasonCode};

use super::persist::{SessionTransfer, WallClock};
use super::{Mesh, Shard};
use crate::auth::ClientAcl;
use crate::io::IoCmd;
use crate::ConnId;

/// Which registration of a client's session the zone's registry ends ([`Mesh::EndSession`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOf {
    /// The registration of that epoch (and any older one).
    Epoch(u64),
    /// The connection registered ahead with that token ([`Mesh::Register`]), which lost to a newer one
    /// before it got an epoch.
    Ahead(u64),
}

/// The gateway's answer to a [`Mesh::Register`].
#[derive(Debug)]
pub enum RegisterOutcome {
    /// This node holds the session now; `session` is the client's session moved from the node that
    /// held it, if one did and it was persistent.
    Granted { session: Option<Box<SessionTransfer>>, registration: ZoneRegistration },
    /// Not registered (the id's owner is unreachable and the zone prefers consistency): CONNACK
    /// 0x88 Server unavailable (3.1.1: 3).
    Refused,
}

/// A session's registration in the zone's registry: its epoch (which grows with every registration of
/// the client id) and the hybrid-logical-clock stamp of the CONNECT that made it ([`Self::ahead`] for
/// a connection answered before its registration). Stored with the session
/// (SESSION record), so that a node restarted with its log re-registers its sessions as they were
/// ([`Mesh::SessionsHeld`]) and a session that moved meanwhile is ended here, not resurrected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneRegistration {
    /// Invariant: at least 1, but for [`Self::ahead`].
    pub epoch: u64,
    pub stamp: u64,
}

impl ZoneRegistration {
    /// The epoch of [`ZoneRegistration::ahead`].
    pub const AHEAD_EPOCH: u64 = 0;

    /// A connection answered before its registration ([`super::Config::register_ahead`]), registered
    /// with `token` ([`Mesh::Register`]): until the gateway says which epoch it got
    /// ([`Mesh::RegisteredAhead`]), its end is reported with epoch 0 (the gateway knows which). Never
    /// stored (its session ends with it).
    pub fn ahead(token: u64) -> ZoneRegistration {
        ZoneRegistration { epoch: Self::AHEAD_EPOCH, stamp: token }
    }

    /// The token of [`ZoneRegistration::ahead`].
    pub fn ahead_token(&self) -> Option<u64> {
        (self.epoch == Self::AHEAD_EPOCH).then_some(self.stamp)
    }

    /// What a session with no registration of its own (stored by a node that was not clustered, or
    /// granted without an answer from the registry) re-registers as: below every registration the zone
    /// made, so that any of them wins over it.
    pub const UNKNOWN: ZoneRegistration = ZoneRegistration { epoch: 1, stamp: 0 };
}

/// A session restored from the log, for the gateway to re-register (see [`Mesh::SessionsHeld`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldRegistration {
    pub client: Arc<str>,
    pub registration: ZoneRegistration,
}

/// A client's will as the zone's registry keeps it, so that the id's owners can publish it if this node
/// dies with the connection (MQTT 5 properties other than the delay are not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredWill {
    pub topic: Arc<str>,
    pub payload: Arc<[u8]>,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    pub delay_s: u32,
}

/// A CONNECT waiting for its registration.
#[derive(Debug)]
struct Held {
    token: u64,
    client: Arc<str>,
    /// The CONNECT and every byte after it.
    bytes: Vec<u8>,
    protocol: Protocol,
    /// What the credentials check gave (`None`: no ACL).
    acl: Option<Box<ClientAcl>>,
}

#[derive(Debug, Default)]
pub(super) struct Registrations {
    held: HashMap<ConnId, Held>,
    /// The connection each outstanding token is for. Invariant: the inverse of `held`'s tokens.
    by_token: HashMap<u64, ConnId>,
    /// Connections whose CONNECT runs again now, registered, with the rights already checked.
    approved: HashMap<ConnId, Approval>,
    next_token: u64,
    /// Maps the Unix-time deadlines of moved sessions to this shard's clock (see [`Shard::set_wall_clock`]).
    pub(super) clock: Option<WallClock>,
    /// The registration of each session's current (or last) connection: for the disconnect report (an
    /// old connection's report, late, must not end a newer one's registration) and the SESSION record.
    /// Clustered nodes only.
    pub(super) current: HashMap<super::SessionKey, ZoneRegistration>,
    /// Sessions exported to another node whose subscriptions still route here (forwarding stubs, see
    /// `persist::transfer`), with the SESSION record each forwarded message travels with (encoded once:
    /// the new node only takes the messages). Not in the client-id index.
    pub(super) stubs: HashMap<super::SessionKey, Vec<u8>>,
}

/// What a registered CONNECT runs again with.
#[derive(Debug)]
pub(super) struct Approval {
    /// What the credentials check gave (`None`: no ACL).
    pub acl: Option<Box<ClientAcl>>,
    /// The registry's registration of the connection; `None` when the CONNECT went on without an
    /// answer.
    pub registration: Option<ZoneRegistration>,
}

impl Registrations {
    /// The rights of a connection whose registration was answered, if it was.
    pub(super) fn take_approved(&mut self, conn: ConnId) -> Option<Approval> {
        self.approved.remove(&conn)
    }

    pub(super) fn is_held(&self, conn: ConnId) -> bool {
        self.held.contains_key(&conn)
    }

    /// Whether a CONNECT of `client` waits for its registration here.
    pub(super) fn holds_connect_of(&self, client: &str) -> bool {
        self.held.values().any(|h| &*h.client == client)
    }

    /// Bytes of a held connection that reached the shard before its pause took effect: kept, in order,
    /// behind the CONNECT. `false` when the connection is not held.
    pub(super) fn hold_more(&mut self, conn: ConnId, data: &[u8]) -> bool {
        match self.held.get_mut(&conn) {
            Some(h) => {
                h.bytes.extend_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// The connection went away: nothing of it is kept.
    pub(super) fn forget(&mut self, conn: ConnId) {
        self.take_held(conn);
        self.approved.remove(&conn);
    }

    fn take_held(&mut self, conn: ConnId) -> Option<Held> {
        let h = self.held.remove(&conn)?;
        self.by_token.remove(&h.token);
        debug_assert_eq!(self.held.len(), self.by_token.len());
        Some(h)
    }
}

impl Shard {
    /// The wall clock at `now` on the monotonic clock the shard runs on: what turns the Unix-time
    /// deadlines of a session moved from another node into this shard's instants. Set by the runtime's
    /// owner (the broker) at start-up; a shard with a log uses its log's.
    pub fn set_wall_clock(&mut self, clock: WallClock) {
        self.sessions.registrations.clock = Some(clock);
    }

    pub(super) fn wall_clock(&self) -> Option<WallClock> {
        self.store.as_deref().map(|s| s.clock).or(self.sessions.registrations.clock)
    }

    /// Holds a CONNECT whose credentials passed until the gateway registers its client id.
    #[allow(clippy::too_many_arguments)] // the CONNECT's parts the registration needs
    pub(super) fn hold_for_registration(
        &mut self,
        conn: ConnId,
        client_id: &str,
        clean_start: bool,
        will: Option<Box<RegisteredWill>>,
        protocol: Protocol,
        bytes: &[u8],
        acl: Option<Box<ClientAcl>>,
    ) {
        let Some(gateway) = self.gateway() else { return };
        let regs = &mut self.sessions.registrations;
        regs.next_token += 1;
        let token = regs.next_token;
        let client: Arc<str> = Arc::from(client_id);
        regs.held.insert(conn, Held { token, client: client.clone(), bytes: bytes.to_vec(), protocol, acl });
        regs.by_token.insert(token, conn);
        self.out.io.push_back(IoCmd::PauseRead(conn));
        self.counters.registrations += 1;
        self.send_mesh(gateway, Mesh::Register { token, client, clean_start, will, ahead: false });
    }

    /// Registers a CONNECT answered without waiting ([`super::Config::register_ahead`]); returns what
    /// the session's registration is until the gateway says which epoch it got.
    pub(super) fn register_ahead(&mut self, client: Arc<str>) -> ZoneRegistration {
        let regs = &mut self.sessions.registrations;
        regs.next_token += 1;
        let token = regs.next_token;
        if let Some(gateway) = self.gateway() {
            self.counters.registrations += 1;
            self.send_mesh(
                gateway,
                Mesh::Register { token, client, clean_start: true, will: None, ahead: true },
            );
        }
        ZoneRegistration::ahead(token)
    }

    /// The gateway says which epoch the connection registered ahead with `token` got: its session's
    /// registration from now on, if the connection is still the session's.
    pub(super) fn registered_ahead(&mut self, client: &str, token: u64, registration: ZoneRegistration) {
        let Some(key) = self.sessions.by_client.get(client, &self.sessions.map) else { return };
        let current = &mut self.sessions.registrations.current;
        if let Some(r) = current.get_mut(&key).filter(|r| r.ahead_token() == Some(token)) {
            debug_assert!(registration.epoch >= 1);
            *r = registration;
        }
    }

    /// Whether the registry's end of `client`'s session `of` is for the session this shard has: not for
    /// a newer one (a connection answered ahead, whose registration the gateway had not seen yet, or one
    /// with a later epoch). A session whose registration is not known is ended.
    pub(super) fn ends_current(&self, key: super::SessionKey, of: SessionOf) -> bool {
        let Some(current) = self.sessions.registrations.current.get(&key) else { return true };
        match (of, current.ahead_token()) {
            (SessionOf::Epoch(e), None) => current.epoch <= e,
            // The epoch named is not this connection's: the gateway tells a connection registered
            // ahead its epoch before anything about it.
            (SessionOf::Epoch(_), Some(_)) => false,
            (SessionOf::Ahead(token), t) => t == Some(token),
        }
    }

    /// The gateway answered the registration `token`.
    pub(super) fn registered(&mut self, token: u64, outcome: RegisterOutcome, now: Instant) {
        let Some(conn) = self.sessions.registrations.by_token.get(&token).copied() else {
            // Its connection is gone. A session moved here for it is installed all the same: it
            // was ended where it was, and its client will look for it here.
            if let RegisterOutcome::Granted { session: Some(t), .. } = outcome {
                self.install_moved(&t, now);
            }
            return;
        };
        let held = self.sessions.registrations.take_held(conn).expect("found above");
        match outcome {
            RegisterOutcome::Refused => {
                self.counters.registrations_refused += 1;
                self.out.io.push_back(IoCmd::ResumeRead(conn));
                // 3.1.1: return code 3, Server unavailable.
                self.refuse(conn, held.protocol, ReasonCode::SERVER_UNAVAILABLE, now);
            }
            RegisterOutcome::Granted { session, registration } => {
                debug_assert!(registration.epoch >= 1);
                if let Some(t) = session {
                    self.install_moved(&t, now);
                }
                self.run_registered(conn, held, Some(registration), now);
            }
        }
    }

    /// The sessions of this shard without a connection, with their registrations (see
    /// [`Mesh::SessionsHeld`]). A session whose registration is not known (stored before the node was
    /// clustered, or after a CONNECT that went on without the registry) goes as
    /// [`ZoneRegistration::UNKNOWN`].
    pub(super) fn held_registrations(&self) -> Vec<HeldRegistration> {
        let current = &self.sessions.registrations.current;
        let mut held: Vec<HeldRegistration> = self
            .sessions
            .map
            .iter()
            .filter(|(_, s)| s.conn.is_none())
            .map(|(key, s)| HeldRegistration {
                client: s.client_id.clone(),
                registration: current.get(key).copied().unwrap_or(ZoneRegistration::UNKNOWN),
            })
            .collect();
        held.sort_by(|a, b| a.client.cmp(&b.client));
        held
    }

    /// Every endpoint of this node routes the subscriptions of `client`'s session, moved here, to it: the
    /// gateway tells the node it came from.
    pub(super) fn moved_session_routed(&mut self, client: Arc<str>) {
        if let Some(gateway) = self.gateway() {
            self.send_mesh(gateway, Mesh::Settled { client });
        }
    }

    /// The node `client`'s session moved to routes it itself now: its forwarding stubs here end.
    pub(super) fn end_forwarding(&mut self, client: &str, now: Instant) {
        let map = &self.sessions.map;
        let stubs: Vec<super::SessionKey> = self
            .sessions
            .registrations
            .stubs
            .keys()
            .filter(|k| map.get(k).is_some_and(|s| &*s.client_id == client))
            .copied()
            .collect();
        for key in stubs {
            self.end_session(key, now);
        }
    }

    /// Hands a losing session's messages to this shard's session of its client id (see
    /// [`Mesh::MergeSession`]); what cannot be handed over is counted and logged.
    pub(super) fn merge_lost_session(&mut self, t: &SessionTransfer, now: Instant) {
        let Some(clock) = self.wall_clock() else {
            self.counters.sessions_merge_failed += 1;
            tracing::error!(client = %t.client_id, "the messages of a losing session arrived but the shard has no wall clock; dropped");
            return;
        };
        match self.merge_session(t, &clock, now) {
            Ok(n) => {
                tracing::info!(client = %t.client_id, messages = n, "the messages of a session that lost a conflict were handed to the winning one")
            }
            Err(e) => {
                self.counters.sessions_merge_failed += 1;
                tracing::warn!(client = %t.client_id, error = %e, "the messages of a session that lost a conflict could not be handed over; dropped");
            }
        }
    }

    /// The will of a client whose node was lost, published by this node as one of its id's owners.
    pub(super) fn publish_lost_will(&mut self, w: &RegisteredWill, now: Instant) {
        let qos = match w.qos {
            0 => shardmq_wire::QoS::AtMostOnce,
            1 => shardmq_wire::QoS::AtLeastOnce,
            _ => shardmq_wire::QoS::ExactlyOnce,
        };
        let msg = super::Msg {
            topic: w.topic.as_ref().into(),
            payload: w.payload.as_ref().into(),
            qos,
            retain: w.retain,
            expires_at: None,
            props: None,
            origin: None,
        };
        self.counters.lost_wills_published += 1;
        let _targets = self.route(Arc::new(msg), now);
    }

    /// The CONNECT timeout passed while the registration was held: go on without it.
    pub(super) fn registration_timed_out(&mut self, conn: ConnId, now: Instant) {
        let Some(held) = self.sessions.registrations.take_held(conn) else { return };
        self.counters.registrations_timed_out += 1;
        tracing::warn!(conn = conn.0, "no answer from the cluster registry in time; the session stays local");
        self.run_registered(conn, held, None, now);
    }

    fn run_registered(
        &mut self,
        conn: ConnId,
        held: Held,
        registration: Option<ZoneRegistration>,
        now: Instant,
    ) {
        self.sessions.registrations.approved.insert(conn, Approval { acl: held.acl, registration });
        self.out.io.push_back(IoCmd::ResumeRead(conn));
        self.read(conn, &held.bytes, now);
        // Whatever happened, the approval was for that CONNECT only.
        self.sessions.registrations.approved.remove(&conn);
    }

    /// Installs a session moved here. A session this shard still has for the id is older than the
    /// registry's (it would have been moved otherwise): the moved one replaces it.
    fn install_moved(&mut self, t: &SessionTransfer, now: Instant) {
        let Some(clock) = self.wall_clock() else {
            tracing::error!(client = %t.client_id, "a moved session arrived but the shard has no wall clock; dropped");
            self.counters.sessions_import_failed += 1;
            return;
        };
        // A stub left by an earlier move of the session away from here is replaced too.
        self.end_forwarding(&t.client_id, now);
        if let Some(old) = self.sessions.by_client.get(&t.client_id, &self.sessions.map) {
            if let Some(s) = self.sessions.map.get_mut(&old) {
                s.will = None;
            }
            self.end_session(old, now);
        }
        if let Err(e) = self.import_session(t, &clock, now) {
            tracing::error!(client = %t.client_id, error = %e, "a moved session could not be installed");
            self.counters.sessions_import_failed += 1;
        }
    }
}
