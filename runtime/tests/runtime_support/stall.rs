//! [`StallCore`]: a core whose shard 1 can stop draining its inbox, for the mesh-backlog tests.
//!
//! Protocol (lines): `WHO` → `{shard}\n`; any other line on shard 0 becomes one numbered mesh message to
//! shard 1 (other shards ignore it). While [`StallCtl::stall`] is set, shard 1 blocks inside
//! `handle_mesh` (as a shard stuck on its disk would), so its inbox fills and shard 0 backlogs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmq_runtime::{Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};

#[derive(Default)]
pub struct StallCtl {
    pub stall: AtomicBool,
    /// Set while shard 1 is blocked in `handle_mesh`.
    pub stalled_now: AtomicBool,
    /// Messages shard 1 received.
    pub received: AtomicU64,
    /// Messages that did not arrive in order (or arrived twice): must stay 0.
    pub out_of_order: AtomicU64,
}

/// Clears the stall when dropped, so a failing test ends instead of waiting out shard 1's stall.
pub struct Unstall(pub Arc<StallCtl>);

impl Drop for Unstall {
    fn drop(&mut self) {
        self.0.stall.store(false, Ordering::SeqCst);
    }
}

pub struct StallCore {
    me: ShardId,
    ctl: Arc<StallCtl>,
    bufs: HashMap<ConnId, Vec<u8>>,
    out: HashMap<ConnId, Vec<u8>>,
    io: VecDeque<IoCmd<()>>,
    mesh: VecDeque<(ShardId, u64)>,
    next_seq: u64,
    expect: u64,
}

impl StallCore {
    pub fn new(me: ShardId, ctl: Arc<StallCtl>) -> Self {
        StallCore {
            me,
            ctl,
            bufs: HashMap::new(),
            out: HashMap::new(),
            io: VecDeque::new(),
            mesh: VecDeque::new(),
            next_seq: 0,
            expect: 0,
        }
    }
}

impl Core for StallCore {
    type Mesh = u64;
    type Handoff = ();

    fn handle_accept(&mut self, conn: ConnId, _now: Instant) {
        self.bufs.insert(conn, Vec::new());
    }

    fn handle_adopt(&mut self, _conn: ConnId, _state: (), _now: Instant) {}

    fn handle_read(&mut self, conn: ConnId, data: &[u8], _now: Instant) {
        let Some(buf) = self.bufs.get_mut(&conn) else { return };
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if line.starts_with(b"WHO") {
                let q = self.out.entry(conn).or_default();
                if q.is_empty() {
                    self.io.push_back(IoCmd::Transmit(conn));
                }
                q.extend_from_slice(format!("{}\n", self.me.0).as_bytes());
            } else if self.me.0 == 0 {
                self.mesh.push_back((ShardId(1), self.next_seq));
                self.next_seq += 1;
            }
        }
    }

    fn handle_closed(&mut self, conn: ConnId, _now: Instant) {
        self.bufs.remove(&conn);
        self.out.remove(&conn);
    }

    fn handle_backpressure(&mut self, _conn: ConnId, _blocked: bool, _now: Instant) {}

    fn handle_mesh(&mut self, _from: ShardId, seq: u64, _now: Instant) {
        // Bounded: the test clears the flag well within this, and a forgotten flag fails rather than hangs.
        let end = Instant::now() + Duration::from_secs(30);
        while self.ctl.stall.load(Ordering::SeqCst) && Instant::now() < end {
            self.ctl.stalled_now.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
        self.ctl.stalled_now.store(false, Ordering::SeqCst);
        if seq != self.expect {
            self.ctl.out_of_order.fetch_add(1, Ordering::SeqCst);
        }
        self.expect = seq + 1;
        self.ctl.received.fetch_add(1, Ordering::SeqCst);
    }

    fn handle_timeout(&mut self, _now: Instant) {}

    fn handle_shutdown(&mut self, _now: Instant) {
        for conn in self.bufs.keys() {
            self.io.push_back(IoCmd::Close(*conn));
        }
        self.bufs.clear();
    }

    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8> {
        self.out.remove(&conn).unwrap_or_default()
    }

    fn poll_io(&mut self) -> Option<IoCmd<()>> {
        self.io.pop_front()
    }

    fn poll_mesh(&mut self) -> Option<(ShardId, u64)> {
        self.mesh.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}
