//! systemd: socket activation (serving the listening sockets passed as `LISTEN_FDS` /
//! `LISTEN_PID`, as `sd_listen_fds` reads them) and readiness (`READY=1`, `STOPPING=1` sent to
//! `NOTIFY_SOCKET`, as `sd_notify` does). The `listenfd` and `sd-notify` crates do the work.

use std::io;

use log::{debug, warn};

use super::listener::{ListenOptions, Listener};
use super::tls::TlsConfig;

/// The listening sockets systemd passed to this process, TCP ones with `tls` if given. Reading
/// them unsets `LISTEN_FDS` and `LISTEN_PID`, so child processes do not take them too, and a
/// second call finds none.
pub(crate) fn inherited(
    options: &ListenOptions,
    tls: Option<&TlsConfig>,
) -> io::Result<Vec<Listener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no listening sockets passed by systemd (LISTEN_FDS and LISTEN_PID unset, or \
             meant for another process)",
        ));
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for n in 0..fds.len() {
        // Each descriptor's type is checked: a TCP listener, else a Unix stream listener.
        if let Ok(Some(tcp)) = fds.take_tcp_listener(n) {
            listeners.push(Listener::tcp(tcp, options, tls)?);
            continue;
        }
        match fds.take_unix_listener(n) {
            Ok(Some(unix)) => listeners.push(Listener::unix(unix, None)?),
            Ok(None) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "socket {} passed by systemd is neither a TCP nor a Unix stream \
                         socket: {e}",
                        n + 3
                    ),
                ))
            }
        }
    }
    debug!("serving {} socket(s) passed by systemd", listeners.len());
    Ok(listeners)
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) that the server is ready: it serves.
pub(crate) fn notify_ready() {
    notify(sd_notify::NotifyState::Ready, "READY=1");
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) that a stop has begun.
pub(crate) fn notify_stopping() {
    notify(sd_notify::NotifyState::Stopping, "STOPPING=1");
}

fn notify(state: sd_notify::NotifyState<'_>, text: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(&[state]) {
        Ok(()) => debug!("told systemd {text}"),
        // systemd then decides (a start that times out, say): the server itself is fine.
        Err(e) => warn!("cannot tell systemd {text}: {e}"),
    }
}
