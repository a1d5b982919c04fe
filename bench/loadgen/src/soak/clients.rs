//! The well-behaved clients: on each of the four listeners, ping-pong sessions (up to 200
//! round trips of up to 16 KiB, then a clean close) and streaming sessions (up to 4 MiB
//! written while the echo is read, then a half-close and the server's end of stream). Every
//! payload byte sent is counted, and so is every byte that came back as it was sent; a
//! session that fails counts what it sent and did not get back as lost.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};

use super::{Listener, Rng, Soak, LISTENERS, TRUSTED};
use crate::flood::transfer;
use crate::proto::{self, Failure, PERIOD};
use crate::tls::Stream;

/// Ping-pong and streaming client tasks per listener.
const PINGPONG_TASKS: usize = 4;
const STREAM_TASKS: usize = 1;
/// The longest one round trip, one close or one streaming session may take.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(30);
const STREAM_LIMIT: Duration = Duration::from_secs(120);
/// Largest ping-pong message and streaming chunk.
const MAX_MESSAGE: usize = 16 * 1024;
const MAX_CHUNK: usize = 64 * 1024;

pub fn spawn(soak: &Arc<Soak>, tasks: &mut JoinSet<()>) {
    let mut n = 0;
    for listener in LISTENERS {
        for _ in 0..PINGPONG_TASKS {
            n += 1;
            tasks.spawn(sessions(soak.clone(), listener, n, Kind::PingPong));
        }
        for _ in 0..STREAM_TASKS {
            n += 1;
            tasks.spawn(sessions(soak.clone(), listener, n, Kind::Stream));
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    PingPong,
    Stream,
}

/// One client task: sessions one after another until the soak's end.
async fn sessions(soak: Arc<Soak>, listener: Listener, task: usize, kind: Kind) {
    let mut rng = Rng::new(task as u64);
    let pattern = proto::pattern(MAX_CHUNK.max(MAX_MESSAGE) + PERIOD);
    let mut n = 0u64;
    while soak.running() {
        n += 1;
        // Spread over four source addresses, but for the PROXY listener, which trusts one.
        let source = match listener {
            Listener::Proxy => TRUSTED,
            _ => Ipv4Addr::new(127, 0, 0, 1 + (n % 4) as u8),
        };
        let mut from = String::new();
        let outcome = match soak.connect(listener, source, n).await {
            Ok(stream) => {
                from = local_addr(&stream);
                match kind {
                    Kind::PingPong => ping_pong(&soak, stream, &pattern, &mut rng, n).await,
                    Kind::Stream => stream_session(&soak, stream, &pattern, &mut rng).await,
                }
            }
            Err(f) => Err(f),
        };
        soak.tally.sessions.fetch_add(1, Relaxed);
        if let Err(f) = outcome {
            let f = match f {
                Failure::Reset(e) => Failure::Reset(format!("{listener:?} from {from}: {e}")),
                f => f,
            };
            record(&soak, f);
            // A server that fails every client is not hammered in a tight loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Counts a failed session, and prints the first few as they happen, to find the server's side
/// in its log.
fn record(soak: &Soak, f: Failure) {
    let mut errors = soak.tally.errors.lock().unwrap();
    if errors.total() < 20 {
        eprintln!("soak: a well-behaved session failed: {f:?}");
    }
    errors.add(f);
}

/// Up to 200 round trips of 1 byte to 16 KiB, each message at its own offset of the
/// pattern; then a clean close: the client shuts down its side (TLS: close_notify) and
/// waits for the server's end of stream.
async fn ping_pong(
    soak: &Soak,
    mut s: Stream,
    pattern: &[u8],
    rng: &mut Rng,
    n: u64,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; 64 * 1024];
    let round_trips = rng.between(1, 200);
    for i in 0..round_trips {
        if !soak.running() {
            break;
        }
        let size = rng.between(1, MAX_MESSAGE as u64) as usize;
        let offset = ((n + i) % PERIOD as u64) as usize;
        let msg = &pattern[offset..offset + size];
        soak.tally.sent.fetch_add(size as u64, Relaxed);
        proto::roundtrip(&mut s, msg, &mut buf, Instant::now() + ROUND_TRIP_LIMIT).await?;
        soak.tally.verified.fetch_add(size as u64, Relaxed);
    }
    close(s, &mut buf).await
}

/// A client's clean close: shut its sending side down, then read the server's end of stream
/// (nothing more may come).
async fn close(mut s: Stream, buf: &mut [u8]) -> Result<(), Failure> {
    let deadline = Instant::now() + ROUND_TRIP_LIMIT;
    let io = |e: std::io::Error| Failure::Reset(format!("closing: {e}"));
    let closed = timeout_at(deadline, async {
        s.shutdown().await.map_err(io)?;
        match s.read(buf).await.map_err(io)? {
            0 => Ok(()),
            _ => Err(Failure::Mismatch("bytes came after the last reply")),
        }
    });
    closed.await.map_err(|_| Failure::Timeout)?
}

/// Writes 1 to 64 copies of a 1 to 64 KiB message while reading the echo, then half-closes
/// and waits for the server's end of stream.
async fn stream_session(
    soak: &Soak,
    s: Stream,
    pattern: &[u8],
    rng: &mut Rng,
) -> Result<(), Failure> {
    let size = rng.between(1024, MAX_CHUNK as u64) as usize;
    let count = rng.between(1, 64) as usize;
    let total = (size * count) as u64;
    soak.tally.sent.fetch_add(total, Relaxed);
    let deadline = Instant::now() + STREAM_LIMIT;
    let verified = transfer(s, &pattern[..size], count, true, deadline).await?;
    soak.tally.verified.fetch_add(verified, Relaxed);
    Ok(())
}

/// The client's own address, which the server's log names.
fn local_addr(s: &Stream) -> String {
    let tcp = match s {
        Stream::Tcp(tcp) => tcp,
        Stream::Tls(tls) => tls.get_ref().0,
        Stream::Unix(_) => return "a Unix socket".into(),
    };
    tcp.local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}
