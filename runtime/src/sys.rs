//! Thin, safe wrappers over the libc calls both backends share: listeners with `SO_REUSEPORT`, nonblocking
//! `send`/`recv`, `accept4`, eventfds, CPU affinity and the graceful close used after a flush.
//!
//! Every function here is a single syscall (or a short fixed sequence) with errno turned into
//! [`io::Error`]; nothing here keeps state or knows about connections, cores or rings.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Turns a `-1`-on-error libc return into an [`io::Result`].
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the kernel wrote a sockaddr_in; storage is large and aligned enough.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the kernel wrote a sockaddr_in6; storage is large and aligned enough.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "unsupported address family")),
    }
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed along.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const _ as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A listening TCP socket with `SO_REUSEADDR` and `SO_REUSEPORT`, so every shard can bind the same port and
/// the kernel spreads incoming connections over them. Nonblocking because the epoll backend accepts in a loop
/// until `EAGAIN`; io_uring does not care.
pub(crate) fn bind_listener(addr: SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall; the returned fd is checked before being wrapped.
    let raw = cvt(unsafe {
        libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0)
    })?;
    // SAFETY: `raw` is a freshly created fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    if addr.is_ipv6() {
        set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    let (storage, len) = to_sockaddr(&addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    cvt(unsafe { libc::bind(raw, &storage as *const _ as *const libc::sockaddr, len) })?;
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::listen(raw, backlog) })?;
    Ok(fd)
}

/// Whether some socket still listens on `addr` (a bind without `SO_REUSEPORT` fails with `EADDRINUSE`).
/// `SO_REUSEADDR` keeps connections in TIME_WAIT from counting.
pub(crate) fn port_is_held(addr: SocketAddr) -> bool {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall; the returned fd is checked before being wrapped.
    let Ok(raw) = cvt(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) }) else {
        return false;
    };
    // SAFETY: `raw` is a freshly created fd that nothing else owns; it is closed on drop.
    let _fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).is_err() {
        return false;
    }
    if addr.is_ipv6() && set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).is_err() {
        return false;
    }
    let (storage, len) = to_sockaddr(&addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::bind(raw, &storage as *const _ as *const libc::sockaddr, len) };
    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EADDRINUSE)
}

/// Prepares an accepted client socket. `TCP_NODELAY`: MQTT packets are small and latency-bound; with Nagle's
/// algorithm a PUBLISH written while an earlier segment is unacknowledged waits for the peer's (possibly
/// delayed) ACK, which showed up as millisecond tail latency. Failure is harmless, so it is only logged.
pub(crate) fn prepare_client(fd: RawFd) {
    if let Err(e) = set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1) {
        tracing::debug!(error = %e, "TCP_NODELAY not set on a client socket");
    }
}

/// The address a socket is bound to (resolves port 0).
pub(crate) fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; the kernel writes at most `len` bytes into it.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage/len describe a writable buffer of the right size.
    cvt(unsafe { libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) })?;
    from_sockaddr(&storage)
}

/// `accept4` without the peer address. `nonblocking` is what the epoll backend wants for client sockets.
pub(crate) fn accept(listener: RawFd, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = libc::SOCK_CLOEXEC;
    if nonblocking {
        flags |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: null address pointers are allowed by accept4.
    let raw = cvt(unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), flags) })?;
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The address of a connected socket's peer.
pub(crate) fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; the kernel writes at most `len` bytes into it.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage/len describe a writable buffer of the right size.
    cvt(unsafe { libc::getpeername(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) })?;
    from_sockaddr(&storage)
}

/// Nonblocking `send` that never raises `SIGPIPE` (a peer reset must become an error, not kill the process).
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
        match cvt_size(unsafe { libc::send(fd, buf.as_ptr() as *const libc::c_void, buf.len(), flags) }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

/// Nonblocking `recv`; `Ok(0)` is end of stream.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let (ptr, len) = (buf.as_mut_ptr() as *mut libc::c_void, buf.len());
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        match cvt_size(unsafe { libc::recv(fd, ptr, len, libc::MSG_DONTWAIT) }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

pub(crate) fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL/F_SETFL on an fd the caller keeps open.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
}

/// Closes a client socket whose output was flushed (or given up on): sends FIN first and discards what the
/// peer sent that nobody will read, because closing with unread bytes queued makes the kernel send RST,
/// and an RST can destroy the last bytes we wrote before the peer reads them.
pub(crate) fn close_gracefully(fd: OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: plain syscalls on an fd we own; errors are irrelevant since we close right after.
    unsafe {
        libc::shutdown(raw, libc::SHUT_WR);
    }
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        match recv(raw, &mut scratch) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    drop(fd);
}

/// A nonblocking, close-on-exec eventfd used to wake a sleeping shard.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is checked before being wrapped.
    let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Adds one to an eventfd's counter. Errors are ignored: the only possible one (`EAGAIN` at a counter of
/// 2^64-2) means the target is already awake-pending.
pub(crate) fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    unsafe {
        libc::write(fd, &one as *const u64 as *const libc::c_void, 8);
    }
}

/// Resets an eventfd's counter (nonblocking; a zero counter just returns `EAGAIN`).
pub(crate) fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe {
        libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8);
    }
}

/// The CPUs this process may run on, in ascending order.
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain old data; zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    let max = 8 * mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET only reads `set` within its bounds (cpu < CPU_SETSIZE).
    Ok((0..max).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
}

/// Pins the calling thread to one CPU.
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: zeroed cpu_set_t is the empty set; CPU_SET writes within it for cpu < CPU_SETSIZE
    // (callers pass a CPU returned by `allowed_cpus`).
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: see above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    cvt(unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) }).map(drop)
}

/// The soft `RLIMIT_NOFILE`, for a default socket cap that leaves room for the runtime's own fds.
pub(crate) fn nofile_limit() -> Option<u64> {
    // SAFETY: rlimit is plain old data; getrlimit writes into it.
    let mut lim: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: `lim` is a writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
        Some(lim.rlim_cur as u64)
    } else {
        None
    }
}

/// Whether an errno means "try again when the socket is ready" on a nonblocking socket.
pub(crate) fn would_block(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

/// Starts a nonblocking TCP connect (`TCP_NODELAY` set): the socket becomes writable when it completes,
/// and [`take_socket_error`] then says whether it succeeded. Never blocks, whatever the peer does.
pub(crate) fn connect_nonblocking(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket creation; the fd is owned right below.
    let raw = cvt(unsafe { libc::socket(family, ty, 0) })?;
    // SAFETY: socket returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    prepare_client(raw);
    let (storage, len) = to_sockaddr(&addr);
    // SAFETY: storage/len describe a valid socket address.
    let rc = unsafe { libc::connect(raw, &storage as *const _ as *const libc::sockaddr, len) };
    if rc == 0 {
        return Ok(fd);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(fd)
    } else {
        Err(e)
    }
}

/// The pending error of a socket (`SO_ERROR`): how a nonblocking connect ended.
pub(crate) fn take_socket_error(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err/len describe a writable c_int.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut len,
        )
    })?;
    if err == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_port_is_held_until_its_socket_closes() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(l.as_raw_fd()).unwrap();
        assert!(port_is_held(addr));
        drop(l);
        assert!(!port_is_held(addr));
    }
}
