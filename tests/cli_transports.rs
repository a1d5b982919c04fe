//! The `echo` binary over TLS and Unix sockets, with the clients users have: openssl s_client,
//! socat, ncat and Python's ssl module (installed by `.ci/run`), and a rustls client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{
    server_cert, start_tls_echo_process, tls_connect, tls_round_trip, write_pair, TlsFiles,
};
use common::*;
use taskserve::rustls::pki_types::pem::PemObject;
use taskserve::rustls::pki_types::CertificateDer;
use taskserve::rustls::{self, ClientConfig};

/// Runs `program` with `args`, writes `Hello\n` to it, and returns once it has printed
/// `GOT:Hello` (or fails after [`PATIENCE`]); then ends it. The way a user tries a client by
/// hand: type a line, see the reply.
fn client_gets_its_reply(program: &str, args: &[&str]) {
    let mut client = ChildGuard::new(
        Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} runs (.ci/run installs it): {e}")),
    );
    client
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"Hello\n")
        .unwrap();
    let mut stdout = Lines::read(
        client.stdout.take().unwrap(),
        &format!("{program}'s stdout"),
    );
    stdout.find(|line| line.trim_end() == "GOT:Hello");
}

#[test]
#[ignore = "needs socat and ncat: bash .ci/run installs them"]
fn echo_over_tls_answers_openssl_socat_ncat_and_python() {
    let files = TlsFiles::new();
    let mut echo = start_tls_echo_process(&files, &[]);
    assert!(
        echo.listening.ends_with("(tls, 2 threads)"),
        "{}",
        echo.listening
    );
    let ca = files.dir.join("ca.pem");
    std::fs::write(&ca, files.ca.cert_pem()).unwrap();
    let (ca, port) = (ca.to_str().unwrap(), echo.addr.port().to_string());
    let addr = format!("127.0.0.1:{port}");
    let openssl = [
        "s_client",
        "-connect",
        &addr,
        "-CAfile",
        ca,
        "-verify_return_error",
        "-quiet",
    ];
    client_gets_its_reply("openssl", &openssl);
    client_gets_its_reply("socat", &["-", &format!("OPENSSL:{addr},cafile={ca}")]);
    // ncat checks the certificate against a host name only, not an IP address.
    let ncat = [
        "--ssl",
        "--ssl-verify",
        "--ssl-trustfile",
        ca,
        "localhost",
        &port,
    ];
    client_gets_its_reply("ncat", &ncat);
    let python = format!(
        "import socket, ssl, sys\n\
         ctx = ssl.create_default_context(cafile={ca:?})\n\
         with ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname='localhost') as s:\n\
         \x20   s.sendall(sys.stdin.readline().encode())\n\
         \x20   print(s.recv(100).decode(), flush=True)\n"
    );
    client_gets_its_reply("python3", &["-c", &python]);
    echo.signal("TERM");
    assert_eq!(echo.wait_exit(), Some(0));
}

#[test]
#[ignore = "needs socat: bash .ci/run installs it"]
fn echo_serves_tcp_tls_and_a_unix_socket_at_once_with_a_line_for_each() {
    let files = TlsFiles::new();
    let socket = files.dir.join("echo.sock");
    let socket_arg = socket.to_str().unwrap();
    let mut echo = start_tls_echo_process(&files, &["--tls-port", "0", "--unix", socket_arg]);
    assert!(
        echo.listening.ends_with("(2 threads)"),
        "{}",
        echo.listening
    );
    let tls_line = echo.next_line();
    let tls_addr = tls_line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.strip_suffix(" (tls)"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("second line: {tls_line:?}"));
    assert_eq!(
        echo.next_line(),
        format!("listening on {socket_arg} (unix)")
    );

    round_trip(&mut connect(echo.addr), b"plain");
    let mut tls = tls_connect(tls_addr, &files.client(), "localhost").unwrap();
    tls_round_trip(&mut tls, b"secret").unwrap();
    client_gets_its_reply("socat", &["-", &format!("UNIX-CONNECT:{socket_arg}")]);
    let mut unix = UnixStream::connect(&socket).unwrap();
    unix.set_read_timeout(Some(PATIENCE)).unwrap();
    unix.write_all(b"local").unwrap();
    assert_eq!(read_payload(&mut unix, 5).unwrap(), b"local");

    echo.signal("TERM");
    drop((tls, unix));
    assert_eq!(echo.wait_exit(), Some(0));
    assert!(!socket.exists(), "the socket file is left after exit");
}

#[test]
fn sighup_reloads_the_certificate_for_new_clients_while_old_ones_keep_their_session() {
    let files = TlsFiles::new();
    let mut echo = start_tls_echo_process(&files, &[]);
    let mut log = echo.stderr_lines();
    let mut old = tls_connect(echo.addr, &files.client(), "localhost").unwrap();
    tls_round_trip(&mut old, b"before").unwrap();
    assert_eq!(server_cert(&old), files.server.cert);

    // A broken pair is refused: the error is logged and the old pair stays in use.
    std::fs::write(&files.key, "not a key").unwrap();
    echo.signal("HUP");
    let line = log.find(|line| line.contains("SIGHUP"));
    assert!(
        line.contains("ERROR") && line.contains("server.key"),
        "{line}"
    );
    let during = tls_connect(echo.addr, &files.client(), "localhost").unwrap();
    assert_eq!(server_cert(&during), files.server.cert);

    // A good new pair is used by the next client; the old client's session goes on.
    let renewed = files.ca.server_pair();
    write_pair(&files.dir, "server", &renewed);
    echo.signal("HUP");
    let line = log.find(|line| line.contains("SIGHUP"));
    assert!(line.contains("reloaded"), "{line}");
    let new = tls_connect(echo.addr, &files.client(), "localhost").unwrap();
    assert_eq!(server_cert(&new), renewed.cert);
    tls_round_trip(&mut old, b"after").unwrap();
    echo.signal("TERM");
    drop((old, during, new));
    assert_eq!(echo.wait_exit(), Some(0));
}

#[test]
fn a_stalled_handshake_is_closed_at_the_deadline_while_others_are_served() {
    let files = TlsFiles::new();
    let echo = start_tls_echo_process(&files, &["--tls-handshake-timeout", "1"]);
    // Before the connect: the server's deadline runs from its accept, some time after.
    let connecting = Instant::now();
    let mut stalled = connect(echo.addr);
    stalled.write_all(&[0x16, 0x03, 0x01]).unwrap(); // the start of a ClientHello, no more
    let mut served = tls_connect(echo.addr, &files.client(), "localhost").unwrap();
    tls_round_trip(&mut served, b"not held up").unwrap();
    wait_for_close(&mut stalled, PATIENCE).expect("the stalled client closed");
    let closed_after = connecting.elapsed();
    assert!(
        closed_after >= Duration::from_secs(1),
        "closed {closed_after:?} after the connect, before the 1 s deadline"
    );
    assert!(
        closed_after < Duration::from_secs(10),
        "closed {closed_after:?} after the connect, long past the 1 s deadline"
    );
    // Plaintext on the TLS port is not waited for: closed long before a deadline of a minute.
    let echo = start_tls_echo_process(&files, &["--tls-handshake-timeout", "60"]);
    let mut plain = connect(echo.addr);
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    wait_for_close(&mut plain, PATIENCE).expect("plaintext closed before the deadline");
}

#[test]
fn bad_tls_flags_and_files_are_one_line_on_stderr_and_exit_1() {
    let files = TlsFiles::new();
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let other = files.ca.server_pair();
    let (_, other_key) = write_pair(&files.dir, "other", &other);
    let not_pem = files.dir.join("notes.txt");
    std::fs::write(&not_pem, "hello").unwrap();
    let (other_key, not_pem) = (other_key.to_str().unwrap(), not_pem.to_str().unwrap());
    let missing = files.dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--tls-cert", cert], "--tls-cert needs --tls-key"),
        (&["--tls-key", key], "--tls-key needs --tls-cert"),
        (
            &["--tls-port", "0"],
            "--tls-port needs --tls-cert and --tls-key",
        ),
        (&["--tls-cert", missing, "--tls-key", key], missing),
        (
            &["--tls-cert", not_pem, "--tls-key", key],
            "no certificate in it",
        ),
        (
            &["--tls-cert", cert, "--tls-key", not_pem],
            "no private key in it",
        ),
        (
            &["--tls-cert", cert, "--tls-key", other_key],
            "do not go together",
        ),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["--port", "0"];
        args.extend_from_slice(flags);
        let (code, stdout, stderr) = run_echo(&args);
        assert_eq!(code, Some(1), "{flags:?}: {stderr}");
        assert_eq!(stdout, "", "{flags:?}");
        assert_eq!(stderr.lines().count(), 1, "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

#[test]
fn no_tcp_with_only_a_unix_socket_serves_there() {
    let dir = TempDir::new();
    let socket = dir.join("only.sock");
    let path = socket.to_str().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.args(["--no-tcp", "--unix", path, "--threads", "1"]);
    let (code, _, stderr) = run_echo(&["--no-tcp"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("nothing to listen on"), "{stderr}");

    let mut child = ChildGuard::new(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = Lines::read(child.stdout.take().unwrap(), "echo's stdout");
    assert_eq!(
        stdout.next_line(),
        format!("listening on {path} (unix, 1 thread)")
    );
    let mut client = UnixStream::connect(&socket).unwrap();
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    client.write_all(b"hi").unwrap();
    let mut reply = [0; 6];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GOT:hi");
}

/// Runs `openssl` with `args` in `dir`; fails the test if it fails.
fn openssl(dir: &TempDir, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("openssl runs (.ci/run installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A client configuration that trusts the CA certificates in the PEM file `ca`.
fn trusting(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

#[test]
fn echo_serves_tls_with_pkcs8_rsa_and_sec1_keys_and_a_full_chain() {
    let dir = TempDir::new();
    // A CA; then a server key in each format, certified by the CA for localhost, with the
    // certificate file holding the full chain (the server's certificate, then the CA's).
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let keys: [(&str, &[&str], &str); 3] = [
        (
            "pkcs8",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            "-----BEGIN PRIVATE KEY-----",
        ),
        (
            "rsa",
            &["genrsa", "-traditional"],
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "sec1",
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            "-----BEGIN EC PRIVATE KEY-----",
        ),
    ];
    let client = trusting(&dir.join("ca.pem"));
    for (name, generate, header) in keys {
        let (key, csr, cert) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let mut args = generate.to_vec();
        args.extend(["-out", &key]);
        openssl(&dir, &args);
        let key_pem = std::fs::read_to_string(dir.join(&key)).unwrap();
        assert!(key_pem.starts_with(header), "{name}: {key_pem:.40}");
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-subj",
                "/CN=localhost",
                "-out",
                &csr,
            ],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                &cert,
            ],
        );
        let chain = dir.join(&format!("{name}.chain.pem"));
        let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        let leaf = std::fs::read_to_string(dir.join(&cert)).unwrap();
        std::fs::write(&chain, leaf + &ca).unwrap();

        let key = dir.join(&key);
        let echo = EchoProcess::start(&[
            "--threads",
            "1",
            "--tls-cert",
            chain.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ]);
        let mut stream = tls_connect(echo.addr, &client, "localhost")
            .unwrap_or_else(|e| panic!("{name}: handshake: {e}"));
        tls_round_trip(&mut stream, name.as_bytes()).unwrap();
    }
}
