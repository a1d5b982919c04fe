//! Rolling replacement behind a real HAProxy (#22): two `echo --proxy-protocol --drain-delay 2`
//! backends, health-checked by HAProxy on `/readyz`, with `retries 0` and no `option
//! redispatch` so that the balancer hides no failure. While clients run through HAProxy (short
//! ones: connect, one round trip, close; long-lived ones streaming for a while), each backend in
//! turn gets SIGTERM, waits out its delay, drains, exits, and a new process takes its ports.
//! No client may be refused, reset or answered short, every long-lived client gets its bytes
//! back in full, and each backend's log names the clients' own addresses. Needs `haproxy`
//! (`.ci/run` installs it). `bench/rolling.py` measures the same with `--drain-delay 0` beside.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Seconds each backend keeps accepting after SIGTERM while `/readyz` says 503: well over
/// HAProxy's `inter` × `fall` (200 ms × 1) plus a check's own time.
const DRAIN_DELAY: u64 = 2;
/// Seconds a stopping backend waits for open connections after the delay.
const SHUTDOWN_TIMEOUT: u64 = 5;
/// How long one long-lived client streams before it closes (and a new one starts): longer than
/// the drain delay, so that a stopping backend has some to drain after it stops accepting, and
/// shorter than the drain delay plus the shutdown timeout, so that a stop never has to cut one.
const LONG_SESSION: Duration = Duration::from_secs(3);
/// Client threads of connect, one round trip, close; each from an address of its own.
const SHORT_CLIENTS: usize = 4;
/// Client threads of long-lived streaming connections; each from an address of its own.
const LONG_CLIENTS: usize = 4;
/// The most connections one short-client thread makes, whatever the time: a bound.
const MAX_PER_CLIENT: usize = 20_000;
/// How long any client waits for a reply before it counts a timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The lowest port the kernel hands out as an ephemeral port (for `bind(0)` and for the source
/// port of an outgoing connection).
fn ephemeral_floor() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A port on 127.0.0.1 that is free now, for a program that must be told its port.
///
/// Taken below the ephemeral range when there is room: a backend is restarted on its ports
/// while thousands of connections come and go, and a port in the ephemeral range could be
/// taken in between as the source port of one of them (HAProxy's to the other backend, say).
/// Below it, only another program that binds fixed ports could take it; every caller retries
/// on "address in use" for that.
fn pick_port() -> u16 {
    let floor = ephemeral_floor();
    if floor > 11_000 {
        for _ in 0..100 {
            let port = fastrand::u16(10_000..floor);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    free_port()
}

/// An `echo --proxy-protocol --metrics` backend on fixed ports, and its log.
struct Backend {
    process: EchoProcess,
    log: StderrLog,
    port: u16,
    metrics: u16,
}

impl Backend {
    /// Starts one on `port` with its metrics on `metrics`; `Err(AddrInUse)` if either was
    /// taken.
    fn start(port: u16, metrics: u16, drain_delay: u64) -> io::Result<Backend> {
        let child = Command::new(env!("CARGO_BIN_EXE_echo"))
            .env("RUST_LOG", "info")
            .args(["--proxy-protocol", "--threads", "1"])
            .args(["--port", &port.to_string()])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(["--drain-delay", &drain_delay.to_string()])
            .args(["--shutdown-timeout", &SHUTDOWN_TIMEOUT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the echo binary");
        // Guarded from its spawn: a failed assertion below must not leave it running.
        let mut child = ChildGuard::new(child);
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut listening = String::new();
        stdout
            .read_line(&mut listening)
            .expect("read echo's stdout");
        if !listening.starts_with("listening on ") {
            // It exited without serving: a bind failed, or something worse.
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .ok();
            let _ = child.wait();
            if stderr.contains("Address already in use") {
                return Err(io::ErrorKind::AddrInUse.into());
            }
            panic!("echo on port {port} did not start: {stderr}");
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut process = EchoProcess {
            child,
            addr,
            listening: listening.trim_end().to_string(),
            stdout: Some(Lines::read(stdout, "echo's stdout")),
        };
        let metrics_line = process.next_line();
        assert_eq!(
            metrics_line,
            format!("listening on 127.0.0.1:{metrics} (metrics)")
        );
        let log = StderrLog::collect(&mut process);
        Ok(Backend {
            process,
            log,
            port,
            metrics,
        })
    }

    /// Starts one on ports picked now, picking again (a bounded number of times) when one was
    /// taken in between.
    fn start_anywhere(drain_delay: u64) -> Backend {
        for _ in 0..20 {
            match Backend::start(pick_port(), pick_port(), drain_delay) {
                Ok(backend) => return backend,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free pair of ports in 20 tries");
    }

    /// Starts its successor on the same ports, once it has exited. Retries for a while on
    /// "address in use": below the ephemeral range only a program binding fixed ports could
    /// hold them, and no such program should hold them long.
    fn restart_on(port: u16, metrics: u16, drain_delay: u64) -> Backend {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match Backend::start(port, metrics, drain_delay) {
                Ok(backend) => return backend,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("restarting echo on ports {port} and {metrics}: {e}"),
            }
        }
    }

    /// The status `GET /readyz` answers, if it answers.
    fn readyz(&self) -> Option<u16> {
        let mut client = TcpStream::connect(("127.0.0.1", self.metrics)).ok()?;
        client.set_read_timeout(Some(CLIENT_TIMEOUT)).ok()?;
        client
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut answer = String::new();
        client.read_to_string(&mut answer).ok()?;
        answer.get(9..12)?.parse().ok()
    }

    /// The client addresses its log names in `Connection from` lines so far.
    fn clients_logged(&self) -> Vec<SocketAddr> {
        self.log
            .text()
            .lines()
            .filter_map(|line| {
                let rest = &line[line.find("Connection from ")? + "Connection from ".len()..];
                rest.split_whitespace().next()?.parse().ok()
            })
            .collect()
    }
}

/// HAProxy, in the foreground, killed when dropped.
struct Haproxy {
    child: Child,
    front: SocketAddr,
    stats: PathBuf,
    log: PathBuf,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration that loses no client: checks of `/readyz` on each backend's metrics port
/// every 200 ms, out at the first failure, back after two successes; and no retry or
/// redispatch that could hide a failed connection from the test.
fn haproxy_config(front: u16, stats: &Path, backends: &[&Backend]) -> String {
    let mut config = format!(
        "global\n    maxconn 4000\n    stats socket {} mode 600 level admin\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 20s\n    \
         timeout server 20s\n    timeout check 1s\n    retries 0\n\
         frontend front\n    bind 127.0.0.1:{front}\n    default_backend echoes\n\
         backend echoes\n    balance roundrobin\n    option httpchk\n    \
         http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost\n    \
         http-check expect status 200\n",
        stats.display()
    );
    for (n, backend) in backends.iter().enumerate() {
        config += &format!(
            "    server echo{n} 127.0.0.1:{} send-proxy-v2 check port {} inter 200ms fall 1 rise 2\n",
            backend.port, backend.metrics
        );
    }
    config
}

fn start_haproxy(dir: &TempDir, backends: &[&Backend]) -> Haproxy {
    let stats = dir.join("haproxy.sock");
    for attempt in 0..20 {
        let port = pick_port();
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, haproxy_config(port, &stats, backends)).unwrap();
        let log = dir.join(&format!("haproxy-{attempt}.log"));
        let child = Command::new("haproxy")
            .arg("-db") // in the foreground
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start haproxy");
        let mut haproxy = Haproxy {
            child,
            front: SocketAddr::from(([127, 0, 0, 1], port)),
            stats: stats.clone(),
            log,
        };
        // It binds its listeners before it answers on its stats socket, and exits if a bind
        // fails: once the socket answers, the front port is its own.
        let up = eventually(|| {
            haproxy.child.try_wait().unwrap().is_some() || haproxy.show_stat().is_some()
        });
        assert!(
            up,
            "haproxy neither serves nor exits: {}",
            haproxy.log_text()
        );
        if haproxy.child.try_wait().unwrap().is_none() {
            return haproxy;
        }
        assert!(
            haproxy.log_text().contains("cannot bind socket"),
            "haproxy exited: {}",
            haproxy.log_text()
        );
    }
    panic!("haproxy found no free port in 20 tries");
}

impl Haproxy {
    /// `show stat` on the stats socket: HAProxy's CSV.
    fn show_stat(&self) -> Option<String> {
        let mut socket = UnixStream::connect(&self.stats).ok()?;
        socket.set_read_timeout(Some(CLIENT_TIMEOUT)).ok()?;
        socket.write_all(b"show stat\n").ok()?;
        let mut answer = String::new();
        socket.read_to_string(&mut answer).ok()?;
        answer.starts_with("# pxname").then_some(answer)
    }

    /// The status HAProxy gives server `echoN` of the backend: `UP`, `DOWN`, `UP 1/2`...
    fn status(&self, n: usize) -> String {
        let stat = self.show_stat().expect("haproxy answers show stat");
        let mut lines = stat.lines();
        let header: Vec<&str> = lines.next().unwrap()[2..].split(',').collect();
        let column = |name| header.iter().position(|h| *h == name).unwrap();
        let (proxy, server, status) = (column("pxname"), column("svname"), column("status"));
        let name = format!("echo{n}");
        lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|row| row[proxy] == "echoes" && row[server] == name)
            .map(|row| row[status].to_string())
            .expect("the server in show stat")
    }

    fn wait_status(&self, n: usize, wanted: &str) {
        assert!(
            eventually(|| self.status(n) == wanted),
            "echo{n} is {}, not {wanted}; haproxy's log:\n{}",
            self.status(n),
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What the clients saw.
#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    ok: AtomicUsize,
    refused: AtomicUsize,
    reset: AtomicUsize,
    short: AtomicUsize,
    timeout: AtomicUsize,
    other: AtomicUsize,
    long_ok: AtomicUsize,
    long_cut: AtomicUsize,
    long_bytes: AtomicUsize,
    /// Each long-lived session that got all its bytes back: its address and when it ended.
    long_sessions: Mutex<Vec<(SocketAddr, Instant)>>,
    /// Each connected client's own address.
    clients: Mutex<Vec<SocketAddr>>,
    /// The first few errors, for the failure message.
    errors: Mutex<Vec<String>>,
}

impl Counts {
    fn failed(&self, error: &io::Error, what: &str) {
        let counter = match error.kind() {
            io::ErrorKind::ConnectionRefused => &self.refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => &self.reset,
            io::ErrorKind::UnexpectedEof => &self.short,
            _ if timed_out(error) => &self.timeout,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 10 {
            errors.push(format!("{what}: {error}"));
        }
    }

    fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }

    fn summary(&self) -> String {
        format!(
            "connections={} ok={} refused={} reset={} short={} timeout={} other={} \
             long-lived ok={} cut={} bytes={}",
            Counts::get(&self.connections),
            Counts::get(&self.ok),
            Counts::get(&self.refused),
            Counts::get(&self.reset),
            Counts::get(&self.short),
            Counts::get(&self.timeout),
            Counts::get(&self.other),
            Counts::get(&self.long_ok),
            Counts::get(&self.long_cut),
            Counts::get(&self.long_bytes),
        )
    }
}

/// Connects from `from` through HAProxy; records the client's own address.
fn client_connect(from: IpAddr, front: SocketAddr, counts: &Counts) -> io::Result<TcpStream> {
    counts.connections.fetch_add(1, Ordering::Relaxed);
    let stream = connect_from(from, front)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    counts.clients.lock().unwrap().push(stream.local_addr()?);
    Ok(stream)
}

/// Connect, one round trip, close; again until `stop` (or the bound), a little paced.
fn short_client(from: IpAddr, front: SocketAddr, stop: &AtomicBool, counts: &Counts) {
    for n in 0..MAX_PER_CLIENT {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let message = format!("ping {from} {n}\n");
        let result = client_connect(from, front, counts).and_then(|mut stream| {
            stream.write_all(message.as_bytes())?;
            read_payload(&mut stream, message.len())
        });
        match result {
            Ok(reply) if reply == message.as_bytes() => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => counts.failed(&io::ErrorKind::InvalidData.into(), "short client"),
            Err(e) => counts.failed(&e, "short client"),
        }
        // Each client address keeps its TIME_WAIT ports well under the ~28,000 it has.
        thread::sleep(Duration::from_millis(1));
    }
}

/// Streams 1 KiB round trips every 20 ms for [`LONG_SESSION`], closes, starts again, until
/// `stop`. A session is ok if every byte came back.
fn long_client(from: IpAddr, front: SocketAddr, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        let result = client_connect(from, front, counts).and_then(|mut stream| {
            let me = stream.local_addr()?;
            let mut sent = 0;
            while began.elapsed() < LONG_SESSION {
                let chunk = payload(1024);
                stream.write_all(&chunk)?;
                if read_payload(&mut stream, chunk.len())? != chunk {
                    return Err(io::ErrorKind::InvalidData.into());
                }
                sent += chunk.len();
                thread::sleep(Duration::from_millis(20));
            }
            Ok((me, sent))
        });
        match result {
            Ok((me, bytes)) => {
                let session = (me, Instant::now());
                counts.long_sessions.lock().unwrap().push(session);
                counts.long_ok.fetch_add(1, Ordering::Relaxed);
                counts.long_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                counts.long_cut.fetch_add(1, Ordering::Relaxed);
                counts.failed(&e, "long-lived client");
            }
        }
    }
}

#[test]
#[ignore = "needs haproxy: bash .ci/run installs it"]
fn backends_replaced_one_by_one_behind_haproxy_lose_no_client() {
    // A test that skipped itself would pass without testing anything: .ci/run installs it.
    assert!(
        Command::new("haproxy").arg("-v").output().is_ok(),
        "this test needs haproxy (Debian's haproxy package)"
    );
    let began = Instant::now();
    let dir = TempDir::new();
    let mut backends = vec![
        Backend::start_anywhere(DRAIN_DELAY),
        Backend::start_anywhere(DRAIN_DELAY),
    ];
    let haproxy = start_haproxy(&dir, &backends.iter().collect::<Vec<_>>());
    let front = haproxy.front;
    haproxy.wait_status(0, "UP");
    haproxy.wait_status(1, "UP");

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for n in 0..SHORT_CLIENTS + LONG_CLIENTS {
        let from: IpAddr = format!("127.0.0.{}", 2 + n).parse().unwrap();
        let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
        clients.push(thread::spawn(move || {
            if n < SHORT_CLIENTS {
                short_client(from, front, &stop, &counts);
            } else {
                // Staggered, so that some session is open whenever a stop begins.
                thread::sleep(LONG_SESSION / LONG_CLIENTS as u32 * (n - SHORT_CLIENTS) as u32);
                long_client(from, front, &stop, &counts);
            }
        }));
    }
    thread::sleep(Duration::from_secs(1));

    // Each backend in turn: SIGTERM, out of HAProxy's rotation while it still serves, drained,
    // exited; a new process on its ports, ready, back in rotation, serving clients.
    let mut retired = Vec::new();
    for (n, slot) in backends.iter_mut().enumerate() {
        let (port, metrics) = (slot.port, slot.metrics);
        let stopped = Instant::now();
        slot.process.signal("TERM");
        haproxy.wait_status(n, "DOWN");
        let out_after = stopped.elapsed();
        assert!(
            out_after < Duration::from_secs(DRAIN_DELAY),
            "haproxy took echo{n} out after {out_after:?}, not within the drain delay"
        );
        assert_eq!(slot.process.wait_exit(), Some(0));
        let exited_after = stopped.elapsed();
        assert!(
            exited_after < Duration::from_secs(DRAIN_DELAY + SHUTDOWN_TIMEOUT),
            "echo{n} took {exited_after:?} to exit"
        );
        let new = Backend::restart_on(port, metrics, DRAIN_DELAY);
        assert!(
            eventually(|| new.readyz() == Some(200)),
            "new echo{n} ready"
        );
        haproxy.wait_status(n, "UP");
        assert!(
            eventually(|| !new.clients_logged().is_empty()),
            "new echo{n} served no client"
        );
        eprintln!(
            "echo{n}: out of rotation {out_after:?} after SIGTERM, exited after \
             {exited_after:?}, back and serving after {:?}",
            stopped.elapsed()
        );
        retired.push((std::mem::replace(slot, new), stopped));
    }
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    eprintln!("{}, in {:?}", counts.summary(), began.elapsed());

    let errors = counts.errors.lock().unwrap().join("\n");
    for (name, counter) in [
        ("refused", &counts.refused),
        ("reset", &counts.reset),
        ("short", &counts.short),
        ("timed out", &counts.timeout),
        ("failed otherwise", &counts.other),
        ("long-lived cut", &counts.long_cut),
    ] {
        assert_eq!(
            Counts::get(counter),
            0,
            "clients {name}: {}\n{errors}\nhaproxy's log:\n{}",
            counts.summary(),
            haproxy.log_text()
        );
    }
    assert!(Counts::get(&counts.ok) >= 100, "{}", counts.summary());
    assert!(Counts::get(&counts.long_ok) >= 3, "{}", counts.summary());

    // Every backend, old and new, logged clients by their own addresses: each connection that
    // got through HAProxy is in exactly one log, and no log names anyone else (HAProxy's own
    // address, say).
    for backend in &backends {
        backend.process.signal("TERM");
        backend.process.signal("TERM"); // the second ends the drain delay
    }
    for backend in &mut backends {
        assert_eq!(backend.process.wait_exit(), Some(0));
    }
    let clients: HashSet<SocketAddr> = counts.clients.lock().unwrap().iter().copied().collect();
    let all: Vec<&Backend> = retired.iter().map(|(b, _)| b).chain(&backends).collect();
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    // The log threads may still be reading the last lines.
    assert!(eventually(|| {
        seen.clear();
        for backend in &all {
            for client in backend.clients_logged() {
                *seen.entry(client).or_default() += 1;
            }
        }
        seen.len() >= clients.len()
    }));
    for (n, backend) in all.iter().enumerate() {
        let logged = backend.clients_logged();
        assert!(!logged.is_empty(), "backend process {n} logged no client");
        let stranger = logged.iter().find(|c| !clients.contains(c));
        assert!(
            stranger.is_none(),
            "backend process {n} logged {stranger:?}, not a client's address"
        );
    }
    let missing = clients.iter().find(|c| seen.get(c) != Some(&1));
    assert!(
        missing.is_none(),
        "client {missing:?} logged {:?} times",
        missing.map(|c| seen.get(c))
    );
    // The long-lived sessions a stopping backend still served after it stopped accepting, and
    // saw to their end: what its drain was for. How many depends on where round robin sent
    // them, so this is reported, not asserted.
    let sessions = counts.long_sessions.lock().unwrap();
    let drained = retired
        .iter()
        .map(|(backend, stopped)| {
            let served: HashSet<SocketAddr> = backend.clients_logged().into_iter().collect();
            let stopped_accepting = *stopped + Duration::from_secs(DRAIN_DELAY);
            sessions
                .iter()
                .filter(|(me, ended)| served.contains(me) && *ended > stopped_accepting)
                .count()
        })
        .collect::<Vec<_>>();
    eprintln!("long-lived sessions drained after each stop stopped accepting: {drained:?}");
    let sources: HashSet<IpAddr> = clients.iter().map(|c| c.ip()).collect();
    assert_eq!(sources.len(), SHORT_CLIENTS + LONG_CLIENTS);
}
