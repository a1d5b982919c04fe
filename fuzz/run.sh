#!/usr/bin/env bash
# Runs each fuzz target in turn for SECONDS (default 600), one process at a time at low
# priority, new inputs kept in fuzz/target/work-corpus (the checked-in corpus is only read), each
# run's libFuzzer output in fuzz/target/logs/TARGET.log; prints each run's final figures.
# Usage: fuzz/run.sh [SECONDS] [TARGET...]   (needs the nightly toolchain and cargo-fuzz)
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(proxy_header metrics_head echo_args tls_pem)
mkdir -p target/logs
# Debug assertions on (-a): an arithmetic overflow is a crash too. Built once, before the runs.
nice cargo +nightly fuzz build -a
for target in "${targets[@]}"; do
    work=target/work-corpus/$target
    mkdir -p "$work"
    # A head over the endpoint's 8 KiB limit needs longer inputs than libFuzzer's default.
    max_len=4096
    [ "$target" = metrics_head ] && max_len=10000
    status=0
    nice cargo +nightly fuzz run -a "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -max_len="$max_len" \
        -print_final_stats=1 >"target/logs/$target.log" 2>&1 || status=$?
    echo "== $target ($seconds s, exit $status)"
    grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "target/logs/$target.log" | tail -1 || true
    grep -E '^(stat::|SUMMARY|==[0-9]+== ERROR|Done)' "target/logs/$target.log" || true
done
