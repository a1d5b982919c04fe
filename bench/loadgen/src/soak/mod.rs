//! A long mixed soak of one server with four listeners (plain TCP, TLS, a Unix socket, and
//! TCP behind a PROXY header): well-behaved clients that check every byte they get back
//! (`clients.rs`) beside misbehaving ones (`faults.rs`), the metrics endpoint scraped every
//! second and the server's memory, descriptors and threads sampled every 10 s (`watch.rs`).
//! Once the time is up and every client is gone, it checks that nothing was lost, that the
//! server's counts add up, and that the server's resources came back to where they were
//! after the warm-up; `checks.rs` says how.

mod checks;
mod clients;
mod faults;
mod watch;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};

use crate::proto::{self, Errors, Failure};
use crate::tls::{Stream, Tls};
use crate::Opts;

/// The server's listeners besides `--addr` (plain TCP), as `--tls-addr`, `--unix`,
/// `--proxy-addr` and `--metrics` give them, and the longest time it takes to close a client
/// that stalls (`--server-timeout`: the longest of its idle, TLS handshake and PROXY
/// timeouts).
#[derive(Default)]
pub struct Targets {
    pub tls: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub proxy: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub server_timeout: Option<Duration>,
}

/// What every client task shares: where to connect, until when to start new sessions, and the
/// tallies.
pub struct Soak {
    tcp: SocketAddr,
    tls_addr: SocketAddr,
    unix: PathBuf,
    proxy: SocketAddr,
    tls: Tls,
    /// No session starts after it.
    end: Instant,
    /// The longest the server takes to close a stalled client, plus a margin for a busy
    /// machine: a client not closed by then found a hang.
    close_limit: Duration,
    tally: Tally,
    scrapes: Mutex<watch::Scrapes>,
}

/// What the clients counted.
#[derive(Default)]
struct Tally {
    /// Connections made (TCP connects and Unix connects that succeeded), faulty ones included:
    /// each is one the server must count as accepted.
    connects: AtomicU64,
    /// Payload bytes the well-behaved clients sent, and those that came back checked.
    sent: AtomicU64,
    verified: AtomicU64,
    sessions: AtomicU64,
    /// What went wrong for well-behaved clients.
    errors: Mutex<Errors>,
    faults: Mutex<faults::Tally>,
}

/// Which of the server's listeners a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Tcp,
    Tls,
    Unix,
    Proxy,
}

pub const LISTENERS: [Listener; 4] = [
    Listener::Tcp,
    Listener::Tls,
    Listener::Unix,
    Listener::Proxy,
];

/// The source address of PROXY listener clients, the only one its `--proxy-from` trusts.
pub const TRUSTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

pub async fn run(o: &Opts) -> Value {
    let soak = match Soak::new(o) {
        Ok(soak) => Arc::new(soak),
        Err(e) => return json!({"ok": false, "failures": [e]}),
    };
    let pid = o.pid.expect("checked by parse");
    let metrics = o.soak.metrics.expect("checked by parse");
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let idle = watch::sample(pid, started, &soak);
    println!("{}", watch::HEADER);
    println!("{}", idle.row());
    let scraper = tokio::spawn(watch::scrape_every_second(
        metrics,
        soak.clone(),
        stop.clone(),
    ));
    let sampler = tokio::spawn(watch::sample_every_10s(
        pid,
        started,
        soak.clone(),
        stop.clone(),
    ));
    let mut lanes = JoinSet::new();
    clients::spawn(&soak, &mut lanes);
    faults::spawn(&soak, &mut lanes);
    while let Some(r) = lanes.join_next().await {
        r.expect("a client task panicked");
    }
    stop.store(true, Relaxed);
    scraper.await.expect("the scraper panicked");
    let mut samples = sampler.await.expect("the sampler panicked");
    // The load is over: the server must get back to no connection open.
    let last = watch::quiet(metrics, soak.close_limit).await;
    // A connection is counted closed just before its socket is: give the last ones a moment.
    watch::descriptors_back(pid, idle.fds).await;
    let end = watch::sample(pid, started, &soak);
    println!("{}  (end: all clients gone)", end.row());
    samples.insert(0, idle);
    samples.push(end);
    checks::verdict(o, &soak, &samples, last)
}

impl Soak {
    fn new(o: &Opts) -> Result<Soak, String> {
        let t = &o.soak;
        let server_timeout = t.server_timeout.expect("checked by parse");
        Ok(Soak {
            tcp: o.addr,
            tls_addr: t.tls.expect("checked by parse"),
            unix: t.unix.clone().expect("checked by parse"),
            proxy: t.proxy.expect("checked by parse"),
            tls: o
                .tls
                .clone()
                .ok_or("soak needs --tls-ca FILE or --tls-insecure")?,
            end: Instant::now() + o.duration,
            // An eighth over the idle timeout (see operations.md), and 10 s for a busy machine.
            close_limit: server_timeout + server_timeout / 8 + Duration::from_secs(10),
            tally: Tally::default(),
            scrapes: Mutex::default(),
        })
    }

    fn running(&self) -> bool {
        Instant::now() < self.end
    }

    /// A connection to `listener`, before any byte is sent: for TLS, the TCP connection; for
    /// PROXY, without its header.
    async fn connect_raw(&self, listener: Listener, source: Ipv4Addr) -> io::Result<Stream> {
        let deadline = Instant::now() + proto::CONNECT_TIMEOUT;
        let stream = match listener {
            Listener::Unix => {
                let connected = timeout_at(deadline, UnixStream::connect(&self.unix)).await;
                Stream::Unix(connected.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))?)
            }
            Listener::Tcp => Stream::Tcp(proto::connect_from(source, self.tcp, deadline).await?),
            Listener::Tls => {
                Stream::Tcp(proto::connect_from(source, self.tls_addr, deadline).await?)
            }
            Listener::Proxy => {
                Stream::Tcp(proto::connect_from(source, self.proxy, deadline).await?)
            }
        };
        self.tally.connects.fetch_add(1, Relaxed);
        Ok(stream)
    }

    /// A connection to `listener` ready for payload: TLS handshaken, PROXY header sent (v1
    /// or v2 as `n` is even or odd).
    async fn connect(
        &self,
        listener: Listener,
        source: Ipv4Addr,
        n: u64,
    ) -> Result<Stream, Failure> {
        let stream = self
            .connect_raw(listener, source)
            .await
            .map_err(Failure::Connect)?;
        let deadline = Instant::now() + proto::CONNECT_TIMEOUT;
        match (listener, stream) {
            (Listener::Tls, Stream::Tcp(tcp)) => {
                proto::secure(tcp, Some(&self.tls), deadline).await
            }
            (Listener::Proxy, mut stream) => {
                let header = proxy_header(n, self.proxy, n % 2 == 1);
                let sent = timeout_at(
                    deadline,
                    tokio::io::AsyncWriteExt::write_all(&mut stream, &header),
                )
                .await;
                match sent {
                    Ok(Ok(())) => Ok(stream),
                    Ok(Err(e)) => Err(Failure::Reset(format!("sending the PROXY header: {e}"))),
                    Err(_) => Err(Failure::Timeout),
                }
            }
            (_, stream) => Ok(stream),
        }
    }
}

/// A PROXY header for a client at 192.0.2.x (TEST-NET-1), a made-up client behind a load
/// balancer: v1 text, or v2 binary (`PROXY`, TCP over IPv4).
pub fn proxy_header(n: u64, to: SocketAddr, v2: bool) -> Vec<u8> {
    let client = Ipv4Addr::new(192, 0, 2, 1 + (n % 250) as u8);
    let client_port = 1024 + (n % 60_000) as u16;
    let SocketAddr::V4(to) = to else {
        panic!("the PROXY listener is on IPv4 loopback");
    };
    if !v2 {
        let (ip, port) = (to.ip(), to.port());
        return format!("PROXY TCP4 {client} {ip} {client_port} {port}\r\n").into_bytes();
    }
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend(client.octets());
    header.extend(to.ip().octets());
    header.extend(client_port.to_be_bytes());
    header.extend(to.port().to_be_bytes());
    header
}

/// A small fast generator (xorshift64*) for sizes and choices, seeded per client task so that
/// runs differ but each task's sequence is its own.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng((seed.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ time | 1)
    }

    /// A number in `range` (inclusive).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        low + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (high - low + 1)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.between(0, 255) as u8).collect()
    }
}
