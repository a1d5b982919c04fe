//! The drain delay (`Builder::drain_delay`, `echo --drain-delay`): once a stop begins, the
//! server says it is stopping but goes on accepting and serving for the delay, so that load
//! balancers take it out of rotation before it refuses anyone; a second request ends the delay.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use taskserve::Server;

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_err()
}

/// `GET /metrics` on `addr`, the whole answer.
fn scrape(addr: SocketAddr) -> String {
    let mut scrape = connect(addr);
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    scrape.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn during_the_drain_delay_new_clients_are_served_and_a_second_stop_ends_it() {
    // A delay far longer than the test: only the second request can end it in time.
    let server = Server::builder()
        .threads(2)
        .drain_delay(Duration::from_secs(3600))
        .listen_metrics("127.0.0.1:0")
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .unwrap();
    let (addr, handle) = (server.local_addr().unwrap(), server.stop_handle());
    let metrics = server.metrics_addr().unwrap();
    assert!(scrape(metrics).contains("\ntaskserve_phase{phase=\"serving\"} 1\n"));
    let open_before = connect(addr);

    handle.stop();
    assert!(handle.is_stopping(), "the stop has begun");
    // Not ready any more, but a client that a balancer still sends is accepted and served.
    assert!(eventually(
        || scrape(metrics).contains("\ntaskserve_phase{phase=\"drain_delay\"} 1\n")
    ));
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
