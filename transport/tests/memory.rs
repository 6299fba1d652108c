//! Heap bytes the transport layer holds per idle connection (after its handshake and a little traffic),
//! measured with a counting allocator: what a TLS or WebSocket client costs on top of the shard's own
//! per-connection state (`shard/tests/core_memory.rs`). The bounds guard against regressions; the
//! printed figures are what docs/security.md reports.

use std::io::Write;
use std::time::Instant;

use shardmq_shard::io::Core;
use shardmq_shard::ConnId;
use shardmq_transport::ListenerKind;

mod support;
use support::*;

#[path = "../../shard/tests/common/counting.rs"]
mod counting;
use counting::{live, Counting};

#[global_allocator]
static A: Counting = Counting;

const N: usize = 200;

/// Bytes per connection the transport (not its inner core) holds once `N` connections are idle.
fn per_connection(kind: ListenerKind) -> isize {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    // Clients live outside the measurement: they are built before and kept alive after.
    let mut clients: Vec<_> = (0..N).map(|_| tls_client(None)).collect();
    let before = live();
    let inner_before = inner_bytes(&t);
    for (i, c) in clients.iter_mut().enumerate() {
        let conn = ConnId(i as u64 + 1);
        accept(&mut t, conn, kind);
        match kind {
            ListenerKind::Tls => {
                c.writer().write_all(b"connect").unwrap();
                assert_eq!(pump(&mut t, &mut w, conn, c), b"ack:connect");
            }
            ListenerKind::Ws => {
                t.handle_read(conn, upgrade_request(), Instant::now());
                t.handle_read(conn, &masked_binary(b"connect"), Instant::now());
                drain(&mut t, &mut w);
            }
            _ => unreachable!(),
        }
        w.written.clear();
    }
    // What the recording core keeps (every byte it read and wrote) is not the transport's.
    let inner = inner_bytes(&t) - inner_before;
    let total = live() - before - inner;
    drop(clients);
    total / N as isize
}

/// A rough count of the recorder's heap, to subtract it.
fn inner_bytes(t: &shardmq_transport::Transport<Recorder>) -> isize {
    let r = t.inner();
    let maps = |n: usize| (n * 64) as isize;
    r.reads.values().map(|v| v.capacity() as isize).sum::<isize>()
        + r.out.values().map(|v| v.capacity() as isize).sum::<isize>()
        + maps(r.reads.capacity() + r.out.capacity() + r.identity_first.capacity())
}

#[test]
fn an_idle_tls_connection_costs_bounded_memory() {
    let bytes = per_connection(ListenerKind::Tls);
    println!("transport heap per idle TLS connection: {bytes} bytes");
    assert!(bytes < 48 * 1024, "{bytes} bytes per idle TLS connection");
}

#[test]
fn an_idle_websocket_connection_costs_bounded_memory() {
    let bytes = per_connection(ListenerKind::Ws);
    println!("transport heap per idle WebSocket connection: {bytes} bytes");
    assert!(bytes < 12 * 1024, "{bytes} bytes per idle WebSocket connection");
}
