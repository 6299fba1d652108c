//! The host's own noise during a run, measured beside the broker so a latency figure can be read against
//! it: the share of CPU time the hypervisor stole (from /proc/stat) and how late a thread of the load
//! generator wakes from a 1 ms sleep (a small cyclictest).
//!
//! Why: on a virtual machine a vCPU can be descheduled for milliseconds, and every message of a latency
//! run waits for at least two thread wake-ups. When the probe's p99 is of the same order as a broker's,
//! the difference between two brokers in that run is noise, not the brokers.
//!
//! What it does not do: attribute the noise (other tenants, the load generator's own threads and the
//! broker all contribute), or measure anything when /proc is missing (the fields are then `None`).
//! The probe thread shares the load generator's CPUs (a pinned generator pins it too) and wakes 1,000
//! times a second, a cost of a few microseconds each.

use crate::stats::{self, LatencySummary};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long the probe thread sleeps between wake-ups.
const PROBE_SLEEP: Duration = Duration::from_millis(1);

/// Aggregate CPU times from the first line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    pub steal: u64,
}

/// Parses the `cpu ` line of /proc/stat: user nice system idle iowait irq softirq steal [guest ...]. Guest
/// time is already counted in user, so the total is the first eight fields.
pub fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> =
        line.split_whitespace().skip(1).take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    (f.len() == 8).then(|| CpuTimes { total: f.iter().sum(), steal: f[7] })
}

fn read_cpu_times() -> Option<CpuTimes> {
    parse_cpu_times(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Stolen share of all CPU time between two snapshots, in percent.
pub fn steal_pct(a: CpuTimes, b: CpuTimes) -> Option<f64> {
    let total = b.total.checked_sub(a.total).filter(|&t| t > 0)?;
    Some(b.steal.saturating_sub(a.steal) as f64 * 100.0 / total as f64)
}

#[derive(Debug, Clone, Serialize)]
pub struct HostNoise {
    /// CPU time stolen by the hypervisor over the window, percent of all CPUs' time (0 on bare metal).
    pub steal_pct: Option<f64>,
    /// How much later than asked a 1 ms sleep of the probe thread ended, in µs.
    pub wake_late_us: LatencySummary,
}

/// Started at the beginning of a measurement window; [`HostProbe::finish`] stops it and reports.
pub struct HostProbe {
    cpu: Option<CpuTimes>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<LatencySummary>>,
}

impl HostProbe {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new().name("host-probe".into()).spawn(move || probe(&flag)).ok();
        HostProbe { cpu: read_cpu_times(), stop, thread }
    }

    pub fn finish(mut self) -> HostNoise {
        let steal = match (self.cpu, read_cpu_times()) {
            (Some(a), Some(b)) => steal_pct(a, b),
            _ => None,
        };
        self.stop.store(true, Relaxed);
        let wake_late_us = self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default();
        HostNoise { steal_pct: steal, wake_late_us }
    }
}

impl Drop for HostProbe {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

fn probe(stop: &AtomicBool) -> LatencySummary {
    // The default 50 µs timer slack would be counted as lateness.
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut h = stats::new_histogram();
    while !stop.load(Relaxed) {
        let due = Instant::now() + PROBE_SLEEP;
        thread::sleep(PROBE_SLEEP);
        let late_us = Instant::now().saturating_duration_since(due).as_micros() as u64;
        stats::record(&mut h, late_us);
    }
    LatencySummary::of(&h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_line_and_computes_steal() {
        let a = parse_cpu_times("cpu  100 0 50 800 10 0 20 20 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(a, CpuTimes { total: 1000, steal: 20 });
        let b = parse_cpu_times("cpu  150 0 70 1500 10 0 30 40 5 0\n").unwrap();
        assert_eq!(b, CpuTimes { total: 1800, steal: 40 });
        assert_eq!(steal_pct(a, b), Some(2.5));
        assert_eq!(steal_pct(a, a), None, "no time passed: no figure rather than 0/0");
        assert_eq!(parse_cpu_times("cpu0 1 2 3\n"), None);
        assert_eq!(parse_cpu_times("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(parse_cpu_times("cpu  1 2 3\n"), None, "an old kernel without steal is no figure");
    }

    #[test]
    fn probe_measures_wake_ups() {
        let p = HostProbe::start();
        thread::sleep(Duration::from_millis(30));
        let n = p.finish();
        assert!(n.wake_late_us.count >= 5, "{n:?}");
        assert!(n.wake_late_us.p50_us <= n.wake_late_us.max_us);
    }
}
