#!/usr/bin/env python3
"""Replaces the backends behind a real HAProxy one by one under load; counts what clients see.

HAProxy on 127.0.0.1 in front of two `echo --proxy-protocol --metrics ... --drain-delay D`
backends, each checked with `GET /readyz` on its metrics port every 200 ms (`fall 1 rise 2`),
with `retries 0` and no `option redispatch`, so that HAProxy hides no failed connection. While
clients run through it (--clients threads of connect, one round trip, close; --long threads of
long-lived connections that stream 1 KiB round trips for --long-seconds, close, and start
again), each backend in turn gets SIGTERM, waits out its delay, drains, exits, and a new
process is started on its ports; the next replacement waits until HAProxy has it UP again.
HAProxy keeps running throughout. This is done --rounds times (two replacements a round) for
each drain delay in --delays, and one line is printed per delay:

    drain-delay=2 replacements=6 connections=... refused=0 reset=0 short=0 timeout=0 ...
        long-lived ok=... cut=...

Every client connects from an address of its own (127.0.0.2, 127.0.0.3...), as
tests/rolling.rs does; that test asserts the zero-error result for --drain-delay 2.

Run from the repository root after `cargo build --release --bin echo`, with haproxy installed
(`apt-get install haproxy`), e.g.
    bench/rolling.py --delays 2,0 --rounds 3
"""

import argparse
import errno
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time

ECHO = "target/release/echo"
SHUTDOWN_TIMEOUT = 5


def pick_port():
    """A free port below the ephemeral range: a backend is restarted on its ports while
    thousands of connections come and go, and one of them could take an ephemeral port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            floor = int(f.read().split()[0])
    except OSError:
        floor = 32768
    for _ in range(100):
        port = random.randrange(10000, floor)
        try:
            with socket.create_server(("127.0.0.1", port)):
                return port
        except OSError:
            continue
    raise SystemExit("no free port")


def start_backend(port, metrics, delay, patience=20.0):
    """echo on fixed ports; retries while a port is in use (up to `patience` seconds), None if
    it still is."""
    deadline = time.monotonic() + patience
    while True:
        proc = subprocess.Popen(
            [ECHO, "--quiet", "--proxy-protocol", "--threads", "1", "--port", str(port),
             "--metrics", f"127.0.0.1:{metrics}", "--drain-delay", str(delay),
             "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stdout.readline().decode()
        if line.startswith("listening on "):
            proc.stdout.readline()  # the metrics line
            return proc
        err = proc.stderr.read().decode()
        proc.wait()
        if "Address already in use" not in err:
            raise SystemExit(f"echo did not start: {err}")
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def readyz(metrics):
    try:
        with socket.create_connection(("127.0.0.1", metrics), timeout=2) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        return int(answer[9:12])
    except (OSError, ValueError):
        return None


class Haproxy:
    def __init__(self, directory, backends):
        self.stats = os.path.join(directory, "haproxy.sock")
        for attempt in range(20):
            self.port = pick_port()
            config = os.path.join(directory, "haproxy.cfg")
            with open(config, "w") as f:
                f.write(self.config(backends))
            self.log = open(os.path.join(directory, f"haproxy-{attempt}.log"), "w+")
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", config], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self.log)
            deadline = time.monotonic() + 20
            while self.proc.poll() is None and self.show_stat() is None:
                if time.monotonic() > deadline:
                    raise SystemExit("haproxy neither serves nor exits")
                time.sleep(0.05)
            if self.proc.poll() is None:
                return
        raise SystemExit("haproxy found no free port")

    def config(self, backends):
        servers = "".join(
            f"    server echo{n} 127.0.0.1:{port} send-proxy-v2 check port {metrics} "
            "inter 200ms fall 1 rise 2\n"
            for n, (port, metrics) in enumerate(backends))
        return f"""global
    maxconn 4000
    stats socket {self.stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s
    timeout check 1s
    retries 0
frontend front
    bind 127.0.0.1:{self.port}
    default_backend echoes
backend echoes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
{servers}"""

    def show_stat(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(self.stats)
                s.sendall(b"show stat\n")
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
        except OSError:
            return None
        text = answer.decode()
        return text if text.startswith("# pxname") else None

    def status(self, n):
        lines = (self.show_stat() or "").splitlines()
        if not lines:
            return None
        header = lines[0][2:].split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "echoes" and row.get("svname") == f"echo{n}":
                return row["status"]
        return None

    def wait_status(self, n, wanted, patience=20.0):
        deadline = time.monotonic() + patience
        while self.status(n) != wanted:
            if time.monotonic() > deadline:
                raise SystemExit(f"echo{n} never {wanted} in haproxy")
            time.sleep(0.01)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


def classify(counts, e):
    if isinstance(e, ConnectionRefusedError):
        counts["refused"] += 1
    elif isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        counts["reset"] += 1
    elif isinstance(e, EOFError):
        counts["short"] += 1
    elif isinstance(e, socket.timeout):
        counts["timeout"] += 1
    elif isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE):
        counts["reset"] += 1
    else:
        counts["other"] += 1


def round_trip(s, message):
    s.sendall(message)
    expected = b"GOT:" + message
    reply = b""
    while len(reply) < len(expected):
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError
        reply += chunk
    # Loopback, one write, one read of well under 64 KiB: one `GOT:` chunk comes back.
    if reply != expected:
        raise EOFError


def short_client(source, front, stop, counts, lock, limit):
    mine = dict.fromkeys(counts, 0)
    for n in range(limit):
        if stop.is_set():
            break
        mine["connections"] += 1
        try:
            with socket.create_connection(front, timeout=5, source_address=(source, 0)) as s:
                round_trip(s, f"ping {source} {n}\n".encode())
            mine["ok"] += 1
        except (OSError, EOFError) as e:
            classify(mine, e)
        time.sleep(0.001)  # keeps this address's TIME_WAIT ports well under the ~28,000 it has
    with lock:
        for k, v in mine.items():
            counts[k] += v


def long_client(source, front, stop, counts, lock, seconds, delay):
    mine = dict.fromkeys(counts, 0)
    time.sleep(delay)  # staggered: some session is open whenever a stop begins
    while not stop.is_set():
        mine["connections"] += 1
        began = time.monotonic()
        sent = 0
        try:
            with socket.create_connection(front, timeout=5, source_address=(source, 0)) as s:
                while time.monotonic() - began < seconds:
                    round_trip(s, bytes(random.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(1024)))
                    sent += 1024
                    time.sleep(0.02)
            mine["long_ok"] += 1
            mine["long_bytes"] += sent
        except (OSError, EOFError) as e:
            mine["long_cut"] += 1
            classify(mine, e)
    with lock:
        for k, v in mine.items():
            counts[k] += v


def run(a, delay):
    with tempfile.TemporaryDirectory(prefix="rolling-") as directory:
        ports, procs = [], []
        for _ in range(2):
            for _ in range(20):
                port, metrics = pick_port(), pick_port()
                proc = start_backend(port, metrics, delay, patience=0)
                if proc:
                    break
            else:
                raise SystemExit("no free ports for a backend")
            ports.append((port, metrics))
            procs.append(proc)
        haproxy = Haproxy(directory, ports)
        try:
            for n in range(2):
                haproxy.wait_status(n, "UP")
            front = ("127.0.0.1", haproxy.port)
            keys = ["connections", "ok", "refused", "reset", "short", "timeout", "other",
                    "long_ok", "long_cut", "long_bytes"]
            counts = dict.fromkeys(keys, 0)
            lock, stop = threading.Lock(), threading.Event()
            threads = [threading.Thread(target=short_client,
                                        args=(f"127.0.0.{2 + i}", front, stop, counts, lock, 20000))
                       for i in range(a.clients)]
            threads += [threading.Thread(target=long_client,
                                         args=(f"127.0.0.{2 + a.clients + i}", front, stop, counts,
                                               lock, a.long_seconds, a.long_seconds * i / a.long))
                        for i in range(a.long)]
            for t in threads:
                t.start()
            began = time.monotonic()
            time.sleep(1)
            out, exits = [], []
            for _ in range(a.rounds):
                for n, (port, metrics) in enumerate(ports):
                    stopped = time.monotonic()
                    procs[n].send_signal(signal.SIGTERM)
                    haproxy.wait_status(n, "DOWN")
                    out.append(time.monotonic() - stopped)
                    code = procs[n].wait(timeout=DRAIN_PATIENCE + delay)
                    exits.append(time.monotonic() - stopped)
                    if code != 0:
                        raise SystemExit(f"echo{n} exited {code}")
                    procs[n] = start_backend(port, metrics, delay)
                    if procs[n] is None:
                        raise SystemExit(f"ports {port}, {metrics} stayed in use")
                    while readyz(metrics) != 200:
                        time.sleep(0.01)
                    haproxy.wait_status(n, "UP")
            time.sleep(1)
            stop.set()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - began
        finally:
            for proc in procs:
                if proc and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            haproxy.stop()
    print(f"drain-delay={delay} replacements={len(out)} seconds={elapsed:.1f} "
          f"connections={counts['connections']} ok={counts['ok']} refused={counts['refused']} "
          f"reset={counts['reset']} short={counts['short']} timeout={counts['timeout']} "
          f"other={counts['other']} long-lived ok={counts['long_ok']} cut={counts['long_cut']} "
          f"bytes={counts['long_bytes']} "
          f"out-of-rotation-max={max(out):.2f}s exit-max={max(exits):.2f}s", flush=True)


DRAIN_PATIENCE = SHUTDOWN_TIMEOUT + 10


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--delays", default="2,0", help="drain delays to run, in seconds")
    p.add_argument("--rounds", type=int, default=3, help="each round replaces both backends")
    p.add_argument("--clients", type=int, default=4, help="short-lived client threads")
    p.add_argument("--long", type=int, default=4, help="long-lived client threads")
    p.add_argument("--long-seconds", type=float, default=3.0,
                   help="how long each long-lived connection streams (under delay + 5 s)")
    a = p.parse_args()
    for delay in a.delays.split(","):
        run(a, int(delay))


if __name__ == "__main__":
    main()
