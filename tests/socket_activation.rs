//! Sockets passed as systemd passes them (`LISTEN_FDS`, `LISTEN_PID`), without systemd: a
//! Python parent binds the socket, puts it at descriptor 3 and execs `echo` in its own process,
//! as `systemd-socket-activate` does. `--host` does not apply to such a socket, so `echo` warns
//! when one listens on every interface while `--host` was left at its default, this machine only.
#![cfg(unix)]

mod common;

use std::io::Read;
use std::process::Command;

use common::*;

/// Binds `host` on a free port, passes the socket as systemd would and execs `echo` with `args`.
const ACTIVATE: &str = r#"
import os, socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
listener = socket.socket(family, socket.SOCK_STREAM)
listener.bind((sys.argv[1], 0))
listener.listen(16)
if listener.fileno() != 3:
    os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)  # the socket may be 3 itself, which Python opened close-on-exec
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"#;

/// Runs `echo --threads 1 args` on a socket bound to `host` by its parent; returns its listening
/// line and, once SIGTERM has stopped it, everything it logged.
fn activated_echo(host: &str, args: &[&str]) -> (String, String) {
    let mut command = Command::new("python3");
    command
        .args(["-c", ACTIVATE, host, env!("CARGO_BIN_EXE_echo")])
        .args(["--threads", "1"])
        .env("RUST_LOG", "warn");
    let mut server = EchoProcess::start_as_given(command, args);
    let listening = server.listening.clone();
    server.signal("TERM");
    assert_eq!(server.wait_exit(), Some(0), "{listening}");
    let mut log = String::new();
    // It has exited: its stderr is at its end.
    server.stderr().read_to_string(&mut log).unwrap();
    (listening, log)
}

#[test]
fn an_inherited_socket_on_every_interface_is_warned_of_under_the_default_host() {
    let (listening, log) = activated_echo("0.0.0.0", &[]);
    assert!(
        listening.starts_with("listening on 0.0.0.0:"),
        "{listening}"
    );
    assert!(log.contains("every interface"), "{log}");
    assert!(log.contains("-l 127.0.0.1:"), "{log}");
}

#[test]
fn an_inherited_socket_on_every_interface_is_not_warned_of_when_host_asks_for_all() {
    let (_, log) = activated_echo("0.0.0.0", &["--host", "0.0.0.0"]);
    assert!(!log.contains("every interface"), "{log}");
}

#[test]
fn an_inherited_socket_on_loopback_is_not_warned_of() {
    let (listening, log) = activated_echo("127.0.0.1", &[]);
    assert!(
        listening.starts_with("listening on 127.0.0.1:"),
        "{listening}"
    );
    assert!(!log.contains("every interface"), "{log}");
}
