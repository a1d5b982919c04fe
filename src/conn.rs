//! One connection's task: the handler's future, guarded against panics and idleness, logged,
//! and holding its slot in the connection count until it ends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use log::{debug, error, info, warn};
use smol::future::FutureExt;

use crate::idle::{unless_idle, IdleSweeper};
use crate::shutdown::Slot;

/// Serves one accepted client with `handler` until the handler returns, fails, panics, or the
/// connection stays quiet for the `idle` sweeper's timeout; then closes the socket and frees `slot`.
pub(crate) async fn serve_connection<H, F>(
    handler: Arc<H>,
    stream: async_net::TcpStream,
    peer: SocketAddr,
    idle: Option<Arc<IdleSweeper>>,
    slot: Slot,
) where
    H: Fn(async_net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    // The seed's two lines per client, in its words, so the programs are recognisably the same.
    info!("Connection from {peer}");
    // Calling the handler is inside the guard too: a handler may panic before its first await.
    let guarded = AssertUnwindSafe(async move { handler(stream, peer).await }).catch_unwind();
    match unless_idle(idle.as_deref(), guarded).await {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => log_handler_error(peer, &e),
        Some(Err(panic)) => error!("{peer}: handler panicked: {}", panic_message(&*panic)),
        None => debug!("{peer}: closed: idle for the idle timeout"),
    }
    // By now the handler's future, and with it the socket, has been dropped.
    info!("Connection closed: {peer}");
    drop(slot);
}

fn log_handler_error(peer: SocketAddr, e: &io::Error) {
    use io::ErrorKind::*;
    match e.kind() {
        // A client that resets or vanishes is the network being normal, not a fault to act on.
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut => {
            debug!("{peer}: {e}")
        }
        _ => warn!("{peer}: handler failed: {e}"),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(a panic payload that is not a string)"
    }
}
