#!/usr/bin/env python3
"""Measures broker memory per idle MQTT connection.


Starts a broker (shardmq by default, or mosquitto with --mosquitto), opens N MQTT 3.1.1 connections from
several loopback source addresses (127.N.1.1, 127.N.2.1, ... to stay clear of ephemeral-port exhaustion), waits
for every CONNACK, then reads the broker's resident memory (VmRSS, and RssAnon separately) and the kernel's
TCP socket memory (Slab in /proc/meminfo) and reports the growth per connection. It measures at several counts
in one run (by default n/3, 2n/3 and n) and reports the slope between the first and the last, which leaves out
fixed costs (allocator arenas, receive-buffer rings) that a single base-to-n figure spreads over the connections.
With --subscribe every connection also holds one subscription of its own (idle/<i>/+, QoS 1). Bounded: N
connections, a deadline, then exit.

    scripts/idle-conns.py --bin target/release/shardmq -n 15000
    scripts/idle-conns.py --mosquitto -n 15000
    scripts/idle-conns.py --bin target/release/shardmq --cores 2 --runtime epoll --subscribe --json out.json
"""
import argparse, os, random, re, resource, signal, socket, subprocess, sys, tempfile, time

def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x00"  # v3.1.1, clean session, keep alive 0
    body = var + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body

def slab_kib() -> int:
    # Idle sockets queue no data, so sockstat's buffer pages stay flat; their kernel cost is slab objects
    # (socket, inode, dentry, epoll/io_uring entries) on both ends of the loopback connection.
    with open("/proc/meminfo") as f:
        return int(re.search(r"Slab:\s+(\d+)", f.read()).group(1))

def start(args):
    if args.mosquitto:
        port = free_port()
        conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
        conf.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n")
        conf.close()
        p = subprocess.Popen(["mosquitto", "-c", conf.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return p, port
    cmd = [args.bin, "--listen", "127.0.0.1:0", "--cores", str(args.cores), "--log-level", "warn", "--in-memory"]
    if args.runtime:
        cmd += ["--runtime", args.runtime]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on \S+:(\d+)", line)
    if not m:
        sys.exit(f"no startup line from broker: {line!r}")
    return p, int(m.group(1))

def free_port() -> int:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

def subscribe_packet(pid: int, topic_filter: str) -> bytes:
    f = topic_filter.encode()
    body = pid.to_bytes(2, "big") + len(f).to_bytes(2, "big") + f + b"\x01"  # QoS 1
    return bytes([0x82, len(body)]) + body

def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf

def mem_kib(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        st = f.read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", st).group(1)) for k in ("VmRSS", "RssAnon", "RssFile")}

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/shardmq")
    ap.add_argument("--mosquitto", action="store_true")
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--runtime", default=None, help="shardmq --runtime (epoll, io_uring); default: the broker's")
    ap.add_argument("-n", type=int, default=15000)
    ap.add_argument("--points", default=None,
                    help="comma-separated connection counts to measure at (default: n/3, 2n/3, n); the slope is "
                         "taken between the first and the last")
    ap.add_argument("--subscribe", action="store_true",
                    help="every connection subscribes to its own filter idle/<i>/+ at QoS 1 (waits for each SUBACK)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--deadline-s", type=float, default=120)
    args = ap.parse_args()
    points = sorted({int(p) for p in args.points.split(",")}) if args.points else \
        sorted({max(1, args.n // 3), max(1, 2 * args.n // 3), args.n})
    n_total = points[-1]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc, port = start(args)
    deadline = time.time() + args.deadline_s
    name = "mosquitto" if args.mosquitto else "shardmq" + (f"/{args.runtime}" if args.runtime else "")
    if args.subscribe:
        name += "+sub"
    socks = []
    try:
        # Warm up so allocator arenas and runtime buffers are counted in the baseline, not per connection.
        warm = []
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(connect_packet(f"warm-{i}")); s.recv(4); warm.append(s)
            if args.subscribe:
                s.sendall(subscribe_packet(1, f"warm/{i}/+")); recv_exact(s, 5)
        for s in warm: s.close()
        time.sleep(0.5)
        base, base_slab = mem_kib(proc.pid), slab_kib()
        t0 = time.time()
        # A fresh source network per run: earlier runs leave ports in TIME_WAIT.
        net = random.randint(1, 250)
        ok = subs = 0
        results = []
        for target in points:
            batch = []
            while len(socks) < target:
                i = len(socks)
                if time.time() > deadline:
                    sys.exit(f"deadline reached after {i} connections")
                src = f"127.{net}.{1 + i // 10000}.1"
                s = socket.socket(); s.settimeout(5); s.bind((src, 0)); s.connect(("127.0.0.1", port))
                s.sendall(connect_packet(f"idle-{i}"))
                socks.append(s); batch.append((i, s))
            for i, s in batch:
                if recv_exact(s, 4)[:1] == b"\x20": ok += 1
            if args.subscribe:
                for i, s in batch:
                    s.sendall(subscribe_packet(1 + i % 65535, f"idle/{i}/+"))
                for i, s in batch:
                    ack = recv_exact(s, 5)
                    if ack[:1] == b"\x90" and ack[4:5] == b"\x01": subs += 1
            time.sleep(1.0)
            m, slab = mem_kib(proc.pid), slab_kib()
            results.append({"conns": len(socks), "connected": ok, "subscribed": subs,
                            "rss_kib": m["VmRSS"], "rss_anon_kib": m["RssAnon"], "rss_file_kib": m["RssFile"],
                            "slab_kib": slab})
            print(f"{name}: {len(socks)} conns ({ok} CONNACK, {subs} SUBACK): RSS {m['VmRSS']} KiB "
                  f"(anon {m['RssAnon']}, file {m['RssFile']}), slab {slab} KiB", flush=True)
        elapsed = time.time() - t0
        n = len(socks)
        last = results[-1]
        print(f"{name}: {ok}/{n} connected in {elapsed:.1f}s ({n/elapsed:.0f}/s)")
        print(f"{name}: broker RSS {base['VmRSS']} KiB -> {last['rss_kib']} KiB: "
              f"{(last['rss_kib']-base['VmRSS'])*1024/n:.0f} B per idle connection")
        print(f"{name}: kernel slab {(last['slab_kib']-base_slab)*1024/n:.0f} B per connection "
              f"(both loopback ends, /proc/meminfo Slab)")
        summary = {"broker": name, "cores": args.cores, "subscribe": args.subscribe, "base": base,
                   "points": results, "total_rss_kib": last["rss_kib"]}
        if len(results) > 1:
            first = results[0]
            dn = last["conns"] - first["conns"]
            summary["slope_rss_b"] = (last["rss_kib"] - first["rss_kib"]) * 1024 / dn
            summary["slope_anon_b"] = (last["rss_anon_kib"] - first["rss_anon_kib"]) * 1024 / dn
            print(f"{name}: slope {first['conns']}->{last['conns']}: RSS {summary['slope_rss_b']:.0f} B/conn, "
                  f"RssAnon {summary['slope_anon_b']:.0f} B/conn; total RSS at {last['conns']}: "
                  f"{last['rss_kib']} KiB")
        if args.json:
            import json
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    finally:
        for s in socks: s.close()
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()

if __name__ == "__main__":
    main()
