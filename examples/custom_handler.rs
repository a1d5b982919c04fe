//! Your own protocol in one call: `taskserve::serve` with a handler that answers each line a
//! client sends with the same line in upper case.
//!
//! ```text
//! cargo run --example custom_handler                  # listens on 127.0.0.1:25001
//! cargo run --example custom_handler -- [ADDR]
//! nc localhost 25001                                  # in another terminal: type lines
//! ```
//!
//! The library logs each connection (`RUST_LOG=debug` shows more). Ctrl-C stops the server,
//! giving open connections up to 10 seconds to end.
//!
//! Copied into a crate of your own, it needs this beside `taskserve`:
//!
//! ```toml
//! [dependencies]
//! env_logger = { version = "0.11", default-features = false }  # the log on stderr
//! ```

use std::process::ExitCode;

use taskserve::io::{self, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use taskserve::Connection;

/// The most bytes read as one line; a longer line is answered in pieces.
const MAX_LINE: u64 = 64 * 1024;

/// Answers each line from the client with that line upper-cased, until the client hangs up.
/// (`pub` for tests/examples.rs, which serves it in-process.)
pub async fn shout(conn: Connection) -> io::Result<()> {
    let (mut reader, mut line) = (BufReader::new(conn), Vec::new());
    loop {
        // Bounded, so that a client cannot make the server buffer an endless line. `line` may
        // still hold the start of a character that the last piece cut off.
        let read = (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 && line.is_empty() {
            return Ok(()); // the client closed its side
        }
        let whole = if read == 0 || line.ends_with(b"\n") {
            line.len()
        } else {
            up_to_last_whole_char(&line)
        };
        // Clients send any bytes they like: invalid UTF-8 becomes U+FFFD rather than an error.
        let reply = String::from_utf8_lossy(&line[..whole]).to_uppercase();
        // The buffer is on the read side only, so writing to the stream under it is fine.
        reader.get_mut().write_all(reply.as_bytes()).await?;
        line.drain(..whole);
    }
}

/// How many bytes of `bytes` end with a whole character: all of them, unless they end with the
/// first bytes of a UTF-8 character that the line limit cut off (kept for the next piece, so
/// that it is not answered as two U+FFFD).
fn up_to_last_whole_char(bytes: &[u8]) -> usize {
    let last_three = bytes.len().saturating_sub(3)..bytes.len();
    // The last byte that starts a character (is not a continuation byte, 0b10xx_xxxx).
    let Some(start) = last_three.rev().find(|&i| bytes[i] & 0xC0 != 0x80) else {
        return bytes.len();
    };
    let needed = match bytes[start] {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    };
    if bytes.len() - start < needed {
        start
    } else {
        bytes.len()
    }
}

fn main() -> ExitCode {
    // Shows the library's log lines (listening, each connection, stopping).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let addr = std::env::args().nth(1);
    // Binds (a busy port fails here), then serves until Ctrl-C or SIGTERM.
    if let Err(e) = taskserve::serve(addr.as_deref().unwrap_or("127.0.0.1:25001"), shout) {
        eprintln!("custom_handler: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
