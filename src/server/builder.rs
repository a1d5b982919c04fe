//! The options of a server, set before it starts ([`Builder`]); `start.rs` starts it.

use std::net::ToSocketAddrs;
#[cfg(unix)]
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::info::ConnectionInfo;
use crate::observe::counters::Hooks;
use crate::observe::stats::ConnectionReport;
use crate::transport::proxy::ProxyProtocol;
#[cfg(feature = "tls")]
use crate::transport::tls::TlsConfig;
use crate::transport::Endpoint;

/// The options of a server, set before it starts: the listeners it serves (`listen_*`), then
/// how; [`Builder::start`] or [`Builder::serve`] run it. Every option has a default, which its
/// setter documents, and each setter takes a plain value: an option that is off by default is
/// turned on by calling its setter.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// let server = taskserve::Server::builder()
///     .threads(2)
///     .max_connections(1000)
///     .idle_timeout(Duration::from_secs(60))
///     .listen_tcp("127.0.0.1:0")
///     .start(taskserve::echo)?;
/// assert_eq!(server.threads(), 2);
/// server.stop();
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    pub(super) threads: usize,
    pub(super) max_connections: usize,
    pub(super) idle_timeout: Option<Duration>,
    pub(super) shutdown_timeout: Duration,
    pub(super) drain_delay: Duration,
    pub(super) backlog: u32,
    pub(super) stop_on_signals: bool,
    /// Every listener, in the order added.
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) tls_handshake_timeout: Duration,
    /// The connection hooks: a user's callbacks on each connection's start and end.
    pub(super) hooks: Hooks,
    /// Where the Prometheus endpoint listens, if anywhere.
    pub(super) metrics: Option<Endpoint>,
    /// A PROXY header first on TCP and TLS listeners.
    pub(super) proxy: Option<ProxyProtocol>,
    pub(super) max_connections_per_ip: Option<usize>,
    pub(super) ipv6_client_prefix: u8,
    pub(super) reuse_port: bool,
    pub(super) keepalive: Option<Duration>,
    pub(super) unix_mode: Option<u32>,
    pub(super) notify_systemd: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            threads: num_cpus::get(),
            max_connections: 10_000,
            idle_timeout: Some(Duration::from_secs(300)),
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            backlog: 4096,
            stop_on_signals: false,
            endpoints: Vec::new(),
            tls_handshake_timeout: Duration::from_secs(10),
            hooks: Hooks::default(),
            metrics: None,
            proxy: None,
            max_connections_per_ip: None,
            ipv6_client_prefix: 64,
            reuse_port: false,
            keepalive: None,
            unix_mode: None,
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

    /// How long a connection may go without activity before it is closed (default 300 s);
    /// [`Duration::ZERO`] never closes one, as `echo --idle-timeout 0`. A connection is active when
    /// its handler is woken: data or a close arrived, a blocked write made progress, or anything
    /// else the handler awaits happened (a chat room's messages, say). So a client that stopped
    /// reading while its reply waits is inactive too. It is closed between the timeout and an
    /// eighth more after its last activity, give or take the time a busy worker takes to notice.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// How long a graceful stop waits for open connections to end by themselves before it
    /// closes them (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long a stop keeps accepting and serving before it stops accepting (default zero: it
    /// stops accepting at once): a "lame duck" period in which the server is not ready
    /// ([`StopHandle::is_stopping`](crate::StopHandle::is_stopping) is true, the metrics
    /// endpoint's `/readyz` answers 503, systemd has been told `STOPPING=1`), so that load
    /// balancers take it out of rotation before it refuses anyone. A second stop request (or
    /// signal) ends the delay early; a third closes open connections at once. The shutdown
    /// timeout starts after the delay.
    pub fn drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Connections the kernel may queue before they are accepted (default 4096; the kernel caps
    /// it at `net.core.somaxconn`). The usual 128 drops handshakes when thousands of clients
    /// connect at once.
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Whether SIGINT and SIGTERM ask the server to stop (default: no; [`serve`](crate::serve)
    /// says yes), each counting as one [`StopHandle::stop`](crate::StopHandle::stop). SIGHUP,
    /// which closing a terminal sends, then reloads the TLS certificates
    /// ([`Server::reload_tls`](crate::Server::reload_tls)), and SIGUSR1, SIGUSR2 and SIGALRM
    /// are logged as ignored: the server keeps serving. (Their default action would end the
    /// process without a word, its Unix socket files left behind.) The handlers are in place
    /// when `start` returns, so a script that waits for the server's address can signal it at
    /// once. See [`Server::wait`](crate::Server::wait).
    ///
    /// The handlers come from signal-hook, which cannot give a signal its default action back:
    /// once the server has stopped, the process ignores those six signals. Use it in a program
    /// that ends when its server does, as the `echo` binary.
    pub fn stop_on_signals(mut self, yes: bool) -> Self {
        self.stop_on_signals = yes;
        self
    }

    /// Listens for plain TCP on `addr` (the first of its addresses that binds). The address is
    /// resolved now; an error comes back from `start`.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    ///
    /// let server = taskserve::Server::builder()
    ///     .listen_tcp("127.0.0.1:0")
    ///     .start(taskserve::echo)?;
    /// let mut client = std::net::TcpStream::connect(server.local_addr()?)?;
    /// client.write_all(b"hello")?;
    /// let mut reply = [0; 9];
    /// client.read_exact(&mut reply)?;
    /// assert_eq!(&reply, b"GOT:hello");
    /// server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    pub fn listen_tcp(mut self, addr: impl ToSocketAddrs) -> Self {
        self.endpoints.push(Endpoint::tcp(addr, None));
        self
    }

    /// Listens for TLS on `addr`: each client's handshake runs in its own task, within
    /// [`Builder::tls_handshake_timeout`], and the handler gets the decrypted stream.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let tls = taskserve::TlsConfig::from_pem_files("cert.pem", "key.pem")?;
    /// let server = taskserve::Server::builder()
    ///     .listen_tcp("127.0.0.1:25000")
    ///     .listen_tls("127.0.0.1:25443", tls)
    ///     .start(taskserve::echo)?;
    /// # std::io::Result::Ok(())
    /// ```
    #[cfg(feature = "tls")]
    pub fn listen_tls(mut self, addr: impl ToSocketAddrs, tls: TlsConfig) -> Self {
        self.endpoints.push(Endpoint::tcp(addr, Some(tls)));
        self
    }

    /// Listens on `addr` for plain TCP clients that each start with a PROXY protocol header, as
    /// `proxy` describes (trusted sources, timeout), whatever [`Builder::proxy_protocol`] says
    /// for the other listeners: so one server can serve a load balancer on one port and
    /// clients directly on another.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    ///
    /// let server = taskserve::Server::builder()
    ///     .listen_tcp("127.0.0.1:0")
    ///     .listen_proxy("127.0.0.1:0", taskserve::ProxyProtocol::new())
    ///     .start(taskserve::echo)?;
    /// let behind_proxy = server.local_addrs()[1].0.to_string();
    /// let mut client = std::net::TcpStream::connect(behind_proxy)?;
    /// client.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25000\r\nhello")?;
    /// let mut reply = [0; 9];
    /// client.read_exact(&mut reply)?;
    /// assert_eq!(&reply, b"GOT:hello");
    /// server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    pub fn listen_proxy(mut self, addr: impl ToSocketAddrs, proxy: ProxyProtocol) -> Self {
        self.endpoints.push(Endpoint::tcp_proxy(addr, proxy));
        self
    }

    /// Listens on a Unix domain socket at `path`. A socket file left by a server that
    /// crashed is replaced, but only when nothing answers on it: a live one is an "address in
    /// use" error. The file is removed when the server stops.
    #[cfg(unix)]
    pub fn listen_unix(mut self, path: impl AsRef<Path>) -> Self {
        self.endpoints.push(Endpoint::unix(path));
        self
    }

    /// The permissions of the Unix socket files the server makes, as `chmod` takes them
    /// (`0o600`: this user only; `0o660`: and its group; `0o666`: anyone), like systemd's
    /// `SocketMode=` (default: as the process's umask leaves them). A socket file's permissions
    /// are its access control: connecting needs write permission on it. The socket never has
    /// other permissions, not even for a moment: it is bound and given its mode in a private
    /// directory, then linked into place.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[cfg(unix)] {
    /// use std::os::unix::fs::PermissionsExt;
    ///
    /// let path = std::env::temp_dir().join(format!("taskserve-mode-{}.sock", std::process::id()));
    /// let server = taskserve::Server::builder()
    ///     .unix_mode(0o600)
    ///     .listen_unix(&path)
    ///     .start(taskserve::echo)?;
    /// assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
    /// server.stop();
    /// # }
    /// # std::io::Result::Ok(())
    /// ```
    #[cfg(unix)]
    pub fn unix_mode(mut self, mode: u32) -> Self {
        self.unix_mode = Some(mode);
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
        hook: impl Fn(&ConnectionInfo) + Send + Sync + 'static,
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
    ///     .listen_tcp("127.0.0.1:0")
    ///     .start(taskserve::echo)?;
    /// let mut client = std::net::TcpStream::connect(server.local_addr()?)?;
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

    /// Serves the server's [`Stats`](crate::Stats) to Prometheus on `addr` (port 0 works; see
    /// [`Server::metrics_addr`](crate::Server::metrics_addr)): `GET /metrics` in the Prometheus
    /// text format, 404 for any other path and 405 for any other method. The endpoint runs on the
    /// server's executor but is not a client listener: its connections are not limited by
    /// `max_connections` nor counted in the stats, and each must send its request and take the
    /// answer within 10 s. The address is resolved now and bound by `start`, which returns its
    /// errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    ///
    /// let server = taskserve::Server::builder()
    ///     .listen_metrics("127.0.0.1:0")
    ///     .listen_tcp("127.0.0.1:0")
    ///     .start(taskserve::echo)?;
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
    pub fn listen_metrics(mut self, addr: impl ToSocketAddrs) -> Self {
        self.metrics = Some(Endpoint::tcp(addr, None));
        self
    }

    /// Expects a PROXY protocol header (v1 or v2) at the start of every connection to the TCP
    /// and TLS listeners, from a load balancer such as HAProxy (`send-proxy-v2`), and takes the
    /// client's address from it (default: off, no header). Never guessed: on a listener
    /// with it, a connection without a valid header is closed; on one without, a header is
    /// data like any other. Unix socket listeners are not affected. The header is read in the
    /// connection's own task, before any TLS handshake, within [`ProxyProtocol::timeout`].
    /// A listener of [`Builder::listen_proxy`] keeps its own configuration.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::{Read, Write};
    ///
    /// let server = taskserve::Server::builder()
    ///     .proxy_protocol(taskserve::ProxyProtocol::new()) // from loopback only
    ///     .listen_tcp("127.0.0.1:0")
    ///     .start(taskserve::echo)?;
    /// let mut client = std::net::TcpStream::connect(server.local_addr()?)?;
    /// client.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25000\r\nhello")?;
    /// let mut reply = [0; 9];
    /// client.read_exact(&mut reply)?;
    /// assert_eq!(&reply, b"GOT:hello");
    /// server.stop();
    /// # std::io::Result::Ok(())
    /// ```
    pub fn proxy_protocol(mut self, proxy: ProxyProtocol) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// Connections served at once from one client address (default: no limit), as
    /// nginx's `limit_conn`: past it, a new connection from that address is accepted and
    /// closed at once, with a warning at most once a second. The address is the client's
    /// (from the PROXY header, with [`Builder::proxy_protocol`]); IPv4-mapped IPv6 addresses
    /// count as IPv4, and IPv6 clients by their network ([`Builder::ipv6_client_prefix`]).
    /// Unix socket clients are not limited. At least 1.
    ///
    /// Without a PROXY header, every client of a load balancer or of a large NAT has one
    /// address: set it from the most connections one real client needs, times the clients
    /// that may share an address.
    pub fn max_connections_per_ip(mut self, max: usize) -> Self {
        self.max_connections_per_ip = Some(max);
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

    /// TCP keepalive on every TCP (and TLS) connection (default: off): after `idle`
    /// without traffic the kernel probes the peer, every third of `idle` (at least 1 s), and
    /// closes the connection after three probes go unanswered. So a peer that vanished (a NAT
    /// that forgot the connection, a machine switched off) is found within twice `idle`, well
    /// before a long idle timeout; the handler's next read fails then, and the connection is
    /// counted as [`CloseReason::PeerReset`](crate::CloseReason::PeerReset). On Linux, so is a
    /// peer that vanished while data sent to it was unacknowledged (TCP_USER_TIMEOUT, set to
    /// the same bound), which the probes never reach: they wait for a quiet connection.
    /// [`Duration::ZERO`] turns it off.
    pub fn keepalive(mut self, idle: Duration) -> Self {
        self.keepalive = (!idle.is_zero()).then_some(idle);
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
    ///     .start(taskserve::echo)?;
    /// server.wait();
    /// # std::io::Result::Ok(())
    /// ```
    ///
    /// `start` fails with [`io::ErrorKind::NotFound`](std::io::ErrorKind::NotFound) when none were
    /// passed.
    #[cfg(unix)]
    pub fn listen_systemd(mut self) -> Self {
        self.endpoints.push(Endpoint::Systemd { tls: None });
        self
    }

    /// As [`Builder::listen_systemd`], with TLS on the TCP sockets.
    #[cfg(all(unix, feature = "tls"))]
    pub fn listen_systemd_tls(mut self, tls: TlsConfig) -> Self {
        self.endpoints.push(Endpoint::Systemd { tls: Some(tls) });
        self
    }

    /// Tells systemd (through `NOTIFY_SOCKET`, when set) `READY=1` once the server serves, and
    /// `STOPPING=1` when a stop begins, for a `Type=notify` service (default: no;
    /// [`serve`](crate::serve) says yes). Only one server of a process should.
    pub fn notify_systemd(mut self, yes: bool) -> Self {
        self.notify_systemd = yes;
        self
    }
}
