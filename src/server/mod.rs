//! The server: its options ([`Builder`]), starting it (`start.rs`: binding, the worker threads
//! that share one executor, the accept loop per listener), the running server's handle
//! ([`Server`]), and what stops it (signals).

mod accept;
mod builder;
mod running;
mod signals;
mod start;
mod workers;

use std::future::Future;
use std::io;
use std::net::ToSocketAddrs;

pub use builder::Builder;
pub use running::Server;

use crate::conn::connection::Connection;

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
    Builder::new().listen_tcp(addr).serve(handler)
}
