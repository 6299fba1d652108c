"""MQTT 5 only features: session expiry, message expiry, topic aliases,
subscription identifiers, No Local, Retain As Published, Retain Handling,
property pass-through."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import V311, V5, assert_broker_serves, publish_props, settle


def _connect(clients, b, cid, clean, expiry=None, extra=None):
    r = clients.raw(b, V5)
    props = {}
    if expiry is not None:
        props[R.P_SESSION_EXPIRY] = expiry
    props.update(extra or {})
    ca = r.connect(cid, clean=clean, properties=props or None)
    assert ca.reason == 0
    return r, ca


# ------------------------------------------------------------ session expiry

def test_session_expires_after_interval(broker, clients):
    b = broker()
    r, _ = _connect(clients, b, "sexp", True, 1)
    r.subscribe([("sexp/t", 1)])
    r.disconnect()
    time.sleep(2.2)
    pub = clients(b, "sexp-pub", V5)
    pub.publish("sexp/t", b"after", 1)
    r, ca = _connect(clients, b, "sexp", False, 60)
    assert ca.session_present is False
    assert r.recv_all(0.3) == []
    r.disconnect()


def test_session_kept_within_interval(broker, clients):
    b = broker()
    r, _ = _connect(clients, b, "skeep", True, 5)
    r.subscribe([("skeep/t", 1)])
    r.drop()
    settle()
    pub = clients(b, "skeep-pub", V5)
    pub.publish("skeep/t", b"q1", 1)
    pub.publish("skeep/t", b"q2", 1)
    r, ca = _connect(clients, b, "skeep", False, 5)
    assert ca.session_present is True
    assert [r.recv_publish().payload for _ in range(2)] == [b"q1", b"q2"]
    r.disconnect()


def test_session_expiry_zero_ends_session_on_close(broker, clients):
    b = broker()
    r, _ = _connect(clients, b, "szero", False, None)  # no property = 0
    r.subscribe([("szero/t", 1)])
    r.drop()
    settle()
    r, ca = _connect(clients, b, "szero", False, 60)
    assert ca.session_present is False
    r.disconnect()


def test_disconnect_can_set_session_expiry_to_zero(broker, clients):
    b = broker()
    r, _ = _connect(clients, b, "sdisc", True, 60)
    r.subscribe([("sdisc/t", 1)])
    r.disconnect(reason=0, properties={R.P_SESSION_EXPIRY: 0})
    settle()
    r, ca = _connect(clients, b, "sdisc", False, 60)
    assert ca.session_present is False
    r.disconnect()


# ------------------------------------------------------------ message expiry

def test_message_expiry_for_offline_session(broker, clients):
    b = broker()
    r, _ = _connect(clients, b, "mexp", True, 60)
    r.subscribe([("mexp/#", 1)])
    r.disconnect()
    settle()
    pub = clients(b, "mexp-pub", V5)
    pub.publish("mexp/short", b"short", 1, properties=publish_props(MessageExpiryInterval=1))
    pub.publish("mexp/long", b"long", 1, properties=publish_props(MessageExpiryInterval=60))
    pub.publish("mexp/none", b"none", 1)
    time.sleep(2.1)
    r, ca = _connect(clients, b, "mexp", False, 60)
    assert ca.session_present
    got = [r.recv_publish() for _ in range(2)]
    assert [p.payload for p in got] == [b"long", b"none"]
    remaining = got[0].props.get(R.P_MESSAGE_EXPIRY)
    assert remaining is not None and 1 <= remaining <= 59, remaining
    assert R.P_MESSAGE_EXPIRY not in got[1].props
    assert r.recv_all(0.2) == []
    r.disconnect()


def test_message_expiry_forwarded_live(broker, clients):
    b = broker()
    sub = clients(b, "mexp-live", V5)
    sub.subscribe("mexpl/t", 1)
    pub = clients(b, "mexpl-pub", V5)
    pub.publish("mexpl/t", b"x", 1, properties=publish_props(MessageExpiryInterval=30))
    m = sub.expect_one()
    assert 28 <= m.prop("MessageExpiryInterval") <= 30


# ------------------------------------------------------------ topic aliases

def test_topic_alias_client_to_server(broker, clients):
    b = broker("--max-topic-alias", "10")
    sub = clients(b, "ta-sub", V5)
    sub.subscribe("ta/#", 1)
    raw_sub, _ = _connect(clients, b, "ta-rawsub", True)  # Topic Alias Maximum 0
    raw_sub.subscribe([("ta/#", 0)])
    r, ca = _connect(clients, b, "ta-pub", True)
    assert ca.props.get(R.P_TOPIC_ALIAS_MAXIMUM, 0) >= 2
    r.publish("ta/one", b"p1", qos=1, properties={R.P_TOPIC_ALIAS: 1})
    r.publish("", b"p2", qos=1, properties={R.P_TOPIC_ALIAS: 1})
    r.publish("ta/two", b"p3", qos=0, properties={R.P_TOPIC_ALIAS: 2})
    r.publish("", b"p4", qos=1, properties={R.P_TOPIC_ALIAS: 2})
    r.publish("ta/three", b"p5", qos=1, properties={R.P_TOPIC_ALIAS: 1})  # remap
    r.publish("", b"p6", qos=1, properties={R.P_TOPIC_ALIAS: 1})
    expected = [("ta/one", b"p1"), ("ta/one", b"p2"), ("ta/two", b"p3"), ("ta/two", b"p4"),
                ("ta/three", b"p5"), ("ta/three", b"p6")]
    got = sub.expect(6)
    assert sorted((m.topic, m.payload) for m in got) == sorted(expected)
    raw = [raw_sub.expect(R.PUBLISH) for _ in range(6)]
    assert sorted((p.topic, p.payload) for p in raw) == sorted(expected)
    assert not any(R.P_TOPIC_ALIAS in p.props for p in raw), "alias sent to a client with Topic Alias Maximum 0"
    r.disconnect()


def test_topic_alias_server_to_client(broker, clients):
    """The broker may use topic aliases towards a client that allows them;
    whatever it does, topics must resolve correctly and aliases stay in range."""
    b = broker()
    r, _ = _connect(clients, b, "tas-sub", True, extra={R.P_TOPIC_ALIAS_MAXIMUM: 3})
    r.subscribe([("tas/#", 0)])
    pub = clients(b, "tas-pub", V5)
    topics = ["tas/a", "tas/a", "tas/b", "tas/a", "tas/c", "tas/d", "tas/b", "tas/d", "tas/e", "tas/a"]
    for i, t in enumerate(topics):
        pub.publish(t, b"%d" % i, 1)
    aliases = {}
    resolved = []
    for _ in topics:
        p = r.expect(R.PUBLISH)
        alias = p.props.get(R.P_TOPIC_ALIAS)
        if alias is not None:
            assert 1 <= alias <= 3, alias
            if p.topic:
                aliases[alias] = p.topic
            else:
                assert alias in aliases, "alias %d used before it was defined" % alias
        else:
            assert p.topic, "empty topic without alias"
        resolved.append((aliases[alias] if (alias is not None and not p.topic) else p.topic, p.payload))
    assert resolved == [(t, b"%d" % i) for i, t in enumerate(topics)]
    r.disconnect()


# ------------------------------------------------------------ subscription options

def test_subscription_identifiers(broker, clients):
    b = broker()
    r, _ = _connect(clients, b, "sid-sub", True)
    r.subscribe([("sid/a/#", 1)], properties={R.P_SUBSCRIPTION_ID: 7})
    r.subscribe([("sid/+/x", 1)], properties={R.P_SUBSCRIPTION_ID: 300})
    r.subscribe([("sid/none", 1)])
    pub = clients(b, "sid-pub", V5)
    pub.publish("sid/a/y", b"1", 1)
    p = r.recv_publish()
    assert p.props.all(R.P_SUBSCRIPTION_ID) == [7]
    pub.publish("sid/b/x", b"2", 1)
    p = r.recv_publish()
    assert p.props.all(R.P_SUBSCRIPTION_ID) == [300]
    pub.publish("sid/none", b"3", 1)
    p = r.recv_publish()
    assert p.props.all(R.P_SUBSCRIPTION_ID) == []
    pub.publish("sid/a/x", b"4", 1)
    copies = [r.recv_publish()] + r.recv_all(0.3)
    for c in copies[1:]:
        r.ack(c)
    ids = sorted(i for c in copies for i in c.props.all(R.P_SUBSCRIPTION_ID))
    assert ids == [7, 300], copies
    # updating the subscription without an id removes the id
    r.subscribe([("sid/a/#", 1)])
    pub.publish("sid/a/z", b"5", 1)
    assert r.recv_publish().props.all(R.P_SUBSCRIPTION_ID) == []
    r.disconnect()


def test_no_local(broker, clients):
    b = broker()
    me = clients(b, "nl-me", V5)
    me.subscribe("nl/t", 1, no_local=True)
    me.subscribe("nl/all", 1, no_local=False)
    other = clients(b, "nl-other", V5)
    me.publish("nl/t", b"own", 1)
    other.publish("nl/t", b"theirs", 1)
    me.publish("nl/all", b"own-all", 1)
    got = sorted(m.payload for m in me.expect(2))
    assert got == [b"own-all", b"theirs"]
    me.expect_none(0.3)


def test_retain_as_published(broker, clients):
    b = broker()
    rap = clients(b, "rap-on", V5)
    rap.subscribe("rap/t", 1, rap=True)
    norap = clients(b, "rap-off", V5)
    norap.subscribe("rap/t", 1, rap=False)
    pub = clients(b, "rap-pub", V5)
    pub.publish("rap/t", b"r", 1, retain=True)
    pub.publish("rap/t", b"n", 1, retain=False)
    assert [(m.payload, m.retain) for m in rap.expect(2)] == [(b"r", True), (b"n", False)]
    assert [(m.payload, m.retain) for m in norap.expect(2)] == [(b"r", False), (b"n", False)]


@pytest.mark.parametrize("rh", [0, 1, 2])
def test_retain_handling(broker, clients, rh):
    b = broker()
    pub = clients(b, "rh-pub", V5)
    pub.publish("rh/t", b"stored", 1, retain=True)
    sub = clients(b, "rh-sub", V5)
    sub.subscribe("rh/t", 1, retain_handling=rh)
    if rh == 2:
        sub.expect_none(0.3)
    else:
        m = sub.expect_one()
        assert (m.payload, m.retain) == (b"stored", True)
    # subscribing again to the existing subscription
    sub.subscribe("rh/t", 1, retain_handling=rh)
    if rh == 0:
        assert sub.expect_one().payload == b"stored"
    sub.expect_none(0.3)


# ------------------------------------------------------------ properties

def test_publish_properties_passed_through(broker, clients):
    b = broker()
    sub = clients(b, "props-sub", V5)
    sub.subscribe("props/t", 2)
    raw_sub, _ = _connect(clients, b, "props-raw", True)
    raw_sub.subscribe([("props/t", 1)])
    v3 = clients(b, "props-v3", V311)
    v3.subscribe("props/t", 1)
    pub = clients(b, "props-pub", V5)
    user = [("z", "1"), ("a", "2"), ("z", "3"), ("ünï", "cödé")]
    props = publish_props(PayloadFormatIndicator=1, ContentType="application/json",
                          ResponseTopic="props/reply", CorrelationData=b"\x00\x01corr",
                          UserProperty=list(user))
    pub.publish("props/t", b'{"a":1}', 1, properties=props)
    m = sub.expect_one()
    assert m.payload == b'{"a":1}'
    assert m.prop("PayloadFormatIndicator") == 1
    assert m.prop("ContentType") == "application/json"
    assert m.prop("ResponseTopic") == "props/reply"
    assert m.prop("CorrelationData") == b"\x00\x01corr"
    assert m.prop("UserProperty") == user
    p = raw_sub.recv_publish()
    assert p.props.all(R.P_USER_PROPERTY) == user, "user property order must be preserved"
    assert p.props.get(R.P_CONTENT_TYPE) == "application/json"
    assert v3.expect_one().payload == b'{"a":1}'


def test_v311_publish_to_v5_subscriber_has_no_properties(broker, clients):
    b = broker()
    r, _ = _connect(clients, b, "np-sub", True)
    r.subscribe([("np/t", 1)])
    pub = clients(b, "np-pub", V311)
    pub.publish("np/t", b"plain", 1)
    p = r.recv_publish()
    assert p.payload == b"plain"
    assert [k for k, _ in p.props if k not in (R.P_SUBSCRIPTION_ID, R.P_TOPIC_ALIAS)] == []
    r.disconnect()
    assert_broker_serves(b)
