"""Malformed and hostile input.  Every test ends by checking that the broker
still serves a fresh client normally."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import ALL_VERSIONS, IS_MOSQUITTO, V311, V5, assert_broker_serves, ver_id

# reason codes a v5 server may put in a DISCONNECT before closing on bad input
MALFORMED, PROTOCOL_ERROR = 0x81, 0x82


def connected(clients, b, ver, cid="bad-client", **kw):
    r = clients.raw(b, ver)
    ca = r.connect(cid, **kw)
    assert ca.reason == 0
    return r


def assert_closed(r, allowed_reasons=(MALFORMED, PROTOCOL_ERROR), timeout=3.0):
    """The server closes the connection; a v5 DISCONNECT before the close is
    allowed if its reason code is one of `allowed_reasons`."""
    got = r.wait_closed(timeout)
    for p in got:
        assert p.type == R.DISCONNECT, "unexpected %r before close" % p
        assert r.version == V5, "v3.1.1 server must not send DISCONNECT"
        assert p.reason in allowed_reasons, "DISCONNECT reason 0x%02x not in %r" % (p.reason, allowed_reasons)
    return got


@pytest.mark.parametrize("first", ["pingreq", "publish", "subscribe", "disconnect"])
def test_first_packet_not_connect(broker, clients, first):
    b = broker()
    r = clients.raw(b, V311)
    r.send({"pingreq": R.pingreq(), "publish": R.publish("a/b", b"x"),
            "subscribe": R.subscribe(1, [("a/b", 0)]), "disconnect": R.disconnect()}[first])
    assert r.wait_closed(3) == []
    assert_broker_serves(b)


def test_garbage_instead_of_connect(broker, clients):
    b = broker()
    r = clients.raw(b, V311)
    r.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert r.wait_closed(3) == []
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_second_connect(broker, clients, ver):
    b = broker()
    r = connected(clients, b, ver)
    r.send(R.connect("bad-client", version=ver))
    assert_closed(r, (PROTOCOL_ERROR,))
    assert_broker_serves(b)


@pytest.mark.parametrize("level", [6, 9, 99])
def test_future_protocol_level(broker, clients, level):
    """'MQTT' with a level above 5 comes from a newer client: a v5 CONNACK with
    0x84 Unsupported Protocol Version (MQTT 5 §3.1.2.2), then the close."""
    b = broker()
    r = clients.raw(b, V311)
    r.send(R.connect("lvl%d" % level, version=level))
    got = r.wait_closed(3)
    assert len(got) == 1 and got[0].type == R.CONNACK, got
    # v5 layout: acknowledge flags, reason code, then a properties block.
    assert got[0].body[:2] == b"\x00\x84" and len(got[0].body) > 2, got
    assert_broker_serves(b)


def test_older_protocol_level_under_the_311_name(broker, clients):
    """'MQTT' with level 3 (3.1 uses 'MQIsdp'): 3.1.1 CONNACK return code 0x01."""
    b = broker()
    r = clients.raw(b, V311)
    r.send(R.connect("lvl3", version=3))
    got = r.wait_closed(3)
    assert len(got) == 1 and got[0].type == R.CONNACK and got[0].body == b"\x00\x01", got
    assert_broker_serves(b)


@pytest.mark.parametrize("level", [4, 5])
def test_unknown_protocol_name(broker, clients, level):
    b = broker()
    r = clients.raw(b, level)
    r.send(R.connect("badname", version=level, proto_name="MQTX"))
    got = r.wait_closed(3)
    assert len(got) <= 1, got
    if got:
        assert got[0].type == R.CONNACK and got[0].body[1] in (0x01, 0x84), got
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
@pytest.mark.parametrize("when", ["before_connect", "after_connect"])
def test_malformed_remaining_length(broker, clients, ver, when):
    b = broker()
    if when == "after_connect":
        r = connected(clients, b, ver)
    else:
        r = clients.raw(b, ver)
    r.send(b"\x30\xff\xff\xff\xff\x01")  # 5-byte remaining length
    if when == "before_connect":
        assert r.wait_closed(3) == []
    else:
        assert_closed(r, (MALFORMED,))
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_truncated_connect_then_close(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    pkt = R.connect("truncated", version=ver)
    r.send(pkt[:len(pkt) - 4])
    r.drop()
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_truncated_publish_then_close_publishes_will(broker, clients, ver):
    b = broker()
    w = clients(b, "trunc-watch", V5)
    w.subscribe("trunc/will", 1)
    r = connected(clients, b, ver, cid="trunc", will=dict(topic="trunc/will", payload=b"cut", qos=1))
    pkt = R.publish("trunc/t", b"x" * 100, qos=1, pid=5, version=ver)
    r.send(pkt[:20])
    time.sleep(0.05)
    r.drop()
    assert w.expect_one(timeout=3).payload == b"cut"
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_remaining_length_over_max_packet_size(broker, clients, ver):
    """Only a fixed header claiming 200 MB is sent: the broker must close
    without waiting for the body (v5: DISCONNECT 0x95 first)."""
    b = broker("--max-packet-size", "1024")
    r = connected(clients, b, ver)
    r.send(b"\x30" + R.varint(200_000_000))
    t0 = time.monotonic()
    got = r.wait_closed(3)
    assert time.monotonic() - t0 < 2.5
    if ver == V5:
        if IS_MOSQUITTO and got == []:
            pass  # Mosquitto 2.0.11 closes without flushing its DISCONNECT
        else:
            assert [p.reason for p in got] == [0x95], got
    else:
        assert got == []
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_packet_over_max_packet_size(broker, clients, ver):
    b = broker("--max-packet-size", "1024")
    sub = clients(b, "mps-watch", V5)
    sub.subscribe("big/#", 1)
    r = connected(clients, b, ver)
    r.publish("big/ok", b"x" * 900, qos=1)
    assert sub.expect_one().topic == "big/ok"
    r.send(R.publish("big/no", b"x" * 2000, qos=1, pid=2, version=ver))
    # the body may be left unread, so a v5 DISCONNECT 0x95 can be lost to a reset
    assert_closed(r, (0x95,))
    sub.expect_none(0.2)
    assert_broker_serves(b)


def test_connect_over_max_packet_size(broker, clients):
    b = broker("--max-packet-size", "1024")
    r = clients.raw(b, V5)
    r.send(b"\x10" + R.varint(200_000_000))
    got = r.wait_closed(3)
    assert len(got) <= 1 and all(p.type == R.CONNACK and p.reason == 0x95 for p in got), got
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
@pytest.mark.parametrize("topic", ["a/+", "a/#", "#", "+"])
def test_wildcard_in_publish_topic(broker, clients, ver, topic):
    b = broker()
    sub = clients(b, "wpub-watch", V5)
    sub.subscribe("#", 1)
    r = connected(clients, b, ver)
    r.send(R.publish(topic, b"x", qos=1, pid=1, version=ver))
    assert_closed(r, (MALFORMED, PROTOCOL_ERROR, 0x90))
    sub.expect_none(0.2)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_empty_topic_in_publish(broker, clients, ver):
    """Zero-length topic without a topic alias is a protocol error."""
    b = broker()
    r = connected(clients, b, ver)
    r.send(R.publish("", b"x", qos=0, version=ver))
    assert_closed(r, (MALFORMED, PROTOCOL_ERROR, 0x90))
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
@pytest.mark.parametrize("filt", ["a/#/b", "a+", "#a", "a/b#", "a/+b", ""])
def test_invalid_subscribe_filter(broker, clients, ver, filt):
    """Closed, or SUBACK with a failure code for that filter."""
    b = broker()
    r = connected(clients, b, ver)
    r.send(R.subscribe(3, [(filt, 1)], ver))
    try:
        p = r.recv(3)
    except R.Closed:
        p = None
    if p is not None and p.type == R.SUBACK:
        assert p.pid == 3
        if ver == V5:
            assert len(p.codes) == 1 and p.codes[0] >= 0x80, p
        else:
            assert p.codes == [0x80], p
        r.ping()
    elif p is not None:
        assert p.type == R.DISCONNECT and ver == V5 and p.reason in (MALFORMED, PROTOCOL_ERROR, 0x8F), p
        r.wait_closed(3)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_publish_qos3(broker, clients, ver):
    b = broker()
    r = connected(clients, b, ver)
    r.send(R.packet(R.PUBLISH, 0x06, R.s("q/3") + R.u16(1) + (b"\x00" if ver == V5 else b"") + b"x"))
    assert_closed(r)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
@pytest.mark.parametrize("ptype", [
    pytest.param(R.CONNACK, id="connack"),
    # Mosquitto silently ignores these server-to-client packets from clients
    pytest.param(R.SUBACK, id="suback", marks=pytest.mark.mosquitto_deviates("ignores SUBACK from a client")),
    pytest.param(R.UNSUBACK, id="unsuback", marks=pytest.mark.mosquitto_deviates("ignores UNSUBACK from a client")),
    pytest.param(R.PINGRESP, id="pingresp", marks=pytest.mark.mosquitto_deviates("ignores PINGRESP from a client")),
])
def test_server_only_packet_from_client(broker, clients, ver, ptype):
    b = broker()
    r = connected(clients, b, ver)
    body = {R.CONNACK: b"\x00\x00" + (b"\x00" if ver == V5 else b""),
            R.SUBACK: b"\x00\x01" + (b"\x00" if ver == V5 else b"") + b"\x00",
            R.UNSUBACK: b"\x00\x01" + (b"\x00\x00" if ver == V5 else b""),
            R.PINGRESP: b""}[ptype]
    r.send(R.packet(ptype, 0, body))
    assert_closed(r)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
@pytest.mark.parametrize("kind", ["publish_qos1", "publish_qos2", "subscribe", "unsubscribe"])
def test_packet_id_zero(broker, clients, ver, kind):
    b = broker()
    r = connected(clients, b, ver)
    pkt = {"publish_qos1": R.publish("pid/0", b"x", qos=1, pid=0, version=ver),
           "publish_qos2": R.publish("pid/0", b"x", qos=2, pid=0, version=ver),
           "subscribe": R.subscribe(0, [("pid/0", 1)], ver),
           "unsubscribe": R.unsubscribe(0, ["pid/0"], ver)}[kind]
    r.send(pkt)
    assert_closed(r)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
@pytest.mark.parametrize("topic", [b"bad\xff\xfe", b"nul\x00x", b"overlong\xc0\xaf", b"surrogate\xed\xa0\x80"],
                         ids=["invalid", "nul", "overlong", "surrogate"])
def test_invalid_utf8_topic(broker, clients, ver, topic):
    b = broker()
    sub = clients(b, "utf-watch", V5)
    sub.subscribe("#", 1)
    r = connected(clients, b, ver)
    r.send(R.publish(topic, b"x", qos=1, pid=1, version=ver))
    assert_closed(r, (MALFORMED, PROTOCOL_ERROR, 0x90))
    sub.expect_none(0.2)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_invalid_utf8_client_id(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    r.send(R.connect(b"id\xff", version=ver))
    got = r.wait_closed(3)
    assert all(p.type == R.CONNACK and p.body[1] != 0 for p in got), got
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_connect_reserved_flag(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    r.send(R.connect("reserved", version=ver, flags_override=0x03))
    got = r.wait_closed(3)
    assert all(p.type == R.CONNACK and p.body[1] != 0 for p in got), got
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_will_qos_without_will_flag(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    r.send(R.connect("willqos", version=ver, flags_override=0x02 | 0x08))
    got = r.wait_closed(3)
    assert all(p.type == R.CONNACK and p.body[1] != 0 for p in got), got
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_subscribe_wrong_fixed_header_flags(broker, clients, ver):
    b = broker()
    r = connected(clients, b, ver)
    r.send(R.packet(R.SUBSCRIBE, 0x00, R.u16(1) + (b"\x00" if ver == V5 else b"") + R.s("f/h") + b"\x01"))
    assert_closed(r)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_subscribe_without_filters(broker, clients, ver):
    b = broker()
    r = connected(clients, b, ver)
    r.send(R.packet(R.SUBSCRIBE, 0x02, R.u16(1) + (b"\x00" if ver == V5 else b"")))
    assert_closed(r)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_reserved_packet_type_zero(broker, clients, ver):
    b = broker()
    r = connected(clients, b, ver)
    r.send(b"\x00\x00")
    assert_closed(r)
    assert_broker_serves(b)


def test_unknown_property_in_connect_v5(broker, clients):
    b = broker()
    r = clients.raw(b, V5)
    body = R.s("MQTT") + bytes([5, 0x02]) + R.u16(30) + b"\x02\x7f\x00" + R.s("badprop")
    r.send(R.packet(R.CONNECT, 0, body))
    got = r.wait_closed(3)
    assert all(p.type == R.CONNACK and p.reason >= 0x80 for p in got), got
    assert_broker_serves(b)


def test_duplicate_property_in_connect_v5(broker, clients):
    b = broker()
    r = clients.raw(b, V5)
    r.send(R.connect("dupprop", version=5, properties=[(R.P_SESSION_EXPIRY, 1), (R.P_SESSION_EXPIRY, 2)]))
    got = r.wait_closed(3)
    assert all(p.type == R.CONNACK and p.reason >= 0x80 for p in got), got
    assert_broker_serves(b)


@pytest.mark.parametrize("alias", [0, 11], ids=["zero", "over-max"])
def test_topic_alias_out_of_range_v5(broker, clients, alias):
    b = broker("--max-topic-alias", "10")
    r = connected(clients, b, V5)
    r.send(R.publish("ta/x", b"x", qos=1, pid=1, version=5, properties={R.P_TOPIC_ALIAS: alias}))
    assert_closed(r, (0x94, PROTOCOL_ERROR, MALFORMED))
    assert_broker_serves(b)


def test_topic_alias_unknown_v5(broker, clients):
    b = broker("--max-topic-alias", "10")
    r = connected(clients, b, V5)
    r.send(R.publish("", b"x", qos=1, pid=1, version=5, properties={R.P_TOPIC_ALIAS: 3}))
    assert_closed(r, (PROTOCOL_ERROR, 0x94))
    assert_broker_serves(b)


@pytest.mark.mosquitto_deviates("answers PUBREC 0x97 instead of DISCONNECT 0x93")
def test_receive_maximum_exceeded_by_client_v5(broker, clients):
    """More unacknowledged incoming QoS 2 PUBLISHes than the server's Receive
    Maximum: DISCONNECT 0x93 Receive Maximum exceeded."""
    b = broker("--max-inflight", "2")
    r = clients.raw(b, V5)
    ca = r.connect("rm-flood")
    assert ca.props.get(R.P_RECEIVE_MAXIMUM) == 2
    for pid in (1, 2):
        r.send(R.publish("rmx/t", b"x", qos=2, pid=pid, version=5))
        assert r.expect(R.PUBREC).pid == pid
    r.send(R.publish("rmx/t", b"x", qos=2, pid=3, version=5))
    assert_closed(r, (0x93,))
    assert_broker_serves(b)


def test_subscription_identifier_in_client_publish_v5(broker, clients):
    """Only the server sets Subscription Identifiers (MQTT 5 §3.3.4): a client
    PUBLISH carrying one is a protocol error, DISCONNECT 0x82, and is not routed."""
    b = broker()
    sub = clients(b, "sid-watch", V5)
    sub.subscribe("sid/t", 0)
    r = clients.raw(b, V5)
    assert r.connect("sid-liar").reason == 0
    r.send(R.publish("sid/t", b"x", qos=0, version=5, properties={R.P_SUBSCRIPTION_ID: 3}))
    assert_closed(r, (PROTOCOL_ERROR,))
    sub.expect_none(0.3)
    assert_broker_serves(b)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_connection_flood_over_max_connections(broker, clients, ver):
    limit, total = 50, 80
    b = broker("--max-connections", str(limit))
    accepted, refused = [], 0
    for i in range(total):
        r = clients.raw(b, ver, timeout=3)
        try:
            r.send(R.connect("flood-%d" % i, version=ver, keepalive=60))
            p = r.recv(3)
        except (R.Closed, OSError):
            refused += 1
            r.close()
            continue
        assert p.type == R.CONNACK, p
        if p.reason == 0:
            accepted.append(r)
        else:
            assert p.reason in ((3,) if ver == V311 else (0x97, 0x89)), p
            r.wait_closed(3)
            refused += 1
    # (Mosquitto 2.0.11 lets max_connections + 1 clients in)
    assert limit <= len(accepted) <= limit + (1 if IS_MOSQUITTO else 0), "accepted %d of %d with --max-connections %d" % (len(accepted), total, limit)
    assert refused == total - len(accepted)
    # the accepted ones still work
    for r in accepted:
        r.ping()
    accepted[0].subscribe([("flood/t", 1)])
    accepted[1].publish("flood/t", b"still-working", qos=1)
    assert accepted[0].recv_publish().payload == b"still-working"
    for r in accepted:
        r.disconnect(wait=0.2)
    # a new client connects fine once the others are gone (allow the broker
    # a moment to account for the closed connections)
    deadline = time.monotonic() + 3
    while True:
        r = clients.raw(b, ver)
        try:
            r.send(R.connect("after-flood", version=ver))
            p = r.recv(2)
            if p.type == R.CONNACK and p.reason == 0:
                r.disconnect()
                break
        except (R.Closed, OSError):
            pass
        r.close()
        assert time.monotonic() < deadline, "broker refuses new clients after the flood ended"
        time.sleep(0.1)
    assert_broker_serves(b, ver)
