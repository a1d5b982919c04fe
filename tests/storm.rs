//! A connection storm: 20,000 connection attempts at once against a server that serves at most
//! 10,000 connections. Every attempt must end, served or closed by the server, none left
//! hanging; no more clients are served at once than the limit allows; the server's counts add
//! up; and a client connected before the storm keeps its round trips all through it. Then the
//! same storm from one address under a per-client limit, while another address is served.
//!
//! 20,000 client sockets and the server's 10,000 are more descriptors than one process may have
//! here (a hard limit of 20,000, which root may raise only with CAP_SYS_RESOURCE, and the
//! machines running these tests are without it). So the server runs in the test's process and
//! the storm in two child processes of 10,000 attempts each: this test binary again, running
//! [`storm_clients_when_run_by_a_storm_test`], told by its parent when to start. Each child
//! connects to a listener of its own: Linux gives a connect the even source ports first, about
//! 14,000, and past them searches the whole range at each connect (quadratic: minutes for
//! 20,000 connections from one address to one port). Figures for the
//! same storm against the `echo` binary come from `bench/bin/loadgen storm`
//! (docs/reliability.md).
#![cfg(target_os = "linux")] // 127.0.0.0/8 all on loopback, as Linux has it

mod common;

use std::io::{self, BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::{Async, Timer};
use socket2::{Domain, Socket, Type};
use taskserve::{Connection, RefusalReason, Server, Stats};

/// Connection attempts in the storm, all started at once: [`CHILDREN`] processes make
/// [`ATTEMPTS_EACH`] each.
const ATTEMPTS: usize = CHILDREN * ATTEMPTS_EACH;
const CHILDREN: usize = 2;
const ATTEMPTS_EACH: usize = 10_000;
/// The server's connection limit: half the storm is over it.
const MAX_CONNECTIONS: usize = 10_000;
/// Descriptors each process needs: 10,000 sockets (the server's, or a child's clients), and
/// room for the rest.
const DESCRIPTORS: u64 = 11_000;
/// How long one attempt may take to be served or closed before it counts as hanging: long
/// enough for a SYN dropped by a full accept queue to be sent again (after 1 s, then 3 s, 7 s),
/// far below a hang, and below [`PATIENCE`], which the parent waits for the children's reports.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(15);
/// What each storm client sends; served, it gets `GOT:storm` back.
const MESSAGE: &[u8] = b"storm";
/// Set in a child's environment to the server's address: it makes the storm's attempts.
const STORM_ENV: &str = "TASKSERVE_STORM_SERVER";
/// The line a child prints when its attempts have all ended, before its counts.
const REPORT: &str = "storm report:";

/// The storm's clients connect from this address: the one the kernel picks for 127.0.0.1
/// (binding 10,000 sockets to an address of their own costs the kernel a search of all the
/// others at each bind, seconds in all). The clients that must be served beside the storm
/// connect from [`OTHERS`].
const STORM_FROM: &str = "127.0.0.1";
const OTHERS: &str = "127.0.0.3";

/// One storm at a time: two at once would need twice the descriptors and ports.
static ONE_STORM: Mutex<()> = Mutex::new(());

/// How one attempt ended.
enum Outcome {
    /// Its message came back: it is served, and holds its connection until dropped.
    Served(Async<TcpStream>),
    /// The server closed it (end of stream or reset) without serving it.
    Closed,
    /// Neither within [`ATTEMPT_LIMIT`], or an error that is no close: what happened.
    Failed(String),
}

/// The peak of connections handlers serve at once.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
}

/// Echo, counting in `gauge` the handlers running at once.
fn counting_echo(
    gauge: Arc<Gauge>,
) -> impl Fn(Connection) -> HandlerFuture + Send + Sync + 'static {
    struct Running(Arc<Gauge>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.now.fetch_sub(1, Ordering::SeqCst);
        }
    }
    move |conn| {
        let now = gauge.now.fetch_add(1, Ordering::SeqCst) + 1;
        gauge.peak.fetch_max(now, Ordering::SeqCst);
        let running = Running(Arc::clone(&gauge));
        Box::pin(async move {
            let _running = running;
            taskserve::echo(conn).await
        })
    }
}

/// Starts a server under `builder`'s limits, with a listener for each storm child, whose
/// handlers `gauge` counts.
fn start_storm_server(builder: taskserve::Builder, gauge: &Arc<Gauge>) -> Server {
    let builder = (0..CHILDREN).fold(builder, |b, _| b.listen_tcp("127.0.0.1:0"));
    builder
        .threads(2)
        .max_connections(MAX_CONNECTIONS)
        .start(counting_echo(Arc::clone(gauge)))
        .expect("server starts on ephemeral ports")
}

/// Starts a non-blocking connect to `to`.
fn start_connect(to: SocketAddr) -> io::Result<Async<TcpStream>> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    // Dropped, a served client resets its connection: no TIME_WAIT left to take the ports of
    // the next storm.
    socket.set_linger(Some(Duration::ZERO))?;
    match socket.connect(&to.into()) {
        Err(e) if e.raw_os_error() != Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {
            return Err(e)
        }
        _ => {}
    }
    Async::new(TcpStream::from(socket))
}

/// Whether `e` is the server closing the connection: a reset, or a write after its close.
fn is_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// One storm client: connects, sends [`MESSAGE`], and reads until its reply is in or the
/// server closes. Returns how it ended.
async fn attempt(to: SocketAddr) -> Outcome {
    let work = async {
        let mut stream = start_connect(to).map_err(|e| format!("connect: {e}"))?;
        stream
            .writable()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if let Some(e) = stream.get_ref().take_error().unwrap_or(None) {
            return Err(format!("connect: {e}"));
        }
        match stream.write_all(MESSAGE).await {
            Err(e) if is_close(&e) => return Ok(Outcome::Closed),
            Err(e) => return Err(format!("send: {e}")),
            Ok(()) => {}
        }
        let (mut unprefixer, mut echoed, mut buf) = (Unprefixer::default(), Vec::new(), [0; 64]);
        while echoed.len() < MESSAGE.len() {
            match stream.read(&mut buf).await {
                Ok(0) if echoed.is_empty() => return Ok(Outcome::Closed),
                Err(e) if echoed.is_empty() && is_close(&e) => return Ok(Outcome::Closed),
                Ok(0) => return Err("closed in the middle of a reply".into()),
                Ok(n) => unprefixer.feed(&buf[..n], &mut echoed),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        assert_eq!(echoed, MESSAGE, "the reply differs from what was sent");
        Ok(Outcome::Served(stream))
    };
    let limit = async {
        Timer::after(ATTEMPT_LIMIT).await;
        Err(format!("neither served nor closed in {ATTEMPT_LIMIT:?}"))
    };
    let outcome = smol::future::or(work, limit).await;
    outcome.unwrap_or_else(Outcome::Failed)
}

/// A ping-pong client: one message at a time, each round trip timed.
struct PingPong {
    stream: TcpStream,
    message: Vec<u8>,
}

impl PingPong {
    fn connect(to: SocketAddr) -> PingPong {
        let mut client = PingPong {
            stream: connect_from(ip(OTHERS), to).expect("the ping-pong client connects"),
            message: payload(64),
        };
        client.round_trip().expect("the ping-pong client is served");
        client
    }

    /// One round trip: the message, and all of it back.
    fn round_trip(&mut self) -> io::Result<Duration> {
        let start = Instant::now();
        self.stream.write_all(&self.message)?;
        let echoed = read_payload(&mut self.stream, self.message.len())?;
        assert!(
            echoed == self.message,
            "the reply differs from what was sent"
        );
        Ok(start.elapsed())
    }

    /// Round trips until `done` (checked before each) or `count` of them; their times, or the
    /// first failure.
    fn round_trips(&mut self, count: usize, done: impl Fn() -> bool) -> io::Result<Vec<Duration>> {
        let mut times = Vec::new();
        for _ in 0..count {
            if done() {
                break;
            }
            times.push(self.round_trip()?);
        }
        Ok(times)
    }
}

/// "p50 X, p99 Y over N" for a list of round trip times, for the test's output.
fn percentiles(mut times: Vec<Duration>) -> String {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    match times.len() {
        0 => "no round trips".into(),
        n => format!("p50 {:?}, p99 {:?} over {n}", at(0.5), at(0.99)),
    }
}

/// Whether every client accepted is counted once: refused, open or closed.
fn counts_add_up(stats: &Stats) -> bool {
    stats.accepted == stats.refused_total() + stats.open as u64 + stats.closed_total()
}

/// Raises this process's soft limit on open files to [`DESCRIPTORS`] (or at least checks that
/// it is that high): any process may, up to its hard limit.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_none_or(|soft| soft >= DESCRIPTORS) {
        return;
    }
    let raised = Rlimit {
        current: Some(DESCRIPTORS),
        maximum: now.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        panic!("raising the open-file limit from {now:?} to {DESCRIPTORS} failed ({e}): the storm needs {DESCRIPTORS} descriptors per process");
    }
}

/// What one child's attempts came to, once all have ended; or all the children's, added up.
#[derive(Debug, Default)]
struct Storm {
    served: usize,
    closed: usize,
    failed: usize,
    /// From the first connect to the last outcome (the longest of the children's).
    took: Duration,
    /// The first failures, for the failure message.
    failures: Vec<String>,
}

impl Storm {
    /// The report line a child prints: `storm report: served S closed C failed F took_us T`,
    /// then the first failure if there is one.
    fn line(&self) -> String {
        let (s, c, f) = (self.served, self.closed, self.failed);
        let took = self.took.as_micros();
        let first = self.failures.first().map_or("", String::as_str);
        format!("{REPORT} served {s} closed {c} failed {f} took_us {took} {first}")
    }

    /// Adds a report line to these counts.
    fn add_line(&mut self, line: &str) {
        // The test harness may have printed `test NAME ... ` before it on the same line.
        let (_, report) = line.split_once(REPORT).expect("a report line");
        let words: Vec<&str> = report.split_whitespace().collect();
        let number = |key: &str| -> u64 {
            let at = words.iter().position(|w| *w == key).expect(key) + 1;
            words[at]
                .parse()
                .unwrap_or_else(|_| panic!("{key} in {line:?}"))
        };
        self.served += number("served") as usize;
        self.closed += number("closed") as usize;
        self.failed += number("failed") as usize;
        self.took = self.took.max(Duration::from_micros(number("took_us")));
        if words.len() > 8 {
            self.failures.push(words[8..].join(" "));
        }
    }
}

/// Makes [`ATTEMPTS_EACH`] attempts to `to` at once; returns what they came to and the served
/// clients' connections, still open.
fn storm(to: SocketAddr) -> (Storm, Vec<Async<TcpStream>>) {
    let executor = smol::LocalExecutor::new();
    let started = Instant::now();
    let attempts: Vec<_> = (0..ATTEMPTS_EACH)
        .map(|_| executor.spawn(attempt(to)))
        .collect();
    let (mut storm, mut held) = (Storm::default(), Vec::new());
    smol::block_on(executor.run(async {
        for attempt in attempts {
            match attempt.await {
                Outcome::Served(stream) => held.push(stream),
                Outcome::Closed => storm.closed += 1,
                Outcome::Failed(why) => {
                    storm.failed += 1;
                    storm.failures.push(why);
                }
            }
        }
    }));
    storm.took = started.elapsed();
    storm.served = held.len();
    (storm, held)
}

/// Not a test of its own: the storm's clients, when a storm test runs this binary with
/// [`STORM_ENV`] set (elsewhere it returns at once). Starts when its parent writes a line, prints
/// its report, and holds the served connections until its stdin closes.
#[test]
#[ignore = "the storm tests run it in their child processes"]
fn storm_clients_when_run_by_a_storm_test() {
    let Ok(server) = std::env::var(STORM_ENV) else {
        return;
    };
    raise_open_file_limit();
    let mut stdin = io::stdin().lock();
    let mut go = String::new();
    stdin.read_line(&mut go).expect("the go line");
    let (storm, held) = storm(server.parse().expect("the server's address"));
    println!("{}", storm.line());
    io::stdout().flush().unwrap();
    // Until the parent closes our stdin (or exits); at most one line more is expected.
    let _ = stdin.read_line(&mut go);
    drop(held);
}

/// The storm's child processes, each with its attempts ready to start: killed when dropped.
struct StormChildren {
    children: Vec<(ChildGuard, ChildStdin, Lines)>,
}

impl StormChildren {
    /// One child for each of `server`'s listeners.
    fn start(server: &Server) -> StormChildren {
        let exe = std::env::current_exe().expect("the test binary's path");
        let children = server
            .local_addrs()
            .iter()
            .map(|(listener, _)| {
                let mut child = ChildGuard::new(
                    Command::new(&exe)
                        .args(["--exact", "storm_clients_when_run_by_a_storm_test"])
                        .args(["--ignored", "--nocapture", "--test-threads", "1"])
                        .env(STORM_ENV, listener.to_string())
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .spawn()
                        .expect("start a storm child"),
                );
                let stdin = child.stdin.take().unwrap();
                let stdout = Lines::read(child.stdout.take().unwrap(), "a storm child's stdout");
                (child, stdin, stdout)
            })
            .collect();
        StormChildren { children }
    }

    /// Starts every child's attempts at once.
    fn go(&mut self) {
        for (_, stdin, _) in &mut self.children {
            stdin.write_all(b"go\n").expect("tell a storm child to go");
        }
    }

    /// Waits for every child's report ([`ATTEMPT_LIMIT`] bounds each attempt, [`PATIENCE`] the
    /// wait) and adds them up.
    fn reports(&mut self) -> Storm {
        let mut storm = Storm::default();
        for (_, _, stdout) in &mut self.children {
            storm.add_line(&stdout.find(|line| line.contains(REPORT)));
        }
        storm
    }
}

/// Runs a storm from [`STORM_FROM`] against `server` with a ping-pong client from [`OTHERS`]
/// connected before it; `beside` runs on its own thread during the storm (until its flag is
/// set). Checks that every attempt ended, the ping-pong client's round trips all succeeded
/// before, during and after, and no more handlers ran at once than the limit; returns the
/// storm, with the children that still hold its served connections.
fn storm_with_ping_pong(
    server: &Server,
    gauge: &Gauge,
    beside: impl FnOnce(&AtomicBool) + Send,
) -> (Storm, StormChildren) {
    let addr = server.local_addr().unwrap();
    let mut children = StormChildren::start(server);
    let mut ping_pong = PingPong::connect(addr);
    let before = ping_pong
        .round_trips(200, || false)
        .expect("before the storm");
    let storm_over = AtomicBool::new(false);
    children.go();
    let (during, storm) = thread::scope(|scope| {
        let storm = scope.spawn(|| {
            // Over even if a report fails to come, so that the round trips below end.
            let _over = SetOnDrop(&storm_over);
            children.reports()
        });
        let beside = scope.spawn(|| beside(&storm_over));
        // Bounded by the count, and by the children's reports, which come within PATIENCE.
        let during = ping_pong.round_trips(10_000_000, || storm_over.load(Ordering::SeqCst));
        beside.join().expect("the clients beside the storm");
        (during, storm.join().expect("the storm's reports"))
    });
    let during = during.expect("a round trip of the ping-pong client failed during the storm");
    let after = ping_pong
        .round_trips(200, || false)
        .expect("after the storm");
    println!(
        "{ATTEMPTS} attempts in {:?}: {} served, {} closed by the server, {} failed",
        storm.took, storm.served, storm.closed, storm.failed
    );
    println!(
        "ping-pong round trips: before {}; during {}; after {}",
        percentiles(before),
        percentiles(during),
        percentiles(after)
    );
    assert_eq!(
        storm.failed, 0,
        "attempts neither served nor closed, the first: {:?}",
        storm.failures
    );
    let peak = gauge.peak.load(Ordering::SeqCst);
    assert!(peak <= MAX_CONNECTIONS, "{peak} served at once");
    (storm, children)
}

/// Sets its flag when dropped, by a return or a panic.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Closes the storm's served connections (its children exit), then checks that the server is
/// back to none open, its counts add up, and a new client is served.
fn after_the_storm(server: &Server, children: StormChildren) {
    for (mut child, stdin, _) in children.children {
        drop(stdin);
        let exited = eventually(|| child.try_wait().unwrap().is_some());
        assert!(exited, "a storm child still runs after its stdin closed");
    }
    assert!(
        eventually(|| server.connections() == 0),
        "{} connections still open after the storm's clients closed",
        server.connections()
    );
    let stats = server.stats();
    assert!(counts_add_up(&stats), "{stats:?}");
    let mut newcomer = connect_from(ip(STORM_FROM), server.local_addr().unwrap()).unwrap();
    round_trip(&mut newcomer, b"after the storm");
}

#[test]
#[ignore = "needs 11,000 descriptors per process (ulimit -n): bash .ci/run runs it"]
fn storm_past_max_connections_is_refused_at_once_while_a_connected_client_is_served() {
    let _one = ONE_STORM.lock().unwrap_or_else(|e| e.into_inner());
    raise_open_file_limit();
    let gauge = Arc::default();
    let server = start_storm_server(Server::builder(), &gauge);
    let (storm, children) = storm_with_ping_pong(&server, &gauge, |_| {});
    // The ping-pong client holds one slot and the storm's served clients hold theirs: exactly
    // the limit is served, and every other attempt was refused.
    assert_eq!(storm.served, MAX_CONNECTIONS - 1);
    assert_eq!(storm.closed, ATTEMPTS - (MAX_CONNECTIONS - 1));
    let stats = server.stats();
    assert_eq!(stats.open, MAX_CONNECTIONS, "{stats:?}");
    assert_eq!(
        stats.refused(RefusalReason::ConnectionLimit),
        storm.closed as u64,
        "{stats:?}"
    );
    assert!(counts_add_up(&stats), "{stats:?}");
    after_the_storm(&server, children);
}

/// Connections one address may hold under the per-client limit.
const PER_IP: usize = 1_000;

#[test]
#[ignore = "needs 11,000 descriptors per process (ulimit -n): bash .ci/run runs it"]
fn storm_from_one_address_is_refused_at_its_limit_while_other_addresses_are_served() {
    let _one = ONE_STORM.lock().unwrap_or_else(|e| e.into_inner());
    raise_open_file_limit();
    let gauge = Arc::default();
    let server = start_storm_server(Server::builder().max_connections_per_ip(PER_IP), &gauge);
    let addr = server.local_addr().unwrap();
    let newcomers_served = AtomicUsize::new(0);
    // New clients from the other address, one after another from the storm's start until its
    // end (one at least, however short the storm): each is served.
    let newcomers = |storm_over: &AtomicBool| {
        for _ in 0..100_000 {
            let mut client = connect_from(ip(OTHERS), addr).expect("a newcomer connects");
            round_trip(&mut client, b"beside the storm");
            newcomers_served.fetch_add(1, Ordering::SeqCst);
            if storm_over.load(Ordering::SeqCst) {
                break;
            }
        }
    };
    let (storm, children) = storm_with_ping_pong(&server, &gauge, newcomers);
    let newcomers = newcomers_served.load(Ordering::SeqCst);
    println!("{newcomers} clients from {OTHERS} served during the storm");
    assert_eq!(storm.served, PER_IP);
    assert_eq!(storm.closed, ATTEMPTS - PER_IP);
    let stats = server.stats();
    assert_eq!(
        stats.refused(RefusalReason::PerClientLimit),
        storm.closed as u64,
        "{stats:?}"
    );
    assert_eq!(stats.refused(RefusalReason::ConnectionLimit), 0);
    assert!(
        eventually(|| counts_add_up(&server.stats())),
        "{:?}",
        server.stats()
    );
    after_the_storm(&server, children);
}
