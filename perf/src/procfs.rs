//! Broker-side resource probes read from /proc: resident memory, CPU time and kernel slab memory.
//!
//! Parsers take the file text so tests can feed fixtures; the `read_*` wrappers add the I/O.

use serde::Serialize;

/// `VmRSS` from /proc/PID/status, in kB.
pub fn parse_vmrss_kb(status: &str) -> Option<u64> {
    kb_field(status, "VmRSS:")
}

/// `Slab` from /proc/meminfo, in kB: socket and epoll structures the kernel keeps per connection.
pub fn parse_slab_kb(meminfo: &str) -> Option<u64> {
    kb_field(meminfo, "Slab:")
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// utime + stime in clock ticks from /proc/PID/stat. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last ')'.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ')': state is field 3, so utime (14) and stime (15) are the 12th and 13th here.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

pub fn read_rss_kb(pid: u32) -> Option<u64> {
    parse_vmrss_kb(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

pub fn read_slab_kb() -> Option<u64> {
    parse_slab_kb(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// Broker CPU time in seconds.
pub fn read_cpu_s(pid: u32) -> Option<f64> {
    let ticks = parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// Snapshot at the start of a measurement window; [`BrokerProbe::finish`] turns it into a report.
pub struct BrokerProbe {
    pid: u32,
    cpu_s: Option<f64>,
    rss_kb: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokerUsage {
    pub pid: u32,
    pub cpu_s: Option<f64>,
    pub cpu_us_per_msg: Option<f64>,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
}

impl BrokerProbe {
    pub fn start(pid: u32) -> Self {
        BrokerProbe { pid, cpu_s: read_cpu_s(pid), rss_kb: read_rss_kb(pid) }
    }

    pub fn finish(&self, delivered: u64) -> BrokerUsage {
        let cpu = match (self.cpu_s, read_cpu_s(self.pid)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        BrokerUsage {
            pid: self.pid,
            cpu_s: cpu,
            cpu_us_per_msg: cpu.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
            rss_before_kb: self.rss_kb,
            rss_after_kb: read_rss_kb(self.pid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tshardmq\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  123456 kB\n\
                          VmRSS:\t   45678 kB\nRssAnon:\t   40000 kB\nThreads:\t3\n";
    const MEMINFO: &str =
        "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nSlab:             234567 kB\n\
                           SReclaimable:     100000 kB\n";
    // Field 2 deliberately contains a space and a ')' to exercise the rfind.
    const STAT: &str = "4242 (shard mq) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 \
                        12345 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn parses_fixtures() {
        assert_eq!(parse_vmrss_kb(STATUS), Some(45678));
        assert_eq!(parse_slab_kb(MEMINFO), Some(234567));
        assert_eq!(parse_cpu_ticks(STAT), Some(325));
        assert_eq!(parse_vmrss_kb("Name: x\n"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(read_rss_kb(pid).unwrap() > 0);
        assert!(read_cpu_s(pid).is_some());
        assert!(read_slab_kb().is_some());
    }
}
