//! Socket set-up shared by the blocking clients and the epoll loop: source-address rotation and
//! bind-before-connect.
//!
//! One source address gives at most ~28k ephemeral ports towards one listener, so large runs spread
//! connections over 127.0.0.2, 127.0.0.3, ... (all of 127/8 is loopback on Linux). Only loopback is ever
//! bound; towards a non-loopback broker the kernel picks the source as usual.

use anyhow::{anyhow, Context, Result};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Connections per source address before moving to the next one.
pub const CONNS_PER_SOURCE: u64 = 20_000;

pub fn resolve(host: &str, port: u16) -> Result<SocketAddrV4> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .find_map(|a| match a {
            std::net::SocketAddr::V4(v4) => Some(v4),
            _ => None,
        })
        .ok_or_else(|| anyhow!("{host} has no IPv4 address"))
}

/// Source address for the `index`-th connection towards `dst`: `None` unless `dst` is loopback.
pub fn source_for(dst: SocketAddrV4, index: u64) -> Option<Ipv4Addr> {
    if !dst.ip().is_loopback() {
        return None;
    }
    // 127.0.0.2 ..= 127.0.0.254, then wrap; 250 * 20k is far beyond any open-files limit.
    let n = (index / CONNS_PER_SOURCE) % 253;
    Some(Ipv4Addr::new(127, 0, 0, 2 + n as u8))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// A TCP socket bound to `src` (port chosen at connect time) with `connect` started. Non-blocking sockets
/// return as soon as the handshake is under way (EINPROGRESS is not an error here).
pub fn start_connect(src: Option<Ipv4Addr>, dst: SocketAddrV4, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket(2); the fd is owned immediately.
    let fd = unsafe { OwnedFd::from_raw_fd(cvt(libc::socket(libc::AF_INET, flags, 0))?) };
    let one: libc::c_int = 1;
    let setopt = |level, name| {
        // SAFETY: `one` outlives the call and the length matches its type.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
    };
    // Latency numbers are meaningless with Nagle batching small publishes.
    setopt(libc::IPPROTO_TCP, libc::TCP_NODELAY)?;
    if let Some(src) = src {
        // Defer port choice to connect(), so ports are unique per (src, dst) rather than per src.
        setopt(libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT)?;
        let sa = sockaddr(SocketAddrV4::new(src, 0));
        // SAFETY: `sa` is a valid sockaddr_in of the stated length.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        })?;
    }
    let sa = sockaddr(dst);
    // SAFETY: as above.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if !(nonblocking && e.raw_os_error() == Some(libc::EINPROGRESS)) {
            return Err(e);
        }
    }
    Ok(fd)
}

/// A blocking stream for the `index`-th connection, with read and write timeouts so reader loops and a
/// publisher stuck on a broker that stopped reading can notice a stop request.
pub fn connect_blocking(dst: SocketAddrV4, index: u64) -> io::Result<TcpStream> {
    let s = TcpStream::from(start_connect(source_for(dst, index), dst, false)?);
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    s.set_write_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

/// Raises the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `rl` is a valid rlimit for both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    rl.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_only_on_loopback() {
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1883);
        assert_eq!(source_for(lo, 0), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_for(lo, 19_999), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_for(lo, 20_000), Some(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(source_for(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1883), 0), None);
    }

    #[test]
    fn connects_from_rotated_source() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let _c = connect_blocking(dst, CONNS_PER_SOURCE).unwrap();
        let (_, peer) = l.accept().unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.3");
    }
}
