//! Signals, for a server built with `stop_on_signals`: SIGINT and SIGTERM ask it to stop;
//! SIGHUP (what closing a terminal sends) reloads the TLS certificates instead of killing it;
//! SIGUSR1, SIGUSR2 and SIGALRM, whose default action would also kill it silently, are logged
//! and ignored.

use std::io;
use std::sync::Arc;

use async_signal::{Signal, Signals};
use log::{error, info, warn};
use smol::stream::StreamExt;

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

/// Turns SIGINT and SIGTERM into stop requests and SIGHUP into a reload, and logs the others,
/// for as long as the server runs. Spawned on the server's executor, so that signals count
/// during a stop's drain too.
pub(super) async fn forward_signals(
    mut signals: Signals,
    lifecycle: Arc<Lifecycle>,
    reload: Reload,
) {
    while let Some(signal) = signals.next().await {
        match signal {
            Ok(Signal::Int) => info!("received SIGINT"),
            Ok(Signal::Term) => info!("received SIGTERM"),
            Ok(Signal::Hup) => {
                // What closing a terminal sends: the default action would kill the server.
                reload.on_hangup();
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
    fn on_hangup(&self) {
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
pub(super) fn reload_all(configs: &[TlsConfig]) -> io::Result<()> {
    let mut first_error = None;
    for config in configs {
        if let Err(e) = config.reload() {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
