//! A partition: clients that vanish without a word once served (every packet to and from their
//! address dropped, as when a NAT forgets them or their machine is switched off). With TCP
//! keepalive on, the server must find them within twice its idle time, as `Builder::keepalive`
//! promises, whether their connections were quiet or had a reply in flight, and count them as
//! gone (`peer_reset`), not as handler errors; a client from another address is served on.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::common::tls::{tls_handshake, tls_round_trip, TlsFiles, TlsStream};
use super::common::{connect, connect_from, eventually, eventually_within, ip, round_trip};
use super::netns::{nft_hits, nft_input_rules};
use super::{describe, in_namespace, inet_addrs, SUMMARY};
use taskserve::io::AsyncWriteExt;
use taskserve::{Builder, CloseReason, Connection, Server};

/// The servers' keepalive idle time: probes after it, a second apart, three of them.
const KEEPALIVE: Duration = Duration::from_secs(3);
/// Clients of the echo server, quiet when they vanish.
const QUIET_TCP: usize = 20;
const QUIET_TLS: usize = 5;
/// Clients of the ticking server, which has a tick in flight to them when they vanish.
const TICKED: usize = 5;

#[test]
#[ignore = "needs root, unshare, nft and tc: bash .ci/run installs them"]
fn vanished_clients_are_found_by_keepalive_and_counted_as_gone_not_as_handler_errors() {
    in_namespace(
        "partition::vanished_clients_are_found_by_keepalive_and_counted_as_gone_not_as_handler_errors",
        Duration::from_secs(60),
        partition,
    );
}

/// Keepalive on, and an idle timeout far beyond it: keepalive must find the vanished
/// clients, not the idle timeout.
fn builder() -> Builder {
    Server::builder()
        .threads(1)
        .keepalive(KEEPALIVE)
        .idle_timeout(Duration::from_secs(60))
}

/// A server that pushes (a feed, a chat): writes a byte every 100 ms until a write fails. When
/// its client vanishes, a byte to it is always in flight, unacknowledged, and keepalive's
/// probes, which wait for a quiet connection, never start.
async fn ticking(mut conn: Connection) -> io::Result<()> {
    loop {
        conn.write_all(b".").await?;
        conn.flush().await?;
        smol::Timer::after(Duration::from_millis(100)).await;
    }
}

/// Serves 25 quiet clients (20 TCP, 5 TLS) and 5 ticked ones from 127.0.0.2 and one from
/// 127.0.0.1, drops every packet to and from 127.0.0.2, and checks that the servers close the
/// 30 in time and count them as gone.
fn partition() {
    let files = TlsFiles::new();
    let echo = builder()
        .listen_tcp("127.0.0.1:0")
        .listen_tls("127.0.0.1:0", files.config())
        .start(taskserve::echo)
        .expect("the echo server starts");
    let ticker = builder()
        .listen_tcp("127.0.0.1:0")
        .start(ticking)
        .expect("the ticking server starts");
    let addrs = inet_addrs(&echo);
    let far = ip("127.0.0.2");
    let quiet_tcp: Vec<TcpStream> = (0..QUIET_TCP)
        .map(|_| {
            let mut client = connect_from(far, addrs[0]).expect("connect from 127.0.0.2");
            round_trip(&mut client, b"hello");
            client
        })
        .collect();
    let quiet_tls: Vec<TlsStream> = (0..QUIET_TLS)
        .map(|_| {
            let tcp = connect_from(far, addrs[1]).expect("connect from 127.0.0.2");
            let mut client = tls_handshake(tcp, &files.client(), "localhost").expect("handshake");
            tls_round_trip(&mut client, b"hello").expect("a TLS round trip");
            client
        })
        .collect();
    let ticked: Vec<TcpStream> = (0..TICKED)
        .map(|_| {
            let mut client = connect_from(far, ticker.local_addr().unwrap()).expect("connect");
            client.read_exact(&mut [0]).expect("a first tick");
            client
        })
        .collect();
    let mut near = connect(addrs[0]);
    round_trip(&mut near, b"before");
    // So that the echo server's clients are quiet when they vanish: everything sent to them
    // acknowledged (their delayed ACKs out), which keepalive waits for.
    let ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
    assert!(eventually(|| unacknowledged(&ports) == 0));
    nft_input_rules(&[
        "ip saddr 127.0.0.2 counter drop".to_string(),
        "ip daddr 127.0.0.2 counter drop".to_string(),
    ]);
    let start = Instant::now();
    // Idle, then three probes a third of it apart: twice idle; and 2 s for a busy machine.
    let limit = KEEPALIVE * 2 + Duration::from_secs(2);
    let found = eventually_within(limit, || {
        echo.connections() == 1 && ticker.connections() == 0
    });
    let took = start.elapsed();
    round_trip(&mut near, b"after");
    drop(near);
    let quiet = eventually(|| echo.connections() == 0);
    let (echo_stats, ticker_stats) = (echo.stats(), ticker.stats());
    let text = format!(
        "echo {}; ticker {}",
        describe(&echo_stats),
        describe(&ticker_stats)
    );
    println!(
        "{SUMMARY} {} quiet clients ({} TCP, {} TLS) and {} with a tick in flight vanished; \
         found in {:.1} s with keepalive {KEEPALIVE:?}; nft dropped {} packets; {text}",
        quiet_tcp.len() + quiet_tls.len(),
        quiet_tcp.len(),
        quiet_tls.len(),
        ticked.len(),
        took.as_secs_f64(),
        nft_hits(),
    );
    assert!(
        found && quiet,
        "vanished clients still open after {limit:?}: {text}"
    );
    let vanished = (QUIET_TCP + QUIET_TLS) as u64;
    assert_eq!(echo_stats.accepted, vanished + 1, "{text}");
    assert_eq!(
        echo_stats.closed(CloseReason::PeerReset),
        vanished,
        "{text}"
    );
    assert_eq!(echo_stats.closed(CloseReason::ClientClosed), 1, "{text}");
    assert_eq!(echo_stats.closed_total(), echo_stats.accepted, "{text}");
    assert_eq!(ticker_stats.accepted, TICKED as u64, "{text}");
    assert_eq!(
        ticker_stats.closed(CloseReason::PeerReset),
        TICKED as u64,
        "{text}"
    );
    assert!(nft_hits() > 0, "the partition dropped no packet");
}

/// Bytes sent and not yet acknowledged (or not yet sent) on the established connections whose
/// local port is one of `ports`, from the kernel's table (`tx_queue` in /proc/net/tcp).
fn unacknowledged(ports: &[u16]) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    // Columns: sl, local_address (hex IP:port), rem_address, st (01 is ESTABLISHED),
    // tx_queue:rx_queue (hex), ...
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(columns.get(1)?.rsplit(':').next()?, 16).ok()?;
            if columns.get(3) != Some(&"01") || !ports.contains(&port) {
                return None;
            }
            u64::from_str_radix(columns.get(4)?.split(':').next()?, 16).ok()
        })
        .sum()
}
