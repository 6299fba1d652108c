"""Fixtures for the shardmq black-box suite.

Environment:
  SHARDMQ_BIN          broker binary (default /work/main/target/debug/shardmq,
                       i.e. <repo>/target/debug/shardmq)
  SHARDMQ_TEST_TARGET  "shardmq" (default) or "mosquitto" to run the suite
                       against /usr/sbin/mosquitto to validate the tests
  SHARDMQ_TEST_CORES   --cores for the default broker (default 2)
  SHARDMQ_RUNTIME      passed through to the broker (epoll|io_uring)
  MOSQUITTO_BIN        mosquitto binary (default: /usr/sbin/mosquitto)

Every shardmq broker runs with its working directory in the test's tmp dir
and, when the binary has --data-dir and the test passes neither --data-dir
nor --in-memory, with its own `--data-dir <tmp>/brokerN/data`, so that no
state leaks between tests.
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
SHARDMQ_BIN = os.path.abspath(os.environ.get("SHARDMQ_BIN", os.path.join(REPO, "target", "debug", "shardmq")))
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


_HELP = {}


def shardmq_help():
    """`shardmq --help` output ("" if the binary is missing or fails); cached per run."""
    if "text" not in _HELP:
        try:
            p = subprocess.run([SHARDMQ_BIN, "--help"], capture_output=True, timeout=10)
            _HELP["text"] = (p.stdout + p.stderr).decode("utf-8", "replace")
        except (OSError, subprocess.SubprocessError):
            _HELP["text"] = ""
    return _HELP["text"]


def shardmq_has_flag(flag):
    return re.search(r"(^|\s)%s\b" % re.escape(flag), shardmq_help()) is not None


def _flag_value(args, flag):
    """Value of `flag` in an argument list (`--flag V` or `--flag=V`), else None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def _listening(port):
    """Whether any socket on this host listens on TCP `port` (/proc/net/tcp{,6})."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A running broker process.  .host/.port to connect; .stop() for an
    explicit graceful shutdown (the fixture checks exit status either way).

    A shardmq broker can be stopped and started again on the same port and
    data directory: .kill9() (SIGKILL, simulated crash), .stop() (SIGTERM)
    and .start() again, or .restart(kill=False|True).  Each run is a
    "generation" with its own stdout/stderr; .stdout()/.stderr() are those of
    the current (last) generation, .log() shows all of them.

    .data_dir is the broker's data directory (None with --in-memory or a
    binary without --data-dir)."""

    def __init__(self, args, tmpdir):
        self.args = list(args)
        self.tmpdir = tmpdir
        self.host = "127.0.0.1"
        self.port = None
        self.proc = None
        self.returncode = None
        self.kind = TARGET
        self.killed = False  # the current generation was ended by kill9()
        self.generation = 0
        self._history = []  # log text of earlier generations
        self._earlier_panic = False
        self._stdout = []
        self._stdout_lock = threading.Lock()
        self._listen = threading.Event()
        self._stderr = None
        self.stderr_path = os.path.join(tmpdir, "broker.stderr")
        self.data_dir = None
        self._auto_data_dir = False
        if not IS_MOSQUITTO:
            explicit = _flag_value(self.args, "--data-dir")
            if explicit is not None:
                self.data_dir = explicit
            elif "--in-memory" not in self.args and shardmq_has_flag("--data-dir"):
                self.data_dir = os.path.join(tmpdir, "data")
                self._auto_data_dir = True

    # ------------------------------------------------------------ start
    def start(self):
        """Start (or start again, after stop()/kill9(): same port, same data dir)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                raise AssertionError("broker is still running; stop() or kill9() it first")
            self._archive()
        if IS_MOSQUITTO:
            self._start_mosquitto()
        else:
            self._start_shardmq()
        return self

    def restart(self, kill=False, args=None):
        """Stop (SIGTERM, must exit 0; or SIGKILL with kill=True) and start
        again on the same port and data dir, optionally with other args."""
        if self.alive():
            if kill:
                self.kill9()
            else:
                rc = self.stop()
                if rc != 0:
                    pytest.fail("broker exited with %r on SIGTERM before the restart\n%s" % (rc, self.log()))
        if args is not None:
            self.args = [str(a) for a in args]
        return self.start()

    def _archive(self):
        """Keep the output of the finished generation and reset per-run state."""
        self._history.append(self._generation_log(tail=8000))
        self._earlier_panic = self._earlier_panic or "panicked" in self.stdout() + self.stderr()
        try:
            self._stderr.close()
        except Exception:
            pass
        self.generation += 1
        self.stderr_path = os.path.join(self.tmpdir, "broker.%d.stderr" % self.generation)
        with self._stdout_lock:
            self._stdout = []
        self._listen = threading.Event()
        self.returncode = None
        self.killed = False
        self.proc = None

    def _drain_stdout(self, proc, lines, listen):
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            with self._stdout_lock:
                lines.append(line)
            if not listen.is_set():
                m = LISTEN_RE.search(line)
                if m:
                    # Several listeners are listed comma-separated: .host/.port are the last one's (the
                    # TLS and WebSocket fields that follow name which address speaks what).
                    host = m.group(1).rsplit(",", 1)[-1]
                    self.host = host if host not in ("0.0.0.0", "[::]") else "127.0.0.1"
                    self.port = int(m.group(2))
                    listen.set()
        listen.set()

    def _shardmq_cmd(self):
        args = list(self.args)
        if "--cores" not in args and _flag_value(args, "--cores") is None:
            args = ["--cores", DEFAULT_CORES] + args
        if self._auto_data_dir:
            args = args + ["--data-dir", self.data_dir]
        listen = "127.0.0.1:%d" % self.port if self.port else "127.0.0.1:0"
        return [SHARDMQ_BIN, "--listen", listen] + args

    def _start_shardmq(self):
        if not os.path.exists(SHARDMQ_BIN):
            pytest.fail("shardmq binary not found at %s (build it or set SHARDMQ_BIN)" % SHARDMQ_BIN)
        restarting = self.port is not None
        deadline = time.monotonic() + 10
        if restarting:
            # The previous run's listening sockets can outlive its process for
            # a moment (io_uring tears a ring down asynchronously); a new
            # SO_REUSEPORT listener would share the port with them and some
            # connections would land in a dead accept queue.
            while _listening(self.port) and time.monotonic() < deadline:
                time.sleep(0.01)
        while True:
            cmd = self._shardmq_cmd()
            self.cmd = cmd
            self._stderr = open(self.stderr_path, "wb")
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self._stderr, cwd=self.tmpdir)
            lines, listen = self._stdout, self._listen
            threading.Thread(target=self._drain_stdout, args=(self.proc, lines, listen), daemon=True).start()
            listen.wait(max(deadline - time.monotonic(), 0.1))
            with self._stdout_lock:
                listening = any(LISTEN_RE.search(line) for line in lines)
            if listening and self.proc.poll() is None:
                return
            # A restart on the old port can race the kernel releasing it.
            if (restarting and self.proc.poll() is not None and "in use" in self.stderr().lower()
                    and time.monotonic() < deadline):
                self.proc.wait()
                self._archive()
                time.sleep(0.2)
                continue
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
        threading.Thread(target=self._drain_stdout, args=(self.proc, self._stdout, threading.Event()),
                         daemon=True).start()
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

    def kill9(self):
        """SIGKILL the broker (a crash: no shutdown code runs) and wait for it."""
        if self.proc is None:
            raise AssertionError("broker not started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.returncode = self.proc.returncode
        self.killed = True
        return self.returncode

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
        """stderr of the current generation."""
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def panicked(self):
        """Whether any run of this broker printed a panic."""
        return self._earlier_panic or "panicked" in self.stdout() + self.stderr()

    def _generation_log(self, tail=20000):
        return "--- broker (run %d) cmd: %s\n--- stdout:\n%s\n--- stderr:\n%s\n" % (
            self.generation, " ".join(getattr(self, "cmd", [])), self.stdout()[-tail:], self.stderr()[-tail:])

    def log(self, tail=20000):
        return "".join(self._history) + self._generation_log(tail)


def start_fails(tmp_path, *args):
    """Runs the broker directly (not via the fixture) with `args`, expecting it to refuse to start;
    returns its stderr."""
    env = dict(os.environ)
    env.pop("RUST_BACKTRACE", None)  # keep stderr to the error itself
    p = subprocess.run([SHARDMQ_BIN, "--in-memory", "--cores", "1"] + [str(a) for a in args],
                       capture_output=True, timeout=20, cwd=str(tmp_path), stdin=subprocess.DEVNULL, env=env)
    out = p.stdout.decode(errors="replace")
    assert p.returncode != 0, "the broker started: %s" % out
    assert "listening on" not in out
    return p.stderr.decode(errors="replace")


def wait_log(b, text, timeout=5.0):
    """Waits until the broker's log holds `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in b.stderr():
            return
        time.sleep(0.05)
    raise AssertionError("no %r in the log\n%s" % (text, b.log()))


def wait_eof(sock, timeout):
    """Reads until the peer closes (EOF or reset); returns (bytes read, seconds taken).
    Fails if the connection is still open after `timeout`."""
    t0 = time.monotonic()
    got = b""
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("connection still open after %.1fs (read %r)" % (timeout, got[:40]))
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            return got, time.monotonic() - t0
        got += chunk


@pytest.fixture(autouse=True)
def _drop_log_segments(tmp_path):
    """After each test (and after its brokers have stopped: autouse fixtures
    are torn down last), delete the log segments under the test's tmp dir.
    Each is preallocated (64 MiB by default, and one more is prepared ahead),
    so a full run would otherwise leave gigabytes behind and can fill the
    disk of the machine it runs on."""
    yield
    for root, _dirs, files in os.walk(str(tmp_path)):
        for name in files:
            if name.endswith(".seg") or name.endswith(".seg.tmp"):
                try:
                    os.unlink(os.path.join(root, name))
                except OSError:
                    pass


@pytest.fixture
def broker(tmp_path):
    """Factory: broker(*extra_args) starts a broker on 127.0.0.1 (random port)
    with `--cores 2` by default (and its own data dir, see the module doc) and
    returns a Broker (.host, .port, .data_dir, .restart(), .kill9()).  On
    teardown each broker still running is stopped with SIGTERM and must exit 0
    within 5s; no run may have panicked."""
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
        if b.proc is not None:
            crashed = b.proc.poll() is not None and b.returncode is None
            early_rc = b.proc.returncode if crashed else None
            rc = b.stop()
            if crashed:
                problems.append("broker exited during the test with code %r" % early_rc)
            elif b.killed:
                pass  # the test ended this run with kill9()
            elif rc is None:
                problems.append("broker did not exit within 5s of SIGTERM")
            elif rc != 0:
                problems.append("broker exited with code %r after SIGTERM" % rc)
        if b.panicked():
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
