//! The 16-byte payload header every benchmark message carries, and the clock it is stamped with.
//!
//! CLOCK_MONOTONIC is one clock for every process on the host, so a subscriber in another process (or a
//! broker-side probe) can subtract a timestamp written by a publisher without any synchronisation.

/// Bytes taken by the header; a payload is never shorter than this.
pub const HEADER_LEN: usize = 16;

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

/// Overwrites the header of `buf` (which must already be `len` bytes, padding included) in place, so the
/// publisher reuses one buffer and pays only for the 16 bytes that change.
pub fn write_header(buf: &mut [u8], stamp: Stamp) {
    buf[0..4].copy_from_slice(&stamp.publisher.to_le_bytes());
    buf[4..8].copy_from_slice(&stamp.seq.to_le_bytes());
    buf[8..16].copy_from_slice(&stamp.sent_ns.to_le_bytes());
}

/// A new payload of `len` bytes (at least [`HEADER_LEN`]) carrying `stamp`; padding is a fixed byte so
/// compression-happy transports cannot shrink it to nothing unnoticed.
pub fn encode(stamp: Stamp, len: usize) -> Vec<u8> {
    let mut buf = vec![0xA5; len.max(HEADER_LEN)];
    write_header(&mut buf, stamp);
    buf
}

/// `None` for a payload too short to carry a header (a message from some other client).
pub fn decode(buf: &[u8]) -> Option<Stamp> {
    let h = buf.get(..HEADER_LEN)?;
    Some(Stamp {
        publisher: u32::from_le_bytes(h[0..4].try_into().ok()?),
        seq: u32::from_le_bytes(h[4..8].try_into().ok()?),
        sent_ns: u64::from_le_bytes(h[8..16].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let s = Stamp { publisher: 7, seq: 0xDEAD_BEEF, sent_ns: now_ns() };
        let p = encode(s, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(decode(&p), Some(s));
        assert!(p[16..].iter().all(|&b| b == 0xA5));
        // A requested size below the header still carries the header.
        assert_eq!(encode(s, 3).len(), HEADER_LEN);
        assert_eq!(decode(&p[..15]), None);
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a && a > 0);
    }
}
