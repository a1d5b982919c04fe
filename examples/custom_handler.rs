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

use std::net::SocketAddr;
use std::process::ExitCode;

use async_net::TcpStream;
use smol::io::{self, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The most bytes read as one line; a longer line is answered in pieces.
const MAX_LINE: u64 = 64 * 1024;

/// Answers each line from the client with that line upper-cased, until the client hangs up.
async fn shout(stream: TcpStream, _peer: SocketAddr) -> io::Result<()> {
    let (mut reader, mut line) = (BufReader::new(stream), Vec::new());
    while read_line(&mut reader, &mut line).await? > 0 {
        // Clients send any bytes they like: invalid UTF-8 becomes U+FFFD rather than an error.
        let reply = String::from_utf8_lossy(&line).to_uppercase();
        // The buffer is on the read side only, so writing to the stream under it is fine.
        reader.get_mut().write_all(reply.as_bytes()).await?;
    }
    Ok(()) // the client closed its side
}

/// Reads the next line into `line`, or its first `MAX_LINE` bytes, so that a client cannot make
/// the server buffer an endless line. Returns 0 at the end of the stream.
async fn read_line(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> io::Result<usize> {
    line.clear();
    reader.take(MAX_LINE).read_until(b'\n', line).await
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
