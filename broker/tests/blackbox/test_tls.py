"""MQTT over TLS (--tls-listen, --tls-cert, --tls-key, --tls-client-ca, --tls-cn-as-username),
exercised with clients we did not write: mosquitto_pub/mosquitto_sub and paho-mqtt (Python's ssl,
i.e. OpenSSL, on the client side).  The PKI comes from certs.py (openssl CLI)."""

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

import mqtt_raw as raw
from certs import client_hello, listener, metric, paho, pki, start_fails, tcp_listener, wait_metric  # noqa: F401
from conftest import wait_eof, wait_log
from mqtt_client import V311, V5, ver_id

pytestmark = pytest.mark.shardmq_only

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=ver_id)
MOSQ_PUB = shutil.which("mosquitto_pub")
MOSQ_SUB = shutil.which("mosquitto_sub")
needs_mosquitto_clients = pytest.mark.skipif(not (MOSQ_PUB and MOSQ_SUB),
                                             reason="mosquitto_pub/mosquitto_sub not installed")
MOSQ_VERSION = {V311: "mqttv311", V5: "mqttv5"}


@pytest.fixture
def tls_broker(broker, pki):  # noqa: F811
    """tls_broker(*extra, cert=, key=) starts a broker with a plain TCP listener (.host/.port), a TLS
    listener (.tls) and metrics; the server certificate is CA 1's unless cert/key are given."""
    def start(*extra, cert=None, key=None):
        b = broker("--in-memory", "--tls-listen", "127.0.0.1:0",
                   "--tls-cert", cert or pki.server.cert, "--tls-key", key or pki.server.key,
                   "--metrics-listen", "127.0.0.1:0", *extra)
        b.tls = listener(b, "tls")
        b.tcp = tcp_listener(b)
        assert b.tls.port != b.tcp.port
        return b
    return start


def tls_raw(clients, server, ctx, version=V5):
    """A mqtt_raw.RawClient whose socket is TLS (handshake done on return)."""
    r = clients.raw(server, version)
    r.sock = ctx.wrap_socket(r.sock, server_hostname=server.host)
    return r


def try_tls_connect(clients, server, ctx, version=V5, client_id="probe", **kw):
    """CONNECT over TLS; returns the CONNACK reason code, or an error string when the TLS session or
    the connection was refused before a CONNACK came."""
    try:
        r = tls_raw(clients, server, ctx, version)
        r.send(raw.connect(client_id, version=version, **kw))
        return r.expect(raw.CONNACK, timeout=5).reason
    except (ssl.SSLError, OSError, raw.Closed) as e:
        return "refused: %r" % (e,)


def roundtrip(sub, pub, topic, payload=b"x"):
    """pub publishes QoS 1 to `topic`, sub (already subscribed) receives it."""
    assert pub.publish(topic, payload, qos=1) == 0
    m = sub.expect_one(timeout=5)
    assert (m.topic, m.payload) == (topic, payload)


# ---------------------------------------------------------------- basic pub/sub

@VERSIONS
def test_paho_pub_sub_over_tls(tls_broker, clients, pki, version):  # noqa: F811
    b = tls_broker()
    ctx = pki.client_context()
    sub = paho(clients, b.tls, "tls-sub", version, ctx=ctx)
    assert isinstance(sub.c.socket(), ssl.SSLSocket)
    assert sub.c.socket().getpeercert()["subject"][-1] == (("commonName", "localhost"),)
    assert sub.subscribe("t/#", qos=1) == [1]
    pub = paho(clients, b.tls, "tls-pub", version, ctx=pki.client_context())
    roundtrip(sub, pub, "t/tls", b"over tls")
    # Plain TCP and TLS clients share one broker.
    plain = clients(b.tcp, "plain-pub", version=version)
    roundtrip(sub, plain, "t/plain", b"from tcp")
    assert plain.subscribe("p/#", qos=1) == [1]
    roundtrip(plain, pub, "p/1", b"to tcp")


@pytest.mark.parametrize("tls_version,name", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                                              (ssl.TLSVersion.TLSv1_3, "TLSv1.3")], ids=["tls12", "tls13"])
@VERSIONS
def test_tls_1_2_and_1_3(tls_broker, clients, pki, version, tls_version, name):  # noqa: F811
    b = tls_broker()
    ctx = pki.client_context(tls_min=tls_version, tls_max=tls_version)
    c = paho(clients, b.tls, "v-" + name, version, ctx=ctx)
    assert c.c.socket().version() == name
    assert c.subscribe("self/#", qos=1) == [1]
    roundtrip(c, c, "self/1", name.encode())


def test_untrusted_server_certificate_is_rejected_by_the_client(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker()
    # A client that trusts only CA 2 must not accept the server's CA 1 certificate.
    result = try_tls_connect(clients, b.tls, pki.client_context(cafile=pki.ca2.cert))
    assert isinstance(result, str) and "CERTIFICATE_VERIFY_FAILED" in result, result
    # ... and the broker is fine afterwards.
    assert try_tls_connect(clients, b.tls, pki.client_context()) == 0


@needs_mosquitto_clients
@VERSIONS
def test_mosquitto_clients_over_tls(tls_broker, clients, pki, version):  # noqa: F811
    b = tls_broker()
    tls = ["-h", "localhost", "-p", str(b.tls.port), "--cafile", pki.ca.cert, "-V", MOSQ_VERSION[version]]
    # mosquitto_sub over TLS receives what a plain TCP client publishes.
    plain = clients(b.tcp, "plain", version=version)
    sub = subprocess.Popen([MOSQ_SUB] + tls + ["-t", "m/#", "-C", "1", "-W", "10", "-v", "-q", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while sub.poll() is None and time.monotonic() < deadline:
            plain.publish("m/1", b"to-mosquitto", qos=1)  # until mosquitto_sub has subscribed
            time.sleep(0.2)
        out, err = sub.communicate(timeout=5)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)
    assert sub.returncode == 0, err
    assert out.decode().strip() == "m/1 to-mosquitto"
    # mosquitto_pub over TLS reaches a plain TCP subscriber.
    assert plain.subscribe("n/#", qos=1) == [1]
    p = subprocess.run([MOSQ_PUB] + tls + ["-t", "n/1", "-m", "from-mosquitto", "-q", "1"],
                       capture_output=True, timeout=10)
    assert p.returncode == 0, p.stderr
    m = plain.expect_one(timeout=5)
    assert (m.topic, m.payload) == ("n/1", b"from-mosquitto")
    # The wrong CA: mosquitto_pub refuses the server, nothing is published.
    bad = ["-h", "localhost", "-p", str(b.tls.port), "--cafile", pki.ca2.cert, "-V", MOSQ_VERSION[version]]
    p = subprocess.run([MOSQ_PUB] + bad + ["-t", "n/2", "-m", "nope", "-q", "1"], capture_output=True, timeout=10)
    assert p.returncode != 0
    plain.expect_none(0.5)


# ---------------------------------------------------------------- mutual TLS

@VERSIONS
def test_mutual_tls(tls_broker, clients, pki, version):  # noqa: F811
    b = tls_broker("--tls-client-ca", pki.ca.cert)
    failures = metric(b, "shardmq_tls_failures_total")
    no_cert = try_tls_connect(clients, b.tls, pki.client_context(), version)
    assert isinstance(no_cert, str), "a client without a certificate got CONNACK %r" % (no_cert,)
    other_ca = try_tls_connect(clients, b.tls, pki.client_context(cert=pki.mallory), version)
    assert isinstance(other_ca, str), "a certificate from another CA got CONNACK %r" % (other_ca,)
    wait_metric(b, "shardmq_tls_failures_total", lambda v: v >= failures + 2)
    assert try_tls_connect(clients, b.tls, pki.client_context(cert=pki.alice), version) == 0
    # paho with alice's certificate: a working session.
    c = paho(clients, b.tls, "alice-1", version, ctx=pki.client_context(cert=pki.alice))
    assert c.subscribe("m/#", qos=1) == [1]
    roundtrip(c, c, "m/1")
    # The plain listener is unaffected (loopback, anonymous allowed).
    plain = clients(b.tcp, "plain", version=version)
    roundtrip(c, plain, "m/2")


@needs_mosquitto_clients
def test_mutual_tls_with_mosquitto_pub(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker("--tls-client-ca", pki.ca.cert)
    sub = clients(b.tcp, "plain-sub", version=V5)
    assert sub.subscribe("mt/#", qos=1) == [1]
    base = [MOSQ_PUB, "-h", "localhost", "-p", str(b.tls.port), "--cafile", pki.ca.cert, "-q", "1"]
    p = subprocess.run(base + ["--cert", pki.alice.cert, "--key", pki.alice.key, "-t", "mt/ok", "-m", "a"],
                       capture_output=True, timeout=10)
    assert p.returncode == 0, p.stderr
    assert sub.expect_one(timeout=5).topic == "mt/ok"
    p = subprocess.run(base + ["-t", "mt/nocert", "-m", "n"], capture_output=True, timeout=10)
    assert p.returncode != 0
    p = subprocess.run(base + ["--cert", pki.mallory.cert, "--key", pki.mallory.key, "-t", "mt/mallory",
                               "-m", "m"], capture_output=True, timeout=10)
    assert p.returncode != 0
    sub.expect_none(0.5)


@pytest.fixture
def cn_broker(tls_broker, pki, tmp_path):  # noqa: F811
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\n")
    return tls_broker("--tls-client-ca", pki.ca.cert, "--tls-cn-as-username", "--acl-file", str(acl))


def test_cn_as_username_drives_the_acl(cn_broker, clients, pki):  # noqa: F811
    b = cn_broker
    alice = pki.client_context(cert=pki.alice)
    sub = paho(clients, b.tls, "alice-sub", V5, ctx=alice)
    assert sub.subscribe("a/#", qos=1) == [1]
    assert sub.subscribe("b/#", qos=1) == [0x87]
    # The CONNECT's user name and password are not checked for a certificate client: still alice.
    pub = paho(clients, b.tls, "alice-pub", V5, ctx=pki.client_context(cert=pki.alice),
               username="mallory", password="not-a-password")
    assert pub.publish("a/x", b"allowed", qos=1) == 0
    m = sub.expect_one(timeout=5)
    assert (m.topic, m.payload) == ("a/x", b"allowed")
    assert pub.publish("b/x", b"denied", qos=1) == 0x87
    sub.expect_none(0.5)
    # An anonymous plain TCP client is not alice: the ACL has nothing for it.
    plain = clients(b.tcp, "plain", version=V5)
    assert plain.publish("a/y", b"anon", qos=1) == 0x87
    sub.expect_none(0.3)


def test_cn_as_username_v311(cn_broker, clients, pki):  # noqa: F811
    b = cn_broker
    c = paho(clients, b.tls, "alice-311", V311, ctx=pki.client_context(cert=pki.alice))
    assert c.subscribe("a/#", qos=1) == [1]
    assert c.subscribe("b/#", qos=1) == [0x80]
    c.publish("a/1", b"ok", qos=1)
    assert c.expect_one(timeout=5).topic == "a/1"


def test_cn_as_username_needs_no_password_with_a_password_file(tls_broker, clients, pki, tmp_path):  # noqa: F811
    mosquitto_passwd = shutil.which("mosquitto_passwd")
    if not mosquitto_passwd:
        pytest.skip("mosquitto_passwd not installed")
    pf = str(tmp_path / "passwd")
    subprocess.run([mosquitto_passwd, "-c", "-b", pf, "bob", "bob-pw"], check=True, capture_output=True,
                   timeout=10)
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\nuser bob\ntopic readwrite a/#\n")
    b = tls_broker("--tls-client-ca", pki.ca.cert, "--tls-cn-as-username", "--password-file", pf,
                   "--acl-file", str(acl))
    # alice has no password entry, and sends none: her certificate is her credential.
    assert try_tls_connect(clients, b.tls, pki.client_context(cert=pki.alice), V5, "al") == 0
    assert try_tls_connect(clients, b.tls, pki.client_context(cert=pki.alice), V5, "al2",
                           username="bob", password=b"wrong") == 0
    # On the plain listener the password file still applies.
    r = clients.raw(b.tcp, 5)
    r.send(raw.connect("anon", version=5))
    assert r.expect(raw.CONNACK).reason == 0x87
    r = clients.raw(b.tcp, 5)
    r.send(raw.connect("bob", version=5, username="bob", password=b"wrong"))
    assert r.expect(raw.CONNACK).reason == 0x86


# ---------------------------------------------------------------- start-up errors

BAD_STARTS = {
    # id: (args(pki, tmp_path), [texts that must all be in stderr])
    "missing-cert": (lambda k, t: ["--tls-listen", "127.0.0.1:0", "--tls-cert", t / "nope.crt",
                                   "--tls-key", k.server.key], lambda k, t: [str(t / "nope.crt")]),
    "missing-key": (lambda k, t: ["--tls-listen", "127.0.0.1:0", "--tls-cert", k.server.cert,
                                  "--tls-key", t / "nope.key"], lambda k, t: [str(t / "nope.key")]),
    "key-not-a-key": (lambda k, t: ["--tls-listen", "127.0.0.1:0", "--tls-cert", k.server.cert,
                                    "--tls-key", k.server.cert], lambda k, t: [k.server.cert]),
    "cert-not-a-cert": (lambda k, t: ["--tls-listen", "127.0.0.1:0", "--tls-cert", k.server.key,
                                      "--tls-key", k.server.key], lambda k, t: [k.server.key]),
    "key-of-another-cert": (lambda k, t: ["--tls-listen", "127.0.0.1:0", "--tls-cert", k.server.cert,
                                          "--tls-key", k.alice.key], lambda k, t: [k.alice.key]),
    "missing-client-ca": (lambda k, t: ["--tls-listen", "127.0.0.1:0", "--tls-cert", k.server.cert,
                                        "--tls-key", k.server.key, "--tls-client-ca", t / "nope-ca.crt"],
                          lambda k, t: [str(t / "nope-ca.crt")]),
    "cert-key-without-tls-listener": (lambda k, t: ["--tls-cert", k.server.cert, "--tls-key", k.server.key],
                                      lambda k, t: ["--tls-listen"]),
    "tls-listen-without-files": (lambda k, t: ["--tls-listen", "127.0.0.1:0"], lambda k, t: ["--tls-cert"]),
    "wss-listen-without-files": (lambda k, t: ["--wss-listen", "127.0.0.1:0"], lambda k, t: ["--tls-cert"]),
    "cn-as-username-without-client-ca": (lambda k, t: ["--tls-listen", "127.0.0.1:0", "--tls-cert",
                                                       k.server.cert, "--tls-key", k.server.key,
                                                       "--tls-cn-as-username"],
                                         lambda k, t: ["--tls-cn-as-username", "--tls-client-ca"]),
}


@pytest.mark.parametrize("case", sorted(BAD_STARTS))
def test_bad_tls_settings_refuse_the_start(pki, tmp_path, case):  # noqa: F811
    args, texts = BAD_STARTS[case]
    err = start_fails(tmp_path, *args(pki, tmp_path))
    for text in texts(pki, tmp_path):
        assert text in err, "%r not in stderr:\n%s" % (text, err)
    assert "panicked" not in err


# ---------------------------------------------------------------- bad and stalled peers

def test_garbage_on_the_tls_port_closes_only_that_connection(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker()
    before = metric(b, "shardmq_tls_failures_total")
    good = paho(clients, b.tls, "good", V5, ctx=pki.client_context())
    assert good.subscribe("g/#", qos=1) == [1]
    s = socket.create_connection((b.tls.host, b.tls.port), timeout=5)
    try:
        s.sendall(raw.connect("plain-on-tls", version=4))
        got, _ = wait_eof(s, 5)
    finally:
        s.close()
    assert not got.startswith(b"\x20"), "an MQTT CONNACK on the TLS port: %r" % got
    # At most a TLS alert record came back.
    assert got == b"" or got[0] == 0x15, got[:20]
    wait_metric(b, "shardmq_tls_failures_total", lambda v: v >= before + 1)
    # The established TLS client and new ones are fine.
    assert not good.disconnected.is_set()
    other = paho(clients, b.tls, "other", V5, ctx=pki.client_context())
    roundtrip(good, other, "g/1")


@pytest.mark.parametrize("stall", ["nothing", "half-client-hello"])
def test_stalled_handshake_is_closed_after_the_connect_timeout(tls_broker, clients, pki, stall):  # noqa: F811
    b = tls_broker("--connect-timeout-ms", "500")
    good = paho(clients, b.tls, "good", V5, ctx=pki.client_context())
    assert good.subscribe("s/#", qos=1) == [1]
    stalled = [socket.create_connection((b.tls.host, b.tls.port), timeout=5) for _ in range(3)]
    try:
        if stall == "half-client-hello":
            hello = client_hello(pki.client_context())
            for s in stalled:
                s.sendall(hello[:len(hello) // 2])
        # While they stall, the broker serves others (a new TLS client connects and works).
        other = paho(clients, b.tls, "other", V5, ctx=pki.client_context())
        roundtrip(good, other, "s/1")
        for s in stalled:
            got, took = wait_eof(s, 5)
            assert not got.startswith(b"\x20"), got
        # Closed by the connect timeout, not at once (measured from after the roundtrip: loose bound).
        assert took < 4
    finally:
        for s in stalled:
            s.close()
    roundtrip(good, other, "s/2")
    assert not good.disconnected.is_set()


def test_stalled_handshake_is_not_closed_early(tls_broker, pki):  # noqa: F811
    b = tls_broker("--connect-timeout-ms", "1500")
    s = socket.create_connection((b.tls.host, b.tls.port), timeout=5)
    try:
        t0 = time.monotonic()
        _, _ = wait_eof(s, 6)
        took = time.monotonic() - t0
    finally:
        s.close()
    assert 1.2 <= took <= 5, took


# ---------------------------------------------------------------- reload

def test_sighup_reloads_certificate_and_key(tls_broker, clients, pki, tmp_path):  # noqa: F811
    cert, key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    b = tls_broker(cert=cert, key=key)
    old = paho(clients, b.tls, "old", V5, ctx=pki.client_context())
    assert old.subscribe("r/#", qos=1) == [1]
    assert try_tls_connect(clients, b.tls, pki.client_context(cafile=pki.ca2.cert), client_id="early") != 0
    # The operator installs a certificate from CA 2 and asks for a reload.
    shutil.copy(pki.server2.cert, cert)
    shutil.copy(pki.server2.key, key)
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "TLS certificate, key and client CAs reloaded")
    new = paho(clients, b.tls, "new", V5, ctx=pki.client_context(cafile=pki.ca2.cert))
    assert new.c.socket().getpeercert()["issuer"][-1] == (("commonName", "shardmq test CA 2"),)
    roundtrip(old, new, "r/1", b"after reload")
    assert new.subscribe("r/#", qos=1) == [1]
    assert old.publish("r/2", b"from old", qos=1) == 0
    assert new.expect_one(timeout=5).payload == b"from old"
    assert old.expect_one(timeout=5).payload == b"from old"
    assert not old.disconnected.is_set(), "a connection made before the reload was dropped"
    # A client that trusts only CA 1 no longer gets in.
    result = try_tls_connect(clients, b.tls, pki.client_context(), client_id="ca1-after")
    assert isinstance(result, str) and "CERTIFICATE_VERIFY_FAILED" in result, result
    # A broken file is refused on reload; the CA 2 certificate stays in force.
    with open(cert, "w") as f:
        f.write("not a certificate\n")
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "TLS reload refused")
    assert try_tls_connect(clients, b.tls, pki.client_context(cafile=pki.ca2.cert), client_id="still") == 0
    roundtrip(old, new, "r/3")


def test_sighup_reloads_the_client_ca(tls_broker, clients, pki, tmp_path):  # noqa: F811
    ca = str(tmp_path / "client-ca.crt")
    shutil.copy(pki.ca.cert, ca)
    b = tls_broker("--tls-client-ca", ca)
    a = paho(clients, b.tls, "alice", V5, ctx=pki.client_context(cert=pki.alice))
    assert a.subscribe("c/#", qos=1) == [1]
    assert isinstance(try_tls_connect(clients, b.tls, pki.client_context(cert=pki.mallory)), str)
    shutil.copy(pki.ca2.cert, ca)
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "TLS certificate, key and client CAs reloaded")
    m = paho(clients, b.tls, "mallory", V5, ctx=pki.client_context(cert=pki.mallory))
    roundtrip(a, m, "c/1")
    assert isinstance(try_tls_connect(clients, b.tls, pki.client_context(cert=pki.alice), client_id="a2"), str)
    assert not a.disconnected.is_set()


# ---------------------------------------------------------------- metrics

def test_tls_metrics(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker()
    hs = metric(b, "shardmq_tls_handshakes_total")
    fails = metric(b, "shardmq_tls_failures_total")
    for i in range(3):
        assert try_tls_connect(clients, b.tls, pki.client_context(), client_id="m%d" % i) == 0
    wait_metric(b, "shardmq_tls_handshakes_total", lambda v: v >= hs + 3)
    # A client that rejects the server certificate, and one that speaks no TLS: both failures.
    assert isinstance(try_tls_connect(clients, b.tls, pki.client_context(cafile=pki.ca2.cert)), str)
    s = socket.create_connection((b.tls.host, b.tls.port), timeout=5)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_eof(s, 5)
    finally:
        s.close()
    wait_metric(b, "shardmq_tls_failures_total", lambda v: v >= fails + 2)
    assert metric(b, "shardmq_tls_handshakes_total") < hs + 5
    # Plain TCP connections count for neither.
    clients(b.tcp, "plain", version=V5)
    time.sleep(0.2)
    assert metric(b, "shardmq_tls_failures_total") <= fails + 2


# ---------------------------------------------------------------- more peers

def test_tls_client_that_never_sends_connect(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker("--connect-timeout-ms", "500")
    r = tls_raw(clients, b.tls, pki.client_context())
    t0 = time.monotonic()
    with pytest.raises(raw.Closed):
        r.recv(4)
    assert time.monotonic() - t0 < 3.5


@VERSIONS
def test_large_messages_and_many_clients_over_tls(tls_broker, clients, pki, version):  # noqa: F811
    b = tls_broker()
    sub = paho(clients, b.tls, "big-sub", version, ctx=pki.client_context())
    assert sub.subscribe("big/#", qos=1) == [1]
    payload = os.urandom(300_000)  # many TLS records
    pub = paho(clients, b.tls, "big-pub", version, ctx=pki.client_context())
    roundtrip(sub, pub, "big/1", payload)
    many = [paho(clients, b.tls, "many-%d" % i, version, ctx=pki.client_context()) for i in range(20)]
    for i, c in enumerate(many):
        assert c.publish("big/m", b"%d" % i, qos=1) == 0
    got = sorted(int(m.payload) for m in sub.expect(20, timeout=10))
    assert got == list(range(20))


def test_abrupt_tls_disconnect_publishes_the_will(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker()
    watch = clients(b.tcp, "watch", version=V5)
    assert watch.subscribe("will/#", qos=1) == [1]
    r = tls_raw(clients, b.tls, pki.client_context())
    r.send(raw.connect("dying", version=5, will=dict(topic="will/dying", payload=b"bye")))
    assert r.expect(raw.CONNACK).reason == 0
    r.sock.close()  # no close_notify, no DISCONNECT
    m = watch.expect_one(timeout=5)
    assert (m.topic, m.payload) == ("will/dying", b"bye")


def test_mutual_tls_over_tls_1_2(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker("--tls-client-ca", pki.ca.cert)
    v12 = dict(tls_max=ssl.TLSVersion.TLSv1_2)
    assert isinstance(try_tls_connect(clients, b.tls, pki.client_context(**v12)), str)
    assert isinstance(try_tls_connect(clients, b.tls, pki.client_context(cert=pki.mallory, **v12)), str)
    c = paho(clients, b.tls, "a12", V5, ctx=pki.client_context(cert=pki.alice, **v12))
    assert c.c.socket().version() == "TLSv1.2"
    assert c.subscribe("x", qos=1) == [1]
    roundtrip(c, c, "x")


def test_non_loopback_tls_listener_needs_a_choice(pki, tmp_path):  # noqa: F811
    # Without --tls-client-ca a TLS listener is as open as a TCP one.
    err = start_fails(tmp_path, "--tls-listen", "0.0.0.0:0", "--tls-cert", pki.server.cert,
                      "--tls-key", pki.server.key)
    assert "--password-file" in err and "--allow-anonymous" in err, err
    # --tls-client-ca covers TLS listeners only, not a plain WebSocket one next to them.
    err = start_fails(tmp_path, "--tls-listen", "127.0.0.1:0", "--tls-cert", pki.server.cert,
                      "--tls-key", pki.server.key, "--tls-client-ca", pki.ca.cert, "--ws-listen", "0.0.0.0:0")
    assert "--password-file" in err and "--allow-anonymous" in err, err


def test_sighup_reload_applies_to_wss(broker, clients, pki, tmp_path):  # noqa: F811
    cert, key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    b = broker("--in-memory", "--tls-listen", "127.0.0.1:0", "--wss-listen", "127.0.0.1:0",
               "--tls-cert", cert, "--tls-key", key)
    tls, wss = listener(b, "tls"), listener(b, "wss")
    old = paho(clients, wss, "old-wss", V5, transport="websockets", ctx=pki.client_context())
    assert old.subscribe("r/#", qos=1) == [1]
    shutil.copy(pki.server2.cert, cert)
    shutil.copy(pki.server2.key, key)
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "TLS certificate, key and client CAs reloaded")
    new = paho(clients, wss, "new-wss", V5, transport="websockets", ctx=pki.client_context(cafile=pki.ca2.cert))
    new_tls = paho(clients, tls, "new-tls", V5, ctx=pki.client_context(cafile=pki.ca2.cert))
    roundtrip(old, new, "r/1")
    roundtrip(old, new_tls, "r/2")
    with pytest.raises((ssl.SSLError, OSError)):
        paho(clients, wss, "ca1-wss", V5, transport="websockets", ctx=pki.client_context())


def test_reload_with_a_mismatched_key_is_refused(tls_broker, clients, pki, tmp_path):  # noqa: F811
    cert, key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    b = tls_broker(cert=cert, key=key)
    shutil.copy(pki.server2.cert, cert)  # the new certificate, but the key is still the old one
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "TLS reload refused")
    assert try_tls_connect(clients, b.tls, pki.client_context()) == 0  # CA 1's pair stays in force
    shutil.copy(pki.server2.key, key)
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "TLS certificate, key and client CAs reloaded")
    assert try_tls_connect(clients, b.tls, pki.client_context(cafile=pki.ca2.cert), client_id="p2") == 0


def test_reloads_while_clients_connect(tls_broker, pki, tmp_path):  # noqa: F811
    """SIGHUPs in a row while TLS clients keep connecting: every handshake succeeds (the files do
    not change, so each certificate in force is a good one)."""
    import threading
    b = tls_broker()
    errors, done = [], []
    stop = threading.Event()

    def connect_loop(n):
        ctx = pki.client_context()
        i = 0
        while not stop.is_set():
            i += 1
            try:
                with socket.create_connection((b.tls.host, b.tls.port), timeout=5) as s:
                    with ctx.wrap_socket(s, server_hostname=b.tls.host) as t:
                        t.sendall(raw.connect("r%d-%d" % (n, i), version=4))
                        got = t.recv(4)
                        if got != b"\x20\x02\x00\x00":
                            errors.append(got)
                done.append(1)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
    threads = [threading.Thread(target=connect_loop, args=(n,), daemon=True) for n in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            b.proc.send_signal(signal.SIGHUP)
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:5]
    assert len(done) >= 15, len(done)
    assert b.stderr().count("TLS certificate, key and client CAs reloaded") >= 1


def test_cn_as_username_client_certificate_without_a_cn(cn_broker, clients, pki):  # noqa: F811
    """A certificate without a subject CN gives no user name.  It must not fall back to the user
    name in the CONNECT (which is not checked for certificate clients): that would let any holder
    of a certificate from the CA claim to be alice.  Refused with Not authorized, as Mosquitto's
    use_identity_as_username refuses such a client."""
    b = cn_broker
    watch = paho(clients, b.tls, "alice-watch", V5, ctx=pki.client_context(cert=pki.alice))
    assert watch.subscribe("a/#", qos=1) == [1]
    r = tls_raw(clients, b.tls, pki.client_context(cert=pki.nocn), V5)
    r.send(raw.connect("nocn", version=5, username="alice"))
    assert r.expect(raw.CONNACK, timeout=5).reason == 0x87
    watch.expect_none(0.5)


def test_cn_with_a_wildcard_does_not_widen_pattern_rules(tls_broker, clients, pki, tmp_path):  # noqa: F811
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite users/%u/#\n")
    b = tls_broker("--tls-client-ca", pki.ca.cert, "--tls-cn-as-username", "--acl-file", str(acl))
    alice = paho(clients, b.tls, "alice", V5, ctx=pki.client_context(cert=pki.alice))
    assert alice.subscribe("users/alice/#", qos=1) == [1]
    assert alice.subscribe("users/bob/#", qos=1) == [0x87]
    plus = paho(clients, b.tls, "plus", V5, ctx=pki.client_context(cert=pki.plus))
    # CN "+" must not turn `users/%u/#` into `users/+/#`.
    assert plus.subscribe("users/+/#", qos=1) == [0x87]
    assert plus.subscribe("users/alice/#", qos=1) == [0x87]
    assert plus.publish("users/alice/x", b"spoof", qos=1) == 0x87
    alice.expect_none(0.3)


# ---------------------------------------------------------------- certificate and key formats

@pytest.mark.parametrize("which", ["server_chain", "server_sec1", "server_rsa_pkcs1"])
@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_certificate_chain_and_key_formats(tls_broker, clients, pki, which, tls_version):  # noqa: F811
    pair = getattr(pki, which)
    b = tls_broker(cert=pair.cert, key=pair.key)
    # The client trusts the root only: the broker must send the intermediate from the chain file.
    ctx = pki.client_context(tls_min=tls_version, tls_max=tls_version)
    c = paho(clients, b.tls, which, V5, ctx=ctx)
    assert c.subscribe("f/#", qos=1) == [1]
    roundtrip(c, c, "f/1")


def test_leaf_without_its_intermediate_is_not_trusted(tls_broker, clients, pki):  # noqa: F811
    """The contrast to the chain case above: a cert file with the leaf alone does not verify
    against the root (so the chain test really exercises the chain)."""
    b = tls_broker(cert=pki.server_chain.leaf_only, key=pki.server_chain.key)
    result = try_tls_connect(clients, b.tls, pki.client_context())
    assert isinstance(result, str) and "CERTIFICATE_VERIFY_FAILED" in result, result


def test_alpn_offer_is_accepted(tls_broker, clients, pki):  # noqa: F811
    """Clients such as AWS IoT SDKs offer ALPN "mqtt"; a broker that configures no ALPN must still
    complete the handshake."""
    b = tls_broker()
    ctx = pki.client_context()
    ctx.set_alpn_protocols(["mqtt", "x-amzn-mqtt-ca"])
    assert try_tls_connect(clients, b.tls, ctx) == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_is_refused(tls_broker, clients, pki):  # noqa: F811
    b = tls_broker()
    ctx = pki.client_context()
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError) as e:
        pytest.skip("this OpenSSL cannot offer TLS 1.1: %s" % e)
    before = metric(b, "shardmq_tls_failures_total")
    result = try_tls_connect(clients, b.tls, ctx)
    assert isinstance(result, str), "a TLS 1.1 client got CONNACK %r" % (result,)
    if "NO_PROTOCOLS_AVAILABLE" in result or ("UNSUPPORTED_PROTOCOL" in result and "alert" not in result):
        pytest.skip("the client refused to offer TLS 1.1 itself: %s" % result)
    wait_metric(b, "shardmq_tls_failures_total", lambda v: v >= before + 1)
    assert try_tls_connect(clients, b.tls, pki.client_context(), client_id="ok") == 0
