//! The storm's clients, in child processes of this test binary: each makes its attempts at once
//! when its parent says so, reports what they came to, and holds the served connections until
//! its parent closes its stdin.

use std::io::{self, BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::{Async, Timer};
use socket2::{Domain, Socket, Type};
use taskserve::Server;

use super::*;

/// How one attempt ended.
enum Outcome {
    /// Its message came back: it is served, and holds its connection until dropped.
    Served(Async<TcpStream>),
    /// The server closed it (end of stream or reset) without serving it.
    Closed,
    /// Neither within [`ATTEMPT_LIMIT`], or an error that is no close: what happened.
    Failed(String),
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

/// What one child's attempts came to, once all have ended; or all the children's, added up.
#[derive(Debug, Default)]
pub struct Storm {
    pub served: usize,
    pub closed: usize,
    pub failed: usize,
    /// From the first connect to the last outcome (the longest of the children's).
    pub took: Duration,
    /// The first failures, for the failure message.
    pub failures: Vec<String>,
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
pub struct StormChildren {
    pub children: Vec<(ChildGuard, ChildStdin, Lines)>,
}

impl StormChildren {
    /// One child for each of `server`'s listeners.
    pub fn start(server: &Server) -> StormChildren {
        let exe = std::env::current_exe().expect("the test binary's path");
        let children = server
            .local_addrs()
            .iter()
            .map(|(listener, _)| {
                let mut child = ChildGuard::new(
                    Command::new(&exe)
                        .args(["--exact", "clients::storm_clients_when_run_by_a_storm_test"])
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
    pub fn go(&mut self) {
        for (_, stdin, _) in &mut self.children {
            stdin.write_all(b"go\n").expect("tell a storm child to go");
        }
    }

    /// Waits for every child's report (each attempt ends within [`ATTEMPT_LIMIT`]) and adds
    /// them up.
    pub fn reports(&mut self) -> Storm {
        let mut storm = Storm::default();
        for (_, _, stdout) in &mut self.children {
            let report = stdout.find_within(ATTEMPT_LIMIT + PATIENCE, |line| line.contains(REPORT));
            storm.add_line(&report);
        }
        storm
    }
}
