//! What a server counts and tells: `Server::stats`, the connection hooks, and the log line at
//! each connection's end, checked against what the test's clients did over real sockets.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use taskserve::{Addr, CloseReason, ConnectionReport, Server};

#[test]
fn hooks_see_every_connection_once_with_its_bytes() {
    let started = Arc::new(Mutex::new(Vec::<Addr>::new()));
    let ended = Arc::new(Mutex::new(Vec::<ConnectionReport>::new()));
    let server = Server::builder()
        .threads(2)
        .on_connection_start({
            let started = Arc::clone(&started);
            move |info| started.lock().unwrap().push(info.peer_addr.clone())
        })
        .on_connection_end({
            let ended = Arc::clone(&ended);
            move |report| ended.lock().unwrap().push(report.clone())
        })
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .unwrap();

    // Each client sends a different number of bytes, half-closes, and takes every reply.
    let mut expected = HashMap::new();
    for n in 0..40 {
        let mut client = connect(server.local_addr().unwrap());
        let message = payload(1 + n * 997);
        client.write_all(&message).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let received = read_to_close(&mut client)
            .1
            .expect("read until the server closes");
        let peer = client.local_addr().unwrap();
        expected.insert(peer, (message.len() as u64, received as u64));
    }
    assert!(
        eventually(|| ended.lock().unwrap().len() >= expected.len()),
        "the end hook saw {} of {} connections",
        ended.lock().unwrap().len(),
        expected.len()
    );

    let ended = ended.lock().unwrap();
    assert_eq!(ended.len(), expected.len(), "a connection reported twice");
    let mut seen: Vec<SocketAddr> = Vec::new();
    for report in ended.iter() {
        let peer = report.peer_addr.as_inet().unwrap();
        let &(sent, received) = expected.get(&peer).expect("a report for a client of ours");
        assert_eq!(report.bytes_read, sent, "bytes read from {peer}");
        assert_eq!(report.bytes_written, received, "bytes written to {peer}");
        assert_eq!(report.closed, CloseReason::ClientClosed);
        assert_eq!(report.local_addr, Addr::Inet(server.local_addr().unwrap()));
        assert_eq!(report.transport, taskserve::Transport::Tcp);
        seen.push(peer);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), expected.len());
    let mut started = started.lock().unwrap().clone();
    assert_eq!(started.len(), expected.len());
    started.sort_by_key(|addr| addr.as_inet());
    started.dedup();
    assert_eq!(started.len(), expected.len(), "a start reported twice");

    let stats = server.stats();
    let (sent, received) = expected
        .values()
        .fold((0, 0), |(s, r), &(sent, received)| (s + sent, r + received));
    assert_eq!((stats.bytes_read, stats.bytes_written), (sent, received));
    assert_eq!(stats.accepted, expected.len() as u64);
    assert_eq!(
        stats.closed(CloseReason::ClientClosed),
        expected.len() as u64
    );
    assert_eq!(stats.open, 0);
    server.stop();
}

#[test]
fn bytes_of_any_handler_are_counted_through_its_connection() {
    use taskserve::io::{AsyncReadExt, AsyncWriteExt};
    // Not echo: a handler that reads 3 bytes and answers 5, through `Connection`.
    let server = Server::builder()
        .threads(1)
        .listen_tcp("127.0.0.1:0")
        .start(|mut conn: taskserve::Connection| async move {
            let mut buf = [0; 3];
            conn.read_exact(&mut buf).await?;
            conn.write_all(b"hello").await
        })
        .unwrap();
    let mut client = connect(server.local_addr().unwrap());
    client.write_all(b"abc").unwrap();
    assert_eq!(
        read_to_close(&mut client)
            .1
            .expect("read until the server closes"),
        5
    );
    assert!(eventually(|| server.stats().closed_total() == 1));
    let stats = server.stats();
    assert_eq!((stats.bytes_read, stats.bytes_written), (3, 5));
    server.stop();
}

#[test]
fn stats_tell_refusals_idle_timeouts_errors_and_panics_apart() {
    use taskserve::io::AsyncReadExt;
    // What each connection does depends on the first byte its client sends.
    let server = Server::builder()
        .threads(2)
        .max_connections(3)
        // Long enough that the refusal below surely comes before it frees a slot, even on a
        // busy machine: if not, the counts at the end fail.
        .idle_timeout(Duration::from_secs(2))
        .listen_tcp("127.0.0.1:0")
        .start(|mut conn: taskserve::Connection| async move {
            let mut first = [0];
            conn.read_exact(&mut first).await?;
            match first[0] {
                b'i' => std::future::pending().await,
                b'p' => panic!("asked to panic"),
                b'e' => Err(std::io::Error::other("asked to fail")),
                _ => Ok(()),
            }
        })
        .unwrap();
    let send = |byte: u8| {
        let mut client = connect(server.local_addr().unwrap());
        client.write_all(&[byte]).unwrap();
        client
    };
    let mut idle: Vec<_> = (0..3).map(|_| send(b'i')).collect();
    assert!(eventually(|| server.connections() == 3));
    let mut refused = connect(server.local_addr().unwrap());
    wait_for_close(&mut refused, PATIENCE).expect("refused at the limit");
    for client in &mut idle {
        wait_for_close(client, PATIENCE).expect("closed when idle");
    }
    for byte in [b'p', b'e', b'c'] {
        let mut client = send(byte);
        wait_for_close(&mut client, PATIENCE).expect("closed by the server");
    }
    assert!(eventually(|| server.stats().closed_total() == 6));

    let stats = server.stats();
    assert_eq!(stats.accepted, 7);
    assert_eq!(stats.refused(taskserve::RefusalReason::ConnectionLimit), 1);
    assert_eq!(stats.refused_total(), 1);
    assert_eq!(stats.closed(CloseReason::IdleTimeout), 3);
    assert_eq!(stats.closed(CloseReason::HandlerPanic), 1);
    assert_eq!(stats.closed(CloseReason::HandlerError), 1);
    assert_eq!(stats.closed(CloseReason::ClientClosed), 1);
    assert_eq!(
        stats.accepted,
        stats.refused_total() + stats.open as u64 + stats.closed_total()
    );
    assert_eq!((stats.bytes_read, stats.bytes_written), (6, 0));
    assert!(stats.uptime > Duration::ZERO);
    server.stop();
}

#[test]
fn a_stop_that_runs_out_of_time_counts_its_connections_as_stopped() {
    let server = Server::builder()
        .threads(1)
        .shutdown_timeout(Duration::from_millis(50))
        .listen_tcp("127.0.0.1:0")
        .start(|_conn: taskserve::Connection| std::future::pending::<std::io::Result<()>>())
        .unwrap();
    let _client = connect(server.local_addr().unwrap());
    assert!(eventually(|| server.connections() == 1));
    let stats_before = server.stats();
    assert_eq!(stats_before.open, 1);
    server.stop();
    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::Stopped), 1);
    assert_eq!(stats.open, 0);
}

#[test]
fn log_line_tells_duration_bytes_and_how_the_connection_ended() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.env("RUST_LOG", "info");
    let mut echo = EchoProcess::start_with(command, &["--threads", "1"]);
    let mut log = echo.stderr_lines();
    let mut client = connect(echo.addr);
    let peer = client.local_addr().unwrap();
    client.write_all(b"hello").unwrap();
    let mut reply = [0; 9];
    client.read_exact(&mut reply).unwrap();
    drop(client);
    let wanted = format!("Connection closed: {peer} after ");
    let line = log.find(|line| line.contains(&wanted));
    let rest = &line[line.find(&wanted).unwrap() + wanted.len()..];
    let (seconds, rest) = rest.split_once(" s, ").expect("a duration in seconds");
    assert_eq!(
        seconds.split_once('.').map(|(_, decimals)| decimals.len()),
        Some(2)
    );
    let seconds: f64 = seconds.parse().expect("seconds as a number");
    assert!((0.0..10.0).contains(&seconds), "{line}");
    assert_eq!(rest, "in 5 B, out 9 B, client closed", "{line}");
}

#[test]
fn behind_a_proxy_hooks_and_counts_name_the_client_and_why_a_connection_ended() {
    let ended = Arc::new(Mutex::new(Vec::<ConnectionReport>::new()));
    let server = Server::builder()
        .threads(2)
        .proxy_protocol(taskserve::ProxyProtocol::new())
        .max_connections_per_ip(1)
        .on_connection_end({
            let ended = Arc::clone(&ended);
            move |report| ended.lock().unwrap().push(report.clone())
        })
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .unwrap();
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let again: SocketAddr = "192.0.2.7:40001".parse().unwrap();
    let mut first = connect(server.local_addr().unwrap());
    first
        .write_all(&proxy_v1(client, server.local_addr().unwrap()))
        .unwrap();
    round_trip(&mut first, b"served");
    // The same client again: over its limit of one, closed once the header names it.
    let mut second = connect(server.local_addr().unwrap());
    second
        .write_all(&proxy_v1(again, server.local_addr().unwrap()))
        .unwrap();
    wait_for_close(&mut second, PATIENCE).expect("the second connection closed");
    // No valid header: closed, counted, and not reported (the hooks never heard of a client).
    let mut garbage = connect(server.local_addr().unwrap());
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_for_close(&mut garbage, PATIENCE).expect("the garbage connection closed");
    first.shutdown(Shutdown::Write).unwrap();
    read_to_close(&mut first)
        .1
        .expect("read until the server closes");
    assert!(eventually(|| server.stats().open == 0));

    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::ClientClosed), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::PerClientLimit), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::ProxyHeaderFailed), 1, "{stats:?}");
    let mut reports: Vec<_> = ended
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.peer_addr.clone(), r.closed))
        .collect();
    reports.sort_by_key(|(addr, _)| addr.to_string());
    assert_eq!(
        reports,
        [
            (Addr::Inet(client), CloseReason::ClientClosed),
            (Addr::Inet(again), CloseReason::PerClientLimit),
        ]
    );
    server.stop();
}
