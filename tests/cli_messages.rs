//! What `echo` tells a user who slipped: its help, and the one line it prints for a flag it
//! cannot use, each saying what it wanted and what to type instead.

mod common;

use common::run_echo;

#[test]
fn help_lists_h_beside_help() {
    let (code, stdout, _) = run_echo(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("-h, --help"), "{stdout}");
}
