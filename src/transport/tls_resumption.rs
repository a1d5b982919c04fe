//! TLS session resumption, the configuration side: how a [`TlsConfig`] lets clients resume
//! (its cache and tickets), what it keeps for them, and when a reload may hand that on.

use std::io;
use std::sync::Arc;

use futures_rustls::pki_types::CertificateDer;
use futures_rustls::rustls::server::{
    NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, StoresServerSessions,
};
use futures_rustls::rustls::{self, ServerConfig};

use super::tls::TlsConfig;

impl TlsConfig {
    /// [`TlsConfig::with_session_cache`] unless told otherwise: as many sessions as the server
    /// holds connections by default ([`Builder::max_connections`][max]), a few MiB when full.
    ///
    /// [max]: crate::Builder::max_connections
    pub const DEFAULT_SESSION_CACHE: usize = 10_000;

    /// The most [`TlsConfig::with_session_cache`] takes: about 400 MiB of sessions when full,
    /// and rustls sets room for all of them aside at once.
    pub const MAX_SESSION_CACHE: usize = 1_000_000;

    /// Keeps up to `sessions` TLS sessions in this process's memory (by default
    /// [`DEFAULT_SESSION_CACHE`](Self::DEFAULT_SESSION_CACHE); 0 keeps none), so that a client
    /// that comes back resumes its session, an abbreviated handshake; the oldest goes when it
    /// is full. With tickets on ([`TlsConfig::with_session_tickets`]) only TLS 1.2 clients that
    /// take no tickets need it; with tickets off, TLS 1.3 clients too, two sessions for each
    /// full handshake. A reload keeps them ([`TlsConfig::reload`]); another process does not.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("taskserve-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    /// # let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    /// # std::fs::write(&cert, made.cert.pem())?;
    /// # std::fs::write(&key, made.signing_key.serialize_pem())?;
    /// // Many TLS 1.2 clients without tickets: keep more of their sessions.
    /// let tls = taskserve::TlsConfig::from_pem_files(&cert, &key)?.with_session_cache(100_000)?;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for more than [`MAX_SESSION_CACHE`](Self::MAX_SESSION_CACHE)
    /// sessions; otherwise as [`TlsConfig::with_client_ca_file`].
    pub fn with_session_cache(self, sessions: usize) -> io::Result<Self> {
        if sessions > Self::MAX_SESSION_CACHE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a TLS session cache of {sessions} sessions: the most is {} (about 400 MiB \
                     when full)",
                    Self::MAX_SESSION_CACHE
                ),
            ));
        }
        let mut files = self.files()?;
        files.session_cache = sessions;
        Self::from_files(files)
    }

    /// Whether the server gives clients session tickets (on by default): the session, sealed
    /// with a key only this process has, for the client to show when it comes back, so that
    /// resuming takes no memory and no client is forgotten for lack of room. The key is random,
    /// replaced every 6 hours, and a ticket opens for 12. TLS 1.3 resumes with a new key
    /// exchange, so a stolen key decrypts no traffic (its thief could pass for the server to
    /// resuming clients); a TLS 1.2 ticket holds the master secret and travels in the clear,
    /// so a stolen key decrypts the TLS 1.2 sessions of its 12 hours. Off, clients resume from
    /// the cache. docs/operations.md ("Session resumption") weighs the choices.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("taskserve-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    /// # let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    /// # std::fs::write(&cert, made.cert.pem())?;
    /// # std::fs::write(&key, made.signing_key.serialize_pem())?;
    /// // Resume from this process's memory only.
    /// let tls = taskserve::TlsConfig::from_pem_files(&cert, &key)?.with_session_tickets(false)?;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`TlsConfig::with_client_ca_file`].
    pub fn with_session_tickets(self, tickets: bool) -> io::Result<Self> {
        let mut files = self.files()?;
        files.tickets = tickets;
        Self::from_files(files)
    }
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
