//! TLS: the configuration a TLS listener serves with (certificate and key files, reloadable:
//! how they are read is in `tls_files`; session resumption, in `tls_resumption`). The sessions
//! it starts are in `tls_session`.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{self, ServerConfig};

use super::tls_files::{load, Files};
use super::tls_resumption::{Resumption, Tickets};

/// What a TLS listener serves with: a certificate chain and its key, read from PEM files (and
/// read again by [`TlsConfig::reload`]), or a rustls [`ServerConfig`][ServerConfig] of your
/// own. Cheap to clone; clones share one configuration, so a reload reaches every listener
/// using it.
///
/// # Examples
///
/// ```no_run
/// let tls = taskserve::TlsConfig::from_pem_files("cert.pem", "key.pem")?
///     .with_client_ca_file("clients-ca.pem")?; // optional: ask clients for certificates
/// let server = taskserve::Server::builder()
///     .listen_tls("127.0.0.1:25443", tls)
///     .start(taskserve::echo)?;
/// # std::io::Result::Ok(())
/// ```
///
/// [ServerConfig]: https://docs.rs/rustls/0.23/rustls/server/struct.ServerConfig.html
#[derive(Clone)]
pub struct TlsConfig(Arc<Reloadable>);

/// A configuration and where it comes from, shared by every clone of a [`TlsConfig`].
struct Reloadable {
    /// Where the configuration comes from, read again on reload; `None` for a given one.
    files: Option<Files>,
    current: RwLock<Arc<ServerConfig>>,
    /// The sessions `current` resumes, handed on to the configuration a reload makes (`None`
    /// for a given one). A mutex, so that two reloads at once cannot each start their own.
    resumption: Mutex<Option<Resumption>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.0.files)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads a certificate chain (the server's certificate first, then any intermediates) and
    /// its private key (PKCS#8, PKCS#1 RSA or SEC1 EC) from PEM files.
    ///
    /// # Errors
    ///
    /// With a message that names the file and the cause: a file missing or unreadable, not
    /// PEM, with no certificate (or no key) in it, or a key that does not match the
    /// certificate.
    pub fn from_pem_files(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> io::Result<Self> {
        Self::from_files(Files {
            cert: cert.as_ref().to_path_buf(),
            key: key.as_ref().to_path_buf(),
            client_ca: None,
            alpn: Vec::new(),
            session_cache: Self::DEFAULT_SESSION_CACHE,
            tickets: Tickets::ProcessKey,
        })
    }

    /// Serves with a rustls configuration built by the caller (session caches, key logging,
    /// a certificate resolver of its own...). [`TlsConfig::reload`] has nothing to read for it.
    pub fn from_server_config(config: Arc<ServerConfig>) -> Self {
        TlsConfig(Arc::new(Reloadable {
            files: None,
            current: RwLock::new(noting_server_names(config)),
            resumption: Mutex::new(None),
        }))
    }

    /// Asks every client for a certificate signed by a CA in `ca` (PEM) and refuses, in the
    /// handshake, those without one. The handler sees the certificate's subject in
    /// [`TlsInfo::client_subject`](crate::TlsInfo::client_subject).
    ///
    /// # Errors
    ///
    /// As [`TlsConfig::from_pem_files`], for `ca`; [`io::ErrorKind::InvalidInput`] for a
    /// configuration made by [`TlsConfig::from_server_config`].
    pub fn with_client_ca_file(self, ca: impl AsRef<Path>) -> io::Result<Self> {
        let mut files = self.files()?;
        files.client_ca = Some(ca.as_ref().to_path_buf());
        Self::from_files(files)
    }

    /// The application protocols offered with ALPN, most preferred first (`b"h2"`,
    /// `b"http/1.1"`...); the one negotiated is in [`TlsInfo::alpn_protocol`](crate::TlsInfo::alpn_protocol).
    ///
    /// # Errors
    ///
    /// As [`TlsConfig::with_client_ca_file`].
    pub fn with_alpn_protocols(self, protocols: &[&[u8]]) -> io::Result<Self> {
        let mut files = self.files()?;
        files.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        Self::from_files(files)
    }

    /// Reads the files again: handshakes that start afterwards use the new certificate and key,
    /// and open connections keep theirs. Clients still resume the sessions they had, unless the
    /// client CA certificates changed: a session whose client certificate was checked against
    /// other CAs must not skip the new check, so then every session is dropped. Ticket key
    /// files ([`TlsConfig::with_ticket_key_files`]) are read again too, so that a rotation takes
    /// effect. Nothing to do for a configuration given as a [`ServerConfig`][ServerConfig].
    ///
    /// [ServerConfig]: https://docs.rs/rustls/0.23/rustls/server/struct.ServerConfig.html
    ///
    /// # Errors
    ///
    /// As [`TlsConfig::from_pem_files`] and [`TlsConfig::with_ticket_key_files`]; the
    /// configuration in use then stays as it was.
    pub fn reload(&self) -> io::Result<()> {
        let Some(files) = &self.0.files else {
            return Ok(());
        };
        let mut resumption = self
            .0
            .resumption
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (config, renewed) = load(files, resumption.clone())?;
        *self
            .0
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = noting_server_names(config);
        *resumption = Some(renewed);
        Ok(())
    }

    pub(super) fn from_files(files: Files) -> io::Result<Self> {
        let (config, resumption) = load(&files, None)?;
        Ok(TlsConfig(Arc::new(Reloadable {
            files: Some(files),
            current: RwLock::new(noting_server_names(config)),
            resumption: Mutex::new(Some(resumption)),
        })))
    }

    pub(super) fn files(&self) -> io::Result<Files> {
        self.0.files.clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TlsConfig made from a ServerConfig is configured there",
            )
        })
    }

    pub(super) fn current(&self) -> Arc<ServerConfig> {
        let current = self
            .0
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&current)
    }
}

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
    /// replaced every 6 hours, and a ticket opens for 12; with [`TlsConfig::with_ticket_key_files`]
    /// the keys come from files instead, shared with other servers. TLS 1.3 resumes with a new
    /// key exchange, so a stolen key decrypts no traffic (its thief could pass for the server to
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
        files.tickets = match (tickets, files.tickets) {
            (false, _) => Tickets::Off,
            (true, Tickets::Off) => Tickets::ProcessKey,
            (true, kept) => kept,
        };
        Self::from_files(files)
    }

    /// How long a ticket sealed with key files opens after it was issued, unless told
    /// otherwise ([`TlsConfig::with_ticket_lifetime`]): 12 hours, as rustls's own key gives.
    pub const DEFAULT_TICKET_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

    /// The longest [`TlsConfig::with_ticket_lifetime`] takes: 7 days, the most TLS 1.3 allows.
    pub const MAX_TICKET_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

    /// Seals session tickets with keys read from files, which every server behind a load
    /// balancer is given too, so that a client resumes on whichever one it reaches, and after a
    /// restart (without them each process has a random key of its own). Each file holds 80
    /// random bytes, made by `openssl rand 80 > ticket.key` as for nginx's
    /// `ssl_session_ticket_key`. The first key seals new tickets and every one opens them: to
    /// rotate, put a new key first and the previous one second on every server, then
    /// [`TlsConfig::reload`] (SIGHUP), which reads the files again. A ticket opens for
    /// [`DEFAULT_TICKET_LIFETIME`](Self::DEFAULT_TICKET_LIFETIME) unless
    /// [`TlsConfig::with_ticket_lifetime`] says otherwise. Turns tickets on.
    ///
    /// A stolen key decrypts the recorded TLS 1.2 sessions of every ticket it sealed, as long as
    /// the key exists: rotate it, and keep the files readable by the server alone (a file its
    /// group or others may read loads with a warning) and out of backups. docs/operations.md
    /// ("Session resumption") has the recipe.
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
    /// # let (new, previous) = (dir.join("ticket.key"), dir.join("ticket.key.previous"));
    /// # std::fs::write(&new, [1; 80])?;
    /// # std::fs::write(&previous, [2; 80])?;
    /// // The same files on every server: the new key seals, both open.
    /// let tls = taskserve::TlsConfig::from_pem_files(&cert, &key)?
    ///     .with_ticket_key_files([&new, &previous])?;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for no file. A message that names the file: missing,
    /// unreadable or not a regular file, not 80 bytes (or text, as `openssl rand -hex` writes),
    /// or a key whose name (its first 16 bytes) another file listed has; otherwise as
    /// [`TlsConfig::with_client_ca_file`].
    pub fn with_ticket_key_files<P: AsRef<Path>>(
        self,
        keys: impl IntoIterator<Item = P>,
    ) -> io::Result<Self> {
        let keys: Vec<_> = keys.into_iter().map(|p| p.as_ref().to_path_buf()).collect();
        if keys.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no TLS ticket key file: give at least one, the first sealing tickets",
            ));
        }
        let mut files = self.files()?;
        let lifetime = match files.tickets {
            Tickets::Shared { lifetime, .. } => lifetime,
            _ => Self::DEFAULT_TICKET_LIFETIME.as_secs() as u32,
        };
        files.tickets = Tickets::Shared { keys, lifetime };
        Self::from_files(files)
    }

    /// How long a ticket sealed with key files ([`TlsConfig::with_ticket_key_files`]) opens
    /// after it was issued, in whole seconds (by default
    /// [`DEFAULT_TICKET_LIFETIME`](Self::DEFAULT_TICKET_LIFETIME)); clients are told it too.
    /// It bounds how long a ticket resumes, not what a stolen key decrypts: that is every ticket
    /// the key sealed, as long as the key exists. Keep a key listed for a lifetime after it
    /// stopped sealing, for its tickets to open; servers that share keys must agree on the time.
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
    /// # let (new, previous) = (dir.join("ticket.key"), dir.join("ticket.key.previous"));
    /// # std::fs::write(&new, [1; 80])?;
    /// # std::fs::write(&previous, [2; 80])?;
    /// use std::time::Duration;
    ///
    /// // Keys rotated every hour: tickets for an hour, so that two keys are always enough.
    /// let tls = taskserve::TlsConfig::from_pem_files(&cert, &key)?
    ///     .with_ticket_key_files([&new, &previous])?
    ///     .with_ticket_lifetime(Duration::from_secs(3600))?;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] without key files (rustls's own key gives 12 hours, which
    /// cannot be changed), and for under a second or over
    /// [`MAX_TICKET_LIFETIME`](Self::MAX_TICKET_LIFETIME); otherwise as
    /// [`TlsConfig::with_ticket_key_files`].
    pub fn with_ticket_lifetime(self, lifetime: Duration) -> io::Result<Self> {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
        if lifetime < Duration::from_secs(1) || lifetime > Self::MAX_TICKET_LIFETIME {
            return Err(invalid(format!(
                "a TLS ticket lifetime of {lifetime:?}: give 1 second to 7 days (604800 seconds)"
            )));
        }
        let mut files = self.files()?;
        let Tickets::Shared { keys, .. } = files.tickets else {
            return Err(invalid(
                "a TLS ticket lifetime is for tickets sealed with key files: give them first \
                 (with_ticket_key_files); rustls's own key gives 12 hours"
                    .to_string(),
            ));
        };
        let lifetime = lifetime.as_secs() as u32;
        files.tickets = Tickets::Shared { keys, lifetime };
        Self::from_files(files)
    }
}

/// `config` with a certificate resolver that notes the server name each client asks for, for
/// [`TlsInfo::server_name`].
fn noting_server_names(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.cert_resolver = Arc::new(NoteServerName(config.cert_resolver));
    Arc::new(config)
}

thread_local! {
    /// The server name a client asked for, noted by [`NoteServerName`] while rustls handles
    /// its hello: rustls's unbuffered connection has no accessor for it.
    static SERVER_NAME: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// The server name that the last client hello handled on this thread asked for (`Some(None)`:
/// none), once; `None` if no hello was handled since the last call. A session calls it right
/// after handing rustls the bytes that may hold its hello, on the same thread.
pub(super) fn noted_server_name() -> Option<Option<String>> {
    SERVER_NAME.with_borrow_mut(Option::take)
}

/// A certificate resolver that notes the server name asked for, then asks the one it wraps.
/// rustls asks it for every handshake, resumed ones included, on the thread running it.
#[derive(Debug)]
struct NoteServerName(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for NoteServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_string);
        SERVER_NAME.with_borrow_mut(|noted| *noted = Some(name));
        self.0.resolve(hello)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.0.only_raw_public_keys()
    }
}
