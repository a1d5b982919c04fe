//! The Prometheus endpoint: `GET /metrics` on an address of its own, answered from the server's
//! [`Stats`](crate::Stats) in the Prometheus text format, on the server's executor.
//!
//! It is not a client listener: its connections take no slot under `max_connections`, are not
//! in `Server::connections` or the stats, and get no idle timeout or hooks. Instead each one has
//! a deadline of its own and a request of at most [`MAX_REQUEST`] bytes, and at most
//! [`MAX_SCRAPES`] are answered at once, so a slow or hostile client of this port costs little.

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::Timer;

use super::counters::Counters;
use super::stats::{CloseReason, RefusalReason};
use crate::deadline::within;
use crate::stop::Phase;
use crate::transport::{Accepted, Listener, Stream};

/// How long a scrape may take, from accept to the last byte of the answer.
const DEADLINE: Duration = Duration::from_secs(10);

/// The longest request head read; a longer one gets 431.
const MAX_REQUEST: usize = 8 * 1024;

/// Scrapes answered at once; past it, a new one is closed at once. Prometheus makes one at a time.
const MAX_SCRAPES: usize = 16;

/// Answers scrapes from `listener` until cancelled (by the server's stop, with its accept
/// loops).
pub(crate) async fn serve_metrics(
    listener: Listener,
    counters: Arc<Counters>,
    executor: Arc<Executor<'static>>,
) {
    let mut registry = Registry::with_prefix("taskserve");
    registry.register_collector(Box::new(Exported(counters)));
    let registry = Arc::new(registry);
    let scrapes = Arc::new(AtomicUsize::new(0));
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
        if scrapes.fetch_add(1, Ordering::AcqRel) >= MAX_SCRAPES {
            scrapes.fetch_sub(1, Ordering::AcqRel);
            debug!(
                "metrics: {}: refused: {MAX_SCRAPES} scrapes open",
                info.peer_addr
            );
            continue;
        }
        let (registry, scrapes) = (Arc::clone(&registry), Arc::clone(&scrapes));
        executor
            .spawn(async move {
                let answered =
                    within(DEADLINE, "no request answered", answer(stream, &registry)).await;
                if let Err(e) = answered {
                    debug!("metrics: {}: {e}", info.peer_addr);
                }
                scrapes.fetch_sub(1, Ordering::AcqRel);
            })
            .detach();
    }
}

/// Reads one request and answers it, then closes: one scrape per connection.
async fn answer(mut stream: Stream, registry: &Registry) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0; 1024];
    let response = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            break Response::error(431, "Request Header Fields Too Large");
        }
        if let Some(end) = end_of_head(&head) {
            break respond(&head[..end], registry);
        }
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.flush().await?;
    stream.close().await
}

/// Where the request head ends (at its blank line), if it has.
fn end_of_head(head: &[u8]) -> Option<usize> {
    let crlf = head.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = head.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

/// An HTTP/1.1 response, closed after it is sent.
#[derive(Debug, PartialEq)]
struct Response {
    status: u16,
    reason: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
    /// Set for HEAD: the headers are those of the body, which is not sent.
    head_only: bool,
}

impl Response {
    fn error(status: u16, reason: &'static str) -> Response {
        Response {
            status,
            reason,
            headers: vec![("Content-Type", "text/plain; charset=utf-8")],
            body: format!("{status} {reason}\n"),
            head_only: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let _ = write!(
            head,
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        );
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The answer to a request head: the metrics for `GET /metrics` (or HEAD), 404 for another
/// path, 405 for another method on it, 400 for what is not an HTTP/1.x request line.
fn respond(head: &[u8], registry: &Registry) -> Response {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::error(400, "Bad Request");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::error(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Response::error(400, "Bad Request");
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Response::error(404, "Not Found");
    }
    if method != "GET" && method != "HEAD" {
        let mut response = Response::error(405, "Method Not Allowed");
        response.headers.push(("Allow", "GET, HEAD"));
        return response;
    }
    let mut body = String::with_capacity(4096);
    if let Err(e) = prometheus_text::encode(&mut body, registry) {
        debug!("metrics: cannot encode: {e}");
        return Response::error(500, "Internal Server Error");
    }
    Response {
        status: 200,
        reason: "OK",
        headers: vec![("Content-Type", prometheus_text::CONTENT_TYPE)],
        body,
        head_only: method == "HEAD",
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

    fn registry() -> Registry {
        let mut registry = Registry::with_prefix("taskserve");
        registry.register_collector(Box::new(Exported(Counters::new(
            Arc::default(),
            Arc::default(),
            Hooks::default(),
        ))));
        registry
    }

    fn status(request: &str) -> u16 {
        respond(request.as_bytes(), &registry()).status
    }

    #[test]
    fn only_get_or_head_of_metrics_is_answered_with_the_metrics() {
        assert_eq!(status("GET /metrics HTTP/1.1\r\nHost: x\r\n"), 200);
        assert_eq!(status("GET /metrics?x=1 HTTP/1.0"), 200);
        assert_eq!(status("HEAD /metrics HTTP/1.1"), 200);
        assert_eq!(status("GET / HTTP/1.1"), 404);
        assert_eq!(status("GET /metricsx HTTP/1.1"), 404);
        assert_eq!(status("POST /metrics HTTP/1.1"), 405);
        assert_eq!(status("DELETE /metrics HTTP/1.1"), 405);
        assert_eq!(status("GET /metrics"), 400);
        assert_eq!(status("GET /metrics SPDY/3"), 400);
        assert_eq!(status("GET  /metrics HTTP/1.1"), 400);
        assert_eq!(status("\u{0}\u{ff}"), 400);
    }

    #[test]
    fn metrics_have_the_documented_names() {
        let body = respond(b"GET /metrics HTTP/1.1", &registry()).body;
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

    #[test]
    fn the_head_ends_at_its_blank_line() {
        assert_eq!(end_of_head(b"GET / HTTP/1.1\r\nA: b\r\n\r\n"), Some(20));
        assert_eq!(end_of_head(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(end_of_head(b"GET / HTTP/1.1\r\n"), None);
    }
}
