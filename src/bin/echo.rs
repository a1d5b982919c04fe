//! `echo`: the seed's `GOT:` echo server on the command line.
//!
//! Parses flags, builds the server, prints the address it listens on, and serves until SIGINT or
//! SIGTERM; everything else is the library's.
//!
//! The same program is also built as `taskserve-echo` (`src/bin/taskserve-echo.rs` calls this
//! file's `main`), the name to install: an `echo` first on `PATH` would shadow the shell's.

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use argh::{ArgsInfo, FlagInfoKind, FromArgs};

/// Serve the GOT: echo protocol: every chunk a client sends comes back as GOT: followed by it.
#[derive(FromArgs, ArgsInfo, Debug)]
struct Args {
    /// worker threads that run the executor, 1 to 1024 (default: the number of CPUs)
    #[argh(
        option,
        default = "num_cpus::get().min(MAX_THREADS)",
        from_str_fn(thread_count)
    )]
    threads: usize,

    /// TCP port to listen on; 0 picks a free one (default 25000)
    #[argh(option, default = "25000")]
    port: u16,

    /// address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 or :: for all
    /// interfaces; IPv6 with or without brackets)
    #[argh(option, default = "String::from(\"127.0.0.1\")")]
    host: String,

    /// connections served at once; past it new ones are closed at once (default 10000)
    #[argh(option, default = "10_000", from_str_fn(at_least_one))]
    max_connections: usize,

    /// seconds without traffic before a connection is closed; 0 never closes (default 300)
    #[argh(option, default = "300")]
    idle_timeout: u64,

    /// seconds a stop waits for open connections before closing them (default 10)
    #[argh(option, default = "10")]
    shutdown_timeout: u64,

    /// PEM file with the TLS certificate chain, server certificate first: with --tls-key, the
    /// --port listener speaks TLS (or, with --tls-port, a listener of its own)
    #[argh(option)]
    tls_cert: Option<PathBuf>,

    /// PEM file with the certificate's private key (PKCS#8, RSA or SEC1)
    #[argh(option)]
    tls_key: Option<PathBuf>,

    /// also listen for TLS on this port, and keep --port plain TCP
    #[argh(option)]
    tls_port: Option<u16>,

    /// PEM file with the CA certificates that client certificates must be signed by: clients
    /// without such a certificate are refused in the handshake
    #[argh(option)]
    tls_client_ca: Option<PathBuf>,

    /// seconds a TLS client may take over its handshake before it is closed (default 10)
    #[argh(option, default = "10", from_str_fn(at_least_one_u64))]
    tls_handshake_timeout: u64,

    /// also listen on a Unix socket at this path (a stale socket file left by a crash is
    /// replaced; the file is removed at exit)
    #[argh(option)]
    unix: Option<PathBuf>,

    /// no plain TCP listener on --port: serve only --unix and --tls-port
    #[argh(switch)]
    no_tcp: bool,

    /// also serve Prometheus metrics at http://ADDR/metrics, ADDR as host:port (e.g.
    /// 127.0.0.1:9100; port 0 picks a free one)
    #[argh(option)]
    metrics: Option<String>,

    /// expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy-v2 sends) at the start
    /// of each TCP and TLS connection, and take the client's address from it
    #[argh(switch)]
    proxy_protocol: bool,

    /// with --proxy-protocol, the networks trusted to send the header, CIDR[,CIDR...]; others
    /// are closed at once (default 127.0.0.0/8,::1: loopback only)
    #[argh(option, from_str_fn(cidr_list))]
    proxy_from: Option<Vec<taskserve::Cidr>>,

    /// with --proxy-protocol, seconds a client has to send its whole header (default 5)
    #[argh(option, default = "5", from_str_fn(at_least_one_u64))]
    proxy_timeout: u64,

    /// connections served at once from one client address (IPv6: one /64), the client's own
    /// with --proxy-protocol; past it new ones are closed at once (default: no limit). Behind
    /// a load balancer without --proxy-protocol, or a large NAT, many clients share one
    /// address: allow the most one client needs times the clients behind one address
    #[argh(option, from_str_fn(at_least_one))]
    max_connections_per_ip: Option<usize>,

    /// set SO_REUSEPORT, so that several echo processes (each with --reuse-port) share one
    /// address and the kernel spreads connections over them; also for restarts
    #[argh(switch)]
    reuse_port: bool,

    /// seconds without traffic before TCP keepalive probes a client, then every third of it;
    /// a vanished peer is closed within twice this (default: off)
    #[argh(option, from_str_fn(at_least_one_u64))]
    keepalive: Option<u64>,

    /// log only warnings and errors (RUST_LOG, when set, decides instead)
    #[argh(switch, short = 'q')]
    quiet: bool,

    /// print the version and exit
    #[argh(switch, short = 'V')]
    version: bool,
}

/// The most `--threads` takes, as its help says. Above the core count threads only take turns on
/// the cores (the largest machines have a few hundred), and each one costs a stack and a few
/// memory mappings: about 17,000 of them exhaust the kernel's default limit on mappings
/// (`vm.max_map_count`) and the process aborts while starting them. 1024 leaves room for any
/// machine and is far from that.
const MAX_THREADS: usize = 1024;

fn thread_count(value: &str) -> Result<usize, String> {
    match value.parse() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be from 1 to {MAX_THREADS}")),
        Err(e) => Err(format!("{e}")),
    }
}

fn cidr_list(value: &str) -> Result<Vec<taskserve::Cidr>, String> {
    value.split(',').map(|cidr| cidr.trim().parse()).collect()
}

fn at_least_one_u64(value: &str) -> Result<u64, String> {
    at_least_one(value).map(|n| n as u64)
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}

pub fn main() -> ExitCode {
    // `args_os`: `std::env::args` panics on an argument that is not UTF-8.
    let strings: Vec<OsString> = std::env::args_os().collect();
    let name = program_name(strings.first());
    let args = match parse_args(name, strings.get(1..).unwrap_or(&[])) {
        Ok(args) => args,
        Err(code) => return code,
    };
    if args.version {
        let version = format!("{name} (taskserve) {}", env!("CARGO_PKG_VERSION"));
        // As ripgrep does on a broken pipe: the reader has what it wanted, or did not want it.
        let _ = print_line(io::stdout(), version);
        return ExitCode::SUCCESS;
    }
    let default_level = if args.quiet { "warn" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Nowhere left to report a failure to report the failure: the exit code still says it.
            let _ = print_line(io::stderr(), format_args!("{name}: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes `line` and a newline to `stream`, flushed. `println!` and `eprintln!` would panic (exit
/// code 101) when the stream is a pipe whose reader has gone: `echo | true`, or a script that
/// stops reading once it has seen the listening line.
fn print_line(mut stream: impl Write, line: impl Display) -> io::Result<()> {
    writeln!(stream, "{line}")?;
    stream.flush()
}

/// The name the program was run as, which its messages use: `echo` under `cargo run --bin echo`,
/// `taskserve-echo` once installed.
fn program_name(argv0: Option<&OsString>) -> &str {
    argv0
        .and_then(|path| Path::new(path).file_name()?.to_str())
        .unwrap_or(env!("CARGO_BIN_NAME"))
}

/// argh's own `from_env` exits with 1 on bad flags; a usage error gets 2 here, as is the custom,
/// so that it differs from a failure to serve.
fn parse_args(command: &str, args: &[OsString]) -> Result<Args, ExitCode> {
    let usage_error = |message: &str| {
        let help = format!("Run {command} --help for more information.");
        let _ = print_line(io::stderr(), format_args!("{message}\n{help}"));
        ExitCode::from(2)
    };
    let args: Vec<String> = args
        .iter()
        .map(|arg| arg.to_str().map(String::from).ok_or(arg))
        .collect::<Result<_, _>>()
        .map_err(|bad| usage_error(&format!("Invalid argument {bad:?}: not valid UTF-8")))?;
    let rest = argh_spelling(&args);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    Args::from_args(&[command], &rest).map_err(|early| match early.status {
        Ok(()) => {
            let _ = print_line(io::stdout(), early.output);
            ExitCode::SUCCESS
        }
        Err(()) => usage_error(early.output.trim_end()),
    })
}

/// Rewrites two spellings users type and argh rejects: `--name=value` for an option becomes
/// `--name value`, and `-h` becomes `--help`. A switch keeps its `=` (`--quiet=no` stays an
/// error), and an option's value is passed on as it is, even if it looks like a flag.
fn argh_spelling(args: &[String]) -> Vec<String> {
    let flags = Args::get_args_info().flags;
    let is_option = |name: &str| {
        flags
            .iter()
            .any(|flag| flag.long == name && matches!(flag.kind, FlagInfoKind::Option { .. }))
    };
    let mut spelled = Vec::with_capacity(args.len() + 1);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "-h" {
            spelled.push("--help".to_string());
        } else if is_option(arg) {
            spelled.push(arg.clone());
            spelled.extend(args.next().cloned());
        } else {
            match arg.split_once('=') {
                Some((name, value)) if is_option(name) => {
                    spelled.extend([name.to_string(), value.to_string()]);
                }
                _ => spelled.push(arg.clone()),
            }
        }
    }
    spelled
}

fn run(args: &Args) -> io::Result<()> {
    raise_open_file_limit(args.max_connections);
    let tls = tls_config(args)?;
    let mut builder = taskserve::Server::builder()
        .threads(args.threads)
        .max_connections(args.max_connections)
        .idle_timeout(seconds_or_never(args.idle_timeout))
        .shutdown_timeout(Duration::from_secs(args.shutdown_timeout))
        .tls_handshake_timeout(Duration::from_secs(args.tls_handshake_timeout))
        // Installed before the listening lines are printed: a script may signal right after.
        .stop_on_signals(true)
        .proxy_protocol(proxy_protocol(args)?)
        .max_connections_per_ip(args.max_connections_per_ip)
        .reuse_port(args.reuse_port)
        .keepalive(args.keepalive.map(Duration::from_secs))
        .notify_systemd(true);
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
    if let Some(path) = &args.unix {
        builder = listen_unix(builder, path)?;
    }
    if let Some(addr) = &args.metrics {
        builder = serve_metrics(builder, addr)?;
    }
    if args.no_tcp && args.unix.is_none() && args.tls_port.is_none() {
        return Err(usage(
            "--no-tcp leaves nothing to listen on: add --unix or --tls-port",
        ));
    }
    let server = builder.start_listeners(taskserve::echo)?;
    for line in listening_lines(&server) {
        // A closed stdout does not stop the server. ripgrep exits quietly on a broken pipe
        // because its output is its whole job and nobody wants it any more; a server's job is
        // the network, and stdout only announces the address to whoever started it, who may
        // stop reading once they have it (`grep -m1`), or never read. So the line is dropped,
        // the failure logged (the logger drops its own lines just as quietly when stderr is
        // closed), and serving goes on.
        if let Err(e) = print_line(io::stdout(), &line) {
            log::warn!("cannot print '{line}' on stdout: {e}; serving anyway");
        }
    }
    server.wait();
    Ok(())
}

/// One line per listener, on stdout whatever the log level, all printed before serving:
/// `listening on 127.0.0.1:25000 (4 threads)` first, in the form scripts parse, then
/// `listening on 127.0.0.1:25443 (tls)` or `listening on /run/echo.sock (unix)`.
fn listening_lines(server: &taskserve::Server) -> Vec<String> {
    let threads = server.threads();
    let threads = format!("{threads} thread{}", if threads == 1 { "" } else { "s" });
    let mut lines: Vec<String> = server
        .local_addrs()
        .iter()
        .enumerate()
        .map(|(n, (addr, transport))| {
            let mut notes = Vec::new();
            if *transport != taskserve::Transport::Tcp {
                notes.push(transport.to_string());
            }
            if n == 0 {
                notes.push(threads.clone());
            }
            format!("listening on {addr} ({})", notes.join(", "))
        })
        .collect();
    lines.extend(metrics_line(server));
    lines
}

/// `listening on 127.0.0.1:9100 (metrics)`, with --metrics.
#[cfg(feature = "metrics")]
fn metrics_line(server: &taskserve::Server) -> Option<String> {
    let addr = server.metrics_addr()?;
    Some(format!("listening on {addr} (metrics)"))
}

#[cfg(not(feature = "metrics"))]
fn metrics_line(_: &taskserve::Server) -> Option<String> {
    None
}

/// The Prometheus endpoint on `addr` (`host:port`), resolved now so that an error names the flag.
#[cfg(feature = "metrics")]
fn serve_metrics(builder: taskserve::Builder, addr: &str) -> io::Result<taskserve::Builder> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve --metrics {addr:?}: {e}")))?
        .collect();
    Ok(builder.metrics(&addrs[..]))
}

#[cfg(not(feature = "metrics"))]
fn serve_metrics(_: taskserve::Builder, _: &str) -> io::Result<taskserve::Builder> {
    Err(usage("--metrics: built without the metrics feature"))
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
        (None, None) => {
            if args.tls_port.is_some() || args.tls_client_ca.is_some() {
                return Err(usage(
                    "--tls-port and --tls-client-ca need --tls-cert and --tls-key",
                ));
            }
            return Ok(None);
        }
    };
    let mut tls = taskserve::TlsConfig::from_pem_files(cert, key)?;
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.with_client_ca_file(ca)?;
    }
    Ok(Some(tls))
}

/// Whether systemd passed listening sockets (`LISTEN_FDS`) to serve instead of binding --port.
fn socket_activated() -> bool {
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

/// The PROXY protocol configuration the flags ask for, if any.
fn proxy_protocol(args: &Args) -> io::Result<Option<taskserve::ProxyProtocol>> {
    if !args.proxy_protocol {
        if args.proxy_from.is_some() {
            return Err(usage("--proxy-from needs --proxy-protocol"));
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
fn listen_unix(builder: taskserve::Builder, path: &Path) -> io::Result<taskserve::Builder> {
    Ok(builder.listen_unix(path))
}

#[cfg(not(unix))]
fn listen_unix(_: taskserve::Builder, _: &Path) -> io::Result<taskserve::Builder> {
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
fn raise_open_file_limit(max_connections: usize) {
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
fn raise_open_file_limit(_max_connections: usize) {}

fn seconds_or_never(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}
