//! TLS session resumption, the configuration side: what a `TlsConfig` keeps for clients to
//! resume (its cache and ticket key), and when a reload may hand that on.

use std::io;
use std::sync::Arc;

use futures_rustls::pki_types::CertificateDer;
use futures_rustls::rustls::server::{
    NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, StoresServerSessions,
};
use futures_rustls::rustls::{self, ServerConfig};

/// What lets a returning client skip the full handshake: the sessions kept in memory, and the
/// key that seals tickets. A reload keeps them, so that clients resume across a new certificate.
#[derive(Clone)]
pub(crate) struct Resumption {
    cache: Arc<dyn StoresServerSessions>,
    /// `None` with tickets off: rustls's own default, which issues none, stays in place.
    ticketer: Option<Arc<dyn ProducesTickets>>,
    /// The client CAs its sessions' certificates were checked against: a session made under
    /// other CAs must not resume, so a reload that reads others starts anew.
    client_roots: Vec<CertificateDer<'static>>,
}

impl Resumption {
    /// A new cache of `session_cache` sessions (none for 0), and a ticket key if `tickets`.
    fn new(
        session_cache: usize,
        tickets: bool,
        client_roots: Vec<CertificateDer<'static>>,
    ) -> io::Result<Self> {
        let cache: Arc<dyn StoresServerSessions> = match session_cache {
            0 => Arc::new(NoServerSessionStorage {}),
            sessions => ServerSessionMemoryCache::new(sessions),
        };
        // rustls's ticketer: a random key, replaced every 6 hours; a ticket opens for 12.
        let ticketer = match tickets {
            true => Some(
                rustls::crypto::ring::Ticketer::new()
                    .map_err(|e| io::Error::other(format!("cannot make a ticket key: {e}")))?,
            ),
            false => None,
        };
        Ok(Resumption {
            cache,
            ticketer,
            client_roots,
        })
    }

    /// `previous`, for a configuration whose client CAs are `client_roots`, or a new one with
    /// `session_cache` sessions and tickets if `tickets`.
    pub(crate) fn renewed(
        previous: Option<Self>,
        session_cache: usize,
        tickets: bool,
        client_roots: Vec<CertificateDer<'static>>,
    ) -> io::Result<Self> {
        match previous {
            Some(previous) if previous.client_roots == client_roots => Ok(previous),
            _ => Self::new(session_cache, tickets, client_roots),
        }
    }

    /// Makes `config` resume these sessions.
    pub(crate) fn apply(&self, config: &mut ServerConfig) {
        config.session_storage = Arc::clone(&self.cache);
        if let Some(ticketer) = &self.ticketer {
            config.ticketer = Arc::clone(ticketer);
        }
    }
}
