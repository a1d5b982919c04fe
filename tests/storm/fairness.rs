//! A burst must not hold back the clients already connected: with one worker thread, hundreds of
//! clients waiting in the listen queue, and a connected client's message ready at the same time,
//! the accept loop takes its turn with the other tasks instead of accepting the whole queue
//! first. Deterministic: the test blocks the only worker while the queue fills, so that the
//! accept loop and the connected client are both ready when it goes on, the accept loop first.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use taskserve::io::{AsyncReadExt, AsyncWriteExt};
use taskserve::{Connection, Server};

use super::*;

/// Clients queued at once: far more than the accept loop takes in one turn, and few enough
/// (with the server's sockets, in this process) for a soft limit of 1,024 open files.
const QUEUED: usize = 300;

/// What the handler below shares with the test.
#[derive(Default)]
struct Probe {
    /// Connections the accept loop has started (its `on_connection_start` hook).
    started: AtomicUsize,
    /// `started` when the connected client's `ping!` was read.
    started_at_ping: AtomicUsize,
}

/// Echo, after a first message of 5 bytes: `block` holds the worker thread until `release`
/// gives the word (after saying so on `blocked`), `ping!` notes how many connections the accept
/// loop has started by then; either is answered as echo would.
fn handler(
    probe: Arc<Probe>,
    blocked: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
) -> impl Fn(Connection) -> HandlerFuture + Send + Sync + 'static {
    let (blocked, release) = (Mutex::new(blocked), Arc::new(Mutex::new(release)));
    move |mut conn| {
        let (probe, release) = (Arc::clone(&probe), Arc::clone(&release));
        let blocked = blocked.lock().unwrap().clone();
        Box::pin(async move {
            let mut first = [0; 5];
            conn.read_exact(&mut first).await?;
            if &first == b"block" {
                blocked.send(()).unwrap();
                // Blocks the thread, not just the task: the test's stand-in for a busy worker.
                let _ = release.lock().unwrap().recv_timeout(PATIENCE);
            } else if &first == b"ping!" {
                let started = probe.started.load(Ordering::SeqCst);
                probe.started_at_ping.store(started, Ordering::SeqCst);
            }
            conn.write_all(b"GOT:").await?;
            conn.write_all(&first).await?;
            taskserve::echo(conn).await
        })
    }
}

/// Rounds of the scenario below, on one server: which of the accept loop and the connected
/// client goes first when the worker goes on varies from run to run, and before the accept
/// loop took turns, it went first in about half of them.
const ROUNDS: usize = 5;

#[test]
fn a_burst_of_queued_clients_does_not_hold_back_a_connected_client() {
    let _turn = ONE_STORM.lock().unwrap_or_else(|e| e.into_inner());
    let probe = Arc::new(Probe::default());
    let (blocked, worker_blocked) = mpsc::channel();
    let (release, released) = mpsc::channel();
    let counted = Arc::clone(&probe);
    let server = Server::builder()
        .threads(1)
        .on_connection_start(move |_| {
            counted.started.fetch_add(1, Ordering::SeqCst);
        })
        .listen_tcp("127.0.0.1:0")
        .start(handler(Arc::clone(&probe), blocked, released))
        .expect("server starts on an ephemeral port");
    let addr = server.local_addr().unwrap();
    let mut held = Vec::new();
    for round in 0..ROUNDS {
        let before = probe.started.load(Ordering::SeqCst);
        let mut connected = connect(addr);
        assert!(eventually(
            || probe.started.load(Ordering::SeqCst) == before + 1
        ));
        let mut blocker = connect(addr);
        blocker.write_all(b"block").unwrap();
        worker_blocked
            .recv_timeout(PATIENCE)
            .expect("the worker is blocked");
        // The kernel completes their handshakes and queues them; nothing accepts them yet.
        let queued: Vec<TcpStream> = (0..QUEUED).map(|_| connect(addr)).collect();
        connected.write_all(b"ping!").unwrap();
        release.send(()).unwrap();
        let mut reply = [0; 9];
        connected
            .read_exact(&mut reply)
            .expect("the connected client's reply");
        assert_eq!(&reply, b"GOT:ping!");
        let started = probe.started_at_ping.load(Ordering::SeqCst) - before;
        println!("round {round}: the connected client was served with {started} connections started, of {} queued and connected", QUEUED + 2);
        assert!(
            started < QUEUED,
            "round {round}: the connected client was served only after the accept loop had taken {started} clients"
        );
        // Every queued client is taken in the end, before the next round counts afresh.
        let all = before + QUEUED + 2;
        assert!(eventually(|| probe.started.load(Ordering::SeqCst) == all));
        held.extend([connected, blocker]);
        drop(queued);
    }
    drop(held); // so that the stop need not wait for them
    server.stop();
}
