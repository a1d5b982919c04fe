//! What a handler is given: the client's stream, and what is known about the connection.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};

use crate::server::StopHandle;
use crate::stats::Meter;

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
/// let server = taskserve::Server::builder().start("127.0.0.1:0", greet)?;
/// # let mut reply = String::new();
/// # std::io::Read::read_to_string(&mut std::net::TcpStream::connect(server.local_addr())?, &mut reply)?;
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

/// The transports a connection may come over, behind one type.
pub(crate) enum Stream {
    Tcp(async_net::TcpStream),
    #[cfg(unix)]
    Unix(async_net::unix::UnixStream),
    #[cfg(feature = "tls")]
    Tls(Box<crate::tls::TlsSession>),
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

    /// The client's address, as [`ConnectionInfo::peer_addr`].
    pub fn peer_addr(&self) -> &Addr {
        &self.info.peer_addr
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

/// Calls `$call` on whichever stream `$stream` holds, as `$s`.
macro_rules! each_stream {
    ($stream:expr, $s:ident => $call:expr) => {
        match $stream {
            Stream::Tcp($s) => $call,
            #[cfg(unix)]
            Stream::Unix($s) => $call,
            #[cfg(feature = "tls")]
            Stream::Tls($s) => $call,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_read_vectored(cx, bufs))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self.get_mut(), s => Pin::new(s).poll_close(cx))
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

/// What is known about a connection when its handler starts. More fields may come with new
/// transports, hence `#[non_exhaustive]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The client's address: its IP address and port, with IPv4 clients of a dual-stack
    /// listener shown as IPv4; for a Unix socket, usually unnamed.
    pub peer_addr: Addr,
    /// The address of the listener the client connected to.
    pub local_addr: Addr,
    /// How the client connected.
    pub transport: Transport,
    /// What the TLS handshake settled, on a TLS listener.
    pub tls: Option<TlsInfo>,
    /// Who the client is, on a Unix socket, where the operating system tells.
    pub peer_credentials: Option<PeerCredentials>,
    /// What the PROXY header said, on a listener with [`Builder::proxy_protocol`]: then
    /// `peer_addr` is the client it named, and this holds the proxy's own address and the
    /// header's TLVs (authority, ALPN).
    ///
    /// [`Builder::proxy_protocol`]: crate::Builder::proxy_protocol
    pub proxy: Option<crate::proxy::ProxyInfo>,
}

/// How a client connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// A Unix domain stream socket.
    Unix,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Unix => "unix",
        })
    }
}

/// An endpoint's address: an IP socket address, or a Unix socket's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Addr {
    /// An IP address and port.
    Inet(SocketAddr),
    /// A Unix socket's path; `None` for an unnamed socket, as most clients' are.
    Unix(Option<Arc<Path>>),
}

impl Addr {
    /// The IP socket address, if this is one.
    pub fn as_inet(&self) -> Option<SocketAddr> {
        match self {
            Addr::Inet(addr) => Some(*addr),
            Addr::Unix(_) => None,
        }
    }
}

impl From<SocketAddr> for Addr {
    fn from(addr: SocketAddr) -> Self {
        Addr::Inet(addr)
    }
}

/// `127.0.0.1:41312`, `[::1]:41312`, `/run/echo.sock`, or `unix:(unnamed)`.
impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Inet(addr) => addr.fmt(f),
            Addr::Unix(Some(path)) => path.display().fmt(f),
            Addr::Unix(None) => f.write_str("unix:(unnamed)"),
        }
    }
}

/// What a TLS handshake settled.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TlsInfo {
    /// The server name the client asked for (SNI), if it sent one.
    pub server_name: Option<String>,
    /// The application protocol negotiated with ALPN, if any.
    pub alpn_protocol: Option<Vec<u8>>,
    /// The subject of the client's certificate (`CN=alice, O=Example`), when client
    /// certificates are asked for and the client sent one.
    pub client_subject: Option<String>,
}

/// Who is at the other end of a Unix socket, as the operating system tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerCredentials {
    /// The client process's user id.
    pub uid: u32,
    /// The client process's group id.
    pub gid: u32,
    /// The client process's id, where the operating system tells it.
    pub pid: Option<u32>,
}
