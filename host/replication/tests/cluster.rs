//! Replicasets of real `Replica`s (real openraft, real files in temp dirs) whose only in-process
//! part is the wire: `Net` hands each message to the target's `Replica::handle` on its own task.
//! The machine is a sum of u64 commands plus the list of commands applied, so divergence shows.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use billcl_replication::{
    CannotApply, Machine, Member, NodeId, ProposeError, Replica, ReplicaConfig, SyncMode, Transport,
};

/// What a [`SumMachine`] holds; shared with the test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SumState {
    sum: u64,
    applied: Vec<u64>,
}

#[derive(Clone, Default)]
struct SumMachine {
    state: Arc<Mutex<SumState>>,
    restores: Arc<Mutex<u64>>,
    /// An older build's machine: it cannot apply a command above this value (`None`: any).
    knows_up_to: Option<u64>,
}

impl SumMachine {
    fn state(&self) -> SumState {
        self.state.lock().unwrap().clone()
    }
    fn restores(&self) -> u64 {
        *self.restores.lock().unwrap()
    }
}

impl Machine for SumMachine {
    fn apply(&mut self, _term: u64, _index: u64, command: &[u8]) -> Result<Vec<u8>, CannotApply> {
        let value = u64::from_le_bytes(command.try_into().unwrap_or([0; 8]));
        if let Some(newest) = self.knows_up_to.filter(|&newest| value > newest) {
            return Err(CannotApply(format!(
                "{value} is a newer build's command (this one knows up to {newest})"
            )));
        }
        let mut state = self.state.lock().unwrap();
        state.sum += value;
        state.applied.push(value);
        Ok(state.sum.to_le_bytes().to_vec())
    }

    fn snapshot(&mut self) -> billcl_replication::SnapshotJob {
        let state = self.state.lock().unwrap();
        let mut bytes = state.sum.to_le_bytes().to_vec();
        for value in &state.applied {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        Box::new(move |out| out.write_all(&bytes))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let mut values = snapshot.chunks_exact(8);
        if snapshot.is_empty() || !values.remainder().is_empty() {
            return Err(format!("a snapshot of {} bytes", snapshot.len()));
        }
        let mut values = values
            .by_ref()
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()));
        let sum = values.next().unwrap();
        *self.state.lock().unwrap() = SumState {
            sum,
            applied: values.collect(),
        };
        *self.restores.lock().unwrap() += 1;
        Ok(())
    }
}

type TestReplica = Replica<SumMachine, Net>;

/// The in-process wire: node id -> running replica.
#[derive(Clone, Default)]
struct Net {
    nodes: Arc<RwLock<HashMap<NodeId, Arc<TestReplica>>>>,
}

impl Transport for Net {
    fn send(
        &self,
        target: NodeId,
        _address: &str,
        message: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, String>> + Send {
        let replica = self.nodes.read().unwrap().get(&target).cloned();
        async move {
            let replica = replica.ok_or_else(|| format!("node {target} is down"))?;
            tokio::spawn(async move { replica.handle(message).await })
                .await
                .map_err(|e| e.to_string())
        }
    }
}

/// One test's nodes.
struct Cluster {
    net: Net,
    root: tempfile::TempDir,
    members: BTreeMap<NodeId, Member>,
    sync: SyncMode,
    snapshot_entries: u64,
    machines: HashMap<NodeId, SumMachine>,
}

impl Cluster {
    fn new(voters: &[NodeId], learners: &[NodeId], sync: SyncMode, snapshot_entries: u64) -> Self {
        let mut members = BTreeMap::new();
        for id in voters {
            members.insert(
                *id,
                Member {
                    address: format!("node-{id}"),
                    voter: true,
                },
            );
        }
        for id in learners {
            members.insert(
                *id,
                Member {
                    address: format!("node-{id}"),
                    voter: false,
                },
            );
        }
        Cluster {
            net: Net::default(),
            root: tempfile::tempdir().unwrap(),
            members,
            sync,
            snapshot_entries,
            machines: HashMap::new(),
        }
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    fn config(&self, id: NodeId, dir: PathBuf) -> ReplicaConfig {
        ReplicaConfig {
            node_id: id,
            dir,
            members: self.members.clone(),
            sync: self.sync,
            heartbeat_ms: 50,
            election_timeout_ms: 500,
            snapshot_entries: self.snapshot_entries,
            // Every learner of these tests is paced, as by default.
            learner_batch_ms: 5,
        }
    }

    /// Starts node `id` from its directory with a fresh machine, joins it to the wire and
    /// spawns its `initialize`.
    async fn start(&mut self, id: NodeId) -> Arc<TestReplica> {
        self.start_in(id, self.dir(id)).await
    }

    /// Starts every member, in id order.
    async fn start_all(&mut self) {
        let ids: Vec<NodeId> = self.members.keys().copied().collect();
        for id in ids {
            self.start(id).await;
        }
    }

    async fn start_in(&mut self, id: NodeId, dir: PathBuf) -> Arc<TestReplica> {
        self.start_with(id, dir, SumMachine::default()).await
    }

    async fn start_with(
        &mut self,
        id: NodeId,
        dir: PathBuf,
        machine: SumMachine,
    ) -> Arc<TestReplica> {
        self.machines.insert(id, machine.clone());
        let replica = Arc::new(
            Replica::start(self.config(id, dir), machine, self.net.clone())
                .await
                .unwrap(),
        );
        self.net.nodes.write().unwrap().insert(id, replica.clone());
        let initializing = replica.clone();
        tokio::spawn(async move { initializing.initialize().await });
        replica
    }

    async fn stop(&mut self, id: NodeId) {
        let replica = self.net.nodes.write().unwrap().remove(&id).unwrap();
        replica.shutdown().await.unwrap();
    }

    fn replica(&self, id: NodeId) -> Arc<TestReplica> {
        self.net.nodes.read().unwrap().get(&id).cloned().unwrap()
    }

    fn machine(&self, id: NodeId) -> SumMachine {
        self.machines[&id].clone()
    }

    /// Waits until some running node says it leads, and returns it.
    async fn leader(&self) -> NodeId {
        wait_for("a leader", || {
            let nodes = self.net.nodes.read().unwrap();
            nodes
                .iter()
                .find(|(_, r)| r.status().role == "leader")
                .map(|(id, _)| *id)
        })
        .await
    }

    async fn stop_all(&mut self) {
        let ids: Vec<NodeId> = self.net.nodes.read().unwrap().keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

/// Polls `probe` every 20 ms until it gives `Some`, failing the test after 20 s.
async fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bounds a whole test.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("the test took over 120 s");
}

fn command(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// Proposes `values` on `replica` one after the other, checking each answer is the running sum.
async fn propose_all(
    replica: &TestReplica,
    machine: &SumMachine,
    values: impl IntoIterator<Item = u64>,
) {
    for value in values {
        let before = machine.state().sum;
        let answer = replica.propose(command(value)).await.unwrap();
        assert_eq!(answer, (before + value).to_le_bytes().to_vec());
    }
}

/// Proposes `values` concurrently (so the log group-commits them).
async fn propose_concurrently(replica: &Arc<TestReplica>, values: std::ops::RangeInclusive<u64>) {
    let mut tasks = tokio::task::JoinSet::new();
    for value in values {
        let replica = replica.clone();
        tasks.spawn(async move { replica.propose(command(value)).await });
        if tasks.len() >= 64 {
            tasks.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
}

async fn wait_applied_equal(cluster: &Cluster, a: NodeId, b: NodeId, expected_len: usize) {
    let (machine_a, machine_b) = (cluster.machine(a), cluster.machine(b));
    wait_for("the machines to converge", || {
        let (state_a, state_b) = (machine_a.state(), machine_b.state());
        (state_a.applied.len() == expected_len && state_a == state_b).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_replicates_what_the_leader_applies() {
    bounded(async {
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 10_000);
        let leader = cluster.start(1).await;
        cluster.start(2).await;
        assert_eq!(cluster.leader().await, 1);
        wait_for("the learner to join", || {
            leader.status().members.contains(&(2, false)).then_some(())
        })
        .await;

        propose_all(&leader, &cluster.machine(1), 1..=100).await;
        wait_applied_equal(&cluster, 1, 2, 100).await;
        let state = cluster.machine(2).state();
        assert_eq!(state.sum, 5050);
        assert_eq!(state.applied, (1..=100).collect::<Vec<_>>());

        let learner = cluster.replica(2);
        let status = learner.status();
        assert_eq!(status.role, "learner");
        assert_eq!(status.leader, Some(1));
        assert_eq!(status.members, vec![(1, true), (2, false)]);
        // Only the leader takes proposals and read barriers.
        match learner.propose(command(1)).await {
            Err(ProposeError::NotLeader {
                leader: Some(1),
                address: Some(address),
            }) => assert_eq!(address, "node-1"),
            other => panic!("a learner accepted a proposal: {other:?}"),
        }
        assert!(matches!(
            learner.read_barrier().await,
            Err(ProposeError::NotLeader { .. })
        ));
        leader.read_barrier().await.unwrap();
        let status = leader.status();
        assert_eq!(
            status.matched.get(&2).copied().flatten(),
            status.last_log_index
        );
        // Garbage on the wire gets an answer, not a crash.
        assert!(!learner.handle(vec![0xff; 64]).await.is_empty());
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_state_from_snapshot_and_log() {
    bounded(async {
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 30);
        let leader = cluster.start(1).await;
        cluster.start(2).await;
        cluster.leader().await;
        // Snapshots come every 30-60 entries (`SNAPSHOT_SPREAD_STEPS`): 200 hold two or more.
        propose_all(&leader, &cluster.machine(1), 1..=200).await;
        wait_applied_equal(&cluster, 1, 2, 200).await;
        wait_for("a snapshot", || {
            leader.status().snapshot_index.filter(|i| *i >= 60)
        })
        .await;
        // Leave a few entries (fewer than `snapshot_entries`, so that no snapshot takes them)
        // in the log after the latest snapshot: the restart must replay them.
        let mut applied = 200;
        loop {
            let status = leader.status();
            let tail = status.last_applied.unwrap_or(0) - status.snapshot_index.unwrap_or(0);
            if (1..20).contains(&tail) {
                break;
            }
            applied += 1;
            propose_all(&leader, &cluster.machine(1), [applied]).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        wait_applied_equal(&cluster, 1, 2, applied as usize).await;
        let before = cluster.machine(1).state();
        cluster.stop_all().await;

        // Right after start, before any election: the snapshot is restored and the committed
        // entries after it are re-applied.
        for id in [1, 2] {
            let replica = cluster.start(id).await;
            let machine = cluster.machine(id);
            assert_eq!(machine.state(), before, "node {id} after restart");
            assert_eq!(
                machine.restores(),
                1,
                "node {id} restored from its snapshot"
            );
            let status = replica.status();
            assert!(
                status.snapshot_index.is_some(),
                "node {id} has no snapshot: {status:?}"
            );
            assert!(
                status.last_applied > status.snapshot_index,
                "node {id} replayed no log: {status:?}"
            );
        }
        let leader = cluster.replica(cluster.leader().await);
        propose_all(&leader, &cluster.machine(1), [1000]).await;
        wait_applied_equal(&cluster, 1, 2, applied as usize + 1).await;
        cluster.stop_all().await;
    })
    .await;
}

/// Copies a replica directory (the replica must be stopped).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        let target = to.join(item.file_name());
        if item.file_type().unwrap().is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).unwrap();
        }
    }
}

/// The segment files of a replica directory, and the byte offset of each record of the last.
fn last_segment(dir: &Path) -> (PathBuf, Vec<u64>) {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|item| item.unwrap().path())
        .collect();
    segments.sort();
    let last = segments.pop().expect("a segment");
    let bytes = std::fs::read(&last).unwrap();
    let mut offsets = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        offsets.push(offset as u64);
        let length = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        offset += 8 + length;
    }
    assert_eq!(
        offset,
        bytes.len(),
        "the segment does not end on a record boundary"
    );
    (last, offsets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_log_tail_is_cut_back_on_open() {
    bounded(async {
        let mut cluster = Cluster::new(&[1], &[], SyncMode::Fsync, 10_000);
        let leader = cluster.start(1).await;
        cluster.leader().await;
        propose_all(&leader, &cluster.machine(1), 1..=20).await;
        let all = cluster.machine(1).state();
        cluster.stop_all().await;
        let original = cluster.dir(1);
        let (segment, offsets) = last_segment(&original);
        let whole = std::fs::metadata(&segment).unwrap().len();
        let segment_name = segment.file_name().unwrap().to_owned();

        // Garbage after the last record: cut off, nothing lost.
        let garbage = cluster.root.path().join("garbage");
        copy_dir(&original, &garbage);
        let garbage_segment = garbage.join("log").join(&segment_name);
        let mut bytes = std::fs::read(&garbage_segment).unwrap();
        bytes.extend_from_slice(b"\x10\x00\x00\x00not a record at all");
        std::fs::write(&garbage_segment, bytes).unwrap();
        let replica = cluster.start_in(1, garbage).await;
        assert_eq!(cluster.machine(1).state(), all);
        assert_eq!(std::fs::metadata(&garbage_segment).unwrap().len(), whole);
        cluster.leader().await;
        propose_all(&replica, &cluster.machine(1), [7]).await;
        cluster.stop_all().await;

        // The last record (the 20th command) half written: cut back to the 19th.
        let torn = cluster.root.path().join("torn");
        copy_dir(&original, &torn);
        let torn_segment = torn.join("log").join(&segment_name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&torn_segment)
            .unwrap()
            .set_len(whole - 5)
            .unwrap();
        let replica = cluster.start_in(1, torn).await;
        let state = cluster.machine(1).state();
        assert_eq!(state.applied, (1..=19).collect::<Vec<_>>());
        assert_eq!(
            std::fs::metadata(&torn_segment).unwrap().len(),
            *offsets.last().unwrap()
        );
        cluster.leader().await;
        propose_all(&replica, &cluster.machine(1), [20]).await;
        assert_eq!(cluster.machine(1).state().sum, all.sum);
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_over_when_the_leader_stops() {
    bounded(async {
        let mut cluster = Cluster::new(&[1, 2, 3], &[], SyncMode::Fsync, 10_000);
        cluster.start_all().await;
        let first = cluster.leader().await;
        let first_replica = cluster.replica(first);
        propose_all(&first_replica, &cluster.machine(first), 1..=10).await;
        let term = first_replica.status().term;
        cluster.stop(first).await;

        let second = cluster.leader().await;
        assert_ne!(second, first);
        let second_replica = cluster.replica(second);
        assert!(second_replica.status().term > term);
        propose_all(&second_replica, &cluster.machine(second), 11..=20).await;
        let other = [1, 2, 3]
            .into_iter()
            .find(|id| *id != first && *id != second)
            .unwrap();
        wait_applied_equal(&cluster, second, other, 20).await;
        assert_eq!(cluster.machine(other).state().sum, 210);
        match cluster.replica(other).propose(command(1)).await {
            Err(ProposeError::NotLeader { leader, address }) => {
                assert_eq!(leader, Some(second));
                assert_eq!(address, Some(format!("node-{second}")));
            }
            other => panic!("a follower accepted a proposal: {other:?}"),
        }
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_learner_catches_up_from_a_snapshot_after_purge() {
    bounded(async {
        // Node 1 alone first: enough entries for snapshots and a purge behind them.
        let mut cluster = Cluster::new(&[1], &[], SyncMode::Fsync, 500);
        let leader = cluster.start(1).await;
        cluster.leader().await;
        let started = std::time::Instant::now();
        propose_concurrently(&leader, 1..=2500).await;
        eprintln!("2500 concurrent proposals took {:?}", started.elapsed());
        wait_for("a snapshot", || {
            leader.status().snapshot_index.filter(|i| *i >= 1500)
        })
        .await;
        wait_for("the log to be purged", || {
            cluster.dir(1).join("purged").exists().then_some(())
        })
        .await;
        cluster.stop_all().await;

        // Restart it with node 2 as a learner of the replicaset: node 2 starts empty.
        cluster.members.insert(
            2,
            Member {
                address: "node-2".into(),
                voter: false,
            },
        );
        let leader = cluster.start(1).await;
        cluster.start(2).await;
        cluster.leader().await;
        wait_applied_equal(&cluster, 1, 2, 2500).await;
        assert_eq!(
            cluster.machine(2).restores(),
            1,
            "node 2 did not get the snapshot"
        );
        assert_eq!(cluster.machine(2).state().sum, 2500 * 2501 / 2);
        propose_all(&leader, &cluster.machine(1), [5]).await;
        wait_applied_equal(&cluster, 1, 2, 2501).await;
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_on_purpose_with_no_lost_command() {
    bounded(async {
        let mut cluster = Cluster::new(&[1, 2, 3], &[], SyncMode::Fsync, 10_000);
        cluster.start_all().await;
        let old = cluster.leader().await;
        let old_replica = cluster.replica(old);
        propose_all(&old_replica, &cluster.machine(old), 1..=50).await;
        let target = [1, 2, 3].into_iter().find(|id| *id != old).unwrap();

        // The hand-over `billcl failover` drives: hold, wait for the target, elect it.
        old_replica.hold_writes(10_000);
        assert!(matches!(
            old_replica.propose(command(1000)).await,
            Err(ProposeError::NotLeader { .. })
        ));
        old_replica.wait_replicated(target, 5_000).await.unwrap();
        let target_replica = cluster.replica(target);
        wait_for("the target to win", || {
            let replica = target_replica.clone();
            tokio::spawn(async move { replica.elect().await });
            (target_replica.status().role == "leader").then_some(())
        })
        .await;
        old_replica.hold_writes(0);
        propose_all(&target_replica, &cluster.machine(target), 51..=60).await;
        for id in [1, 2, 3] {
            wait_applied_equal(&cluster, target, id, 60).await;
        }
        assert_eq!(cluster.machine(old).state().sum, 60 * 61 / 2);
        cluster.stop_all().await;
    })
    .await;
}

/// The seed shape (node 1 the only voter, node 2 its learner) after commands `1..=values`, one
/// entry each, then node 1 gone for good: both stopped, node 2 promoted by force and the
/// configuration's voter flags swapped, as `billcl failover --force` does. Nothing runs.
async fn seed_shape_promoted_by_force(values: u64) -> (Cluster, billcl_replication::Promotion) {
    let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 1_000_000);
    let leader = cluster.start(1).await;
    cluster.start(2).await;
    cluster.leader().await;
    propose_all(&leader, &cluster.machine(1), 1..=values).await;
    wait_applied_equal(&cluster, 1, 2, values as usize).await;
    cluster.stop(1).await;
    cluster.stop(2).await;
    let members = cluster.members.clone();
    let dir = cluster.dir(2);
    let promotion =
        tokio::task::spawn_blocking(move || billcl_replication::promote_offline(&dir, 2, &members))
            .await
            .unwrap()
            .unwrap();
    cluster.members.get_mut(&1).unwrap().voter = false;
    cluster.members.get_mut(&2).unwrap().voter = true;
    (cluster, promotion)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_is_promoted_by_force_when_the_voter_is_gone() {
    bounded(async {
        let (mut cluster, promotion) = seed_shape_promoted_by_force(20).await;
        assert_eq!(promotion.learners, vec![1]);
        // Node 2 restarts as the only voter and leads; its state is all it had.
        let promoted = cluster.start(2).await;
        assert_eq!(cluster.leader().await, 2);
        assert!(promoted.status().term >= promotion.term);
        wait_for("the promoted node to apply its log", || {
            (cluster.machine(2).state().applied.len() == 20).then_some(())
        })
        .await;
        propose_all(&promoted, &cluster.machine(2), [21]).await;
        // The old voter comes back on empty data (its old Raft state would lead the old
        // membership), configured as a learner, and catches up.
        let fresh = cluster.root.path().join("node-1-fresh");
        cluster.start_in(1, fresh).await;
        wait_applied_equal(&cluster, 2, 1, 21).await;
        assert_eq!(cluster.replica(1).status().role, "learner");
        assert_eq!(cluster.leader().await, 2);
        cluster.stop_all().await;
    })
    .await;
}

/// `submit`'s `on_durable` runs on the only voter as soon as the entry is on its disk, before
/// the entry is applied; a read barrier taken then waits for the entry to be applied (a caller
/// answered from the disk reads its own write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_voter_runs_on_durable_before_applying_and_reads_wait_for_the_apply() {
    bounded(async {
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 10_000);
        let leader = cluster.start(1).await;
        cluster.start(2).await;
        cluster.leader().await;
        propose_all(&leader, &cluster.machine(1), [5]).await;

        let machine = cluster.machine(1);
        let (reported, report) = tokio::sync::oneshot::channel();
        let (runtime, reader) = (tokio::runtime::Handle::current(), leader.clone());
        let on_durable = Box::new(move |term: u64| {
            let applied_before = machine.state().applied.contains(&7);
            // The entry cannot be applied while this runs (openraft does not know yet that
            // it is on disk): a read started now must wait for it, not read around it.
            let read = runtime.spawn(async move {
                reader.read_barrier().await.unwrap();
                machine.state().applied.contains(&7)
            });
            std::thread::sleep(Duration::from_millis(300));
            let _ = reported.send((term, applied_before, read.is_finished(), read));
        });
        let submitted = leader.submit(command(7), Some(on_durable)).await.unwrap();
        let (term, applied_before, read_finished_early, read) = report.await.unwrap();
        assert_eq!(term, leader.status().term);
        assert!(!applied_before, "on_durable ran after the apply");
        assert!(
            !read_finished_early,
            "a read finished before the entry it must see applied"
        );
        assert!(
            read.await.unwrap(),
            "the read did not see the entry answered from the disk"
        );
        assert_eq!(
            leader.outcome(submitted).await.unwrap(),
            12u64.to_le_bytes()
        );
        cluster.stop_all().await;
    })
    .await;
}

/// With more than one voter an entry on the leader's disk is not committed yet: `on_durable`
/// is dropped without running, and the outcome still comes once the entry is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_several_voters_on_durable_does_not_run() {
    bounded(async {
        let mut cluster = Cluster::new(&[1, 2, 3], &[], SyncMode::Fsync, 10_000);
        cluster.start_all().await;
        let leader = cluster.replica(cluster.leader().await);
        propose_all(&leader, &cluster.machine(1), [5]).await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let on_durable = Box::new(move |_term: u64| flag.store(true, Ordering::SeqCst));
        let submitted = leader.submit(command(7), Some(on_durable)).await.unwrap();
        assert_eq!(
            leader.outcome(submitted).await.unwrap(),
            12u64.to_le_bytes()
        );
        assert!(
            !ran.load(Ordering::SeqCst),
            "on_durable ran with three voters"
        );
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_cannot_apply_an_entry_halts_there_and_goes_on_once_it_can() {
    bounded(async {
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 10_000);
        let leader = cluster.start(1).await;
        // The learner runs an "older build": it cannot apply commands above 1,000.
        let older = SumMachine {
            knows_up_to: Some(1_000),
            ..SumMachine::default()
        };
        let learner = cluster.start_with(2, cluster.dir(2), older).await;
        assert_eq!(cluster.leader().await, 1);
        wait_for("the learner to join", || {
            leader.status().members.contains(&(2, false)).then_some(())
        })
        .await;
        assert_eq!(learner.halted(), None);

        let leader_machine = cluster.machine(1);
        propose_all(&leader, &leader_machine, [1, 2, 5_000, 3]).await;
        let halted = wait_for("the learner to halt", || learner.halted()).await;
        assert!(
            halted.contains("stopped applying the log at entry")
                && halted.contains("5000 is a newer build's command"),
            "{halted}"
        );
        let status = learner.status();
        assert_eq!(status.role, "halted");
        assert_eq!(status.halted.as_deref(), Some(halted.as_str()));
        // It skipped nothing: it stopped before the entry, and the leader goes on without it.
        propose_all(&leader, &leader_machine, [4]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(cluster.machine(2).state().applied, vec![1, 2]);
        assert_eq!(leader.status().role, "leader");
        assert_eq!(leader.halted(), None);

        // Restarted with the same build, it stops at start-up, saying why: its replay of
        // the committed log reaches the entry.
        cluster.stop(2).await;
        let older = SumMachine {
            knows_up_to: Some(1_000),
            ..SumMachine::default()
        };
        let config = cluster.config(2, cluster.dir(2));
        let refused = match Replica::start(config, older, cluster.net.clone()).await {
            Ok(_) => panic!("the older build started past an entry it cannot apply"),
            Err(refused) => refused.to_string(),
        };
        assert!(
            refused.contains("node 2 stopped applying the log at entry")
                && refused.contains("5000 is a newer build's command"),
            "{refused}"
        );
        // Restarted with a build that can, it applies the log on from that entry.
        let learner = cluster.start(2).await;
        wait_applied_equal(&cluster, 1, 2, 5).await;
        assert_eq!(cluster.machine(2).state().applied, vec![1, 2, 5_000, 3, 4]);
        assert_eq!(learner.halted(), None);
        assert_eq!(learner.status().role, "learner");
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_whose_data_was_wiped_is_sent_the_state_again() {
    bounded(async {
        // What an operator does with a replica whose disk was replaced or whose snapshot is
        // damaged: move its data aside and start it again.
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 500);
        let leader = cluster.start(1).await;
        cluster.start(2).await;
        cluster.leader().await;
        propose_concurrently(&leader, 1..=2500).await;
        wait_applied_equal(&cluster, 1, 2, 2500).await;
        wait_for("the log to be purged", || {
            cluster.dir(1).join("purged").exists().then_some(())
        })
        .await;
        cluster.stop(2).await;
        std::fs::remove_dir_all(cluster.dir(2)).unwrap();

        // The leader knew node 2 had everything; it finds the log gone and sends the
        // snapshot, instead of entries node 2 cannot apply (it halted on them before).
        let learner = cluster.start(2).await;
        wait_applied_equal(&cluster, 1, 2, 2500).await;
        assert_eq!(learner.halted(), None);
        // At least once: the leader may build a newer snapshot meanwhile and send that too
        // (each install replaces the whole state).
        let restores = cluster.machine(2).restores();
        assert!(restores >= 1, "node 2 got no snapshot");
        propose_all(&leader, &cluster.machine(1), [5]).await;
        wait_applied_equal(&cluster, 1, 2, 2501).await;
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_waits_for_every_member_to_answer_before_founding() {
    bounded(async {
        // Like Tarantool's bootstrap: the member that may hold the data must be heard first.
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 10_000);
        let founder = cluster.start(1).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status = founder.status();
        assert_ne!(status.role, "leader", "founded without hearing node 2");
        assert_eq!(status.last_log_index, None, "{status:?}");
        assert_eq!(status.waiting_to_found, vec![2], "{status:?}");
        cluster.start(2).await;
        assert_eq!(cluster.leader().await, 1);
        assert!(founder.status().waiting_to_found.is_empty());
        propose_all(&founder, &cluster.machine(1), [7]).await;
        wait_applied_equal(&cluster, 1, 2, 1).await;
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_that_lost_its_data_does_not_found_a_new_replicaset_over_its_replica() {
    bounded(async {
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 10_000);
        let leader = cluster.start(1).await;
        cluster.start(2).await;
        cluster.leader().await;
        propose_concurrently(&leader, 1..=100).await;
        wait_applied_equal(&cluster, 1, 2, 100).await;
        let held = cluster.replica(2).status().last_log_index;
        cluster.stop(1).await;
        // A new disk: the only voter comes back with nothing.
        std::fs::remove_dir_all(cluster.dir(1)).unwrap();
        let founder = cluster.start(1).await;
        match founder.initialize().await {
            Err(billcl_replication::Error::DataLost {
                node_id,
                holder,
                last_log_index,
                voters,
                ..
            }) => {
                assert_eq!((node_id, holder), (1, 2));
                assert_eq!(last_log_index, held);
                assert_eq!(voters, vec![1]);
            }
            other => panic!("founded over node 2's data: {other:?}"),
        }
        // Before: it founded a new group in the same term and node 2 took its entries for
        // the ones it had (same term, leader and index), diverging silently.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_ne!(founder.status().role, "leader");
        assert_eq!(founder.status().last_log_index, None);
        assert_eq!(cluster.machine(2).state().applied.len(), 100);
        assert_eq!(cluster.replica(2).status().last_log_index, held);
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_that_lost_its_data_is_sent_the_state_by_the_other_voters() {
    bounded(async {
        let mut cluster = Cluster::new(&[1, 2, 3], &[], SyncMode::Fsync, 10_000);
        cluster.start_all().await;
        let first = cluster.leader().await;
        propose_concurrently(&cluster.replica(first), 1..=100).await;
        cluster.stop(1).await;
        std::fs::remove_dir_all(cluster.dir(1)).unwrap();
        let leader = cluster.leader().await;
        let founder = cluster.start(1).await;
        match founder.initialize().await {
            Err(billcl_replication::Error::DataLost { voters, .. }) => {
                assert_eq!(voters, vec![1, 2, 3])
            }
            other => panic!("expected DataLost, got {other:?}"),
        }
        // It stays a member, and the leader sends it the state.
        wait_applied_equal(&cluster, leader, 1, 100).await;
        cluster.stop_all().await;
    })
    .await;
}

/// After a forced promotion, the old voter comes back empty and is sent the promoted member's
/// log from its start, whose first membership names it the only voter. openraft lets a member
/// that is the only voter of the membership it knows campaign at once, without waiting out a
/// leader's lease: it did, mid catch-up, led a term of its own on a partial log, applied its
/// own entries, and kept them once the promoted member took over again (their states
/// differed). A member its configuration names a learner never campaigns on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_configured_as_learner_never_campaigns_while_it_replays_an_old_membership() {
    bounded(async {
        // One entry each: the catch-up below spans several AppendEntries.
        let (mut cluster, promotion) = seed_shape_promoted_by_force(6000).await;
        let promoted = cluster.start(2).await;
        assert_eq!(cluster.leader().await, 2);
        let fresh = cluster.root.path().join("node-1-fresh");
        let learner = cluster.start_in(1, fresh).await;
        let mut led = false;
        wait_for("node 1 to catch up", || {
            led |= learner.status().role == "leader";
            (cluster.machine(1).state().applied.len() == 6000).then_some(())
        })
        .await;
        assert!(
            !led,
            "node 1 campaigned while it replayed the old membership"
        );
        assert_eq!(
            promoted.status().term,
            promotion.term,
            "another term was led"
        );
        propose_all(&promoted, &cluster.machine(2), [6001]).await;
        wait_applied_equal(&cluster, 2, 1, 6001).await;
        assert_eq!(learner.status().role, "learner");
        cluster.stop_all().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_the_leader_was_not_configured_with_asks_to_join_and_catches_up() {
    bounded(async {
        // The leader and its learner started from a file without node 3.
        let mut cluster = Cluster::new(&[1], &[2], SyncMode::Fsync, 10_000);
        let leader = cluster.start(1).await;
        cluster.start(2).await;
        cluster.leader().await;
        propose_all(&leader, &cluster.machine(1), 1..=50).await;
        // Node 3 is added to the file and started alone: the leader never read it there.
        cluster.members.insert(
            3,
            Member {
                address: "node-3".to_string(),
                voter: false,
            },
        );
        let joined = cluster.start(3).await;
        wait_for("node 3 to be a learner of the leader's membership", || {
            leader.status().members.contains(&(3, false)).then_some(())
        })
        .await;
        wait_applied_equal(&cluster, 1, 3, 50).await;
        propose_all(&leader, &cluster.machine(1), [7]).await;
        wait_applied_equal(&cluster, 1, 3, 51).await;
        assert_eq!(joined.status().role, "learner");
        assert_eq!(
            leader.status().members,
            vec![(1, true), (2, false), (3, false)]
        );
        // Restarted, it is a member already: it does not ask again, and keeps up.
        cluster.stop(3).await;
        cluster.start(3).await;
        propose_all(&leader, &cluster.machine(1), [8]).await;
        wait_applied_equal(&cluster, 1, 3, 52).await;
        cluster.stop_all().await;
    })
    .await;
}

/// A leader's snapshot file, copied out while it runs (`billcl backup`), makes every member of
/// the replicaset anew (`billcl restore`) in empty directories: each restores the same state,
/// the voters elect a leader in a later term, and new commands apply on top of it. A directory
/// that holds Raft state is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_restored_from_a_snapshot_copy_holds_its_state_and_elects_a_leader() {
    bounded(async {
        let mut cluster = Cluster::new(&[1, 2, 3], &[], SyncMode::Fsync, 1_000_000);
        cluster.start_all().await;
        let leader = cluster.leader().await;
        let replica = cluster.replica(leader);
        propose_all(&replica, &cluster.machine(leader), 1..=20).await;
        replica.snapshot_now().await.unwrap();
        wait_for("the snapshot of entry 20 or later", || {
            replica
                .status()
                .snapshot_index
                .filter(|index| *index >= 21)
                .map(|_| ())
        })
        .await;
        let copy = billcl_replication::read_snapshot(&billcl_replication::replica_snapshot_path(
            &cluster.dir(leader),
        ))
        .unwrap();
        let term = copy.last_log_term();
        assert!(copy.last_log_index() >= 21, "{}", copy.last_log_index());
        assert_eq!(copy.voters().into_iter().collect::<Vec<_>>(), [1, 2, 3]);
        // Written after the copy: not in it.
        propose_all(&replica, &cluster.machine(leader), [100]).await;
        cluster.stop_all().await;

        let refused = billcl_replication::restore_snapshot(&cluster.dir(1), &copy, 1);
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("holds Raft state already"),
            "a member's own directory is refused"
        );
        let kept = cluster.root.path().join("copy");
        copy.write(&kept).unwrap();
        let copy = billcl_replication::read_snapshot(&kept).unwrap();
        // As sent over the network: the file's bytes, part by part, checked again on arrival.
        let mut bytes = std::fs::read(&kept).unwrap();
        let index = copy.last_log_index();
        let mut parts = Vec::new();
        while let Some((total, part)) =
            billcl_replication::read_snapshot_part(&kept, index, parts.len() as u64, 100).unwrap()
        {
            assert!(part.len() <= 100);
            parts.extend_from_slice(&part);
            if parts.len() as u64 == total {
                break;
            }
        }
        assert_eq!(parts, bytes);
        let other = billcl_replication::read_snapshot_part(&kept, index + 1, 0, 100).unwrap();
        assert!(other.is_none(), "a snapshot at another index is not read");
        let sent = billcl_replication::SnapshotCopy::from_file_bytes(bytes.clone(), "sent");
        assert_eq!(sent.unwrap().state(), copy.state());
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let damaged = billcl_replication::SnapshotCopy::from_file_bytes(bytes, "sent");
        assert!(damaged.err().unwrap().to_string().contains("checksum"));
        for id in [1, 2, 3] {
            let fresh = cluster.root.path().join(format!("restored-{id}"));
            tokio::task::block_in_place(|| {
                billcl_replication::restore_snapshot(&fresh, &copy, id).unwrap()
            });
            cluster.start_in(id, fresh).await;
        }
        let leader = cluster.leader().await;
        let replica = cluster.replica(leader);
        assert!(replica.status().term > term);
        let restored = SumState {
            sum: 20 * 21 / 2,
            applied: (1..=20).collect(),
        };
        for id in [1, 2, 3] {
            assert_eq!(cluster.machine(id).state(), restored, "node {id}");
        }
        propose_all(&replica, &cluster.machine(leader), [7]).await;
        for id in [1, 2, 3] {
            wait_applied_equal(&cluster, leader, id, 21).await;
        }
        assert_eq!(cluster.machine(leader).state().sum, 20 * 21 / 2 + 7);
        cluster.stop_all().await;
    })
    .await;
}
