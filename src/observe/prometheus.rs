//! The Prometheus endpoint: `GET /metrics` on an address of its own, answered from the server's
//! [`Stats`](crate::Stats) in the Prometheus text format, on the server's executor.
//!
//! It is not a client listener: its connections take no slot under `max_connections`, are not
//! in `Server::connections` or the stats, and get no idle timeout or hooks. Instead each one has
//! a deadline of its own and a request of at most [`MAX_REQUEST`] bytes, and at most
//! [`MAX_SCRAPES`] are answered at once, so a slow or hostile client of this port costs little.

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
use super::http::{self, Request, Response};
use super::stats::{CloseReason, RefusalReason};
use crate::deadline::within;
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
        // A head must end within its first MAX_REQUEST bytes, whatever came after them.
        head.truncate(MAX_REQUEST);
        match http::parse(&head) {
            Some(Request::Metrics { head_only }) => break metrics(registry, head_only),
            Some(Request::Refused(response)) => break response,
            None if head.len() == MAX_REQUEST => break http::too_large(),
            None => {}
        }
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.flush().await?;
    stream.close().await
}

/// The metrics in the Prometheus text format, or 500 if they cannot be encoded.
fn metrics(registry: &Registry, head_only: bool) -> Response {
    let mut body = String::with_capacity(4096);
    if let Err(e) = prometheus_text::encode(&mut body, registry) {
        debug!("metrics: cannot encode: {e}");
        return Response::error(500, "Internal Server Error");
    }
    Response::ok(prometheus_text::CONTENT_TYPE, body, head_only)
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
        )
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
            Hooks::default(),
        ))));
        registry
    }

    #[test]
    fn metrics_have_the_documented_names() {
        let body = metrics(&registry(), false).body;
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
        ] {
            assert!(body.contains(name), "no {name:?} in:\n{body}");
        }
    }
}
