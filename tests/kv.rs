//! examples/kv, the Redis-compatible server, as its clients see it: RESP conversations over a
//! raw socket with byte-exact replies, malformed and oversized input, a client that never
//! reads, its parser under random input, and (ignored unless Debian's redis-tools is installed:
//! `bash .ci/run` installs it) redis-cli and redis-benchmark themselves.

mod common;
#[allow(dead_code)] // the parser's reply writers are the example's business
#[path = "../examples/kv/resp.rs"]
mod resp;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::{connect, exchange, read_to_close, timed_out, EchoProcess, TempDir};

/// The example's binary, built once for all the tests of this file (`cargo test` builds
/// examples only when it runs every test target), with the profile the tests were built with.
fn kv_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            // target/{profile}/deps/kv-HASH
            let exe = std::env::current_exe().expect("the test's own path");
            let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
            let mut cargo = Command::new(env!("CARGO"));
            cargo.args(["build", "--example", "kv", "--quiet"]);
            if profile.ends_with("release") {
                cargo.arg("--release");
            }
            let status = cargo
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build --example kv");
            assert!(status.success(), "cargo build --example kv failed");
            profile.join("examples").join("kv")
        })
        .clone()
}

/// Starts the example on port 0 with `args`, logging only warnings (its stderr is a pipe that
/// nobody reads).
fn start_kv(args: &[&str]) -> EchoProcess {
    let mut command = Command::new(kv_binary());
    command.env("RUST_LOG", "warn");
    EchoProcess::start_with(command, &[&["--threads", "2"], args].concat())
}

/// A request as clients send it: an array of bulk strings.
fn request(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn ask(client: &mut TcpStream, args: &[&str], reply: &str) {
    let args: Vec<&[u8]> = args.iter().map(|arg| arg.as_bytes()).collect();
    exchange(client, &request(&args), reply.as_bytes());
}

#[test]
fn answers_each_command_as_redis_does() {
    let kv = start_kv(&[]);
    let mut client = connect(kv.addr);
    ask(&mut client, &["PING"], "+PONG\r\n");
    ask(&mut client, &["ping", "hi"], "$2\r\nhi\r\n");
    ask(&mut client, &["ECHO", "a\r\nb"], "$4\r\na\r\nb\r\n");
    ask(&mut client, &["GET", "k"], "$-1\r\n");
    ask(&mut client, &["SET", "k", "v"], "+OK\r\n");
    ask(&mut client, &["GET", "k"], "$1\r\nv\r\n");
    ask(&mut client, &["SET", "k", "w", "NX"], "$-1\r\n");
    ask(&mut client, &["SET", "new", "w", "XX"], "$-1\r\n");
    ask(&mut client, &["INCR", "n"], ":1\r\n");
    ask(&mut client, &["INCR", "n"], ":2\r\n");
    ask(
        &mut client,
        &["INCR", "k"],
        "-ERR value is not an integer or out of range\r\n",
    );
    ask(
        &mut client,
        &["SET", "max", "9223372036854775807"],
        "+OK\r\n",
    );
    let overflow = "-ERR increment or decrement would overflow\r\n";
    ask(&mut client, &["INCR", "max"], overflow);
    ask(&mut client, &["MSET", "a", "1", "b", "2"], "+OK\r\n");
    let mget = "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n";
    ask(&mut client, &["MGET", "a", "nope", "b"], mget);
    ask(&mut client, &["EXISTS", "a", "b", "nope", "a"], ":3\r\n");
    ask(&mut client, &["DEL", "a", "nope"], ":1\r\n");
    ask(&mut client, &["TTL", "k"], ":-1\r\n");
    ask(&mut client, &["TTL", "nope"], ":-2\r\n");
    ask(&mut client, &["EXPIRE", "k", "100"], ":1\r\n");
    ask(&mut client, &["TTL", "k"], ":100\r\n");
    ask(&mut client, &["EXPIRE", "nope", "100"], ":0\r\n");
    ask(&mut client, &["SET", "t", "v", "EX", "50"], "+OK\r\n");
    ask(&mut client, &["TTL", "t"], ":50\r\n");
    ask(&mut client, &["SET", "t", "v", "KEEPTTL"], "+OK\r\n");
    ask(&mut client, &["TTL", "t"], ":50\r\n");
    let bad_expiry = "-ERR invalid expire time in 'set' command\r\n";
    ask(&mut client, &["SET", "t", "v", "EX", "0"], bad_expiry);
    ask(
        &mut client,
        &["SET", "t", "v", "EX"],
        "-ERR syntax error\r\n",
    );
    ask(&mut client, &["DBSIZE"], ":5\r\n"); // k, n, max, b and t
    ask(&mut client, &["COMMAND", "DOCS"], "*0\r\n");
    let config = "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n";
    ask(&mut client, &["CONFIG", "GET", "appendonly"], config);
    let arity = "-ERR wrong number of arguments for 'get' command\r\n";
    ask(&mut client, &["GET"], arity);
    let unknown = "-ERR unknown command 'HSET', with args beginning with: 'h' 'f' \r\n";
    ask(&mut client, &["HSET", "h", "f"], unknown);
    ask(&mut client, &["FLUSHDB"], "+OK\r\n");
    ask(&mut client, &["DBSIZE"], ":0\r\n");
    ask(&mut client, &["QUIT"], "+OK\r\n");
    let (rest, _) = read_to_close(&mut client);
    assert!(rest.is_empty(), "after QUIT: {rest:?}");
}

#[test]
fn a_key_expires_after_its_time() {
    let kv = start_kv(&[]);
    let mut client = connect(kv.addr);
    ask(&mut client, &["SET", "k", "v", "PX", "50"], "+OK\r\n");
    // Polls the server, which says when: at most PATIENCE / 5 ms tries.
    assert!(common::eventually(|| {
        let mut probe = connect(kv.addr);
        probe.write_all(&request(&[b"EXISTS", b"k"])).unwrap();
        let mut reply = [0; 4];
        probe.read_exact(&mut reply).unwrap();
        &reply == b":0\r\n"
    }));
    ask(&mut client, &["GET", "k"], "$-1\r\n");
}

#[test]
fn answers_inline_commands_as_typed_into_nc() {
    let kv = start_kv(&[]);
    let mut client = connect(kv.addr);
    exchange(&mut client, b"PING\r\n", b"+PONG\r\n");
    exchange(&mut client, b"set  k \t hello\n", b"+OK\r\n");
    exchange(&mut client, b"\r\nget k\r\n", b"$5\r\nhello\r\n");
    // Empty requests, a blank line or an array of none, get no reply, as in Redis.
    exchange(&mut client, b"*0\r\n*-1\r\n\r\nPING\r\n", b"+PONG\r\n");
}

#[test]
fn answers_a_pipeline_in_order() {
    const COUNT: usize = 20_000;
    let kv = start_kv(&[]);
    let mut client = connect(kv.addr);
    let requests: Vec<u8> = (0..COUNT).flat_map(|_| request(&[b"INCR", b"n"])).collect();
    // From another thread: replies come back while the requests are still being sent.
    let mut writer = client.try_clone().unwrap();
    let sending = std::thread::spawn(move || writer.write_all(&requests));
    let expected: String = (1..=COUNT).map(|n| format!(":{n}\r\n")).collect();
    let mut replies = vec![0; expected.len()];
    client.read_exact(&mut replies).expect("every reply");
    assert!(replies == expected.as_bytes(), "replies out of order");
    sending.join().unwrap().expect("send the pipeline");
}

/// Input that is not RESP, and lengths beyond the limits: what Redis answers, then a close.
#[test]
fn a_protocol_error_is_answered_then_the_connection_closed() {
    let kv = start_kv(&[]);
    let cases: &[(&[u8], &str)] = &[
        (b"*1\r\n$2147483648\r\n", "invalid bulk length"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (b"*1\r\n$99999999999999999999999\r\n", "invalid bulk length"),
        (b"*1000000000\r\n", "invalid multibulk length"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1\r\n:1\r\n", "expected '$', got ':'"),
        (
            b"*1\r\n$3\r\nabcde\r\n",
            "expected CRLF after a bulk string",
        ),
        // 16 MiB and more, refused as soon as it is declared.
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$16777216\r\n",
            "request too big",
        ),
        (b"*1\r\n$100000000\r\n", "invalid bulk length"),
    ];
    for (input, error) in cases {
        let mut client = connect(kv.addr);
        // A request before the bad one is answered first.
        client.write_all(b"PING\r\n").unwrap();
        client.write_all(input).unwrap();
        let (reply, _) = read_to_close(&mut client);
        let expected = format!("+PONG\r\n-ERR Protocol error: {error}\r\n");
        assert_eq!(String::from_utf8_lossy(&reply), expected, "for {input:?}");
    }
}

/// Sends `head`, then `chunk` over and over, up to `total` bytes or until the server stops
/// taking them; returns what the server answered.
fn flood(kv: &EchoProcess, head: &[u8], chunk: &[u8], total: usize) -> Vec<u8> {
    let mut client = connect(kv.addr);
    let mut writer = client.try_clone().unwrap();
    writer.write_all(head).unwrap();
    let chunk = chunk.to_vec();
    let sending = std::thread::spawn(move || {
        for _ in 0..total / chunk.len() {
            // The server closes with our bytes unread, which resets the connection.
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply); // to the close, or the reset
    sending.join().unwrap();
    reply
}

#[test]
fn a_100_mb_request_is_refused_without_being_held() {
    let kv = start_kv(&[]);
    // One line of 100 MB: an inline request has 64 KiB at most.
    let reply = flood(&kv, b"", &[b'a'; 64 * 1024], 100_000_000);
    assert_eq!(reply, b"-ERR Protocol error: too big inline request\r\n");
    // 100,000 arguments of 1,000 bytes: each is fine, the sum is not.
    let argument = request(&[&[b'x'; 1000]]);
    let reply = flood(
        &kv,
        b"*100000\r\n",
        &argument[b"*1\r\n".len()..],
        100_000_000,
    );
    assert_eq!(reply, b"-ERR Protocol error: request too big\r\n");
    let rss_mib = kv.rss_kib() / 1024;
    assert!(rss_mib < 64, "the server holds {rss_mib} MiB");
}

#[test]
fn a_client_that_never_reads_its_replies_stops_being_read() {
    let kv = start_kv(&[]);
    let mut client = connect(kv.addr);
    let value = vec![b'v'; 1024 * 1024];
    client
        .write_all(&request(&[b"SET", b"big", &value]))
        .unwrap();
    let mut ok = [0; 5];
    client.read_exact(&mut ok).unwrap();
    // Each GET asks for 1 MiB: up to 3 million of them, 3 TB. The server sends a reply before it
    // answers the next request, so it stops reading once the socket buffers are full, and our
    // writes stop going through.
    client
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let gets: Vec<u8> = (0..1000).flat_map(|_| request(&[b"GET", b"big"])).collect();
    let mut blocked = None;
    for _ in 0..3000 {
        if let Err(e) = client.write_all(&gets) {
            blocked = Some(e);
            break;
        }
    }
    let blocked = blocked.expect("the server stopped reading");
    assert!(timed_out(&blocked), "{blocked}");
    let rss_mib = kv.rss_kib() / 1024;
    assert!(rss_mib < 32, "the server holds {rss_mib} MiB");
}

/// The parser on random requests, whole and cut into random pieces, and on mutated ones: it
/// never panics, never claims more bytes than it was given or arguments outside them, keeps
/// to its limits, and reads every valid request back exactly.
#[test]
fn the_parser_survives_random_and_mutated_input() {
    let mut rng = fastrand::Rng::with_seed(25);
    for round in 0..20_000 {
        let args: Vec<Vec<u8>> = (0..rng.usize(1..6))
            .map(|_| (0..rng.usize(0..40)).map(|_| rng.u8(..)).collect())
            .collect();
        let slices: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let mut input = request(&slices);
        input.extend_from_slice(&input.clone()); // two requests, back to back
        let mutated = round % 2 == 1;
        if mutated {
            for _ in 0..rng.usize(1..4) {
                if input.is_empty() {
                    break;
                }
                let at = rng.usize(..input.len());
                match rng.u8(0..4) {
                    0 => input[at] = rng.u8(..),
                    1 => input.insert(at, *rng.choice(b"*$\r\n-0123456789").unwrap()),
                    2 => drop(input.remove(at)),
                    _ => input.truncate(at),
                }
            }
        }
        // Feeds the input in random pieces, as reads would bring it.
        let (mut parser, mut start, mut fed, mut parsed) = (resp::Parser::default(), 0, 0, vec![]);
        while fed < input.len() {
            fed = (fed + rng.usize(1..=input.len())).min(input.len());
            loop {
                let buf = &input[start..fed];
                match parser.parse(buf) {
                    Ok(Some(len)) => {
                        assert!(len > 0 && len <= buf.len(), "length {len} of {}", buf.len());
                        let ranges = parser.args();
                        assert!(ranges.len() <= resp::MAX_ARGS);
                        assert!(ranges.iter().all(|range| range.end <= len));
                        let request: Vec<Vec<u8>> = ranges
                            .iter()
                            .map(|range| buf[range.clone()].to_vec())
                            .collect();
                        parsed.push(request);
                        start += len;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        assert!(mutated, "valid input refused: {e:?} on {input:?}");
                        fed = input.len();
                        break;
                    }
                }
            }
        }
        if !mutated {
            assert_eq!(parsed, [args.clone(), args], "round {round}");
        }
    }
}

// ---- With the real clients ----------------------------------------------------------------

const NEEDS_REDIS_TOOLS: &str = "needs redis-cli: bash .ci/run installs it";

/// Runs `program` with `args` and stdin from `input`; its output, which must be a success
/// within 10 minutes (redis-benchmark's 400,000 requests take minutes on a busy machine).
fn run(program: &str, args: &[&str], input: &[u8]) -> Output {
    let limit = Duration::from_secs(600);
    common::programs::run_to_success(program, args, input, limit, NEEDS_REDIS_TOOLS)
}

/// `redis-cli` against `kv` with `args`; what it printed.
fn redis_cli(kv: &EchoProcess, args: &[&str]) -> String {
    let port = kv.addr.port().to_string();
    let output = run("redis-cli", &[&["-p", &port], args].concat(), b"");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
#[ignore = "needs redis-cli: bash .ci/run installs it"]
fn redis_cli_sets_gets_increments_and_expires() {
    let kv = start_kv(&[]);
    assert_eq!(redis_cli(&kv, &["SET", "greeting", "hello"]), "OK\n");
    assert_eq!(redis_cli(&kv, &["GET", "greeting"]), "hello\n");
    assert_eq!(redis_cli(&kv, &["INCR", "visits"]), "1\n");
    assert_eq!(redis_cli(&kv, &["INCR", "visits"]), "2\n");
    assert_eq!(redis_cli(&kv, &["EXPIRE", "greeting", "60"]), "1\n");
    assert_eq!(redis_cli(&kv, &["TTL", "greeting"]), "60\n");
    assert_eq!(redis_cli(&kv, &["MGET", "greeting", "nope"]), "hello\n\n");
    let unknown = redis_cli(&kv, &["HGET", "h", "f"]);
    assert!(
        unknown.starts_with("ERR unknown command 'HGET'"),
        "{unknown}"
    );
    // Interactive redis-cli asks for COMMAND DOCS first; commands typed on stdin.
    let port = kv.addr.port().to_string();
    let typed = run("redis-cli", &["-p", &port], b"PING\nDBSIZE\n");
    assert_eq!(String::from_utf8_lossy(&typed.stdout), "PONG\n2\n");
}

#[test]
#[ignore = "needs redis-cli: bash .ci/run installs it"]
fn redis_cli_pipe_mass_inserts_100_000_keys() {
    let kv = start_kv(&[]);
    let input: Vec<u8> = (0..100_000)
        .flat_map(|i| request(&[b"SET", format!("key:{i}").as_bytes(), b"value"]))
        .collect();
    let port = kv.addr.port().to_string();
    let output = run("redis-cli", &["-p", &port, "--pipe"], &input);
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("errors: 0, replies: 100000"), "{report}");
    assert_eq!(redis_cli(&kv, &["DBSIZE"]), "100000\n");
}

#[test]
#[ignore = "needs redis-benchmark: bash .ci/run installs it"]
fn redis_benchmark_runs_without_errors() {
    let kv = start_kv(&[]);
    let port = kv.addr.port().to_string();
    let args = ["-p", &port, "-t", "ping,set,get,incr", "-n", "100000", "-q"];
    let output = run("redis-benchmark", &args, b"");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    // -q prints one line per test, the last update after a carriage return.
    for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"] {
        let line = stdout.split(['\r', '\n']).find(|line| {
            line.starts_with(&format!("{test}: ")) && line.contains("requests per second")
        });
        assert!(line.is_some(), "no result for {test}:\n{stdout}");
    }
    assert!(
        !stdout.contains("rror") && !stderr.contains("rror"),
        "{stdout}\n{stderr}"
    );
    assert_eq!(
        redis_cli(&kv, &["GET", "key:__rand_int__"]).len(),
        4,
        "SET's 3-byte value"
    );
}

#[test]
#[ignore = "needs redis-cli: bash .ci/run installs it"]
fn redis_cli_talks_over_a_unix_socket_and_tls() {
    let files = common::tls::TlsFiles::new();
    let ca = files.dir.join("ca.pem");
    std::fs::write(&ca, files.ca.cert_pem()).unwrap();
    let dir = TempDir::new();
    let socket = dir.join("kv.sock");
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let socket_arg = socket.to_str().unwrap();
    let kv = start_kv(&["--tls-cert", cert, "--tls-key", key, "--unix", socket_arg]);
    let port = kv.addr.port().to_string();
    let tls = [
        "--tls",
        "--cacert",
        ca.to_str().unwrap(),
        "-h",
        "localhost",
        "-p",
        &port,
    ];
    let set = run(
        "redis-cli",
        &[&tls[..], &["SET", "k", "over tls"]].concat(),
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&set.stdout), "OK\n");
    let get = run("redis-cli", &["-s", socket_arg, "GET", "k"], b"");
    assert_eq!(String::from_utf8_lossy(&get.stdout), "over tls\n");
}
