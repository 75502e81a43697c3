//! Where the CPU went during a `billcl bench` run: the cluster's local processes, the bench
//! itself, and the machine as a whole, including the time its hypervisor took away (steal).
//!
//! Read from Linux's `/proc` (`/proc/stat`, `/proc/PID/stat`) at the start and the end of the
//! measured window; elsewhere, or for a cluster on other machines, the figures are absent rather
//! than guessed. A process is counted only if it is the same `billcl run` at both ends (checked
//! through its pid file, [`crate::process::running_pid`]).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::config::ClusterConfig;
use crate::process::{running_pid, stat_fields};

/// Steal above this share of the machine's CPU time makes the report say that the figures are
/// the hypervisor's as much as the cluster's.
pub const STEAL_NOTE_PERCENT: f64 = 5.0;

/// The machine's CPU time in clock ticks, summed over its CPUs (`/proc/stat`'s `cpu` line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// user + nice + system + irq + softirq.
    pub busy: u64,
    /// Time the hypervisor ran something else while this machine had work.
    pub steal: u64,
    /// Everything: busy, idle, iowait and steal.
    pub total: u64,
}

/// CPU time of the machine, of this process and of the cluster's local instances, at one moment.
pub struct CpuSample {
    machine: Option<MachineTicks>,
    bench: Option<u64>,
    /// Name, pid, user + system ticks of each local instance that runs.
    instances: Vec<(String, i32, u64)>,
}

impl CpuSample {
    /// Reads the counters now.
    pub fn take(config: &ClusterConfig) -> CpuSample {
        let instances = config
            .instances()
            .into_iter()
            .filter_map(|instance| {
                let pid = running_pid(config, &instance.name)?;
                let ticks = read_process_ticks(&format!("/proc/{pid}/stat"))?;
                Some((instance.name, pid, ticks))
            })
            .collect();
        CpuSample {
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|text| machine_ticks(&text)),
            bench: read_process_ticks("/proc/self/stat"),
            instances,
        }
    }

    /// What was spent between `self` and `later`, per call of `calls`: the report's `cpu`
    /// object, or `Value::Null` when nothing could be read.
    pub fn report(&self, later: &CpuSample, calls: u64) -> Value {
        let us_per_tick = 1e6 / clock_ticks_per_s();
        let per_call = |ticks: u64| ticks as f64 * us_per_tick / calls.max(1) as f64;
        let mut by_instance = BTreeMap::new();
        let mut cluster = 0;
        for (name, pid, before) in &self.instances {
            let after = later
                .instances
                .iter()
                .find(|(other, other_pid, _)| other == name && other_pid == pid);
            if let Some((_, _, after)) = after {
                let spent = after.saturating_sub(*before);
                cluster += spent;
                by_instance.insert(name.clone(), round(per_call(spent), 1));
            }
        }
        let machine = self.machine.zip(later.machine).map(|(before, after)| {
            let total = after.total.saturating_sub(before.total).max(1) as f64;
            (
                100.0 * after.busy.saturating_sub(before.busy) as f64 / total,
                100.0 * after.steal.saturating_sub(before.steal) as f64 / total,
            )
        });
        let bench = self
            .bench
            .zip(later.bench)
            .map(|(before, after)| round(per_call(after.saturating_sub(before)), 1));
        if by_instance.is_empty() && machine.is_none() && bench.is_none() {
            return Value::Null;
        }
        json!({
            "cluster_us_per_call": (!by_instance.is_empty()).then(|| round(per_call(cluster), 1)),
            "by_instance_us_per_call": by_instance,
            "bench_us_per_call": bench,
            "machine_busy_percent": machine.map(|(busy, _)| round(busy, 1)),
            "machine_steal_percent": machine.map(|(_, steal)| round(steal, 1)),
        })
    }
}

/// The lines `billcl bench` prints for a report's `cpu` object (none for `Value::Null`).
pub fn describe(cpu: &Value) -> Vec<String> {
    if cpu.is_null() {
        return Vec::new();
    }
    let mut parts = Vec::new();
    let mut note = None;
    if let Some(cluster) = cpu["cluster_us_per_call"].as_f64() {
        let instances: Vec<String> = cpu["by_instance_us_per_call"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, us)| format!("{name} {:.1}", us.as_f64().unwrap_or(0.0)))
            .collect();
        parts.push(format!(
            "cluster {cluster:.1} µs/call ({})",
            instances.join(", ")
        ));
    }
    if let Some(bench) = cpu["bench_us_per_call"].as_f64() {
        parts.push(format!("bench {bench:.1} µs/call"));
    }
    if let (Some(busy), Some(steal)) = (
        cpu["machine_busy_percent"].as_f64(),
        cpu["machine_steal_percent"].as_f64(),
    ) {
        parts.push(format!("machine {busy:.0} % busy, {steal:.0} % stolen"));
        if steal >= STEAL_NOTE_PERCENT {
            note = Some(format!(
                "  note        the hypervisor took {steal:.0} % of this machine's CPU time during \
                 the run (steal): the figures above are lower than the cluster's own; compare \
                 runs made at quieter moments"
            ));
        }
    }
    std::iter::once(format!("  cpu         {}", parts.join("; ")))
        .chain(note)
        .collect()
}

/// The `cpu` line of `/proc/stat`: `cpu user nice system idle iowait irq softirq steal …`.
pub fn machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq;
    Some(MachineTicks {
        busy,
        steal,
        total: busy + idle + iowait + steal,
    })
}

/// User + system ticks of a process from its `/proc/PID/stat` text: fields 14 and 15.
pub fn process_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat_fields(stat)?.skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

fn read_process_ticks(path: &str) -> Option<u64> {
    process_ticks(&std::fs::read_to_string(path).ok()?)
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf reads a constant of the C library; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_line_counts_busy_steal_and_total() {
        let stat = "cpu  100 5 50 1000 20 3 2 40 7 0\ncpu0 50 2 25 500 10 1 1 20 0 0\n";
        assert_eq!(
            machine_ticks(stat),
            Some(MachineTicks {
                busy: 100 + 5 + 50 + 3 + 2,
                steal: 40,
                total: 160 + 1000 + 20 + 40,
            })
        );
        assert_eq!(machine_ticks("cpu0 1 2 3\n"), None);
        assert_eq!(machine_ticks("cpu  1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn process_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 9";
        assert_eq!(process_ticks(stat), Some(1234 + 567));
        assert_eq!(process_ticks("4242 (short) S 1 2"), None);
    }

    #[test]
    fn this_process_has_counters_on_linux() {
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(read_process_ticks("/proc/self/stat").is_some());
            let text = std::fs::read_to_string("/proc/stat").unwrap();
            let ticks = machine_ticks(&text).unwrap();
            assert!(ticks.total >= ticks.busy + ticks.steal);
        }
    }

    #[test]
    fn a_report_divides_by_the_calls_and_notes_steal() {
        let before = CpuSample {
            machine: Some(MachineTicks {
                busy: 1_000,
                steal: 0,
                total: 2_000,
            }),
            bench: Some(10),
            instances: vec![
                ("router-a-001".into(), 7, 100),
                ("storage-a-001".into(), 8, 200),
                ("restarted".into(), 9, 50),
            ],
        };
        let after = CpuSample {
            machine: Some(MachineTicks {
                busy: 1_600,
                steal: 100,
                total: 3_000,
            }),
            bench: Some(20),
            instances: vec![
                ("router-a-001".into(), 7, 150),
                ("storage-a-001".into(), 8, 400),
                ("restarted".into(), 10, 5),
            ],
        };
        let per_tick_us = 1e6 / clock_ticks_per_s();
        let report = before.report(&after, 1_000);
        let cluster = report["cluster_us_per_call"].as_f64().unwrap();
        assert!((cluster - round(250.0 * per_tick_us / 1_000.0, 1)).abs() < 1e-9);
        assert!(report["by_instance_us_per_call"].get("restarted").is_none());
        assert_eq!(report["machine_busy_percent"].as_f64(), Some(60.0));
        assert_eq!(report["machine_steal_percent"].as_f64(), Some(10.0));
        let lines = describe(&report);
        assert!(lines[0].starts_with("  cpu         cluster "), "{lines:?}");
        let router = format!("router-a-001 {:.1}, ", 50.0 * per_tick_us / 1_000.0);
        assert!(lines[0].contains(&router), "{lines:?}");
        assert!(
            lines[0].contains("machine 60 % busy, 10 % stolen"),
            "{lines:?}"
        );
        assert!(lines[1].contains("the hypervisor took 10 %"), "{lines:?}");

        let quiet = CpuSample {
            machine: Some(MachineTicks {
                busy: 1_600,
                steal: 10,
                total: 3_000,
            }),
            ..after
        };
        assert_eq!(describe(&before.report(&quiet, 1_000)).len(), 1);
        let nothing = CpuSample {
            machine: None,
            bench: None,
            instances: Vec::new(),
        };
        assert!(nothing.report(&nothing, 5).is_null());
        assert!(describe(&Value::Null).is_empty());
    }
}
