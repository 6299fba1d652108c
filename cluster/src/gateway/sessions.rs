//! The gateway's side of cluster sessions: it drives the node's [`Registrar`] for the shards.
//!
//! A shard holding a CONNECT asks for a registration ([`Mesh::Register`]); the registrar's grant or
//! refusal goes back to it ([`Mesh::Registered`]). When another node's connection supersedes a session of
//! this node, the registrar says so ([`RegistrarEvent::EndSession`]) and the session's shard ends it
//! ([`Mesh::EndSession`]: DISCONNECT 0x8E to a connected client). Shards report sessions whose connection
//! went or that ended ([`Mesh::Unregister`]), which the registrar passes to the owners.
//!
//! What it does not do yet: move the session's state to the successor (the successor starts a new
//! session: session present 0), carry wills in registrations (so wills on node loss are not published by
//! the owners), or re-register sessions restored from the log.

use std::collections::HashMap;
use std::time::Instant;

use shardmq_shard::core::{owner_of, Mesh, RegisterOutcome};
use shardmq_shard::ShardId;

use crate::link::registry as reg;
use crate::registrar::{Registrar, RegistrarConfig, RegistrarEvent, RequestId};
use crate::NodeName;

/// What the gateway keeps for the registrar.
pub(super) struct Sessions {
    pub(super) registrar: Registrar,
    /// Registrations a shard waits for: its CONNECT's token.
    waiting: HashMap<RequestId, (ShardId, u64)>,
    shards: u16,
}

/// What the gateway must do after the registrar ran: frames for peers, messages for shards.
#[derive(Default)]
pub(super) struct Output {
    pub frames: Vec<(NodeName, Vec<u8>)>,
    pub mesh: Vec<(ShardId, Mesh)>,
}

impl Sessions {
    pub(super) fn new(me: NodeName, cfg: RegistrarConfig, shards: u16, now: Instant) -> Sessions {
        Sessions { registrar: Registrar::new(me, cfg, now), waiting: HashMap::new(), shards }
    }

    pub(super) fn register(
        &mut self,
        from: ShardId,
        token: u64,
        client: &str,
        clean_start: bool,
        now: Instant,
    ) {
        let request = self.registrar.handle_connect(client, clean_start, None, now);
        self.waiting.insert(request, (from, token));
    }

    /// The connection of `epoch` went (`kept`: the session stays here, offline) or the session ended.
    /// The registrar ignores an epoch it no longer holds (a connection since superseded).
    pub(super) fn unregister(&mut self, client: &str, epoch: u64, kept: bool, now: Instant) {
        self.registrar.handle_disconnect(client, epoch, kept, now);
    }

    /// A registry message from a peer; `false` when it did not decode.
    pub(super) fn receive(&mut self, from: &NodeName, body: &[u8], now: Instant) -> bool {
        match reg::decode(body) {
            Ok(m) => {
                self.registrar.handle_message(from, m, now);
                true
            }
            Err(_) => false,
        }
    }

    /// What the registrar has to send and say, turned into frames and shard messages.
    pub(super) fn drain(&mut self, out: &mut Output) {
        while let Some((to, m)) = self.registrar.poll_transmit() {
            out.frames.push((to, reg::frame(&m)));
        }
        while let Some(ev) = self.registrar.poll_event() {
            match ev {
                RegistrarEvent::Granted { request, client, provisional, epoch, .. } => {
                    if provisional {
                        tracing::debug!(%client, "registration granted here provisionally (owner unreachable)");
                    }
                    if let Some((shard, token)) = self.waiting.remove(&request) {
                        let outcome = RegisterOutcome::Granted { session: None, epoch };
                        out.mesh.push((shard, Mesh::Registered { token, outcome }));
                    }
                }
                RegistrarEvent::Refused { request, client } => {
                    tracing::info!(%client, "CONNECT refused: the owner of its client id is unreachable");
                    if let Some((shard, token)) = self.waiting.remove(&request) {
                        out.mesh.push((shard, Mesh::Registered { token, outcome: RegisterOutcome::Refused }));
                    }
                }
                RegistrarEvent::EndSession { client, successor, discard, .. } => {
                    // Not moved yet (see the module docs): ended here either way.
                    tracing::debug!(%client, %successor, discard, "session taken over by another node");
                    let shard = owner_of(&client, self.shards);
                    out.mesh.push((shard, Mesh::EndSession { client }));
                }
                RegistrarEvent::PublishWill { client, .. } => {
                    // Registrations carry no will yet (`register` passes none), so none is due.
                    tracing::warn!(%client, "a will to publish for a lost node; wills are not registered yet");
                }
            }
        }
    }
}
