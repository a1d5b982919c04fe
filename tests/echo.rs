//! The library in-process: the `GOT:` protocol over real sockets, many clients at once, custom
//! handlers, and the errors `Builder::start` returns.

mod common;

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{
    connect, eventually, exchange, is_prefixed_echo, payload, read_payload, round_trip, start_echo,
    timed_out, worker_thread_names, STALLED,
};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use taskserve::{Server, READ_SIZE};

/// Ends `client`'s side of the connection and returns everything the server sends until it
/// closes its side.
fn finish(client: &mut TcpStream) -> Vec<u8> {
    client
        .shutdown(Shutdown::Write)
        .expect("shut down the write side");
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .expect("read until the server closes");
    rest
}

#[test]
fn echo_prefixes_a_message_with_got() {
    let server = start_echo();
    let mut client = connect(server.local_addr().unwrap());
    exchange(&mut client, b"Hello\n", b"GOT:Hello\n");
    assert_eq!(finish(&mut client), b"", "bytes after the reply");
    server.stop();
}

#[test]
fn echo_answers_each_message_on_one_connection_in_order() {
    let server = start_echo();
    let mut client = connect(server.local_addr().unwrap());
    for message in ["one\n", "two\n", "three\n", "Hello, again\n"] {
        exchange(
            &mut client,
            message.as_bytes(),
            format!("GOT:{message}").as_bytes(),
        );
    }
    assert_eq!(finish(&mut client), b"", "bytes after the last reply");
    server.stop();
}

#[test]
fn echo_serves_a_hundred_concurrent_clients_byte_for_byte() {
    const CLIENTS: usize = 100;
    const MESSAGES: usize = 3;
    let server = start_echo();
    // All connected before any sends, so the hundred conversations really overlap.
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| connect(server.local_addr().unwrap()))
        .collect();
    assert!(
        eventually(|| server.connections() == CLIENTS),
        "the server has {} connections open, not {CLIENTS}",
        server.connections()
    );
    thread::scope(|scope| {
        for mut client in clients {
            scope.spawn(move || {
                for _ in 0..MESSAGES {
                    round_trip(&mut client, &payload(fastrand::usize(1..=100 * 1024)));
                }
                assert_eq!(finish(&mut client), b"", "bytes after the last reply");
            });
        }
    });
    server.stop();
}

#[test]
fn echo_returns_a_message_larger_than_read_size_whole_in_chunks_of_at_most_read_size() {
    let server = start_echo();
    let mut client = connect(server.local_addr().unwrap());
    let message = payload(1024 * 1024);
    // Write from another thread while this one reads: the server stops reading from a client
    // that does not read its replies, so writing it all first could wait forever.
    let mut writer = client.try_clone().expect("clone the client socket");
    let reply = thread::scope(|scope| {
        scope.spawn(|| {
            writer.write_all(&message).expect("send");
            writer
                .shutdown(Shutdown::Write)
                .expect("shut down the write side");
        });
        let mut reply = Vec::new();
        client
            .read_to_end(&mut reply)
            .expect("read until the server closes");
        reply
    });
    // `payload` has no `G`, so each `G` in the reply starts a `GOT:` prefix.
    let mut chunks = reply.split(|&b| b == b'G');
    assert_eq!(
        chunks.next(),
        Some(&b""[..]),
        "reply does not start with GOT:"
    );
    let mut echoed = Vec::with_capacity(message.len());
    for chunk in chunks {
        let data = chunk.strip_prefix(b"OT:").expect("malformed prefix");
        assert!(
            (1..=READ_SIZE).contains(&data.len()),
            "a chunk of {} bytes",
            data.len()
        );
        echoed.extend_from_slice(data);
    }
    assert_eq!(echoed.len(), message.len(), "bytes echoed");
    assert!(echoed == message, "the reply differs from what was sent");
    server.stop();
}

#[test]
fn echo_stops_reading_from_a_client_that_reads_no_replies_and_loses_nothing() {
    // Far more than the sockets' buffers hold (the kernel grows them to a few MiB at most).
    const LIMIT: usize = 64 * 1024 * 1024;
    let server = start_echo();
    let mut client = connect(server.local_addr().unwrap());
    let block = payload(64 * 1024);
    // A write that waits this long finds every buffer on the way full: the server has stopped
    // reading, as it must while its replies cannot be sent.
    client.set_write_timeout(Some(STALLED)).unwrap();
    let mut sent = 0;
    loop {
        match client.write(&block[sent % block.len()..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => break,
            Err(e) => panic!("send: {e}"),
        }
        assert!(
            sent < LIMIT,
            "the server read {sent} bytes from a client that read none of its replies"
        );
    }
    // Now every byte sent comes back, and then the close.
    let echoed = read_payload(&mut client, sent).expect("read the replies");
    let expected: Vec<u8> = block.iter().copied().cycle().take(sent).collect();
    assert!(echoed == expected, "the replies differ from what was sent");
    assert_eq!(finish(&mut client), b"", "bytes after the last reply");
    server.stop();
}

#[test]
fn echo_returns_every_byte_value_unchanged() {
    let server = start_echo();
    let mut client = connect(server.local_addr().unwrap());
    // Every value, including NUL, CR, LF and bytes above 127, and a `GOT:` of the client's own.
    let mut message: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
    message.extend_from_slice(b"\r\nGOT:\0GOT:");
    client.write_all(&message).expect("send");
    let reply = finish(&mut client);
    assert!(
        is_prefixed_echo(&reply, &message),
        "reply is not the message behind GOT: prefixes: {reply:?}"
    );
    server.stop();
}

#[test]
fn echo_replies_to_data_sent_with_the_close_and_then_closes() {
    let server = start_echo();
    let mut client = connect(server.local_addr().unwrap());
    // The data and the end of the client's side arrive together: the reply must still come.
    client.write_all(b"bye").expect("send");
    assert_eq!(
        String::from_utf8_lossy(&finish(&mut client)),
        "GOT:bye",
        "what came before the server closed"
    );
    server.stop();
}

/// Upper-cases every byte it reads and sends it back.
async fn shout(mut stream: taskserve::Connection) -> io::Result<()> {
    let mut buf = [0; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        buf[..n].make_ascii_uppercase();
        stream.write_all(&buf[..n]).await?;
    }
}

#[test]
fn start_serves_a_custom_handler() {
    let server = Server::builder()
        .threads(2)
        .listen_tcp("127.0.0.1:0")
        .start(shout)
        .expect("server starts on an ephemeral port");
    let mut client = connect(server.local_addr().unwrap());
    exchange(&mut client, b"hello, world\n", b"HELLO, WORLD\n");
    exchange(&mut client, b"quiet, please\n", b"QUIET, PLEASE\n");
    assert_eq!(finish(&mut client), b"", "bytes after the last reply");
    server.stop();
}

#[test]
fn handler_receives_the_clients_address() {
    let server = Server::builder()
        .threads(1)
        .listen_tcp("127.0.0.1:0")
        .start(|mut conn: taskserve::Connection| async move {
            let peer = conn.peer_addr().clone();
            conn.write_all(format!("hello, {peer}\n").as_bytes()).await
        })
        .expect("server starts on an ephemeral port");
    let mut client = connect(server.local_addr().unwrap());
    let mut greeting = String::new();
    client
        .read_to_string(&mut greeting)
        .expect("read until the server closes");
    let me = client.local_addr().unwrap();
    assert_eq!(greeting, format!("hello, {me}\n"));
    server.stop();
}

#[test]
fn start_runs_the_requested_number_of_named_worker_threads_until_stop() {
    // No other test in this file asks for this many threads, so `taskserve-w4` is this server's;
    // lower numbers may belong to servers of tests running at the same time.
    const THREADS: usize = 5;
    let server = Server::builder()
        .threads(THREADS)
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .expect("server starts on an ephemeral port");
    assert_eq!(server.threads(), THREADS);
    let last = format!("taskserve-w{}", THREADS - 1);
    // A thread names itself once it runs, a moment after `start` has spawned it.
    assert!(
        eventually(|| {
            let names = worker_thread_names("self");
            (0..THREADS).all(|n| names.contains(&format!("taskserve-w{n}")))
        }),
        "worker threads: {:?}",
        worker_thread_names("self")
    );
    let mut client = connect(server.local_addr().unwrap());
    round_trip(&mut client, b"still served");
    drop(client);
    server.stop();
    // `stop` joins the workers; the kernel may list an ended thread a moment longer.
    assert!(
        eventually(|| !worker_thread_names("self").contains(&last)),
        "{last} still runs after stop"
    );
}

#[test]
fn start_rejects_zero_threads_connections_or_connections_per_client() {
    let zero = [
        ("zero threads", Server::builder().threads(0)),
        ("zero connections", Server::builder().max_connections(0)),
        (
            "zero connections per client",
            Server::builder().max_connections_per_ip(0),
        ),
    ];
    for (what, builder) in zero {
        let error = builder
            .listen_tcp("127.0.0.1:0")
            .start(taskserve::echo)
            .expect_err(what);
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{what}");
    }
}

#[test]
fn start_without_a_listener_is_invalid_input() {
    let e = Server::builder()
        .threads(2)
        .start(taskserve::echo)
        .expect_err("nothing to listen on");
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().starts_with("no listener to start"), "{e}");
}

#[test]
fn start_on_a_port_in_use_fails_with_addr_in_use_naming_the_address() {
    // Occupied by another taskserve server: both sockets allow address reuse, which must still
    // not let two servers share a port.
    let first = start_echo();
    let addr = first.local_addr().unwrap();
    let err = Server::builder()
        .threads(1)
        .listen_tcp(addr)
        .start(taskserve::echo)
        .expect_err("a second server on the same port");
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    // And by a plain std listener.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let addr = taken.local_addr().unwrap();
    let err = Server::builder()
        .threads(1)
        .listen_tcp(addr)
        .start(taskserve::echo)
        .expect_err("a server on a port in use");
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    // The first server is unharmed.
    round_trip(&mut connect(first.local_addr().unwrap()), b"still here");
    first.stop();
}

#[test]
fn a_handler_that_blocks_either_worker_leaves_the_other_serving_clients() {
    // Whichever worker a blocking handler holds, the other must still see I/O and serve
    // clients, so block each of the two in turn: a client that sends `block` holds its worker
    // in a blocking call until the test releases it.
    let (blocked_tx, blocked) = mpsc::channel::<String>();
    let (release_tx, released) = mpsc::channel::<()>();
    let blocked_tx = Arc::new(Mutex::new(blocked_tx));
    let released = Arc::new(Mutex::new(released));
    let server = Server::builder()
        .threads(2)
        .listen_tcp("127.0.0.1:0")
        .start(move |mut conn: taskserve::Connection| {
            let (blocked_tx, released) = (Arc::clone(&blocked_tx), Arc::clone(&released));
            async move {
                let mut first = [0; 5];
                conn.read_exact(&mut first).await?;
                if &first == b"block" {
                    let worker = thread::current().name().unwrap_or_default().to_string();
                    blocked_tx.lock().unwrap().send(worker).unwrap();
                    // Blocks this worker thread, as a handler that makes a blocking call does.
                    let _ = released.lock().unwrap().recv();
                    return Ok(());
                }
                conn.write_all(b"GOT:").await?;
                conn.write_all(&first).await?;
                taskserve::echo(conn).await
            }
        })
        .expect("server starts on an ephemeral port");
    // Dropped before the server if an assertion fails, so that stopping it does not wait for
    // a handler that nobody will release.
    let release = release_tx;
    let mut seen = HashSet::new();
    // Each attempt blocks a worker picked by the executor: 40 attempts all pick the same one
    // with a chance of 2 in a trillion.
    for _ in 0..40 {
        let mut holder = connect(server.local_addr().unwrap());
        holder.write_all(b"block").unwrap();
        let worker = blocked
            .recv_timeout(Duration::from_secs(10))
            .expect("the blocking handler runs");
        let mut client = connect(server.local_addr().unwrap());
        client.write_all(b"hello").unwrap();
        let mut reply = [0; 9];
        client
            .read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("no reply while {worker} is blocked: {e}"));
        assert_eq!(&reply, b"GOT:hello");
        release.send(()).unwrap();
        seen.insert(worker);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "only {seen:?} was ever blocked");
    server.stop();
}
