//! `shardmq-bench`: command-line front end of the `shardmq-perf` load generator. See the library docs for
//! what each subcommand measures. Exits 1 when a run lost QoS 1/2 messages or a client hit an error, so
//! scripts can gate on it.

use anyhow::{bail, Result};
use argh::FromArgs;
use shardmq_perf::client::{protocol_from, Dial};
use shardmq_perf::conn::{self, ConnPlan, ConnReport};
use shardmq_perf::engine::{self, Plan, PubSpec, RunReport};
use shardmq_perf::net::resolve;
use shardmq_perf::pairs;
use shardmq_perf::takeover::{self, SessionsPlan, TakeoverPlan};
use shardmq_perf::tls::{self, HandshakePlan, HandshakeReport};
use shardmq_wire::QoS;
use std::time::Duration;

/// MQTT broker load generator.
#[derive(FromArgs)]
struct Args {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Conn(ConnCmd),
    Fanin(FaninCmd),
    Fanout(FanoutCmd),
    Pairs(PairsCmd),
    Shared(SharedCmd),
    Pub(PubCmd),
    Sub(SubCmd),
    Suback(SubackCmd),
    Handshakes(HandshakesCmd),
    Takeover(TakeoverCmd),
    Sessions(SessionsCmd),
}

/// Options every subcommand takes.
struct Common {
    host: String,
    port: u16,
    protocol: u8,
    json: bool,
    broker_pid: Option<u32>,
    sub_ports: Vec<u16>,
    peer_pids: Vec<u32>,
    username: Option<String>,
    password: Option<String>,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_server_name: String,
}

impl Common {
    /// Credentials and TLS settings for every connection; `resumption: false` makes every TLS handshake
    /// a full one.
    fn dial(&self, resumption: bool) -> Result<Dial> {
        let client = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((std::path::Path::new(c), std::path::Path::new(k))),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        let tls = match &self.tls_ca {
            Some(ca) => Some(tls::load(ca.as_ref(), client, &self.tls_server_name, resumption)?),
            None if client.is_some() => bail!("--tls-cert needs --tls-ca"),
            None => None,
        };
        if self.password.is_some() && self.username.is_none() && self.protocol != 5 {
            bail!("MQTT 3.1.1 has no password without a user name");
        }
        Ok(Dial { username: self.username.clone(), password: self.password.clone(), tls })
    }
}

/// Declares a subcommand's arguments with the options every subcommand shares (argh has no flatten),
/// and `common()` to collect them.
macro_rules! subcommand {
    // Field types as `ident<arg>` rather than `ty`: argh must see `Option` to make an option optional.
    ($(#[$meta:meta])* struct $name:ident {
        $($(#[$fmeta:meta])* $field:ident: $fty:ident $(<$farg:ty>)?,)*
    }) => {
        #[derive(FromArgs)]
        $(#[$meta])*
        struct $name {
            /// broker host (default 127.0.0.1)
            #[argh(option, default = "String::from(\"127.0.0.1\")")]
            host: String,
            /// broker port
            #[argh(option)]
            port: u16,
            /// MQTT protocol: 3 (3.1.1) or 5 (default)
            #[argh(option, default = "5")]
            protocol: u8,
            /// print one JSON object instead of text
            #[argh(switch)]
            json: bool,
            /// broker process id, to sample its CPU time and memory
            #[argh(option)]
            broker_pid: Option<u32>,
            /// port subscribers connect to instead of --port, on the same host; repeat it to spread
            /// them round-robin (another node of a cluster, a bridged broker)
            #[argh(option)]
            sub_port: Vec<u16>,
            /// process id of another broker (a cluster's other nodes), sampled like --broker-pid; repeatable
            #[argh(option)]
            peer_pid: Vec<u32>,
            /// user name every CONNECT carries
            #[argh(option)]
            username: Option<String>,
            /// password every CONNECT carries
            #[argh(option)]
            password: Option<String>,
            /// connect over TLS, trusting the CA certificate(s) in this PEM file (not for `conn`)
            #[argh(option)]
            tls_ca: Option<String>,
            /// client certificate chain (PEM) to present over TLS, with --tls-key
            #[argh(option)]
            tls_cert: Option<String>,
            /// private key (PEM) of --tls-cert
            #[argh(option)]
            tls_key: Option<String>,
            /// name the server certificate must carry (default localhost)
            #[argh(option, default = "String::from(\"localhost\")")]
            tls_server_name: String,
            $($(#[$fmeta])* $field: $fty $(<$farg>)?,)*
        }

        impl $name {
            fn common(&self) -> Common {
                Common {
                    host: self.host.clone(),
                    port: self.port,
                    protocol: self.protocol,
                    json: self.json,
                    broker_pid: self.broker_pid,
                    sub_ports: self.sub_port.clone(),
                    peer_pids: self.peer_pid.clone(),
                    username: self.username.clone(),
                    password: self.password.clone(),
                    tls_ca: self.tls_ca.clone(),
                    tls_cert: self.tls_cert.clone(),
                    tls_key: self.tls_key.clone(),
                    tls_server_name: self.tls_server_name.clone(),
                }
            }
        }
    };
}

subcommand! {
    /// hold many idle connections open: connect rate, failures, broker memory per connection
    #[argh(subcommand, name = "conn")]
    struct ConnCmd {
        /// connections to open
        #[argh(option)]
        count: u64,
        /// new connections per second (default 1000)
        #[argh(option, default = "1000.0")]
        rate: f64,
        /// seconds to hold them once all are open (default 10)
        #[argh(option, default = "10.0")]
        hold_s: f64,
        /// epoll threads (default 2)
        #[argh(option, default = "2")]
        threads: usize,
        /// seconds allowed for TCP connect plus CONNACK (default 10)
        #[argh(option, default = "10.0")]
        timeout_s: f64,
    }
}

subcommand! {
    /// P publishers to bench/fanin/{i}, one subscriber on bench/fanin/+
    #[argh(subcommand, name = "fanin")]
    struct FaninCmd {
        /// publishers (default 10)
        #[argh(option, default = "10")]
        publishers: usize,
        /// quality of service: 0, 1 or 2 (default 0)
        #[argh(option, default = "0")]
        qos: u8,
        /// payload bytes, at least 16 (default 64)
        #[argh(option, default = "64")]
        payload: usize,
        /// seconds to publish (default 10)
        #[argh(option, default = "10.0")]
        duration_s: f64,
        /// total messages per second over all publishers (default: flat out)
        #[argh(option)]
        rate: Option<f64>,
        /// most QoS 1/2 messages in flight per publisher (default 64, capped by the broker's Receive Maximum)
        #[argh(option, default = "64")]
        window: u16,
    }
}

subcommand! {
    /// one publisher, S subscribers on one topic
    #[argh(subcommand, name = "fanout")]
    struct FanoutCmd {
        /// subscribers (default 100)
        #[argh(option, default = "100")]
        subscribers: usize,
        /// messages per second published (default 1000)
        #[argh(option, default = "1000.0")]
        rate: f64,
        /// quality of service: 0, 1 or 2 (default 0)
        #[argh(option, default = "0")]
        qos: u8,
        /// payload bytes, at least 16 (default 64)
        #[argh(option, default = "64")]
        payload: usize,
        /// seconds to publish (default 10)
        #[argh(option, default = "10.0")]
        duration_s: f64,
        /// most QoS 1/2 messages in flight (default 64)
        #[argh(option, default = "64")]
        window: u16,
        /// epoll threads driving the connections (default: one per CPU this process may use, at most 4)
        #[argh(option, default = "0")]
        threads: usize,
    }
}

subcommand! {
    /// N publisher/subscriber pairs on distinct topics
    #[argh(subcommand, name = "pairs")]
    struct PairsCmd {
        /// publisher/subscriber pairs (default 10)
        #[argh(option, default = "10")]
        pairs: usize,
        /// messages per second per pair (default 100)
        #[argh(option, default = "100.0")]
        rate: f64,
        /// quality of service: 0, 1 or 2 (default 0)
        #[argh(option, default = "0")]
        qos: u8,
        /// payload bytes, at least 16 (default 64)
        #[argh(option, default = "64")]
        payload: usize,
        /// seconds to publish (default 10)
        #[argh(option, default = "10.0")]
        duration_s: f64,
        /// most QoS 1/2 messages in flight per publisher (default 64)
        #[argh(option, default = "64")]
        window: u16,
        /// epoll threads driving the connections (default: one per CPU this process may use, at most 4)
        #[argh(option, default = "0")]
        threads: usize,
    }
}

subcommand! {
    /// one publisher flat out to $share/g/bench/shared with M members
    #[argh(subcommand, name = "shared")]
    struct SharedCmd {
        /// group members (default 4)
        #[argh(option, default = "4")]
        members: usize,
        /// quality of service: 0, 1 or 2 (default 1)
        #[argh(option, default = "1")]
        qos: u8,
        /// payload bytes, at least 16 (default 64)
        #[argh(option, default = "64")]
        payload: usize,
        /// seconds to publish (default 10)
        #[argh(option, default = "10.0")]
        duration_s: f64,
        /// messages per second (default: flat out)
        #[argh(option)]
        rate: Option<f64>,
        /// most QoS 1/2 messages in flight (default 64)
        #[argh(option, default = "64")]
        window: u16,
    }
}

subcommand! {
    /// publish N messages from one client
    #[argh(subcommand, name = "pub")]
    struct PubCmd {
        /// topic (default bench/smoke)
        #[argh(option, default = "String::from(\"bench/smoke\")")]
        topic: String,
        /// messages to publish (default 1000)
        #[argh(option, default = "1000")]
        count: u64,
        /// messages per second (default: flat out)
        #[argh(option)]
        rate: Option<f64>,
        /// quality of service: 0, 1 or 2 (default 0)
        #[argh(option, default = "0")]
        qos: u8,
        /// payload bytes, at least 16 (default 64)
        #[argh(option, default = "64")]
        payload: usize,
        /// give up after this many seconds (default 60)
        #[argh(option, default = "60.0")]
        duration_s: f64,
    }
}

subcommand! {
    /// subscribe and count messages (with latency, for payloads from this tool)
    #[argh(subcommand, name = "sub")]
    struct SubCmd {
        /// topic filter (default bench/#)
        #[argh(option, default = "String::from(\"bench/#\")")]
        topic: String,
        /// stop after this many messages (default: run for the whole duration)
        #[argh(option)]
        count: Option<u64>,
        /// quality of service: 0, 1 or 2 (default 0)
        #[argh(option, default = "0")]
        qos: u8,
        /// seconds to listen (default 10)
        #[argh(option, default = "10.0")]
        duration_s: f64,
    }
}

subcommand! {
    /// SUBSCRIBE-to-SUBACK latency: N new filters subscribed one at a time over one connection
    #[argh(subcommand, name = "suback")]
    struct SubackCmd {
        /// subscriptions (default 500)
        #[argh(option, default = "500")]
        count: u64,
        /// quality of service asked for: 0, 1 or 2 (default 0)
        #[argh(option, default = "0")]
        qos: u8,
    }
}

subcommand! {
    /// new connections per second, each opened, CONNECTed and closed: TCP connect, with --tls-ca a full
    /// TLS handshake (no resumption), CONNECT/CONNACK, DISCONNECT
    #[argh(subcommand, name = "handshakes")]
    struct HandshakesCmd {
        /// threads, each opening one connection at a time (default 4)
        #[argh(option, default = "4")]
        threads: usize,
        /// seconds to run (default 10)
        #[argh(option, default = "10.0")]
        duration_s: f64,
    }
}

subcommand! {
    /// session takeover latency: the same client ids (persistent sessions) reconnect alternately on
    /// --port and --other-port while connected, CONNECT to CONNACK; session present and the old
    /// connection's end checked every time
    #[argh(subcommand, name = "takeover")]
    struct TakeoverCmd {
        /// port every second connection goes to (default --port: takeovers on one node)
        #[argh(option)]
        other_port: Option<u16>,
        /// client ids taken over in turn (default 1)
        #[argh(option, default = "1")]
        ids: usize,
        /// takeovers in all (default 500)
        #[argh(option, default = "500")]
        count: u64,
        /// most seconds for the takeovers (default 60)
        #[argh(option, default = "60.0")]
        duration_s: f64,
        /// messages (QoS 1) sent to each session before each takeover, left unacknowledged (default 0)
        #[argh(option, default = "0")]
        queued: u16,
        /// no subscription in the sessions (then --queued must be 0)
        #[argh(switch)]
        no_subscribe: bool,
        /// session expiry interval of MQTT 5, seconds (default 3600)
        #[argh(option, default = "3600")]
        expiry_s: u32,
    }
}

subcommand! {
    /// make persistent sessions and leave them offline: ids <prefix>-0 .. <prefix>-(count-1), each
    /// connected with clean start 0, subscribed if asked, disconnected; a few at a time
    #[argh(subcommand, name = "sessions")]
    struct SessionsCmd {
        /// sessions to make
        #[argh(option)]
        count: u64,
        /// client id prefix (default sess)
        #[argh(option, default = "String::from(\"sess\")")]
        prefix: String,
        /// clients connecting at once (default 4)
        #[argh(option, default = "4")]
        threads: usize,
        /// each session subscribes (QoS 1) to a topic of its own
        #[argh(switch)]
        subscribe: bool,
        /// session expiry interval of MQTT 5, seconds (default 3600)
        #[argh(option, default = "3600")]
        expiry_s: u32,
        /// most seconds for the whole run (default 120)
        #[argh(option, default = "120.0")]
        duration_s: f64,
    }
}

fn qos(v: u8) -> Result<QoS> {
    QoS::from_u8(v).ok_or_else(|| anyhow::anyhow!("--qos must be 0, 1 or 2"))
}

fn secs(v: f64, name: &str) -> Result<Duration> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{name} must be a non-negative number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

fn base_plan(c: &Common, scenario: &str, q: u8, payload: usize, duration_s: f64) -> Result<Plan> {
    Ok(Plan {
        scenario: scenario.into(),
        addr: resolve(&c.host, c.port)?,
        sub_addrs: c.sub_ports.iter().map(|&p| resolve(&c.host, p)).collect::<Result<_>>()?,
        protocol: protocol_from(c.protocol)?,
        qos: qos(q)?,
        payload,
        duration: secs(duration_s, "--duration-s")?,
        publishers: Vec::new(),
        subscribers: Vec::new(),
        copies_per_msg: 1,
        each_receiver: false,
        window: 64,
        broker_pid: c.broker_pid,
        peer_pids: c.peer_pids.clone(),
        progress: true,
        stop_after_delivered: None,
        dial: c.dial(true)?,
    })
}

fn spec(topic: String, rate: Option<f64>) -> PubSpec {
    PubSpec { topic, rate, max_msgs: None }
}

fn main() -> Result<()> {
    let args: Args = argh::from_env();
    // `Some(threads)`: run on the epoll engine (module `pairs`), as `pairs` and `fanout` do.
    let mut epoll_threads = None;
    let (common, plan) = match args.cmd {
        Cmd::Conn(a) => return run_conn(a),
        Cmd::Suback(a) => return run_suback(a),
        Cmd::Handshakes(a) => return run_handshakes(a),
        Cmd::Takeover(a) => return run_takeover(a),
        Cmd::Sessions(a) => return run_sessions(a),
        Cmd::Fanin(a) => {
            let mut p = base_plan(&a.common(), "fanin", a.qos, a.payload, a.duration_s)?;
            let each = a.rate.map(|r| r / a.publishers.max(1) as f64);
            p.publishers = (0..a.publishers).map(|i| spec(format!("bench/fanin/{i}"), each)).collect();
            p.subscribers = vec!["bench/fanin/+".into()];
            p.window = a.window;
            (a.common(), p)
        }
        Cmd::Fanout(a) => {
            let mut p = base_plan(&a.common(), "fanout", a.qos, a.payload, a.duration_s)?;
            p.publishers = vec![spec("bench/fanout".into(), Some(a.rate))];
            p.subscribers = vec!["bench/fanout".into(); a.subscribers];
            p.copies_per_msg = a.subscribers as u64;
            p.each_receiver = true;
            p.window = a.window;
            // Hundreds of subscriber threads would wait for the scheduler, and that wait is the tail.
            epoll_threads = Some(a.threads);
            (a.common(), p)
        }
        Cmd::Pairs(a) => {
            let mut p = base_plan(&a.common(), "pairs", a.qos, a.payload, a.duration_s)?;
            p.publishers = (0..a.pairs).map(|i| spec(format!("bench/pairs/{i}"), Some(a.rate))).collect();
            p.subscribers = (0..a.pairs).map(|i| format!("bench/pairs/{i}")).collect();
            p.window = a.window;
            epoll_threads = Some(a.threads);
            (a.common(), p)
        }
        Cmd::Shared(a) => {
            let mut p = base_plan(&a.common(), "shared", a.qos, a.payload, a.duration_s)?;
            p.publishers = vec![spec("bench/shared".into(), a.rate)];
            p.subscribers = vec!["$share/g/bench/shared".into(); a.members];
            p.window = a.window;
            (a.common(), p)
        }
        Cmd::Pub(a) => {
            let mut p = base_plan(&a.common(), "pub", a.qos, a.payload, a.duration_s)?;
            p.publishers = vec![PubSpec { topic: a.topic.clone(), rate: a.rate, max_msgs: Some(a.count) }];
            p.copies_per_msg = 0;
            (a.common(), p)
        }
        Cmd::Sub(a) => {
            let mut p = base_plan(&a.common(), "sub", a.qos, 16, a.duration_s)?;
            p.subscribers = vec![a.topic.clone()];
            p.stop_after_delivered = a.count;
            (a.common(), p)
        }
    };
    let report = match epoll_threads {
        Some(t) => pairs::run(&plan, t)?,
        None => engine::run(&plan)?,
    };
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_run(&report);
    }
    if report.lost.unwrap_or(0) > 0 || !report.errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn run_conn(a: ConnCmd) -> Result<()> {
    let c = a.common();
    let plan = ConnPlan {
        addr: resolve(&c.host, c.port)?,
        protocol: protocol_from(c.protocol)?,
        count: a.count,
        rate: a.rate,
        hold: secs(a.hold_s, "--hold-s")?,
        threads: a.threads,
        timeout: secs(a.timeout_s, "--timeout-s")?,
        broker_pid: c.broker_pid,
        progress: true,
        username: c.username.clone(),
        password: c.password.clone(),
    };
    if c.tls_ca.is_some() {
        bail!("conn speaks plain TCP only; `handshakes` measures TLS connections");
    }
    let report = conn::run(&plan)?;
    if c.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_conn(&report);
    }
    if report.connected < report.requested {
        std::process::exit(1);
    }
    Ok(())
}

fn run_suback(a: SubackCmd) -> Result<()> {
    let c = a.common();
    let r = shardmq_perf::suback::run(
        resolve(&c.host, c.port)?,
        protocol_from(c.protocol)?,
        &c.dial(true)?,
        qos(a.qos)?,
        a.count,
    )?;
    if c.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let l = &r.latency_us;
        println!(
            "suback: {} new filters, SUBSCRIBE to SUBACK us p50 {} p90 {} p99 {} max {} (mean {:.0})",
            r.subscribes, l.p50_us, l.p90_us, l.p99_us, l.max_us, l.mean_us
        );
    }
    Ok(())
}

fn run_handshakes(a: HandshakesCmd) -> Result<()> {
    let c = a.common();
    let plan = HandshakePlan {
        addr: resolve(&c.host, c.port)?,
        protocol: protocol_from(c.protocol)?,
        dial: c.dial(false)?,
        threads: a.threads,
        duration: secs(a.duration_s, "--duration-s")?,
        broker_pid: c.broker_pid,
        progress: true,
    };
    let r = tls::handshakes(&plan)?;
    if c.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_handshakes(&r);
    }
    if r.connected == 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn run_takeover(a: TakeoverCmd) -> Result<()> {
    let c = a.common();
    let plan = TakeoverPlan {
        addr: resolve(&c.host, c.port)?,
        other: resolve(&c.host, a.other_port.unwrap_or(c.port))?,
        protocol: protocol_from(c.protocol)?,
        dial: c.dial(true)?,
        ids: a.ids,
        count: a.count,
        duration: secs(a.duration_s, "--duration-s")?,
        queued: a.queued,
        subscribe: !a.no_subscribe,
        expiry_s: a.expiry_s,
        progress: true,
    };
    let r = takeover::run(&plan)?;
    if c.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let l = &r.latency_us;
        println!(
            "takeover ({}): MQTT level {}, {} ids, {} of {} accepted in {:.2} s",
            if r.cross { "across two ports" } else { "one port" },
            r.protocol,
            r.ids,
            r.accepted,
            r.attempted,
            r.window_s
        );
        println!(
            "  CONNECT to CONNACK us p50 {} p90 {} p99 {} max {} (mean {:.0})",
            l.p50_us, l.p90_us, l.p99_us, l.max_us, l.mean_us
        );
        println!("  old connections: {} DISCONNECT 0x8E, {} closed", r.old_disconnected, r.old_closed);
        if r.queued > 0 {
            println!(
                "  messages: {} sent to the sessions, {} received again, {} missing",
                r.messages_sent, r.messages_received, r.messages_missing
            );
        }
        for (k, v) in &r.failures {
            println!("  failed ({k}): {v}");
        }
        for e in &r.errors {
            println!("  error: {e}");
        }
    }
    if r.accepted == 0 || !r.failures.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn run_sessions(a: SessionsCmd) -> Result<()> {
    let c = a.common();
    let plan = SessionsPlan {
        addr: resolve(&c.host, c.port)?,
        protocol: protocol_from(c.protocol)?,
        dial: c.dial(true)?,
        prefix: a.prefix.clone(),
        count: a.count,
        threads: a.threads,
        subscribe: a.subscribe,
        expiry_s: a.expiry_s,
        duration: secs(a.duration_s, "--duration-s")?,
        progress: true,
    };
    let r = takeover::create(&plan)?;
    if c.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let l = &r.connect_latency_us;
        println!(
            "sessions: MQTT level {}, {} of {} made in {:.2} s ({:.0}/s), {} already present",
            r.protocol, r.created, r.requested, r.window_s, r.rate, r.already_present
        );
        println!("  connect to CONNACK us p50 {} p99 {} max {}", l.p50_us, l.p99_us, l.max_us);
        for (k, v) in &r.failures {
            println!("  failed ({k}): {v}");
        }
        for e in &r.errors {
            println!("  error: {e}");
        }
    }
    if r.created < r.requested {
        std::process::exit(1);
    }
    Ok(())
}

fn print_handshakes(r: &HandshakeReport) {
    println!(
        "handshakes: MQTT level {}, {}, {} threads: {} connections in {:.2} s ({:.0}/s)",
        r.protocol,
        if r.tls { "TLS (full handshakes)" } else { "plain TCP" },
        r.threads,
        r.connected,
        r.window_s,
        r.connect_rate
    );
    let l = &r.connect_latency_us;
    println!("  connect to CONNACK us p50 {} p99 {} max {}", l.p50_us, l.p99_us, l.max_us);
    for (k, v) in &r.failures {
        println!("  failed ({k}): {v}");
    }
    if let Some(b) = &r.broker {
        println!(
            "  broker pid {}: cpu {} s, {} us/connection",
            b.pid,
            opt(b.cpu_s.map(|v| format!("{v:.2}"))),
            opt(b.cpu_us_per_msg.map(|v| format!("{v:.1}")))
        );
    }
    for e in &r.errors {
        println!("  error: {e}");
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn print_run(r: &RunReport) {
    println!(
        "{}: MQTT level {}, QoS {}, {} B payload, {} publishers, {} subscribers, {:.2} s",
        r.scenario, r.protocol, r.qos, r.payload_bytes, r.publishers, r.subscribers, r.window_s
    );
    println!("  sent       {:>12} ({:.0} msg/s), acked {}", r.sent, r.sent_per_s, r.acked);
    println!("  delivered  {:>12} ({:.0} msg/s), expected {}", r.delivered, r.delivered_per_s, r.expected);
    println!("  lost       {:>12}   duplicates {}", opt(r.lost), r.duplicates);
    let l = &r.latency_us;
    println!(
        "  latency us p50 {} p90 {} p99 {} p99.9 {} max {} (mean {:.0}, n={})",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us, l.count
    );
    if r.subscribers > 1 {
        println!("  per subscriber min {} max {}", r.per_subscriber_min, r.per_subscriber_max);
    }
    if let Some(b) = &r.broker {
        println!(
            "  broker pid {}: cpu {} s, {} us/msg, rss {} -> {} kB",
            b.pid,
            opt(b.cpu_s.map(|v| format!("{v:.2}"))),
            opt(b.cpu_us_per_msg.map(|v| format!("{v:.2}"))),
            opt(b.rss_before_kb),
            opt(b.rss_after_kb)
        );
    }
    for b in &r.peers {
        println!(
            "  peer pid {}: cpu {} s, {} us/msg",
            b.pid,
            opt(b.cpu_s.map(|v| format!("{v:.2}"))),
            opt(b.cpu_us_per_msg.map(|v| format!("{v:.2}")))
        );
    }
    let w = &r.host.wake_late_us;
    println!(
        "  host: steal {}%, a 1 ms sleep wakes late by p50 {} p99 {} max {} us",
        opt(r.host.steal_pct.map(|v| format!("{v:.1}"))),
        w.p50_us,
        w.p99_us,
        w.max_us
    );
    for e in &r.errors {
        println!("  error: {e}");
    }
}

fn print_conn(r: &ConnReport) {
    println!(
        "conn: MQTT level {}, {} of {} connected in {:.2} s ({:.0}/s), held {:.1} s, {} dropped while held",
        r.protocol, r.connected, r.requested, r.open_s, r.connect_rate, r.held_s, r.dropped_during_hold
    );
    let l = &r.connect_latency_us;
    println!("  connect+CONNACK us p50 {} p99 {} max {}", l.p50_us, l.p99_us, l.max_us);
    for (k, v) in &r.failures {
        println!("  failed ({k}): {v}");
    }
    if let Some(b) = &r.broker {
        println!(
            "  broker pid {}: rss {} -> {} kB ({} B/conn), slab {} -> {} kB ({} B/conn), cpu {} s",
            b.pid,
            opt(b.rss_before_kb),
            opt(b.rss_after_kb),
            opt(b.rss_bytes_per_conn.map(|v| format!("{v:.0}"))),
            opt(b.slab_before_kb),
            opt(b.slab_after_kb),
            opt(b.slab_bytes_per_conn.map(|v| format!("{v:.0}"))),
            opt(b.cpu_s.map(|v| format!("{v:.2}")))
        );
    }
}
