//! The misbehaving clients, one task per kind of fault, each one attempt after another with a
//! pause between, until the soak's end. Each attempt has an outcome the server promises
//! (operations.md, "Limits and behaviour"): a stalled or cut-off client is closed by the
//! server, within its timeout; a reset or garbage harms no one else. An attempt whose outcome
//! differs (above all: a client the server never closed) counts as unexpected, with the first
//! message of each kind.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};

use super::{proxy_header, Listener, Rng, Soak, TRUSTED};
use crate::proto::{self, CONNECT_TIMEOUT};
use crate::tls::Stream;

/// Pause between two attempts of one task: a few hundred faults a second in all.
const PAUSE: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// TLS: the whole ClientHello, the server's first answer, then a reset.
    TlsResetMidHandshake,
    /// TLS: half a ClientHello, then nothing.
    TlsStalledHandshake,
    /// PROXY: half a header, then nothing.
    StalledProxyHeader,
    /// Random bytes, to the TLS, PROXY and plain listeners in turn.
    Garbage,
    /// Half a ClientHello or half a PROXY header, then a half-close; or a half-close before
    /// any byte on the plain and Unix listeners.
    HalfClose,
    /// Writes and never reads, on the plain, Unix and TLS listeners in turn: the server must
    /// close it at its idle timeout.
    NeverReads,
    /// One round trip, 32 KiB more, then a reset, on the plain listener.
    ResetMidStream,
    /// A PROXY header from a source the listener does not trust.
    UntrustedProxy,
}

/// Tasks per fault: the stalled ones hold a connection for the server's timeout each (10 s in
/// soak.sh), so several run at once.
const TASKS: [(Fault, usize); 8] = [
    (Fault::TlsResetMidHandshake, 1),
    (Fault::TlsStalledHandshake, 6),
    (Fault::StalledProxyHeader, 6),
    (Fault::Garbage, 1),
    (Fault::HalfClose, 1),
    (Fault::NeverReads, 3),
    (Fault::ResetMidStream, 1),
    (Fault::UntrustedProxy, 1),
];

/// Attempts and unexpected outcomes by fault.
#[derive(Default)]
pub struct Tally(BTreeMap<String, (u64, u64, Option<String>)>);

impl Tally {
    /// Counts an attempt; prints the first few unexpected outcomes as they happen too, to find
    /// the server's side in its log.
    fn add(&mut self, fault: Fault, outcome: Result<(), String>) {
        if let Err(e) = &outcome {
            if self.unexpected() < 20 {
                eprintln!("soak: {fault:?}: {e}");
            }
        }
        let entry = self.0.entry(format!("{fault:?}")).or_default();
        entry.0 += 1;
        if let Err(e) = outcome {
            entry.1 += 1;
            entry.2.get_or_insert(e);
        }
    }

    pub fn attempts(&self) -> u64 {
        self.0.values().map(|e| e.0).sum()
    }

    pub fn unexpected(&self) -> u64 {
        self.0.values().map(|e| e.1).sum()
    }

    pub fn json(&self) -> Value {
        let mut v = json!({});
        for (fault, (attempts, unexpected, first)) in &self.0 {
            v[fault] = json!({"attempts": attempts, "unexpected": unexpected});
            if let Some(first) = first {
                v[fault]["first_unexpected"] = json!(first);
            }
        }
        v
    }
}

pub fn spawn(soak: &Arc<Soak>, tasks: &mut JoinSet<()>) {
    let mut n = 1000;
    for (fault, count) in TASKS {
        for _ in 0..count {
            n += 1;
            tasks.spawn(attempts(soak.clone(), fault, n));
        }
    }
}

async fn attempts(soak: Arc<Soak>, fault: Fault, task: u64) {
    let mut rng = Rng::new(task);
    let mut n = 0;
    while soak.running() {
        n += 1;
        let outcome = attempt(&soak, fault, n, &mut rng).await;
        soak.tally.faults.lock().unwrap().add(fault, outcome);
        tokio::time::sleep(PAUSE).await;
    }
}

async fn attempt(soak: &Soak, fault: Fault, n: u64, rng: &mut Rng) -> Result<(), String> {
    let hello = match fault {
        Fault::TlsResetMidHandshake | Fault::TlsStalledHandshake | Fault::HalfClose => {
            soak.tls.client_hello()
        }
        _ => Vec::new(),
    };
    let half_hello = &hello[..hello.len() / 2];
    let header = proxy_header(n, soak.proxy, false);
    let half_header = &header[..header.len() / 2];
    let within = soak.close_limit;
    match fault {
        Fault::TlsResetMidHandshake => reset_mid_handshake(soak, &hello).await,
        Fault::TlsStalledHandshake => {
            let mut s = connect(soak, Listener::Tls, TRUSTED).await?;
            send(&mut s, half_hello).await?;
            closed_by_server(s, within).await
        }
        Fault::StalledProxyHeader => {
            let mut s = connect(soak, Listener::Proxy, TRUSTED).await?;
            send(&mut s, half_header).await?;
            closed_by_server(s, within).await
        }
        Fault::Garbage => garbage(soak, n, rng).await,
        Fault::HalfClose => {
            let (listener, first) = match n % 4 {
                0 => (Listener::Tls, half_hello),
                1 => (Listener::Proxy, half_header),
                2 => (Listener::Tcp, &[][..]),
                _ => (Listener::Unix, &[][..]),
            };
            let mut s = connect(soak, listener, TRUSTED).await?;
            send(&mut s, first).await?;
            s.shutdown()
                .await
                .map_err(|e| format!("half-closing: {e}"))?;
            closed_by_server(s, within).await
        }
        Fault::NeverReads => {
            let listener = [Listener::Tcp, Listener::Unix, Listener::Tls][(n % 3) as usize];
            let s = soak
                .connect(listener, TRUSTED, n)
                .await
                .map_err(|e| format!("connecting: {e:?}"))?;
            write_until_closed(s, within).await
        }
        Fault::ResetMidStream => {
            let mut s = soak
                .connect(Listener::Tcp, TRUSTED, n)
                .await
                .map_err(|e| format!("connecting: {e:?}"))?;
            proto::ping(&mut s, deadline(CONNECT_TIMEOUT))
                .await
                .map_err(|e| format!("a ping before the reset: {e:?}"))?;
            send(&mut s, &proto::pattern(32 * 1024)).await?;
            reset(s)
        }
        Fault::UntrustedProxy => {
            let mut s = connect(soak, Listener::Proxy, Ipv4Addr::new(127, 0, 0, 9)).await?;
            // Closed at once, whether the header has come or not.
            let _ = send(&mut s, &header).await;
            closed_by_server(s, within).await
        }
    }
}

/// The whole ClientHello, the server's first answer, then a reset.
async fn reset_mid_handshake(soak: &Soak, hello: &[u8]) -> Result<(), String> {
    let mut s = connect(soak, Listener::Tls, TRUSTED).await?;
    send(&mut s, hello).await?;
    let mut answer = [0u8; 1];
    let read = timeout_at(deadline(CONNECT_TIMEOUT), s.read(&mut answer)).await;
    match read {
        Ok(Ok(1)) => reset(s),
        Ok(Ok(_)) => Err("the server closed before answering a ClientHello".into()),
        Ok(Err(e)) => Err(format!("no answer to a ClientHello: {e}")),
        Err(_) => Err("no answer to a ClientHello in time".into()),
    }
}

/// Random bytes: the TLS and PROXY listeners close at once (or at their deadline, for bytes
/// that look like the start of a record or header); the plain one echoes them all.
async fn garbage(soak: &Soak, n: u64, rng: &mut Rng) -> Result<(), String> {
    let len = rng.between(1, 4096) as usize;
    let garbage = rng.bytes(len);
    let listener = [Listener::Tls, Listener::Proxy, Listener::Tcp][(n % 3) as usize];
    let mut s = connect(soak, listener, TRUSTED).await?;
    send(&mut s, &garbage).await?;
    if listener != Listener::Tcp {
        return closed_by_server(s, soak.close_limit).await;
    }
    // All of it comes back, behind `GOT:` prefixes.
    s.shutdown()
        .await
        .map_err(|e| format!("half-closing: {e}"))?;
    let got = read_to_end(s, soak.close_limit).await?;
    (got >= len)
        .then_some(())
        .ok_or(format!("{len} bytes of garbage sent, {got} came back"))
}

fn deadline(limit: Duration) -> Instant {
    Instant::now() + limit
}

async fn connect(soak: &Soak, listener: Listener, source: Ipv4Addr) -> Result<Stream, String> {
    soak.connect_raw(listener, source)
        .await
        .map_err(|e| format!("connecting to {listener:?}: {e}"))
}

async fn send(s: &mut Stream, bytes: &[u8]) -> Result<(), String> {
    let sent = timeout_at(deadline(CONNECT_TIMEOUT), s.write_all(bytes)).await;
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("sending: {e}")),
        Err(_) => Err("sending: timed out".into()),
    }
}

/// Closes with a reset (SO_LINGER 0): the server sees ECONNRESET, not an end of stream.
fn reset(s: Stream) -> Result<(), String> {
    match s {
        Stream::Tcp(tcp) => tcp.set_zero_linger().map_err(|e| format!("SO_LINGER: {e}")),
        _ => Err("a reset needs a plain TCP stream".into()),
    }
}

/// Reads (and drops) what comes until the server closes, by end of stream or a reset; an
/// error if it has not closed `within`.
async fn closed_by_server(s: Stream, within: Duration) -> Result<(), String> {
    read_to_end(s, within).await.map(|_| ())
}

async fn read_to_end(mut s: Stream, within: Duration) -> Result<usize, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    let read = timeout_at(deadline(within), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) if gone(&e) => return Ok(total),
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    });
    read.await
        .unwrap_or_else(|_| Err(format!("the server did not close it within {within:?}")))
}

/// Writes and never reads: the server's replies fill the socket buffers, its write waits, and
/// its idle timeout must close the connection, which the next write sees.
async fn write_until_closed(mut s: Stream, within: Duration) -> Result<(), String> {
    let chunk = proto::pattern(64 * 1024);
    let written = timeout_at(deadline(within), async {
        loop {
            if let Err(e) = s.write_all(&chunk).await {
                return e;
            }
            if let Err(e) = s.flush().await {
                return e;
            }
        }
    });
    match written.await {
        Ok(e) if gone(&e) => Ok(()),
        Ok(e) => Err(format!("writing: {e}")),
        Err(_) => Err(format!(
            "a client that never reads was not closed within {within:?}"
        )),
    }
}

/// How a client sees the server close: an end of stream, a reset, or a broken pipe.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}
