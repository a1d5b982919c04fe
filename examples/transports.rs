//! One handler served over TCP, TLS and a Unix socket at once: it tells each client how it
//! connected, then echoes with `GOT:` as the seed does.
//!
//! ```text
//! # a self-signed certificate for localhost, for trying it (valid 30 days):
//! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
//!     -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
//!     -keyout key.pem -out cert.pem
//! cargo run --example transports -- cert.pem key.pem
//! # then, in other terminals:
//! nc localhost 25004                                         # plain TCP
//! openssl s_client -connect localhost:25443 -quiet           # TLS
//! socat - UNIX-CONNECT:/tmp/taskserve-transports.sock         # Unix socket
//! ```
//!
//! Copied into a crate of your own, it needs this beside `taskserve`:
//!
//! ```toml
//! [dependencies]
//! env_logger = { version = "0.11", default-features = false }  # the log on stderr
//! ```

use std::process::ExitCode;

use taskserve::io::{self, AsyncWriteExt};
use taskserve::{Connection, TlsConfig};

/// Says how the client connected, then serves the seed's echo protocol.
async fn hello_then_echo(mut conn: Connection) -> io::Result<()> {
    let info = conn.info();
    let mut hello = format!("hello {} over {}", info.peer_addr, info.transport);
    if let Some(name) = info.tls.as_ref().and_then(|tls| tls.server_name.as_ref()) {
        hello += &format!(" (you asked for {name})");
    }
    if let Some(cred) = &info.peer_credentials {
        hello += &format!(" (uid {})", cred.uid);
    }
    conn.write_all(format!("{hello}\n").as_bytes()).await?;
    conn.flush().await?; // TLS holds written bytes until flushed
    taskserve::echo(conn).await
}

fn run(cert: &str, key: &str) -> io::Result<()> {
    let tls = TlsConfig::from_pem_files(cert, key)?;
    let server = taskserve::Server::builder()
        .listen_tls("127.0.0.1:25443", tls)
        .listen_unix("/tmp/taskserve-transports.sock")
        .stop_on_signals(true) // Ctrl-C stops it, SIGHUP reloads the certificate
        .listen_tcp("127.0.0.1:25004")
        .start(hello_then_echo)?;
    for (addr, transport) in server.local_addrs() {
        println!("listening on {addr} ({transport})");
    }
    server.wait();
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cert, key] = &args[..] else {
        eprintln!("usage: transports CERT.pem KEY.pem (see the top of examples/transports.rs)");
        return ExitCode::from(2);
    };
    if let Err(e) = run(cert, key) {
        eprintln!("transports: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
