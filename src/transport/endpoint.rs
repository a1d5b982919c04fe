//! An endpoint to listen on, as the builder was given it, and its binding into listeners.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
#[cfg(unix)]
use std::path::{Path, PathBuf};

use super::listener::{ListenOptions, Listener};
use super::proxy::ProxyProtocol;
#[cfg(unix)]
use super::systemd;
use super::tcp;
use super::tls::TlsConfig;
#[cfg(unix)]
use super::unix;

/// An endpoint to listen on; bound by `start`.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// A TCP address, TLS with a configuration.
    Tcp {
        /// Resolved when the builder is given the address; an error waits for `start`.
        addrs: Result<Vec<SocketAddr>, (io::ErrorKind, String)>,
        tls: Option<TlsConfig>,
        /// A PROXY header first on this listener whatever the builder's options say
        /// (`Builder::listen_proxy`); `None` leaves it to them.
        proxy: Option<ProxyProtocol>,
    },
    #[cfg(unix)]
    Unix(PathBuf),
    /// The listening sockets passed by systemd (socket activation), TCP ones with this TLS
    /// configuration if any.
    #[cfg(unix)]
    Systemd { tls: Option<TlsConfig> },
}

impl Endpoint {
    pub(crate) fn tcp(addr: impl ToSocketAddrs, tls: Option<TlsConfig>) -> Self {
        Endpoint::Tcp {
            addrs: resolve(addr),
            tls,
            proxy: None,
        }
    }

    /// A TCP address whose clients each start with a PROXY header, as `proxy` describes.
    pub(crate) fn tcp_proxy(addr: impl ToSocketAddrs, proxy: ProxyProtocol) -> Self {
        Endpoint::Tcp {
            addrs: resolve(addr),
            tls: None,
            proxy: Some(proxy),
        }
    }

    #[cfg(unix)]
    pub(crate) fn unix(path: impl AsRef<Path>) -> Self {
        Endpoint::Unix(path.as_ref().to_path_buf())
    }

    /// Binds the endpoint: one listener, or for systemd's sockets as many as were passed.
    pub(crate) fn bind(&self, options: &ListenOptions) -> io::Result<Vec<Listener>> {
        let listener = match self {
            Endpoint::Tcp { addrs, tls, proxy } => {
                let addrs = addrs
                    .as_ref()
                    .map_err(|(kind, message)| io::Error::new(*kind, message.clone()))?;
                let listener = tcp::bind(addrs, options.backlog, options.reuse_port)?;
                let own;
                let options = match proxy {
                    Some(proxy) => {
                        own = ListenOptions {
                            proxy: Some(proxy.clone()),
                            ..options.clone()
                        };
                        &own
                    }
                    None => options,
                };
                Listener::tcp(listener, options, tls.as_ref())?
            }
            #[cfg(unix)]
            Endpoint::Unix(path) => {
                let (listener, file) = unix::bind(path, options.backlog, options.unix_mode)?;
                Listener::unix(listener, Some(file))?
            }
            #[cfg(unix)]
            Endpoint::Systemd { tls } => return systemd::inherited(options, tls.as_ref()),
        };
        Ok(vec![listener])
    }
}

/// The addresses to bind; an error is kept for `start` to report.
fn resolve(addr: impl ToSocketAddrs) -> Result<Vec<SocketAddr>, (io::ErrorKind, String)> {
    addr.to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| (e.kind(), format!("cannot resolve the address to bind: {e}")))
}
