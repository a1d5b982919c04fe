#!/usr/bin/env bash
# System calls a server makes per request under the ping-pong load of bench/loadgen.
#
#   benches/syscalls-per-request.sh 'target/release/echo --threads 2 --port {port} --quiet'
#   benches/syscalls-per-request.sh 'bench/bin/tokio-echo --threads 2 --port {port}'
#
# It starts the server on a free port, drives it with `loadgen pingpong` (50 connections,
# 64 bytes; CONNECTIONS overrides the count; TLS_CA=FILE speaks TLS, trusting FILE, to a server
# started with a certificate it signed), and counts the server's system calls with perf's
# syscall tracepoints over a 4 s window, which costs far less than strace and so leaves the
# load as it is. Requests are counted as the server's sendto and writev calls (plain write is
# left out: a runtime's wake-ups write to an eventfd), so the figures are per request for a
# server that answers each message with one send, as all the peers do at 64 bytes.
# Needs perf (linux-perf) with tracepoints readable, and the loadgen and peers built
# (bench/build.sh). Run it from the repository root, as the commands above are.
set -euo pipefail

# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
start_server "$1"

tls=()
[ -z "${TLS_CA:-}" ] || tls=(--tls --tls-ca "$TLS_CA")
"$loadgen" pingpong --addr "127.0.0.1:$port" --connections "${CONNECTIONS:-50}" --size 64 \
    --duration 6 --warmup 0 "${tls[@]}" --json >"$work/load.json" &
load=$!
sleep 1 # let every connection reach its steady round trips before counting
events=raw_syscalls:sys_enter,cs
for call in epoll_ctl epoll_wait epoll_pwait epoll_pwait2 futex recvfrom sendto read write writev timerfd_settime; do
    events+=,syscalls:sys_enter_$call
done
perf stat -x, -e "$events" -p "$server" -- sleep 4 2>"$work/perf.csv"
wait "$load"

awk -F, '
    { count[$3] = $1 }
    $3 ~ /sys_enter_(sendto|writev)$/ { requests += $1 }
    END {
        printf "%d requests in the window; per request:\n", requests
        for (event in count)
            if (count[event] > 0)
                printf "  %-34s %6.3f\n", event, count[event] / requests | "sort"
    }' "$work/perf.csv"
