//! One connection's task: its [`Stages`] (the handler, within the stages around it), guarded
//! against panics and idleness, logged, and holding its slot in the connection count until it
//! ends.

use std::future::Future;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use log::{debug, info, warn};
use pin_project_lite::pin_project;
use smol::future::{CatchUnwind, FutureExt};

use super::stages::Stages;
use crate::limits::idle::IdleWatch;
use crate::logging::{log_panic, Peer};
use crate::observe::meter::Meter;
use crate::observe::stats::CloseReason;
use crate::stop::Slot;

pin_project! {
    /// The task of one accepted client: polls the handler's future until it returns, fails,
    /// panics, or the connection stays quiet for the idle timeout; then drops it (closing the
    /// socket), logs how it ended and frees the slot.
    ///
    /// A hand-written future rather than an `async fn`, because the task's size is most of an
    /// idle connection's memory: an `async fn` would keep its arguments beside the handler's
    /// future for the task's whole life.
    pub(crate) struct ConnectionTask<F> {
        #[pin]
        handler: Option<CatchUnwind<AssertUnwindSafe<Stages<F>>>>,
        peer: Peer,
        idle: Option<IdleWatch>,
        slot: Option<Slot>,
        // Its bytes, start and addresses: the log line, the stats and the end hook at its end.
        meter: Arc<Meter>,
    }

    impl<F> PinnedDrop for ConnectionTask<F> {
        /// A connection dropped before its handler finished was cancelled: the server stopped
        /// and its drain ran out of time. It is closed all the same, and logged as such.
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.handler.is_some() {
                drop_handler(this.handler, this.peer);
                debug!("{}: closed by the server stopping", this.peer);
                let summary = this.meter.finish(CloseReason::Stopped);
                if this.peer.is_known() {
                    info!("Connection closed: {} {summary}", this.peer);
                }
            }
        }
    }
}

impl<F: Future<Output = io::Result<()>>> ConnectionTask<F> {
    /// `handler` is what runs for the client at `peer`: the handler within its stages.
    pub(crate) fn new(
        handler: Stages<F>,
        peer: Peer,
        idle: Option<IdleWatch>,
        slot: Slot,
        meter: Arc<Meter>,
    ) -> Self {
        // The seed's two lines per client, in its words, so the programs are recognisably the same.
        // Behind a proxy, the PROXY stage logs this line once the header names the client.
        if peer.is_known() {
            info!("Connection from {peer}");
        }
        ConnectionTask {
            handler: Some(AssertUnwindSafe(handler).catch_unwind()),
            peer,
            idle,
            slot: Some(slot),
            meter,
        }
    }
}

impl<F: Future<Output = io::Result<()>>> Future for ConnectionTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(handler) = this.handler.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        let outcome = match this.idle {
            None => handler.poll(cx).map(Some),
            Some(idle) => match idle.waker(cx.waker()) {
                Some(waker) => handler.poll(&mut Context::from_waker(waker)).map(Some),
                None => Poll::Ready(None),
            },
        };
        let Poll::Ready(outcome) = outcome else {
            return Poll::Pending;
        };
        let peer = &*this.peer;
        // Dropping the handler's future closes the socket, before the log says so.
        drop_handler(this.handler, peer);
        let closed = match outcome {
            Some(Ok(Some(Ok(())))) => CloseReason::ClientClosed,
            Some(Ok(Some(Err(e)))) => {
                log_handler_error(peer, &e);
                error_reason(&e)
            }
            // A stage ended it, and said why.
            Some(Ok(None)) => this.meter.stage_failure(),
            Some(Err(panic)) => {
                log_panic(peer, &*panic);
                CloseReason::HandlerPanic
            }
            None => {
                debug!("{peer}: closed: idle for the idle timeout");
                CloseReason::IdleTimeout
            }
        };
        let closed = match closed {
            CloseReason::ClientClosed | CloseReason::PeerReset if this.meter.is_health_check() => {
                CloseReason::HealthCheck
            }
            closed => closed,
        };
        let summary = this.meter.finish(closed);
        // A connection dropped before its PROXY header named the client gets neither seed line;
        // a health check gets them at debug, so that checks every second do not fill the log.
        if closed == CloseReason::HealthCheck {
            debug!("Connection closed: {peer} {summary}");
        } else if peer.is_known() {
            info!("Connection closed: {peer} {summary}");
        }
        drop(this.slot.take());
        Poll::Ready(())
    }
}

/// Drops the handler's future, catching a panic in its `Drop`: one while a stop cancels the task
/// would otherwise abort the process (async-task cannot unwind out of a destructor).
fn drop_handler<F>(handler: Pin<&mut Option<F>>, peer: &Peer) {
    let mut handler = handler;
    if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| handler.set(None))) {
        log_panic(peer, &*panic);
    }
}

/// How a handler's error ended its connection: a reset by the client, a write to a client
/// that had gone, or a client that TCP keepalive (or TCP_USER_TIMEOUT) found gone (`TimedOut`,
/// as the socket reports ETIMEDOUT) is the client's doing; anything else is the handler's
/// error.
fn error_reason(e: &io::Error) -> CloseReason {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | BrokenPipe | TimedOut => CloseReason::PeerReset,
        _ => CloseReason::HandlerError,
    }
}

fn log_handler_error(peer: &Peer, e: &io::Error) {
    use io::ErrorKind::*;
    match e.kind() {
        // A client that resets or vanishes is the network being normal, not a fault to act on.
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut => {
            debug!("{peer}: {e}")
        }
        _ => warn!("{peer}: handler failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_resets_or_vanishes_is_its_doing_and_other_errors_the_handlers() {
        let reason = |kind: io::ErrorKind| error_reason(&io::Error::from(kind));
        assert_eq!(
            reason(io::ErrorKind::ConnectionReset),
            CloseReason::PeerReset
        );
        assert_eq!(reason(io::ErrorKind::BrokenPipe), CloseReason::PeerReset);
        // ETIMEDOUT: TCP keepalive's probes, or TCP_USER_TIMEOUT, found the client gone.
        assert_eq!(reason(io::ErrorKind::TimedOut), CloseReason::PeerReset);
        assert_eq!(
            reason(io::ErrorKind::InvalidData),
            CloseReason::HandlerError
        );
        assert_eq!(reason(io::ErrorKind::Other), CloseReason::HandlerError);
    }
}
