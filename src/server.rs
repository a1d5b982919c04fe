//! Everything between an address and a task per client: the builder, binding, the worker
//! threads that share one executor, the accept loop, and the running server's handle.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use async_executor::{Executor, Task};
use async_signal::{Signal, Signals};
use log::{debug, error, info, warn};
use smol::future::{self, FutureExt};
use smol::stream::StreamExt;
use smol::{channel, Async, Timer};
use socket2::{Domain, Protocol, Socket, Type};

use crate::conn::{log_panic, Connection};
use crate::idle::{IdleSweeper, IdleWatch};
use crate::shutdown::{Lifecycle, Tracker};

/// Serves `handler` on `addr` until SIGINT or SIGTERM, then stops gracefully: the whole server in
/// one call, with the [`Builder`]'s defaults.
///
/// Each client connection runs `handler(stream, peer)` as its own task on one executor shared by
/// one worker thread per CPU. A handler's error is logged with the peer address and ends that
/// connection only; so does a panic.
///
/// # Examples
///
/// ```no_run
/// taskserve::serve("127.0.0.1:25000", taskserve::echo)?;
/// # std::io::Result::Ok(())
/// ```
///
/// # Errors
///
/// Fails if `addr` cannot be bound (in use, not available here, does not resolve) or the signal
/// handlers cannot be installed. Once serving, it returns `Ok(())` after the stop.
pub fn serve<A, H, F>(addr: A, handler: H) -> io::Result<()>
where
    A: ToSocketAddrs,
    H: Fn(async_net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    Builder::new().serve(addr, handler)
}

/// The options of a server, set before it starts; [`Builder::start`] or [`Builder::serve`] run it.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let server = taskserve::Server::builder()
///     .threads(2)
///     .max_connections(1000)
///     .idle_timeout(Some(Duration::from_secs(60)))
///     .start("127.0.0.1:0", taskserve::echo)?;
/// assert_eq!(server.threads(), 2);
/// server.stop();
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    threads: usize,
    max_connections: usize,
    idle_timeout: Option<Duration>,
    shutdown_timeout: Duration,
    backlog: u32,
    stop_on_signals: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            threads: num_cpus::get(),
            max_connections: 10_000,
            idle_timeout: Some(Duration::from_secs(300)),
            shutdown_timeout: Duration::from_secs(10),
            backlog: 4096,
            stop_on_signals: false,
        }
    }
}

impl Builder {
    /// A builder with the defaults: one thread per CPU, at most 10,000 connections, a 300 s idle
    /// timeout, a 10 s shutdown timeout, and a listen backlog of 4096.
    pub fn new() -> Self {
        Self::default()
    }

    /// Worker threads that run the executor (default: the number of CPUs); at least 1.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Connections served at once (default 10,000); at least 1. Past it, a new connection is
    /// accepted and closed at once, so its client sees a prompt close rather than a hang.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// How long a connection may go without activity before it is closed (default 300 s); `None`
    /// never closes one. A connection is active when its handler is woken: data or a close
    /// arrived, a blocked write made progress, or anything else the handler awaits happened (a
    /// chat room's messages, say). So a client that stopped reading while its reply waits is
    /// inactive too. It is closed between the timeout and an eighth more after its last
    /// activity, give or take the time a busy worker takes to notice. Must not be zero.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a graceful stop waits for open connections to end by themselves before it
    /// closes them (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Connections the kernel may queue before they are accepted (default 4096; the kernel caps
    /// it at `net.core.somaxconn`). The usual 128 drops handshakes when thousands of clients
    /// connect at once.
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Whether SIGINT and SIGTERM ask the server to stop (default: no; [`serve`] says yes), each
    /// counting as one [`StopHandle::stop`]. SIGHUP, which closing a terminal sends, is then
    /// logged and the server keeps serving. The handlers are in place when `start` returns, so
    /// a script that waits for the server's address can signal it at once. See
    /// [`Server::wait`].
    ///
    /// The handlers come from signal-hook, which cannot give a signal its default action back:
    /// once the server has stopped, the process ignores SIGINT, SIGTERM and SIGHUP. Use it in a program
    /// that ends when its server does, as the `echo` binary.
    pub fn stop_on_signals(mut self, yes: bool) -> Self {
        self.stop_on_signals = yes;
        self
    }

    /// Binds `addr` and starts serving `handler` in the background; the returned [`Server`]
    /// tells the bound address and stops the server.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    ///
    /// let server = taskserve::Server::builder().start("127.0.0.1:0", taskserve::echo)?;
    /// let mut client = std::net::TcpStream::connect(server.local_addr())?;
    /// client.write_all(b"hello")?;
    /// let mut reply = [0; 9];
    /// client.read_exact(&mut reply)?;
    /// assert_eq!(&reply, b"GOT:hello");
    /// server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] for zero threads, zero connections or a zero
    /// idle timeout, with the cause (in use, not available...) when no address of `addr` can be
    /// bound, and when a worker thread cannot be started.
    pub fn start<A, H, F>(self, addr: A, handler: H) -> io::Result<Server>
    where
        A: ToSocketAddrs,
        H: Fn(async_net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        if self.threads == 0 {
            return Err(invalid_input("threads must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid_input("max_connections must be at least 1"));
        }
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err(invalid_input(
                "idle_timeout must be more than zero (None never times out)",
            ));
        }
        let listener = bind(addr, self.backlog)?;
        let local_addr = listener.local_addr()?;
        let listener = Async::new(listener)?;

        let executor = Arc::new(Executor::new());
        let tracker = Arc::new(Tracker::default());
        let idle = self.idle_timeout.map(IdleSweeper::new);
        if let Some(idle) = &idle {
            // Detached: dropping the executor at the end of a stop cancels it.
            executor.spawn(Arc::clone(idle).run()).detach();
        }
        let (release_workers, released) = channel::bounded::<()>(1);
        let lifecycle = Arc::new(Lifecycle::default());
        let accept = executor.spawn(accept_loop(
            listener,
            Arc::clone(&executor),
            handler,
            Arc::clone(&tracker),
            idle,
            self.max_connections,
        ));
        let server = Server {
            local_addr,
            threads: self.threads,
            lifecycle: Arc::clone(&lifecycle),
            tracker: Arc::clone(&tracker),
        };
        let mut running = Running {
            accept,
            tracker,
            shutdown_timeout: self.shutdown_timeout,
            release_workers,
            workers: Vec::with_capacity(self.threads),
            executor: Arc::clone(&executor),
        };
        for n in 0..self.threads {
            // Linux keeps 15 bytes of a thread name: `taskserve-worker-N` would lose its number.
            let name = format!("taskserve-w{n}");
            let executor = Arc::clone(&executor);
            let released = released.clone();
            let lifecycle = Arc::clone(&lifecycle);
            let worker = thread::Builder::new()
                .name(name.clone())
                .spawn(move || run_worker(&executor, &lifecycle, released));
            match worker {
                Ok(worker) => running.workers.push(worker),
                Err(e) => {
                    // Stops the workers started so far, and returns once they have ended.
                    running.finish(future::ready(()));
                    return Err(io::Error::new(
                        e.kind(),
                        format!("failed to start {name}: {e}"),
                    ));
                }
            }
        }
        if self.stop_on_signals {
            // Last, once nothing else can fail: signal-hook cannot give a signal its default
            // action back, so a failed start must not leave the process deaf to Ctrl-C.
            let signals = match Signals::new([Signal::Int, Signal::Term, Signal::Hup]) {
                Ok(signals) => signals,
                Err(e) => {
                    running.finish(future::ready(()));
                    return Err(io::Error::new(
                        e.kind(),
                        format!("failed to install signal handlers: {e}"),
                    ));
                }
            };
            executor
                .spawn(forward_signals(signals, Arc::clone(&lifecycle)))
                .detach();
        }
        lifecycle.set_stop(Box::new(move |lifecycle| {
            info!("stopping");
            running.finish(lifecycle.hurried());
        }));
        // At debug: the caller has the address from `local_addr` and says it where its users
        // look (`echo` prints it on stdout); `serve`, whose caller cannot, logs it at info.
        debug!(
            "listening on {local_addr} ({})",
            count(self.threads, "thread")
        );
        Ok(server)
    }

    /// Binds `addr`, serves `handler` until SIGINT or SIGTERM, then stops gracefully (see
    /// [`Server::wait`]).
    ///
    /// # Errors
    ///
    /// As [`Builder::start`], including when the signal handlers cannot be installed.
    pub fn serve<A, H, F>(self, addr: A, handler: H) -> io::Result<()>
    where
        A: ToSocketAddrs,
        H: Fn(async_net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        let server = self.stop_on_signals(true).start(addr, handler)?;
        info!(
            "listening on {} ({})",
            server.local_addr(),
            count(server.threads(), "thread")
        );
        server.wait();
        Ok(())
    }
}

fn invalid_input(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// A running server: it tells where it listens and how many clients it serves, and stops.
/// Dropping it closes every connection at once; [`Server::stop`] lets them finish first.
///
/// It is `Sync`: one thread can block in [`Server::wait`] while others read
/// [`Server::connections`] through a shared reference.
pub struct Server {
    local_addr: SocketAddr,
    threads: usize,
    /// Stop requests, the stop itself, and its end.
    lifecycle: Arc<Lifecycle>,
    /// Open connections.
    tracker: Arc<Tracker>,
}

/// The parts of a server that a stop takes apart, in this order.
struct Running {
    /// Owns the listening socket; cancelling it releases the port.
    accept: Task<()>,
    tracker: Arc<Tracker>,
    shutdown_timeout: Duration,
    /// Dropping this sender ends every worker's run of the executor.
    release_workers: channel::Sender<()>,
    workers: Vec<thread::JoinHandle<()>>,
    /// Dropped last, which cancels the connection tasks still left and so closes their sockets.
    executor: Arc<Executor<'static>>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("threads", &self.threads)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A [`Builder`] with the default options.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The address the server listens on, with the real port when it was started on port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The number of worker threads running the executor.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The number of client connections open right now.
    pub fn connections(&self) -> usize {
        self.tracker.open()
    }

    /// A handle that stops this server from anywhere: another thread, a signal handler of the
    /// program's own, or one of the server's tasks.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.lifecycle))
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
        if self.lifecycle.requests() == 0 {
            self.lifecycle.request();
        }
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
    /// let server = taskserve::Server::builder().start("127.0.0.1:0", taskserve::echo)?;
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

impl Running {
    /// Stops accepting, waits for open connections until they end, the shutdown timeout
    /// passes or `hurry` completes, then closes the rest and joins the workers.
    fn finish(self, hurry: impl Future<Output = ()>) {
        // Cancelling drops the accept loop, and with it the listening socket. This thread runs
        // the executor meanwhile: with no worker started (a failed `start`), nothing else would.
        future::block_on(self.executor.run(self.accept.cancel()));
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
    /// Closes every connection at once: a stop asked for twice does not wait for them.
    fn drop(&mut self) {
        while self.lifecycle.requests() < 2 {
            self.lifecycle.request();
        }
        self.wait();
    }
}

/// Turns SIGINT and SIGTERM into stop requests, and logs SIGHUP, for as long as the server runs. Spawned on the
/// server's executor, so that signals count during a stop's drain too.
async fn forward_signals(mut signals: Signals, lifecycle: Arc<Lifecycle>) {
    while let Some(signal) = signals.next().await {
        match signal {
            Ok(Signal::Int) => info!("received SIGINT"),
            Ok(Signal::Term) => info!("received SIGTERM"),
            Ok(Signal::Hup) => {
                // What closing a terminal sends: the default action would kill the server.
                info!("received SIGHUP: nothing to reload; still serving");
                continue;
            }
            Ok(other) => info!("received {other:?}"),
            Err(e) => {
                warn!("cannot read signals: {e}");
                return;
            }
        }
        lifecycle.request();
    }
}

/// Stops a [`Server`] from anywhere, and tells when a stop has begun; it is cheap to clone.
///
/// # Examples
///
/// ```
/// let server = taskserve::Server::builder().start("127.0.0.1:0", taskserve::echo)?;
/// let handle = server.stop_handle();
/// std::thread::spawn(move || handle.stop());
/// server.wait(); // returns once the handle has asked and the server has stopped
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<Lifecycle>);

impl StopHandle {
    /// Asks the server to stop gracefully, and returns at once: the server stops accepting,
    /// lets open connections finish for up to the shutdown timeout and closes the rest, whether
    /// or not anyone waits for it. Asking again (or a signal, with
    /// [`Builder::stop_on_signals`]) closes open connections at once.
    pub fn stop(&self) {
        self.0.request();
    }

    /// Whether a stop has been asked for.
    pub fn is_stopping(&self) -> bool {
        self.0.requests() > 0
    }

    /// Completes once a stop has been asked for (at once if it has been): a handler can race
    /// its reads against it to finish what it is doing, say goodbye and close before the
    /// shutdown timeout closes the connection for it.
    pub async fn stopping(&self) {
        self.0.stop_requested().await;
    }
}

/// One worker thread: runs the shared executor until the server releases it.
///
/// `smol::block_on` (async-io's) lets an idle worker wait on the reactor itself, instead of every
/// I/O event hopping through async-io's helper thread. A panicking task does not unwind into
/// here: async-executor keeps a task's panic in the task, and connection tasks log it first.
fn run_worker(
    executor: &Executor<'static>,
    lifecycle: &Arc<Lifecycle>,
    released: channel::Receiver<()>,
) {
    WORKER_OF.set(Arc::as_ptr(lifecycle) as usize);
    // `recv` fails once the server drops the sender: that is the signal to return.
    let _ = smol::block_on(executor.run(released.recv()));
}

thread_local! {
    /// On a worker thread, the address of its server's [`Lifecycle`]: a worker must not wait for
    /// its own server to stop, since the stop joins it.
    static WORKER_OF: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn on_worker_of(lifecycle: &Arc<Lifecycle>) -> bool {
    WORKER_OF.get() == Arc::as_ptr(lifecycle) as usize
}

/// `1 thread`, `2 threads`: a count and its noun.
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Binds the first address of `addr` that can be bound, with the given listen backlog.
fn bind(addr: impl ToSocketAddrs, backlog: u32) -> io::Result<TcpListener> {
    let mut last_error = None;
    let addrs = addr.to_socket_addrs().map_err(|e| {
        io::Error::new(e.kind(), format!("cannot resolve the address to bind: {e}"))
    })?;
    for addr in addrs {
        match bind_one(addr, backlog) {
            Ok(listener) => return Ok(listener),
            Err(e) => {
                last_error = Some(io::Error::new(
                    e.kind(),
                    format!("failed to bind {addr}: {e}"),
                ))
            }
        }
    }
    Err(last_error.unwrap_or_else(|| invalid_input("no address to bind")))
}

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does on Unix: a restarted server can bind while old connections sit in TIME_WAIT.
    // It does not let two servers share a port.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Accepts clients and spawns a task for each, until cancelled. Never returns on an accept
/// error: errors that concern one client are skipped, and the others (out of file descriptors,
/// say) back off from 5 ms to 1 s, or until a connection closes and frees a descriptor.
async fn accept_loop<H, F>(
    listener: Async<TcpListener>,
    executor: Arc<Executor<'static>>,
    handler: H,
    tracker: Arc<Tracker>,
    idle: Option<Arc<IdleSweeper>>,
    max_connections: usize,
) where
    H: Fn(async_net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    let mut backoff = Backoff::default();
    let mut refusals = RateLimit::default();
    let mut failures = RateLimit::default();
    loop {
        let accept = listener.read_with(|l| l.accept());
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
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => (stream, canonical(peer)),
            Err(e) if concerns_one_client(&e) => {
                debug!("accept: {e}");
                continue;
            }
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
                .or(tracker.some_closed())
                .await;
                continue;
            }
        };
        backoff = Backoff::default();
        let held_back = failures.take_held_back();
        if held_back > 0 {
            error!(
                "accept works again after {} not logged",
                count(held_back as usize, "more failure")
            );
        }
        let Some(slot) = tracker.try_open(max_connections) else {
            // Accept and close, rather than leave clients hanging in the backlog.
            drop(stream);
            if let Some(held_back) = refusals.allow() {
                warn!(
                    "refused {peer}: at the connection limit ({max_connections} open){}",
                    unlogged(held_back)
                );
            }
            continue;
        };
        // Without TCP_NODELAY, a reply written in two parts (prefix, then payload) waits for the
        // client's delayed ACK: Nagle's algorithm turns each round trip into 40 ms.
        if let Err(e) = stream.set_nodelay(true) {
            debug!("{peer}: cannot set TCP_NODELAY: {e}");
        }
        let stream = match async_net::TcpStream::try_from(stream) {
            Ok(stream) => stream,
            Err(e) => {
                debug!("{peer}: cannot register with the reactor: {e}");
                continue;
            }
        };
        // A handler may panic before it returns its future: that ends this client only.
        let handler_future = match panic::catch_unwind(AssertUnwindSafe(|| handler(stream, peer))) {
            Ok(future) => future,
            Err(panic) => {
                log_panic(peer, &*panic);
                continue;
            }
        };
        let idle = idle
            .as_ref()
            .map(|sweeper| IdleWatch::new(Arc::clone(sweeper)));
        executor
            .spawn(Connection::new(handler_future, peer, idle, slot))
            .detach();
    }
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
struct RateLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(lines held back since the last one)` when a line may be logged now.
    fn allow(&mut self) -> Option<u64> {
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
fn unlogged(held_back: u64) -> String {
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

/// A client's address as people write it: an IPv4 client of a dual-stack (`::`) listener
/// arrives as an IPv4-mapped IPv6 address, `[::ffff:127.0.0.1]:46856`, and is shown (and handed
/// to the handler) as `127.0.0.1:46856`.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
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

    #[test]
    fn ipv4_mapped_addresses_are_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:46856".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "127.0.0.1:46856");
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
