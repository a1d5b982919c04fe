#!/usr/bin/env bash
# Measures Redis-protocol servers side by side with redis-benchmark: examples/kv against
# redis-server. Figures and how to read them: docs/performance.md.
#
#   bench/redis.sh [options] [NAME='server command with {port}' ...]
#
# Without servers named, compares Debian's redis-server (in memory only: --save '' and
# --appendonly no) with examples/kv's release build on 2 threads. Each round starts every server
# in turn (the same order each round) on a free port, runs SET and GET without and with
# pipelining against it, one redis-benchmark run each, and stops it. Prints, per server and
# test, the median ops/s over the rounds, the server's CPU time per operation (utime + stime
# from /proc/PID/stat around each run) and the ratio to the first server: the median of the
# per-round ratios, so that a round slowed down by a neighbour counts once, for everyone.
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: bench/redis.sh [options] [NAME='command with {port}' ...]
  --rounds R      rounds, servers interleaved (default 5)
  --requests N    requests per run without pipelining (default 200000; with
                  pipelining 5 times as many)
  --clients C     redis-benchmark connections (default 50)
  --pipeline P    requests per pipeline in the pipelined runs (default 16)
  --keyspace K    random keys (-r; default 100000)
  --out DIR       results (TSV) and server logs (default bench/results/redis-DATE)
EOF
    exit 2
}

here=$(cd "$(dirname "$0")" && pwd)
rounds=5 requests=200000 clients=50 pipeline=16 keyspace=100000
out=$here/results/redis-$(date +%Y%m%d-%H%M%S)
names=() cmds=()
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) rounds=$2 ;;
        --requests) requests=$2 ;;
        --clients) clients=$2 ;;
        --pipeline) pipeline=$2 ;;
        --keyspace) keyspace=$2 ;;
        --out) out=$2 ;;
        -h | --help) usage ;;
        -*) echo "redis.sh: unknown option $1" >&2; usage ;;
        *=*"{port}"*) names+=("${1%%=*}"); cmds+=("${1#*=}"); shift; continue ;;
        *) echo "redis.sh: expected NAME='command with {port}', got: $1" >&2; usage ;;
    esac
    [ $# -ge 2 ] || usage
    shift 2
done
if [ ${#names[@]} -eq 0 ]; then
    names=(redis kv)
    cmds=("redis-server --port {port} --save '' --appendonly no"
        "target/release/examples/kv --threads 2 --port {port}")
fi
for tool in redis-benchmark redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "redis.sh: $tool not found (apt-get install redis-tools redis-server python3)" >&2; exit 1; }
done
mkdir -p "$out"
results=$out/results.tsv
printf 'round\tserver\ttest\trequests\tops\tcpu_ticks\n' >"$results"
ticks_per_second=$(getconf CLK_TCK)

# free_port, alive, stop_server: what every script here needs to run one server at a time.
source "$here/servers.sh"
trap stop_server EXIT

# start_server NAME COMMAND LOG: sets pid and port; fails if it does not answer PING in 15 s.
start_server() {
    port=$(free_port)
    # setsid: its own process group; exec: $! is the server itself, whose CPU is measured.
    RUST_LOG=warn setsid bash -c "exec ${2//\{port\}/$port}" >"$3" 2>&1 &
    pid=$!
    for _ in $(seq 150); do
        alive "$pid" || { echo "  $1 exited at start: $(tail -n 3 "$3")" >&2; return 1; }
        [ "$(redis-cli -p "$port" PING 2>/dev/null)" = PONG ] && return 0
        sleep 0.1
    done
    echo "  $1 not answering on port $port after 15 s" >&2
    return 1
}

# cpu_ticks PID: user + system time so far, in clock ticks (fields 14 and 15 of stat, counted
# after the command name, which may hold spaces, in parentheses).
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<<"$stat"
}

# bench ROUND NAME TEST PIPELINE N: one redis-benchmark run of TEST against the server.
bench() {
    local before after csv ops
    before=$(cpu_ticks "$pid")
    csv=$(redis-benchmark -p "$port" -c "$clients" -n "$5" -r "$keyspace" -P "$4" \
        --threads 1 -t "$3" --csv 2>>"$out/redis-benchmark.err")
    after=$(cpu_ticks "$pid")
    # "test","rps",...: the second field of the line that is not the header.
    ops=$(awk -F'","' 'NR > 1 { print $2; exit }' <<<"$csv")
    [ -n "$ops" ] || { echo "  $2 $3: no result from redis-benchmark" >&2; return 1; }
    local label=${3^^}
    [ "$4" -gt 1 ] && label="$label -P $4"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$label" "$5" "$ops" "$((after - before))" >>"$results"
    printf '  %-8s %-10s %10.0f ops/s\n' "$2" "$label" "$ops"
}

echo "redis-benchmark -c $clients -r $keyspace --threads 1 -t set / get, -n $requests," \
    "and -P $pipeline -n $((requests * 5)); $rounds rounds; results in ${out#"$PWD"/}"
for round in $(seq "$rounds"); do
    echo "round $round"
    for i in "${!names[@]}"; do
        start_server "${names[$i]}" "${cmds[$i]}" "$out/${names[$i]}.log"
        for test in set get; do
            bench "$round" "${names[$i]}" "$test" 1 "$requests"
        done
        for test in set get; do
            bench "$round" "${names[$i]}" "$test" "$pipeline" "$((requests * 5))"
        done
        stop_server
    done
done

python3 - "$results" "$ticks_per_second" "${names[@]}" <<'EOF'
import csv, statistics, sys
path, tck, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
tests = list(dict.fromkeys(row["test"] for row in rows))
runs = {(r["round"], r["server"], r["test"]): r for r in rows}
rounds = sorted({r["round"] for r in rows}, key=int)
print(f"\n{'server':<10}{'test':<11}{'runs':>5}{'ops/s':>10}{'srv CPU us/op':>15}{'ratio':>7}")
for test in tests:
    for name in names:
        mine = [runs[(r, name, test)] for r in rounds if (r, name, test) in runs]
        if not mine:
            continue
        ops = statistics.median(float(r["ops"]) for r in mine)
        cpu = statistics.median(int(r["cpu_ticks"]) / tck * 1e6 / int(r["requests"]) for r in mine)
        # The median of the per-round ratios to the first server, run next to it.
        ratios = [float(runs[(r, name, test)]["ops"]) / float(runs[(r, names[0], test)]["ops"])
                  for r in rounds if (r, name, test) in runs and (r, names[0], test) in runs]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        print(f"{name:<10}{test:<11}{len(mine):>5}{ops:>10.0f}{cpu:>15.2f}{ratio:>7}")
EOF
