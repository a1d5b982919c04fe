//! Replacing a running server while clients keep connecting: a stop serves the clients already
//! queued on its listener, and a restart (start the new process, SIGTERM the old) refuses and
//! resets no one when the listening socket outlives the process, as docs/operations.md's "Restarts
//! without refused connections" recommends. (A `--reuse-port` restart, with or without
//! `net.ipv4.tcp_migrate_req=1`, reset a client every few dozen restarts here: no test can
//! assert zero for it.)
#![cfg(unix)]

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Instant;

use common::*;
use taskserve::Server;

/// What a client loop saw.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Seen {
    served: usize,
    refused: usize,
    reset: usize,
    /// Replies that were not exactly `GOT:` and the message: short, cut, timed out.
    wrong: usize,
}

/// Clients in `threads` threads, each connecting, making one round trip and closing, again and
/// again until `done` is set, [`PATIENCE`] passes or it has made 100,000 connections.
struct ClientLoop {
    done: Arc<AtomicBool>,
    /// Round trips that came back whole, so far, in all threads.
    served: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<Seen>>,
}

impl ClientLoop {
    fn start(addr: SocketAddr, threads: usize) -> ClientLoop {
        let done = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|t| {
                let done = Arc::clone(&done);
                let served = Arc::clone(&served);
                thread::spawn(move || {
                    let deadline = Instant::now() + PATIENCE;
                    let mut seen = Seen::default();
                    for n in 0..100_000 {
                        if done.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        match one_round_trip(addr, format!("client {t} round {n}").as_bytes()) {
                            Ok(true) => {
                                seen.served += 1;
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(false) => seen.wrong += 1,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                                seen.refused += 1
                            }
                            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => seen.reset += 1,
                            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => seen.reset += 1,
                            Err(_) => seen.wrong += 1,
                        }
                    }
                    seen
                })
            })
            .collect();
        ClientLoop {
            done,
            served,
            threads,
        }
    }

    /// Waits (at most [`PATIENCE`]) for `n` more round trips to come back whole: clients are
    /// connecting now.
    fn wait_served(&self, n: usize) {
        let target = self.served.load(Ordering::Relaxed) + n;
        assert!(
            eventually(|| self.served.load(Ordering::Relaxed) >= target),
            "the clients are not being served"
        );
    }

    fn finish(self) -> Seen {
        self.done.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a client thread panicked"))
            .fold(Seen::default(), |a, b| Seen {
                served: a.served + b.served,
                refused: a.refused + b.refused,
                reset: a.reset + b.reset,
                wrong: a.wrong + b.wrong,
            })
    }
}

/// Connects, sends `message`, and tells whether exactly `GOT:` and it came back before the
/// server closed.
fn one_round_trip(addr: SocketAddr, message: &[u8]) -> io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.write_all(message)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(is_prefixed_echo(&reply, message))
}

/// Replaces `server` `times` times under a loop of 4 clients, as an operator would: start the
/// new process (`start` returns once it printed its listening line), then SIGTERM the old one
/// and wait for it to exit. Returns what the clients saw.
fn restart_under_clients(
    mut server: EchoProcess,
    times: usize,
    start: impl Fn() -> EchoProcess,
) -> Seen {
    let clients = ClientLoop::start(server.addr, 4);
    clients.wait_served(100);
    for _ in 0..times {
        let new = start();
        assert_eq!(new.addr, server.addr);
        server.signal("TERM");
        assert_eq!(server.wait_exit(), Some(0));
        server = new;
        clients.wait_served(100);
    }
    clients.finish()
}

#[test]
fn stop_serves_the_clients_still_queued_on_its_listener() {
    // One worker, held by the first client's handler until the test lets it go: meanwhile the
    // kernel completes the next clients' handshakes and queues them, and nothing accepts them.
    let (started, handler_started) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let hold = Arc::new(Mutex::new(Some((started, released))));
    let server = Server::builder()
        .threads(1)
        .listen_tcp("127.0.0.1:0")
        .start(move |conn: taskserve::Connection| {
            let hold = Arc::clone(&hold);
            async move {
                let held = hold.lock().unwrap().take();
                if let Some((started, released)) = held {
                    started.send(()).unwrap();
                    // Blocks the only worker on purpose.
                    let _ = released.recv_timeout(PATIENCE);
                }
                taskserve::echo(conn).await
            }
        })
        .expect("start");
    let addr = server.local_addr().unwrap();
    let _first = connect(addr);
    handler_started
        .recv_timeout(PATIENCE)
        .expect("the first handler runs");
    let queued: Vec<_> = (0..3).map(|_| connect(addr)).collect();
    server.stop_handle().stop();
    // The stop serves the queue and closes the listener: new clients are refused then.
    assert!(eventually(|| TcpStream::connect(addr).is_err()));
    release.send(()).unwrap();
    for (n, mut client) in queued.into_iter().enumerate() {
        round_trip(&mut client, format!("queued {n}").as_bytes());
    }
    drop(_first);
    server.wait();
}

#[test]
fn restart_over_an_inherited_socket_refuses_and_resets_no_one() {
    // The listening socket, held by the test as systemd holds a .socket unit's: each echo gets
    // it as descriptor 3 with LISTEN_FDS=1 and LISTEN_PID set to its own pid (the shell's,
    // which execs it).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(4096).unwrap();
    socket.set_cloexec(false).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let start = || {
        let script = format!(r#"exec 3<&{fd}; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" "$@""#);
        let mut command = Command::new("sh");
        command.args(["-c", &script, env!("CARGO_BIN_EXE_echo")]);
        EchoProcess::start_as_given(command, &["--threads", "1", "--quiet"])
    };
    let seen = restart_under_clients(start(), 3, start);
    assert_eq!(
        (seen.refused, seen.reset, seen.wrong),
        (0, 0, 0),
        "{seen:?}"
    );
}
