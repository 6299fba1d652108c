"""Network namespaces for black-box cluster tests (root only): a zone of nodes, each in a namespace of
its own, joined to the others through a bridge in a further one by veth pairs on a private subnet. Taking a
node's bridge port down cuts it off (no RST, no FIN: the link just goes silent), bringing it up heals.
MQTT clients run inside the nodes' namespaces: mosquitto_pub/sub on each node's loopback, or raw clients
(mqtt_raw.RawClient) whose sockets are opened there.

Used by test_cluster_partition.py and test_cluster_split.py."""

import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
import time

from conftest import SHARDMQ_BIN
from mqtt_raw import RawClient

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

SUBNET = "10.231.%d.%d"


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, timeout=10, check=check)


def netns_usable():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("mosquitto_sub"):
        return False
    name = "smqprobe%d" % os.getpid()
    try:
        return _ip("netns", "add", name, check=False).returncode == 0
    finally:
        _ip("netns", "del", name, check=False)


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
    def __init__(self, net, i, tmp, secret, join, extra=()):
        self.net, self.i, self.name = net, i, "n%d" % i
        self.err_path = os.path.join(tmp, "n%d.stderr" % i)
        cmd = ["ip", "netns", "exec", net.ns(i), SHARDMQ_BIN, "--listen", "127.0.0.1:1883", "--cores", "1",
               "--in-memory", "--node-name", self.name, "--cluster-listen", "%s:7000" % net.addr(i),
               "--cluster-secret-file", secret]
        if join:
            cmd += ["--join", "%s:7000" % net.addr(join)]
        cmd += list(extra)
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

    def raw(self, version=4, timeout=5.0):
        """A RawClient (mqtt_raw) connected to this node's MQTT port, its socket made in the node's
        namespace (the socket stays there; the test uses it from any thread)."""
        return in_netns(self.net.ns(self.i), lambda: RawClient("127.0.0.1", 1883, version, timeout))

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


def in_netns(ns, make):
    """`make()` run in a thread that entered network namespace `ns` (setns(2) acts on the calling thread
    only), so the sockets it opens live there; returns what it returned or raises what it raised."""
    box = {}

    def run():
        try:
            with open("/run/netns/" + ns, "rb") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into %s failed" % ns)
            box["value"] = make()
        except BaseException as e:  # noqa: B902 -- handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise AssertionError("no answer from the thread in namespace %s" % ns)
    return box["value"]


def wait_for(cond, timeout, what, nodes):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError("%s within %.0fs\n%s" % (what, timeout, "\n".join(n.log() for n in nodes)))
