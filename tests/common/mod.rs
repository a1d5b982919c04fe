//! What every integration test needs: a server on an ephemeral port (in-process or the `echo`
//! binary), clients with time limits, and a reader that checks `GOT:` replies byte for byte.
#![allow(dead_code)] // each test file uses its own part of this module

use std::future::Future;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use taskserve::{Builder, Connection, ConnectionInfo, Server};

pub mod programs;
#[cfg(feature = "tls")]
pub mod tls;

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How long a write must make no progress for a test to conclude that the peer stopped reading:
/// every buffer on the way is full. Long enough that a server merely slowed by a busy machine
/// is not taken for one that stopped.
pub const STALLED: Duration = Duration::from_secs(2);

/// Starts an echo server with two threads on `127.0.0.1:0`.
pub fn start_echo() -> Server {
    start_echo_with(Server::builder().threads(2))
}

/// Starts an echo server built by `builder` on `127.0.0.1:0`.
pub fn start_echo_with(builder: Builder) -> Server {
    builder
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .expect("server starts on an ephemeral port")
}

/// What [`reporting_echo`]'s handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A handler that sends each connection's [`ConnectionInfo`] to `report`, then runs
/// [`taskserve::echo`]: one handler for every listener, which tells the test what it saw.
pub fn reporting_echo(
    report: mpsc::Sender<ConnectionInfo>,
) -> impl Fn(Connection) -> HandlerFuture + Send + Sync + 'static {
    let report = Mutex::new(report);
    move |conn: Connection| {
        // The test may have stopped listening: that is its business.
        let _ = report.lock().unwrap().send(conn.info().clone());
        Box::pin(taskserve::echo(conn))
    }
}

/// Connects to `addr` with read and write timeouts of [`PATIENCE`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the server");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// `len` random bytes without `G`, so that in a reply every `G` starts a `GOT:` prefix.
pub fn payload(len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::new();
    (0..len)
        .map(|_| loop {
            let b = rng.u8(..);
            if b != b'G' {
                break b;
            }
        })
        .collect()
}

/// Strips `GOT:` prefixes from a stream of replies to payloads made by [`payload`], as bytes
/// arrive. Panics on a byte where a prefix must be and is not.
#[derive(Debug, Default)]
pub struct Unprefixer {
    /// Bytes of `GOT:` seen at the current position; 4 (or none yet) means inside a chunk.
    in_prefix: Option<usize>,
}

impl Unprefixer {
    /// Appends the payload bytes of `reply` to `out`.
    pub fn feed(&mut self, reply: &[u8], out: &mut Vec<u8>) {
        for &b in reply {
            match self.in_prefix {
                Some(n) if n < 4 => {
                    assert_eq!(b, b"GOT:"[n], "malformed prefix in reply");
                    self.in_prefix = Some(n + 1);
                }
                _ if b == b'G' => self.in_prefix = Some(1),
                None => panic!("reply does not start with GOT:"),
                _ => out.push(b),
            }
        }
    }
}

/// `stream.read(buf)`, read again when a signal interrupted it: the kernel never restarts a read
/// on a socket with a timeout, and a stop and continue of the process (a debugger, a busy
/// machine's scheduler of containers) interrupts it even with no signal handler.
pub fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            outcome => return outcome,
        }
    }
}

/// Reads replies from `stream` until `len` payload bytes have come back; returns them.
pub fn read_payload(stream: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut unprefixer = Unprefixer::default();
    let mut out = Vec::with_capacity(len);
    let mut buf = vec![0; 64 * 1024];
    while out.len() < len {
        let n = read_some(stream, &mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        unprefixer.feed(&buf[..n], &mut out);
    }
    Ok(out)
}

/// Sends `message` (made by [`payload`], or free of `G`) and checks that exactly it comes back.
pub fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).expect("send");
    let echoed = read_payload(stream, message.len()).expect("read the reply");
    assert!(echoed == message, "the reply differs from what was sent");
}

/// Sends `message` and reads exactly as many bytes as `reply` has; checks they are `reply`. For
/// replies known byte for byte, such as `GOT:` and a line.
pub fn exchange(client: &mut TcpStream, message: &[u8], reply: &[u8]) {
    client.write_all(message).expect("send");
    let mut got = vec![0; reply.len()];
    client.read_exact(&mut got).expect("read the reply");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(reply),
        "reply to {:?}",
        String::from_utf8_lossy(message)
    );
}

/// Whether `reply` is `expected` cut into chunks, each behind `GOT:`: for any bytes, even ones
/// that contain `GOT:` themselves (it tries every place a prefix could start).
pub fn is_prefixed_echo(reply: &[u8], expected: &[u8]) -> bool {
    let Some(rest) = reply.strip_prefix(b"GOT:") else {
        return false;
    };
    let common = rest
        .iter()
        .zip(expected)
        .take_while(|(a, b)| a == b)
        .count();
    (1..=common).rev().any(|k| {
        let (reply_left, expected_left) = (&rest[k..], &expected[k..]);
        if reply_left.is_empty() {
            expected_left.is_empty()
        } else {
            is_prefixed_echo(reply_left, expected_left)
        }
    })
}

/// Retries `check` until it returns true or [`PATIENCE`] runs out; false in that case. For
/// waiting on an event that has no notification, such as the server noticing a close.
pub fn eventually(check: impl FnMut() -> bool) -> bool {
    eventually_within(PATIENCE, check)
}

/// As [`eventually`], for a wait whose bound the test sets: `limit` instead of [`PATIENCE`].
pub fn eventually_within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Reads from `stream`, discarding what comes (a TLS alert, say), until the server closes it:
/// end of file or a reset. Returns how long that took, or an error if it did not happen
/// within `limit` (the stream's read timeout is set to it).
pub fn wait_for_close(stream: &mut TcpStream, limit: Duration) -> io::Result<Duration> {
    let start = Instant::now();
    let mut buf = [0; 4096];
    // At most 1,000 reads: a server that keeps talking is not closing.
    for _ in 0..1000 {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(start.elapsed()),
            Err(e) if timed_out(&e) => break,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("still open after {:?}", start.elapsed()),
    ))
}

/// Waits up to `limit` for the server to close `stream` without a word: end of file, or a reset
/// (when it closed with bytes of the client's unread). Returns how long that took; an error if
/// a byte comes instead (the server served the client), or nothing within `limit`.
pub fn wait_for_silent_close(stream: &mut TcpStream, limit: Duration) -> io::Result<Duration> {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit))?;
    let mut buf = [0; 1024];
    match read_some(stream, &mut buf) {
        Ok(0) => Ok(start.elapsed()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(start.elapsed()),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{n} bytes came instead of a close: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        )),
        Err(e) if timed_out(&e) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("still open after {:?}", start.elapsed()),
        )),
        Err(e) => Err(e),
    }
}

/// Reads `stream` (TCP, TLS...) until the server closes it; returns what came, and how the
/// reading ended: `Ok` with the number of bytes, or the error the client saw at the close
/// (rustls reports a close without close_notify as `UnexpectedEof`).
pub fn read_to_close(stream: &mut impl Read) -> (Vec<u8>, io::Result<usize>) {
    let mut received = Vec::new();
    let outcome = stream.read_to_end(&mut received);
    (received, outcome)
}

/// A port on 127.0.0.1 that was free a moment ago. Another process could take it in between:
/// see [`spawn_on_a_free_port`].
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// The TCP ports process `pid` listens on, from the kernel's socket tables: for a program that
/// does not say which.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let sockets: Vec<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        // Columns: sl, local_address (hex IP:port), rem_address, st (0A is LISTEN), ..., inode.
        ports.extend(table.lines().skip(1).filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let inode = columns.get(9)?;
            if columns.get(3) != Some(&"0A") || !sockets.iter().any(|s| s == inode) {
                return None;
            }
            u16::from_str_radix(columns.get(1)?.rsplit(':').next()?, 16).ok()
        }));
    }
    ports
}

/// Spawns the command `command(port)` makes, for a program that must be told a port number on
/// 127.0.0.1 (HAProxy's configuration, `systemd-socket-activate -l`) and cannot pick one with
/// 0: a port that was free a moment ago, then another if some process took it in between and
/// the program exits saying "Address already in use". Returns the program, listening on the
/// port, the port, and its stderr (piped: the command must not set it).
pub fn spawn_on_a_free_port(
    what: &str,
    mut command: impl FnMut(u16) -> Command,
) -> (ChildGuard, u16, Lines) {
    let mut failures = Vec::new();
    // Bounded: ten ports taken in the instant each was free is no race but a broken machine.
    for _ in 0..10 {
        let port = free_port();
        let mut child = ChildGuard::new(
            command(port)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("start {what}: {e}")),
        );
        let mut stderr = Lines::read(child.stderr.take().unwrap(), &format!("{what}'s stderr"));
        let mut exited = false;
        let settled = eventually(|| {
            exited = child.try_wait().expect("wait for the child").is_some();
            exited || listening_ports(child.id()).contains(&port)
        });
        assert!(settled, "{what} neither listened on {port} nor exited");
        if !exited {
            return (child, port, stderr);
        }
        let said = stderr.rest().join("\n");
        assert!(said.contains("in use"), "{what} exited: {said}");
        failures.push(said);
    }
    panic!("{what} found no free port: {failures:?}");
}

/// Whether a read or write on a socket with a timeout gave up waiting (`WouldBlock` on Unix,
/// `TimedOut` on Windows).
pub fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A directory of its own under the system's temporary directory, removed with what is in it
/// when dropped: for socket paths and certificate files.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // Short, as a Unix socket's path must be (about 100 bytes).
        let path = std::env::temp_dir().join(format!(
            "taskserve-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Left over from an earlier run with the same process id.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process, killed and reaped when dropped: a test puts each child it spawns under one
/// right away, so that an assertion failing before the end leaves nothing running.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard(child)
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lines a child writes to a pipe (its stdout or stderr), read by a thread as they come: a
/// test waits for a line for [`PATIENCE`] at most, never for ever, and the child never blocks
/// on a full pipe.
pub struct Lines {
    /// In a mutex only so that a process holding its `Lines` can be shared between threads.
    lines: Mutex<mpsc::Receiver<String>>,
    /// What the pipe is, for failure messages: `"echo's stdout"`.
    what: String,
    /// The lines taken so far, for failure messages.
    taken: Vec<String>,
}

impl Lines {
    pub fn read(pipe: impl Read + Send + 'static, what: &str) -> Lines {
        let (sender, lines) = mpsc::channel();
        // Ends at end of file, when the child exits (or is killed by its guard). Reads on once
        // nobody takes the lines, so that the child never writes into a full or closed pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Lines {
            lines: Mutex::new(lines),
            what: what.to_string(),
            taken: Vec::new(),
        }
    }

    /// The next line, without its newline; panics if none comes within [`PATIENCE`] or the pipe
    /// closes first.
    pub fn next_line(&mut self) -> String {
        match self.lines.get_mut().unwrap().recv_timeout(PATIENCE) {
            Ok(line) => {
                self.taken.push(line.clone());
                line
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "no line on {} in {PATIENCE:?}; before: {:?}",
                self.what, self.taken
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{} closed; its lines: {:?}", self.what, self.taken)
            }
        }
    }

    /// The first line from here on for which `wanted` is true; panics if none comes within
    /// [`PATIENCE`] or the pipe closes first.
    pub fn find(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.get_mut().unwrap().recv_timeout(left) {
                Ok(line) => {
                    self.taken.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no such line on {} ({e:?} after {PATIENCE:?}); its lines: {:?}",
                    self.what, self.taken
                ),
            }
        }
    }

    /// Every line left until the pipe closes (the child has exited); panics if it is still open
    /// after [`PATIENCE`].
    pub fn rest(&mut self) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.get_mut().unwrap().recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return rest,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{} still open after {PATIENCE:?}; its last lines: {rest:?}",
                    self.what
                ),
            }
        }
    }
}

/// The `echo` binary, running: killed when dropped.
pub struct EchoProcess {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    /// The line it printed, `listening on ADDR (N threads)`.
    pub listening: String,
    /// The rest of its stdout: the other listeners' lines (`None` if not piped).
    pub stdout: Option<Lines>,
}

impl EchoProcess {
    /// Starts `echo --port 0` with `args` and waits for its listening line.
    pub fn start(args: &[&str]) -> EchoProcess {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_echo")), args)
    }

    /// As [`EchoProcess::start`], from a prepared command (say, under `prlimit`, or with
    /// `RUST_LOG` set). The command's stderr is piped: a test that makes many connections must
    /// read it ([`EchoProcess::stderr`]) or pass `--quiet`, or the server blocks in its logger
    /// once the pipe's 64 KiB are full.
    pub fn start_with(mut command: Command, args: &[&str]) -> EchoProcess {
        command.args(["--port", "0"]);
        Self::start_as_given(command, args)
    }

    /// As [`EchoProcess::start_with`], without adding `--port 0`: `args` must choose port 0
    /// themselves, however they spell it.
    pub fn start_as_given(command: Command, args: &[&str]) -> EchoProcess {
        let mut child = ChildGuard::new(spawn(command, args));
        let mut stdout = Lines::read(child.stdout.take().unwrap(), "echo's stdout");
        let listening = stdout.next_line();
        let addr = listening
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {listening:?}"));
        EchoProcess {
            child,
            addr,
            listening,
            stdout: Some(stdout),
        }
    }

    /// The next line it printed on stdout, without its newline, waited for up to [`PATIENCE`].
    pub fn next_line(&mut self) -> String {
        self.stdout.as_mut().expect("stdout piped").next_line()
    }

    /// Its stderr, where the log goes.
    pub fn stderr(&mut self) -> ChildStderr {
        self.child.stderr.take().expect("stderr taken once")
    }

    /// Its stderr, read line by line as it comes: for a test that waits for a log line.
    pub fn stderr_lines(&mut self) -> Lines {
        Lines::read(self.stderr(), "echo's stderr")
    }

    /// Its resident memory in KiB, from `/proc`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends `signal` (`"TERM"`, `"INT"`...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to [`PATIENCE`] for it to exit; returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for echo") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "echo did not exit in {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The `echo` binary's stderr, read line by line by a thread as it comes, so that the binary
/// never blocks on a full pipe and a test can look for log lines.
pub struct StderrLog(Arc<Mutex<Vec<String>>>);

impl StderrLog {
    pub fn collect(process: &mut EchoProcess) -> StderrLog {
        let log = StderrLog(Arc::default());
        let lines = Arc::clone(&log.0);
        let stderr = BufReader::new(process.stderr());
        // Ends at end of file, when the process exits (or is killed by its drop).
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        log
    }

    /// How many lines so far contain every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .count()
    }

    /// Every line so far, for a failure message.
    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// Spawns `command` (the echo binary, or a wrapper such as `prlimit` around it) with `args`
/// added, no stdin, and stdout and stderr piped.
fn spawn(mut command: Command, args: &[&str]) -> Child {
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the echo binary")
}

/// Runs `echo` with `args`, which must make it exit by itself; returns its exit code, stdout
/// and stderr. A bug that leaves it serving (a bind that should fail and does not) fails the
/// test after [`PATIENCE`] instead of hanging it.
pub fn run_echo(args: &[&str]) -> (Option<i32>, String, String) {
    run_to_exit(Command::new(env!("CARGO_BIN_EXE_echo")), args)
}

/// As [`run_echo`], for a prepared command (another binary, or a wrapper around one).
pub fn run_to_exit(command: Command, args: &[&str]) -> (Option<i32>, String, String) {
    let output = exit_within_patience(ChildGuard::new(spawn(command, args)), &format!("{args:?}"));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits for `child` to exit by itself, reading its stdout and stderr if they are piped (so
/// that it never blocks on a full pipe); returns how it exited and what it wrote. Fails the
/// test (and kills it) if it still runs after [`PATIENCE`]; `what` names it then.
pub fn exit_within_patience(child: ChildGuard, what: &str) -> std::process::Output {
    exit_within(child, what, PATIENCE)
}

/// As [`exit_within_patience`], for a child that may take up to `limit`: a whole scenario run
/// by a test binary re-executed in a network namespace, say.
pub fn exit_within(mut child: ChildGuard, what: &str, limit: Duration) -> std::process::Output {
    fn read_all(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    }
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let mut status = None;
    let exited = eventually_within(limit, || {
        status = child.try_wait().expect("wait for the child");
        status.is_some()
    });
    assert!(exited, "{what} still ran after {limit:?}");
    std::process::Output {
        status: status.unwrap(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The sorted names of the worker threads (`taskserve-w*`) of process `pid` (a number, or
/// `"self"` for the test itself), from `/proc/PID/task/*/comm`.
pub fn worker_thread_names(pid: impl std::fmt::Display) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list /proc/PID/task");
    let mut names: Vec<String> = tasks
        // A thread may end between the listing and the read: skip it.
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_string())
        .filter(|name| name.starts_with("taskserve-w"))
        .collect();
    names.sort();
    names
}

/// `s` as an IP address: `ip("127.0.0.2")`.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `s` as a socket address: `addr("192.0.2.1:1000")`.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Fails the test, saying why, unless this machine has an IPv6 loopback. The tests that need
/// it have `over_ipv6` in their names: on a machine without IPv6, `cargo test -- --skip
/// over_ipv6` leaves them out, and cargo's summary shows them filtered out. A test that
/// returned early instead would pass on any start-up error, a regression included.
pub fn require_ipv6_loopback() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        panic!("IPv6 loopback is missing on this machine ({e}): run with --skip over_ipv6");
    }
}

/// Connects to `addr` from the local address `from` (`127.0.0.2`, `::1`...: any loopback
/// address is this machine's), with the timeouts of [`connect`]: a client with an address of
/// its own, for per-client limits and PROXY sources.
pub fn connect_from(from: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&addr.into(), PATIENCE)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    Ok(stream)
}

/// A PROXY protocol v1 header, built by hand as the spec (HAProxy's proxy-protocol.txt, 2.1)
/// writes it: `PROXY TCP4 SRC DST SPORT DPORT\r\n`.
pub fn proxy_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A PROXY protocol v2 header, built by hand as the spec (2.2) lays it out: the 12-byte
/// signature, version 2 and the command (`PROXY`, or `LOCAL` when `addresses` is `None`), the
/// family and transport, the length, the addresses, then each TLV (type, 2-byte length, value).
pub fn proxy_v2(addresses: Option<(SocketAddr, SocketAddr)>, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    let (command, family) = match addresses {
        None => (0x20, 0x00),
        Some((SocketAddr::V4(src), SocketAddr::V4(dst))) => {
            body.extend(src.ip().octets());
            body.extend(dst.ip().octets());
            body.extend(src.port().to_be_bytes());
            body.extend(dst.port().to_be_bytes());
            (0x21, 0x11)
        }
        Some((SocketAddr::V6(src), SocketAddr::V6(dst))) => {
            body.extend(src.ip().octets());
            body.extend(dst.ip().octets());
            body.extend(src.port().to_be_bytes());
            body.extend(dst.port().to_be_bytes());
            (0x21, 0x21)
        }
        Some(_) => panic!("source and destination of one family"),
    };
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend((value.len() as u16).to_be_bytes());
        body.extend(*value);
    }
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([command, family]);
    header.extend((body.len() as u16).to_be_bytes());
    header.extend(body);
    header
}

/// The target directory of the crates that tests build apart from this one, as a user's crate
/// that depends on taskserve (the README's examples, each example alone): one for all, so that
/// taskserve and its dependencies build once.
pub fn standalone_target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("standalone-crates")
}
