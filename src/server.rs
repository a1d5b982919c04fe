//! Everything between addresses and a task per client: the builder, binding, the worker
//! threads that share one executor, and the running server's handle.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
#[cfg(unix)]
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use async_executor::{Executor, Task};
use async_signal::{Signal, Signals};
use log::{debug, error, info, warn};
use smol::future::{self, FutureExt};
use smol::stream::StreamExt;
use smol::{channel, Timer};

use crate::accept::{accept_loop, Shared};
use crate::connection::{Addr, Connection, Transport};
use crate::idle::IdleSweeper;
use crate::listener::{Endpoint, ListenOptions};
use crate::proxy::ProxyProtocol;
use crate::shutdown::{Lifecycle, Tracker};
use crate::stats::{ConnectionReport, Hooks, Metrics, Stats};
#[cfg(feature = "tls")]
use crate::tls::TlsConfig;

/// Serves `handler` on `addr` until SIGINT or SIGTERM, then stops gracefully: the whole server in
/// one call, with the [`Builder`]'s defaults.
///
/// Each client connection runs `handler(connection)` as its own task on one executor shared by
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
    H: Fn(Connection) -> F + Send + Sync + 'static,
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
    /// Listeners besides the one `start` is given, in the order added.
    endpoints: Vec<Endpoint>,
    #[cfg(feature = "tls")]
    tls_handshake_timeout: Duration,
    /// The connection hooks: a user's callbacks on each connection's start and end.
    hooks: Hooks,
    /// Where the Prometheus endpoint listens, if anywhere.
    #[cfg(feature = "metrics")]
    metrics: Option<Endpoint>,
    /// A PROXY header first on TCP and TLS listeners.
    proxy: Option<ProxyProtocol>,
    max_connections_per_ip: Option<usize>,
    ipv6_client_prefix: u8,
    reuse_port: bool,
    keepalive: Option<Duration>,
    notify_systemd: bool,
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
            endpoints: Vec::new(),
            #[cfg(feature = "tls")]
            tls_handshake_timeout: Duration::from_secs(10),
            hooks: Hooks::default(),
            #[cfg(feature = "metrics")]
            metrics: None,
            proxy: None,
            max_connections_per_ip: None,
            ipv6_client_prefix: 64,
            reuse_port: false,
            keepalive: None,
            notify_systemd: false,
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

    /// Also listens for plain TCP on `addr` (the first of its addresses that binds). The
    /// address is resolved now; an error comes back from `start`.
    pub fn listen_tcp(mut self, addr: impl ToSocketAddrs) -> Self {
        self.endpoints.push(Endpoint::tcp(addr));
        self
    }

    /// Also listens for TLS on `addr`: each client's handshake runs in its own task, within
    /// [`Builder::tls_handshake_timeout`], and the handler gets the decrypted stream.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let tls = taskserve::TlsConfig::from_pem_files("cert.pem", "key.pem")?;
    /// let server = taskserve::Server::builder()
    ///     .listen_tls("127.0.0.1:25443", tls)
    ///     .start("127.0.0.1:25000", taskserve::echo)?; // plain TCP too
    /// # std::io::Result::Ok(())
    /// ```
    #[cfg(feature = "tls")]
    pub fn listen_tls(mut self, addr: impl ToSocketAddrs, tls: TlsConfig) -> Self {
        self.endpoints.push(Endpoint::tls(addr, tls));
        self
    }

    /// Also listens on a Unix domain socket at `path`. A socket file left by a server that
    /// crashed is replaced, but only when nothing answers on it: a live one is an "address in
    /// use" error. The file is removed when the server stops.
    #[cfg(unix)]
    pub fn listen_unix(mut self, path: impl AsRef<Path>) -> Self {
        self.endpoints.push(Endpoint::unix(path));
        self
    }

    /// How long a TLS client may take over its handshake before it is closed (default 10 s).
    /// A client that sends nothing, half a handshake or plaintext delays no one else meanwhile.
    /// Once its handler has returned, a client has as long again to take the replies still
    /// buffered and the TLS close (close_notify) before its connection is dropped.
    #[cfg(feature = "tls")]
    pub fn tls_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.tls_handshake_timeout = timeout;
        self
    }

    /// Calls `hook` with what is known about each client as it is accepted and given its slot,
    /// before its handler (or its TLS handshake) starts: as Go's `ConnState` hook, to feed your
    /// own metrics or an audit log. It runs in the accept loop (on a PROXY listener, in the
    /// connection's task once the header has named the client), so it must be quick; a panic
    /// in it is logged and ignored. Clients refused at a limit are not seen.
    pub fn on_connection_start(
        mut self,
        hook: impl Fn(&crate::ConnectionInfo) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.start = Some(Arc::new(hook));
        self
    }

    /// Calls `hook` once for each connection that [`Builder::on_connection_start`] saw, when it
    /// has ended, however it ended (even closed by a stop), with its addresses, duration, bytes
    /// each way and how it ended: as nginx's stream access log. It runs on the connection's
    /// worker thread after the socket is closed, so it must be quick; a panic in it is logged
    /// and ignored.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::sync::mpsc;
    ///
    /// let (reports, received) = mpsc::channel();
    /// let reports = std::sync::Mutex::new(reports);
    /// let server = taskserve::Server::builder()
    ///     .on_connection_end(move |report| {
    ///         let _ = reports.lock().unwrap().send(report.clone());
    ///     })
    ///     .start("127.0.0.1:0", taskserve::echo)?;
    /// let mut client = std::net::TcpStream::connect(server.local_addr())?;
    /// client.write_all(b"hello")?;
    /// client.read_exact(&mut [0; 9])?; // GOT:hello
    /// drop(client);
    /// let report = received.recv().unwrap();
    /// assert_eq!((report.bytes_read, report.bytes_written), (5, 9));
    /// assert_eq!(report.closed, taskserve::CloseReason::ClientClosed);
    /// server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    pub fn on_connection_end(
        mut self,
        hook: impl Fn(&ConnectionReport) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.end = Some(Arc::new(hook));
        self
    }

    /// Also serves the server's [`Stats`] to Prometheus on `addr` (port 0 works; see
    /// [`Server::metrics_addr`]): `GET /metrics` in the Prometheus text format, 404 for any
    /// other path and 405 for any other method. The endpoint runs on the server's executor but
    /// is not a client listener: its connections are not limited by `max_connections` nor
    /// counted in the stats, and each must send its request and take the answer within 10 s.
    /// The address is resolved now and bound by `start`, which returns its errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    ///
    /// let server = taskserve::Server::builder()
    ///     .metrics("127.0.0.1:0")
    ///     .start("127.0.0.1:0", taskserve::echo)?;
    /// let mut scrape = std::net::TcpStream::connect(server.metrics_addr().unwrap())?;
    /// scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    /// let mut answer = String::new();
    /// scrape.read_to_string(&mut answer)?;
    /// assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"));
    /// assert!(answer.contains("\ntaskserve_connections_accepted_total 0\n"));
    /// server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, addr: impl ToSocketAddrs) -> Self {
        self.metrics = Some(Endpoint::tcp(addr));
        self
    }

    /// Expects a PROXY protocol header (v1 or v2) at the start of every connection to the TCP
    /// and TLS listeners, from a load balancer such as HAProxy (`send-proxy-v2`), and takes the
    /// client's address from it (default: `None`, no header). Never guessed: on a listener
    /// with it, a connection without a valid header is closed; on one without, a header is
    /// data like any other. Unix socket listeners are not affected. The header is read in the
    /// connection's own task, before any TLS handshake, within [`ProxyProtocol::timeout`].
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    ///
    /// let server = taskserve::Server::builder()
    ///     .proxy_protocol(Some(taskserve::ProxyProtocol::new())) // from loopback only
    ///     .start("127.0.0.1:0", taskserve::echo)?;
    /// let mut client = std::net::TcpStream::connect(server.local_addr())?;
    /// client.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25000\r\nhello")?;
    /// let mut reply = [0; 9];
    /// client.read_exact(&mut reply)?;
    /// assert_eq!(&reply, b"GOT:hello");
    /// server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    pub fn proxy_protocol(mut self, proxy: Option<ProxyProtocol>) -> Self {
        self.proxy = proxy;
        self
    }

    /// Connections served at once from one client address (default `None`, no limit), as
    /// nginx's `limit_conn`: past it, a new connection from that address is accepted and
    /// closed at once, with a warning at most once a second. The address is the client's
    /// (from the PROXY header, with [`Builder::proxy_protocol`]); IPv4-mapped IPv6 addresses
    /// count as IPv4, and IPv6 clients by their network ([`Builder::ipv6_client_prefix`]).
    /// Unix socket clients are not limited. Must not be zero.
    ///
    /// Without a PROXY header, every client of a load balancer or of a large NAT has one
    /// address: set it from the most connections one real client needs, times the clients
    /// that may share an address.
    pub fn max_connections_per_ip(mut self, max: Option<usize>) -> Self {
        self.max_connections_per_ip = max;
        self
    }

    /// How many leading bits of an IPv6 client's address make one client for
    /// [`Builder::max_connections_per_ip`] (default 64: a site gets a /64 at least, and one
    /// machine can use any address in it); 128 counts each address. At most 128.
    pub fn ipv6_client_prefix(mut self, bits: u8) -> Self {
        self.ipv6_client_prefix = bits;
        self
    }

    /// Sets SO_REUSEPORT on the TCP and TLS listeners (default: no), so that several
    /// processes (each with it) can listen on one address and the kernel spreads new
    /// connections over them: to use more processes, or to start a new version before the old
    /// one stops.
    pub fn reuse_port(mut self, yes: bool) -> Self {
        self.reuse_port = yes;
        self
    }

    /// TCP keepalive on every TCP (and TLS) connection (default `None`: off): after `idle`
    /// without traffic the kernel probes the peer, every third of `idle` (at least 1 s), and
    /// closes the connection after three probes go unanswered. So a peer that vanished (a NAT
    /// that forgot the connection, a machine switched off) is found within twice `idle`, well
    /// before a long idle timeout; the handler's next read fails then. Must not be zero.
    pub fn keepalive(mut self, idle: Option<Duration>) -> Self {
        self.keepalive = idle;
        self
    }

    /// Serves the listening sockets systemd passed to the process (socket activation:
    /// `LISTEN_FDS` and `LISTEN_PID`, as `sd_listen_fds(3)` reads them) instead of binding
    /// them: TCP ones as plain TCP listeners, Unix stream ones as Unix listeners. They outlive
    /// the process, so clients that connect while it restarts wait in their backlog. Reading
    /// them unsets the two variables. Works with `systemd-socket-activate -l 25000 PROGRAM`
    /// too.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let server = taskserve::Server::builder()
    ///     .listen_systemd()
    ///     .notify_systemd(true)
    ///     .start_listeners(taskserve::echo)?;
    /// server.wait();
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// `start` fails with [`io::ErrorKind::NotFound`] when none were passed.
    #[cfg(unix)]
    pub fn listen_systemd(mut self) -> Self {
        #[rustfmt::skip]
        let endpoint = Endpoint::systemd(#[cfg(feature = "tls")] None);
        self.endpoints.push(endpoint);
        self
    }

    /// As [`Builder::listen_systemd`], with TLS on the TCP sockets.
    #[cfg(all(unix, feature = "tls"))]
    pub fn listen_systemd_tls(mut self, tls: TlsConfig) -> Self {
        self.endpoints.push(Endpoint::systemd(Some(tls)));
        self
    }

    /// Tells systemd (through `NOTIFY_SOCKET`, when set) `READY=1` once the server serves,
    /// and `STOPPING=1` when a stop begins, for a `Type=notify` service (default: no; [`serve`]
    /// says yes). Only one server of a process should.
    pub fn notify_systemd(mut self, yes: bool) -> Self {
        self.notify_systemd = yes;
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
    /// idle timeout, with the cause (in use, not available...) when no address of `addr` (or
    /// of a listener added to the builder) can be bound, and when a worker thread cannot be
    /// started.
    pub fn start<A, H, F>(mut self, addr: A, handler: H) -> io::Result<Server>
    where
        A: ToSocketAddrs,
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        self.endpoints.insert(0, Endpoint::tcp(addr));
        self.start_listeners(handler)
    }

    /// Starts serving `handler` on the listeners added to the builder
    /// ([`Builder::listen_tcp`], [`Builder::listen_unix`]...), for a server with no plain TCP
    /// listener of its own.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[cfg(unix)] {
    /// let path = std::env::temp_dir().join(format!("taskserve-doc-{}.sock", std::process::id()));
    /// let server = taskserve::Server::builder()
    ///     .listen_unix(&path)
    ///     .start_listeners(taskserve::echo)?;
    /// println!("listening on {}", server.local_addrs()[0].0);
    /// server.stop(); // removes the socket file
    /// assert!(!path.exists());
    /// # }
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Builder::start`]; also [`io::ErrorKind::InvalidInput`] when no listener was added.
    pub fn start_listeners<H, F>(self, handler: H) -> io::Result<Server>
    where
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        if self.endpoints.is_empty() {
            return Err(invalid_input("no listener to start"));
        }
        if self.threads == 0 {
            return Err(invalid_input("threads must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid_input("max_connections must be at least 1"));
        }
        if self.max_connections_per_ip == Some(0) {
            return Err(invalid_input(
                "max_connections_per_ip must be at least 1 (None for no limit)",
            ));
        }
        if self.keepalive == Some(Duration::ZERO) {
            return Err(invalid_input(
                "keepalive must be more than zero (None for off)",
            ));
        }
        if self.ipv6_client_prefix > 128 {
            return Err(invalid_input("ipv6_client_prefix must be at most 128"));
        }
        if self.idle_timeout == Some(Duration::ZERO) {
            return Err(invalid_input(
                "idle_timeout must be more than zero (None never times out)",
            ));
        }
        // All bound before anything starts: one that fails leaves nothing behind.
        let options = ListenOptions {
            backlog: self.backlog,
            proxy: self.proxy.clone(),
            reuse_port: self.reuse_port,
            keepalive: self.keepalive,
        };
        let listeners: Vec<_> = self
            .endpoints
            .iter()
            .map(|endpoint| endpoint.bind_all(&options))
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let local_addrs: Vec<_> = listeners
            .iter()
            .map(|l| (l.local_addr().clone(), l.transport()))
            .collect();
        #[cfg(feature = "tls")]
        let tls: Vec<TlsConfig> = listeners.iter().filter_map(|l| l.tls().cloned()).collect();
        #[cfg(feature = "metrics")]
        let metrics_listener = match &self.metrics {
            // Not a client listener: no PROXY header, no keepalive, its own port.
            Some(endpoint) => {
                let plain = ListenOptions {
                    backlog: self.backlog,
                    proxy: None,
                    reuse_port: false,
                    keepalive: None,
                };
                endpoint.bind_all(&plain)?.pop()
            }
            None => None,
        };

        let executor = Arc::new(Executor::new());
        let tracker = Arc::new(Tracker::default());
        let idle = self.idle_timeout.map(IdleSweeper::new);
        if let Some(idle) = &idle {
            // Detached: dropping the executor at the end of a stop cancels it.
            executor.spawn(Arc::clone(idle).run()).detach();
        }
        let (release_workers, released) = channel::bounded::<()>(1);
        let lifecycle = Arc::new(Lifecycle::default());
        let metrics = Metrics::new(Arc::clone(&tracker), self.hooks.clone());
        let shared = Arc::new(Shared {
            handler,
            executor: Arc::clone(&executor),
            tracker: Arc::clone(&tracker),
            idle,
            max_connections: self.max_connections,
            stop: StopHandle(Arc::clone(&lifecycle)),
            metrics: Arc::clone(&metrics),
            per_client: self.max_connections_per_ip.map(|max| {
                Arc::new(crate::per_client::PerClient::new(
                    max,
                    self.ipv6_client_prefix,
                ))
            }),
            #[cfg(feature = "tls")]
            handshake_timeout: self.tls_handshake_timeout,
        });
        // Each loop ends, serving what its listener still holds queued, once `close_listeners`
        // is dropped.
        let (close_listeners, closing) = channel::bounded::<()>(1);
        let accept: Vec<_> = listeners
            .into_iter()
            .map(|listener| {
                let closing = closing.clone();
                let closing = async move {
                    let _ = closing.recv().await;
                };
                executor.spawn(accept_loop(listener, Arc::clone(&shared), closing))
            })
            .collect();
        #[allow(unused_mut)] // without the metrics feature, nothing is added
        let mut cancel = Vec::new();
        // Stopped with the accept loops, so that a stop closes its port first too.
        #[cfg(feature = "metrics")]
        let metrics_addr = match metrics_listener {
            Some(listener) => {
                let addr = listener.local_addr().as_inet();
                let serving = crate::metrics::serve_metrics(
                    listener,
                    Arc::clone(&metrics),
                    Arc::clone(&executor),
                );
                cancel.push(executor.spawn(serving));
                addr
            }
            None => None,
        };
        let server = Server {
            local_addrs,
            threads: self.threads,
            lifecycle: Arc::clone(&lifecycle),
            tracker: Arc::clone(&tracker),
            metrics,
            #[cfg(feature = "metrics")]
            metrics_addr,
            #[cfg(feature = "tls")]
            tls: tls.clone(),
        };
        let mut running = Running {
            close_listeners,
            accept,
            cancel,
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
            let worker_lifecycle = Arc::clone(&lifecycle);
            let worker = thread::Builder::new()
                .name(name.clone())
                .spawn(move || run_worker(&executor, &worker_lifecycle, released));
            match worker {
                Ok(worker) => running.workers.push(worker),
                Err(e) => {
                    // Stops the workers started so far, and returns once they have ended.
                    running.finish(future::ready(()));
                    lifecycle.set_stopped();
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
                    lifecycle.set_stopped();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("failed to install signal handlers: {e}"),
                    ));
                }
            };
            let reload = Reload {
                #[cfg(feature = "tls")]
                tls,
            };
            executor
                .spawn(forward_signals(signals, Arc::clone(&lifecycle), reload))
                .detach();
        }
        let notify_systemd = self.notify_systemd;
        lifecycle.set_stop(Box::new(move |lifecycle| {
            info!("stopping");
            #[cfg(unix)]
            if notify_systemd {
                crate::systemd::notify_stopping();
            }
            running.finish(lifecycle.hurried());
        }));
        // At debug: the caller has the address from `local_addr` and says it where its users
        // look (`echo` prints it on stdout); `serve`, whose caller cannot, logs it at info.
        for (addr, transport) in &server.local_addrs {
            debug!("listening on {addr} ({transport})");
        }
        #[cfg(unix)]
        if self.notify_systemd {
            crate::systemd::notify_ready();
        }
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
        H: Fn(Connection) -> F + Send + Sync + 'static,
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        let server = self
            .stop_on_signals(true)
            .notify_systemd(true)
            .start(addr, handler)?;
        for (addr, transport) in server.local_addrs() {
            info!("listening on {addr} ({transport})");
        }
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
    /// Each listener's address and transport, in the order they were given.
    local_addrs: Vec<(Addr, Transport)>,
    threads: usize,
    /// Stop requests, the stop itself, and its end.
    lifecycle: Arc<Lifecycle>,
    /// Open connections.
    tracker: Arc<Tracker>,
    /// What [`Server::stats`] reads.
    metrics: Arc<Metrics>,
    /// Where the Prometheus endpoint listens.
    #[cfg(feature = "metrics")]
    metrics_addr: Option<SocketAddr>,
    /// The TLS listeners' configurations, for [`Server::reload_tls`].
    #[cfg(feature = "tls")]
    tls: Vec<TlsConfig>,
}

/// The parts of a server that a stop takes apart, in this order.
struct Running {
    /// Dropping this sender ends the accept loops.
    close_listeners: channel::Sender<()>,
    /// One accept loop per listener, each owning its listening socket: once ended they have
    /// released the ports (and removed Unix socket files).
    accept: Vec<Task<()>>,
    /// Tasks that own a listener which is not a client's (the metrics endpoint): cancelled.
    cancel: Vec<Task<()>>,
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
            .field("local_addrs", &self.local_addrs)
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

    /// The address of the server's first TCP (or TLS) listener, the one [`Builder::start`] was
    /// given, with the real port when it was started on port 0.
    ///
    /// # Panics
    ///
    /// If the server has no TCP listener, only Unix sockets: see [`Server::local_addrs`].
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs
            .iter()
            .find_map(|(addr, _)| addr.as_inet())
            .expect("a server with no TCP listener has no local_addr: see local_addrs")
    }

    /// Every listener's address and transport, in the order they were given (the address given
    /// to [`Builder::start`] first).
    pub fn local_addrs(&self) -> &[(Addr, Transport)] {
        &self.local_addrs
    }

    /// Where the Prometheus endpoint ([`Builder::metrics`]) listens, with the real port when it
    /// was given port 0; `None` without one.
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
        reload_all(&self.tls)
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
        self.metrics.snapshot()
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
async fn forward_signals(mut signals: Signals, lifecycle: Arc<Lifecycle>, reload: Reload) {
    while let Some(signal) = signals.next().await {
        match signal {
            Ok(Signal::Int) => info!("received SIGINT"),
            Ok(Signal::Term) => info!("received SIGTERM"),
            Ok(Signal::Hup) => {
                // What closing a terminal sends: the default action would kill the server.
                reload.on_hangup();
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

/// What SIGHUP reloads.
struct Reload {
    #[cfg(feature = "tls")]
    tls: Vec<TlsConfig>,
}

impl Reload {
    fn on_hangup(&self) {
        #[cfg(feature = "tls")]
        if !self.tls.is_empty() {
            match reload_all(&self.tls) {
                Ok(()) => info!("received SIGHUP: reloaded the TLS certificate and key"),
                // The error names the file and the cause; the old pair stays in use.
                Err(e) => error!("received SIGHUP: {e}; still using the previous pair"),
            }
            return;
        }
        info!("received SIGHUP: nothing to reload; still serving");
    }
}

/// Reloads every configuration, even after one fails; returns the first error.
#[cfg(feature = "tls")]
fn reload_all(configs: &[TlsConfig]) -> io::Result<()> {
    let mut first_error = None;
    for config in configs {
        if let Err(e) = config.reload() {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
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
