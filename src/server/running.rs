//! A running server: the handle its starter holds ([`Server`]), and the parts a stop takes
//! apart, in order ([`Running`]).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use async_executor::{Executor, Task};
use log::{error, info};
use smol::future::{self, FutureExt};
use smol::{channel, Timer};

use super::builder::Builder;
use super::workers::on_worker_of;
use crate::addr::Addr;
use crate::info::Transport;
use crate::logging::count;
use crate::observe::counters::Counters;
use crate::observe::stats::Stats;
use crate::stop::{Lifecycle, StopHandle, Tracker};
use crate::transport::tls::TlsConfig;

/// A running server: it tells where it listens and how many clients it serves, and stops.
/// Dropping it closes every connection at once; [`Server::stop`] lets them finish first.
///
/// It is `Sync`: one thread can block in [`Server::wait`] while others read
/// [`Server::connections`] through a shared reference.
pub struct Server {
    /// Each listener's address and transport, in the order they were given.
    pub(super) local_addrs: Vec<(Addr, Transport)>,
    pub(super) threads: usize,
    /// Stop requests, the stop itself, and its end.
    pub(super) lifecycle: Arc<Lifecycle>,
    /// Open connections.
    pub(super) tracker: Arc<Tracker>,
    /// What [`Server::stats`] reads.
    pub(super) counters: Arc<Counters>,
    /// Where the Prometheus endpoint listens.
    pub(super) metrics_addr: Option<SocketAddr>,
    /// The TLS listeners' configurations, for [`Server::reload_tls`].
    pub(super) tls: Vec<TlsConfig>,
}

/// The parts of a server that a stop takes apart, in this order.
pub(super) struct Running {
    /// Dropping this sender ends the accept loops.
    pub(super) close_listeners: channel::Sender<()>,
    /// One accept loop per listener, each owning its listening socket: once ended they have
    /// released the ports (and removed Unix socket files).
    pub(super) accept: Vec<Task<()>>,
    /// Tasks that own a listener which is not a client's (the metrics endpoint): cancelled.
    pub(super) cancel: Vec<Task<()>>,
    pub(super) tracker: Arc<Tracker>,
    pub(super) shutdown_timeout: Duration,
    /// Dropping this sender ends every worker's run of the executor.
    pub(super) release_workers: channel::Sender<()>,
    pub(super) workers: Vec<thread::JoinHandle<()>>,
    /// Dropped last, which cancels the connection tasks still left and so closes their sockets.
    pub(super) executor: Arc<Executor<'static>>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addrs", &self.local_addrs)
            .field("threads", &self.threads)
            .field("phase", &self.lifecycle.phase())
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A [`Builder`] with the default options.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The address of the server's first TCP (or TLS) listener, with the real port when it was
    /// given port 0.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::NotFound`] for a server with no TCP listener, only Unix sockets: see
    /// [`Server::local_addrs`].
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addrs
            .iter()
            .find_map(|(addr, _)| addr.as_inet())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the server has no TCP listener: see local_addrs",
                )
            })
    }

    /// Every listener's address and transport, in the order they were added.
    pub fn local_addrs(&self) -> &[(Addr, Transport)] {
        &self.local_addrs
    }

    /// Where the Prometheus endpoint ([`Builder::listen_metrics`]) listens, with the real port when
    /// it was given port 0; `None` without one.
    #[cfg(feature = "metrics")]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Reads every TLS listener's certificate and key files again: new handshakes use the new
    /// pair, open connections keep theirs. `echo` (and [`Builder::stop_on_signals`]) does this
    /// on SIGHUP.
    ///
    /// # Errors
    ///
    /// The first listener whose files cannot be read or do not match; that listener, like any
    /// other that failed, keeps the pair it had.
    #[cfg(feature = "tls")]
    pub fn reload_tls(&self) -> io::Result<()> {
        smol::block_on(super::signals::reload_off_workers(self.tls.clone()))
    }

    /// The number of worker threads running the executor.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The number of client connections open right now.
    pub fn connections(&self) -> usize {
        self.tracker.open()
    }

    /// The server's counters now: connections open and accepted, refused by reason, closed by
    /// how they ended, accept errors, bytes each way, uptime. Reading them costs a few atomic
    /// loads; the connections count as they go without sharing a counter per message.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// A handle that stops this server from anywhere: another thread, a signal handler of the
    /// program's own, or one of the server's tasks.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle::new(&self.lifecycle)
    }

    /// Stops gracefully and returns once stopped: stops accepting (the port is free at once),
    /// waits up to the shutdown timeout for open connections to end, closes the rest, and stops
    /// the threads. If a stop was already asked for, it waits for that one. A further request
    /// made meanwhile (a [`StopHandle`], or a signal with [`Builder::stop_on_signals`]) closes
    /// open connections at once.
    ///
    /// Called from one of the server's own tasks, which cannot wait for itself, it returns at
    /// once and the stop goes on.
    pub fn stop(&self) {
        self.lifecycle.request_once();
        self.wait();
    }

    /// Serves until the server has stopped: until a [`StopHandle`] (or, with
    /// [`Builder::stop_on_signals`], SIGINT or SIGTERM) asked it to, and the stop has finished
    /// as [`Server::stop`] describes. A second request cuts the wait for open connections short
    /// and closes them at once.
    ///
    /// Called from one of the server's own tasks, it returns at once rather than wait for
    /// itself.
    ///
    /// # Examples
    ///
    /// ```
    /// let server = taskserve::Server::builder().listen_tcp("127.0.0.1:0").start(taskserve::echo)?;
    /// let handle = server.stop_handle();
    /// std::thread::scope(|s| {
    ///     s.spawn(|| server.wait());
    ///     println!("{} clients", server.connections()); // readable while another thread waits
    ///     handle.stop();
    /// });
    /// # std::io::Result::Ok(())
    /// ```
    pub fn wait(&self) {
        if !on_worker_of(&self.lifecycle) {
            future::block_on(self.lifecycle.stopped());
        }
    }
}

/// The drain delay, on the stop's own thread: the server goes on accepting and serving for
/// `delay` after a stop began (its readiness answers no meanwhile), so that load balancers take
/// it out of rotation before it stops accepting. A further request ends the delay early.
/// Returns how many requests in all then hurry the drain: one more than have come.
pub(super) fn drain_delay(lifecycle: &Lifecycle, delay: Duration) -> usize {
    if delay.is_zero() {
        return 2;
    }
    info!(
        "drain delay: accepting for {delay:?} more, while balancers see this server is not ready"
    );
    let asked_again = future::block_on(
        async {
            lifecycle.requested(2).await;
            true
        }
        .or(async {
            Timer::after(delay).await;
            false
        }),
    );
    if asked_again {
        info!("asked again: drain delay cut short; no longer accepting");
        3
    } else {
        info!("drain delay over; no longer accepting");
        2
    }
}

impl Running {
    /// Stops accepting, waits for open connections until they end, the shutdown timeout
    /// passes or `hurry` completes, then closes the rest and joins the workers.
    pub(super) fn finish(self, hurry: impl Future<Output = ()>) {
        // The accept loops end, each serving the clients its listener still holds queued (a
        // closed listener resets them) and then closing it. This thread runs the executor
        // meanwhile: with no worker started (a failed `start`), nothing else would.
        drop(self.close_listeners);
        let executor = &self.executor;
        future::block_on(executor.run(async {
            for task in self.cancel {
                task.cancel().await;
            }
            for accept in self.accept {
                accept.await;
            }
        }));
        let open = self.tracker.open();
        if open > 0 {
            info!(
                "stopped accepting; waiting up to {:?} for {} to end",
                self.shutdown_timeout,
                count(open, "open connection")
            );
            let timeout = self.shutdown_timeout;
            future::block_on(
                self.tracker
                    .all_closed()
                    .or(async {
                        Timer::after(timeout).await;
                    })
                    .or(async {
                        hurry.await;
                        info!("asked again: closing connections now");
                    }),
            );
        }
        let left = self.tracker.open();
        if left > 0 {
            info!("closing {} still open", count(left, "connection"));
        }
        drop(self.release_workers);
        for worker in self.workers {
            // Tasks keep their panics (async-executor), so a worker only fails to join if
            // something outside any task panicked.
            if worker.join().is_err() {
                error!("a worker thread panicked");
            }
        }
        // The executor cancels its remaining tasks when dropped; their sockets close then.
        drop(self.executor);
        info!("stopped");
    }
}

impl Drop for Server {
    /// Closes every connection at once: a stop asked for three times waits for neither the
    /// drain delay nor the connections.
    fn drop(&mut self) {
        while self.lifecycle.requests() < 3 {
            self.lifecycle.request();
        }
        self.wait();
    }
}
