//! What the closed-loop modes (pingpong, churn) share: the measured window after
//! the warm-up, the latency histograms of the client tasks, the CPU time used in
//! the window, and the report built from them. A mode supplies only its client
//! loop and the keys that are its own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::procfs::{cpu_times, CpuTimes};
use crate::proto::{Errors, PERIOD};
use crate::Opts;

/// How long past the end a reply may still take before it counts as lost.
pub const GRACE: Duration = Duration::from_secs(5);

/// The measured part of a run: from the end of the warm-up to the deadline.
pub struct Window {
    pub from: Instant,
    pub to: Instant,
}

impl Window {
    /// The messages one client sends in turn, with the instant each starts,
    /// until the window has ended. Message `i` (counting from `first`) is `size`
    /// bytes from offset `i % PERIOD` of `pattern`, so that a reply to an earlier
    /// message cannot pass for this one, and clients start at other offsets.
    pub fn messages<'a>(
        &'a self,
        pattern: &'a [u8],
        size: usize,
        first: usize,
    ) -> impl Iterator<Item = (Instant, &'a [u8])> + 'a {
        (first..)
            .map(|i| (Instant::now(), i))
            .take_while(move |&(start, _)| start < self.to)
            .map(move |(start, i)| (start, &pattern[i % PERIOD..][..size]))
    }

    /// Records the time from `start` to `end` (the reply is in) if the exchange
    /// started in the window and was done (at `done`, not before `end`) in it.
    pub fn record(
        &self,
        latency_us: &mut Histogram<u64>,
        start: Instant,
        end: Instant,
        done: Instant,
    ) {
        if start >= self.from && done <= self.to {
            latency_us.saturating_record((end - start).as_micros() as u64);
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

type Cpu = (Option<CpuTimes>, Option<CpuTimes>);

/// A run under way: the window, the CPU sampler and the client tasks.
pub struct Measurement {
    window: Arc<Window>,
    cpu: JoinHandle<Cpu>,
    clients: JoinSet<(Histogram<u64>, Errors)>,
}

impl Measurement {
    /// Starts the warm-up now, and the CPU sampler for the window after it.
    pub fn start(o: &Opts) -> Measurement {
        let from = Instant::now() + o.warmup;
        let window = Arc::new(Window {
            from,
            to: from + o.duration,
        });
        Measurement {
            cpu: tokio::spawn(cpu_in_window(o.pid, window.clone())),
            window,
            clients: JoinSet::new(),
        }
    }

    pub fn window(&self) -> Arc<Window> {
        self.window.clone()
    }

    /// Runs a client task, which returns its latencies and its failures.
    pub fn spawn(
        &mut self,
        client: impl Future<Output = (Histogram<u64>, Errors)> + Send + 'static,
    ) {
        self.clients.spawn(client);
    }

    /// Waits for all the clients and the sampler; `errors` are the failures so far.
    pub async fn finish(mut self, mut errors: Errors) -> Measured {
        let mut latency_us = new_histogram();
        while let Some(r) = self.clients.join_next().await {
            let (h, e) = r.expect("client task panicked");
            latency_us.add(&h).expect("same bounds");
            errors.merge(e);
        }
        let (server_cpu, client_cpu) = self.cpu.await.expect("sampler panicked");
        Measured {
            latency_us,
            errors,
            server_cpu,
            client_cpu,
        }
    }
}

/// CPU time the server (`pid`) and this client used during the window.
async fn cpu_in_window(pid: Option<u32>, window: Arc<Window>) -> Cpu {
    let sample = || (pid.and_then(cpu_times), cpu_times(std::process::id()));
    tokio::time::sleep_until(window.from).await;
    let (server, client) = sample();
    tokio::time::sleep_until(window.to).await;
    let (server_end, client_end) = sample();
    (
        server_end.zip(server).map(|(b, a)| b - a),
        client_end.zip(client).map(|(b, a)| b - a),
    )
}

/// What a mode counts in its window: requests, connections.
pub struct Unit {
    /// The key of the count, as "requests".
    pub count: &'static str,
    /// The key of the count per second, as "req_per_s".
    pub rate: &'static str,
    /// How the CPU keys name one, as "req" in "us_per_req".
    pub each: &'static str,
}

pub struct Measured {
    /// One entry per request or connection counted.
    pub latency_us: Histogram<u64>,
    pub errors: Errors,
    server_cpu: Option<CpuTimes>,
    client_cpu: Option<CpuTimes>,
}

impl Measured {
    /// The report, keys in this order: the mode and the settings every mode has,
    /// then `settings`; the count and its rate in `unit`, then `rates`; latency,
    /// CPU and errors.
    pub fn report(
        &self,
        o: &Opts,
        mode: &str,
        settings: impl IntoIterator<Item = (&'static str, Value)>,
        unit: Unit,
        rates: impl IntoIterator<Item = (&'static str, Value)>,
    ) -> Value {
        let secs = o.duration.as_secs_f64();
        let n = self.latency_us.len();
        let each = |x: f64| (n > 0).then(|| x / n as f64);
        let per = |key: &str| format!("{key}_per_{}", unit.each);
        let h = &self.latency_us;
        let mut r = Map::new();
        let mut put = |key: &str, v: Value| {
            r.insert(key.to_string(), v);
        };
        put("mode", json!(mode));
        put("addr", json!(o.addr.to_string()));
        put("connections", json!(o.connections));
        put("size", json!(o.size));
        settings.into_iter().for_each(|(k, v)| put(k, v));
        put("duration_s", json!(secs));
        put("warmup_s", json!(o.warmup.as_secs_f64()));
        put("client_threads", json!(o.threads));
        put("tls", json!(o.tls.as_ref().map(|t| t.json())));
        put(unit.count, json!(n));
        put(unit.rate, json!(n as f64 / secs));
        rates.into_iter().for_each(|(k, v)| put(k, v));
        put(
            "latency_us",
            json!({
                "p50": h.value_at_quantile(0.50),
                "p90": h.value_at_quantile(0.90),
                "p99": h.value_at_quantile(0.99),
                "p99_9": h.value_at_quantile(0.999),
                "max": h.max(),
                "mean": h.mean(),
            }),
        );
        // CPU used in the measured window, in cores (1.0 = one core busy), and per
        // request or connection: on a small machine the client may saturate first,
        // but CPU per request still compares servers, and its user part is the
        // server's own code. Context switches count all threads: a thread that
        // waits and is woken again costs a voluntary switch; one preempted while it
        // could run, an involuntary one.
        let server_cpu = |c: &CpuTimes| {
            let mut v = Map::new();
            v.insert("cores".into(), json!((c.user + c.system) / secs));
            v.insert(per("us"), json!(each((c.user + c.system) * 1e6)));
            v.insert(per("user_us"), json!(each(c.user * 1e6)));
            v.insert(per("voluntary_switches"), json!(each(c.voluntary_switches)));
            v.insert(
                per("involuntary_switches"),
                json!(each(c.involuntary_switches)),
            );
            Value::Object(v)
        };
        put(
            "server_cpu",
            json!(self.server_cpu.as_ref().map(server_cpu)),
        );
        put(
            "client_cpu_cores",
            json!(self.client_cpu.map(|c| (c.user + c.system) / secs)),
        );
        put("errors", self.errors.json());
        Value::Object(r)
    }
}
