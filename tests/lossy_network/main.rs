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

#[path = "../common/mod.rs"]
mod common;

mod clients;
mod netns;
mod partition;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clients::{Load, MIB};
use common::tls::TlsFiles;
use common::*;
use netns::{command_line, run_tool, Faults, LINK};
use taskserve::{CloseReason, Server, Stats};

/// The variable that tells a re-executed test binary that it runs inside the namespace, and for
/// which test.
const INSIDE: &str = "TASKSERVE_LOSSY_NETWORK";

/// What the summary line of a scenario starts with: the outer test requires it, so that a
/// re-executed binary that ran no test (a misspelt name) cannot pass.
const SUMMARY: &str = "lossy network summary:";

/// One degraded network and the load that crosses it.
struct Scenario {
    /// The test's function name: the re-executed binary runs only that test.
    test: &'static str,
    /// What nftables does to the server's packets, both ways, as the end of a rule that matches
    /// them (`tcp dport PORTS` and `tcp sport PORTS`, in the input hook).
    nft: Option<&'static str>,
    /// The bottleneck's qdisc, as `tc qdisc add dev ifb0 root` takes it (see [`netns::BOTTLENECK`]).
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

/// Runs `scenario` in a network namespace of its own.
fn run(scenario: &Scenario) {
    // The clients' deadline, the wait for the idle timeout, and a minute for the rest.
    let limit = scenario.deadline + scenario.idle_timeout * 2 + Duration::from_secs(60);
    in_namespace(scenario.test, limit, || inside(scenario));
}

/// Runs `body`, the test `test`, in a network namespace of its own that has nothing but its
/// loopback: calls it if this process is that test re-executed there, else re-executes it
/// there and waits up to `limit` for it.
fn in_namespace(test: &str, limit: Duration, body: impl FnOnce()) {
    if std::env::var(INSIDE).as_deref() == Ok(test) {
        // /proc/net is the namespace's own (/sys/class/net is whichever namespace mounted /sys).
        let devices = std::fs::read_to_string("/proc/net/dev").expect("read /proc/net/dev");
        let interfaces: Vec<&str> = devices
            .lines()
            .filter_map(|line| Some(line.split_once(':')?.0.trim()))
            .collect();
        assert_eq!(interfaces, ["lo"], "not in a namespace of the test's own");
        command_line(LINK);
        body();
    } else {
        outside(test, limit);
    }
}

/// Re-executes this test binary, running `test` only, in a new network namespace; passes on
/// what it printed, and fails if it failed or printed no summary.
fn outside(test: &str, limit: Duration) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new("unshare");
    command
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args(["--exact", test, "--include-ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(INSIDE, test)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = ChildGuard::new(command.spawn().expect("run unshare (util-linux)"));
    let output = exit_within(child, test, limit);
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

/// The scenario itself, in its namespace: starts the server, degrades the network, runs the
/// clients and checks what they and the server saw.
fn inside(scenario: &Scenario) {
    let files = TlsFiles::new();
    let server = Server::builder()
        .threads(2)
        .idle_timeout(scenario.idle_timeout)
        .tls_handshake_timeout(scenario.idle_timeout)
        .listen_tcp("127.0.0.1:0")
        .listen_tls("127.0.0.1:0", files.config())
        .start(taskserve::echo)
        .expect("the server starts");
    let addrs = inet_addrs(&server);
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

/// The addresses `server` listens on, all TCP (TLS included), in the order added.
fn inet_addrs(server: &Server) -> Vec<SocketAddr> {
    server
        .local_addrs()
        .iter()
        .map(|(addr, _)| addr.to_string().parse().expect("an IP address"))
        .collect()
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
        assert!(stats.accepted <= load.clients() as u64, "{text}");
        assert!(stats.bytes_read >= load.echoed() as u64, "{text}");
    } else {
        assert_eq!(stats.accepted, load.clients() as u64, "{text}");
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
