//! TLS for the tests: a certificate authority made at test time, the certificates it signs (a
//! server's for `localhost` and `127.0.0.1`, clients' by common name), PEM files for them in a
//! temporary directory, and a blocking rustls client that trusts the test CA.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use taskserve::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use taskserve::rustls::{
    self, ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned,
    SupportedProtocolVersion,
};
use taskserve::{Server, TlsConfig};

use super::{connect, exit_within_patience, payload, ChildGuard, EchoProcess, Lines, TempDir};

/// A TLS client connection over a blocking TCP stream.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A certificate authority of the tests' own.
pub struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its private key, in DER and PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pair {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        use rustls::pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("a key rcgen made")
    }
}

impl Ca {
    /// A new CA whose subject is `CN={name}`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generate the CA's key");
        Ca(CertifiedIssuer::self_signed(params, key).expect("self-sign the CA"))
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        self.0.der()
    }

    /// The CA's certificate in PEM, as a client CA file holds it.
    pub fn cert_pem(&self) -> String {
        self.0.pem()
    }

    /// A server certificate for `localhost` and `127.0.0.1`, with a new key.
    pub fn server_pair(&self) -> Pair {
        let mut params = CertificateParams::new(["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("valid names");
        params.distinguished_name = common_name("localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose subject is `CN={name}`, with a new key.
    pub fn client_pair(&self, name: &str) -> Pair {
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Pair {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.signed_by(&key, &self.0).expect("sign");
        Pair {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Writes `pair` to `{name}.pem` and `{name}.key` in `dir`; returns the two paths.
pub fn write_pair(dir: &TempDir, name: &str, pair: &Pair) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(&format!("{name}.pem")),
        dir.join(&format!("{name}.key")),
    );
    std::fs::write(&cert, &pair.cert_pem).expect("write the certificate");
    std::fs::write(&key, &pair.key_pem).expect("write the key");
    (cert, key)
}

/// A test CA, a server certificate it signed written to PEM files, and the temporary directory
/// that holds them.
pub struct TlsFiles {
    pub ca: Ca,
    pub server: Pair,
    pub dir: TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn new() -> TlsFiles {
        let ca = Ca::new("taskserve test CA");
        let server = ca.server_pair();
        let dir = TempDir::new();
        let (cert, key) = write_pair(&dir, "server", &server);
        TlsFiles {
            ca,
            server,
            dir,
            cert,
            key,
        }
    }

    /// The server's configuration, read from the files.
    pub fn config(&self) -> TlsConfig {
        TlsConfig::from_pem_files(&self.cert, &self.key).expect("load the test certificate")
    }

    /// A client that trusts the test CA and has no certificate.
    pub fn client(&self) -> Arc<ClientConfig> {
        client_config(&self.ca, None, &[])
    }

    /// As [`TlsFiles::client`], speaking only `version`; it keeps its sessions to resume
    /// (rustls's default), as [`visit`] shows.
    pub fn client_for(&self, version: &'static SupportedProtocolVersion) -> Arc<ClientConfig> {
        client_config_for(&[version], &self.ca, None, &[])
    }

    /// The test CA's certificate written to `ca.pem`, for openssl's `-CAfile`.
    pub fn ca_file(&self) -> PathBuf {
        let ca = self.dir.join("ca.pem");
        std::fs::write(&ca, self.ca.cert_pem()).expect("write the CA certificate");
        ca
    }
}

/// Starts an echo server with two threads and one TLS listener on `127.0.0.1:0`, built by
/// `builder`.
pub fn start_tls_echo(builder: taskserve::Builder, tls: TlsConfig) -> Server {
    builder
        .threads(2)
        .listen_tls("127.0.0.1:0", tls)
        .start(taskserve::echo)
        .expect("TLS server starts on an ephemeral port")
}

/// Starts the `echo` binary with the test certificate on its `--port` listener, two threads, and
/// `extra` flags: the process, as [`start_tls_echo`] is the library's server.
pub fn start_tls_echo_process(files: &TlsFiles, extra: &[&str]) -> EchoProcess {
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let mut args = vec!["--threads", "2", "--tls-cert", cert, "--tls-key", key];
    args.extend_from_slice(extra);
    EchoProcess::start(&args)
}

/// A client configuration trusting `ca`, presenting `client_cert` if given and offering `alpn`.
pub fn client_config(ca: &Ca, client_cert: Option<&Pair>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config_for(rustls::DEFAULT_VERSIONS, ca, client_cert, alpn)
}

/// As [`client_config`], speaking only the TLS `versions` given.
pub fn client_config_for(
    versions: &[&'static rustls::SupportedProtocolVersion],
    ca: &Ca,
    client_cert: Option<&Pair>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert().clone()).expect("trust the test CA");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("ring supports the versions")
            .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(pair) => builder
            .with_client_auth_cert(vec![pair.cert.clone()], pair.key())
            .expect("a usable client certificate"),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Connects to `addr` (with the timeouts of [`connect`]), asking for `server_name`, and
/// completes the client's side of the handshake.
///
/// With TLS 1.3 the client is done before the server has checked a client certificate: a
/// server that refuses it says so with an alert that the first read returns as an error.
pub fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> io::Result<TlsStream> {
    tls_handshake(connect(addr), config, server_name)
}

/// As [`tls_connect`], over a TCP connection made by the caller (with options of its own, such
/// as keepalive).
pub fn tls_handshake(
    mut tcp: TcpStream,
    config: &Arc<ClientConfig>,
    server_name: &str,
) -> io::Result<TlsStream> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    // One call runs the handshake to its end, each read bounded by the socket's timeout.
    conn.complete_io(&mut tcp)?;
    if conn.is_handshaking() {
        return Err(io::Error::other("handshake not complete"));
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// The certificate the server presented on `stream`.
pub fn server_cert(stream: &TlsStream) -> CertificateDer<'static> {
    stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server sent a certificate")
        .clone()
        .into_owned()
}

/// The first bytes a client with `config` sends: its ClientHello, as TLS records.
pub fn client_hello(config: &Arc<ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(Arc::clone(config), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

/// Sends `message` (made by [`super::payload`], or free of `G`) over TLS and checks that exactly
/// it comes back.
pub fn tls_round_trip(stream: &mut TlsStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    stream.flush()?;
    let echoed = super::read_payload(stream, message.len())?;
    assert!(echoed == message, "the reply differs from what was sent");
    Ok(())
}

/// The TLS versions a client may resume with, named for failure messages.
pub const TLS_VERSIONS: [(&str, &SupportedProtocolVersion); 2] = [
    ("TLS 1.2", &rustls::version::TLS12),
    ("TLS 1.3", &rustls::version::TLS13),
];

/// Connects with `config`, checks a byte-exact echo, closes, and says how the handshake went
/// (`Full` or `Resumed`). The echo also reads the TLS 1.3 tickets that the server sends after
/// its handshake, which the client keeps for its next visit.
pub fn visit(addr: SocketAddr, config: &Arc<ClientConfig>) -> HandshakeKind {
    let mut stream = tls_connect(addr, config, "localhost").expect("TLS handshake");
    tls_round_trip(&mut stream, &payload(2000)).expect("a byte-exact echo");
    stream.conn.handshake_kind().expect("the handshake is done")
}

/// What `openssl s_client` with `args`, trusting the CA in the file `ca`, says of its session
/// (`New, TLSv1.3, Cipher is ...` or `Reused, ...`), once it has echoed a line: it has read the
/// TLS 1.3 tickets by then.
pub fn s_client(addr: SocketAddr, ca: &str, args: &[&str]) -> String {
    let mut client = ChildGuard::new(
        Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), "-CAfile", ca])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl runs (.ci/run installs it)"),
    );
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"Hello\n").unwrap();
    let mut stdout = Lines::read(client.stdout.take().unwrap(), "openssl's stdout");
    let session = stdout.find(|line| line.starts_with("New,") || line.starts_with("Reused,"));
    stdout.find(|line| line == "GOT:Hello");
    drop(stdin);
    exit_within_patience(client, "openssl s_client");
    session
}

/// For TLS 1.2 and 1.3: `openssl s_client -sess_out` gets a new session from `sealer`,
/// `-sess_in` resumes it on `resumer` (`Reused`), and on `refuser` gets a full handshake (`New`)
/// and its echo all the same.
pub fn assert_openssl_resumes(
    files: &TlsFiles,
    sealer: SocketAddr,
    resumer: SocketAddr,
    refuser: SocketAddr,
) {
    let ca = files.ca_file();
    let ca = ca.to_str().unwrap();
    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let session = files.dir.join(&format!("session{flag}.pem"));
        let session = session.to_str().unwrap();
        let new = s_client(sealer, ca, &[flag, "-sess_out", session]);
        assert!(new.starts_with(&format!("New, {version}")), "{new}");
        let reused = s_client(resumer, ca, &[flag, "-sess_in", session]);
        assert!(
            reused.starts_with(&format!("Reused, {version}")),
            "{reused}"
        );
        let refused = s_client(refuser, ca, &[flag, "-sess_in", session]);
        assert!(refused.starts_with(&format!("New, {version}")), "{refused}");
    }
}

/// Writes a new TLS ticket key to `name` in `dir`, as `openssl rand 80 > FILE` and `chmod 600`
/// would make it, and returns its path.
pub fn write_ticket_key(dir: &TempDir, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let key: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
        .take(80)
        .collect();
    std::fs::write(&path, key).expect("write the ticket key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the ticket key");
    path
}
