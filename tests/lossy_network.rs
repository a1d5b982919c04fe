//! A bad network: the server and 250 clients (200 over TCP, 50 over TLS) in a network namespace
//! of the test's own, whose loopback loses packets, is slow, or resets connections, with the
//! kernel's own tools (nftables and a tc qdisc; this kernel has no netem). Every byte a client
//! sends must come back byte for byte; a client that the network resets must see a clean close
//! (an error or end of file, never a hang); the server's counts must add up, and its open
//! connections must drop to 0 within its idle timeout once the clients are gone.
//!
//! Each test re-executes this binary, running only itself, under `unshare --net`: the faults
//! and the load stay inside that namespace, which has nothing but its own loopback.
//! docs/reliability.md ("A bad network") gives the figures of a run.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::tls::{tls_handshake, TlsFiles};
use common::*;
use taskserve::rustls::ClientConfig;
use taskserve::{CloseReason, Server, Stats};

/// The variable that tells a re-executed test binary that it runs inside the namespace, and for
/// which test.
const INSIDE: &str = "TASKSERVE_LOSSY_NETWORK";

/// What the summary line of a scenario starts with: the outer test requires it, so that a
/// re-executed binary that ran no test (a misspelt name) cannot pass.
const SUMMARY: &str = "lossy network summary:";

const TCP_CLIENTS: usize = 200;
const TLS_CLIENTS: usize = 50;
const MIB: usize = 1 << 20;

/// The most a client writes before it reads the echo back: less than the kernel's default
/// receive buffer (128 KiB), so that a client writing while not reading can never fill every
/// buffer on the way and wait for ever on a server that waits for it to read.
const CHUNK: usize = 64 * 1024;

/// One degraded network and the load that crosses it.
struct Scenario {
    /// The test's function name: the re-executed binary runs only that test.
    test: &'static str,
    /// What nftables does to the server's packets, both ways, as the end of a rule that matches
    /// them (`tcp dport PORTS` and `tcp sport PORTS`, in the input hook).
    nft: Option<&'static str>,
    /// The bottleneck's qdisc, as `tc qdisc add dev ifb0 root` takes it (see [`BOTTLENECK`]).
    qdisc: Option<&'static str>,
    /// The largest random payload; one client of each transport sends 1 MiB besides.
    max_random: usize,
    /// The server's idle timeout (and TLS handshake timeout): longer than any stall the
    /// network causes, or the server would close clients that are merely slowed.
    idle_timeout: Duration,
    /// Whether the network resets connections: clients may then end early, and keep alive so
    /// that one whose server side was reset finds out instead of waiting for a reply.
    resets: bool,
    /// How long the clients may take, all of them.
    deadline: Duration,
}

/// The loopback as every scenario has it: a real link's MTU, and one segment per packet (no
/// 64 KiB GSO super-packets), so that a rule that drops 2 % of packets drops 2 % of segments.
const LINK: &str = "ip link set lo up mtu 1500 gso_max_segs 1";

/// Where a scenario's qdisc goes: every packet lo delivers is redirected, on its way in,
/// through ifb0, whose root qdisc shapes (and drops) it. Not on lo's way out: there a full
/// queue's drop is reported to the sending socket, and TCP takes it as local congestion, which
/// no router's drop tells it. A SYN-ACK whose retransmission fails so ends the half-open
/// connection, and the client's ACK is then answered with a reset: 81 of 250 clients were reset
/// so at 1 Mbit/s, and a real slow link resets none.
const BOTTLENECK: &[&str] = &[
    "ip link add ifb0 type ifb",
    "ip link set ifb0 up",
    "tc qdisc add dev lo handle ffff: ingress",
    "tc filter add dev lo parent ffff: protocol all u32 match u32 0 0 \
     action mirred egress redirect dev ifb0",
];

#[test]
#[ignore = "needs root, unshare, nft and tc: bash .ci/run installs them"]
fn two_percent_loss_loses_no_byte() {
    run(&Scenario {
        test: "two_percent_loss_loses_no_byte",
        nft: Some("numgen random mod 100 < 2 counter drop"),
        qdisc: None,
        max_random: MIB,
        idle_timeout: Duration::from_secs(20),
        resets: false,
        deadline: Duration::from_secs(60),
    });
}

#[test]
#[ignore = "needs root, unshare, nft and tc: bash .ci/run installs them"]
fn ten_percent_loss_loses_no_byte() {
    run(&Scenario {
        test: "ten_percent_loss_loses_no_byte",
        nft: Some("numgen random mod 100 < 10 counter drop"),
        qdisc: None,
        max_random: MIB,
        idle_timeout: Duration::from_secs(20),
        resets: false,
        deadline: Duration::from_secs(90),
    });
}

#[test]
#[ignore = "needs root, unshare, nft and tc: bash .ci/run installs them"]
fn a_one_mbit_link_loses_no_byte() {
    run(&Scenario {
        test: "a_one_mbit_link_loses_no_byte",
        nft: None,
        qdisc: Some("tbf rate 1mbit burst 16kb latency 400ms"),
        max_random: 8 * 1024,
        idle_timeout: Duration::from_secs(20),
        resets: false,
        deadline: Duration::from_secs(90),
    });
}

#[test]
#[ignore = "needs root, unshare, nft and tc: bash .ci/run installs them"]
fn resets_close_clients_cleanly_and_the_counts_add_up() {
    run(&Scenario {
        test: "resets_close_clients_cleanly_and_the_counts_add_up",
        nft: Some("numgen random mod 1000 < 1 counter reject with tcp reset"),
        qdisc: None,
        max_random: MIB,
        idle_timeout: Duration::from_secs(5),
        resets: true,
        deadline: Duration::from_secs(60),
    });
}

/// Runs `scenario`: in the namespace if this process is there for it, else by re-executing
/// this binary there.
fn run(scenario: &Scenario) {
    if std::env::var(INSIDE).as_deref() == Ok(scenario.test) {
        inside(scenario);
    } else {
        outside(scenario);
    }
}

/// Re-executes this test binary, running `scenario.test` only, in a new network namespace;
/// passes on what it printed, and fails if it failed or printed no summary.
fn outside(scenario: &Scenario) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new("unshare");
    command
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args(["--exact", scenario.test, "--include-ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(INSIDE, scenario.test)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = ChildGuard::new(command.spawn().expect("run unshare (util-linux)"));
    // The clients' deadline, the wait for the idle timeout, and a minute for the rest.
    let limit = scenario.deadline + scenario.idle_timeout * 2 + Duration::from_secs(60);
    let output = exit_within(child, scenario.test, limit);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Captured by the harness: shown with --nocapture, or when the test fails.
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "the scenario failed in its namespace"
    );
    assert!(stdout.contains(SUMMARY), "the scenario printed no summary");
}

/// The scenario itself, in its namespace: sets up the loopback, starts the server, degrades the
/// network, runs the clients and checks what they and the server saw.
fn inside(scenario: &Scenario) {
    // /proc/net is the namespace's own (/sys/class/net is whichever namespace mounted /sys).
    let devices = std::fs::read_to_string("/proc/net/dev").expect("read /proc/net/dev");
    let interfaces: Vec<&str> = devices
        .lines()
        .filter_map(|line| Some(line.split_once(':')?.0.trim()))
        .collect();
    assert_eq!(interfaces, ["lo"], "not in a namespace of the test's own");
    command_line(LINK);
    let files = TlsFiles::new();
    let server = Server::builder()
        .threads(2)
        .idle_timeout(scenario.idle_timeout)
        .tls_handshake_timeout(scenario.idle_timeout)
        .listen_tcp("127.0.0.1:0")
        .listen_tls("127.0.0.1:0", files.config())
        .start(taskserve::echo)
        .expect("the server starts");
    let addrs: Vec<SocketAddr> = server
        .local_addrs()
        .iter()
        .map(|(addr, _)| addr.to_string().parse().expect("an IP address"))
        .collect();
    let faults = Faults::inject(scenario, &addrs);
    let start = Instant::now();
    let load = Load::run(scenario, addrs[0], addrs[1], &files.client());
    let took = start.elapsed();
    let (stats, settled) = wait_for_quiet(&server, scenario.idle_timeout);
    println!(
        "{SUMMARY} {}: {}; clients done in {:.1} s; {}; server {}; open 0 after {:.1} s",
        scenario.test,
        load.describe(),
        took.as_secs_f64(),
        faults.describe(),
        describe(&stats),
        settled.as_secs_f64(),
    );
    // The kernel's own counts of what TCP went through (retransmissions, resets, drops).
    println!("nstat:\n{}", run_tool("nstat", &["-as"], None));
    load.check(scenario);
    check_counts(scenario, &stats, &load);
    faults.check();
}

/// Runs `line`, a program and its arguments separated by spaces; prints it first, as the record
/// of what the scenario did. Panics with the program's error if it fails.
fn command_line(line: &str) {
    println!("{line}");
    let mut words = line.split_whitespace();
    let program = words.next().expect("a program");
    run_tool(program, &words.collect::<Vec<_>>(), None);
}

/// Runs `program` with `args` and `input` on its stdin; returns its stdout, or panics with its
/// stderr.
fn run_tool(program: &str, args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program} (bash .ci/run installs it): {e}"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.unwrap_or("").as_bytes()).unwrap();
    drop(stdin);
    let output = exit_within_patience(ChildGuard::new(child), program);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The faults injected into the namespace's loopback.
struct Faults {
    nft: bool,
    qdisc: bool,
}

impl Faults {
    /// Adds `scenario`'s nftables rules, on the packets to and from the server's `ports` only
    /// (its clients' traffic, both ways), and its qdisc, on every packet (through [`BOTTLENECK`]).
    fn inject(scenario: &Scenario, addrs: &[SocketAddr]) -> Faults {
        if let Some(statement) = scenario.nft {
            let ports: Vec<String> = addrs.iter().map(|a| a.port().to_string()).collect();
            let ports = ports.join(", ");
            let ruleset = format!(
                "table inet lossy {{\n\
                 \tchain input {{\n\
                 \t\ttype filter hook input priority filter; policy accept;\n\
                 \t\ttcp dport {{ {ports} }} {statement}\n\
                 \t\ttcp sport {{ {ports} }} {statement}\n\
                 \t}}\n\
                 }}\n"
            );
            println!("nft -f - <<'EOF'\n{ruleset}EOF");
            run_tool("nft", &["-f", "-"], Some(&ruleset));
        }
        if let Some(qdisc) = scenario.qdisc {
            BOTTLENECK.iter().for_each(|line| command_line(line));
            command_line(&format!("tc qdisc add dev ifb0 root {qdisc}"));
        }
        Faults {
            nft: scenario.nft.is_some(),
            qdisc: scenario.qdisc.is_some(),
        }
    }

    /// Packets the nftables rules dropped or reset, from their counters.
    fn hit(&self) -> u64 {
        if !self.nft {
            return 0;
        }
        let table = run_tool("nft", &["list", "table", "inet", "lossy"], None);
        table
            .split("counter packets ")
            .skip(1)
            .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The qdisc's statistics line: `Sent N bytes M pkt (dropped D, overlimits O requeues R)`.
    fn qdisc_stats(&self) -> Option<String> {
        if !self.qdisc {
            return None;
        }
        let stats = run_tool("tc", &["-s", "qdisc", "show", "dev", "ifb0"], None);
        let line = stats
            .lines()
            .find(|line| line.trim_start().starts_with("Sent"));
        Some(line.expect("tc -s shows what was sent").trim().to_string())
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.nft {
            parts.push(format!("nft hit {} packets", self.hit()));
        }
        if let Some(stats) = self.qdisc_stats() {
            parts.push(format!("tbf: {stats}"));
        }
        parts.join(", ")
    }

    /// Panics unless the faults really hit the traffic: a rule that matched nothing (a wrong
    /// port) would make a clean run prove nothing.
    fn check(&self) {
        if self.nft {
            assert!(self.hit() > 0, "the nftables rules hit no packet");
        }
        if let Some(stats) = self.qdisc_stats() {
            assert!(stats.contains("overlimits") && !stats.contains("overlimits 0 "));
        }
    }
}

/// The time a client waits for any one thing (a connection, a reply, room to write): far more
/// than the stalls of these networks, where a segment lost several times in a row waits 0.2,
/// 0.4, 0.8, 1.6... s for its retransmission; finite, so that a hang fails the test.
const CLIENT_PATIENCE: Duration = Duration::from_secs(30);

/// One client: its transport and how many bytes it sends (and must get back).
#[derive(Debug, Clone, Copy)]
struct Client {
    tls: bool,
    size: usize,
}

/// How a client ended: the payload bytes that came back byte for byte, and the error that cut
/// it short, if one did (a panic's message for bytes that came back wrong).
struct Ended {
    client: Client,
    echoed: usize,
    outcome: Result<(), String>,
    /// Whether the error is a clean close: a reset, an end of file or a refused connection,
    /// as opposed to a timeout (a hang) or wrong bytes.
    clean: bool,
}

/// The clients of a scenario, once they have all ended.
struct Load {
    ended: Vec<Ended>,
}

impl Load {
    /// Runs 200 TCP clients against `tcp` and 50 TLS ones against `tls`, all at once, each on
    /// its own thread; returns when all have ended, or panics after `scenario.deadline`.
    fn run(
        scenario: &Scenario,
        tcp: SocketAddr,
        tls: SocketAddr,
        config: &Arc<ClientConfig>,
    ) -> Load {
        let mut rng = fastrand::Rng::new();
        let clients: Vec<Client> = (0..TCP_CLIENTS + TLS_CLIENTS)
            .map(|n| Client {
                tls: n >= TCP_CLIENTS,
                // The first of each transport sends the most, 1 MiB.
                size: if n == 0 || n == TCP_CLIENTS {
                    MIB
                } else {
                    log_uniform(&mut rng, scenario.max_random)
                },
            })
            .collect();
        let (report, reports) = mpsc::channel();
        for (n, &client) in clients.iter().enumerate() {
            let (report, config, keepalive) = (report.clone(), Arc::clone(config), scenario.resets);
            let addr = if client.tls { tls } else { tcp };
            std::thread::spawn(move || {
                let mut echoed = 0;
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let config = client.tls.then_some(&config);
                    talk(addr, config, client.size, keepalive, &mut echoed)
                }));
                let _ = report.send((n, Ended::new(client, echoed, outcome)));
            });
        }
        let deadline = Instant::now() + scenario.deadline;
        let mut ended: Vec<Option<Ended>> = clients.iter().map(|_| None).collect();
        for _ in 0..clients.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match reports.recv_timeout(left) {
                Ok((n, end)) => ended[n] = Some(end),
                Err(_) => {
                    let waiting: Vec<_> =
                        (0..clients.len()).filter(|&n| ended[n].is_none()).collect();
                    panic!(
                        "clients {waiting:?} still ran after {:?}",
                        scenario.deadline
                    );
                }
            }
        }
        Load {
            ended: ended.into_iter().map(Option::unwrap).collect(),
        }
    }

    fn sent(&self) -> usize {
        self.ended.iter().map(|end| end.client.size).sum()
    }

    fn echoed(&self) -> usize {
        self.ended.iter().map(|end| end.echoed).sum()
    }

    fn completed(&self) -> usize {
        self.ended.iter().filter(|end| end.outcome.is_ok()).count()
    }

    fn describe(&self) -> String {
        let (tls, largest) = (
            self.ended.iter().filter(|end| end.client.tls).count(),
            self.ended
                .iter()
                .map(|end| end.client.size)
                .max()
                .unwrap_or(0),
        );
        format!(
            "{} clients ({} TCP, {tls} TLS), {} bytes to send (largest {largest}), {} echoed \
             byte for byte; {} completed, {} cut short cleanly, {} failed",
            self.ended.len(),
            self.ended.len() - tls,
            self.sent(),
            self.echoed(),
            self.completed(),
            self.ended
                .iter()
                .filter(|end| end.outcome.is_err() && end.clean)
                .count(),
            self.ended.iter().filter(|end| !end.clean).count(),
        )
    }

    /// Panics unless every client completed, or, where the network resets connections, ended
    /// with a clean close; and, there, unless the resets cut some short and spared others.
    fn check(&self, scenario: &Scenario) {
        let failed: Vec<String> = self
            .ended
            .iter()
            .filter(|end| !end.clean || (end.outcome.is_err() && !scenario.resets))
            .map(|end| format!("{:?}: {:?}", end.client, end.outcome))
            .collect();
        assert!(
            failed.is_empty(),
            "{} clients failed: {failed:#?}",
            failed.len()
        );
        if scenario.resets {
            let completed = self.completed();
            assert!(completed > 0, "the resets left no client whole");
            assert!(
                completed < self.ended.len(),
                "the resets cut no client short"
            );
        }
    }
}

impl Ended {
    fn new(client: Client, echoed: usize, outcome: std::thread::Result<io::Result<()>>) -> Ended {
        use io::ErrorKind::*;
        let (outcome, clean) = match outcome {
            Ok(Ok(())) => (Ok(()), true),
            Ok(Err(e)) => {
                let clean = matches!(
                    e.kind(),
                    ConnectionReset
                        | ConnectionAborted
                        | ConnectionRefused
                        | BrokenPipe
                        | UnexpectedEof
                );
                (Err(e.to_string()), clean)
            }
            Err(panic) => {
                let message = panic.downcast_ref::<&str>().map(|s| s.to_string());
                let message = message.or_else(|| panic.downcast_ref::<String>().cloned());
                (Err(format!("panicked: {message:?}")), false)
            }
        };
        Ended {
            client,
            echoed,
            outcome,
            clean,
        }
    }
}

/// A size from 1 to `max` bytes whose logarithm is uniform: as many payloads under 1 KiB as
/// from 1 KiB to 1 MiB, as traffic is, mostly small with a few large.
fn log_uniform(rng: &mut fastrand::Rng, max: usize) -> usize {
    let size = (max as f64).powf(rng.f64()) as usize;
    size.clamp(1, max)
}

/// One client's life: connects to `addr` (over TLS with `tls`), sends `size` random bytes in
/// chunks of random sizes, each read back before the next goes, then closes and waits for
/// the server's close. Adds to `echoed` the payload bytes that came back, as they do.
fn talk(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    size: usize,
    keepalive: bool,
    echoed: &mut usize,
) -> io::Result<()> {
    let start = Instant::now();
    let at = |stage: &'static str| {
        move |e: io::Error| {
            io::Error::new(e.kind(), format!("{stage} at {:?}: {e}", start.elapsed()))
        }
    };
    let tcp = dial(addr, keepalive).map_err(at("connect"))?;
    match tls {
        None => {
            let mut stream = tcp;
            echo_chunks(&mut stream, size, echoed).map_err(at("echo"))?;
            stream.shutdown(Shutdown::Write).map_err(at("shutdown"))?;
            expect_end(&mut stream).map_err(at("end"))
        }
        Some(config) => {
            let mut stream = tls_handshake(tcp, config, "localhost").map_err(at("handshake"))?;
            echo_chunks(&mut stream, size, echoed).map_err(at("echo"))?;
            stream.conn.send_close_notify();
            stream.flush().map_err(at("close_notify"))?;
            expect_end(&mut stream).map_err(at("end"))
        }
    }
}

/// Connects to `addr`, waiting up to [`CLIENT_PATIENCE`] for that and for each read and write.
/// With `keepalive`, the kernel probes the server after 1 s without traffic, so that a client
/// whose server side was reset (by a rule that let the client's side be) finds out in seconds.
fn dial(addr: SocketAddr, keepalive: bool) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, TcpKeepalive, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if keepalive {
        let second = Duration::from_secs(1);
        let probes = TcpKeepalive::new()
            .with_time(second)
            .with_interval(second)
            .with_retries(3);
        socket.set_tcp_keepalive(&probes)?;
    }
    socket.connect_timeout(&addr.into(), CLIENT_PATIENCE)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(CLIENT_PATIENCE))?;
    stream.set_write_timeout(Some(CLIENT_PATIENCE))?;
    Ok(stream)
}

/// Sends `size` random bytes on `stream` in chunks of 1 to [`CHUNK`] bytes, and reads each
/// chunk's echo before sending the next; panics if a reply differs from what was sent.
fn echo_chunks(
    stream: &mut (impl Read + Write),
    size: usize,
    echoed: &mut usize,
) -> io::Result<()> {
    let mut rng = fastrand::Rng::new();
    while *echoed < size {
        let message = payload(rng.usize(1..=CHUNK.min(size - *echoed)));
        stream.write_all(&message)?;
        stream.flush()?;
        let reply = read_payload(stream, message.len())?;
        assert!(reply == message, "the reply differs from what was sent");
        *echoed += message.len();
    }
    Ok(())
}

/// Reads the server's close after the client's: end of file, with no byte before it.
fn expect_end(stream: &mut impl Read) -> io::Result<()> {
    let mut byte = [0; 1];
    match read_some(stream, &mut byte)? {
        0 => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a byte after the last reply",
        )),
    }
}

/// Waits for the server's open connections to drop to 0, for up to its idle timeout and an
/// eighth more (how late the idle sweep may close one), and a second for a busy machine.
/// Returns its counters then, and how long that took.
fn wait_for_quiet(server: &Server, idle_timeout: Duration) -> (Stats, Duration) {
    let start = Instant::now();
    let limit = idle_timeout + idle_timeout / 8 + Duration::from_secs(1);
    let quiet = eventually_within(limit, || server.connections() == 0);
    let stats = server.stats();
    assert!(
        quiet,
        "{} connections still open after {limit:?}: {stats:?}",
        stats.open
    );
    (stats, start.elapsed())
}

/// The server's counts, with each way connections ended that happened.
fn describe(stats: &Stats) -> String {
    let closed: Vec<String> = CloseReason::ALL
        .iter()
        .filter(|&&how| stats.closed(how) > 0)
        .map(|&how| format!("{} {}", how.label(), stats.closed(how)))
        .collect();
    format!(
        "accepted {} (accept errors {}), refused {}, open {}, closed {} ({}), read {} bytes",
        stats.accepted,
        stats.accept_errors,
        stats.refused_total(),
        stats.open,
        stats.closed_total(),
        closed.join(", "),
        stats.bytes_read,
    )
}

/// Panics unless the server's counts add up and agree with the clients: accepted = refused +
/// open + closed; no refusal, no handler error, panic or stop. On a network that only loses
/// or slows, every client was served and closed by itself, and the server read every byte; with
/// resets, connections may also end by a reset, the idle timeout or a cut handshake, and the
/// server read at least what came back.
fn check_counts(scenario: &Scenario, stats: &Stats, load: &Load) {
    let text = describe(stats);
    let sum = stats.refused_total() + stats.open as u64 + stats.closed_total();
    assert_eq!(
        stats.accepted, sum,
        "accepted != refused + open + closed: {text}"
    );
    assert_eq!(stats.refused_total(), 0, "{text}");
    let mut allowed = vec![CloseReason::ClientClosed];
    if scenario.resets {
        allowed.extend([
            CloseReason::PeerReset,
            CloseReason::IdleTimeout,
            CloseReason::HandshakeFailed,
        ]);
        assert!(stats.accepted <= load.ended.len() as u64, "{text}");
        assert!(stats.bytes_read >= load.echoed() as u64, "{text}");
    } else {
        assert_eq!(stats.accepted, load.ended.len() as u64, "{text}");
        assert_eq!(
            stats.closed(CloseReason::ClientClosed),
            stats.accepted,
            "{text}"
        );
        assert_eq!(stats.bytes_read, load.sent() as u64, "{text}");
    }
    for how in CloseReason::ALL {
        if !allowed.contains(&how) {
            assert_eq!(stats.closed(how), 0, "{} closes: {text}", how.label());
        }
    }
}
