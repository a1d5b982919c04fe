//! A key-value server that speaks enough of the Redis protocol (RESP2) for `redis-cli`,
//! `redis-benchmark` and client libraries: `PING`, `ECHO`, `GET`, `SET` (with `EX`, `PX`, `NX`,
//! `XX`, `KEEPTTL`), `DEL`, `EXISTS`, `INCR`, `MGET`, `MSET`, `EXPIRE`, `TTL`, `DBSIZE`,
//! `FLUSHDB`, `SELECT 0`, `COMMAND`, `CONFIG GET`, `QUIT`. Shows a real protocol on the library:
//! state shared by tasks on every worker thread (`store.rs`: a lock per shard), pipelined
//! requests answered in one write, backpressure on clients that do not read, and a parser
//! (`resp.rs`) that bounds what any input can make the server hold.
//!
//! ```text
//! cargo run --release --example kv                   # listens on 127.0.0.1:25005
//! cargo run --release --example kv -- --threads 4 --port 6380 --unix /tmp/kv.sock
//! cargo run --release --example kv -- --tls-cert cert.pem --tls-key key.pem   # TLS on --port
//! redis-cli -p 25005 set greeting hello              # in another terminal
//! redis-cli -p 25005 get greeting
//! redis-benchmark -p 25005 -t set,get -q
//! ```
//!
//! Everything is in memory only: nothing is saved, as `redis-server --save ''`. The library's
//! default idle timeout applies: a client silent for 300 seconds is disconnected (redis-cli
//! reconnects by itself). `--help` lists the flags.
//!
//! Copied into a crate of your own (this file as `src/main.rs`, beside `commands.rs`,
//! `resp.rs` and `store.rs`), it needs these beside `taskserve`:
//!
//! ```toml
//! [dependencies]
//! argh = "0.1"  # the flags
//! env_logger = { version = "0.11", default-features = false }  # the log on stderr
//! ```

mod commands;
mod resp;
mod store;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use argh::FromArgs;
use taskserve::io::{self, AsyncReadExt, AsyncWriteExt};
use taskserve::{Connection, TlsConfig};

use commands::{execute, After, Args};
use resp::{Parser, MAX_REQUEST};
use store::Store;

/// Bytes read at once, and what an idle client's buffer keeps: Redis's 16 KiB.
const READ_SIZE: usize = 16 * 1024;
/// Replies held before they are sent even if more requests are waiting: a client that sends
/// requests and never reads the replies stops being read once this much waits for it.
const MAX_UNSENT: usize = 1024 * 1024;
/// Batches of requests answered in a row before the task lets others run on its thread.
const BATCHES_BEFORE_YIELD: u32 = 16;

/// A Redis-compatible key-value server on taskserve.
#[derive(FromArgs)]
struct Flags {
    /// TCP port to listen on; 0 picks a free one (default 25005)
    #[argh(option, default = "25005")]
    port: u16,
    /// address to listen on (default 127.0.0.1, this machine only)
    #[argh(option, default = "String::from(\"127.0.0.1\")")]
    host: String,
    /// worker threads (default: the number of CPUs)
    #[argh(option)]
    threads: Option<usize>,
    /// shards of the store, each with its own lock (default 64; 1 is a single locked map)
    #[argh(option, default = "64")]
    shards: usize,
    /// also listen on a Unix socket at this path
    #[argh(option)]
    unix: Option<PathBuf>,
    /// PEM file with the TLS certificate chain: with --tls-key, --port speaks TLS
    #[argh(option)]
    tls_cert: Option<PathBuf>,
    /// PEM file with the certificate's private key
    #[argh(option)]
    tls_key: Option<PathBuf>,
}

/// One client: reads what has arrived, answers every complete request in it with one write,
/// and reads again, until the client closes, sends `QUIT` or breaks the protocol.
async fn serve_client(store: Arc<Store>, mut conn: Connection) -> io::Result<()> {
    // `buf[..filled]` is what was read and not yet answered: the start of a request, if any.
    let (mut buf, mut filled) = (vec![0; READ_SIZE], 0);
    let (mut parser, mut out) = (Parser::default(), Vec::new());
    let mut batches = 0;
    loop {
        if filled == buf.len() {
            // A request larger than the buffer; the parser refuses any above MAX_REQUEST.
            buf.resize((buf.len() * 2).min(MAX_REQUEST + READ_SIZE), 0);
        }
        let n = conn.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(()); // the client closed its side
        }
        filled += n;
        let mut answered = 0;
        let after = loop {
            let request = &buf[answered..filled];
            match parser.parse(request) {
                Ok(Some(len)) => {
                    answered += len;
                    let (buf, ranges) = (&request[..len], parser.args());
                    // An empty request (`*0`, a blank line) gets no reply, as in Redis.
                    if !ranges.is_empty()
                        && execute(&store, Args { buf, ranges }, &mut out) == After::Close
                    {
                        break After::Close;
                    }
                    if out.len() >= MAX_UNSENT {
                        send(&mut conn, &mut out).await?;
                    }
                }
                Ok(None) => break After::Continue,
                Err(e) => {
                    resp::error_reply(&mut out, &format!("ERR Protocol error: {}", e.0));
                    break After::Close;
                }
            }
        };
        send(&mut conn, &mut out).await?;
        if after == After::Close {
            return conn.close().await;
        }
        // Keep the incomplete request, at the front.
        buf.copy_within(answered..filled, 0);
        filled -= answered;
        if buf.len() > READ_SIZE && filled < READ_SIZE {
            buf.truncate(READ_SIZE); // after a large request, an idle client holds 16 KiB again
            buf.shrink_to_fit();
        }
        batches += 1;
        if batches % BATCHES_BEFORE_YIELD == 0 {
            YieldNow(false).await;
        }
    }
}

/// Writes the replies in `out`, all at once, and empties it.
async fn send(conn: &mut Connection, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    conn.write_all(out).await?;
    conn.flush().await?; // TLS holds written bytes until flushed
    out.clear();
    Ok(())
}

/// Lets the other tasks of this thread run before continuing: a client that keeps its
/// requests flowing would otherwise keep its worker thread to itself.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn run(flags: Flags) -> io::Result<()> {
    let store = Arc::new(Store::new(flags.shards));
    // An expired key no client asks for again lingers at most a second.
    store::sweep_expired(&store, Duration::from_secs(1))?;
    let mut builder = taskserve::Server::builder().stop_on_signals(true);
    if let Some(threads) = flags.threads {
        builder = builder.threads(threads);
    }
    let addr = format!("{}:{}", flags.host, flags.port);
    builder = match (&flags.tls_cert, &flags.tls_key) {
        (Some(cert), Some(key)) => builder.listen_tls(addr, TlsConfig::from_pem_files(cert, key)?),
        (None, None) => builder.listen_tcp(addr),
        _ => return Err(io::Error::other("--tls-cert and --tls-key go together")),
    };
    if let Some(path) = &flags.unix {
        builder = builder.listen_unix(path);
    }
    let server = builder.start(move |conn| serve_client(Arc::clone(&store), conn))?;
    for (addr, transport) in server.local_addrs() {
        println!("listening on {addr} ({transport})");
    }
    server.wait();
    Ok(())
}

fn main() -> ExitCode {
    let flags: Flags = argh::from_env();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run(flags) {
        eprintln!("kv: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
