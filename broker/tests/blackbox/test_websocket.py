"""MQTT over WebSocket (--ws-listen, --wss-listen, --ws-path): paho-mqtt's websocket transport for
the happy paths, and a tiny hand-written RFC 6455 client (below) for the exact-byte cases: the HTTP
upgrade and its refusals, text and oversized frames, MQTT packets split across frames."""

import base64
import hashlib
import os
import socket
import ssl
import struct
import time

import pytest

import mqtt_raw as raw
from certs import listener, metric, paho, pki, start_fails, tcp_listener, wait_metric  # noqa: F401
from conftest import wait_eof
from mqtt_client import ConnectFailed, V311, V5, ver_id

pytestmark = pytest.mark.shardmq_only

VERSIONS = pytest.mark.parametrize("version", [V311, V5], ids=ver_id)
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# ---------------------------------------------------------------- a minimal RFC 6455 client

def ws_frame(opcode, payload=b"", fin=True, mask=True):
    """One client frame (masked, as RFC 6455 requires of clients)."""
    payload = bytes(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def parse_frame(buf):
    """(fin, opcode, payload, bytes used) of the first complete frame in buf, or None."""
    if len(buf) < 2:
        return None
    fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
    masked, n, i = bool(buf[1] & 0x80), buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, i = struct.unpack("!H", bytes(buf[2:4]))[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, i = struct.unpack("!Q", bytes(buf[2:10]))[0], 10
    assert not masked, "a server frame must not be masked (RFC 6455 5.1)"
    if len(buf) < i + n:
        return None
    return fin, opcode, bytes(buf[i:i + n]), i + n


def upgrade_request(path="/mqtt", protocol="mqtt", version="13", key=None, host="localhost"):
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % path, "Host: %s" % host, "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: %s" % key]
    if version is not None:
        lines.append("Sec-WebSocket-Version: %s" % version)
    if protocol is not None:
        lines.append("Sec-WebSocket-Protocol: %s" % protocol)
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def read_http_response(sock, timeout=5.0):
    """(status, {lower-case header: value}, bytes after the header block)."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        left = deadline - time.monotonic()
        assert left > 0, "no complete HTTP response within %.1fs: %r" % (timeout, data)
        sock.settimeout(left)
        chunk = sock.recv(4096)
        assert chunk, "connection closed before a complete HTTP response: %r" % data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    assert parts[0].startswith("HTTP/1."), lines[0]
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers, rest


def http_upgrade(server, ctx=None, **kw):
    """Sends an upgrade request on a new connection; returns (sock, status, headers, rest, key)."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname=server.host)
    req, key = upgrade_request(**kw)
    sock.sendall(req)
    status, headers, rest = read_http_response(sock)
    return sock, status, headers, rest, key


class WSClient(raw.RawClient):
    """mqtt_raw.RawClient over WebSocket: send() puts the bytes in one binary frame, and received
    binary (and continuation) frames feed the MQTT parser.  A close frame from the server ends
    the connection: .close_code holds its status code."""

    def __init__(self, server, version=4, path="/mqtt", protocol="mqtt", ctx=None, timeout=5.0):
        self.version = version
        self.timeout = timeout
        self.buf = bytearray()
        self.pending = []
        self.closed = False
        self._next_pid = 1
        self.close_code = None
        self.close_frame = None
        self.control = []  # control frames other than close: (opcode, payload)
        self.sock, status, self.headers, rest, key = http_upgrade(server, ctx, path=path, protocol=protocol)
        assert status == 101, "upgrade refused: %d %r" % (status, self.headers)
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        assert self.headers.get("sec-websocket-accept") == accept, self.headers
        assert self.headers.get("upgrade", "").lower() == "websocket", self.headers
        assert self.headers.get("sec-websocket-protocol") == protocol, self.headers
        self.wsbuf = bytearray(rest)

    def send(self, data):
        self.sock.sendall(ws_frame(OP_BINARY, data))

    def send_frame(self, opcode, payload=b"", fin=True):
        self.sock.sendall(ws_frame(opcode, payload, fin))

    def _frames(self):
        """Consumes complete frames from wsbuf; returns True if any came."""
        progressed = False
        while True:
            f = parse_frame(self.wsbuf)
            if f is None:
                return progressed
            fin, opcode, payload, used = f
            del self.wsbuf[:used]
            progressed = True
            if opcode in (OP_BINARY, OP_CONT):
                self.buf += payload
            elif opcode == OP_CLOSE:
                self.close_frame = payload
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed = True
                raise raw.Closed()
            elif opcode == OP_TEXT:
                raise raw.ProtocolViolation("the server sent a text frame: %r" % payload)
            else:
                self.control.append((opcode, payload))

    def _fill(self, deadline):
        if self.closed:
            raise raw.Closed()
        while True:
            if self._frames():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame from server in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no frame from server in time")
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.closed = True
                raise raw.Closed()
            self.wsbuf += chunk

    def wait_close_frame(self, timeout=5.0):
        """Waits for the server's close frame and then the end of the TCP connection; returns the
        close status code.  MQTT packets before it are ignored."""
        deadline = time.monotonic() + timeout
        while self.close_frame is None:
            try:
                self.recv(max(deadline - time.monotonic(), 0.001))
            except raw.Closed:
                break
            except TimeoutError:
                raise AssertionError("no close frame within %.1fs" % timeout)
        assert self.close_frame is not None, "the connection ended without a close frame"
        # After its close frame the server ends the TCP connection.
        self.sock.settimeout(max(deadline - time.monotonic(), 0.5))
        try:
            while True:
                chunk = self.sock.recv(4096)
                if not chunk:
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            raise AssertionError("the TCP connection stayed open after the close frame")
        return self.close_code


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def ws_broker(broker, pki):  # noqa: F811
    """ws_broker(*extra) starts a broker with TCP (.tcp), WebSocket (.ws), WebSocket over TLS (.wss)
    listeners and metrics."""
    def start(*extra):
        b = broker("--in-memory", "--ws-listen", "127.0.0.1:0", "--wss-listen", "127.0.0.1:0",
                   "--tls-cert", pki.server.cert, "--tls-key", pki.server.key,
                   "--metrics-listen", "127.0.0.1:0", *extra)
        b.ws, b.wss, b.tcp = listener(b, "ws"), listener(b, "wss"), tcp_listener(b)
        assert len({b.ws.port, b.wss.port, b.tcp.port}) == 3, b.stdout()
        return b
    return start


def roundtrip(sub, pub, topic, payload=b"x"):
    assert pub.publish(topic, payload, qos=1) == 0
    m = sub.expect_one(timeout=5)
    assert (m.topic, m.payload) == (topic, payload)


@pytest.fixture
def ws_raw():
    """Factory for WSClient; closes them at the end."""
    made = []

    def make(server, version=V5, **kw):
        c = WSClient(server, version, **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


# ---------------------------------------------------------------- paho over ws / wss

@VERSIONS
def test_paho_over_websocket(ws_broker, clients, version):
    b = ws_broker()
    sub = paho(clients, b.ws, "ws-sub", version, transport="websockets")
    assert sub.subscribe("w/#", qos=1) == [1]
    pub = paho(clients, b.ws, "ws-pub", version, transport="websockets")
    roundtrip(sub, pub, "w/1", b"over websocket")
    roundtrip(sub, pub, "w/big", os.urandom(200_000))  # spans many frames and TCP segments


@VERSIONS
def test_paho_over_websocket_tls(ws_broker, clients, pki, version):  # noqa: F811
    b = ws_broker()
    sub = paho(clients, b.wss, "wss-sub", version, transport="websockets", ctx=pki.client_context())
    assert isinstance(sub.c.socket()._socket, ssl.SSLSocket)  # paho's _WebsocketWrapper around it
    assert sub.subscribe("w/#", qos=1) == [1]
    pub = paho(clients, b.wss, "wss-pub", version, transport="websockets", ctx=pki.client_context())
    roundtrip(sub, pub, "w/1", b"over wss")
    # ws and wss clients share the broker.
    plain_ws = paho(clients, b.ws, "ws-pub", version, transport="websockets")
    roundtrip(sub, plain_ws, "w/2", b"ws to wss")


def test_wss_refuses_a_plain_websocket_client(ws_broker, clients):
    b = ws_broker()
    sock = socket.create_connection((b.wss.host, b.wss.port), timeout=5)
    try:
        sock.sendall(upgrade_request()[0])
        data, _ = wait_eof(sock, 5)
    finally:
        sock.close()
    assert not data.startswith(b"HTTP/1.1 101"), data


@VERSIONS
def test_websocket_and_tcp_clients_exchange_messages(ws_broker, clients, version):
    b = ws_broker()
    ws = paho(clients, b.ws, "ws", version, transport="websockets")
    tcp = clients(b.tcp, "tcp", version=version)
    assert ws.subscribe("to-ws/#", qos=1) == [1]
    assert tcp.subscribe("to-tcp/#", qos=1) == [1]
    roundtrip(ws, tcp, "to-ws/1", b"tcp->ws")
    roundtrip(tcp, ws, "to-tcp/1", b"ws->tcp")


def test_ws_path(ws_broker, clients, ws_raw):
    b = ws_broker("--ws-path", "/mqtt")
    c = paho(clients, b.ws, "on-path", V5, transport="websockets", path="/mqtt")
    assert c.subscribe("p/#", qos=1) == [1]
    roundtrip(c, c, "p/1")
    assert ws_raw(b.ws, path="/mqtt").connect("raw-on-path").reason == 0
    for path in ["/other", "/", "/mqtt/x", "/mqt"]:
        sock, status, headers, _, _ = http_upgrade(b.ws, path=path)
        sock.close()
        assert status == 404, (path, status, headers)
    other = paho(clients, b.ws, "off-path", V5, transport="websockets", path="/other", connect=False)
    with pytest.raises((ConnectFailed, OSError)):
        other.connect(timeout=3)
    assert other.connack is None


def test_ws_path_applies_to_wss(ws_broker, pki):  # noqa: F811
    b = ws_broker("--ws-path", "/mqtt")
    sock, status, _, _, _ = http_upgrade(b.wss, ctx=pki.client_context(), path="/elsewhere")
    sock.close()
    assert status == 404
    sock, status, headers, _, _ = http_upgrade(b.wss, ctx=pki.client_context(), path="/mqtt")
    sock.close()
    assert status == 101, headers


def test_any_path_without_ws_path(ws_broker, ws_raw):
    b = ws_broker()
    for path in ["/mqtt", "/", "/some/where"]:
        assert ws_raw(b.ws, path=path).connect("p" + str(len(path))).reason == 0


# ---------------------------------------------------------------- upgrade refusals

@pytest.mark.parametrize("protocol", ["mqtt", "mqttv3.1"])
def test_accepted_subprotocols(ws_broker, ws_raw, protocol):
    b = ws_broker()
    c = ws_raw(b.ws, V311 if protocol == "mqttv3.1" else V5, protocol=protocol)
    assert c.headers["sec-websocket-protocol"] == protocol  # checked in WSClient too
    assert c.connect("sp").reason == 0


@pytest.mark.parametrize("kw,status,header", [
    (dict(protocol="foo"), 400, None),
    (dict(protocol=None), 400, None),
    (dict(protocol="mqtt5"), 400, None),
    (dict(version="8"), 400, ("sec-websocket-version", "13")),
    (dict(version=None), 400, ("sec-websocket-version", "13")),
], ids=["wrong-subprotocol", "no-subprotocol", "other-subprotocol", "version-8", "no-version"])
def test_upgrade_refusals(ws_broker, clients, kw, status, header):
    b = ws_broker()
    refused = metric(b, "shardmq_ws_refused_total")
    sock, got, headers, _, _ = http_upgrade(b.ws, **kw)
    sock.close()
    assert got == status, (got, headers)
    if header:
        assert headers.get(header[0]) == header[1], headers
    wait_metric(b, "shardmq_ws_refused_total", lambda v: v >= refused + 1)
    # The listener still serves.
    c = paho(clients, b.ws, "after", V5, transport="websockets")
    assert c.subscribe("x", qos=1) == [1]
    roundtrip(c, c, "x", b"still serving")


def test_non_websocket_http_request_is_refused(ws_broker):
    b = ws_broker()
    sock = socket.create_connection((b.ws.host, b.ws.port), timeout=5)
    try:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, _ = read_http_response(sock)
    finally:
        sock.close()
    assert 400 <= status < 500, (status, headers)


# ---------------------------------------------------------------- frames

def test_text_frame_closes_with_1003(ws_broker, clients, ws_raw):
    b = ws_broker()
    errors = metric(b, "shardmq_ws_protocol_errors_total")
    c = ws_raw(b.ws, V5)
    assert c.connect("texty").reason == 0
    c.send_frame(OP_TEXT, b"hello")
    assert c.wait_close_frame() == 1003
    wait_metric(b, "shardmq_ws_protocol_errors_total", lambda v: v >= errors + 1)
    # Only that connection.
    other = ws_raw(b.ws, V5)
    assert other.connect("other").reason == 0


def test_oversized_frame_closes_with_1009(ws_broker, ws_raw):
    b = ws_broker("--max-packet-size", "1024")
    c = ws_raw(b.ws, V5)
    assert c.connect("big").reason == 0
    c.send_frame(OP_BINARY, raw.publish("t", b"x" * 4090, version=5)[:4096])
    assert c.wait_close_frame() == 1009
    # A frame within the limit is fine.
    d = ws_raw(b.ws, V5)
    assert d.connect("small").reason == 0
    d.subscribe([("t", raw.sub_options(1))])
    d.send(raw.publish("t", b"y" * 900, qos=1, pid=7, version=5))
    got = d.recv_all(1.0)
    assert [p.payload for p in got if p.type == raw.PUBLISH] == [b"y" * 900], got
    assert [p.pid for p in got if p.type == raw.PUBACK] == [7], got


def test_oversized_frame_before_connect(ws_broker, ws_raw):
    b = ws_broker("--max-packet-size", "1024")
    c = ws_raw(b.ws, V5)
    c.send_frame(OP_BINARY, b"\x00" * 4096)
    assert c.wait_close_frame() == 1009


@VERSIONS
def test_mqtt_packets_span_frames(ws_broker, clients, ws_raw, version):
    b = ws_broker()
    c = ws_raw(b.ws, version)
    connect = raw.connect("split", version=version)
    # One CONNECT in two binary messages...
    c.sock.sendall(ws_frame(OP_BINARY, connect[:3]))
    time.sleep(0.1)
    c.sock.sendall(ws_frame(OP_BINARY, connect[3:]))
    assert c.expect(raw.CONNACK).reason == 0
    # ... two packets in one frame ...
    opts = 1 if version == V311 else raw.sub_options(1)
    two = raw.subscribe(1, [("s/a", opts)], version) + raw.subscribe(2, [("s/b", opts)], version)
    c.sock.sendall(ws_frame(OP_BINARY, two))
    acks = [c.expect(raw.SUBACK), c.expect(raw.SUBACK)]
    assert [(a.pid, a.codes) for a in acks] == [(1, [1]), (2, [1])]
    # ... one PUBLISH fragmented (binary FIN=0, then continuation frames), and the tail of one
    # packet with the head of the next in one frame.
    pub1 = raw.publish("s/a", b"one", qos=1, pid=10, version=version)
    pub2 = raw.publish("s/b", b"two", qos=1, pid=11, version=version)
    c.sock.sendall(ws_frame(OP_BINARY, pub1[:2], fin=False) + ws_frame(OP_CONT, pub1[2:5], fin=False))
    time.sleep(0.05)
    c.sock.sendall(ws_frame(OP_CONT, pub1[5:], fin=True))
    both = pub2
    c.sock.sendall(ws_frame(OP_BINARY, both[:4]) + ws_frame(OP_BINARY, both[4:]))
    got = c.recv_all(1.0)
    pubs = sorted((p.topic, p.payload) for p in got if p.type == raw.PUBLISH)
    acks = sorted(p.pid for p in got if p.type == raw.PUBACK)
    assert pubs == [("s/a", b"one"), ("s/b", b"two")], got
    assert acks == [10, 11], got
    # A TCP client sees the same topics.
    tcp = clients(b.tcp, "tcp", version=version)
    assert tcp.subscribe("s/#", qos=1) == [1]
    c.sock.sendall(ws_frame(OP_BINARY, raw.publish("s/c", b"ws", qos=0, version=version)))
    m = tcp.expect_one(timeout=5)
    assert (m.topic, m.payload) == ("s/c", b"ws")


def test_ping_frame_is_answered(ws_broker, ws_raw):
    b = ws_broker()
    c = ws_raw(b.ws, V5)
    assert c.connect("pinger").reason == 0
    c.send_frame(OP_PING, b"are you there")
    deadline = time.monotonic() + 3
    while not c.control and time.monotonic() < deadline:
        try:
            c.recv(0.2)
        except TimeoutError:
            pass
    assert c.control == [(OP_PONG, b"are you there")]
    assert c.ping(timeout=3).type == raw.PINGRESP  # MQTT still flows


def test_close_frame_from_client(ws_broker, clients, ws_raw):
    b = ws_broker()
    tcp = clients(b.tcp, "watch", version=V5)
    assert tcp.subscribe("will/#", qos=1) == [1]
    c = ws_raw(b.ws, V5)
    assert c.connect("closer", will=dict(topic="will/closer", payload=b"gone")).reason == 0
    c.send_frame(OP_CLOSE, struct.pack("!H", 1000))
    assert c.wait_close_frame() in (1000, None)
    # No MQTT DISCONNECT was sent: the will is published.
    m = tcp.expect_one(timeout=5)
    assert (m.topic, m.payload) == ("will/closer", b"gone")


def test_websocket_metrics(ws_broker, clients, ws_raw):
    b = ws_broker("--ws-path", "/mqtt")
    up = metric(b, "shardmq_ws_upgrades_total")
    refused = metric(b, "shardmq_ws_refused_total")
    errors = metric(b, "shardmq_ws_protocol_errors_total")
    for i in range(2):
        assert ws_raw(b.ws, V5).connect("m%d" % i).reason == 0
    paho(clients, b.ws, "paho", V5, transport="websockets", path="/mqtt")
    wait_metric(b, "shardmq_ws_upgrades_total", lambda v: v >= up + 3)
    for kw in [dict(path="/nope"), dict(protocol="foo"), dict(version="8")]:
        sock, status, _, _, _ = http_upgrade(b.ws, **kw)
        sock.close()
        assert status in (400, 404)
    wait_metric(b, "shardmq_ws_refused_total", lambda v: v >= refused + 3)
    c = ws_raw(b.ws, V5)
    c.send_frame(OP_TEXT, b"x")
    assert c.wait_close_frame() == 1003
    wait_metric(b, "shardmq_ws_protocol_errors_total", lambda v: v >= errors + 1)
    assert metric(b, "shardmq_ws_upgrades_total") == up + 4
    # Plain TCP clients count for none of them.
    clients(b.tcp, "tcp", version=V5)
    time.sleep(0.2)
    assert metric(b, "shardmq_ws_upgrades_total") == up + 4
    assert metric(b, "shardmq_ws_refused_total") == refused + 3


# ---------------------------------------------------------------- awkward but legal peers

def test_upgrade_request_in_pieces(ws_broker):
    """The upgrade request arrives in ~25 TCP segments (cut mid-line and mid-CRLF).  (Not byte by
    byte: tungstenite, which shardmq uses, refuses a request that took more than 64 reads averaging
    under 128 bytes as a slow-loris attempt; that is a deliberate limit, not tested here.)"""
    b = ws_broker()
    sock = socket.create_connection((b.ws.host, b.ws.port), timeout=5)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, _ = upgrade_request()
        step = max(len(req) // 25, 1)
        for i in range(0, len(req), step):
            sock.sendall(req[i:i + step])
            time.sleep(0.01)
        status, headers, rest = read_http_response(sock)
        assert status == 101, headers
        sock.sendall(ws_frame(OP_BINARY, raw.connect("slow", version=5)))
        buf = bytearray(rest)
        deadline = time.monotonic() + 5
        while parse_frame(buf) is None and time.monotonic() < deadline:
            buf += sock.recv(4096)
        fin, opcode, payload, _ = parse_frame(buf)
        assert opcode == OP_BINARY and payload[0] == 0x20, (opcode, payload)
    finally:
        sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_data_pipelined_behind_the_upgrade_request(ws_broker, clients, pki, tls):  # noqa: F811
    """RFC 6455 4.1: a client must wait for the 101 before it sends frames.  One that does not is
    either served (101, then the CONNACK) or refused with an HTTP 4xx and closed (shardmq refuses,
    as tungstenite does); never a hang, never frames after a refusal, and the broker serves on."""
    b = ws_broker()
    server = b.wss if tls else b.ws
    sock = socket.create_connection((server.host, server.port), timeout=5)
    if tls:
        sock = pki.client_context().wrap_socket(sock, server_hostname=server.host)
    try:
        req, _ = upgrade_request()
        sock.sendall(req + ws_frame(OP_BINARY, raw.connect("eager", version=5)))
        status, headers, rest = read_http_response(sock)
        buf = bytearray(rest)
        deadline = time.monotonic() + 5
        if status == 101:
            while parse_frame(buf) is None:
                assert time.monotonic() < deadline, "no CONNACK frame"
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = sock.recv(4096)
                assert chunk, "closed"
                buf += chunk
            fin, opcode, payload, _ = parse_frame(buf)
            assert opcode == OP_BINARY and payload[:1] == b"\x20", payload
        else:
            assert 400 <= status < 500, (status, headers)
            body_len = int(headers.get("content-length", "0"))
            # Closed after the answer ("still open after refusing the upgrade" otherwise).
            tail, _ = wait_eof(sock, max(deadline - time.monotonic(), 0.01))
            buf += tail
            assert len(buf) == body_len, "bytes after a refused upgrade: %r" % bytes(buf)
    finally:
        sock.close()
    c = paho(clients, b.ws, "after", V5, transport="websockets")
    assert c.subscribe("x", qos=1) == [1]


def test_stalled_upgrade_is_closed_after_the_connect_timeout(ws_broker, ws_raw):
    b = ws_broker("--connect-timeout-ms", "500")
    stalled = socket.create_connection((b.ws.host, b.ws.port), timeout=5)
    upgraded = ws_raw(b.ws, V5)  # upgraded, but no CONNECT
    try:
        stalled.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")  # an unfinished request
        t0 = time.monotonic()
        stalled.settimeout(4)
        try:
            while stalled.recv(4096):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 3.5
    finally:
        stalled.close()
    with pytest.raises(raw.Closed):
        upgraded.recv(4)
    # Others still get in.
    assert ws_raw(b.ws, V5).connect("late").reason == 0


def test_control_frames_between_fragments(ws_broker, ws_raw):
    b = ws_broker()
    c = ws_raw(b.ws, V5)
    connect = raw.connect("frag", version=5)
    c.sock.sendall(ws_frame(OP_BINARY, connect[:4], fin=False) + ws_frame(OP_PING, b"p1")
                   + ws_frame(OP_CONT, connect[4:], fin=True))
    assert c.expect(raw.CONNACK).reason == 0
    assert (OP_PONG, b"p1") in c.control


def test_frame_header_announcing_a_huge_payload(ws_broker, ws_raw):
    """A 64-bit length far past the limit: refused from the header, without waiting for the payload."""
    b = ws_broker("--max-packet-size", "1024")
    c = ws_raw(b.ws, V5)
    assert c.connect("huge").reason == 0
    c.sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + os.urandom(4))
    assert c.wait_close_frame(timeout=3) == 1009


def test_unmasked_client_frame_is_refused(ws_broker, ws_raw):
    """RFC 6455 5.1: a server must close the connection on an unmasked client frame."""
    b = ws_broker()
    c = ws_raw(b.ws, V5)
    c.sock.sendall(ws_frame(OP_BINARY, raw.connect("unmasked", version=5), mask=False))
    try:
        got = c.recv(3)
    except raw.Closed:
        return
    raise AssertionError("the server answered an unmasked frame with %r" % (got,))


# ---------------------------------------------------------------- wss specifics

def test_wss_frames_and_large_messages(ws_broker, clients, pki, ws_raw):  # noqa: F811
    b = ws_broker()
    sub = paho(clients, b.wss, "wss-big-sub", V5, transport="websockets", ctx=pki.client_context())
    assert sub.subscribe("big/#", qos=1) == [1]
    pub = paho(clients, b.wss, "wss-big-pub", V5, transport="websockets", ctx=pki.client_context())
    roundtrip(sub, pub, "big/1", os.urandom(300_000))
    c = ws_raw(b.wss, V5, ctx=pki.client_context())
    assert c.connect("wss-text").reason == 0
    c.send_frame(OP_TEXT, b"{}")
    assert c.wait_close_frame() == 1003


def test_max_packet_size_applies_over_websocket(ws_broker, clients):
    b = ws_broker("--max-packet-size", "2048")
    sub = clients(b.tcp, "tcp-sub", version=V5)
    assert sub.subscribe("mp/#", qos=1) == [1]
    pub = paho(clients, b.ws, "ws-pub", V5, transport="websockets")
    roundtrip(sub, pub, "mp/ok", b"z" * 1900)
    pub.publish("mp/too-big", b"z" * 4000, qos=1, wait=False)
    pub.wait_disconnected(timeout=5)
    sub.expect_none(0.3)


def test_wss_with_mutual_tls_and_cn_as_username(broker, clients, pki, tmp_path):  # noqa: F811
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\n")
    b = broker("--in-memory", "--wss-listen", "127.0.0.1:0", "--tls-cert", pki.server.cert,
               "--tls-key", pki.server.key, "--tls-client-ca", pki.ca.cert, "--tls-cn-as-username",
               "--acl-file", str(acl))
    wss = listener(b, "wss")
    # No client certificate: no upgrade.
    with pytest.raises((ssl.SSLError, OSError, AssertionError)):
        sock, status, _, _, _ = http_upgrade(wss, ctx=pki.client_context())
        sock.close()
    c = paho(clients, wss, "alice-wss", V5, transport="websockets", ctx=pki.client_context(cert=pki.alice))
    assert c.subscribe("a/#", qos=1) == [1]
    assert c.subscribe("b/#", qos=1) == [0x87]
    roundtrip(c, c, "a/1")
    assert c.publish("b/1", b"no", qos=1) == 0x87


def test_non_loopback_websocket_listener_needs_a_choice(tmp_path):
    err = start_fails(tmp_path, "--ws-listen", "0.0.0.0:0")
    assert "--password-file" in err and "--allow-anonymous" in err, err


def test_browser_style_upgrade(ws_broker):
    """What a browser (MQTT.js) sends: lower-case header names, `Connection: keep-alive, Upgrade`,
    an Origin, a query string, several subprotocols and an extension offer we do not take."""
    b = ws_broker("--ws-path", "/mqtt")
    key = base64.b64encode(os.urandom(16)).decode()
    req = ("GET /mqtt?token=abc HTTP/1.1\r\nhost: localhost\r\nuser-agent: Mozilla/5.0\r\n"
           "origin: http://localhost\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n"
           "sec-websocket-version: 13\r\nsec-websocket-key: %s\r\nsec-websocket-protocol: mqttv3.1, mqtt\r\n"
           "sec-websocket-extensions: permessage-deflate; client_max_window_bits\r\n\r\n" % key).encode()
    sock = socket.create_connection((b.ws.host, b.ws.port), timeout=5)
    try:
        sock.sendall(req)
        status, headers, rest = read_http_response(sock)
        assert status == 101, headers
        assert headers["sec-websocket-accept"] == base64.b64encode(
            hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        assert headers["sec-websocket-protocol"] in ("mqtt", "mqttv3.1")
        assert "sec-websocket-extensions" not in headers, "an extension was accepted: %r" % headers
        sock.sendall(ws_frame(OP_BINARY, raw.connect("browser", version=4)))
        buf = bytearray(rest)
        deadline = time.monotonic() + 5
        while parse_frame(buf) is None:
            assert time.monotonic() < deadline, "no CONNACK frame"
            chunk = sock.recv(4096)
            assert chunk, "closed"
            buf += chunk
        b0 = buf[0]
        assert b0 & 0x70 == 0, "RSV bits set without an extension: 0x%02x" % b0
        assert parse_frame(buf)[2] == b"\x20\x02\x00\x00"
    finally:
        sock.close()


def test_oversized_upgrade_request_is_refused(ws_broker, clients):
    """An upgrade request that never ends (headers without the blank line) is refused once it is
    too large, long before the connect timeout, and not buffered without bound."""
    b = ws_broker()
    sock = socket.create_connection((b.ws.host, b.ws.port), timeout=5)
    t0 = time.monotonic()
    data = b""
    try:
        sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(4096):  # up to 4 MiB
                sock.sendall(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000))
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, _ = wait_eof(sock, 5)
    finally:
        sock.close()
    assert time.monotonic() - t0 < 8
    assert not data.startswith(b"HTTP/1.1 101"), data[:100]
    c = paho(clients, b.ws, "after", V5, transport="websockets")
    assert c.subscribe("x", qos=1) == [1]


# ---------------------------------------------------------------- volume and takeover across transports

def test_many_messages_tls_to_wss_and_ws_to_tls(ws_broker, clients, pki):  # noqa: F811
    """QoS 1 streams through the TLS and WebSocket layers in both directions: nothing lost,
    nothing reordered, large payloads included (backpressure on encrypted, framed output)."""
    b = ws_broker("--tls-listen", "127.0.0.1:0")
    tls = listener(b, "tls")
    wss_sub = paho(clients, b.wss, "wss-sub", V5, transport="websockets", ctx=pki.client_context())
    tls_sub = paho(clients, tls, "tls-sub", V5, ctx=pki.client_context())
    assert wss_sub.subscribe("to-wss", qos=1) == [1]
    assert tls_sub.subscribe("to-tls", qos=1) == [1]
    tls_pub = paho(clients, tls, "tls-pub", V5, ctx=pki.client_context())
    ws_pub = paho(clients, b.ws, "ws-pub", V5, transport="websockets")
    n = 500
    infos = []
    for i in range(n):
        infos.append(tls_pub.publish("to-wss", b"%06d" % i + b"." * (i % 7) * 100, qos=1, wait=False))
        infos.append(ws_pub.publish("to-tls", b"%06d" % i, qos=1, wait=False))
    got_wss = [int(m.payload[:6]) for m in wss_sub.expect(n, timeout=30)]
    got_tls = [int(m.payload[:6]) for m in tls_sub.expect(n, timeout=30)]
    assert got_wss == list(range(n))
    assert got_tls == list(range(n))
    big = [os.urandom(900_000) for _ in range(8)]
    for p in big:
        ws_pub.publish("to-wss", p, qos=1, wait=False)
    assert [m.payload for m in wss_sub.expect(len(big), timeout=30)] == big


@pytest.mark.parametrize("first,second", [("ws", "tcp"), ("tcp", "wss"), ("wss", "ws")])
def test_session_takeover_across_transports(ws_broker, clients, pki, first, second):  # noqa: F811
    b = ws_broker()

    def make(kind, **kw):
        if kind == "tcp":
            return clients(b.tcp, "same-id", version=V5, **kw)
        return paho(clients, getattr(b, kind), "same-id", V5, transport="websockets",
                    ctx=pki.client_context() if kind == "wss" else None, **kw)
    old = make(first)
    assert old.subscribe("tk/#", qos=1) == [1]
    new = make(second)
    assert old.wait_disconnected(timeout=5) in (0x8E, -1, 7), old.disconnect_reason  # session taken over
    assert new.subscribe("tk/#", qos=1) == [1]
    roundtrip(new, new, "tk/1")


def test_malformed_mqtt_inside_websocket_closes_that_connection(ws_broker, ws_raw):
    b = ws_broker()
    c = ws_raw(b.ws, V5)
    c.send(b"\xf0\x00\x00\x00garbage")  # reserved packet type 15 with flags, as the first packet
    with pytest.raises(raw.Closed):
        while True:
            c.recv(5)
    d = ws_raw(b.ws, V5)
    assert d.connect("fine").reason == 0


@pytest.mark.parametrize("request_bytes", [
    b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
    b"POST /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: mqtt\r\nContent-Length: 0\r\n\r\n",
    b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",
], ids=["no-key", "post", "mqtt-instead-of-http"])
def test_other_bad_upgrades_are_refused(ws_broker, request_bytes):
    b = ws_broker()
    refused = metric(b, "shardmq_ws_refused_total")
    sock = socket.create_connection((b.ws.host, b.ws.port), timeout=5)
    data = b""
    try:
        sock.sendall(request_bytes)
        data, _ = wait_eof(sock, 5)
    finally:
        sock.close()
    # Closed (without waiting for the connect timeout of 10 s) and not upgraded.
    assert not data.startswith(b"HTTP/1.1 101"), data
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data
    if data:
        wait_metric(b, "shardmq_ws_refused_total", lambda v: v >= refused + 1)


# ---------------------------------------------------------------- connections that move between shards

@pytest.mark.parametrize("kind", ["tls", "ws", "wss"])
def test_pipelined_packets_survive_the_move_to_the_owning_shard(ws_broker, clients, pki, kind):  # noqa: F811
    """CONNECT, SUBSCRIBE and PUBLISH in one write (one TLS record / one WebSocket frame), for many
    client ids: with 2 shards about half the connections are handed to the other shard right after
    CONNECT, TLS and WebSocket state and the bytes already read included."""
    b = ws_broker("--tls-listen", "127.0.0.1:0")
    server = listener(b, "tls") if kind == "tls" else getattr(b, kind)
    ctx = pki.client_context() if kind in ("tls", "wss") else None
    for i in range(12):
        cid = "mover-%s-%d" % (kind, i)
        burst = (raw.connect(cid, version=5)
                 + raw.subscribe(1, [("mv/%s" % cid, raw.sub_options(1))], 5)
                 + raw.publish("mv/%s" % cid, b"hello %d" % i, qos=1, pid=2, version=5))
        if kind == "tls":
            c = clients.raw(server, 5)
            c.sock = ctx.wrap_socket(c.sock, server_hostname=server.host)
            c.send(burst)
        else:
            c = WSClient(server, 5, ctx=ctx)
            c.send(burst)
        try:
            got = []
            deadline = time.monotonic() + 5
            while len(got) < 4 and time.monotonic() < deadline:
                try:
                    got.append(c.recv(max(deadline - time.monotonic(), 0.01)))
                except TimeoutError:
                    break
            types_ = sorted(raw.TYPE_NAMES[p.type] for p in got)
            assert types_ == ["CONNACK", "PUBACK", "PUBLISH", "SUBACK"], (cid, got)
            assert got[0].type == raw.CONNACK and got[0].reason == 0, got
            pub = [p for p in got if p.type == raw.PUBLISH][0]
            assert (pub.topic, pub.payload) == ("mv/%s" % cid, b"hello %d" % i)
            c.send(raw.ack(raw.PUBACK, pub.pid, 5))
            assert c.ping(timeout=5).type == raw.PINGRESP
        finally:
            c.close()


def test_cn_identity_survives_the_move_to_the_owning_shard(broker, clients, pki, tmp_path):  # noqa: F811
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite a/#\n")
    b = broker("--in-memory", "--tls-listen", "127.0.0.1:0", "--wss-listen", "127.0.0.1:0",
               "--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--tls-client-ca", pki.ca.cert,
               "--tls-cn-as-username", "--acl-file", str(acl))
    tls, wss = listener(b, "tls"), listener(b, "wss")
    watch = paho(clients, tls, "watch", V5, ctx=pki.client_context(cert=pki.alice))
    assert watch.subscribe("a/#", qos=1) == [1]
    for i in range(8):
        for name, server, transport in [("t", tls, "tcp"), ("w", wss, "websockets")]:
            c = paho(clients, server, "alice-%s-%d" % (name, i), V5, transport=transport,
                     ctx=pki.client_context(cert=pki.alice))
            assert c.publish("a/%s%d" % (name, i), b"ok", qos=1) == 0
            assert c.publish("b/%s%d" % (name, i), b"no", qos=1) == 0x87
            c.disconnect()
    got = sorted(m.topic for m in watch.expect(16, timeout=10))
    assert got == sorted("a/%s%d" % (n, i) for i in range(8) for n in "tw")
    watch.expect_none(0.3)
