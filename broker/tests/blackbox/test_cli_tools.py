"""Interoperability with the mosquitto_pub / mosquitto_sub command line
clients.  To avoid racing the subscription, the subscriber first creates a
persistent session (-c, -E exits once SUBACK arrived), the messages are
published, and the subscriber reconnects to collect them."""

import shutil
import subprocess

import pytest

from mqtt_client import V311, V5

PUB = shutil.which("mosquitto_pub")
SUB = shutil.which("mosquitto_sub")
pytestmark = pytest.mark.skipif(not (PUB and SUB), reason="mosquitto_pub/mosquitto_sub not installed")


def run(cmd, timeout=10, stdin=None):
    p = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
    assert p.returncode == 0, "%s -> rc %d\nstdout: %s\nstderr: %s" % (
        " ".join(cmd), p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
    return p.stdout.decode("utf-8", "replace").splitlines()


def hp(b):
    return ["-h", b.host, "-p", str(b.port)]


def test_cli_pub_sub_v311(broker):
    b = broker()
    base = [SUB] + hp(b) + ["-V", "mqttv311", "-i", "cli-sub-311", "-c", "-q", "1", "-t", "cli/#"]
    run(base + ["-E"])  # create the persistent session and subscription
    for i in range(3):
        run([PUB] + hp(b) + ["-V", "mqttv311", "-q", "1", "-t", "cli/t%d" % i, "-m", "hello %d" % i])
    out = run(base + ["-C", "3", "-W", "5", "-v"])
    assert out == ["cli/t0 hello 0", "cli/t1 hello 1", "cli/t2 hello 2"]


def test_cli_pub_sub_v5_user_properties(broker):
    b = broker()
    base = [SUB] + hp(b) + ["-V", "mqttv5", "-i", "cli-sub-5", "-c", "-x", "60", "-q", "1", "-t", "cli5/#"]
    run(base + ["-E"])
    run([PUB] + hp(b) + ["-V", "mqttv5", "-q", "1", "-t", "cli5/t", "-m", "hi",
                         "-D", "publish", "user-property", "k1", "v1",
                         "-D", "publish", "user-property", "k0", "v0",
                         "-D", "publish", "content-type", "text/x"])
    out = run(base + ["-C", "1", "-W", "5", "-F", "%t|%p|%P|%C"])
    assert out == ["cli5/t|hi|k1:v1 k0:v0|text/x"]


@pytest.mark.parametrize("ver,flag", [(V311, "mqttv311"), (V5, "mqttv5")], ids=["v311", "v5"])
def test_cli_retained_from_paho(broker, clients, ver, flag):
    b = broker()
    pub = clients(b, "cli-paho-pub", ver)
    pub.publish("cli/ret", b"kept", 2, retain=True)
    out = run([SUB] + hp(b) + ["-V", flag, "-t", "cli/ret", "-C", "1", "-W", "5", "-F", "%r|%t|%p"])
    assert out == ["1|cli/ret|kept"]


def test_cli_pub_lines_in_order(broker, clients):
    b = broker()
    sub = clients(b, "cli-lines-sub", V5)
    sub.subscribe("cli/lines", 1)
    lines = "".join("line %03d\n" % i for i in range(50)).encode()
    run([PUB] + hp(b) + ["-V", "mqttv5", "-q", "1", "-t", "cli/lines", "-l"], stdin=lines)
    got = [m.payload for m in sub.expect(50)]
    assert got == [b"line %03d" % i for i in range(50)]
