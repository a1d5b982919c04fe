//! The seed's protocol as a handler: every chunk read from a client comes back as `GOT:` + chunk.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use smol::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use smol::{future, Async};

use crate::conn::connection::Connection;
use crate::observe::meter::Meter;
use crate::transport::{recv, send, ReadableWait};

/// The most bytes [`echo`] reads at once, so the largest chunk a reply carries after `GOT:`.
///
/// The seed reads 1000 bytes. A bigger read means fewer system calls per byte for clients that
/// send a lot (a loopback segment is up to 64 KiB), and it costs no memory per connection: the
/// buffer belongs to the worker thread, and an idle connection holds none.
pub const READ_SIZE: usize = 64 * 1024;

const PREFIX: &[u8] = b"GOT:";

/// Chunks answered in a row before a connection gives its worker thread back to other tasks, so
/// that one client streaming flat out cannot starve the others.
const CHUNKS_BEFORE_YIELD: u32 = 16;

thread_local! {
    /// Room for `GOT:` followed by one read: the reply leaves in one write, without a copy.
    static REPLY: RefCell<Box<[u8]>> = RefCell::new({
        let mut buf = vec![0; PREFIX.len() + READ_SIZE].into_boxed_slice();
        buf[..PREFIX.len()].copy_from_slice(PREFIX);
        buf
    });
}

/// The seed's echo handler: for every chunk read from `stream`, writes `GOT:` followed by that
/// chunk, byte for byte; returns when the client ends its side of the connection.
///
/// A chunk is whatever one read returns (at most [`READ_SIZE`] bytes), so one message a client
/// sends may come back as several `GOT:` replies. A reply is always written in full before the
/// next read, so a client that does not read its replies stops being read from: the server
/// holds at most one chunk for it, never a growing backlog.
///
/// It reads into its worker thread's buffer (over plain TCP with raw system calls), so an idle
/// client costs no buffer.
///
/// # Examples
///
/// ```no_run
/// // The whole seed server: serve until SIGINT or SIGTERM.
/// taskserve::serve("127.0.0.1:25000", taskserve::echo)?;
/// # std::io::Result::Ok(())
/// ```
///
/// # Errors
///
/// Returns the socket's error, for example when the client resets the connection.
pub fn echo(connection: Connection) -> impl Future<Output = io::Result<()>> + Send + 'static {
    // Unwrapped before the future is made: a future keeps its arguments for its whole life, and
    // the 8-byte `Arc` is a small part of the size of a `Connection`. The other transports'
    // future is boxed, so that it adds nothing to the size of a plain TCP connection's task.
    match connection.into_tcp() {
        Ok((tcp, meter)) => Either::Left {
            future: echo_on(tcp.into(), meter),
        },
        Err(other) => Either::Right {
            future: Box::pin(echo_buffered(other)),
        },
    }
}

pin_project_lite::pin_project! {
    /// One of two futures with the same output.
    #[project = EitherProj]
    enum Either<L, R> {
        Left { #[pin] future: L },
        Right { #[pin] future: R },
    }
}

impl<T, L: Future<Output = T>, R: Future<Output = T>> Future for Either<L, R> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.project() {
            EitherProj::Left { future } => future.poll(cx),
            EitherProj::Right { future } => future.poll(cx),
        }
    }
}

/// The same protocol over any stream (TLS, a Unix socket), read into the worker thread's buffer
/// as over plain TCP, so that an idle connection holds no buffer.
async fn echo_buffered(mut stream: Connection) -> io::Result<()> {
    let mut budget = Budget::default();
    loop {
        let mut waited = Waited(false);
        let answered = future::poll_fn(|cx| {
            let answered = poll_answer(&mut stream, cx);
            waited.0 |= answered.is_pending();
            answered
        });
        match answered.await? {
            Answered::Fully { .. } => {}
            // The client is slow to read: finish this reply before reading anything more.
            Answered::Partly(unsent) => stream.write_all(&unsent).await?,
            // Ends the TLS session cleanly (close_notify) before the socket closes.
            Answered::EndOfStream => return stream.close().await,
        }
        stream.flush().await?;
        budget.spend(waited).await;
    }
}

/// Reads one chunk into the thread's buffer and writes its reply, within one poll: what the
/// stream did not take is returned, as [`answer_one_chunk`] does over plain TCP.
fn poll_answer(stream: &mut Connection, cx: &mut Context<'_>) -> Poll<io::Result<Answered>> {
    REPLY.with_borrow_mut(|reply| {
        let read = ready!(Pin::new(&mut *stream).poll_read(cx, &mut reply[PREFIX.len()..]))?;
        if read == 0 {
            return Poll::Ready(Ok(Answered::EndOfStream));
        }
        let reply = &reply[..PREFIX.len() + read];
        let written = match Pin::new(&mut *stream).poll_write(cx, reply) {
            Poll::Ready(written) => written?,
            Poll::Pending => 0,
        };
        Poll::Ready(Ok(if written == reply.len() {
            Answered::Fully {
                filled_buffer: read == READ_SIZE,
            }
        } else {
            Answered::Partly(reply[written..].to_vec())
        }))
    })
}

/// Over plain TCP, with raw system calls; the bytes are counted here, since they do not go
/// through the [`Connection`].
async fn echo_on(stream: Arc<Async<std::net::TcpStream>>, meter: Arc<Meter>) -> io::Result<()> {
    let mut budget = Budget::default();
    // Wait for readiness before reading, so an idle connection holds no buffer: the read goes
    // into the worker thread's buffer only once there is something to read.
    let mut waited = wait_readable(&stream).await?;
    loop {
        match answer_one_chunk(stream.get_ref(), &meter) {
            Ok(Answered::Fully { filled_buffer }) => {
                budget.spend(waited).await;
                waited = Waited(false);
                // A short read means the socket is drained (the hint tokio uses too): wait for
                // the next data instead of paying a read that would only say "would block".
                if !filled_buffer {
                    waited = wait_readable(&stream).await?;
                }
            }
            Ok(Answered::Partly(unsent)) => {
                // The client is slow to read: finish this reply before reading anything more.
                // This copy is the only per-connection buffer, and only while the client lags.
                (&*stream).write_all(&unsent).await?;
                meter.add_written(unsent.len());
                // A client that reads at just the pace of these writes never makes them wait:
                // the chunk counts against the budget too.
                budget.spend(waited).await;
                waited = Waited(false);
            }
            Ok(Answered::EndOfStream) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                waited = wait_readable(&stream).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Chunks a connection may still answer before it gives its worker thread back to other tasks.
struct Budget(u32);

/// Whether the task waited for what came before (and so gave its thread back meanwhile).
#[derive(Clone, Copy, Default)]
struct Waited(bool);

impl Default for Budget {
    fn default() -> Self {
        Budget(CHUNKS_BEFORE_YIELD)
    }
}

impl Budget {
    /// Counts a chunk answered. A task that waited for it has given its thread back since the
    /// last chunk, so the count starts afresh: a client that waits for each reply (most do) never
    /// yields for nothing, and only one that streams without pause does.
    async fn spend(&mut self, waited: Waited) {
        if waited.0 {
            self.0 = CHUNKS_BEFORE_YIELD;
        }
        self.0 -= 1;
        if self.0 == 0 {
            self.0 = CHUNKS_BEFORE_YIELD;
            future::yield_now().await;
        }
    }
}

/// Waits until the socket is readable, or the task is woken once it waits (see
/// [`ReadableWait`]): the read that follows tells, and waits again if it would block. Returns
/// whether it waited. A poll function rather than `readable()`: the same wait without a guard
/// object whose drop takes the socket's lock again, once per message.
async fn wait_readable(stream: &Async<std::net::TcpStream>) -> io::Result<Waited> {
    let (mut wait, mut waited) = (ReadableWait::default(), Waited(false));
    future::poll_fn(|cx| {
        let readable = wait.poll(stream, cx);
        waited.0 |= readable.is_pending();
        readable
    })
    .await?;
    Ok(waited)
}

enum Answered {
    Fully { filled_buffer: bool },
    Partly(Vec<u8>),
    EndOfStream,
}

/// Reads one chunk into the thread's buffer and writes its reply, without waiting: what the
/// socket did not take is returned, since the buffer cannot be held across an await (the task may
/// move to another thread). Fails with `WouldBlock` when there is nothing to read.
fn answer_one_chunk(socket: &std::net::TcpStream, meter: &Meter) -> io::Result<Answered> {
    REPLY.with_borrow_mut(|reply| {
        let read = retry_interrupted(|| recv(socket, &mut reply[PREFIX.len()..]))?;
        if read == 0 {
            return Ok(Answered::EndOfStream);
        }
        meter.add_read(read);
        let reply = &reply[..PREFIX.len() + read];
        let written = match retry_interrupted(|| send(socket, reply)) {
            Ok(written) => written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        meter.add_written(written);
        Ok(if written == reply.len() {
            Answered::Fully {
                filled_buffer: read == READ_SIZE,
            }
        } else {
            Answered::Partly(reply[written..].to_vec())
        })
    })
}

fn retry_interrupted<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}
