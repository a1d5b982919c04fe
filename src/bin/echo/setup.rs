//! From flags to a server: the builder's listeners and options as the flags ask for them, each
//! checked now so that a mistake is one line at start, not a surprise at the first client; and
//! the lines that say where the server listens.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use taskserve::Builder;

use super::args::{Args, DEFAULT_HOST};

/// The builder the flags ask for: options, then listeners. The flags are checked in the order
/// a user meets them (TLS files, PROXY, listeners, --no-tcp last), so that one mistake gives the
/// same message whatever else is wrong.
pub fn builder(args: &Args) -> io::Result<Builder> {
    let tls = tls_config(args)?;
    let mut builder = taskserve::Server::builder()
        .threads(args.threads)
        .max_connections(args.max_connections)
        // 0 is "never", for the flag as for the builder.
        .idle_timeout(Duration::from_secs(args.idle_timeout))
        .drain_delay(Duration::from_secs(args.drain_delay))
        .shutdown_timeout(Duration::from_secs(args.shutdown_timeout))
        .tls_handshake_timeout(Duration::from_secs(args.tls_handshake_timeout))
        // Installed before the listening lines are printed: a script may signal right after.
        .stop_on_signals(true)
        .reuse_port(args.reuse_port)
        .notify_systemd(true);
    let proxy = proxy_protocol(args)?;
    if let Some(proxy) = proxy.as_ref().filter(|_| args.proxy_protocol) {
        builder = builder.proxy_protocol(proxy.clone());
    }
    if let Some(max) = args.max_connections_per_ip {
        builder = builder.max_connections_per_ip(max);
    }
    if let Some(seconds) = args.keepalive {
        builder = builder.keepalive(Duration::from_secs(seconds));
    }
    listeners(builder, args, tls, proxy)
}

/// The listeners the flags ask for: --port (or systemd's sockets in its place), --tls-port,
/// --unix, --proxy-port (last, so that its listening line is the last one), --metrics.
fn listeners(
    mut builder: Builder,
    args: &Args,
    tls: Option<taskserve::TlsConfig>,
    proxy: Option<taskserve::ProxyProtocol>,
) -> io::Result<Builder> {
    if socket_activated() {
        // Started by systemd (or systemd-socket-activate): its sockets take --port's place.
        builder = listen_systemd(builder, tls.as_ref().filter(|_| args.tls_port.is_none()))?;
    } else if !args.no_tcp {
        let addrs = resolve(&args.host, args.port)?;
        builder = match (&tls, args.tls_port) {
            (Some(tls), None) => builder.listen_tls(&addrs[..], tls.clone()),
            _ => builder.listen_tcp(&addrs[..]),
        };
    }
    if let (Some(tls), Some(port)) = (&tls, args.tls_port) {
        builder = builder.listen_tls(&resolve(&args.host, port)?[..], tls.clone());
    }
    match (&args.unix, args.unix_mode) {
        (Some(path), mode) => builder = listen_unix(builder, path, mode)?,
        (None, Some(_)) => return Err(usage("--unix-mode needs --unix, the socket it is for")),
        (None, None) => {}
    }
    if let (Some(proxy), Some(port)) = (proxy, args.proxy_port) {
        builder = builder.listen_proxy(&resolve(&args.host, port)?[..], proxy);
    }
    if let Some(addr) = &args.metrics {
        builder = builder.listen_metrics(&metrics_addrs(addr)?[..]);
    }
    if args.no_tcp && args.unix.is_none() && args.tls_port.is_none() && args.proxy_port.is_none() {
        return Err(usage(
            "--no-tcp leaves nothing to listen on: add --unix, --tls-port or --proxy-port",
        ));
    }
    Ok(builder)
}

/// The addresses `--metrics ADDR` names, resolved now so that an error names the flag. A bare
/// port (`--metrics 25090`, the usual slip) gets the address it was probably meant as.
fn metrics_addrs(addr: &str) -> io::Result<Vec<SocketAddr>> {
    if !addr.contains(':') {
        let example = match addr.parse::<u16>() {
            Ok(port) => format!("127.0.0.1:{port}"),
            Err(_) => format!("{addr}:25090"),
        };
        return Err(usage(&format!(
            "--metrics wants host:port, not {addr:?}: try --metrics {example} \
             (0.0.0.0:PORT to be scraped from other machines)"
        )));
    }
    addr.to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve --metrics {addr:?}: {e}")))
}

/// One line per listener, on stdout whatever the log level, all printed before serving:
/// `listening on 127.0.0.1:25000 (4 threads)` first, in the form scripts parse, then
/// `listening on 127.0.0.1:25443 (tls)`, `listening on /run/echo.sock (unix)` or
/// `listening on 127.0.0.1:25001 (proxy)`.
pub fn listening_lines(server: &taskserve::Server, args: &Args) -> Vec<String> {
    let threads = server.threads();
    let threads = format!("{threads} thread{}", if threads == 1 { "" } else { "s" });
    let listeners = server.local_addrs();
    // `listeners` adds the --proxy-port listener last.
    let proxy = args.proxy_port.map(|_| listeners.len() - 1);
    let mut lines: Vec<String> = listeners
        .iter()
        .enumerate()
        .map(|(n, (addr, transport))| {
            let mut notes = Vec::new();
            if Some(n) == proxy {
                notes.push("proxy".to_string());
            } else if *transport != taskserve::Transport::Tcp {
                notes.push(transport.to_string());
            }
            if n == 0 {
                notes.push(threads.clone());
            }
            format!("listening on {addr} ({})", notes.join(", "))
        })
        .collect();
    if let Some(addr) = server.metrics_addr() {
        lines.push(format!("listening on {addr} (metrics)"));
    }
    lines
}

/// Warns when a socket passed by systemd listens on every interface while `--host` was left at
/// its default, this machine only: the flag does not apply to an inherited socket, and
/// `systemd-socket-activate -l 25000` or `ListenStream=25000` bind all interfaces, so a user who
/// relied on the default would serve the network without knowing it.
/// `activated` is [`socket_activated`] before the server started, which takes the variables.
pub fn warn_of_inherited_sockets_on_all_interfaces(
    args: &Args,
    activated: bool,
    server: &taskserve::Server,
) {
    if !activated || args.host != DEFAULT_HOST {
        return;
    }
    for (addr, _) in server.local_addrs() {
        if let taskserve::Addr::Inet(addr) = addr {
            if addr.ip().is_unspecified() {
                log::warn!(
                    "listening on {addr}, every interface, as the socket systemd passed was \
                     bound (--host applies only to sockets echo binds itself): for this machine \
                     only, bind it to 127.0.0.1 (ListenStream=127.0.0.1:{port}, \
                     systemd-socket-activate -l 127.0.0.1:{port})",
                    port = addr.port()
                );
            }
        }
    }
}

/// The TLS configuration the flags ask for, if any; each file is read (and checked) now, so
/// that a bad one is an error at start, not at the first client.
fn tls_config(args: &Args) -> io::Result<Option<taskserve::TlsConfig>> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(usage(
                "--tls-cert needs --tls-key, the certificate's private key",
            ))
        }
        (None, Some(_)) => {
            return Err(usage(
                "--tls-key needs --tls-cert, the certificate it is for",
            ))
        }
        (None, None) => return no_tls(args),
    };
    let mut tls = taskserve::TlsConfig::from_pem_files(cert, key)?;
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.with_client_ca_file(ca)?;
    }
    if let Some(sessions) = args.tls_session_cache {
        tls = tls.with_session_cache(sessions)?;
    }
    if let Some(tickets) = args.tls_tickets {
        tls = tls.with_session_tickets(tickets)?;
    }
    ticket_keys(tls, args).map(Some)
}

/// No TLS: refuses the TLS flags that need a certificate, naming the first one given.
fn no_tls(args: &Args) -> io::Result<Option<taskserve::TlsConfig>> {
    let given = [
        ("--tls-port", args.tls_port.is_some()),
        ("--tls-client-ca", args.tls_client_ca.is_some()),
        ("--tls-session-cache", args.tls_session_cache.is_some()),
        ("--tls-tickets", args.tls_tickets.is_some()),
        ("--tls-ticket-key", !args.tls_ticket_key.is_empty()),
        ("--tls-ticket-lifetime", args.tls_ticket_lifetime.is_some()),
    ];
    match given.iter().find(|(_, given)| *given) {
        Some((flag, _)) => Err(usage(&format!("{flag} needs --tls-cert and --tls-key"))),
        None => Ok(None),
    }
}

/// `tls` sealing tickets with the --tls-ticket-key files, if any, for --tls-ticket-lifetime.
fn ticket_keys(mut tls: taskserve::TlsConfig, args: &Args) -> io::Result<taskserve::TlsConfig> {
    if args.tls_ticket_key.is_empty() {
        if args.tls_ticket_lifetime.is_some() {
            return Err(usage(
                "--tls-ticket-lifetime needs --tls-ticket-key: a random key of the process's \
                 own gives tickets 12 hours",
            ));
        }
        return Ok(tls);
    }
    if args.tls_tickets == Some(false) {
        return Err(usage(
            "--tls-ticket-key seals tickets, which --tls-tickets off turns off: give one or \
             the other",
        ));
    }
    tls = tls.with_ticket_key_files(&args.tls_ticket_key)?;
    if let Some(seconds) = args.tls_ticket_lifetime {
        tls = tls.with_ticket_lifetime(Duration::from_secs(seconds))?;
    }
    Ok(tls)
}

/// Whether systemd passed listening sockets (`LISTEN_FDS`) to serve instead of binding --port.
/// Only until the server has started: taking the sockets unsets the variables.
pub fn socket_activated() -> bool {
    cfg!(unix) && std::env::var_os("LISTEN_FDS").is_some()
}

#[cfg(unix)]
fn listen_systemd(
    builder: taskserve::Builder,
    tls: Option<&taskserve::TlsConfig>,
) -> io::Result<taskserve::Builder> {
    Ok(match tls {
        Some(tls) => builder.listen_systemd_tls(tls.clone()),
        None => builder.listen_systemd(),
    })
}

#[cfg(not(unix))]
fn listen_systemd(
    _: taskserve::Builder,
    _: Option<&taskserve::TlsConfig>,
) -> io::Result<taskserve::Builder> {
    Err(usage("socket activation is not available on this system"))
}

/// The PROXY protocol configuration the flags ask for, if any: for every TCP and TLS listener
/// (--proxy-protocol), for the --proxy-port one, or both.
fn proxy_protocol(args: &Args) -> io::Result<Option<taskserve::ProxyProtocol>> {
    if !args.proxy_protocol && args.proxy_port.is_none() {
        if args.proxy_from.is_some() {
            return Err(usage("--proxy-from needs --proxy-protocol or --proxy-port"));
        }
        return Ok(None);
    }
    let mut proxy =
        taskserve::ProxyProtocol::new().timeout(Duration::from_secs(args.proxy_timeout));
    if let Some(networks) = &args.proxy_from {
        proxy = proxy.trusted_sources(networks.iter().copied());
    }
    Ok(Some(proxy))
}

#[cfg(unix)]
fn listen_unix(builder: Builder, path: &Path, mode: Option<u32>) -> io::Result<Builder> {
    Ok(match mode {
        Some(mode) => builder.unix_mode(mode).listen_unix(path),
        None => builder.listen_unix(path),
    })
}

#[cfg(not(unix))]
fn listen_unix(_: Builder, _: &Path, _: Option<u32>) -> io::Result<Builder> {
    Err(usage(
        "--unix: Unix sockets are not available on this system",
    ))
}

/// A combination of flags that cannot work: one line, and exit code 1 like any failure to
/// start.
fn usage(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    // A bare IPv6 address such as `::1` is not `host:port` syntax; try it as an address first.
    // In brackets too, as the listening line prints it (`[::1]:25000`).
    let ip = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(bracketed) => bracketed.parse::<Ipv6Addr>().map(IpAddr::V6).ok(),
        None => host.parse().ok(),
    };
    if let Some(ip) = ip {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    (host, port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve --host {host:?}: {e}")))
}

/// Raises the soft limit on open files to the hard one, as Go programs do at start-up: every
/// client is a file descriptor, and the usual soft limit of 1024 would stop the server far below
/// its default `--max-connections`. Warns when even the hard limit is below that.
#[cfg(unix)]
pub fn raise_open_file_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            log::debug!("cannot raise the open-file limit: {e}");
        }
    }
    // `None` is unlimited. A few descriptors go to the listener, the reactor and std streams.
    if let Some(files) = getrlimit(Resource::Nofile).current {
        let wanted = max_connections as u64 + 16;
        if files < wanted {
            log::warn!(
                "the open-file limit is {files}, below --max-connections {max_connections}: past \
                 about {} clients, new ones wait until descriptors free up (raise it with ulimit -n)",
                files.saturating_sub(16)
            );
        }
    }
}

#[cfg(not(unix))]
pub fn raise_open_file_limit(_max_connections: usize) {}
