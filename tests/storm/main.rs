//! A connection storm: 20,000 connection attempts at once against a server that serves at most
//! 10,000 connections. Every attempt must end, served or closed by the server, none left
//! hanging; no more clients are served at once than the limit allows; the server's counts add
//! up; and a client connected before the storm keeps its round trips all through it. Then the
//! same storm from one address under a per-client limit, while another address is served.
//!
//! 20,000 client sockets and the server's 10,000 are more descriptors than one process may have
//! here (a hard limit of 20,000, which root may raise only with CAP_SYS_RESOURCE, and root on
//! the machines of this project is without it). So the server runs in the test's process and
//! the storm in two child processes of 10,000 attempts each: this test binary again, running
//! `clients::storm_clients_when_run_by_a_storm_test`, told by its parent when to start. Each
//! child connects to a listener of its own: Linux gives a connect the even source ports first,
//! about 14,000 of them, and past them searches the whole range at each connect; 20,000 connects
//! from one address to one port took so long that 6,000 were not even sent after 15 s. Figures
//! for the same storm against the `echo` binary come from `bench/bin/loadgen storm`
//! (docs/reliability.md).
#![cfg(target_os = "linux")] // 127.0.0.0/8 all on loopback, as Linux has it

mod clients;
#[path = "../common/mod.rs"]
mod common;
mod fairness;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use clients::{Storm, StormChildren};
use common::*;
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
/// enough for a SYN dropped by a full accept queue to be sent again a few times (after 1 s,
/// then 3 s, 7 s, 15 s), and for a busy machine's child to have sent all its connects (2 to 8
/// s seen), far below a hang.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(30);
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

/// One storm at a time: two at once would need twice the descriptors and ports. The fairness
/// test takes it too: every server in this process shares async-io's one reactor, and a storm's
/// 20,000 connections on it change when the fairness server's wakes are seen.
static ONE_STORM: Mutex<()> = Mutex::new(());

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

/// Takes this test's turn ([`ONE_STORM`]), raises the open-file limit, and starts a server
/// under `builder`'s limits with a listener for each storm child; its handlers are counted in
/// the gauge returned. The turn is held until the guard is dropped.
fn start_storm_server(
    builder: taskserve::Builder,
) -> (MutexGuard<'static, ()>, Arc<Gauge>, Server) {
    let turn = ONE_STORM.lock().unwrap_or_else(|e| e.into_inner());
    raise_open_file_limit();
    let gauge = Arc::default();
    let builder = (0..CHILDREN).fold(builder, |b, _| b.listen_tcp("127.0.0.1:0"));
    let server = builder
        .threads(2)
        .max_connections(MAX_CONNECTIONS)
        .start(counting_echo(Arc::clone(&gauge)))
        .expect("server starts on ephemeral ports");
    (turn, gauge, server)
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

/// Runs a storm from [`STORM_FROM`] against `server` with a ping-pong client from [`OTHERS`]
/// connected before it; `beside` runs on its own thread during the storm (until its flag is
/// set). Checks that every attempt ended, the ping-pong client's round trips all succeeded
/// before, during and after, and no more handlers ran at once than the limit; returns the
/// storm, with the children that still hold its served connections, and the ping-pong client,
/// whose connection is open until it is dropped.
fn storm_with_ping_pong(
    server: &Server,
    gauge: &Gauge,
    beside: impl FnOnce(&AtomicBool) + Send,
) -> (Storm, StormChildren, PingPong) {
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
        // Bounded by the count, and by the children's reports, which come within ATTEMPT_LIMIT.
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
    (storm, children, ping_pong)
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
#[ignore = "needs 11,000 open files a process and 20,000 loopback connections: bash .ci/run runs it"]
fn storm_past_max_connections_is_refused_at_once_while_a_connected_client_is_served() {
    let (_turn, gauge, server) = start_storm_server(Server::builder());
    let (storm, children, ping_pong) = storm_with_ping_pong(&server, &gauge, |_| {});
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
    // Held until the counts above were read: dropped earlier, its close raced them.
    drop(ping_pong);
    after_the_storm(&server, children);
}

/// Connections one address may hold under the per-client limit.
const PER_IP: usize = 1_000;

#[test]
#[ignore = "needs 11,000 open files a process and 20,000 loopback connections: bash .ci/run runs it"]
fn storm_from_one_address_is_refused_at_its_limit_while_other_addresses_are_served() {
    let (_turn, gauge, server) =
        start_storm_server(Server::builder().max_connections_per_ip(PER_IP));
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
    let (storm, children, ping_pong) = storm_with_ping_pong(&server, &gauge, newcomers);
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
    drop(ping_pong);
    after_the_storm(&server, children);
}
