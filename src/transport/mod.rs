//! The transports: the parts a listener is built from, and the stages that change a stream.
//!
//! An [`Endpoint`] is what the builder was given (an address, a path, systemd's sockets); bound,
//! it becomes one or more [`Listener`]s, each of which accepts a [`Stream`] with what the socket
//! tells about the client. [`proxy`] reads a PROXY header off a TCP stream and [`tls_session`]
//! turns one into a TLS session; the connection's own task runs them (see `crate::conn`).
//!
//! Without the `tls` feature, `tls` is a module of types that have no values: the code that
//! handles TLS compiles unchanged, and its TLS branches cannot be reached.

mod endpoint;
mod listener;
pub(crate) mod proxy;
mod stream;
#[cfg(unix)]
pub(crate) mod systemd;
mod tcp;
#[cfg(feature = "tls")]
pub(crate) mod tls;
#[cfg(not(feature = "tls"))]
#[path = "tls_off.rs"]
pub(crate) mod tls;
#[cfg(feature = "tls")]
mod tls_errors;
#[cfg(feature = "tls")]
pub(crate) mod tls_files;
#[cfg(feature = "tls")]
mod tls_io;
#[cfg(feature = "tls")]
pub(crate) mod tls_session;
#[cfg(not(feature = "tls"))]
pub(crate) use tls as tls_session;
#[cfg(feature = "tls")]
mod tls_resumption;
#[cfg(feature = "tls")]
mod tls_tickets;
#[cfg(unix)]
mod unix;

pub(crate) use endpoint::Endpoint;
pub(crate) use listener::{Accepted, ListenOptions, Listener};
pub(crate) use stream::Stream;
pub(crate) use tcp::{recv, send, ReadableWait};
