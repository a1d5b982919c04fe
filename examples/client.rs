//! A scripted client for the `GOT:` echo server: sends each line of stdin, one at a time, and
//! prints the server's reply as it comes, `GOT:` and all (`hello` comes back as `GOT:hello`; a
//! long line may come back in several chunks, each behind its own `GOT:`), before the next line.
//!
//! Start the server with `cargo run --bin echo`, then, in another terminal:
//!
//! ```text
//! printf 'hello\nworld\n' | cargo run --example client               # 127.0.0.1:25000
//! printf 'hello\nworld\n' | cargo run --example client -- [ADDR]
//! ```
//!
//! Without a pipe, type lines and end with Ctrl-D. Each line is sent whole before its reply is
//! read, so a line must fit in the socket buffers (a few MiB on loopback) or both sides wait.
//!
//! It needs only the standard library.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let addr = std::env::args().nth(1);
    if let Err(e) = run(addr.as_deref().unwrap_or("127.0.0.1:25000")) {
        eprintln!("client: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run(addr: &str) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}")))?;
    let mut replies = BufReader::new(stream.try_clone()?);
    let (mut stdin, mut stdout) = (io::stdin().lock(), io::stdout().lock());
    let mut line = Vec::new();
    while stdin.read_until(b'\n', &mut line)? > 0 {
        stream.write_all(&line)?;
        // What the server said, not what was typed: the proof that it answered.
        read_reply(&mut replies, &line, &mut stdout)?;
        stdout.flush()?;
        line.clear();
    }
    Ok(())
}

/// Reads the reply to `sent`, one or more `GOT:` + chunk, the chunks adding up to `sent`, and
/// copies each byte to `out` as it is read.
///
/// Nothing marks where a chunk ends and a line may contain `GOT:` itself, so this follows every
/// way to read the bytes so far: (payload bytes matched, state), the state counting the `GOT:`
/// bytes read (0 to 4), then 5 once the chunk has a byte. A line ends at its only newline, so
/// the first reading to match all of it is the one.
fn read_reply(replies: &mut impl BufRead, sent: &[u8], out: &mut impl Write) -> io::Result<()> {
    let mut readings = vec![(0, 0)];
    while !readings.contains(&(sent.len(), 5)) {
        let Some(&byte) = replies.fill_buf()?.first() else {
            let closed = "the server closed the connection before replying in full";
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, closed));
        };
        replies.consume(1);
        out.write_all(&[byte])?;
        let mut next = Vec::new();
        for &(matched, state) in &readings {
            if state < 4 && byte == b"GOT:"[state] {
                next.push((matched, state + 1));
            }
            if state >= 4 && sent.get(matched) == Some(&byte) {
                next.push((matched + 1, 5));
            }
            if state == 5 && byte == b'G' {
                next.push((matched, 1)); // the next chunk's `GOT:` starts here
            }
        }
        next.sort_unstable();
        next.dedup(); // readings that met again: follow each once
        if next.is_empty() {
            let found = char::from(byte);
            let message = format!("the reply is not GOT: + the line sent (found {found:?})");
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        readings = next;
    }
    Ok(())
}
