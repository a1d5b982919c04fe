//! RESP2, the Redis protocol: a parser of requests that resumes where it stopped when a command
//! arrives in pieces, and the writers of replies.
//!
//! A request is an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`), what every client
//! library sends, or an inline command (`GET k\r\n`), what a person types into `nc`. Every
//! length a client declares is checked against a limit before anything is waited for, and
//! nothing is allocated from it: memory grows only with bytes that really arrived.

use std::io::Write;
use std::ops::Range;

/// The most bytes one request may take, its framing included, and so the longest value.
///
/// Redis allows 512 MiB (`proto-max-bulk-len`). A request is held whole in its connection's
/// buffer until it is complete, so this is also what one client can make the server hold before
/// it answers; 16 MiB is far above what a cache entry is, and keeps a few hundred clients from
/// holding gigabytes.
pub const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// The most arguments in one request. Redis allows 2^31 - 1; its memory is bounded only by
/// what arrives. Here each argument costs 16 bytes of bookkeeping, so at most 16 MiB.
pub const MAX_ARGS: usize = 1024 * 1024;

/// The longest inline command, and the longest header line (`*N`, `$N`): Redis's 64 KiB.
pub const MAX_INLINE: usize = 64 * 1024;

/// The longest a number in a header can be (`-` and 19 digits) before it is known to be invalid.
const MAX_NUMBER_LINE: usize = 20;

/// Why a request cannot be parsed: the text after `-ERR Protocol error: `, as Redis words it.
/// The connection is closed after it, as Redis does, since nothing after it can be trusted to
/// start a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Parses requests from the front of a buffer, one at a time, keeping what it learned when a
/// request is incomplete so that the rest is not parsed again when more bytes arrive.
#[derive(Debug, Default)]
pub struct Parser {
    /// Arguments the current request declared (`*N`); `None` until its header is read.
    declared: Option<usize>,
    /// Where the next unparsed part of the current request starts, from the request's start.
    offset: usize,
    /// The arguments parsed so far, as ranges from the request's start.
    args: Vec<Range<usize>>,
    /// The last call returned a whole request: the next one starts afresh.
    done: bool,
}

impl Parser {
    /// Parses the request at the start of `buf`, which must begin where the previous request
    /// ended and hold at least the bytes given to the previous call if that one returned
    /// `Ok(None)`.
    ///
    /// Returns the length of the request once it is complete (its arguments are then
    /// [`Parser::args`], ranges of `buf`; none for an empty request, which gets no reply),
    /// `Ok(None)` if more bytes are needed, or the protocol error.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        if self.done {
            self.done = false;
            self.declared = None;
            self.offset = 0;
            self.args.clear();
        }
        let declared = match self.declared {
            Some(n) => n,
            None if buf.is_empty() => return Ok(None),
            None if buf[0] != b'*' => return self.parse_inline(buf),
            None => {
                let Some((n, end)) = number_line(buf, 1, "invalid multibulk length")? else {
                    return Ok(None);
                };
                if n > MAX_ARGS as i64 {
                    return Err(error("invalid multibulk length"));
                }
                self.offset = end;
                // `*0` and `*-1` are empty requests: Redis skips them without a reply.
                let n = n.max(0) as usize;
                self.declared = Some(n);
                n
            }
        };
        while self.args.len() < declared {
            let rest = &buf[self.offset..];
            match rest.first() {
                None => return Ok(None),
                Some(b'$') => {}
                Some(&other) => {
                    return Err(error(&format!("expected '$', got '{}'", other as char)));
                }
            }
            let Some((len, header)) = number_line(rest, 1, "invalid bulk length")? else {
                return Ok(None);
            };
            if !(0..=MAX_REQUEST as i64).contains(&len) {
                return Err(error("invalid bulk length"));
            }
            let start = self.offset + header;
            let end = start + len as usize;
            // Refused as soon as it is declared, before a byte of it is waited for.
            if end + 2 > MAX_REQUEST {
                return Err(error("request too big"));
            }
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(error("expected CRLF after a bulk string"));
            }
            self.args.push(start..end);
            self.offset = end + 2;
        }
        self.done = true;
        Ok(Some(self.offset))
    }

    /// The arguments of the request the last call returned, as ranges of the buffer it was
    /// given.
    pub fn args(&self) -> &[Range<usize>] {
        &self.args
    }

    /// An inline command: words separated by spaces or tabs, up to a newline.
    fn parse_inline(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(newline) = buf.iter().take(MAX_INLINE).position(|&b| b == b'\n') else {
            if buf.len() >= MAX_INLINE {
                return Err(error("too big inline request"));
            }
            return Ok(None);
        };
        let line = &buf[..newline];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut at = 0;
        for word in line.split(|&b| b == b' ' || b == b'\t') {
            if !word.is_empty() {
                self.args.push(at..at + word.len());
            }
            at += word.len() + 1;
        }
        self.done = true;
        Ok(Some(newline + 1))
    }
}

/// The number in the line `buf[from..]` up to its `\r\n`, and where the line ends; `Ok(None)`
/// if the line is not complete yet.
fn number_line(
    buf: &[u8],
    from: usize,
    invalid: &str,
) -> Result<Option<(i64, usize)>, ProtocolError> {
    let rest = &buf[from..];
    let Some(cr) = rest
        .iter()
        .take(MAX_NUMBER_LINE + 1)
        .position(|&b| b == b'\r')
    else {
        if rest.len() > MAX_NUMBER_LINE {
            return Err(error(invalid));
        }
        return Ok(None);
    };
    match rest.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(error(invalid)),
    }
    let number = std::str::from_utf8(&rest[..cr])
        .ok()
        .filter(|digits| !digits.starts_with('+'))
        .and_then(|digits| digits.parse::<i64>().ok())
        .ok_or_else(|| error(invalid))?;
    Ok(Some((number, from + cr + 2)))
}

fn error(message: &str) -> ProtocolError {
    ProtocolError(message.to_string())
}

/// `+OK`, `+PONG`: a status.
pub fn simple(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"+");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-ERR ...`: an error, `message` without line breaks (they would end the reply early).
pub fn error_reply(out: &mut Vec<u8>, message: &str) {
    out.extend_from_slice(b"-");
    out.extend(
        message
            .bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// `:N`: an integer.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, ":{n}\r\n");
}

/// `$N` and the bytes: a bulk string.
pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    let _ = write!(out, "${}\r\n", bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// `$-1`: the null bulk string, a missing value.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `*N`: the header of an array of `len` replies, which follow it.
pub fn array(out: &mut Vec<u8>, len: usize) {
    let _ = write!(out, "*{len}\r\n");
}
