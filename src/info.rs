//! What is known about a connection: the plain data a handler reads in [`ConnectionInfo`], filled
//! in by the transport that accepted it and by each stage it passed (PROXY header, TLS handshake).

use std::fmt;
use std::net::SocketAddr;

use crate::addr::Addr;

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
    pub proxy: Option<ProxyInfo>,
}

impl ConnectionInfo {
    /// A connection just accepted on `local_addr` from `peer_addr`, before any stage ran.
    pub(crate) fn accepted(peer_addr: Addr, local_addr: Addr, transport: Transport) -> Self {
        ConnectionInfo {
            peer_addr,
            local_addr,
            transport,
            tls: None,
            peer_credentials: None,
            proxy: None,
        }
    }
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

/// What a PROXY header told about a connection, beside the client address that became
/// [`ConnectionInfo::peer_addr`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyInfo {
    /// 1 for the text header, 2 for the binary one.
    pub version: u8,
    /// The proxy's own address: the other end of the socket.
    pub proxy_addr: SocketAddr,
    /// The address the client connected to, at the proxy; `None` when the header names no
    /// addresses (v1 `UNKNOWN`, v2 `LOCAL` or an unspecified family).
    pub destination: Option<SocketAddr>,
    /// A v2 `LOCAL` header: the proxy's own connection (a health check), not a client's. The
    /// peer address stays the proxy's.
    pub local: bool,
    /// The v2 authority TLV (`PP2_TYPE_AUTHORITY`): the host name the client asked for (TLS
    /// SNI at the proxy), if the proxy sent one.
    pub authority: Option<String>,
    /// The v2 ALPN TLV (`PP2_TYPE_ALPN`): the application protocol the client negotiated with
    /// the proxy, if it sent one.
    pub alpn: Option<Vec<u8>>,
    /// Every v2 TLV as it came, type and value, those above included.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}
