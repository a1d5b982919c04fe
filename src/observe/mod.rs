//! What is observed of a server: its [`counters`], one [`meter`] per connection that adds to
//! them, the [`stats`] they are read as, and the Prometheus endpoint that serves them (feature
//! `metrics`).

pub(crate) mod counters;
#[cfg(feature = "metrics")]
pub(crate) mod http;
pub(crate) mod meter;
#[cfg(feature = "metrics")]
pub(crate) mod prometheus;
#[cfg(feature = "metrics")]
mod scrapes;
pub(crate) mod stats;

#[cfg(feature = "metrics")]
pub(crate) use prometheus::serve_metrics;

/// Without the `metrics` feature no endpoint can be asked for (`Builder::listen_metrics` is not
/// there), so there is never a listener to serve: this only closes it.
#[cfg(not(feature = "metrics"))]
pub(crate) async fn serve_metrics(
    listener: crate::transport::Listener,
    _: std::sync::Arc<counters::Counters>,
    _: std::sync::Arc<async_executor::Executor<'static>>,
) {
    drop(listener);
}
