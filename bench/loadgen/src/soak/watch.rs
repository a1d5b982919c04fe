//! Watching the server while the soak runs: its metrics endpoint scraped every second, its
//! memory, descriptors and threads sampled every 10 s and printed as a table row each, and,
//! once the clients are gone, the wait for its last connection to close.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

use super::Soak;
use crate::procfs::{load_average, open_fds, rss_kib, threads};

const SCRAPE_EVERY: Duration = Duration::from_secs(1);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The longest one scrape may take.
const SCRAPE_LIMIT: Duration = Duration::from_secs(5);

/// One scrape: every sample line of the Prometheus text, `name{labels}` to value.
#[derive(Clone, Default)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    /// The sum of every series of `name` (all its labels).
    pub fn sum(&self, name: &str) -> u64 {
        let series = |key: &String| key == name || key.starts_with(&format!("{name}{{"));
        self.0
            .iter()
            .filter(|(key, _)| series(key))
            .map(|(_, v)| *v as u64)
            .sum()
    }

    /// Each series of `name` by its label's value: `{reason="idle_timeout"}` → `idle_timeout`.
    pub fn by_label(&self, name: &str) -> BTreeMap<String, u64> {
        let prefix = format!("{name}{{");
        self.0
            .iter()
            .filter_map(|(key, v)| {
                let labels = key.strip_prefix(&prefix)?.strip_suffix('}')?;
                let value = labels.split_once('=')?.1.trim_matches('"');
                Some((value.to_string(), *v as u64))
            })
            .collect()
    }

    pub fn accepted(&self) -> u64 {
        self.sum("taskserve_connections_accepted_total")
    }

    pub fn open(&self) -> u64 {
        self.sum("taskserve_connections_open")
    }

    pub fn closed(&self) -> u64 {
        self.sum("taskserve_connections_closed_total")
    }

    pub fn refused(&self) -> u64 {
        self.sum("taskserve_connections_refused_total")
    }
}

/// What the scraper saw.
#[derive(Default)]
pub struct Scrapes {
    pub ok: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
    /// Counters that went down from one scrape to the next: they never may.
    pub went_down: Vec<String>,
    pub last: Option<Metrics>,
}

/// `GET /metrics` once, over a connection of its own.
pub async fn scrape(addr: SocketAddr) -> Result<Metrics, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    let answer = match timeout(SCRAPE_LIMIT, exchange).await {
        Ok(Ok(answer)) => String::from_utf8_lossy(&answer).into_owned(),
        Ok(Err(e)) => return Err(format!("scraping {addr}: {e}")),
        Err(_) => return Err(format!("scraping {addr}: no answer in {SCRAPE_LIMIT:?}")),
    };
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        return Err(format!("scraping {addr}: no end of head in {answer:?}"));
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!(
            "scraping {addr}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    let samples = body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        });
    Ok(Metrics(samples.collect()))
}

/// Scrapes every second until `stop`, as Prometheus would, keeping the last answer; checks
/// that no counter went down.
pub async fn scrape_every_second(addr: SocketAddr, soak: Arc<Soak>, stop: Arc<AtomicBool>) {
    while !stop.load(Relaxed) {
        let next = Instant::now() + SCRAPE_EVERY;
        let scraped = scrape(addr).await;
        record(&mut soak.scrapes.lock().unwrap(), scraped);
        tokio::time::sleep_until(next).await;
    }
}

fn record(scrapes: &mut Scrapes, scraped: Result<Metrics, String>) {
    match scraped {
        Ok(metrics) => {
            scrapes.ok += 1;
            if let Some(before) = &scrapes.last {
                let went_down = went_down(before, &metrics);
                scrapes.went_down.extend(went_down);
            }
            scrapes.last = Some(metrics);
        }
        Err(e) => {
            scrapes.failed += 1;
            scrapes.first_failure.get_or_insert(e);
        }
    }
}

/// The counters (`_total`) of `now` that are below their value in `before`.
fn went_down(before: &Metrics, now: &Metrics) -> Vec<String> {
    before
        .0
        .iter()
        .filter(|(key, _)| key.split('{').next().is_some_and(|n| n.ends_with("_total")))
        .filter(|(key, was)| now.0.get(*key).is_some_and(|is| is < was))
        .map(|(key, was)| format!("{key} went from {was} to {}", now.0[key]))
        .collect()
}

/// Once the clients are gone: waits until the server has no connection open (polling its
/// metrics), for at most `limit`; returns the last scrape.
pub async fn quiet(addr: SocketAddr, limit: Duration) -> Result<Metrics, String> {
    let give_up = Instant::now() + limit;
    loop {
        let metrics = scrape(addr).await?;
        if metrics.open() == 0 || Instant::now() >= give_up {
            return Ok(metrics);
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (5 s at most) until the server holds no more descriptors than `before`.
pub async fn descriptors_back(pid: u32, before: u64) {
    let give_up = Instant::now() + Duration::from_secs(5);
    while open_fds(pid).is_some_and(|fds| fds > before) && Instant::now() < give_up {
        sleep(Duration::from_millis(100)).await;
    }
}

/// The server's figures at one moment.
#[derive(Clone)]
pub struct Sample {
    pub secs: f64,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// From the last scrape.
    pub open: u64,
    pub accepted: u64,
    /// Well-behaved payload bytes checked so far, and fault attempts.
    pub verified: u64,
    pub faults: u64,
    pub load: f64,
}

pub const HEADER: &str = "\
| t (s) | RSS (MiB) | fds | threads | open | accepted | checked (MiB) | faults | load |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

impl Sample {
    /// A row of [`HEADER`]'s table.
    pub fn row(&self) -> String {
        format!(
            "| {:.0} | {:.1} | {} | {} | {} | {} | {:.0} | {} | {:.2} |",
            self.secs,
            self.rss_kib as f64 / 1024.0,
            self.fds,
            self.threads,
            self.open,
            self.accepted,
            self.verified as f64 / (1 << 20) as f64,
            self.faults,
            self.load,
        )
    }
}

/// The server's figures now; zeros for what cannot be read (a server that has exited).
pub fn sample(pid: u32, started: Instant, soak: &Soak) -> Sample {
    let last = soak
        .scrapes
        .lock()
        .unwrap()
        .last
        .clone()
        .unwrap_or_default();
    Sample {
        secs: started.elapsed().as_secs_f64(),
        rss_kib: rss_kib(pid).unwrap_or(0),
        fds: open_fds(pid).unwrap_or(0),
        threads: threads(pid).unwrap_or(0),
        open: last.open(),
        accepted: last.accepted(),
        verified: soak.tally.verified.load(Relaxed),
        faults: soak.tally.faults.lock().unwrap().attempts(),
        load: load_average().unwrap_or(0.0),
    }
}

/// Samples every 10 s until `stop`, printing a row for each; returns them.
pub async fn sample_every_10s(
    pid: u32,
    started: Instant,
    soak: Arc<Soak>,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut next = started + SAMPLE_EVERY;
    loop {
        // Short sleeps, so that the end of the load is seen within a second.
        while Instant::now() < next {
            if stop.load(Relaxed) {
                return samples;
            }
            sleep(Duration::from_millis(250).min(next - Instant::now())).await;
        }
        let sample = sample(pid, started, &soak);
        println!("{}", sample.row());
        samples.push(sample);
        next += SAMPLE_EVERY;
    }
}
