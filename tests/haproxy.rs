//! A real HAProxy on loopback in front of two `echo --proxy-protocol` processes, with
//! `send-proxy-v2` and health checks: clients from several 127.0.0.x addresses are served, each
//! backend's log names each client's own address, and when one backend dies every new client
//! is served by the other. Needs `haproxy` (`.ci/run` installs it).

mod common;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use common::*;

/// An `echo --proxy-protocol` process and the log lines it has written so far.
struct Backend {
    process: EchoProcess,
    log: StderrLog,
}

impl Backend {
    fn start() -> Backend {
        let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
        // Debug: health checks are logged at debug only.
        command.env("RUST_LOG", "debug");
        let mut process = EchoProcess::start_with(command, &["--proxy-protocol", "--threads", "1"]);
        let log = StderrLog::collect(&mut process);
        Backend { process, log }
    }

    fn logged(&self, text: &str) -> bool {
        self.log.count(&[text]) > 0
    }
}

/// HAProxy in front of `backends`, on a port of 127.0.0.1 it was told; returns it (killed when
/// dropped) and its address.
fn start_haproxy(dir: &TempDir, backends: &[&Backend]) -> (ChildGuard, SocketAddr) {
    let (haproxy, port, _stderr) =
        spawn_on_a_free_port("haproxy", |port| haproxy_command(dir, port, backends));
    (haproxy, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// HAProxy with a configuration for `port` and `backends`. Without SO_REUSEPORT (noreuseport):
/// a port some other process holds is then "Address already in use", not shared.
fn haproxy_command(dir: &TempDir, port: u16, backends: &[&Backend]) -> Command {
    let mut config = format!(
        "global\n    maxconn 1000\n    noreuseport\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 20s\n    \
         timeout server 20s\n    retries 3\n    option redispatch 1\n\
         frontend front\n    bind 127.0.0.1:{port}\n    default_backend echoes\n\
         backend echoes\n    balance roundrobin\n"
    );
    for (n, backend) in backends.iter().enumerate() {
        config += &format!(
            "    server echo{n} {} send-proxy-v2 check inter 200ms fall 1 rise 1\n",
            backend.process.addr
        );
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new("haproxy");
    command
        .arg("-db") // in the foreground
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

/// A client from `from` through HAProxy at `front`, that got its reply; its own address.
fn served_through(from: IpAddr, front: SocketAddr) -> Result<SocketAddr, String> {
    let mut client: TcpStream = connect_from(from, front).map_err(|e| e.to_string())?;
    use std::io::Write;
    client.write_all(b"hello").map_err(|e| e.to_string())?;
    let reply = read_payload(&mut client, 5).map_err(|e| e.to_string())?;
    if reply != b"hello" {
        return Err(format!("reply {reply:?}"));
    }
    Ok(client.local_addr().unwrap())
}

#[test]
#[ignore = "needs haproxy: bash .ci/run installs it"]
fn haproxy_with_send_proxy_v2_in_front_of_two_echo_processes() {
    // A test that skipped itself would pass without testing anything: .ci/run installs it.
    assert!(
        Command::new("haproxy").arg("-v").output().is_ok(),
        "this test needs haproxy (Debian's haproxy package)"
    );
    let (first, second) = (Backend::start(), Backend::start());
    let dir = TempDir::new();
    let (_haproxy, front) = start_haproxy(&dir, &[&first, &second]);
    // Wait until the health checks (a v2 LOCAL header) reached both backends.
    assert!(eventually(|| {
        first.logged(", health check") && second.logged(", health check")
    }));
    assert!(
        !first.logged("handler error") && !second.logged("handler error"),
        "a health check counted as a handler error"
    );

    // Eight clients from four addresses: each backend logs the client's own address and port.
    let mut clients = Vec::new();
    for n in 0..8 {
        let from: IpAddr = format!("127.0.0.{}", 2 + n % 4).parse().unwrap();
        clients.push(served_through(from, front).expect("served through haproxy"));
    }
    for client in &clients {
        let line = format!("Connection from {client}");
        assert!(
            eventually(|| first.logged(&line) || second.logged(&line)),
            "no backend logged {line}"
        );
    }
    assert!(
        clients
            .iter()
            .any(|c| first.logged(&format!("Connection from {c}")))
            && clients
                .iter()
                .any(|c| second.logged(&format!("Connection from {c}"))),
        "round robin reaches both backends"
    );

    // One backend dies: every new client is served by the other.
    let Backend {
        process: mut dead, ..
    } = first;
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    for n in 0..20 {
        let from: IpAddr = format!("127.0.0.{}", 2 + n % 4).parse().unwrap();
        let client = served_through(from, front)
            .unwrap_or_else(|e| panic!("client {n} after the kill: {e}"));
        let line = format!("Connection from {client}");
        assert!(eventually(|| second.logged(&line)), "{line}");
    }
}
