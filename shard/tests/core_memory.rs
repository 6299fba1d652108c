//! Heap bytes the shard core holds per idle connected client, measured with a counting allocator.
//! Guards the per-connection budget (the runtime's per-socket state is measured separately).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use shardmq_shard::core::{Config, NodeShared, Shard};
use shardmq_shard::runtime::{Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};
use shardmq_wire::{encode, Connect, Packet, Properties, Protocol};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn idle_connection_costs_the_core_few_bytes() {
    let now = Instant::now();
    let mut shard = Shard::new(ShardId(0), 1, Arc::new(Config::default()), Arc::new(NodeShared::new(1)));
    let n = 15_000u64;
    let mut pkt = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        let id = format!("client-{i:08}");
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
        shard.handle_accept(conn, now);
        shard.handle_read(conn, &pkt, now);
        while let Some(cmd) = shard.poll_io() {
            if let IoCmd::Transmit(c) = cmd {
                drop(shard.take_transmit(c));
            }
        }
    }
    drop(pkt);
    let per_conn = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    println!("core heap per idle connection: {per_conn:.0} B");
    assert_eq!(shard.connection_count(), n as usize);
    assert!(per_conn < 520.0, "core holds {per_conn:.0} B per idle connection");
}
