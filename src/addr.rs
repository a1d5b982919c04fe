//! Addresses: an endpoint's address ([`Addr`]), a client's address as people write it
//! ([`canonical`]), and networks in CIDR notation ([`Cidr`]), which the PROXY protocol's trust
//! and the per-client limit are keyed by.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

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

/// [`canonical`] for an IP address alone.
pub(crate) fn canonical_ip(addr: IpAddr) -> IpAddr {
    canonical(SocketAddr::new(addr, 0)).ip()
}

/// A network in CIDR notation: `10.0.0.0/8`, `2001:db8::/32`, or one address (`127.0.0.1`,
/// `::1`). IPv4-mapped IPv6 addresses are matched as the IPv4 addresses they are.
///
/// # Examples
///
/// ```
/// let net: taskserve::Cidr = "192.168.0.0/16".parse()?;
/// assert!(net.contains("192.168.4.2".parse()?));
/// assert!(!net.contains("10.0.0.1".parse()?));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of `addr`'s first `prefix` bits (at most 32 for IPv4, 128 for IPv6: more is
    /// taken as the whole address). For an IPv4-mapped address the prefix counts its IPv6 bits:
    /// `::ffff:10.0.0.0/104` is `10.0.0.0/8`. One shorter than 96 reaches beyond the mapped
    /// addresses and stays an IPv6 network, which matches no IPv4 client: never more trust
    /// than was written.
    pub fn new(addr: IpAddr, prefix: u8) -> Cidr {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (addr, prefix),
            },
            v4 => (v4, prefix),
        };
        let prefix = prefix.min(bits(addr));
        Cidr {
            addr: mask(addr, prefix),
            prefix,
        }
    }

    /// Whether `addr` is in this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = canonical_ip(addr);
        addr.is_ipv4() == self.addr.is_ipv4() && mask(addr, self.prefix) == self.addr
    }
}

fn bits(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// `addr` with all but its first `prefix` bits zeroed.
pub(crate) fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let keep = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & keep).into())
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & keep).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (10.0.0.0/8, ::1)"))?;
        let prefix = match prefix {
            None => bits(addr),
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= bits(addr) => p,
                _ => {
                    return Err(format!(
                        "{s:?}: the prefix length must be 0 to {}",
                        bits(addr)
                    ))
                }
            },
        };
        Ok(Cidr::new(addr, prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv4_mapped_addresses_are_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:46856".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "127.0.0.1:46856");
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn cidr_parses_networks_and_single_addresses() {
        let net: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains(Ipv6Addr::LOCALHOST.into()));
        assert!(!one.contains(Ipv4Addr::LOCALHOST.into()));
        let mapped: Cidr = "::ffff:192.168.0.0/112".parse().unwrap();
        assert_eq!(mapped.to_string(), "192.168.0.0/16");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn a_mapped_network_is_never_wider_than_written() {
        // Shorter than the mapped range: an IPv6 network, which trusts no IPv4 client.
        let wide: Cidr = "::ffff:10.0.0.0/90".parse().unwrap();
        assert!(!wide.contains("8.8.8.8".parse().unwrap()));
        // `new` and parsing agree on a mapped address's prefix.
        let mapped: Ipv6Addr = "::ffff:10.0.0.0".parse().unwrap();
        let parsed: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(Cidr::new(mapped.into(), 104), parsed);
        assert_eq!(parsed.to_string(), "10.0.0.0/8");
    }
}
