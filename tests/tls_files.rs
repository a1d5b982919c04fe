//! What a user is told about certificate and key files that do not load: one line that names
//! the file, what is in it, and what to do, the same at start-up (`TlsConfig::from_pem_files`,
//! `echo --tls-cert`) and on a reload (`TlsConfig::reload`, SIGHUP).

mod common;

use std::path::Path;

use common::run_echo;
use common::tls::{write_pair, TlsFiles};

/// The message of the error `from_pem_files(cert, key)` returns.
fn load_error(cert: &Path, key: &Path) -> String {
    let e = taskserve::TlsConfig::from_pem_files(cert, key).expect_err("files that do not load");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    let message = e.to_string();
    assert_eq!(message.lines().count(), 1, "{message}");
    message
}

#[test]
fn a_truncated_certificate_says_the_file_is_cut_short_in_words() {
    let files = TlsFiles::new();
    let pem = &files.server.cert_pem;
    let cut = files.dir.join("cut.pem");
    std::fs::write(&cut, &pem[..pem.len() / 2]).unwrap();
    let message = load_error(&cut, &files.key);
    assert!(
        message.starts_with(&format!("{}: ", cut.display())),
        "{message}"
    );
    assert!(message.contains("-----END CERTIFICATE-----"), "{message}");
    assert!(message.contains("cut short"), "{message}");
    assert!(
        !message.contains("[67, 69"),
        "bytes instead of words: {message}"
    );
}

#[test]
fn a_key_of_another_certificate_is_named_as_not_its_key() {
    let files = TlsFiles::new();
    let other = files.ca.server_pair();
    let (_, other_key) = write_pair(&files.dir, "other", &other);
    let message = load_error(&files.cert, &other_key);
    assert_eq!(
        message,
        format!(
            "{cert} and {key} do not go together: {key} is not the private key of that \
             certificate; give the key the certificate was made with",
            cert = files.cert.display(),
            key = other_key.display()
        )
    );
}

#[test]
fn a_certificate_or_key_rustls_cannot_read_is_named_alone() {
    // PEM sections around bytes that are not DER: rustls refuses each one while checking the
    // pair, which was reported as a certificate and key that "do not go together".
    let files = TlsFiles::new();
    let not_der = |kind: &str| format!("-----BEGIN {kind}-----\nAAAA\n-----END {kind}-----\n");
    let cert = files.dir.join("not-der-cert.pem");
    std::fs::write(&cert, not_der("CERTIFICATE")).unwrap();
    let message = load_error(&cert, &files.key);
    let named = format!("{}: its first certificate cannot be served", cert.display());
    assert!(message.starts_with(&named), "{message}");
    let key = files.dir.join("not-der-key.pem");
    std::fs::write(&key, not_der("PRIVATE KEY")).unwrap();
    let message = load_error(&files.cert, &key);
    let named = format!("{}: not a private key rustls can use", key.display());
    assert!(message.starts_with(&named), "{message}");
}

#[test]
fn swapped_certificate_and_key_are_called_swapped() {
    let files = TlsFiles::new();
    let message = load_error(&files.key, &files.cert);
    assert_eq!(
        message,
        format!(
            "{} holds a private key and no certificate: are the certificate and key swapped?",
            files.key.display()
        )
    );
    // The key file alone holding a certificate says the same from the other side.
    let message = load_error(&files.cert, &files.cert);
    assert!(
        message.contains(
            "holds a certificate and no private key: are the certificate and key swapped?"
        ),
        "{message}"
    );
}

#[test]
fn a_file_that_is_not_pem_says_so_and_what_it_should_hold() {
    let files = TlsFiles::new();
    let text = files.dir.join("notes.txt");
    std::fs::write(&text, "not a certificate\n").unwrap();
    let message = load_error(&files.cert, &text);
    assert_eq!(
        message,
        format!(
            "{}: no private key in it, nor anything PEM (no -----BEGIN line): give the private \
             key in PEM",
            text.display()
        )
    );
}

#[test]
fn a_reload_of_swapped_files_says_what_start_up_says() {
    let files = TlsFiles::new();
    let config = files.config();
    let at_start = load_error(&files.key, &files.cert);
    // The same paths, now holding each other's contents.
    let (cert_pem, key_pem) = (&files.server.cert_pem, &files.server.key_pem);
    std::fs::write(&files.cert, key_pem).unwrap();
    std::fs::write(&files.key, cert_pem).unwrap();
    let on_reload = config
        .reload()
        .expect_err("a swapped pair does not load")
        .to_string();
    let expected = at_start.replace(
        &files.key.display().to_string(),
        &files.cert.display().to_string(),
    );
    assert_eq!(on_reload, expected);
}

#[test]
fn echo_passes_the_message_through_on_one_line() {
    let files = TlsFiles::new();
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let (code, stdout, stderr) = run_echo(&["--port", "0", "--tls-cert", key, "--tls-key", cert]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!(
            "echo: {key} holds a private key and no certificate: are the certificate and key \
             swapped?\n"
        )
    );
}
