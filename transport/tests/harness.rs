//! The transport layer without sockets: a rustls client and a hand-built WebSocket client talk to a
//! [`Transport`] around a recording core, bytes carried by hand.

use std::io::{Read, Write};
use std::time::Instant;

use shardmq_shard::io::{Core, IoCmd};
use shardmq_shard::ConnId;
use shardmq_transport::ListenerKind;

mod support;
use support::*;

#[test]
fn tls_carries_bytes_both_ways_and_plain_connections_are_untouched() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let (plain_conn, tls_conn) = (ConnId(1), ConnId(2));
    accept(&mut t, plain_conn, ListenerKind::Mqtt);
    accept(&mut t, tls_conn, ListenerKind::Tls);
    assert_eq!(t.layered_connections(), 1);

    t.handle_read(plain_conn, b"plain", Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(w.written[&plain_conn], b"ack:plain");

    let mut c = tls_client(None);
    c.writer().write_all(b"hello").unwrap();
    let got = pump(&mut t, &mut w, tls_conn, &mut c);
    assert_eq!(got, b"ack:hello");
    assert_eq!(t.inner().reads[&tls_conn], b"hello");

    // The core closes: the client gets a close_notify.
    t.inner_mut().io.push_back(IoCmd::Close(tls_conn));
    drain(&mut t, &mut w);
    assert_eq!(w.closed, vec![tls_conn]);
    let mut rd = &w.written[&tls_conn][..];
    c.read_tls(&mut rd).unwrap();
    c.process_new_packets().unwrap();
    assert_eq!(c.reader().read(&mut [0u8; 16]).unwrap(), 0, "close_notify received");
    assert_eq!(t.layered_connections(), 0);
}

#[test]
fn mutual_tls_hands_the_certificate_name_to_the_core_before_any_bytes() {
    let mut t = transport(true, true);
    let mut w = Wire::default();
    let conn = ConnId(7);
    accept(&mut t, conn, ListenerKind::Tls);
    let mut c = tls_client(Some("client"));
    c.writer().write_all(b"connect").unwrap();
    assert_eq!(pump(&mut t, &mut w, conn, &mut c), b"ack:connect");
    assert_eq!(t.inner().identities[&conn], "alice");
    assert!(t.inner().identity_first[&conn], "identity known before the first bytes");
}

#[test]
fn a_certificate_without_a_cn_is_reported_as_no_name() {
    let mut t = transport(true, true);
    let mut w = Wire::default();
    let conn = ConnId(8);
    accept(&mut t, conn, ListenerKind::Tls);
    let mut c = tls_client(Some("nocn"));
    c.writer().write_all(b"connect").unwrap();
    assert_eq!(pump(&mut t, &mut w, conn, &mut c), b"ack:connect");
    assert_eq!(t.inner().identities[&conn], "<none>", "the core hears that there is no name");
    assert!(t.inner().identity_first[&conn]);
}

#[test]
fn a_client_without_an_accepted_certificate_is_closed_and_the_core_told() {
    for cert in [None, Some("mallory")] {
        let mut t = transport(true, true);
        let mut w = Wire::default();
        let conn = ConnId(3);
        accept(&mut t, conn, ListenerKind::Tls);
        let mut c = tls_client(cert);
        c.writer().write_all(b"connect").unwrap();
        let got = pump(&mut t, &mut w, conn, &mut c);
        assert!(got.is_empty(), "{cert:?}");
        assert_eq!(w.closed, vec![conn], "{cert:?}");
        assert_eq!(t.inner().closed, vec![conn]);
        assert!(!t.inner().reads.contains_key(&conn));
        assert!(t.inner().identities.is_empty());
        assert_eq!(t.layered_connections(), 0);
    }
}

#[test]
fn garbage_on_a_tls_port_closes_that_connection_only() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    accept(&mut t, ConnId(1), ListenerKind::Tls);
    accept(&mut t, ConnId(2), ListenerKind::Tls);
    // An MQTT CONNECT where a ClientHello belongs.
    t.handle_read(ConnId(1), b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00", Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(w.closed, vec![ConnId(1)]);
    assert_eq!(t.inner().closed, vec![ConnId(1)]);
    // The other still works.
    let mut c = tls_client(None);
    c.writer().write_all(b"x").unwrap();
    assert_eq!(pump(&mut t, &mut w, ConnId(2), &mut c), b"ack:x");
}

#[test]
fn a_handed_off_connection_keeps_its_tls_session() {
    let mut a = transport(false, false);
    let mut b = transport(false, false);
    let (mut wa, mut wb) = (Wire::default(), Wire::default());
    accept(&mut a, ConnId(1), ListenerKind::Tls);
    let mut c = tls_client(None);
    c.writer().write_all(b"handoff").unwrap();
    pump(&mut a, &mut wa, ConnId(1), &mut c);
    let (conn, state) = wa.handed_off.pop().expect("handed off");
    assert_eq!(conn, ConnId(1));
    assert_eq!(a.layered_connections(), 0);
    b.handle_adopt(ConnId(9), state, Instant::now());
    drain(&mut b, &mut wb);
    let mut rd = &wb.written.remove(&ConnId(9)).unwrap_or_default()[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
    let mut buf = [0u8; 64];
    let n = c.reader().read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ack:moved", "the adopting shard answers inside the same TLS session");
    c.writer().write_all(b"more").unwrap();
    assert_eq!(pump(&mut b, &mut wb, ConnId(9), &mut c), b"ack:more");
}

#[test]
fn websocket_upgrade_then_binary_frames() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let conn = ConnId(4);
    accept(&mut t, conn, ListenerKind::Ws);
    t.handle_read(conn, upgrade_request(), Instant::now());
    drain(&mut t, &mut w);
    let answer = String::from_utf8(w.written.remove(&conn).unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    t.handle_read(conn, &masked_binary(b"hi"), Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(t.inner().reads[&conn], b"hi");
    assert_eq!(w.written[&conn], b"\x82\x06ack:hi");
}

#[test]
fn websocket_over_tls() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let conn = ConnId(5);
    accept(&mut t, conn, ListenerKind::Wss);
    let mut c = tls_client(None);
    c.writer().write_all(upgrade_request()).unwrap();
    let answer = pump(&mut t, &mut w, conn, &mut c);
    assert!(answer.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&answer));
    c.writer().write_all(&masked_binary(b"hi")).unwrap();
    assert_eq!(pump(&mut t, &mut w, conn, &mut c), b"\x82\x06ack:hi");
    // Closing sends a WebSocket close frame inside the TLS session, then close_notify.
    t.inner_mut().io.push_back(IoCmd::Close(conn));
    drain(&mut t, &mut w);
    let mut rd = &w.written[&conn][..];
    c.read_tls(&mut rd).unwrap();
    c.process_new_packets().unwrap();
    let mut buf = [0u8; 16];
    let n = c.reader().read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"\x88\x00", "a close frame");
}

#[test]
fn a_text_frame_closes_the_websocket_and_the_core_hears_it() {
    let mut t = transport(false, false);
    let mut w = Wire::default();
    let conn = ConnId(6);
    accept(&mut t, conn, ListenerKind::Ws);
    t.handle_read(conn, upgrade_request(), Instant::now());
    let mut text = masked_binary(b"hi");
    text[0] = 0x81;
    t.handle_read(conn, &text, Instant::now());
    drain(&mut t, &mut w);
    assert_eq!(w.closed, vec![conn]);
    assert_eq!(t.inner().closed, vec![conn]);
    assert!(!t.inner().reads.contains_key(&conn));
}
