//! The files a TLS configuration is made of: which ones, how each is read, and how they make
//! a rustls `ServerConfig` (`load`), at start and again on each reload. The certificate, its
//! key and the client CAs are PEM; shared ticket keys are 80 random bytes each.

use std::fs::Metadata;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{self, RootCertStore, ServerConfig};

use super::tls_errors::{invalid_data, mismatch_error, pem_error, Wanted};
use super::tls_resumption::{Resumption, Tickets};
use super::tls_tickets::{TicketKey, TICKET_KEY_LEN};

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
    /// Whether tickets are given, and sealed with which key files.
    pub(super) tickets: Tickets<PathBuf>,
}

/// Reads `files` into a configuration that resumes the sessions of `previous` if it may (see
/// [`Resumption::renewed`]), and returns the sessions it resumes.
pub(super) fn load(
    files: &Files,
    previous: Option<Resumption>,
) -> io::Result<(Arc<ServerConfig>, Resumption)> {
    load_with(files, previous, read_pem_file)
}

/// As [`load`], the PEM files' bytes read by `read`: the files' own ([`read_pem_file`]), or in
/// the fuzz targets bytes in memory, which take the same path from there on (ticket key files
/// are read from disk: the fuzz targets have none). Each file is read once the one before it
/// has loaded, so that the first mistake is the one reported.
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
    let tickets = match &files.tickets {
        Tickets::Off => Tickets::Off,
        Tickets::ProcessKey => Tickets::ProcessKey,
        Tickets::Shared { keys, lifetime } => Tickets::Shared {
            keys: read_ticket_keys(keys)?,
            lifetime: *lifetime,
        },
    };
    let resumption = Resumption::renewed(previous, files.session_cache, tickets, client_roots)?;
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
        tickets: Tickets::Off,
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

/// The bytes of the PEM file at `path`, refused if it is over [`MAX_PEM_FILE`] (reading no more
/// than that much) or not a regular file.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, rustls::pki_types::pem::Error> {
    use rustls::pki_types::pem::Error;
    let (pem, _) = read_regular_file(path, MAX_PEM_FILE).map_err(Error::Io)?;
    if pem.len() as u64 > MAX_PEM_FILE {
        return Err(Error::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "larger than 1 MiB, which no certificate chain or key is",
        )));
    }
    Ok(pem)
}

/// The keys in the files at `paths`, in that order: the first seals tickets.
fn read_ticket_keys(paths: &[PathBuf]) -> io::Result<Vec<TicketKey>> {
    let mut keys: Vec<TicketKey> = Vec::with_capacity(paths.len());
    for path in paths {
        let key = TicketKey::new(&read_ticket_key(path)?);
        // Tickets name the key that opens them: two keys of one name, one could not open its own.
        if let Some(same) = keys.iter().position(|listed| listed.name() == key.name()) {
            return Err(invalid_data(format!(
                "{} has the key name of {} (their first 16 bytes are the same): list each TLS \
                 ticket key once, each made by openssl rand 80",
                path.display(),
                paths[same].display()
            )));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// The 80 bytes of the ticket key file at `path`. Warns if its group or others may read it (a
/// file that does not load is an error alone).
fn read_ticket_key(path: &Path) -> io::Result<[u8; TICKET_KEY_LEN]> {
    let name = path.display();
    let (bytes, metadata) = read_regular_file(path, TICKET_KEY_LEN as u64)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read TLS ticket key {name}: {e}")))?;
    let wrong = match bytes.len() {
        // 80 random bytes are all printable with a chance of 1 in 10^33: this was typed, or
        // written by openssl rand -hex or -base64, and is far weaker than it looks.
        _ if looks_like_text(&bytes) => "text".to_string(),
        TICKET_KEY_LEN => {
            warn_if_open_to_others(path, &metadata);
            return Ok(bytes.try_into().expect("80 bytes"));
        }
        n if n > TICKET_KEY_LEN => "longer".to_string(),
        n => format!("{n} bytes"),
    };
    Err(invalid_data(format!(
        "{name}: a TLS ticket key is 80 random bytes, and this file is {wrong}: make one with \
         openssl rand 80 > {name}"
    )))
}

/// Whether `bytes` are all printable ASCII or white space, as a typed or encoded key is.
fn looks_like_text(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
}

#[cfg(unix)]
fn warn_if_open_to_others(path: &Path, metadata: &Metadata) {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        log::warn!(
            "{path} is open to its group or others (mode {mode:o}): whoever reads it can decrypt \
             the TLS 1.2 sessions whose tickets it sealed; chmod 600 {path}",
            path = path.display()
        );
    }
}

#[cfg(not(unix))]
fn warn_if_open_to_others(_: &Path, _: &Metadata) {}

/// At most the first `max` + 1 bytes of the file at `path` (more than `max`: the caller says
/// what is wrong), and its metadata. Refuses what is not a regular file, before opening it:
/// opening a FIFO waits for a writer, and a device may never end.
fn read_regular_file(path: &Path, max: u64) -> io::Result<(Vec<u8>, Metadata)> {
    use std::io::Read;
    let metadata = std::fs::metadata(path)?;
    if !metadata.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // A FIFO put in its place since the check would still make this wait: the reload's own
    // deadline bounds that.
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    Ok((bytes, metadata))
}
