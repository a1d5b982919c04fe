#!/usr/bin/env python3
"""Restarts `echo` under a client loop and counts what the clients see.

Clients (--clients threads, each: connect, send one message, read its `GOT:` reply in full,
close) run for --seconds; meanwhile the server is replaced --restarts times, evenly spaced: a
new process is started, its listening line awaited, then the old one gets SIGTERM and is
waited for. Prints the connections made and those refused, reset, timed out or answered short.

Two ways to hand the port over:

  --route reuse-port  every process binds the port with --reuse-port (SO_REUSEPORT)
  --route inherited   this script binds the port once and passes the listening socket to each
                      process as systemd does (LISTEN_FDS=1, LISTEN_PID), as a .socket unit

Run from the repository root after `cargo build --release --bin echo`, e.g.
    bench/restart.py --route reuse-port --restarts 5 --seconds 4
With `sysctl -w net.ipv4.tcp_migrate_req=1` (as root; restore it after) the kernel moves the
connections queued on a closing SO_REUSEPORT listener to another listener of the group.
"""

import argparse
import errno
import os
import signal
import socket
import subprocess
import threading
import time

ECHO = "target/release/echo"


def start(route, port, listener, threads):
    args = [ECHO, "--threads", str(threads), "--quiet"]
    if route == "reuse-port":
        cmd = args + ["--reuse-port", "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    else:
        # sd_listen_fds: the socket as descriptor 3, LISTEN_PID the server's own pid ($$ of the
        # shell that execs it).
        os.dup2(listener.fileno(), 3, inheritable=True)
        cmd = ["sh", "-c", 'LISTEN_FDS=1 LISTEN_PID=$$ exec "$@"', "sh"] + args
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, pass_fds=(3,))
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on "):
        raise SystemExit(f"unexpected first line from echo: {line!r}")
    return proc, int(line.split()[2].rsplit(":", 1)[1])


def client_loop(addr, stop, counts, lock):
    mine = dict.fromkeys(counts, 0)
    n = 0
    while not stop.is_set():
        n += 1
        message = f"ping {threading.get_ident()} {n}".encode()
        expected = b"GOT:" + message
        try:
            with socket.create_connection(addr, timeout=5) as s:
                s.sendall(message)
                reply = b""
                while len(reply) < len(expected):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            # One write, one read on loopback: the reply comes as one chunk.
            mine["ok" if reply == expected else "short"] += 1
        except ConnectionRefusedError:
            mine["refused"] += 1
        except ConnectionResetError:
            mine["reset"] += 1
        except socket.timeout:
            mine["timeout"] += 1
        except OSError as e:
            mine["reset" if e.errno == errno.EPIPE else "other"] += 1
    with lock:
        for k, v in mine.items():
            counts[k] += v


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--route", choices=["reuse-port", "inherited"], default="reuse-port")
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    listener = None
    port = 0
    if a.route == "inherited":
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        port = listener.getsockname()[1]
    server, port = start(a.route, port, listener, a.threads)
    addr = ("127.0.0.1", port)
    counts = dict.fromkeys(["ok", "refused", "reset", "timeout", "short", "other"], 0)
    lock = threading.Lock()
    stop = threading.Event()
    clients = [threading.Thread(target=client_loop, args=(addr, stop, counts, lock)) for _ in range(a.clients)]
    for c in clients:
        c.start()
    began = time.monotonic()
    for r in range(a.restarts):
        time.sleep(a.seconds / (a.restarts + 1))  # pacing, not synchronisation
        new, _ = start(a.route, port, listener, a.threads)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
        server = new
    time.sleep(max(0.0, a.seconds - (time.monotonic() - began)))
    stop.set()
    for c in clients:
        c.join()
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)
    total = sum(counts.values())
    bad = total - counts["ok"]
    print(f"route={a.route} restarts={a.restarts} seconds={a.seconds} connections={total} "
          + " ".join(f"{k}={v}" for k, v in counts.items()) + f" failed={bad}")


if __name__ == "__main__":
    main()
