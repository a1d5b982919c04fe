//! How the log names things and keeps its volume down: a client as the log names it ([`Peer`]),
//! at most one line a second for a repeated warning ([`RateLimit`]), counts with their nouns,
//! and a handler's panic.

use std::any::Any;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use log::error;

use crate::addr::Addr;
use crate::info::ConnectionInfo;

/// A client as the log names it: its address, or for a Unix socket who it is.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    Inet(SocketAddr),
    Described(Arc<str>),
    /// A client behind a proxy that sends a PROXY header: named by the proxy's address until
    /// the header names the client.
    Proxied(Arc<Proxied>),
}

/// The addresses of a connection on a PROXY listener.
#[derive(Debug)]
pub(crate) struct Proxied {
    proxy: SocketAddr,
    client: OnceLock<SocketAddr>,
}

impl Peer {
    pub(crate) fn of(info: &ConnectionInfo) -> Peer {
        match (&info.peer_addr, &info.peer_credentials) {
            (Addr::Inet(addr), _) => Peer::Inet(*addr),
            (_, Some(cred)) => {
                let pid = cred
                    .pid
                    .map(|pid| format!("pid {pid}, "))
                    .unwrap_or_default();
                Peer::Described(format!("{} ({pid}uid {})", info.local_addr, cred.uid).into())
            }
            (peer, None) => Peer::Described(format!("{peer} on {}", info.local_addr).into()),
        }
    }

    /// A connection on a PROXY listener, from the proxy at `proxy`.
    pub(crate) fn behind_proxy(proxy: SocketAddr) -> Peer {
        Peer::Proxied(Arc::new(Proxied {
            proxy,
            client: OnceLock::new(),
        }))
    }

    /// Names the client that a PROXY header gave; the log names it from now on.
    pub(crate) fn set_client(&self, client: SocketAddr) {
        if let Peer::Proxied(proxied) = self {
            let _ = proxied.client.set(client);
        }
    }

    /// Whether the client is known, and so was logged as `Connection from`: a connection on a
    /// PROXY listener is logged once its header named the client, and one that never sent a
    /// valid header gets neither that line nor `Connection closed` (a debug line says why).
    pub(crate) fn is_known(&self) -> bool {
        match self {
            Peer::Proxied(proxied) => proxied.client.get().is_some(),
            _ => true,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Inet(addr) => addr.fmt(f),
            Peer::Described(text) => f.write_str(text),
            Peer::Proxied(proxied) => match proxied.client.get() {
                Some(client) => client.fmt(f),
                None => write!(f, "{} (proxy, before its PROXY header)", proxied.proxy),
            },
        }
    }
}

/// Lets a log line through at most once a second, counting the ones it held back.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Self::INTERVAL => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(self.take_held_back())
            }
        }
    }

    /// When lines were held back: the moment the next one could be logged, at which to report
    /// them if no new line comes by then.
    pub(crate) fn held_back_until(&self) -> Option<Instant> {
        let last = self.last?;
        (self.held_back > 0).then(|| last + Self::INTERVAL)
    }

    pub(crate) fn take_held_back(&mut self) -> u64 {
        std::mem::take(&mut self.held_back)
    }
}

/// ` (3 more not logged)` after a rate-limited line, or nothing when none were held back.
pub(crate) fn unlogged(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" ({held_back} more not logged)")
    }
}

/// `1 thread`, `2 threads`: a count and its noun.
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Logs a handler's panic: a bug in the library user's code, so an error an operator should see.
pub(crate) fn log_panic(peer: &Peer, payload: &(dyn Any + Send)) {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic payload that is not a string)"
    };
    error!("{peer}: handler panicked: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_one_line_a_second_through_and_counts_the_rest() {
        let mut limit = RateLimit::default();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.held_back_until(), None);
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        assert_eq!(
            limit.held_back_until(),
            Some(limit.last.unwrap() + RateLimit::INTERVAL)
        );
        limit.last = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(limit.allow(), Some(2));
        assert_eq!(limit.held_back_until(), None);
    }

    #[test]
    fn counts_read_with_their_nouns() {
        assert_eq!(count(1, "thread"), "1 thread");
        assert_eq!(count(2, "thread"), "2 threads");
    }
}
