//! TLS: the configuration a TLS listener serves with (certificate and key files, reloadable;
//! session resumption, in `tls_resumption`), the handshake and the close, stages of a
//! connection's task around its handler, each with its own deadline.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_rustls::pki_types::pem::PemObject;
use futures_rustls::pki_types::{CertificateDer, PrivateKeyDer};
use futures_rustls::rustls::server::WebPkiClientVerifier;
use futures_rustls::rustls::{self, RootCertStore, ServerConfig};
use futures_rustls::TlsAcceptor;
use log::debug;
use smol::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::tls_errors::{invalid_data, mismatch_error, pem_error, Wanted};
use super::tls_records::RecordTracker;
use super::tls_resumption::Resumption;
use crate::deadline::within;
use crate::info::{ConnectionInfo, TlsInfo, Transport};
use crate::logging::Peer;

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

#[derive(Debug, Clone)]
pub(super) struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    alpn: Vec<Vec<u8>>,
    /// Sessions kept in memory for clients to resume; 0 keeps none.
    pub(super) session_cache: usize,
    pub(super) tickets: bool,
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
            tickets: true,
        })
    }

    /// Serves with a rustls configuration built by the caller (session caches, key logging,
    /// a certificate resolver of its own...). [`TlsConfig::reload`] has nothing to read for it.
    pub fn from_server_config(config: Arc<ServerConfig>) -> Self {
        TlsConfig(Arc::new(Reloadable {
            files: None,
            current: RwLock::new(config),
            resumption: Mutex::new(None),
        }))
    }

    /// Asks every client for a certificate signed by a CA in `ca` (PEM) and refuses, in the
    /// handshake, those without one. The handler sees the certificate's subject in
    /// [`TlsInfo::client_subject`].
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
    /// `b"http/1.1"`...); the one negotiated is in [`TlsInfo::alpn_protocol`].
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
    /// other CAs must not skip the new check, so then every session is dropped. Nothing to do
    /// for a configuration given as a [`ServerConfig`][ServerConfig].
    ///
    /// [ServerConfig]: https://docs.rs/rustls/0.23/rustls/server/struct.ServerConfig.html
    ///
    /// # Errors
    ///
    /// As [`TlsConfig::from_pem_files`]; the configuration in use then stays as it was.
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
            .unwrap_or_else(PoisonError::into_inner) = config;
        *resumption = Some(renewed);
        Ok(())
    }

    pub(super) fn from_files(files: Files) -> io::Result<Self> {
        let (config, resumption) = load(&files, None)?;
        Ok(TlsConfig(Arc::new(Reloadable {
            files: Some(files),
            current: RwLock::new(config),
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

    fn current(&self) -> Arc<ServerConfig> {
        let current = self
            .0
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&current)
    }
}

/// Reads `files` into a configuration that resumes the sessions of `previous` if it may (see
/// [`Resumption::renewed`]), and returns the sessions it resumes.
fn load(
    files: &Files,
    previous: Option<Resumption>,
) -> io::Result<(Arc<ServerConfig>, Resumption)> {
    let certs = read_certs(&files.cert, Wanted::Certificates)?;
    let key = read_pem_file(&files.key)
        .and_then(|pem| PrivateKeyDer::from_pem_slice(&pem))
        .map_err(|e| pem_error(&files.key, Wanted::PrivateKey, e))?;
    let client_roots = match &files.client_ca {
        Some(ca) => read_certs(ca, Wanted::CaCertificates)?,
        None => Vec::new(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(format!("cannot set up TLS: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in client_roots.iter().cloned() {
                roots.add(cert).map_err(|e| {
                    invalid_data(format!(
                        "{}: not a usable CA certificate: {e}",
                        ca.display()
                    ))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid_data(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| mismatch_error(&files.cert, &files.key, e))?;
    config.alpn_protocols = files.alpn.clone();
    let resumption =
        Resumption::renewed(previous, files.session_cache, files.tickets, client_roots)?;
    resumption.apply(&mut config);
    Ok((Arc::new(config), resumption))
}

fn read_certs(path: &Path, wanted: Wanted) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = read_pem_file(path)
        .and_then(|pem| CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, wanted, e))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            wanted,
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(certs)
}

/// The most a PEM file may hold: a certificate chain or a key takes a few KiB.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// The bytes of the PEM file at `path`. Refuses what is not a regular file, before opening it:
/// opening a FIFO waits for a writer, and a device may never end. Refuses a file over
/// [`MAX_PEM_FILE`], reading no more than that much.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, rustls::pki_types::pem::Error> {
    use rustls::pki_types::pem::Error;
    use std::io::Read;
    let refused = |why: &str| Error::Io(io::Error::new(io::ErrorKind::InvalidInput, why));
    if !std::fs::metadata(path).map_err(Error::Io)?.is_file() {
        return Err(refused("not a regular file"));
    }
    // A FIFO put in its place since the check would still make this wait: the reload's own
    // deadline bounds that.
    let file = std::fs::File::open(path).map_err(Error::Io)?;
    let mut pem = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut pem)
        .map_err(Error::Io)?;
    if pem.len() as u64 > MAX_PEM_FILE {
        return Err(refused(
            "larger than 1 MiB, which no certificate chain or key is",
        ));
    }
    Ok(pem)
}

/// The TLS handshake of one connection, within `timeout`: the stream then becomes the
/// decrypted session, `info` learns what was settled, and [`Closing`] ends the session once the
/// handler is done with it. `None`, with the reason logged at debug, when the client fails it,
/// sends something else, or takes too long.
pub(crate) async fn handshake(
    tcp: async_net::TcpStream,
    info: &mut ConnectionInfo,
    tls: &TlsConfig,
    timeout: Duration,
    peer: &Peer,
) -> Option<(TlsSession, Closing)> {
    let accepting = TlsAcceptor::from(tls.current()).accept(RecordTracker::new(tcp));
    let stream = match within(timeout, "no handshake", accepting).await {
        Ok(stream) => stream,
        Err(e) => {
            debug!("{peer}: TLS handshake failed: {e}");
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    info.transport = Transport::Tls;
    info.tls = Some(TlsInfo {
        server_name: session.server_name().map(str::to_string),
        alpn_protocol: session.alpn_protocol().map(<[u8]>::to_vec),
        client_subject: session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| subject(cert)),
    });
    let closing = Closing::default();
    let session = TlsSession {
        stream: Some(Box::new(stream)),
        closing: closing.clone(),
    };
    Some((session, closing))
}

/// A server-side TLS stream over TCP, whose record framing is followed (see [`RecordTracker`]).
type ServerStream = futures_rustls::server::TlsStream<RecordTracker<async_net::TcpStream>>;

/// A TLS session as its handler holds it. Dropped, it hands its stream back to the connection's
/// task ([`Closing::close`]), because ending a session takes more than a drop can do: what the
/// handler wrote last may still be in rustls's buffer, waiting for room in the socket, and the
/// client is owed a close_notify. (A TCP socket needs none of this: after a close, the kernel
/// sends what it still holds.)
pub(crate) struct TlsSession {
    /// `Some` until dropped.
    stream: Option<Box<ServerStream>>,
    closing: Closing,
}

impl TlsSession {
    fn stream(&mut self) -> Pin<&mut ServerStream> {
        Pin::new(
            self.stream
                .as_mut()
                .expect("a TlsSession has its stream until dropped"),
        )
    }

    /// A read's result as the handler sees it: a client that closed its socket without
    /// close_notify, at the end of a record, has closed (`Ok(0)`), as Go's crypto/tls takes
    /// it; in the middle of a record, what it sent was cut short, and that stays an error.
    fn eof_without_close_notify(
        &mut self,
        read: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let Poll::Ready(Err(e)) = &read else {
            return read;
        };
        let Some(stream) = self.stream.as_mut() else {
            return read;
        };
        let (records, _) = stream.get_mut();
        if e.kind() != io::ErrorKind::UnexpectedEof || !records.saw_eof() {
            return read;
        }
        if records.ended_between_records() {
            records.missing_close_notify = true;
            return Poll::Ready(Ok(0));
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed in the middle of a TLS record, without close_notify: what it sent was cut short",
        )))
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            *self
                .closing
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(stream);
        }
    }
}

impl AsyncRead for TlsSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let read = this.stream().poll_read(cx, buf);
        this.eof_without_close_notify(read)
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let read = this.stream().poll_read_vectored(cx, bufs);
        this.eof_without_close_notify(read)
    }
}

impl AsyncWrite for TlsSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream().poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_close(cx)
    }
}

/// Where a [`TlsSession`] leaves its stream when dropped, for the connection's task to end the
/// session after the handler.
#[derive(Clone, Default)]
pub(crate) struct Closing(Arc<Mutex<Option<Box<ServerStream>>>>);

impl Closing {
    /// Sends what rustls still buffers, then close_notify, and shuts the socket's sending side,
    /// within `timeout`: a client that reads nothing is not waited for longer. Nothing to do if
    /// the handler did not drop its session (it handed it to another task) or closed it already.
    pub(crate) async fn close(self, timeout: Duration, peer: &Peer) {
        let stream = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut stream) = stream else {
            return;
        };
        if stream.get_ref().0.missing_close_notify {
            debug!("{peer}: closed its socket without TLS close_notify, at a record's end: taken as its close");
        }
        // An error means the client left first or did not read: nothing more to do for it.
        if let Err(e) = within(timeout, "not closed", stream.close()).await {
            debug!("{peer}: TLS close: {e}");
        }
    }
}

/// A certificate's subject as people write it: `CN=alice, O=Example`.
fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(cert.subject().to_string())
}
