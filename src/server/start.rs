//! Starting a server, step by step: check the options, bind every listener, spawn the accept
//! loops (and the metrics endpoint) on one executor, start the worker threads that run it, and
//! install what stops it. A step that fails takes apart what the steps before it started.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_executor::{Executor, Task};
use async_signal::Signals;
use log::{debug, info};
use smol::{channel, future};

use super::accept::{accept_loop, Accepting};
use super::builder::Builder;
use super::running::{drain_delay, Running, Server};
use super::signals::{forward_signals, Reload, HANDLED};
use super::workers;
use crate::conn::connection::{Connection, Handler};
use crate::conn::stages::Service;
use crate::limits::idle::IdleSweeper;
use crate::limits::per_client::PerClient;
use crate::observe::counters::Counters;
use crate::observe::serve_metrics;
use crate::stop::{Lifecycle, StopHandle, Tracker};
#[cfg(unix)]
use crate::transport::systemd;
use crate::transport::{ListenOptions, Listener};

impl Builder {
    /// Starts serving `handler` in the background on every listener added (`listen_tcp`,
    /// `listen_tls`, `listen_unix`, `listen_systemd`...); the returned [`Server`] tells the bound
    /// addresses and stops the server.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[cfg(unix)] {
    /// let path = std::env::temp_dir().join(format!("taskserve-doc-{}.sock", std::process::id()));
    /// let server = taskserve::Server::builder()
    ///     .listen_unix(&path)
    ///     .start(taskserve::echo)?;
    /// println!("listening on {}", server.local_addrs()[0].0);
    /// server.stop(); // removes the socket file
    /// assert!(!path.exists());
    /// # }
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] when no listener was added, for zero threads,
    /// connections or connections per client, or an IPv6 client prefix over 128; with the cause
    /// (in use, not available...) when an endpoint cannot be bound; and when a worker thread
    /// or the signal handlers cannot be started.
    pub fn start<H, F>(self, handler: H) -> io::Result<Server>
    where
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        self.check()?;
        // All bound before anything starts: one that fails leaves nothing behind.
        let options = self.listen_options();
        let listeners = self.bind(&options)?;
        let metrics = self.bind_metrics(&options)?;

        let core = Core::new(&self);
        let mut server = core.server(&self, &listeners);
        let (close_listeners, closing) = channel::bounded(1);
        let (release_workers, released) = channel::bounded(1);
        let mut running = core.running(&self, close_listeners, release_workers);
        let service = Arc::new(core.service(&self, handler));
        running.accept = core.spawn_accept_loops(&self, listeners, service, closing);
        if let Some(listener) = metrics {
            server.metrics_addr = listener.local_addr().as_inet();
            running.cancel.push(core.spawn_metrics(listener));
        }
        let started = workers::spawn(
            self.threads,
            &core.executor,
            &core.lifecycle,
            &released,
            &mut running.workers,
        );
        // Last, once nothing else can fail: signal-hook cannot give a signal its default
        // action back, so a failed start must not leave the process deaf to Ctrl-C.
        let started = started.and_then(|()| match self.stop_on_signals {
            true => core.forward_signals(&server),
            false => Ok(()),
        });
        if let Err(e) = started {
            return Err(core.abandon(running, e));
        }
        core.set_stop(running, self.notify_systemd, self.drain_delay);
        // At debug: the caller has the address from `local_addr` and says it where its users
        // look (`echo` prints it on stdout); `serve`, whose caller cannot, logs it at info.
        for (addr, transport) in server.local_addrs() {
            debug!("listening on {addr} ({transport})");
        }
        if self.notify_systemd {
            notify_ready();
        }
        Ok(server)
    }

    /// Serves `handler` on every listener added until SIGINT or SIGTERM, then stops gracefully
    /// (see [`Server::wait`]).
    ///
    /// # Errors
    ///
    /// As [`Builder::start`], including when the signal handlers cannot be installed.
    pub fn serve<H, F>(self, handler: H) -> io::Result<()>
    where
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        let server = self
            .stop_on_signals(true)
            .notify_systemd(true)
            .start(handler)?;
        for (addr, transport) in server.local_addrs() {
            info!("listening on {addr} ({transport})");
        }
        server.wait();
        Ok(())
    }

    /// The options that cannot work, as one error each.
    fn check(&self) -> io::Result<()> {
        let problem = if self.endpoints.is_empty() {
            "no listener to start: add one with listen_tcp, listen_tls, listen_unix or listen_systemd"
        } else if self.threads == 0 {
            "threads must be at least 1"
        } else if self.max_connections == 0 {
            "max_connections must be at least 1"
        } else if self.max_connections_per_ip == Some(0) {
            "max_connections_per_ip must be at least 1"
        } else if self.ipv6_client_prefix > 128 {
            "ipv6_client_prefix must be at most 128"
        } else if self.unix_mode.is_some_and(|mode| mode > 0o777) {
            "unix_mode must be permission bits, at most 0o777"
        } else {
            return Ok(());
        };
        Err(io::Error::new(io::ErrorKind::InvalidInput, problem))
    }

    fn listen_options(&self) -> ListenOptions {
        ListenOptions {
            backlog: self.backlog,
            proxy: self.proxy.clone(),
            reuse_port: self.reuse_port,
            keepalive: self.keepalive,
            unix_mode: self.unix_mode,
        }
    }

    /// Every client listener, in the order added (systemd's sockets in the order passed).
    fn bind(&self, options: &ListenOptions) -> io::Result<Vec<Listener>> {
        let mut listeners = Vec::with_capacity(self.endpoints.len());
        for endpoint in &self.endpoints {
            listeners.extend(endpoint.bind(options)?);
        }
        Ok(listeners)
    }

    /// The metrics endpoint's listener, if one was asked for: not a client listener, so no
    /// PROXY header and no keepalive.
    fn bind_metrics(&self, options: &ListenOptions) -> io::Result<Option<Listener>> {
        let Some(endpoint) = &self.metrics else {
            return Ok(None);
        };
        Ok(endpoint.bind(&options.plain())?.pop())
    }
}

/// The parts every task and thread of one server shares, made before any of them starts.
struct Core {
    executor: Arc<Executor<'static>>,
    tracker: Arc<Tracker>,
    lifecycle: Arc<Lifecycle>,
    counters: Arc<Counters>,
    idle: Option<Arc<IdleSweeper>>,
}

impl Core {
    fn new(builder: &Builder) -> Self {
        let executor = Arc::new(Executor::new());
        let tracker = Arc::new(Tracker::default());
        let idle = builder.idle_timeout.map(IdleSweeper::new);
        if let Some(idle) = &idle {
            // Detached: dropping the executor at the end of a stop cancels it.
            executor.spawn(Arc::clone(idle).run()).detach();
        }
        let lifecycle = Arc::new(Lifecycle::default());
        Core {
            counters: Counters::new(
                Arc::clone(&tracker),
                Arc::clone(&lifecycle),
                builder.hooks.clone(),
            ),
            lifecycle,
            executor,
            tracker,
            idle,
        }
    }

    /// The handle `start` returns, which tells where the server listens.
    fn server(&self, builder: &Builder, listeners: &[Listener]) -> Server {
        Server {
            local_addrs: listeners
                .iter()
                .map(|l| (l.local_addr().clone(), l.transport()))
                .collect(),
            threads: builder.threads,
            lifecycle: Arc::clone(&self.lifecycle),
            tracker: Arc::clone(&self.tracker),
            counters: Arc::clone(&self.counters),
            metrics_addr: None,
            tls: listeners.iter().filter_map(|l| l.tls().cloned()).collect(),
        }
    }

    /// What a stop takes apart, with nothing started yet: dropping `close_listeners` will end
    /// the accept loops, and dropping `release_workers` the worker threads.
    fn running(
        &self,
        builder: &Builder,
        close_listeners: channel::Sender<()>,
        release_workers: channel::Sender<()>,
    ) -> Running {
        Running {
            close_listeners,
            accept: Vec::new(),
            cancel: Vec::new(),
            tracker: Arc::clone(&self.tracker),
            shutdown_timeout: builder.shutdown_timeout,
            release_workers,
            workers: Vec::with_capacity(builder.threads),
            executor: Arc::clone(&self.executor),
        }
    }

    /// What every connection's stages need.
    fn service<H>(&self, builder: &Builder, handler: H) -> Service<H> {
        Service {
            handler,
            stop: StopHandle::new(&self.lifecycle),
            counters: Arc::clone(&self.counters),
            per_client: builder
                .max_connections_per_ip
                .map(|max| Arc::new(PerClient::new(max, builder.ipv6_client_prefix))),
            handshake_timeout: builder.tls_handshake_timeout,
        }
    }

    /// One accept loop per listener; each ends, serving what its listener still holds queued,
    /// once `closing` closes (when the stop drops its sender).
    fn spawn_accept_loops<H: Handler>(
        &self,
        builder: &Builder,
        listeners: Vec<Listener>,
        service: Arc<Service<H>>,
        closing: channel::Receiver<()>,
    ) -> Vec<Task<()>> {
        let accepting = Arc::new(Accepting {
            service,
            executor: Arc::clone(&self.executor),
            tracker: Arc::clone(&self.tracker),
            idle: self.idle.clone(),
            max_connections: builder.max_connections,
        });
        listeners
            .into_iter()
            .map(|listener| {
                let closing = closing.clone();
                // `recv` fails once the sender is dropped: nothing is ever sent.
                let closed = async move {
                    let _ = closing.recv().await;
                };
                let accepting = Arc::clone(&accepting);
                self.executor
                    .spawn(accept_loop(listener, accepting, closed))
            })
            .collect()
    }

    /// The Prometheus endpoint; stopped with the accept loops, so that a stop closes its port
    /// first too.
    fn spawn_metrics(&self, listener: Listener) -> Task<()> {
        let serving = serve_metrics(
            listener,
            Arc::clone(&self.counters),
            Arc::clone(&self.executor),
        );
        self.executor.spawn(serving)
    }

    /// SIGINT and SIGTERM as stop requests, SIGHUP as a reload (in a task of its own, so that
    /// signals are handled while it runs), for as long as the server runs.
    fn forward_signals(&self, server: &Server) -> io::Result<()> {
        let signals = Signals::new(HANDLED).map_err(|e| {
            io::Error::new(e.kind(), format!("failed to install signal handlers: {e}"))
        })?;
        // One reload may wait while another runs; more SIGHUPs meanwhile add nothing.
        let (hangup, hangups) = smol::channel::bounded(1);
        let reload = Reload {
            tls: server.tls.clone(),
        };
        let forwarding = forward_signals(signals, Arc::clone(&self.lifecycle), hangup);
        self.executor.spawn(forwarding).detach();
        self.executor.spawn(reload.on_hangups(hangups)).detach();
        Ok(())
    }

    /// Sets what the first stop request runs: tell systemd, wait out the drain delay, then
    /// take `running` apart.
    fn set_stop(&self, running: Running, notify_systemd: bool, delay: Duration) {
        self.lifecycle.set_stop(Box::new(move |lifecycle| {
            info!("stopping");
            if notify_systemd {
                notify_stopping();
            }
            let hurry_at = drain_delay(lifecycle, delay);
            lifecycle.set_draining();
            running.finish(lifecycle.requested(hurry_at));
        }));
    }

    /// Takes apart what a failed start had started, and returns its error.
    fn abandon(&self, running: Running, error: io::Error) -> io::Error {
        // Stops the workers started so far, and returns once they have ended.
        running.finish(future::ready(()));
        self.lifecycle.set_stopped();
        error
    }
}

/// `READY=1` to systemd, when it started the process with a `NOTIFY_SOCKET`.
fn notify_ready() {
    #[cfg(unix)]
    systemd::notify_ready();
}

/// `STOPPING=1` to systemd, when it started the process with a `NOTIFY_SOCKET`.
fn notify_stopping() {
    #[cfg(unix)]
    systemd::notify_stopping();
}
