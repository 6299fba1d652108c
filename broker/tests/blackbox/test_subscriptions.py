"""Topic matching, wildcards, $-topics, overlapping subscriptions,
unsubscribe, shared subscriptions, topic level limit."""

import time

import pytest

import mqtt_raw as R
from mqtt_client import ALL_VERSIONS, V311, V5, assert_broker_serves, settle, ver_id


def collect_total(members, n, timeout=10.0):
    """Payloads per member until n messages arrived in total (bounded), plus
    a short grace period to catch duplicates."""
    got = [[] for _ in members]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < n and time.monotonic() < deadline:
        for i, m in enumerate(members):
            got[i] += [x.payload for x in m.drain(0.01)]
    for i, m in enumerate(members):
        got[i] += [x.payload for x in m.drain(0.1 if i == 0 else 0.01)]
    return got


def matches(filt, topic):
    """Reference matcher written from the spec (4.7)."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    fl, tl = filt.split("/"), topic.split("/")
    for i, part in enumerate(fl):
        if part == "#":
            return True
        if i >= len(tl):
            return False
        if part != "+" and part != tl[i]:
            return False
    return len(fl) == len(tl)


def test_reference_matcher():
    # spot checks of the table the broker is compared against
    assert matches("w/#", "w") and matches("w/#", "w/a/b") and matches("#", "w")
    assert matches("w/+", "w/") and matches("+/+", "/w") and matches("/+", "/w")
    assert not matches("w/+", "w") and not matches("w/+", "w/a/b") and not matches("+", "/w")
    assert not matches("#", "$SYS/x") and not matches("+/x", "$SYS/x") and matches("$SYS/#", "$SYS/x")
    assert not matches("w/a", "W/a") and matches("w//b", "w//b") and not matches("w/+/b", "w/b")


FILTERS = ["w/a/b", "w/+/b", "w/#", "w/+", "w/+/+", "w/a/#", "+/a/b", "#", "+/+/+",
           "w/+/b/#", "$w/#", "+/w", "/+", "w//b", "+", "W/a/b", "$w/+"]
TOPICS = ["w/a/b", "w/x/b", "w/a", "w", "w/a/b/c", "w/", "w//b", "x/a/b", "$w/a",
          "$w", "/w", "W/a/b", "$SYS/x", "w/a/b/"]


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_wildcard_matching(broker, clients, ver):
    b = broker()
    subs = {}
    for i, f in enumerate(FILTERS):
        c = clients(b, "wild-%d" % i, ver)
        assert c.subscribe(f, 1) == [1], f
        subs[f] = c
    pub = clients(b, "wild-pub", ver)
    for t in TOPICS:
        pub.publish(t, t.encode(), 1)
    failures = []
    for f, c in subs.items():
        expected = sorted(t for t in TOPICS if matches(f, t))
        try:
            got = sorted(m.topic for m in c.expect(len(expected), timeout=3))
        except AssertionError as e:
            failures.append("%s: %s" % (f, e))
            continue
        if got != expected:
            failures.append("%s: got %r expected %r" % (f, got, expected))
    for f, c in subs.items():
        extra = c.drain(0.05)
        if extra:
            failures.append("%s: unexpected extra %r" % (f, extra))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_dollar_topics_not_matched_by_leading_wildcards(broker, clients, ver):
    b = broker()
    hash_sub = clients(b, "dollar-hash", ver)
    hash_sub.subscribe("#", 1)
    plus_sub = clients(b, "dollar-plus", ver)
    plus_sub.subscribe("+/x", 1)
    dollar_sub = clients(b, "dollar-exact", ver)
    dollar_sub.subscribe("$app/#", 1)
    pub = clients(b, "dollar-pub", ver)
    pub.publish("$SYS/x", b"sys", 0)  # a broker may also refuse this; never to "#"
    pub.publish("$app/x", b"app", 1)
    pub.publish("normal/x", b"normal", 1)
    assert [m.topic for m in hash_sub.expect(1)] == ["normal/x"]
    assert [m.topic for m in plus_sub.expect(1)] == ["normal/x"]
    assert [m.topic for m in dollar_sub.expect(1)] == ["$app/x"]
    for c in (hash_sub, plus_sub, dollar_sub):
        c.expect_none(0.2)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_multiple_filters_in_one_subscribe(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    assert r.connect("multi-sub").reason == 0
    ack = r.subscribe([("mf/a", 0), ("mf/b", 1), ("mf/c", 2)])
    assert ack.codes == [0, 1, 2]
    pub = clients(b, "multi-pub", ver)
    for t in ("mf/a", "mf/b", "mf/c"):
        pub.publish(t, b"x", 2)
    got = sorted((p.topic, p.qos) for p in (r.recv_publish() for _ in range(3)))
    assert got == [("mf/a", 0), ("mf/b", 1), ("mf/c", 2)]
    r.disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_subscription_replaced_not_duplicated(broker, clients, ver):
    b = broker()
    sub = clients(b, "replace-sub", ver)
    assert sub.subscribe("rep/t", 0) == [0]
    assert sub.subscribe("rep/t", 2) == [2]
    pub = clients(b, "replace-pub", ver)
    pub.publish("rep/t", b"x", 2)
    m = sub.expect_one()
    assert m.qos == 2
    sub.expect_none(0.3)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_overlapping_subscriptions_same_client(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    assert r.connect("overlap").reason == 0
    if ver == V5:
        r.subscribe([("ov/#", 1)], properties={R.P_SUBSCRIPTION_ID: 1})
        r.subscribe([("ov/+", 2)], properties={R.P_SUBSCRIPTION_ID: 2})
    else:
        r.subscribe([("ov/#", 1)])
        r.subscribe([("ov/+", 2)])
    pub = clients(b, "overlap-pub", ver)
    pub.publish("ov/a", b"both", 2)
    copies = [r.recv_publish()] + [p for p in r.recv_all(0.4) if p.type == R.PUBLISH]
    for p in copies:
        if p.qos:
            r.ack(p)
    # One copy per matching subscription, each with its own QoS and identifier,
    # as Mosquitto delivers them.
    assert len(copies) == 2 and all(p.payload == b"both" for p in copies), copies
    copies.sort(key=lambda p: p.qos)
    assert [p.qos for p in copies] == [1, 2], copies
    assert copies[0].pid != copies[1].pid, copies
    if ver == V5:
        assert [p.props.all(R.P_SUBSCRIPTION_ID) for p in copies] == [[1], [2]], copies
    # a topic matched by only one of them arrives once
    pub.publish("ov/a/b", b"one", 2)
    p = r.recv_publish()
    assert p.payload == b"one" and p.qos == 1
    if ver == V5:
        assert p.props.all(R.P_SUBSCRIPTION_ID) == [1]
    assert r.recv_all(0.3) == []
    r.disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_unsubscribe_stops_delivery(broker, clients, ver):
    b = broker()
    sub = clients(b, "unsub-sub", ver)
    sub.subscribe("un/t", 1)
    sub.subscribe("un/u", 1)
    pub = clients(b, "unsub-pub", ver)
    pub.publish("un/t", b"1", 1)
    assert sub.expect_one().topic == "un/t"
    codes = sub.unsubscribe("un/t")
    if ver == V5:
        assert codes == [0]
    pub.publish("un/t", b"2", 1)
    pub.publish("un/u", b"3", 1)
    m = sub.expect_one()
    assert (m.topic, m.payload) == ("un/u", b"3")
    sub.expect_none(0.3)


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_unsuback_raw(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    assert r.connect("unsub-raw").reason == 0
    r.subscribe([("ua/exists", 1)])
    ack = r.unsubscribe(["ua/exists", "ua/never"], pid=0x0A0B)
    assert ack.pid == 0x0A0B and ack.flags == 0
    if ver == V5:
        assert ack.codes == [0x00, 0x11]
    else:
        assert ack.body == b"\x0a\x0b", "3.1.1 UNSUBACK has no payload"
    r.disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_unsubscribe_persists_in_session(broker, clients, ver):
    b = broker()
    props = {R.P_SESSION_EXPIRY: 60} if ver == V5 else None
    r = clients.raw(b, ver)
    assert r.connect("unsub-persist", clean=False, properties=props).reason == 0
    r.subscribe([("up/a", 1), ("up/b", 1)])
    r.unsubscribe(["up/a"])
    r.disconnect()
    settle()
    pub = clients(b, "unsub-persist-pub", ver)
    pub.publish("up/a", b"a", 1)
    pub.publish("up/b", b"b", 1)
    r = clients.raw(b, ver)
    assert r.connect("unsub-persist", clean=False, properties=props).session_present
    assert r.recv_publish().topic == "up/b"
    assert r.recv_all(0.3) == []
    r.disconnect()


# ------------------------------------------------------------ shared subscriptions

@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_shared_subscription_distribution(broker, clients, ver):
    b = broker()
    members = [clients(b, "share-m%d" % i, ver) for i in range(3)]
    for m in members:
        assert m.subscribe("$share/g1/sh/#", 1) == [1]
    other_group = clients(b, "share-g2", ver)
    other_group.subscribe("$share/g2/sh/#", 1)
    plain = clients(b, "share-plain", ver)
    plain.subscribe("sh/#", 1)
    pub = clients(b, "share-pub", ver)
    for i in range(100):
        pub.publish("sh/t", b"%03d" % i, 1, wait=False)
    everything = sorted(b"%03d" % i for i in range(100))
    assert sorted(m.payload for m in plain.expect(100, timeout=10)) == everything
    assert sorted(m.payload for m in other_group.expect(100, timeout=10)) == everything
    got = collect_total(members, 100)
    assert sorted(p for g in got for p in g) == everything, "each message to exactly one member: %r" % [len(g) for g in got]
    assert all(len(g) > 0 for g in got), "every member should get some: %r" % [len(g) for g in got]

    # a member leaves: the others get all subsequent messages
    members[2].disconnect()
    settle()
    for i in range(30):
        pub.publish("sh/t", b"late%02d" % i, 1, wait=False)
    late = sorted(b"late%02d" % i for i in range(30))
    assert sorted(m.payload for m in plain.expect(30, timeout=10)) == late
    rest = [p for g in collect_total(members[:2], 30) for p in g]
    assert sorted(rest) == late


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_shared_subscription_unsubscribe(broker, clients, ver):
    b = broker()
    a = clients(b, "shu-a", ver)
    c = clients(b, "shu-b", ver)
    a.subscribe("$share/grp/shu/t", 1)
    c.subscribe("$share/grp/shu/t", 1)
    c.unsubscribe("$share/grp/shu/t")
    pub = clients(b, "shu-pub", ver)
    for i in range(10):
        pub.publish("shu/t", b"%d" % i, 1)
    assert len(a.expect(10)) == 10
    c.expect_none(0.2)


def test_shared_subscription_single_member_gets_all_v5(broker, clients):
    b = broker()
    m = clients(b, "shs-only", V5)
    m.subscribe("$share/solo/shs/+", 2)
    pub = clients(b, "shs-pub", V5)
    for i in range(20):
        pub.publish("shs/%d" % (i % 3), b"%d" % i, 2, wait=False)
    assert sorted(int(x.payload) for x in m.expect(20)) == list(range(20))


# ------------------------------------------------------------ topic level limit

@pytest.mark.shardmq_only  # --max-topic-levels has no mosquitto equivalent
@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_max_topic_levels(broker, clients, ver):
    b = broker("--max-topic-levels", "4")
    r = clients.raw(b, ver)
    assert r.connect("levels-sub").reason == 0
    ack = r.subscribe([("l/1/2/3", 1), ("l/1/2/3/4", 1), ("l/#", 1)])
    assert ack.codes == [1, 0x8F if ver == V5 else 0x80, 1]
    pub = clients.raw(b, ver)
    assert pub.connect("levels-pub").reason == 0
    a = pub.publish("l/1/2/3/4", b"deep", qos=1)
    if ver == V5:
        assert a.reason == 0x90, a
    pub.publish("l/1/2/3", b"ok", qos=1)
    # l/1/2/3 and l/# both match: one copy each (the deep publish reached neither).
    got = [r.recv_publish()] + [x for x in r.recv_all(0.3) if x.type == R.PUBLISH]
    assert [x.payload for x in got] == [b"ok", b"ok"], got
    r.disconnect()
    assert_broker_serves(b, ver)


def owner_shard(client_id, shards=2):
    """The shard that owns a client id: XXH3-64 (seed 0) mod shards, the
    placement rule the data directory records."""
    import xxhash
    return xxhash.xxh3_64_intdigest(client_id.encode()) % shards


def test_subscribe_processed_on_one_shard_is_seen_by_a_publish_on_another(broker, clients):
    """A SUBSCRIBE the node has processed (its PINGRESP, sent after it on the
    same connection, came back; its SUBACK may still wait for the other shard)
    is matched by another client's PUBLISH routed on another shard afterwards.
    1,000 rounds, a new topic each, zero misses."""
    b = broker("--cores", "2")
    sub_id = next(i for i in ("vis-sub-%d" % n for n in range(100)) if owner_shard(i) == 1)
    pub_id = next(i for i in ("vis-pub-%d" % n for n in range(100)) if owner_shard(i) == 0)
    s = clients.raw(b, V5)
    assert s.connect(sub_id).reason == 0
    p = clients.raw(b, V5)
    assert p.connect(pub_id).reason == 0
    misses = []
    for rnd in range(1000):
        topic = "vis/%d" % rnd
        s.send(R.subscribe(s.next_pid(), [(topic, R.sub_options(0))], version=5) + R.pingreq())
        got = []
        while True:
            pkt = s.recv(5)
            if pkt.type == R.PINGRESP:
                break
            got.append(pkt)
        p.send(R.publish(topic, b"%d" % rnd, qos=0, version=5))
        deadline = time.monotonic() + 5
        while not any(g.type == R.PUBLISH for g in got) and time.monotonic() < deadline:
            try:
                got.append(s.recv(0.5 if any(g.type == R.SUBACK for g in got) else 5))
            except TimeoutError:
                break
        pubs = [g for g in got if g.type == R.PUBLISH]
        if [g.payload for g in pubs] != [b"%d" % rnd]:
            misses.append(rnd)
            if len(misses) >= 20:
                break
        if not any(g.type == R.SUBACK for g in got):
            s.expect(R.SUBACK)
    assert not misses, "%d of 1000 rounds missed: %r" % (len(misses), misses[:10])
