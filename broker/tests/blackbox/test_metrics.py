"""Operations surface: the Prometheus endpoint (--metrics-listen), parsed with the
official client library's parser; $SYS topics (--sys-interval) read with
mosquitto_sub; the alerting rules and Grafana dashboard in docs/monitoring only
name series the broker exports."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import IS_MOSQUITTO, REPO, shardmq_has_flag
from mqtt_client import V311, V5

pytestmark = [
    pytest.mark.shardmq_only,
    pytest.mark.skipif(IS_MOSQUITTO or not shardmq_has_flag("--metrics-listen"),
                       reason="needs shardmq with --metrics-listen"),
]

METRICS_RE = re.compile(r"metrics=(\S+):(\d+)")
MONITORING = os.path.join(REPO, "docs", "monitoring")


def metrics_addr(b):
    m = METRICS_RE.search(b.stdout())
    assert m, "no metrics address in the startup line\n" + b.stdout()
    return m.group(1), int(m.group(2))


def http_get(b, path):
    host, port = metrics_addr(b)
    try:
        with urllib.request.urlopen("http://%s:%d%s" % (host, port, path), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(b):
    status, text = http_get(b, "/metrics")
    assert status == 200, text
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def samples(families, name):
    return [s for f in families.values() for s in f.samples if s.name == name]


def total(families, name, **labels):
    return sum(s.value for s in samples(families, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def raw_request(b, data):
    """Sends raw bytes, returns the status line (b"" if the server closed without answering)."""
    host, port = metrics_addr(b)
    with socket.create_connection((host, port), timeout=10) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        while True:
            try:
                chunk = s.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out.split(b"\r\n", 1)[0]


def test_metrics_parse_and_count_traffic(broker, clients):
    b = broker("--metrics-listen", "127.0.0.1:0", "--node-name", "alpha", "--zone", "z1", "--region", "r1")
    sub = clients(b, "sub")
    assert sub.subscribe("m/#", qos=1) == [1]
    pub = clients(b, "pub", version=V311)
    for qos in (0, 1, 1, 2):
        pub.publish("m/x", b"payload", qos=qos)
    assert len(sub.expect(4)) == 4
    deadline = time.monotonic() + 5
    while True:
        fams, text = scrape(b)
        # Shards publish at most every 100 ms: wait for the counts rather than race them.
        if total(fams, "shardmq_messages_sent_total") >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert total(fams, "shardmq_messages_received_total", qos="0") == 1
    assert total(fams, "shardmq_messages_received_total", qos="1") == 2
    assert total(fams, "shardmq_messages_received_total", qos="2") == 1
    assert total(fams, "shardmq_messages_sent_total") == 4
    assert total(fams, "shardmq_clients_connected") == 2
    assert total(fams, "shardmq_connections_total") >= 2
    assert total(fams, "shardmq_subscriptions") == 1
    assert total(fams, "shardmq_bytes_received_total") > 0 and total(fams, "shardmq_bytes_sent_total") > 0
    # The parser names counter families without `_total`.
    assert fams["shardmq_messages_dropped"].type == "counter"
    assert fams["shardmq_connections_open"].type == "gauge"
    reasons = {s.labels["reason"] for s in samples(fams, "shardmq_messages_dropped_total")}
    assert {"qos0", "queue_full", "expired"} <= reasons, reasons
    shards = {s.labels.get("shard") for s in samples(fams, "shardmq_connections_open")}
    assert shards == {"0", "1"}, shards
    for f in fams.values():
        for s in f.samples:
            assert (s.labels["node"], s.labels["zone"], s.labels["region"]) == ("alpha", "z1", "r1"), s
    assert "shardmq_cluster_links_up" not in fams, "not clustered: no cluster series"
    assert fams["shardmq_log_flush_seconds"].type == "histogram"
    assert total(fams, "shardmq_log_bytes_written_total") == 0, "nothing durable yet: clean sessions only"
    # A retained message is stored, and its PUBACK waits for the flush (--fsync always).
    pub.publish("m/retained", b"r", qos=1, retain=True)
    deadline = time.monotonic() + 5
    while total(fams, "shardmq_log_flush_seconds_count") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        fams, text = scrape(b)
    assert total(fams, "shardmq_log_flush_seconds_count") > 0, text
    assert total(fams, "shardmq_log_bytes_written_total") > 0, text
    inf = total(fams, "shardmq_log_flush_seconds_bucket", le="+Inf")
    assert inf == total(fams, "shardmq_log_flush_seconds_count")


def test_refusals_are_counted_by_reason(broker, clients):
    b = broker("--metrics-listen", "127.0.0.1:0", "--max-connections", "1")
    clients(b, "first")
    with pytest.raises(Exception):
        clients(b, "second")
    deadline = time.monotonic() + 5
    while total(scrape(b)[0], "shardmq_connections_refused_total", reason="unavailable") < 1:
        assert time.monotonic() < deadline, scrape(b)[1]
        time.sleep(0.1)


def test_healthz_and_bad_requests(broker):
    b = broker("--metrics-listen", "127.0.0.1:0")
    assert http_get(b, "/healthz") == (200, "ok")
    assert http_get(b, "/nothing")[0] == 404
    assert raw_request(b, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n") == b"HTTP/1.1 405 Method Not Allowed"
    assert raw_request(b, b"\x00\xff\xfe garbage\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
    assert raw_request(b, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
    # A client that sends half a request and goes away does not wedge the endpoint.
    host, port = metrics_addr(b)
    s = socket.create_connection((host, port))
    s.sendall(b"GET /metr")
    s.close()
    assert http_get(b, "/healthz") == (200, "ok")


SUB = shutil.which("mosquitto_sub")


@pytest.mark.skipif(not SUB, reason="mosquitto_sub not installed")
def test_sys_topics_with_mosquitto_sub(broker, clients):
    b = broker("--sys-interval", "1")
    hp = ["-h", b.host, "-p", str(b.port)]
    out = subprocess.run([SUB] + hp + ["-t", "$SYS/broker/version", "-C", "1", "-W", "10"],
                         capture_output=True, timeout=15)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().startswith("shardmq version "), out.stdout
    pub = clients(b, "pub")
    for _ in range(3):
        pub.publish("t", b"x", qos=1)
    # Each publication after the publishes counts them (node-wide); wait for one.
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run([SUB] + hp + ["-t", "$SYS/broker/messages/received", "-C", "1", "-W", "5"],
                             capture_output=True, timeout=10)
        if out.stdout.decode().strip() == "3" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert out.stdout.decode().strip() == "3", out
    out = subprocess.run([SUB] + hp + ["-t", "$SYS/broker/uptime", "-C", "1", "-W", "5"],
                         capture_output=True, timeout=10)
    assert re.fullmatch(r"\d+ seconds\n", out.stdout.decode()), out
    out = subprocess.run([SUB] + hp + ["-t", "$SYS/broker/bytes/received", "-C", "1", "-W", "5"],
                         capture_output=True, timeout=10)
    assert int(out.stdout.decode()) > 0, out
    # `#` does not match $SYS topics (MQTT 4.7.2).
    s = clients(b, "hash")
    s.subscribe("#", qos=0)
    s.expect_none()


def test_sys_interval_zero_publishes_nothing(broker, clients):
    b = broker("--sys-interval", "0")
    s = clients(b, "s")
    s.subscribe("$SYS/#", qos=0)
    s.expect_none()


def referenced_metrics():
    rules = yaml.safe_load(open(os.path.join(MONITORING, "shardmq.rules.yml")))
    exprs = []
    assert isinstance(rules.get("groups"), list) and rules["groups"], rules
    for g in rules["groups"]:
        assert g.get("name") and isinstance(g.get("rules"), list), g
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
            assert r.get("alert") and isinstance(r.get("expr"), str), r
            exprs.append(r["expr"])
    dash = json.load(open(os.path.join(MONITORING, "grafana-dashboard.json")))
    assert dash["panels"], "the dashboard has panels"
    for p in dash["panels"]:
        exprs += [t["expr"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {n for e in exprs for n in re.findall(r"\bshardmq_[a-z0-9_]+", e)}


def test_rules_and_dashboard_name_only_exported_series(broker):
    names = referenced_metrics()
    assert "shardmq_messages_dropped_total" in names and "shardmq_cluster_links_up" in names, names
    # Clustered (a zone of one), so that the cluster series are exported too.
    b = broker("--metrics-listen", "127.0.0.1:0", "--cluster-listen", "127.0.0.1:0", "--node-name", "n1")
    fams, _ = scrape(b)
    exported = {s.name for f in fams.values() for s in f.samples}
    assert names <= exported, "not exported: %s" % sorted(names - exported)


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed")
def test_promtool_accepts_the_rules():
    out = subprocess.run(["promtool", "check", "rules", os.path.join(MONITORING, "shardmq.rules.yml")],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not shardmq_has_flag("--cluster-listen"), reason="needs shardmq with --cluster-listen")
def test_cluster_series_count_links_and_forwards(broker, clients):
    n1 = broker("--metrics-listen", "127.0.0.1:0", "--cluster-listen", "127.0.0.1:0", "--node-name", "n1",
                "--zone", "z", "--region", "r")
    m = re.search(r"cluster=(\S+:\d+)", n1.stdout())
    assert m, n1.stdout()
    n2 = broker("--metrics-listen", "127.0.0.1:0", "--cluster-listen", "127.0.0.1:0", "--node-name", "n2",
                "--zone", "z", "--region", "r", "--join", m.group(1))
    deadline = time.monotonic() + 15
    while not all(total(scrape(n)[0], "shardmq_cluster_links_up") == 1 for n in (n1, n2)):
        assert time.monotonic() < deadline, "the nodes did not link\n" + scrape(n1)[1]
        time.sleep(0.1)
    sub = clients(n2, "sub")
    assert sub.subscribe("c/#", qos=1) == [1]
    pub = clients(n1, "pub")
    for _ in range(5):
        pub.publish("c/x", b"v", qos=1)
    assert len(sub.expect(5)) == 5
    deadline = time.monotonic() + 5
    while True:
        f1, f2 = scrape(n1)[0], scrape(n2)[0]
        if total(f2, "shardmq_cluster_received_total") >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert total(f1, "shardmq_cluster_forwarded_total") >= 5, scrape(n1)[1]
    assert total(f2, "shardmq_cluster_received_total") >= 5, scrape(n2)[1]
    assert {s.labels["node"] for s in samples(f2, "shardmq_cluster_received_total")} == {"n2"}
    assert total(f1, "shardmq_cluster_dropped_total") == 0
