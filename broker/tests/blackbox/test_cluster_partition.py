"""A network partition of a 3-node zone, made with network namespaces: each node in a namespace of its
own, joined to the others through a bridge in a fourth one by veth pairs on a private subnet. Taking a
node's bridge port down cuts it off (no RST, no FIN: the link just goes silent), bringing it up heals.
MQTT clients run inside the nodes' namespaces (mosquitto_pub/sub on each node's loopback).

Needs root (ip netns, veth, bridge) and mosquitto clients; skipped where the machine does not allow it."""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import IS_MOSQUITTO, SHARDMQ_BIN, shardmq_has_flag

SUBNET = "10.231.%d.%d"


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, timeout=10, check=check)


def _netns_usable():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("mosquitto_sub"):
        return False
    name = "smqprobe%d" % os.getpid()
    try:
        return _ip("netns", "add", name, check=False).returncode == 0
    finally:
        _ip("netns", "del", name, check=False)


pytestmark = [
    pytest.mark.shardmq_only,
    pytest.mark.skipif(IS_MOSQUITTO or not shardmq_has_flag("--cluster-listen"), reason="needs a clustered shardmq"),
    pytest.mark.skipif(not _netns_usable(), reason="needs root with ip netns and mosquitto clients"),
]


class Net:
    """ns0 holds a bridge; node i lives in ns<i> at 10.231.<tag>.<i>, its veth's peer a bridge port."""

    def __init__(self, n):
        self.tag = os.getpid() % 200 + 20
        self.prefix = "smq%d" % os.getpid()
        self.n = n
        self.created = []
        br = self.ns(0)
        _ip("netns", "add", br)
        self.created.append(br)
        self.exec(0, "ip", "link", "add", "br0", "type", "bridge")
        self.exec(0, "ip", "link", "set", "br0", "up")
        for i in range(1, n + 1):
            ns = self.ns(i)
            _ip("netns", "add", ns)
            self.created.append(ns)
            self.exec(i, "ip", "link", "set", "lo", "up")
            # Created in the node's namespace, its peer moved into the bridge's.
            self.exec(i, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "p%d" % i)
            self.exec(i, "ip", "link", "set", "p%d" % i, "netns", br)
            self.exec(i, "ip", "addr", "add", self.addr(i) + "/24", "dev", "eth0")
            self.exec(i, "ip", "link", "set", "eth0", "up")
            self.exec(0, "ip", "link", "set", "p%d" % i, "master", "br0")
            self.exec(0, "ip", "link", "set", "p%d" % i, "up")

    def ns(self, i):
        return "%s-%d" % (self.prefix, i)

    def addr(self, i):
        return SUBNET % (self.tag, i)

    def exec(self, i, *cmd):
        return subprocess.run(["ip", "netns", "exec", self.ns(i)] + list(cmd), capture_output=True, text=True,
                              timeout=15, check=True)

    def cut(self, i):
        self.exec(0, "ip", "link", "set", "p%d" % i, "down")

    def heal(self, i):
        self.exec(0, "ip", "link", "set", "p%d" % i, "up")

    def destroy(self):
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)


class Node:
    def __init__(self, net, i, tmp, secret, join):
        self.net, self.i, self.name = net, i, "n%d" % i
        self.err_path = os.path.join(tmp, "n%d.stderr" % i)
        cmd = ["ip", "netns", "exec", net.ns(i), SHARDMQ_BIN, "--listen", "127.0.0.1:1883", "--cores", "1",
               "--in-memory", "--node-name", self.name, "--cluster-listen", "%s:7000" % net.addr(i),
               "--cluster-secret-file", secret]
        if join:
            cmd += ["--join", "%s:7000" % net.addr(join)]
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        assert "listening on" in line, self.log()

    def log(self):
        try:
            with open(self.err_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-6000:]
        except OSError:
            return ""

    def linked(self):
        up = set()
        for line in self.log().splitlines():
            m = re.search(r"node=(\S+)", line)
            if m and "cluster peer linked" in line:
                up.add(m.group(1))
            elif m and "cluster peer unlinked" in line:
                up.discard(m.group(1))
        return up

    def sub(self, topic, count, wait_s):
        """mosquitto_sub in this node's namespace: the first `count` messages, or what came in `wait_s`."""
        return subprocess.Popen(["ip", "netns", "exec", self.net.ns(self.i), "mosquitto_sub", "-h", "127.0.0.1",
                                 "-p", "1883", "-t", topic, "-q", "1", "-C", str(count), "-W", str(wait_s)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def pub(self, topic, msg, timeout=10):
        """A QoS 1 publish; returns how long until it was acknowledged (mosquitto_pub exits after PUBACK)."""
        t0 = time.monotonic()
        self.net.exec(self.i, "timeout", str(timeout), "mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-t",
                      topic, "-q", "1", "-m", msg)
        return time.monotonic() - t0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                return None
        return self.proc.returncode


def wait_for(cond, timeout, what, nodes):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError("%s within %.0fs\n%s" % (what, timeout, "\n".join(n.log() for n in nodes)))


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
