//! Serve network connections as lightweight tasks on a multi-threaded, work-stealing executor.
//!
//! taskserve starts from a classic teaching text, David Beazley's *Generators as Tasks Serving
//! Network Connections*: a Python scheduler that runs each client connection as a generator
//! and switches between them whenever one would wait for its socket, with an echo server on
//! port 25000 that answers every chunk a client sends with `GOT:` followed by that chunk. The
//! README calls it "the seed". taskserve is that system in Rust, on the smol ecosystem: one
//! [`async_executor::Executor`][Executor] is run by N worker threads, which steal work from each
//! other; an accept loop per listener and one task per client connection are spawned on it. The
//! seed's echo server is [`echo`]; any other protocol is a handler function.
//!
//! [Executor]: https://docs.rs/async-executor/1/async_executor/struct.Executor.html
//!
//! # Examples
//!
//! Start an echo server on a free port, talk to it, and stop it:
//!
//! ```
//! use std::io::{Read, Write};
//!
//! let server = taskserve::Server::builder()
//!     .threads(2)
//!     .listen_tcp("127.0.0.1:0")
//!     .start(taskserve::echo)?;
//! println!("listening on {}", server.local_addr()?);
//!
//! let mut client = std::net::TcpStream::connect(server.local_addr()?)?;
//! client.write_all(b"Hello")?;
//! let mut reply = [0; 9];
//! client.read_exact(&mut reply)?;
//! assert_eq!(&reply, b"GOT:Hello");
//!
//! server.stop();
//! # std::io::Result::Ok(())
//! ```
//!
//! A handler is any `Fn(Connection) -> impl Future<Output = io::Result<()>>`; the
//! [`Connection`] is the client's stream, whatever the transport (TCP, TLS, a Unix socket),
//! with what is known about the client. This one greets each client and hangs up. [`serve`]
//! runs it until SIGINT or SIGTERM:
//!
//! ```no_run
//! use taskserve::io::AsyncWriteExt;
//!
//! taskserve::serve("127.0.0.1:7000", |mut conn: taskserve::Connection| async move {
//!     let greeting = format!("hello, {}\n", conn.peer_addr());
//!     conn.write_all(greeting.as_bytes()).await
//! })?;
//! # std::io::Result::Ok(())
//! ```
//!
//! A handler that keeps state shares it through an `Arc` cloned into each connection's future
//! (an `async` closure that captures state is not a `Fn` returning a `'static` future):
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use taskserve::io::AsyncWriteExt;
//!
//! let visits = Arc::new(AtomicUsize::new(0));
//! let handler = move |mut conn: taskserve::Connection| {
//!     let visits = Arc::clone(&visits);
//!     async move {
//!         let n = visits.fetch_add(1, Ordering::Relaxed) + 1;
//!         conn.write_all(format!("you are visitor {n}\n").as_bytes()).await
//!     }
//! };
//! let server = taskserve::Server::builder().listen_tcp("127.0.0.1:0").start(handler)?;
//! # let mut reply = String::new();
//! # std::io::Read::read_to_string(&mut std::net::TcpStream::connect(server.local_addr()?)?, &mut reply)?;
//! # assert_eq!(reply, "you are visitor 1\n");
//! server.stop();
//! # std::io::Result::Ok(())
//! ```
//!
//! # What is here
//!
//! - [`serve`] and [`Server::builder`]: the whole server in one call, or a [`Builder`] with the
//!   listeners (`listen_tcp`, `listen_tls`, `listen_unix`, `listen_systemd`, `listen_metrics`)
//!   and the options (threads, connection limits, idle and shutdown timeouts...) that starts a
//!   [`Server`] in the background.
//! - [`Connection`] and [`ConnectionInfo`]: what a handler is given.
//! - [`StopHandle`]: stops a server from anywhere, and tells handlers when a stop begins.
//! - [`Stats`] (from [`Server::stats`]) and [`ConnectionReport`] (for
//!   [`Builder::on_connection_end`]): what the server counts, and each connection's end.
//! - [`TlsConfig`]: certificates for TLS listeners (feature `tls`, on by default).
//! - [`echo`]: the seed's `GOT:` protocol.
//! - [`io`]: the I/O traits a handler needs, so that it needs no other dependency.
//!
//! Logging goes through the [`log`](https://docs.rs/log) facade; install any logger to see it.
//!
//! # Layout
//!
//! Each module imports only from the modules listed after it: a name two modules share lives
//! in the lower one.
//!
//! - `server/`: the [`Builder`] and its options, `start` (binding, the worker threads that share
//!   one executor, an accept loop per listener), the running [`Server`], signals.
//! - `echo`: the seed's `GOT:` protocol, a handler like any other.
//! - `conn/`: a connection's life: the [`Connection`] its handler is given, its stages in order
//!   (PROXY header, per-client admission, TLS handshake, the handler, TLS close) and the task
//!   that runs them.
//! - `observe/`: the server's counters, read as [`Stats`]; one meter per connection that adds
//!   to them and tells the hooks; the Prometheus endpoint (feature `metrics`).
//! - `limits/`: the per-client connection limit and the idle timeout.
//! - `transport/`: the parts a listener is made of: endpoints and their binding, TCP, Unix
//!   sockets, sockets passed by systemd, the PROXY header and TLS (feature `tls`).
//! - The ground floor, which imports nothing above it: `addr` ([`Addr`], [`Cidr`]), `info`
//!   ([`ConnectionInfo`] and what it holds), `stop` ([`StopHandle`], the stop's lifecycle and
//!   the count of open connections), `deadline` (a step raced against a timer) and `logging`
//!   (how the log names a client, rate-limited warnings).
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod addr;
mod conn;
mod deadline;
mod echo;
mod info;
mod limits;
mod logging;
mod observe;
mod server;
mod stop;
mod transport;

pub use addr::{Addr, Cidr};
pub use conn::connection::Connection;
pub use echo::{echo, READ_SIZE};
pub use info::{ConnectionInfo, PeerCredentials, ProxyInfo, TlsInfo, Transport};
pub use observe::stats::{CloseReason, ConnectionReport, RefusalReason, Stats};
pub use server::{serve, Builder, Server};
pub use stop::StopHandle;
pub use transport::proxy::ProxyProtocol;
#[cfg(feature = "tls")]
pub use transport::tls::TlsConfig;

/// The async I/O traits and helpers a handler reads and writes its [`Connection`] with
/// (`AsyncReadExt::read`, `AsyncWriteExt::write_all`, `BufReader`, `split`...): futures-lite's,
/// which smol re-exports too, so a handler needs no other dependency.
pub use smol::io;

/// The rustls version taskserve serves with, for building a
/// [`rustls::ServerConfig`][ServerConfig] of your own ([`TlsConfig::from_server_config`]).
///
/// [ServerConfig]: https://docs.rs/rustls/0.23/rustls/server/struct.ServerConfig.html
#[cfg(feature = "tls")]
pub use futures_rustls::rustls;

/// The Rust examples of the README and of the pages in docs/, compiled and run by `cargo test`
/// so that they stay true.
#[cfg(doctest)]
mod documentation_examples {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../docs/library.md")]
    struct Library;
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../docs/performance.md")]
    struct Performance;
    #[doc = include_str!("../docs/how-it-works.md")]
    struct HowItWorks;
    #[doc = include_str!("../docs/reliability.md")]
    struct Reliability;
}
