//! A client that resets and a load balancer's health check are not handler errors: a reset
//! counts as `peer_reset`; a PROXY v2 `LOCAL` connection that sends nothing counts as
//! `health_check` and is logged at debug only, as HAProxy's `check` with `send-proxy-v2` makes
//! one every second. The health check is built as HAProxy sends it: a `LOCAL` header (bytes from
//! the `ppp` crate), then a reset (SO_LINGER 0).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, Once};
use std::time::Duration;

use common::{connect, eventually, round_trip};
use log::Level;
use taskserve::{CloseReason, ProxyProtocol, Server};

const PATIENCE: Duration = Duration::from_secs(10);

/// Every log line of this test binary, with its level; tests tell theirs apart by the client's
/// address, which is unique to each connection.
struct Captured(Mutex<Vec<(Level, String)>>);

static LOG: Captured = Captured(Mutex::new(Vec::new()));

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let line = record.args().to_string();
        self.0.lock().unwrap().push((record.level(), line));
    }

    fn flush(&self) {}
}

/// The log lines that mention `who`, once the logger is installed.
fn logged_about(who: SocketAddr) -> Vec<(Level, String)> {
    let who = who.to_string();
    let lines = LOG.0.lock().unwrap();
    lines
        .iter()
        .filter(|(_, line)| line.contains(&who))
        .cloned()
        .collect()
}

fn capture_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&LOG).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

/// An echo server behind the PROXY protocol (trusting loopback), and the client addresses its
/// start hook sees, each once its header has been read.
fn proxy_echo() -> (Server, Receiver<taskserve::Addr>) {
    proxy_echo_over(None)
}

/// As [`proxy_echo`], its listener speaking TLS with `tls` if given.
fn proxy_echo_over(tls: Option<taskserve::TlsConfig>) -> (Server, Receiver<taskserve::Addr>) {
    let (started, starts) = mpsc::channel();
    let started = Mutex::new(started);
    let builder = Server::builder()
        .threads(2)
        .proxy_protocol(ProxyProtocol::new())
        .on_connection_start(move |info| {
            let _ = started.lock().unwrap().send(info.peer_addr.clone());
        });
    let builder = match tls {
        Some(tls) => builder.listen_tls("127.0.0.1:0", tls),
        None => builder.listen_tcp("127.0.0.1:0"),
    };
    let server = builder
        .start(taskserve::echo)
        .expect("start on an ephemeral port");
    (server, starts)
}

/// A PROXY v2 `LOCAL` header, as HAProxy's health checks send it.
fn local_header() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .expect("a LOCAL header")
}

/// Closes `stream` with a reset rather than a FIN, as HAProxy ends its checks.
fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(socket);
}

/// Connects to `server`, sends a `LOCAL` header, waits until the server has read it, and
/// returns the connection and its address.
fn local_connection(
    server: &Server,
    starts: &Receiver<taskserve::Addr>,
) -> (TcpStream, SocketAddr) {
    let mut client = connect(server.local_addr().unwrap());
    client.write_all(&local_header()).unwrap();
    starts.recv_timeout(PATIENCE).expect("the header is read");
    let addr = client.local_addr().unwrap();
    (client, addr)
}

fn wait_for_closed(server: &Server, n: u64) {
    assert!(
        eventually(|| server.stats().closed_total() == n),
        "{:?}",
        server.stats()
    );
}

#[test]
fn a_health_check_that_resets_is_counted_and_logged_apart_from_errors() {
    capture_log();
    let (server, starts) = proxy_echo();
    let (check, addr) = local_connection(&server, &starts);
    reset(check);
    wait_for_closed(&server, 1);
    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::HealthCheck), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::HandlerError), 0, "{stats:?}");
    assert_eq!(CloseReason::HealthCheck.label(), "health_check");
    server.stop();
    let lines = logged_about(addr);
    assert!(
        lines.iter().all(|(level, _)| *level >= Level::Debug),
        "a health check logged above debug: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|(_, line)| line.contains("Connection closed") && line.ends_with("health check")),
        "{lines:?}"
    );
}

#[test]
fn a_health_check_that_closes_cleanly_is_a_health_check_too() {
    let (server, starts) = proxy_echo();
    let (check, _) = local_connection(&server, &starts);
    drop(check);
    wait_for_closed(&server, 1);
    assert_eq!(server.stats().closed(CloseReason::HealthCheck), 1);
    server.stop();
}

#[test]
fn a_local_connection_that_sends_data_is_served_and_not_a_health_check() {
    let (server, starts) = proxy_echo();
    let (mut local, _) = local_connection(&server, &starts);
    round_trip(&mut local, b"ping");
    drop(local);
    wait_for_closed(&server, 1);
    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::ClientClosed), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::HealthCheck), 0, "{stats:?}");
    server.stop();
}

#[test]
fn a_client_that_resets_is_counted_as_peer_reset_not_as_a_handler_error() {
    capture_log();
    let server = Server::builder()
        .threads(2)
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .expect("start on an ephemeral port");
    let mut client = connect(server.local_addr().unwrap());
    round_trip(&mut client, b"hello");
    let addr = client.local_addr().unwrap();
    reset(client);
    wait_for_closed(&server, 1);
    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::PeerReset), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::HandlerError), 0, "{stats:?}");
    assert_eq!(CloseReason::PeerReset.label(), "peer_reset");
    server.stop();
    let lines = logged_about(addr);
    assert!(
        lines.iter().any(|(level, line)| *level == Level::Info
            && line.starts_with("Connection closed")
            && line.ends_with("reset by the client")),
        "{lines:?}"
    );
}

#[test]
fn a_client_behind_a_proxy_that_resets_is_peer_reset() {
    let (server, starts) = proxy_echo();
    let mut client = connect(server.local_addr().unwrap());
    let header = common::proxy_v2(
        Some((
            "192.0.2.7:4000".parse().unwrap(),
            "192.0.2.8:25000".parse().unwrap(),
        )),
        &[],
    );
    client.write_all(&header).unwrap();
    starts.recv_timeout(PATIENCE).expect("the header is read");
    client.write_all(b"hi").unwrap();
    let mut reply = [0; 6];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GOT:hi");
    reset(client);
    wait_for_closed(&server, 1);
    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::PeerReset), 1, "{stats:?}");
    server.stop();
}

#[test]
fn a_health_check_on_a_tls_port_that_resets_before_any_handshake_is_a_health_check() {
    let files = common::tls::TlsFiles::new();
    let (server, starts) = proxy_echo_over(Some(files.config()));
    let (check, _) = local_connection(&server, &starts);
    reset(check);
    wait_for_closed(&server, 1);
    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::HealthCheck), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::HandshakeFailed), 0, "{stats:?}");
    server.stop();
}
