//! Instance processes on this machine, as `tt start / stop / status` manage them: each
//! instance runs as a background `billcl run NAME` process with its pid file and log
//! file in its data directory. Only the pids billcl wrote are ever signalled, and only
//! after checking that the pid still runs `billcl run` for that instance.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::{ClusterConfig, Instance, Role};

/// How long `stop` waits for an instance to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE_MS: u64 = 10_000;

pub fn pid_file(config: &ClusterConfig, name: &str) -> PathBuf {
    config.instance_dir(name).join(format!("{name}.pid"))
}

pub fn log_file(config: &ClusterConfig, name: &str) -> PathBuf {
    config.instance_dir(name).join(format!("{name}.log"))
}

/// The pid of a running instance, if its pid file names a live `billcl run` of it.
pub fn running_pid(config: &ClusterConfig, name: &str) -> Option<i32> {
    let text = std::fs::read_to_string(pid_file(config, name)).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    is_instance_process(pid, name).then_some(pid)
}

fn is_instance_process(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty command line: it is not running.
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let has = |word: &str| args.contains(&word.as_bytes());
    has("run") && has(name) && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    process_state(pid).is_none_or(|state| state == 'Z')
}

/// A process's state letter (proc(5): R running, S sleeping, T stopped, t traced, Z zombie…).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.next()?.chars().next()
}

/// Whether a process is paused: stopped by a signal (`kill -STOP`, Ctrl-Z at its terminal) or
/// by a debugger. It keeps its ports and pid but answers nothing until it is resumed
/// (`kill -CONT PID`), so a node in that state is "unreachable" to its peers while
/// `billcl start` finds it running.
pub fn is_paused(pid: i32) -> bool {
    process_state(pid).is_some_and(|state| matches!(state, 'T' | 't'))
}

/// The instances of `config` whose process runs on this machine but is paused, with their pids.
pub fn paused_instances(config: &ClusterConfig) -> Vec<(String, i32)> {
    config
        .instances()
        .into_iter()
        .filter_map(|instance| {
            let pid = running_pid(config, &instance.name)?;
            is_paused(pid).then_some((instance.name, pid))
        })
        .collect()
}

/// What to tell the operator about a paused instance.
pub fn paused_advice(name: &str, pid: i32) -> String {
    format!(
        "{name}'s process {pid} on this machine is paused (kill -STOP, Ctrl-Z or a debugger) and \
         answers nothing until it is resumed: `kill -CONT {pid}`"
    )
}

/// The fields of a `/proc/PID/stat` text after the command name (which is in parentheses and
/// may itself hold spaces or ')'): the state (field 3) first.
pub(crate) fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    stat.rsplit_once(')')
        .map(|(_, after_name)| after_name.split_whitespace())
}

/// The nice value in a `/proc/…/stat` text (proc(5): field 19, the 17th after the command).
pub fn stat_nice(stat: &str) -> Option<i32> {
    stat_fields(stat)?.nth(16)?.parse().ok()
}

/// The nice value of a process's main thread (a learner's: `[replication] learner_nice`).
fn nice_of(pid: i32) -> Option<i32> {
    stat_nice(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A process's memory as Linux counts it: what it holds in RAM now and the most it ever held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size (`VmRSS`).
    pub resident_bytes: u64,
    /// Peak resident set size (`VmHWM`, the high-water mark).
    pub peak_bytes: u64,
}

impl Memory {
    /// As `billcl status` and `billcl bench` print it: `312 MB (peak 420 MB)`.
    pub fn describe(&self) -> String {
        format!(
            "{} MB (peak {} MB)",
            self.resident_bytes >> 20,
            self.peak_bytes >> 20
        )
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({ "resident_bytes": self.resident_bytes, "peak_bytes": self.peak_bytes })
    }
}

/// The memory of process `pid` (its `/proc/PID/status`), if it runs on this machine.
pub fn memory_of(pid: i32) -> Option<Memory> {
    status_memory(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The memory of each instance of `config` whose process runs on this machine, by name.
pub fn instances_memory(config: &ClusterConfig) -> Vec<(String, Memory)> {
    config
        .instances()
        .into_iter()
        .filter_map(|instance| {
            let memory = memory_of(running_pid(config, &instance.name)?)?;
            Some((instance.name, memory))
        })
        .collect()
}

/// `VmRSS` and `VmHWM` of a `/proc/PID/status` text (in kB there).
pub fn status_memory(status: &str) -> Option<Memory> {
    let kilobytes = |field: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(field))?;
        let value = line[field.len()..].trim().strip_suffix("kB")?;
        value.trim().parse::<u64>().ok()?.checked_mul(1024)
    };
    Some(Memory {
        resident_bytes: kilobytes("VmRSS:")?,
        peak_bytes: kilobytes("VmHWM:")?,
    })
}

/// The instances named, or all of them if none is.
pub(crate) fn selected(config: &ClusterConfig, names: &[String]) -> Result<Vec<Instance>> {
    if names.is_empty() {
        return Ok(config.instances());
    }
    names.iter().map(|name| config.instance(name)).collect()
}

fn role_name(instance: &Instance) -> String {
    match &instance.role {
        Role::Router { .. } => "router".to_string(),
        Role::Storage {
            replicaset, voter, ..
        } => format!(
            "storage {replicaset} ({})",
            if *voter { "voter" } else { "learner" }
        ),
    }
}

/// Start the named instances (all if none), each as a background process.
pub fn start(config: &ClusterConfig, names: &[String]) -> Result<()> {
    crate::tls::ensure(config)?;
    let exe = std::env::current_exe().context("cannot find the billcl executable")?;
    let mut started = Vec::new();
    let mut paused = Vec::new();
    for instance in selected(config, names)? {
        let name = &instance.name;
        if let Some(pid) = running_pid(config, name) {
            if is_paused(pid) {
                eprintln!(" ✗ {}", paused_advice(name, pid));
                paused.push(name.clone());
            } else {
                println!("   {name}: already running (pid {pid})");
            }
            continue;
        }
        let dir = config.instance_dir(name);
        let joining = joins_a_running_replicaset(config, &instance);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file(config, name))?;
        let mut command = Command::new(&exe);
        command
            .arg("--config")
            .arg(&config.path)
            .arg("run")
            .arg(name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a Ctrl-C at the terminal does not reach it.
            command.process_group(0);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id() as i32;
        std::fs::write(pid_file(config, name), format!("{pid}\n"))?;
        println!(
            " • Starting {name} ({}) on {} — pid {pid}",
            role_name(&instance),
            instance.address()
        );
        if let Some(advice) = joining {
            println!("   {advice}");
        }
        started.push((instance, pid, child));
    }
    // Report instances that die at once (a busy port, a bad data directory).
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut failed = Vec::new();
    while Instant::now() < deadline && failed.len() < started.len() {
        std::thread::sleep(Duration::from_millis(100));
        for (instance, _pid, child) in started.iter_mut() {
            if failed.contains(&instance.name) {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                failed.push(instance.name.clone());
                let tail = log_tail(config, &instance.name, 5);
                eprintln!(
                    " ✗ {} exited at start ({status}); its log ends:\n{tail}",
                    instance.name
                );
                let _ = std::fs::remove_file(pid_file(config, &instance.name));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} instance(s) failed to start: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    if !paused.is_empty() {
        bail!(
            "{} instance(s) running but paused, so not serving: {} (resume with `kill -CONT`, above)",
            paused.len(),
            paused.join(", ")
        );
    }
    Ok(())
}

/// For a storage instance started for the first time (no data directory yet) in a replicaset
/// whose other members hold Raft data: what happens next and what to do.
fn joins_a_running_replicaset(config: &ClusterConfig, instance: &Instance) -> Option<String> {
    let Role::Storage {
        replicaset, voter, ..
    } = &instance.role
    else {
        return None;
    };
    if config.instance_dir(&instance.name).exists() {
        return None;
    }
    let founded = config
        .members(replicaset)
        .iter()
        .any(|(_, member, ..)| config.instance_dir(member).join("raft").exists());
    if !founded {
        return None;
    }
    Some(if *voter {
        format!(
            "{name} is new to {replicaset}, as a voter: a running replicaset takes new members as \
             learners only, so it will wait unused; set `voter = false` for it, then `billcl \
             restart {name}` (it joins as a learner)",
            name = instance.name
        )
    } else {
        format!(
            "{} is new to {replicaset}: it asks the replicaset's voters to add it and catches \
             up; `billcl reload` so that the routers serve replica reads from it",
            instance.name
        )
    })
}

pub fn log_tail(config: &ClusterConfig, name: &str, lines: usize) -> String {
    let text = std::fs::read_to_string(log_file(config, name)).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| format!("     {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Stop the named instances (all if none): SIGTERM, then SIGKILL after a grace period.
pub fn stop(config: &ClusterConfig, names: &[String]) -> Result<()> {
    let instances = selected(config, names)?;
    let mut signalled = Vec::new();
    for instance in &instances {
        let name = &instance.name;
        match running_pid(config, name) {
            None => {
                println!("   {name}: not running");
                let _ = std::fs::remove_file(pid_file(config, name));
            }
            Some(pid) => {
                // SAFETY: kill(2) with a pid we verified runs `billcl run NAME`.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                if is_paused(pid) {
                    // A paused process takes its SIGTERM only once resumed: resume it so that
                    // it shuts down cleanly now rather than being killed after the grace period.
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                }
                signalled.push((name.clone(), pid));
            }
        }
    }
    for (name, pid) in signalled {
        let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
        while is_instance_process(pid, &name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_instance_process(pid, &name) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            println!(" • {name} (pid {pid}) did not stop in time and was killed");
        } else {
            println!(" • {name} (pid {pid}) has been stopped");
        }
        let _ = std::fs::remove_file(pid_file(config, &name));
    }
    Ok(())
}

/// One line per instance: name, state, pid, address, nice, memory (resident and peak), role.
pub fn status(config: &ClusterConfig, names: &[String], as_json: bool) -> Result<()> {
    let instances = selected(config, names)?;
    let rows: Vec<serde_json::Value> = instances
        .iter()
        .map(|instance| {
            let pid = running_pid(config, &instance.name);
            let status = match pid {
                None => "not running",
                Some(pid) if is_paused(pid) => "paused",
                Some(_) => "running",
            };
            serde_json::json!({
                "instance": instance.name,
                "status": status,
                "pid": pid,
                "nice": pid.and_then(nice_of),
                "memory": pid.and_then(memory_of).map(Memory::to_json),
                "address": instance.address().to_string(),
                "role": role_name(instance),
            })
        })
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:>8}  {:<21} {:>4}  {:>8} {:>8}  ROLE",
        "INSTANCE", "STATUS", "PID", "ADDRESS", "NICE", "RSS MB", "PEAK MB"
    );
    let megabytes = |row: &serde_json::Value, field: &str| {
        row["memory"][field]
            .as_u64()
            .map_or("-".to_string(), |bytes| (bytes >> 20).to_string())
    };
    for row in &rows {
        println!(
            "{:<16} {:<12} {:>8}  {:<21} {:>4}  {:>8} {:>8}  {}",
            row["instance"].as_str().unwrap_or(""),
            row["status"].as_str().unwrap_or("").to_uppercase(),
            row["pid"]
                .as_i64()
                .map_or("-".to_string(), |p| p.to_string()),
            row["address"].as_str().unwrap_or(""),
            row["nice"]
                .as_i64()
                .map_or("-".to_string(), |n| n.to_string()),
            megabytes(row, "resident_bytes"),
            megabytes(row, "peak_bytes"),
            row["role"].as_str().unwrap_or(""),
        );
    }
    for row in rows.iter().filter(|row| row["status"] == "paused") {
        let name = row["instance"].as_str().unwrap_or("");
        let pid = row["pid"].as_i64().unwrap_or(0) as i32;
        println!(" ! {}", paused_advice(name, pid));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_the_status_text_in_kilobytes() {
        let status = "Name:\tbillcl\nVmPeak:\t 900000 kB\nVmHWM:\t  430080 kB\n\
                      VmRSS:\t  319488 kB\nThreads:\t12\n";
        let memory = status_memory(status).unwrap();
        assert_eq!(memory.resident_bytes, 319_488 * 1024);
        assert_eq!(memory.peak_bytes, 430_080 * 1024);
        assert_eq!(memory.describe(), "312 MB (peak 420 MB)");
        // A kernel thread has no memory lines; a damaged line is no figure.
        assert_eq!(status_memory("Name:\tkthreadd\nThreads:\t1\n"), None);
        assert_eq!(status_memory("VmHWM:\t12 MB\nVmRSS:\t1 kB\n"), None);
        // This process's own.
        let own = memory_of(std::process::id() as i32).unwrap();
        assert!(own.resident_bytes > 0 && own.peak_bytes >= own.resident_bytes);
    }

    #[test]
    fn a_stopped_process_is_paused_and_a_resumed_one_is_not() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(!is_paused(pid));
        // SAFETY: kill(2) of the child this test started.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_paused(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_paused(pid), "a SIGSTOPped process is paused");
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_paused(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_paused(pid), "a resumed process is not paused");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_paused(pid), "a reaped process is not paused");
    }
}
