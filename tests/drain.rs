//! The drain delay (`Builder::drain_delay`, `echo --drain-delay`): once a stop begins, the
//! server says it is stopping but goes on accepting and serving for the delay, so that load
//! balancers take it out of rotation before it refuses anyone; a second request ends the delay.
//! And what a balancer or Kubernetes asks meanwhile, on the metrics listener: `/healthz` and
//! `/readyz`, through a server's life.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use taskserve::Server;

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_err()
}

/// `METHOD PATH` on the metrics listener at `addr`: the status code and the body.
fn ask(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut client = connect(addr);
    write!(
        client,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )?;
    let mut answer = String::new();
    client.read_to_string(&mut answer)?;
    let status = answer
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_string()))
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    ask(addr, "GET", path).expect("an answer")
}

/// An echo server on two threads with the metrics endpoint and a drain delay far longer than
/// any test: only a second stop request ends it in time.
fn start_with_a_long_drain_delay() -> Server {
    Server::builder()
        .threads(2)
        .drain_delay(Duration::from_secs(3600))
        .listen_metrics("127.0.0.1:0")
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .unwrap()
}

#[test]
fn during_the_drain_delay_new_clients_are_served_and_a_second_stop_ends_it() {
    let server = start_with_a_long_drain_delay();
    let (addr, handle) = (server.local_addr().unwrap(), server.stop_handle());
    let metrics = server.metrics_addr().unwrap();
    assert!(get(metrics, "/metrics")
        .1
        .contains("\ntaskserve_phase{phase=\"serving\"} 1\n"));
    let open_before = connect(addr);

    handle.stop();
    assert!(handle.is_stopping(), "the stop has begun");
    // Not ready any more, but a client that a balancer still sends is accepted and served.
    assert!(eventually(|| get(metrics, "/metrics")
        .1
        .contains("\ntaskserve_phase{phase=\"drain_delay\"} 1\n")));
    let mut late = connect(addr);
    round_trip(&mut late, b"sent during the drain delay");
    drop((late, open_before));

    let waiting = thread::spawn(move || server.wait());
    handle.stop(); // the second request: stop accepting now
    assert!(
        eventually(|| refuses_connections(addr)),
        "still accepting after a second stop request"
    );
    waiting.join().unwrap();
}

#[test]
fn without_a_second_request_the_server_accepts_until_the_delay_is_over() {
    let delay = Duration::from_millis(800);
    let server = Server::builder()
        .threads(2)
        .drain_delay(delay)
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .unwrap();
    let addr = server.local_addr().unwrap();
    let began = Instant::now();
    server.stop_handle().stop();
    let mut during = connect(addr);
    round_trip(&mut during, b"still served");
    assert!(
        eventually(|| refuses_connections(addr)),
        "never stopped accepting"
    );
    // A lower bound only: a busy machine may take longer, never shorter.
    assert!(
        began.elapsed() >= delay,
        "stopped accepting after {:?}, before the {delay:?} delay",
        began.elapsed()
    );
    drop(during);
    server.wait();
}

#[test]
fn echo_keeps_accepting_for_its_drain_delay_after_sigterm_and_a_second_sigterm_ends_it() {
    let mut echo = EchoProcess::start(&["--threads", "1", "--drain-delay", "3600"]);
    let log = StderrLog::collect(&mut echo);
    let addr = echo.addr;
    echo.signal("TERM");
    // The first SIGTERM began the stop, said so once, and the server still serves.
    assert!(
        eventually(|| log.count(&["drain delay: accepting for 3600s more"]) == 1),
        "no drain delay line in:\n{}",
        log.text()
    );
    round_trip(&mut connect(addr), b"served during the drain delay");
    echo.signal("TERM");
    assert!(eventually(|| refuses_connections(addr)));
    assert_eq!(echo.wait_exit(), Some(0));
    // Read by a thread of the test: it may still be on its way.
    assert!(
        eventually(|| log.count(&["drain delay cut short"]) == 1),
        "{}",
        log.text()
    );
}

#[test]
fn readyz_turns_503_when_a_stop_begins_while_healthz_and_the_clients_are_still_served() {
    let server = start_with_a_long_drain_delay();
    let (addr, metrics) = (server.local_addr().unwrap(), server.metrics_addr().unwrap());
    assert_eq!(get(metrics, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(metrics, "/readyz"), (200, "ready\n".into()));
    // HEAD: the same status, no body.
    assert_eq!(
        ask(metrics, "HEAD", "/readyz").unwrap(),
        (200, String::new())
    );

    server.stop_handle().stop();
    assert_eq!(
        get(metrics, "/readyz"),
        (503, "not ready: drain_delay\n".into())
    );
    assert_eq!(
        ask(metrics, "HEAD", "/readyz").unwrap(),
        (503, String::new())
    );
    assert_eq!(get(metrics, "/healthz"), (200, "ok\n".into()));
    round_trip(&mut connect(addr), b"served while not ready");

    // A second request ends the delay: the endpoint closes with the client listeners.
    server.stop_handle().stop();
    assert!(eventually(|| std::net::TcpStream::connect(metrics).is_err()));
    server.wait();
}

/// A gate that handlers wait at, blocking their worker thread, until the test opens it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicUsize,
}

impl Gate {
    fn wait(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

#[test]
fn healthz_goes_unanswered_while_every_worker_is_blocked_and_answers_once_one_is_free() {
    let gate = Arc::new(Gate::default());
    let handler_gate = Arc::clone(&gate);
    let server = Server::builder()
        .threads(2)
        .listen_metrics("127.0.0.1:0")
        .listen_tcp("127.0.0.1:0")
        .start(move |conn: taskserve::Connection| {
            let gate = Arc::clone(&handler_gate);
            async move {
                // A blocking call in a handler: it holds its worker thread, as a bug would.
                gate.wait();
                drop(conn);
                Ok(())
            }
        })
        .unwrap();
    let (addr, metrics) = (server.local_addr().unwrap(), server.metrics_addr().unwrap());
    assert_eq!(get(metrics, "/healthz").0, 200);
    let _blockers: Vec<_> = (0..2).map(|_| connect(addr)).collect();
    assert!(
        eventually(|| gate.waiting.load(Ordering::SeqCst) == 2),
        "both workers blocked"
    );
    // No worker left to answer: the check fails, as a prober's timeout would see it. However
    // slow the machine, it cannot answer sooner.
    let mut probe = connect(metrics);
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let read = probe.read_to_end(&mut answer);
    assert!(
        read.as_ref().is_err_and(timed_out) && answer.is_empty(),
        "answered with every worker blocked: {read:?} {:?}",
        String::from_utf8_lossy(&answer)
    );
    gate.open();
    assert_eq!(get(metrics, "/healthz"), (200, "ok\n".into()));
    server.stop();
}
