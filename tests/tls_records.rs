//! TLS records cut anywhere: the server reads ciphertext into its worker thread's buffer and
//! holds back only the start of a record whose end has not come, so records that arrive a byte
//! at a time, or straddle two reads, or are longer than the handler's reads, must still come
//! back byte for byte, over TLS 1.2 and 1.3.
#![cfg(feature = "tls")]

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;

use common::tls::*;
use common::*;
use taskserve::rustls::{self, ClientConfig, ClientConnection};
use taskserve::{Connection, Server};

/// A client configuration trusting the test CA that speaks only `version`.
fn client_speaking(
    files: &TlsFiles,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(files.ca.cert().clone()).unwrap();
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .expect("ring speaks TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

/// `messages` encrypted by `client`, each written on its own, so one or more records each.
fn encrypt(client: &mut ClientConnection, messages: &[Vec<u8>]) -> Vec<u8> {
    let mut tls = Vec::new();
    for message in messages {
        // rustls takes only so much plaintext before it is encrypted and drained.
        let mut rest = &message[..];
        while !rest.is_empty() {
            let taken = client.writer().write(rest).unwrap();
            rest = &rest[taken..];
            while client.wants_write() {
                client.write_tls(&mut tls).unwrap();
            }
        }
    }
    tls
}

/// Writes `tls` to `socket` from another thread, `piece` bytes per write (with TCP_NODELAY,
/// so each write leaves on its own), while the caller reads the replies.
fn send_in_pieces(socket: &TcpStream, tls: Vec<u8>, piece: usize) -> thread::JoinHandle<()> {
    let mut socket = socket.try_clone().unwrap();
    socket.set_nodelay(true).unwrap();
    thread::spawn(move || {
        for chunk in tls.chunks(piece) {
            socket
                .write_all(chunk)
                .expect("the server takes every byte");
        }
    })
}

/// A session's plaintext as one readable stream: rustls's client over the socket.
fn plaintext<'a>(client: &'a mut ClientConnection, socket: &'a mut TcpStream) -> impl Read + 'a {
    rustls::Stream::new(client, socket)
}

fn echoes_records_cut_at_every_byte(version: &'static rustls::SupportedProtocolVersion) {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let stream = tls_connect(
        server.local_addr().unwrap(),
        &client_speaking(&files, version),
        "localhost",
    )
    .expect("handshake");
    let (mut client, mut socket) = (stream.conn, stream.sock);
    // A record of one byte, small ones, one full record (16 KiB), one just over (two records),
    // and several full ones in a row.
    let messages: Vec<Vec<u8>> = [1, 2, 5, 300, 16_384, 16_385, 20_000]
        .iter()
        .map(|&len| payload(len))
        .collect();
    let sent: Vec<u8> = messages.concat();
    let writer = send_in_pieces(&socket, encrypt(&mut client, &messages), 1);
    let echoed = read_payload(&mut plaintext(&mut client, &mut socket), sent.len())
        .expect("every byte comes back");
    writer.join().unwrap();
    assert!(echoed == sent, "the replies differ from what was sent");
    server.stop();
}

#[test]
fn records_that_arrive_a_byte_at_a_time_come_back_byte_for_byte_over_tls_1_3() {
    echoes_records_cut_at_every_byte(&rustls::version::TLS13);
}

#[test]
fn records_that_arrive_a_byte_at_a_time_come_back_byte_for_byte_over_tls_1_2() {
    echoes_records_cut_at_every_byte(&rustls::version::TLS12);
}

#[test]
fn a_megabyte_in_full_records_straddling_reads_comes_back_byte_for_byte() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let stream =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").expect("handshake");
    let (mut client, mut socket) = (stream.conn, stream.sock);
    let sent = payload(1024 * 1024);
    // Pieces of 7,001 bytes: the server's reads end anywhere in a record.
    let writer = send_in_pieces(
        &socket,
        encrypt(&mut client, std::slice::from_ref(&sent)),
        7_001,
    );
    let echoed = read_payload(&mut plaintext(&mut client, &mut socket), sent.len())
        .expect("every byte comes back");
    writer.join().unwrap();
    assert!(echoed == sent, "the replies differ from what was sent");
    server.stop();
}

/// Echoes what it reads as it is (no prefix), reading five bytes at a time: a handler whose
/// reads are shorter than a record.
async fn five_bytes_at_a_time(mut connection: Connection) -> io::Result<()> {
    use smol::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0; 5];
    loop {
        let read = connection.read(&mut buf).await?;
        if read == 0 {
            return connection.close().await;
        }
        connection.write_all(&buf[..read]).await?;
    }
}

#[test]
fn a_handler_that_reads_less_than_a_record_gets_every_byte_in_order() {
    let files = TlsFiles::new();
    let server = Server::builder()
        .threads(2)
        .listen_tls("127.0.0.1:0", files.config())
        .start(five_bytes_at_a_time)
        .expect("server starts");
    let stream =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").expect("handshake");
    let (mut client, mut socket) = (stream.conn, stream.sock);
    let sent = payload(100_000);
    let writer = send_in_pieces(
        &socket,
        encrypt(&mut client, std::slice::from_ref(&sent)),
        64 * 1024,
    );
    let mut echoed = vec![0; sent.len()];
    plaintext(&mut client, &mut socket)
        .read_exact(&mut echoed)
        .expect("every byte comes back");
    writer.join().unwrap();
    assert!(echoed == sent, "the replies differ from what was sent");
    server.stop();
}
