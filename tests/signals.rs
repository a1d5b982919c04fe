//! The `echo` binary and the signals an operator (or a stray script) sends it: the ones with a
//! meaning, and the ones whose default action would kill it silently.

mod common;

use std::io::{BufRead, BufReader};
use std::process::ChildStderr;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use common::*;

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
