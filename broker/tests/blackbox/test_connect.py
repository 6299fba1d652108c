"""CONNECT / CONNACK, sessions, takeover, keepalive, connect timeout,
client identifiers, CONNACK properties, graceful shutdown."""

import subprocess
import time

import pytest

import mqtt_raw as R
from conftest import SHARDMQ_BIN
from mqtt_client import ALL_VERSIONS, IS_MOSQUITTO, V311, V5, assert_broker_serves, settle, ver_id


def sei(ver, seconds):
    """v5 Session Expiry Interval property (None for v3.1.1)."""
    return {R.P_SESSION_EXPIRY: seconds} if ver == V5 and seconds else None


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_connect_connack(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    ca = r.connect("basic-client", clean=True, keepalive=30)
    assert ca.reason == 0
    assert ca.session_present is False
    if ver == V311:
        # 3.1.1 CONNACK is exactly 20 02 00 00
        assert ca.flags == 0 and ca.body == b"\x00\x00"
    else:
        assert ca.flags == 0
        # the server must not send a property it does not know; values sane
        if R.P_RECEIVE_MAXIMUM in ca.props:
            assert ca.props.get(R.P_RECEIVE_MAXIMUM) > 0
        if R.P_MAXIMUM_QOS in ca.props:
            assert ca.props.get(R.P_MAXIMUM_QOS) in (0, 1)
    pr = r.ping()
    assert pr.body == b""
    r.disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_session_present_persistent(broker, clients, ver):
    b = broker()

    def conn(clean, expiry):
        r = clients.raw(b, ver)
        ca = r.connect("sp-client", clean=clean, properties=sei(ver, expiry))
        assert ca.reason == 0
        return r, ca.session_present

    r, sp = conn(False, 60)
    assert sp is False, "first connect can't have a session"
    r.disconnect()
    settle()
    r, sp = conn(False, 60)
    assert sp is True, "persistent session should be present on reconnect"
    r.drop()  # abnormal close keeps the session as well
    settle()
    r, sp = conn(False, 60)
    assert sp is True
    r.disconnect()
    settle()
    r, sp = conn(True, 60)
    assert sp is False, "clean session/start must discard the session"
    r.disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_clean_session_not_kept(broker, clients, ver):
    """v3: CleanSession=1 session ends with the connection; v5: Clean Start=1
    with Session Expiry 0 likewise."""
    b = broker()
    r = clients.raw(b, ver)
    assert r.connect("clean-client", clean=True).reason == 0
    r.subscribe([("clean/t", 1)])
    r.disconnect()
    settle()
    r = clients.raw(b, ver)
    ca = r.connect("clean-client", clean=False, properties=sei(ver, 60))
    assert ca.reason == 0 and ca.session_present is False
    # and the old subscription is gone
    pub = clients(b, "clean-pub", V5)
    pub.publish("clean/t", b"x", 1)
    assert r.recv_all(0.3) == []
    r.disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
@pytest.mark.parametrize("persistent", [False, True], ids=["clean", "persistent"])
def test_session_takeover(broker, clients, ver, persistent):
    b = broker()
    old = clients.raw(b, ver)
    assert old.connect("dup-id", clean=not persistent, properties=sei(ver, 60 if persistent else 0)).reason == 0
    old.subscribe([("take/t", 1)])
    new = clients.raw(b, ver)
    ca = new.connect("dup-id", clean=not persistent, properties=sei(ver, 60 if persistent else 0))
    assert ca.reason == 0
    assert ca.session_present is persistent
    got = old.wait_closed(3)
    disconnects = [p for p in got if p.type == R.DISCONNECT]
    if ver == V5:
        # Mosquitto 2.0.11 closes the old socket before its DISCONNECT 0x8E is
        # flushed, so the old client sees a bare close there.
        if not (IS_MOSQUITTO and not disconnects):
            assert [p.reason for p in disconnects] == [0x8E], got
    else:
        assert disconnects == [], "a v3.1.1 server never sends DISCONNECT"
    pub = clients(b, "take-pub", V5)
    if persistent:
        # the subscription moved to the new connection
        pub.publish("take/t", b"x", 1)
        p = new.recv_publish()
        assert (p.topic, p.payload) == ("take/t", b"x")
    else:
        new.subscribe([("take/t", 1)])
        pub.publish("take/t", b"y", 1)
        assert new.recv_publish().payload == b"y"
    new.disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_takeover_many_times(broker, clients, ver):
    """Repeated takeovers of one client id from many connections."""
    b = broker()
    conns = []
    for i in range(6):
        r = clients.raw(b, ver)
        ca = r.connect("flappy", clean=False, properties=sei(ver, 60))
        assert ca.reason == 0 and ca.session_present is (i > 0)
        if i == 0:
            r.subscribe([("flap/t", 1)])
        conns.append(r)
    for old in conns[:-1]:
        old.wait_closed(3)
    pub = clients(b, "flap-pub", ver)
    pub.publish("flap/t", b"z", 1)
    assert conns[-1].recv_publish().payload == b"z"
    conns[-1].disconnect()


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_keepalive_timeout_disconnects(broker, clients, ver):
    """A client that stops sending is disconnected after ~1.5 x keepalive,
    and that counts as an abnormal disconnect (will is published)."""
    b = broker()
    watcher = clients(b, "ka-watch", V5)
    watcher.subscribe("ka/will", 1)
    r = clients.raw(b, ver)
    t0 = time.monotonic()
    ca = r.connect("ka-client", keepalive=1, will=dict(topic="ka/will", payload=b"gone", qos=1))
    assert ca.reason == 0
    # Mosquitto 2.0 only checks keepalives every ~5 s, so allow it longer.
    limit = 7.5 if IS_MOSQUITTO else 3.5
    got = r.wait_closed(limit + 0.5)
    dt = time.monotonic() - t0
    assert 1.0 <= dt <= limit, "closed after %.2fs, expected ~1.5s" % dt
    for p in got:
        assert p.type == R.DISCONNECT and ver == V5 and p.reason == 0x8D, got
    m = watcher.expect_one(timeout=2)
    assert m.payload == b"gone"


@pytest.mark.parametrize("ver", ALL_VERSIONS, ids=ver_id)
def test_keepalive_pings_keep_connection(broker, clients, ver):
    b = broker()
    r = clients.raw(b, ver)
    assert r.connect("ka-pinger", keepalive=1).reason == 0
    t_end = time.monotonic() + 2.6
    while time.monotonic() < t_end:
        time.sleep(0.5)
        r.ping(timeout=2)
    r.disconnect()


@pytest.mark.shardmq_only  # mosquitto has no connect timeout setting
def test_connect_timeout(broker, clients):
    b = broker("--connect-timeout-ms", "500")
    silent = clients.raw(b, V5)
    partial = clients.raw(b, V5)
    partial.send(R.connect("partial", version=5)[:5])  # CONNECT started, never finished
    t0 = time.monotonic()
    assert silent.wait_closed(4) == []
    dt = time.monotonic() - t0
    assert 0.3 <= dt <= 2.5, "closed after %.2fs, expected ~0.5s" % dt
    assert partial.wait_closed(2) == []
    # a client that connects in time is not affected by the timeout
    r = clients.raw(b, V5)
    assert r.connect("in-time", keepalive=10).reason == 0
    time.sleep(0.8)
    r.ping()
    r.disconnect()
    assert_broker_serves(b)


def test_server_keep_alive(broker, clients):
    b = broker("--max-keepalive", "10")
    for asked, expect in [(0, 10), (30, 10), (11, 10)]:
        r = clients.raw(b, V5)
        ca = r.connect("ska-%d" % asked, keepalive=asked)
        assert ca.reason == 0
        assert ca.props.get(R.P_SERVER_KEEP_ALIVE) == expect, (asked, ca)
        r.disconnect()
    r = clients.raw(b, V5)
    ca = r.connect("ska-5", keepalive=5)
    assert ca.reason == 0
    assert ca.props.get(R.P_SERVER_KEEP_ALIVE, 5) == 5
    r.disconnect()


@pytest.mark.shardmq_only  # mosquitto refuses max_keepalive < 10
def test_server_keep_alive_is_enforced(broker, clients):
    """Server Keep Alive replaces the client's value: keepalive 0 asked,
    server says 1 -> a silent client is dropped after ~1.5 s."""
    b = broker("--max-keepalive", "1")
    r = clients.raw(b, V5)
    ca = r.connect("ska-enf", keepalive=0)
    assert ca.props.get(R.P_SERVER_KEEP_ALIVE) == 1
    t0 = time.monotonic()
    r.wait_closed(5)
    assert 1.0 <= time.monotonic() - t0 <= 3.5


def test_assigned_client_identifier_v5(broker, clients):
    b = broker()
    ids = []
    for _ in range(2):
        r = clients.raw(b, V5)
        ca = r.connect("", clean=True)
        assert ca.reason == 0
        cid = ca.props.get(R.P_ASSIGNED_CLIENT_ID)
        assert cid, "v5 CONNACK must carry Assigned Client Identifier for an empty client id"
        ids.append(cid)
        r.subscribe([("assigned/t", 1)])
    assert ids[0] != ids[1]
    # v5 allows an empty id with Clean Start 0 too (server assigns one)
    r = clients.raw(b, V5)
    ca = r.connect("", clean=False)
    assert ca.reason == 0 and ca.props.get(R.P_ASSIGNED_CLIENT_ID)


def test_empty_client_id_v311(broker, clients):
    b = broker()
    r = clients.raw(b, V311)
    ca = r.connect("", clean=True)
    assert ca.reason == 0
    assert R.P_ASSIGNED_CLIENT_ID not in ca.props
    r.ping()
    r.disconnect()
    r = clients.raw(b, V311)
    r.send(R.connect("", version=4, clean=False))
    got = r.wait_closed(3)
    assert len(got) == 1 and got[0].type == R.CONNACK, got
    assert got[0].body == b"\x00\x02", "expected CONNACK return code 2 (identifier rejected)"
    assert_broker_serves(b, V311)


def test_connack_properties_from_flags(broker, clients):
    b = broker("--max-packet-size", "2048", "--max-inflight", "7", "--max-topic-alias", "3")
    r = clients.raw(b, V5)
    ca = r.connect("props-client")
    assert ca.reason == 0
    assert ca.props.get(R.P_MAXIMUM_PACKET_SIZE) == 2048
    assert ca.props.get(R.P_RECEIVE_MAXIMUM) == 7
    assert ca.props.get(R.P_TOPIC_ALIAS_MAXIMUM) == 3
    r.disconnect()


def test_graceful_shutdown_sends_disconnect(broker, clients):
    b = broker()
    r5 = clients.raw(b, V5)
    assert r5.connect("shut-v5").reason == 0
    r3 = clients.raw(b, V311)
    assert r3.connect("shut-v3").reason == 0
    assert b.stop() == 0
    got5 = r5.wait_closed(3)
    # Mosquitto 2.0.11 closes without flushing a DISCONNECT on shutdown.
    if not (IS_MOSQUITTO and got5 == []):
        assert [p.reason for p in got5 if p.type == R.DISCONNECT] == [0x8B], got5
    assert r3.wait_closed(3) == []


def test_many_clients_across_shards(broker, clients):
    """Fan-out between many clients: with 2 shards the client ids land on
    both, so most deliveries cross shards."""
    b = broker()
    subs = [clients(b, "fan-sub-%d" % i, ALL_VERSIONS[i % 2]) for i in range(10)]
    for s in subs:
        assert s.subscribe("fan/+", 1) == [1]
    pubs = [clients(b, "fan-pub-%d" % i, ALL_VERSIONS[(i + 1) % 2]) for i in range(10)]
    for i, p in enumerate(pubs):
        p.publish("fan/%d" % i, b"m%d" % i, 1)
    for s in subs:
        got = sorted(m.payload for m in s.expect(10))
        assert got == sorted(b"m%d" % i for i in range(10))
        s.expect_none(0.05)


@pytest.mark.shardmq_only  # a shardmq runtime flag
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_idle_poll_serves_across_shards(broker, clients, qos):
    """--idle-poll-us: after an event a shard polls for more work instead of
    sleeping, so a mesh batch usually finds its target awake and sends no
    wakeup. Deliveries across shards must be exactly as without it, including
    after pauses longer than the window (shards asleep again)."""
    b = broker("--idle-poll-us", "300")
    assert "idle_poll_us=300" in b.stdout()
    subs = [clients(b, "poll-sub-%d" % i, ALL_VERSIONS[i % 2]) for i in range(6)]
    for s in subs:
        assert s.subscribe("poll/+", qos) == [qos]
    pubs = [clients(b, "poll-pub-%d" % i, ALL_VERSIONS[(i + 1) % 2]) for i in range(6)]
    for rnd in range(3):
        for i, p in enumerate(pubs):
            p.publish("poll/%d" % i, b"r%d-m%d" % (rnd, i), qos)
        for s in subs:
            got = sorted(m.payload for m in s.expect(6))
            assert got == sorted(b"r%d-m%d" % (rnd, i) for i in range(6))
        time.sleep(0.05)  # far past the window: every shard sleeps before the next round
    for s in subs:
        s.expect_none(0.05)


@pytest.mark.shardmq_only
def test_idle_poll_past_cap_refused():
    p = subprocess.run([SHARDMQ_BIN, "--listen", "127.0.0.1:0", "--in-memory", "--idle-poll-us", "10001"],
                       capture_output=True, text=True, timeout=15)
    assert p.returncode != 0
    assert "--idle-poll-us" in p.stderr and "10000" in p.stderr, p.stderr[-2000:]
    assert "panicked" not in p.stderr
