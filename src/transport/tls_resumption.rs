//! TLS session resumption, the configuration side: what a `TlsConfig` keeps for clients to
//! resume (its cache and ticket keys), and when a reload may hand that on.

use std::io;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::{
    NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::{self, ServerConfig};

use super::tls_tickets::{TicketKey, TicketKeys};

/// Whether tickets are given, and sealed with what. `K` is a shared key: where it comes from
/// (a file's path) in the settings, the key itself once read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tickets<K> {
    /// None: clients resume from the cache alone.
    Off,
    /// rustls's ticketer: a random key of this process's own, replaced every 6 hours; a ticket
    /// opens for 12.
    ProcessKey,
    /// Keys shared with other servers: the first seals, each opens, a ticket for `lifetime`
    /// seconds. Read again on every reload, so that a rotation takes effect.
    Shared { keys: Vec<K>, lifetime: u32 },
}

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
    /// What resumes the sessions of `previous` if it may, for a configuration whose client CAs
    /// are `client_roots`: its cache and its process key (shared keys are the ones just read,
    /// so that a rotation takes effect); else a new cache of `session_cache` sessions (none for
    /// 0), and new keys as `tickets` asks. Shared keys open no ticket sealed for other client
    /// CAs (see `tls_tickets`), so those sessions do not resume either.
    pub(crate) fn renewed(
        previous: Option<Self>,
        session_cache: usize,
        tickets: Tickets<TicketKey>,
        client_roots: Vec<CertificateDer<'static>>,
    ) -> io::Result<Self> {
        let kept = previous.filter(|previous| previous.client_roots == client_roots);
        let cache: Arc<dyn StoresServerSessions> = match (&kept, session_cache) {
            (Some(kept), _) => Arc::clone(&kept.cache),
            (None, 0) => Arc::new(NoServerSessionStorage {}),
            (None, sessions) => ServerSessionMemoryCache::new(sessions),
        };
        let ticketer: Option<Arc<dyn ProducesTickets>> = match tickets {
            Tickets::Off => None,
            Tickets::ProcessKey => match kept.and_then(|kept| kept.ticketer) {
                Some(ticketer) => Some(ticketer),
                None => Some(
                    rustls::crypto::ring::Ticketer::new()
                        .map_err(|e| io::Error::other(format!("cannot make a ticket key: {e}")))?,
                ),
            },
            Tickets::Shared { keys, lifetime } => {
                Some(Arc::new(TicketKeys::new(keys, lifetime, &client_roots)))
            }
        };
        Ok(Resumption {
            cache,
            ticketer,
            client_roots,
        })
    }

    /// Makes `config` resume these sessions.
    pub(crate) fn apply(&self, config: &mut ServerConfig) {
        config.session_storage = Arc::clone(&self.cache);
        if let Some(ticketer) = &self.ticketer {
            config.ticketer = Arc::clone(ticketer);
        }
    }
}
