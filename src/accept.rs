//! The accept loop: one per listener, spawned on the server's executor. It accepts clients,
//! refuses those past the connection limit, and spawns a task for each of the others; it never
//! waits on a client (a TLS handshake runs in the client's own task) and never stops on an error.

use std::future::Future;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_executor::Executor;
use log::{debug, error, warn};
use smol::future::FutureExt;
use smol::Timer;

use crate::connection::{Connection, Stream};
use crate::idle::{IdleSweeper, IdleWatch};
use crate::listener::{Accepted, Listener};
use crate::server::{count, StopHandle};
use crate::shutdown::Tracker;
use crate::stats::{CloseReason, Meter, Metrics, RefusalReason};
use crate::task::{log_panic, ConnectionTask, Peer, Stage};

/// What every accept loop of a server shares.
pub(crate) struct Shared<H> {
    pub(crate) handler: H,
    pub(crate) executor: Arc<Executor<'static>>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) idle: Option<Arc<IdleSweeper>>,
    pub(crate) max_connections: usize,
    pub(crate) stop: StopHandle,
    /// The server's counters, and the connection hooks.
    pub(crate) metrics: Arc<Metrics>,
    /// The per-client connection limit, if one is set.
    pub(crate) per_client: Option<Arc<crate::per_client::PerClient>>,
    /// How long a TLS handshake may take.
    #[cfg(feature = "tls")]
    pub(crate) handshake_timeout: Duration,
}

/// Accepts clients from `listener` and spawns a task for each, until `closing` completes; then
/// serves the clients already queued and closes the listener. Never returns on an accept error:
/// errors that concern one client are skipped, and the others (out of file descriptors, say)
/// back off from 5 ms to 1 s, or until a connection closes and frees a descriptor.
pub(crate) async fn accept_loop<H, F>(
    listener: Listener,
    shared: Arc<Shared<H>>,
    closing: impl Future<Output = ()>,
) where
    H: Fn(Connection) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    let max_connections = shared.max_connections;
    let mut backoff = Backoff::default();
    let mut refusals = RateLimit::default();
    let mut failures = RateLimit::default();
    let mut closing = std::pin::pin!(closing);
    loop {
        // `closing` first: under a steady stream of clients `accept` is always ready, and would
        // otherwise keep the stop from being seen.
        let accept = async { Some(listener.accept().await) };
        let accept = async {
            (&mut closing).await;
            None
        }
        .or(accept);
        let accepted = match refusals.held_back_until() {
            None => accept.await,
            // A burst of refusals ended a second ago: say how many went unlogged.
            Some(at) => match async { Some(accept.await) }.or(timer_at(at)).await {
                Some(accepted) => accepted,
                None => {
                    let held_back = refusals.take_held_back();
                    let clients = if held_back == 1 { "client" } else { "clients" };
                    warn!(
                        "refused {held_back} more {clients} at the connection limit ({max_connections} open)"
                    );
                    continue;
                }
            },
        };
        let Some(accepted) = accepted else {
            break;
        };
        if accepted.is_err() {
            shared.metrics.count_accept_error();
        }
        match accepted {
            Ok(accepted) => {
                backoff = Backoff::default();
                let held_back = failures.take_held_back();
                if held_back > 0 {
                    error!(
                        "accept works again after {} not logged",
                        count(held_back as usize, "more failure")
                    );
                }
                serve_accepted(&listener, &shared, accepted, &mut refusals);
            }
            Err(e) if concerns_one_client(&e) => debug!("accept: {e}"),
            Err(e) => {
                let delay = backoff.next();
                if let Some(held_back) = failures.allow() {
                    error!(
                        "accept failed: {e}; retrying in {delay:?}{}",
                        unlogged(held_back)
                    );
                }
                async {
                    Timer::after(delay).await;
                }
                .or(shared.tracker.some_closed())
                .await;
            }
        }
    }
    drain_queue(&listener, &shared, &mut refusals);
    // Dropping `listener` closes it now, microseconds after the last accept.
}

/// The most clients a stop takes from one listener's queue: its backlog, with room for those
/// that arrive while it drains.
const DRAIN_LIMIT: usize = 65_536;

/// Serves the clients that completed their handshake before the stop and still wait in the
/// kernel's queue: closing the listener would reset each of them. With SO_REUSEPORT they are
/// this process's share of the port's clients, which another process of the group cannot
/// take. No await from the last accept to the listener's close, so that as few clients as
/// possible slip in between.
fn drain_queue<H, F>(listener: &Listener, shared: &Arc<Shared<H>>, refusals: &mut RateLimit)
where
    H: Fn(Connection) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    let mut drained = 0;
    for _ in 0..DRAIN_LIMIT {
        match listener.accept_now() {
            Ok(accepted) => {
                serve_accepted(listener, shared, accepted, refusals);
                drained += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if concerns_one_client(&e) => debug!("accept: {e}"),
            Err(e) => {
                shared.metrics.count_accept_error();
                debug!("accept while closing failed: {e}; closing the listener");
                break;
            }
        }
    }
    if drained > 0 {
        debug!(
            "closing {}: served {} still queued",
            listener.local_addr(),
            count(drained, "client")
        );
    }
}

/// Gives one accepted client its task, or closes it at once: an untrusted PROXY source, or a
/// client past the connection limit or the per-client limit.
fn serve_accepted<H, F>(
    listener: &Listener,
    shared: &Arc<Shared<H>>,
    accepted: Accepted,
    refusals: &mut RateLimit,
) where
    H: Fn(Connection) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    let max_connections = shared.max_connections;
    let Accepted { stream, info } = accepted;
    shared.metrics.count_accepted();
    // On a PROXY listener, an untrusted source is closed here, before it takes a slot.
    let Some(peer) = crate::proxy::peer(listener.proxy(), &info) else {
        shared.metrics.count_refused(RefusalReason::UntrustedProxy);
        return;
    };
    let Some(slot) = shared.tracker.try_open(max_connections) else {
        // Accept and close, rather than leave clients hanging in the backlog.
        drop(stream);
        shared.metrics.count_refused(RefusalReason::ConnectionLimit);
        if let Some(held_back) = refusals.allow() {
            warn!(
                "refused {peer}: at the connection limit ({max_connections} open){}",
                unlogged(held_back)
            );
        }
        return;
    };
    // Behind a proxy, the limit is checked once the header names the client (`stages`).
    let Ok(client) = crate::per_client::admit(shared.per_client.as_ref(), &info, &peer) else {
        shared.metrics.count_refused(RefusalReason::PerClientLimit);
        return;
    };
    // On a PROXY listener, the hooks hear of the client once its header names it.
    let meter = Meter::start(&shared.metrics, &info, listener.proxy().is_none());
    let stage = match stages(listener, shared, stream, info, &peer, &meter) {
        Some(stage) => crate::per_client::hold(client, stage),
        None => return,
    };
    let idle = shared
        .idle
        .as_ref()
        .map(|sweeper| IdleWatch::new(Arc::clone(sweeper)));
    shared
        .executor
        .spawn(ConnectionTask::new(stage, peer, idle, slot, meter))
        .detach();
}

/// What a new connection's task runs: on a TLS listener the handshake, the handler, then the
/// TLS close; on the others the handler alone. `None` if the handler panicked before returning
/// its future.
fn stages<H, F>(
    listener: &Listener,
    shared: &Arc<Shared<H>>,
    stream: Stream,
    info: crate::connection::ConnectionInfo,
    peer: &Peer,
    meter: &Arc<Meter>,
) -> Option<Stage<F>>
where
    H: Fn(Connection) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    // Inside the connection's task, with its own deadlines: a slow client delays no one.
    if let Some(proxy) = listener.proxy() {
        let (proxy, shared, peer) = (proxy.clone(), Arc::clone(shared), peer.clone());
        let meter = Arc::clone(meter);
        #[cfg(feature = "tls")]
        let tls = listener.tls().cloned();
        let run = async move {
            let mut stream = stream;
            let Some(info) = crate::proxy::read_header(&mut stream, info, &proxy, &peer).await
            else {
                meter.stage_failed(CloseReason::ProxyHeaderFailed);
                return None;
            };
            meter.announce(&info);
            // Refused here, it counts as closed, not refused: it had its slot, and was counted.
            let Ok(_client) = crate::per_client::admit(shared.per_client.as_ref(), &info, &peer)
            else {
                meter.stage_failed(CloseReason::PerClientLimit);
                return None;
            };
            #[rustfmt::skip]
            let outcome =
                after_proxy(stream, info, #[cfg(feature = "tls")] tls, shared, peer, meter);
            outcome.await
        };
        return Some(Stage::Staged { run: Box::pin(run) });
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = listener.tls() {
        let run = after_proxy(
            stream,
            info,
            Some(tls.clone()),
            Arc::clone(shared),
            peer.clone(),
            Arc::clone(meter),
        );
        return Some(Stage::Staged { run: Box::pin(run) });
    }
    #[cfg(not(feature = "tls"))]
    let _ = listener;
    // A handler may panic before it returns its future: that ends this client only.
    let connection = Connection::new(stream, info, shared.stop.clone(), Arc::clone(meter));
    match panic::catch_unwind(AssertUnwindSafe(|| (shared.handler)(connection))) {
        Ok(handler) => Some(Stage::Serving { handler }),
        Err(panic) => {
            log_panic(peer, &*panic);
            meter.finish(CloseReason::HandlerPanic);
            None
        }
    }
}

/// The stages after a PROXY header (or from the start, without one): on a TLS listener the
/// handshake, the handler, then the TLS close; on the others the handler alone.
async fn after_proxy<H, F>(
    stream: Stream,
    info: crate::connection::ConnectionInfo,
    #[cfg(feature = "tls")] tls: Option<crate::tls::TlsConfig>,
    shared: Arc<Shared<H>>,
    peer: Peer,
    meter: Arc<Meter>,
) -> Option<io::Result<()>>
where
    H: Fn(Connection) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    #[cfg(feature = "tls")]
    if let Some(tls) = tls {
        let timeout = shared.handshake_timeout;
        let (stream, info, closing) =
            crate::tls::handshake(stream, info, &tls, timeout, &peer).await?;
        let connection = Connection::new(stream, info, shared.stop.clone(), meter);
        let outcome = (shared.handler)(connection).await;
        closing.close(timeout, &peer).await;
        return Some(outcome);
    }
    let _ = peer;
    let connection = Connection::new(stream, info, shared.stop.clone(), meter);
    Some((shared.handler)(connection).await)
}

/// Accept errors about the client at the head of the queue (it gave up, or its network did),
/// not about the server: retry at once, without a log line above debug.
fn concerns_one_client(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) || is_pending_network_error(e)
}

/// Linux's accept(2) passes on network errors already pending on the new socket, and says to
/// treat them like EAGAIN and retry; a firewall can add EPERM.
#[cfg(unix)]
fn is_pending_network_error(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let pending = [
        Errno::NETDOWN,
        Errno::PROTO,
        Errno::NOPROTOOPT,
        Errno::HOSTDOWN,
        Errno::NONET,
        Errno::HOSTUNREACH,
        Errno::OPNOTSUPP,
        Errno::NETUNREACH,
        Errno::PERM,
    ];
    e.raw_os_error()
        .is_some_and(|code| pending.iter().any(|errno| errno.raw_os_error() == code))
}

#[cfg(not(unix))]
fn is_pending_network_error(_: &io::Error) -> bool {
    false
}

/// Exponential back-off for accept failures: 5 ms, doubling, capped at 1 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(5))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
        delay
    }
}

/// Lets a log line through at most once a second, counting the ones it held back.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Self::INTERVAL => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(self.take_held_back())
            }
        }
    }

    /// When lines were held back: the moment the next one could be logged, at which to report
    /// them if no new line comes by then.
    fn held_back_until(&self) -> Option<Instant> {
        let last = self.last?;
        (self.held_back > 0).then(|| last + Self::INTERVAL)
    }

    fn take_held_back(&mut self) -> u64 {
        std::mem::take(&mut self.held_back)
    }
}

/// ` (3 more not logged)` after a rate-limited line, or nothing when none were held back.
pub(crate) fn unlogged(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" ({held_back} more not logged)")
    }
}

/// `None` at `at`, to race against another future.
async fn timer_at<T>(at: Instant) -> Option<T> {
    Timer::at(at).await;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_5_ms_up_to_1_s() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    }

    #[test]
    fn rate_limit_lets_one_line_a_second_through_and_counts_the_rest() {
        let mut limit = RateLimit::default();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.held_back_until(), None);
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        assert_eq!(
            limit.held_back_until(),
            Some(limit.last.unwrap() + RateLimit::INTERVAL)
        );
        limit.last = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(limit.allow(), Some(2));
        assert_eq!(limit.held_back_until(), None);
    }
}
