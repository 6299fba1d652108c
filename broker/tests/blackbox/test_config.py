"""`--config FILE` (TOML setting any flag by name; the command line wins) and `shardmq check-config`."""

import subprocess

import pytest

from conftest import IS_MOSQUITTO, SHARDMQ_BIN, shardmq_has_flag
from mqtt_client import V5

pytestmark = [
    pytest.mark.shardmq_only,
    pytest.mark.skipif(IS_MOSQUITTO or not shardmq_has_flag("--config"), reason="needs shardmq with --config"),
]


def refused_with(client):
    client.connect(check=False)
    return client.connack[0] if client.connack else None


def test_a_config_file_sets_flags_and_the_command_line_wins(broker, clients, tmp_path):
    conf = tmp_path / "shardmq.toml"
    conf.write_text('max_connections = 1\nmax-topic-levels = 3\nlog-level = "info"\n')
    b = broker("--config", str(conf))
    clients(b, "first")
    second = clients(b, "second", connect=False)
    assert refused_with(second) == 0x97, "max_connections = 1 from the file"
    b2 = broker("--config", str(conf), "--max-connections", "5")
    clients(b2, "a")
    clients(b2, "b")
    c = clients(b2, "c", version=V5)
    assert c.subscribe("a/b/c/d", qos=0) == [0x8F], "max-topic-levels = 3 from the file"


def run(*args):
    return subprocess.run([SHARDMQ_BIN] + list(args), capture_output=True, timeout=20)


def test_check_config_prints_the_settings_or_why_not(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('listen = ["127.0.0.1:1999", "127.0.0.1:2000"]\nin_memory = true\nmax-inflight = 16\n')
    p = run("check-config", str(good))
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()
    assert "--listen 127.0.0.1:1999" in out and "--listen 127.0.0.1:2000" in out
    assert "--in-memory" in out and "--max-inflight 16" in out
    for text, why in [
        ("max-conections = 5\n", "unknown setting"),
        ("in-memory = 1\n", "is a switch"),
        ("max-inflight = \"lots\"\n", "max-inflight"),
        ("max-inflight = \n", "bad.toml"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        p = run("check-config", str(bad))
        assert p.returncode == 1 and why in p.stderr.decode(), (text, p.stderr.decode())


def test_a_broker_with_a_bad_config_file_does_not_start(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("no-such-flag = 1\n")
    p = run("--listen", "127.0.0.1:0", "--in-memory", "--config", str(bad))
    assert p.returncode == 1 and "unknown setting \"no-such-flag\"" in p.stderr.decode(), p.stderr.decode()
    p = run("--listen", "127.0.0.1:0", "--in-memory", "--config", str(tmp_path / "missing.toml"))
    assert p.returncode == 1 and "missing.toml" in p.stderr.decode()


def test_check_config_loads_the_files_it_names(tmp_path):
    """A file that would stop the broker at start-up (TLS key, password file, ACL) fails the check too,
    naming the file."""
    for text, why in [
        ('tls-listen = ["127.0.0.1:0"]\ntls-cert = "{d}/missing-cert.pem"\ntls-key = "{d}/missing-key.pem"\n',
         "missing-cert.pem"),
        ('listen = ["127.0.0.1:0"]\npassword-file = "{d}/missing-passwd"\n', "missing-passwd"),
        ('listen = ["127.0.0.1:0"]\nacl-file = "{d}/missing-acl"\n', "missing-acl"),
        ('listen = ["0.0.0.0:0"]\n', "--allow-anonymous"),
    ]:
        conf = tmp_path / "files.toml"
        conf.write_text(text.format(d=tmp_path))
        p = run("check-config", str(conf))
        assert p.returncode == 1 and why in p.stderr.decode(), (text, p.stderr.decode())
