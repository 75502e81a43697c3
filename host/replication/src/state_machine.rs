//! openraft's state machine storage (`RaftStateMachine` + `RaftSnapshotBuilder`) over a
//! [`Machine`]: applies committed entries, tracks the last applied log id and membership, and
//! keeps the latest snapshot in `dir/snapshot/current`.
//!
//! The state machine lives in memory; durability comes from the snapshot plus the log: on
//! start-up the latest snapshot is restored, then openraft re-applies the committed entries
//! after it.
//!
//! Snapshot file (a [`crate::durable_file`], replaced atomically): `header_len u32 LE |
//! header (bincode SnapshotMeta) | machine bytes`. Only a snapshot newer than the one on disk
//! replaces it.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, BasicNode, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership,
};

use crate::durable_file::{self, Read};
use crate::durable_log::Entry;
use crate::{
    codec, Answer, CannotApply, Error, Machine, NodeId, SnapshotJob, SyncMode, TypeConfig,
};

/// The snapshot header is at most this big (it holds the membership).
pub(crate) const SNAPSHOT_HEADER_BYTES_MAX: usize = 1 << 20;

pub(crate) type Meta = SnapshotMeta<NodeId, BasicNode>;

/// The snapshot file of one replica; writes are serialized and never go backwards.
pub(crate) struct SnapshotFile {
    pub(crate) path: PathBuf,
    durable: bool,
    /// The last log id of the snapshot on disk; guards writes.
    on_disk: Mutex<Option<LogId<NodeId>>>,
    /// The size of the state in the snapshot on disk (0 when there is none).
    pub(crate) state_bytes: std::sync::atomic::AtomicU64,
}

impl SnapshotFile {
    /// Writes `meta` and the state `job` serializes unless a snapshot at least as new is
    /// already on disk. Returns the state's bytes, or `None` when it did not write.
    fn write(&self, meta: &Meta, job: SnapshotJob) -> Result<Option<u64>, String> {
        let mut on_disk = self
            .on_disk
            .lock()
            .map_err(|_| "the snapshot lock is poisoned".to_string())?;
        if on_disk.is_some() && meta.last_log_id <= *on_disk {
            return Ok(None);
        }
        let header =
            codec::encode(meta).map_err(|e| format!("encoding the snapshot header: {e}"))?;
        let header_len = (header.len() as u32).to_le_bytes();
        let payload_bytes = durable_file::write_with(&self.path, self.durable, |out| {
            out.write_all(&header_len)?;
            out.write_all(&header)?;
            job(out)
        })
        .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        let state_bytes = payload_bytes - (header_len.len() + header.len()) as u64;
        *on_disk = meta.last_log_id;
        self.state_bytes
            .store(state_bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(state_bytes))
    }

    /// Reads and verifies the snapshot on disk.
    fn read(&self) -> Result<Option<(Meta, Vec<u8>)>, String> {
        let payload = match durable_file::read(&self.path)
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?
        {
            Read::Missing => return Ok(None),
            Read::Damaged(why) => return Err(format!("the snapshot is damaged: {why}")),
            Read::Payload(payload) => payload,
        };
        let (meta, state_at) =
            parse_snapshot(&payload).map_err(|why| format!("{}: {why}", self.path.display()))?;
        let data = payload[state_at..].to_vec();
        Ok(Some((meta, data)))
    }
}

/// The header of a snapshot file's payload, and where the machine's bytes start in it.
pub(crate) fn parse_snapshot(payload: &[u8]) -> Result<(Meta, usize), String> {
    let header_len = payload
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("too short")?;
    let header = payload.get(4..4 + header_len).ok_or("the header is cut")?;
    let meta: Meta =
        codec::decode(header, SNAPSHOT_HEADER_BYTES_MAX).map_err(|e| format!("bad header: {e}"))?;
    Ok((meta, 4 + header_len))
}

/// A replica's snapshot file in its directory `dir`.
pub(crate) fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot").join("current")
}

/// The last log id of the snapshot in the replica directory `dir`, if there is one.
pub(crate) fn snapshot_last_log_id(dir: &Path) -> Result<Option<LogId<NodeId>>, Error> {
    let file = SnapshotFile {
        path: dir.join("snapshot").join("current"),
        durable: false,
        on_disk: Mutex::new(None),
        state_bytes: Default::default(),
    };
    Ok(file
        .read()
        .map_err(Error::Corrupt)?
        .and_then(|(meta, _)| meta.last_log_id))
}

/// Runs CPU-bound work (a long wasm call, compiling a module, serializing or restoring a
/// whole state: tens of ms per 100,000 accounts) so that it does not hold up the other tasks
/// of its tokio worker — heartbeats, votes, calls; a node may run a single worker. On a
/// multi-thread runtime's worker via `block_in_place` (its queue moves to another thread: a
/// thread hand-off, worth it for work longer than about a hundred microseconds, see
/// [`briefly_inline`]); anywhere else, directly.
pub fn off_the_async_workers<T>(work: impl FnOnce() -> T) -> T {
    if !on_an_async_worker() {
        return work();
    }
    tokio::task::block_in_place(|| {
        struct Back;
        impl Drop for Back {
            fn drop(&mut self) {
                OFF_THE_WORKERS.set(false);
            }
        }
        OFF_THE_WORKERS.set(true);
        let _back = Back;
        work()
    })
}

thread_local! {
    /// Set while this thread runs work [`off_the_async_workers`].
    static OFF_THE_WORKERS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is a multi-thread tokio runtime's (and not running work
/// [`off_the_async_workers`]): where only short work may run.
pub fn on_an_async_worker() -> bool {
    !OFF_THE_WORKERS.get()
        && tokio::runtime::Handle::try_current().is_ok_and(|handle| {
            handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        })
}

/// How long a batch of calls may run on an async worker before the rest of it moves off the
/// workers ([`briefly_inline`]).
pub const INLINE_BATCH_TIME: std::time::Duration = std::time::Duration::from_micros(500);

/// Runs `step` on each item, on the async worker while the items have taken less than
/// [`INLINE_BATCH_TIME`] in all, then the rest [`off_the_async_workers`]; stops early when
/// `step` breaks. A batch of short calls (tens of microseconds) costs no thread hand-off —
/// on a small virtual machine each one was a fifth of the context switches a write cost
/// (docs/performance-history.md) — and a long one holds the worker at most that long plus one
/// call's inline slice.
pub fn briefly_inline<I: Iterator>(
    items: &mut I,
    mut step: impl FnMut(I::Item) -> std::ops::ControlFlow<()>,
) {
    use std::ops::ControlFlow::{Break, Continue};
    let started = std::time::Instant::now();
    let inline = items.try_for_each(|item| match step(item) {
        Break(()) => Break(false),
        Continue(()) if started.elapsed() >= INLINE_BATCH_TIME => Break(true),
        Continue(()) => Continue(()),
    });
    if inline == Break(true) {
        off_the_async_workers(|| {
            let _ = items.try_for_each(step);
        });
    }
}

/// The Raft side of the [`Machine`].
pub(crate) struct StateMachineStore<M: Machine> {
    machine: M,
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
    snapshot_file: Arc<SnapshotFile>,
    /// Set once, when the machine cannot apply an entry: why this member stopped applying.
    halted: Arc<std::sync::OnceLock<String>>,
}

impl<M: Machine> StateMachineStore<M> {
    /// Opens `dir/snapshot` (creating it) and restores the latest snapshot into `machine`.
    pub(crate) fn open(dir: &Path, mut machine: M, sync: SyncMode) -> Result<Self, Error> {
        let snapshot_dir = dir.join("snapshot");
        std::fs::create_dir_all(&snapshot_dir).map_err(|source| Error::Io {
            action: "create snapshot directory",
            path: snapshot_dir.clone(),
            source,
        })?;
        let path = snapshot_dir.join("current");
        let mut snapshot_file = SnapshotFile {
            path,
            durable: sync == SyncMode::Fsync,
            on_disk: Mutex::new(None),
            state_bytes: Default::default(),
        };
        let (last_applied, last_membership) = match snapshot_file.read().map_err(Error::Corrupt)? {
            Some((meta, data)) => {
                let started = std::time::Instant::now();
                machine.restore(&data).map_err(Error::Restore)?;
                tracing::info!(
                    snapshot = %meta,
                    bytes = data.len(),
                    restore_ms = started.elapsed().as_millis() as u64,
                    "restored the state machine from the snapshot"
                );
                snapshot_file.on_disk = Mutex::new(meta.last_log_id);
                snapshot_file.state_bytes = (data.len() as u64).into();
                (meta.last_log_id, meta.last_membership)
            }
            None => (None, StoredMembership::default()),
        };
        Ok(StateMachineStore {
            machine,
            last_applied,
            last_membership,
            snapshot_file: Arc::new(snapshot_file),
            halted: Default::default(),
        })
    }

    /// Why this member stopped applying the log, once it has (shared with the [`Replica`]).
    ///
    /// [`Replica`]: crate::Replica
    pub(crate) fn halted(&self) -> Arc<std::sync::OnceLock<String>> {
        self.halted.clone()
    }

    /// Fail-stop: the entry at `log_id` cannot be applied here, so nothing after it is either.
    /// The error stops openraft's node (its storage failed): no vote, no append, no apply, no
    /// snapshot, until the process restarts, and reads are refused ([`crate::Replica::halted`]).
    /// The state in memory is rebuilt from the snapshot and the log at the next start, so the
    /// entries of this batch applied before it are not lost, only applied again.
    fn halt(&self, log_id: LogId<NodeId>, why: String) -> StorageError<NodeId> {
        let reason = format!("stopped applying the log at entry {}: {why}", log_id.index);
        tracing::error!(%log_id, "{reason}");
        let _ = self.halted.set(reason.clone());
        StorageIOError::apply(log_id, AnyError::error(reason)).into()
    }

    /// The snapshot file, shared with the builders (and the snapshot trigger).
    pub(crate) fn snapshot_file(&self) -> Arc<SnapshotFile> {
        self.snapshot_file.clone()
    }

    fn meta(&self) -> Meta {
        let snapshot_id = match self.last_applied {
            Some(log_id) => format!(
                "{}-{}-{}",
                log_id.leader_id.term, log_id.leader_id.node_id, log_id.index
            ),
            None => "empty".to_string(),
        };
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id,
        }
    }
}

/// The nice value of the thread that serializes and writes a snapshot. A snapshot of a large
/// state takes up to about a second of CPU on each member, every few tens of seconds under
/// load; at the normal priority it took a core from the write path meanwhile, and calls
/// waited. At this value it runs on what the write path leaves (at nice 10 a thread weighs
/// about a tenth of a normal one), and it still runs when the machine is busy: snapshots are
/// never starved.
pub const SNAPSHOT_THREAD_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`SNAPSHOT_THREAD_NICE`], or leaves it
/// where it is if that is lower already (on Linux, `setpriority` of a thread id applies to
/// that thread alone). Failure is logged: the snapshot is built all the same.
fn lower_this_threads_priority() {
    // SAFETY: plain syscalls about the calling thread.
    let done = unsafe {
        let thread = libc::gettid() as libc::id_t;
        // Never raised: a node started niced further keeps its snapshots at its own nice.
        let current = libc::getpriority(libc::PRIO_PROCESS, thread);
        libc::setpriority(
            libc::PRIO_PROCESS,
            thread,
            current.max(SNAPSHOT_THREAD_NICE),
        )
    };
    if done != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the snapshot thread's priority; building it at the normal one"
        );
    }
}

/// Builds one snapshot from the state captured when it was asked for.
pub(crate) struct SnapshotBuilder {
    meta: Meta,
    /// Serializes the captured state; taken by the (single) build.
    job: Option<SnapshotJob>,
    snapshot_file: Arc<SnapshotFile>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let meta = self.meta.clone();
        let job = self.job.take();
        let file = self.snapshot_file.clone();
        let (built, finished) = tokio::sync::oneshot::channel();
        let build = move || {
            lower_this_threads_priority();
            let started = std::time::Instant::now();
            let job = job.ok_or("the snapshot was already built")?;
            match file.write(&meta, job)? {
                Some(bytes) => tracing::info!(
                    snapshot = %meta,
                    bytes,
                    build_ms = started.elapsed().as_millis() as u64,
                    "built a snapshot"
                ),
                None => tracing::info!(
                    snapshot = %meta,
                    "a snapshot at least as new is on disk already; this one is not written"
                ),
            }
            Ok::<_, String>(meta)
        };
        // A thread of its own, niced: the tokio blocking pool's threads are reused for work
        // that must not run at a low priority.
        let spawned = std::thread::Builder::new()
            .name("billcl-snapshot".into())
            .spawn(move || {
                let _ = built.send(build());
            });
        let meta = match spawned {
            Ok(_) => finished
                .await
                .map_err(|_| "the snapshot thread stopped".to_string())
                .and_then(|result| result),
            Err(e) => Err(format!("cannot start the snapshot thread: {e}")),
        }
        .map_err(|e| {
            StorageIOError::write_snapshot(Some(self.meta.signature()), AnyError::error(e))
        })?;
        // Openraft takes only the meta of a snapshot it had built (the state machine worker
        // answers `BuildSnapshot` with `snap.meta`); the data is read from the file when a
        // follower needs it ([`RaftStateMachine::get_current_snapshot`]).
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl<M: Machine> RaftStateMachine<TypeConfig> for StateMachineStore<M> {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Answer>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut answers = Vec::with_capacity(entries.size_hint().0);
        for entry in entries {
            assert!(
                self.last_applied
                    .is_none_or(|applied| entry.log_id.index > applied.index),
                "entry {} applied after {:?}",
                entry.log_id,
                self.last_applied
            );
            let answer = match entry.payload {
                EntryPayload::Normal(command) => {
                    let applied = self.machine.apply(
                        entry.log_id.leader_id.term,
                        entry.log_id.index,
                        &command.0,
                    );
                    match applied {
                        Ok(answer) => answer,
                        Err(CannotApply(why)) => return Err(self.halt(entry.log_id, why)),
                    }
                }
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Membership(membership) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
            };
            self.last_applied = Some(entry.log_id);
            answers.push(Answer(answer));
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // On the apply path, so only the capture (copy-on-write: cheap) happens here; the
        // state is serialized and written off it, in `build_snapshot`.
        let started = std::time::Instant::now();
        let job = self.machine.snapshot();
        tracing::info!(
            apply_path_stall_us = started.elapsed().as_micros() as u64,
            "captured the state for a snapshot"
        );
        SnapshotBuilder {
            meta: self.meta(),
            job: Some(job),
            snapshot_file: self.snapshot_file.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let signature = || Some(meta.signature());
        off_the_async_workers(|| self.machine.restore(&data)).map_err(|e| {
            StorageIOError::write_snapshot(signature(), AnyError::error(format!("restore: {e}")))
        })?;
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        let file = self.snapshot_file.clone();
        let owned_meta = meta.clone();
        let job: SnapshotJob = Box::new(move |out| out.write_all(&data));
        tokio::task::spawn_blocking(move || file.write(&owned_meta, job))
            .await
            .map_err(|e| e.to_string())
            .and_then(|result| result)
            .map_err(|e| StorageIOError::write_snapshot(signature(), AnyError::error(e)))?;
        tracing::info!(snapshot = %meta, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let file = self.snapshot_file.clone();
        let snapshot = tokio::task::spawn_blocking(move || file.read())
            .await
            .map_err(|e| e.to_string())
            .and_then(|result| result)
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)))?;
        Ok(snapshot.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_threads_nice() -> i32 {
        // SAFETY: plain syscalls about the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn only_the_snapshot_thread_runs_at_a_lower_priority() {
        let before = this_threads_nice();
        let lowered = std::thread::spawn(|| {
            lower_this_threads_priority();
            this_threads_nice()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, SNAPSHOT_THREAD_NICE.max(before));
        assert_eq!(
            this_threads_nice(),
            before,
            "the caller's own thread kept its priority"
        );
    }

    /// Short items run on the worker itself; once the batch has taken INLINE_BATCH_TIME the
    /// rest runs off the workers, where a long item no longer holds the worker's other tasks.
    #[test]
    fn a_batch_runs_on_the_worker_until_it_has_taken_its_inline_time() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let places = runtime.block_on(async {
            tokio::spawn(async {
                assert!(on_an_async_worker());
                let mut places = Vec::new();
                let mut items = 0..6;
                briefly_inline(&mut items, |item| {
                    places.push((item, on_an_async_worker()));
                    if item == 2 {
                        std::thread::sleep(INLINE_BATCH_TIME);
                    }
                    std::ops::ControlFlow::Continue(())
                });
                assert!(on_an_async_worker(), "back on the worker afterwards");
                // A step that breaks ends the batch there.
                let mut items = 0..6;
                let mut seen = 0;
                briefly_inline(&mut items, |item| {
                    seen += 1;
                    if item == 1 {
                        std::ops::ControlFlow::Break(())
                    } else {
                        std::ops::ControlFlow::Continue(())
                    }
                });
                assert_eq!((seen, items.next()), (2, Some(2)));
                places
            })
            .await
            .unwrap()
        });
        let expected: Vec<_> = (0..6).map(|item| (item, item <= 2)).collect();
        assert_eq!(places, expected);
        // Off any runtime, everything runs where it is called.
        assert!(!on_an_async_worker());
        assert_eq!(off_the_async_workers(|| 7), 7);
    }
}
