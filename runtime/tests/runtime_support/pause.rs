//! [`PauseCore`]: a byte-sink core for the read-pausing tests (`IoCmd::PauseRead` / `ResumeRead`).
//!
//! Every connection is expected to carry [`pattern`](super::pattern) bytes from offset 0; the core checks
//! each byte it is given. It pauses reads as [`PauseMode`] says and takes requests from the test through
//! [`PauseCtl`], polled from `handle_timeout` every millisecond. Everything it observes is counted there.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardmq_runtime::{Core, IoCmd};
use shardmq_shard::{ConnId, ShardId};

#[derive(Clone, Copy, Debug)]
pub enum PauseMode {
    /// Pause each connection once, after its first `after` bytes; resume on request.
    Once { after: usize },
    /// Pause and resume all the time: after every read one of pause+resume at once, pause (twice), pause
    /// (once), nothing; paused connections are resumed by the next `handle_timeout`, which is due at once.
    Churn,
    /// `Once` until the first resume request, `Churn` from then on.
    OnceThenChurn { after: usize },
}

/// Shared between the test and the cores of a node.
#[derive(Default)]
pub struct PauseCtl {
    /// Bytes handed to `handle_read`, all connections.
    pub received: AtomicU64,
    /// Bytes that differ from the pattern at their offset.
    pub mismatches: AtomicU64,
    /// `handle_read` calls for a connection the core had paused: must stay 0.
    pub reads_while_paused: AtomicU64,
    /// `handle_read` calls for a connection the core had closed: must stay 0.
    pub reads_after_close: AtomicU64,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    /// Connections paused right now.
    pub paused_now: AtomicU64,
    pub closed: AtomicU64,
    /// `handle_closed` for a connection the core does not know (closed by it, or reported twice).
    pub bad_closed: AtomicU64,
    /// Bump to have every paused connection resumed.
    pub resume_req: AtomicU64,
    /// Bump to have every connection that is not paused paused.
    pub pause_req: AtomicU64,
    /// Bump to have every paused connection sent `bye\n` and closed by the core.
    pub close_req: AtomicU64,
    /// Bytes each connection had received when `handle_closed` came.
    pub totals_at_close: Mutex<Vec<usize>>,
}

impl PauseCtl {
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::SeqCst)
    }

    pub fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct PConn {
    received: usize,
    paused: bool,
    paused_once: bool,
    reads: u64,
}

pub struct PauseCore {
    ctl: Arc<PauseCtl>,
    mode: PauseMode,
    conns: HashMap<ConnId, PConn>,
    closed_by_us: Vec<ConnId>,
    out: HashMap<ConnId, Vec<u8>>,
    io: VecDeque<IoCmd<()>>,
    seen_resume: u64,
    seen_pause: u64,
    seen_close: u64,
    next_tick: Instant,
}

impl PauseCore {
    pub fn new(ctl: Arc<PauseCtl>, mode: PauseMode) -> Self {
        PauseCore {
            ctl,
            mode,
            conns: HashMap::new(),
            closed_by_us: Vec::new(),
            out: HashMap::new(),
            io: VecDeque::new(),
            seen_resume: 0,
            seen_pause: 0,
            seen_close: 0,
            next_tick: Instant::now(),
        }
    }

    fn pause(&mut self, conn: ConnId) {
        let c = self.conns.get_mut(&conn).expect("known");
        if !c.paused {
            c.paused = true;
            PauseCtl::bump(&self.ctl.pauses);
            PauseCtl::bump(&self.ctl.paused_now);
        }
        self.io.push_back(IoCmd::PauseRead(conn));
    }

    fn resume(&mut self, conn: ConnId) {
        let c = self.conns.get_mut(&conn).expect("known");
        if c.paused {
            c.paused = false;
            PauseCtl::bump(&self.ctl.resumes);
            self.ctl.paused_now.fetch_sub(1, Ordering::SeqCst);
        }
        self.io.push_back(IoCmd::ResumeRead(conn));
    }

    fn paused(&self) -> Vec<ConnId> {
        self.conns.iter().filter(|(_, c)| c.paused).map(|(&id, _)| id).collect()
    }
}

impl Core for PauseCore {
    type Mesh = ();
    type Handoff = ();

    fn handle_accept(&mut self, conn: ConnId, _now: Instant) {
        self.conns.insert(conn, PConn::default());
        // Commands for connections the runtime does not know are ignored.
        self.io.push_back(IoCmd::ResumeRead(ConnId(u64::MAX - 7)));
        self.io.push_back(IoCmd::PauseRead(ConnId(u64::MAX - 7)));
        // Resuming a connection that was never paused is a no-op.
        self.io.push_back(IoCmd::ResumeRead(conn));
    }

    fn handle_adopt(&mut self, conn: ConnId, _state: (), _now: Instant) {
        self.conns.insert(conn, PConn::default());
    }

    fn handle_read(&mut self, conn: ConnId, data: &[u8], now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            if self.closed_by_us.contains(&conn) {
                PauseCtl::bump(&self.ctl.reads_after_close);
            }
            return;
        };
        if c.paused {
            PauseCtl::bump(&self.ctl.reads_while_paused);
        }
        if let Some(i) = data.iter().enumerate().position(|(i, &b)| b != ((c.received + i) % 251) as u8) {
            eprintln!("mismatch at offset {}", c.received + i);
            PauseCtl::bump(&self.ctl.mismatches);
        }
        c.received += data.len();
        c.reads += 1;
        self.ctl.received.fetch_add(data.len() as u64, Ordering::SeqCst);
        let (received, reads, paused_once) = (c.received, c.reads, c.paused_once);
        let mode = match self.mode {
            PauseMode::OnceThenChurn { .. } if self.seen_resume > 0 => PauseMode::Churn,
            PauseMode::OnceThenChurn { after } => PauseMode::Once { after },
            m => m,
        };
        match mode {
            PauseMode::Once { after } if !paused_once && received >= after => {
                self.conns.get_mut(&conn).expect("known").paused_once = true;
                self.pause(conn);
            }
            PauseMode::Once { .. } => {}
            PauseMode::Churn | PauseMode::OnceThenChurn { .. } => {
                match reads % 4 {
                    0 => {
                        self.pause(conn);
                        self.resume(conn);
                    }
                    1 => {
                        self.pause(conn);
                        self.pause(conn);
                    }
                    2 => self.pause(conn),
                    _ => {}
                }
                self.next_tick = now;
            }
        }
    }

    fn handle_closed(&mut self, conn: ConnId, _now: Instant) {
        match self.conns.remove(&conn) {
            Some(c) => {
                if c.paused {
                    self.ctl.paused_now.fetch_sub(1, Ordering::SeqCst);
                }
                self.ctl.totals_at_close.lock().unwrap().push(c.received);
            }
            None => PauseCtl::bump(&self.ctl.bad_closed),
        }
        PauseCtl::bump(&self.ctl.closed);
    }

    fn handle_backpressure(&mut self, _conn: ConnId, _blocked: bool, _now: Instant) {}

    fn handle_mesh(&mut self, _from: ShardId, _msg: (), _now: Instant) {}

    fn handle_timeout(&mut self, now: Instant) {
        let resume = PauseCtl::get(&self.ctl.resume_req);
        let churn = match self.mode {
            PauseMode::Churn => true,
            PauseMode::OnceThenChurn { .. } => self.seen_resume > 0,
            PauseMode::Once { .. } => false,
        };
        if churn || resume != self.seen_resume {
            self.seen_resume = resume;
            for conn in self.paused() {
                self.resume(conn);
                self.resume(conn);
            }
        }
        let pause = PauseCtl::get(&self.ctl.pause_req);
        if pause != self.seen_pause {
            self.seen_pause = pause;
            let running: Vec<ConnId> =
                self.conns.iter().filter(|(_, c)| !c.paused).map(|(&id, _)| id).collect();
            for conn in running {
                self.pause(conn);
            }
        }
        let close = PauseCtl::get(&self.ctl.close_req);
        if close != self.seen_close {
            self.seen_close = close;
            for conn in self.paused() {
                self.conns.remove(&conn);
                self.ctl.paused_now.fetch_sub(1, Ordering::SeqCst);
                self.closed_by_us.push(conn);
                self.out.insert(conn, b"bye\n".to_vec());
                self.io.push_back(IoCmd::Close(conn));
                // Ignored: the connection is closing.
                self.io.push_back(IoCmd::ResumeRead(conn));
            }
        }
        self.next_tick = now + Duration::from_millis(1);
    }

    fn handle_shutdown(&mut self, _now: Instant) {
        for conn in self.conns.keys().copied().collect::<Vec<_>>() {
            self.io.push_back(IoCmd::Close(conn));
        }
        self.conns.clear();
    }

    fn take_transmit(&mut self, conn: ConnId) -> Vec<u8> {
        self.out.remove(&conn).unwrap_or_default()
    }

    fn poll_io(&mut self) -> Option<IoCmd<()>> {
        self.io.pop_front()
    }

    fn poll_mesh(&mut self) -> Option<(ShardId, ())> {
        None
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_tick)
    }
}
