//! `echo`: the seed's `GOT:` echo server on the command line.
//!
//! Parses flags (`args.rs`), builds the server they ask for (`setup.rs`), prints the addresses
//! it listens on, and serves until SIGINT or SIGTERM; everything else is the library's.
//!
//! The same program is also built as `taskserve-echo` (`src/bin/taskserve-echo.rs` calls this
//! file's `main`), the name to install: an `echo` first on `PATH` would shadow the shell's.

mod args;
mod setup;

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use args::Args;
pub fn main() -> ExitCode {
    // `args_os`: `std::env::args` panics on an argument that is not UTF-8.
    let strings: Vec<OsString> = std::env::args_os().collect();
    let name = program_name(strings.first());
    let args = match parse_args(name, strings.get(1..).unwrap_or(&[])) {
        Ok(args) => args,
        Err(code) => return code,
    };
    if args.version {
        let version = format!("{name} (taskserve) {}", env!("CARGO_PKG_VERSION"));
        // As ripgrep does on a broken pipe: the reader has what it wanted, or did not want it.
        let _ = print_line(io::stdout(), version);
        return ExitCode::SUCCESS;
    }
    let default_level = if args.quiet { "warn" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Nowhere left to report a failure to report the failure: the exit code still says it.
            let _ = print_line(io::stderr(), format_args!("{name}: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes `line` and a newline to `stream`, flushed. `println!` and `eprintln!` would panic (exit
/// code 101) when the stream is a pipe whose reader has gone: `echo | true`, or a script that
/// stops reading once it has seen the listening line.
fn print_line(mut stream: impl Write, line: impl Display) -> io::Result<()> {
    writeln!(stream, "{line}")?;
    stream.flush()
}

/// The name the program was run as, which its messages use: `echo` under `cargo run --bin echo`,
/// `taskserve-echo` once installed.
fn program_name(argv0: Option<&OsString>) -> &str {
    argv0
        .and_then(|path| Path::new(path).file_name()?.to_str())
        .unwrap_or(env!("CARGO_BIN_NAME"))
}

/// argh's own `from_env` exits with 1 on bad flags; a usage error gets 2 here, as is the custom,
/// so that it differs from a failure to serve.
fn parse_args(command: &str, args: &[OsString]) -> Result<Args, ExitCode> {
    args::parse(command, args).map_err(|stop| match stop {
        args::Stop::Help(text) => {
            let _ = print_line(io::stdout(), text);
            ExitCode::SUCCESS
        }
        args::Stop::Usage(message) => {
            let help = format!("Run {command} --help for more information.");
            let _ = print_line(io::stderr(), format_args!("{message}\n{help}"));
            ExitCode::from(2)
        }
    })
}

fn run(args: &Args) -> io::Result<()> {
    setup::raise_open_file_limit(args.max_connections);
    let activated = setup::socket_activated();
    let server = setup::builder(args)?.start(taskserve::echo)?;
    setup::warn_of_inherited_sockets_on_all_interfaces(args, activated, &server);
    for line in setup::listening_lines(&server, args) {
        // A closed stdout does not stop the server. ripgrep exits quietly on a broken pipe
        // because its output is its whole job and nobody wants it any more; a server's job is
        // the network, and stdout only announces the address to whoever started it, who may
        // stop reading once they have it (`grep -m1`), or never read. So the line is dropped,
        // the failure logged (the logger drops its own lines just as quietly when stderr is
        // closed), and serving goes on.
        if let Err(e) = print_line(io::stdout(), &line) {
            log::warn!("cannot print '{line}' on stdout: {e}; serving anyway");
        }
    }
    server.wait();
    Ok(())
}
