"""Durable storage: --data-dir, --in-memory, --fsync, --segment-bytes and
`shardmq inspect`.

What the broker promises (and these tests check from the outside):

* Persistent sessions (v3.1.1 CleanSession=0, v5 Session Expiry Interval > 0)
  with their subscriptions (options, subscription identifier), expiry and will,
  their queued and in-flight QoS 1/2 messages (both directions, same packet
  identifiers after a restart) and retained messages survive a graceful
  restart (SIGTERM) and a crash (SIGKILL): a message whose PUBACK/PUBCOMP the
  publisher got is delivered, QoS 1 at least once, QoS 2 exactly once.
* A torn tail of the last segment is cut (logged with "cut" and the file
  name) and the broker starts; damage anywhere else, a segment from a newer
  format version, a data dir that cannot be created and a data dir written
  with another --cores make the broker exit non-zero naming the cause.
* On a full disk, publishes that must be stored are refused (v5 PUBACK 0x97,
  v3.1.1 close without PUBACK); the broker keeps serving.
* `shardmq inspect --data-dir DIR [--json]` reports without modifying; exit 0
  when clean, 1 when it found damage.

On-disk layout the file-level tests rely on (storage/src/format.rs):
DIR/META, DIR/shard-<i>/<20-digit id>.seg, preallocated and zero-filled; a
32-byte header (magic "SHMQLOG\\0", u16 LE format version at offset 8, header
CRC32C of bytes 0..28 at 28..32), then frames `len u32 LE | crc32c u32 LE |
type u8 | payload` (CRC over len, type, payload); a full segment ends with a
seal frame (len 0xFFFFFFFF).

Each test stays under ~20 s; every wait is bounded.  The crash test prints its
random seed; rerun one with SHARDMQ_CRASH_SEED=<seed>.
"""

import collections
import glob
import hashlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import threading
import time

import pytest

import mqtt_raw as R
from conftest import SHARDMQ_BIN
from mqtt_client import Client, V311, V5, connect_props, publish_props, settle, ver_id

pytestmark = pytest.mark.shardmq_only

# ---------------------------------------------------------------- on-disk format

MAGIC = b"SHMQLOG\0"
HEADER_LEN = 32
FRAME_OVERHEAD = 9
SEAL_MARK = 0xFFFFFFFF
RECORD_TYPE_NAMES = {"session", "session_end", "message", "done", "released", "inbound_qos2",
                     "inbound_qos2_done", "retain", "retain_delete", "subscription"}


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def shard_dirs(data_dir):
    """{index: path} of DIR/shard-<i>."""
    out = {}
    for p in glob.glob(os.path.join(data_dir, "shard-*")):
        m = re.fullmatch(r"shard-(\d+)", os.path.basename(p))
        if m and os.path.isdir(p):
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def segments(shard_dir):
    """Segment files of one shard, oldest first."""
    return sorted(p for p in glob.glob(os.path.join(shard_dir, "*.seg"))
                  if re.fullmatch(r"\d{20}\.seg", os.path.basename(p)))


def all_segments(data_dir):
    return [s for d in shard_dirs(data_dir).values() for s in segments(d)]


def shard0(data_dir):
    dirs = shard_dirs(data_dir)
    assert 0 in dirs, "no shard-0 directory in %s: %r" % (
        data_dir, os.listdir(data_dir) if os.path.isdir(data_dir) else "missing")
    return dirs[0]


class Frame:
    def __init__(self, offset, length, rtype, payload):
        self.offset, self.length, self.rtype, self.payload = offset, length, rtype, payload

    @property
    def end(self):
        return self.offset + FRAME_OVERHEAD + self.length


def read_segment(path):
    """Parse a segment as format.rs describes it.  Returns (header bytes,
    [Frame], stop) with stop one of "end" (zeros follow), "seal" or
    "bad: <why>"."""
    with open(path, "rb") as f:
        buf = f.read()
    header = buf[:HEADER_LEN]
    frames = []
    off = HEADER_LEN
    stop = "end"
    while True:
        if len(buf) - off < FRAME_OVERHEAD:
            stop = "end" if not buf[off:].strip(b"\0") else "bad: partial frame header"
            break
        length, crc, rtype = struct.unpack_from("<IIB", buf, off)
        if length == 0 and crc == 0 and rtype == 0:
            stop = "end" if not buf[off:].strip(b"\0") else "bad: zero gap followed by data"
            break
        if length == SEAL_MARK:
            stop = "seal"
            break
        if off + FRAME_OVERHEAD + length > len(buf):
            stop = "bad: length %d runs past the file" % length
            break
        payload = buf[off + FRAME_OVERHEAD:off + FRAME_OVERHEAD + length]
        if crc32c(struct.pack("<IB", length, rtype) + payload) != crc:
            stop = "bad: CRC mismatch at %d" % off
            break
        frames.append(Frame(off, length, rtype, payload))
        off += FRAME_OVERHEAD + length
    return header, frames, stop


def patch_file(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_at(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def tree_digest(data_dir):
    """{relative path: sha256} of every segment and META."""
    out = {}
    for p in all_segments(data_dir) + [os.path.join(data_dir, "META")]:
        if os.path.exists(p):
            with open(p, "rb") as f:
                out[os.path.relpath(p, data_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def describe_dir(data_dir):
    lines = []
    for p in all_segments(data_dir):
        _, frames, stop = read_segment(p)
        lines.append("%s: %d records (types %s), %s" % (
            os.path.relpath(p, data_dir), len(frames),
            dict(collections.Counter(f.rtype for f in frames)), stop))
    return "\n".join(lines)


def assert_healthy_format(data_dir):
    """Every segment the broker wrote parses as format.rs documents."""
    segs = all_segments(data_dir)
    assert segs, "no segment files under %s: %r" % (data_dir, os.listdir(data_dir))
    for d in shard_dirs(data_dir).values():
        ss = segments(d)
        for i, p in enumerate(ss):
            header, _, stop = read_segment(p)
            assert header[:8] == MAGIC, "%s: magic %r" % (p, header[:8])
            assert struct.unpack_from("<H", header, 8)[0] == 1, "%s: version %r" % (p, header[8:10])
            assert crc32c(header[:28]) == struct.unpack_from("<I", header, 28)[0], "%s: header CRC" % p
            assert not stop.startswith("bad"), "%s: %s\n%s" % (p, stop, describe_dir(data_dir))
            if i + 1 < len(ss):
                assert stop == "seal", "%s is not the last segment but is not sealed (%s)" % (p, stop)


# ---------------------------------------------------------------- processes

def run_refused(args, cwd, timeout=15):
    """Run shardmq with `args` expecting it to refuse to start: returns
    (exit code, stdout, stderr).  Fails if it starts listening or hangs."""
    cmd = [SHARDMQ_BIN] + [str(a) for a in args]
    if "inspect" not in cmd and not any(a == "--listen" for a in cmd):
        cmd[1:1] = ["--listen", "127.0.0.1:0"]
    out_path = os.path.join(cwd, "refused.stdout")
    err_path = os.path.join(cwd, "refused.stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd)
        deadline = time.monotonic() + timeout
        try:
            while p.poll() is None:
                with open(out_path, "rb") as f:
                    started = b"listening on" in f.read()
                if started or time.monotonic() > deadline:
                    p.kill()
                    p.wait(5)
                    pytest.fail("%s: %s instead of refusing to start\nstdout: %s\nstderr: %s" % (
                        " ".join(cmd), "started listening" if started else "did not exit within %ds" % timeout,
                        open(out_path, errors="replace").read(), open(err_path, errors="replace").read()[-4000:]))
                time.sleep(0.05)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    stdout = open(out_path, errors="replace").read()
    stderr = open(err_path, errors="replace").read()
    assert "panicked" not in stderr + stdout, "%s panicked:\n%s" % (" ".join(cmd), stderr[-4000:])
    return p.returncode, stdout, stderr


def run_inspect(data_dir, as_json=True, timeout=30):
    cmd = [SHARDMQ_BIN, "inspect", "--data-dir", data_dir] + (["--json"] if as_json else [])
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    assert "panicked" not in out + err, "inspect panicked:\n%s" % err
    report = None
    if as_json:
        try:
            report = json.loads(out)
        except ValueError:
            pytest.fail("inspect --json printed no JSON (rc %d)\nstdout: %s\nstderr: %s" % (p.returncode, out, err))
    return p.returncode, report, out, err


# ---------------------------------------------------------------- clients

def session_client(clients, b, cid, version, new=False, expiry=300, connect=True, **kw):
    """A client with a persistent session: v3.1.1 CleanSession=0; v5 Session
    Expiry Interval `expiry` with Clean Start only when `new`."""
    if version == V5:
        return clients(b, cid, V5, clean=new, properties=connect_props(SessionExpiryInterval=expiry),
                       connect=connect, **kw)
    return clients(b, cid, V311, clean=False, connect=connect, **kw)


def raw_session(clients, b, cid, version, new=False, expiry=300, will=None):
    """Raw-socket persistent session; returns (RawClient, CONNACK)."""
    r = clients.raw(b, version)
    props = [(R.P_SESSION_EXPIRY, expiry)] if version == V5 else None
    clean = new if version == V5 else False
    ack = r.connect(cid, clean=clean, properties=props, will=will)
    assert ack.reason == 0, ack
    return r, ack


def publish_all(c, items, timeout=20.0, window=64):
    """Publish [(topic, payload, qos, retain)] pipelined (at most `window`
    unacknowledged) and wait for every acknowledgement.  Returns the reason
    codes in order."""
    mids = []
    deadline = time.monotonic() + timeout
    for topic, payload, qos, retain in items:
        with c._ack_cond:
            # c._acks holds the acknowledgements not yet collected: ours.
            while len(mids) - len(c._acks) >= window:
                assert time.monotonic() < deadline, "publishes not acknowledged within %.0fs" % timeout
                assert not c.disconnected.is_set(), "publisher disconnected (%r)" % c.disconnect_reason
                c._ack_cond.wait(0.05)
        mids.append(c.publish(topic, payload, qos, retain, wait=False).mid)
    return [c._wait_ack(m, max(deadline - time.monotonic(), 0.1))[0] for m in mids]


def collect(c, want, timeout=8.0, extra=0.3):
    """Read messages until every payload in `want` arrived (or timeout), then
    `extra` seconds more to catch duplicates.  Returns all messages."""
    got = []
    missing = set(want)
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        for m in c.drain(min(0.1, max(deadline - time.monotonic(), 0.01))):
            got.append(m)
            missing.discard(m.payload)
    got += c.drain(extra)
    return got


def assert_delivered(msgs, qos1=(), qos2=(), who="subscriber"):
    """Every QoS 1 payload at least once, every QoS 2 payload exactly once."""
    counts = collections.Counter(m.payload for m in msgs)
    missing = [p for p in list(qos1) + list(qos2) if counts[p] == 0]
    dups = {p: counts[p] for p in qos2 if counts[p] > 1}
    assert not missing, "%s is missing %d acknowledged message(s): %r (got %r)" % (
        who, len(missing), missing[:10], msgs[:20])
    assert not dups, "%s got QoS 2 message(s) more than once: %r" % (who, dups)


def restart(b, how):
    """Restart the broker on the same port and data dir: "sigterm" (graceful,
    must exit 0) or "kill9"."""
    assert how in ("sigterm", "kill9"), how
    b.restart(kill=(how == "kill9"))


# ================================================================ 1. sessions

@pytest.mark.parametrize("how", ["sigterm", "kill9"])
@pytest.mark.parametrize("version", [V311, V5], ids=ver_id)
def test_persistent_session_survives_restart(broker, clients, version, how):
    """Offline persistent session: messages acknowledged to the publisher
    while it was offline arrive after a restart, the session is present, and
    its subscriptions (QoS, v5 subscription identifiers) are still active."""
    b = broker("--fsync", "always")
    assert b.data_dir, "no data dir"
    tag = "%s-%s" % (ver_id(version), how)
    t1, t2 = "ps/%s/one" % tag, "ps/%s/two" % tag
    sub = session_client(clients, b, "ps-sub-" + tag, version, new=True)
    assert sub.session_present is False
    if version == V5:
        assert sub.subscribe("ps/%s/one" % tag, 1, sub_id=7) == [1]
        assert sub.subscribe("ps/%s/+" % tag, 2, sub_id=8) == [2]
    else:
        assert sub.subscribe("ps/%s/one" % tag, 1) == [1]
        assert sub.subscribe("ps/%s/+" % tag, 2) == [2]
    sub.disconnect()
    settle()

    pub = clients(b, "ps-pub-" + tag, version)
    q1 = [b"%s q1 %d" % (tag.encode(), i) for i in range(5)]
    q2 = [b"%s q2 %d" % (tag.encode(), i) for i in range(4)]
    rcs = publish_all(pub, [(t2, p, 1, False) for p in q1] + [(t2, p, 2, False) for p in q2])
    assert all(rc < 0x80 for rc in rcs), rcs
    pub.disconnect()

    restart(b, how)

    sub = session_client(clients, b, "ps-sub-" + tag, version)
    assert sub.session_present is True, "session lost across %s restart\n%s" % (how, b.log())
    msgs = collect(sub, q1 + q2)
    assert_delivered(msgs, q1, q2, "subscriber after %s restart" % how)
    for m in msgs:
        want_qos = 1 if m.payload in q1 else 2
        assert (m.topic, m.qos) == (t2, want_qos), m
        if version == V5:
            assert m.sub_ids == [8], "subscription identifier lost across the restart: %r" % m.sub_ids

    # The subscriptions are live after the restart, not only the queue: a
    # message to the overlapping topic matches both filters.
    pub = clients(b, "ps-pub2-" + tag, version)
    assert pub.publish(t1, b"after restart", 1) < 0x80
    got = collect(sub, [b"after restart"], timeout=3, extra=0.3)
    assert [m.payload for m in got] and all(m.payload == b"after restart" for m in got), got
    if version == V5:
        assert sorted(i for m in got for i in m.sub_ids) == [7, 8], \
            "subscription identifiers after restart: %r" % [(m.qos, m.sub_ids) for m in got]
    else:
        assert len(got) in (1, 2), got  # v3.1.1: one or one per matching filter
        assert max(m.qos for m in got) == 1, got


@pytest.mark.parametrize("fsync", ["interval:200", "never"])
def test_acknowledged_messages_survive_kill9_with_relaxed_fsync(broker, clients, fsync):
    """--fsync interval/never only risk power loss: a process crash loses
    nothing that was acknowledged (the page cache survives SIGKILL)."""
    b = broker("--fsync", fsync)
    sub = session_client(clients, b, "rf-sub", V5, new=True)
    assert sub.subscribe("rf/#", 2) == [2]
    sub.disconnect()
    settle()
    pub = clients(b, "rf-pub", V311)
    q1 = [b"rf q1 %d" % i for i in range(20)]
    q2 = [b"rf q2 %d" % i for i in range(20)]
    rcs = publish_all(pub, [("rf/a", p, 1, False) for p in q1] + [("rf/b", p, 2, False) for p in q2])
    assert rcs == [0] * 40
    b.kill9()
    b.start()
    sub = session_client(clients, b, "rf-sub", V5)
    assert sub.session_present is True
    assert_delivered(collect(sub, q1 + q2), q1, q2, "subscriber after kill -9 with --fsync %s" % fsync)


@pytest.mark.parametrize("version", [V311, V5], ids=ver_id)
def test_inflight_state_survives_kill9(broker, clients, version):
    """In-flight QoS state in both directions, checked on raw sockets:
    * outbound QoS 1 PUBLISH not yet acknowledged -> resent with the same
      packet id and DUP=1;
    * outbound QoS 2 PUBLISH that the client PUBREC'd -> PUBREL resent (not
      the PUBLISH);
    * inbound QoS 2 PUBLISH that the broker PUBREC'd -> after the restart the
      publisher's PUBREL for that packet id is answered with PUBCOMP (v5:
      reason 0, not 0x92) and the message reaches its subscriber exactly once.
    Then the acknowledged state must stay acknowledged across a second crash:
    no QoS 2 message is delivered again."""
    b = broker("--fsync", "always")
    v = ver_id(version)
    a_q1, a_q2, c_q2 = b"A-q1-" + v.encode(), b"B-q2-" + v.encode(), b"C-q2-" + v.encode()

    s, ack = raw_session(clients, b, "inf-sub-" + v, version, new=True)
    assert s.subscribe([("inf/q1", 1), ("inf/q2", 2)]).codes == [1, 2]
    s2, _ = raw_session(clients, b, "inf-sub2-" + v, version, new=True)
    assert s2.subscribe([("inf/c", 2)]).codes == [2]
    s2.disconnect()
    settle()

    p, _ = raw_session(clients, b, "inf-pub-" + v, version, new=True)
    p.publish("inf/q1", a_q1, qos=1)
    m1 = s.recv_publish(ack_it=False)  # not acknowledged
    assert (m1.payload, m1.qos) == (a_q1, 1), m1
    p.publish("inf/q2", a_q2, qos=2)
    m2 = s.recv_publish(ack_it=False)
    assert (m2.payload, m2.qos) == (a_q2, 2), m2
    s.send(R.ack(R.PUBREC, m2.pid, version))
    s.wait_for(R.PUBREL, m2.pid)  # ... and no PUBCOMP
    # Inbound QoS 2 left at PUBREC: no PUBREL yet.
    pid = 50
    p.send(R.publish("inf/c", c_q2, qos=2, pid=pid, version=version))
    rec = p.wait_for(R.PUBREC, pid)
    assert (rec.reason or 0) < 0x80, rec
    s.ping()  # the broker read everything before the PUBREC above

    b.kill9()
    b.start()

    # Publisher: completes the inbound QoS 2 flow it started before the crash.
    p, ack = raw_session(clients, b, "inf-pub-" + v, version)
    assert ack.session_present, "publisher session lost"
    p.send(R.ack(R.PUBREL, pid, version))
    comp = p.wait_for(R.PUBCOMP, pid)
    assert (comp.reason or 0) == 0, "PUBCOMP for the inbound QoS 2 message after restart: %r" % comp

    # Subscriber: the unacknowledged QoS 1 PUBLISH again (same packet id,
    # DUP), the PUBREL again, and never the PUBLISH of the QoS 2 message.
    s, ack = raw_session(clients, b, "inf-sub-" + v, version)
    assert ack.session_present, "subscriber session lost"
    got = s.recv_all(1.0)
    pubs = [x for x in got if x.type == R.PUBLISH]
    rels = [x for x in got if x.type == R.PUBREL]
    assert [(x.pid, x.payload, x.qos, x.dup) for x in pubs] == [(m1.pid, a_q1, 1, True)], \
        "expected the QoS 1 PUBLISH resent with packet id %d and DUP=1, got %r" % (m1.pid, got)
    assert [x.pid for x in rels] == [m2.pid], "expected PUBREL %d resent, got %r" % (m2.pid, got)
    s.send(R.ack(R.PUBACK, m1.pid, version))
    s.send(R.ack(R.PUBCOMP, m2.pid, version))
    s.ping()

    # Second subscriber: the inbound QoS 2 message exactly once.
    s2, ack = raw_session(clients, b, "inf-sub2-" + v, version)
    assert ack.session_present
    got2 = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not any(x.type == R.PUBLISH for x in got2):
        got2 += s2.recv_all(0.2)
    got2 += s2.recv_all(0.5)
    cs = [x for x in got2 if x.type == R.PUBLISH]
    assert [(x.payload, x.qos) for x in cs] == [(c_q2, 2)], \
        "inbound QoS 2 message PUBREC'd before the crash: expected once, got %r" % got2
    s2.send(R.ack(R.PUBREC, cs[0].pid, version))
    s2.wait_for(R.PUBREL, cs[0].pid)
    s2.send(R.ack(R.PUBCOMP, cs[0].pid, version))
    s2.ping()

    b.kill9()
    b.start()
    for cid, bad in (("inf-sub-" + v, a_q2), ("inf-sub2-" + v, c_q2)):
        r, ack = raw_session(clients, b, cid, version)
        assert ack.session_present
        again = [x for x in r.recv_all(0.8) if x.type == R.PUBLISH and x.payload == bad]
        assert not again, "%s: QoS 2 message delivered again after a second crash: %r" % (cid, again)
        r.disconnect()


# ================================================================ 2. crash test

class DurableSubscriber:
    """A raw-socket subscriber whose receive state outlives its connections,
    as MQTT requires of a client.  QoS 2 is received with "method A": the
    message is delivered when its PUBLISH first arrives and its packet id is
    remembered until the PUBREL, so a resent PUBLISH (same packet id) is a
    duplicate, not a new message.  The broker must therefore resend in-flight
    QoS 2 messages with their original packet ids."""

    def __init__(self, cid, version, filt, qos):
        self.cid, self.version, self.filt, self.qos = cid, version, filt, qos
        self.counts = collections.Counter()  # payload -> deliveries
        self.qos_seen = {}  # payload -> QoS it was delivered with
        self.awaiting_rel = {}  # packet id -> payload
        self.errors = []
        self.lock = threading.Lock()
        self.connects = 0
        self._stop = threading.Event()
        self._thread = None
        self._raw = None

    def connect(self, b, subscribe=False):
        first = self.connects == 0
        r = R.RawClient(b.host, b.port, self.version, timeout=5)
        props = [(R.P_SESSION_EXPIRY, 3600)] if self.version == V5 else None
        ack = r.connect(self.cid, clean=(first and self.version == V5), properties=props)
        assert ack.reason == 0, ack
        if not first:
            assert ack.session_present, "%s: session lost (session present 0)" % self.cid
        if subscribe:
            assert r.subscribe([(self.filt, self.qos)]).codes == [self.qos]
        self.connects += 1
        self._raw = r
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(r,), daemon=True)
        self._thread.start()

    def disconnect(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if self._raw:
            try:
                self._raw.send(R.disconnect(self.version))
            except OSError:
                pass
            self._raw.close()
        self._raw = None

    def connection_lost(self):
        """After the broker died: stop the reader, keep the state."""
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        if self._raw:
            self._raw.close()
        self._raw = None

    def _run(self, r):
        while not self._stop.is_set():
            try:
                p = r.recv(0.1)
            except TimeoutError:
                continue
            except (R.Closed, OSError):
                return
            except Exception as e:  # noqa: BLE001 - report anything odd
                self.errors.append("%s: %r" % (self.cid, e))
                return
            try:
                self._handle(r, p)
            except OSError:
                return

    def _handle(self, r, p):
        v = self.version
        if p.type == R.PUBLISH:
            with self.lock:
                if p.qos == 2:
                    if p.pid in self.awaiting_rel:
                        if self.awaiting_rel[p.pid] != p.payload:
                            self.errors.append("%s: packet id %d reused for %r while %r awaits PUBREL" % (
                                self.cid, p.pid, p.payload, self.awaiting_rel[p.pid]))
                    else:
                        self.awaiting_rel[p.pid] = p.payload
                        self._deliver(p)
                else:
                    self._deliver(p)
            if p.qos == 1:
                r.send(R.ack(R.PUBACK, p.pid, v))
            elif p.qos == 2:
                r.send(R.ack(R.PUBREC, p.pid, v))
        elif p.type == R.PUBREL:
            with self.lock:
                self.awaiting_rel.pop(p.pid, None)
            r.send(R.ack(R.PUBCOMP, p.pid, v))
        elif p.type == R.DISCONNECT:
            return
        else:
            self.errors.append("%s: unexpected %r" % (self.cid, p))

    def _deliver(self, p):
        self.counts[p.payload] += 1
        self.qos_seen[p.payload] = p.qos

    def missing(self, payloads):
        with self.lock:
            return [x for x in payloads if self.counts[x] == 0]


class CrashPublisher(threading.Thread):
    """Publishes QoS 1 and 2 messages (unique payloads) until its connection
    dies or it is told to stop, keeping at most `window` unacknowledged.
    `acked` lists the (payload, qos) whose PUBACK/PUBCOMP arrived with a
    success reason code: only those count as accepted by the broker."""

    def __init__(self, b, idx, rnd, version, max_msgs, pad, window=32):
        super().__init__(daemon=True)
        self.b, self.idx, self.rnd, self.version = b, idx, rnd, version
        self.max_msgs, self.pad, self.window = max_msgs, pad, window
        self.sent = {}  # mid -> (payload, qos)
        self.acked = []
        self.refused = []
        self.all_payloads = set()
        self.stop_ev = threading.Event()
        self.error = None
        self.c = None

    def run(self):
        try:
            self._run()
        except Exception as e:  # noqa: BLE001
            self.error = repr(e)

    def _run(self):
        c = Client(self.b, "crash-pub-%d-%d" % (self.rnd, self.idx), self.version, clean=True)
        self.c = c
        try:
            c.connect(timeout=3)
        except AssertionError:
            return
        for seq in range(self.max_msgs):
            if self.stop_ev.is_set() or c.disconnected.is_set():
                break
            with c._ack_cond:
                while len(self.sent) - len(c._acks) >= self.window:
                    if self.stop_ev.is_set() or c.disconnected.is_set():
                        break
                    c._ack_cond.wait(0.05)
            qos = 1 + (seq + self.idx) % 2
            payload = b"r%d-p%d-%d-q%d." % (self.rnd, self.idx, seq, qos) + b"x" * self.pad
            self.all_payloads.add(payload)
            info = c.c.publish("crash/p%d" % self.idx, payload, qos)
            if info.rc != 0:
                break
            self.sent[info.mid] = (payload, qos)
        self.stop_ev.wait(15)
        c.stop()

    def finish(self):
        self.stop_ev.set()
        self.join(10)
        c = self.c
        if c is None:
            return
        with c._ack_cond:
            for mid, (rc, _) in c._acks.items():
                if mid in self.sent:
                    (self.acked if rc < 0x80 else self.refused).append(self.sent[mid])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("segment_bytes", [None, 65536], ids=["default-segments", "64k-segments"])
def test_crash_acknowledged_messages_delivered(broker, segment_bytes):
    """4 publishers (v5 and v3.1.1, QoS 1 and 2, unique payloads) publish to 3
    persistent subscribers: A (v5, QoS 2, online), B (v3.1.1, QoS 2, offline
    throughout), C (v3.1.1, QoS 1, online).  The broker is SIGKILLed at a
    random moment, 3 rounds, and restarted on the same data dir.  Every
    message acknowledged to its publisher must reach every subscriber: at
    least once, and exactly once where both sides are QoS 2; no QoS 2 message
    may ever arrive twice, acknowledged or not."""
    seed = int(os.environ.get("SHARDMQ_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print("crash test seed %d (rerun with SHARDMQ_CRASH_SEED=%d)" % (seed, seed))
    args = ["--fsync", "always", "--cores", "2", "--max-queued", "1000000"]
    pad = 20
    if segment_bytes:
        args += ["--segment-bytes", str(segment_bytes)]
        pad = 300  # fill segments: rolls and compaction happen during the rounds
    b = broker(*args)

    a = DurableSubscriber("crash-sub-a", V5, "crash/#", 2)
    bb = DurableSubscriber("crash-sub-b", V311, "crash/#", 2)
    c = DurableSubscriber("crash-sub-c", V311, "crash/#", 1)
    subs = [a, bb, c]
    for s in subs:
        s.connect(b, subscribe=True)
    bb.disconnect()
    settle(0.2)

    acked, published = [], set()
    rounds = 3
    try:
        for rnd in range(rounds):
            pubs = [CrashPublisher(b, i, rnd, V5 if i % 2 == 0 else V311, max_msgs=1000, pad=pad)
                    for i in range(4)]
            for p in pubs:
                p.start()
            delay = rng.uniform(0.3, 1.5)
            time.sleep(delay)
            b.kill9()
            for p in pubs:
                p.finish()
                assert p.error is None, "publisher %d: %s" % (p.idx, p.error)
                acked += p.acked
                published |= p.all_payloads
            n_acked = sum(len(p.acked) for p in pubs)
            print("round %d: killed after %.2fs, %d acknowledged" % (rnd, delay, n_acked))
            for s in (a, c):
                s.connection_lost()
            b.start()
            for s in (a, c):
                s.connect(b)
        assert acked, "no message was acknowledged in %d rounds (seed %d)\n%s" % (rounds, seed, b.log())
        bb.connect(b)
        all_acked = [p for p, _ in acked]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(s.missing(all_acked) for s in subs):
            time.sleep(0.1)
        time.sleep(0.5)  # late duplicates
    finally:
        for s in subs:
            s.disconnect()

    problems = []
    qos_of = dict(acked)
    for s in subs:
        problems += s.errors
        missing = s.missing(all_acked)
        if missing:
            problems.append("%s: %d of %d acknowledged messages missing, e.g. %r" % (
                s.cid, len(missing), len(all_acked), [m[:24] for m in missing[:5]]))
        with s.lock:
            counts = dict(s.counts)
            qos_seen = dict(s.qos_seen)
        unknown = [x for x in counts if x not in published]
        if unknown:
            problems.append("%s: got payloads nobody published: %r" % (s.cid, unknown[:5]))
        if s.qos == 2:
            dups = {x[:24]: n for x, n in counts.items() if n > 1 and x.split(b".")[0].endswith(b"q2")}
            if dups:
                problems.append("%s: %d QoS 2 message(s) delivered more than once: %r" % (
                    s.cid, len(dups), list(dups.items())[:5]))
        wrong_qos = [(x[:24], q) for x, q in qos_seen.items()
                     if x in qos_of and q != min(qos_of[x], s.qos)]
        if wrong_qos:
            problems.append("%s: delivered with the wrong QoS: %r" % (s.cid, wrong_qos[:5]))
    assert not problems, "seed %d, %d acknowledged messages:\n  %s\n%s" % (
        seed, len(acked), "\n  ".join(problems), b.log(tail=3000))


@pytest.mark.parametrize("segment_bytes", [None, 65536], ids=["default-segments", "64k-segments"])
def test_completed_qos2_not_redelivered_after_kill9(broker, segment_bytes):
    """The deterministic core of the crash test: subscriber A (online)
    completes the QoS 2 flow of 150 messages of 1 KB that subscriber B
    (offline) still keeps live; segments roll (and are compacted with 64 KiB
    segments).  After kill -9, A must not get any of them again and B must
    get each exactly once."""
    args = ["--fsync", "always", "--cores", "1"]
    if segment_bytes:
        args += ["--segment-bytes", str(segment_bytes)]
    b = broker(*args)
    a = DurableSubscriber("cq2-a", V5, "cq2/#", 2)
    bb = DurableSubscriber("cq2-b", V311, "cq2/#", 2)
    for s in (a, bb):
        s.connect(b, subscribe=True)
    bb.disconnect()
    settle()
    pub = Client(b, "cq2-pub", V5)
    try:
        pub.connect()
        payloads = [b"cq2 %d " % i + os.urandom(1000) for i in range(150)]
        rcs = publish_all(pub, [("cq2/t", p, 2, False) for p in payloads])
        assert rcs == [0] * len(payloads), rcs
    finally:
        pub.stop()
    deadline = time.monotonic() + 10
    while a.missing(payloads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not a.missing(payloads), "online subscriber did not get everything before the crash"
    deadline = time.monotonic() + 5
    while a.awaiting_rel and time.monotonic() < deadline:  # every flow completed: PUBCOMP sent
        time.sleep(0.05)
    time.sleep(1.0)  # let the broker process the PUBCOMPs (and compact)
    a.disconnect()
    first = dict(a.counts)
    b.kill9()
    b.start()
    try:
        a.connect(b)
        bb.connect(b)
        deadline = time.monotonic() + 10
        while bb.missing(payloads) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        a.disconnect()
        bb.disconnect()
    again = [p[:8] for p in payloads if a.counts[p] > first.get(p, 0)]
    assert not again, "%d QoS 2 message(s) completed before kill -9 delivered again to A, e.g. %r\n%s" % (
        len(again), again[:5], describe_dir(b.data_dir))
    assert not bb.missing(payloads), "B is missing %d messages" % len(bb.missing(payloads))
    dups = [p[:8] for p in payloads if bb.counts[p] > 1]
    assert not dups, "B got QoS 2 messages twice: %r" % dups[:5]
    assert not a.errors + bb.errors, a.errors + bb.errors


# ================================================================ 3. retained + subscriptions

def test_retained_and_subscriptions_survive_kill9(broker, clients):
    """Retained messages (with their v5 properties) and a deleted retained
    message, subscription options (No Local, Retain As Published,
    subscription identifiers) and an unsubscribe all survive kill -9."""
    b = broker("--fsync", "always")
    pub = clients(b, "ret-pub", V5)
    props = publish_props(ContentType="text/plain", UserProperty=[("k", "v")])
    assert pub.publish("ret/a", b"alpha", 1, retain=True, properties=props) == 0
    assert pub.publish("ret/b", b"beta", 2, retain=True) == 0
    assert pub.publish("ret/del", b"doomed", 1, retain=True) == 0
    assert pub.publish("ret/del", b"", 1, retain=True) == 0  # retained delete
    assert pub.publish("ret/repl", b"old", 1, retain=True) == 0
    assert pub.publish("ret/repl", b"new", 1, retain=True) == 0

    s = session_client(clients, b, "ret-opts", V5, new=True)
    assert s.subscribe("opt/#", 1, no_local=True, rap=True, sub_id=42) == [1]
    assert s.subscribe("opt2/+", 2, sub_id=43) == [2]
    assert s.subscribe("gone/#", 1) == [1]
    assert s.unsubscribe("gone/#") == [0]
    s311 = session_client(clients, b, "ret-opts-311", V311)
    assert s311.subscribe("opt311/#", 2) == [2]
    assert s311.subscribe("gone311/#", 1) == [1]
    assert s311.unsubscribe("gone311/#") is not None

    b.kill9()
    b.start()

    r = clients(b, "ret-reader", V5)
    assert r.subscribe("ret/#", 2) == [2]
    got = {m.topic: m for m in r.drain(1.0)}
    assert sorted(got) == ["ret/a", "ret/b", "ret/repl"], \
        "retained messages after kill -9: %r (ret/del was deleted before the crash)" % got
    assert (got["ret/a"].payload, got["ret/a"].qos, got["ret/a"].retain) == (b"alpha", 1, True)
    assert (got["ret/b"].payload, got["ret/b"].qos, got["ret/b"].retain) == (b"beta", 2, True)
    assert got["ret/repl"].payload == b"new"
    assert got["ret/a"].prop("ContentType") == "text/plain", got["ret/a"].properties
    assert got["ret/a"].prop("UserProperty") == [("k", "v")], got["ret/a"].properties

    s = session_client(clients, b, "ret-opts", V5)
    assert s.session_present
    s311 = session_client(clients, b, "ret-opts-311", V311)
    assert s311.session_present
    s.publish("opt/own", b"own", 1)  # No Local: not back to s
    other = clients(b, "ret-other", V5)
    assert other.publish("opt/x", b"rap", 1, retain=True) == 0
    assert other.publish("opt2/y", b"two", 2) == 0
    assert other.publish("gone/x", b"unsubscribed", 1) < 0x80
    assert other.publish("opt311/z", b"v311", 2) == 0
    assert other.publish("gone311/z", b"unsubscribed311", 1) < 0x80
    msgs = collect(s, [b"rap", b"two"], timeout=3, extra=0.5)
    seen = sorted((m.topic, m.payload, m.qos, m.retain, tuple(m.sub_ids)) for m in msgs)
    assert seen == [("opt/x", b"rap", 1, True, (42,)), ("opt2/y", b"two", 2, False, (43,))], \
        "v5 subscription options after kill -9 (want No Local, Retain As Published, ids 42/43): %r" % seen
    msgs = collect(s311, [b"v311"], timeout=3, extra=0.5)
    assert [(m.topic, m.payload, m.qos) for m in msgs] == [("opt311/z", b"v311", 2)], msgs
    r.expect_none(0.1)


def test_retained_delete_survives_compaction(broker, clients):
    """With small segments, churn on other retained topics moves the log on
    (segments roll and are compacted); a retained message deleted before the
    churn must stay deleted after kill -9, and the last value of the churned
    topic must be the one retained."""
    b = broker("--fsync", "always", "--segment-bytes", "65536")
    pub = clients(b, "rdc-pub", V5)
    assert pub.publish("rdc/old", b"old", 1, retain=True) == 0
    assert pub.publish("rdc/keep", b"keep", 1, retain=True) == 0
    blob = os.urandom(1500)
    rcs = publish_all(pub, [("rdc/churn", blob + b"%d" % i, 1, True) for i in range(150)])
    assert all(rc == 0 for rc in rcs), rcs
    assert pub.publish("rdc/old", b"", 1, retain=True) == 0  # delete, in a later segment
    rcs = publish_all(pub, [("rdc/churn", blob + b"%d" % i, 1, True) for i in range(150, 400)])
    assert all(rc == 0 for rc in rcs), rcs
    time.sleep(1.0)  # let the broker compact
    b.kill9()
    b.start()
    r = clients(b, "rdc-reader", V5)
    assert r.subscribe("rdc/#", 1) == [1]
    got = {m.topic: m.payload for m in r.drain(1.0)}
    assert sorted(got) == ["rdc/churn", "rdc/keep"], "retained topics after compaction + kill -9: %r" % sorted(got)
    assert got["rdc/keep"] == b"keep"
    assert got["rdc/churn"] == blob + b"399", "stale retained value: ...%r" % got["rdc/churn"][-8:]


def test_compaction_reclaims_space_and_keeps_live_data(broker, clients):
    """--segment-bytes 65536: ~3 MB of overwritten retained messages leave
    little live data, so the log must shrink back to a few segments; the
    queued messages of an offline session (live, spread over the old
    segments) are all delivered after kill -9."""
    b = broker("--fsync", "always", "--segment-bytes", "65536", "--cores", "1")
    sub = session_client(clients, b, "cmp-sub", V5, new=True)
    assert sub.subscribe("cmp/keep", 1) == [1]
    sub.disconnect()
    settle()
    pub = clients(b, "cmp-pub", V5)
    blob = os.urandom(1000)
    keep = []
    items = []
    for i in range(3000):
        if i % 60 == 0:
            p = b"keep %d" % i
            keep.append(p)
            items.append(("cmp/keep", p, 1, False))
        items.append(("cmp/churn", blob + b"%d" % i, 1, True))
    rcs = publish_all(pub, items, timeout=25)
    assert all(rc < 0x80 for rc in rcs)
    shard0(b.data_dir)
    deadline = time.monotonic() + 8
    while True:
        n = len(all_segments(b.data_dir))
        if n <= 10 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # ~3 MB written, ~60 KB live: without compaction that is ~50 segments.
    assert n <= 10, "log not compacted: %d segments of 64 KiB for ~60 KB of live data\n%s" % (
        n, describe_dir(b.data_dir))
    b.kill9()
    b.start()
    assert_healthy_format(b.data_dir)
    sub = session_client(clients, b, "cmp-sub", V5)
    assert sub.session_present
    msgs = collect(sub, keep, timeout=5)
    assert_delivered(msgs, keep, (), "offline session after compaction + kill -9")
    firsts = []
    for m in msgs:
        if m.payload not in firsts:
            firsts.append(m.payload)
    assert firsts == keep, "queued messages out of order after compaction: %r" % firsts
    r = clients(b, "cmp-reader", V5)
    assert r.subscribe("cmp/churn", 1) == [1]
    assert r.expect_one().payload == blob + b"2999"


# ================================================================ 4. expiry, will, in-memory

def test_session_expiry_counts_across_kill9(broker, clients):
    """A v5 session with Session Expiry Interval 2 s that was disconnected
    before a kill -9 is gone at a restart 3 s later, even for the first
    CONNECT after it (which may be served before the shard's first timer
    pass); a session with a long expiry is not."""
    b = broker("--fsync", "always")
    for cid, exp in (("exp-short-1", 2), ("exp-short-2", 2), ("exp-long", 300)):
        c = session_client(clients, b, cid, V5, new=True, expiry=exp)
        assert c.subscribe("exp/#", 1) == [1]
        c.disconnect()
    settle(0.2)
    pub = clients(b, "exp-pub", V5)
    assert pub.publish("exp/t", b"for the expired", 1) == 0
    b.kill9()
    time.sleep(3.0)
    b.start()

    first = session_client(clients, b, "exp-short-1", V5, expiry=2)
    assert first.session_present is False, "session with expiry 2 s resumed 3 s after its disconnect"
    first.expect_none(0.5)
    late = session_client(clients, b, "exp-short-2", V5, expiry=2)
    assert late.session_present is False, "session with expiry 2 s survived 3 s of downtime"
    late.expect_none(0.5)

    long = session_client(clients, b, "exp-long", V5)
    assert long.session_present is True
    assert long.expect_one().payload == b"for the expired"


@pytest.mark.parametrize("version", [V311, V5], ids=ver_id)
def test_will_of_persistent_session_published_after_crash(broker, clients, version):
    """The will of a persistent session that was connected when the broker
    crashed is stored with the session: after the restart the client is gone,
    so the will is published (v5: after its Will Delay Interval of 1 s)."""
    b = broker("--fsync", "always")
    w = session_client(clients, b, "wc-watch", V5, new=True)
    assert w.subscribe("wc/#", 1) == [1]
    w.disconnect()
    settle()
    will = dict(topic="wc/%s" % ver_id(version), payload=b"gone " + ver_id(version).encode(), qos=1,
                properties=[(R.P_WILL_DELAY, 1)] if version == V5 else None)
    r, ack = raw_session(clients, b, "wc-client-" + ver_id(version), version, new=True, will=will)
    r.ping()
    b.kill9()
    r.close()
    b.start()
    w = session_client(clients, b, "wc-watch", V5)
    assert w.session_present
    m = w.expect_one(timeout=5)
    assert (m.topic, m.payload, m.qos) == (will["topic"], will["payload"], 1), m


def test_in_memory_persists_nothing(broker, clients):
    """--in-memory: nothing is written (no ./data in the working directory),
    and a restart forgets sessions and retained messages."""
    b = broker("--in-memory")
    assert b.data_dir is None
    s = session_client(clients, b, "mem-sub", V5, new=True)
    assert s.subscribe("mem/#", 1) == [1]
    s.disconnect()
    pub = clients(b, "mem-pub", V5)
    assert pub.publish("mem/r", b"retained", 1, retain=True) < 0x80
    restart(b, "sigterm")
    s = session_client(clients, b, "mem-sub", V5)
    assert s.session_present is False
    assert s.subscribe("mem/#", 1) == [1]
    s.expect_none(0.5)
    assert not os.path.exists(os.path.join(b.tmpdir, "data")), os.listdir(b.tmpdir)


def test_default_data_dir_is_dot_data(tmp_path):
    """Without --data-dir the broker uses ./data, creating it, with META and
    one directory per shard."""
    cwd = str(tmp_path)
    out_path, err_path = os.path.join(cwd, "stdout"), os.path.join(cwd, "stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([SHARDMQ_BIN, "--listen", "127.0.0.1:0", "--cores", "2"], cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            with open(out_path, "rb") as f:
                if b"listening on" in f.read():
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "did not start:\n%s" % open(err_path, errors="replace").read()[-3000:]
        data = os.path.join(cwd, "data")
        assert os.path.isfile(os.path.join(data, "META")), os.listdir(cwd)
        assert sorted(shard_dirs(data)) == [0, 1], os.listdir(data)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(5)
    assert rc == 0, "exit code %r after SIGTERM" % rc


# ================================================================ 5. damaged data dirs

def _fill_retained(clients, b, n, size=0, prefix="keep", last=None):
    """n retained QoS 1 messages keep/0..n-1 (random payloads of `size`
    bytes, or short text), then optionally `last` on keep/last.  Returns
    {topic: payload}."""
    pub = clients(b, "fill-pub-%d" % time.monotonic_ns(), V5)
    want = {}
    items = []
    for i in range(n):
        p = (b"%s %d " % (prefix.encode(), i)) + (os.urandom(size) if size else b"")
        want["%s/%d" % (prefix, i)] = p
        items.append(("%s/%d" % (prefix, i), p, 1, True))
    rcs = publish_all(pub, items)
    assert all(rc == 0 for rc in rcs), rcs
    if last is not None:
        assert pub.publish("%s/last" % prefix, last, 1, retain=True) == 0
    pub.disconnect()
    return want


def _retained(clients, b, filt="keep/#", wait=1.0):
    r = clients(b, "ret-check-%d" % time.monotonic_ns(), V5)
    assert r.subscribe(filt, 1) == [1]
    got = {m.topic: m.payload for m in r.drain(wait)}
    r.disconnect()
    return got


def _last_data_segment(data_dir):
    """(path, frames) of the shard log whose last segment holds the most
    recently written record: the single shard with --cores 1."""
    dirs = shard_dirs(data_dir)
    assert list(dirs) == [0], "expected one shard: %r" % dirs
    segs = segments(dirs[0])
    assert segs, os.listdir(dirs[0])
    _, frames, stop = read_segment(segs[-1])
    assert stop == "end", "%s: %s" % (segs[-1], stop)
    assert frames, "last segment %s holds no record\n%s" % (segs[-1], describe_dir(data_dir))
    return segs[-1], frames


@pytest.mark.parametrize("damage", ["torn-last-record", "garbage-after-last-record"])
def test_torn_tail_is_cut_and_broker_starts(broker, clients, damage):
    """A crash in the middle of an append leaves a torn last record (its tail
    still zero, or half-written garbage after the last complete one): the
    broker cuts it, logs the cut naming the file, starts, and every earlier
    record is intact; the next start finds nothing to cut."""
    b = broker("--fsync", "always", "--cores", "1")
    last_payload = b"LAST-RETAINED-" + os.urandom(8).hex().encode() + b"-END"
    want = _fill_retained(clients, b, 5, last=last_payload)
    b.kill9()
    seg, frames = _last_data_segment(b.data_dir)
    last = frames[-1]
    last_is_ours = last_payload in last.payload
    if damage == "torn-last-record":
        # The end of the record never reached the file: zeros from the middle
        # of our payload (or of the record) on.
        at = last.payload.find(last_payload)
        start = last.offset + FRAME_OVERHEAD + (at + len(last_payload) // 2 if at >= 0 else last.length // 2)
        old = read_at(seg, start, last.end - start)
        assert old.strip(b"\0"), "nothing to tear: the record's tail is all zeros"
        patch_file(seg, start, b"\0" * len(old))
    else:
        # A partial frame header after the last record.
        patch_file(seg, last.end, b"\x31\x00\x00\x00\x9a")
    b.start()
    name = os.path.basename(seg)
    # (a "nothing cut" summary line names the shard directory, not the segment)
    cut_lines = [l for l in b.stderr().splitlines() if "cut" in l.lower() and name in l]
    assert cut_lines, "no stderr line mentions the cut of %s:\n%s" % (name, b.stderr()[-3000:])
    got = _retained(clients, b)
    for topic, payload in want.items():
        assert got.get(topic) == payload, "%s lost after cutting a torn tail: %r" % (topic, got.get(topic))
    if damage == "torn-last-record" and last_is_ours:
        assert "keep/last" not in got, "the torn record came back: %r" % got.get("keep/last")
    if damage == "garbage-after-last-record":
        assert got.get("keep/last") == last_payload
    restart(b, "sigterm")
    assert not [l for l in b.stderr().splitlines() if "cut" in l.lower() and name in l], \
        "the cut was not persisted: second start cuts again:\n%s" % b.stderr()[-3000:]
    assert_healthy_format(b.data_dir)
    got2 = _retained(clients, b)
    assert got2 == got


def _multi_segment_dir(broker, clients):
    """A --cores 1 data dir with several segments: 100 retained messages of
    ~2 KB (live data alone spans more than 3 segments of 64 KiB).  Returns
    (broker, {topic: payload}) with the broker killed."""
    b = broker("--fsync", "always", "--cores", "1", "--segment-bytes", "65536")
    want = _fill_retained(clients, b, 100, size=2000)
    b.kill9()
    segs = segments(shard0(b.data_dir))
    assert len(segs) >= 3, "expected several segments:\n%s" % describe_dir(b.data_dir)
    return b, want


@pytest.mark.parametrize("where", ["record-payload", "record-length", "segment-header"])
def test_corruption_in_sealed_segment_refuses_to_start(broker, clients, where):
    """Damage before the tail of the log (here in the oldest, sealed segment,
    followed by valid records and segments) is not a torn write: the broker
    must exit non-zero naming the file, and leave the directory as it was."""
    b, _ = _multi_segment_dir(broker, clients)
    seg = segments(shard0(b.data_dir))[0]
    _, frames, stop = read_segment(seg)
    assert stop == "seal" and len(frames) >= 3, "%s: %d records, %s" % (seg, len(frames), stop)
    big = [x for x in frames if x.length >= 16]
    f = big[len(big) // 2]
    if where == "record-payload":
        off = f.offset + FRAME_OVERHEAD + f.length // 2
        patch_file(seg, off, bytes([read_at(seg, off, 1)[0] ^ 0xFF]))
    elif where == "record-length":
        patch_file(seg, f.offset, struct.pack("<I", f.length + 3))
    else:
        patch_file(seg, 2, b"X")  # inside the magic
    before = tree_digest(b.data_dir)
    rc, out, err = run_refused(["--cores", "1", "--segment-bytes", "65536", "--data-dir", b.data_dir], b.tmpdir)
    assert rc != 0
    assert os.path.basename(seg) in err, "error does not name %s:\n%s" % (os.path.basename(seg), err[-3000:])
    assert tree_digest(b.data_dir) == before, "a refused start modified the data dir"


def test_newer_format_version_refuses_to_start(broker, clients):
    """A segment whose header says format version 2 (header CRC correct): the
    broker must not guess at it nor cut it as a torn tail."""
    b = broker("--fsync", "always", "--cores", "1")
    _fill_retained(clients, b, 3)
    restart(b, "sigterm")  # a clean restart works
    b.stop()
    seg = segments(shard0(b.data_dir))[-1]
    header = bytearray(read_at(seg, 0, HEADER_LEN))
    assert header[:8] == MAGIC and struct.unpack_from("<H", header, 8)[0] == 1, bytes(header)
    header[8:10] = struct.pack("<H", 2)
    header[28:32] = struct.pack("<I", crc32c(bytes(header[:28])))
    patch_file(seg, 0, bytes(header))
    before = tree_digest(b.data_dir)
    rc, out, err = run_refused(["--cores", "1", "--data-dir", b.data_dir], b.tmpdir)
    assert rc != 0
    assert "version" in err.lower(), "error does not mention the format version:\n%s" % err[-3000:]
    assert os.path.basename(seg) in err, "error does not name the file:\n%s" % err[-3000:]
    assert tree_digest(b.data_dir) == before


@pytest.mark.parametrize("kind", ["regular-file", "below-a-file", "proc"])
def test_unusable_data_dir_refuses_to_start(tmp_path, kind):
    """A data dir that cannot be created or written (tests run as root, so a
    path at or below a regular file, or in /proc, rather than chmod 000)."""
    f = tmp_path / "not-a-dir"
    f.write_bytes(b"x")
    path = {"regular-file": str(f), "below-a-file": str(f / "data"),
            "proc": "/proc/shardmq-test-%d/data" % os.getpid()}[kind]
    rc, out, err = run_refused(["--cores", "1", "--data-dir", path], str(tmp_path))
    assert rc != 0
    assert path in err, "error does not name %s:\n%s" % (path, err[-3000:])
    assert f.read_bytes() == b"x"


def test_second_broker_on_same_data_dir_refused(broker, clients):
    b = broker("--fsync", "always")
    s = session_client(clients, b, "lock-sub", V5, new=True)
    assert s.subscribe("lock/#", 1) == [1]
    rc, out, err = run_refused(["--cores", "2", "--data-dir", b.data_dir], b.tmpdir)
    assert rc != 0
    assert b.data_dir in err, "error does not name the data dir:\n%s" % err[-3000:]
    pub = clients(b, "lock-pub", V5)
    assert pub.publish("lock/x", b"still mine", 1) == 0
    assert s.expect_one().payload == b"still mine"


def test_placement_recorded_and_another_rule_refused(broker, clients):
    """META names the rule that placed client ids on shards; a directory
    placed by another rule (e.g. the ahash placement of format-1 directories)
    is refused with an error naming both rules, and nothing is changed."""
    b = broker("--fsync", "always", "--cores", "2")
    s = session_client(clients, b, "place-sub", V311)
    assert s.subscribe("place/#", 1) == [1]
    s.disconnect()
    b.stop()
    meta = os.path.join(b.data_dir, "META")
    text = open(meta).read()
    assert "placement xxh3-64-seed0-mod" in text.splitlines(), text
    for legacy in ("shardmq data directory\nformat 1\nshards 2\n",
                   text.replace("xxh3-64-seed0-mod", "some-other-rule")):
        open(meta, "w").write(legacy)
        before = tree_digest(b.data_dir)
        rc, out, err = run_refused(["--cores", "2", "--data-dir", b.data_dir], b.tmpdir)
        assert rc != 0
        assert "xxh3-64-seed0-mod" in err and ("ahash" in err or "some-other-rule" in err), err[-3000:]
        assert tree_digest(b.data_dir) == before, "a refused start changed the data directory"
    open(meta, "w").write(text)
    b.start()
    s = session_client(clients, b, "place-sub", V311)
    assert s.session_present is True


@pytest.mark.parametrize("other", [1, 3])
def test_cores_mismatch_refused(broker, clients, other):
    """A data dir written by 2 shards cannot be opened with another --cores
    (sessions are placed by hash(client id) % shards); the error names the
    shard count, and the directory still works with --cores 2 afterwards."""
    b = broker("--fsync", "always", "--cores", "2")
    s = session_client(clients, b, "cores-sub", V311)
    assert s.subscribe("cores/#", 1) == [1]
    s.disconnect()
    b.stop()
    rc, out, err = run_refused(["--cores", str(other), "--data-dir", b.data_dir], b.tmpdir)
    assert rc != 0
    msg = err.replace(b.data_dir, "<DIR>")
    assert re.search(r"(?<![\w.])2(?![\w.])", msg), "error does not name the shard count 2:\n%s" % err[-3000:]
    assert re.search(r"shard|core", msg, re.I), err[-3000:]
    b.start()
    s = session_client(clients, b, "cores-sub", V311)
    assert s.session_present is True


def test_invalid_fsync_value_refused(tmp_path):
    rc, out, err = run_refused(["--cores", "1", "--data-dir", str(tmp_path / "d"), "--fsync", "sometimes"],
                               str(tmp_path))
    assert rc != 0
    assert "fsync" in err.lower() or "sometimes" in err, err[-2000:]



def test_in_memory_and_data_dir_together_refused(tmp_path):
    d = tmp_path / "d"
    rc, out, err = run_refused(["--cores", "1", "--in-memory", "--data-dir", str(d)], str(tmp_path))
    assert rc != 0
    assert "--in-memory" in err and "--data-dir" in err, err[-2000:]
    assert not d.exists(), "nothing is created for a refused start"


# ---------------------------------------------------------------- disk full

@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % p.stderr.decode(errors="replace").strip())
    try:
        yield str(mnt)
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)  # the broker may still hold files open
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_refuses_stored_publishes_and_keeps_serving(tiny_tmpfs, broker, clients):
    """Data dir on a 2 MiB tmpfs, 64 KiB segments: QoS 1 publishes queued for
    an offline session fill it.  Then v5 gets PUBACK 0x97, v3.1.1 is closed
    without PUBACK; QoS 0 still flows, new connections work, and every
    message acknowledged before the disk filled reaches the session."""
    data = os.path.join(tiny_tmpfs, "data")
    b = broker("--fsync", "always", "--segment-bytes", "65536", "--data-dir", data)
    sub = session_client(clients, b, "df-sub", V5, new=True)
    assert sub.subscribe("df/#", 1) == [1]
    sub.disconnect()
    settle()

    pub = clients(b, "df-pub", V5)
    acked, refused = [], None
    for i in range(400):  # 400 x 8 KiB = 3.2 MiB > 2 MiB
        payload = b"df %d " % i + os.urandom(8192)
        rc = pub.publish("df/t", payload, 1)
        if rc == 0x97:
            refused = i
            break
        assert rc == 0, "unexpected PUBACK reason 0x%02x at message %d" % (rc, i)
        acked.append(payload)
    assert refused is not None, "2 MiB tmpfs never reported full after %d x 8 KiB" % len(acked)
    assert acked, "the very first publish was refused"
    # The publisher's connection survives a 0x97 and the refusal repeats.
    assert pub.publish("df/t", b"again" + os.urandom(8192), 1) == 0x97

    # v3.1.1 has no reason codes: close without PUBACK.
    r = clients.raw(b, 4)
    assert r.connect("df-raw-311").reason == 0
    r.send(R.publish("df/t", b"x" * 8192, qos=1, pid=9))
    before_close = r.wait_closed(5)
    assert not [p for p in before_close if p.type == R.PUBACK], before_close

    # QoS 0 flows and new (clean) connections work.
    q0sub = clients(b, "df-q0-sub", V5)
    assert q0sub.subscribe("df0/#", 0) == [0]
    q0pub = clients(b, "df-q0-pub", V311)
    q0pub.publish("df0/x", b"qos0 still flows", 0, wait=False)
    assert q0sub.expect_one(timeout=3).payload == b"qos0 still flows"

    # Everything acknowledged before the disk filled is delivered.
    sub = session_client(clients, b, "df-sub", V5)
    assert sub.session_present
    assert_delivered(collect(sub, acked, timeout=10), acked, (), "offline session on a full disk")


# ================================================================ 6. inspect

def _inspect_setup(broker, clients, extra=()):
    """2 persistent sessions (v5 + v3.1.1), 3 retained messages, 4 messages
    queued for the offline v3.1.1 session; stopped gracefully."""
    b = broker("--fsync", "always", "--cores", "2", *extra)
    s5 = session_client(clients, b, "insp-v5", V5, new=True)
    assert s5.subscribe("insp5/#", 1) == [1]
    s3 = session_client(clients, b, "insp-v311", V311)
    assert s3.subscribe("insp/q/#", 1) == [1]
    s3.disconnect()
    s5.disconnect()
    settle()
    pub = clients(b, "insp-pub", V5)
    for i in range(3):
        assert pub.publish("insp/ret/%d" % i, b"r%d" % i, 1, retain=True) == 0
    for i in range(4):
        assert pub.publish("insp/q/%d" % i, b"q%d" % i, 1) == 0
    pub.disconnect()
    settle()
    assert b.stop() == 0
    return b


def test_inspect_clean_data_dir(broker, clients):
    b = _inspect_setup(broker, clients)
    before = tree_digest(b.data_dir)
    rc, rep, out, err = run_inspect(b.data_dir)
    assert rc == 0, "inspect on a clean dir: rc %d\n%s\n%s" % (rc, out, err)
    assert rep["clean"] is True, rep
    shards = rep["shards"]
    assert sorted(s["shard"] for s in shards) == [0, 1], shards
    by_type = collections.Counter()
    for s in shards:
        assert s["problems"] == [], s
        assert set(s["records_by_type"]) <= RECORD_TYPE_NAMES, s["records_by_type"]
        by_type.update(s["records_by_type"])
        seg_records = 0
        for seg in s["segments"]:
            assert re.fullmatch(r"\d{20}\.seg", seg["name"]), seg
            size = os.path.getsize(os.path.join(b.data_dir, "shard-%d" % s["shard"], seg["name"]))
            assert 0 < seg["bytes"] <= size, (seg, size)
            assert isinstance(seg["sealed"], bool)
            seg_records += seg["records"]
        assert seg_records == sum(s["records_by_type"].values()), s
    assert by_type["session"] >= 2 and by_type["retain"] >= 3 and by_type["message"] >= 4, by_type
    assert sum(s["sessions"] for s in shards) == 2, [s["sessions"] for s in shards]
    assert sum(s["queued_messages"] for s in shards) == 4, [s["queued_messages"] for s in shards]
    retained = [s["retained"] for s in shards]
    # Retained messages are either stored once (owner shard) or on every shard.
    assert sum(retained) == 3 or retained == [3, 3], retained

    rc, _, text, err = run_inspect(b.data_dir, as_json=False)
    assert rc == 0, err
    for word in (r"shard.?0", r"shard.?1", "session", "retain", "message"):
        assert re.search(word, text), "inspect output lacks %r:\n%s" % (word, text)
    assert tree_digest(b.data_dir) == before, "inspect modified the data dir"


@pytest.mark.parametrize("damage", ["sealed-segment", "torn-tail"])
def test_inspect_reports_corruption(broker, clients, damage):
    if damage == "sealed-segment":
        b, _ = _multi_segment_dir(broker, clients)
        seg = segments(shard0(b.data_dir))[0]
        _, frames, _ = read_segment(seg)
        big = [x for x in frames if x.length >= 16]
        f = big[len(big) // 2]
        off = f.offset + FRAME_OVERHEAD + f.length // 2
    else:
        b = broker("--fsync", "always", "--cores", "1")
        _fill_retained(clients, b, 5)
        b.kill9()
        seg, frames = _last_data_segment(b.data_dir)
        off = frames[-1].end - 3
    patch_file(seg, off, bytes([read_at(seg, off, 1)[0] ^ 0xFF]))
    name = os.path.basename(seg)
    before = tree_digest(b.data_dir)
    rc, rep, out, err = run_inspect(b.data_dir)
    assert rc == 1, "inspect on a damaged dir: rc %d\n%s\n%s" % (rc, out, err)
    assert rep["clean"] is False, rep
    problems = [p for s in rep["shards"] for p in s["problems"]]
    assert any(name in p for p in problems), "no problem names %s: %r" % (name, problems)
    rc, _, text, err = run_inspect(b.data_dir, as_json=False)
    assert rc == 1
    assert name in text + err, text
    assert tree_digest(b.data_dir) == before, "inspect modified the data dir"


def test_inspect_missing_dir(tmp_path):
    missing = str(tmp_path / "nope")
    p = subprocess.run([SHARDMQ_BIN, "inspect", "--data-dir", missing], capture_output=True, timeout=30)
    assert p.returncode != 0
    assert missing in (p.stdout + p.stderr).decode(errors="replace")
    assert b"panicked" not in p.stderr
    assert not os.path.exists(missing), "inspect created the directory"
