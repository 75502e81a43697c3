//! The instances' own log files: `DATA_DIR/NAME/NAME.log`, where `billcl start` points an
//! instance's standard output and error. `billcl log` shows them (tt's `log`), and
//! `billcl logrotate` starts each anew without a restart (tt's `logrotate`): the file is
//! renamed aside and the instance, signalled, opens a new one under the old name, as a
//! daemon does for logrotate(8)'s `postrotate`.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::ClusterConfig;
use crate::process::{log_file, running_pid, selected};

/// The signal that makes a running instance open its log file anew (nginx's and many
/// daemons' convention; SIGHUP already makes a router reload its cluster file).
pub const REOPEN_SIGNAL: libc::c_int = libc::SIGUSR1;
/// How long `billcl logrotate` waits for an instance to open its new log file.
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// How often `billcl log --follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// In a running instance: on [`REOPEN_SIGNAL`], opens `path` anew (created if it was renamed
/// away) and points standard output and error at it, so that the lines after go there.
pub async fn reopen_on_signal(path: PathBuf) {
    let kind = tokio::signal::unix::SignalKind::from_raw(REOPEN_SIGNAL);
    let Ok(mut signals) = tokio::signal::unix::signal(kind) else {
        tracing::warn!("cannot handle SIGUSR1: `billcl logrotate` cannot reopen this log");
        return;
    };
    while signals.recv().await.is_some() {
        match reopen(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "log file opened anew (logrotate)"),
            Err(e) => tracing::warn!(
                "SIGUSR1: cannot open {} anew ({e}); still logging where it was",
                path.display()
            ),
        }
    }
}

fn reopen(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for target in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2(2) of a descriptor we own onto stdout/stderr, which stay open.
        if unsafe { libc::dup2(file.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The instances named (all if none) whose log file is on this machine.
fn with_logs(config: &ClusterConfig, names: &[String]) -> Result<Vec<(String, PathBuf)>> {
    Ok(selected(config, names)?
        .into_iter()
        .map(|instance| {
            let path = log_file(config, &instance.name);
            (instance.name, path)
        })
        .collect())
}

/// `billcl logrotate`: each instance's log file (all, or those named) is renamed to
/// `NAME.log.YYYYMMDDTHHMMSSZ`, and a running instance opens a new `NAME.log`; a stopped
/// one writes it at its next start. An instance running another build of billcl than this
/// one (which may not handle the signal, and would be stopped by it) is left as it is.
pub fn rotate(config: &ClusterConfig, names: &[String]) -> Result<()> {
    let this_build = std::env::current_exe().ok();
    let mut failed = Vec::new();
    // Every log is rotated before anything is printed: a reader that goes away early (`|
    // head`) stops the printing, not the rotation.
    let mut done = Vec::new();
    for (name, path) in with_logs(config, names)? {
        if !path.exists() {
            done.push(format!("   {name}: no log file yet ({})", path.display()));
            continue;
        }
        let pid = running_pid(config, &name);
        if let Some(pid) = pid {
            let runs = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if runs.is_none() || runs != this_build {
                let runs = runs.map_or("unknown".into(), |p| p.display().to_string());
                eprintln!(
                    " ✗ {name} (pid {pid}) runs another billcl build ({runs}): its log was \
                     left as it is; restart it with this build (`billcl restart --rolling`) \
                     and rotate again"
                );
                failed.push(name);
                continue;
            }
        }
        let rotated = rotated_name(&path);
        std::fs::rename(&path, &rotated)
            .with_context(|| format!("cannot rename {}", path.display()))?;
        let Some(pid) = pid else {
            done.push(format!(
                " • {name}: {} (not running: its next start begins a new log)",
                rotated.display()
            ));
            continue;
        };
        // SAFETY: kill(2) with a pid verified to run `billcl run NAME` of this build.
        unsafe { libc::kill(pid, REOPEN_SIGNAL) };
        let deadline = Instant::now() + REOPEN_WAIT;
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if path.exists() {
            done.push(format!(
                " • {name}: {} (a new {} begun)",
                rotated.display(),
                path.display()
            ));
        } else {
            eprintln!(
                " ✗ {name} (pid {pid}) did not open a new log file in {} s: it still writes \
                 to {}",
                REOPEN_WAIT.as_secs(),
                rotated.display()
            );
            failed.push(name);
        }
    }
    for line in done {
        println!("{line}");
    }
    if !failed.is_empty() {
        bail!("the logs of {} were not rotated", failed.join(", "));
    }
    Ok(())
}

/// `NAME.log.YYYYMMDDTHHMMSSZ` beside `path`, with `.1`, `.2`… if that is taken.
fn rotated_name(path: &Path) -> PathBuf {
    let stamp = crate::deploy::utc_text(crate::storage::now_ms())
        .replace(['-', ':'], "")
        .split('.')
        .next()
        .unwrap_or_default()
        .trim_end_matches('Z')
        .to_string();
    let base = format!("{}.{stamp}Z", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

/// `billcl log`: the last `lines` lines of each instance's log file (all, or those named),
/// each line after its instance's name when there are several; with `follow`, then the lines
/// written after them as they come, across rotations, until interrupted.
pub fn show(config: &ClusterConfig, names: &[String], lines: usize, follow: bool) -> Result<()> {
    let logs = with_logs(config, names)?;
    let prefixed = logs.len() > 1;
    let mut tails = Vec::new();
    for (name, path) in &logs {
        let prefix = if prefixed {
            format!("{name}: ")
        } else {
            String::new()
        };
        let Ok(text) = std::fs::read(path) else {
            if !names.is_empty() {
                eprintln!("   {name}: no log file ({})", path.display());
            }
            tails.push(Tail::new(path.clone(), prefix, None));
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        for line in &all[all.len().saturating_sub(lines)..] {
            println!("{prefix}{line}");
        }
        let end = std::fs::metadata(path)
            .ok()
            .map(|m| (m.ino(), text.len() as u64));
        tails.push(Tail::new(path.clone(), prefix, end));
    }
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(FOLLOW_POLL);
        for tail in &mut tails {
            tail.print_new_lines();
        }
    }
}

/// A log file followed: where it was read to, in which file (a rotation renames it away and
/// the instance begins a new one under the same name).
struct Tail {
    path: PathBuf,
    prefix: String,
    /// (inode, bytes read) of the file last read.
    read: Option<(u64, u64)>,
    /// The end of a line not yet complete.
    partial: String,
}

impl Tail {
    fn new(path: PathBuf, prefix: String, read: Option<(u64, u64)>) -> Tail {
        Tail {
            path,
            prefix,
            read,
            partial: String::new(),
        }
    }

    fn print_new_lines(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        let Ok(meta) = file.metadata() else { return };
        let from = match self.read {
            // The same file, grown (or not): from where it was read to.
            Some((inode, read)) if inode == meta.ino() && meta.len() >= read => read,
            // A new file (rotated) or one cut shorter: from its start.
            _ => 0,
        };
        let mut new = Vec::new();
        if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut new).is_err() {
            return;
        }
        self.read = Some((meta.ino(), from + new.len() as u64));
        self.partial.push_str(&String::from_utf8_lossy(&new));
        while let Some(end) = self.partial.find('\n') {
            println!("{}{}", self.prefix, &self.partial[..end]);
            self.partial.drain(..=end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_name_carries_the_moment_and_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storage-a-001.log");
        let first = rotated_name(&path);
        let name = first.file_name().unwrap().to_string_lossy().to_string();
        // storage-a-001.log.20261207T235959Z
        assert!(name.starts_with("storage-a-001.log.20"), "{name}");
        assert!(
            name.ends_with('Z') && name.len() == "storage-a-001.log.".len() + 16,
            "{name}"
        );
        std::fs::write(&first, "x").unwrap();
        let second = rotated_name(&path);
        if second
            .to_string_lossy()
            .starts_with(&*first.to_string_lossy())
        {
            assert_eq!(second, PathBuf::from(format!("{}.1", first.display())));
        }
    }

    #[test]
    fn a_followed_log_reads_on_where_it_was_and_from_the_start_of_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "one\ntw").unwrap();
        let mut tail = Tail::new(path.clone(), String::new(), None);
        tail.print_new_lines();
        assert_eq!((tail.read.unwrap().1, tail.partial.as_str()), (6, "tw"));
        std::fs::rename(&path, dir.path().join("x.log.old")).unwrap();
        std::fs::write(&path, "new\n").unwrap();
        tail.print_new_lines();
        assert_eq!(tail.read.unwrap().1, 4, "read from the new file's start");
        assert_eq!(tail.partial, "", "tw + new\\n printed as one line");
    }
}
