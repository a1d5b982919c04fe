//! Outside programs the tests run to the end (redis-cli, nft, tc...), with their output.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{exit_within, ChildGuard};

/// Runs `program` with `args` and `input` on its stdin, and waits up to `limit` for it to
/// exit; returns what it wrote. Panics if it cannot start (saying `needs`: how to get it),
/// fails, or still runs after `limit`.
pub fn run_to_success(
    program: &str,
    args: &[&str],
    input: &[u8],
    limit: Duration,
    needs: &str,
) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e} ({needs})"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // From a thread: the program's output fills its pipes while it reads.
    let feeding = std::thread::spawn(move || stdin.write_all(&input));
    let output = exit_within(ChildGuard::new(child), program, limit);
    // A program that exits without reading all of its input is no failure of ours.
    let _ = feeding.join().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
