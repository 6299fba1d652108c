//! `--metrics-listen`: Prometheus text format on `/metrics` and a liveness answer on `/healthz`, served by
//! a thread of its own over plain `std::net`. It only loads atomics the shards, the runtime and the
//! cluster thread publish (see `shardmq_shard::core::metrics`), so a scrape never stalls a shard.
//!
//! One request per connection, HTTP/1.1 `GET` only: a request over [`MAX_REQUEST`] bytes, or not complete
//! within [`READ_TIMEOUT`], or not a GET, gets a 400 (or 405) and the connection is closed. Connections
//! are served one at a time: a scraper is one client every few seconds, and a slow one is cut off by
//! the timeouts.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shardmq_runtime::cluster::{ClusterMetrics, CLUSTER_SERIES};
use shardmq_runtime::StatsReader;
use shardmq_shard::core::metrics::{Kind, SERIES};
use shardmq_shard::core::NodeShared;
use shardmq_storage::FLUSH_BUCKETS_US;
use shardmq_transport::TransportCounters;

/// A GET with the headers any scraper sends fits many times over.
const MAX_REQUEST: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint reads from, and the labels of every series.
pub struct Sources {
    pub shared: Arc<NodeShared>,
    pub runtime: StatsReader,
    pub cluster: Option<Arc<ClusterMetrics>>,
    pub transport: Arc<TransportCounters>,
    /// `node="..",zone="..",region=".."`, escaped.
    pub labels: String,
    pub started: Instant,
}

/// `node`, `zone` and `region` labels, values escaped as the text format asks.
pub fn node_labels(node: &str, zone: &str, region: &str) -> String {
    format!("node=\"{}\",zone=\"{}\",region=\"{}\"", escape(node), escape(zone), escape(region))
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Binds now (so that a bad address fails start-up) and serves from a new thread.
pub fn spawn(addr: SocketAddr, src: Sources) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("--metrics-listen {addr}"))?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    if let Err(e) = serve(s, &src) {
                        tracing::debug!(error = %e, "metrics request failed");
                    }
                }
                // Out of descriptors and the like: pause rather than spin.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })?;
    Ok(local)
}

fn serve(mut s: TcpStream, src: &Sources) -> std::io::Result<()> {
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read up to the end of the headers; the request has no body worth reading.
    let complete = loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if buf.len() > MAX_REQUEST || Instant::now() >= deadline {
            break false;
        }
        match s.read(&mut chunk) {
            Ok(0) => break false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    let (status, ctype, body) =
        if !complete { (400, "text/plain", "bad request\n".to_string()) } else { route(&buf, src) };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

/// Status, content type and body for a complete request head.
fn route(req: &[u8], src: &Sources) -> (u16, &'static str, String) {
    let line = req.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else { return (400, "text/plain", "bad request\n".into()) };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (400, "text/plain", "bad request\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return (400, "text/plain", "bad request\n".into());
    }
    if method != "GET" {
        return (405, "text/plain", "only GET\n".into());
    }
    // Query strings (`?name[]=...`) are ignored: every series is always returned.
    match target.split('?').next().unwrap_or_default() {
        "/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", render(src)),
        "/healthz" => (200, "text/plain", "ok".into()),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// The exposition: shard series (label `shard`), runtime series, node series, cluster series.
pub fn render(src: &Sources) -> String {
    let l = &src.labels;
    let mut out = String::with_capacity(16 * 1024);
    let shards: Vec<_> = src.shared.metrics.iter().map(|m| m.load()).collect();
    let mut last = "";
    for (i, s) in SERIES.iter().enumerate() {
        if s.name != last {
            header(&mut out, s.name, s.help, s.kind == Kind::Counter);
            last = s.name;
        }
        let extra = if s.labels.is_empty() { String::new() } else { format!(",{}", s.labels) };
        for (shard, v) in shards.iter().enumerate() {
            let _ = writeln!(out, "{}{{{l},shard=\"{shard}\"{extra}}} {}", s.name, v[i]);
        }
    }
    flush_histogram(&mut out, src);
    let rt = src.runtime.stats();
    type Get = fn(&shardmq_runtime::ShardStats) -> u64;
    let runtime: [(&str, bool, &str, Get); 9] = [
        ("shardmq_bytes_received_total", true, "Bytes read from client sockets.", |s| s.bytes_read),
        ("shardmq_bytes_sent_total", true, "Bytes written to client sockets.", |s| s.bytes_written),
        ("shardmq_sockets_accepted_total", true, "Client sockets accepted.", |s| s.accepted),
        ("shardmq_sockets_refused_total", true, "Client sockets refused: over the socket cap.", |s| {
            s.refused_over_cap
        }),
        ("shardmq_sockets_open", false, "Client sockets open.", |s| s.open_sockets),
        ("shardmq_mesh_sent_total", true, "Messages the runtime passed to other shards.", |s| s.mesh_sent),
        ("shardmq_mesh_full_retries_total", true, "Mesh sends retried on a full queue.", |s| {
            s.mesh_full_retries
        }),
        ("shardmq_handoffs_total", true, "Connections handed to the shard owning their client id.", |s| {
            s.handoffs
        }),
        ("shardmq_read_gate_closings_total", true, "Times a shard stopped reading its sockets.", |s| {
            s.read_gate_closings
        }),
    ];
    for (name, counter, help, get) in runtime {
        header(&mut out, name, help, counter);
        for s in &rt {
            let _ = writeln!(out, "{name}{{{l},shard=\"{}\"}} {}", s.shard.index(), get(s));
        }
    }
    let connected = src.shared.connections.load(std::sync::atomic::Ordering::Relaxed);
    header(&mut out, "shardmq_clients_connected", "Clients with an accepted CONNECT, node-wide.", false);
    let _ = writeln!(out, "shardmq_clients_connected{{{l}}} {connected}");
    header(&mut out, "shardmq_uptime_seconds", "Seconds since the node started.", false);
    let _ = writeln!(out, "shardmq_uptime_seconds{{{l}}} {}", src.started.elapsed().as_secs());
    header(&mut out, "shardmq_build_info", "The broker's version (value 1).", false);
    let _ = writeln!(out, "shardmq_build_info{{{l},version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    let t = &src.transport;
    let transport: [(&str, &str, &std::sync::atomic::AtomicU64); 5] = [
        ("shardmq_tls_handshakes_total", "TLS handshakes completed.", &t.tls_handshakes),
        (
            "shardmq_tls_failures_total",
            "TLS connections ended by a failed handshake or a bad record.",
            &t.tls_failures,
        ),
        ("shardmq_ws_upgrades_total", "WebSocket upgrades accepted.", &t.ws_upgrades),
        (
            "shardmq_ws_refused_total",
            "WebSocket upgrades refused (path, subprotocol, version).",
            &t.ws_refused,
        ),
        (
            "shardmq_ws_protocol_errors_total",
            "WebSocket connections closed for a text, oversized or malformed frame.",
            &t.ws_protocol_errors,
        ),
    ];
    for (name, help, v) in transport {
        header(&mut out, name, help, true);
        let _ = writeln!(out, "{name}{{{l}}} {}", v.load(std::sync::atomic::Ordering::Relaxed));
    }
    if let Some(c) = &src.cluster {
        let v = c.load();
        let mut last = "";
        for (i, (name, extra, counter, help)) in CLUSTER_SERIES.iter().enumerate() {
            if *name != last {
                header(&mut out, name, help, *counter);
                last = name;
            }
            let extra = if extra.is_empty() { String::new() } else { format!(",{extra}") };
            let _ = writeln!(out, "{name}{{{l}{extra}}} {}", v[i]);
        }
    }
    out
}

/// `shardmq_log_flush_seconds`: per shard, cumulative buckets as the text format wants them.
fn flush_histogram(out: &mut String, src: &Sources) {
    let l = &src.labels;
    let name = "shardmq_log_flush_seconds";
    let _ = writeln!(out, "# HELP {name} Time a log flush (fdatasync of the shard's records) took.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (shard, m) in src.shared.metrics.iter().enumerate() {
        let h = m.load_flush();
        let n = FLUSH_BUCKETS_US.len();
        let mut cumulative = 0;
        for (i, bound) in FLUSH_BUCKETS_US.iter().enumerate() {
            cumulative += h[i];
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{l},shard=\"{shard}\",le=\"{le}\"}} {cumulative}");
        }
        // The +Inf bucket is the count, read in the same load: never below the finite buckets.
        let count = cumulative + h[n];
        let _ = writeln!(out, "{name}_bucket{{{l},shard=\"{shard}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{l},shard=\"{shard}\"}} {}", h[n + 2] as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{l},shard=\"{shard}\"}} {count}");
    }
}

fn header(out: &mut String, name: &str, help: &str, counter: bool) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {}", if counter { "counter" } else { "gauge" });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        Sources {
            shared: Arc::new(NodeShared::new(2)),
            runtime: StatsReader::default(),
            cluster: Some(Arc::new(ClusterMetrics::default())),
            transport: Default::default(),
            labels: node_labels("n\"1", "z", "r"),
            started: Instant::now(),
        }
    }

    #[test]
    fn requests_are_routed_and_bad_ones_refused() {
        let src = sources();
        let get = |r: &str| route(r.as_bytes(), &src).0;
        assert_eq!(get("GET /healthz HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(get("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(get("GET /other HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(get("POST /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(get("GET /metrics\r\n\r\n"), 400);
        assert_eq!(get("\u{0}\u{ff}garbage\r\n\r\n"), 400);
        assert_eq!(route(&[0xff, 0xfe, b'\n'], &src).0, 400);
    }

    #[test]
    fn every_sample_has_its_type_and_the_node_labels() {
        let text = render(&sources());
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(typed.insert(rest.split(' ').next().unwrap().to_string()), "type twice: {line}");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s));
            assert!(
                typed.contains(name) || family.is_some_and(|f| typed.contains(f)),
                "no TYPE before {line}"
            );
            assert!(line.contains(r#"node="n\"1",zone="z",region="r""#), "{line}");
        }
        assert!(text.contains("shardmq_messages_dropped_total{"), "{text}");
        assert!(text.contains("shard=\"1\""), "two shards: {text}");
        assert!(text.contains("shardmq_cluster_forwarded_total{"), "{text}");
        assert!(text.contains("shardmq_cluster_registry_bytes_sent_total{"), "{text}");
        assert!(text.contains("shardmq_cluster_reregistrations_total{"), "{text}");
        assert!(
            text.contains(
                r#"shardmq_log_flush_seconds_bucket{node="n\"1",zone="z",region="r",shard="0",le="+Inf"} 0"#
            ),
            "{text}"
        );
    }
}
