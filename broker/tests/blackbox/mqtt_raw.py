"""A tiny hand-written MQTT 3.1.1 / 5.0 packet encoder/decoder and a raw
socket client, used for exact-byte and bad-input tests.

Nothing here is imported from the Rust project: it is an independent
implementation of the wire format written from the specification.
"""

import socket
import struct
import time

# Packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP = 8, 9, 10, 11, 12, 13
DISCONNECT, AUTH = 14, 15

TYPE_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC",
    6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE",
    11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

# MQTT 5 property identifiers
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_CONTENT_TYPE = 0x03
P_RESPONSE_TOPIC = 0x08
P_CORRELATION_DATA = 0x09
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_ASSIGNED_CLIENT_ID = 0x12
P_SERVER_KEEP_ALIVE = 0x13
P_AUTH_METHOD = 0x15
P_AUTH_DATA = 0x16
P_REQUEST_PROBLEM_INFO = 0x17
P_WILL_DELAY = 0x18
P_REQUEST_RESPONSE_INFO = 0x19
P_RESPONSE_INFO = 0x1A
P_SERVER_REFERENCE = 0x1C
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_MAXIMUM_QOS = 0x24
P_RETAIN_AVAILABLE = 0x25
P_USER_PROPERTY = 0x26
P_MAXIMUM_PACKET_SIZE = 0x27
P_WILDCARD_SUB_AVAILABLE = 0x28
P_SUB_ID_AVAILABLE = 0x29
P_SHARED_SUB_AVAILABLE = 0x2A

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
PROP_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT,
    0x11: _U32, 0x12: _STR, 0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR, 0x1F: _STR, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}


class ProtocolViolation(AssertionError):
    """The peer sent bytes we could not parse."""


# ---------------------------------------------------------------- encoding

def varint(n):
    if n < 0 or n > 268_435_455:
        raise ValueError(n)
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def u16(n):
    return struct.pack("!H", n)


def u32(n):
    return struct.pack("!I", n)


def s(text):
    """UTF-8 string with 2-byte length prefix (bytes are taken verbatim)."""
    raw = text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8")
    return u16(len(raw)) + bytes(raw)


binary = s


def props(items=None):
    """Encode an MQTT 5 property list.  `items` is a list of (id, value)
    pairs or a dict {id: value}; user properties are (key, value) tuples and
    may be given as a list value in the dict form."""
    if items is None:
        return varint(0)
    if isinstance(items, dict):
        pairs = []
        for k, v in items.items():
            if k == P_USER_PROPERTY and isinstance(v, list):
                pairs.extend((k, kv) for kv in v)
            else:
                pairs.append((k, v))
        items = pairs
    body = bytearray()
    for pid, val in items:
        body += varint(pid)
        t = PROP_TYPES[pid]
        if t == _BYTE:
            body.append(val)
        elif t == _U16:
            body += u16(val)
        elif t == _U32:
            body += u32(val)
        elif t == _VARINT:
            body += varint(val)
        elif t in (_STR, _BIN):
            body += s(val)
        elif t == _PAIR:
            body += s(val[0]) + s(val[1])
    return varint(len(body)) + bytes(body)


def packet(ptype, flags, body):
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + bytes(body)


def connect(client_id="", version=4, clean=True, keepalive=60, properties=None,
            will=None, username=None, password=None, proto_name="MQTT",
            flags_override=None):
    """will = dict(topic=, payload=b"", qos=0, retain=False, properties=None)"""
    flags = 0
    if clean:
        flags |= 0x02
    if will is not None:
        flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    if flags_override is not None:
        flags = flags_override
    body = s(proto_name) + bytes([version, flags]) + u16(keepalive)
    if version == 5:
        body += props(properties)
    body += s(client_id)
    if will is not None:
        if version == 5:
            body += props(will.get("properties"))
        body += s(will["topic"]) + binary(will.get("payload", b""))
    if username is not None:
        body += s(username)
    if password is not None:
        body += binary(password)
    return packet(CONNECT, 0, body)


def publish(topic, payload=b"", qos=0, retain=False, dup=False, pid=None,
            version=4, properties=None):
    if isinstance(payload, str):
        payload = payload.encode()
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = s(topic)
    if qos > 0:
        body += u16(1 if pid is None else pid)
    if version == 5:
        body += props(properties)
    body += payload
    return packet(PUBLISH, flags, body)


def ack(ptype, pid, version=4, reason=None, properties=None):
    """PUBACK / PUBREC / PUBREL / PUBCOMP."""
    flags = 0x02 if ptype == PUBREL else 0
    body = u16(pid)
    if version == 5 and (reason not in (None, 0) or properties):
        body += bytes([reason or 0])
        if properties:
            body += props(properties)
    return packet(ptype, flags, body)


def subscribe(pid, filters, version=4, properties=None):
    """filters: list of (filter, options_byte) or (filter, qos)."""
    body = u16(pid)
    if version == 5:
        body += props(properties)
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return packet(SUBSCRIBE, 0x02, body)


def sub_options(qos=0, no_local=False, rap=False, retain_handling=0):
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (retain_handling << 4)


def unsubscribe(pid, filters, version=4, properties=None):
    body = u16(pid)
    if version == 5:
        body += props(properties)
    for f in filters:
        body += s(f)
    return packet(UNSUBSCRIBE, 0x02, body)


def pingreq():
    return packet(PINGREQ, 0, b"")


def disconnect(version=4, reason=0, properties=None):
    if version == 5 and (reason or properties):
        return packet(DISCONNECT, 0, bytes([reason]) + (props(properties) if properties else b""))
    return packet(DISCONNECT, 0, b"")


# ---------------------------------------------------------------- decoding

class Props(list):
    """List of (id, value) pairs, preserving order."""

    def get(self, pid, default=None):
        for k, v in self:
            if k == pid:
                return v
        return default

    def all(self, pid):
        return [v for k, v in self if k == pid]

    def __contains__(self, pid):
        return any(k == pid for k, _ in self)


class Reader:
    def __init__(self, data):
        self.d = bytes(data)
        self.i = 0

    def left(self):
        return len(self.d) - self.i

    def take(self, n):
        if self.i + n > len(self.d):
            raise ProtocolViolation("truncated packet body")
        out = self.d[self.i:self.i + n]
        self.i += n
        return out

    def byte(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack("!H", self.take(2))[0]

    def u32(self):
        return struct.unpack("!I", self.take(4))[0]

    def varint(self):
        mult, val = 1, 0
        for _ in range(4):
            b = self.byte()
            val += (b & 0x7F) * mult
            if not b & 0x80:
                return val
            mult *= 128
        raise ProtocolViolation("malformed varint")

    def bin(self):
        return self.take(self.u16())

    def str(self):
        return self.bin().decode("utf-8")

    def props(self):
        n = self.varint()
        sub = Reader(self.take(n))
        out = Props()
        while sub.left():
            pid = sub.varint()
            t = PROP_TYPES.get(pid)
            if t is None:
                raise ProtocolViolation("unknown property 0x%02x" % pid)
            if t == _BYTE:
                v = sub.byte()
            elif t == _U16:
                v = sub.u16()
            elif t == _U32:
                v = sub.u32()
            elif t == _VARINT:
                v = sub.varint()
            elif t == _STR:
                v = sub.str()
            elif t == _BIN:
                v = sub.bin()
            else:
                v = (sub.str(), sub.str())
            out.append((pid, v))
        return out

    def rest(self):
        return self.take(self.left())


class Packet:
    def __init__(self, ptype, flags, body, version):
        self.type = ptype
        self.flags = flags
        self.body = body
        self.version = version
        self.props = Props()
        self.reason = None
        self.pid = None
        r = Reader(body)
        v5 = version == 5
        if ptype == CONNACK:
            self.session_present = bool(r.byte() & 1)
            self.reason = r.byte()
            if v5 and r.left():
                self.props = r.props()
        elif ptype == PUBLISH:
            self.dup = bool(flags & 0x08)
            self.qos = (flags >> 1) & 3
            self.retain = bool(flags & 1)
            self.topic = r.str()
            if self.qos:
                self.pid = r.u16()
            if v5:
                self.props = r.props()
            self.payload = r.rest()
        elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            self.pid = r.u16()
            self.reason = 0
            if v5 and r.left():
                self.reason = r.byte()
                if r.left():
                    self.props = r.props()
        elif ptype in (SUBACK, UNSUBACK):
            self.pid = r.u16()
            if v5:
                self.props = r.props()
            self.codes = list(r.rest())
        elif ptype == DISCONNECT:
            self.reason = 0
            if r.left():
                self.reason = r.byte()
                if r.left():
                    self.props = r.props()

    def __repr__(self):
        extra = ""
        if self.type == PUBLISH:
            extra = " topic=%r qos=%d pid=%s dup=%s retain=%s payload=%r props=%r" % (
                self.topic, self.qos, self.pid, self.dup, self.retain, self.payload[:40], list(self.props))
        elif self.reason is not None:
            extra = " reason=0x%02x pid=%s props=%r" % (self.reason, self.pid, list(self.props))
        elif self.type in (SUBACK, UNSUBACK):
            extra = " pid=%s codes=%r" % (self.pid, self.codes)
        return "<%s%s>" % (TYPE_NAMES.get(self.type, self.type), extra)


class Closed(Exception):
    """The server closed the connection."""


class RawClient:
    """A blocking MQTT client on a plain socket; every read is bounded."""

    def __init__(self, host, port, version=4, timeout=5.0):
        self.version = version
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pending = []  # packets read ahead while waiting for another one
        self.closed = False
        self._next_pid = 1

    # -- low level
    def next_pid(self):
        pid = self._next_pid
        self._next_pid = self._next_pid % 65535 + 1
        return pid

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no packet from server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no packet from server in time")
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            raise Closed()
        self.buf += chunk

    def recv(self, timeout=None):
        """Return the next Packet; raise Closed on EOF, TimeoutError on timeout."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= 2:
                mult, length, i = 1, 0, 1
                complete = False
                while i < len(self.buf) and i <= 4:
                    b = self.buf[i]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        complete = True
                        break
                if not complete and i > 4:
                    raise ProtocolViolation("server sent malformed remaining length")
                if complete and len(self.buf) >= i + length:
                    hdr = self.buf[0]
                    body = bytes(self.buf[i:i + length])
                    del self.buf[:i + length]
                    return Packet(hdr >> 4, hdr & 0x0F, body, self.version)
            self._fill(deadline)

    def expect(self, ptype, timeout=None):
        p = self.recv(timeout)
        assert p.type == ptype, "expected %s, got %r" % (TYPE_NAMES[ptype], p)
        return p

    def recv_all(self, duration):
        """Collect packets for `duration` seconds (stops early on close)."""
        out = []
        deadline = time.monotonic() + duration
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            try:
                out.append(self.recv(left))
            except (TimeoutError, Closed):
                return out

    def wait_closed(self, timeout=5.0):
        """Wait until the server closes the connection.  Returns the packets
        received before the close; fails if the connection stays open."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("server did not close the connection within %.1fs (got %r)" % (timeout, got))
            try:
                got.append(self.recv(left))
            except Closed:
                return got
            except TimeoutError:
                raise AssertionError("server did not close the connection within %.1fs (got %r)" % (timeout, got))
            except ProtocolViolation:
                # garbage from the server after our garbage: treat as data, keep waiting
                self.buf.clear()

    def is_open(self, wait=0.2):
        """True if the connection is still open after `wait` seconds of silence."""
        try:
            self.recv(wait)
            return True  # got data: still open
        except TimeoutError:
            return True
        except Closed:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- MQTT level
    def connect(self, client_id="", clean=True, keepalive=60, properties=None,
                will=None, **kw):
        self.send(connect(client_id, version=self.version, clean=clean,
                          keepalive=keepalive, properties=properties, will=will, **kw))
        return self.expect(CONNACK)

    def subscribe(self, filters, properties=None, pid=None):
        """filters: list of (filter, options) or a single filter string (QoS 1).
        Returns SUBACK Packet (use .codes)."""
        if isinstance(filters, str):
            filters = [(filters, 1)]
        pid = pid or self.next_pid()
        self.send(subscribe(pid, filters, self.version, properties))
        # matching (retained) PUBLISHes may precede the SUBACK; keep them
        return self.wait_for(SUBACK, pid)

    def unsubscribe(self, filters, pid=None):
        pid = pid or self.next_pid()
        self.send(unsubscribe(pid, filters, self.version))
        p = self.expect(UNSUBACK)
        assert p.pid == pid
        return p

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None, pid=None, dup=False):
        """Send a PUBLISH and complete the QoS flow as sender."""
        if qos and pid is None:
            pid = self.next_pid()
        self.send(publish(topic, payload, qos, retain, dup, pid, self.version, properties))
        if qos == 1:
            p = self.expect(PUBACK)
            assert p.pid == pid
            return p
        if qos == 2:
            p = self.expect(PUBREC)
            assert p.pid == pid
            if p.reason is not None and p.reason >= 0x80:
                return p
            self.send(ack(PUBREL, pid, self.version))
            c = self.expect(PUBCOMP)
            assert c.pid == pid
            return p
        return None

    def recv_publish(self, timeout=None, ack_it=True):
        p = self.expect(PUBLISH, timeout)
        if ack_it:
            self.ack(p)
        return p

    def ack(self, p):
        """Acknowledge a received PUBLISH as a receiver (QoS 2: full flow)."""
        if p.qos == 1:
            self.send(ack(PUBACK, p.pid, self.version))
        elif p.qos == 2:
            self.send(ack(PUBREC, p.pid, self.version))
            self.wait_for(PUBREL, p.pid)
            self.send(ack(PUBCOMP, p.pid, self.version))

    def wait_for(self, ptype, pid, timeout=None):
        """Read until a packet of `ptype` with `pid` arrives; other packets
        (e.g. interleaved PUBLISHes) are kept for later recv() calls."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        stash = []
        try:
            while True:
                p = self.recv(max(deadline - time.monotonic(), 0.001))
                if p.type == ptype and p.pid == pid:
                    return p
                stash.append(p)
        finally:
            self.pending = stash + self.pending

    def ping(self, timeout=None):
        self.send(pingreq())
        return self.expect(PINGRESP, timeout)

    def disconnect(self, reason=0, properties=None, wait=1.0):
        """Send DISCONNECT, then wait (bounded) for the server to close its
        side, so that the broker has processed it before the test goes on."""
        try:
            self.send(disconnect(self.version, reason, properties))
            self.sock.shutdown(socket.SHUT_WR)
            self.recv_all(wait)
        except OSError:
            pass
        self.close()

    def drop(self):
        """Abnormal close: no DISCONNECT."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close()
