//! The files a TLS configuration is made of: which ones, how each is read, and how they make
//! a rustls `ServerConfig` (`load`), at start and again on each reload.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{self, RootCertStore, ServerConfig};

use super::tls_errors::{invalid_data, mismatch_error, pem_error, Wanted};
use super::tls_resumption::Resumption;

/// Where a [`TlsConfig`](super::tls::TlsConfig) comes from, and how it resumes sessions: what
/// [`load`] reads, at start and on each reload.
#[derive(Debug, Clone)]
pub(super) struct Files {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) alpn: Vec<Vec<u8>>,
    /// Sessions kept in memory for clients to resume; 0 keeps none.
    pub(super) session_cache: usize,
    pub(super) tickets: bool,
}

/// Reads `files` into a configuration that resumes the sessions of `previous` if it may (see
/// [`Resumption::renewed`]), and returns the sessions it resumes.
pub(super) fn load(
    files: &Files,
    previous: Option<Resumption>,
) -> io::Result<(Arc<ServerConfig>, Resumption)> {
    load_with(files, previous, read_pem_file)
}

/// As [`load`], the files' bytes read by `read`: the files' own ([`read_pem_file`]), or in the
/// fuzz targets bytes in memory, which take the same path from there on. Each file is read once
/// the one before it has loaded, so that the first mistake is the one reported.
fn load_with(
    files: &Files,
    previous: Option<Resumption>,
    read: impl Fn(&Path) -> Result<Vec<u8>, rustls::pki_types::pem::Error>,
) -> io::Result<(Arc<ServerConfig>, Resumption)> {
    let certs = read_certs(&files.cert, Wanted::Certificates, &read)?;
    let pem = read(&files.key).map_err(|e| pem_error(&files.key, &[], Wanted::PrivateKey, e))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| pem_error(&files.key, &pem, Wanted::PrivateKey, e))?;
    let client_roots = match &files.client_ca {
        Some(ca) => read_certs(ca, Wanted::CaCertificates, &read)?,
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

fn read_certs(
    path: &Path,
    wanted: Wanted,
    read: impl Fn(&Path) -> Result<Vec<u8>, rustls::pki_types::pem::Error>,
) -> io::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path).map_err(|e| pem_error(path, &[], wanted, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &pem, wanted, e))?;
    if certs.is_empty() {
        return Err(pem_error(
            path,
            &pem,
            wanted,
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(certs)
}

/// Loads a configuration from PEM bytes in memory (a certificate chain, its key and optionally
/// client CA certificates) as [`TlsConfig::with_client_ca_file`] loads them from files: the
/// fuzz targets' way in.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn load_pem_bytes(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> io::Result<()> {
    let files = Files {
        cert: "cert.pem".into(),
        key: "key.pem".into(),
        client_ca: client_ca.map(|_| "ca.pem".into()),
        alpn: Vec::new(),
        // No session cache (rustls would set room for every session aside on each input), no
        // ticket key: nothing that depends on the bytes.
        session_cache: 0,
        tickets: false,
    };
    load_with(&files, None, |path| {
        Ok(match path.to_str() {
            Some("cert.pem") => cert,
            Some("key.pem") => key,
            _ => client_ca.unwrap_or_default(),
        }
        .to_vec())
    })
    .map(drop)
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
