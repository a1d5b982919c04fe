//! The PROXY protocol over real sockets: v1 and v2 headers built by hand, TLVs, LOCAL, sources
//! that are not trusted, headers that come late, partly or malformed, and TLS behind a header.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use taskserve::{Addr, ConnectionInfo, ProxyProtocol, Server};

fn start_proxied(proxy: ProxyProtocol) -> (Server, mpsc::Receiver<ConnectionInfo>) {
    let (report, reports) = mpsc::channel();
    let server = Server::builder()
        .threads(2)
        .proxy_protocol(proxy)
        .listen_tcp("127.0.0.1:0")
        .start(reporting_echo(report))
        .expect("start");
    (server, reports)
}

/// Whether the server has neither closed `stream` nor sent anything on it yet: a read would wait.
fn is_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let outcome = (&*stream).read(&mut [0; 1]);
    stream.set_nonblocking(false).unwrap();
    matches!(outcome, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn reported(reports: &mpsc::Receiver<ConnectionInfo>) -> ConnectionInfo {
    reports
        .recv_timeout(PATIENCE)
        .expect("the handler reports its connection")
}

#[test]
fn v1_header_names_the_client_and_no_payload_byte_is_lost() {
    let (server, reports) = start_proxied(ProxyProtocol::new());
    let mut client = connect(server.local_addr().unwrap());
    // The header and the first payload in one write: the server must read the header alone.
    let mut first = proxy_v1(addr("192.0.2.7:40000"), server.local_addr().unwrap());
    first.extend(b"hello");
    client.write_all(&first).unwrap();
    let mut reply = [0; 9];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GOT:hello");
    round_trip(&mut client, b"and more");
    let info = reported(&reports);
    assert_eq!(info.peer_addr, Addr::Inet(addr("192.0.2.7:40000")));
    let proxy = info.proxy.expect("ProxyInfo on a PROXY listener");
    assert_eq!(proxy.version, 1);
    assert_eq!(proxy.proxy_addr, client.local_addr().unwrap());
    assert_eq!(proxy.destination, Some(server.local_addr().unwrap()));
}

#[test]
fn v2_header_names_an_ipv6_client_and_gives_its_tlvs() {
    let (server, reports) = start_proxied(ProxyProtocol::new());
    let mut client = connect(server.local_addr().unwrap());
    let header = proxy_v2(
        Some((addr("[2001:db8::7]:40000"), addr("[2001:db8::1]:443"))),
        &[(0x01, b"h2"), (0x02, b"example.com"), (0x04, b"")],
    );
    client.write_all(&header).unwrap();
    round_trip(&mut client, b"hello");
    let info = reported(&reports);
    assert_eq!(info.peer_addr, Addr::Inet(addr("[2001:db8::7]:40000")));
    let proxy = info.proxy.unwrap();
    assert_eq!(proxy.version, 2);
    assert_eq!(proxy.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(proxy.authority.as_deref(), Some("example.com"));
    assert_eq!(proxy.tlvs.len(), 3);
}

#[test]
fn v2_header_sent_a_byte_at_a_time_is_read_exactly() {
    let (server, reports) = start_proxied(ProxyProtocol::new());
    let mut client = connect(server.local_addr().unwrap());
    let mut bytes = proxy_v2(
        Some((addr("192.0.2.9:1234"), server.local_addr().unwrap())),
        &[],
    );
    bytes.extend(b"x");
    // Or the kernel may gather the bytes into fewer segments than writes.
    client.set_nodelay(true).unwrap();
    for b in &bytes {
        client.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut reply = [0; 5];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GOT:x");
    assert_eq!(
        reported(&reports).peer_addr,
        Addr::Inet(addr("192.0.2.9:1234"))
    );
}

#[test]
fn v2_local_and_v1_unknown_keep_the_socket_address() {
    let (server, reports) = start_proxied(ProxyProtocol::new());
    for header in [proxy_v2(None, &[]), b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut client = connect(server.local_addr().unwrap());
        client.write_all(&header).unwrap();
        round_trip(&mut client, b"health");
        let info = reported(&reports);
        assert_eq!(info.peer_addr, Addr::Inet(client.local_addr().unwrap()));
    }
}

#[test]
fn a_connection_from_an_untrusted_source_is_closed_at_once() {
    // A header deadline longer than the wait for the close: it is not what closes the client.
    let proxy = ProxyProtocol::new()
        .trusted_sources(["127.0.0.2".parse().unwrap()])
        .timeout(PATIENCE * 3);
    let (server, reports) = start_proxied(proxy);
    let mut untrusted = connect_from(ip("127.0.0.3"), server.local_addr().unwrap()).unwrap();
    let _ = untrusted.write_all(&proxy_v1(addr("192.0.2.1:1"), server.local_addr().unwrap()));
    let took = wait_for_silent_close(&mut untrusted, PATIENCE).expect("closed unserved");
    println!("untrusted source closed in {took:?}");

    let mut trusted = connect_from(ip("127.0.0.2"), server.local_addr().unwrap()).unwrap();
    trusted
        .write_all(&proxy_v1(addr("192.0.2.1:1"), server.local_addr().unwrap()))
        .unwrap();
    round_trip(&mut trusted, b"ok");
    assert_eq!(
        reported(&reports).peer_addr,
        Addr::Inet(addr("192.0.2.1:1"))
    );
}

#[test]
fn slow_and_partial_headers_are_closed_at_the_deadline_while_others_are_served() {
    // Long enough that on a busy machine the prompt client is surely served before it runs out
    // for the stalled ones: the test checks that, rather than assume it.
    let timeout = Duration::from_secs(2);
    let (server, _reports) = start_proxied(ProxyProtocol::new().timeout(timeout));
    // Before the connects: the server's deadlines run from its accepts, some time after.
    let started = Instant::now();
    let mut silent = connect(server.local_addr().unwrap());
    let mut partial = connect(server.local_addr().unwrap());
    partial.write_all(b"PROXY TCP4 192.0.2.1 ").unwrap();
    let mut partial_v2 = connect(server.local_addr().unwrap());
    partial_v2
        .write_all(&proxy_v2(Some((addr("192.0.2.1:1"), addr("192.0.2.2:2"))), &[])[..20])
        .unwrap();
    // Meanwhile, a client with a whole header is served at once.
    let mut prompt = connect(server.local_addr().unwrap());
    prompt
        .write_all(&proxy_v1(addr("192.0.2.5:5"), server.local_addr().unwrap()))
        .unwrap();
    round_trip(&mut prompt, b"not delayed");
    let served_at = started.elapsed();
    for (n, stalled) in [&mut silent, &mut partial, &mut partial_v2]
        .iter()
        .enumerate()
    {
        assert!(
            is_open(stalled),
            "stalled client {n} closed before the prompt one was served ({served_at:?})"
        );
    }
    for stalled in [&mut silent, &mut partial, &mut partial_v2] {
        wait_for_silent_close(stalled, PATIENCE).expect("closed at the deadline");
        let at = started.elapsed();
        assert!(at >= timeout && at < timeout * 5, "closed after {at:?}");
    }
    round_trip(&mut prompt, b"still served");
}

/// A thousand PROXY headers, each malformed by construction, and complete: nothing a server could
/// wait for more bytes of. The fixed bad ones; valid ones with a byte changed where no value
/// but the original is right (any byte but the newline of v1, which is ASCII: a byte above 127;
/// in v2, the signature, or the version); and random bytes behind `PROXY ` (not `T` or `U`,
/// which might start a protocol) or behind a real v2 signature with an address family no
/// version has, and the length of what follows. The parser's own unit test
/// (src/transport/proxy.rs) tries 50,000 more without sockets.
fn malformed_headers() -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(15);
    let valid = [
        proxy_v1(addr("192.0.2.1:1"), addr("192.0.2.2:2")),
        proxy_v2(
            Some((addr("192.0.2.1:1"), addr("192.0.2.2:2"))),
            &[(0x02, b"a.example")],
        ),
    ];
    let fixed: [&[u8]; 6] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 999.0.0.1 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 99999 2\r\n",
        b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX\n",
        &[b'P'; 200],
    ];
    (0..1000)
        .map(|n| match n {
            n if n < fixed.len() => fixed[n].to_vec(),
            n if n % 4 == 0 => {
                let mut header = valid[0].clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..header.len() - 1);
                    header[at] = rng.u8(128..);
                }
                header
            }
            n if n % 4 == 1 => {
                let mut header = valid[1].clone();
                let at = rng.usize(..13);
                header[at] = if at == 12 {
                    // The version is the high nibble: anything but 2.
                    let version = [0, 1, 3, 4, 15][rng.usize(..5)];
                    version << 4 | rng.u8(..16)
                } else {
                    header[at].wrapping_add(rng.u8(1..))
                };
                header
            }
            n if n % 4 == 2 => {
                let mut header = b"PROXY ".to_vec();
                header.push(loop {
                    let b = rng.u8(..);
                    if b != b'T' && b != b'U' && b != b'\n' {
                        break b;
                    }
                });
                header.extend((0..rng.usize(..120)).map(|_| rng.u8(..)));
                // An end for the line (unless a random newline came first, or it is too long
                // for one): then there is a whole line to reject.
                header.extend(b"\r\n");
                header
            }
            _ => {
                let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
                let rest: Vec<u8> = (0..rng.usize(..120)).map(|_| rng.u8(..)).collect();
                // Any version and command; a family of 4 or more, which none has.
                header.push(rng.u8(..));
                header.push(rng.u8(0x40..));
                header.extend((rest.len() as u16).to_be_bytes());
                header.extend(rest);
                header
            }
        })
        .collect()
}

#[test]
fn malformed_headers_are_closed_and_the_server_keeps_serving() {
    // A deadline longer than the wait for each close below: a header rejected for what it says
    // is closed at once, not when the deadline comes.
    let (server, reports) = start_proxied(ProxyProtocol::new().timeout(PATIENCE * 3));
    let started = Instant::now();
    for (n, bytes) in malformed_headers().iter().enumerate() {
        let mut client = connect(server.local_addr().unwrap());
        // The server may close before it has everything: a reset here is fine.
        let _ = client.write_all(bytes);
        // No half-close: the server must close by itself, without a byte of reply.
        wait_for_silent_close(&mut client, PATIENCE).unwrap_or_else(|e| {
            panic!(
                "malformed header {n}, {:?}: {e}",
                String::from_utf8_lossy(bytes)
            )
        });
    }
    println!("1,000 malformed headers closed in {:?}", started.elapsed());
    assert!(reports.try_recv().is_err(), "a handler ran");
    assert!(
        eventually(|| server.connections() == 0),
        "{} still open",
        server.connections()
    );
    let mut client = connect(server.local_addr().unwrap());
    client
        .write_all(&proxy_v1(addr("192.0.2.1:1"), server.local_addr().unwrap()))
        .unwrap();
    round_trip(&mut client, b"still serving");
}

/// The fixed 16 bytes of a v2 header that announces `length` bytes more, and none of them.
fn v2_announcing(length: u16) -> Vec<u8> {
    let mut header = proxy_v2(None, &[]);
    header[14..16].copy_from_slice(&length.to_be_bytes());
    header
}

#[test]
fn a_v2_header_announcing_more_than_a_load_balancer_sends_is_closed_at_once() {
    // A deadline beyond the test's patience: only the announced length can close it in time.
    let (server, reports) = start_proxied(ProxyProtocol::new().timeout(Duration::from_secs(600)));
    let mut greedy = connect(server.local_addr().unwrap());
    greedy.write_all(&v2_announcing(u16::MAX)).unwrap();
    wait_for_close(&mut greedy, PATIENCE).expect("closed for the length it announced");

    // A TLV as long as HAProxy allows one to be (1,024 bytes) is served.
    let tlv = vec![b'u'; 1024];
    let mut client = connect(server.local_addr().unwrap());
    let source = addr("192.0.2.5:5000");
    let header = proxy_v2(
        Some((source, server.local_addr().unwrap())),
        &[(0xE0, &tlv)],
    );
    client.write_all(&header).unwrap();
    round_trip(&mut client, b"served");
    let info = reported(&reports);
    assert_eq!(info.peer_addr, Addr::Inet(source));
    assert_eq!(info.proxy.unwrap().tlvs, vec![(0xE0, tlv)]);
}

#[test]
fn a_refused_header_ends_in_a_plain_close_not_a_reset() {
    // Each sent in one write, so that it has all arrived when the server reads: a refused
    // header used to leave what followed it (or what was peeked at) unread, and closing a
    // socket with unread bytes resets the connection.
    let mut announcing_too_much = v2_announcing(u16::MAX);
    announcing_too_much.extend(b"more");
    let refused: [&[u8]; 5] = [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 99999\r\nhello",
        &[b"PROXY ", &[b'A'; 200][..]].concat(),
        &announcing_too_much,
        b"\x16\x03\x01\x00\x05hello",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    let (server, reports) = start_proxied(ProxyProtocol::new().timeout(PATIENCE * 3));
    for bytes in refused {
        let mut client = connect(server.local_addr().unwrap());
        client.write_all(bytes).unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let outcome = client.read(&mut [0; 64]);
        let what = String::from_utf8_lossy(bytes);
        assert!(matches!(outcome, Ok(0)), "{what:?}: {outcome:?}");
    }
    assert!(reports.try_recv().is_err(), "a handler ran");
}

#[test]
fn a_thousand_v2_headers_announcing_64_kib_leave_no_memory_behind() {
    let args = ["--proxy-protocol", "--proxy-timeout", "600", "--quiet"];
    let server = EchoProcess::start(&args);
    let before = server.rss_kib();
    let mut greedy: Vec<_> = (0..1000)
        .map(|_| {
            let mut stream = connect(server.addr);
            stream.write_all(&v2_announcing(u16::MAX)).unwrap();
            stream
        })
        .collect();
    for stream in &mut greedy {
        wait_for_close(stream, PATIENCE).expect("closed for the length it announced");
    }
    let grown = server.rss_kib().saturating_sub(before);
    // Reserving each announced 64 KiB took about 70 MB, and most of it stayed.
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
}

#[test]
fn without_the_option_a_header_is_data_like_any_other() {
    let server = start_echo();
    let mut client = connect(server.local_addr().unwrap());
    client.write_all(b"PROXY UNKNOWN\r\n").unwrap();
    let mut reply = [0; 19];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GOT:PROXY UNKNOWN\r\n");
}

#[cfg(feature = "tls")]
#[test]
fn tls_handshake_follows_the_header() {
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, StreamOwned};
    use taskserve::rustls;

    let files = common::tls::TlsFiles::new();
    let (report, reports) = mpsc::channel();
    let server = Server::builder()
        .threads(2)
        .proxy_protocol(ProxyProtocol::new())
        .listen_tls("127.0.0.1:0", files.config())
        .start(reporting_echo(report))
        .unwrap();
    let mut tcp = connect(server.local_addr().unwrap());
    tcp.write_all(&proxy_v2(
        Some((addr("192.0.2.8:8000"), server.local_addr().unwrap())),
        &[],
    ))
    .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(files.client(), name).unwrap();
    conn.complete_io(&mut tcp).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    common::tls::tls_round_trip(&mut tls, b"secret").unwrap();
    let info = reported(&reports);
    assert_eq!(info.peer_addr, Addr::Inet(addr("192.0.2.8:8000")));
    assert!(info.tls.is_some());
}

#[test]
fn echo_logs_the_client_from_the_header_not_the_proxy() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.env("RUST_LOG", "info");
    let mut server = EchoProcess::start_with(command, &["--proxy-protocol", "--threads", "1"]);
    let mut log = server.stderr_lines();
    let mut client = connect(server.addr);
    client
        .write_all(&proxy_v1(addr("192.0.2.7:40000"), server.addr))
        .unwrap();
    round_trip(&mut client, b"hello");
    drop(client);
    let from = log.find(|line| line.contains("Connection from"));
    assert!(from.contains("Connection from 192.0.2.7:40000"), "{from}");
    let closed = log.find(|line| line.contains("Connection closed"));
    assert!(
        closed.contains("Connection closed: 192.0.2.7:40000"),
        "{closed}"
    );
}

#[test]
fn echo_proxy_from_takes_a_list_of_networks() {
    let (code, _, stderr) = run_echo(&["--proxy-from", "10.0.0.0/8,bad"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = run_echo(&["--port", "0", "--proxy-from", "10.0.0.0/8"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("--proxy-from needs --proxy-protocol or --proxy-port"),
        "{stderr}"
    );
}

/// `--proxy-port`: a PROXY listener beside a plain one, in one process, each with its own rule.
#[test]
fn echo_proxy_port_expects_the_header_there_and_only_there() {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo"));
    command.env("RUST_LOG", "info");
    let mut server = EchoProcess::start_with(command, &["--proxy-port", "0", "--threads", "1"]);
    let line = server.next_line();
    let proxied: std::net::SocketAddr = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.strip_suffix(" (proxy)"))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("a line for the PROXY listener: {line:?}"));
    let mut log = server.stderr_lines();

    // On --proxy-port the header names the client, and no payload byte is lost.
    let mut client = connect(proxied);
    client
        .write_all(&proxy_v1(addr("192.0.2.7:40000"), proxied))
        .unwrap();
    round_trip(&mut client, b"hello");
    let from = log.find(|line| line.contains("Connection from"));
    assert!(from.contains("Connection from 192.0.2.7:40000"), "{from}");
    // There, a client without a header is closed at once, with nothing echoed.
    let mut bare = connect(proxied);
    bare.write_all(b"hello\r\n").unwrap();
    let (echoed, _) = read_to_close(&mut bare);
    assert!(echoed.is_empty(), "{:?}", String::from_utf8_lossy(&echoed));
    // On --port, a header is data like any other.
    let mut plain = connect(server.addr);
    exchange(&mut plain, b"PROXY UNKNOWN\r\n", b"GOT:PROXY UNKNOWN\r\n");
}
