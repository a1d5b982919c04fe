//! A connection's stages, in the order it passes them: the PROXY header, per-client admission,
//! the TLS handshake, the handler, the TLS close. Each stage that waits on the client (the
//! header, the handshake, the close) runs inside the connection's own task with its own
//! deadline, so a slow client delays no one; what needs no wait (admission of a client its
//! socket names, the call that makes the handler's future) runs in the accept loop, so a
//! connection with no stage but the handler pays nothing for the others (see [`Stages`]).

use std::future::Future;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use log::debug;
use pin_project_lite::pin_project;

use super::connection::{Connection, Handler};
use crate::deadline::within;
use crate::info::ConnectionInfo;
use crate::limits::per_client::{admit, ClientSlot, PerClient};
use crate::logging::{log_panic, Peer};
use crate::observe::counters::Counters;
use crate::observe::meter::Meter;
use crate::observe::stats::{CloseReason, RefusalReason};
use crate::stop::StopHandle;
use crate::transport::proxy::{self, ProxyProtocol};
use crate::transport::tls::TlsConfig;
use crate::transport::tls_session;
use crate::transport::{Accepted, Listener, Stream};

/// What every connection of a server shares: the handler, and what its stages need.
pub(crate) struct Service<H> {
    pub(crate) handler: H,
    pub(crate) stop: StopHandle,
    pub(crate) counters: Arc<Counters>,
    /// The per-client connection limit, if one is set.
    pub(crate) per_client: Option<Arc<PerClient>>,
    /// How long a TLS handshake (and, after the handler, the TLS close) may take.
    pub(crate) handshake_timeout: Duration,
}

/// A connection's whole run when stages surround its handler; `None` when a stage ended the
/// connection before the handler ran (the stage logs why, and tells the meter).
type BoxedStages = Pin<Box<dyn Future<Output = Option<io::Result<()>>> + Send>>;

pin_project! {
    /// What a connection's task runs: the handler's future alone, for a connection with no
    /// other stage, which so pays nothing for stages it does not have; or the handler within
    /// its stages, boxed.
    #[project = StagesProj]
    pub(crate) enum Stages<F> {
        Handler { #[pin] handler: F },
        Boxed { run: BoxedStages },
    }
}

impl<F: Future<Output = io::Result<()>>> Future for Stages<F> {
    /// `None` when a stage ended the connection before the handler ran.
    type Output = Option<io::Result<()>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StagesProj::Handler { handler } => handler.poll(cx).map(Some),
            StagesProj::Boxed { run } => run.as_mut().poll(cx),
        }
    }
}

impl<F> Stages<F> {
    fn boxed(run: impl Future<Output = Option<io::Result<()>>> + Send + 'static) -> Self {
        Stages::Boxed { run: Box::pin(run) }
    }
}

/// The stages of a connection just accepted on `listener`, to run in its task, with its meter.
/// `None` when it ends before it has a task: refused by the per-client limit (counted as
/// refused), or its handler panicked before returning its future.
pub(crate) fn begin<H: Handler>(
    listener: &Listener,
    service: &Arc<Service<H>>,
    accepted: Accepted,
    peer: &Peer,
) -> Option<(Stages<H::Future>, Arc<Meter>)> {
    let Accepted { stream, info } = accepted;
    let steps = Steps {
        service: Arc::clone(service),
        peer: peer.clone(),
        tls: listener.tls().cloned(),
    };
    let Some(proxy) = listener.proxy() else {
        // The socket names the client: it is admitted here, in the accept loop, so that a
        // client over its limit never gets a task.
        let Ok(client) = admit(service.per_client.as_ref(), &info, peer) else {
            service
                .counters
                .count_refused(RefusalReason::PerClientLimit);
            return None;
        };
        let meter = Meter::start(&service.counters, &info, true);
        // A handler may panic before it returns its future: that ends this client only.
        let after = AssertUnwindSafe(|| steps.after_header(stream, info, client, &meter));
        return match panic::catch_unwind(after) {
            Ok(stages) => Some((stages, meter)),
            Err(panic) => {
                log_panic(peer, &*panic);
                meter.finish(CloseReason::HandlerPanic);
                None
            }
        };
    };
    // On a PROXY listener, the hooks hear of the client once its header names it.
    let meter = Meter::start(&service.counters, &info, false);
    let run = steps.behind_proxy(stream, info, proxy.clone(), Arc::clone(&meter));
    Some((Stages::boxed(run), meter))
}

/// What the stages after the PROXY header need, moved into the connection's task when a stage
/// must wait.
struct Steps<H> {
    service: Arc<Service<H>>,
    peer: Peer,
    /// The TLS configuration of a TLS listener.
    tls: Option<TlsConfig>,
}

impl<H: Handler> Steps<H> {
    /// The PROXY header, read and parsed within its deadline; then the client it names is
    /// admitted, and the stages after the header run.
    async fn behind_proxy(
        self,
        stream: Stream,
        info: ConnectionInfo,
        proxy: ProxyProtocol,
        meter: Arc<Meter>,
    ) -> Option<io::Result<()>> {
        let Stream::Tcp(mut tcp) = stream else {
            debug!(
                "{}: the PROXY protocol over anything but TCP is not supported",
                self.peer
            );
            meter.stage_failed(CloseReason::ProxyHeaderFailed);
            return None;
        };
        let Some(info) = proxy::read_header(&mut tcp, info, &proxy, &self.peer).await else {
            meter.stage_failed(CloseReason::ProxyHeaderFailed);
            return None;
        };
        meter.announce(&info);
        // Refused here, it counts as closed, not refused: it had its slot, and was counted.
        let Ok(client) = admit(self.service.per_client.as_ref(), &info, &self.peer) else {
            meter.stage_failed(CloseReason::PerClientLimit);
            return None;
        };
        self.after_header(Stream::Tcp(tcp), info, client, &meter)
            .await
    }

    /// The stages after the PROXY header (or from the start, without one), holding the
    /// client's place under the per-client limit until they end: on a TLS listener the
    /// handshake, the handler, then the TLS close; on the others the handler alone.
    fn after_header(
        mut self,
        stream: Stream,
        info: ConnectionInfo,
        client: Option<ClientSlot>,
        meter: &Arc<Meter>,
    ) -> Stages<H::Future> {
        let meter = Arc::clone(meter);
        let stages = match self.tls.take() {
            Some(tls) => Stages::boxed(self.over_tls(stream, info, tls, meter)),
            None => {
                let connection = Connection::new(stream, info, self.service.stop.clone(), meter);
                Stages::Handler {
                    handler: self.service.handler.call(connection),
                }
            }
        };
        match client {
            None => stages,
            Some(client) => Stages::boxed(async move {
                let _held = client;
                stages.await
            }),
        }
    }

    /// The TLS handshake within its deadline, the handler on the decrypted stream, then the TLS
    /// close (what rustls still buffers, and close_notify) within the same deadline.
    async fn over_tls(
        self,
        stream: Stream,
        mut info: ConnectionInfo,
        tls: TlsConfig,
        meter: Arc<Meter>,
    ) -> Option<io::Result<()>> {
        let Stream::Tcp(tcp) = stream else {
            debug!("{}: TLS over anything but TCP is not supported", self.peer);
            return None;
        };
        let timeout = self.service.handshake_timeout;
        if info.proxy.as_ref().is_some_and(|proxy| proxy.local) {
            // A load balancer's own connection (a v2 LOCAL header): its health checks on a TLS
            // port often send nothing and close, which is no failed handshake.
            if let Err(reason) = anything_sent(&tcp, timeout, &self.peer).await {
                meter.stage_failed(reason);
                return None;
            }
        }
        let (session, closing) =
            tls_session::handshake(tcp, &mut info, &tls, timeout, &self.peer).await?;
        let stream = Stream::Tls(session);
        let connection = Connection::new(stream, info, self.service.stop.clone(), meter);
        let outcome = self.service.handler.call(connection).await;
        closing.close(timeout, &self.peer).await;
        Some(outcome)
    }
}

/// Waits, within `timeout`, for a first byte on a connection that is to start a TLS handshake:
/// `Err(HealthCheck)` if it closes or resets first (logged at debug), `Err(HandshakeFailed)` if
/// none comes in time or the socket fails otherwise.
async fn anything_sent(
    tcp: &async_net::TcpStream,
    timeout: Duration,
    peer: &Peer,
) -> Result<(), CloseReason> {
    match within(timeout, "no handshake", tcp.peek(&mut [0])).await {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => {
            debug!("{peer}: a health check: closed before any TLS handshake");
            Err(CloseReason::HealthCheck)
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            debug!("{peer}: a health check: reset before any TLS handshake");
            Err(CloseReason::HealthCheck)
        }
        Err(e) => {
            debug!("{peer}: TLS handshake failed: {e}");
            Err(CloseReason::HandshakeFailed)
        }
    }
}
