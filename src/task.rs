//! One connection's task: the stages before the handler (a TLS handshake), then the handler's
//! future, guarded against panics and idleness, logged, and holding its slot in the connection
//! count until it ends.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use log::{debug, error, info, warn};
use pin_project_lite::pin_project;
use smol::future::{CatchUnwind, FutureExt};

use crate::connection::{Addr, ConnectionInfo};
use crate::idle::IdleWatch;
use crate::shutdown::Slot;
use crate::stats::{CloseReason, Meter};

/// A client as the log names it: its address, or for a Unix socket who it is.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    Inet(SocketAddr),
    Described(Arc<str>),
    /// A client behind a proxy that sends a PROXY header: named by the proxy's address until
    /// the header names the client (see `crate::proxy`).
    Proxied(Arc<Proxied>),
}

/// The addresses of a connection on a PROXY listener.
#[derive(Debug)]
pub(crate) struct Proxied {
    proxy: SocketAddr,
    client: OnceLock<SocketAddr>,
}

impl Peer {
    pub(crate) fn of(info: &ConnectionInfo) -> Peer {
        match (&info.peer_addr, &info.peer_credentials) {
            (Addr::Inet(addr), _) => Peer::Inet(*addr),
            (_, Some(cred)) => {
                let pid = cred
                    .pid
                    .map(|pid| format!("pid {pid}, "))
                    .unwrap_or_default();
                Peer::Described(format!("{} ({pid}uid {})", info.local_addr, cred.uid).into())
            }
            (peer, None) => Peer::Described(format!("{peer} on {}", info.local_addr).into()),
        }
    }

    /// A connection on a PROXY listener, from the proxy at `proxy`.
    pub(crate) fn behind_proxy(proxy: SocketAddr) -> Peer {
        Peer::Proxied(Arc::new(Proxied {
            proxy,
            client: OnceLock::new(),
        }))
    }

    /// Names the client that a PROXY header gave; the log names it from now on.
    pub(crate) fn set_client(&self, client: SocketAddr) {
        if let Peer::Proxied(proxied) = self {
            let _ = proxied.client.set(client);
        }
    }

    /// Whether the client is known, and so was logged as `Connection from`: a connection on a
    /// PROXY listener is logged once its header named the client, and one that never sent a
    /// valid header gets neither that line nor `Connection closed` (a debug line says why).
    pub(crate) fn is_known(&self) -> bool {
        match self {
            Peer::Proxied(proxied) => proxied.client.get().is_some(),
            _ => true,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Inet(addr) => addr.fmt(f),
            Peer::Described(text) => f.write_str(text),
            Peer::Proxied(proxied) => match proxied.client.get() {
                Some(client) => client.fmt(f),
                None => write!(f, "{} (proxy, before its PROXY header)", proxied.proxy),
            },
        }
    }
}

/// A connection's whole run when stages surround its handler (a TLS handshake before it, the
/// TLS close after it); `None` when a stage ended the connection before the handler ran (the
/// stage logs why).
pub(crate) type Staged = Pin<Box<dyn Future<Output = Option<io::Result<()>>> + Send>>;

pin_project! {
    /// What a connection's task runs: the handler within its stages (a TLS handshake, then the
    /// TLS close), boxed; or the handler's future alone, for a plain connection, which so pays
    /// nothing for stages it does not have.
    #[project = StageProj]
    pub(crate) enum Stage<F> {
        Staged { run: Staged },
        Serving { #[pin] handler: F },
    }
}

impl<F: Future<Output = io::Result<()>>> Future for Stage<F> {
    /// `None` when a stage ended the connection before the handler ran.
    type Output = Option<io::Result<()>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StageProj::Staged { run } => run.as_mut().poll(cx),
            StageProj::Serving { handler } => handler.poll(cx).map(Some),
        }
    }
}

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
        handler: Option<CatchUnwind<AssertUnwindSafe<Stage<F>>>>,
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
    /// `handler` is what runs for the client at `peer`: its stages, then the handler.
    pub(crate) fn new(
        handler: Stage<F>,
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
                CloseReason::HandlerError
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
        let summary = this.meter.finish(closed);
        // A connection dropped before its PROXY header named the client gets neither seed line.
        if peer.is_known() {
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

/// Logs a handler's panic: a bug in the library user's code, so an error an operator should see.
pub(crate) fn log_panic(peer: &Peer, payload: &(dyn Any + Send)) {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic payload that is not a string)"
    };
    error!("{peer}: handler panicked: {message}");
}
