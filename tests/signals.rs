//! The `echo` binary and the signals an operator (or a stray script) sends it: the ones with a
//! meaning, and the ones whose default action would kill it silently.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{ChildStderr, Command};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Instant;

use common::tls::{start_tls_echo, tls_connect, tls_round_trip, TlsFiles};
use common::*;
use taskserve::Server;

/// The log lines of a running `echo`, read by a thread of their own so that a test can wait
/// for one with a deadline.
struct Log(mpsc::Receiver<String>);

impl Log {
    fn of(stderr: ChildStderr) -> Log {
        let (lines, log) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Log(log)
    }

    /// The next line that contains `text`, waiting up to [`PATIENCE`]; `None` if none came.
    fn find(&self, text: &str) -> Option<String> {
        let deadline = Instant::now() + PATIENCE;
        // At most 10,000 lines: a server that keeps logging other things is not saying it.
        for _ in 0..10_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(text) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

#[test]
fn sigusr1_sigusr2_and_sigalrm_are_logged_and_ignored_and_the_socket_file_goes_at_exit() {
    let dir = TempDir::new();
    let socket = dir.join("echo.sock");
    let mut echo = EchoProcess::start(&["--threads", "1", "--unix", socket.to_str().unwrap()]);
    let log = Log::of(echo.stderr());
    let mut client = connect(echo.addr);
    round_trip(&mut client, b"before");
    for signal in ["USR1", "USR2", "ALRM"] {
        echo.signal(signal);
        let line = log
            .find(&format!("SIG{signal}"))
            .unwrap_or_else(|| panic!("no log line for SIG{signal}"));
        assert!(line.contains("WARN") && line.contains("ignored"), "{line}");
        round_trip(&mut client, b"still served");
    }
    assert!(socket.exists(), "the socket file is there while serving");
    echo.signal("TERM");
    drop(client);
    assert_eq!(echo.wait_exit(), Some(0));
    assert!(!socket.exists(), "the socket file is left after exit");
}

/// Replaces the file at `path` by a FIFO: opening it for reading waits for a writer, which
/// never comes.
fn replace_by_fifo(path: &Path) {
    std::fs::remove_file(path).unwrap();
    let made = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
}

#[test]
fn sighup_with_the_key_replaced_by_a_fifo_is_refused_and_the_server_serves_and_stops() {
    let files = TlsFiles::new();
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    // One worker: a reload that blocked it would stop everything.
    let mut echo = EchoProcess::start(&["--threads", "1", "--tls-cert", cert, "--tls-key", key]);
    let log = Log::of(echo.stderr());
    replace_by_fifo(&files.key);
    echo.signal("HUP");
    let line = log.find("SIGHUP").expect("the reload logged");
    assert!(
        line.contains("ERROR") && line.contains(key) && line.contains("not a regular file"),
        "{line}"
    );
    let mut client = tls_connect(echo.addr, &files.client(), "localhost").unwrap();
    tls_round_trip(&mut client, b"still served with the old pair").unwrap();
    echo.signal("TERM");
    drop(client);
    assert_eq!(echo.wait_exit(), Some(0));
}

/// `Server::reload_tls` on another thread: its result, or `None` if it has not returned within
/// [`PATIENCE`].
fn reload_in_time(server: &Arc<Server>) -> Option<std::io::Result<()>> {
    let (done, result) = mpsc::channel();
    let server = Arc::clone(server);
    // Left behind if it hangs: the test fails, and the process ends with it.
    thread::spawn(move || done.send(server.reload_tls()));
    result.recv_timeout(PATIENCE).ok()
}

#[test]
fn reload_tls_refuses_a_fifo_and_a_file_over_1_mib_naming_them() {
    let files = TlsFiles::new();
    let server = Arc::new(start_tls_echo(Server::builder(), files.config()));
    let key = files.key.display().to_string();

    replace_by_fifo(&files.key);
    let e = reload_in_time(&server)
        .expect("reload_tls returns")
        .expect_err("a FIFO is refused");
    let message = e.to_string();
    assert!(
        message.contains(&key) && message.contains("not a regular file"),
        "{message}"
    );

    std::fs::remove_file(&files.key).unwrap();
    let mut huge = files.server.key_pem.clone().into_bytes();
    huge.resize(2 * 1024 * 1024, b'\n');
    std::fs::write(&files.key, huge).unwrap();
    let e = reload_in_time(&server)
        .expect("reload_tls returns")
        .expect_err("a file over 1 MiB is refused");
    let message = e.to_string();
    assert!(
        message.contains(&key) && message.contains("1 MiB"),
        "{message}"
    );

    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").unwrap();
    tls_round_trip(&mut client, b"the old pair still serves").unwrap();
}
