//! TLS for the load generator's clients (`--tls-ca`, optionally `--tls-cert`/`--tls-key`): rustls with the
//! ring provider, as the broker uses, TLS 1.3 or 1.2 as the server prefers.
//!
//! A TLS session cannot be split between a reading and a writing thread the way a TCP socket is (one
//! `try_clone` each), so:
//! - the blocking clients ([`crate::client`]) keep the whole session behind the writer's lock and read
//!   through it too. That is right only where one thread uses a connection: subscribers (they read and
//!   acknowledge in one thread) and QoS 0 publishers (they only write). The blocking engine refuses TLS for
//!   publishers at QoS 1/2, whose acknowledgements another thread reads;
//! - the epoll engine ([`crate::pairs`]: `pairs`, `fanout`) owns each connection in one thread and drives
//!   the session sans I/O ([`rustls::ClientConnection`] over the non-blocking socket), any QoS.
//!
//! [`handshakes`] measures new connections per second: TCP connect, the TLS handshake (a full one each
//! time: resumption is disabled) and CONNECT/CONNACK, then DISCONNECT and close.

use crate::client::{Client, Dial};
use crate::engine::Probes;
use crate::host::HostNoise;
use crate::procfs::BrokerUsage;
use crate::stats::{self, LatencySummary};
use anyhow::{anyhow, bail, Context, Result};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use serde::Serialize;
use shardmq_wire::Protocol;
use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddrV4, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// What every TLS connection of a run uses: the client settings and the name the certificate must carry.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// ring, as the broker uses. rustls 0.23.48 marks its provider deprecated (it has no post-quantum key
/// exchange); that does not matter for a load generator on loopback.
///
/// Key exchange groups in the order OpenSSL, BoringSSL and Go clients offer them (X25519 first): ring's
/// default list puts P-384 first, and a TLS 1.3 server takes the client's first group it supports, so
/// every handshake would have paid ring's P-384 (no assembly for it: some 600 µs of a 745 µs handshake
/// of the broker's on this host), which the clients an operator runs do not.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(p)
}

fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(file)
        .with_context(|| format!("reading {}", file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", file.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", file.display());
    }
    Ok(certs)
}

/// Client settings from PEM files: the CA to trust, and optionally a client certificate chain and key.
/// `resumption: false` makes every handshake a full one.
pub fn load(ca: &Path, client: Option<(&Path, &Path)>, server_name: &str, resumption: bool) -> Result<Tls> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let chain = certificates(cert)?;
            let key =
                PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key).context("client certificate and key")?
        }
        None => builder.with_no_client_auth(),
    };
    if !resumption {
        config.resumption = Resumption::disabled();
    }
    let server_name =
        ServerName::try_from(server_name.to_string()).map_err(|e| anyhow!("--tls-server-name: {e}"))?;
    Ok(Tls { config: Arc::new(config), server_name })
}

/// A socket timeout (or an interrupted call): try again.
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// Runs the handshake over a blocking socket that has a read timeout, until it completes or `deadline`.
pub fn handshake(tls: &Tls, sock: &mut TcpStream, deadline: Instant) -> Result<ClientConnection> {
    let mut conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())?;
    while conn.is_handshaking() {
        if Instant::now() > deadline {
            bail!("TLS handshake timed out");
        }
        match conn.complete_io(sock) {
            Ok(_) => {}
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(anyhow!("TLS handshake: {e}")),
        }
    }
    // The client's last flight (TLS 1.3 Finished) may still be buffered.
    while conn.wants_write() {
        conn.write_tls(sock).context("TLS handshake")?;
    }
    Ok(conn)
}

/// What a `handshakes` run asks for.
pub struct HandshakePlan {
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
    /// TLS (with resumption disabled) or plain TCP, and the credentials.
    pub dial: Dial,
    pub threads: usize,
    pub duration: Duration,
    pub broker_pid: Option<u32>,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct HandshakeReport {
    pub scenario: String,
    pub protocol: u8,
    pub tls: bool,
    pub threads: usize,
    pub window_s: f64,
    /// Connections that got a successful CONNACK.
    pub connected: u64,
    /// `connected / window_s`.
    pub connect_rate: f64,
    pub failures: BTreeMap<String, u64>,
    /// From connect() to CONNACK (TCP and TLS handshakes, CONNECT, CONNACK).
    pub connect_latency_us: LatencySummary,
    /// CPU per connection (`cpu_us_per_msg` counts connections here).
    pub broker: Option<BrokerUsage>,
    pub host: HostNoise,
    /// The first few failures, verbatim.
    pub errors: Vec<String>,
}

/// Most failures kept verbatim in the report.
const MAX_ERRORS: usize = 10;

/// The reason a failed connection is counted under: its message up to the first colon or digit, so that
/// messages differing only in an address or number fall together.
fn reason_of(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    let cut = s.find(|c: char| c == ':' || c.is_ascii_digit()).unwrap_or(s.len());
    let r = s[..cut].trim();
    if r.is_empty() {
        "other".into()
    } else {
        r.to_string()
    }
}

/// Opens and closes connections from `plan.threads` threads, one at a time each, for `plan.duration`.
pub fn handshakes(plan: &HandshakePlan) -> Result<HandshakeReport> {
    if plan.threads == 0 {
        bail!("--threads must be positive");
    }
    let tag = format!("smqh{}", std::process::id());
    let stop = AtomicBool::new(false);
    let probes = Probes::of(plan.broker_pid, &[]);
    let t0 = Instant::now();
    let per_thread = thread::scope(|s| {
        let handles: Vec<_> = (0..plan.threads)
            .map(|t| {
                let (stop, tag) = (&stop, &tag);
                s.spawn(move || {
                    let mut hist = stats::new_histogram();
                    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
                    let mut errors = Vec::new();
                    let mut n = 0u64;
                    // Bounded by the stop flag (set after the duration) and each attempt's own timeouts.
                    while !stop.load(Relaxed) {
                        let started = Instant::now();
                        let id = format!("{tag}-{t}-{n}");
                        n += 1;
                        match Client::connect(plan.addr, &id, plan.protocol, &plan.dial) {
                            Ok(cl) => {
                                stats::record(&mut hist, started.elapsed().as_micros() as u64);
                                cl.close();
                            }
                            Err(e) => {
                                *failures.entry(reason_of(&e)).or_default() += 1;
                                if errors.len() < MAX_ERRORS {
                                    errors.push(format!("{e:#}"));
                                }
                                // A broker that refuses everything must not be hammered in a tight loop.
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                    (hist, failures, errors)
                })
            })
            .collect();
        let _stop = crate::guard::StopOnDrop(&stop);
        let mut last = Instant::now();
        while t0.elapsed() < plan.duration {
            thread::sleep(Duration::from_millis(20).min(plan.duration.saturating_sub(t0.elapsed())));
            if plan.progress && last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                crate::guard::progress(format_args!("[{:6.1}s] handshaking", t0.elapsed().as_secs_f64()));
            }
        }
        stop.store(true, Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("handshake thread panicked")))
            .collect::<Vec<_>>()
    });
    let window = t0.elapsed().as_secs_f64();
    let mut hist = stats::new_histogram();
    let mut failures = BTreeMap::new();
    let mut errors = Vec::new();
    for r in per_thread {
        let (h, f, e) = r?;
        let _ = hist.add(&h);
        for (k, v) in f {
            *failures.entry(k).or_default() += v;
        }
        errors.extend(e);
    }
    errors.truncate(MAX_ERRORS);
    let connected = hist.len();
    let (broker, host) = probes.finish(connected);
    Ok(HandshakeReport {
        scenario: "handshakes".into(),
        protocol: plan.protocol.level(),
        tls: plan.dial.tls.is_some(),
        threads: plan.threads,
        window_s: window,
        connected,
        connect_rate: connected as f64 / window.max(1e-9),
        failures,
        connect_latency_us: LatencySummary::of(&hist),
        broker,
        host,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../transport/tests/certs")
    }

    #[test]
    fn offers_x25519_first_as_mainstream_clients_do() {
        let groups: Vec<_> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups[0], rustls::NamedGroup::X25519, "{groups:?}");
    }

    #[test]
    fn loads_the_test_ca_and_client_pair() {
        let d = certs();
        load(&d.join("ca.pem"), None, "localhost", false).unwrap();
        load(&d.join("ca.pem"), Some((&d.join("client.pem"), &d.join("client.key"))), "localhost", true)
            .unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let d = certs();
        let e = load(&d.join("missing.pem"), None, "localhost", false).err().unwrap();
        assert!(format!("{e:#}").contains("missing.pem"), "{e:#}");
        // A key is not a certificate.
        let e = load(&d.join("server.key"), None, "localhost", false).err().unwrap();
        assert!(format!("{e:#}").contains("server.key"), "{e:#}");
    }

    #[test]
    fn failure_reasons_fold_numbers_and_details() {
        assert_eq!(reason_of(&anyhow!("CONNACK refused: reason 0x86")), "CONNACK refused");
        assert_eq!(reason_of(&anyhow!("connect 127.0.0.1:1883")), "connect");
        assert_eq!(reason_of(&anyhow!("")), "other");
    }

    #[test]
    fn handshake_against_nothing_counts_failures_and_ends() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = certs();
        let plan = HandshakePlan {
            addr: SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port),
            protocol: Protocol::V5,
            dial: Dial {
                tls: Some(load(&d.join("ca.pem"), None, "localhost", false).unwrap()),
                ..Dial::default()
            },
            threads: 2,
            duration: Duration::from_millis(200),
            broker_pid: None,
            progress: false,
        };
        let t = Instant::now();
        let r = handshakes(&plan).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(r.connected, 0);
        assert!(r.failures.get("connect").copied().unwrap_or(0) > 0, "{r:?}");
        assert!(r.tls);
    }
}
