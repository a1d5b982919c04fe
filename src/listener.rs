//! The endpoints a server listens on, TCP and Unix sockets: binding each one, and accepting a
//! client from it as a stream with what the socket tells about it.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::debug;
use smol::Async;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::connection::{Addr, ConnectionInfo, Stream, Transport};
use crate::proxy::ProxyProtocol;
#[cfg(feature = "tls")]
use crate::tls::TlsConfig;

/// An endpoint to listen on, as the builder was given it; bound by `start`.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    Tcp {
        /// Resolved when the builder is given the address; an error waits for `start`.
        addrs: Result<Vec<SocketAddr>, (io::ErrorKind, String)>,
        #[cfg(feature = "tls")]
        tls: Option<TlsConfig>,
    },
    #[cfg(unix)]
    Unix(PathBuf),
    /// The listening sockets passed by systemd (socket activation), TCP ones with this TLS
    /// configuration if any.
    #[cfg(unix)]
    Systemd {
        #[cfg(feature = "tls")]
        tls: Option<TlsConfig>,
    },
}

impl Endpoint {
    pub(crate) fn tcp(addr: impl ToSocketAddrs) -> Self {
        Endpoint::Tcp {
            addrs: resolve(addr),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    #[cfg(feature = "tls")]
    pub(crate) fn tls(addr: impl ToSocketAddrs, config: TlsConfig) -> Self {
        Endpoint::Tcp {
            addrs: resolve(addr),
            tls: Some(config),
        }
    }

    #[cfg(unix)]
    pub(crate) fn systemd(#[cfg(feature = "tls")] tls: Option<TlsConfig>) -> Self {
        Endpoint::Systemd {
            #[cfg(feature = "tls")]
            tls,
        }
    }

    #[cfg(unix)]
    pub(crate) fn unix(path: impl AsRef<Path>) -> Self {
        Endpoint::Unix(path.as_ref().to_path_buf())
    }

    /// Binds the endpoint: one listener, or for systemd's sockets as many as were passed.
    pub(crate) fn bind_all(&self, options: &ListenOptions) -> io::Result<Vec<Listener>> {
        let backlog = options.backlog;
        let listener = match self {
            Endpoint::Tcp {
                addrs,
                #[cfg(feature = "tls")]
                tls,
            } => {
                let addrs = addrs
                    .as_ref()
                    .map_err(|(kind, message)| io::Error::new(*kind, message.clone()))?;
                let listener = bind_tcp(addrs, backlog, options.reuse_port)?;
                #[rustfmt::skip]
                let listener = Listener::tcp(listener, options, #[cfg(feature = "tls")] tls.as_ref());
                listener
            }
            #[cfg(unix)]
            Endpoint::Unix(path) => {
                let (listener, file) = unix::bind(path, backlog)?;
                Listener::unix(listener, Some(file))
            }
            #[cfg(unix)]
            #[cfg(feature = "tls")]
            Endpoint::Systemd { tls } => return crate::systemd::inherited(options, tls.as_ref()),
            #[cfg(unix)]
            #[cfg(not(feature = "tls"))]
            Endpoint::Systemd {} => return crate::systemd::inherited(options),
        };
        listener.map(|listener| vec![listener])
    }
}

impl Listener {
    /// A TCP listener (TLS with `tls`), bound already.
    pub(crate) fn tcp(
        listener: TcpListener,
        options: &ListenOptions,
        #[cfg(feature = "tls")] tls: Option<&TlsConfig>,
    ) -> io::Result<Listener> {
        let local_addr = Addr::Inet(listener.local_addr()?);
        #[cfg(feature = "tls")]
        if let Some(tls) = tls {
            return Ok(Listener {
                socket: Bound::Tcp(Async::new(listener)?),
                local_addr,
                transport: Transport::Tls,
                tls: Some(tls.clone()),
                proxy: options.proxy.clone(),
                keepalive: options.keepalive.map(keepalive),
            });
        }
        Ok(Listener {
            socket: Bound::Tcp(Async::new(listener)?),
            local_addr,
            transport: Transport::Tcp,
            #[cfg(feature = "tls")]
            tls: None,
            proxy: options.proxy.clone(),
            keepalive: options.keepalive.map(keepalive),
        })
    }

    /// A Unix socket listener; `file`, when we made the socket file, is removed on drop.
    #[cfg(unix)]
    pub(crate) fn unix(
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
            #[cfg(feature = "tls")]
            tls: None,
            proxy: None,
            keepalive: None,
        })
    }
}

/// What the builder sets for all its listeners.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListenOptions {
    pub(crate) backlog: u32,
    /// For TCP and TLS listeners: a PROXY header comes first.
    pub(crate) proxy: Option<ProxyProtocol>,
    /// SO_REUSEPORT on TCP listeners: several processes may bind one address.
    pub(crate) reuse_port: bool,
    /// TCP keepalive on accepted TCP connections: idle time before the first probe.
    pub(crate) keepalive: Option<Duration>,
}

/// A bound listening socket.
#[derive(Debug)]
pub(crate) struct Listener {
    socket: Bound,
    local_addr: Addr,
    /// What its clients' connections are: TLS listeners hand out TCP streams still to be
    /// handshaken.
    transport: Transport,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
    /// Whether a PROXY header comes first, and from whom it is trusted.
    proxy: Option<ProxyProtocol>,
    /// Set on each accepted TCP connection.
    keepalive: Option<TcpKeepalive>,
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
    #[cfg(feature = "tls")]
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
                // Without TCP_NODELAY, a reply written in two parts (prefix, then payload)
                // waits for the client's delayed ACK: Nagle's algorithm turns each round trip
                // into 40 ms.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!("{peer}: cannot set TCP_NODELAY: {e}");
                }
                if let Some(keepalive) = &self.keepalive {
                    if let Err(e) = SockRef::from(&stream).set_tcp_keepalive(keepalive) {
                        debug!("{peer}: cannot set TCP keepalive: {e}");
                    }
                }
                Ok(Accepted {
                    stream: Stream::Tcp(async_net::TcpStream::try_from(stream)?),
                    info: ConnectionInfo {
                        peer_addr: Addr::Inet(peer),
                        local_addr: self.local_addr.clone(),
                        // TLS listeners' clients: TLS, though the handshake is still to come.
                        transport: self.transport,
                        tls: None,
                        peer_credentials: None,
                        proxy: None,
                    },
                })
            }
            #[cfg(unix)]
            Bound::Unix { listener, .. } => {
                let (stream, peer) = listener.get_ref().accept()?;
                let peer_credentials = unix::peer_credentials(&stream);
                Ok(Accepted {
                    stream: Stream::Unix(async_net::unix::UnixStream::try_from(stream)?),
                    info: ConnectionInfo {
                        peer_addr: Addr::Unix(peer.as_pathname().map(Arc::from)),
                        local_addr: self.local_addr.clone(),
                        transport: Transport::Unix,
                        tls: None,
                        peer_credentials,
                        proxy: None,
                    },
                })
            }
        }
    }
}

fn resolve(addr: impl ToSocketAddrs) -> Result<Vec<SocketAddr>, (io::ErrorKind, String)> {
    addr.to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| (e.kind(), format!("cannot resolve the address to bind: {e}")))
}

/// Binds the first address of `addrs` that can be bound, with the given listen backlog.
fn bind_tcp(addrs: &[SocketAddr], backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let mut last_error = None;
    for &addr in addrs {
        match bind_one(addr, backlog, reuse_port) {
            Ok(listener) => return Ok(listener),
            Err(e) => {
                last_error = Some(io::Error::new(
                    e.kind(),
                    format!("failed to bind {addr}: {e}"),
                ))
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
}

fn bind_one(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does on Unix: a restarted server can bind while old connections sit in TIME_WAIT.
    // It does not let two servers share a port.
    socket.set_reuse_address(true)?;
    // This does: every socket of the group must set it (and belong to the same user); the
    // kernel spreads new connections over them.
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(clamp_backlog(backlog))?;
    Ok(socket.into())
}

/// Keepalive probes after `idle` without traffic, then every third of it (at least a second),
/// three of them: a dead peer is found within twice `idle`.
fn keepalive(idle: Duration) -> TcpKeepalive {
    let keepalive = TcpKeepalive::new().with_time(idle);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let keepalive = keepalive
        .with_interval((idle / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    keepalive
}

fn clamp_backlog(backlog: u32) -> i32 {
    backlog.min(i32::MAX as u32) as i32
}

/// A client's address as people write it: an IPv4 client of a dual-stack (`::`) listener
/// arrives as an IPv4-mapped IPv6 address, `[::ffff:127.0.0.1]:46856`, and is shown (and handed
/// to the handler) as `127.0.0.1:46856`.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(unix)]
mod unix {
    //! Unix sockets: a socket file that outlives a crashed server is replaced only when nothing
    //! answers on it, and the file is removed when the server stops.

    use std::fs;
    use std::io;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};

    use log::{debug, info};
    use socket2::{Domain, SockAddr, Socket, Type};

    use crate::connection::PeerCredentials;

    /// The socket file a listener made; removed on drop if it is still that file.
    #[derive(Debug)]
    pub(crate) struct SocketFile {
        path: PathBuf,
        /// Device and inode: another server may have replaced the file since.
        id: (u64, u64),
    }

    impl Drop for SocketFile {
        fn drop(&mut self) {
            let ours = fs::symlink_metadata(&self.path)
                .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.id);
            if ours {
                if let Err(e) = fs::remove_file(&self.path) {
                    debug!("cannot remove {}: {e}", self.path.display());
                }
            }
        }
    }

    pub(crate) fn bind(path: &Path, backlog: u32) -> io::Result<(UnixListener, SocketFile)> {
        let fail = |e: io::Error| {
            io::Error::new(e.kind(), format!("failed to bind {}: {e}", path.display()))
        };
        remove_if_stale(path).map_err(fail)?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(fail)?;
        socket.bind(&SockAddr::unix(path)?).map_err(fail)?;
        // Ours from here: a failure below removes the file it made.
        let meta = fs::symlink_metadata(path).map_err(fail)?;
        let file = SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        };
        socket.listen(super::clamp_backlog(backlog)).map_err(fail)?;
        Ok((UnixListener::from(std::os::fd::OwnedFd::from(socket)), file))
    }

    /// Removes a socket file that nothing listens on any more, left by a server that crashed.
    /// A live socket is an "address in use" error, and a file that is not a socket is left
    /// alone: binding then fails on it.
    fn remove_if_stale(path: &Path) -> io::Result<()> {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return Ok(()); // nothing there
        };
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        match UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "a server is listening on it (Address in use)",
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("removing stale socket file {}", path.display());
                fs::remove_file(path)
            }
            Err(e) => Err(e),
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(crate) fn peer_credentials(stream: &UnixStream) -> Option<PeerCredentials> {
        let cred = rustix::net::sockopt::socket_peercred(stream).ok()?;
        Some(PeerCredentials {
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            pid: u32::try_from(cred.pid.as_raw_nonzero().get()).ok(),
        })
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub(crate) fn peer_credentials(_stream: &UnixStream) -> Option<PeerCredentials> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_are_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:46856".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "127.0.0.1:46856");
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
