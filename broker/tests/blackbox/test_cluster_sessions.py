"""Sessions in a zone of three shardmq nodes (issue "Cluster sessions"): one client id has one live
session in the whole zone, the session follows its client, a killed node's clients' wills are published
by the others, and a node restarted with its log registers its sessions again."""

import subprocess
import time

import pytest

from conftest import IS_MOSQUITTO, shardmq_has_flag
from mqtt_client import V311, V5, connect_props
from test_cluster import wait_linked, zone  # noqa: F401  (zone: the fixture)

pytestmark = [
    pytest.mark.shardmq_only,
    pytest.mark.skipif(IS_MOSQUITTO or not shardmq_has_flag("--cluster-listen"),
                       reason="needs shardmq with --cluster-listen"),
]


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_a_client_id_connecting_on_another_node_takes_the_session_over(zone, clients, version):  # noqa: F811
    n1, n2, n3 = zone(3)
    cid = "roamer-%d" % version
    first = clients(n1, cid, version)
    second = clients(n2, cid, version)
    reason = first.wait_disconnected(5.0)
    if version == V5:
        assert reason == 0x8E, "DISCONNECT Session taken over, got %r" % reason
    # The newest connection is the live one, and it works across the zone.
    assert second.subscribe("roam/t", qos=1) == [1]
    pub = clients(n3, "roam-pub-%d" % version, version)
    pub.publish("roam/t", b"to the newest", qos=1)
    assert second.expect_one().payload == b"to the newest"
    assert not second.disconnected.is_set()
    # And back: the connection on n2 is the one taken over now.
    third = clients(n1, cid, version)
    second.wait_disconnected(5.0)
    assert not third.disconnected.is_set()


def test_partition_mode_is_checked(broker, clients, tmp_path):
    import subprocess
    from conftest import SHARDMQ_BIN
    p = subprocess.run([SHARDMQ_BIN, "--listen", "127.0.0.1:0", "--in-memory", "--cluster-listen", "127.0.0.1:0",
                        "--partition-mode", "sometimes"], capture_output=True, timeout=20, cwd=str(tmp_path))
    assert p.returncode != 0 and b"--partition-mode must be available or consistent" in p.stderr, p.stderr
    # A node alone owns every client id: consistent mode accepts its clients.
    b = broker("--cluster-listen", "127.0.0.1:0", "--node-name", "solo", "--partition-mode", "consistent")
    c = clients(b, "alone", V5)
    assert c.subscribe("solo/t", qos=1) == [1]


def offline_with_queued(clients, version, cid, prefix, home, publisher, count):
    """A persistent session of `cid` on `home`, subscribed to `prefix/#` and offline, with `count` QoS 1
    messages published for it on `publisher`; returns the CONNECT properties it needs and the publisher."""
    props = {"properties": connect_props(SessionExpiryInterval=3600)} if version == V5 else {}
    c = clients(home, cid, version, clean=False, **props)
    assert c.subscribe(prefix + "/#", qos=1) == [1]
    c.disconnect()
    pub = clients(publisher, "%s-pub-%d" % (prefix, version), version)
    for i in range(count):
        pub.publish("%s/%d" % (prefix, i), b"queued %d" % i, qos=1)
    return props, pub


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_a_persistent_session_and_its_queued_messages_follow_the_client(zone, clients, version):  # noqa: F811
    n1, n2, n3 = zone(3)
    cid = "follower-%d" % version
    props, pub = offline_with_queued(clients, version, cid, "follow", home=n1, publisher=n3, count=5)
    away = clients(n2, cid, version, clean=False, **props)
    assert away.session_present, "the session moved with its client"
    got = sorted(m.payload for m in away.expect(5, timeout=5.0))
    assert got == sorted(b"queued %d" % i for i in range(5))
    # The subscription now routes to the new node; nothing is left behind on the old one.
    pub.publish("follow/live", b"live", qos=1)
    assert away.expect_one().payload == b"live"
    back_home = clients(n1, cid + "-probe", version)
    back_home.expect_none(0.3)


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_a_quick_clean_connection_elsewhere_discards_the_session(zone, clients, version):  # noqa: F811
    """mosquitto_pub connects clean, publishes and leaves within a few milliseconds: its node answers it
    before the zone's registry has it and registers it with its end, which still discards the session
    its client id had on another node (clean start), as a longer connection does."""
    n1, n2, n3 = zone(3)
    cid = "quick-%d" % version
    props, _ = offline_with_queued(clients, version, cid, "quick", home=n1, publisher=n3, count=2)
    watch = clients(n3, "quick-watch-%d" % version, version)
    assert watch.subscribe("quick-out/#", qos=1) == [1]
    proto = "mqttv5" if version == V5 else "mqttv311"
    subprocess.run(["mosquitto_pub", "-h", n2.host, "-p", str(n2.port), "-i", cid, "-V", proto, "-t",
                    "quick-out/1", "-q", "1", "-m", "from a quick client"], check=True, timeout=10)
    assert watch.expect_one().payload == b"from a quick client"
    # The session on n1 goes once the registry has the quick connection (a few milliseconds later). A
    # CONNECT that came before would be the newer connection, and keep it.
    time.sleep(0.3)
    back = clients(n1, cid, version, clean=False, **props)
    assert not back.session_present, "the clean connection on n2 discarded the session on n1"
    back.expect_none(0.5)


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_the_wills_of_a_killed_nodes_clients_are_published_by_the_others(zone, clients, version):  # noqa: F811
    n1, n2, n3 = zone(3)
    watch = clients(n2, "will-watch-%d" % version, version)
    assert watch.subscribe("lost/#", qos=1) == [1]
    ids = ["lost-%d-%d" % (version, i) for i in range(4)]
    for cid in ids:
        clients(n1, cid, version, will=dict(topic="lost/" + cid, payload=b"gone", qos=1))
    n1.kill9()
    got = watch.expect(len(ids), timeout=10.0)
    assert sorted(m.topic for m in got) == sorted("lost/" + cid for cid in ids)
    watch.expect_none(1.0)


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_a_restarted_nodes_sessions_are_found_from_the_other_nodes(zone, clients, version):  # noqa: F811
    n1, n2, n3 = zone(3)
    cid = "restored-%d" % version
    props, _ = offline_with_queued(clients, version, cid, "restored", home=n3, publisher=n1, count=3)
    n3.kill9()
    n3.start()
    wait_linked([n1, n2, n3])
    # The restarted node re-registers its sessions as its links come up; give that message its moment
    # (a CONNECT that overtook it would start a new session, and the restored one would be ended).
    time.sleep(1.0)
    away = clients(n2, cid, version, clean=False, **props)
    assert away.session_present, "the session restored on n3 was found from n2\n" + n3.log()
    got = sorted(m.payload for m in away.expect(3, timeout=5.0))
    assert got == sorted(b"queued %d" % i for i in range(3))
    away.expect_none(0.5)
    # It lives on n2 now: a message published on the restarted node reaches it there.
    clients(n3, "restored-pub2-%d" % version, version).publish("restored/after", b"after", qos=1)
    assert away.expect_one().payload == b"after"
