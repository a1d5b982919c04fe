//! Serve network connections as lightweight tasks on a multi-threaded, work-stealing executor.
//!
//! taskserve starts from a classic teaching text, David Beazley's *Generators as Tasks Serving
//! Network Connections*: a Python scheduler that runs each client connection as a generator
//! and switches between them whenever one would wait for its socket, with an echo server on
//! port 25000 that answers every chunk a client sends with `GOT:` followed by that chunk. The
//! README calls it "the seed". taskserve is that system in Rust, on the smol ecosystem: one
//! [`async_executor::Executor`] is run by N worker threads, which steal work from each other;
//! an accept loop per listener and one task per client connection are spawned on it. The seed's
//! echo server is [`echo`]; any other protocol is a handler function.
//!
//! # Examples
//!
//! Start an echo server on a free port, talk to it, and stop it:
//!
//! ```
//! use std::io::{Read, Write};
//!
//! let server = taskserve::Server::builder().threads(2).start("127.0.0.1:0", taskserve::echo)?;
//! println!("listening on {}", server.local_addr());
//!
//! let mut client = std::net::TcpStream::connect(server.local_addr())?;
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
//! let server = taskserve::Server::builder().start("127.0.0.1:0", move |mut conn: taskserve::Connection| {
//!     let visits = Arc::clone(&visits);
//!     async move {
//!         let n = visits.fetch_add(1, Ordering::Relaxed) + 1;
//!         conn.write_all(format!("you are visitor {n}\n").as_bytes()).await
//!     }
//! })?;
//! # let mut reply = String::new();
//! # std::io::Read::read_to_string(&mut std::net::TcpStream::connect(server.local_addr())?, &mut reply)?;
//! # assert_eq!(reply, "you are visitor 1\n");
//! server.stop();
//! # std::io::Result::Ok(())
//! ```
//!
//! # What is here
//!
//! - [`serve`] and [`Server::builder`]: the whole server in one call, or a [`Builder`] with the
//!   options (threads, connection limit, idle and shutdown timeouts, extra listeners) that
//!   starts a [`Server`] in the background.
//! - [`Connection`] and [`ConnectionInfo`]: what a handler is given.
//! - [`StopHandle`]: stops a server from anywhere, and tells handlers when a stop begins.
//! - [`Stats`] (from [`Server::stats`]) and [`ConnectionReport`] (for
//!   [`Builder::on_connection_end`]): what the server counts, and each connection's end.
//! - [`TlsConfig`]: certificates for TLS listeners (feature `tls`, on by default).
//! - [`echo`]: the seed's `GOT:` protocol.
//! - [`io`]: the I/O traits a handler needs, so that it needs no other dependency.
//!
//! Logging goes through the [`log`](https://docs.rs/log) facade; install any logger to see it.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod accept;
mod connection;
mod deadline;
mod echo;
mod idle;
mod listener;
#[cfg(feature = "metrics")]
mod metrics;
mod per_client;
mod proxy;
mod server;
mod shutdown;
mod stats;
#[cfg(unix)]
mod systemd;
mod task;
#[cfg(feature = "tls")]
mod tls;

pub use connection::{Addr, Connection, ConnectionInfo, PeerCredentials, TlsInfo, Transport};
pub use echo::{echo, READ_SIZE};
pub use proxy::{Cidr, ProxyInfo, ProxyProtocol};
pub use server::{serve, Builder, Server, StopHandle};
pub use stats::{CloseReason, ConnectionReport, RefusalReason, Stats};
#[cfg(feature = "tls")]
pub use tls::TlsConfig;

/// The async I/O traits and helpers a handler reads and writes its [`Connection`] with
/// (`AsyncReadExt::read`, `AsyncWriteExt::write_all`, `BufReader`, `split`...): futures-lite's,
/// which smol re-exports too, so a handler needs no other dependency.
pub use smol::io;

/// The rustls version taskserve serves with, for building a [`rustls::ServerConfig`] of your own
/// ([`TlsConfig::from_server_config`]).
#[cfg(feature = "tls")]
pub use futures_rustls::rustls;

/// The README's Rust examples, compiled and run by `cargo test` so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
