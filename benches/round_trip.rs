//! Round trips through the library's echo server over loopback: one connection at a time, and
//! many connections with a request in flight on each, over plain TCP and over TLS; and TLS
//! handshakes. `cargo bench` runs them; a regression in the per-message path or the handshake
//! shows here without the peers in `bench/`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use divan::counter::{BytesCount, ItemsCount};
use divan::Bencher;
use taskserve::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use taskserve::rustls::{self, ClientConfig, ClientConnection, ServerConfig, StreamOwned};
use taskserve::{Server, TlsConfig};

fn main() {
    divan::main();
}

/// Starts the echo server as the benchmarks measure it: two worker threads, port 0.
fn start_server() -> Server {
    Server::builder()
        .threads(2)
        .listen_tcp("127.0.0.1:0")
        .start(taskserve::echo)
        .expect("start the echo server")
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    // As the server does: a request must not wait for an ACK.
    stream.set_nodelay(true).expect("set TCP_NODELAY");
    stream
}

/// Reads replies until `len` payload bytes are back. The message has no `GOT:` letters, so every
/// byte that is not one of them is payload, however the server chunked its reply.
fn read_reply(stream: &mut impl Read, len: usize, buf: &mut [u8]) {
    let mut payload = 0;
    while payload < len {
        let n = stream.read(buf).expect("read the reply");
        assert!(n > 0, "the server closed the connection");
        payload += buf[..n].iter().filter(|b| !b"GOT:".contains(b)).count();
    }
    assert_eq!(payload, len, "more reply than was asked for");
}

/// One client, one message in flight: the latency of a round trip.
#[divan::bench(args = [64, 4096, 65536])]
fn one_connection(bencher: Bencher, size: usize) {
    let server = start_server();
    let mut client = connect(server.local_addr().unwrap());
    let message = vec![b'x'; size];
    let mut buf = vec![0; 128 * 1024];
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        client.write_all(&message).expect("send");
        read_reply(&mut client, size, &mut buf);
    });
    server.stop();
}

/// `connections` clients, a 64-byte message in flight on each: the throughput of many tasks.
#[divan::bench(args = [10, 100, 1000])]
fn many_connections(bencher: Bencher, connections: usize) {
    let server = start_server();
    let mut clients: Vec<_> = (0..connections)
        .map(|_| connect(server.local_addr().unwrap()))
        .collect();
    let message = [b'x'; 64];
    let mut buf = vec![0; 4096];
    bencher
        .counter(ItemsCount::new(connections))
        .bench_local(|| {
            for client in &mut clients {
                client.write_all(&message).expect("send");
            }
            for client in &mut clients {
                read_reply(client, message.len(), &mut buf);
            }
        });
    drop(clients);
    server.stop();
}

/// A TLS echo server with a self-signed certificate for `localhost`, and a client that trusts
/// it; both with ring, TLS 1.3's default key exchange and an ECDSA P-256 key.
fn start_tls_server() -> (Server, Arc<ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(["localhost".to_string()]).expect("certificate");
    let cert_der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth()
                .with_single_cert(vec![cert_der.clone()], key)
        })
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("trust the certificate");
    let client_config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("client config")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = Server::builder()
        .threads(2)
        .listen_tls(
            "127.0.0.1:0",
            TlsConfig::from_server_config(Arc::new(server_config)),
        )
        .start(taskserve::echo)
        .expect("start the TLS echo server");
    (server, Arc::new(client_config))
}

type TlsClient = StreamOwned<ClientConnection, TcpStream>;

fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> TlsClient {
    let name = ServerName::try_from("localhost").expect("a server name");
    let mut conn = ClientConnection::new(Arc::clone(config), name).expect("client connection");
    let mut tcp = connect(addr);
    conn.complete_io(&mut tcp).expect("handshake");
    StreamOwned::new(conn, tcp)
}

/// One TLS client, one message in flight: a round trip's latency with the encryption.
#[divan::bench(args = [64, 4096, 65536])]
fn tls_one_connection(bencher: Bencher, size: usize) {
    let (server, config) = start_tls_server();
    let mut client = tls_connect(server.local_addr().unwrap(), &config);
    let message = vec![b'x'; size];
    let mut buf = vec![0; 128 * 1024];
    bencher.counter(BytesCount::new(size)).bench_local(|| {
        client.write_all(&message).expect("send");
        client.flush().expect("send");
        read_reply(&mut client, size, &mut buf);
    });
    server.stop();
}

/// A new TLS connection: connect, full handshake, one 64-byte round trip, close.
#[divan::bench]
fn tls_handshake(bencher: Bencher) {
    let (server, config) = start_tls_server();
    let message = [b'x'; 64];
    let mut buf = vec![0; 4096];
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let mut client = tls_connect(server.local_addr().unwrap(), &config);
        client.write_all(&message).expect("send");
        client.flush().expect("send");
        read_reply(&mut client, message.len(), &mut buf);
    });
    server.stop();
}
