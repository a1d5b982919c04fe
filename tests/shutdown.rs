//! Stopping: on SIGTERM (or `Server::stop`) the server stops accepting, lets open connections
//! finish for up to the shutdown timeout, closes the rest and exits 0; a second signal hurries it.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use taskserve::{Server, StopHandle};

const KIB: usize = 1024;

/// Whether the server has released its port: a new connection is refused.
fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_err()
}

/// Payload bytes a streaming client has had back, verified, for its writer to keep within a
/// window of them.
#[derive(Default)]
struct Received {
    bytes: Mutex<usize>,
    changed: Condvar,
}

impl Received {
    fn get(&self) -> usize {
        *self.bytes.lock().unwrap()
    }
}

/// A client that sends its message over and over, in chunks, from one thread while another
/// reads and checks the replies, until told to stop; then it half-closes and reads to the end.
struct StreamingClient {
    received: Arc<Received>,
    writer: JoinHandle<io::Result<usize>>,
    reader: JoinHandle<io::Result<usize>>,
}

impl StreamingClient {
    /// Unread replies a writer allows itself: it keeps the drain short and the test's memory flat.
    const WINDOW: usize = 512 * KIB;
    const CHUNK: usize = 16 * KIB;
    /// A bound on what one client sends, whatever happens.
    const MAX_SENT: usize = 1 << 30;

    fn start(addr: SocketAddr, stop: &Arc<AtomicBool>) -> StreamingClient {
        let message = Arc::new(payload(64 * KIB));
        let mut writer_end = connect(addr);
        let mut reader_end = writer_end.try_clone().unwrap();
        let received = Arc::new(Received::default());
        let writer = thread::spawn({
            let (message, received, stop) = (message.clone(), received.clone(), stop.clone());
            move || {
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) && sent < Self::MAX_SENT {
                    let (bytes, timeout) = received
                        .changed
                        .wait_timeout_while(received.bytes.lock().unwrap(), PATIENCE, |got| {
                            sent - *got > Self::WINDOW
                        })
                        .unwrap();
                    if timeout.timed_out() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no reply for {PATIENCE:?}; {sent} bytes sent, {bytes} back"),
                        ));
                    }
                    drop(bytes);
                    let at = sent % message.len();
                    let chunk = &message[at..message.len().min(at + Self::CHUNK)];
                    writer_end.write_all(chunk)?;
                    sent += chunk.len();
                }
                writer_end.shutdown(Shutdown::Write)?;
                Ok(sent)
            }
        });
        let reader = thread::spawn({
            let received = received.clone();
            move || {
                let mut unprefixer = Unprefixer::default();
                let (mut buf, mut echoed) = (vec![0; 64 * KIB], Vec::new());
                let mut total = 0;
                // Bounded: every pass reads at least a byte, within the read timeout.
                loop {
                    let n = read_some(&mut reader_end, &mut buf)?;
                    if n == 0 {
                        return Ok(total);
                    }
                    echoed.clear();
                    unprefixer.feed(&buf[..n], &mut echoed);
                    if !is_cyclic_part(&message, total, &echoed) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("wrong bytes echoed after {total} right ones"),
                        ));
                    }
                    total += echoed.len();
                    *received.bytes.lock().unwrap() = total;
                    received.changed.notify_all();
                }
            }
        });
        StreamingClient {
            received,
            writer,
            reader,
        }
    }

    /// Waits for both halves: the bytes sent and the bytes echoed.
    fn finish(self) -> (usize, usize) {
        let sent = self.writer.join().unwrap().expect("send");
        let echoed = self.reader.join().unwrap().expect("read the replies");
        (sent, echoed)
    }
}

/// Whether `part` is what `message` repeated forever holds from offset `at`.
fn is_cyclic_part(message: &[u8], at: usize, part: &[u8]) -> bool {
    let mut at = at % message.len();
    let mut rest = part;
    // At most part.len() / message.len() + 2 rounds.
    while !rest.is_empty() {
        let n = rest.len().min(message.len() - at);
        if rest[..n] != message[at..at + n] {
            return false;
        }
        rest = &rest[n..];
        at = (at + n) % message.len();
    }
    true
}

#[test]
fn sigterm_lets_streaming_clients_finish_then_exits_0() {
    const CLIENTS: usize = 20;
    // A shutdown timeout no test run reaches: the exit comes from the drain's end, not from it.
    let mut server = EchoProcess::start(&["--quiet", "--threads", "2", "--shutdown-timeout", "60"]);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| StreamingClient::start(server.addr, &stop))
        .collect();
    assert!(
        eventually(|| clients.iter().all(|c| c.received.get() >= 256 * KIB)),
        "the clients did not get going"
    );

    let signalled = Instant::now();
    server.signal("TERM");
    assert!(
        eventually(|| refuses_connections(server.addr)),
        "still accepting after SIGTERM"
    );
    let released = signalled.elapsed();
    // Draining, not just flushing: the open connections are still served.
    let at_release: Vec<usize> = clients.iter().map(|c| c.received.get()).collect();
    assert!(
        eventually(|| clients
            .iter()
            .zip(&at_release)
            .all(|(c, &then)| c.received.get() >= then + 256 * KIB)),
        "open connections are not served after the signal"
    );
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (n, client) in clients.into_iter().enumerate() {
        let (sent, echoed) = client.finish();
        assert_eq!(echoed, sent, "client {n}: replies for every byte it sent");
        total += sent;
    }
    let code = server.wait_exit();
    let exited = signalled.elapsed();
    println!(
        "SIGTERM: port released after {released:?}; {CLIENTS} clients finished ({} MiB in all); exit code {code:?} after {exited:?}",
        total >> 20
    );
    assert_eq!(code, Some(0));
    assert!(
        exited < Duration::from_secs(60),
        "took {exited:?}, the whole shutdown timeout"
    );
}

/// Clients that finished an exchange and stay connected without a word.
fn idle_clients(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|n| {
            let mut client = connect(addr);
            round_trip(&mut client, format!("client {n}").as_bytes());
            client
        })
        .collect()
}

#[test]
fn sigterm_closes_connections_still_open_after_the_shutdown_timeout() {
    let mut server = EchoProcess::start(&["--quiet", "--threads", "2", "--shutdown-timeout", "1"]);
    let mut clients = idle_clients(server.addr, 5);
    let signalled = Instant::now();
    server.signal("TERM");
    for (n, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            read_some(client, &mut [0; 1]).unwrap(),
            0,
            "client {n}: EOF"
        );
        let closed = signalled.elapsed();
        assert!(
            closed >= Duration::from_millis(950),
            "client {n} closed after {closed:?}, before the 1 s shutdown timeout"
        );
    }
    let closed = signalled.elapsed();
    let code = server.wait_exit();
    let exited = signalled.elapsed();
    println!("--shutdown-timeout 1: clients closed after {closed:?}; exit code {code:?} after {exited:?}");
    assert_eq!(code, Some(0));
    assert!(exited < Duration::from_secs(10), "exited after {exited:?}");
}

#[test]
fn second_signal_during_the_drain_exits_at_once() {
    let mut server = EchoProcess::start(&["--quiet", "--threads", "2", "--shutdown-timeout", "30"]);
    let mut clients = idle_clients(server.addr, 2);
    server.signal("TERM");
    // The port is released once the first signal is handled: the drain has begun.
    assert!(eventually(|| refuses_connections(server.addr)));
    let hurried = Instant::now();
    server.signal("INT");
    for (n, client) in clients.iter_mut().enumerate() {
        assert_eq!(
            read_some(client, &mut [0; 1]).unwrap(),
            0,
            "client {n}: EOF"
        );
    }
    let code = server.wait_exit();
    let exited = hurried.elapsed();
    println!("second signal: exit code {code:?} after {exited:?}");
    assert_eq!(code, Some(0));
    // At once, next to the 30 s timeout it would otherwise wait.
    assert!(
        exited < Duration::from_secs(10),
        "exited {exited:?} after the second signal"
    );
}

/// An echo server whose shutdown timeout (30 s) outlasts any test: a stop that returns in time
/// did so because its connections ended or it was asked to hurry, not because the timeout ran out.
fn start_echo_with_long_drain() -> Server {
    start_echo_with(
        Server::builder()
            .threads(2)
            .shutdown_timeout(Duration::from_secs(30)),
    )
}

#[test]
fn stop_lets_an_unfinished_exchange_complete_and_frees_the_port() {
    let server = start_echo_with_long_drain();
    let addr = server.local_addr().unwrap();
    let mut client = connect(addr);
    let data = payload(64 * KIB);
    // Half of the exchange before the stop...
    client.write_all(&data[..32 * KIB]).unwrap();
    let (done, stopped) = mpsc::channel();
    thread::spawn(move || {
        server.stop();
        done.send(()).unwrap();
    });
    assert!(eventually(|| refuses_connections(addr)), "still accepting");
    // ...and the rest during it.
    client.write_all(&data[32 * KIB..]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let echoed = read_payload(&mut client, data.len()).expect("read the replies");
    assert!(echoed == data, "the reply differs from what was sent");
    assert_eq!(
        read_some(&mut client, &mut [0; 1]).unwrap(),
        0,
        "EOF after the replies"
    );
    let closed = Instant::now();
    stopped
        .recv_timeout(PATIENCE)
        .expect("stop returns once the last connection has ended");
    println!(
        "stop returned {:?} after the last connection ended",
        closed.elapsed()
    );
    TcpListener::bind(addr).expect("the port is free after stop returns");
}

/// A server with a long shutdown timeout, waiting in [`Server::wait`] on another thread, and a
/// client it has served; the receiver hears when `wait` returns.
fn waiting_server_with_a_client() -> (SocketAddr, StopHandle, mpsc::Receiver<()>, TcpStream) {
    let server = start_echo_with_long_drain();
    let (addr, handle) = (server.local_addr().unwrap(), server.stop_handle());
    let (done, returned) = mpsc::channel();
    thread::spawn(move || {
        server.wait();
        done.send(()).unwrap();
    });
    let mut client = connect(addr);
    round_trip(&mut client, b"served while running");
    (addr, handle, returned, client)
}

#[test]
fn stop_handle_from_another_thread_makes_wait_return_after_the_drain() {
    let (addr, handle, returned, mut client) = waiting_server_with_a_client();
    thread::spawn(move || handle.stop()).join().unwrap();
    assert!(eventually(|| refuses_connections(addr)), "still accepting");
    round_trip(&mut client, b"served while draining");
    assert!(
        returned.try_recv().is_err(),
        "wait returned with a connection open"
    );
    drop(client);
    returned
        .recv_timeout(PATIENCE)
        .expect("wait returns once the last connection has ended");
    TcpListener::bind(addr).expect("the port is free after wait returns");
}

#[test]
fn second_stop_request_closes_open_connections_at_once() {
    let (addr, handle, returned, mut client) = waiting_server_with_a_client();
    handle.stop();
    assert!(eventually(|| refuses_connections(addr)), "still accepting");
    let hurried = Instant::now();
    handle.stop();
    assert_eq!(read_some(&mut client, &mut [0; 1]).unwrap(), 0, "EOF");
    returned
        .recv_timeout(PATIENCE)
        .expect("wait returns at once after a second request");
    println!(
        "second stop request: wait returned after {:?}",
        hurried.elapsed()
    );
}

#[test]
fn one_stop_request_during_stop_closes_open_connections_at_once() {
    let server = start_echo_with_long_drain();
    let (addr, handle) = (server.local_addr().unwrap(), server.stop_handle());
    let mut client = connect(addr);
    round_trip(&mut client, b"served while running");
    let (done, returned) = mpsc::channel();
    thread::spawn(move || {
        server.stop();
        done.send(()).unwrap();
    });
    assert!(eventually(|| refuses_connections(addr)), "still accepting");
    // stop() is the first request already: one more is the second, and hurries it.
    handle.stop();
    assert_eq!(read_some(&mut client, &mut [0; 1]).unwrap(), 0, "EOF");
    returned
        .recv_timeout(PATIENCE)
        .expect("stop returns at once after a request made during its drain");
}

#[test]
fn a_handler_can_stop_its_own_server() {
    let server = Server::builder()
        .threads(2)
        .shutdown_timeout(Duration::from_secs(30))
        .listen_tcp("127.0.0.1:0")
        .start(|mut conn: taskserve::Connection| async move {
            use smol::io::AsyncWriteExt;
            conn.stop_handle().stop();
            conn.write_all(b"stopping").await
        })
        .unwrap();
    let addr = server.local_addr().unwrap();
    let mut client = connect(addr);
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"stopping", "the handler ran to its end");
    server.wait();
    TcpListener::bind(addr).expect("the port is free once stopped");
}

#[test]
fn server_stop_called_from_its_own_handler_neither_waits_nor_joins_itself() {
    // The server sits in a slot its own handler can reach, as an embedder's might.
    let slot: Arc<Mutex<Option<Server>>> = Arc::default();
    let handler_slot = Arc::clone(&slot);
    let server = Server::builder()
        .threads(2)
        .shutdown_timeout(Duration::from_secs(30))
        .listen_tcp("127.0.0.1:0")
        .start(move |mut stream: taskserve::Connection| {
            let slot = Arc::clone(&handler_slot);
            async move {
                use smol::io::AsyncWriteExt;
                let server = slot.lock().unwrap().take();
                if let Some(server) = server {
                    // On a worker thread: stop() must neither wait for this very task nor
                    // join this thread.
                    server.stop();
                }
                stream.write_all(b"stopping").await
            }
        })
        .unwrap();
    let addr = server.local_addr().unwrap();
    *slot.lock().unwrap() = Some(server);

    let mut client = connect(addr);
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"stopping", "the handler ran to its end");
    assert!(
        eventually(|| TcpListener::bind(addr).is_ok()),
        "the port was not released"
    );
}

/// Panics when dropped: a handler's state with a buggy destructor.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("a destructor that panics");
    }
}

#[test]
fn a_handler_whose_drop_panics_is_closed_without_aborting_the_process() {
    let server = Server::builder()
        .threads(2)
        .shutdown_timeout(Duration::from_millis(100))
        .listen_tcp("127.0.0.1:0")
        .start(|_stream: taskserve::Connection| async {
            let _state = PanicsOnDrop;
            std::future::pending::<io::Result<()>>().await
        })
        .unwrap();
    let mut client = connect(server.local_addr().unwrap());
    assert!(eventually(|| server.connections() == 1));
    // The drain times out and the task is cancelled: dropping its future panics. Before the
    // fix this aborted the whole test process.
    server.stop();
    // EOF or a reset; a read that timed out would mean the connection was never closed.
    wait_for_silent_close(&mut client, PATIENCE).expect("the client sees its connection close");
}

#[test]
fn stop_handle_stops_the_server_when_nobody_waits() {
    let server = start_echo_with_long_drain();
    let addr = server.local_addr().unwrap();
    let mut client = connect(addr);
    round_trip(&mut client, b"served while running");
    server.stop_handle().stop();
    // Nobody calls wait(): the stop goes on all the same.
    assert!(eventually(|| refuses_connections(addr)), "still accepting");
    round_trip(&mut client, b"served while draining");
    drop(client);
    assert!(
        eventually(|| server.connections() == 0),
        "the client's close was not seen"
    );
    assert!(
        eventually(|| TcpListener::bind(addr).is_ok()),
        "the port was not released"
    );
}

#[test]
fn connections_can_be_read_while_another_thread_waits() {
    let server = start_echo_with_long_drain();
    let handle = server.stop_handle();
    let mut client = connect(server.local_addr().unwrap());
    round_trip(&mut client, b"hello");
    thread::scope(|s| {
        let waiting = s.spawn(|| server.wait());
        assert_eq!(server.connections(), 1);
        handle.stop();
        assert!(eventually(|| refuses_connections(
            server.local_addr().unwrap()
        )));
        assert!(
            !waiting.is_finished(),
            "wait returned with a connection open"
        );
        drop(client);
        waiting.join().unwrap();
    });
    assert_eq!(server.connections(), 0);
}

#[test]
fn sighup_is_logged_and_the_server_keeps_serving() {
    let mut server = EchoProcess::start(&["--threads", "1"]);
    let mut log = server.stderr_lines();
    let mut client = connect(server.addr);
    round_trip(&mut client, b"before");
    server.signal("HUP");
    let logged = log.find(|line| line.contains("SIGHUP"));
    assert!(logged.contains("still serving"), "{logged}");
    round_trip(&mut client, b"after");
    assert!(server.child.try_wait().unwrap().is_none(), "echo exited");
    server.signal("TERM");
    drop(client);
    assert_eq!(server.wait_exit(), Some(0));
}

#[test]
fn a_handler_hears_a_graceful_stop_and_says_goodbye_before_the_timeout() {
    let server = Server::builder()
        .threads(2)
        .shutdown_timeout(Duration::from_secs(60))
        .listen_tcp("127.0.0.1:0")
        .start(|mut conn: taskserve::Connection| async move {
            use smol::io::AsyncWriteExt;
            conn.write_all(b"hello\n").await?;
            conn.stop_handle().clone().stopping().await;
            conn.write_all(b"server shutting down\n").await
        })
        .unwrap();
    let mut client = connect(server.local_addr().unwrap());
    let mut hello = [0; 6];
    client.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello\n");
    // The drain ends when the handler does, long before the 60 s timeout would close it.
    let stopping = Instant::now();
    server.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(30),
        "the stop waited for the shutdown timeout"
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"server shutting down\n");
}
