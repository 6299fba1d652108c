"""A small synchronous wrapper around paho-mqtt 2.x.

Every wait is bounded.  The network loop runs in our own thread (not
loop_start) so that paho never reconnects behind the test's back.
"""

import os
import queue
import socket
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

V311 = 4
V5 = 5
ALL_VERSIONS = [V311, V5]

# True when the suite validates itself against Mosquitto instead of shardmq;
# a few assertions where Mosquitto 2.0.x deviates from the spec are relaxed.
IS_MOSQUITTO = os.environ.get("SHARDMQ_TEST_TARGET", "shardmq").lower() == "mosquitto"


def ver_id(v):
    return {V311: "v311", V5: "v5"}[v]


def settle(t=0.1):
    """Give the broker a moment to process a disconnect that it does not
    acknowledge on the wire (the session may live on another shard)."""
    time.sleep(t)
PROTOCOLS = {V311: mqtt.MQTTv311, V5: mqtt.MQTTv5}


def _rc(rc):
    """paho gives ReasonCode objects (or ints for some v3 paths)."""
    return rc.value if hasattr(rc, "value") else int(rc)


def make_props(packet_type, **kw):
    """make_props(PacketTypes.PUBLISH, UserProperty=[("a","1")], MessageExpiryInterval=5)"""
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def publish_props(**kw):
    return make_props(PacketTypes.PUBLISH, **kw)


def connect_props(**kw):
    return make_props(PacketTypes.CONNECT, **kw)


class Message:
    def __init__(self, m):
        self.topic = m.topic
        self.payload = m.payload
        self.qos = m.qos
        self.retain = bool(m.retain)
        self.dup = bool(m.dup)
        self.mid = m.mid
        self.properties = getattr(m, "properties", None)
        self.time = time.monotonic()

    def prop(self, name, default=None):
        if self.properties is None:
            return default
        return getattr(self.properties, name, default)

    @property
    def sub_ids(self):
        v = self.prop("SubscriptionIdentifier", [])
        return v if isinstance(v, list) else [v]

    def __repr__(self):
        return "<Message %s %r q%d r%d>" % (self.topic, self.payload[:30], self.qos, self.retain)


class ConnectFailed(AssertionError):
    pass


class Client:
    def __init__(self, server, client_id="", version=V5, clean=True, keepalive=30,
                 properties=None, will=None, username=None, password=None):
        """server: object with .host and .port.  will: dict(topic, payload, qos, retain, properties)."""
        self.server = server
        self.version = version
        self.client_id = client_id
        self.clean = clean
        self.keepalive = keepalive
        self.connect_properties = properties
        self.messages = queue.Queue()
        self.connack = None  # (reason, session_present, properties)
        self.disconnected = threading.Event()
        self.disconnect_reason = None
        self.disconnect_properties = None
        self._connected = threading.Event()
        self._acks = {}
        self._ack_lock = threading.Lock()
        self._ack_cond = threading.Condition(self._ack_lock)
        self._stop = threading.Event()
        self._thread = None
        kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                      client_id=client_id, protocol=PROTOCOLS[version])
        if version == V311:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(**kwargs)
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        if will is not None:
            self.c.will_set(will["topic"], will.get("payload", b""), will.get("qos", 0),
                            will.get("retain", False), will.get("properties"))
        if username is not None:
            self.c.username_pw_set(username, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_ack
        self.c.on_publish = self._on_publish
        self.c.on_disconnect = self._on_disconnect

    # ---- callbacks
    def _on_connect(self, c, ud, flags, rc, props):
        self.connack = (_rc(rc), bool(flags.session_present), props)
        self._connected.set()

    def _on_message(self, c, ud, m):
        self.messages.put(Message(m))

    def _on_ack(self, c, ud, mid, rc_list, props):
        with self._ack_cond:
            self._acks[mid] = ([_rc(r) for r in rc_list], props)
            self._ack_cond.notify_all()

    def _on_publish(self, c, ud, mid, rc, props):
        with self._ack_cond:
            self._acks[mid] = (_rc(rc), props)
            self._ack_cond.notify_all()

    def _on_disconnect(self, c, ud, flags, rc, props):
        self.disconnect_reason = _rc(rc)
        self.disconnect_properties = props
        self.disconnected.set()
        self._connected.set()  # unblock a waiting connect()

    def _wait_ack(self, mid, timeout):
        deadline = time.monotonic() + timeout
        with self._ack_cond:
            while mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0 or self.disconnected.is_set():
                    raise AssertionError("no ack for mid %s within %.1fs (disconnected=%s)"
                                         % (mid, timeout, self.disconnected.is_set()))
                self._ack_cond.wait(min(left, 0.05))
            return self._acks.pop(mid)

    def _loop(self):
        while not self._stop.is_set():
            rc = self.c.loop(timeout=0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if not self.disconnected.is_set():
                    self.disconnect_reason = self.disconnect_reason or -1
                    self.disconnected.set()
                    self._connected.set()
                return

    # ---- API
    def connect(self, timeout=5.0, check=True):
        """Connect and wait for CONNACK.  Returns (reason, session_present, properties)."""
        kw = {}
        if self.version == V5:
            kw["clean_start"] = self.clean
            if self.connect_properties is not None:
                kw["properties"] = self.connect_properties
        self.c.connect(self.server.host, self.server.port, keepalive=self.keepalive, **kw)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        # Make paho believe it runs threaded, so publish() from the test thread
        # only queues and never writes to the socket concurrently with _loop.
        self.c._thread = self._thread
        self._thread.start()
        if not self._connected.wait(timeout) or self.connack is None:
            self.stop()
            raise ConnectFailed("no CONNACK within %.1fs (disconnect=%r)" % (timeout, self.disconnect_reason))
        if check and self.connack[0] != 0:
            self.stop()
            raise ConnectFailed("CONNACK refused: 0x%02x" % self.connack[0])
        return self.connack

    @property
    def session_present(self):
        return self.connack[1]

    @property
    def connack_props(self):
        return self.connack[2]

    def subscribe(self, topic, qos=1, no_local=False, rap=False, retain_handling=0,
                  sub_id=None, properties=None, timeout=5.0):
        """Subscribe one filter; returns the list of SUBACK reason codes."""
        if self.version == V5:
            opts = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap,
                                    retainHandling=retain_handling)
            if sub_id is not None:
                properties = properties or make_props(PacketTypes.SUBSCRIBE)
                properties.SubscriptionIdentifier = sub_id
            rc, mid = self.c.subscribe(topic, options=opts, properties=properties)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        codes, _ = self._wait_ack(mid, timeout)
        return codes

    def unsubscribe(self, topic, timeout=5.0):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        codes, _ = self._wait_ack(mid, timeout)
        return codes

    def publish(self, topic, payload=b"", qos=0, retain=False, properties=None, timeout=5.0, wait=True):
        """Publish; for QoS>0 waits for the ack flow and returns the v5 reason code."""
        info = self.c.publish(topic, payload, qos, retain, properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, "publish failed locally: %s" % info.rc
        if not wait:
            return info
        rc, _ = self._wait_ack(info.mid, timeout)
        return rc

    def expect(self, n=1, timeout=3.0):
        """Return exactly the next n messages (fail if fewer arrive in time)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(left, 0.001)))
            except queue.Empty:
                raise AssertionError("expected %d message(s) on %r within %.1fs, got %d: %r"
                                     % (n, self.client_id, timeout, len(out), out))
        return out

    def expect_one(self, timeout=3.0):
        return self.expect(1, timeout)[0]

    def expect_none(self, duration=0.3):
        try:
            m = self.messages.get(timeout=duration)
        except queue.Empty:
            return
        raise AssertionError("unexpected message on %r: %r" % (self.client_id, m))

    def drain(self, duration=0.3):
        """Collect whatever arrives within `duration`."""
        out = []
        deadline = time.monotonic() + duration
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                return out

    def wait_disconnected(self, timeout=5.0):
        assert self.disconnected.wait(timeout), "client %r was not disconnected within %.1fs" % (self.client_id, timeout)
        return self.disconnect_reason

    def disconnect(self, reason=None, properties=None, timeout=3.0):
        """Clean DISCONNECT (v5 optional reason code / properties)."""
        if not self.disconnected.is_set():
            if reason is not None:
                from paho.mqtt.reasoncodes import ReasonCode
                rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason)
                self.c.disconnect(reasoncode=rc, properties=properties)
            else:
                self.c.disconnect(properties=properties)
            self.disconnected.wait(timeout)
        self.stop()

    def _wake(self):
        """Interrupt the loop thread's select() so that it notices _stop."""
        w = getattr(self.c, "_sockpairW", None)
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:
                pass

    def kill(self):
        """Drop the TCP connection without DISCONNECT (abnormal close)."""
        self._stop.set()
        self._wake()
        if self._thread:
            self._thread.join(2)
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def stop(self):
        self._stop.set()
        self._wake()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(2)
        try:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
        except Exception:
            pass


def assert_broker_serves(server, version=V5):
    """A fresh client can connect, subscribe, publish and receive."""
    tag = "%d" % (int(time.monotonic() * 1e6) % 10**9)
    sub = Client(server, "alive-sub-" + tag, version)
    pub = Client(server, "alive-pub-" + tag, version)
    try:
        sub.connect()
        pub.connect()
        assert sub.subscribe("alive/" + tag, 1) == [1]
        pub.publish("alive/" + tag, b"ping", 1)
        m = sub.expect_one()
        assert m.payload == b"ping"
    finally:
        sub.disconnect()
        pub.disconnect()
