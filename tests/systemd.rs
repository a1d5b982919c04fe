//! systemd's ways over real sockets: socket activation through `systemd-socket-activate` (the
//! server serves the socket it is given, and never binds), and readiness read from a datagram
//! socket the test owns as `NOTIFY_SOCKET`.
#![cfg(unix)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use common::*;

#[test]
#[ignore = "needs systemd-socket-activate: bash .ci/run installs it"]
fn echo_serves_the_socket_systemd_socket_activate_passes() {
    // A test that skipped itself would pass without testing anything: .ci/run installs it.
    assert!(
        Command::new("systemd-socket-activate")
            .arg("--version")
            .output()
            .is_ok(),
        "this test needs systemd-socket-activate (Debian's systemd package)"
    );
    let (child, port, _stderr) = spawn_on_a_free_port("systemd-socket-activate", |port| {
        let mut command = Command::new("systemd-socket-activate");
        command
            .args(["-l", &format!("127.0.0.1:{port}")])
            .args([env!("CARGO_BIN_EXE_echo"), "--threads", "1"])
            .args(["--port", "1"]) // ignored: the passed socket takes its place
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        command
    });
    let listen = format!("127.0.0.1:{port}");
    let mut server = EchoProcess {
        child,
        addr: listen.parse().unwrap(),
        listening: String::new(),
        stdout: None,
    };
    let mut stdout = Lines::read(server.child.stdout.take().unwrap(), "echo's stdout");
    // It listens before the server starts, and starts it at the first connection: the
    // connect succeeds at once, and the reply comes once the server serves the socket.
    let addr = server.addr;
    let mut client = connect(addr);
    round_trip(&mut client, b"activated");
    assert_eq!(
        stdout.next_line(),
        format!("listening on {listen} (1 thread)")
    );
    let mut second = connect(addr);
    round_trip(&mut second, b"again");
    drop((client, second)); // or the stop would wait for them
    server.signal("TERM");
    assert_eq!(server.wait_exit(), Some(0));
}

#[test]
fn echo_tells_notify_socket_ready_then_stopping() {
    let dir = TempDir::new();
    let path = dir.join("notify");
    let notify = UnixDatagram::bind(&path).expect("bind the notify socket");
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.env("NOTIFY_SOCKET", &path);
    let mut server = EchoProcess::start_with(command, &["--threads", "1", "--quiet"]);
    let mut buf = [0; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within PATIENCE");
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ready means serving.
    round_trip(&mut connect(server.addr), b"ready");
    server.signal("TERM");
    let n = notify.recv(&mut buf).expect("STOPPING=1 within PATIENCE");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert_eq!(server.wait_exit(), Some(0));
}

#[test]
fn listen_systemd_without_sockets_is_an_error() {
    let result = taskserve::Server::builder()
        .listen_systemd()
        .start(taskserve::echo);
    assert_eq!(
        result.unwrap_err().kind(),
        std::io::ErrorKind::NotFound,
        "no LISTEN_FDS in a test"
    );
}
