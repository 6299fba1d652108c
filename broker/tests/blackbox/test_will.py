"""Will messages."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import ALL_VERSIONS, V5, assert_broker_serves, ver_id


def will(topic="will/a", payload=b"bye", qos=1, retain=False, properties=None):
    return dict(topic=topic, payload=payload, qos=qos, retain=retain, properties=properties)


@pytest.fixture
def watcher_on(clients):
    def make(b, filt="will/#", version=V5):
        w = clients(b, "will-watcher", version)
        assert w.subscribe(filt, 2) == [2]
        return w
    return make


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_will_sent_on_abnormal_close(broker, clients, watcher_on, ver):
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, ver)
    assert r.connect("will-client", will=will(qos=1)).reason == 0
    r.drop()
    m = w.expect_one(timeout=3)
    assert (m.topic, m.payload, m.qos, m.retain) == ("will/a", b"bye", 1, False)
    w.expect_none(0.2)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_no_will_on_normal_disconnect(broker, clients, watcher_on, ver):
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, ver)
    assert r.connect("will-client", will=will()).reason == 0
    r.disconnect()
    w.expect_none(0.5)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_will_sent_on_protocol_violation(broker, clients, watcher_on, ver):
    """The server closing the connection because of a protocol error is an
    abnormal disconnect too."""
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, ver)
    assert r.connect("will-client", will=will(payload=b"violated")).reason == 0
    r.send(R.packet(R.PUBLISH, 0x06, R.s("x/y") + b"\x00\x01"))  # QoS 3
    r.wait_closed(3)
    assert w.expect_one(timeout=3).payload == b"violated"


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_will_retained(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    assert r.connect("will-client", will=will(topic="will/ret", payload=b"dead", qos=1, retain=True)).reason == 0
    r.drop()
    time.sleep(0.2)
    late = clients(b, "late-sub", ver)
    late.subscribe("will/ret", 1)
    m = late.expect_one()
    assert (m.payload, m.retain) == (b"dead", True)


def test_will_sent_on_disconnect_with_will_message_v5(broker, clients, watcher_on):
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, V5)
    assert r.connect("will-client", will=will(payload=b"asked")).reason == 0
    r.disconnect(reason=0x04)
    assert w.expect_one(timeout=3).payload == b"asked"


def test_will_properties_passed_through_v5(broker, clients, watcher_on):
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, V5)
    wp = [(R.P_PAYLOAD_FORMAT, 1), (R.P_CONTENT_TYPE, "text/plain"),
          (R.P_RESPONSE_TOPIC, "will/reply"), (R.P_CORRELATION_DATA, b"\x01\x02"),
          (R.P_USER_PROPERTY, ("k", "v1")), (R.P_USER_PROPERTY, ("k", "v2"))]
    assert r.connect("will-client", will=will(payload=b"props", properties=wp)).reason == 0
    r.drop()
    m = w.expect_one(timeout=3)
    assert m.payload == b"props"
    assert m.prop("PayloadFormatIndicator") == 1
    assert m.prop("ContentType") == "text/plain"
    assert m.prop("ResponseTopic") == "will/reply"
    assert m.prop("CorrelationData") == b"\x01\x02"
    assert m.prop("UserProperty") == [("k", "v1"), ("k", "v2")]


def test_will_delay_interval_v5(broker, clients, watcher_on):
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, V5)
    assert r.connect("will-delay", clean=True, properties={R.P_SESSION_EXPIRY: 30},
                     will=will(payload=b"late", properties={R.P_WILL_DELAY: 1})).reason == 0
    t0 = time.monotonic()
    r.drop()
    w.expect_none(0.6)
    m = w.expect_one(timeout=3)
    dt = time.monotonic() - t0
    assert m.payload == b"late"
    assert 0.9 <= dt <= 3.2, dt


def test_will_delay_cancelled_by_reconnect_v5(broker, clients, watcher_on):
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, V5)
    assert r.connect("will-cancel", clean=True, properties={R.P_SESSION_EXPIRY: 30},
                     will=will(payload=b"never", properties={R.P_WILL_DELAY: 1})).reason == 0
    r.drop()
    time.sleep(0.2)
    r2 = clients.raw(b, V5)
    ca = r2.connect("will-cancel", clean=False, properties={R.P_SESSION_EXPIRY: 30})
    assert ca.reason == 0 and ca.session_present
    w.expect_none(1.6)
    r2.disconnect()
    w.expect_none(0.2)


def test_will_delay_longer_than_session_expiry_v5(broker, clients, watcher_on):
    """The will is published when the session ends, even if the will delay
    has not passed yet."""
    b = broker()
    w = watcher_on(b)
    r = clients.raw(b, V5)
    assert r.connect("will-sess", clean=True, properties={R.P_SESSION_EXPIRY: 1},
                     will=will(payload=b"session-end", properties={R.P_WILL_DELAY: 30})).reason == 0
    t0 = time.monotonic()
    r.drop()
    m = w.expect_one(timeout=4)
    dt = time.monotonic() - t0
    assert m.payload == b"session-end"
    assert 0.8 <= dt <= 3.5, dt


def test_will_qos_downgraded_to_subscription(broker, clients):
    b = broker()
    w = clients(b, "will-q0", V5)
    w.subscribe("will/#", 0)
    r = clients.raw(b, V5)
    assert r.connect("will-client", will=will(qos=2)).reason == 0
    r.drop()
    m = w.expect_one(timeout=3)
    assert m.qos == 0
    assert_broker_serves(b)
