//! TLS session resumption over real sockets, for TLS 1.2 and 1.3: a client that comes back
//! resumes its session (from a ticket, or from the server's cache), a server that cannot resume
//! it falls back to a full handshake and serves it all the same, a reload keeps the sessions
//! unless the client CAs changed, and openssl s_client sees `Reused`.
#![cfg(feature = "tls")]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::tls::*;
use common::*;
use taskserve::rustls::{self, ClientConfig, HandshakeKind};
use taskserve::Server;

/// [`visit`]s `times` times, each handshake of `kind`.
fn expect_visits(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    times: usize,
    kind: HandshakeKind,
    what: &str,
) {
    for n in 1..=times {
        assert_eq!(visit(addr, config), kind, "{what}, visit {n}");
    }
}

#[test]
fn a_returning_client_resumes_with_a_ticket_or_from_the_cache() {
    let files = TlsFiles::new();
    let configs = [
        ("the defaults", files.config()),
        (
            "tickets only",
            files.config().with_session_cache(0).unwrap(),
        ),
        (
            "cache only",
            files.config().with_session_tickets(false).unwrap(),
        ),
    ];
    for (setting, tls) in configs {
        let server = start_tls_echo(Server::builder(), tls);
        let addr = server.local_addr().unwrap();
        for (version, v) in TLS_VERSIONS {
            let config = files.client_for(v);
            assert_eq!(
                visit(addr, &config),
                HandshakeKind::Full,
                "{setting}, {version}"
            );
            let what = format!("{setting}, {version}");
            expect_visits(addr, &config, 3, HandshakeKind::Resumed, &what);
        }
    }
}

#[test]
fn a_session_another_server_cannot_resume_falls_back_to_a_full_handshake() {
    let files = TlsFiles::new();
    let first = start_tls_echo(Server::builder(), files.config());
    // Another process behind the same balancer, or this one restarted: the same certificate,
    // other keys and another cache.
    let second = start_tls_echo(Server::builder(), files.config());
    let nothing = files.config().with_session_cache(0).unwrap();
    let nothing = start_tls_echo(
        Server::builder(),
        nothing.with_session_tickets(false).unwrap(),
    );
    for (version, v) in TLS_VERSIONS {
        let config = files.client_for(v);
        visit(first.local_addr().unwrap(), &config);
        let kind = visit(first.local_addr().unwrap(), &config);
        assert_eq!(kind, HandshakeKind::Resumed, "{version}: it has a session");
        let kind = visit(second.local_addr().unwrap(), &config);
        assert_eq!(kind, HandshakeKind::Full, "{version}: another server");
        let what = format!("{version}: no cache, no tickets");
        expect_visits(
            nothing.local_addr().unwrap(),
            &config,
            2,
            HandshakeKind::Full,
            &what,
        );
    }
}

#[test]
fn a_session_resumes_across_a_certificate_reload() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let addr = server.local_addr().unwrap();
    let clients = TLS_VERSIONS.map(|(_, v)| files.client_for(v));
    for config in &clients {
        visit(addr, config);
    }
    let renewed = files.ca.server_pair();
    std::fs::write(&files.cert, &renewed.cert_pem).unwrap();
    std::fs::write(&files.key, &renewed.key_pem).unwrap();
    server.reload_tls().expect("reload the new pair");
    for ((version, _), config) in TLS_VERSIONS.iter().zip(&clients) {
        assert_eq!(visit(addr, config), HandshakeKind::Resumed, "{version}");
    }
    let new_client = files.client_for(&rustls::version::TLS13);
    let mut stream = tls_connect(addr, &new_client, "localhost").unwrap();
    assert_eq!(server_cert(&stream), renewed.cert, "a new client");
    tls_round_trip(&mut stream, b"hello").unwrap();
}

#[test]
fn a_reload_with_other_client_cas_makes_every_client_show_its_certificate_again() {
    let files = TlsFiles::new();
    let ca_file = files.dir.join("clients-ca.pem");
    std::fs::write(&ca_file, files.ca.cert_pem()).unwrap();
    let tls = files.config().with_client_ca_file(&ca_file).unwrap();
    let server = start_tls_echo(Server::builder(), tls);
    let addr = server.local_addr().unwrap();
    let alice = files.ca.client_pair("alice");
    for (version, v) in TLS_VERSIONS {
        let config = client_config_for(&[v], &files.ca, Some(&alice), &[]);
        visit(addr, &config);
        assert_eq!(visit(addr, &config), HandshakeKind::Resumed, "{version}");
        // One more CA: alice's certificate still passes, but must be checked again.
        let other = Ca::new("another client CA");
        std::fs::write(&ca_file, files.ca.cert_pem() + &other.cert_pem()).unwrap();
        server.reload_tls().expect("reload the new client CAs");
        assert_eq!(visit(addr, &config), HandshakeKind::Full, "{version}");
        assert_eq!(visit(addr, &config), HandshakeKind::Resumed, "{version}");
    }
}

#[test]
fn bad_session_flags_are_usage_errors() {
    let files = TlsFiles::new();
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let tls = ["--tls-cert", cert, "--tls-key", key];
    let cases: [(&[&str], &str); 5] = [
        (&["--tls-tickets", "yes"], "\"yes\": expected on or off"),
        // Room for these would be set aside at once: more than any machine has.
        (
            &["--tls-session-cache", "1000000000000"],
            "the most is 1000000",
        ),
        (&["--tls-session-cache", "-1"], "--tls-session-cache"),
        (&["--tls-session-cache", "many"], "--tls-session-cache"),
        (&["--tls-tickets", "off"], "--tls-tickets needs --tls-cert"),
    ];
    for (flags, message) in cases {
        // The last case leaves the certificate out.
        let with_files = !message.contains("--tls-cert");
        let mut args = vec!["--port", "0"];
        args.extend(tls.iter().filter(|_| with_files));
        args.extend(flags);
        let (code, _, stderr) = run_echo(&args);
        assert_ne!(code, Some(0), "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
#[ignore = "needs openssl: bash .ci/run installs it"]
fn openssl_s_client_reports_reused_with_sess_out_and_sess_in() {
    let files = TlsFiles::new();
    let echo = start_tls_echo_process(&files, &[]);
    let nothing = ["--tls-session-cache", "0", "--tls-tickets", "off"];
    let forgetful = start_tls_echo_process(&files, &nothing);
    // Offered where it cannot resume: a full handshake, and the echo all the same.
    assert_openssl_resumes(&files, echo.addr, echo.addr, forgetful.addr);
}

#[test]
#[ignore = "needs openssl: bash .ci/run installs it"]
fn openssl_s_client_reconnect_resumes_tls12_five_times_of_five() {
    let files = TlsFiles::new();
    let echo = start_tls_echo_process(&files, &[]);
    let ca = files.ca_file();
    // -reconnect reconnects right after each handshake, before TLS 1.3's tickets come (against
    // openssl s_server too): TLS 1.3 is checked above, with -sess_out and -sess_in.
    let reconnecting = Command::new("openssl")
        .args(["s_client", "-tls1_2", "-reconnect", "-connect"])
        .arg(echo.addr.to_string())
        .args(["-CAfile", ca.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl runs (.ci/run installs it)");
    let output = exit_within_patience(ChildGuard::new(reconnecting), "openssl s_client -reconnect");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let sessions: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with("New,") || line.starts_with("Reused,"))
        .collect();
    assert_eq!(sessions.len(), 6, "{stdout}");
    assert!(sessions[0].starts_with("New, TLSv1.2"), "{stdout}");
    assert!(
        sessions[1..]
            .iter()
            .all(|s| s.starts_with("Reused, TLSv1.2")),
        "{stdout}"
    );
}
