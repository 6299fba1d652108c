#!/usr/bin/env python3
"""Measures broker memory per idle MQTT connection.


Starts a broker (shardmq by default, or mosquitto with --mosquitto), opens N MQTT 3.1.1 connections from
several loopback source addresses (127.N.1.1, 127.N.2.1, ... to stay clear of ephemeral-port exhaustion), waits
for every CONNACK, then reads the broker's resident memory (VmRSS) and the kernel's TCP socket memory
(Slab in /proc/meminfo) and reports the growth per connection. Bounded: N connections, a deadline, then exit.

    scripts/idle-conns.py --bin target/release/shardmq -n 15000
    scripts/idle-conns.py --mosquitto -n 15000
"""
import argparse, os, random, re, resource, signal, socket, subprocess, sys, tempfile, time

def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x00"  # v3.1.1, clean session, keep alive 0
    body = var + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

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
    p = subprocess.Popen([args.bin, "--listen", "127.0.0.1:0", "--cores", str(args.cores),
                          "--log-level", "warn", "--in-memory"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    m = re.search(r"listening on \S+:(\d+)", line)
    if not m:
        sys.exit(f"no startup line from broker: {line!r}")
    return p, int(m.group(1))

def free_port() -> int:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/shardmq")
    ap.add_argument("--mosquitto", action="store_true")
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("-n", type=int, default=15000)
    ap.add_argument("--deadline-s", type=float, default=120)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc, port = start(args)
    deadline = time.time() + args.deadline_s
    socks = []
    try:
        # Warm up so allocator arenas and runtime buffers are counted in the baseline, not per connection.
        warm = []
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(connect_packet(f"warm-{i}")); s.recv(4); warm.append(s)
        for s in warm: s.close()
        time.sleep(0.5)
        base_rss, base_slab = rss_kib(proc.pid), slab_kib()
        t0 = time.time()
        # A fresh source network per run: earlier runs leave ports in TIME_WAIT.
        net = random.randint(1, 250)
        for i in range(args.n):
            if time.time() > deadline:
                print(f"deadline reached after {i} connections", file=sys.stderr); break
            src = f"127.{net}.{1 + i // 10000}.1"
            s = socket.socket(); s.settimeout(5); s.bind((src, 0)); s.connect(("127.0.0.1", port))
            s.sendall(connect_packet(f"idle-{i}"))
            socks.append(s)
        ok = 0
        for s in socks:
            if s.recv(4)[:1] == b"\x20": ok += 1
        elapsed = time.time() - t0
        time.sleep(1.0)
        rss, slab = rss_kib(proc.pid), slab_kib()
        n = len(socks)
        name = "mosquitto" if args.mosquitto else "shardmq"
        print(f"{name}: {ok}/{n} connected in {elapsed:.1f}s ({n/elapsed:.0f}/s)")
        print(f"{name}: broker RSS {base_rss} KiB -> {rss} KiB: {(rss-base_rss)*1024/n:.0f} B per idle connection")
        print(f"{name}: kernel slab {(slab-base_slab)*1024/n:.0f} B per connection (both loopback ends, /proc/meminfo Slab)")
    finally:
        for s in socks: s.close()
        proc.send_signal(signal.SIGTERM)
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()

if __name__ == "__main__":
    main()
