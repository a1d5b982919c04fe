//! The fuzz targets' way in (feature `fuzzing`, not part of the API; see `fuzz/README.md`): one
//! function per parser of untrusted bytes, which feeds it arbitrary input through the same code
//! a connection or a file goes through, and panics only where that code broke a promise.
//! `cargo test` replays every checked-in corpus and regression file through them.
//!
//! A stream's input is read as `[k, len_1, ..., len_k, bytes...]`: the bytes arrive in pieces of
//! those lengths (then the rest at once), so that the fuzzer chooses the split points as well as
//! the bytes. Each outcome is then compared with that of the same bytes arriving all at once:
//! how TCP happens to segment a header must not change what it means.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use smol::future::{self, block_on};
use smol::io::AsyncRead;

use crate::transport::proxy;

/// The PROXY header read off a stream in pieces: framed (`read_framed`, which peeks and reads
/// as it does on a socket) and parsed, as a connection's PROXY stage does.
pub fn proxy_header(data: &[u8]) {
    let (lengths, bytes) = pieces(data);
    let mut split = Pieces::new(bytes, lengths);
    let framed = block_on(proxy::read_framed(&mut split));
    let whole = block_on(proxy::read_framed(&mut Pieces::new(bytes, &[])));
    same_outcome(&framed, &whole);
    if let Ok(header) = framed {
        assert!(bytes.starts_with(&header), "a header of bytes not sent");
        assert_eq!(split.read.get(), header.len(), "a payload byte was read");
        let _ = proxy::parse(&header, "192.0.2.9:1".parse().unwrap());
    }
}

/// The metrics endpoint's request head read off a stream in pieces and parsed, as a scrape's is,
/// and the answer it gets.
#[cfg(feature = "metrics")]
pub fn metrics_head(data: &[u8]) {
    use crate::observe::{http::Request, prometheus::read_head};
    let (lengths, bytes) = pieces(data);
    let split = block_on(read_head(&mut Pieces::new(bytes, lengths)));
    let whole = block_on(read_head(&mut Pieces::new(bytes, &[])));
    same_outcome(&split, &whole);
    if let Ok(Request::Refused(response)) = split {
        let answer = response.into_bytes();
        assert!(answer.starts_with(b"HTTP/1.1 "), "{answer:?}");
    }
}

/// PEM bytes loaded as [`TlsConfig`](crate::TlsConfig) loads a certificate chain, its key and
/// client CA certificates: `cert 0xFF key [0xFF ca]` (0xFF is never in PEM text). An error is
/// one line, as `echo` prints it.
#[cfg(feature = "tls")]
pub fn tls_pem(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0xFF);
    let (cert, key) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let loaded = crate::transport::tls_files::load_pem_bytes(cert, key, parts.next());
    if let Err(e) = loaded {
        let message = e.to_string();
        assert!(!message.contains('\n'), "{message}");
    }
}

/// `echo`'s flags, NUL-separated, parsed as `echo` parses its command line: with argh and the
/// value parsers of `src/bin/echo/args.rs` (`--proxy-from` CIDR lists, `--unix-mode`...).
#[cfg(unix)]
pub fn echo_args(data: &[u8]) {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let argv: Vec<_> = data
        .split(|&b| b == 0)
        .map(|arg| OsStr::from_bytes(arg).to_owned())
        .collect();
    if let Ok(args) = args::parse("echo", &argv) {
        assert!((1..=args::MAX_THREADS).contains(&args.threads));
        assert!(args.max_connections >= 1 && args.tls_handshake_timeout >= 1);
        assert!(args.unix_mode.is_none_or(|mode| mode <= 0o777));
        assert!(args
            .tls_ticket_lifetime
            .is_none_or(|seconds| (1..=args::MAX_TICKET_LIFETIME).contains(&seconds)));
    }
}

/// The flags as the binary has them: the file only uses argh and the public API.
#[cfg(unix)]
#[path = "bin/echo/args.rs"]
#[allow(dead_code)]
mod args;

/// The lengths of the pieces `data` asks for, and the bytes to cut into them.
fn pieces(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    rest.split_at(usize::from(count).min(rest.len()))
}

/// Two reads of the same bytes in different pieces end the same way.
fn same_outcome<T: PartialEq + std::fmt::Debug>(split: &io::Result<T>, whole: &io::Result<T>) {
    match (split, whole) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the pieces changed what was read"),
        (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind(), "{a} / {b}"),
        _ => panic!("the pieces changed the outcome: {split:?} / {whole:?}"),
    }
}

/// Bytes arriving in pieces, as on a socket: a peek or a read that finds nothing unread takes
/// the next piece (all that is left after the listed ones), and 0 once none is left.
struct Pieces<'a> {
    bytes: &'a [u8],
    lengths: &'a [u8],
    /// The pieces taken so far.
    taken: Cell<usize>,
    arrived: Cell<usize>,
    read: Cell<usize>,
}

impl<'a> Pieces<'a> {
    fn new(bytes: &'a [u8], lengths: &'a [u8]) -> Self {
        Pieces {
            bytes,
            lengths,
            taken: Cell::new(0),
            arrived: Cell::new(0),
            read: Cell::new(0),
        }
    }

    /// Copies what has arrived and is unread into `buf`, waiting for the next piece if nothing
    /// is; `consume` reads it.
    fn copy(&self, buf: &mut [u8], consume: bool) -> usize {
        if self.read.get() == self.arrived.get() {
            let left = self.bytes.len() - self.arrived.get();
            let length = match self.lengths.get(self.taken.get()) {
                // A piece has at least a byte; 0 means one.
                Some(&length) => usize::from(length).max(1),
                None => left,
            };
            self.taken.set(self.taken.get() + 1);
            self.arrived.set(self.arrived.get() + length.min(left));
        }
        let unread = &self.bytes[self.read.get()..self.arrived.get()];
        let n = unread.len().min(buf.len());
        buf[..n].copy_from_slice(&unread[..n]);
        if consume {
            self.read.set(self.read.get() + n);
        }
        n
    }
}

impl proxy::Peek for Pieces<'_> {
    fn peek(&self, buf: &mut [u8]) -> impl future::Future<Output = io::Result<usize>> + Send {
        future::ready(Ok(self.copy(buf, false)))
    }
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(self.copy(buf, true)))
    }
}

#[cfg(test)]
mod tests;
