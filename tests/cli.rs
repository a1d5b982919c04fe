//! The `echo` binary: what it prints, how it fails, its threads, its log and its exit codes.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Command, Stdio};

use common::{
    connect, eventually, exit_within_patience, listening_ports, require_ipv6_loopback, round_trip,
    run_echo, run_to_exit, worker_thread_names, ChildGuard, EchoProcess,
};

/// Asserts that a failure to serve was reported as `echo` should: exit code 1, nothing on
/// stdout, and one line on stderr that starts with `prefix` (no panic, no backtrace); returns
/// that line.
fn assert_one_line_failure(args: &[&str], prefix: &str) -> String {
    let stderr = stderr_of_failing_echo(args, 1);
    assert_eq!(
        stderr.lines().count(),
        1,
        "stderr of echo {args:?}: {stderr}"
    );
    assert!(
        stderr.starts_with(prefix),
        "stderr of echo {args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    stderr
}

/// Runs `echo` with `args`, asserts that it exited with `code` and printed nothing on stdout,
/// and returns its stderr.
fn stderr_of_failing_echo(args: &[&str], code: i32) -> String {
    let (exit, stdout, stderr) = run_echo(args);
    assert_eq!(
        exit,
        Some(code),
        "exit code of echo {args:?}; stderr: {stderr}"
    );
    assert_eq!(stdout, "", "stdout of echo {args:?}");
    stderr
}

/// `echo` with `args` and the default log level, whatever `RUST_LOG` the tests run with.
fn start_echo_with_default_logging(args: &[&str]) -> EchoProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.env_remove("RUST_LOG");
    EchoProcess::start_with(command, args)
}

/// Starts `echo` with `args`, has one client send a message and hang up, stops it with SIGTERM,
/// and returns the client's address and everything `echo` logged.
fn log_of_one_client(args: &[&str]) -> (String, String) {
    log_of_one_client_via(args, |addr| addr)
}

/// As [`log_of_one_client`], with the client connecting to `to(the address echo printed)`.
fn log_of_one_client_via(args: &[&str], to: impl Fn(SocketAddr) -> SocketAddr) -> (String, String) {
    let mut echo = start_echo_with_default_logging(args);
    let mut stderr = echo.stderr();
    let mut client = connect(to(echo.addr));
    let client_addr = client.local_addr().unwrap().to_string();
    round_trip(&mut client, b"Hello\n");
    drop(client);
    // A stop waits for open connections to end, so the client's close is logged before exit.
    echo.signal("TERM");
    assert_eq!(echo.wait_exit(), Some(0), "exit code after SIGTERM");
    let mut log = String::new();
    stderr.read_to_string(&mut log).expect("read echo's stderr");
    (client_addr, log)
}

/// The write end of a pipe whose reader has gone, as in `echo | true` once `true` has exited:
/// every write to it fails with EPIPE.
fn pipe_nobody_reads() -> Stdio {
    let mut reader = Command::new("true")
        .stdin(Stdio::piped())
        .spawn()
        .expect("run true");
    let write_end = reader.stdin.take().expect("true's stdin");
    reader.wait().expect("wait for true");
    Stdio::from(write_end)
}

/// `echo` with `args`, its stdout and stderr pipes nobody reads, logging at debug so that it
/// writes to them as much as it can.
fn spawn_echo_into_closed_pipes(args: &[&str]) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_echo"))
        .args(args)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(pipe_nobody_reads())
        .stderr(pipe_nobody_reads())
        .spawn()
        .expect("start the echo binary");
    ChildGuard::new(child)
}

#[test]
fn echo_keeps_serving_when_its_stdout_and_stderr_are_closed() {
    let mut child = spawn_echo_into_closed_pipes(&["--port", "0", "--threads", "1"]);
    // An echo that dies at its first failed write may still show its port for a moment: then the
    // client below is refused.
    let (mut port, mut exit) = (None, None);
    let settled = eventually(|| {
        exit = child.try_wait().expect("wait for echo").map(|s| s.code());
        port = listening_ports(child.id()).first().copied();
        exit.is_some() || port.is_some()
    });
    assert!(settled, "echo neither listened nor exited in time");
    assert_eq!(
        exit, None,
        "echo exited (with this code) instead of serving"
    );
    let port = port.expect("the port echo listens on");
    let mut echo = EchoProcess {
        child,
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        listening: String::new(),
        stdout: None,
    };
    round_trip(&mut connect(echo.addr), b"Hello into the void\n");
    echo.signal("TERM");
    assert_eq!(echo.wait_exit(), Some(0), "exit code after SIGTERM");
}

#[test]
fn messages_into_a_closed_pipe_keep_their_exit_code() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let port = taken.local_addr().unwrap().port().to_string();
    let cases: [(&[&str], i32); 4] = [
        (&["--help"], 0),
        (&["--version"], 0),
        (&["--no-such-flag"], 2),
        (&["--port", &port], 1),
    ];
    for (args, code) in cases {
        let child = spawn_echo_into_closed_pipes(args);
        let status = exit_within_patience(child, &format!("echo {args:?}")).status;
        // A panic would be 101.
        assert_eq!(status.code(), Some(code), "exit code of echo {args:?}");
    }
}

#[test]
fn echo_prints_its_address_and_thread_count_and_answers_with_got() {
    let echo = EchoProcess::start(&["--threads", "3"]);
    assert_ne!(echo.addr.port(), 0, "the port it picked");
    assert_eq!(
        echo.listening,
        format!("listening on 127.0.0.1:{} (3 threads)", echo.addr.port())
    );
    let mut client = connect(echo.addr);
    round_trip(&mut client, b"Hello\n");
    // A thread names itself once it runs, a moment after the server has spawned it.
    let expected = ["taskserve-w0", "taskserve-w1", "taskserve-w2"];
    assert!(
        eventually(|| worker_thread_names(echo.child.id()) == expected),
        "worker threads: {:?}",
        worker_thread_names(echo.child.id())
    );
}

#[test]
fn echo_serves_over_ipv6_with_host_ipv6_loopback() {
    require_ipv6_loopback();
    // Bare, and in brackets as the listening line prints it.
    for host in ["::1", "[::1]"] {
        let echo = EchoProcess::start(&["--host", host, "--threads", "1"]);
        assert!(echo.addr.is_ipv6(), "{}", echo.listening);
        assert_eq!(
            echo.listening,
            format!("listening on [::1]:{} (1 thread)", echo.addr.port())
        );
        let mut client = connect(echo.addr);
        round_trip(&mut client, b"Hello over IPv6\n");
    }
}

#[test]
fn options_take_their_value_after_an_equals_sign() {
    let echo = EchoProcess::start_as_given(
        Command::new(env!("CARGO_BIN_EXE_echo")),
        &[
            "--port=0",
            "--threads=1",
            "--host=127.0.0.1",
            "--idle-timeout=5",
        ],
    );
    assert_eq!(
        echo.listening,
        format!("listening on 127.0.0.1:{} (1 thread)", echo.addr.port())
    );
    round_trip(&mut connect(echo.addr), b"Hello\n");
}

#[test]
fn bad_flags_exit_2_with_a_usage_message_on_stderr() {
    let cases: [(&[&str], &str); 9] = [
        (&["--port", "65536"], "--port"),
        (&["--port", "abc"], "--port"),
        (&["--port=abc"], "'--port' with value 'abc'"),
        // A switch takes no value, with an equals sign or without.
        (&["--quiet=yes"], "--quiet=yes"),
        (&["--threads", "0"], "--threads"),
        (&["--threads", "1025"], "--threads"),
        // Once, this started some 17,000 threads and aborted (exit 134).
        (&["--threads", "100000"], "--threads"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (args, named) in cases {
        let stderr = stderr_of_failing_echo(args, 2);
        assert!(
            stderr.contains(named),
            "stderr of echo {args:?} does not name {named}: {stderr}"
        );
        assert!(
            stderr.contains("--help"),
            "stderr of echo {args:?} does not point to --help: {stderr}"
        );
    }
}

#[test]
fn threads_takes_up_to_1024_as_help_says() {
    let echo = EchoProcess::start(&["--threads", "1024", "--quiet"]);
    assert_eq!(
        echo.listening,
        format!("listening on 127.0.0.1:{} (1024 threads)", echo.addr.port())
    );
    round_trip(&mut connect(echo.addr), b"Hello\n");
    drop(echo);
    let (code, help, _) = run_echo(&["--help"]);
    assert_eq!(code, Some(0));
    let threads = help
        .lines()
        .find(|l| l.trim_start().starts_with("--threads"));
    assert!(
        threads.is_some_and(|l| l.contains("1 to 1024")),
        "--help: {help}"
    );
}

#[test]
fn taskserve_echo_is_the_same_program_and_speaks_under_its_own_name() {
    let bin = env!("CARGO_BIN_EXE_taskserve-echo");
    let echo = EchoProcess::start_with(Command::new(bin), &["--threads", "1"]);
    assert_eq!(
        echo.listening,
        format!("listening on 127.0.0.1:{} (1 thread)", echo.addr.port())
    );
    round_trip(&mut connect(echo.addr), b"Hello\n");

    let (code, stdout, _) = run_to_exit(Command::new(bin), &["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("taskserve-echo "), "{stdout}");
    let (code, _, stderr) = run_to_exit(Command::new(bin), &["--no-such-flag"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("Run taskserve-echo --help"), "{stderr}");
    let (code, _, stderr) = run_to_exit(
        Command::new(bin),
        &["--port", &echo.addr.port().to_string()],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with("taskserve-echo: failed to bind"),
        "{stderr}"
    );
}

#[test]
fn an_argument_that_is_not_utf8_is_a_usage_error() {
    use std::os::unix::ffi::OsStrExt;

    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.args([
        std::ffi::OsStr::new("--host"),
        std::ffi::OsStr::from_bytes(b"\xff"),
    ]);
    let (code, stdout, stderr) = run_to_exit(command, &[]);
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("UTF-8") && stderr.contains("--help"),
        "{stderr}"
    );
}

#[test]
fn a_port_in_use_is_one_line_on_stderr_and_exit_code_1() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    let port = taken.local_addr().unwrap().port().to_string();
    assert_one_line_failure(
        &["--port", &port],
        &format!("echo: failed to bind 127.0.0.1:{port}: "),
    );
}

#[test]
fn an_address_not_on_this_machine_is_one_line_on_stderr_and_exit_code_1() {
    // 192.0.2.1 is TEST-NET-1 (RFC 5737): reserved for documentation, never a local address.
    // Binding fails at once; nothing is sent.
    assert_one_line_failure(
        &["--host", "192.0.2.1", "--port", "0"],
        "echo: failed to bind 192.0.2.1:0: ",
    );
}

#[test]
fn a_host_that_does_not_resolve_is_one_line_on_stderr_and_exit_code_1() {
    // `.invalid` never resolves (RFC 2606).
    let stderr = assert_one_line_failure(&["--host", "no.such.host.invalid"], "echo: ");
    assert!(stderr.contains("no.such.host.invalid"), "{stderr}");
}

#[test]
fn help_documents_every_flag_and_exits_0() {
    let (code, stdout, stderr) = run_echo(&["--help"]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "");
    assert_eq!(run_echo(&["-h"]), (code, stdout.clone(), stderr), "-h");
    for flag in [
        "--threads",
        "--port",
        "--host",
        "--max-connections",
        "--idle-timeout",
        "--shutdown-timeout",
        "--quiet",
        "--version",
        "--help",
    ] {
        assert!(
            stdout.contains(flag),
            "--help does not mention {flag}:\n{stdout}"
        );
    }
}

#[test]
fn version_prints_the_crate_version_and_exits_0() {
    for flag in ["--version", "-V"] {
        let (code, stdout, stderr) = run_echo(&[flag]);
        assert_eq!(code, Some(0), "exit code of echo {flag}; stderr: {stderr}");
        assert_eq!(stdout.lines().count(), 1, "stdout of echo {flag}: {stdout}");
        assert!(
            stdout
                .split_whitespace()
                .any(|word| word == env!("CARGO_PKG_VERSION")),
            "stdout of echo {flag}: {stdout}"
        );
    }
}

#[test]
fn sigterm_stops_an_idle_server_with_exit_code_0() {
    let mut echo = start_echo_with_default_logging(&["--threads", "1"]);
    let mut stderr = echo.stderr();
    // Right after the listening line, as a script that waits for it would.
    echo.signal("TERM");
    assert_eq!(echo.wait_exit(), Some(0), "exit code after SIGTERM");
    let mut log = String::new();
    stderr.read_to_string(&mut log).expect("read echo's stderr");
    assert!(log.contains("stopping"), "log: {log}");
}

#[test]
fn log_shows_each_client_connecting_and_closing() {
    let (client_addr, log) = log_of_one_client(&["--threads", "1"]);
    let from = log
        .find(&format!("Connection from {client_addr}"))
        .unwrap_or_else(|| panic!("no 'Connection from {client_addr}' in the log: {log}"));
    let closed = log
        .find("Connection closed")
        .unwrap_or_else(|| panic!("no 'Connection closed' in the log: {log}"));
    assert!(from < closed, "closed before it connected: {log}");
}

#[test]
fn the_listening_line_is_said_once_on_stdout_not_again_in_the_log() {
    let mut echo = start_echo_with_default_logging(&["--threads", "1"]);
    assert!(
        echo.listening.starts_with("listening on "),
        "{}",
        echo.listening
    );
    let mut log = echo.stderr_lines();
    round_trip(&mut connect(echo.addr), b"Hello\n");
    echo.signal("TERM");
    assert_eq!(echo.wait_exit(), Some(0), "exit code after SIGTERM");
    // Everything else it printed, up to its exit: no second listening line, on either.
    let stdout = echo.stdout.as_mut().expect("stdout piped").rest();
    assert_eq!(
        stdout,
        Vec::<String>::new(),
        "stdout after the listening line"
    );
    let log = log.rest();
    assert!(
        log.iter().any(|line| line.contains("Connection from")),
        "log: {log:?}"
    );
    assert!(
        !log.iter().any(|line| line.contains("listening on")),
        "log: {log:?}"
    );
}

#[test]
fn ipv4_clients_of_a_dual_stack_server_over_ipv6_are_logged_as_ipv4() {
    require_ipv6_loopback();
    // Over IPv4 to a `::` listener: the kernel hands the server an IPv4-mapped IPv6 address.
    let (client_addr, log) = log_of_one_client_via(&["--threads", "1", "--host", "::"], |addr| {
        SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
    });
    assert!(
        log.contains(&format!("Connection from {client_addr}")),
        "log: {log}"
    );
    assert!(!log.contains("::ffff:"), "log: {log}");
}

#[test]
fn quiet_leaves_connections_out_of_the_log() {
    let (_, log) = log_of_one_client(&["--threads", "1", "--quiet"]);
    assert!(!log.contains("Connection from"), "log: {log}");
    assert!(!log.contains("Connection closed"), "log: {log}");
}

#[test]
fn echo_raises_its_open_file_limit_to_the_hard_limit_and_warns_below_max_connections() {
    // Each client is a descriptor: a soft limit of 256 would stop the server at ~250 clients.
    let mut prlimit = Command::new("prlimit");
    prlimit.args(["--nofile=256:2048", "--", env!("CARGO_BIN_EXE_echo")]);
    let mut echo = EchoProcess::start_with(prlimit, &["--quiet"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", echo.child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    let values: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(values, ["2048", "2048"], "{open_files}");

    // 2048 is below the default --max-connections of 10000: the operator is told, once.
    round_trip(&mut connect(echo.addr), b"still served");
    echo.signal("TERM");
    assert_eq!(echo.wait_exit(), Some(0));
    let mut stderr = String::new();
    echo.stderr().read_to_string(&mut stderr).unwrap();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("open-file limit"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("2048") && warnings[0].contains("10000"),
        "{stderr}"
    );
}
