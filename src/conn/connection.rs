//! What a handler is given: the client's stream, and what is known about the connection.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};

use crate::addr::Addr;
use crate::info::ConnectionInfo;
use crate::observe::meter::Meter;
use crate::stop::StopHandle;
use crate::transport::Stream;

/// One client connection, as a handler receives it: a byte stream to read and write (it
/// implements [`AsyncRead`] and [`AsyncWrite`]), whatever the transport, with what is known about
/// the client in [`Connection::info`], and the server's [`StopHandle`].
///
/// To read in one task and write from another (a chat room, say), [`split`](crate::io::split) it.
///
/// Over TLS, what the handler wrote last is sent, and the session closed (close_notify), once
/// its future ends. A stream kept past that (moved into a task of its own) must be closed by
/// whoever holds it (`close().await`), or its last bytes may be lost.
///
/// # Examples
///
/// A handler that greets the client by address and hangs up:
///
/// ```
/// use taskserve::io::AsyncWriteExt;
///
/// async fn greet(mut conn: taskserve::Connection) -> std::io::Result<()> {
///     let greeting = format!("hello, {} over {}\n", conn.peer_addr(), conn.info().transport);
///     conn.write_all(greeting.as_bytes()).await
/// }
///
/// let server = taskserve::Server::builder().listen_tcp("127.0.0.1:0").start(greet)?;
/// # let mut reply = String::new();
/// # std::io::Read::read_to_string(&mut std::net::TcpStream::connect(server.local_addr()?)?, &mut reply)?;
/// # assert!(reply.starts_with("hello, 127.0.0.1:"), "{reply}");
/// # assert!(reply.ends_with(" over tcp\n"), "{reply}");
/// server.stop();
/// # std::io::Result::Ok(())
/// ```
pub struct Connection {
    stream: Stream,
    info: ConnectionInfo,
    stop: StopHandle,
    /// Counts the bytes read and written through this connection, for the server's stats.
    meter: Arc<Meter>,
}

impl Connection {
    pub(crate) fn new(
        stream: Stream,
        info: ConnectionInfo,
        stop: StopHandle,
        meter: Arc<Meter>,
    ) -> Self {
        Connection {
            stream,
            info,
            stop,
            meter,
        }
    }

    /// What is known about the connection: addresses, transport, TLS details, peer credentials.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// The client's address, as [`ConnectionInfo::peer_addr`]: a copy, as std's
    /// `TcpStream::peer_addr` returns one, so that the connection can be moved (into a
    /// `BufReader`, a `split`) while the address is kept.
    ///
    /// # Examples
    ///
    /// ```
    /// use taskserve::io::{AsyncBufReadExt, BufReader};
    ///
    /// async fn lines(conn: taskserve::Connection) -> std::io::Result<()> {
    ///     let peer = conn.peer_addr();
    ///     let mut reader = BufReader::new(conn);
    ///     let mut line = String::new();
    ///     while reader.read_line(&mut line).await? > 0 {
    ///         log::info!("{peer} said {line:?}");
    ///         line.clear();
    ///     }
    ///     Ok(())
    /// }
    /// # let server = taskserve::Server::builder().listen_tcp("127.0.0.1:0").start(lines)?;
    /// # server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    pub fn peer_addr(&self) -> Addr {
        self.info.peer_addr.clone()
    }

    /// The server's stop handle: [`StopHandle::stopping`] completes when a graceful stop begins,
    /// so a protocol can finish cleanly (say goodbye, close) before the shutdown timeout closes
    /// the connection for it; [`StopHandle::stop`] stops the server from its own handler.
    pub fn stop_handle(&self) -> &StopHandle {
        &self.stop
    }

    /// A plain TCP connection's socket and meter, for a handler that reads and writes it with
    /// system calls of its own (and counts its bytes itself); any other connection as it was.
    #[allow(clippy::result_large_err)] // matched at once, once per connection
    pub(crate) fn into_tcp(self) -> Result<(async_net::TcpStream, Arc<Meter>), Connection> {
        match self.stream {
            Stream::Tcp(tcp) => Ok((tcp, self.meter)),
            #[allow(unreachable_patterns)] // with neither Unix sockets nor TLS, TCP is all there is
            stream => Err(Connection { stream, ..self }),
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Counts `n` bytes moved, when a read or write made progress.
fn counted(poll: Poll<io::Result<usize>>, count: impl FnOnce(usize)) -> Poll<io::Result<usize>> {
    if let Poll::Ready(Ok(n)) = poll {
        count(n);
    }
    poll
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        counted(poll, |n| this.meter.add_read(n))
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_read_vectored(cx, bufs);
        counted(poll, |n| this.meter.add_read(n))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        counted(poll, |n| this.meter.add_written(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        counted(poll, |n| this.meter.add_written(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}

/// What serves a connection: any `Fn(Connection) -> impl Future<Output = io::Result<()>>` that
/// worker threads can share, as the public API spells it. One name for those bounds inside the
/// crate.
pub(crate) trait Handler: Send + Sync + 'static {
    type Future: Future<Output = io::Result<()>> + Send + 'static;

    fn call(&self, connection: Connection) -> Self::Future;
}

impl<H, F> Handler for H
where
    H: Fn(Connection) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    type Future = F;

    fn call(&self, connection: Connection) -> F {
        self(connection)
    }
}
