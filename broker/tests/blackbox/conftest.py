"""Fixtures for the shardmq black-box suite.

Environment:
  SHARDMQ_BIN          broker binary (default /work/main/target/debug/shardmq,
                       i.e. <repo>/target/debug/shardmq)
  SHARDMQ_TEST_TARGET  "shardmq" (default) or "mosquitto" to run the suite
                       against /usr/sbin/mosquitto to validate the tests
  SHARDMQ_TEST_CORES   --cores for the default broker (default 2)
  SHARDMQ_RUNTIME      passed through to the broker (epoll|io_uring)
  MOSQUITTO_BIN        mosquitto binary (default: /usr/sbin/mosquitto)
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from mqtt_client import Client, V311, V5

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
TARGET = os.environ.get("SHARDMQ_TEST_TARGET", "shardmq").lower()
SHARDMQ_BIN = os.environ.get("SHARDMQ_BIN", os.path.join(REPO, "target", "debug", "shardmq"))
MOSQUITTO_BIN = os.environ.get("MOSQUITTO_BIN") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DEFAULT_CORES = os.environ.get("SHARDMQ_TEST_CORES", "2")
LISTEN_RE = re.compile(r"listening on (\S+):(\d+)")

IS_MOSQUITTO = TARGET == "mosquitto"

# shardmq flag -> (mosquitto.conf option or None if mosquitto has no equivalent)
MOSQUITTO_FLAG_MAP = {
    "--cores": "",                      # ignored
    "--log-level": "",                  # ignored
    "--max-connections": "max_connections",
    "--max-packet-size": "max_packet_size",
    "--max-inflight": "max_inflight_messages",
    "--max-queued": "max_queued_messages",
    "--max-keepalive": "max_keepalive",
    "--max-topic-alias": "max_topic_alias",
    "--connect-timeout-ms": None,
    "--max-topic-levels": None,
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shardmq_only: uses shardmq-only behaviour/flags; skipped when SHARDMQ_TEST_TARGET=mosquitto")
    config.addinivalue_line(
        "markers", "mosquitto_deviates(reason): mosquitto 2.0.x deviates from the spec here; skipped under mosquitto")


def pytest_collection_modifyitems(config, items):
    if not IS_MOSQUITTO:
        return
    for item in items:
        if item.get_closest_marker("shardmq_only"):
            item.add_marker(pytest.mark.skip(reason="shardmq-only test"))
        m = item.get_closest_marker("mosquitto_deviates")
        if m:
            item.add_marker(pytest.mark.skip(reason="mosquitto deviates: %s" % (m.args[0] if m.args else "")))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A running broker process.  .host/.port to connect; .stop() for an
    explicit graceful shutdown (the fixture checks exit status either way)."""

    def __init__(self, args, tmpdir):
        self.args = list(args)
        self.tmpdir = tmpdir
        self.host = "127.0.0.1"
        self.port = None
        self.proc = None
        self.returncode = None
        self.kind = TARGET
        self._stdout = []
        self._stdout_lock = threading.Lock()
        self._listen = threading.Event()
        self.stderr_path = os.path.join(tmpdir, "broker.stderr")

    # ------------------------------------------------------------ start
    def start(self):
        if IS_MOSQUITTO:
            self._start_mosquitto()
        else:
            self._start_shardmq()
        return self

    def _drain_stdout(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            with self._stdout_lock:
                self._stdout.append(line)
            if self.port is None:
                m = LISTEN_RE.search(line)
                if m:
                    self.host = m.group(1) if m.group(1) not in ("0.0.0.0", "[::]") else "127.0.0.1"
                    self.port = int(m.group(2))
                    self._listen.set()
        self._listen.set()

    def _start_shardmq(self):
        if not os.path.exists(SHARDMQ_BIN):
            pytest.fail("shardmq binary not found at %s (build it or set SHARDMQ_BIN)" % SHARDMQ_BIN)
        args = list(self.args)
        if "--cores" not in args:
            args = ["--cores", DEFAULT_CORES] + args
        cmd = [SHARDMQ_BIN, "--listen", "127.0.0.1:0"] + args
        self.cmd = cmd
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        if not self._listen.wait(10) or self.port is None:
            self._kill()
            pytest.fail("shardmq did not print 'listening on HOST:PORT' within 10s\n" + self.log())

    def _start_mosquitto(self):
        port = free_port()
        conf = ["listener %d 127.0.0.1" % port, "allow_anonymous true", "persistence false",
                "log_dest stderr", "log_type all" if os.environ.get("MOSQUITTO_VERBOSE") else "log_type error"]
        it = iter(self.args)
        for flag in it:
            if flag not in MOSQUITTO_FLAG_MAP:
                pytest.fail("unknown broker flag %s" % flag)
            value = next(it)
            opt = MOSQUITTO_FLAG_MAP[flag]
            if opt is None:
                pytest.skip("mosquitto has no equivalent of %s" % flag)
            if opt:
                conf.append("%s %s" % (opt, value))
        conf_path = os.path.join(self.tmpdir, "mosquitto.conf")
        with open(conf_path, "w") as f:
            f.write("\n".join(conf) + "\n")
        self.cmd = [MOSQUITTO_BIN, "-c", conf_path]
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                self.port = port
                return
            except OSError:
                time.sleep(0.02)
        self._kill()
        pytest.fail("mosquitto did not start listening on %d\n%s" % (port, self.log()))

    # ------------------------------------------------------------ stop
    def _kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self, timeout=5.0):
        """Graceful shutdown with SIGTERM; returns the exit code (None if it hung and was killed)."""
        if self.returncode is not None or self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            self.returncode = None
        return self.returncode

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stdout(self):
        with self._stdout_lock:
            return "".join(self._stdout)

    def stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log(self, tail=20000):
        text = "--- broker cmd: %s\n--- stdout:\n%s\n--- stderr:\n%s" % (
            " ".join(getattr(self, "cmd", [])), self.stdout()[-tail:], self.stderr()[-tail:])
        return text


@pytest.fixture
def broker(tmp_path):
    """Factory: broker(*extra_args) starts a broker on 127.0.0.1 (random port)
    with `--cores 2` by default and returns a Broker (.host, .port).  On
    teardown each broker is stopped with SIGTERM and must exit 0 within 5s
    without panicking."""
    started = []

    def start(*args):
        d = tmp_path / ("broker%d" % len(started))
        d.mkdir()
        b = Broker([str(a) for a in args], str(d))
        started.append(b)
        return b.start()

    yield start

    problems = []
    for b in started:
        crashed = b.proc is not None and b.proc.poll() is not None and b.returncode is None
        early_rc = b.proc.returncode if crashed else None
        rc = b.stop()
        if crashed:
            problems.append("broker exited during the test with code %r" % early_rc)
        elif rc is None:
            problems.append("broker did not exit within 5s of SIGTERM")
        elif rc != 0:
            problems.append("broker exited with code %r after SIGTERM" % rc)
        if "panicked" in b.stderr() or "panicked" in b.stdout():
            problems.append("broker panicked")
        # Printed output is only shown by pytest for failing tests.
        print(b.log(tail=8000))
        try:
            b._stderr.close()
        except Exception:
            pass
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def clients():
    """Tracks paho clients/raw sockets created in a test and closes them."""
    made = []

    class Factory:
        def __call__(self, server, client_id="", version=V5, connect=True, **kw):
            c = Client(server, client_id, version, **kw)
            made.append(c)
            if connect:
                c.connect()
            return c

        def raw(self, server, version=4, timeout=5.0):
            from mqtt_raw import RawClient
            r = RawClient(server.host, server.port, version, timeout)
            made.append(r)
            return r

    yield Factory()
    for c in made:
        try:
            if isinstance(c, Client):
                c.stop()
            else:
                c.close()
        except Exception:
            pass
