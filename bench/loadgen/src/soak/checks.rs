//! The soak's verdict, once every client is gone:
//! - bytes: every payload byte a well-behaved client sent came back as it was sent, and no
//!   well-behaved session failed;
//! - faults: each misbehaving client met the outcome the server promises (closed in time);
//! - counts: the server has no connection open, its counts add up (accepted equals refused
//!   plus open plus closed, by reason), none ended in a panic, it accepted exactly the
//!   connections the clients made, no scrape failed and no counter went down;
//! - resources: the server's RSS and open descriptors are within 5 % (RSS: or 1 MiB) of their
//!   level after the warm-up (the first sample after 15 % of the run, and at least 10 s in,
//!   when memory has grown to what the load needs), its descriptors back to their level
//!   before the load, and its threads as many as before.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{json, Value};

use super::watch::{Metrics, Sample, HEADER};
use super::Soak;
use crate::Opts;

/// How far above its warm-up level RSS or descriptors may end: 5 %, and for RSS at least
/// 1 MiB, as the allocator's holdings move by half a MiB from one sample to the next under
/// this load (a leak of 16 bytes a connection would pass it within 70,000 connections).
const TOLERANCE: f64 = 0.05;
const RSS_SLACK_KIB: u64 = 1024;
/// The warm-up: this share of the run, and at least 10 s.
const WARM_UP_SHARE: f64 = 0.15;
const WARM_UP_MIN_SECS: f64 = 10.0;

pub fn verdict(o: &Opts, soak: &Soak, samples: &[Sample], last: Result<Metrics, String>) -> Value {
    let mut failures = Vec::new();
    let bytes = bytes(soak, &mut failures);
    let faults = soak.tally.faults.lock().unwrap();
    if faults.unexpected() > 0 {
        failures.push(format!(
            "{} of {} misbehaving clients met an unexpected outcome (see faults)",
            faults.unexpected(),
            faults.attempts()
        ));
    }
    let counts = match last {
        Ok(metrics) => counts(soak, &metrics, &mut failures),
        Err(e) => {
            failures.push(format!("the last scrape failed: {e}"));
            json!(null)
        }
    };
    let resources = resources(o, samples, &mut failures);
    summary_table(samples, warm_up(o, samples));
    for failure in &failures {
        eprintln!("soak: FAILED: {failure}");
    }
    if failures.is_empty() {
        eprintln!("soak: passed");
    }
    json!({
        "mode": "soak",
        "duration_s": o.duration.as_secs_f64(),
        "bytes": bytes,
        "faults": faults.json(),
        "counts": counts,
        "resources": resources,
        "failures": failures,
        "ok": failures.is_empty(),
    })
}

fn bytes(soak: &Soak, failures: &mut Vec<String>) -> Value {
    let t = &soak.tally;
    let (sent, verified) = (t.sent.load(Relaxed), t.verified.load(Relaxed));
    let errors = t.errors.lock().unwrap();
    if errors.total() > 0 {
        failures.push(format!(
            "{} well-behaved sessions failed: {}",
            errors.total(),
            errors.json()
        ));
    }
    if sent != verified {
        failures.push(format!(
            "{} of {sent} payload bytes sent did not come back",
            sent - verified
        ));
    }
    json!({
        "sessions": t.sessions.load(Relaxed),
        "sent": sent,
        "checked": verified,
        "lost": sent - verified,
        "errors": errors.json(),
    })
}

fn counts(soak: &Soak, m: &Metrics, failures: &mut Vec<String>) -> Value {
    let (accepted, refused, open, closed) = (m.accepted(), m.refused(), m.open(), m.closed());
    let connects = soak.tally.connects.load(Relaxed);
    if open != 0 {
        failures.push(format!(
            "{open} connections still open {:?} after the last client",
            soak.close_limit
        ));
    }
    if accepted != refused + open + closed {
        failures.push(format!(
            "accepted {accepted} != refused {refused} + open {open} + closed {closed}"
        ));
    }
    let panics = m
        .by_label("taskserve_connections_closed_total")
        .get("handler_panic")
        .copied();
    if panics.unwrap_or(0) > 0 {
        failures.push(format!(
            "{} connections ended in a panic",
            panics.unwrap_or(0)
        ));
    }
    if accepted != connects {
        failures.push(format!(
            "the clients made {connects} connections, the server accepted {accepted}"
        ));
    }
    let scrapes = soak.scrapes.lock().unwrap();
    if scrapes.failed > 0 {
        failures.push(format!(
            "{} of {} scrapes failed, the first: {}",
            scrapes.failed,
            scrapes.failed + scrapes.ok,
            scrapes.first_failure.as_deref().unwrap_or("?")
        ));
    }
    if let Some(first) = scrapes.went_down.first() {
        failures.push(format!("a counter went down: {first}"));
    }
    json!({
        "connects": connects,
        "accepted": accepted,
        "refused": m.by_label("taskserve_connections_refused_total"),
        "open": open,
        "closed": m.by_label("taskserve_connections_closed_total"),
        "scrapes": scrapes.ok,
        "scrapes_failed": scrapes.failed,
    })
}

/// The index in `samples` (idle first, end last) of the warm-up sample, if the run was long
/// enough to have one under load.
fn warm_up(o: &Opts, samples: &[Sample]) -> Option<usize> {
    let from = (o.duration.as_secs_f64() * WARM_UP_SHARE).max(WARM_UP_MIN_SECS);
    let loaded = 1..samples.len().saturating_sub(1);
    loaded.into_iter().find(|&i| samples[i].secs >= from)
}

fn resources(o: &Opts, samples: &[Sample], failures: &mut Vec<String>) -> Value {
    let (idle, end) = (&samples[0], &samples[samples.len() - 1]);
    if end.threads != idle.threads {
        failures.push(format!(
            "threads: {} before the load, {} after",
            idle.threads, end.threads
        ));
    }
    if end.fds > idle.fds {
        failures.push(format!(
            "descriptors: {} before the load, {} after: {} left behind",
            idle.fds,
            end.fds,
            end.fds - idle.fds
        ));
    }
    let Some(warm) = warm_up(o, samples).map(|i| &samples[i]) else {
        failures.push("no sample after the warm-up: run for 60 s at least".into());
        return json!(null);
    };
    let rss_allowed = warm.rss_kib + ((warm.rss_kib as f64 * TOLERANCE) as u64).max(RSS_SLACK_KIB);
    let fds_allowed = (warm.fds as f64 * (1.0 + TOLERANCE)) as u64;
    for (what, at_warm, at_end, allowed) in [
        ("RSS (KiB)", warm.rss_kib, end.rss_kib, rss_allowed),
        ("descriptors", warm.fds, end.fds, fds_allowed),
    ] {
        if at_end > allowed {
            failures.push(format!(
                "{what}: {at_warm} after the warm-up ({:.0} s), {at_end} at the end, over {allowed}",
                warm.secs,
            ));
        }
    }
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    json!({
        "warm_up_s": warm.secs,
        "rss_kib": {"idle": idle.rss_kib, "warm_up": warm.rss_kib, "peak": peak, "end": end.rss_kib},
        "fds": {"idle": idle.fds, "warm_up": warm.fds, "end": end.fds},
        "threads": {"idle": idle.threads, "end": end.threads},
    })
}

/// The table again, shortened for a page: before the load, the warm-up, about ten rows in
/// between, the last under load, and after.
fn summary_table(samples: &[Sample], warm: Option<usize>) {
    let step = (samples.len() / 10).max(1);
    println!("\nsummary (warm-up: row marked w):\n{HEADER}");
    for (i, s) in samples.iter().enumerate() {
        let keep = i == 0 || i + 2 >= samples.len() || i % step == 0 || Some(i) == warm;
        if keep {
            let mark = if Some(i) == warm { " w" } else { "" };
            println!("{}{mark}", s.row());
        }
    }
}
