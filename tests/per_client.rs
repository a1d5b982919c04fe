//! The per-client connection limit over real sockets: IPv4 clients with addresses of their own
//! (127.0.0.2, 127.0.0.3), IPv6 clients grouped by their /64, IPv4-mapped clients counted as
//! IPv4, and clients named by a PROXY header.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use common::*;
use taskserve::{ProxyProtocol, Server};

/// Whether the server closes `client` without serving it: a served one has its byte echoed.
fn is_refused(client: &mut TcpStream) -> bool {
    let _ = client.write_all(b"x");
    match wait_for_silent_close(client, PATIENCE) {
        Ok(_) => true,
        Err(e) => {
            println!("not refused: {e}");
            false
        }
    }
}

#[test]
fn ipv4_client_past_its_limit_is_refused_while_another_is_served() {
    let server = start_echo_with(Server::builder().threads(2).max_connections_per_ip(2));
    let local = server.local_addr().unwrap();
    let mut first = connect_from(ip("127.0.0.2"), local).unwrap();
    let mut second = connect_from(ip("127.0.0.2"), local).unwrap();
    round_trip(&mut first, b"one");
    round_trip(&mut second, b"two");
    let mut third = connect_from(ip("127.0.0.2"), local).unwrap();
    assert!(is_refused(&mut third), "a third from 127.0.0.2 is refused");
    let mut other = connect_from(ip("127.0.0.3"), local).unwrap();
    round_trip(&mut other, b"another client");
    // One closes: its client may connect again.
    drop(first);
    assert!(eventually(|| server.connections() == 2));
    let mut again = connect_from(ip("127.0.0.2"), local).unwrap();
    round_trip(&mut again, b"again");
    round_trip(&mut second, b"still served");
}

#[test]
fn ipv4_mapped_clients_of_a_dual_stack_listener_over_ipv6_count_as_ipv4() {
    require_ipv6_loopback();
    let server = Server::builder()
        .threads(2)
        .max_connections_per_ip(1)
        .listen_tcp("[::]:0")
        .start(taskserve::echo)
        .expect("the server starts on [::]:0");
    let to_v4 = SocketAddr::new(ip("127.0.0.1"), server.local_addr().unwrap().port());
    let mut first = connect_from(ip("127.0.0.2"), to_v4).unwrap();
    round_trip(&mut first, b"mapped");
    let mut second = connect_from(ip("127.0.0.2"), to_v4).unwrap();
    assert!(is_refused(&mut second));
    let mut other = connect_from(ip("127.0.0.3"), to_v4).unwrap();
    round_trip(&mut other, b"other");
}

#[test]
fn client_past_its_limit_over_ipv6_loopback_is_refused() {
    require_ipv6_loopback();
    let server = Server::builder()
        .threads(2)
        .max_connections_per_ip(1)
        .listen_tcp("[::1]:0")
        .start(taskserve::echo)
        .expect("the server starts on [::1]:0");
    let mut first = connect_from(ip("::1"), server.local_addr().unwrap()).unwrap();
    round_trip(&mut first, b"v6");
    let mut second = connect_from(ip("::1"), server.local_addr().unwrap()).unwrap();
    assert!(is_refused(&mut second));
    drop(first);
    assert!(eventually(|| server.connections() == 0));
    let mut third = connect_from(ip("::1"), server.local_addr().unwrap()).unwrap();
    round_trip(&mut third, b"v6 again");
}

/// Connects through a pretend proxy on loopback, as `source`, with a v2 header.
fn connect_as(server: &Server, source: &str) -> TcpStream {
    let mut client = connect(server.local_addr().unwrap());
    let destination = if source.starts_with('[') {
        addr("[2001:db8::ffff]:25000")
    } else {
        addr("192.0.2.255:25000")
    };
    client
        .write_all(&proxy_v2(Some((addr(source), destination)), &[]))
        .unwrap();
    client
}

#[test]
fn clients_named_by_proxy_headers_are_counted_by_ipv4_address_and_ipv6_slash_64() {
    let server = start_echo_with(
        Server::builder()
            .threads(2)
            .proxy_protocol(ProxyProtocol::new())
            .max_connections_per_ip(1),
    );
    // All come from 127.0.0.1, the proxy: each is counted by the client its header names.
    let mut v4 = connect_as(&server, "192.0.2.1:1000");
    round_trip(&mut v4, b"v4");
    let mut mapped = connect_as(&server, "[::ffff:192.0.2.1]:1001");
    assert!(
        is_refused(&mut mapped),
        "IPv4-mapped counts as its IPv4 address"
    );
    let mut v6 = connect_as(&server, "[2001:db8:0:1::1]:1000");
    round_trip(&mut v6, b"v6");
    let mut same_64 = connect_as(&server, "[2001:db8:0:1:ffff::2]:1000");
    assert!(is_refused(&mut same_64), "one /64 is one client");
    let mut other_64 = connect_as(&server, "[2001:db8:0:2::1]:1000");
    round_trip(&mut other_64, b"another /64");
    let mut other_v4 = connect_as(&server, "192.0.2.2:1000");
    round_trip(&mut other_v4, b"another v4");
}

#[test]
fn ipv6_client_prefix_128_counts_each_address() {
    let server = start_echo_with(
        Server::builder()
            .threads(2)
            .proxy_protocol(ProxyProtocol::new())
            .max_connections_per_ip(1)
            .ipv6_client_prefix(128),
    );
    let mut a = connect_as(&server, "[2001:db8::1]:1000");
    round_trip(&mut a, b"a");
    let mut b = connect_as(&server, "[2001:db8::2]:1000");
    round_trip(&mut b, b"b");
}

#[test]
fn echo_max_connections_per_ip_refuses_past_the_limit() {
    let mut server = EchoProcess::start(&["--max-connections-per-ip", "1", "--threads", "1"]);
    let _log = server.stderr(); // a few lines: the pipe holds them
    let mut first = connect_from(ip("127.0.0.2"), server.addr).unwrap();
    round_trip(&mut first, b"one");
    let mut second = connect_from(ip("127.0.0.2"), server.addr).unwrap();
    assert!(is_refused(&mut second));
    let mut other = connect_from(ip("127.0.0.3"), server.addr).unwrap();
    round_trip(&mut other, b"other");
    let (code, _, stderr) = run_echo(&["--max-connections-per-ip", "0"]);
    assert_eq!(code, Some(2), "{stderr}");
}
