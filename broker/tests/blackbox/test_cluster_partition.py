"""A network partition of a 3-node zone, made with network namespaces (netzone.py: each node in a
namespace of its own, joined through a bridge; cutting a node's bridge port off makes the partition).
MQTT clients run inside the nodes' namespaces (mosquitto_pub/sub on each node's loopback).

Needs root (ip netns, veth, bridge) and mosquitto clients; skipped where the machine does not allow it."""

import time

import pytest

from conftest import IS_MOSQUITTO, shardmq_has_flag
from netzone import Net, Node, netns_usable, wait_for

pytestmark = [
    pytest.mark.shardmq_only,
    pytest.mark.skipif(IS_MOSQUITTO or not shardmq_has_flag("--cluster-listen"), reason="needs a clustered shardmq"),
    pytest.mark.skipif(not netns_usable(), reason="needs root with ip netns and mosquitto clients"),
]


def test_a_partitioned_node_is_left_out_and_rejoins_when_the_partition_heals(tmp_path):
    net = Net(3)
    nodes = []
    try:
        secret = tmp_path / "secret"
        secret.write_text("a-cluster-secret-of-some-length\n")
        for i in (1, 2, 3):
            nodes.append(Node(net, i, str(tmp_path), str(secret), None if i == 1 else 1))
        n1, n2, n3 = nodes
        wait_for(lambda: all(len(n.linked()) == 2 for n in nodes), 15, "the zone did not form", nodes)

        # Cut n3 off: no FIN, no RST. The others see it go within the link timeout, and keep serving.
        net.cut(3)
        t0 = time.monotonic()
        t1 = wait_for(lambda: "n3" not in n1.linked() and "n3" not in n2.linked(), 5,
                      "n3 still linked after the partition", nodes)
        assert t1 - t0 < 3.0, "partition noticed after %.1fs" % (t1 - t0)
        s2 = n2.sub("part/#", 1, 10)
        time.sleep(0.5)
        took = n1.pub("part/a", "during")
        assert took < 3.0, "a QoS 1 publish took %.1fs to be acknowledged during the partition" % took
        out, _ = s2.communicate(timeout=15)
        assert out.decode().strip() == "during", nodes[1].log()
        # n3 alone still serves its own clients.
        s3 = n3.sub("alone/#", 1, 10)
        time.sleep(0.5)
        n3.pub("alone/x", "local")
        out, _ = s3.communicate(timeout=15)
        assert out.decode().strip() == "local"

        # Heal: n3 comes back and carries traffic again, without restarting anyone.
        net.heal(3)
        wait_for(lambda: all(len(n.linked()) == 2 for n in nodes), 20, "the zone did not heal", nodes)
        s3 = n3.sub("part/#", 1, 10)
        time.sleep(0.5)
        n1.pub("part/b", "after")
        out, _ = s3.communicate(timeout=15)
        assert out.decode().strip() == "after", n3.log()
    finally:
        codes = [n.stop() for n in nodes]
        net.destroy()
    assert codes == [0] * len(nodes), codes
    for n in nodes:
        assert "panicked" not in n.log(), n.log()
