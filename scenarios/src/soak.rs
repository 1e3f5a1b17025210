//! `capif soak`: a steady [`load`](crate::load) against a testbed for a given time, sampling
//! every component's resident memory (`VmRSS`), threads (`Threads`, both from
//! `/proc/<pid>/status`) and open file descriptors (`/proc/<pid>/fd`) every few seconds. Once
//! warm (after the warm-up share of the run) it fits a least-squares slope per component and
//! fails when memory or descriptors grew beyond the stated bounds: a leak shows as growth under
//! a load that does not change.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::load::{self, Load};
use crate::testbed::Testbed;

/// What to run and where the bounds are.
#[derive(Clone, Debug)]
pub struct SoakOpts {
    /// How long the load runs.
    pub duration: Duration,
    /// Time between samples.
    pub sample_every: Duration,
    /// The share of the run before the process counts as warm, percent.
    pub warmup_pct: u32,
    /// Flows at once.
    pub concurrency: usize,
    /// Invokers per domain.
    pub invokers: u32,
    /// RSS may grow once warm by this much...
    pub max_rss_growth_mib: f64,
    /// ...or by this share of the warm RSS, percent, whichever is larger.
    pub max_rss_growth_pct: f64,
    /// Open fds may grow once warm by this many.
    pub max_fd_growth: i64,
    /// Share of flows that may fail (no fault is injected), percent.
    pub max_error_pct: f64,
    /// Seed of the load's choices.
    pub seed: u64,
}

impl Default for SoakOpts {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            sample_every: Duration::from_secs(5),
            warmup_pct: 20,
            concurrency: 4,
            invokers: 4,
            max_rss_growth_mib: 20.0,
            max_rss_growth_pct: 25.0,
            max_fd_growth: 16,
            max_error_pct: 1.0,
            seed: 1,
        }
    }
}

/// One sample of one process.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_secs: f64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Reads one sample of `pid` (`None`: it is gone).
pub fn sample(pid: u32, t_secs: f64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(Sample {
        t_secs,
        rss_kib: field("VmRSS:")?,
        threads: field("Threads:")?,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64,
    })
}

/// Least-squares slope of `y` over `x` (0 with fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// Start, end and maximum of one measure, and how it moved once warm.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    /// First sample.
    pub start: u64,
    /// Last sample.
    pub end: u64,
    /// Largest sample.
    pub max: u64,
    /// First warm sample.
    pub warm_start: u64,
    /// Last sample minus the first warm one.
    pub warm_growth: i64,
    /// Least-squares slope over the warm samples, per minute.
    pub slope_per_min: f64,
}

fn series(samples: &[Sample], warm_from: f64, f: impl Fn(&Sample) -> u64) -> Series {
    let warm: Vec<&Sample> = samples.iter().filter(|s| s.t_secs >= warm_from).collect();
    let warm = if warm.is_empty() {
        samples.iter().collect()
    } else {
        warm
    };
    let first = samples.first().map(&f).unwrap_or(0);
    let last = samples.last().map(&f).unwrap_or(0);
    let warm_start = warm.first().map(|s| f(s)).unwrap_or(0);
    let pts: Vec<(f64, f64)> = warm.iter().map(|s| (s.t_secs, f(s) as f64)).collect();
    Series {
        start: first,
        end: last,
        max: samples.iter().map(&f).max().unwrap_or(0),
        warm_start,
        warm_growth: last as i64 - warm_start as i64,
        slope_per_min: slope(&pts) * 60.0,
    }
}

/// One component's line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct ComponentReport {
    /// e.g. `gateway:operator-a.test`.
    pub component: String,
    /// Its pid.
    pub pid: u32,
    /// Samples taken.
    pub samples: usize,
    /// Resident memory, KiB.
    pub rss_kib: Series,
    /// Open file descriptors.
    pub fds: Series,
    /// Threads.
    pub threads: Series,
    /// Empty when within bounds; else why not.
    pub violations: Vec<String>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    /// Whether every bound held.
    pub passed: bool,
    /// Seconds the load ran.
    pub duration_secs: f64,
    /// Seconds before samples count as warm.
    pub warmup_secs: f64,
    /// Sampling period, seconds.
    pub sample_secs: f64,
    /// The bounds, in words.
    pub bounds: String,
    /// Flows run.
    pub flows: u64,
    /// Flows that failed.
    pub flows_failed: u64,
    /// The first failures, in words (at most 10).
    pub failures: Vec<String>,
    /// Per component.
    pub components: Vec<ComponentReport>,
    /// Run-level violations (errors beyond the bound, a component gone).
    pub violations: Vec<String>,
}

/// Brings up a 3-domain testbed in `run_dir`, runs the load for `opts.duration` while sampling,
/// stops everything and returns the report (also written to `run_dir/soak.json`).
pub async fn run(opts: &SoakOpts, run_dir: &Path, bin_dir: &Path) -> Result<SoakReport> {
    let s = load::scenario(3, opts.invokers, None)?;
    let mut tb = Testbed::up(&s, run_dir, bin_dir, false).await?;
    let r = drive(opts, &s, &tb).await;
    tb.down().await;
    let report = r?;
    std::fs::write(
        run_dir.join("soak.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

async fn drive(opts: &SoakOpts, s: &crate::scenario::Scenario, tb: &Testbed) -> Result<SoakReport> {
    let load = Arc::new(Load::new(
        tb,
        s,
        opts.concurrency,
        Duration::from_secs(20),
        opts.seed,
    )?);
    load.onboard_all(tb).await?;
    let pids = tb.pids();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(load.clone().run(opts.seed, stop_rx, tx));
    let start = Instant::now();
    let mut samples: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let mut gone = Vec::new();
    let (mut flows, mut failed, mut failures) = (0u64, 0u64, Vec::new());
    let mut tick = tokio::time::interval(opts.sample_every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let t = start.elapsed().as_secs_f64();
                for (c, pid) in &pids {
                    match sample(*pid, t) {
                        Some(x) => samples.entry(c.clone()).or_default().push(x),
                        None if !gone.contains(c) => gone.push(c.clone()),
                        None => {}
                    }
                }
                if start.elapsed() >= opts.duration {
                    break;
                }
                eprint!("\rsoak: {:>5.0} s of {} s, {flows} flows, {failed} failed   ", t, opts.duration.as_secs());
            }
            Some(f) = rx.recv() => {
                flows += 1;
                if !f.ok {
                    failed += 1;
                    if failures.len() < 10 {
                        failures.push(format!("{} -> {} ({}): {} {}", f.invoker, f.aef, f.method, f.code, f.detail));
                    }
                }
            }
        }
    }
    eprintln!();
    let _ = stop_tx.send(true);
    let _ = driver.await;
    while let Ok(f) = rx.try_recv() {
        flows += 1;
        failed += u64::from(!f.ok);
    }
    let duration_secs = start.elapsed().as_secs_f64();
    let warmup_secs = duration_secs * f64::from(opts.warmup_pct) / 100.0;
    let mut components = Vec::new();
    for (c, pid) in &pids {
        let v = samples.get(c).cloned().unwrap_or_default();
        let rss = series(&v, warmup_secs, |s| s.rss_kib);
        let fds = series(&v, warmup_secs, |s| s.fds);
        let threads = series(&v, warmup_secs, |s| s.threads);
        let mut violations = Vec::new();
        let bound_kib = (opts.max_rss_growth_mib * 1024.0)
            .max(rss.warm_start as f64 * opts.max_rss_growth_pct / 100.0);
        if rss.warm_growth as f64 > bound_kib {
            violations.push(format!(
                "RSS grew by {} KiB once warm (bound {:.0} KiB)",
                rss.warm_growth, bound_kib
            ));
        }
        if fds.warm_growth > opts.max_fd_growth {
            violations.push(format!(
                "open fds grew by {} once warm (bound {})",
                fds.warm_growth, opts.max_fd_growth
            ));
        }
        components.push(ComponentReport {
            component: c.clone(),
            pid: *pid,
            samples: v.len(),
            rss_kib: rss,
            fds,
            threads,
            violations,
        });
    }
    let mut violations: Vec<String> = gone
        .iter()
        .map(|c| format!("{c} ended during the soak"))
        .collect();
    if flows == 0 {
        violations.push("no flow completed".into());
    } else if failed as f64 * 100.0 / flows as f64 > opts.max_error_pct {
        violations.push(format!(
            "{failed} of {flows} flows failed (bound {}%)",
            opts.max_error_pct
        ));
    }
    let passed = violations.is_empty() && components.iter().all(|c| c.violations.is_empty());
    Ok(SoakReport {
        passed,
        duration_secs,
        warmup_secs,
        sample_secs: opts.sample_every.as_secs_f64(),
        bounds: format!(
            "once warm: RSS growth <= max({} MiB, {}%), fd growth <= {}; failed flows <= {}%",
            opts.max_rss_growth_mib,
            opts.max_rss_growth_pct,
            opts.max_fd_growth,
            opts.max_error_pct
        ),
        flows,
        flows_failed: failed,
        failures,
        components,
        violations,
    })
}

/// The report as a table for a terminal.
pub fn table(r: &SoakReport) -> String {
    let mut out = format!(
        "\nsoak: {:.0} s, warm after {:.0} s, sample every {:.0} s; {} flows, {} failed\n",
        r.duration_secs, r.warmup_secs, r.sample_secs, r.flows, r.flows_failed
    );
    out += &format!(
        "{:<28} {:>7} {:>7} {:>7} {:>9}  {:>4} {:>4} {:>4} {:>7}  {:>4} {:>4}  {}\n",
        "component",
        "rss0",
        "rss1",
        "rssmax",
        "KiB/min",
        "fd0",
        "fd1",
        "fdmx",
        "fd/min",
        "thr0",
        "thr1",
        ""
    );
    for c in &r.components {
        out += &format!(
            "{:<28} {:>7} {:>7} {:>7} {:>9.1}  {:>4} {:>4} {:>4} {:>7.2}  {:>4} {:>4}  {}\n",
            c.component,
            c.rss_kib.start,
            c.rss_kib.end,
            c.rss_kib.max,
            c.rss_kib.slope_per_min,
            c.fds.start,
            c.fds.end,
            c.fds.max,
            c.fds.slope_per_min,
            c.threads.start,
            c.threads.end,
            if c.violations.is_empty() {
                "ok".to_string()
            } else {
                format!("FAIL: {}", c.violations.join("; "))
            }
        );
    }
    for v in &r.violations {
        out += &format!("FAIL: {v}\n");
    }
    for f in &r.failures {
        out += &format!("  failed flow: {f}\n");
    }
    out += &format!(
        "bounds: {}\n{}\n",
        r.bounds,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_least_squares() {
        assert_eq!(slope(&[]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        let s = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]);
        assert!((s - 2.0).abs() < 1e-9);
        // Noise around a flat line has a slope near 0.
        let s = slope(&[
            (0.0, 10.0),
            (1.0, 12.0),
            (2.0, 10.0),
            (3.0, 12.0),
            (4.0, 10.0),
        ]);
        assert!(s.abs() < 0.5, "{s}");
    }

    #[test]
    fn own_process_can_be_sampled_and_warm_growth_counts_from_warm_start() {
        let s = sample(std::process::id(), 0.0).unwrap();
        assert!(s.rss_kib > 0 && s.threads >= 1 && s.fds >= 3);
        let pts: Vec<Sample> = (0..10)
            .map(|i| Sample {
                t_secs: f64::from(i),
                rss_kib: if i < 3 {
                    100 * u64::from(i as u32)
                } else {
                    1000 + u64::from(i as u32)
                },
                threads: 4,
                fds: 10,
            })
            .collect();
        let r = series(&pts, 3.0, |s| s.rss_kib);
        assert_eq!(
            (r.start, r.end, r.max, r.warm_start, r.warm_growth),
            (0, 1009, 1009, 1003, 6)
        );
        assert!((r.slope_per_min - 60.0).abs() < 1e-6);
    }
}
