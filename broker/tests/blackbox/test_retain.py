"""Retained messages."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import ALL_VERSIONS, V5, ver_id


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_retained_delivered_on_subscribe(broker, clients, ver):
    b = broker()
    pub = clients(b, "ret-pub", ver)
    pub.publish("ret/a", b"v1", 1, retain=True)
    pub.disconnect()  # retained messages outlive their publisher
    sub = clients(b, "ret-sub", ver)
    sub.subscribe("ret/#", 1)
    m = sub.expect_one()
    assert (m.topic, m.payload, m.retain, m.qos) == ("ret/a", b"v1", True, 1)
    sub.expect_none(0.2)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_retained_replaced(broker, clients, ver):
    b = broker()
    pub = clients(b, "ret-pub", ver)
    pub.publish("ret/a", b"v1", 1, retain=True)
    pub.publish("ret/a", b"v2", 1, retain=True)
    sub = clients(b, "ret-sub", ver)
    sub.subscribe("ret/a", 1)
    m = sub.expect_one()
    assert (m.payload, m.retain) == (b"v2", True)
    sub.expect_none(0.2)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_retained_cleared_by_empty_payload(broker, clients, ver):
    b = broker()
    pub = clients(b, "ret-pub", ver)
    pub.publish("ret/a", b"v1", 1, retain=True)
    live = clients(b, "ret-live", ver)
    live.subscribe("ret/a", 1)
    assert live.expect_one().payload == b"v1"
    pub.publish("ret/a", b"", 1, retain=True)
    # the empty message itself is forwarded to existing subscribers as normal
    m = live.expect_one()
    assert (m.payload, m.retain) == (b"", False)
    sub = clients(b, "ret-sub", ver)
    sub.subscribe("ret/#", 1)
    sub.expect_none(0.3)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_live_publish_has_retain_flag_cleared(broker, clients, ver):
    """Messages to established subscriptions carry RETAIN=0 (v5: unless
    Retain As Published), even if they were published retained."""
    b = broker()
    sub = clients(b, "ret-sub", ver)
    sub.subscribe("ret/live", 1)
    pub = clients(b, "ret-pub", ver)
    pub.publish("ret/live", b"x", 1, retain=True)
    m = sub.expect_one()
    assert (m.payload, m.retain) == (b"x", False)
    # a new subscription gets the stored one with RETAIN=1
    sub2 = clients(b, "ret-sub2", ver)
    sub2.subscribe("ret/live", 1)
    assert sub2.expect_one().retain is True


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_retained_wildcard_subscriptions(broker, clients, ver):
    b = broker()
    pub = clients(b, "ret-pub", ver)
    topics = ["rw/a", "rw/b/c", "rw/d", "other/x", "rw"]
    for t in topics:
        pub.publish(t, t.encode(), 1, retain=True)
    s1 = clients(b, "ret-s1", ver)
    s1.subscribe("rw/#", 1)
    got = s1.expect(4)
    assert sorted(m.topic for m in got) == ["rw", "rw/a", "rw/b/c", "rw/d"]
    assert all(m.retain and m.payload == m.topic.encode() for m in got)
    s1.expect_none(0.2)
    s2 = clients(b, "ret-s2", ver)
    s2.subscribe("rw/+", 1)
    assert sorted(m.topic for m in s2.expect(2)) == ["rw/a", "rw/d"]
    s2.expect_none(0.2)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_retained_qos_is_min_of_message_and_subscription(broker, clients, ver):
    b = broker()
    pub = clients(b, "ret-pub", ver)
    pub.publish("rq/two", b"2", 2, retain=True)
    pub.publish("rq/zero", b"0", 0, retain=True)
    time.sleep(0.1)  # QoS 0 has no ack to wait for
    s1 = clients(b, "ret-s1", ver)
    s1.subscribe("rq/two", 1)
    assert s1.expect_one().qos == 1
    s2 = clients(b, "ret-s2", ver)
    s2.subscribe("rq/zero", 2)
    assert s2.expect_one().qos == 0


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_resubscribe_resends_retained(broker, clients, ver):
    b = broker()
    pub = clients(b, "ret-pub", ver)
    pub.publish("rr/t", b"keep", 1, retain=True)
    sub = clients(b, "ret-sub", ver)
    sub.subscribe("rr/t", 1)
    assert sub.expect_one().payload == b"keep"
    sub.subscribe("rr/t", 1)  # replaces the subscription, retained re-sent
    m = sub.expect_one()
    assert (m.payload, m.retain) == (b"keep", True)
    sub.expect_none(0.2)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_retained_raw_exact_flags(broker, clients, ver):
    b = broker()
    pub = clients.raw(b, ver)
    assert pub.connect("ret-raw-pub").reason == 0
    pub.publish("rx/t", b"r", qos=1, retain=True)
    r = clients.raw(b, ver)
    assert r.connect("ret-raw-sub").reason == 0
    r.send(R.subscribe(1, [("rx/t", 1)], ver))
    # the server may send matching PUBLISHes before the SUBACK
    got = sorted([r.recv(), r.recv()], key=lambda p: p.type)
    assert [p.type for p in got] == [R.PUBLISH, R.SUBACK], got
    p = got[0]
    assert p.flags & 0x0F == 0x03  # QoS 1, RETAIN, not DUP
    r.ack(p)
    r.disconnect()
    pub.disconnect()


def test_retained_message_expiry_v5(broker, clients):
    b = broker()
    pub = clients(b, "ret-pub", V5)
    from mqtt_client import publish_props
    pub.publish("rexp/short", b"s", 1, retain=True, properties=publish_props(MessageExpiryInterval=1))
    pub.publish("rexp/long", b"l", 1, retain=True, properties=publish_props(MessageExpiryInterval=100))
    time.sleep(2.1)
    sub = clients(b, "ret-sub", V5)
    sub.subscribe("rexp/#", 1)
    m = sub.expect_one()
    assert m.topic == "rexp/long"
    assert 1 <= m.prop("MessageExpiryInterval") <= 99
    sub.expect_none(0.2)
