//! The CPU priority of learners.
//!
//! A learner (an asynchronous replica, `voter = false`) is on no write's path: nobody waits for
//! it to append or apply. On a host it shares with leaders and routers (the default cluster
//! runs all five instances on one machine, as many vshard deployments put one replicaset's
//! master beside another's replica), every thread wake-up it takes is taken from a call that
//! is waiting. So a learner runs its threads at `[replication] learner_nice` (19 unless the
//! cluster file says otherwise): it gets the CPU the others leave, which on the default cluster
//! is enough to stay within a few milliseconds of its leader at the cluster's peak, and the
//! leaders and the router get the rest (docs/performance-history.md, "A sixth machine": 13 % or
//! more add_money at peak in every alternated pair, and a lower p99 below it in most). Replica
//! reads are served by the learner, so a cluster that sends most reads to replicas on a shared
//! host may prefer `learner_nice = 0`.
//!
//! The value follows the member's role, not only the cluster file: a node that the Raft
//! membership makes a voter (`billcl failover --to`) goes back to the nice it was started with
//! (0 unless the operator started it niced), and a voter made a learner takes `learner_nice`
//! (or its own, if that is higher). Lowering a nice value needs `CAP_SYS_NICE` (root) or a
//! raised `RLIMIT_NICE`; without it a promoted learner keeps its nice and says so in its log
//! until it is restarted (the cluster file then names it a voter).
//!
//! On Linux a nice value belongs to a thread, and a new thread takes its creator's: the node
//! sets it on its main thread before the async runtime starts ([`start_as`]), and
//! [`follow_role`] moves every thread of the process when the role changes.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::config::{ClusterConfig, Role};
use crate::storage::StorageNode;

/// The nice value of learners unless `[replication] learner_nice` says otherwise.
pub const LEARNER_NICE_DEFAULT: i32 = 19;
/// A storage node compares its threads' priority with its role whenever the Raft membership or
/// its state changes, and at least this often besides (a missed change, a thread that was
/// created by one not yet moved).
const ROLE_RECHECK_MS: u64 = 5_000;

/// The nice value the process was started with: what a voter runs at.
static STARTED_AT: OnceLock<i32> = OnceLock::new();

fn started_at() -> i32 {
    *STARTED_AT.get_or_init(|| {
        // SAFETY: a plain syscall about the calling thread.
        thread_nice(unsafe { libc::gettid() }).unwrap_or(0)
    })
}

/// The nice value of a member of `role`, for a process started at `started_at`.
fn role_nice(voter: bool, started_at: i32, learner_nice: i32) -> i32 {
    if voter {
        started_at
    } else {
        started_at.max(learner_nice)
    }
}

/// Called on the main thread of `billcl run INSTANCE` before the async runtime starts, so that
/// every thread of a learner takes its priority: remembers the nice value the process was
/// started with and, if the cluster file makes `instance` a learner, moves to `learner_nice`.
pub fn start_as(config: &ClusterConfig, instance: &str) -> io::Result<()> {
    let started_at = started_at();
    let Ok(me) = config.instance(instance) else {
        return Ok(());
    };
    if let Role::Storage { voter: false, .. } = me.role {
        let nice = role_nice(false, started_at, config.replication.learner_nice);
        if nice != started_at {
            // SAFETY: a plain syscall about the calling thread.
            set_thread(unsafe { libc::gettid() }, nice)?;
        }
    }
    Ok(())
}

fn set_thread(thread: libc::pid_t, nice: i32) -> io::Result<()> {
    // SAFETY: plain syscalls; an exited thread is an error (ESRCH), not undefined behaviour.
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, nice) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The nice value of one thread of this process, if it still runs.
fn thread_nice(thread: libc::pid_t) -> Option<i32> {
    crate::process::stat_nice(
        &std::fs::read_to_string(format!("/proc/self/task/{thread}/stat")).ok()?,
    )
}

/// Moves every thread of this process to `nice`; a snapshot thread stays at least at
/// [`billcl_replication::SNAPSHOT_THREAD_NICE`]. Returns how many threads it changed. A thread
/// already at `nice` is left alone without looking further (the steady case, every
/// role check): a snapshot thread is never below its own nice, so it is never there.
fn set_every_thread(nice: i32) -> io::Result<usize> {
    let mut changed = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Some(thread) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Some(current) = thread_nice(thread).filter(|current| *current != nice) else {
            continue;
        };
        let snapshot = std::fs::read_to_string(format!("/proc/self/task/{thread}/comm"))
            .is_ok_and(|name| name.trim_end() == "billcl-snapshot");
        let target = if snapshot {
            nice.max(billcl_replication::SNAPSHOT_THREAD_NICE)
        } else {
            nice
        };
        if current != target {
            match set_thread(thread, target) {
                Ok(()) => changed += 1,
                // The thread ended between the listing and now.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(changed)
}

/// Keeps this storage node's threads at `learner_nice` while the Raft membership makes it a
/// learner and at the nice it was started with while it makes it a voter, for as long as the
/// node runs. Woken by role changes, not by writes: a learner made voter takes its nice back
/// as soon as it learns the new membership.
pub async fn follow_role(node: Arc<StorageNode>, learner_nice: i32) {
    let started_at = started_at();
    let mut changes = node.role_changes();
    let mut warned = false;
    loop {
        if let Some(voter) = node.is_voter() {
            let nice = role_nice(voter, started_at, learner_nice);
            match set_every_thread(nice) {
                Ok(0) => {}
                Ok(changed) => {
                    tracing::info!(nice, changed, voter, "threads moved to the role's priority");
                    warned = false;
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(
                        nice,
                        "this member is now a {} but its threads cannot take nice {nice} ({e}): \
                         lowering a nice value needs CAP_SYS_NICE; restart the instance to run \
                         it at the priority of its role",
                        if voter { "voter" } else { "learner" }
                    );
                }
                Err(_) => {}
            }
        }
        tokio::select! {
            changed = changes.changed() => if !changed { return },
            () = tokio::time::sleep(Duration::from_millis(ROLE_RECHECK_MS)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_runs_as_started_and_a_learner_never_above_it() {
        assert_eq!(role_nice(true, 0, 19), 0);
        assert_eq!(role_nice(false, 0, 19), 19);
        assert_eq!(role_nice(false, 0, 0), 0);
        // An operator who started the node niced keeps that nice, learner or voter.
        assert_eq!(role_nice(true, 5, 19), 5);
        assert_eq!(role_nice(false, 15, 10), 15);
    }

    #[test]
    fn a_thread_started_by_a_niced_thread_takes_its_nice() {
        // A thread of its own, so that the test's runner threads keep their priority.
        std::thread::spawn(|| {
            // SAFETY: plain syscalls about the calling thread.
            let me = unsafe { libc::gettid() };
            let before = thread_nice(me).unwrap();
            set_thread(me, before.max(7)).unwrap();
            assert_eq!(thread_nice(me), Some(before.max(7)));
            let child = std::thread::spawn(|| thread_nice(unsafe { libc::gettid() }))
                .join()
                .unwrap();
            assert_eq!(child, Some(before.max(7)));
        })
        .join()
        .unwrap();
    }
}
