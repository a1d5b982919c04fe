//! Unix socket listeners, and several listeners on one server: echo over a Unix socket, what
//! a handler learns about its client, the socket file (a stale one replaced, a live one or a
//! regular file left alone, removed at stop), and TCP, TLS and Unix served at once.
#![cfg(unix)]

mod common;

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;

use common::*;
use taskserve::{Addr, Server, Transport};

/// Connects to the socket at `path` with read and write timeouts of [`PATIENCE`].
fn connect_unix(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).expect("connect to the socket");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Sends `message` (free of `G`) and checks that exactly it comes back.
fn unix_round_trip(stream: &mut UnixStream, message: &[u8]) {
    stream.write_all(message).expect("send");
    let echoed = read_payload(stream, message.len()).expect("read the reply");
    assert!(echoed == message, "the reply differs from what was sent");
}

/// Starts an echo server with two threads on a Unix socket at `path` only.
fn start_unix_echo(path: &Path) -> Server {
    Server::builder()
        .threads(2)
        .listen_unix(path)
        .start(taskserve::echo)
        .expect("server starts on a Unix socket")
}

#[test]
fn echo_over_a_unix_socket_prefixes_each_chunk_with_got() {
    let dir = TempDir::new();
    let path = dir.join("echo.sock");
    let server = start_unix_echo(&path);
    assert_eq!(
        server.local_addrs(),
        [(Addr::Unix(Some(path.as_path().into())), Transport::Unix)]
    );
    // No TCP listener, so no TCP address: an error to handle, not a panic.
    let no_tcp = server
        .local_addr()
        .expect_err("a Unix-only server has no local_addr");
    assert_eq!(no_tcp.kind(), std::io::ErrorKind::NotFound, "{no_tcp}");
    let mut client = connect_unix(&path);
    client.write_all(b"Hello").unwrap();
    let mut reply = [0; 9];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GOT:Hello");
    unix_round_trip(&mut client, &payload(100 * 1024));
    drop(client);
    assert!(eventually(|| server.connections() == 0));
}

#[test]
#[cfg(any(target_os = "linux", target_os = "android"))]
fn handler_on_a_unix_socket_sees_the_clients_uid_and_pid() {
    let dir = TempDir::new();
    let path = dir.join("echo.sock");
    let (report, reports) = mpsc::channel();
    let server = Server::builder()
        .threads(2)
        .listen_unix(&path)
        .start(reporting_echo(report))
        .unwrap();
    let mut client = connect_unix(&path);
    unix_round_trip(&mut client, b"who am I?");
    let info = reports.recv_timeout(PATIENCE).expect("the handler reports");
    assert_eq!(info.transport, Transport::Unix);
    assert_eq!(info.local_addr, server.local_addrs()[0].0);
    assert_eq!(
        info.peer_addr,
        Addr::Unix(None),
        "the client's socket is unnamed"
    );
    let credentials = info.peer_credentials.expect("peer credentials on Linux");
    // This process made the socket file: it is owned by the process's user.
    let uid = std::fs::metadata(&path).unwrap().uid();
    assert_eq!(credentials.uid, uid);
    assert_eq!(credentials.pid, Some(std::process::id()));
}

#[test]
#[cfg(feature = "tls")]
fn one_server_serves_the_same_handler_over_tcp_tls_and_unix_at_once() {
    use common::tls::{tls_connect, tls_round_trip, TlsFiles};

    let files = TlsFiles::new();
    let path = files.dir.join("echo.sock");
    let (report, reports) = mpsc::channel();
    let server = Server::builder()
        .threads(2)
        .listen_unix(&path)
        .listen_tcp("127.0.0.1:0")
        .listen_tls("127.0.0.1:0", files.config())
        .start(reporting_echo(report))
        .unwrap();

    let addrs = server.local_addrs();
    let transports: Vec<_> = addrs.iter().map(|(_, transport)| *transport).collect();
    assert_eq!(
        transports,
        [Transport::Unix, Transport::Tcp, Transport::Tls],
        "in the order they were added"
    );
    assert_eq!(addrs[0].0, Addr::Unix(Some(path.as_path().into())));
    let (tcp, tls) = (addrs[1].0.as_inet().unwrap(), addrs[2].0.as_inet().unwrap());
    assert_ne!(tcp.port(), tls.port());
    assert_eq!(
        server.local_addr().unwrap(),
        tcp,
        "local_addr is the first TCP listener"
    );

    unix_round_trip(&mut connect_unix(&path), b"over unix");
    round_trip(&mut connect(tcp), b"over tcp");
    let mut client = tls_connect(tls, &files.client(), "localhost").unwrap();
    tls_round_trip(&mut client, b"over tls").unwrap();

    let seen: Vec<_> = (0..3)
        .map(|_| {
            let info = reports.recv_timeout(PATIENCE).expect("the handler reports");
            (info.transport, info.local_addr)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (Transport::Unix, addrs[0].0.clone()),
            (Transport::Tcp, addrs[1].0.clone()),
            (Transport::Tls, addrs[2].0.clone()),
        ]
    );
}

#[test]
fn a_stale_socket_file_is_replaced_at_start() {
    let dir = TempDir::new();
    let path = dir.join("echo.sock");
    // A server that crashed: its socket file is left, and nothing listens on it.
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    let server = start_unix_echo(&path);
    unix_round_trip(&mut connect_unix(&path), b"served on the replaced socket");
    drop(server);
}

#[test]
fn a_live_socket_at_the_path_makes_start_fail_with_addr_in_use_naming_it() {
    let dir = TempDir::new();
    let path = dir.join("echo.sock");
    let live = UnixListener::bind(&path).unwrap();
    let e = Server::builder()
        .threads(2)
        .listen_unix(&path)
        .start(taskserve::echo)
        .expect_err("start fails");
    println!("live socket: {e} ({:?})", e.kind());
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    // The other server's socket is untouched: it still accepts.
    let _client = connect_unix(&path);
    live.set_nonblocking(true).unwrap();
    assert!(live.accept().is_ok(), "the live socket lost its client");
}

#[test]
fn a_regular_file_at_the_path_is_left_alone_and_start_fails() {
    let dir = TempDir::new();
    let path = dir.join("echo.sock");
    std::fs::write(&path, "precious data\n").unwrap();
    let e = Server::builder()
        .threads(2)
        .listen_unix(&path)
        .start(taskserve::echo)
        .expect_err("start fails");
    println!("regular file: {e} ({:?})", e.kind());
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious data\n");
}

#[test]
fn the_socket_file_is_removed_when_the_server_stops() {
    let dir = TempDir::new();
    let path = dir.join("echo.sock");
    let server = start_unix_echo(&path);
    unix_round_trip(&mut connect_unix(&path), b"hello");
    assert!(path.exists());
    server.stop();
    assert!(!path.exists(), "the socket file outlived the server");

    // Dropping the server, rather than stopping it, removes it too.
    let server = start_unix_echo(&path);
    assert!(path.exists());
    drop(server);
    assert!(!path.exists(), "the socket file outlived the server");
}

#[test]
fn a_start_that_fails_on_another_listener_leaves_no_socket_file() {
    let dir = TempDir::new();
    let path = dir.join("echo.sock");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = Server::builder()
        .threads(2)
        .listen_unix(&path)
        .listen_tcp(taken.local_addr().unwrap())
        .start(taskserve::echo)
        .expect_err("the TCP port is taken");
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    assert!(
        !path.exists(),
        "the socket file of a server that never started"
    );
}
