//! Starting and stopping a node: configuration, listeners, one thread per shard, the backend choice (with
//! the io_uring to epoll fallback), statistics, shutdown and join.
//!
//! Startup is a two-phase barrier so every shard runs the same backend and none accepts before all are
//! ready: (1) each shard thread pins itself and, if io_uring is wanted, sets it up completely and reports;
//! the starter picks the backend (epoll if any shard failed under `Auto`); (2) shards that must switch
//! build epoll and report again; then all are told to go. Listeners are bound by the starter before any
//! thread runs, so `local_addrs` is exact and no connection is lost in between (it waits in the backlog).
//!
//! Besides its shards a node may have mesh endpoints ([`start_with_endpoints`]): mesh members with ids after
//! the shards' that are driven by a thread of the owner's, not by the node (the cluster gateway, which has
//! its own sockets and event loop but talks to the shards through the mesh). The node sizes the mesh for
//! them and wakes them at shutdown; it neither runs nor joins them.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use super::driver::{self, Ctx};
use super::endpoint::MeshEndpoint;
use super::epoll::EpollLoop;
use super::gate::Gate;
use super::mesh::{Inbound, Inbox, Outbox, Wake, Waker};
use super::uring::{UringLoop, UringParams};
use super::{sys, Core};
use shardmq_shard::ShardId;

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring if it can be set up completely on every shard, epoll otherwise. The environment variable
    /// `SHARDMQ_RUNTIME=epoll|io_uring` overrides this choice (and only this one).
    #[default]
    Auto,
    /// io_uring or fail to start.
    Uring,
    /// epoll.
    Epoll,
}

/// The backend a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    /// Bytes of runtime state per connection slot, excluding output waiting for the socket (which only
    /// exists while a peer is slow) and kernel-side socket buffers.
    pub fn conn_state_bytes(self) -> usize {
        match self {
            Backend::Uring => UringLoop::<()>::conn_state_bytes(),
            Backend::Epoll => EpollLoop::conn_state_bytes(),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        })
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Addresses to listen on; every shard gets its own `SO_REUSEPORT` listener for each.
    pub listen: Vec<SocketAddr>,
    pub shards: usize,
    /// Pin shard `i` to the `i`-th CPU the process may use (skipped when there are fewer CPUs than shards).
    pub pin_threads: bool,
    pub backend: BackendChoice,
    /// Capacity, in batches, of each shard's inbound cross-core channel.
    pub mesh_capacity: usize,
    /// Node-wide hard cap on open client sockets: beyond it an accepted socket is closed at once and counted
    /// (`refused_over_cap`).
    pub max_sockets: usize,
    /// `listen(2)` backlog of each shard's listener. The kernel caps it at `net.core.somaxconn`, so the
    /// default asks for a lot and lets the host's tuning decide (see `tuning/`).
    pub listen_backlog: i32,
    /// How long a core-requested close may spend flushing before the socket is closed anyway.
    pub close_linger: Duration,
    /// How long shutdown may spend flushing before every socket is closed anyway.
    pub shutdown_grace: Duration,
    /// epoll: size of the one read buffer each shard shares between its connections.
    pub read_buffer_size: usize,
    /// io_uring: provided receive buffers per shard (a power of two, at most 32768).
    pub uring_buffers: u16,
    /// io_uring: size of each provided receive buffer.
    pub uring_buffer_size: u32,
    /// io_uring: submission queue entries per shard.
    pub uring_entries: u32,
    /// How long a shard keeps polling for more work, without sleeping, after its last event (zero: it
    /// sleeps at once). See [`Ctx::idle_poll`].
    pub idle_poll: Duration,
    /// Cross-shard messages of a shard that their targets have not handled yet (in its backlog for full
    /// inboxes, or in the inboxes) at which it stops reading its sockets, resuming at half: bounds what a
    /// stalled shard makes its peers hold. 0: unbounded.
    pub mesh_backlog_limit: usize,
    /// Extra mesh members that are not shards, with ids `shards..shards + endpoints` (see
    /// [`start_with_endpoints`]; [`start`] requires 0).
    pub endpoints: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Leave headroom under the fd limit for listeners, rings, eventfds and whatever else the process opens.
        let max_sockets =
            sys::nofile_limit().map_or(1 << 20, |n| n.saturating_sub(64 + 8 * shards as u64)) as usize;
        RuntimeConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 1883))],
            shards,
            pin_threads: true,
            backend: BackendChoice::Auto,
            mesh_capacity: 1024,
            max_sockets: max_sockets.max(16),
            listen_backlog: 65_535,
            close_linger: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(2),
            read_buffer_size: 64 * 1024,
            uring_buffers: 512,
            uring_buffer_size: 16 * 1024,
            uring_entries: 1024,
            idle_poll: Duration::ZERO,
            // A few times what a 1024-batch inbox takes in one busy iteration; messages share their
            // payloads, so this is megabytes, not gigabytes, per stalled peer.
            mesh_backlog_limit: 64 * 1024,
            endpoints: 0,
        }
    }
}

/// Per-shard counters, updated by the shard with relaxed atomics and read by [`Node::stats`].
#[derive(Default)]
pub(crate) struct ShardCounters {
    pub(crate) accepted: AtomicU64,
    pub(crate) refused_over_cap: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) mesh_sent: AtomicU64,
    pub(crate) mesh_full_retries: AtomicU64,
    pub(crate) handoffs: AtomicU64,
    /// Handoffs the core addressed to a mesh endpoint (a bug): the socket was closed instead.
    pub(crate) misaddressed_handoffs: AtomicU64,
    /// Sockets this shard holds; moves with handoffs (source decrements, target increments).
    pub(crate) open_sockets: AtomicU64,
    /// The most bytes the runtime ever held for one paused connection (io_uring's stash).
    pub(crate) stash_bytes_max: AtomicU64,
    /// The most mesh messages produced and not yet handled by their targets, seen after a flush.
    pub(crate) mesh_backlog_max: AtomicU64,
    /// Times the read gate closed, and reads it held (see `gate.rs`); whether it is closed now.
    pub(crate) read_gate_closings: AtomicU64,
    pub(crate) read_gate_held: AtomicU64,
    pub(crate) read_gate_closed: AtomicBool,
}

/// A snapshot of one shard's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub shard: ShardId,
    /// Sockets accepted under the cap.
    pub accepted: u64,
    /// Sockets accepted and closed at once because the node was at `max_sockets`.
    pub refused_over_cap: u64,
    /// Sockets this shard closed (peer gone, core close, shutdown).
    pub closed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Mesh messages (not batches) accepted by target inboxes.
    pub mesh_sent: u64,
    /// Times a batch or handoff found the target inbox full and was kept for a retry.
    pub mesh_full_retries: u64,
    /// Sockets handed to another shard.
    pub handoffs: u64,
    /// Handoffs the core addressed to a mesh endpoint, which cannot take sockets (a bug of the core): the
    /// socket was closed instead.
    pub misaddressed_handoffs: u64,
    pub open_sockets: u64,
    /// The most input bytes the runtime held at once for one paused connection (read before the pause
    /// took effect, delivered after `ResumeRead`). Always 0 on epoll. For tests and diagnostics.
    #[doc(hidden)]
    pub stash_bytes_max: u64,
    /// The most cross-shard messages of this shard not yet handled by their targets at once (in its
    /// backlog for full inboxes, or in the inboxes), seen after a flush.
    pub mesh_backlog_max: u64,
    /// Times the shard stopped reading its sockets because that count reached
    /// `RuntimeConfig::mesh_backlog_limit`, and reads it held back when it did.
    pub read_gate_closings: u64,
    pub read_gate_held: u64,
    /// Whether the shard is not reading its sockets right now (backlog over the limit).
    pub read_gate_closed: bool,
}

impl ShardCounters {
    fn snapshot(&self, shard: ShardId) -> ShardStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ShardStats {
            shard,
            accepted: get(&self.accepted),
            refused_over_cap: get(&self.refused_over_cap),
            closed: get(&self.closed),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            mesh_sent: get(&self.mesh_sent),
            mesh_full_retries: get(&self.mesh_full_retries),
            handoffs: get(&self.handoffs),
            misaddressed_handoffs: get(&self.misaddressed_handoffs),
            open_sockets: get(&self.open_sockets),
            stash_bytes_max: get(&self.stash_bytes_max),
            mesh_backlog_max: get(&self.mesh_backlog_max),
            read_gate_closings: get(&self.read_gate_closings),
            read_gate_held: get(&self.read_gate_held),
            read_gate_closed: self.read_gate_closed.load(Ordering::Relaxed),
        }
    }
}

/// A shard that ended on its own: it panicked, its loop failed, or its loop returned although no shutdown
/// was asked for. The rest of the node is told to shut down when it happens, since its peers would
/// otherwise wait forever for its mesh answers and its clients could no longer be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardFailure {
    pub shard: ShardId,
    /// What happened, for a log line: the panic message or the loop's error.
    pub cause: String,
}

impl fmt::Display for ShardFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {} failed: {}", self.shard.index(), self.cause)
    }
}

/// A running node: its shard threads and what they share.
pub struct Node {
    addrs: Vec<SocketAddr>,
    backend: Backend,
    shutdown: Arc<AtomicBool>,
    /// The first shard failure; later ones are consequences or coincidences and are not kept.
    failure: Arc<OnceLock<ShardFailure>>,
    wakes: Arc<[Wake]>,
    counters: Vec<Arc<ShardCounters>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Node {
    /// The bound listen addresses (port 0 resolved), in `RuntimeConfig::listen` order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Asks every shard to call `handle_shutdown`, flush for at most `shutdown_grace`, close and exit, and
    /// wakes every mesh endpoint (its eventfd becomes readable and `shutting_down` true) so that its thread
    /// can exit too. Returns at once; [`Node::join`] waits for the shards (endpoints are their owner's).
    pub fn shutdown(&self) {
        signal_shutdown(&self.shutdown, &self.wakes);
    }

    /// The first shard that ended unexpectedly, if one did. Once it is set every other shard has been told
    /// to shut down, so the node is going away: the owner should [`join`](Node::join) and report it.
    /// Cheap enough to poll.
    pub fn failure(&self) -> Option<ShardFailure> {
        self.failure.get().cloned()
    }

    /// Waits for every shard thread; the first error (or panic) is returned.
    pub fn join(mut self) -> io::Result<()> {
        join_all(std::mem::take(&mut self.threads))
    }

    pub fn stats(&self) -> Vec<ShardStats> {
        self.stats_reader().stats()
    }

    /// A handle that reads the same counters from another thread (the metrics endpoint), without the
    /// node: loads of atomics only.
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader(self.counters.clone())
    }
}

/// Reads the shards' runtime counters; see [`Node::stats_reader`].
/// `Default`: reads no shard (for tests of readers).
#[derive(Clone, Default)]
pub struct StatsReader(Vec<Arc<ShardCounters>>);

impl StatsReader {
    pub fn stats(&self) -> Vec<ShardStats> {
        self.0.iter().enumerate().map(|(i, c)| c.snapshot(ShardId(i as u16))).collect()
    }
}

impl Drop for Node {
    /// A node dropped without `join` still stops its threads (a panicking test must not leave them behind).
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            let _ = join_all(std::mem::take(&mut self.threads));
        }
    }
}

/// Shutdown and the failure path alike: every mesh member is woken, shards and endpoints.
fn signal_shutdown(flag: &AtomicBool, wakes: &[Wake]) {
    flag.store(true, Ordering::Release);
    for w in wakes {
        w.force_wake();
    }
}

fn join_all(threads: Vec<JoinHandle<io::Result<()>>>) -> io::Result<()> {
    let mut first = Ok(());
    for t in threads {
        let res = t.join().unwrap_or_else(|_| Err(io::Error::other("shard thread panicked")));
        if first.is_ok() {
            first = res;
        }
    }
    first
}

/// The environment's override of `Auto`.
fn effective_choice(choice: BackendChoice) -> BackendChoice {
    if choice != BackendChoice::Auto {
        return choice;
    }
    match std::env::var("SHARDMQ_RUNTIME").as_deref() {
        Ok("epoll") => BackendChoice::Epoll,
        Ok("io_uring" | "uring" | "io-uring") => BackendChoice::Uring,
        Ok("auto") | Err(_) => BackendChoice::Auto,
        Ok(other) => {
            tracing::warn!(value = other, "SHARDMQ_RUNTIME must be epoll or io_uring; using auto");
            BackendChoice::Auto
        }
    }
}

type InboxTx<C> = Sender<Inbound<<C as Core>::Mesh, <C as Core>::Handoff>>;

enum Decision {
    /// Phase 1 answer: run this backend (switching to it if needed) and report again.
    Use(Backend),
    /// Phase 2 answer: every shard is ready.
    Go,
    Abort,
}

/// What a shard thread starts with.
struct Boot<M, H> {
    ctx: Arc<Ctx>,
    shards: usize,
    listeners: Vec<OwnedFd>,
    inbox: Inbox<M, H>,
    outbox: Outbox<M, H>,
    try_uring: bool,
    pin_cpu: Option<usize>,
    read_buffer_size: usize,
    uring: UringParams,
    report: Sender<(usize, io::Result<()>)>,
    decide: Receiver<Decision>,
    wakes: Arc<[Wake]>,
    failure: Arc<OnceLock<ShardFailure>>,
}

/// How a shard thread's work ended, when it did not panic.
enum Exit {
    /// Start-up was aborted before the loop ran: `start` reports that itself.
    NotStarted,
    /// The loop returned.
    Ran,
}

/// Turns a shard's unexpected end into a recorded [`ShardFailure`] and a node shutdown, so the other shards
/// do not wait forever for its messages and the node's owner learns about it.
struct FailureGuard {
    id: ShardId,
    shutdown: Arc<AtomicBool>,
    wakes: Arc<[Wake]>,
    failure: Arc<OnceLock<ShardFailure>>,
}

impl FailureGuard {
    fn fail(&self, cause: String) {
        // Recorded before the others are told to stop, so that their own ends (consequences) cannot be
        // taken for the first failure.
        let _ = self.failure.set(ShardFailure { shard: self.id, cause });
        signal_shutdown(&self.shutdown, &self.wakes);
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string payload)");
    format!("panicked: {msg}")
}

enum Chosen<H> {
    Uring(Box<UringLoop<H>>),
    Epoll(Box<EpollLoop>),
}

fn shard_thread<C, F>(boot: Boot<C::Mesh, C::Handoff>, make_core: Arc<F>) -> io::Result<()>
where
    C: Core,
    F: Fn(ShardId, usize) -> C,
{
    let guard = FailureGuard {
        id: boot.ctx.id,
        shutdown: boot.ctx.shutdown.clone(),
        wakes: boot.wakes.clone(),
        failure: boot.failure.clone(),
    };
    // AssertUnwindSafe: after a panic nothing of the shard is used again; the thread only reports and ends.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_shard::<C, F>(boot, make_core))) {
        Err(payload) => {
            guard.fail(panic_message(&*payload));
            // Still a panic for `join`, as before.
            std::panic::resume_unwind(payload)
        }
        Ok(Err(e)) => {
            guard.fail(format!("loop failed: {e}"));
            Err(e)
        }
        Ok(Ok(Exit::Ran)) if !guard.shutdown.load(Ordering::Acquire) => {
            guard.fail("loop ended without a shutdown request".into());
            Ok(())
        }
        Ok(Ok(_)) => Ok(()),
    }
}

fn run_shard<C, F>(boot: Boot<C::Mesh, C::Handoff>, make_core: Arc<F>) -> io::Result<Exit>
where
    C: Core,
    F: Fn(ShardId, usize) -> C,
{
    let Boot {
        ctx,
        shards,
        listeners,
        inbox,
        mut outbox,
        try_uring,
        pin_cpu,
        read_buffer_size,
        uring,
        report,
        decide,
        wakes,
        ..
    } = boot;
    let me = ctx.id.index();
    if let Some(cpu) = pin_cpu {
        if let Err(e) = sys::pin_current_thread(cpu) {
            tracing::warn!(shard = me, cpu, error = %e, "could not pin shard thread");
        }
    }
    let wake_fd = inbox.wake().fd();
    let build_epoll = || EpollLoop::new(ctx.clone(), &listeners, wake_fd, read_buffer_size);

    let mut chosen: Option<Chosen<C::Handoff>> = None;
    let first = if try_uring {
        UringLoop::setup(ctx.clone(), &listeners, wake_fd, &uring)
            .map(|u| chosen = Some(Chosen::Uring(Box::new(u))))
    } else {
        build_epoll().map(|e| chosen = Some(Chosen::Epoll(Box::new(e))))
    };
    let _ = report.send((me, first));
    let backend = match decide.recv() {
        Ok(Decision::Use(b)) => b,
        _ => return Ok(Exit::NotStarted),
    };
    let second = match (backend, &chosen) {
        (Backend::Uring, Some(Chosen::Uring(_))) | (Backend::Epoll, Some(Chosen::Epoll(_))) => Ok(()),
        (Backend::Epoll, _) => {
            // Tears the ring down (cancelling its accept) before epoll takes the same listeners.
            chosen = None;
            build_epoll().map(|e| chosen = Some(Chosen::Epoll(Box::new(e))))
        }
        (Backend::Uring, _) => Err(io::Error::other("io_uring was not set up on this shard")),
    };
    let _ = report.send((me, second));
    if !matches!(decide.recv(), Ok(Decision::Go)) {
        return Ok(Exit::NotStarted);
    }
    let mut core = Gate::new(make_core(ctx.id, shards), ctx.mesh_backlog_limit);
    let waker = Waker::new(wakes, me);
    core.set_waker(Box::new(move || waker.wake()));
    let res = match chosen.expect("backend chosen") {
        Chosen::Uring(mut lp) => driver::run(&ctx, &mut core, &mut *lp, &inbox, &mut outbox),
        Chosen::Epoll(mut lp) => driver::run(&ctx, &mut core, &mut *lp, &inbox, &mut outbox),
    };
    drop(listeners);
    // Not logged here: the failure is recorded for the node's owner, who reports it once.
    res.map(|()| Exit::Ran)
}

/// How long start-up waits for another process's listeners on the same port to go away.
const PORT_WAIT: Duration = Duration::from_secs(2);

/// A process killed with `kill -9` keeps its listening sockets for a moment while the kernel tears down
/// its io_uring; a restart that joined their `SO_REUSEPORT` group then would see some connections land on
/// sockets nobody accepts from. So start-up waits (up to [`PORT_WAIT`]) until no socket listens on a fixed
/// port; if one still does (another live process sharing the port on purpose), it joins with a warning.
fn wait_for_port(addr: SocketAddr) {
    if addr.port() == 0 || !sys::port_is_held(addr) {
        return;
    }
    let deadline = Instant::now() + PORT_WAIT;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if !sys::port_is_held(addr) {
            return;
        }
    }
    tracing::warn!(%addr, "another socket still listens on this port; sharing it (SO_REUSEPORT)");
}

/// Starts a node: binds the listeners, starts one thread per shard (each builds its core with
/// `make_core(shard, shards)`) and returns once every shard runs. `cfg.endpoints` must be 0: use
/// [`start_with_endpoints`] for a node with mesh endpoints.
pub fn start<C, F>(cfg: RuntimeConfig, make_core: F) -> io::Result<Node>
where
    C: Core,
    F: Fn(ShardId, usize) -> C + Send + Sync + 'static,
{
    if cfg.endpoints != 0 {
        // Refused rather than ignored: ids nobody would ever drain would close the senders' read gates.
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "endpoints need start_with_endpoints"));
    }
    let (node, endpoints) = start_with_endpoints(cfg, make_core)?;
    debug_assert!(endpoints.is_empty());
    Ok(node)
}

/// [`start`], plus `cfg.endpoints` mesh endpoints, returned in id order (`ShardId(shards + i)`), for
/// threads of the caller's to drive (see [`MeshEndpoint`]). Cores are still built with
/// `make_core(shard, shards)`: the number of shards; a core that talks to endpoints learns their ids from
/// its own configuration.
pub fn start_with_endpoints<C, F>(
    cfg: RuntimeConfig,
    make_core: F,
) -> io::Result<(Node, Vec<MeshEndpoint<C::Mesh>>)>
where
    C: Core,
    F: Fn(ShardId, usize) -> C + Send + Sync + 'static,
{
    let shards = cfg.shards;
    if shards == 0 || shards > u16::MAX as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "shards must be in 1..=65535"));
    }
    // Every member's id must fit a `ShardId`.
    let members = shards.saturating_add(cfg.endpoints);
    if members > u16::MAX as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "shards + endpoints must be at most 65535"));
    }
    if cfg.listen.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no listen address"));
    }
    let choice = effective_choice(cfg.backend);

    // Shard 0 binds first so that port 0 resolves once and every other shard joins that port's group.
    let mut listeners: Vec<Vec<OwnedFd>> = (0..shards).map(|_| Vec::new()).collect();
    let mut addrs = Vec::with_capacity(cfg.listen.len());
    for addr in &cfg.listen {
        wait_for_port(*addr);
        let first = sys::bind_listener(*addr, cfg.listen_backlog)?;
        let actual = sys::local_addr(first.as_raw_fd())?;
        listeners[0].push(first);
        for l in listeners.iter_mut().skip(1) {
            l.push(sys::bind_listener(actual, cfg.listen_backlog)?);
        }
        addrs.push(actual);
    }

    let wakes: Arc<[Wake]> = (0..members)
        .map(|i| if i < shards { Wake::new(members) } else { Wake::new_endpoint(members) })
        .collect::<io::Result<Vec<_>>>()?
        .into();
    let (senders, mut receivers): (Vec<InboxTx<C>>, Vec<_>) =
        (0..members).map(|_| bounded(cfg.mesh_capacity.max(1))).unzip();
    let endpoint_receivers = receivers.split_off(shards);
    let counters: Vec<Arc<ShardCounters>> = (0..shards).map(|_| Arc::default()).collect();
    let shutdown = Arc::new(AtomicBool::new(false));
    let failure = Arc::new(OnceLock::new());
    let open = Arc::new(AtomicUsize::new(0));

    let cpus = if cfg.pin_threads { sys::allowed_cpus().unwrap_or_default() } else { Vec::new() };
    let pin = cfg.pin_threads && cpus.len() >= shards;
    if cfg.pin_threads && !pin {
        tracing::debug!(cpus = cpus.len(), shards, "fewer CPUs than shards; not pinning");
    }

    let make_core = Arc::new(make_core);
    let (report_tx, report_rx) = bounded(shards * 2);
    let mut deciders = Vec::with_capacity(shards);
    let mut threads = Vec::with_capacity(shards);
    let uring = UringParams {
        buffers: cfg.uring_buffers,
        buffer_size: cfg.uring_buffer_size,
        entries: cfg.uring_entries,
    };
    let mut node_guard = Node {
        addrs,
        backend: Backend::Epoll,
        shutdown: shutdown.clone(),
        failure: failure.clone(),
        wakes: wakes.clone(),
        counters: counters.clone(),
        threads: Vec::new(),
    };
    for (i, (lst, rx)) in listeners.into_iter().zip(receivers).enumerate() {
        let id = ShardId(i as u16);
        let ctx = Arc::new(Ctx {
            id,
            counters: counters[i].clone(),
            open: open.clone(),
            max_sockets: cfg.max_sockets,
            shutdown: shutdown.clone(),
            close_linger: cfg.close_linger,
            shutdown_grace: cfg.shutdown_grace,
            idle_poll: cfg.idle_poll,
            mesh_backlog_limit: cfg.mesh_backlog_limit,
        });
        let (dtx, drx) = bounded(2);
        deciders.push(dtx);
        let boot = Boot {
            ctx,
            shards,
            listeners: lst,
            inbox: Inbox::new(rx, id, wakes.clone()),
            outbox: Outbox::new(id, senders.clone(), shards, wakes.clone(), counters[i].clone()),
            try_uring: choice != BackendChoice::Epoll,
            pin_cpu: pin.then(|| cpus[i]),
            read_buffer_size: cfg.read_buffer_size,
            uring,
            report: report_tx.clone(),
            decide: drx,
            wakes: wakes.clone(),
            failure: failure.clone(),
        };
        let mk = make_core.clone();
        let t = std::thread::Builder::new()
            .name(format!("shard-{i}"))
            .spawn(move || shard_thread::<C, F>(boot, mk))?;
        threads.push(t);
    }
    node_guard.threads = threads;
    let endpoints: Vec<MeshEndpoint<C::Mesh>> = endpoint_receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| {
            let id = ShardId((shards + i) as u16);
            let counters = Arc::new(ShardCounters::default());
            let outbox = Outbox::new(id, senders.clone(), shards, wakes.clone(), counters.clone());
            MeshEndpoint::new(shards, Inbox::new(rx, id, wakes.clone()), outbox, counters, shutdown.clone())
        })
        .collect();
    drop(senders);

    let abort = |deciders: &[Sender<Decision>], e: io::Error| {
        for d in deciders {
            let _ = d.send(Decision::Abort);
        }
        Err(e)
    };
    // Phase 1: which backend.
    let mut uring_err = None;
    for _ in 0..shards {
        let (i, res) = report_rx.recv().map_err(|_| io::Error::other("shard thread died during setup"))?;
        if let Err(e) = res {
            if choice == BackendChoice::Epoll {
                return abort(&deciders, e);
            }
            uring_err.get_or_insert((i, e));
        }
    }
    let backend = match (choice, uring_err) {
        (BackendChoice::Epoll, _) => Backend::Epoll,
        (_, None) => Backend::Uring,
        (BackendChoice::Uring, Some((i, e))) => {
            return abort(
                &deciders,
                io::Error::new(e.kind(), format!("io_uring setup failed on shard {i}: {e}")),
            );
        }
        (_, Some((i, e))) => {
            tracing::warn!(shard = i, error = %e, "io_uring setup failed; falling back to epoll");
            Backend::Epoll
        }
    };
    for d in &deciders {
        let _ = d.send(Decision::Use(backend));
    }
    // Phase 2: everyone ready on that backend.
    for _ in 0..shards {
        let (_, res) = report_rx.recv().map_err(|_| io::Error::other("shard thread died during setup"))?;
        if let Err(e) = res {
            return abort(&deciders, e);
        }
    }
    for d in &deciders {
        let _ = d.send(Decision::Go);
    }
    let endpoints_n = endpoints.len();
    let addrs = &node_guard.addrs;
    tracing::info!(backend = %backend, shards, endpoints = endpoints_n, ?addrs, "shardmq runtime started");
    node_guard.backend = backend;
    Ok((node_guard, endpoints))
}
