//! Heap bytes the shard core holds per idle connected client, measured with a counting allocator.
//! Guards the per-connection budget (the runtime's per-socket state is measured separately).
//!
//! Two shards, as in a node: every client connects to its owner shard, except in the handoff case, where
//! it lands on the other one first and is moved (the accepting shard must keep nothing of it). The count is
//! per thread, so the tests run in parallel without seeing each other's allocations.

use std::sync::Arc;
use std::time::Instant;

use shardmq_shard::core::{owner_of, Config, NodeShared, Shard};
use shardmq_shard::io::{Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};
use shardmq_wire::{encode, Connect, Packet, PacketId, Properties, Protocol, QoS, SubOptions, Subscribe};

#[path = "common/counting.rs"]
mod counting;
use counting::{by_size, live, Counting, CLASSES};

#[global_allocator]
static A: Counting = Counting;

const SHARDS: u16 = 2;

struct Node {
    shards: Vec<Shard>,
    now: Instant,
}

impl Node {
    fn new() -> Node {
        let cfg = Arc::new(Config::default());
        let node = Arc::new(NodeShared::new(SHARDS));
        let shards = (0..SHARDS).map(|i| Shard::new(ShardId(i), SHARDS, cfg.clone(), node.clone())).collect();
        Node { shards, now: Instant::now() }
    }

    /// Runs every shard's I/O commands and mesh messages until all are quiet. Handoffs are adopted by
    /// the target under `ConnId(conn | 1 << 40)` (a runtime would give a fresh id of its own).
    fn settle(&mut self) {
        loop {
            let mut busy = false;
            for s in 0..self.shards.len() {
                while let Some(cmd) = self.shards[s].poll_io() {
                    busy = true;
                    match cmd {
                        IoCmd::Transmit(c) => {
                            let out = self.shards[s].take_transmit(c);
                            self.shards[s].recycle(out);
                        }
                        IoCmd::Handoff { conn, to, state } => {
                            let now = self.now;
                            self.shards[to.0 as usize].handle_adopt(ConnId(conn.0 | 1 << 40), state, now);
                        }
                        IoCmd::Close(c) => panic!("shard {s} closed {c:?}"),
                        IoCmd::PauseRead(_) | IoCmd::ResumeRead(_) => {}
                    }
                }
                while let Some((to, m)) = self.shards[s].poll_mesh() {
                    busy = true;
                    let now = self.now;
                    self.shards[to.0 as usize].handle_mesh(ShardId(s as u16), m, now);
                }
            }
            if !busy {
                return;
            }
        }
    }
}

/// Connects `n` idle clients (keep alive 60 s, clean session, ids as a device fleet would have them),
/// optionally each with one subscription of its own (`idle/<i>/+`, QoS 1), and returns the core's heap
/// bytes per client.
fn per_client(n: u64, subscribe: bool, handoff: bool) -> f64 {
    let mut node = Node::new();
    let mut pkt = Vec::new();
    let before = live();
    let classes_before = by_size();
    for i in 0..n {
        let id = format!("client-{i:08}");
        let owner = owner_of(&id, SHARDS);
        let shard = if handoff { (owner.0 + 1) % SHARDS } else { owner.0 } as usize;
        let connect = Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive_s: 60,
            client_id: &id,
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        };
        pkt.clear();
        encode(&Packet::Connect(connect), Protocol::V311, &mut pkt).unwrap();
        let conn = ConnId(i);
        node.shards[shard].handle_accept(conn, node.now);
        node.shards[shard].handle_read(conn, &pkt, node.now);
        node.settle();
        if subscribe {
            let filter = format!("idle/{i}/+");
            let opts = SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            };
            let sub = Subscribe {
                packet_id: PacketId(1),
                filters: vec![(&filter, opts)],
                properties: Properties::default(),
            };
            pkt.clear();
            encode(&Packet::Subscribe(sub), Protocol::V311, &mut pkt).unwrap();
            let conn = if handoff { ConnId(i | 1 << 40) } else { conn };
            node.shards[owner.0 as usize].handle_read(conn, &pkt, node.now);
            node.settle();
        }
    }
    drop(pkt);
    let per_conn = (live() - before) as f64 / n as f64;
    let classes = by_size();
    let mut lines: Vec<String> = (0..CLASSES)
        .filter(|&c| classes[c] - classes_before[c] != 0)
        .map(|c| format!("{}..{} B: {:+}", c * 16, (c + 1) * 16, classes[c] - classes_before[c]))
        .collect();
    lines.truncate(16);
    println!(
        "core heap per idle client (subscribe: {subscribe}, handoff: {handoff}): {per_conn:.0} B; live allocations by size: {}",
        lines.join(", ")
    );
    let total: usize = node.shards.iter().map(|s| s.connection_count()).sum();
    assert_eq!(total, n as usize);
    let owners = (0..SHARDS).map(|s| node.shards[s as usize].session_count()).sum::<usize>();
    assert_eq!(owners, n as usize, "one session per client, on its owner shard");
    per_conn
}

#[test]
fn idle_connection_costs_the_core_few_bytes() {
    let per_conn = per_client(15_000, false, false);
    // 412 B measured: client id 31, Conn 88, Session 128, the rest the connection, session and
    // client id tables and the keep-alive timer heap.
    assert!(per_conn < 430.0, "core holds {per_conn:.0} B per idle connection");
}

#[test]
fn idle_connection_with_a_subscription_costs_the_core_few_bytes() {
    let per_conn = per_client(15_000, true, false);
    // 1248 B measured: 412 B of the client itself, then per filter its session entry, a subscription
    // entry on the owner shard and an interest entry on each of the two shards (trie nodes, values, the
    // shared filter string, and their share of the large `idle/` level's tables).
    assert!(per_conn < 1300.0, "core holds {per_conn:.0} B per idle subscribed connection");
}

#[test]
fn a_handed_off_connection_leaves_nothing_on_the_accepting_shard() {
    // Same clients as the direct case, each accepted by the shard that does not own it: the accepting
    // shard must keep nothing per client (its connection entry and handshake timer go with the handoff).
    let direct = per_client(15_000, false, false);
    let handed = per_client(15_000, false, true);
    assert!(handed < direct + 16.0, "handoff leaves {:.0} B per client behind", handed - direct);
}
