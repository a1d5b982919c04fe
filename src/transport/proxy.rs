//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`, versions 1 and 2): a load balancer in
//! front of the server sends, before anything else, a header naming the client it forwards. It
//! is a stage of the connection's own task, before any TLS handshake, with its own deadline.
//!
//! The header is framed here, reading exactly its bytes and never one of the payload after it
//! (the handler, or the TLS handshake, reads those); the `ppp` crate parses the bytes.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info};
use smol::io::{AsyncRead, AsyncReadExt};

use crate::addr::{canonical, canonical_ip, Addr, Cidr};
use crate::deadline::within;
use crate::info::{ConnectionInfo, ProxyInfo};
use crate::logging::Peer;

/// The PROXY protocol on a server's TCP and TLS listeners ([`Builder::proxy_protocol`]): each
/// connection must start with a version 1 or 2 header, whose client address then replaces the
/// socket's everywhere (the handler's [`ConnectionInfo::peer_addr`], the log, the per-client
/// limit). Connections from sources that are not trusted are closed at once, without reading.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use taskserve::ProxyProtocol;
///
/// let proxy = ProxyProtocol::new()
///     .trusted_sources(["10.0.0.0/8".parse()?, "127.0.0.1".parse()?])
///     .timeout(Duration::from_secs(2));
/// let server = taskserve::Server::builder()
///     .proxy_protocol(proxy)
///     .listen_tcp("127.0.0.1:0")
///     .start(taskserve::echo)?;
/// server.stop();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// [`Builder::proxy_protocol`]: crate::Builder::proxy_protocol
#[derive(Debug, Clone)]
pub struct ProxyProtocol(Arc<Config>);

#[derive(Debug, Clone)]
struct Config {
    trusted: Vec<Cidr>,
    timeout: Duration,
}

impl Default for ProxyProtocol {
    fn default() -> Self {
        ProxyProtocol(Arc::new(Config {
            trusted: vec![
                Cidr::new(Ipv4Addr::LOCALHOST.into(), 8),
                Cidr::new(Ipv6Addr::LOCALHOST.into(), 128),
            ],
            timeout: Duration::from_secs(5),
        }))
    }
}

impl ProxyProtocol {
    /// Headers trusted from loopback only (`127.0.0.0/8` and `::1`), within 5 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// The networks whose connections may send a header (default: loopback only): the load
    /// balancers' addresses. Anyone else could claim to be any client. A connection from
    /// elsewhere is closed at once, logged at debug.
    pub fn trusted_sources(mut self, networks: impl IntoIterator<Item = Cidr>) -> Self {
        Arc::make_mut(&mut self.0).trusted = networks.into_iter().collect();
        self
    }

    /// How long a client has to send the whole header (default 5 s); one that sends part of
    /// it, or nothing, is closed then, while the others are served.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.0).timeout = timeout;
        self
    }

    /// Whether a connection from `addr` may send a header.
    pub fn trusts(&self, addr: IpAddr) -> bool {
        let addr = canonical_ip(addr);
        self.0.trusted.iter().any(|net| net.contains(addr))
    }
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (the spec's 107 bytes).
const V1_MAX: usize = 107;
/// A v2 header's fixed part: the signature, version and command, family, and length.
const V2_FIXED: usize = 16;
/// The most a v2 header may announce after its fixed part; a header announcing more is
/// refused at once. The spec allows 65,535, but load balancers send far less: the addresses
/// (216 bytes at most, for Unix sockets) and a few TLVs (HAProxy's authority is at most 255
/// bytes, its unique ID 128, and HAProxy itself refuses a TLV value over 1,024 bytes,
/// `HA_PP2_MAX_ALLOC` in its `connection-t.h`). 2 KiB leaves room for all of those.
const V2_MAX_LENGTH: usize = 2048;
/// How much of a header is read at a time.
const PIECE: usize = 512;

/// What a header is read from: a socket that can show the bytes that have arrived without
/// taking them. A TCP stream; bytes in memory, arriving in pieces, for the fuzz targets.
pub(crate) trait Peek: AsyncRead + Unpin {
    /// Waits for bytes that were not read yet and copies them into `buf`, leaving them to be
    /// read; 0 once the peer has closed.
    fn peek(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
}

impl Peek for async_net::TcpStream {
    fn peek(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        async_net::TcpStream::peek(self, buf)
    }
}

/// How much of the bytes seen so far belong to the header.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// The header is this many bytes long in all.
    Exactly(usize),
    /// Every byte seen is part of the header, and more are needed.
    AllOfIt,
}

/// Frames a header from its first bytes, `seen`: the bytes already read and those peeked.
fn frame(seen: &[u8]) -> Result<Framing, &'static str> {
    let starts = |prefix: &[u8]| {
        if seen.len() < prefix.len() {
            prefix.starts_with(seen)
        } else {
            seen.starts_with(prefix)
        }
    };
    if starts(V2_SIGNATURE) {
        if seen.len() < V2_FIXED {
            return Ok(Framing::AllOfIt);
        }
        let length = usize::from(u16::from_be_bytes([seen[14], seen[15]]));
        if length > V2_MAX_LENGTH {
            return Err("a v2 header announcing more than 2048 bytes");
        }
        return Ok(Framing::Exactly(V2_FIXED + length));
    }
    if starts(V1_PREFIX) {
        return match seen.iter().position(|&b| b == b'\n') {
            Some(end) if end < V1_MAX => Ok(Framing::Exactly(end + 1)),
            Some(_) => Err("a v1 header longer than 107 bytes"),
            None if seen.len() >= V1_MAX => Err("a v1 header longer than 107 bytes"),
            None => Ok(Framing::AllOfIt),
        };
    }
    Err("not a PROXY protocol header")
}

/// Reads the header at the start of `stream`, exactly its bytes: until its length is known,
/// peeks at what has arrived and reads only what is header; then reads the rest. The buffer
/// grows with the bytes that came, never ahead of them to the length a header announces:
/// 16 bytes must not buy 2 KiB. Usually one peek and one read.
pub(crate) async fn read_framed(stream: &mut impl Peek) -> io::Result<Vec<u8>> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut header = Vec::with_capacity(V1_MAX);
    let mut piece = [0; PIECE];
    loop {
        let framing = frame(&header).map_err(invalid)?;
        let n = match framing {
            Framing::Exactly(len) if header.len() == len => return Ok(header),
            Framing::Exactly(len) => {
                let want = (len - header.len()).min(PIECE);
                stream.read(&mut piece[..want]).await?
            }
            Framing::AllOfIt => {
                // Blocks until bytes come that were not read yet.
                let peeked = stream.peek(&mut piece).await?;
                let seen = [&header[..], &piece[..peeked]].concat();
                let end = match frame(&seen).map_err(invalid)? {
                    Framing::Exactly(len) => len.min(seen.len()),
                    Framing::AllOfIt => seen.len(),
                };
                let n = end - header.len();
                stream.read_exact(&mut piece[..n]).await?;
                n
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the end of its PROXY header",
            ));
        }
        header.extend_from_slice(&piece[..n]);
    }
}

/// What a header says, once parsed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The client, if the header names one.
    source: Option<SocketAddr>,
    info: ProxyInfo,
}

/// Parses a framed header (as [`read_framed`] reads it) with `ppp`.
pub(crate) fn parse(header: &[u8], proxy_addr: SocketAddr) -> Result<Parsed, String> {
    let mut info = ProxyInfo {
        version: 1,
        proxy_addr,
        destination: None,
        local: false,
        authority: None,
        alpn: None,
        tlvs: Vec::new(),
    };
    if header.starts_with(V1_PREFIX) {
        let parsed = ppp::v1::Header::try_from(header).map_err(|e| format!("v1: {e}"))?;
        if parsed.header.len() != header.len() {
            return Err("v1: bytes after the CRLF".into());
        }
        let (source, destination) = match parsed.addresses {
            ppp::v1::Addresses::Unknown => (None, None),
            ppp::v1::Addresses::Tcp4(a) => (
                Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                Some(SocketAddr::new(
                    a.destination_address.into(),
                    a.destination_port,
                )),
            ),
            ppp::v1::Addresses::Tcp6(a) => (
                Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                Some(SocketAddr::new(
                    a.destination_address.into(),
                    a.destination_port,
                )),
            ),
        };
        info.destination = destination;
        return Ok(Parsed { source, info });
    }
    let parsed = ppp::v2::Header::try_from(header).map_err(|e| format!("v2: {e}"))?;
    if parsed.len() != header.len() {
        return Err("v2: the length does not match".into());
    }
    info.version = 2;
    for tlv in parsed.tlvs() {
        let tlv = tlv.map_err(|e| format!("v2 TLV: {e}"))?;
        match tlv.kind {
            0x01 => info.alpn = Some(tlv.value.to_vec()),
            0x02 => {
                let authority = String::from_utf8(tlv.value.to_vec())
                    .map_err(|_| "v2: an authority that is not UTF-8".to_string())?;
                info.authority = Some(authority);
            }
            _ => {}
        }
        info.tlvs.push((tlv.kind, tlv.value.into_owned()));
    }
    if parsed.command == ppp::v2::Command::Local {
        // A health check or the proxy's own connection: the socket's address stays.
        info.local = true;
        return Ok(Parsed { source: None, info });
    }
    let (source, destination) = match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        ),
        ppp::v2::Addresses::IPv6(a) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        ),
        // A family we do not route by (unspecified, Unix): the socket's address stays, as the
        // spec asks.
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => {
            return Ok(Parsed { source: None, info })
        }
    };
    info.destination = Some(destination);
    Ok(Parsed {
        source: Some(source),
        info,
    })
}

/// How the log names a new connection: on a PROXY listener, by the proxy's address until the
/// header names the client. `None` for a connection to a PROXY listener from an untrusted
/// source, which is to be closed at once (logged here, at debug).
pub(crate) fn peer(proxy: Option<&ProxyProtocol>, info: &ConnectionInfo) -> Option<Peer> {
    match (proxy, &info.peer_addr) {
        (Some(proxy), Addr::Inet(addr)) => {
            if proxy.trusts(addr.ip()) {
                Some(Peer::behind_proxy(*addr))
            } else {
                debug!("{addr}: closed: not a trusted source of PROXY headers");
                None
            }
        }
        _ => Some(Peer::of(info)),
    }
}

/// The PROXY stage of one connection: reads and parses the header within the timeout, then
/// `info` names the client it gives (and `peer` with it, for the log, which says
/// `Connection from CLIENT` now). `None`, logged at debug, when the header is missing, late,
/// partial or malformed: the connection is then closed.
pub(crate) async fn read_header(
    tcp: &mut async_net::TcpStream,
    mut info: ConnectionInfo,
    proxy: &ProxyProtocol,
    peer: &Peer,
) -> Option<ConnectionInfo> {
    let Addr::Inet(proxy_addr) = info.peer_addr else {
        debug!("{peer}: the PROXY protocol over anything but TCP is not supported");
        return None;
    };
    let timeout = proxy.0.timeout;
    let header = match within(timeout, "no complete PROXY header", read_framed(tcp)).await {
        Ok(header) => header,
        Err(e) => {
            debug!("{peer}: closed: {e}");
            discard_received(tcp).await;
            return None;
        }
    };
    let parsed = match parse(&header, proxy_addr) {
        Ok(parsed) => parsed,
        Err(e) => {
            debug!("{peer}: closed: malformed PROXY header: {e}");
            discard_received(tcp).await;
            return None;
        }
    };
    let client = parsed.source.map(canonical).unwrap_or(proxy_addr);
    info.peer_addr = Addr::Inet(client);
    info.proxy = Some(parsed.info);
    peer.set_client(client);
    // The seed's first line, now that the client is known (see `ConnectionTask::new`); at debug
    // for a v2 LOCAL, the proxy's own connection: a health check, unless it sends data.
    if info.proxy.as_ref().is_some_and(|proxy| proxy.local) {
        debug!("Connection from {peer} (PROXY LOCAL: a health check unless it sends data)");
    } else {
        info!("Connection from {peer}");
    }
    if client != proxy_addr {
        debug!("{peer}: through the proxy at {proxy_addr}");
    }
    Some(info)
}

/// Reads and drops what the client has sent and nothing has read (the bytes after a malformed
/// header, or those peeked at but not framed), up to 64 KiB, without waiting for more: a socket
/// closed with unread bytes is reset, and a refused header should end in a plain close.
async fn discard_received(tcp: &mut async_net::TcpStream) {
    let mut piece = [0; PIECE];
    for _ in 0..128 {
        match smol::future::poll_once(tcp.read(&mut piece)).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy_addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn default_trusts_loopback_only() {
        let proxy = ProxyProtocol::new();
        assert!(proxy.trusts("127.0.0.2".parse().unwrap()));
        assert!(proxy.trusts("::1".parse().unwrap()));
        assert!(proxy.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!proxy.trusts("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn frames_v1_up_to_its_newline_and_v2_by_its_length() {
        assert_eq!(frame(b"PRO"), Ok(Framing::AllOfIt));
        assert_eq!(frame(b"PROXY TCP4 1"), Ok(Framing::AllOfIt));
        assert_eq!(frame(b"PROXY UNKNOWN\r\nGET"), Ok(Framing::Exactly(15)));
        assert_eq!(frame(b"\r\n\r\n"), Ok(Framing::AllOfIt));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([0x21, 0x11, 0, 12]);
        assert_eq!(frame(&v2), Ok(Framing::Exactly(28)));
        assert!(frame(b"GET / HTTP/1.1\r\n").is_err());
        let mut v2_max = V2_SIGNATURE.to_vec();
        v2_max.extend([0x21, 0x11, 0x08, 0x00]);
        assert_eq!(frame(&v2_max), Ok(Framing::Exactly(16 + 2048)));
        v2_max[15] = 1;
        assert!(frame(&v2_max).is_err(), "2049 bytes announced");
        assert!(frame(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20)).is_err());
    }

    #[test]
    fn parses_v1_tcp4_and_unknown() {
        let parsed = parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 80\r\n", proxy_addr()).unwrap();
        assert_eq!(parsed.source, Some("192.0.2.1:5000".parse().unwrap()));
        assert_eq!(
            parsed.info.destination,
            Some("192.0.2.2:80".parse().unwrap())
        );
        let unknown = parse(b"PROXY UNKNOWN\r\n", proxy_addr()).unwrap();
        assert_eq!(unknown.source, None);
    }

    #[test]
    fn parses_v2_with_tlvs_and_local() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::1]:4000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::2]:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .write_tlv(ppp::v2::Type::ALPN, b"h2")
        .unwrap()
        .write_tlv(ppp::v2::Type::Authority, b"example.com")
        .unwrap()
        .build()
        .unwrap();
        let parsed = parse(&header, proxy_addr()).unwrap();
        assert_eq!(parsed.source, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(parsed.info.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(parsed.info.authority.as_deref(), Some("example.com"));
        assert_eq!(parsed.info.tlvs.len(), 2);

        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        let parsed = parse(&local, proxy_addr()).unwrap();
        assert_eq!(parsed.source, None);
        assert!(parsed.info.local);
    }

    /// Random headers, pure noise and mutations of valid ones: framing and parsing return an
    /// error or a header, and never panic.
    #[test]
    fn random_headers_never_panic() {
        let mut rng = fastrand::Rng::with_seed(15);
        let valid: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 80\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 80\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                (
                    "192.0.2.1:1".parse::<SocketAddr>().unwrap(),
                    "192.0.2.2:2".parse::<SocketAddr>().unwrap(),
                ),
            )
            .write_tlv(ppp::v2::Type::Authority, b"a.example")
            .unwrap()
            .build()
            .unwrap(),
        ];
        for _ in 0..50_000 {
            let mut bytes = if rng.bool() {
                let len = rng.usize(..300);
                let mut noise: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                // Noise behind a real prefix reaches the parsers rather than the framing.
                match rng.u8(..3) {
                    0 => noise.splice(0..0, V1_PREFIX.iter().copied()).for_each(drop),
                    1 => noise
                        .splice(0..0, V2_SIGNATURE.iter().copied())
                        .for_each(drop),
                    _ => {}
                }
                noise
            } else {
                let mut header = valid[rng.usize(..valid.len())].clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..header.len());
                    header[at] = rng.u8(..);
                }
                header.truncate(rng.usize(1..=header.len()));
                header
            };
            if let Ok(Framing::Exactly(len)) = frame(&bytes) {
                bytes.resize(len, 0);
                let _ = parse(&bytes, proxy_addr());
            }
        }
    }
}
