//! Fuzzes the decoder with arbitrary bytes under every connection state (before CONNECT, 3.1, 3.1.1, 5.0).
//!
//! Beyond "never panics", anything that decodes must re-encode, report its size exactly, and decode back to
//! an equal packet: the bytes may differ (the encoder writes one canonical form, e.g. property order and the
//! 5.0 short forms), the packet may not.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardmq_wire::{decode, encode, encoded_len, frame, peek_protocol, Packet, Protocol};

fuzz_target!(|data: &[u8]| {
    let _ = peek_protocol(data);
    let _ = frame(data, 1024);
    for protocol in [None, Some(Protocol::V31), Some(Protocol::V311), Some(Protocol::V5)] {
        check(data, protocol);
    }
});

fn check(data: &[u8], protocol: Option<Protocol>) {
    let Ok(Some((packet, used))) = decode(data, protocol, u32::MAX) else {
        return;
    };
    assert!(used <= data.len());
    // CONNECT carries its own protocol; everything else is written in the connection's.
    let encode_as = match &packet {
        Packet::Connect(c) => c.protocol,
        _ => protocol.unwrap_or(Protocol::V5),
    };
    let mut out = Vec::new();
    let n = encode(&packet, encode_as, &mut out).expect("a decoded packet must encode");
    assert_eq!(n, out.len());
    assert_eq!(encoded_len(&packet, encode_as), Ok(n));
    let again = decode(&out, protocol, u32::MAX).expect("re-encoded packet must decode");
    assert_eq!(again, Some((packet, n)));
    // One byte short is an incomplete packet, not an error.
    assert_eq!(decode(&out[..n - 1], protocol, u32::MAX), Ok(None));
}
