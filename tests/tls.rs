//! TLS listeners over real sockets, with certificates made at test time: the echo protocol
//! through rustls, what a handler learns from the handshake, clients that stall or send
//! something else, the connection limit, reloading the certificate, client certificates, and
//! bad certificate files.
#![cfg(feature = "tls")]

mod common;

use std::io::{self, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use taskserve::rustls::ClientConfig;
use taskserve::{CloseReason, ConnectionInfo, Server, TlsConfig, TlsInfo, Transport};

/// The TLS details a handler saw, waited for within [`PATIENCE`].
fn reported_tls(reports: &mpsc::Receiver<ConnectionInfo>) -> (Transport, TlsInfo) {
    let info = reports
        .recv_timeout(PATIENCE)
        .expect("the handler reports its connection");
    (
        info.transport,
        info.tls.expect("a TLS connection has TlsInfo"),
    )
}

#[test]
fn tls_echo_prefixes_each_chunk_with_got_byte_for_byte() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").unwrap();
    client.write_all(b"Hello").unwrap();
    let mut reply = [0; 9];
    io::Read::read_exact(&mut client, &mut reply).unwrap();
    assert_eq!(&reply, b"GOT:Hello");
    tls_round_trip(&mut client, &payload(100 * 1024)).unwrap();
    drop(client);
    assert!(eventually(|| server.connections() == 0));
}

#[test]
fn tls_echo_serves_a_hundred_concurrent_clients_byte_for_byte() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let (addr, config) = (server.local_addr().unwrap(), files.client());
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let config = Arc::clone(&config);
            thread::spawn(move || {
                let message = payload(fastrand::usize(1..32 * 1024));
                let mut client = tls_connect(addr, &config, "localhost")?;
                tls_round_trip(&mut client, &message)?;
                tls_round_trip(&mut client, &message)
            })
        })
        .collect();
    for (n, client) in clients.into_iter().enumerate() {
        client
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client {n}: {e}"));
    }
    assert!(eventually(|| server.connections() == 0));
}

#[test]
fn handler_sees_tls_transport_sni_server_name_and_negotiated_alpn() {
    let files = TlsFiles::new();
    let tls = files
        .config()
        .with_alpn_protocols(&[b"h2", b"http/1.1"])
        .unwrap();
    let (server, reports) = start_reporting(tls);

    let config = client_config(&files.ca, None, &[b"http/1.1"]);
    let mut client = tls_connect(server.local_addr().unwrap(), &config, "localhost").unwrap();
    tls_round_trip(&mut client, b"hello").unwrap();
    assert_eq!(client.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (transport, tls) = reported_tls(&reports);
    assert_eq!(transport, Transport::Tls);
    assert_eq!(tls.server_name.as_deref(), Some("localhost"));
    assert_eq!(tls.alpn_protocol.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(tls.client_subject, None);

    // A client that asks for an IP address sends no SNI (RFC 6066 allows only host names), and
    // one that offers no protocol negotiates none.
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "127.0.0.1").unwrap();
    tls_round_trip(&mut client, b"hello").unwrap();
    let (_, tls) = reported_tls(&reports);
    assert_eq!(tls.server_name, None);
    assert_eq!(tls.alpn_protocol, None);
}

#[test]
fn clients_stalled_in_the_handshake_delay_no_one_and_are_closed_at_the_deadline() {
    // Long enough that, on a loaded machine, the normal client below is surely done before it
    // runs out for the stalled ones: the test checks that, rather than assume it.
    const DEADLINE: Duration = Duration::from_secs(2);
    const STALLED: usize = 50;
    let files = TlsFiles::new();
    let server = start_tls_echo(
        Server::builder().tls_handshake_timeout(DEADLINE),
        files.config(),
    );
    let addr = server.local_addr().unwrap();
    let hello = Arc::new(client_hello(&files.client()));
    let closed = Arc::new(AtomicUsize::new(0));
    // Half of them send nothing, the others half of a real ClientHello; each waits for its
    // close and returns how long after its connect that came.
    let stalled: Vec<_> = (0..STALLED)
        .map(|n| {
            let (hello, closed) = (Arc::clone(&hello), Arc::clone(&closed));
            // Before the connect: the server's deadline runs from some time after it.
            let connecting = Instant::now();
            let mut stream = TcpStream::connect(addr).expect("connect");
            thread::spawn(move || {
                if n % 2 == 1 {
                    stream.write_all(&hello[..hello.len() / 2])?;
                }
                wait_for_close(&mut stream, PATIENCE)?;
                closed.fetch_add(1, Ordering::SeqCst);
                io::Result::Ok(connecting.elapsed())
            })
        })
        .collect();
    assert!(
        eventually(|| server.connections() == STALLED),
        "{} connections open, not {STALLED}",
        server.connections()
    );

    let started = Instant::now();
    let mut client = tls_connect(addr, &files.client(), "localhost").unwrap();
    tls_round_trip(&mut client, &payload(1000)).unwrap();
    let served_in = started.elapsed();
    assert_eq!(
        closed.load(Ordering::SeqCst),
        0,
        "the normal client took {served_in:?}: the stalled ones were closed before it was done"
    );
    println!("{STALLED} stalled handshakes: a normal client served in {served_in:?}");
    drop(client);

    for (n, client) in stalled.into_iter().enumerate() {
        let lived = client
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("stalled client {n}: {e}"));
        assert!(
            lived >= DEADLINE && lived < DEADLINE + Duration::from_secs(5),
            "stalled client {n} closed after {lived:?}, not at the {DEADLINE:?} deadline"
        );
    }
    assert!(
        eventually(|| server.connections() == 0),
        "{} connections still open",
        server.connections()
    );
}

/// A TLS server whose handshake deadline (30 s) outlasts any test: a client closed within a
/// few seconds was closed for what it sent, not for its slowness.
fn start_tls_echo_with_long_deadline(files: &TlsFiles, builder: taskserve::Builder) -> Server {
    start_tls_echo(
        builder.tls_handshake_timeout(Duration::from_secs(30)),
        files.config(),
    )
}

#[test]
fn garbage_and_plaintext_on_the_tls_port_are_closed_promptly() {
    let files = TlsFiles::new();
    let server = start_tls_echo_with_long_deadline(&files, Server::builder());
    // 0xff is no TLS record type, so no reading of these bytes waits for more.
    let garbage: Vec<u8> = (0..=255u8).rev().cycle().take(1000).collect();
    let inputs: [(&str, &[u8]); 2] = [
        ("garbage", &garbage),
        ("plaintext HTTP", b"GET / HTTP/1.0\r\n\r\n"),
    ];
    for (what, input) in inputs {
        let mut client = connect(server.local_addr().unwrap());
        client.write_all(input).unwrap();
        let closed_in = wait_for_close(&mut client, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        println!("{what} on the TLS port: closed in {closed_in:?}");
    }
    assert!(eventually(|| server.connections() == 0));
    // Each a failed handshake: rustls is not asked to fail the same bytes twice (its debug
    // builds assert that a session sends one fatal alert, and the connection panicked).
    let stats = server.stats();
    assert_eq!(stats.closed(CloseReason::HandlerPanic), 0);
    assert_eq!(stats.closed(CloseReason::HandshakeFailed), 2);
    // And the port still serves TLS.
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").unwrap();
    tls_round_trip(&mut client, b"still serving").unwrap();
}

#[test]
fn connections_in_their_handshake_count_against_the_connection_limit() {
    let files = TlsFiles::new();
    let server = start_tls_echo_with_long_deadline(&files, Server::builder().max_connections(2));
    let addr = server.local_addr().unwrap();
    let _stalled = [connect(addr), connect(addr)];
    assert!(eventually(|| server.connections() == 2));
    let mut third = connect(addr);
    let closed_in = wait_for_close(&mut third, Duration::from_secs(5))
        .expect("the third client is closed at once");
    println!("past the limit during two handshakes: closed in {closed_in:?}");
    let refused = tls_connect(addr, &files.client(), "localhost");
    assert!(refused.is_err(), "a TLS client past the limit handshook");
}

/// Writes `pair` over the server's certificate and key files.
fn replace_files(files: &TlsFiles, pair: &Pair) {
    std::fs::write(&files.cert, &pair.cert_pem).unwrap();
    std::fs::write(&files.key, &pair.key_pem).unwrap();
}

#[test]
fn reload_tls_serves_new_clients_the_new_certificate_and_keeps_open_sessions() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let (addr, config) = (server.local_addr().unwrap(), files.client());
    let mut before = tls_connect(addr, &config, "localhost").unwrap();
    tls_round_trip(&mut before, b"before the reload").unwrap();
    assert_eq!(server_cert(&before), files.server.cert);

    let renewed = files.ca.server_pair();
    replace_files(&files, &renewed);
    server.reload_tls().expect("reload the new pair");

    // A new client: one that kept a session would resume it, and see the certificate that
    // session was made with (tests/tls_resume.rs).
    let mut after = tls_connect(addr, &files.client(), "localhost").unwrap();
    assert_eq!(
        server_cert(&after),
        renewed.cert,
        "a new client sees the new cert"
    );
    tls_round_trip(&mut after, b"after the reload").unwrap();
    tls_round_trip(&mut before, b"an open session goes on").unwrap();
}

#[test]
fn reload_tls_with_a_broken_file_names_it_and_keeps_the_old_pair() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let (addr, config) = (server.local_addr().unwrap(), files.client());
    let other = files.ca.server_pair();
    let (cert, key) = (
        files.cert.display().to_string(),
        files.key.display().to_string(),
    );
    let cases = [
        "missing certificate",
        "certificate not PEM",
        "missing key",
        "key of another certificate",
    ];
    for case in cases {
        replace_files(&files, &files.server);
        let expected: &[&str] = match case {
            "missing certificate" => {
                std::fs::remove_file(&files.cert).unwrap();
                &[&cert, "No such file"]
            }
            "certificate not PEM" => {
                std::fs::write(&files.cert, "not a certificate\n").unwrap();
                &[&cert, "no certificate"]
            }
            "missing key" => {
                std::fs::remove_file(&files.key).unwrap();
                &[&key, "No such file"]
            }
            _ => {
                std::fs::write(&files.key, &other.key_pem).unwrap();
                &[&cert, &key, "do not go together"]
            }
        };
        let e = server
            .reload_tls()
            .expect_err(&format!("{case}: reload fails"));
        let message = e.to_string();
        for part in expected {
            assert!(message.contains(part), "{case}: {message:?} lacks {part:?}");
        }
        println!("{case}: {e} ({:?})", e.kind());
        let mut client = tls_connect(addr, &config, "localhost").unwrap();
        assert_eq!(
            server_cert(&client),
            files.server.cert,
            "{case}: the old pair is still in use"
        );
        tls_round_trip(&mut client, b"still served").unwrap();
    }
}

/// A server that asks for client certificates signed by `files.ca`, reporting each
/// connection to the test.
fn start_with_client_ca(files: &TlsFiles) -> (Server, mpsc::Receiver<ConnectionInfo>) {
    let ca_file = files.dir.join("clients-ca.pem");
    std::fs::write(&ca_file, files.ca.cert_pem()).unwrap();
    start_reporting(files.config().with_client_ca_file(&ca_file).unwrap())
}

/// An echo server on one TLS listener that reports each connection's info to the receiver.
fn start_reporting(tls: TlsConfig) -> (Server, mpsc::Receiver<ConnectionInfo>) {
    let (report, reports) = mpsc::channel();
    let server = Server::builder()
        .threads(2)
        .listen_tls("127.0.0.1:0", tls)
        .start(reporting_echo(report))
        .unwrap();
    (server, reports)
}

/// What a client whose handshake the server refuses sees: with TLS 1.3 its own side of the
/// handshake completes, and the server's alert comes with the first read.
/// rustls reports the alert as an [`io::ErrorKind::InvalidData`] error, `received fatal alert:
/// {alert}`; this checks that it is `alert`.
fn assert_refused_with(server: &Server, config: &Arc<ClientConfig>, alert: &str) {
    let outcome = tls_connect(server.local_addr().unwrap(), config, "localhost")
        .and_then(|mut client| tls_round_trip(&mut client, b"let me in"));
    let e = outcome.expect_err("the server refuses the client");
    println!("refused: {e} ({:?})", e.kind());
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert_eq!(e.to_string(), format!("received fatal alert: {alert}"));
}

#[test]
fn a_client_certificate_from_the_client_ca_is_served_and_its_subject_reaches_the_handler() {
    let files = TlsFiles::new();
    let (server, reports) = start_with_client_ca(&files);
    let alice = files.ca.client_pair("alice");
    let config = client_config(&files.ca, Some(&alice), &[]);
    let mut client = tls_connect(server.local_addr().unwrap(), &config, "localhost").unwrap();
    tls_round_trip(&mut client, b"hello, it's alice").unwrap();
    let (_, tls) = reported_tls(&reports);
    assert_eq!(tls.client_subject.as_deref(), Some("CN=alice"));
}

#[test]
fn a_client_without_a_certificate_is_refused_in_the_handshake() {
    let files = TlsFiles::new();
    let (server, reports) = start_with_client_ca(&files);
    assert_refused_with(&server, &files.client(), "CertificateRequired");
    assert!(reports.try_recv().is_err(), "the handler ran");
    assert!(eventually(|| server.connections() == 0));
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_in_the_handshake() {
    let files = TlsFiles::new();
    let (server, reports) = start_with_client_ca(&files);
    let stranger = Ca::new("another CA").client_pair("mallory");
    let config = client_config(&files.ca, Some(&stranger), &[]);
    assert_refused_with(&server, &config, "UnknownCA");
    assert!(reports.try_recv().is_err(), "the handler ran");
    assert!(eventually(|| server.connections() == 0));
}

/// Checks that loading `cert` and `key` fails with an error whose message names `file` and
/// contains `cause`.
fn assert_load_fails(cert: &Path, key: &Path, file: &Path, cause: &str) -> io::Error {
    let e = TlsConfig::from_pem_files(cert, key).expect_err("loading fails");
    let message = e.to_string();
    assert!(
        message.contains(&file.display().to_string()),
        "{message:?} does not name {}",
        file.display()
    );
    assert!(
        message.contains(cause),
        "{message:?} does not say {cause:?}"
    );
    e
}

#[test]
fn bad_certificate_or_key_files_are_errors_naming_the_file_and_the_cause() {
    let files = TlsFiles::new();
    let (cert, key) = (&files.cert, &files.key);
    let missing = files.dir.join("missing.pem");
    let not_pem = files.dir.join("not-pem.txt");
    std::fs::write(&not_pem, "hello, I am not PEM\n").unwrap();
    // A PEM file, but with a key where the certificate should be.
    let key_only = files.dir.join("key-only.pem");
    std::fs::write(&key_only, &files.server.key_pem).unwrap();
    let (_, other_key) = write_pair(&files.dir, "other", &files.ca.server_pair());

    let cases = [
        (
            "missing certificate file",
            &missing,
            key,
            &missing,
            "No such file",
        ),
        (
            "certificate file not PEM",
            &not_pem,
            key,
            &not_pem,
            "no certificate",
        ),
        (
            "no certificate in the PEM",
            &key_only,
            key,
            &key_only,
            "no certificate",
        ),
        (
            "key of another certificate",
            cert,
            &other_key,
            cert,
            "do not go together",
        ),
        (
            "key of another certificate",
            cert,
            &other_key,
            &other_key,
            "do not go together",
        ),
        ("missing key file", cert, &missing, &missing, "No such file"),
        (
            "key file not PEM",
            cert,
            &not_pem,
            &not_pem,
            "no private key",
        ),
    ];
    for (case, cert, key, file, cause) in cases {
        let e = assert_load_fails(cert, key, file, cause);
        println!("{case}: {e} ({:?})", e.kind());
    }
}

#[test]
fn a_tls_handler_that_writes_and_returns_closes_with_close_notify() {
    use taskserve::io::AsyncWriteExt;

    let files = TlsFiles::new();
    let server = Server::builder()
        .threads(2)
        .listen_tls("127.0.0.1:0", files.config())
        .start(|mut conn: taskserve::Connection| async move {
            conn.write_all(b"hello, and goodbye\n").await
        })
        .unwrap();
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").unwrap();
    let (received, outcome) = read_to_close(&mut client);
    assert_eq!(received, b"hello, and goodbye\n");
    outcome.expect("a clean close, with close_notify");
}

/// Starts a TLS server built by `builder` whose handler writes until a write would wait (the
/// socket's buffers are full, and so is rustls's, which holds what was written last), reports
/// how many bytes its writes accepted, and returns, as a handler whose reply is written does.
fn start_filling_tls_server(
    files: &TlsFiles,
    builder: taskserve::Builder,
) -> (Server, mpsc::Receiver<usize>) {
    use taskserve::io::AsyncWriteExt;

    let (report, written) = mpsc::channel();
    let report = std::sync::Mutex::new(report);
    let server = builder
        .threads(2)
        .listen_tls("127.0.0.1:0", files.config())
        .start(move |mut conn: taskserve::Connection| {
            let report = report.lock().unwrap().clone();
            async move {
                let chunk = vec![b'x'; 16 * 1024];
                let mut accepted = 0;
                // Bounded: the buffers fill within a few MiB.
                for _ in 0..10_000 {
                    match smol::future::poll_once(conn.write(&chunk)).await {
                        Some(written) => accepted += written?,
                        None => break,
                    }
                }
                let _ = report.send(accepted);
                Ok(())
            }
        })
        .unwrap();
    (server, written)
}

#[test]
fn a_tls_handler_that_returns_while_its_client_reads_nothing_loses_no_byte() {
    let files = TlsFiles::new();
    let (server, written) = start_filling_tls_server(&files, Server::builder());
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").unwrap();
    // The client reads only once the handler has returned.
    let accepted = written.recv_timeout(PATIENCE).expect("the handler returns");
    let (received, outcome) = read_to_close(&mut client);
    println!(
        "accepted {accepted} bytes; the client received {}: {outcome:?}",
        received.len()
    );
    assert_eq!(received.len(), accepted, "bytes lost at the close");
    outcome.expect("a clean close, with close_notify");
}

#[test]
fn a_tls_client_that_sends_close_notify_gets_every_reply_then_close_notify() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").unwrap();
    let message = payload(64 * 1024);
    client.write_all(&message).unwrap();
    client.conn.send_close_notify();
    client.flush().unwrap();
    let (received, outcome) = read_to_close(&mut client);
    let mut echoed = Vec::new();
    Unprefixer::default().feed(&received, &mut echoed);
    assert!(echoed == message, "the replies differ from what was sent");
    outcome.expect("a clean close, with close_notify");
}

#[test]
fn a_tls_client_that_never_reads_its_last_replies_is_dropped_at_the_close_deadline() {
    // Long enough that a server that dropped the client at once, without waiting for the
    // deadline, could not take as long on a busy machine.
    const DEADLINE: Duration = Duration::from_secs(2);
    let files = TlsFiles::new();
    // No idle timeout: only the close deadline ends the connection.
    let builder = Server::builder()
        .idle_timeout(Duration::ZERO)
        .tls_handshake_timeout(DEADLINE);
    let (server, written) = start_filling_tls_server(&files, builder);
    // Before the connect: the deadline runs from the handler's return, some time after it.
    let connecting = Instant::now();
    let _client = tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").unwrap();
    written.recv_timeout(PATIENCE).expect("the handler returns");
    let returned = Instant::now();
    assert!(
        eventually(|| server.connections() == 0),
        "a client that reads nothing still holds its connection"
    );
    let (lived, held) = (connecting.elapsed(), returned.elapsed());
    println!("held {held:?} after the handler returned, {lived:?} after the connect");
    assert!(
        lived >= DEADLINE,
        "dropped {lived:?} after the connect, before the deadline"
    );
    assert!(
        held < DEADLINE * 5,
        "held for {held:?} after the handler returned"
    );
}
