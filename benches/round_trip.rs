//! Round trips through the library's echo server over loopback: one connection at a time, and
//! many connections with a request in flight on each. `cargo bench` runs them; a regression in
//! the per-message path shows here without the peers in `bench/`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use divan::counter::{BytesCount, ItemsCount};
use divan::Bencher;
use taskserve::Server;

fn main() {
    divan::main();
}

/// Starts the echo server as the benchmarks measure it: two worker threads, port 0.
fn start_server() -> Server {
    Server::builder()
        .threads(2)
        .start("127.0.0.1:0", taskserve::echo)
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
fn read_reply(stream: &mut TcpStream, len: usize, buf: &mut [u8]) {
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
    let mut client = connect(server.local_addr());
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
        .map(|_| connect(server.local_addr()))
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
