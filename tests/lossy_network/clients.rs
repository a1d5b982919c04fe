//! The clients: 200 over TCP and 50 over TLS at once, each a thread with a blocking socket,
//! sending random bytes in chunks and checking that each comes back byte for byte.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::common::tls::tls_handshake;
use super::common::{payload, read_payload, read_some};
use super::Scenario;
use taskserve::rustls::ClientConfig;

const TCP_CLIENTS: usize = 200;
const TLS_CLIENTS: usize = 50;
pub const MIB: usize = 1 << 20;

/// The most a client writes before it reads the echo back: less than the kernel's default
/// receive buffer (128 KiB), so that a client writing while not reading can never fill every
/// buffer on the way and wait for ever on a server that waits for it to read.
const CHUNK: usize = 64 * 1024;

/// The time a client waits for any one thing (a connection, a reply, room to write): far more
/// than the stalls of these networks, where a segment lost several times in a row waits 0.2,
/// 0.4, 0.8, 1.6... s for its retransmission; finite, so that a hang fails the test.
const CLIENT_PATIENCE: Duration = Duration::from_secs(30);

/// One client: its transport and how many bytes it sends (and must get back).
#[derive(Debug, Clone, Copy)]
struct Client {
    tls: bool,
    size: usize,
}

/// How a client ended: the payload bytes that came back byte for byte, and the error that cut
/// it short, if one did (a panic's message for bytes that came back wrong).
struct Ended {
    client: Client,
    echoed: usize,
    outcome: Result<(), String>,
    /// Whether the error is a clean close: a reset, an end of file or a refused connection,
    /// as opposed to a timeout (a hang) or wrong bytes.
    clean: bool,
}

/// The clients of a scenario, once they have all ended.
pub struct Load {
    ended: Vec<Ended>,
}

impl Load {
    /// Runs 200 TCP clients against `tcp` and 50 TLS ones against `tls`, all at once, each on
    /// its own thread; returns when all have ended, or panics after `scenario.deadline`.
    pub fn run(
        scenario: &Scenario,
        tcp: SocketAddr,
        tls: SocketAddr,
        config: &Arc<ClientConfig>,
    ) -> Load {
        let mut rng = fastrand::Rng::new();
        let clients: Vec<Client> = (0..TCP_CLIENTS + TLS_CLIENTS)
            .map(|n| Client {
                tls: n >= TCP_CLIENTS,
                // The first of each transport sends the most, 1 MiB.
                size: if n == 0 || n == TCP_CLIENTS {
                    MIB
                } else {
                    log_uniform(&mut rng, scenario.max_random)
                },
            })
            .collect();
        let (report, reports) = mpsc::channel();
        for (n, &client) in clients.iter().enumerate() {
            let (report, config, keepalive) = (report.clone(), Arc::clone(config), scenario.resets);
            let addr = if client.tls { tls } else { tcp };
            std::thread::spawn(move || {
                let mut echoed = 0;
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let config = client.tls.then_some(&config);
                    talk(addr, config, client.size, keepalive, &mut echoed)
                }));
                let _ = report.send((n, Ended::new(client, echoed, outcome)));
            });
        }
        let deadline = Instant::now() + scenario.deadline;
        let mut ended: Vec<Option<Ended>> = clients.iter().map(|_| None).collect();
        for _ in 0..clients.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match reports.recv_timeout(left) {
                Ok((n, end)) => ended[n] = Some(end),
                Err(_) => {
                    let waiting: Vec<_> =
                        (0..clients.len()).filter(|&n| ended[n].is_none()).collect();
                    panic!(
                        "clients {waiting:?} still ran after {:?}",
                        scenario.deadline
                    );
                }
            }
        }
        Load {
            ended: ended.into_iter().map(Option::unwrap).collect(),
        }
    }

    /// How many clients there were.
    pub fn clients(&self) -> usize {
        self.ended.len()
    }

    pub fn sent(&self) -> usize {
        self.ended.iter().map(|end| end.client.size).sum()
    }

    pub fn echoed(&self) -> usize {
        self.ended.iter().map(|end| end.echoed).sum()
    }

    fn completed(&self) -> usize {
        self.ended.iter().filter(|end| end.outcome.is_ok()).count()
    }

    pub fn describe(&self) -> String {
        let (tls, largest) = (
            self.ended.iter().filter(|end| end.client.tls).count(),
            self.ended
                .iter()
                .map(|end| end.client.size)
                .max()
                .unwrap_or(0),
        );
        format!(
            "{} clients ({} TCP, {tls} TLS), {} bytes to send (largest {largest}), {} echoed \
             byte for byte; {} completed, {} cut short cleanly, {} failed",
            self.ended.len(),
            self.ended.len() - tls,
            self.sent(),
            self.echoed(),
            self.completed(),
            self.ended
                .iter()
                .filter(|end| end.outcome.is_err() && end.clean)
                .count(),
            self.ended.iter().filter(|end| !end.clean).count(),
        )
    }

    /// Panics unless every client completed, or, where the network resets connections, ended
    /// with a clean close; and, there, unless the resets cut some short and spared others.
    pub fn check(&self, scenario: &Scenario) {
        let failed: Vec<String> = self
            .ended
            .iter()
            .filter(|end| !end.clean || (end.outcome.is_err() && !scenario.resets))
            .map(|end| format!("{:?}: {:?}", end.client, end.outcome))
            .collect();
        assert!(
            failed.is_empty(),
            "{} clients failed: {failed:#?}",
            failed.len()
        );
        if scenario.resets {
            let completed = self.completed();
            assert!(completed > 0, "the resets left no client whole");
            assert!(
                completed < self.ended.len(),
                "the resets cut no client short"
            );
        }
    }
}

impl Ended {
    fn new(client: Client, echoed: usize, outcome: std::thread::Result<io::Result<()>>) -> Ended {
        use io::ErrorKind::*;
        let (outcome, clean) = match outcome {
            Ok(Ok(())) => (Ok(()), true),
            Ok(Err(e)) => {
                let clean = matches!(
                    e.kind(),
                    ConnectionReset
                        | ConnectionAborted
                        | ConnectionRefused
                        | BrokenPipe
                        | UnexpectedEof
                );
                (Err(e.to_string()), clean)
            }
            Err(panic) => {
                let message = panic.downcast_ref::<&str>().map(|s| s.to_string());
                let message = message.or_else(|| panic.downcast_ref::<String>().cloned());
                (Err(format!("panicked: {message:?}")), false)
            }
        };
        Ended {
            client,
            echoed,
            outcome,
            clean,
        }
    }
}

/// A size from 1 to `max` bytes whose logarithm is uniform: as many payloads under 1 KiB as
/// from 1 KiB to 1 MiB, as traffic is, mostly small with a few large.
fn log_uniform(rng: &mut fastrand::Rng, max: usize) -> usize {
    let size = (max as f64).powf(rng.f64()) as usize;
    size.clamp(1, max)
}

/// One client's life: connects to `addr` (over TLS with `tls`), sends `size` random bytes in
/// chunks of random sizes, each read back before the next goes, then closes and waits for
/// the server's close. Adds to `echoed` the payload bytes that came back, as they do.
fn talk(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    size: usize,
    keepalive: bool,
    echoed: &mut usize,
) -> io::Result<()> {
    let start = Instant::now();
    let at = |stage: &'static str| {
        move |e: io::Error| {
            io::Error::new(e.kind(), format!("{stage} at {:?}: {e}", start.elapsed()))
        }
    };
    let tcp = dial(addr, keepalive).map_err(at("connect"))?;
    match tls {
        None => {
            let mut stream = tcp;
            echo_chunks(&mut stream, size, echoed).map_err(at("echo"))?;
            stream.shutdown(Shutdown::Write).map_err(at("shutdown"))?;
            expect_end(&mut stream).map_err(at("end"))
        }
        Some(config) => {
            let mut stream = tls_handshake(tcp, config, "localhost").map_err(at("handshake"))?;
            echo_chunks(&mut stream, size, echoed).map_err(at("echo"))?;
            stream.conn.send_close_notify();
            stream.flush().map_err(at("close_notify"))?;
            expect_end(&mut stream).map_err(at("end"))
        }
    }
}

/// Connects to `addr`, waiting up to [`CLIENT_PATIENCE`] for that and for each read and write.
/// With `keepalive`, the kernel probes the server after 1 s without traffic, so that a client
/// whose server side was reset (by a rule that let the client's side be) finds out in seconds.
fn dial(addr: SocketAddr, keepalive: bool) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, TcpKeepalive, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if keepalive {
        let second = Duration::from_secs(1);
        let probes = TcpKeepalive::new()
            .with_time(second)
            .with_interval(second)
            .with_retries(3);
        socket.set_tcp_keepalive(&probes)?;
    }
    socket.connect_timeout(&addr.into(), CLIENT_PATIENCE)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(CLIENT_PATIENCE))?;
    stream.set_write_timeout(Some(CLIENT_PATIENCE))?;
    Ok(stream)
}

/// Sends `size` random bytes on `stream` in chunks of 1 to [`CHUNK`] bytes, and reads each
/// chunk's echo before sending the next; panics if a reply differs from what was sent.
fn echo_chunks(
    stream: &mut (impl Read + Write),
    size: usize,
    echoed: &mut usize,
) -> io::Result<()> {
    let mut rng = fastrand::Rng::new();
    while *echoed < size {
        let message = payload(rng.usize(1..=CHUNK.min(size - *echoed)));
        stream.write_all(&message)?;
        stream.flush()?;
        let reply = read_payload(stream, message.len())?;
        assert!(reply == message, "the reply differs from what was sent");
        *echoed += message.len();
    }
    Ok(())
}

/// Reads the server's close after the client's: end of file, with no byte before it.
fn expect_end(stream: &mut impl Read) -> io::Result<()> {
    let mut byte = [0; 1];
    match read_some(stream, &mut byte)? {
        0 => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a byte after the last reply",
        )),
    }
}
