//! The flags: what each one means (its doc comment is its `--help` text) and the values it
//! takes, checked as they are parsed.
//!
//! This file uses nothing but argh and taskserve's public API, so that the fuzz target of the
//! flags (`taskserve::fuzzing::echo_args`) compiles it as it is.

use std::ffi::OsString;
use std::path::PathBuf;

use argh::{ArgsInfo, FlagInfoKind, FromArgs};

/// Serve the GOT: echo protocol: every chunk a client sends comes back as GOT: followed by it.
#[derive(FromArgs, ArgsInfo, Debug)]
// `-h` as well as argh's own two, so that the help lists the short form everyone types.
#[argh(help_triggers("-h", "--help", "help"))]
pub struct Args {
    /// worker threads that run the executor, 1 to 1024 (default: the number of CPUs)
    #[argh(
        option,
        default = "num_cpus::get().min(MAX_THREADS)",
        from_str_fn(thread_count)
    )]
    pub threads: usize,

    /// TCP port to listen on; 0 picks a free one (default 25000)
    #[argh(option, default = "25000")]
    pub port: u16,

    /// address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 or :: for all
    /// interfaces; IPv6 with or without brackets)
    #[argh(option, default = "String::from(DEFAULT_HOST)")]
    pub host: String,

    /// connections served at once; past it new ones are closed at once (default 10000)
    #[argh(option, default = "10_000", from_str_fn(at_least_one))]
    pub max_connections: usize,

    /// seconds without traffic before a connection is closed; 0 never closes (default 300)
    #[argh(option, default = "300")]
    pub idle_timeout: u64,

    /// seconds a stop keeps accepting after SIGTERM or SIGINT, not ready meanwhile (/readyz
    /// answers 503, systemd hears STOPPING=1), so that load balancers take this server out of
    /// rotation before it refuses anyone; a second signal ends it early (default 0)
    #[argh(option, default = "0")]
    pub drain_delay: u64,

    /// seconds a stop waits for open connections before closing them (default 10)
    #[argh(option, default = "10")]
    pub shutdown_timeout: u64,

    /// PEM file with the TLS certificate chain, server certificate first: with --tls-key, the
    /// --port listener speaks TLS (or, with --tls-port, a listener of its own)
    #[argh(option)]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the certificate's private key (PKCS#8, RSA or SEC1)
    #[argh(option)]
    pub tls_key: Option<PathBuf>,

    /// also listen for TLS on this port, and keep --port plain TCP
    #[argh(option)]
    pub tls_port: Option<u16>,

    /// PEM file with the CA certificates that client certificates must be signed by: clients
    /// without such a certificate are refused in the handshake
    #[argh(option)]
    pub tls_client_ca: Option<PathBuf>,

    /// TLS sessions kept in memory for returning clients to resume (an abbreviated handshake),
    /// 0 for none, at most 1000000; with tickets on, only TLS 1.2 clients that take no tickets
    /// need them (default 10000, about 4 MiB when full)
    #[argh(option)]
    pub tls_session_cache: Option<usize>,

    /// on or off: give TLS clients session tickets to resume with, sealed by a random key
    /// replaced every 6 hours (a ticket opens for 12), or with --tls-ticket-key; see
    /// docs/operations.md for what that means for forward secrecy (default on)
    #[argh(option, from_str_fn(on_off))]
    pub tls_tickets: Option<bool>,

    /// file of 80 random bytes (openssl rand 80 > FILE, chmod 600) that seals TLS session
    /// tickets, given to every server a client may reach so that it resumes on any of them;
    /// repeat it: the first seals, each one opens (to rotate, put a new key first and the old
    /// one second, then SIGHUP). Without it, a random key of this process's own
    #[argh(option)]
    pub tls_ticket_key: Vec<PathBuf>,

    /// with --tls-ticket-key, seconds a ticket opens for after it is issued, 1 to 604800
    /// (default 43200, 12 hours)
    #[argh(option, from_str_fn(ticket_lifetime))]
    pub tls_ticket_lifetime: Option<u64>,

    /// seconds a TLS client may take over its handshake before it is closed (default 10)
    #[argh(option, default = "10", from_str_fn(at_least_one_u64))]
    pub tls_handshake_timeout: u64,

    /// also listen on a Unix socket at this path (a stale socket file left by a crash is
    /// replaced; the file is removed at exit)
    #[argh(option)]
    pub unix: Option<PathBuf>,

    /// with --unix, the socket file's permissions in octal, as chmod and systemd's SocketMode=
    /// take them: 600 this user only, 660 and its group, 666 anyone (default: the umask's)
    #[argh(option, from_str_fn(octal_mode))]
    pub unix_mode: Option<u32>,

    /// no plain TCP listener on --port: serve only --unix and --tls-port
    #[argh(switch)]
    pub no_tcp: bool,

    /// also serve Prometheus metrics at http://ADDR/metrics, with /healthz and /readyz beside
    /// them, ADDR as host:port (e.g. 127.0.0.1:25090; port 0 picks a free one)
    #[argh(option)]
    pub metrics: Option<String>,

    /// expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy-v2 sends) at the start
    /// of each TCP and TLS connection, and take the client's address from it
    #[argh(switch)]
    pub proxy_protocol: bool,

    /// also listen on this port for plain TCP clients that each start with a PROXY protocol
    /// header (from a load balancer), and keep --port as it is
    #[argh(option)]
    pub proxy_port: Option<u16>,

    /// with --proxy-protocol or --proxy-port, the networks trusted to send the header,
    /// CIDR[,CIDR...]; others are closed at once (default 127.0.0.0/8,::1: loopback only)
    #[argh(option, from_str_fn(cidr_list))]
    pub proxy_from: Option<Vec<taskserve::Cidr>>,

    /// with --proxy-protocol or --proxy-port, seconds a client has to send its whole header
    /// (default 5)
    #[argh(option, default = "5", from_str_fn(at_least_one_u64))]
    pub proxy_timeout: u64,

    /// connections served at once from one client address (IPv6: one /64), the client's own
    /// with --proxy-protocol; past it new ones are closed at once (default: no limit). Behind
    /// a load balancer without --proxy-protocol, or a large NAT, many clients share one
    /// address: allow the most one client needs times the clients behind one address
    #[argh(option, from_str_fn(at_least_one))]
    pub max_connections_per_ip: Option<usize>,

    /// set SO_REUSEPORT, so that several echo processes (each with --reuse-port) share one
    /// address and the kernel spreads connections over them; also for restarts
    #[argh(switch)]
    pub reuse_port: bool,

    /// seconds without traffic before TCP keepalive probes a client, then every third of it;
    /// a vanished peer is closed within twice this (default: off)
    #[argh(option, from_str_fn(at_least_one_u64))]
    pub keepalive: Option<u64>,

    /// log only warnings and errors (RUST_LOG, when set, decides instead)
    #[argh(switch, short = 'q')]
    pub quiet: bool,

    /// print the version and exit
    #[argh(switch, short = 'V')]
    pub version: bool,
}

/// Why parsing stopped before there were flags to serve with.
#[derive(Debug)]
pub enum Stop {
    /// `--help`: the text to print on stdout before exiting with success.
    Help(String),
    /// A mistake in the flags: the message to print on stderr before exiting with 2.
    Usage(String),
}

/// The flags in `args`, the arguments after the program's name, which `command` is.
pub fn parse(command: &str, args: &[OsString]) -> Result<Args, Stop> {
    let args: Vec<String> = args
        .iter()
        .map(|arg| arg.to_str().map(String::from).ok_or(arg))
        .collect::<Result<_, _>>()
        .map_err(|bad| Stop::Usage(format!("Invalid argument {bad:?}: not valid UTF-8")))?;
    let rest = argh_spelling(&args);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    Args::from_args(&[command], &rest).map_err(|early| match early.status {
        Ok(()) => Stop::Help(early.output),
        Err(()) => Stop::Usage(early.output.trim_end().to_string()),
    })
}

/// Rewrites a spelling users type and argh rejects: `--name=value` for an option becomes
/// `--name value`. A switch keeps its `=` (`--quiet=no` stays an error), and an option's value
/// is passed on as it is, even if it looks like a flag.
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
        if is_option(arg) {
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

/// `--host` unless given: this machine only.
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// The most `--threads` takes, as its help says. Above the core count threads only take turns on
/// the cores (the largest machines have a few hundred), and each one costs a stack and a few
/// memory mappings: about 17,000 of them exhaust the kernel's default limit on mappings
/// (`vm.max_map_count`) and the process aborts while starting them. 1024 leaves room for any
/// machine and is far from that.
pub const MAX_THREADS: usize = 1024;

fn thread_count(value: &str) -> Result<usize, String> {
    match value.parse() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be from 1 to {MAX_THREADS}")),
        Err(e) => Err(format!("{e}")),
    }
}

fn octal_mode(value: &str) -> Result<u32, String> {
    let digits = value.strip_prefix("0o").unwrap_or(value);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{value:?} is not a file mode: octal permission bits such as 600 or 0660"
        )),
    }
}

fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{value:?}: expected on or off")),
    }
}

/// The most `--tls-ticket-lifetime` takes: 7 days, the most TLS 1.3 allows.
pub const MAX_TICKET_LIFETIME: u64 = 7 * 24 * 60 * 60;

fn ticket_lifetime(value: &str) -> Result<u64, String> {
    match value.parse() {
        Ok(n) if (1..=MAX_TICKET_LIFETIME).contains(&n) => Ok(n),
        Ok(_) => Err(format!(
            "must be from 1 to {MAX_TICKET_LIFETIME} seconds (7 days, the most TLS 1.3 allows)"
        )),
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
