//! The Prometheus endpoint over real sockets: scrapes during a load match what the clients did,
//! counters never go down, promtool accepts the output, other paths and methods are refused,
//! and the endpoint is not a client (no slot under the limit, not counted).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use taskserve::io::AsyncReadExt;
use taskserve::Server;

/// Sends `request` to the metrics endpoint at `addr`; returns the status code and the body.
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = connect(addr);
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// A scrape: each sample's name with its labels, and its value.
fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    let samples = body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("a sample and a value");
            (name.to_string(), value.parse().expect("a number"))
        })
        .collect();
    Scrape { body, samples }
}

#[derive(Debug, Clone)]
struct Scrape {
    body: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    fn get(&self, name: &str) -> u64 {
        let value = *self
            .samples
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in:\n{}", self.body));
        value as u64
    }

    /// A sample that is not a count, such as a sum of seconds.
    fn seconds(&self, name: &str) -> f64 {
        *self
            .samples
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in:\n{}", self.body))
    }

    /// Panics if any counter (a `_total`, or a histogram's buckets, count or sum) is lower here
    /// than in `earlier`.
    fn assert_not_below(&self, earlier: &Scrape) {
        for (name, &before) in &earlier.samples {
            let counter = name.contains("_total")
                || name.contains("_bucket")
                || name.ends_with("_count")
                || name.ends_with("_sum");
            if counter {
                assert!(self.samples[name] >= before, "{name} went down");
            }
        }
    }
}

/// Passes `text` through Prometheus's own checker, `promtool check metrics` (Debian's
/// `prometheus` package, which `.ci/run` installs).
fn assert_promtool_accepts(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install prometheus; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A handler that reads one byte and then: `p` panics, `i` waits (so the idle timeout closes
/// it), anything else is answered as echo does.
fn by_first_byte(mut conn: taskserve::Connection) -> HandlerFuture {
    Box::pin(async move {
        let mut first = [0];
        conn.read_exact(&mut first).await?;
        match first[0] {
            b'p' => panic!("asked to panic"),
            b'i' => std::future::pending().await,
            _ => taskserve::echo(conn).await,
        }
    })
}

const LOAD_CLIENTS: usize = 200;
/// The duration histogram's buckets: connections that lasted at most 1 s, and all of them.
const DURATION_UP_TO_1_S: &str = r#"taskserve_connection_duration_seconds_bucket{le="1"}"#;
const DURATION_UP_TO_INF: &str = r#"taskserve_connection_duration_seconds_bucket{le="+Inf"}"#;

#[test]
#[ignore = "needs promtool: bash .ci/run installs it"]
fn scrapes_during_a_load_of_200_clients_match_what_they_did() {
    let server = Server::builder()
        .threads(2)
        .idle_timeout(Duration::from_secs(1))
        .listen_metrics("127.0.0.1:0")
        .listen_tcp("127.0.0.1:0")
        .start(by_first_byte)
        .unwrap();
    let metrics = server.metrics_addr().unwrap();
    let first = scrape(metrics);
    assert_promtool_accepts(&first.body);

    // 3 handlers panic, 3 clients go idle and are closed after 1 s.
    let mut faults: Vec<TcpStream> = b"pppiii"
        .iter()
        .map(|&byte| {
            let mut client = connect(server.local_addr().unwrap());
            client.write_all(&[byte]).unwrap();
            client
        })
        .collect();
    for client in &mut faults {
        wait_for_close(client, PATIENCE).expect("closed by the server");
    }

    // 200 clients make round trips until told to stop, each counting what it sent and got.
    let stop = Arc::new(AtomicBool::new(false));
    let warmed_up = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..LOAD_CLIENTS)
        .map(|n| {
            let (stop, warmed_up, addr) = (
                Arc::clone(&stop),
                Arc::clone(&warmed_up),
                server.local_addr().unwrap(),
            );
            thread::spawn(move || {
                let mut client = connect(addr);
                client.write_all(b"m").unwrap();
                let (mut sent, mut received) = (1, 0);
                // At most 10,000 round trips: a bounded loop even if the stop never came.
                for round in 0..10_000 {
                    let message = payload(1 + (n * 31 + round * 7) % 1500);
                    client.write_all(&message).unwrap();
                    let mut unprefixer = Unprefixer::default();
                    let (mut echoed, mut buf) = (Vec::new(), [0; 4096]);
                    while echoed.len() < message.len() {
                        let got = read_some(&mut client, &mut buf).expect("read a reply");
                        assert!(got > 0, "closed during the load");
                        received += got;
                        unprefixer.feed(&buf[..got], &mut echoed);
                    }
                    assert!(echoed == message, "the reply differs from what was sent");
                    sent += message.len();
                    if round == 4 {
                        warmed_up.fetch_add(1, Ordering::SeqCst);
                    }
                    if round >= 4 && stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
                client.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                client.read_to_end(&mut rest).unwrap();
                (sent as u64, (received + rest.len()) as u64)
            })
        })
        .collect();
    assert!(
        eventually(|| warmed_up.load(Ordering::SeqCst) == LOAD_CLIENTS),
        "{} of {LOAD_CLIENTS} clients under way",
        warmed_up.load(Ordering::SeqCst)
    );

    // Scrapes under load: the counts of what has ended are exact, and nothing goes down.
    let mut previous = first;
    for _ in 0..5 {
        let now = scrape(metrics);
        now.assert_not_below(&previous);
        assert_eq!(now.get("taskserve_connections_open"), LOAD_CLIENTS as u64);
        assert_eq!(server.connections(), LOAD_CLIENTS);
        assert_eq!(
            now.get("taskserve_connections_accepted_total"),
            LOAD_CLIENTS as u64 + 6
        );
        assert_eq!(
            now.get(r#"taskserve_connections_closed_total{reason="handler_panic"}"#),
            3
        );
        assert_eq!(
            now.get(r#"taskserve_connections_closed_total{reason="idle_timeout"}"#),
            3
        );
        assert_eq!(
            now.get(r#"taskserve_connections_closed_total{reason="client_closed"}"#),
            0
        );
        // Exactly the six faults have ended: the three panics at once (a second is plenty),
        // the three idle ones after the 1 s timeout, not before it.
        assert_eq!(now.get("taskserve_connection_duration_seconds_count"), 6);
        assert_eq!(now.get(DURATION_UP_TO_INF), 6);
        assert_eq!(now.get(DURATION_UP_TO_1_S), 3, "{}", now.body);
        assert!(now.seconds("taskserve_connection_duration_seconds_sum") >= 3.0);
        previous = now;
    }
    assert_promtool_accepts(&previous.body);

    stop.store(true, Ordering::SeqCst);
    let (mut sent, mut received) = (6, 0); // the six fault clients' first bytes
    for client in clients {
        let (s, r) = client.join().expect("a client thread");
        sent += s;
        received += r;
    }
    assert!(eventually(
        || server.stats().closed_total() == LOAD_CLIENTS as u64 + 6
    ));

    let last = scrape(metrics);
    last.assert_not_below(&previous);
    assert_promtool_accepts(&last.body);
    assert_eq!(last.get("taskserve_connections_open"), 0);
    assert_eq!(
        last.get("taskserve_connections_accepted_total"),
        LOAD_CLIENTS as u64 + 6
    );
    assert_eq!(
        last.get(r#"taskserve_connections_closed_total{reason="client_closed"}"#),
        LOAD_CLIENTS as u64
    );
    assert_eq!(last.get("taskserve_bytes_read_total"), sent);
    assert_eq!(last.get("taskserve_bytes_written_total"), received);
    assert_eq!(
        last.get("taskserve_connection_duration_seconds_count"),
        LOAD_CLIENTS as u64 + 6
    );
    assert_eq!(last.get(DURATION_UP_TO_INF), LOAD_CLIENTS as u64 + 6);
    // The three idle clients lasted more than a second whatever the load clients did.
    let up_to_1_s = last.get(DURATION_UP_TO_1_S);
    assert!(
        (3..=LOAD_CLIENTS as u64 + 3).contains(&up_to_1_s),
        "{up_to_1_s}"
    );
    assert_eq!(
        last.get(r#"taskserve_connections_refused_total{reason="connection_limit"}"#),
        0
    );
    assert_eq!(last.get("taskserve_accept_errors_total"), 0);
    server.stop();
}

#[test]
fn refusals_at_a_limit_of_3_are_counted_and_the_metrics_port_is_not_limited() {
    let server = start_echo_with(
        Server::builder()
            .threads(2)
            .max_connections(3)
            .listen_metrics("127.0.0.1:0"),
    );
    let metrics = server.metrics_addr().unwrap();
    let mut holders: Vec<_> = (0..3)
        .map(|_| connect(server.local_addr().unwrap()))
        .collect();
    for holder in &mut holders {
        round_trip(holder, b"hold");
    }
    for _ in 0..2 {
        let mut refused = connect(server.local_addr().unwrap());
        wait_for_close(&mut refused, PATIENCE).expect("refused at the limit");
    }
    // A scrape connection held open while the limit is reached: not a client, not counted.
    let mut waiting_scrape = connect(metrics);
    let answered = scrape(metrics);
    assert_eq!(answered.get("taskserve_connections_open"), 3);
    assert_eq!(answered.get("taskserve_connections_accepted_total"), 5);
    assert_eq!(
        answered.get(r#"taskserve_connections_refused_total{reason="connection_limit"}"#),
        2
    );
    assert_eq!(server.connections(), 3);
    waiting_scrape
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    waiting_scrape.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let stats = server.stats();
    assert_eq!((stats.accepted, stats.open), (5, 3));
    drop(holders);
    server.stop();
}

#[test]
fn other_paths_get_404_other_methods_405_and_garbage_400() {
    let server = start_echo_with(Server::builder().threads(1).listen_metrics("127.0.0.1:0"));
    let metrics = server.metrics_addr().unwrap();
    let status = |request: &str| http(metrics, request).0;
    assert_eq!(status("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 404);
    assert_eq!(status("GET /metrics/x HTTP/1.1\r\nHost: x\r\n\r\n"), 404);
    assert_eq!(
        status("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        405
    );
    assert_eq!(status("PUT /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), 405);
    assert_eq!(status("hello\r\n\r\n"), 400);
    let (code, body) = http(metrics, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((code, body.as_str()), (200, ""));
    // A request head of 8 KiB is answered; one byte more is 431. Exactly one more: the server
    // reads it all before it answers, so its close is no reset that could destroy the answer.
    let head_of = |len: usize| {
        let start = "GET /metrics HTTP/1.1\r\nHost: x\r\nX: ";
        format!("{start}{}\r\n\r\n", "a".repeat(len - start.len() - 4))
    };
    assert_eq!(status(&head_of(8 * 1024)), 200);
    let (code, body) = http(metrics, &head_of(8 * 1024 + 1));
    assert_eq!(
        (code, body.as_str()),
        (431, "431 Request Header Fields Too Large\n")
    );
    // Still answering, and none of that was a client connection.
    assert_eq!(
        scrape(metrics).get("taskserve_connections_accepted_total"),
        0
    );
    assert_eq!(server.stats().accepted, 0);
    server.stop();
}

/// Each request is answered at once with its status, without waiting for more bytes: the
/// client keeps its side open, as a stalled client would.
#[test]
fn malformed_requests_get_400_at_once_and_the_absolute_form_is_served() {
    let server = start_echo_with(Server::builder().threads(1).listen_metrics("127.0.0.1:0"));
    let metrics = server.metrics_addr().unwrap();
    let cases: [(&[u8], u16); 10] = [
        // HTTP/0.9: a request line without a version.
        (b"GET /metrics\n", 400),
        (b"GET /metrics\r\n", 400),
        // A head whose lines end in bare CRs.
        (b"GET /metrics HTTP/1.1\rHost: x\r\r", 400),
        // RFC 9112 3.2: HTTP/1.1 needs exactly one Host.
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.9\r\nHost: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1garbage\r\nHost: x\r\n\r\n", 400),
        (b"G\x01T /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        // RFC 9112 3.2.2: a server must accept the absolute form.
        (b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"GET /metrics HTTP/1.0\r\n\r\n", 200),
    ];
    for (request, expected) in cases {
        let shown = String::from_utf8_lossy(request);
        let mut stream = connect(metrics);
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        let start = std::time::Instant::now();
        let read = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split(' ').nth(1).unwrap_or_default();
        assert_eq!(
            status,
            expected.to_string(),
            "{shown:?} after {:?}: {read:?} {answer:?}",
            start.elapsed()
        );
    }
    server.stop();
}

/// Opens connections to `addr` that send one byte and no more, until `held` has `count`
/// still open (the server may have closed some since the last call).
fn hold_stalled(addr: SocketAddr, held: &mut Vec<TcpStream>, count: usize) {
    held.retain(|stream| {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0];
        let open = matches!(stream.peek(&mut byte), Err(e) if timed_out(&e));
        stream.set_nonblocking(false).unwrap();
        open
    });
    while held.len() < count {
        let mut stream = connect(addr);
        stream.write_all(b"G").unwrap();
        held.push(stream);
    }
}

/// The status of one scrape, or `None` if the connection ended without one.
fn try_scrape(addr: SocketAddr) -> Option<u16> {
    let mut stream = connect(addr);
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer);
    answer.split(' ').nth(1)?.parse().ok()
}

#[test]
fn scrapes_are_answered_while_64_stalled_connections_are_held_open() {
    let server = start_echo_with(Server::builder().threads(2).listen_metrics("127.0.0.1:0"));
    let metrics = server.metrics_addr().unwrap();
    let mut stalled = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        hold_stalled(metrics, &mut stalled, 64);
        statuses.push(try_scrape(metrics));
    }
    let answered = statuses.iter().filter(|&&s| s == Some(200)).count();
    assert!(
        answered >= 9,
        "{answered} of 10 scrapes answered: {statuses:?}"
    );
    server.stop();
}

#[test]
#[ignore = "needs promtool: bash .ci/run installs it"]
fn echo_serves_metrics_and_prints_their_address_with_the_listening_lines() {
    let mut echo = EchoProcess::start(&["--threads", "1", "--quiet", "--metrics", "127.0.0.1:0"]);
    let line = echo.next_line();
    let addr: SocketAddr = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.strip_suffix(" (metrics)"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line: {line:?}"));
    let mut client = connect(echo.addr);
    round_trip(&mut client, b"hello");
    drop(client);
    // With curl, as a user would.
    let mut text = String::new();
    assert!(eventually(|| {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", &format!("http://{addr}/metrics")])
            .output()
            .expect("run curl");
        text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.contains("\ntaskserve_connections_closed_total{reason=\"client_closed\"} 1\n")
    }));
    assert!(text.contains("\ntaskserve_bytes_read_total 5\n"), "{text}");
    assert!(
        text.contains("\ntaskserve_bytes_written_total 9\n"),
        "{text}"
    );
    assert_promtool_accepts(&text);
}
