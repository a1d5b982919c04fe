//! `echo --tls-ticket-key FILE` (repeatable): `echo` processes that share key files resume each
//! other's clients (rustls, and openssl s_client's `-sess_out` and `-sess_in`), SIGHUP reads
//! rotated keys, and a key file or flag that cannot work is one line on stderr.
#![cfg(feature = "tls")]

mod common;

use std::path::Path;

use common::tls::*;
use common::*;
use taskserve::rustls::HandshakeKind::{Full, Resumed};

/// `--tls-ticket-key` for each of `keys`, in order.
fn key_flags(keys: &[&Path]) -> Vec<String> {
    keys.iter()
        .flat_map(|key| ["--tls-ticket-key".to_string(), key.display().to_string()])
        .collect()
}

/// `echo` with the test certificate, sealing tickets with `keys`.
fn echo_sharing(files: &TlsFiles, keys: &[&Path]) -> EchoProcess {
    let flags = key_flags(keys);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_tls_echo_process(files, &flags)
}

/// Two `echo`s that share a key file, and a third with a key of its own.
fn two_sharing_and_one_not(files: &TlsFiles) -> [EchoProcess; 3] {
    let key = write_ticket_key(&files.dir, "ticket.key");
    let other = write_ticket_key(&files.dir, "other.key");
    [&key, &key, &other].map(|key| echo_sharing(files, &[key]))
}

#[test]
fn echo_processes_sharing_a_key_file_resume_each_others_clients() {
    let files = TlsFiles::new();
    let [a, b, c] = two_sharing_and_one_not(&files);
    for (version, v) in TLS_VERSIONS {
        let client = files.client_for(v);
        assert_eq!(visit(a.addr, &client), Full, "{version}");
        assert_eq!(visit(b.addr, &client), Resumed, "{version}: the same key");
        assert_eq!(visit(c.addr, &client), Full, "{version}: another key");
    }
}

#[test]
fn sighup_reads_rotated_keys_and_old_tickets_still_open() {
    let files = TlsFiles::new();
    let current = write_ticket_key(&files.dir, "ticket.key");
    let previous = write_ticket_key(&files.dir, "ticket.key.previous");
    let mut echo = echo_sharing(&files, &[&current, &previous]);
    let mut log = echo.stderr_lines();
    let clients = TLS_VERSIONS.map(|(_, v)| files.client_for(v));
    for client in &clients {
        visit(echo.addr, client);
    }
    std::fs::rename(&current, &previous).unwrap();
    write_ticket_key(&files.dir, "ticket.key");
    echo.signal("HUP");
    let line = log.find(|line| line.contains("SIGHUP"));
    assert!(line.contains("reloaded"), "{line}");
    // Started after the rotation, with the new key only.
    let new_only = echo_sharing(&files, &[&current]);
    for ((version, _), client) in TLS_VERSIONS.iter().zip(&clients) {
        assert_eq!(
            visit(echo.addr, client),
            Resumed,
            "{version}: the old key, second"
        );
        assert_eq!(
            visit(new_only.addr, client),
            Resumed,
            "{version}: resealed, new key"
        );
    }
    // A key file broken since: the reload fails, names it, and the keys in use stay.
    std::fs::write(&current, [0; 10]).unwrap();
    echo.signal("HUP");
    let line = log.find(|line| line.contains("SIGHUP"));
    let named = format!("{}: a TLS ticket key is 80 random bytes", current.display());
    assert!(line.contains("ERROR") && line.contains(&named), "{line}");
    for ((version, _), client) in TLS_VERSIONS.iter().zip(&clients) {
        assert_eq!(
            visit(echo.addr, client),
            Resumed,
            "{version}: after a failed reload"
        );
    }
}

#[test]
fn a_key_file_that_does_not_load_stops_echo_with_one_line() {
    let files = TlsFiles::new();
    let short = files.dir.join("short.key");
    std::fs::write(&short, [0; 10]).unwrap();
    let missing = files.dir.join("missing.key");
    let cases = [
        (
            &short,
            format!(
                "{0}: a TLS ticket key is 80 random bytes, and this file is 10 bytes: make one \
                 with openssl rand 80 > {0}",
                short.display()
            ),
        ),
        (
            &missing,
            format!(
                "cannot read TLS ticket key {}: No such file or directory (os error 2)",
                missing.display()
            ),
        ),
    ];
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    for (path, message) in cases {
        let path = path.to_str().unwrap();
        let args = ["--port", "0", "--tls-cert", cert, "--tls-key", key];
        let (code, stdout, stderr) = run_echo(&[&args[..], &["--tls-ticket-key", path]].concat());
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stdout, "");
        assert_eq!(stderr, format!("echo: {message}\n"));
    }
}

#[test]
fn a_key_file_others_may_read_loads_with_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let files = TlsFiles::new();
    let key = write_ticket_key(&files.dir, "ticket.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut echo = echo_sharing(&files, &[&key]);
    let mut log = echo.stderr_lines();
    let line = log.find(|line| line.contains("WARN"));
    let key = key.display();
    let expected = format!("{key} is open to its group or others (mode 644)");
    assert!(line.contains(&expected), "{line}");
    assert!(line.ends_with(&format!("; chmod 600 {key}")), "{line}");
    assert_eq!(visit(echo.addr, &files.client()), Full, "it serves");
}

#[test]
fn ticket_key_flags_that_cannot_work_are_usage_errors() {
    let files = TlsFiles::new();
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let ticket_key = write_ticket_key(&files.dir, "ticket.key");
    let ticket_key = ticket_key.to_str().unwrap();
    let tls = ["--tls-cert", cert, "--tls-key", key];
    // The flags, whether with the certificate, the exit code and what stderr says.
    let cases: [(&[&str], bool, i32, &str); 5] = [
        (
            &["--tls-ticket-key", ticket_key],
            false,
            1,
            "echo: --tls-ticket-key needs --tls-cert and --tls-key\n",
        ),
        (
            &["--tls-tickets", "off", "--tls-ticket-key", ticket_key],
            true,
            1,
            "echo: --tls-ticket-key seals tickets, which --tls-tickets off turns off: give \
             one or the other\n",
        ),
        (
            &["--tls-ticket-lifetime", "3600"],
            true,
            1,
            "echo: --tls-ticket-lifetime needs --tls-ticket-key: a random key of the \
             process's own gives tickets 12 hours\n",
        ),
        (
            &["--tls-ticket-lifetime", "0"],
            true,
            2,
            "must be from 1 to 604800 seconds",
        ),
        (
            &["--tls-ticket-lifetime", "604801"],
            true,
            2,
            "must be from 1 to 604800 seconds",
        ),
    ];
    for (flags, with_cert, exit, message) in cases {
        let mut args = vec!["--port", "0"];
        args.extend(tls.iter().filter(|_| with_cert));
        args.extend(flags);
        let (code, _, stderr) = run_echo(&args);
        assert_eq!(code, Some(exit), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
#[ignore = "needs openssl: bash .ci/run installs it"]
fn openssl_s_client_resumes_on_another_echo_sharing_the_key() {
    let files = TlsFiles::new();
    let [a, b, c] = two_sharing_and_one_not(&files);
    assert_openssl_resumes(&files, a.addr, b.addr, c.addr);
}
