//! `shardmq`: the broker binary. Parses flags, sets up logging, starts one shard per core and waits for
//! SIGINT/SIGTERM to shut down gracefully. All protocol work lives in `shardmq-shard`.

mod cluster;
mod config;
mod inspect;
mod listeners;
mod metrics;
mod passwd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use shardmq_runtime::{self as runtime, BackendChoice, Node, RuntimeConfig, ShardFailure};
use shardmq_shard::auth::Auth;
use shardmq_shard::core::{open_node, Boot, Config, NodeShared, Shard, StorageConfig, WallClock};
use shardmq_storage::FsyncPolicy;
use shardmq_transport::Transport;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Past a few hundred microseconds polling buys nothing a sleep would not; the cap catches unit mistakes.
const MAX_IDLE_POLL_US: u64 = 10_000;

/// shardmq: a thread-per-core MQTT 3.1.1 and 5.0 broker.
#[derive(argh::FromArgs, Debug)]
struct Args {
    /// address to listen on for MQTT over TCP (repeatable; default 0.0.0.0:1883, which needs
    /// --password-file or --allow-anonymous; port 0 picks a free port, shown in the startup line)
    #[argh(option)]
    listen: Vec<String>,
    /// address to listen on for MQTT over TLS (repeatable; e.g. 0.0.0.0:8883); needs --tls-cert and
    /// --tls-key
    #[argh(option)]
    tls_listen: Vec<String>,
    /// PEM file with the server certificate, then its chain (TLS 1.3 and 1.2); re-read on SIGHUP
    #[argh(option)]
    tls_cert: Option<PathBuf>,
    /// PEM file with the server certificate's private key (PKCS#8, PKCS#1 or SEC1); re-read on SIGHUP
    #[argh(option)]
    tls_key: Option<PathBuf>,
    /// PEM file with the CAs that sign client certificates: TLS clients must present one (mutual TLS)
    #[argh(option)]
    tls_client_ca: Option<PathBuf>,
    /// use the subject CN of a client's certificate as its user name (for the ACL), in place of the
    /// CONNECT's user name and password; needs --tls-client-ca
    #[argh(switch)]
    tls_cn_as_username: bool,
    /// address to listen on for MQTT over WebSocket (repeatable; subprotocol mqtt, binary frames)
    #[argh(option)]
    ws_listen: Vec<String>,
    /// address to listen on for MQTT over WebSocket over TLS (repeatable; uses the --tls-* files)
    #[argh(option)]
    wss_listen: Vec<String>,
    /// the only HTTP path WebSocket clients may upgrade on (e.g. /mqtt); default: any path
    #[argh(option)]
    ws_path: Option<String>,
    /// number of shards (one thread pinned per core); default: every core the process may use
    #[argh(option)]
    cores: Option<usize>,
    /// do not pin shard threads to cores
    #[argh(switch)]
    no_pin: bool,
    /// the I/O backend: auto (io_uring, falling back to epoll), io_uring or epoll
    #[argh(option, default = "String::from(\"auto\")")]
    runtime: String,
    /// microseconds a shard keeps polling for work after its last event before it sleeps (at most
    /// 10000): lower latency where waking a thread is expensive (virtual machines, cross-core hops), at
    /// the price of CPU time that shows as busy; default 0 (sleep at once)
    #[argh(option, default = "0")]
    idle_poll_us: u64,
    /// maximum connected clients on this node; further CONNECTs are refused (MQTT 5 reason 0x97,
    /// 3.1.1 return code 3)
    #[argh(option, default = "1_000_000")]
    max_connections: usize,
    /// largest packet accepted from a client, in bytes (advertised to MQTT 5 clients); default 1 MiB
    #[argh(option, default = "1024 * 1024")]
    max_packet_size: u32,
    /// number of QoS 1/2 messages in flight per client in each direction (MQTT 5 Receive Maximum); default 64
    #[argh(option, default = "64")]
    max_inflight: u16,
    /// messages queued per offline session; the oldest is dropped first when full. Online clients
    /// that fall behind pause their publishers at half of this (flow control) and hold up to 16x
    /// before dropping; default 1000
    #[argh(option, default = "1000")]
    max_queued: usize,
    /// bytes (topic + payload) queued per offline session, applied like --max-queued: the oldest is
    /// dropped first, online clients pause their publishers at half and hold up to 16x; the newest
    /// message is always kept. A connected client that is not reading also gets up to a quarter of it in
    /// QoS 0 messages held (not dropped) while its publishers are paused; default 64 MiB
    #[argh(option, default = "64 << 20")]
    max_queued_bytes: usize,
    /// largest keep alive in seconds; MQTT 5 clients asking for 0 or more get this as Server Keep
    /// Alive; default 3600
    #[argh(option, default = "3600")]
    max_keepalive: u16,
    /// milliseconds a new connection may take to send CONNECT before it is closed; default 10000
    #[argh(option, default = "10_000")]
    connect_timeout_ms: u64,
    /// most levels in a topic name or filter; default 32
    #[argh(option, default = "32")]
    max_topic_levels: usize,
    /// topic aliases a client may use towards the broker (MQTT 5 Topic Alias Maximum); default 64
    #[argh(option, default = "64")]
    max_topic_alias: u16,
    /// subscriptions one session may hold; further filters are refused in the SUBACK (MQTT 5 0x97
    /// Quota exceeded, 3.1.1 0x80); default 1000
    #[argh(option, default = "1000")]
    max_subscriptions: usize,
    /// cap on the session expiry interval a client may ask for, in seconds; it also ends MQTT 3.1.1
    /// persistent sessions (which ask for none) that long after their client left, and applies to
    /// sessions restored from the data directory (like Mosquitto's persistent_client_expiration);
    /// default: no cap
    #[argh(option, default = "u32::MAX")]
    max_session_expiry: u32,
    /// directory of the durable state (one log per shard: persistent sessions, their queued and
    /// in-flight messages, retained messages); created if missing; default ./data
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// keep everything in memory: no data directory, nothing survives a restart
    #[argh(switch)]
    in_memory: bool,
    /// when the log reaches the disk: always (default; an acknowledgement waits for the flush of its
    /// records, one flush per event-loop iteration for everything in it), interval:<ms> (acknowledge
    /// once written; flushed every <ms>, so power loss can lose that much, a process crash nothing), or
    /// never (the OS writes back when it likes)
    #[argh(option, default = "String::from(\"always\")")]
    fsync: String,
    /// size of each log segment file in bytes, allocated up front; default 64 MiB
    #[argh(option, default = "64 << 20")]
    segment_bytes: u64,
    /// this node's name in the cluster, unique in it; default the host name
    #[argh(option)]
    node_name: Option<String>,
    /// address of the cluster port: TCP links from peers and UDP gossip, both on it (port 0 picks a
    /// free port, shown in the startup line); no flag: a single node, not clustered
    #[argh(option)]
    cluster_listen: Option<String>,
    /// cluster port of a member to join (repeatable; any live member will do; retried until one
    /// answers)
    #[argh(option)]
    join: Vec<String>,
    /// the zone this node belongs to (a label in its identity); default "default"
    #[argh(option, default = "String::from(\"default\")")]
    zone: String,
    /// the region this node belongs to (a label in its identity); default "default"
    #[argh(option, default = "String::from(\"default\")")]
    region: String,
    /// file holding the cluster secret (at least 16 bytes; a trailing newline is ignored): every gossip
    /// packet and link is authenticated with it, and a node without it or with another cannot join
    #[argh(option)]
    cluster_secret_file: Option<PathBuf>,
    /// what a CONNECT gets while the owner of its client id (in the zone's session registry) cannot be
    /// reached: available (default: the session is registered here and reconciled later) or consistent
    /// (refused with CONNACK 0x88 Server unavailable, as VerneMQ does)
    #[argh(option, default = "String::from(\"available\")")]
    partition_mode: String,
    /// password file in Mosquitto's format (`user:$7$...`, as made by mosquitto_passwd or `shardmq passwd`):
    /// clients must give a listed user name and its password; anonymous clients are refused unless
    /// --allow-anonymous
    #[argh(option)]
    password_file: Option<PathBuf>,
    /// ACL file in Mosquitto's format (user sections, topic and pattern rules with %c/%u) checked on
    /// SUBSCRIBE, PUBLISH and every delivery
    #[argh(option)]
    acl_file: Option<PathBuf>,
    /// accept clients without a user name; without a password file it is required unless every
    /// --listen address is a loopback address
    #[argh(switch)]
    allow_anonymous: bool,
    /// a TOML file setting any of these flags by name (`max-connections = 5000`, `listen = ["a", "b"]`,
    /// `in-memory = true`); flags on the command line win; check one with `shardmq check-config FILE`
    // Read by `config::expand` before parsing (the field documents it in --help and accepts it).
    #[argh(option)]
    #[allow(dead_code)]
    config: Option<PathBuf>,
    /// address to serve Prometheus metrics on (GET /metrics, and /healthz answering "ok"); no flag:
    /// not served
    #[argh(option)]
    metrics_listen: Option<String>,
    /// seconds between publications of the $SYS/broker/... topics (retained, as Mosquitto names them);
    /// 0: none; default 10
    #[argh(option, default = "10")]
    sys_interval: u32,
    /// log level or filter (error, warn, info, debug, trace, or a tracing filter); default info
    #[argh(option, default = "String::from(\"info\")")]
    log_level: String,
    #[argh(subcommand)]
    cmd: Option<Command>,
}

#[derive(argh::FromArgs, Debug)]
#[argh(subcommand)]
enum Command {
    Inspect(inspect::Inspect),
    Passwd(passwd::Passwd),
    CheckConfig(CheckConfig),
}

/// Check a config file (`--config`): print the settings it makes, or why it is refused.
#[derive(argh::FromArgs, Debug)]
#[argh(subcommand, name = "check-config")]
struct CheckConfig {
    /// the TOML file
    #[argh(positional)]
    file: PathBuf,
}

/// How often `main` looks at the node for a failed shard while it waits for a signal.
const FAILURE_CHECK: Duration = Duration::from_millis(200);

/// The command line, with the settings of a `--config` file in front of it, parsed.
fn parse_args(argv: Vec<String>) -> Result<Args> {
    let (argv, _) = config::expand::<Args>(argv)?;
    let name = argv.first().map_or("shardmq", |s| s.rsplit('/').next().unwrap_or(s));
    let rest: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    match <Args as argh::FromArgs>::from_args(&[name], &rest) {
        Ok(a) => Ok(a),
        Err(e) if e.status.is_ok() => {
            // --help.
            println!("{}", e.output);
            std::process::exit(0)
        }
        Err(e) => bail!("{}", e.output.trim_end()),
    }
}

fn listener_args(args: &Args) -> listeners::ListenerArgs {
    listeners::ListenerArgs {
        listen: args.listen.clone(),
        tls_listen: args.tls_listen.clone(),
        ws_listen: args.ws_listen.clone(),
        wss_listen: args.wss_listen.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_client_ca: args.tls_client_ca.clone(),
        tls_cn_as_username: args.tls_cn_as_username,
        ws_path: args.ws_path.clone(),
        max_packet_size: args.max_packet_size,
    }
}

/// `shardmq check-config FILE`: what the file sets, as flags, once the whole parses.
fn check_config(file: &std::path::Path) -> Result<()> {
    let argv = vec!["shardmq".to_string(), "--config".to_string(), file.display().to_string()];
    let (expanded, _) = config::expand::<Args>(argv.clone())?;
    let args = parse_args(argv)?;
    // The files it names must load as they would at start-up: listeners (TLS certificate and key),
    // password file and ACL.
    let listeners = listener_args(&args).setup()?;
    auth_setup(&args, &listeners)?;
    println!("{}: ok", file.display());
    let mut it = expanded.iter().skip(1).peekable();
    while let Some(flag) = it.next() {
        match it.peek() {
            Some(v) if !v.starts_with("--") => println!("  {flag} {}", it.next().expect("peeked")),
            _ => println!("  {flag}"),
        }
    }
    Ok(())
}

fn main() -> Result<ExitCode> {
    let args = match parse_args(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(log_filter(&args.log_level)).context("--log-level")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .init();
    match &args.cmd {
        Some(Command::Inspect(i)) => std::process::exit(inspect::run(i, wall_clock())?),
        Some(Command::Passwd(p)) => {
            passwd::run(p)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::CheckConfig(c)) => {
            return Ok(match check_config(&c.file) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e:#}");
                    ExitCode::FAILURE
                }
            });
        }
        None => {}
    }

    let listeners = listener_args(&args).setup()?;
    let auth = auth_setup(&args, &listeners)?;
    let transport = listeners.transport.clone();
    let transport_counters = transport.counters.clone();
    let mut rt = RuntimeConfig {
        listen: listeners.addrs.clone(),
        pin_threads: !args.no_pin,
        ..RuntimeConfig::default()
    };
    if let Some(n) = args.cores {
        if n == 0 {
            bail!("--cores must be at least 1");
        }
        rt.shards = n;
    }
    rt.backend = match args.runtime.as_str() {
        "auto" => BackendChoice::Auto,
        "io_uring" | "uring" => BackendChoice::Uring,
        "epoll" => BackendChoice::Epoll,
        other => bail!("--runtime must be auto, io_uring or epoll, not {other:?}"),
    };
    if args.idle_poll_us > MAX_IDLE_POLL_US {
        bail!("--idle-poll-us must be at most {MAX_IDLE_POLL_US} (10 ms), not {}", args.idle_poll_us);
    }
    rt.idle_poll = Duration::from_micros(args.idle_poll_us);
    // Room above the client limit so that refused clients still get their CONNACK.
    let slack = (args.max_connections / 100).max(256);
    rt.max_sockets = rt.max_sockets.min(args.max_connections.saturating_add(slack));
    if let Some(limit) = nofile_limit() {
        if limit < args.max_connections as u64 {
            tracing::warn!(
                open_files_limit = limit,
                max_connections = args.max_connections,
                "the open-files limit is below --max-connections; the node tops out near {limit} sockets. \
                 Raise LimitNOFILE / ulimit -n (see tuning/ in the repository)"
            );
        }
    }
    let mut cfg = Config {
        max_connections: args.max_connections,
        max_packet_size: args.max_packet_size,
        max_inflight: args.max_inflight.max(1),
        max_queued: args.max_queued,
        max_queued_bytes: args.max_queued_bytes,
        max_keepalive_s: args.max_keepalive,
        connect_timeout_ms: args.connect_timeout_ms,
        max_topic_levels: args.max_topic_levels.max(1),
        max_topic_alias: args.max_topic_alias,
        max_session_expiry_s: args.max_session_expiry,
        max_subscriptions: args.max_subscriptions,
        auth,
        sys_interval_s: args.sys_interval,
        ..Config::default()
    };
    let node_state =
        Arc::new(NodeShared::with_auth(rt.shards.min(u16::MAX as usize) as u16, cfg.auth.clone()));
    let reload_state = node_state.clone();
    let shards = rt.shards;
    if shards > u16::MAX as usize {
        bail!("--cores must be at most {}", u16::MAX);
    }
    let fsync: FsyncPolicy = args.fsync.parse().map_err(anyhow::Error::msg).context("--fsync")?;
    if args.in_memory && args.data_dir.is_some() {
        bail!("--in-memory and --data-dir exclude each other");
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("data"));
    let boots: Vec<Mutex<Option<Boot>>> = if args.in_memory {
        Vec::new()
    } else {
        let sc = StorageConfig { dir: data_dir.clone(), fsync, segment_bytes: args.segment_bytes };
        let boots = open_node(&sc, shards as u16, wall_clock())
            .with_context(|| format!("opening the data directory {}", data_dir.display()))?;
        // Replay built and freed indexes as large as the log; this thread now only waits for signals,
        // so mimalloc would never get round to returning those pages on its own.
        // SAFETY: mi_collect only walks this thread's own heap.
        unsafe { libmimalloc_sys::mi_collect(true) };
        boots.into_iter().map(|b| Mutex::new(Some(b))).collect()
    };

    let cluster_args = cluster::ClusterArgs {
        node_name: args.node_name.clone(),
        listen: args.cluster_listen.clone(),
        join: args.join.clone(),
        zone: args.zone.clone(),
        region: args.region.clone(),
        secret_file: args.cluster_secret_file.clone(),
        partition_mode: match args.partition_mode.as_str() {
            "available" => shardmq_cluster::registrar::PartitionMode::Available,
            "consistent" => shardmq_cluster::registrar::PartitionMode::Consistent,
            other => bail!("--partition-mode must be available or consistent, not {other:?}"),
        },
    };
    let cluster = cluster_args.setup(shards as u16, !args.in_memory)?;
    // Labels of every metric: the cluster identity, or this host with the default zone and region.
    let metric_labels = match &cluster {
        Some(c) => {
            let id = c.gateway.identity();
            metrics::node_labels(&id.name.to_string(), &id.zone, &id.region)
        }
        None => {
            let name = args.node_name.clone().or_else(cluster::host_name).unwrap_or_else(|| "shardmq".into());
            metrics::node_labels(&name, &args.zone, &args.region)
        }
    };
    let cluster_metrics = cluster.as_ref().map(|_| Arc::new(runtime::cluster::ClusterMetrics::default()));
    let cluster_line = cluster.as_ref().map(|c| {
        let id = c.gateway.identity();
        format!(" cluster={} node={} zone={} region={}", id.addr, id.name, id.zone, id.region)
    });
    if cluster.is_some() {
        rt.endpoints = 1;
    }
    cfg.cluster_gateway = cluster.is_some();
    if let Some(c) = &cluster {
        // Ids this node assigns must not be another node's (a client may come back to any of them).
        cfg.assigned_id_scope = c.gateway.identity().name.to_string().into();
    }
    cfg.register_ahead = cluster.is_some()
        && cluster_args.partition_mode == shardmq_cluster::registrar::PartitionMode::Available;
    let cfg = Arc::new(cfg);

    // Block the shutdown signals before any thread starts so that only `sigwait` below sees them.
    let signals = block_shutdown_signals()?;
    let shared_for_metrics = node_state.clone();
    let started = Instant::now();
    let (node, mut endpoints) = runtime::start_with_endpoints(rt, move |id, n| {
        let mut shard = Shard::new(id, n as u16, cfg.clone(), node_state.clone());
        // Deadlines of sessions moved from other nodes travel as Unix time.
        shard.set_wall_clock(wall_clock());
        // Each shard takes its own boot state once, on its own thread, before its loop starts.
        let boot = boots.get(id.index()).and_then(|b| b.lock().ok()?.take());
        if let Some(boot) = boot {
            shard.restore(boot, Instant::now());
            // The recovered lists were freed here, on this thread's heap: return their pages now.
            // SAFETY: mi_collect only walks this thread's own heap.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
        shard.start_sys(Instant::now());
        Transport::new(shard, transport.clone())
    })
    .context("starting the shards")?;
    let cluster_thread = match cluster {
        Some(c) => {
            let endpoint = endpoints.pop().context("the runtime made no cluster endpoint")?;
            Some(
                runtime::cluster::spawn(
                    c.sockets,
                    c.gateway,
                    endpoint,
                    cluster_metrics.clone().unwrap_or_default(),
                )
                .context("starting the cluster thread")?,
            )
        }
        None => None,
    };
    let metrics_line = match &args.metrics_listen {
        Some(a) => {
            let addr = listeners::resolve("--metrics-listen", std::slice::from_ref(a))?[0];
            let src = metrics::Sources {
                shared: shared_for_metrics,
                runtime: node.stats_reader(),
                cluster: cluster_metrics,
                transport: transport_counters,
                labels: metric_labels,
                started,
            };
            format!(" metrics={}", metrics::spawn(addr, src)?)
        }
        None => String::new(),
    };
    let addrs: Vec<String> = node.local_addrs().iter().map(ToString::to_string).collect();
    let storage = if args.in_memory {
        "in-memory".to_string()
    } else {
        format!("{} fsync={fsync}", data_dir.display())
    };
    println!(
        "shardmq {} listening on {}{} cores={} runtime={}{} max_connections={} data={}{}{}",
        env!("CARGO_PKG_VERSION"),
        addrs.join(","),
        listeners.describe(node.local_addrs()),
        shards,
        node.backend(),
        if args.idle_poll_us > 0 { format!(" idle_poll_us={}", args.idle_poll_us) } else { String::new() },
        args.max_connections,
        storage,
        cluster_line.unwrap_or_default(),
        metrics_line
    );
    // SIGHUP: the password file, the ACL and the TLS files are read again; connections stay.
    let reload = || {
        match auth_setup(&args, &listeners) {
            Ok(auth) => {
                reload_state.auth.replace(auth);
                tracing::info!("password file and ACL reloaded");
            }
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "password file or ACL reload refused; the previous ones stay in force"
            ),
        }
        match listeners.reload_tls() {
            Ok(true) => tracing::info!("TLS certificate, key and client CAs reloaded"),
            Ok(false) => {}
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "TLS reload refused; the previous certificate and key stay in force"
            ),
        }
    };
    let sig = match wait_for_end(&node, cluster_thread.as_ref(), &signals, reload) {
        End::Signal(sig) => sig,
        End::Failed(failure) => {
            tracing::error!(shard = failure.shard.index(), cause = %failure.cause, "a shard failed; stopping");
            // The join error is that same failure (or a consequence of it), already reported.
            let _ = node.join();
            return Ok(ExitCode::FAILURE);
        }
        End::ClusterFailed => {
            let cause = match cluster_thread.map(|t| t.join()) {
                Some(Ok(Err(e))) => e.to_string(),
                Some(Err(_)) => "panicked".to_string(),
                _ => "ended".to_string(),
            };
            tracing::error!(%cause, "the cluster thread failed; stopping");
            node.shutdown();
            let _ = node.join();
            return Ok(ExitCode::FAILURE);
        }
    };
    tracing::info!(signal = sig, "shutting down");
    node.shutdown();
    if let Some(t) = cluster_thread {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the cluster thread failed while stopping"),
            Err(_) => tracing::warn!("the cluster thread panicked while stopping"),
        }
    }
    node.join().context("joining the shards")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// rustls warns, once per handshake, about what clients commonly do (an IP address as SNI, which
/// mosquitto_pub sends): at `info` that would flood the log of a busy TLS listener. Its errors still
/// show; a filter that names rustls is taken as given.
fn log_filter(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    }
}

/// Colour codes only for a person at a terminal: under a supervisor or in a file they are noise. `NO_COLOR`
/// (any non-empty value, <https://no-color.org>) turns them off there too.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// mimalloc commits each new arena eagerly by default: with one heap per shard thread that is megabytes
/// of resident memory before the first client, and it showed up as ~1.5 KB of extra RSS per idle
/// connection at 15,000 connections on two shards. Lazy commit keeps RSS to what is used.
///
/// It must run before the first allocation creates an arena, i.e. before `main` (the Rust runtime
/// allocates before calling it), so it is an ELF constructor. It allocates nothing itself. The
/// `MIMALLOC_ARENA_EAGER_COMMIT` environment variable still wins, for experiments.
extern "C" fn tune_allocator() {
    // `mi_option_arena_eager_commit` in the bundled mimalloc v2 `mimalloc.h` (the Rust binding does not
    // export it): show_errors, show_stats, verbose, eager_commit, arena_eager_commit.
    const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: getenv with a NUL-terminated name, before any thread exists; mi_option_set only stores a
    // value.
    unsafe {
        if libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

/// Deadlines are stored as Unix time; the shards run on the monotonic clock.
fn wall_clock() -> WallClock {
    let base_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    WallClock { base: Instant::now(), base_unix_ms }
}

/// Secure by default, as Mosquitto 2: without a password file, anonymous clients are accepted only when
/// asked for or when no listener can be reached from another host. `None`: no checks at all.
///
/// A TLS listener that requires client certificates (`--tls-client-ca`) counts as closed: only clients
/// with a certificate the operator's CA signed get in.
fn auth_setup(args: &Args, listeners: &listeners::Listeners) -> Result<Option<Arc<Auth>>> {
    if args.password_file.is_none() && !args.allow_anonymous {
        let open = listeners
            .addrs
            .iter()
            .enumerate()
            .find(|(i, a)| !a.ip().is_loopback() && !listeners.authenticated(*i));
        if let Some((_, open)) = open {
            bail!(
                "refusing to start: listener {open} is not a loopback address and anonymous clients would be \
                 accepted; give --password-file FILE (see `shardmq passwd`) to require passwords, or \
                 --allow-anonymous to accept anyone"
            );
        }
    }
    if args.password_file.is_none() && args.acl_file.is_none() {
        return Ok(None);
    }
    // Without a password file user names are taken as given (for the ACL), as Mosquitto does; anonymous
    // clients are accepted there by the rule above (loopback or --allow-anonymous).
    let allow_anonymous = args.allow_anonymous || args.password_file.is_none();
    let auth = Auth::load(args.password_file.as_deref(), args.acl_file.as_deref(), allow_anonymous)?;
    tracing::info!(?auth, "authentication");
    Ok(Some(Arc::new(auth)))
}

fn nofile_limit() -> Option<u64> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0).then_some(rl.rlim_cur)
}

fn block_shutdown_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset operations on a zeroed set we own; pthread_sigmask only changes this thread's mask,
    // which the shard threads inherit.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask failed: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Why the node is to stop.
#[derive(Debug)]
enum End {
    Signal(&'static str),
    Failed(ShardFailure),
    /// The cluster thread ended on its own (its loop failed or panicked).
    ClusterFailed,
}

/// Waits for a shutdown signal, a shard failure or the end of the cluster thread. A shard that died has
/// already stopped the others; waiting for a signal alone would leave a process without listeners that no
/// supervisor restarts. A node whose cluster thread died would serve its own clients but silently not the
/// zone's: it stops too.
/// SIGHUP (asking for a reload) calls `reload` and keeps waiting.
fn wait_for_end(
    node: &Node,
    cluster: Option<&std::thread::JoinHandle<std::io::Result<()>>>,
    signals: &libc::sigset_t,
    reload: impl Fn(),
) -> End {
    loop {
        if let Some(failure) = node.failure() {
            return End::Failed(failure);
        }
        if cluster.is_some_and(|t| t.is_finished()) {
            return End::ClusterFailed;
        }
        match wait_for(signals, FAILURE_CHECK) {
            Some("SIGHUP") => reload(),
            Some(sig) => return End::Signal(sig),
            None => {}
        }
    }
}

/// Waits up to `timeout` for one of the blocked shutdown signals; `None` when none came (or the wait was
/// interrupted).
fn wait_for(set: &libc::sigset_t, timeout: Duration) -> Option<&'static str> {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: `set` is a valid, initialised signal set and `ts` a valid timespec; no siginfo is asked for.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    match sig {
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGHUP => Some("SIGHUP"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use shardmq_runtime::{Core, IoCmd};
    use shardmq_shard::{ConnId, ShardId};

    use super::*;

    /// A core that does nothing, except on shard 1, which panics at its first timer.
    struct Doomed {
        at: Option<Instant>,
    }

    impl Core for Doomed {
        type Mesh = ();
        type Handoff = ();
        fn handle_accept(&mut self, _: ConnId, _: Instant) {}
        fn handle_adopt(&mut self, _: ConnId, _: (), _: Instant) {}
        fn handle_read(&mut self, _: ConnId, _: &[u8], _: Instant) {}
        fn handle_closed(&mut self, _: ConnId, _: Instant) {}
        fn handle_backpressure(&mut self, _: ConnId, _: bool, _: Instant) {}
        fn handle_mesh(&mut self, _: ShardId, _: (), _: Instant) {}
        fn handle_timeout(&mut self, _: Instant) {
            panic!("doomed shard");
        }
        fn handle_shutdown(&mut self, _: Instant) {}
        fn take_transmit(&mut self, _: ConnId) -> Vec<u8> {
            Vec::new()
        }
        fn poll_io(&mut self) -> Option<IoCmd<()>> {
            None
        }
        fn poll_mesh(&mut self) -> Option<(ShardId, ())> {
            None
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.at
        }
    }

    #[test]
    fn a_failed_shard_ends_the_wait_for_signals() {
        let cfg = RuntimeConfig {
            listen: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))],
            shards: 2,
            pin_threads: false,
            backend: BackendChoice::Epoll,
            ..RuntimeConfig::default()
        };
        let node = runtime::start(cfg, |id, _| Doomed {
            at: (id == ShardId(1)).then(|| Instant::now() + Duration::from_millis(100)),
        })
        .expect("start");
        // No signal is waited for: only the failure can end the wait.
        // SAFETY: sigemptyset on a zeroed set we own.
        let none = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            set
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let end = wait_for_end(&node, None, &none, || {});
            let _ = tx.send(end);
            node
        });
        // 100 ms to the panic plus one check period, with room for a slow host.
        let end = rx.recv_timeout(Duration::from_secs(3)).expect("the wait did not notice the failure");
        match end {
            End::Failed(f) => {
                assert_eq!(f.shard, ShardId(1));
                assert!(f.cause.contains("doomed shard"), "{f}");
            }
            End::Signal(s) => panic!("no signal was sent, got {s}"),
            End::ClusterFailed => panic!("there is no cluster thread"),
        }
        assert!(waiter.join().expect("waiter").join().is_err(), "join hid the panic");
    }
}
