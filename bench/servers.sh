# Sourced by run.sh and redis.sh: a free port, whether a process lives, and the stop of the
# server whose process group leader is $pid (started with setsid): SIGTERM, then SIGKILL after 3 s.

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() { # a zombie (exited, not yet reaped) is not alive
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]
}

pid=
stop_server() {
    [ -n "$pid" ] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 30); do alive "$pid" || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
}
