//! Where a TLS client's records begin and end, as its bytes pass from the socket to rustls: so
//! that a client that closes its socket without close_notify can be told apart by where it
//! stopped. At a record's end, it only skipped the courtesy (many clients do, as Go's
//! crypto/tls accepts); in the middle of one, bytes it sent were cut short.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};

/// A TLS record's header: content type, version (2 bytes), length (2 bytes).
const HEADER: u8 = 5;

/// A stream under a TLS session that follows the record framing of what it reads: a few
/// operations per record (one 64 KiB read holds four full records), not per byte.
#[derive(Debug)]
pub(crate) struct RecordTracker<S> {
    inner: S,
    /// Bytes of the current record's header read so far (0 between records).
    header_seen: u8,
    /// The high byte of the record's length, once read.
    length_high: u8,
    /// Bytes of the current record's body still to come.
    body_left: usize,
    /// Whether a read returned the end of the stream.
    saw_eof: bool,
    /// Set by the TLS session when it took the end, without close_notify, as the client's close.
    pub(crate) missing_close_notify: bool,
}

impl<S> RecordTracker<S> {
    pub(crate) fn new(inner: S) -> Self {
        RecordTracker {
            inner,
            header_seen: 0,
            length_high: 0,
            body_left: 0,
            saw_eof: false,
            missing_close_notify: false,
        }
    }

    /// Whether the stream has ended, at the end of a record: nothing the client sent was cut.
    pub(crate) fn ended_between_records(&self) -> bool {
        self.saw_eof && self.header_seen == 0 && self.body_left == 0
    }

    /// Whether the stream has ended (in the middle of a record or not).
    pub(crate) fn saw_eof(&self) -> bool {
        self.saw_eof
    }

    fn track(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let byte = bytes[0];
            bytes = &bytes[1..];
            match self.header_seen {
                3 => self.length_high = byte,
                4 => self.body_left = usize::from(u16::from_be_bytes([self.length_high, byte])),
                _ => {}
            }
            self.header_seen = (self.header_seen + 1) % HEADER;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordTracker<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        match poll {
            Poll::Ready(Ok(0)) if !buf.is_empty() => this.saw_eof = true,
            Poll::Ready(Ok(n)) => this.track(&buf[..n]),
            _ => {}
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordTracker<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(chunks: &[&[u8]]) -> RecordTracker<()> {
        let mut tracker = RecordTracker::new(());
        for chunk in chunks {
            tracker.track(chunk);
        }
        tracker.saw_eof = true;
        tracker
    }

    #[test]
    fn finds_record_ends_across_any_split() {
        let records = [&[23, 3, 3, 0, 2, 0xaa, 0xbb][..], &[21, 3, 3, 0, 0]].concat();
        for split in 0..=records.len() {
            let (a, b) = records.split_at(split);
            assert!(tracked(&[a, b]).ended_between_records(), "split at {split}");
        }
        for cut in 1..records.len() {
            let whole = cut == 7;
            let tracker = tracked(&[&records[..cut]]);
            assert_eq!(tracker.ended_between_records(), whole, "cut at {cut}");
        }
    }
}
