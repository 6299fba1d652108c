"""Test PKI for the TLS / WSS black-box tests, made with the `openssl` CLI.

The `pki` fixture (session scope) generates once per run, into a tmp dir:

  ca         CA 1 (self-signed)
  server     server cert for localhost / 127.0.0.1 (SAN), signed by CA 1
  alice      client cert, CN=alice, signed by CA 1
  ca2        CA 2, unrelated to CA 1
  mallory    client cert, CN=mallory, signed by CA 2
  server2    server cert for localhost / 127.0.0.1, signed by CA 2 (reload test)
  nocn       client cert without a CN (subject O=..., OU=...), signed by CA 1
  plus       client cert, CN=+ (an MQTT wildcard), signed by CA 1
  server_chain       server cert from an intermediate CA under CA 1 (.cert: leaf + intermediate)
  server_sec1        the server cert with its key as SEC1
  server_rsa_pkcs1   an RSA server cert (CA 1) with a PKCS#1 key

Each entry is a `Cert` with .cert and .key paths (CAs: .cert only matters for
trust; .key is there too).  `pki.path(name)` gives a path for extra files.

Import it in a test module with `from certs import pki  # noqa: F401`.

Also here, shared by test_tls.py and test_websocket.py: the listener addresses from the start-up
line (listener, tcp_listener), /metrics counters (metric, wait_metric), paho clients over TLS or
WebSocket (paho), a raw ClientHello (client_hello) and start-up refusals (start_fails).
"""

import os
import re
import shutil
import ssl
import subprocess
import time
import types
import urllib.request

import pytest

OPENSSL = shutil.which("openssl")


class Cert:
    def __init__(self, cert, key):
        self.cert = cert
        self.key = key

    def __repr__(self):
        return "<Cert %s>" % self.cert


class PKI:
    def __init__(self, root):
        self.root = root

    def path(self, name):
        return os.path.join(self.root, name)

    # ------------------------------------------------------------ helpers
    def _run(self, *args, stdin=None):
        p = subprocess.run([OPENSSL] + list(args), capture_output=True, timeout=60, cwd=self.root,
                           input=stdin)
        if p.returncode != 0:
            raise RuntimeError("openssl %s failed: %s" % (" ".join(args), p.stderr.decode(errors="replace")))
        return p

    def _key(self, name, rsa=False):
        key = self.path(name + ".key")
        # EC P-256 (fast to make) or RSA 2048; written as PKCS#8 ("BEGIN PRIVATE KEY").
        if rsa:
            self._run("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key)
        else:
            self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        return key

    def _make_ca(self, name, cn, parent=None):
        """A self-signed CA, or an intermediate CA signed by `parent`."""
        key = self._key(name)
        cert = self.path(name + ".crt")
        ext = self.path(name + ".ext")
        with open(ext, "w") as f:
            f.write("[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
                    "subjectKeyIdentifier=hash\n")
        if parent is None:
            self._run("req", "-x509", "-new", "-key", key, "-out", cert, "-days", "30", "-subj", "/CN=" + cn,
                      "-config", ext, "-extensions", "v3", "-sha256")
        else:
            csr = self.path(name + ".csr")
            self._run("req", "-new", "-key", key, "-out", csr, "-subj", "/CN=" + cn)
            self._run("x509", "-req", "-in", csr, "-CA", parent.cert, "-CAkey", parent.key, "-CAcreateserial",
                      "-out", cert, "-days", "30", "-sha256", "-extfile", ext, "-extensions", "v3")
        return Cert(cert, key)

    def _make_leaf(self, name, cn, ca, server, rsa=False):
        key = self._key(name, rsa)
        csr = self.path(name + ".csr")
        cert = self.path(name + ".crt")
        ext = self.path(name + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
            if server:
                f.write("extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
            else:
                f.write("extendedKeyUsage=clientAuth\n")
        # In -subj, "+" joins attributes into one RDN: a CN holding it must escape it.
        subj = "/O=shardmq tests" + ("/CN=" + cn.replace("+", "\\+") if cn is not None else "/OU=no common name")
        self._run("req", "-new", "-key", key, "-out", csr, "-subj", subj)
        self._run("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
                  "-out", cert, "-days", "30", "-sha256", "-extfile", ext)
        return Cert(cert, key)

    def generate(self):
        self.ca = self._make_ca("ca", "shardmq test CA 1")
        self.server = self._make_leaf("server", "localhost", self.ca, server=True)
        self.alice = self._make_leaf("alice", "alice", self.ca, server=False)
        self.ca2 = self._make_ca("ca2", "shardmq test CA 2")
        self.mallory = self._make_leaf("mallory", "mallory", self.ca2, server=False)
        self.server2 = self._make_leaf("server2", "localhost", self.ca2, server=True)
        # Odd client certificates from CA 1: no CN at all, and a CN holding an MQTT wildcard.
        self.nocn = self._make_leaf("nocn", None, self.ca, server=False)
        self.plus = self._make_leaf("plus", "+", self.ca, server=False)
        # A server certificate from an intermediate CA (under CA 1): .cert is the chain (leaf, then
        # the intermediate), .leaf_only the leaf alone.
        inter = self._make_ca("inter", "shardmq test intermediate", parent=self.ca)
        leaf = self._make_leaf("server-inter", "localhost", inter, server=True)
        chain = self.path("server-inter-chain.crt")
        with open(chain, "w") as f:
            f.write(open(leaf.cert).read() + open(inter.cert).read())
        self.server_chain = Cert(chain, leaf.key)
        self.server_chain.leaf_only = leaf.cert
        # The server's key in other encodings: SEC1 ("BEGIN EC PRIVATE KEY"), and an RSA server
        # certificate with a PKCS#1 key ("BEGIN RSA PRIVATE KEY").
        sec1 = self.path("server.sec1.key")
        self._run("ec", "-in", self.server.key, "-out", sec1)
        self.server_sec1 = Cert(self.server.cert, sec1)
        rsa = self._make_leaf("server-rsa", "localhost", self.ca, server=True, rsa=True)
        pkcs1 = self.path("server-rsa.pkcs1.key")
        self._run("rsa", "-in", rsa.key, "-out", pkcs1, "-traditional")
        self.server_rsa_pkcs1 = Cert(rsa.cert, pkcs1)
        return self

    # ------------------------------------------------------------ client side
    def client_context(self, cafile=None, cert=None, tls_max=None, tls_min=None):
        """An ssl.SSLContext that trusts `cafile` (default CA 1), checks the host name, and
        presents `cert` (a Cert) when given."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile or self.ca.cert)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cert is not None:
            ctx.load_cert_chain(cert.cert, cert.key)
        if tls_max is not None:
            ctx.maximum_version = tls_max
        if tls_min is not None:
            ctx.minimum_version = tls_min
        return ctx


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    if not OPENSSL:
        pytest.skip("openssl CLI not installed")
    root = str(tmp_path_factory.mktemp("pki"))
    return PKI(root).generate()


# ---------------------------------------------------------------- shared helpers for test_tls / test_websocket

def listener(b, kind):
    """(host, port) namespace of the first `kind` listener ("tls", "ws", "wss", "metrics") named in the
    broker's start-up line (` tls=127.0.0.1:1234,... `)."""
    m = re.search(r" %s=([^\s,]+):(\d+)" % re.escape(kind), b.stdout())
    assert m, "no %s= listener in the start-up line\n%s" % (kind, b.stdout())
    return types.SimpleNamespace(host=m.group(1), port=int(m.group(2)))


def tcp_listener(b):
    """(host, port) namespace of the first plain MQTT/TCP listener: the first address after
    "listening on" that no tls=/ws=/wss= field claims.  (The fixture's b.port is not reliable with
    several listeners: it is parsed greedily and ends up being the last address listed.)"""
    out = b.stdout()
    m = re.search(r"listening on (\S+)", out)
    assert m, "no start-up line\n" + out
    special = set()
    for kind in ("tls", "ws", "wss"):
        f = re.search(r" %s=(\S+)" % kind, out)
        if f:
            special.update(f.group(1).split(","))
    for addr in m.group(1).split(","):
        if addr not in special:
            host, port = addr.rsplit(":", 1)
            return types.SimpleNamespace(host=host, port=int(port))
    raise AssertionError("no plain TCP listener in the start-up line\n" + out)


def metric(b, name):
    """Sum of the samples of counter `name` on the broker's /metrics (needs --metrics-listen)."""
    m = listener(b, "metrics")
    with urllib.request.urlopen("http://%s:%d/metrics" % (m.host, m.port), timeout=5) as r:
        text = r.read().decode()
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, "no %s in /metrics:\n%s" % (name, text)
    return total


def wait_metric(b, name, pred, timeout=5.0):
    """Polls `name` until pred(value) holds; returns the value (fails on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        v = metric(b, name)
        if pred(v):
            return v
        if time.monotonic() > deadline:
            raise AssertionError("%s stayed at %r" % (name, v))
        time.sleep(0.05)


def paho(clients, server, client_id, version, ctx=None, transport="tcp", path=None, connect=True, **kw):
    """A mqtt_client.Client (tracked by the `clients` fixture, so closed at the end) on `server`,
    over TLS when `ctx` (an ssl.SSLContext) is given, over WebSocket with transport="websockets"."""
    c = clients(server, client_id, version=version, connect=False, **kw)
    c.c.transport = transport
    if ctx is not None:
        c.c.tls_set_context(ctx)
    if path is not None:
        c.c.ws_set_options(path=path)
    if connect:
        c.connect()
    return c


def client_hello(ctx, server_hostname="localhost"):
    """The bytes of a real TLS ClientHello as `ctx` would send it."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = out.read()
    assert data and data[0] == 0x16, data[:8]
    return data


def start_fails(tmp_path, *args):
    """Runs the broker directly (not via the fixture) with `--listen 127.0.0.1:0` and `args`,
    expecting it to refuse to start; returns its stderr."""
    import conftest
    return conftest.start_fails(tmp_path, "--listen", "127.0.0.1:0", *args)
