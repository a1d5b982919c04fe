//! `/healthz` and `/readyz` on the metrics listener: what a load balancer or Kubernetes asks
//! before it sends clients, through a server's life.

mod common;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use taskserve::Server;

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

#[test]
fn readyz_turns_503_when_a_stop_begins_while_healthz_and_the_clients_are_still_served() {
    let server = Server::builder()
        .threads(2)
        .drain_delay(Duration::from_secs(3600))
        .listen_metrics("127.0.0.1:0")
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .unwrap();
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
