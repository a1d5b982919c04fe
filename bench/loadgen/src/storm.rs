//! A connection storm: `--connections` attempts started at once against a server, while one
//! ping-pong client connected before the storm keeps making round trips. Reports that client's
//! latency before, during and after the storm, how the attempts ended (served: their message
//! came back; refused: the server closed them unserved; failed: neither within the time limit),
//! how long the storm took to be resolved, and the kernel's counters of the listen queue.
//!
//! The attempts are made by `--processes` child processes (this program again, in the hidden
//! mode `storm-clients`), so that no process needs more descriptors than its hard limit allows:
//! 20,000 sockets and the rest do not fit a limit of 20,000. They connect from 127.0.0.1 up to
//! 127.0.0.`--sources`, or all from `--storm-from`; the ping-pong client from `--probe-from`.
//! Served attempts hold their connections until the "after" window has been measured.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::measure::new_histogram;
use crate::proto::{self, Errors, Failure, CONNECT_TIMEOUT};
use crate::tls::Stream;
use crate::Opts;

/// How long an attempt may take to be served or refused before it counts as failed: long
/// enough for a SYN dropped by a full listen queue to be sent again a few times (1 s, 3 s, 7 s).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(30);
/// TcpExt counters of /proc/net/netstat about the listen queue and SYN cookies.
const LISTEN_COUNTERS: [&str; 4] = [
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
];

pub async fn run(o: &Opts) -> Value {
    let mut children: Vec<Child> = (0..o.processes).map(|i| spawn_child(o, i)).collect();
    let reports = read_reports(&mut children);
    let probe_from = o.probe_from.unwrap_or(Ipv4Addr::LOCALHOST);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut errors = Errors::default();
    let tcp = proto::connect_from(probe_from, o.addr, deadline).await;
    let mut probe = Stream::Tcp(tcp.expect("the ping-pong client connects"));
    let pattern = proto::pattern(o.size);
    let before = probe_for(&mut probe, &pattern, o.duration, &mut errors).await;
    let kernel_before = kernel_counters();
    let stalled = stall_server(o);
    let go = Instant::now();
    for child in &mut children {
        let stdin = child.stdin.as_mut().expect("piped");
        stdin
            .write_all(b"go\n")
            .expect("a storm child reads its go");
    }
    // During: until every child has reported, bounded by the attempts' own limit.
    let mut during = new_histogram();
    let mut buf = vec![0u8; 64 * 1024];
    let mut parts = Vec::new();
    while parts.len() < children.len() && go.elapsed() < ATTEMPT_LIMIT + CONNECT_TIMEOUT {
        let start = Instant::now();
        if let Err(f) =
            proto::roundtrip(&mut probe, &pattern, &mut buf, start + CONNECT_TIMEOUT).await
        {
            errors.add(f);
            break;
        }
        during.saturating_record(start.elapsed().as_micros() as u64);
        parts.extend(reports.try_iter());
    }
    parts.extend(reports.iter().take(children.len() - parts.len()));
    let resolved_s = go.elapsed().as_secs_f64();
    if let Some(stall) = stalled {
        stall.join().expect("the server's stall");
    }
    let kernel_after = kernel_counters();
    let after = probe_for(&mut probe, &pattern, o.duration, &mut errors).await;
    let server = match &o.metrics {
        Some(addr) => scrape(addr).await,
        None => Value::Null,
    };
    for mut child in children {
        drop(child.stdin.take()); // lets it close its connections and exit
        let _ = child.wait();
    }
    let kernel: Value = LISTEN_COUNTERS
        .iter()
        .zip(kernel_before.iter().zip(&kernel_after))
        .map(|(name, (b, a))| (name.to_string(), json!(a.saturating_sub(*b))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    json!({
        "mode": "storm",
        "addr": o.addr.to_string(),
        "connections": o.connections,
        "processes": o.processes,
        "storm_from": storm_sources(o).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "probe_from": probe_from.to_string(),
        "size": o.size,
        "stall_server_s": o.stall.map(|d| d.as_secs_f64()),
        "window_s": o.duration.as_secs_f64(),
        "resolved_s": resolved_s,
        "attempts": add_up(&parts),
        "probe_rtt_us": {
            "before": quantiles(&before),
            "during": quantiles(&during),
            "after": quantiles(&after),
        },
        "kernel_tcp_ext": kernel,
        "server": server,
        "ok": parts.iter().all(|p| p["failed"] == 0 && p["bad"].is_null()),
        "errors": errors.json(),
    })
}

/// With `--stall-server`, stops the server (`--pid`) with SIGSTOP now, and returns a thread that
/// continues it with SIGCONT after the stall: the storm then meets a server that does not
/// accept, as in a long pause, and the listen queue overflows.
fn stall_server(o: &Opts) -> Option<std::thread::JoinHandle<()>> {
    let (stall, pid) = (
        o.stall?,
        o.pid.expect("--stall-server needs --pid") as libc::pid_t,
    );
    // SAFETY: kill(2) with a process id and a signal number; no memory is passed.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGSTOP) },
        0,
        "SIGSTOP the server"
    );
    Some(std::thread::spawn(move || {
        std::thread::sleep(stall);
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGCONT) },
            0,
            "SIGCONT the server"
        );
    }))
}

/// The source addresses of the storm's attempts.
fn storm_sources(o: &Opts) -> Vec<Ipv4Addr> {
    match &o.storm_from {
        Some(ips) => ips.clone(),
        None => {
            let k = o
                .sources
                .unwrap_or(o.connections.div_ceil(10_000))
                .clamp(1, 254);
            (1..=k as u8).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
        }
    }
}

/// Starts child `i` of the storm, with its share of the attempts; it waits for its go.
fn spawn_child(o: &Opts, i: usize) -> Child {
    let share = o.connections / o.processes + usize::from(i < o.connections % o.processes);
    let sources: Vec<String> = storm_sources(o).iter().map(|s| s.to_string()).collect();
    let exe = std::env::current_exe().expect("loadgen's own path");
    Command::new(exe)
        .arg("storm-clients")
        .args([
            "--addr",
            &o.addr.to_string(),
            "--connections",
            &share.to_string(),
        ])
        .args([
            "--size",
            &o.size.to_string(),
            "--threads",
            &o.threads.to_string(),
        ])
        .args(["--storm-from", &sources.join(",")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a storm child")
}

/// A thread per child that sends on the channel the child's report, its first line.
fn read_reports(children: &mut [Child]) -> mpsc::Receiver<Value> {
    let (send, reports) = mpsc::channel();
    for child in children {
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let send = send.clone();
        std::thread::spawn(move || {
            let line = stdout
                .lines()
                .next()
                .and_then(Result::ok)
                .unwrap_or_default();
            let report = serde_json::from_str(&line).unwrap_or_else(|_| json!({"bad": line}));
            let _ = send.send(report);
        });
    }
    reports
}

/// Round trips of the ping-pong client for `window`; their times.
async fn probe_for(
    probe: &mut Stream,
    msg: &[u8],
    window: Duration,
    errors: &mut Errors,
) -> Histogram<u64> {
    let (mut h, mut buf) = (new_histogram(), vec![0u8; 64 * 1024]);
    let end = Instant::now() + window;
    while Instant::now() < end {
        let start = Instant::now();
        if let Err(f) = proto::roundtrip(probe, msg, &mut buf, start + CONNECT_TIMEOUT).await {
            errors.add(f);
            break;
        }
        h.saturating_record(start.elapsed().as_micros() as u64);
    }
    h
}

fn quantiles(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
    })
}

/// The children's reports added up: counts summed, times their maximum.
fn add_up(parts: &[Value]) -> Value {
    let sum = |k: &str| {
        parts
            .iter()
            .map(|p| p[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let max = |k: &str, q: &str| parts.iter().map(|p| p[k][q].as_u64().unwrap_or(0)).max();
    let first_failure = parts.iter().find_map(|p| p["first_failure"].as_str());
    json!({
        "served": sum("served"),
        "refused": sum("refused"),
        "failed": sum("failed"),
        "reported": parts.len(),
        "first_failure": first_failure,
        "outcome_ms_max_of_children": {
            "p50": max("outcome_ms", "p50"),
            "p99": max("outcome_ms", "p99"),
            "max": max("outcome_ms", "max"),
        },
    })
}

/// The TcpExt counters in [`LISTEN_COUNTERS`] now (0 where missing).
fn kernel_counters() -> [u64; 4] {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let mut out = [0; 4];
    if let [names, values] = lines[..] {
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Some(i) = LISTEN_COUNTERS.iter().position(|c| *c == name) {
                out[i] = value.parse().unwrap_or(0);
            }
        }
    }
    out
}

/// The server's connection counts from its metrics endpoint at `addr`.
async fn scrape(addr: &str) -> Value {
    let text = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        Some(text)
    };
    let text = tokio::time::timeout(CONNECT_TIMEOUT, text)
        .await
        .ok()
        .flatten();
    let text = text.unwrap_or_default();
    let counts: serde_json::Map<String, Value> = text
        .lines()
        .filter(|l| l.starts_with("taskserve_connections_") || l.starts_with("taskserve_accept"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| {
            (
                k.to_string(),
                json!(v.parse::<f64>().unwrap_or(f64::NAN) as u64),
            )
        })
        .collect();
    counts.into()
}

/// How one attempt ended.
enum Outcome {
    Served(Stream),
    Refused,
    Failed(String),
}

/// The hidden mode `storm-clients`: waits for a line on stdin, makes its attempts at once,
/// prints its report as one JSON line, holds the served connections until stdin closes.
pub async fn clients(o: &Opts) -> Value {
    crate::idle::raise_nofile(o.connections as u64 + 1024);
    let mut line = String::new();
    let stdin = std::io::stdin();
    stdin.lock().read_line(&mut line).expect("the go line");
    let sources = storm_sources(o);
    let msg = Arc::new(proto::pattern(o.size));
    let go = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..o.connections {
        let (source, addr, msg) = (sources[i % sources.len()], o.addr, msg.clone());
        tasks.spawn(async move {
            let outcome = attempt(source, addr, &msg).await;
            (outcome, go.elapsed())
        });
    }
    let (mut held, mut refused, mut failed) = (Vec::new(), 0, 0);
    let (mut outcome_ms, mut first_failure) = (new_histogram(), None);
    while let Some(r) = tasks.join_next().await {
        let (outcome, at) = r.expect("attempt task panicked");
        outcome_ms.saturating_record(at.as_millis() as u64);
        match outcome {
            Outcome::Served(s) => held.push(s),
            Outcome::Refused => refused += 1,
            Outcome::Failed(why) => {
                failed += 1;
                first_failure.get_or_insert(why);
            }
        }
    }
    let report = json!({
        "served": held.len(),
        "refused": refused,
        "failed": failed,
        "first_failure": first_failure,
        "outcome_ms": quantiles(&outcome_ms),
    });
    println!("{report}");
    std::io::stdout().flush().expect("stdout");
    // Hold the served connections until the parent closes our stdin.
    let _ = stdin.lock().read_line(&mut line);
    drop(held);
    Value::Null
}

/// One attempt: connect from `source`, send `msg`, and wait for all of it to come back (served)
/// or for the server to close (refused).
async fn attempt(source: Ipv4Addr, addr: SocketAddr, msg: &[u8]) -> Outcome {
    let deadline = Instant::now() + ATTEMPT_LIMIT;
    let tcp = match proto::connect_from(source, addr, deadline).await {
        Ok(tcp) => tcp,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    // Dropping the stream then sends RST: no TIME_WAIT to take the next run's ports.
    if let Err(e) = tcp.set_zero_linger() {
        return Outcome::Failed(format!("SO_LINGER: {e}"));
    }
    let mut s = Stream::Tcp(tcp);
    match proto::roundtrip(&mut s, msg, &mut [0u8; 1024], deadline).await {
        Ok(()) => Outcome::Served(s),
        Err(Failure::Reset(_)) => Outcome::Refused,
        Err(Failure::Timeout) => {
            Outcome::Failed(format!("no reply nor close in {ATTEMPT_LIMIT:?}"))
        }
        Err(f) => Outcome::Failed(format!("{f:?}")),
    }
}
