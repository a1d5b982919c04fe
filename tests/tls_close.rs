//! A TLS client that closes its socket without close_notify: many do (a browser tab closed, a
//! script that exits), so at a record's end it counts as the client closing, not as a handler
//! error; in the middle of a record, what it sent was cut short, and that stays an error.

mod common;

use std::io::Write;
use std::net::Shutdown;

use common::eventually;
use common::tls::{start_tls_echo, tls_connect, tls_round_trip, TlsFiles};
use taskserve::{CloseReason, Server};

fn wait_for_one_close(server: &Server) -> taskserve::Stats {
    assert!(
        eventually(|| server.stats().closed_total() == 1),
        "{:?}",
        server.stats()
    );
    server.stats()
}

#[test]
fn a_tls_client_that_closes_without_close_notify_has_closed() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").expect("handshake");
    tls_round_trip(&mut client, b"hello").unwrap();
    // No close_notify: the TCP socket is shut and dropped as it is.
    client.sock.shutdown(Shutdown::Both).unwrap();
    drop(client);
    let stats = wait_for_one_close(&server);
    assert_eq!(stats.closed(CloseReason::ClientClosed), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::HandlerError), 0, "{stats:?}");
    server.stop();
}

#[test]
fn a_tls_client_cut_off_in_the_middle_of_a_record_is_an_error() {
    let files = TlsFiles::new();
    let server = start_tls_echo(Server::builder(), files.config());
    let mut client =
        tls_connect(server.local_addr().unwrap(), &files.client(), "localhost").expect("handshake");
    tls_round_trip(&mut client, b"hello").unwrap();
    // One more record, of which the server gets only the first half.
    client.conn.writer().write_all(b"cut short").unwrap();
    let mut record = Vec::new();
    while client.conn.wants_write() {
        client.conn.write_tls(&mut record).unwrap();
    }
    client.sock.write_all(&record[..record.len() / 2]).unwrap();
    client.sock.shutdown(Shutdown::Both).unwrap();
    drop(client);
    let stats = wait_for_one_close(&server);
    assert_eq!(stats.closed(CloseReason::HandlerError), 1, "{stats:?}");
    assert_eq!(stats.closed(CloseReason::ClientClosed), 0, "{stats:?}");
    server.stop();
}
