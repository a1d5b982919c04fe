# Sourced by the measuring scripts in benches/: checks the one argument (a server command with
# `{port}`) and the loadgen, makes a scratch directory, and starts the server on a free port.
# Sets: bench, loadgen, work, and (after start_server) port and server.

if [ $# -ne 1 ]; then
    sed -n '2,5p' "$0" | sed 's/^# \{0,3\}//' >&2
    exit 2
fi

bench=$(cd "$(dirname "$0")/../bench" && pwd)
loadgen=$bench/bin/loadgen
if [ ! -x "$loadgen" ]; then
    echo "$(basename "$0"): $loadgen not found: run bench/build.sh first" >&2
    exit 1
fi
work=$(mktemp -d)
server=
busy=()
cleanup() {
    [ -z "$server" ] || kill -TERM "$server" 2>/dev/null || true
    for b in "${busy[@]}"; do kill "$b" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# start_server COMMAND [setsid]: runs COMMAND with `{port}` replaced by a free port (in a
# session of its own with `setsid`, as bench/run.sh starts servers) and waits up to 5 s for
# its `listening` line.
start_server() {
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if [ "${2:-}" = setsid ]; then
        setsid bash -c "exec ${1//\{port\}/$port}" >"$work/server.out" 2>&1 &
    else
        ${1//\{port\}/$port} >"$work/server.out" 2>&1 &
    fi
    server=$!
    for _ in $(seq 100); do
        grep -q listening "$work/server.out" && break
        sleep 0.05
    done
}
