//! The Prometheus endpoint: `GET /metrics` on an address of its own, answered from the server's
//! [`Stats`](crate::Stats) in the Prometheus text format, on the server's executor; beside it
//! `GET /healthz` (200 while the server runs: it is answered by the same executor as the
//! clients, so a server whose workers are all blocked fails it) and `GET /readyz` (200 while
//! the server is ready for new clients, 503 from the moment a stop begins, through its drain
//! delay; then the endpoint closes with the client listeners).
//!
//! It is not a client listener: its connections take no slot under `max_connections`, are not
//! in `Server::connections` or the stats, and get no idle timeout or hooks. Instead it guards
//! itself, so that a slow or hostile client of this port costs little and blinds no one:
//!
//! - a request head must come within [`HEAD_DEADLINE`] (else 408) and in at most
//!   [`MAX_REQUEST`] bytes (else 431); the answer then has [`ANSWER_DEADLINE`] to be taken;
//! - at most [`MAX_SCRAPES`] are served at once; when all are taken, a new connection takes the
//!   slot of the oldest one still waiting for its request, which gets 503 (see
//!   [`scrapes`](super::scrapes)); a new one is refused with 503 only when every slot is
//!   answering;
//! - after an answer, what the client still sends is read and dropped for up to [`LINGER`],
//!   so that a close does not reset the connection before the client has read the answer.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_executor::Executor;
use log::debug;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use smol::Timer;

use super::counters::Counters;
use super::http::{self, Page, Request, Response};
use super::scrapes::{Slot, Slots};
use super::stats::{CloseReason, RefusalReason};
use crate::addr::Addr;
use crate::deadline::within;
use crate::stop::Phase;
use crate::transport::{Accepted, Listener, Stream};

/// How long a scrape has to send its request head, from accept. Prometheus sends it at once;
/// 3 s covers a lost segment's retransmission.
const HEAD_DEADLINE: Duration = Duration::from_secs(3);

/// How long a client has to take its answer once the request is read.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// The longest request head read; a longer one gets 431.
const MAX_REQUEST: usize = 8 * 1024;

/// Scrapes served at once. Prometheus makes one at a time.
const MAX_SCRAPES: usize = 16;

/// How long, and how many bytes, what a client sends after its answer is read and dropped
/// before the connection is closed.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Answers scrapes from `listener` until cancelled (by the server's stop, with its accept
/// loops).
pub(crate) async fn serve_metrics(
    listener: Listener,
    counters: Arc<Counters>,
    executor: Arc<Executor<'static>>,
) {
    let pages = Arc::new(Pages::new(counters));
    let slots = Slots::new(MAX_SCRAPES);
    loop {
        let Accepted { stream, info } = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: the client listeners' back-off is theirs; this one
                // only must not spin.
                debug!("metrics: accept failed: {e}");
                Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = slots.admit();
        let pages = Arc::clone(&pages);
        executor
            .spawn(scrape(stream, slot, pages, info.peer_addr))
            .detach();
    }
}

/// One connection to the endpoint: its request read (if it has a slot) and answered, then
/// closed. One scrape per connection.
async fn scrape(mut stream: Stream, slot: Option<Slot>, pages: Arc<Pages>, peer: Addr) {
    let response = match &slot {
        Some(slot) => match read_request(&mut stream, slot, &pages).await {
            Ok(response) => response,
            Err(e) => {
                debug!("metrics: {peer}: {e}");
                return;
            }
        },
        None => {
            debug!("metrics: {peer}: refused: {MAX_SCRAPES} scrapes being answered");
            unavailable()
        }
    };
    if response.status != 200 {
        debug!("metrics: {peer}: answered {}", response.status);
    }
    let sent = within(
        ANSWER_DEADLINE,
        "answer not taken",
        send(&mut stream, response),
    )
    .await;
    // The slot is for reading and answering; the linger is bounded on its own.
    drop(slot);
    match sent {
        Ok(()) => linger(&mut stream).await,
        Err(e) => debug!("metrics: {peer}: {e}"),
    }
}

/// Reads the request head, within [`HEAD_DEADLINE`] and unless a newer connection takes the
/// slot first; returns the response it gets (408 for a head too late, 503 for an evicted one),
/// or an error if the client closed or failed.
async fn read_request(stream: &mut Stream, slot: &Slot, pages: &Pages) -> io::Result<Response> {
    let reading = async {
        let head = within(HEAD_DEADLINE, "no request head", read_head(stream)).await;
        head.map(Some)
    };
    let evicted = async {
        slot.evicted().await;
        Ok(None)
    };
    match reading.or(evicted).await {
        Ok(Some(request)) => {
            slot.answering();
            Ok(match request {
                Request::Get { page, head_only } => pages.answer(page, head_only),
                Request::Refused(response) => response,
            })
        }
        Ok(None) => Ok(unavailable()),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            Ok(Response::error(408, "Request Timeout"))
        }
        Err(e) => Err(e),
    }
}

/// 503, for a connection that found every slot taken, or whose slot a newer one took.
fn unavailable() -> Response {
    Response::error(503, "Service Unavailable")
}

/// Reads until the request head is complete or known to be bad.
pub(crate) async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<Request> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        // A head must end within its first MAX_REQUEST bytes, whatever came after them.
        head.truncate(MAX_REQUEST);
        match http::parse(&head) {
            Some(request) => return Ok(request),
            None if head.len() == MAX_REQUEST => return Ok(Request::Refused(http::too_large())),
            None => {}
        }
    }
}

/// Sends `response` and shuts the sending side.
async fn send(stream: &mut Stream, response: Response) -> io::Result<()> {
    stream.write_all(&response.into_bytes()).await?;
    stream.flush().await?;
    stream.close().await
}

/// Reads and drops what the client still sends, until it closes, for at most [`LINGER`] and
/// [`LINGER_BYTES`]: closing a socket with unread bytes resets the connection, and a reset
/// can reach the client before it has read its answer.
async fn linger(stream: &mut Stream) {
    let draining = async {
        let mut buf = [0; 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let timeout = async {
        Timer::after(LINGER).await;
    };
    draining.or(timeout).await;
}

/// What the endpoint's pages are made from.
struct Pages {
    /// The counters, as Prometheus metrics.
    registry: Registry,
    /// The server's phase, for readiness.
    counters: Arc<Counters>,
}

impl Pages {
    fn new(counters: Arc<Counters>) -> Pages {
        let mut registry = Registry::with_prefix("taskserve");
        registry.register_collector(Box::new(Exported(Arc::clone(&counters))));
        Pages { registry, counters }
    }

    fn answer(&self, page: Page, head_only: bool) -> Response {
        match page {
            Page::Metrics => self.metrics(head_only),
            // Answered at all, it is true: this task ran on the server's executor.
            Page::Health => Response::state(200, "ok\n".into(), head_only),
            Page::Ready => match self.counters.phase() {
                Phase::Serving => Response::state(200, "ready\n".into(), head_only),
                phase => {
                    let body = format!("not ready: {}\n", phase.label());
                    Response::state(503, body, head_only)
                }
            },
        }
    }

    /// The metrics in the Prometheus text format, or 500 if they cannot be encoded.
    fn metrics(&self, head_only: bool) -> Response {
        let mut body = String::with_capacity(4096);
        if let Err(e) = prometheus_text::encode(&mut body, &self.registry) {
            debug!("metrics: cannot encode: {e}");
            return Response::error(500, "Internal Server Error");
        }
        Response::ok(prometheus_text::CONTENT_TYPE, body, head_only)
    }
}

/// The server's counters as Prometheus metrics, read afresh at each scrape.
#[derive(Debug)]
struct Exported(Arc<Counters>);

impl Collector for Exported {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.snapshot();
        gauge(
            &mut encoder,
            "connections_open",
            "Client connections open now.",
            None,
            stats.open as i64,
        )?;
        counter(
            &mut encoder,
            "connections_accepted",
            "Client connections accepted, refused ones included.",
            stats.accepted,
        )?;
        counters_by_reason(
            &mut encoder,
            "connections_refused",
            "Clients accepted and closed at once without being served, by reason.",
            RefusalReason::ALL.map(|reason| (reason.label(), stats.refused(reason))),
        )?;
        counters_by_reason(
            &mut encoder,
            "connections_closed",
            "Client connections that ended, by how they ended.",
            CloseReason::ALL.map(|how| (how.label(), stats.closed(how))),
        )?;
        counter(
            &mut encoder,
            "accept_errors",
            "Failed accepts: clients gone while queued, or no file descriptor left.",
            stats.accept_errors,
        )?;
        counter(
            &mut encoder,
            "bytes_read",
            "Bytes handlers read from clients (decrypted, for TLS). Open connections add theirs \
             every 64 KiB and when they end.",
            stats.bytes_read,
        )?;
        counter(
            &mut encoder,
            "bytes_written",
            "Bytes handlers wrote to clients (before encryption, for TLS). Open connections add \
             theirs every 64 KiB and when they end.",
            stats.bytes_written,
        )?;
        let (buckets, count, sum) = self.0.durations();
        encoder
            .encode_descriptor(
                "connection_duration",
                "How long client connections lasted, from accept to close.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        gauge(
            &mut encoder,
            "uptime",
            "Seconds since the server started.",
            Some(&Unit::Seconds),
            stats.uptime.as_secs_f64(),
        )?;
        let phase = self.0.phase();
        let mut family = encoder.encode_descriptor(
            "phase",
            "1 for the phase the server is in: serving, drain_delay (stopping, but still \
             accepting while balancers take it out of rotation), draining, stopped.",
            None,
            MetricType::Gauge,
        )?;
        for each in Phase::ALL {
            ConstGauge::new(i64::from(each == phase))
                .encode(family.encode_family(&[("phase", each.label())])?)?;
        }
        Ok(())
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

/// One counter family with a `reason` label, a counter per `(reason, value)`.
fn counters_by_reason(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counts: impl IntoIterator<Item = (&'static str, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (reason, value) in counts {
        ConstCounter::new(value).encode(family.encode_family(&[("reason", reason)])?)?;
    }
    Ok(())
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, unit, gauge.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::counters::Hooks;

    fn pages() -> Pages {
        Pages::new(Counters::new(
            Arc::default(),
            Arc::default(),
            Hooks::default(),
        ))
    }

    #[test]
    fn metrics_have_the_documented_names() {
        let body = pages().metrics(false).body;
        for name in [
            "taskserve_connections_open 0",
            "taskserve_connections_accepted_total 0",
            "taskserve_connections_refused_total{reason=\"connection_limit\"} 0",
            "taskserve_connections_closed_total{reason=\"idle_timeout\"} 0",
            "taskserve_accept_errors_total 0",
            "taskserve_bytes_read_total 0",
            "taskserve_bytes_written_total 0",
            "taskserve_connection_duration_seconds_bucket{le=\"+Inf\"} 0",
            "taskserve_connection_duration_seconds_count 0",
            "taskserve_uptime_seconds ",
            "taskserve_phase{phase=\"serving\"} 1",
            "taskserve_phase{phase=\"drain_delay\"} 0",
        ] {
            assert!(body.contains(name), "no {name:?} in:\n{body}");
        }
    }
}
