//! A deadline on one connection's step (a PROXY header, a TLS handshake or close, a scrape),
//! written as async-io's docs write a timeout: a race with a timer, no timeout type.

use std::future::Future;
use std::io;
use std::time::Duration;

use smol::future::FutureExt;
use smol::Timer;

/// `step`'s result, or a `TimedOut` error saying `"{missed} within {timeout:?}"` (`no handshake
/// within 10s`) if it takes longer than `timeout`.
pub(crate) async fn within<T>(
    timeout: Duration,
    missed: &str,
    step: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    step.or(async {
        Timer::after(timeout).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{missed} within {timeout:?}"),
        ))
    })
    .await
}
