//! What the benchmark reads from `/proc`: CPU time, memory and TCP connections of a process,
//! CPU time of a thread of this process, the machine's busy time, and what else is using the
//! machine.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of a `stat` file after the command name: index 0 is field 3 (`state`).
fn stat_fields(text: &str) -> Option<(String, Vec<String>)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let rest = text.get(close + 2..)?;
    Some((comm, rest.split_whitespace().map(str::to_owned).collect()))
}

/// utime + stime of a `stat` file, in seconds.
fn stat_cpu(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let (_, f) = stat_fields(&text)?;
    // utime is field 14, stime field 15.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

/// CPU seconds (user + system, every thread) a process has used so far.
pub fn process_cpu(pid: u32) -> Option<f64> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU seconds this process has used so far.
pub fn self_cpu() -> f64 {
    stat_cpu("/proc/self/stat").unwrap_or(0.0)
}

/// CPU seconds used by the threads of this process whose name starts with `prefix`.
pub fn threads_cpu(prefix: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| {
            let path = format!("{}/stat", e.path().display());
            let text = std::fs::read_to_string(&path).ok()?;
            let (comm, _) = stat_fields(&text)?;
            comm.starts_with(prefix).then(|| stat_cpu(&path)).flatten()
        })
        .sum()
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Inodes of the sockets a process holds open (`/proc/PID/fd/N -> socket:[INODE]`).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// A process's ESTABLISHED TCP connections (IPv4 and IPv6), counted by remote port.
///
/// `/proc/PID/net/tcp{,6}` list every socket of the process's network namespace; a row is
/// the process's when its inode is one of the sockets among its file descriptors.
pub fn established_by_remote_port(pid: u32) -> HashMap<u16, usize> {
    let mine = socket_inodes(pid);
    let mut out = HashMap::new();
    for file in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(&state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else {
                continue;
            };
            // 01: TCP_ESTABLISHED.
            if state != "01" || !inode.parse().is_ok_and(|i: u64| mine.contains(&i)) {
                continue;
            }
            let Some(port) = remote
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            *out.entry(port).or_insert(0) += 1;
        }
    }
    out
}

/// Busy and total jiffies of the whole machine (all CPUs), from `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTimes {
    busy: u64,
    total: u64,
}

impl MachineTimes {
    /// Now.
    pub fn now() -> Self {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().next() else {
            return Self::default();
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest is inside user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Self {
            busy: total - idle,
            total,
        }
    }

    /// Cores busy on average since `earlier` (0 to nproc).
    pub fn cores_busy_since(&self, earlier: &MachineTimes, cores: usize) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64 * cores as f64
    }
}

/// Number of CPUs this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The first `model name` of `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// `/proc/loadavg`'s three load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().filter_map(|x| x.parse().ok());
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// Total memory in MiB.
pub fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// A process that used a noticeable share of a core.
#[derive(Debug, Clone)]
pub struct BusyProcess {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub name: String,
    /// Share of one core over the sample, in percent.
    pub cpu_percent: f64,
}

fn all_process_cpu() -> HashMap<u32, (String, f64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((comm, f)) = stat_fields(&text) else {
            continue;
        };
        let ticks = f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        out.insert(pid, (comm, ticks / clock_ticks()));
    }
    out
}

/// Processes other than this one that used over `min_percent` of a core during `sample`.
pub fn busy_processes(sample: Duration, min_percent: f64) -> Vec<BusyProcess> {
    let me = std::process::id();
    let before = all_process_cpu();
    std::thread::sleep(sample);
    let after = all_process_cpu();
    let mut busy: Vec<BusyProcess> = after
        .into_iter()
        .filter(|(pid, _)| *pid != me)
        .filter_map(|(pid, (name, cpu))| {
            let was = before.get(&pid).map_or(0.0, |(_, c)| *c);
            let percent = (cpu - was) / sample.as_secs_f64() * 100.0;
            (percent >= min_percent).then_some(BusyProcess {
                pid,
                name,
                cpu_percent: percent,
            })
        })
        .collect();
    busy.sort_by(|a, b| b.cpu_percent.total_cmp(&a.cpu_percent));
    busy
}
