//! What `echo` tells a user who slipped: its help, and the one line it prints for a flag it
//! cannot use, each saying what it wanted and what to type instead.

mod common;

use common::run_echo;

/// Runs `echo` with `args`, asserts that it failed to start (exit code 1, nothing on stdout) with
/// one line on stderr, and returns that line.
fn one_line_failure(args: &[&str]) -> String {
    let (code, stdout, stderr) = run_echo(args);
    assert_eq!(code, Some(1), "echo {args:?}: {stderr}");
    assert_eq!(stdout, "", "echo {args:?}");
    assert_eq!(stderr.lines().count(), 1, "echo {args:?}: {stderr}");
    stderr
}

#[test]
fn metrics_given_a_bare_port_asks_for_host_and_port_and_suggests_loopback() {
    let stderr = one_line_failure(&["--port", "0", "--metrics", "25090"]);
    assert!(
        stderr.starts_with("echo: --metrics wants host:port"),
        "{stderr}"
    );
    assert!(stderr.contains("--metrics 127.0.0.1:25090"), "{stderr}");
    assert!(!stderr.contains("invalid socket address"), "{stderr}");
}

#[test]
fn help_lists_h_beside_help() {
    let (code, stdout, _) = run_echo(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("-h, --help"), "{stdout}");
}
