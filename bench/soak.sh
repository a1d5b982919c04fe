#!/usr/bin/env bash
# A long mixed soak: one echo with a TCP, a TLS, a Unix socket and a PROXY listener and its
# metrics endpoint, under `loadgen soak` (well-behaved clients that check every byte beside
# misbehaving ones, metrics scraped every second, the server's RSS, descriptors and threads
# sampled every 10 s) for --duration seconds. Exits non-zero, with the reason, when a byte was
# lost, the counts do not add up, something hung, or memory or descriptors did not come back.
#
#   bench/soak.sh [--duration SECS] [--echo PATH] [--threads N] [--echo-log FILE]
#
# --duration  seconds of load (default 1800; CI runs 60)
# --echo      the echo binary to soak (default: target/release/echo, built here)
# --threads   echo's worker threads (default 2)
# --echo-log  keep echo's log there (warnings and errors; RUST_LOG=info logs every connection)
# Needs cargo, openssl and python3; everything listens on 127.0.0.1 on ports the kernel picks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# shellcheck source=servers.sh
source "$here/servers.sh"

duration=1800 echo_bin= threads=2 echo_log=
while [ $# -gt 0 ]; do
    case $1 in
    --duration) duration=$2 ;;
    --echo) echo_bin=$2 ;;
    --threads) threads=$2 ;;
    --echo-log) echo_log=$2 ;;
    *) echo "usage: bench/soak.sh [--duration SECS] [--echo PATH] [--threads N] [--echo-log FILE]" >&2
        exit 2 ;;
    esac
    shift 2
done

# loadgen is a Cargo project of its own, built where bench/build.sh builds it.
cargo build --release --quiet --manifest-path "$here/loadgen/Cargo.toml" \
    --target-dir "$here/loadgen/target"
loadgen=$here/loadgen/target/release/loadgen
if [ -z "$echo_bin" ]; then
    cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin echo
    echo_bin=$root/target/release/echo
fi

dir=$(mktemp -d)
trap 'stop_server; rm -rf "$dir"' EXIT
echo_log=${echo_log:-$dir/stderr}
# loadgen checks the handshake's signature, not the chain (--tls-insecure): a self-signed
# certificate is a CA, which rustls refuses as the server's own.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null

# Short timeouts, so that stalled clients are closed often, but as long as the idle one for the
# handshake: a TLS 1.3 client's handshake is over once it has sent its Finished, so when that
# reaches the server after its deadline (a handshake slower than 3 s: echo and loadgen under
# nice on a machine at load 15, seen once) the server closes a client that is already sending.
idle_timeout=10 handshake_timeout=10 proxy_timeout=10
setsid "$echo_bin" --port 0 --threads "$threads" --quiet \
    --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem" --tls-port 0 \
    --unix "$dir/echo.sock" --proxy-port 0 --proxy-from 127.0.0.1/32 \
    --metrics 127.0.0.1:0 --idle-timeout "$idle_timeout" \
    --tls-handshake-timeout "$handshake_timeout" --proxy-timeout "$proxy_timeout" \
    >"$dir/stdout" 2>"$echo_log" &
pid=$!
# Its five listening lines: plain TCP first, then TLS, Unix, PROXY, metrics.
for _ in $(seq 100); do
    [ "$(grep -c '^listening on' "$dir/stdout")" -ge 5 ] && break
    alive "$pid" || { cat "$echo_log" >&2; exit 1; }
    sleep 0.1
done
addr() { sed -n "s/^listening on \([^ ]*\) ($1.*/\1/p" "$dir/stdout"; }
tcp=$(addr "$threads thread") tls=$(addr tls) proxy=$(addr proxy) metrics=$(addr metrics)
[ -n "$tcp" ] && [ -n "$tls" ] && [ -n "$proxy" ] && [ -n "$metrics" ] || {
    echo "soak: echo did not print its five listening lines:" >&2
    cat "$dir/stdout" "$echo_log" >&2
    exit 1
}
echo "soak: echo $pid ($echo_bin, $threads threads) on $tcp, tls $tls, proxy $proxy," \
    "unix $dir/echo.sock, metrics $metrics; ${duration} s; load average $(cut -d' ' -f1-3 /proc/loadavg)"

status=0
"$loadgen" soak --duration "$duration" --pid "$pid" --addr "$tcp" --tls-addr "$tls" \
    --tls-insecure --unix "$dir/echo.sock" --proxy-addr "$proxy" \
    --metrics "$metrics" --server-timeout "$idle_timeout" || status=$?

# The server must still stop cleanly, and its log hold no panic and no error.
kill -TERM "$pid"
for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
if alive "$pid"; then
    echo "soak: FAILED: echo did not exit within 15 s of SIGTERM" >&2
    status=1
elif ! wait "$pid"; then
    echo "soak: FAILED: echo exited with an error after SIGTERM" >&2
    status=1
fi
pid=
if grep -E 'panicked|ERROR' "$echo_log" >&2; then
    echo "soak: FAILED: echo logged the errors above" >&2
    status=1
fi
echo "soak: load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
