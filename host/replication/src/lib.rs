//! billcl-replication: one openraft group per replicaset.
//!
//! This crate exists so that the node can replicate *commands* without knowing how: it
//! replicates opaque command bytes to a [`Machine`] on every member and moves opaque RPC bytes
//! over a [`Transport`]. It knows nothing of wasm, QUIC or billing.
//!
//! The parts, bottom-up:
//! - `durable_log` (with `log_writer`): checksummed segment files with a group-commit writer
//!   thread, the vote, committed and purge-point files;
//! - `log_store`: openraft's `RaftLogStorage` over the durable log;
//! - `state_machine`: openraft's `RaftStateMachine` over a [`Machine`], with snapshot files;
//! - `network`: openraft's `RaftNetwork` over a [`Transport`], and the RPC codec;
//! - `backup`: a snapshot file copied out, and a replica directory made from a copy;
//! - [`Replica`] (this file): the small API the node uses.

mod backup;
mod codec;
mod durable_file;
mod durable_log;
mod failover;
mod log_store;
mod log_writer;
mod network;
mod state_machine;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy};

pub use crate::backup::{
    read_snapshot, read_snapshot_part, replica_snapshot_path, restore_snapshot, SnapshotCopy,
};
use crate::durable_log::DurableLog;
pub use crate::durable_log::{read_log, LoggedEntry, LoggedPayload};
pub use crate::failover::{promote_offline, Promotion, WRITES_HOLD_MS_MAX};
pub use crate::state_machine::{
    briefly_inline, off_the_async_workers, on_an_async_worker, INLINE_BATCH_TIME,
    SNAPSHOT_THREAD_NICE,
};

/// Identifies a member of a replicaset (stable across restarts).
pub type NodeId = u64;

/// Serializes a state captured by [`Machine::snapshot`] into the snapshot file as it goes
/// (no buffer of the whole state: a snapshot is tens of MB, and fresh memory that size cost
/// its page faults on a busy machine; docs/performance-history.md, "Fresh memory, and the
/// log's chores").
pub type SnapshotJob =
    Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + Sync>;

/// Segment files are rolled once they would grow past this size.
pub const LOG_SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// A command larger than this is refused by [`Replica::propose`] (it must fit one RPC with
/// room to spare: a deployed wasm module is one command).
pub const COMMAND_BYTES_MAX: usize = 16 << 20;
/// The largest RPC message this crate sends or accepts. A [`Transport`] must be able to carry
/// messages (and answers) of this size; AppendEntries batches are split to stay below it.
pub const RPC_BYTES_MAX: usize = 32 << 20;
const _: () = assert!(
    COMMAND_BYTES_MAX + (1 << 20) < RPC_BYTES_MAX,
    "one command must fit one RPC"
);

/// How long [`Replica::propose`] and [`Replica::read_barrier`] wait for a quorum.
pub const PROPOSE_WAIT_MS_MAX: u64 = 10_000;
/// How many log entries are kept behind the latest snapshot (for followers slightly behind).
pub const LOG_KEEP_AFTER_SNAPSHOT_ENTRIES: u64 = 1000;
/// How long [`Replica::start`] waits for the Raft task's first status.
const STARTUP_METRICS_WAIT_MS: u64 = 1000;
/// The pause between two attempts of [`Replica::initialize`].
const INITIALIZE_RETRY_MS: u64 = 200;
/// How often a learner that is not a member of its replicaset yet asks the voters to add it
/// ([`Replica::initialize`]).
pub const JOIN_RETRY_MS: u64 = 500;
/// How long a founder waits for each member's answer to its probe, and a learner for each
/// voter's answer to its join ([`Replica::initialize`]).
const FOUND_PROBE_TIMEOUT_MS: u64 = 1000;
/// How often a founder that waits for members to answer says so in its log.
const FOUND_WAIT_LOG_MS: u64 = 5000;
/// How often a replica checks whether its log calls for a snapshot (see
/// [`ReplicaConfig::snapshot_entries`]).
const SNAPSHOT_CHECK_MS: u64 = 200;
/// A replica snapshots once the entries and the log bytes since its last snapshot reach
/// between one and two times `snapshot_entries` and that snapshot's state bytes, the ratio
/// drawn afresh (in steps of 1/SNAPSHOT_SPREAD_STEPS) for each snapshot. Every storage of a
/// cluster sees the same log under a uniform load, and with one fixed ratio all of them
/// reached it together and wrote their snapshots at the same moment to the one disk, every
/// log `fdatasync` waiting behind all of them (docs/performance-history.md, "Snapshots and the
/// disk: the worst stalls"). Drawn, they write at different moments, and on average a third
/// less (1.5 states of log per snapshot).
pub const SNAPSHOT_SPREAD_STEPS: u64 = 1024;

/// The replicated state machine the node implements. Deterministic: the same commands in the
/// same order give the same state and answers on every member.
pub trait Machine: Send + Sync + 'static {
    /// Apply one committed command (the term of the leader that appended it, and its log
    /// index, given). The answer goes back to the proposer.
    ///
    /// [`CannotApply`] when this build cannot apply the command at all (a newer build's
    /// command kind): the member then stops applying — it halts — rather than skip the entry
    /// and differ from the members that applied it ([`Replica::halted`]).
    fn apply(&mut self, term: u64, index: u64, command: &[u8]) -> Result<Vec<u8>, CannotApply>;
    /// Capture the whole state for a snapshot. Called on the apply path, so it should be
    /// cheap (a copy-on-write capture); the job it returns serializes what it captured and
    /// runs on a blocking thread while entries keep being applied.
    fn snapshot(&mut self) -> SnapshotJob;
    /// Replace the whole state from a snapshot.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
}

/// Why a [`Machine`] cannot apply a committed command, said so that an operator knows what
/// to do (typically: run a newer build on this member). Every later entry waits behind it: the
/// member halts with this reason, and applies the log on from that entry once restarted
/// with a build that can.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CannotApply(pub String);

/// Moves one opaque RPC to a peer and returns its opaque answer (the node does it over QUIC).
///
/// Contract: `message` is at most [`RPC_BYTES_MAX`] bytes; the peer passes it to its
/// [`Replica::handle`] and the bytes that returns are the answer. An `Err` means the message
/// may not have arrived (the peer is treated as unreachable and retried with back-off).
pub trait Transport: Send + Sync + 'static {
    fn send(
        &self,
        target: NodeId,
        address: &str,
        message: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, String>> + Send;
}

/// How hard the log is pushed to disk, like Tarantool's `wal_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// `fsync` (sync_data) once per group commit before acknowledging.
    #[default]
    Fsync,
    /// `write()` every append, never sync: survives a process crash, not a power loss.
    Write,
    /// Buffered, flushed once per group commit, never synced.
    None,
}

/// One member of the replicaset as configured.
#[derive(Clone, Debug)]
pub struct Member {
    /// Where peers reach it (handed to [`Transport::send`]).
    pub address: String,
    /// Voters elect the leader and form the quorum; learners replicate asynchronously and, as
    /// configured here, never campaign on their own (a hand-over to one tells it to).
    pub voter: bool,
}

/// What a [`Replica`] needs to start.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub node_id: NodeId,
    /// Holds `log/`, `snapshot/` and the small state files; one directory per replica.
    pub dir: PathBuf,
    pub members: BTreeMap<NodeId, Member>,
    pub sync: SyncMode,
    /// Leader heartbeat interval (typically 100).
    pub heartbeat_ms: u64,
    /// Minimum election timeout; the actual one is random in `min..2*min` (typically 1000).
    pub election_timeout_ms: u64,
    /// Build a snapshot once this many entries (typically 10_000) were applied since the last
    /// one *and* the log appended since then is as large as the state the last one held, both
    /// times a ratio in 1..2 drawn for each snapshot (so that members do not all write theirs
    /// at once: [`SNAPSHOT_SPREAD_STEPS`]), as Tarantool checkpoints after
    /// `checkpoint_wal_threshold` bytes of WAL: writing the state then costs at most what
    /// writing that log did, however small the entries are (a lightly loaded replicaset writes
    /// one call per entry, and rewrote its whole state, idempotency window included, every few
    /// seconds), and start-up replays at most about two states' worth of log.
    pub snapshot_entries: u64,
    /// The leader sends each learner what it logged at most once per this many milliseconds
    /// (0: as soon as it is logged). A learner is outside the quorum, so no write waits for
    /// it; sent a few entries at a time it appends and syncs them in one go instead of one by
    /// one, and costs about half the CPU per write under load. It lags up to this much more:
    /// replica reads, and what `failover --force` can lose. Voters are never held back.
    pub learner_batch_ms: u64,
}

/// A snapshot of what this member knows about the group.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub node_id: NodeId,
    /// leader | follower | learner | candidate | shutdown | halted
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    /// The size of the state in that snapshot (0 when there is none).
    pub snapshot_bytes: u64,
    /// Every member of the current membership, with its voter flag.
    pub members: Vec<(NodeId, bool)>,
    /// Leader only: the last log index known to be replicated to each member.
    pub matched: BTreeMap<NodeId, Option<u64>>,
    /// Why this member serves nothing ([`Replica::halted`]); `role` is "halted" then.
    pub halted: Option<String>,
    /// While this member waits to found its replicaset ([`Replica::initialize`]): the members
    /// that have not answered yet whether they hold Raft state. Empty otherwise.
    pub waiting_to_found: Vec<NodeId>,
    /// What its log writer did since the member started.
    pub log: LogCounters,
}

/// What a member's log writer did since it started (counters: they only grow).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LogCounters {
    /// Batches of appends made durable together (one `fdatasync` each with `sync = "fsync"`).
    pub group_commits: u64,
    /// `fdatasync`s of log segments, and the seconds they took in all.
    pub syncs: u64,
    pub sync_seconds: f64,
    /// Bytes of entries written to the log.
    pub bytes_written: u64,
}

/// Why a proposal or a read barrier did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader")]
    NotLeader {
        leader: Option<NodeId>,
        address: Option<String>,
    },
    /// No quorum (read barrier), or the replica is shutting down before taking the command:
    /// nothing was done.
    #[error("replication unavailable: {0}")]
    Unavailable(String),
    /// The command was handed to Raft but no answer came within [`PROPOSE_WAIT_MS_MAX`] (or
    /// the replica stopped meanwhile): it may or may not be applied. Retry only with an
    /// idempotency key, or read before retrying.
    #[error("outcome unknown: {0}")]
    Uncertain(String),
    /// The replica cannot take this (a broken log, an oversized command).
    #[error("replication failed: {0}")]
    Fatal(String),
}

/// The crate's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid replica config: {0}")]
    Config(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt replica data: {0}")]
    Corrupt(String),
    #[error("the snapshot could not be restored into the state machine: {0}")]
    Restore(String),
    #[error("log: {0}")]
    Log(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("the replica is shut down")]
    Stopped,
    /// This member would found its replicaset (its lowest voter, holding no Raft state), but
    /// member `holder` already belongs to it: this member's data was lost (a new disk, a
    /// removed directory), and founding would start a second, empty replicaset in place of
    /// the one that exists, which its other members would then follow.
    #[error(
        "node {node_id} holds no Raft state, but node {holder} already belongs to the \
         replicaset (term {term}, log up to index {}): node {node_id}'s data was lost, and it \
         does not found a new, empty replicaset in place of the existing one",
        last_log_index.map_or("none".to_string(), |index| index.to_string())
    )]
    DataLost {
        node_id: NodeId,
        holder: NodeId,
        term: u64,
        last_log_index: Option<u64>,
        /// The voters of the membership `holder` knows.
        voters: Vec<NodeId>,
    },
}

/// The bytes of a command, as stored in the log (openraft's `D`), and, on the leader that
/// submitted it, what to run once it is on disk there ([`Replica::submit`]; never stored or
/// sent: the encoding is the bytes alone).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Command(
    #[serde(with = "codec::bytes")] pub Vec<u8>,
    #[serde(skip)] pub DurableHook,
);

#[cfg(test)]
impl Command {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Command(bytes, DurableHook::default())
    }
}

impl PartialEq for Command {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Command {}

/// Runs once, on the log's writer thread, when the entry it was submitted with is on this
/// member's disk (as the `sync` mode has it), with the term the entry was appended in. See
/// [`Replica::submit`].
pub type OnDurable = Box<dyn FnOnce(u64) + Send>;

/// An [`OnDurable`] riding along its entry in memory, run at most once (clones of the entry
/// share it).
#[derive(Clone, Default)]
pub(crate) struct DurableHook(Option<Arc<Mutex<Option<OnDurable>>>>);

impl DurableHook {
    fn new(hook: OnDurable) -> Self {
        DurableHook(Some(Arc::new(Mutex::new(Some(hook)))))
    }

    /// The hook, if there is one not taken yet.
    pub(crate) fn take(&self) -> Option<OnDurable> {
        self.0.as_ref()?.lock().ok()?.take()
    }
}

impl std::fmt::Debug for DurableHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "DurableHook" } else { "-" })
    }
}

/// The bytes a [`Machine`] answered (openraft's `R`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Answer(#[serde(with = "codec::bytes")] pub Vec<u8>);

/// Wakes when this member's role may have changed: see [`Replica::role_changes`].
pub struct RoleChanges(
    tokio::sync::watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, BasicNode>>,
);

impl RoleChanges {
    /// Resolves when the member's state, vote, leader or membership changed since the last
    /// call (or since [`Replica::role_changes`]); `false` once the Raft task has stopped.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// A command handed to the Raft task by [`Replica::submit`], its answer still to come.
pub struct Submitted(tokio::sync::oneshot::Receiver<openraft::raft::ClientWriteResult<TypeConfig>>);

openraft::declare_raft_types!(
    /// The openraft type configuration of every billcl replicaset.
    pub(crate) TypeConfig:
        D = Command,
        R = Answer,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// One member of a replicaset: a running openraft node over the durable log, the state machine
/// store and the network. `Send + Sync`, used behind `Arc`.
pub struct Replica<M: Machine, T: Transport> {
    raft: Raft<TypeConfig>,
    node_id: NodeId,
    members: BTreeMap<NodeId, Member>,
    log: Arc<Mutex<DurableLog>>,
    log_stats: Arc<log_writer::LogStats>,
    snapshot_file: Arc<state_machine::SnapshotFile>,
    /// Admits [`Replica::propose`]'s commands to the Raft task, or refuses them while
    /// leadership is being handed over (see `failover.rs`).
    write_gate: failover::WriteGate,
    /// The last entry whose [`OnDurable`] ran (see [`Replica::submit`]).
    answered_on_disk: Arc<AtomicU64>,
    /// Why the state machine stopped applying the log, once it has.
    halted: Arc<std::sync::OnceLock<String>>,
    /// The way to the other members (shared with openraft's network), for the founder's probe.
    transport: Arc<T>,
    /// The members a founder still waits to hear from ([`Status::waiting_to_found`]).
    waiting_to_found: Mutex<Vec<NodeId>>,
    _parts: PhantomData<fn() -> M>,
}

impl<M: Machine, T: Transport> Replica<M, T> {
    /// Opens (or creates) `config.dir`, recovers the log and the latest snapshot, and starts the
    /// Raft node. Committed entries after the snapshot are re-applied before this returns.
    pub async fn start(config: ReplicaConfig, machine: M, transport: T) -> Result<Self, Error> {
        let raft_config = raft_config(&config)?;
        let dir = config.dir.clone();
        let sync = config.sync;
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            action: "create replica directory",
            path: dir.clone(),
            source,
        })?;
        let snapshot_entries = config.snapshot_entries;
        let (log, state_machine) = tokio::task::spawn_blocking(move || {
            let log = DurableLog::open(&dir, sync, LOG_SEGMENT_BYTES_MAX)?;
            let state_machine = state_machine::StateMachineStore::open(&dir, machine, sync)?;
            Ok::<_, Error>((log, state_machine))
        })
        .await
        .map_err(|e| Error::Raft(format!("opening the replica storage panicked: {e}")))??;
        let log_stats = log.stats();
        let log = Arc::new(Mutex::new(log));
        let snapshot_file = state_machine.snapshot_file();
        let halted = state_machine.halted();
        let answered_on_disk = Arc::new(AtomicU64::new(0));
        let log_store = log_store::LogStore::new(log.clone(), answered_on_disk.clone());
        let raft_handle = Arc::new(std::sync::OnceLock::new());
        let transport = Arc::new(transport);
        let network = network::NetworkFactory::new(
            config.node_id,
            transport.clone(),
            network::LearnerPacing::by_membership(
                Duration::from_millis(config.learner_batch_ms),
                raft_handle.clone(),
            ),
        );
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| match halted.get() {
            // The replay of the committed log reached an entry it cannot apply.
            Some(reason) => Error::Raft(format!("node {} {reason}", config.node_id)),
            None => Error::Raft(format!("node {} did not start: {e}", config.node_id)),
        })?;
        let _ = raft_handle.set(raft.clone());
        // So that `status()` reflects the recovered state from the start: the Raft task publishes
        // its first metrics as soon as it runs.
        let mut metrics = raft.metrics();
        let first_metrics = Duration::from_millis(STARTUP_METRICS_WAIT_MS);
        let _ = tokio::time::timeout(first_metrics, metrics.changed()).await;
        tokio::spawn(trigger_snapshots(
            raft.clone(),
            log.clone(),
            snapshot_file.clone(),
            snapshot_entries,
        ));
        Ok(Replica {
            raft,
            node_id: config.node_id,
            members: config.members,
            log,
            log_stats,
            snapshot_file,
            write_gate: failover::WriteGate::default(),
            answered_on_disk,
            halted,
            transport,
            waiting_to_found: Mutex::new(Vec::new()),
            _parts: PhantomData,
        })
    }

    /// If this node is the lowest-id voter and the group was never initialized: initializes it
    /// with the voters, once every other member has said it holds no Raft state either (like
    /// Tarantool's bootstrap, which waits for every replica it is configured with). Then, on
    /// every voter, keeps adding the configured learners (non-blocking) whenever this node is
    /// the leader, until all are members. Returns at once on a learner. Spawn-friendly: loops
    /// with retries until done or the replica stops.
    ///
    /// [`Error::DataLost`] when another member already belongs to the replicaset: this node
    /// lost its data, and is not initialized (with other voters, the leader among them sends
    /// it the state; as the only voter, a replica holding the data must be promoted).
    pub async fn initialize(&self) -> Result<(), Error> {
        let Some(me) = self.members.get(&self.node_id) else {
            return Err(Error::Config(format!(
                "node {} is not in its members",
                self.node_id
            )));
        };
        if !me.voter {
            return self.join(&me.address).await;
        }
        let voters: BTreeMap<NodeId, BasicNode> = self
            .members
            .iter()
            .filter(|(_, member)| member.voter)
            .map(|(id, member)| (*id, BasicNode::new(&member.address)))
            .collect();
        let lowest_voter = voters.keys().next().copied();
        if lowest_voter == Some(self.node_id) && !self.raft.is_initialized().await.map_err(fatal)? {
            let heard = self.no_member_holds_state().await;
            self.waiting_to_found.lock().unwrap().clear();
            heard?;
            match self.raft.initialize(voters).await {
                Ok(()) => tracing::info!(node = self.node_id, "initialized the replicaset"),
                Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                    tracing::info!(node = self.node_id, "already initialized: {e}")
                }
                Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
                    return Err(Error::Config(e.to_string()))
                }
                Err(RaftError::Fatal(e)) => return Err(fatal(e)),
            }
        }
        let mut metrics = self.raft.metrics();
        loop {
            let (is_leader, missing) = {
                let metrics = metrics.borrow_and_update();
                if metrics.running_state.is_err() {
                    return Err(Error::Stopped);
                }
                let membership = metrics.membership_config.membership();
                let missing: BTreeMap<NodeId, BasicNode> = self
                    .members
                    .iter()
                    .filter(|(id, member)| !member.voter && membership.get_node(id).is_none())
                    .map(|(id, member)| (*id, BasicNode::new(&member.address)))
                    .collect();
                (metrics.state == ServerState::Leader, missing)
            };
            if missing.is_empty() {
                return Ok(());
            }
            if is_leader {
                for (id, node) in missing {
                    match self.raft.add_learner(id, node, false).await {
                        Ok(_) => {
                            tracing::info!(node = self.node_id, learner = id, "added a learner")
                        }
                        Err(RaftError::Fatal(e)) => return Err(fatal(e)),
                        // Not the leader any more, or another change in progress: retry later.
                        Err(RaftError::APIError(e)) => {
                            tracing::debug!(
                                node = self.node_id,
                                learner = id,
                                "adding a learner: {e}"
                            )
                        }
                    }
                }
            }
            let retry = tokio::time::sleep(Duration::from_millis(INITIALIZE_RETRY_MS));
            tokio::select! {
                _ = retry => {}
                changed = metrics.changed() => if changed.is_err() { return Err(Error::Stopped) },
            }
        }
    }

    /// On a learner: until a membership of its replicaset names it, asks the configured voters
    /// every [`JOIN_RETRY_MS`] to add it (at `address`), and the leader among them does. That is
    /// how an instance added to the cluster file after its replicaset was founded joins without
    /// a restart of the others (a voter adds the learners it is configured with when it leads,
    /// but it read the file when it started). A member that is in the membership already
    /// returns at once.
    async fn join(&self, address: &str) -> Result<(), Error> {
        let ttl = Duration::from_millis(FOUND_PROBE_TIMEOUT_MS);
        let mut metrics = self.raft.metrics();
        let mut logged = false;
        loop {
            {
                let metrics = metrics.borrow_and_update();
                if metrics.running_state.is_err() {
                    return Err(Error::Stopped);
                }
                let membership = metrics.membership_config.membership();
                if membership.get_node(&self.node_id).is_some() {
                    return Ok(());
                }
            }
            let voters = self.members.iter().filter(|(_, member)| member.voter);
            let mut refusals = Vec::new();
            for (id, member) in voters {
                let voter = (*id, member.address.as_str());
                match network::ask_to_join(
                    self.transport.as_ref(),
                    voter,
                    self.node_id,
                    address,
                    ttl,
                )
                .await
                {
                    Ok(added) => {
                        tracing::info!(node = self.node_id, leader = id, added, "asked to join");
                        break;
                    }
                    Err(why) => refusals.push(format!("node {id} at {}: {why}", member.address)),
                }
            }
            if !refusals.is_empty() && !logged {
                logged = true;
                tracing::info!(
                    node = self.node_id,
                    "not a member of the replicaset yet; asking its voters to add it: {}",
                    refusals.join("; ")
                );
            }
            let retry = tokio::time::sleep(Duration::from_millis(JOIN_RETRY_MS));
            tokio::select! {
                _ = retry => {}
                changed = metrics.changed() => if changed.is_err() { return Err(Error::Stopped) },
            }
        }
    }

    /// Returns once every other configured member has answered that it holds no Raft state;
    /// [`Error::DataLost`] as soon as one holds some. Members that do not answer (not started
    /// yet, or down) are asked again until they do: the one that cannot answer may be the one
    /// holding the replicaset's data.
    async fn no_member_holds_state(&self) -> Result<(), Error> {
        let ttl = Duration::from_millis(FOUND_PROBE_TIMEOUT_MS);
        let mut logged_at: Option<std::time::Instant> = None;
        loop {
            // The members that did not answer, and why.
            let mut silent: Vec<(NodeId, String)> = Vec::new();
            for (id, member) in self.members.iter().filter(|(id, _)| **id != self.node_id) {
                match network::probe(self.transport.as_ref(), *id, &member.address, ttl).await {
                    Ok(holding) if holding.holds_state() => {
                        return Err(Error::DataLost {
                            node_id: self.node_id,
                            holder: *id,
                            term: holding.term,
                            last_log_index: holding.last_log_index,
                            voters: holding.voters,
                        })
                    }
                    Ok(_) => {}
                    Err(why) => {
                        silent.push((*id, format!("node {id} at {}: {why}", member.address)))
                    }
                }
            }
            if silent.is_empty() {
                return Ok(());
            }
            *self.waiting_to_found.lock().unwrap() = silent.iter().map(|(id, _)| *id).collect();
            if self.raft.metrics().borrow().running_state.is_err() {
                return Err(Error::Stopped);
            }
            let wait_log = Duration::from_millis(FOUND_WAIT_LOG_MS);
            if logged_at.is_none_or(|at| at.elapsed() >= wait_log) {
                tracing::warn!(
                    node = self.node_id,
                    "not founding the replicaset yet: waiting for every member to say it holds \
                     no data (one that does must not be replaced by a new, empty replicaset); \
                     no answer from {}",
                    silent
                        .iter()
                        .map(|(_, why)| why.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                logged_at = Some(std::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(INITIALIZE_RETRY_MS)).await;
        }
    }

    /// Halts this member for `reason` (as [`Replica::halted`] reports it): it serves nothing
    /// and answers its peers that it is halted until restarted. For a member that must not go
    /// on as it is, such as one that lost its data ([`Error::DataLost`]) and is the only voter.
    pub fn halt(&self, reason: String) {
        let _ = self.halted.set(reason);
    }

    /// Replicates `command` and returns the [`Machine`]'s answer once it is committed and
    /// applied on this (leader) node.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let submitted = self.submit(command, None).await?;
        self.outcome(submitted).await
    }

    /// Hands `command` to the Raft task and returns at once, without waiting for it to be
    /// committed: commands submitted one after the other (by one task) go to the log in that
    /// order. [`Replica::outcome`] waits for the answer.
    ///
    /// If this member is the replicaset's only voter, `on_durable` runs as soon as the entry is
    /// on its disk, before openraft learns so, with the term the entry was appended in: an
    /// entry of this leader's term on the only voter's disk is committed (every election needs
    /// this member's vote, and it votes only for a log holding the entry), so a caller may
    /// answer from it what it knows the entry does once applied. Until the entry is applied
    /// here, [`Replica::read_barrier`] waits for it. Otherwise (more voters, or the write
    /// fails) `on_durable` is dropped without running.
    pub async fn submit(
        &self,
        command: Vec<u8>,
        on_durable: Option<OnDurable>,
    ) -> Result<Submitted, ProposeError> {
        if command.len() > COMMAND_BYTES_MAX {
            return Err(ProposeError::Fatal(format!(
                "command is {} bytes; the limit is {COMMAND_BYTES_MAX}",
                command.len()
            )));
        }
        let Some(entering) = self.write_gate.enter() else {
            return Err(ProposeError::NotLeader {
                leader: None,
                address: None,
            });
        };
        // Hands the command to the Raft task's queue without yielding (the queue is unbounded);
        // only then does the gate let a hand-over count it as queued.
        let hook = match on_durable {
            Some(hook) if self.is_only_voter() => DurableHook::new(hook),
            _ => DurableHook::default(),
        };
        let queued = self.raft.client_write_ff(Command(command, hook)).await;
        drop(entering);
        Ok(Submitted(queued.map_err(propose_fatal)?))
    }

    /// The [`Machine`]'s answer to a [`Replica::submit`]ted command, once it is committed and
    /// applied on this (leader) node.
    pub async fn outcome(&self, submitted: Submitted) -> Result<Vec<u8>, ProposeError> {
        let result = tokio::time::timeout(Duration::from_millis(PROPOSE_WAIT_MS_MAX), submitted.0)
            .await
            .map_err(|_| {
                ProposeError::Uncertain(format!(
                    "the command was not committed within {PROPOSE_WAIT_MS_MAX} ms (no quorum?); \
                     it may still be applied"
                ))
            })?;
        match result {
            Ok(Ok(response)) => Ok(response.data.0),
            Ok(Err(ClientWriteError::ForwardToLeader(forward))) => {
                Err(self.not_leader(forward.leader_id, forward.leader_node))
            }
            Ok(Err(ClientWriteError::ChangeMembershipError(e))) => {
                Err(ProposeError::Fatal(e.to_string()))
            }
            // The replica stopped with the command in flight: it may be in the log.
            Err(_) => Err(ProposeError::Uncertain(
                "the replica shut down with the command in flight; it may still be applied".into(),
            )),
        }
    }

    /// Whether this member is the only voter of the membership it last published (a joint
    /// membership has more).
    fn is_only_voter(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        membership.get_joint_config().len() == 1
            && membership.voter_ids().eq(std::iter::once(self.node_id))
    }

    /// The current term if this node is the leader as far as its last published status says
    /// (no I/O; it may lag the Raft task by a moment).
    pub fn leader_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        (metrics.state == ServerState::Leader).then_some(metrics.current_term)
    }

    /// Linearizable read barrier on the leader (openraft `ensure_linearizable`): when it
    /// returns `Ok`, this node's machine has applied everything committed before the call, and
    /// at least the first entry of the leader's term, whose number it returns. `NotLeader` on
    /// any other node.
    pub async fn read_barrier(&self) -> Result<u64, ProposeError> {
        let barrier = self.raft.ensure_linearizable();
        let result = tokio::time::timeout(Duration::from_millis(PROPOSE_WAIT_MS_MAX), barrier)
            .await
            .map_err(|_| {
                ProposeError::Unavailable(format!(
                    "leadership was not confirmed within {PROPOSE_WAIT_MS_MAX} ms"
                ))
            })?;
        let term = match result {
            Ok(read_log_id) => read_log_id.map_or(0, |id| id.leader_id.term),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                return Err(self.not_leader(forward.leader_id, forward.leader_node))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                return Err(ProposeError::Unavailable(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => return Err(propose_fatal(e)),
        };
        // Entries whose callers were answered as they reached the disk (`submit`): openraft
        // 0.9 counts a leader's entry committed as soon as it hands it to the log, so its
        // barrier waits for them already; this keeps a read after such an answer from missing
        // its write should openraft count it only once flushed.
        let answered = self.answered_on_disk.load(Ordering::Acquire);
        if self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |id| id.index)
            < answered
        {
            self.raft
                .wait(Some(Duration::from_millis(PROPOSE_WAIT_MS_MAX)))
                .applied_index_at_least(Some(answered), "entries answered from the disk applied")
                .await
                .map_err(|e| {
                    ProposeError::Unavailable(format!(
                        "entry {answered}, already answered, was not applied in time: {e}"
                    ))
                })?;
        }
        Ok(term)
    }

    /// Handles one RPC that arrived from a peer's [`Transport::send`]; returns the answer bytes.
    /// Malformed messages get an answer saying so (never a panic).
    pub async fn handle(&self, message: Vec<u8>) -> Vec<u8> {
        network::handle(&self.raft, self.halted(), message).await
    }

    /// A waiter for changes of this member's role: openraft publishes its server metrics
    /// (state, vote, leader, membership) only when one of them changes, so unlike the full
    /// metrics (every applied entry) waiting on them costs no wake-up per write.
    pub fn role_changes(&self) -> RoleChanges {
        RoleChanges(self.raft.server_metrics())
    }

    /// The file of this member's latest snapshot ([`read_snapshot`] reads it).
    pub fn snapshot_path(&self) -> PathBuf {
        self.snapshot_file.path.clone()
    }

    /// Why this member's Raft node stopped, if it did other than by [`Replica::shutdown`]:
    /// its state machine could not apply an entry ([`CannotApply`]), its storage failed, or it
    /// was halted ([`Replica::halt`]: it lost its data as its replicaset's only voter).
    /// Its state is then frozen where it stopped, so it must not serve reads; a restart (with
    /// a build that can apply the entry, or once the disk is fixed) takes it up again.
    pub fn halted(&self) -> Option<String> {
        if let Some(reason) = self.halted.get() {
            return Some(reason.clone());
        }
        match &self.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(fatal) => Some(format!("replication stopped: {fatal}")),
        }
    }

    /// What this member knows right now (no I/O).
    pub fn status(&self) -> Status {
        let metrics = self.raft.metrics().borrow().clone();
        let halted = self.halted();
        let role = match metrics.state {
            _ if halted.is_some() => "halted",
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Learner => "learner",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
        };
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, _)| (*id, voters.contains(id)))
            .collect();
        let matched = metrics
            .replication
            .as_ref()
            .map(|replication| {
                replication
                    .iter()
                    .map(|(id, log_id)| (*id, log_id.map(|l| l.index)))
                    .collect()
            })
            .unwrap_or_default();
        Status {
            node_id: self.node_id,
            role: role.to_string(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            last_applied: metrics.last_applied.map(|l| l.index),
            snapshot_index: metrics.snapshot.map(|l| l.index),
            snapshot_bytes: self
                .snapshot_file
                .state_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            members,
            matched,
            halted,
            waiting_to_found: self.waiting_to_found.lock().unwrap().clone(),
            log: LogCounters {
                group_commits: self.log_stats.group_commits.load(Ordering::Relaxed),
                syncs: self.log_stats.syncs.load(Ordering::Relaxed),
                sync_seconds: self.log_stats.sync_micros.load(Ordering::Relaxed) as f64 / 1e6,
                bytes_written: self.log_stats.bytes_written.load(Ordering::Relaxed),
            },
        }
    }

    /// Stops the Raft node, then drains and closes the log writer (acknowledged entries and the
    /// committed log id are on disk when this returns). Idempotent.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| Error::Raft(format!("shutting down node {}: {e}", self.node_id)))?;
        let writer = self
            .log
            .lock()
            .map_err(|_| Error::Log("log lock poisoned".into()))?
            .close();
        if let Some(writer) = writer {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| Error::Log(format!("joining the log writer: {e}")))?
                .map_err(|_| Error::Log("the log writer thread panicked".into()))?;
        }
        Ok(())
    }

    fn not_leader(&self, leader: Option<NodeId>, node: Option<BasicNode>) -> ProposeError {
        let address = node.map(|node| node.addr).or_else(|| {
            leader
                .and_then(|id| self.members.get(&id))
                .map(|m| m.address.clone())
        });
        ProposeError::NotLeader { leader, address }
    }
}

/// [`ReplicaConfig::learner_batch_ms`] must be at most a quarter of `heartbeat_ms`: the
/// reason why not, otherwise. Also checked where a cluster file is read.
pub fn check_learner_batch_ms(learner_batch_ms: u64, heartbeat_ms: u64) -> Result<(), String> {
    if learner_batch_ms.saturating_mul(4) > heartbeat_ms {
        return Err(format!(
            "learner_batch_ms ({learner_batch_ms}) must be at most a quarter of heartbeat_ms \
             ({heartbeat_ms}): a learner is sent its entries within a heartbeat"
        ));
    }
    Ok(())
}

/// The openraft configuration derived from a [`ReplicaConfig`], validated.
fn raft_config(config: &ReplicaConfig) -> Result<openraft::Config, Error> {
    if !config.members.contains_key(&config.node_id) {
        return Err(Error::Config(format!(
            "node {} is not one of the members {:?}",
            config.node_id,
            config.members.keys().collect::<Vec<_>>()
        )));
    }
    if !config.members.values().any(|member| member.voter) {
        return Err(Error::Config("the replicaset has no voter".into()));
    }
    if config.heartbeat_ms == 0 {
        return Err(Error::Config("heartbeat_ms must be > 0".into()));
    }
    check_learner_batch_ms(config.learner_batch_ms, config.heartbeat_ms).map_err(Error::Config)?;
    if config.snapshot_entries == 0 {
        return Err(Error::Config("snapshot_entries must be > 0".into()));
    }
    let election_timeout_max = config
        .election_timeout_ms
        .checked_mul(2)
        .ok_or_else(|| Error::Config("election_timeout_ms is too large".into()))?;
    openraft::Config {
        cluster_name: "billcl".to_string(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max,
        install_snapshot_timeout: config.election_timeout_ms,
        // Triggered by `trigger_snapshots`, which also weighs the log's bytes.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: LOG_KEEP_AFTER_SNAPSHOT_ENTRIES,
        enable_tick: true,
        // A member configured as a learner never campaigns on its own, whatever membership its
        // log shows it: openraft lets a member that is the only voter of the membership it
        // knows campaign at once, without waiting out a leader's lease, and an emptied member
        // replaying the log from its start knows the first membership (after a forced
        // promotion: one in which it was the only voter) until the entries that replaced it
        // arrive. It campaigned mid catch-up and led a term of its own on a partial log. It
        // campaigns when told to ([`Replica::elect`], a hand-over to it), and from then on.
        enable_elect: config.members[&config.node_id].voter,
        ..Default::default()
    }
    .validate()
    .map_err(|e| Error::Config(e.to_string()))
}

/// Builds a snapshot whenever the entries applied since the last one reach `snapshot_entries`
/// and the log appended since then the last snapshot's state bytes, both times a ratio drawn
/// in 1..2 for each snapshot ([`SNAPSHOT_SPREAD_STEPS`]; see
/// [`ReplicaConfig::snapshot_entries`]). Ends when the Raft task stops.
async fn trigger_snapshots(
    raft: Raft<TypeConfig>,
    log: Arc<Mutex<DurableLog>>,
    snapshot_file: Arc<state_machine::SnapshotFile>,
    snapshot_entries: u64,
) {
    let mut metrics = raft.metrics();
    // Log bytes at the last trigger: on start, none (a restart counts its whole log).
    let mut bytes_at_trigger = 0u64;
    // Seeded afresh in every process, so members do not draw the same ratios.
    let draws = std::hash::RandomState::new();
    let mut snapshots = 0u64;
    let mut spread = spread_step(&draws, snapshots);
    loop {
        tokio::time::sleep(Duration::from_millis(SNAPSHOT_CHECK_MS)).await;
        if metrics.has_changed().is_err() {
            return;
        }
        let (applied, snapshot) = {
            let m = metrics.borrow_and_update();
            if m.state == ServerState::Shutdown {
                return;
            }
            (m.last_applied, m.snapshot)
        };
        let Some(applied) = applied else { continue };
        let since = match snapshot {
            Some(snapshot) => applied.index.saturating_sub(snapshot.index),
            None => applied.index + 1,
        };
        let Ok(appended) = log.lock().map(|log| log.appended_bytes()) else {
            return;
        };
        let state_bytes = snapshot_file
            .state_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let log_bytes = appended.saturating_sub(bytes_at_trigger);
        if snapshot_due(since, log_bytes, state_bytes, spread, snapshot_entries) {
            // Ignored while a snapshot is being built.
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
            bytes_at_trigger = appended;
            snapshots += 1;
            spread = spread_step(&draws, snapshots);
        }
    }
}

/// A ratio step in `0..SNAPSHOT_SPREAD_STEPS`, uniform, different for every `draw`.
fn spread_step(draws: &std::hash::RandomState, draw: u64) -> u64 {
    use std::hash::BuildHasher;
    draws.hash_one(draw) % SNAPSHOT_SPREAD_STEPS
}

/// Whether a replica should snapshot: `entries` applied and `log_bytes` appended since its
/// last snapshot, which held `state_bytes` of state; both asked for times
/// `1 + spread / SNAPSHOT_SPREAD_STEPS`.
fn snapshot_due(
    entries: u64,
    log_bytes: u64,
    state_bytes: u64,
    spread: u64,
    snapshot_entries: u64,
) -> bool {
    let times = |base: u64| {
        u128::from(base) * u128::from(SNAPSHOT_SPREAD_STEPS + spread)
            / u128::from(SNAPSHOT_SPREAD_STEPS)
    };
    u128::from(entries) >= times(snapshot_entries) && u128::from(log_bytes) >= times(state_bytes)
}

fn fatal(e: openraft::error::Fatal<NodeId>) -> Error {
    match e {
        openraft::error::Fatal::Stopped => Error::Stopped,
        other => Error::Raft(other.to_string()),
    }
}

fn propose_fatal(e: openraft::error::Fatal<NodeId>) -> ProposeError {
    match e {
        openraft::error::Fatal::Stopped => {
            ProposeError::Unavailable("the replica is shutting down".into())
        }
        other => ProposeError::Fatal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::{snapshot_due, spread_step, SNAPSHOT_SPREAD_STEPS};

    #[test]
    fn a_snapshot_waits_for_its_entries_and_for_a_state_worth_of_log() {
        // The first snapshot (no state written yet): the entries alone decide.
        assert!(!snapshot_due(9_999, 1 << 20, 0, 0, 10_000));
        assert!(snapshot_due(10_000, 0, 0, 0, 10_000));
        // Small entries over a large state: 10,000 entries of 200 bytes do not rewrite a
        // 27 MB state; once the log since the last snapshot is as large as it, they do.
        assert!(!snapshot_due(10_000, 2_000_000, 27_000_000, 0, 10_000));
        assert!(!snapshot_due(130_000, 26_999_999, 27_000_000, 0, 10_000));
        assert!(snapshot_due(135_000, 27_000_000, 27_000_000, 0, 10_000));
        // Large entries: the entry count is what waits.
        assert!(!snapshot_due(5_000, 80_000_000, 27_000_000, 0, 10_000));
    }

    #[test]
    fn a_snapshot_waits_for_one_to_two_times_the_entries_and_the_state() {
        let half = SNAPSHOT_SPREAD_STEPS / 2;
        assert!(!snapshot_due(200_000, 40_499_999, 27_000_000, half, 10_000));
        assert!(snapshot_due(200_000, 40_500_000, 27_000_000, half, 10_000));
        let most = SNAPSHOT_SPREAD_STEPS - 1;
        assert!(!snapshot_due(400_000, 53_900_000, 27_000_000, most, 10_000));
        assert!(snapshot_due(400_000, 54_000_000, 27_000_000, most, 10_000));
        // The entries wait as long: entries that are small on the disk (or the first snapshot,
        // with no state yet) do not bring every member to its snapshot at the same entry.
        assert!(!snapshot_due(14_999, 80_000_000, 0, half, 10_000));
        assert!(snapshot_due(15_000, 80_000_000, 0, half, 10_000));
        assert!(!snapshot_due(19_989, 80_000_000, 0, most, 10_000));
        assert!(snapshot_due(19_991, 80_000_000, 0, most, 10_000));
        // No overflow at the extremes.
        assert!(!snapshot_due(u64::MAX, u64::MAX, u64::MAX, most, 1));
        assert!(snapshot_due(u64::MAX, u64::MAX, u64::MAX / 2, most, 1));
    }

    #[test]
    fn members_draw_their_ratios_apart() {
        // Two processes' draws (two seeds): over 64 snapshots, the ratios cover the range and
        // the two sequences differ.
        let (one, other) = (std::hash::RandomState::new(), std::hash::RandomState::new());
        let ones: Vec<u64> = (0..64).map(|draw| spread_step(&one, draw)).collect();
        let others: Vec<u64> = (0..64).map(|draw| spread_step(&other, draw)).collect();
        assert_ne!(ones, others);
        assert!(ones.iter().all(|&step| step < SNAPSHOT_SPREAD_STEPS));
        assert!(ones.iter().any(|&step| step < SNAPSHOT_SPREAD_STEPS / 2));
        assert!(ones.iter().any(|&step| step >= SNAPSHOT_SPREAD_STEPS / 2));
    }
}
