"""Authentication (--password-file, Mosquitto's format), secure-by-default start-up (--allow-anonymous)
and authorization (--acl-file, Mosquitto's ACL format), plus `shardmq passwd`. Users are made with
Debian's mosquitto_passwd where the point is that its files work unchanged."""

import getpass
import os
import shutil
import signal
import subprocess
import time
import types

import pytest

import mqtt_raw as raw
from conftest import SHARDMQ_BIN, MOSQUITTO_BIN, free_port, start_fails, wait_log

pytestmark = pytest.mark.shardmq_only

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
PUB = shutil.which("mosquitto_pub")
needs_passwd = pytest.mark.skipif(not MOSQUITTO_PASSWD, reason="mosquitto_passwd not installed")

BAD_CREDENTIALS = {5: 0x86, 4: 4}
NOT_AUTHORIZED = {5: 0x87, 4: 5}
SUB_REFUSED = {5: 0x87, 4: 0x80}
VERSIONS = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


def passwd_file(tmp_path, users):
    path = str(tmp_path / "passwd")
    for user, pw in users.items():
        cmd = [MOSQUITTO_PASSWD, "-b", path, user, pw]
        if not os.path.exists(path):
            cmd.insert(1, "-c")
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)
    return path


def connack(clients, b, version, **kw):
    c = clients.raw(b, version)
    c.send(raw.connect(version=version, **kw))
    return c, c.expect(raw.CONNACK).reason


def login(clients, b, version, client_id, user=None, pw=None):
    c, reason = connack(clients, b, version, client_id=client_id, username=user,
                        password=pw.encode() if pw is not None else None)
    assert reason == 0, "CONNACK 0x%02x for %s" % (reason, user)
    return c


@needs_passwd
@VERSIONS
def test_password_file_from_mosquitto_passwd(broker, clients, tmp_path, version):
    pf = passwd_file(tmp_path, {"alice": "secret", "bob": "hunter2"})
    b = broker("--password-file", pf, "--in-memory")
    login(clients, b, version, "a", "alice", "secret")
    login(clients, b, version, "b", "bob", "hunter2")
    for user, pw in [("alice", "wrong"), ("alice", "Secret"), ("carol", "secret"), ("alice", None),
                     ("alice", "")]:
        _, reason = connack(clients, b, version, client_id="x", username=user,
                            password=pw.encode() if pw is not None else None)
        assert reason == BAD_CREDENTIALS[version], (user, pw, reason)
    # No user name: anonymous, refused without --allow-anonymous.
    _, reason = connack(clients, b, version, client_id="anon")
    assert reason == NOT_AUTHORIZED[version]


@needs_passwd
def test_allow_anonymous_with_a_password_file(broker, clients, tmp_path):
    pf = passwd_file(tmp_path, {"alice": "secret"})
    b = broker("--password-file", pf, "--allow-anonymous", "--in-memory")
    login(clients, b, 5, "anon")
    login(clients, b, 5, "a", "alice", "secret")
    _, reason = connack(clients, b, 5, client_id="x", username="alice", password=b"nope")
    assert reason == 0x86


@needs_passwd
def test_v311_password_without_user_name_is_a_protocol_error(broker, clients, tmp_path):
    pf = passwd_file(tmp_path, {"alice": "secret"})
    b = broker("--password-file", pf, "--allow-anonymous", "--in-memory")
    c = clients.raw(b, 4)
    # Password flag without the user name flag (3.1.1 §3.1.2.9): closed without a CONNACK.
    c.send(raw.connect(version=4, client_id="p", password=b"secret", flags_override=0x42))
    assert c.wait_closed() == []


def test_non_loopback_listener_needs_a_choice(broker, clients, tmp_path):
    err = start_fails(tmp_path, "--listen", "0.0.0.0:0")
    assert "--password-file" in err and "--allow-anonymous" in err, err
    err = start_fails(tmp_path, "--listen", "127.0.0.1:0", "--listen", "0.0.0.0:0")
    assert "0.0.0.0" in err, err
    # Either choice starts it.
    b = broker("--listen", "0.0.0.0:0", "--allow-anonymous", "--in-memory")
    # Two listeners: the startup line names both, and the last port is the wildcard one.
    login(clients, types.SimpleNamespace(host="127.0.0.1", port=b.port), 5, "anon")


@pytest.mark.parametrize("text,line", [
    ("alice:$7$101$AAAA$AAAA\n", 1),
    ("# users\n\nbob:plaintext\n", 3),
    ("nocolon\n", 1),
])
def test_malformed_password_file_refuses_the_start(tmp_path, text, line):
    pf = tmp_path / "badpw"
    pf.write_text(text)
    err = start_fails(tmp_path, "--listen", "127.0.0.1:0", "--password-file", pf)
    assert "%s:%d:" % (pf, line) in err, err


@pytest.mark.parametrize("text,line", [
    ("topic read a/#\nuser\n", 2),
    ("user alice\n# c\nfrobnicate x\n", 3),
    ("topic read a/#/b\n", 1),
])
def test_malformed_acl_file_refuses_the_start(tmp_path, text, line):
    acl = tmp_path / "badacl"
    acl.write_text(text)
    err = start_fails(tmp_path, "--listen", "127.0.0.1:0", "--acl-file", acl)
    assert "%s:%d:" % (acl, line) in err, err


def test_missing_files_refuse_the_start(tmp_path):
    err = start_fails(tmp_path, "--listen", "127.0.0.1:0", "--password-file", tmp_path / "nope")
    assert "nope" in err, err


ACL = """\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic read shared/#
topic deny shared/secret

user bob
topic write shared/#
topic write alice/inbox
topic read alice/notes
pattern readwrite devices/%c/#
pattern read users/%u/#
"""


@pytest.fixture
def secured(broker, tmp_path):
    if not MOSQUITTO_PASSWD:
        pytest.skip("mosquitto_passwd not installed")
    pf = passwd_file(tmp_path, {"alice": "a-pw", "bob": "b-pw"})
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    return broker("--password-file", pf, "--acl-file", acl, "--allow-anonymous", "--in-memory")


def sub(c, filters, version, qos=1):
    pid = c.next_pid()
    opts = qos if version == 4 else raw.sub_options(qos)
    c.send(raw.subscribe(pid, [(f, opts) for f in filters], version))
    return c.expect(raw.SUBACK).codes


def pub(c, topic, payload, version, qos=1, retain=False):
    pid = c.next_pid() if qos else None
    c.send(raw.publish(topic, payload, qos, retain, pid=pid, version=version))
    if qos == 1:
        return c.expect(raw.PUBACK).reason
    if qos == 2:
        return c.expect(raw.PUBREC).reason
    return None


def payloads(c, duration=0.4):
    return sorted((p.topic, p.payload) for p in c.recv_all(duration) if p.type == raw.PUBLISH)


@VERSIONS
def test_acl_subscribe(secured, clients, version):
    alice = login(clients, secured, version, "a1", "alice", "a-pw")
    granted = 1
    assert sub(alice, ["alice/#", "bob/#", "shared/+", "#", "users/alice/x", "users/bob/x"], version) == [
        granted, SUB_REFUSED[version], granted, SUB_REFUSED[version], granted, SUB_REFUSED[version]]
    # A filter covered by a deny rule is refused; one that overlaps it is granted (delivery filters).
    assert sub(alice, ["shared/secret", "shared/#"], version) == [SUB_REFUSED[version], granted]
    anon = login(clients, secured, version, "anon1")
    assert sub(anon, ["public/#", "alice/#"], version) == [granted, SUB_REFUSED[version]]


def test_acl_publish_denied_v5(secured, clients):
    alice = login(clients, secured, 5, "a2", "alice", "a-pw")
    assert sub(alice, ["alice/#"], 5) == [1]
    bob = login(clients, secured, 5, "b2", "bob", "b-pw")
    assert pub(bob, "alice/x", b"no", 5, qos=1) == 0x87
    assert pub(bob, "alice/x", b"no", 5, qos=2) == 0x87
    pub(bob, "alice/x", b"no", 5, qos=0)
    assert pub(bob, "alice/inbox", b"yes", 5, qos=1) == 0
    assert payloads(alice) == [("alice/inbox", b"yes")]
    # The connection is still usable after a refusal.
    assert pub(bob, "shared/a", b"ok", 5, qos=1) == 0


def test_acl_publish_dropped_v311(secured, clients):
    alice = login(clients, secured, 4, "a3", "alice", "a-pw")
    assert sub(alice, ["alice/#"], 4) == [1]
    bob = login(clients, secured, 4, "b3", "bob", "b-pw")
    # 3.1.1 has no way to say no: acknowledged and dropped, as Mosquitto does.
    assert pub(bob, "alice/x", b"no", 4, qos=1) == 0
    assert pub(bob, "alice/y", b"no", 4, qos=2) == 0
    p = bob.next_pid()
    bob.send(raw.ack(raw.PUBREL, p - 1, 4))
    bob.expect(raw.PUBCOMP)
    pub(bob, "alice/z", b"no", 4, qos=0)
    assert pub(bob, "alice/inbox", b"yes", 4, qos=1) == 0
    assert payloads(alice) == [("alice/inbox", b"yes")]


@VERSIONS
def test_acl_patterns(secured, clients, version):
    bob = login(clients, secured, version, "dev1", "bob", "b-pw")
    assert sub(bob, ["devices/dev1/#", "devices/dev2/#", "users/bob/#", "users/alice/#"], version) == [
        1, SUB_REFUSED[version], 1, SUB_REFUSED[version]]
    assert pub(bob, "devices/dev2/up", b"theirs", version) == (0x87 if version == 5 else 0)
    # QoS 0: its own copy comes back, with no acknowledgement to wait for first.
    pub(bob, "devices/dev1/up", b"mine", version, qos=0)
    assert payloads(bob) == [("devices/dev1/up", b"mine")]


@VERSIONS
def test_acl_filters_retained_and_live_deliveries(secured, clients, version):
    bob = login(clients, secured, version, "b4", "bob", "b-pw")
    for t in ["shared/a", "shared/secret"]:
        assert pub(bob, t, t.encode(), version, retain=True) == 0
    alice = login(clients, secured, version, "a4", "alice", "a-pw")
    assert sub(alice, ["shared/#"], version) == [1]
    assert payloads(alice) == [("shared/a", b"shared/a")], "retained shared/secret delivered to a non-reader"
    for t in ["shared/b", "shared/secret"]:
        pub(bob, t, b"live", version)
    assert payloads(alice) == [("shared/b", b"live")]


def test_shardmq_passwd_files_work_with_mosquitto(broker, clients, tmp_path):
    pf = str(tmp_path / "pw")
    subprocess.run([SHARDMQ_BIN, "passwd", pf, "carol", "-b", "c-pw"], check=True, timeout=10)
    # Not a terminal: the password is the first line of standard input.
    subprocess.run([SHARDMQ_BIN, "passwd", pf, "dave"], input=b"d-pw\n", check=True, timeout=10)
    subprocess.run([SHARDMQ_BIN, "passwd", pf, "carol", "-b", "c-pw2"], check=True, timeout=10)
    lines = open(pf).read().splitlines()
    assert [l.split(":")[0] for l in lines] == ["carol", "dave"]
    assert all(l.split(":", 1)[1].startswith("$7$101$") for l in lines)
    assert oct(os.stat(pf).st_mode & 0o777) == "0o600"
    b = broker("--password-file", pf, "--in-memory")
    login(clients, b, 5, "c", "carol", "c-pw2")
    login(clients, b, 4, "d", "dave", "d-pw")
    assert connack(clients, b, 5, client_id="c", username="carol", password=b"c-pw")[1] == 0x86
    if not (os.path.exists(MOSQUITTO_BIN) and PUB):
        pytest.skip("mosquitto not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # `user`: mosquitto started as root would otherwise switch to "mosquitto", which cannot read a 0600
    # file of ours (ignored when not root).
    conf.write_text("listener %d 127.0.0.1\nallow_anonymous false\npassword_file %s\npersistence false\n"
                    "user %s\n" % (port, pf, getpass.getuser()))
    m = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        def mosq_pub(user, pw):
            for _ in range(50):
                p = subprocess.run([PUB, "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", pw,
                                    "-t", "t", "-m", "x"], capture_output=True, timeout=10)
                if p.returncode == 0 or b"not authori" in p.stderr.lower():
                    return p.returncode
                time.sleep(0.1)  # not listening yet
            return p.returncode
        assert mosq_pub("dave", "d-pw") == 0
        assert mosq_pub("carol", "c-pw2") == 0
        assert mosq_pub("carol", "c-pw") != 0
    finally:
        m.terminate()
        m.wait(5)


@needs_passwd
def test_sighup_reloads_the_password_file_and_acl_without_dropping_connections(broker, clients, tmp_path):
    path = passwd_file(tmp_path, {"u": "old-pw"})
    acl = tmp_path / "acl"
    acl.write_text("user u\ntopic readwrite t/#\n")
    b = broker("--password-file", path, "--acl-file", str(acl))
    listener = clients(b, "listener", version=5, username="u", password="old-pw")
    assert listener.subscribe("t/#", qos=1) == [1]
    # The operator changes u's password and rights, then asks for a reload.
    subprocess.run([MOSQUITTO_PASSWD, "-b", path, "u", "new-pw"], check=True, capture_output=True, timeout=10)
    acl.write_text("user u\ntopic readwrite other/#\n")
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "password file and ACL reloaded")
    _, reason = connack(clients, b, 5, client_id="late-old", username="u", password=b"old-pw")
    assert reason == 0x86, "the old password no longer works"
    pub = clients(b, "pub", version=5, username="u", password="new-pw")
    pub.publish("t/1", b"x", qos=1)
    pub.publish("other/1", b"y", qos=1)
    listener.expect_none(0.5)
    assert not listener.disconnected.is_set(), "connections stay across a reload"
    # A file that does not parse keeps the previous version in force.
    acl.write_text("frobnicate x\n")
    b.proc.send_signal(signal.SIGHUP)
    wait_log(b, "reload refused")
    assert pub.publish("other/2", b"z", qos=1) == 0
    _, reason = connack(clients, b, 5, client_id="late-new", username="u", password=b"new-pw")
    assert reason == 0


@needs_passwd
@VERSIONS
def test_too_many_failed_logins_from_one_address_are_refused_for_a_while(broker, clients, tmp_path, version):
    path = passwd_file(tmp_path, {"u": "right"})
    b = broker("--password-file", path)
    # The same client id: every attempt is checked by the same shard (the one that owns it).
    for i in range(10):
        _, reason = connack(clients, b, version, client_id="guess", username="u", password=b"wrong-%d" % i)
        assert reason == BAD_CREDENTIALS[version], (i, reason)
    # Banned now, even with the right password (MQTT 5 0x8A Banned, 3.1.1 5 Not authorized).
    _, reason = connack(clients, b, version, client_id="guess", username="u", password=b"right")
    assert reason == {5: 0x8A, 4: 5}[version]
    assert "too many failed logins" in b.stderr()
