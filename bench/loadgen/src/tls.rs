//! `--tls`: the client side of TLS (rustls, ring provider) and the stream type every
//! mode reads and writes, plain TCP or TLS over it.
//!
//! Every connection does a full handshake unless `--resume`: session resumption is off, so
//! that churn measures what a new client costs a server, and a ping-pong or flood connection
//! costs what it would the first time. With `--resume` (churn), each client loop keeps the
//! session of its last connection and offers it on its next one, as a returning client does,
//! and the report counts the handshakes the server resumed.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::crypto::WebPkiSupportedAlgorithms;
use tokio_rustls::rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, RootCertStore,
    SignatureScheme, SupportedProtocolVersion,
};
use tokio_rustls::TlsConnector;

/// How the client checks the server's certificate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Against the CA certificates of `--tls-ca` (a self-signed certificate is its own CA).
    Ca,
    /// `--tls-insecure`: any certificate, but the handshake's signature is still checked
    /// with it, so the client does the same public-key work either way but the chain check.
    Nothing,
}

/// A TLS client configuration, shared by every connection of a run (with `--resume`, by
/// every connection of a client loop: see [`Tls::for_one_loop`]).
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    connector: TlsConnector,
    name: ServerName<'static>,
    verify: Verify,
    /// `--resume`: each client loop offers its last session.
    resume: bool,
    /// What the first handshake settled, for the report.
    settled: Arc<OnceLock<Value>>,
    /// Handshakes done: full, then resumed.
    kinds: Arc<[AtomicU64; 2]>,
}

/// What `Tls::new` is asked for, beside the certificate check.
pub struct Options<'a> {
    /// The server name sent (SNI) and, with a CA, checked in the certificate.
    pub name: &'a str,
    /// `--tls-version`: only this version; `None` for rustls's defaults (1.3, then 1.2).
    pub version: Option<&'static SupportedProtocolVersion>,
    pub resume: bool,
}

impl Tls {
    /// `ca`: PEM file of trusted certificates, or `None` for no verification.
    pub fn new(ca: Option<&Path>, options: Options<'_>) -> Result<Tls, String> {
        let provider = Arc::new(ring::default_provider());
        let versions = match options.version {
            Some(version) => vec![version],
            None => tokio_rustls::rustls::DEFAULT_VERSIONS.to_vec(),
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let mut config = match ca {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("--tls-ca {}: no certificate in it", path.display()));
                }
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                    provider.signature_verification_algorithms,
                )))
                .with_no_client_auth(),
        };
        config.resumption = Resumption::disabled();
        let name = options.name;
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("bad value for --tls-name: {name:?}: {e}"))?;
        let config = Arc::new(config);
        Ok(Tls {
            connector: TlsConnector::from(Arc::clone(&config)),
            config,
            name,
            verify: if ca.is_some() {
                Verify::Ca
            } else {
                Verify::Nothing
            },
            resume: options.resume,
            settled: Arc::default(),
            kinds: Arc::default(),
        })
    }

    /// The configuration for one client loop: with `--resume`, one with a session store of its
    /// own, so that each connection offers the session of the loop's previous one (TLS 1.3: a
    /// ticket it sent; TLS 1.2: a ticket, or the session ID).
    pub fn for_one_loop(&self) -> Tls {
        if !self.resume {
            return self.clone();
        }
        let mut config = ClientConfig::clone(&self.config);
        config.resumption = Resumption::in_memory_sessions(4);
        Tls {
            connector: TlsConnector::from(Arc::new(config)),
            ..self.clone()
        }
    }

    /// The client side of a handshake over `tcp`.
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<Stream> {
        let s = self.connector.connect(self.name.clone(), tcp).await?;
        let resumed = s.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
        self.kinds[usize::from(resumed)].fetch_add(1, Ordering::Relaxed);
        self.settled.get_or_init(|| {
            let c = s.get_ref().1;
            let name = |v: Option<String>| v.unwrap_or_else(|| "?".into());
            json!({
                "version": name(c.protocol_version().map(|v| format!("{v:?}"))),
                "suite": name(c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()))),
                "kx": name(c.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()))),
            })
        });
        Ok(Stream::Tls(Box::new(s)))
    }

    /// The first bytes a client sends in a handshake (its ClientHello), for clients that
    /// stop or reset in the middle of one.
    pub fn client_hello(&self) -> Vec<u8> {
        let config = self.connector.config().clone();
        let mut conn = ClientConnection::new(config, self.name.clone()).expect("a client session");
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello).expect("writing to a Vec");
        }
        hello
    }

    /// For the report: how the server was checked and what the first handshake settled.
    pub fn json(&self) -> Value {
        let mut v = self.settled.get().cloned().unwrap_or_else(|| json!({}));
        v["verify"] = json!(match self.verify {
            Verify::Ca => "ca",
            Verify::Nothing => "none",
        });
        v["resumption"] = json!(self.resume);
        // Over the whole run, warm-up included.
        v["handshakes"] = json!({
            "full": self.kinds[0].load(Ordering::Relaxed),
            "resumed": self.kinds[1].load(Ordering::Relaxed),
        });
        v
    }
}

/// A connection as every mode uses it: plain TCP, TLS over TCP, or (soak) a Unix
/// socket. Write, then flush: rustls may keep what the socket did not take until the
/// next write.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// TLS: close_notify, then the socket's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// `--tls-insecure`: takes any certificate for any name, and checks the handshake's
/// signature with the key in it as usual.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
