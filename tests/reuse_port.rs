//! Socket options for running several processes: `--reuse-port` lets two `echo` processes serve
//! one port; `--keepalive` turns TCP keepalive on for each client.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Starts `echo` with `args`, logging at info; returns it and its log.
fn start_logging(args: &[&str]) -> (EchoProcess, StderrLog) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.env("RUST_LOG", "info");
    let mut server = EchoProcess::start_as_given(command, args);
    let log = StderrLog::collect(&mut server);
    (server, log)
}

/// How many connections `log` has told of so far.
fn connections_logged(log: &StderrLog) -> usize {
    log.count(&["Connection from"])
}

#[test]
fn two_processes_with_reuse_port_share_one_port_and_both_serve() {
    let (first, first_log) = start_logging(&["--reuse-port", "--port", "0", "--threads", "1"]);
    let port = first.addr.port().to_string();
    let (second, second_log) = start_logging(&["--reuse-port", "--port", &port, "--threads", "1"]);
    assert_eq!(first.addr, second.addr);
    // The kernel picks a listener by a hash of each connection's addresses: new source ports
    // reach both soon. At most 500 connections, or PATIENCE.
    let (mut served_first, mut served_second) = (0, 0);
    let deadline = Instant::now() + PATIENCE;
    for _ in 0..500 {
        let mut client = connect(first.addr);
        round_trip(&mut client, b"which one?");
        drop(client);
        std::thread::sleep(Duration::from_millis(2));
        served_first = connections_logged(&first_log);
        served_second = connections_logged(&second_log);
        if (served_first > 0 && served_second > 0) || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        served_first > 0 && served_second > 0,
        "first served {served_first}, second {served_second}"
    );
}

#[test]
fn without_reuse_port_a_second_process_cannot_bind_the_port() {
    let first = EchoProcess::start(&["--reuse-port", "--threads", "1"]);
    let port = first.addr.port().to_string();
    let (code, _, stderr) = run_echo(&["--port", &port, "--threads", "1"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("Address already in use"), "{stderr}");
}

#[test]
fn keepalive_is_set_on_each_client_connection() {
    let server = EchoProcess::start(&["--keepalive", "30", "--threads", "2", "--quiet"]);
    let mut clients: Vec<_> = (0..5).map(|_| connect(server.addr)).collect();
    for client in &mut clients {
        round_trip(client, b"alive");
    }
    // The server's end of each connection, as ss shows it (one line each, the client's
    // address as the peer): its timer is keepalive's.
    let port = server.addr.port();
    let mut table = String::new();
    let shown = eventually(|| {
        let out = Command::new("ss")
            .args([
                "-tnoH",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .expect("run ss");
        table = String::from_utf8_lossy(&out.stdout).into_owned();
        clients.iter().all(|client| {
            let peer = client.local_addr().unwrap().to_string();
            table.lines().any(|line| {
                line.split_whitespace().any(|column| column == peer) && line.contains("keepalive")
            })
        })
    });
    assert!(
        shown,
        "ss shows no keepalive timer on some of the server's sockets:\n{table}"
    );
    let (code, _, _) = run_echo(&["--keepalive", "0"]);
    assert_eq!(code, Some(2));
}
