//! One connection's task: the handler's future, guarded against panics and idleness, logged,
//! and holding its slot in the connection count until it ends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use log::{debug, error, info, warn};
use smol::future::{self, FutureExt};
use smol::stream::Stream;
use smol::Timer;

use crate::shutdown::Slot;

/// Serves one accepted client with `handler` until the handler returns, fails, panics, or the
/// connection stays quiet for `idle_timeout`; then closes the socket and frees `slot`.
pub(crate) async fn serve_connection<H, F>(
    handler: Arc<H>,
    stream: async_net::TcpStream,
    peer: SocketAddr,
    idle_timeout: Option<Duration>,
    slot: Slot,
) where
    H: Fn(async_net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    // The seed's two lines per client, in its words, so the programs are recognisably the same.
    info!("Connection from {peer}");
    // Calling the handler is inside the guard too: a handler may panic before its first await.
    let guarded = AssertUnwindSafe(async move { handler(stream, peer).await }).catch_unwind();
    match quiet_for_at_most(guarded, idle_timeout).await {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => log_handler_error(peer, &e),
        Some(Err(panic)) => error!("{peer}: handler panicked: {}", panic_message(&*panic)),
        None => debug!(
            "{peer}: closed after {:?} without traffic (idle timeout)",
            idle_timeout.unwrap_or_default()
        ),
    }
    // By now the handler's future, and with it the socket, has been dropped.
    info!("Connection closed: {peer}");
    drop(slot);
}

fn log_handler_error(peer: SocketAddr, e: &io::Error) {
    use io::ErrorKind::*;
    match e.kind() {
        // A client that resets or vanishes is the network being normal, not a fault to act on.
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut => {
            debug!("{peer}: {e}")
        }
        _ => warn!("{peer}: handler failed: {e}"),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic payload that is not a string)"
    }
}

/// How many ticks of the idle clock make one idle timeout: the connection closes between
/// `timeout` and `timeout * (1 + 1/TICKS_PER_TIMEOUT)` after its last activity.
const TICKS_PER_TIMEOUT: u32 = 8;

/// Runs `fut` to completion, or returns `None` once it has gone `timeout` without being woken.
///
/// A connection is active when its handler is woken: data or a close arrived, a blocked write
/// made progress, or whatever else the handler awaits happened. So "no wake-up for the timeout"
/// covers both an idle client and a write stalled by a client that stopped reading, for any
/// handler, without wrapping its socket. To keep the per-message path free of clock reads and
/// timer updates, the handler is polled with a waker that only raises a flag, and a coarse
/// interval timer, with a flag waker of its own, counts quiet ticks.
async fn quiet_for_at_most<F: Future>(fut: F, timeout: Option<Duration>) -> Option<F::Output> {
    let Some(timeout) = timeout else {
        return Some(fut.await);
    };
    let mut fut = pin!(fut);
    let mut watch = IdleWatch::new(timeout);
    future::poll_fn(|cx| watch.poll(fut.as_mut(), cx)).await
}

struct IdleWatch {
    ticker: Timer,
    wakers: Option<FlagWakers>,
    /// Quiet ticks in a row; `TICKS_PER_TIMEOUT` of them is a timeout.
    quiet_ticks: u32,
    /// Whether the handler was woken since the last tick.
    active: bool,
}

impl IdleWatch {
    fn new(timeout: Duration) -> Self {
        let tick = (timeout / TICKS_PER_TIMEOUT).max(Duration::from_millis(1));
        IdleWatch {
            ticker: Timer::interval(tick),
            wakers: None,
            quiet_ticks: 0,
            active: false,
        }
    }

    fn poll<F: Future>(
        &mut self,
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<F::Output>> {
        let wakers = match &mut self.wakers {
            Some(w) if w.task.will_wake(cx.waker()) => w,
            // First poll (or a new task waker): route both wake-up sources through fresh flags.
            slot => {
                let wakers = slot.insert(FlagWakers::new(cx.waker()));
                wakers.tick.raise();
                wakers
            }
        };
        // Handler wake-ups first: one that came with a tick belongs to the window that tick closes.
        if wakers.handler.take() {
            self.active = true;
        }
        if wakers.tick.take() {
            let mut tick_cx = Context::from_waker(&wakers.tick_waker);
            // Polling the interval also registers its next tick, with the tick waker.
            while Pin::new(&mut self.ticker)
                .poll_next(&mut tick_cx)
                .is_ready()
            {
                self.quiet_ticks = if self.active { 0 } else { self.quiet_ticks + 1 };
                self.active = false;
                if self.quiet_ticks >= TICKS_PER_TIMEOUT {
                    return Poll::Ready(None);
                }
            }
        }
        fut.poll(&mut Context::from_waker(&wakers.handler_waker))
            .map(Some)
    }
}

/// The task's waker, wrapped twice so that a poll can tell which source woke it.
struct FlagWakers {
    task: Waker,
    handler: Arc<Flag>,
    handler_waker: Waker,
    tick: Arc<Flag>,
    tick_waker: Waker,
}

impl FlagWakers {
    fn new(task: &Waker) -> Self {
        let handler = Arc::new(Flag::new(task));
        let tick = Arc::new(Flag::new(task));
        FlagWakers {
            task: task.clone(),
            handler_waker: Waker::from(Arc::clone(&handler)),
            handler,
            tick_waker: Waker::from(Arc::clone(&tick)),
            tick,
        }
    }
}

/// A waker that raises a flag, then wakes the task.
struct Flag {
    raised: AtomicBool,
    task: Waker,
}

impl Flag {
    fn new(task: &Waker) -> Self {
        Flag {
            raised: AtomicBool::new(false),
            task: task.clone(),
        }
    }

    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
    }

    /// Lowers the flag and says whether it was raised; a plain load first keeps the common
    /// "not raised" case free of a locked instruction.
    fn take(&self) -> bool {
        self.raised.load(Ordering::Acquire) && self.raised.swap(false, Ordering::AcqRel)
    }
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raise();
        self.task.wake_by_ref();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_future_that_is_never_woken_times_out_after_the_timeout() {
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let out = smol::block_on(quiet_for_at_most(future::pending::<()>(), Some(timeout)));
        let waited = start.elapsed();
        assert!(out.is_none());
        assert!(waited >= timeout, "closed early, after {waited:?}");
        // Generous: the bound is 1.125 × the timeout, but this machine may be busy.
        assert!(waited < timeout * 10, "closed late, after {waited:?}");
    }

    #[test]
    fn a_future_woken_more_often_than_the_timeout_runs_to_completion() {
        // Ten wake-ups 60 ms apart: 600 ms in all, three times the timeout, never quiet for it.
        let woken_often = async {
            for _ in 0..10 {
                Timer::after(Duration::from_millis(60)).await;
            }
            7
        };
        let out = smol::block_on(quiet_for_at_most(
            woken_often,
            Some(Duration::from_millis(200)),
        ));
        assert_eq!(out, Some(7));
    }

    #[test]
    fn without_a_timeout_the_future_just_runs() {
        assert_eq!(
            smol::block_on(quiet_for_at_most(async { 3 }, None)),
            Some(3)
        );
    }
}
