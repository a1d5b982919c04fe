//! Signals, for a server built with `stop_on_signals`: SIGINT and SIGTERM ask it to stop;
//! SIGHUP (what closing a terminal sends) reloads the TLS certificates instead of killing it;
//! SIGUSR1, SIGUSR2 and SIGALRM, whose default action would also kill it silently, are logged
//! and ignored.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_signal::{Signal, Signals};
use log::{error, info, warn};
use smol::channel::{Receiver, Sender};
use smol::stream::StreamExt;

use crate::deadline::within;
use crate::stop::Lifecycle;
use crate::transport::tls::TlsConfig;

/// The signals handled: every other keeps its default action.
pub(super) const HANDLED: [Signal; 6] = [
    Signal::Int,
    Signal::Term,
    Signal::Hup,
    Signal::Usr1,
    Signal::Usr2,
    Signal::Alarm,
];

/// How long a reload may take to read its files. They are small and local: only a file that
/// never ends or never answers (a network mount gone away) takes this long.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns SIGINT and SIGTERM into stop requests, SIGHUP into a reload request on `hangups`,
/// and logs the others, for as long as the server runs. Spawned on the server's executor, so
/// that signals count during a stop's drain too. It never waits for a reload: a SIGTERM is
/// handled at once even while one is under way.
pub(super) async fn forward_signals(
    mut signals: Signals,
    lifecycle: Arc<Lifecycle>,
    hangups: Sender<()>,
) {
    while let Some(signal) = signals.next().await {
        match signal {
            Ok(Signal::Int) => info!("received SIGINT"),
            Ok(Signal::Term) => info!("received SIGTERM"),
            Ok(Signal::Hup) => {
                // Full when a reload is under way and another waits already: that one will
                // read the files as they are now.
                if hangups.try_send(()).is_err() {
                    info!("received SIGHUP: a reload is already waiting to run");
                }
                continue;
            }
            Ok(ignored @ (Signal::Usr1 | Signal::Usr2 | Signal::Alarm)) => {
                warn!(
                    "received {}: ignored, it has no meaning here",
                    name(ignored)
                );
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

/// `SIGUSR1`, as people write it (`Signal`'s `Debug` says `Usr1`).
fn name(signal: Signal) -> &'static str {
    match signal {
        Signal::Usr1 => "SIGUSR1",
        Signal::Usr2 => "SIGUSR2",
        Signal::Alarm => "SIGALRM",
        _ => "a signal",
    }
}

/// What SIGHUP reloads: the TLS listeners' configurations.
pub(super) struct Reload {
    pub(super) tls: Vec<TlsConfig>,
}

impl Reload {
    /// Reloads once per request on `hangups`, one after the other, until the sender goes.
    pub(super) async fn on_hangups(self, hangups: Receiver<()>) {
        while hangups.recv().await.is_ok() {
            self.on_hangup().await;
        }
    }

    async fn on_hangup(&self) {
        if !self.tls.is_empty() {
            match reload_off_workers(self.tls.clone()).await {
                // The certificate, its key, the client CAs and the ticket keys.
                Ok(()) => info!("received SIGHUP: reloaded the TLS files"),
                // The error names the file and the cause; what was loaded before stays in use.
                Err(e) => {
                    error!("received SIGHUP: {e}; still serving with the files loaded before")
                }
            }
            return;
        }
        info!("received SIGHUP: nothing to reload; still serving");
    }
}

/// Reloads every configuration on the blocking thread pool (`smol::unblock`), so that a slow
/// file holds no worker, within [`RELOAD_TIMEOUT`]. A reload that times out may still finish
/// later, on its own thread, and then it takes effect.
pub(super) async fn reload_off_workers(configs: Vec<TlsConfig>) -> io::Result<()> {
    let reloading = smol::unblock(move || reload_all(&configs));
    within(RELOAD_TIMEOUT, "the TLS files not read", reloading).await
}

/// Reloads every configuration, even after one fails; returns the first error.
fn reload_all(configs: &[TlsConfig]) -> io::Result<()> {
    let mut first_error = None;
    for config in configs {
        if let Err(e) = config.reload() {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
