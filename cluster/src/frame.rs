//! Gossip datagrams on the wire:
//!
//! ```text
//! magic "SMQG" | version u8 | flags u8 | body (foca's message) | tag (16 bytes, when flags & AUTH)
//! ```
//!
//! The tag is HMAC-SHA256 with the cluster secret over everything before it, truncated to 16 bytes
//! (RFC 2104 §5 allows truncation to half the hash; 128 bits is far beyond what an online forger can
//! try). A node with a secret accepts only datagrams tagged with the same secret; a node without one accepts
//! only untagged datagrams, so a cluster with and a cluster without a secret never merge by accident.
//! Every refusal has a reason ([`FrameError::reason`]) that the membership counts.

use ring::hmac;

pub const MAGIC: [u8; 4] = *b"SMQG";
/// Bumped with any change to the frame or to the body's encoding.
pub const VERSION: u8 = 1;
const AUTH: u8 = 0x01;
pub const TAG_LEN: usize = 16;
pub const HEADER_LEN: usize = 6;

/// The cluster secret (`--cluster-secret-file`), as an HMAC key.
pub struct Secret(hmac::Key);

impl Secret {
    pub fn new(bytes: &[u8]) -> Secret {
        Secret(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let full = hmac::sign(&self.0, data);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        t
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a shardmq gossip datagram (bad magic)")]
    BadMagic,
    #[error("gossip protocol version {0}, this node speaks version {VERSION}")]
    Version(u8),
    #[error("datagram shorter than its header or tag")]
    Truncated,
    #[error("datagram without the cluster secret's tag, and this node requires one")]
    Unauthenticated,
    #[error("datagram tagged with a cluster secret, and this node has none")]
    UnexpectedSecret,
    #[error("datagram tagged with another cluster secret")]
    WrongSecret,
}

impl FrameError {
    /// A short name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::BadMagic => "bad_magic",
            FrameError::Version(_) => "version",
            FrameError::Truncated => "truncated",
            FrameError::Unauthenticated => "unauthenticated",
            FrameError::UnexpectedSecret => "unexpected_secret",
            FrameError::WrongSecret => "wrong_secret",
        }
    }
}

/// Appends the framed datagram for `body` to `out`.
pub fn seal(secret: Option<&Secret>, body: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(if secret.is_some() { AUTH } else { 0 });
    out.extend_from_slice(body);
    if let Some(s) = secret {
        let tag = s.tag(&out[start..]);
        out.extend_from_slice(&tag);
    }
}

/// The body of a datagram, once its frame and (with a secret) its tag check out.
pub fn open<'a>(secret: Option<&Secret>, datagram: &'a [u8]) -> Result<&'a [u8], FrameError> {
    if datagram.len() < HEADER_LEN {
        return Err(if datagram.len() >= 4 && datagram[..4] != MAGIC {
            FrameError::BadMagic
        } else {
            FrameError::Truncated
        });
    }
    if datagram[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if datagram[4] != VERSION {
        return Err(FrameError::Version(datagram[4]));
    }
    let authed = datagram[5] & AUTH != 0;
    match (secret, authed) {
        (None, false) => Ok(&datagram[HEADER_LEN..]),
        (None, true) => Err(FrameError::UnexpectedSecret),
        (Some(_), false) => Err(FrameError::Unauthenticated),
        (Some(s), true) => {
            let Some(split) = datagram.len().checked_sub(TAG_LEN).filter(|n| *n >= HEADER_LEN) else {
                return Err(FrameError::Truncated);
            };
            let (signed, tag) = datagram.split_at(split);
            if !constant_time_eq(&s.tag(signed), tag) {
                return Err(FrameError::WrongSecret);
            }
            Ok(&signed[HEADER_LEN..])
        }
    }
}

/// Compares without an early exit, so the time taken does not tell a forger how many bytes matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_datagram_opens_with_the_same_secret_only() {
        let (a, b) = (Secret::new(b"one"), Secret::new(b"two"));
        let mut d = Vec::new();
        seal(Some(&a), b"hello", &mut d);
        assert_eq!(d.len(), HEADER_LEN + 5 + TAG_LEN);
        assert_eq!(open(Some(&a), &d), Ok(&b"hello"[..]));
        assert_eq!(open(Some(&b), &d), Err(FrameError::WrongSecret));
        assert_eq!(open(None, &d), Err(FrameError::UnexpectedSecret));
        let mut plain = Vec::new();
        seal(None, b"hello", &mut plain);
        assert_eq!(open(None, &plain), Ok(&b"hello"[..]));
        assert_eq!(open(Some(&a), &plain), Err(FrameError::Unauthenticated));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let s = Secret::new(b"k");
        let mut d = Vec::new();
        seal(Some(&s), b"member list", &mut d);
        for i in 0..d.len() * 8 {
            let mut bad = d.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(open(Some(&s), &bad).is_err(), "bit {i} flipped and still accepted");
        }
    }

    #[test]
    fn short_or_foreign_datagrams_are_refused_without_panicking() {
        let s = Secret::new(b"k");
        for d in
            [&b""[..], b"SM", b"SMQG", b"SMQG\x01", b"XXXXXXXX", b"SMQG\x02\x00body", b"SMQG\x01\x01short"]
        {
            assert!(open(Some(&s), d).is_err(), "{d:?}");
            let _ = open(None, d);
        }
        assert_eq!(open(None, b"SMQG\x02\x00body"), Err(FrameError::Version(2)));
        assert_eq!(open(None, b"HTTP/1.1 200"), Err(FrameError::BadMagic));
    }
}
