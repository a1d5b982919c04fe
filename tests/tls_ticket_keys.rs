//! Session tickets sealed with key files that servers share (`TlsConfig::with_ticket_key_files`),
//! over real sockets, for TLS 1.2 and 1.3: a client that one server gave a ticket resumes on
//! another that lists the key, and falls back to a full handshake where none is listed; a
//! rotation (a new key first, the old one second, reloaded) keeps old tickets opening; a key
//! file that does not load is one line that names it, at start-up and on a reload.
#![cfg(feature = "tls")]

mod common;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use common::tls::*;
use taskserve::rustls::HandshakeKind::{Full, Resumed};
use taskserve::{Server, TlsConfig};

/// A server of the test certificate, sealing tickets with `keys`.
fn sharing(files: &TlsFiles, keys: &[&Path]) -> Server {
    let tls = files
        .config()
        .with_ticket_key_files(keys)
        .expect("load the ticket keys");
    start_tls_echo(Server::builder(), tls)
}

#[test]
fn servers_sharing_a_key_file_resume_each_others_clients() {
    let files = TlsFiles::new();
    let key = write_ticket_key(&files.dir, "ticket.key");
    let (a, b) = (sharing(&files, &[&key]), sharing(&files, &[&key]));
    let (a, b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    for (version, v) in TLS_VERSIONS {
        let client = files.client_for(v);
        assert_eq!(visit(a, &client), Full, "{version}: first visit");
        assert_eq!(visit(b, &client), Resumed, "{version}: on the other server");
        assert_eq!(
            visit(a, &client),
            Resumed,
            "{version}: with a ticket from the other"
        );
    }
}

#[test]
fn servers_with_other_keys_give_a_full_handshake_and_serve() {
    let files = TlsFiles::new();
    let one = write_ticket_key(&files.dir, "one.key");
    let other = write_ticket_key(&files.dir, "other.key");
    let a = sharing(&files, &[&one]);
    let b = sharing(&files, &[&other]);
    // A key of its own, as without key files.
    let c = start_tls_echo(Server::builder(), files.config());
    for (version, v) in TLS_VERSIONS {
        let client = files.client_for(v);
        assert_eq!(visit(a.local_addr().unwrap(), &client), Full, "{version}");
        assert_eq!(
            visit(b.local_addr().unwrap(), &client),
            Full,
            "{version}: other key"
        );
        assert_eq!(
            visit(c.local_addr().unwrap(), &client),
            Full,
            "{version}: process key"
        );
    }
}

#[test]
fn a_key_listed_second_opens_the_tickets_it_sealed_and_seals_none() {
    let files = TlsFiles::new();
    let old = write_ticket_key(&files.dir, "old.key");
    let new = write_ticket_key(&files.dir, "new.key");
    let before = sharing(&files, &[&old]);
    let rotated = sharing(&files, &[&new, &old]);
    let new_only = sharing(&files, &[&new]);
    let [before, rotated, new_only] =
        [&before, &rotated, &new_only].map(|s| s.local_addr().unwrap());
    for (version, v) in TLS_VERSIONS {
        let client = files.client_for(v);
        visit(before, &client);
        assert_eq!(
            visit(rotated, &client),
            Resumed,
            "{version}: old key second"
        );
        // The ticket that resumption gave is sealed with the new key.
        assert_eq!(
            visit(new_only, &client),
            Resumed,
            "{version}: sealed with the new key"
        );
        assert_eq!(
            visit(before, &client),
            Full,
            "{version}: the new key is not listed"
        );
        let client = files.client_for(v);
        visit(before, &client);
        assert_eq!(
            visit(new_only, &client),
            Full,
            "{version}: the old key is gone"
        );
    }
}

#[test]
fn a_reload_that_puts_a_new_key_first_keeps_old_tickets_opening() {
    let files = TlsFiles::new();
    let current = write_ticket_key(&files.dir, "ticket.key");
    let previous = write_ticket_key(&files.dir, "ticket.key.previous");
    let server = sharing(&files, &[&current, &previous]);
    let addr = server.local_addr().unwrap();
    let clients = TLS_VERSIONS.map(|(_, v)| [files.client_for(v), files.client_for(v)]);
    for [client, stays_away] in &clients {
        visit(addr, client);
        visit(addr, stays_away);
    }
    // The rotation an operator makes: the current key becomes the previous one, a new one is
    // made, and the server reloads.
    let rotate = || {
        std::fs::rename(&current, &previous).unwrap();
        write_ticket_key(&files.dir, "ticket.key");
        server.reload_tls().expect("reload the rotated keys");
    };
    rotate();
    for ((version, _), [client, _]) in TLS_VERSIONS.iter().zip(&clients) {
        assert_eq!(
            visit(addr, client),
            Resumed,
            "{version}: sealed by the previous key"
        );
    }
    rotate();
    for ((version, _), [client, stays_away]) in TLS_VERSIONS.iter().zip(&clients) {
        assert_eq!(
            visit(addr, client),
            Resumed,
            "{version}: resealed after the first"
        );
        assert_eq!(
            visit(addr, stays_away),
            Full,
            "{version}: its key is no longer listed"
        );
    }
}

#[test]
fn a_reload_that_cannot_read_a_key_file_says_which_and_keeps_the_keys_in_use() {
    let files = TlsFiles::new();
    let key = write_ticket_key(&files.dir, "ticket.key");
    let server = sharing(&files, &[&key]);
    let addr = server.local_addr().unwrap();
    let clients = TLS_VERSIONS.map(|(_, v)| files.client_for(v));
    for client in &clients {
        visit(addr, client);
    }
    std::fs::write(&key, "not a key\n").unwrap();
    let e = server.reload_tls().expect_err("a key file of text");
    assert_eq!(e.to_string(), wrong_length(&key, "text"));
    for ((version, _), client) in TLS_VERSIONS.iter().zip(&clients) {
        assert_eq!(visit(addr, client), Resumed, "{version}: still the old key");
    }
}

/// The message for a key file at `path` that is `what` instead of 80 bytes.
fn wrong_length(path: &Path, what: &str) -> String {
    let path = path.display();
    format!(
        "{path}: a TLS ticket key is 80 random bytes, and this file is {what}: make one with \
         openssl rand 80 > {path}"
    )
}

/// The one-line message of the error that loading `keys` gives, and its kind.
fn key_error(files: &TlsFiles, keys: &[&Path]) -> (ErrorKind, String) {
    let e = files
        .config()
        .with_ticket_key_files(keys)
        .expect_err("key files that do not load");
    let message = e.to_string();
    assert_eq!(message.lines().count(), 1, "{message}");
    (e.kind(), message)
}

#[test]
fn a_key_file_that_does_not_load_is_named_with_what_to_do() {
    let files = TlsFiles::new();
    let key = write_ticket_key(&files.dir, "ticket.key");
    let file = |name: &str, bytes: &[u8]| -> PathBuf {
        let path = files.dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let short = file("short.key", &[7; 48]);
    let long = file("long.key", &[7; 81]);
    // What `openssl rand -hex 80` writes.
    let hex = file("hex.key", format!("{}\n", "a1".repeat(80)).as_bytes());
    let typed = file("typed.key", "x".repeat(80).as_bytes());
    let cases = [
        (&short, "48 bytes"),
        (&long, "longer"),
        (&hex, "text"),
        (&typed, "text"),
    ];
    for (path, what) in cases {
        let (kind, message) = key_error(&files, &[&key, path]);
        assert_eq!(
            (kind, message),
            (ErrorKind::InvalidData, wrong_length(path, what))
        );
    }
    let missing = files.dir.join("missing.key");
    let (kind, message) = key_error(&files, &[&missing]);
    assert_eq!(kind, ErrorKind::NotFound);
    let named = format!("cannot read TLS ticket key {}: ", missing.display());
    assert!(message.starts_with(&named), "{message}");
    let (_, message) = key_error(&files, &[files.dir.path()]);
    assert!(message.ends_with(": not a regular file"), "{message}");
    let (_, message) = key_error(&files, &[&key, &key]);
    let twice = format!(
        "{0} has the key name of {0} (their first 16 bytes",
        key.display()
    );
    assert!(message.starts_with(&twice), "{message}");
    let e = files
        .config()
        .with_ticket_key_files::<&Path>([])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

#[test]
fn a_ticket_lifetime_needs_key_files_and_a_value_tls_allows() {
    use std::time::Duration;
    let files = TlsFiles::new();
    let key = write_ticket_key(&files.dir, "ticket.key");
    let with_keys = || files.config().with_ticket_key_files([&key]).unwrap();
    let hour = Duration::from_secs(3600);
    with_keys().with_ticket_lifetime(hour).expect("an hour");
    with_keys()
        .with_ticket_lifetime(TlsConfig::MAX_TICKET_LIFETIME)
        .expect("the most");
    for wrong in [
        Duration::ZERO,
        TlsConfig::MAX_TICKET_LIFETIME + Duration::from_secs(1),
    ] {
        let e = with_keys().with_ticket_lifetime(wrong).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    let e = files.config().with_ticket_lifetime(hour).unwrap_err();
    assert!(e.to_string().contains("with_ticket_key_files"), "{e}");
}
