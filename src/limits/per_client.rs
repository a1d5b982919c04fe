//! The per-client connection limit (`Builder::max_connections_per_ip`), as nginx's `limit_conn`
//! keyed by the client's address: a count of open connections per client, taken when a
//! connection is admitted and given back when its task ends. The map holds only clients with a
//! connection open: an entry goes when its count reaches zero.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use log::warn;

use crate::addr::{canonical_ip, mask};
use crate::info::ConnectionInfo;
use crate::logging::{unlogged, Peer, RateLimit};

/// The open connections of each client address, and the limit on them.
#[derive(Debug)]
pub(crate) struct PerClient {
    max: usize,
    /// Leading bits of an IPv6 address that make one client.
    ipv6_prefix: u8,
    open: Mutex<HashMap<IpAddr, usize>>,
    /// Refusals are logged at most once a second, by whichever task or accept loop refuses.
    refusals: Mutex<RateLimit>,
}

/// A connection's place in its client's count, given back when dropped.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    limit: Arc<PerClient>,
    client: IpAddr,
}

/// A connection past its client's limit: to be closed at once.
#[derive(Debug)]
pub(crate) struct Refused;

impl PerClient {
    pub(crate) fn new(max: usize, ipv6_prefix: u8) -> Self {
        PerClient {
            max,
            ipv6_prefix,
            open: Mutex::default(),
            refusals: Mutex::default(),
        }
    }

    /// What counts as one client: an IPv4 address (IPv4-mapped IPv6 folded to it), or an
    /// IPv6 address's network.
    pub(crate) fn client(&self, addr: IpAddr) -> IpAddr {
        match canonical_ip(addr) {
            v4 @ IpAddr::V4(_) => v4,
            v6 => mask(v6, self.ipv6_prefix),
        }
    }

    fn try_open(self: &Arc<Self>, client: IpAddr) -> Result<ClientSlot, usize> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(client).or_insert(0);
        if *count >= self.max {
            return Err(*count);
        }
        *count += 1;
        Ok(ClientSlot {
            limit: Arc::clone(self),
            client,
        })
    }

    /// Clients with a connection open.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.open.lock().unwrap().len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .limit
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// Admits a connection under its client's limit: the one place where a connection is refused
/// for its client's count, and where that is logged (a warning, at most once a second).
///
/// `Ok(None)` when there is nothing to count: no limit set, or a Unix socket client. Called
/// once the client is known: at accept, or behind a proxy once its header named the client.
pub(crate) fn admit(
    limit: Option<&Arc<PerClient>>,
    info: &ConnectionInfo,
    peer: &Peer,
) -> Result<Option<ClientSlot>, Refused> {
    let (Some(limit), Some(addr)) = (limit, info.peer_addr.as_inet()) else {
        return Ok(None);
    };
    // Behind a proxy, the socket's address is the proxy's: counting it would limit the proxy.
    debug_assert!(
        peer.is_known(),
        "admitted before the PROXY header named the client"
    );
    let client = limit.client(addr.ip());
    match limit.try_open(client) {
        Ok(slot) => Ok(Some(slot)),
        Err(open) => {
            let allowed = limit
                .refusals
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .allow();
            if let Some(held_back) = allowed {
                let client = if addr.is_ipv6() && client != addr.ip() {
                    format!("{client}/{}", limit.ipv6_prefix)
                } else {
                    client.to_string()
                };
                warn!(
                    "refused {peer}: at the per-client limit ({open} open from {client}){}",
                    unlogged(held_back)
                );
            }
            Err(Refused)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_counts_as_ipv4_and_ipv6_by_its_network() {
        let limit = PerClient::new(1, 64);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(limit.client(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit.client(ip("2001:db8::1:2:3:4")), ip("2001:db8::"));
        assert_eq!(
            PerClient::new(1, 128).client(ip("2001:db8::1")),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn counts_up_to_the_limit_and_forgets_clients_with_nothing_open() {
        let limit = Arc::new(PerClient::new(2, 64));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let first = limit.try_open(a).unwrap();
        let second = limit.try_open(a).unwrap();
        assert_eq!(limit.try_open(a).unwrap_err(), 2);
        let other = limit.try_open("192.0.2.2".parse().unwrap()).unwrap();
        assert_eq!(limit.clients(), 2);
        drop(first);
        let third = limit.try_open(a).unwrap();
        drop((second, third, other));
        assert_eq!(limit.clients(), 0);
    }
}
