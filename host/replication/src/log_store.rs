//! openraft's log storage (`RaftLogStorage` + `RaftLogReader`) over the [`DurableLog`]: the
//! adapter that turns openraft calls into log operations and log failures into
//! `StorageError`s (which stop the Raft node: a log that cannot be written is fatal).

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    StorageError, StorageIOError, Vote,
};
use tokio::sync::oneshot;

use crate::durable_log::{DurableLog, Entry};
use crate::{NodeId, OnDurable, TypeConfig};

/// A handle on the shared log; clones are the log readers of the replication tasks.
#[derive(Clone)]
pub(crate) struct LogStore {
    log: Arc<Mutex<DurableLog>>,
    /// The last entry whose `OnDurable` hook ran (`Replica::submit`).
    answered_on_disk: Arc<AtomicU64>,
}

impl LogStore {
    pub(crate) fn new(log: Arc<Mutex<DurableLog>>, answered_on_disk: Arc<AtomicU64>) -> Self {
        LogStore {
            log,
            answered_on_disk,
        }
    }

    fn lock(&self, verb: ErrorVerb) -> Result<MutexGuard<'_, DurableLog>, Poisoned> {
        self.log.lock().map_err(|_| Poisoned(verb))
    }
}

/// The log's lock was poisoned by a panic (a failed invariant): the log is not to be trusted.
struct Poisoned(ErrorVerb);

impl From<Poisoned> for StorageError<NodeId> {
    fn from(Poisoned(verb): Poisoned) -> Self {
        storage_error(ErrorSubject::Logs, verb, "the log lock is poisoned")
    }
}

fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    message: impl ToString,
) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::error(message)).into()
}

/// Waits for the writer to finish an operation.
async fn finished(
    receiver: oneshot::Receiver<io::Result<()>>,
    subject: ErrorSubject<NodeId>,
) -> Result<(), StorageError<NodeId>> {
    match receiver.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(storage_error(subject, ErrorVerb::Write, e)),
        Err(_) => Err(storage_error(
            subject,
            ErrorVerb::Write,
            "the log writer stopped",
        )),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        Ok(self.lock(ErrorVerb::Read)?.read(range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let log = self.lock(ErrorVerb::Read)?;
        Ok(LogState {
            last_purged_log_id: log.purged(),
            last_log_id: log.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let receiver = self
            .lock(ErrorVerb::Write)?
            .save_vote(*vote)
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        finished(receiver, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock(ErrorVerb::Read)?.vote())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.lock(ErrorVerb::Write)?
            .save_committed(committed)
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock(ErrorVerb::Read)?.committed())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut entries: Vec<Entry> = entries.into_iter().collect();
        // The hooks leave the entries here: the log keeps them cached without one.
        let hooks: Vec<(LogId<NodeId>, OnDurable)> = entries
            .iter_mut()
            .filter_map(|entry| match &mut entry.payload {
                EntryPayload::Normal(command) => {
                    Some((entry.log_id, std::mem::take(&mut command.1).take()?))
                }
                _ => None,
            })
            .collect();
        let answered_on_disk = self.answered_on_disk.clone();
        self.lock(ErrorVerb::Write)?
            .append(
                entries,
                Box::new(move |result| {
                    if result.is_ok() {
                        for (log_id, hook) in hooks {
                            answered_on_disk.fetch_max(log_id.index, Ordering::AcqRel);
                            hook(log_id.leader_id.term);
                        }
                    }
                    callback.log_io_completed(result)
                }),
            )
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let receiver = self
            .lock(ErrorVerb::Delete)?
            .truncate(log_id.index)
            .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))?;
        match receiver {
            Some(receiver) => finished(receiver, ErrorSubject::Log(log_id)).await,
            None => Ok(()),
        }
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let receiver = self
            .lock(ErrorVerb::Delete)?
            .purge(log_id)
            .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))?;
        match receiver {
            Some(receiver) => finished(receiver, ErrorSubject::Log(log_id)).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::state_machine::StateMachineStore;
    use crate::{Machine, SyncMode, LOG_SEGMENT_BYTES_MAX};

    /// Remembers the commands it applied.
    struct Recorder(Vec<Vec<u8>>);

    impl Machine for Recorder {
        fn apply(
            &mut self,
            _term: u64,
            _index: u64,
            command: &[u8],
        ) -> Result<Vec<u8>, crate::CannotApply> {
            self.0.push(command.to_vec());
            Ok(command.to_vec())
        }
        fn snapshot(&mut self) -> crate::SnapshotJob {
            let bytes = self.0.concat();
            Box::new(move |out| out.write_all(&bytes))
        }
        fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
            self.0 = vec![snapshot.to_vec()];
            Ok(())
        }
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore<Recorder>, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore<Recorder>), StorageError<NodeId>>
        {
            let dir = tempfile::tempdir().unwrap();
            let log = DurableLog::open(dir.path(), SyncMode::Fsync, LOG_SEGMENT_BYTES_MAX).unwrap();
            let state_machine =
                StateMachineStore::open(dir.path(), Recorder(Vec::new()), SyncMode::Fsync).unwrap();
            Ok((
                dir,
                LogStore::new(Arc::new(Mutex::new(log)), Arc::default()),
                state_machine,
            ))
        }
    }

    type S = Suite<TypeConfig, LogStore, StateMachineStore<Recorder>, Builder, tempfile::TempDir>;

    /// openraft's storage conformance suite (every case but one, see below), on the real files.
    #[test]
    fn passes_the_openraft_storage_suite() {
        let mut failed = Vec::new();
        check(
            &mut failed,
            "last_membership_in_log_initial",
            S::last_membership_in_log_initial,
        );
        check(
            &mut failed,
            "last_membership_in_log",
            S::last_membership_in_log,
        );
        check(
            &mut failed,
            "last_membership_in_log_multi_step",
            S::last_membership_in_log_multi_step,
        );
        check(
            &mut failed,
            "get_membership_initial",
            S::get_membership_initial,
        );
        check(
            &mut failed,
            "get_membership_from_log_and_empty_sm",
            S::get_membership_from_log_and_empty_sm,
        );
        check(
            &mut failed,
            "get_membership_from_empty_log_and_sm",
            S::get_membership_from_empty_log_and_sm,
        );
        check(
            &mut failed,
            "get_membership_from_log_le_sm_last_applied",
            S::get_membership_from_log_le_sm_last_applied,
        );
        check(
            &mut failed,
            "get_membership_from_log_gt_sm_last_applied_1",
            S::get_membership_from_log_gt_sm_last_applied_1,
        );
        check(
            &mut failed,
            "get_membership_from_log_gt_sm_last_applied_2",
            S::get_membership_from_log_gt_sm_last_applied_2,
        );
        check(
            &mut failed,
            "get_initial_state_without_init",
            S::get_initial_state_without_init,
        );
        // Left out: get_initial_state_membership_from_log_and_sm appends entry 1 below the purge
        // point (2) and then entry 3 after it, holes a real Raft never makes and that this log
        // refuses by design (see `durable_log::tests::append_refuses_a_hole`).
        check(
            &mut failed,
            "get_initial_state_with_state",
            S::get_initial_state_with_state,
        );
        check(
            &mut failed,
            "get_initial_state_last_log_gt_sm",
            S::get_initial_state_last_log_gt_sm,
        );
        check(
            &mut failed,
            "get_initial_state_last_log_lt_sm",
            S::get_initial_state_last_log_lt_sm,
        );
        check(
            &mut failed,
            "get_initial_state_log_ids",
            S::get_initial_state_log_ids,
        );
        check(
            &mut failed,
            "get_initial_state_re_apply_committed",
            S::get_initial_state_re_apply_committed,
        );
        check(&mut failed, "save_vote", S::save_vote);
        check(&mut failed, "get_log_entries", S::get_log_entries);
        check(
            &mut failed,
            "limited_get_log_entries",
            S::limited_get_log_entries,
        );
        check(&mut failed, "try_get_log_entry", S::try_get_log_entry);
        check(&mut failed, "initial_logs", S::initial_logs);
        check(&mut failed, "get_log_state", S::get_log_state);
        check(&mut failed, "get_log_id", S::get_log_id);
        check(&mut failed, "last_id_in_log", S::last_id_in_log);
        check(&mut failed, "last_applied_state", S::last_applied_state);
        check(&mut failed, "purge_logs_upto_0", S::purge_logs_upto_0);
        check(&mut failed, "purge_logs_upto_5", S::purge_logs_upto_5);
        check(&mut failed, "purge_logs_upto_20", S::purge_logs_upto_20);
        check(&mut failed, "delete_logs_since_11", S::delete_logs_since_11);
        check(&mut failed, "delete_logs_since_0", S::delete_logs_since_0);
        check(&mut failed, "append_to_log", S::append_to_log);
        check(&mut failed, "snapshot_meta", S::snapshot_meta);
        check(&mut failed, "apply_single", S::apply_single);
        check(&mut failed, "apply_multiple", S::apply_multiple);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        if let Err(e) = runtime.block_on(S::transfer_snapshot(&Builder)) {
            failed.push(format!("transfer_snapshot: {e}"));
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }

    fn check<F, Fu>(failed: &mut Vec<String>, name: &str, test: F)
    where
        F: Fn(LogStore, StateMachineStore<Recorder>) -> Fu,
        Fu: std::future::Future<Output = Result<(), StorageError<NodeId>>>,
    {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(async {
                let (_dir, store, state_machine) =
                    Builder.build().await.map_err(|e| e.to_string())?;
                test(store, state_machine).await.map_err(|e| e.to_string())
            })
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("{name}: {e}")),
            Err(_) => failed.push(format!("{name}: panicked")),
        }
    }
}
