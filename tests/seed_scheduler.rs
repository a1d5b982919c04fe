//! The lesson in `examples/seed_scheduler.rs` does what its header says: the seed's echo server
//! on a single-threaded scheduler, over real sockets.

mod common;
#[allow(dead_code)] // its `main` is for `cargo run --example seed_scheduler`
#[path = "../examples/seed_scheduler.rs"]
mod seed_scheduler;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{connect, exchange, payload, read_payload, timed_out, PATIENCE};
use seed_scheduler::Scheduler;

/// How long a client's send may make no progress before the test takes the server to have
/// stopped reading from it.
const STALL: Duration = Duration::from_millis(300);

/// The example's scheduler serving on an ephemeral port, on a thread of its own; stopped and
/// joined when dropped.
struct SeedServer {
    addr: SocketAddr,
    scheduler: Arc<Scheduler>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl SeedServer {
    fn start() -> SeedServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let addr = listener.local_addr().unwrap();
        let scheduler = Scheduler::new().expect("create the poller");
        let serving = Arc::clone(&scheduler);
        let thread = thread::spawn(move || serving.serve(listener));
        SeedServer {
            addr,
            scheduler,
            thread: Some(thread),
        }
    }
}

impl Drop for SeedServer {
    fn drop(&mut self) {
        self.scheduler.stop();
        let served = self.thread.take().unwrap().join();
        if !thread::panicking() {
            served
                .expect("the scheduler thread panicked")
                .expect("serve");
        }
    }
}

#[test]
fn seed_scheduler_prefixes_each_message_with_got() {
    let server = SeedServer::start();
    let mut client = connect(server.addr);
    exchange(&mut client, b"Hello\n", b"GOT:Hello\n");
    exchange(&mut client, b"World\n", b"GOT:World\n");
}

#[test]
fn seed_scheduler_serves_a_second_client_while_the_first_waits() {
    let server = SeedServer::start();
    let mut first = connect(server.addr);
    exchange(&mut first, b"one\n", b"GOT:one\n");
    // The first client's task now waits for data; one thread still serves the second.
    let mut second = connect(server.addr);
    exchange(&mut second, b"two\n", b"GOT:two\n");
    exchange(&mut first, b"three\n", b"GOT:three\n");
    exchange(&mut second, b"four\n", b"GOT:four\n");
}

#[test]
fn seed_scheduler_sends_every_reply_in_full_to_a_client_that_stops_reading() {
    let server = SeedServer::start();
    let mut client = connect(server.addr);
    // More than the socket buffers between client and server hold. Sent before any reply is
    // read, it leaves the server waiting for room to send a reply, and meanwhile reading
    // nothing, so the client's sends stall too.
    let message = payload(16 * 1024 * 1024);
    client.set_write_timeout(Some(STALL)).unwrap();
    let mut written = 0;
    while written < message.len() {
        match client.write(&message[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // No room for STALL: the server has stopped reading, as it should.
            Err(e) if timed_out(&e) => break,
            Err(e) => panic!("send: {e}"),
        }
    }
    // Read from here on, while a thread of its own sends the rest.
    client.set_write_timeout(Some(PATIENCE)).unwrap();
    let mut writer = client.try_clone().unwrap();
    let rest = message[written..].to_vec();
    let writing = thread::spawn(move || writer.write_all(&rest));
    let echoed = read_payload(&mut client, message.len()).expect("read the replies");
    writing.join().unwrap().expect("send the rest");
    assert!(echoed == message, "the replies differ from what was sent");
}

#[test]
fn seed_scheduler_closes_open_connections_when_stopped() {
    let server = SeedServer::start();
    let mut client = connect(server.addr);
    exchange(&mut client, b"Hello\n", b"GOT:Hello\n");
    drop(server);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("read until the close");
    assert_eq!(rest, b"");
}
