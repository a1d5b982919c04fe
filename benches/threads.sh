#!/usr/bin/env bash
# Where a server's CPU and context switches go, thread by thread, under the ping-pong load.
#
#   benches/threads.sh 'target/release/echo --threads 2 --port {port} --quiet'
#   BUSY=1 benches/threads.sh 'bench/bin/tokio-echo --threads 2 --port {port}'
#
# It starts the server on a free port in a session of its own (as bench/run.sh does), drives it
# with `loadgen pingpong` (50 connections, 64 bytes) and reads every thread's CPU time and
# context switches from /proc at the start and the end of loadgen's 4 s measured window. Per
# request and thread it prints CPU µs, voluntary switches (the thread waited: futex, epoll) and
# involuntary ones (it was preempted while it could still run). With perf installed it then
# records the scheduler for 0.5 s and counts, for each thread of the server, which tasks took
# its core while it could still run. BUSY=N keeps N shell busy loops running meanwhile, as
# `bench/run.sh --busy N` does. Needs the loadgen built (bench/build.sh) and python3; run it
# from the repository root.
set -euo pipefail

# shellcheck source=benches/common.sh
source "$(dirname "$0")/common.sh"
for ((b = 0; b < ${BUSY:-0}; b++)); do
    sh -c 'while :; do :; done' &
    busy+=($!)
done
start_server "$1" setsid

# One snapshot: a line per thread with its id, name, CPU ticks and both switch counts.
snapshot() {
    for task in /proc/"$server"/task/*; do
        local stat name
        stat=$(cat "$task/stat" 2>/dev/null) || continue
        name=${stat#*(}
        name=${name%)*}
        set -- ${stat##*) }
        printf '%s\t%s\t%s\t%s\t%s\n' "${task##*/}" "${name// /_}" "$((${12} + ${13}))" \
            "$(awk '/^voluntary_ctxt/ {print $2}' "$task/status")" \
            "$(awk '/^nonvoluntary_ctxt/ {print $2}' "$task/status")"
    done
}

"$loadgen" pingpong --addr "127.0.0.1:$port" --connections 50 --size 64 \
    --duration 4 --warmup 1 --json >"$work/load.json" &
load=$!
sleep 1
snapshot >"$work/before"
sleep 4
snapshot >"$work/after"
wait "$load"

python3 - "$work" "$(getconf CLK_TCK)" <<'PY'
import json, sys
work, hz = sys.argv[1], int(sys.argv[2])
load = json.load(open(f'{work}/load.json'))
requests = load['requests']
def rows(name):
    return {l.split('\t')[0]: l.rstrip('\n').split('\t') for l in open(f'{work}/{name}')}
before, after = rows('before'), rows('after')
print(f"{load['req_per_s']:.0f} req/s; per request and thread:")
print(f"  {'thread':<18} {'CPU us':>8} {'voluntary':>10} {'involuntary':>12}")
for tid, (_, name, cpu, vol, invol) in sorted(after.items(), key=lambda kv: kv[1][1]):
    if tid not in before:
        continue
    b = before[tid]
    cpu_us = (int(cpu) - int(b[2])) / hz * 1e6 / requests
    print(f"  {name:<18} {cpu_us:8.2f} {(int(vol) - int(b[3])) / requests:10.3f}"
          f" {(int(invol) - int(b[4])) / requests:12.3f}")
PY

if command -v perf >/dev/null; then
    "$loadgen" pingpong --addr "127.0.0.1:$port" --connections 50 --size 64 \
        --duration 2 --warmup 0 >/dev/null &
    load=$!
    sleep 0.5
    if perf sched record -a -o "$work/sched.data" -- sleep 0.5 >/dev/null 2>&1; then
        echo "preempted while runnable, in 0.5 s (thread <- the task that took its core):"
        perf script -i "$work/sched.data" -F tid,event,trace 2>/dev/null | python3 -c '
import collections, re, sys
threads = set(sys.argv[1:])
taken = collections.Counter()
for line in sys.stdin:
    m = re.search(r"prev_comm=(.+?) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.+?) next_pid", line)
    if m and m.group(2) in threads and m.group(3).startswith("R"):
        taken[(m.group(1), m.group(4))] += 1
for (prev, next_), n in taken.most_common(8):
    print(f"  {prev} <- {next_}: {n}")
' $(ls /proc/"$server"/task)
    else
        echo "(perf sched record failed: is perf allowed to trace the scheduler here?)"
    fi
    wait "$load"
fi
