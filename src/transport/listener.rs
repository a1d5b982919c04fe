//! A bound listening socket, TCP or Unix, and what it accepts: a stream with what the socket
//! tells about the client, and the stages its connection is to pass (PROXY header, TLS).

use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use smol::Async;

use super::proxy::ProxyProtocol;
use super::stream::Stream;
use super::tcp;
use super::tls::TlsConfig;
#[cfg(unix)]
use super::unix;
use crate::addr::{canonical, Addr};
use crate::info::{ConnectionInfo, Transport};

/// What the builder sets for all its client listeners.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListenOptions {
    pub(crate) backlog: u32,
    /// For TCP and TLS listeners: a PROXY header comes first.
    pub(crate) proxy: Option<ProxyProtocol>,
    /// SO_REUSEPORT on TCP listeners: several processes may bind one address.
    pub(crate) reuse_port: bool,
    /// TCP keepalive on accepted TCP connections: idle time before the first probe.
    pub(crate) keepalive: Option<Duration>,
    /// The permissions of the Unix socket files it makes; the umask's if `None`.
    pub(crate) unix_mode: Option<u32>,
}

impl ListenOptions {
    /// For a listener that is not a client's (the metrics endpoint): no PROXY header, no
    /// keepalive, a port of its own.
    pub(crate) fn plain(&self) -> ListenOptions {
        ListenOptions {
            backlog: self.backlog,
            ..ListenOptions::default()
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub(crate) struct Listener {
    socket: Bound,
    local_addr: Addr,
    /// What its clients' connections are: TLS listeners hand out TCP streams still to be
    /// handshaken.
    transport: Transport,
    tls: Option<TlsConfig>,
    /// Whether a PROXY header comes first, and from whom it is trusted.
    proxy: Option<ProxyProtocol>,
    /// Set on each accepted TCP connection.
    keepalive: Option<tcp::Keepalive>,
}

#[derive(Debug)]
enum Bound {
    Tcp(Async<TcpListener>),
    #[cfg(unix)]
    Unix {
        listener: Async<std::os::unix::net::UnixListener>,
        /// Held for its drop, which removes the socket file; `None` for a socket systemd
        /// passed, whose file is systemd's.
        _file: Option<unix::SocketFile>,
    },
}

/// A client just accepted: its stream (for TLS, still to be handshaken) and what the socket
/// told about it.
pub(crate) struct Accepted {
    pub(crate) stream: Stream,
    pub(crate) info: ConnectionInfo,
}

impl Listener {
    /// A TCP listener, bound already; TLS with `tls`.
    pub(super) fn tcp(
        listener: TcpListener,
        options: &ListenOptions,
        tls: Option<&TlsConfig>,
    ) -> io::Result<Listener> {
        Ok(Listener {
            local_addr: Addr::Inet(listener.local_addr()?),
            socket: Bound::Tcp(Async::new(listener)?),
            transport: match tls {
                Some(_) => Transport::Tls,
                None => Transport::Tcp,
            },
            tls: tls.cloned(),
            proxy: options.proxy.clone(),
            keepalive: options.keepalive.map(tcp::keepalive),
        })
    }

    /// A Unix socket listener; `file`, when we made the socket file, is removed on drop.
    #[cfg(unix)]
    pub(super) fn unix(
        listener: std::os::unix::net::UnixListener,
        file: Option<unix::SocketFile>,
    ) -> io::Result<Listener> {
        let path = listener.local_addr()?.as_pathname().map(Arc::from);
        Ok(Listener {
            socket: Bound::Unix {
                listener: Async::new(listener)?,
                _file: file,
            },
            local_addr: Addr::Unix(path),
            transport: Transport::Unix,
            tls: None,
            proxy: None,
            keepalive: None,
        })
    }

    pub(crate) fn local_addr(&self) -> &Addr {
        &self.local_addr
    }

    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// The PROXY protocol configuration of a listener that expects a header first.
    pub(crate) fn proxy(&self) -> Option<&ProxyProtocol> {
        self.proxy.as_ref()
    }

    /// The TLS configuration of a TLS listener.
    pub(crate) fn tls(&self) -> Option<&TlsConfig> {
        self.tls.as_ref()
    }

    /// Accepts the next client. Errors are accept(2)'s: the caller tells the ones about one
    /// client from the ones about the server.
    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        loop {
            match self.accept_now() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match &self.socket {
                    Bound::Tcp(listener) => listener.readable().await?,
                    #[cfg(unix)]
                    Bound::Unix { listener, .. } => listener.readable().await?,
                },
                accepted => return accepted,
            }
        }
    }

    /// Accepts a client already in the kernel's queue, without waiting: `WouldBlock` when the
    /// queue is empty. What a stop uses to serve the clients queued before it closes.
    pub(crate) fn accept_now(&self) -> io::Result<Accepted> {
        match &self.socket {
            Bound::Tcp(listener) => {
                let (stream, peer) = listener.get_ref().accept()?;
                let peer = canonical(peer);
                tcp::set_up(&stream, peer, self.keepalive.as_ref());
                Ok(Accepted {
                    stream: Stream::Tcp(async_net::TcpStream::try_from(stream)?),
                    // TLS listeners' clients: TLS, though the handshake is still to come.
                    info: ConnectionInfo::accepted(
                        Addr::Inet(peer),
                        self.local_addr.clone(),
                        self.transport,
                    ),
                })
            }
            #[cfg(unix)]
            Bound::Unix { listener, .. } => {
                let (stream, peer) = listener.get_ref().accept()?;
                let peer_addr = Addr::Unix(peer.as_pathname().map(Arc::from));
                let mut info =
                    ConnectionInfo::accepted(peer_addr, self.local_addr.clone(), Transport::Unix);
                info.peer_credentials = unix::peer_credentials(&stream);
                Ok(Accepted {
                    stream: Stream::Unix(async_net::unix::UnixStream::try_from(stream)?),
                    info,
                })
            }
        }
    }
}
