//! Serve TCP connections as lightweight tasks on a multi-threaded, work-stealing executor.
//!
//! taskserve is the generator scheduler of David Beazley's "generators as tasks serving network
//! connections" built in Rust on the smol ecosystem: one [`async_executor::Executor`] is run by
//! N worker threads, which steal work from each other; an accept loop and one task per client
//! connection are spawned on it. The seed's echo server, which answers every chunk a client sends
//! with `GOT:` followed by that chunk, is [`echo`]; any other protocol is a handler function.
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
//! A handler is any `Fn(TcpStream, SocketAddr) -> impl Future<Output = io::Result<()>>`; this
//! one greets each client and hangs up. [`serve`] runs it until SIGINT or SIGTERM:
//!
//! ```no_run
//! use smol::io::AsyncWriteExt;
//!
//! taskserve::serve("127.0.0.1:7000", |mut stream: async_net::TcpStream, peer| async move {
//!     stream.write_all(format!("hello, {peer}\n").as_bytes()).await
//! })?;
//! # std::io::Result::Ok(())
//! ```
//!
//! # Layout
//!
//! - `server`: [`serve`], the [`Builder`] and the running [`Server`]: binding, worker threads,
//!   the accept loop and its back-off, stopping.
//! - `conn`: one connection's task: its slot in the connection count, the panic guard and the
//!   "Connection from" / "Connection closed" log lines.
//! - `idle`: the idle timeout: one sweeper per server, no timer per connection.
//! - `shutdown`: what a stop waits on: the stop request and the count of open connections.
//! - `echo`: the seed's `GOT:` protocol, [`echo`].
//!
//! Logging goes through the [`log`] facade; install any logger to see it.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod conn;
mod echo;
mod idle;
mod server;
mod shutdown;

pub use echo::{echo, READ_SIZE};
pub use server::{serve, Builder, Server, StopHandle};

/// The README's Rust examples, compiled and run by `cargo test` so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
