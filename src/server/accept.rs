//! The accept loop: one per listener, spawned on the server's executor. It accepts clients,
//! refuses those past the connection limit, and spawns a task for each of the others; it never
//! waits on a client (a TLS handshake runs in the client's own task) and never stops on an error.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_executor::Executor;
use log::{debug, error, warn};
use smol::future::FutureExt;
use smol::Timer;

use crate::conn::connection::Handler;
use crate::conn::stages::{self, Service};
use crate::conn::task::ConnectionTask;
use crate::limits::idle::{IdleSweeper, IdleWatch};
use crate::logging::{count, unlogged, RateLimit};
use crate::observe::stats::RefusalReason;
use crate::stop::Tracker;
use crate::transport::proxy;
use crate::transport::{Accepted, Listener};

/// What every accept loop of a server shares.
pub(crate) struct Accepting<H> {
    /// The handler, and what each connection's stages need.
    pub(crate) service: Arc<Service<H>>,
    pub(crate) executor: Arc<Executor<'static>>,
    pub(crate) tracker: Arc<Tracker>,
    pub(crate) idle: Option<Arc<IdleSweeper>>,
    pub(crate) max_connections: usize,
}

/// Clients the accept loop takes in a row before it lets the other tasks of its worker thread
/// run. While clients wait in the listen queue, `accept` never waits, and the loop would hold
/// its worker until the queue is empty (up to the backlog, 4,096 clients): with one worker,
/// every connected client waited for all of them (`tests/storm/fairness.rs`).
const ACCEPTS_PER_TURN: u32 = 64;

/// Accepts clients from `listener` and spawns a task for each, until `closing` completes; then
/// serves the clients already queued and closes the listener. Never returns on an accept error:
/// errors that concern one client are skipped, and the others (out of file descriptors, say)
/// back off from 5 ms to 1 s, or until a connection closes and frees a descriptor.
pub(crate) async fn accept_loop<H: Handler>(
    listener: Listener,
    accepting: Arc<Accepting<H>>,
    closing: impl Future<Output = ()>,
) {
    let max_connections = accepting.max_connections;
    let mut backoff = Backoff::default();
    let mut refusals = RateLimit::default();
    let mut failures = RateLimit::default();
    let mut closing = std::pin::pin!(closing);
    let mut in_this_turn = 0;
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
            accepting.service.counters.count_accept_error();
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
                serve_accepted(&listener, &accepting, accepted, &mut refusals);
                in_this_turn += 1;
                if in_this_turn == ACCEPTS_PER_TURN {
                    in_this_turn = 0;
                    smol::future::yield_now().await;
                }
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
                .or(accepting.tracker.some_closed())
                .await;
            }
        }
    }
    drain_queue(&listener, &accepting, &mut refusals);
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
fn drain_queue<H: Handler>(
    listener: &Listener,
    accepting: &Arc<Accepting<H>>,
    refusals: &mut RateLimit,
) {
    let mut drained = 0;
    for _ in 0..DRAIN_LIMIT {
        match listener.accept_now() {
            Ok(accepted) => {
                serve_accepted(listener, accepting, accepted, refusals);
                drained += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if concerns_one_client(&e) => debug!("accept: {e}"),
            Err(e) => {
                accepting.service.counters.count_accept_error();
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
fn serve_accepted<H: Handler>(
    listener: &Listener,
    accepting: &Arc<Accepting<H>>,
    accepted: Accepted,
    refusals: &mut RateLimit,
) {
    let counters = &accepting.service.counters;
    let max_connections = accepting.max_connections;
    counters.count_accepted();
    // On a PROXY listener, an untrusted source is closed here, before it takes a slot.
    let Some(peer) = proxy::peer(listener.proxy(), &accepted.info) else {
        counters.count_refused(RefusalReason::UntrustedProxy);
        return;
    };
    let Some(slot) = accepting.tracker.try_open(max_connections) else {
        // Counted before the close: a client that sees the close and then reads the stats finds
        // itself counted. Accept and close, rather than leave clients hanging in the backlog.
        counters.count_refused(RefusalReason::ConnectionLimit);
        drop(accepted);
        if let Some(held_back) = refusals.allow() {
            warn!(
                "refused {peer}: at the connection limit ({max_connections} open){}",
                unlogged(held_back)
            );
        }
        return;
    };
    let Some((stages, meter)) = stages::begin(listener, &accepting.service, accepted, &peer) else {
        return;
    };
    let idle = accepting
        .idle
        .as_ref()
        .map(|sweeper| IdleWatch::new(Arc::clone(sweeper)));
    accepting
        .executor
        .spawn(ConnectionTask::new(stages, peer, idle, slot, meter))
        .detach();
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
}
