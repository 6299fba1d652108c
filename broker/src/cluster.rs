//! The cluster flags: from `--cluster-listen` and friends to a bound cluster port, a zone and a gateway
//! ready for the runtime's cluster thread. No `--cluster-listen`: a single node, exactly as before.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use shardmq_cluster::gateway::{Gateway, GatewayConfig};
use shardmq_cluster::{MembershipConfig, NodeIdentity, Zone, ZoneConfig};
use shardmq_runtime::cluster::ClusterSockets;

/// The cluster's part of the command line (see `Args`).
pub struct ClusterArgs {
    pub node_name: Option<String>,
    pub listen: Option<String>,
    pub join: Vec<String>,
    pub zone: String,
    pub region: String,
    pub secret_file: Option<PathBuf>,
    pub partition_mode: shardmq_cluster::registrar::PartitionMode,
}

/// A node about to join its zone: the bound sockets and the gateway, before the shards start.
pub struct ClusterSetup {
    pub sockets: ClusterSockets,
    pub gateway: Gateway,
}

/// Per-peer link backlog: what a slow or unreachable-but-not-yet-down peer may hold of this node's
/// forwards (unacknowledged: in the sockets' buffers or not yet handled by the peer). Past half of it the
/// node pauses its publishers; past all of it forwards are dropped (and counted). Small, because what is
/// in flight when a subscriber over there congests must fit in its queue's headroom; a LAN needs far
/// less (bandwidth × round trip).
const LINK_BUDGET_BYTES: usize = 1 << 20;

impl ClusterArgs {
    /// `None` when the node is not clustered. `shards` and `persistent` describe the node.
    pub fn setup(&self, shards: u16, persistent: bool) -> Result<Option<ClusterSetup>> {
        let Some(listen) = &self.listen else {
            if !self.join.is_empty() || self.secret_file.is_some() {
                bail!("--join and --cluster-secret-file need --cluster-listen");
            }
            return Ok(None);
        };
        let addr = resolve_one(listen, "--cluster-listen")?;
        let secret = match &self.secret_file {
            Some(f) => Some(read_secret(f)?),
            None => None,
        };
        if secret.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "the cluster listens on a non-loopback address without --cluster-secret-file: anyone who \
                 reaches this port can join the cluster and read every message"
            );
        }
        let seeds = self.join.iter().map(|j| resolve_one(j, "--join")).collect::<Result<Vec<_>>>()?;
        let name = match &self.node_name {
            Some(n) if n.is_empty() || n.len() > 255 => bail!("--node-name must be 1 to 255 bytes"),
            Some(n) => n.clone(),
            None => host_name().context("no --node-name and the host name is unknown")?,
        };
        for (flag, v) in [("--zone", &self.zone), ("--region", &self.region)] {
            if v.is_empty() || v.len() > 255 {
                bail!("{flag} must be 1 to 255 bytes");
            }
        }
        let sockets =
            ClusterSockets::bind(addr).with_context(|| format!("binding --cluster-listen {addr}"))?;
        let actual = sockets.local_addr();
        if actual.ip().is_unspecified() && seeds.is_empty() {
            tracing::warn!(%actual, "the cluster listens on an unspecified address: peers learn it as is");
        }
        // A new life on every start: the zone declares the old one down instead of mixing the two.
        let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let incarnation = wall_ms.wrapping_mul(1000) + (std::process::id() as u64 % 1000);
        let identity = NodeIdentity::new(&name, actual, &self.zone, &self.region, incarnation);
        let now = Instant::now();
        let zone = Zone::new(
            ZoneConfig {
                identity,
                secret,
                seeds,
                membership: MembershipConfig::default(),
                link_budget_bytes: LINK_BUDGET_BYTES,
                heartbeat: Duration::from_millis(250),
                link_timeout: Duration::from_millis(1500),
            },
            os_random_u64().context("reading the OS random source for link nonces")?,
            now,
        );
        let gateway = Gateway::new(
            GatewayConfig {
                shards,
                persistent,
                wall_ms_at_start: wall_ms,
                partition_mode: self.partition_mode,
            },
            zone,
            now,
        );
        Ok(Some(ClusterSetup { sockets, gateway }))
    }
}

fn resolve_one(s: &str, flag: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("{flag} {s:?}"))?
        .next()
        .with_context(|| format!("{flag} {s:?} resolves to no address"))
}

/// The secret's bytes, without the trailing newline editors add.
fn read_secret(path: &PathBuf) -> Result<Vec<u8>> {
    let mut s = std::fs::read(path).with_context(|| format!("--cluster-secret-file {}", path.display()))?;
    while s.last().is_some_and(|b| b.is_ascii_whitespace()) {
        s.pop();
    }
    if s.len() < 16 {
        bail!("--cluster-secret-file {}: the secret must be at least 16 bytes", path.display());
    }
    Ok(s)
}

pub(crate) fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are valid; gethostname NUL-terminates within it on success.
    if unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok().filter(|s| !s.is_empty())
}

/// Seeds the zone's generator (link handshake nonces, jitter): it must not be guessable, or a recorded
/// handshake could be replayed.
fn os_random_u64() -> Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
