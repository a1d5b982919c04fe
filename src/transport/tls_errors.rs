//! What a user is told about certificate and key files that do not load: one line that names
//! the file, what is wrong with it or what it holds instead, and what to do. The library says
//! it in its own terms, so that `echo` can pass it through, and a reload says what start-up does.

use std::io;
use std::path::Path;

use rustls::pki_types::pem::PemObject;

/// What a PEM file was given for, which its error message names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wanted {
    /// The server's certificate chain.
    Certificates,
    /// The private key of the server's certificate.
    PrivateKey,
    /// The CA certificates that sign clients' certificates.
    CaCertificates,
}

impl Wanted {
    fn what(self) -> &'static str {
        match self {
            Wanted::Certificates => "the certificate chain",
            Wanted::PrivateKey => "the private key",
            Wanted::CaCertificates => "the client CA certificates",
        }
    }
}

/// One line that names the file, what is wrong with it and what to do:
/// `cannot read cert.pem: No such file or directory`, `cert.pem: a PEM section has no end line
/// (-----END CERTIFICATE-----): is the file cut short?`, `key.pem holds a certificate and no
/// private key: are the certificate and key swapped?`.
pub(crate) fn pem_error(
    path: &Path,
    pem: &[u8],
    wanted: Wanted,
    e: rustls::pki_types::pem::Error,
) -> io::Error {
    use rustls::pki_types::pem::Error;
    let name = path.display();
    let message = match e {
        Error::Io(e) => return io::Error::new(e.kind(), format!("cannot read {name}: {e}")),
        Error::NoItemsFound => not_found_message(path, pem, wanted),
        Error::MissingSectionEnd { end_marker } => format!(
            "{name}: a PEM section has no end line (-----END {}-----): is the file cut short?",
            String::from_utf8_lossy(&end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "{name}: not a valid PEM file: a malformed -----BEGIN line ({:?})",
            String::from_utf8_lossy(&line)
        ),
        Error::Base64Decode(e) => {
            format!("{name}: not a valid PEM file: a section that is not base64 ({e})")
        }
        other => format!("{name}: not a valid PEM file: {other}"),
    };
    invalid_data(message)
}

/// Why a file, whose bytes are `pem`, held nothing of what was `wanted`, from what it holds
/// instead.
fn not_found_message(path: &Path, pem: &[u8], wanted: Wanted) -> String {
    use rustls::pki_types::pem::SectionKind::{self, *};
    let name = path.display();
    let kinds: Vec<SectionKind> = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .filter_map(|s| s.ok().map(|(kind, _)| kind))
        .collect();
    let has_key = kinds
        .iter()
        .any(|k| matches!(k, PrivateKey | RsaPrivateKey | EcPrivateKey));
    let has_cert = kinds.contains(&Certificate);
    let noun = match wanted {
        Wanted::PrivateKey => "private key",
        _ => "certificate",
    };
    let swapped = match wanted {
        Wanted::Certificates => has_key.then_some("a private key"),
        Wanted::PrivateKey => has_cert.then_some("a certificate"),
        Wanted::CaCertificates => None,
    };
    match swapped {
        Some(found) => {
            format!("{name} holds {found} and no {noun}: are the certificate and key swapped?")
        }
        None if kinds.is_empty() => format!(
            "{name}: no {noun} in it, nor anything PEM (no -----BEGIN line): give {} in PEM",
            wanted.what()
        ),
        None => format!(
            "{name}: no {noun} in it, only PEM sections of other kinds ({kinds:?}): give {} in PEM",
            wanted.what()
        ),
    }
}

/// The certificate and key are PEM, but rustls cannot serve them as a pair: say which file to
/// change. rustls checks the pair by reading the key and the certificate's public key, so a
/// certificate it cannot read (an X.509 v1 one, bytes that are not DER) or a key of no type it
/// knows ends here as well as a key of another certificate.
pub(crate) fn mismatch_error(cert: &Path, key: &Path, e: rustls::Error) -> io::Error {
    let (cert, key) = (cert.display(), key.display());
    invalid_data(match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
            "{cert} and {key} do not go together: {key} is not the private key of that \
             certificate; give the key the certificate was made with"
        ),
        rustls::Error::InvalidCertificate(e) => format!(
            "{cert}: its first certificate cannot be served ({e:?}): give an X.509 v3 \
             certificate in PEM"
        ),
        // The one general error of loading a pair: the key, of no type rustls knows.
        rustls::Error::General(e) => {
            format!("{key}: not a private key rustls can use ({e}): give a PKCS#8, RSA or SEC1 key")
        }
        e => format!("{cert} and {key} do not go together: {e}"),
    })
}

pub(crate) fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
