//! The commands: each reads its arguments, works on the store and appends its reply, with the
//! error texts Redis 7 sends, so that clients and scripts that match on them keep working.

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::resp::{array, bulk, error_reply, integer, null, simple};
use crate::store::Store;

/// The largest reply one command may build (an `MGET` of many large values): past it the
/// command answers with an error instead, so that one request cannot make the server hold
/// gigabytes of reply.
pub const MAX_REPLY: usize = 64 * 1024 * 1024;

/// The commands this server knows, with Redis's arity: the number of arguments counting the
/// name, or at least that many when negative.
const COMMANDS: &[(&str, i32)] = &[
    ("ping", -1),
    ("echo", 2),
    ("get", 2),
    ("set", -3),
    ("del", -2),
    ("exists", -2),
    ("incr", 2),
    ("mget", -2),
    ("mset", -3),
    ("expire", 3),
    ("ttl", 2),
    ("dbsize", 1),
    ("flushdb", -1),
    ("select", 2),
    ("config", -2),
    ("command", -1),
    ("quit", -1),
];

/// One request's arguments, the command's name first: slices of the connection's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a> {
    pub buf: &'a [u8],
    pub ranges: &'a [Range<usize>],
}

impl<'a> Args<'a> {
    fn len(&self) -> usize {
        self.ranges.len()
    }

    fn get(&self, i: usize) -> &'a [u8] {
        &self.buf[self.ranges[i].clone()]
    }

    fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let buf = self.buf;
        self.ranges.iter().map(move |range| &buf[range.clone()])
    }
}

/// What the connection does after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Continue,
    /// Send the replies so far, then close (`QUIT`).
    Close,
}

/// Runs the command in `args` (at least one: the name) and appends its reply to `out`.
pub fn execute(store: &Store, args: Args<'_>, out: &mut Vec<u8>) -> After {
    let name = args.get(0);
    let Some(&(command, arity)) = COMMANDS
        .iter()
        .find(|(command, _)| name.eq_ignore_ascii_case(command.as_bytes()))
    else {
        unknown_command(args, out);
        return After::Continue;
    };
    let n = args.len() as i32;
    if (arity >= 0 && n != arity) || n < -arity {
        let message = format!("ERR wrong number of arguments for '{command}' command");
        error_reply(out, &message);
        return After::Continue;
    }
    match command {
        "ping" if n == 1 => simple(out, "PONG"),
        "ping" if n == 2 => bulk(out, args.get(1)),
        "ping" => error_reply(out, "ERR wrong number of arguments for 'ping' command"),
        "echo" => bulk(out, args.get(1)),
        "get" => match store.shard(args.get(1)).get(args.get(1)) {
            Some(entry) => bulk(out, &entry.value),
            None => null(out),
        },
        "set" => set(store, args, out),
        "del" => {
            let removed = args
                .iter()
                .skip(1)
                .filter(|key| store.shard(key).remove(key));
            integer(out, removed.count() as i64);
        }
        "exists" => {
            let found = args
                .iter()
                .skip(1)
                .filter(|key| store.shard(key).get(key).is_some());
            integer(out, found.count() as i64);
        }
        "incr" => incr(store, args.get(1), out),
        "mget" => mget(store, args, out),
        "mset" if n % 2 == 0 => {
            error_reply(out, "ERR wrong number of arguments for 'mset' command")
        }
        "mset" => {
            // Each key is set under its own shard's lock: unlike Redis's, this MSET is atomic
            // per key, not for the whole set (a reader may see some keys new and some old).
            for pair in args.ranges[1..].chunks(2) {
                let (key, value) = (&args.buf[pair[0].clone()], &args.buf[pair[1].clone()]);
                store.shard(key).set(key, value, None);
            }
            simple(out, "OK");
        }
        "expire" => expire(store, args, out),
        "ttl" => ttl(store, args.get(1), out),
        "dbsize" => integer(out, store.len() as i64),
        "flushdb" => {
            store.clear();
            simple(out, "OK");
        }
        "select" if args.get(1) == b"0" => simple(out, "OK"),
        "select" => error_reply(out, "ERR DB index is out of range"),
        "config" => config(args, out),
        "command" => command_info(args, out),
        "quit" => {
            simple(out, "OK");
            return After::Close;
        }
        _ => unreachable!("every name in COMMANDS has an arm"),
    }
    After::Continue
}

/// `SET key value [NX | XX] [EX seconds | PX milliseconds | KEEPTTL]`.
fn set(store: &Store, args: Args<'_>, out: &mut Vec<u8>) {
    let (key, value) = (args.get(1), args.get(2));
    let (mut only_if_absent, mut only_if_present, mut keep_ttl) = (false, false, false);
    let mut expires_at = None;
    let mut i = 3;
    while i < args.len() {
        let option = args.get(i).to_ascii_uppercase();
        let next = (i + 1 < args.len()).then(|| args.get(i + 1));
        match (option.as_slice(), next) {
            (b"NX", _) if !only_if_present => only_if_absent = true,
            (b"XX", _) if !only_if_absent => only_if_present = true,
            (b"KEEPTTL", _) if expires_at.is_none() => keep_ttl = true,
            (unit @ (b"EX" | b"PX"), Some(amount)) if expires_at.is_none() && !keep_ttl => {
                let Some(amount) = parse_integer(amount) else {
                    return error_reply(out, "ERR value is not an integer or out of range");
                };
                let millis = if unit == b"EX" {
                    amount.checked_mul(1000)
                } else {
                    Some(amount)
                };
                match millis.filter(|&ms| ms > 0).and_then(deadline) {
                    Some(at) => expires_at = Some(at),
                    None => return error_reply(out, "ERR invalid expire time in 'set' command"),
                }
                i += 1;
            }
            _ => return error_reply(out, "ERR syntax error"),
        }
        i += 1;
    }
    let mut shard = store.shard(key);
    let existing = shard.get(key);
    if (only_if_absent && existing.is_some()) || (only_if_present && existing.is_none()) {
        return null(out);
    }
    if keep_ttl {
        expires_at = existing.and_then(|entry| entry.expires_at);
    }
    shard.set(key, value, expires_at);
    simple(out, "OK");
}

/// `INCR key`: a missing key counts as 0; the expiry, if any, stays.
fn incr(store: &Store, key: &[u8], out: &mut Vec<u8>) {
    let mut shard = store.shard(key);
    let Some(entry) = shard.get(key) else {
        shard.set(key, b"1", None);
        return integer(out, 1);
    };
    let Some(n) = parse_integer(&entry.value) else {
        return error_reply(out, "ERR value is not an integer or out of range");
    };
    let Some(n) = n.checked_add(1) else {
        return error_reply(out, "ERR increment or decrement would overflow");
    };
    entry.value.clear();
    entry.value.extend_from_slice(n.to_string().as_bytes());
    integer(out, n);
}

/// `MGET key [key ...]`, within [`MAX_REPLY`].
fn mget(store: &Store, args: Args<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    array(out, args.len() - 1);
    for key in args.iter().skip(1) {
        match store.shard(key).get(key) {
            Some(entry) => bulk(out, &entry.value),
            None => null(out),
        }
        if out.len() - start > MAX_REPLY {
            out.truncate(start);
            return error_reply(out, "ERR reply too large: fetch fewer keys at a time");
        }
    }
}

/// `EXPIRE key seconds`: a time not in the future removes the key, as in Redis.
fn expire(store: &Store, args: Args<'_>, out: &mut Vec<u8>) {
    let key = args.get(1);
    let Some(seconds) = parse_integer(args.get(2)) else {
        return error_reply(out, "ERR value is not an integer or out of range");
    };
    let mut shard = store.shard(key);
    let done = if seconds <= 0 {
        shard.remove(key)
    } else {
        let Some(at) = seconds.checked_mul(1000).and_then(deadline) else {
            return error_reply(out, "ERR invalid expire time in 'expire' command");
        };
        shard.set_expiry(key, Some(at))
    };
    integer(out, done as i64);
}

/// `TTL key`: seconds left, rounded; -1 for a key without an expiry, -2 for no key.
fn ttl(store: &Store, key: &[u8], out: &mut Vec<u8>) {
    let reply = match store.shard(key).get(key) {
        None => -2,
        Some(entry) => match entry.expires_at {
            None => -1,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now()).as_millis();
                ((left + 500) / 1000) as i64
            }
        },
    };
    integer(out, reply);
}

/// `CONFIG GET save` and `CONFIG GET appendonly`, which redis-benchmark asks for (and warns
/// without); nothing else is configurable.
fn config(args: Args<'_>, out: &mut Vec<u8>) {
    if !args.get(1).eq_ignore_ascii_case(b"get") || args.len() != 3 {
        return error_reply(
            out,
            "ERR only CONFIG GET save and CONFIG GET appendonly are served",
        );
    }
    let parameter = args.get(2).to_ascii_lowercase();
    let value: &[u8] = match parameter.as_slice() {
        b"save" => b"", // no snapshots: everything is in memory only
        b"appendonly" => b"no",
        _ => return array(out, 0),
    };
    array(out, 2);
    bulk(out, &parameter);
    bulk(out, value);
}

/// `COMMAND COUNT`, and an empty list for the rest: `COMMAND DOCS`, which redis-cli 7 asks for
/// at start (for its hints), accepts an empty one.
fn command_info(args: Args<'_>, out: &mut Vec<u8>) {
    if args.len() == 2 && args.get(1).eq_ignore_ascii_case(b"count") {
        integer(out, COMMANDS.len() as i64);
    } else {
        array(out, 0);
    }
}

/// Redis 7's reply to an unknown command, with the start of its arguments.
fn unknown_command(args: Args<'_>, out: &mut Vec<u8>) {
    let quote = |bytes: &[u8], max: usize| {
        String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
    };
    let mut start = String::new();
    for arg in args.iter().skip(1) {
        if start.len() >= 128 {
            break;
        }
        start += &format!("'{}' ", quote(arg, 128 - start.len()));
    }
    let name = quote(args.get(0), 128);
    let message = format!("ERR unknown command '{name}', with args beginning with: {start}");
    error_reply(out, &message);
}

/// An integer as Redis reads one: optional `-`, digits, no `+`, no leading zeros, in i64.
fn parse_integer(bytes: &[u8]) -> Option<i64> {
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let canonical = digits == b"0" && bytes.len() == 1
        || digits.first().is_some_and(|d| (b'1'..=b'9').contains(d));
    if !canonical || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// The instant `millis` from now, if it can be represented.
fn deadline(millis: i64) -> Option<Instant> {
    Instant::now().checked_add(Duration::from_millis(u64::try_from(millis).ok()?))
}
