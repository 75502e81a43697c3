//! Moving leadership on purpose, and the last resort when the voters are gone.
//!
//! openraft 0.9 has no leader-transfer call, so a graceful hand-over is built from what it has
//! (driven by the node's `failover` verbs, see `host/src/failover.rs`):
//! 1. the leader holds new commands ([`Replica::hold_writes`]: `propose` answers `NotLeader`,
//!    so routers retry and find the new leader) and waits until the target has every entry of
//!    its log ([`Replica::wait_replicated`]), commands admitted just before the hold included
//!    (the [`WriteGate`] counts them until they are in the Raft task's queue);
//! 2. the target starts an election at once ([`Replica::elect`]); its log is as long as every
//!    voter's, so the leader grants its vote and steps down on the higher term. If the leader's
//!    own lease still runs (it was elected less than `election_timeout_max` ago) it refuses,
//!    but its next heartbeat ([`Replica::heartbeat`] sends one at once) meets the higher term
//!    and it steps down with an uncommitted vote, which carries no lease: the target's next
//!    election wins.
//!
//! No acknowledged command is lost in any election (a candidate needs a majority of votes and a
//! voter refuses a candidate with a shorter log); holding writes only makes the target win.
//! Reading the log's end from the metrics instead (they lag the Raft task, and miss commands
//! still queued to it) left the target one entry short under load: the other voters refused
//! it, and leadership stayed.
//!
//! [`promote_offline`] is not graceful: it rewrites a stopped member's own Raft state so that
//! it restarts as the sole voter and leader of a new term. What the old leader acknowledged
//! after the last entry this member received is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{
    BasicNode, ChangeMembers, CommittedLeaderId, EntryPayload, LogId, Membership, ServerState, Vote,
};

use crate::durable_log::{DurableLog, Entry};
use crate::{Error, Machine, Member, NodeId, ProposeError, Replica, SyncMode, Transport};

/// The longest [`Replica::hold_writes`] may hold commands.
pub const WRITES_HOLD_MS_MAX: u64 = 30_000;
/// How long [`promote_offline`] waits for its log writes.
const PROMOTE_WRITE_WAIT_MS: u64 = 10_000;

/// How long [`Replica::wait_replicated`] waits for commands that passed the gate before a hold
/// to reach the Raft task's queue (they do so without yielding: microseconds).
const GATE_DRAIN_WAIT_MS: u64 = 1_000;

/// Admits commands to the Raft task, or holds them during a hand-over.
///
/// Invariant: once a hold is set, every command the gate admitted is counted in `entering`
/// until it is in the Raft task's queue; so when `entering` is 0 under a hold, the queue
/// holds every command this node will append until the hold ends.
#[derive(Default)]
pub(crate) struct WriteGate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    held_until: Option<Instant>,
    entering: u64,
}

/// A command on its way to the Raft task's queue; dropped once it is there.
pub(crate) struct Entering<'a>(&'a WriteGate);

impl WriteGate {
    /// Admits one command, or `None` while writes are held.
    pub(crate) fn enter(&self) -> Option<Entering<'_>> {
        let mut state = self.state.lock().expect("write gate lock");
        if state.held_until.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        state.entering += 1;
        Some(Entering(self))
    }

    fn hold(&self, until: Option<Instant>) {
        self.state.lock().expect("write gate lock").held_until = until;
    }

    fn entering(&self) -> u64 {
        self.state.lock().expect("write gate lock").entering
    }
}

impl Drop for Entering<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().expect("write gate lock");
        assert!(state.entering > 0, "write gate count underflow");
        state.entering -= 1;
    }
}

impl<M: Machine, T: Transport> Replica<M, T> {
    /// Refuse new commands for `hold_ms` (at most [`WRITES_HOLD_MS_MAX`]); 0 releases them.
    pub fn hold_writes(&self, hold_ms: u64) {
        let until = (hold_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(hold_ms.min(WRITES_HOLD_MS_MAX)));
        self.write_gate.hold(until);
    }

    /// On the leader, with writes held ([`Replica::hold_writes`]): waits until `target` has
    /// every entry of this node's log, up to `wait_ms`. Returns the index of the last entry,
    /// which stays the last one while writes are held.
    ///
    /// "Every entry" includes commands admitted just before the hold: first they all reach
    /// the Raft task's queue (the gate drains), then a request queued behind them
    /// (`with_raft_state`) runs after the Raft task appended them, and only then is the end
    /// of the log read, from the log store (the metrics lag).
    pub async fn wait_replicated(&self, target: NodeId, wait_ms: u64) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        let drained_by =
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(GATE_DRAIN_WAIT_MS));
        while self.write_gate.entering() > 0 {
            if tokio::time::Instant::now() >= drained_by {
                return Err("commands admitted before the hold did not reach the log".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let barrier = self.raft.with_raft_state(|state| state.server_state);
        let server_state = tokio::time::timeout_at(deadline, barrier)
            .await
            .map_err(|_| format!("node {} did not answer within {wait_ms} ms", self.node_id))?
            .map_err(|_| "the replica stopped".to_string())?;
        if server_state != ServerState::Leader {
            return Err(format!("node {} is not the leader", self.node_id));
        }
        // The Raft task handed every entry it appended to the log store before running the
        // barrier, and the store makes entries readable as soon as it is handed them.
        let last = self
            .log
            .lock()
            .map_err(|_| "the log lock is poisoned".to_string())?
            .last_log_id()
            .map(|log_id| log_id.index);
        let mut metrics = self.raft.metrics();
        loop {
            let matched = {
                let metrics = metrics.borrow_and_update();
                if metrics.state != ServerState::Leader {
                    return Err(format!("node {} is not the leader", self.node_id));
                }
                metrics
                    .replication
                    .as_ref()
                    .and_then(|replication| replication.get(&target).copied())
                    .ok_or_else(|| format!("node {target} is not replicated to by the leader"))?
                    .map(|log_id| log_id.index)
            };
            if matched >= last {
                return Ok(last.unwrap_or(0));
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Err(_) => {
                    return Err(format!(
                        "node {target} did not catch up with index {} within {wait_ms} ms",
                        last.unwrap_or(0)
                    ))
                }
                Ok(Err(_)) => return Err("the replica stopped".into()),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Starts an election on this node now (a no-op on the leader), and lets it campaign on
    /// its own from now on: a member configured as a learner does not until told to (a
    /// hand-over to it; see `raft_config`).
    pub async fn elect(&self) -> Result<(), Error> {
        self.raft.runtime_config().elect(true);
        self.raft.trigger().elect().await.map_err(crate::fatal)
    }

    /// Lets this member campaign on its own when it hears no leader (`allow`), or stops it
    /// from doing so, without starting an election: what a member made a voter (or a learner)
    /// while it runs needs, since the cluster file it started with said otherwise (see
    /// `raft_config`).
    pub fn allow_elections(&self, allow: bool) {
        self.raft.runtime_config().elect(allow);
    }

    /// On the leader: sends a heartbeat to every member now rather than at the next tick. In a
    /// hand-over, it meets the target's campaign (a higher term) and this leader steps down.
    pub async fn heartbeat(&self) -> Result<(), Error> {
        self.raft.trigger().heartbeat().await.map_err(crate::fatal)
    }

    /// Builds a snapshot now (and purges the log behind it), without waiting for it.
    pub async fn snapshot_now(&self) -> Result<(), Error> {
        self.raft.trigger().snapshot().await.map_err(crate::fatal)
    }

    /// On the leader: makes `add` voters (they must be members already, as learners) and
    /// turns `remove` into learners; waits until the change is committed.
    pub async fn change_voters(
        &self,
        add: BTreeSet<NodeId>,
        remove: BTreeSet<NodeId>,
    ) -> Result<(), ProposeError> {
        for (change, ids) in [
            (ChangeMembers::AddVoterIds(add.clone()), &add),
            (ChangeMembers::RemoveVoters(remove.clone()), &remove),
        ] {
            if ids.is_empty() {
                continue;
            }
            self.change_membership(change, true).await?;
        }
        Ok(())
    }

    /// This member's Raft node id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// On the leader: removes `ids` from the membership altogether (`billcl expel`): voters
    /// through a joint membership (which needs a quorum of the voters before and after),
    /// learners at once. The leader itself cannot be removed (hand leadership over first);
    /// an id that is no member is ignored. Waits until each change is committed.
    pub async fn remove_members(&self, ids: BTreeSet<NodeId>) -> Result<(), ProposeError> {
        if ids.contains(&self.node_id) {
            return Err(ProposeError::Fatal(format!(
                "node {} was asked to remove itself: a leader does not (hand its leadership \
                 over first, then ask the new leader)",
                self.node_id
            )));
        }
        let (voters, learners): (BTreeSet<NodeId>, BTreeSet<NodeId>) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            ids.iter()
                .filter(|id| membership.get_node(id).is_some())
                .partition(|id| voters.contains(id))
        };
        // Voters leave the membership whole (`retain = false`), not as learners.
        if !voters.is_empty() {
            let change = ChangeMembers::RemoveVoters(voters);
            self.change_membership(change, false).await?;
        }
        if !learners.is_empty() {
            let change = ChangeMembers::RemoveNodes(learners);
            self.change_membership(change, false).await?;
        }
        Ok(())
    }

    /// On the leader: gives each member of the membership in `addresses` (node id → address)
    /// that address, where the membership says another (openraft's `SetNodes`, through the
    /// log): a member moved. Ids that are no member are ignored. Answers the ids changed.
    pub async fn set_member_addresses(
        &self,
        addresses: BTreeMap<NodeId, String>,
    ) -> Result<Vec<NodeId>, ProposeError> {
        let changed: BTreeMap<NodeId, BasicNode> = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            addresses
                .into_iter()
                .filter(|(id, address)| {
                    membership
                        .get_node(id)
                        .is_some_and(|node| node.addr != *address)
                })
                .map(|(id, address)| (id, BasicNode::new(address)))
                .collect()
        };
        let ids: Vec<NodeId> = changed.keys().copied().collect();
        if !changed.is_empty() {
            self.change_membership(ChangeMembers::SetNodes(changed), true)
                .await?;
        }
        Ok(ids)
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, BasicNode>,
        retain: bool,
    ) -> Result<(), ProposeError> {
        let wait = Duration::from_millis(crate::PROPOSE_WAIT_MS_MAX);
        let Ok(changed) =
            tokio::time::timeout(wait, self.raft.change_membership(change, retain)).await
        else {
            return Err(ProposeError::Uncertain(format!(
                "the membership change was not committed within {} ms (no quorum of the voters \
                 before and after it?); it may still be, once they answer",
                crate::PROPOSE_WAIT_MS_MAX
            )));
        };
        match changed {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(self.not_leader(forward.leader_id, forward.leader_node))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(ProposeError::Fatal(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(crate::propose_fatal(e)),
        }
    }
}

/// What [`promote_offline`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Promotion {
    /// The last log entry this member had: everything after it that others acknowledged is lost.
    pub last_log_index: u64,
    pub last_log_term: u64,
    /// The new term this member leads.
    pub term: u64,
    /// Every other member, now a learner.
    pub learners: Vec<NodeId>,
}

/// Rewrites the Raft state of a **stopped** member in `dir` so that it starts as the only voter
/// and the leader of a new term, every other member a learner: the forced failover when the
/// voters are gone. Appends a membership entry after its last entry and saves a committed vote
/// for itself. Unsafe by nature: entries the old leader acknowledged that this member never
/// received are lost, and an old voter restarted with its own data leads its old membership
/// until it hears from the new leader.
pub fn promote_offline(
    dir: &Path,
    node_id: NodeId,
    members: &BTreeMap<NodeId, Member>,
) -> Result<Promotion, Error> {
    if !members.contains_key(&node_id) {
        return Err(Error::Config(format!("node {node_id} is not a member")));
    }
    let mut log = DurableLog::open(dir, SyncMode::Fsync, crate::LOG_SEGMENT_BYTES_MAX)?;
    let snapshot_last = crate::state_machine::snapshot_last_log_id(dir)?;
    let last = log.last_log_id().max(snapshot_last);
    let last_index = last.map(|l| l.index);
    let last_term = last.map_or(0, |l| l.leader_id.term);
    let vote_term = log.vote().map_or(0, |v| v.leader_id.term);
    // Two terms up: an old voter restarted on its own data resumes (at most) its old term and
    // may win one more election alone; the new leader's term stays above both.
    let term = last_term.max(vote_term) + 2;
    let nodes: BTreeMap<NodeId, BasicNode> = members
        .iter()
        .map(|(id, member)| (*id, BasicNode::new(&member.address)))
        .collect();
    let membership = Membership::new(vec![BTreeSet::from([node_id])], nodes);
    let index = last_index.map_or(0, |i| i + 1);
    if log.last_log_id() < last {
        // The log ends before the snapshot: start the log after the snapshot.
        let receiver = log.purge(last.expect("checked"))?;
        wait(receiver)?;
    }
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, node_id), index),
        payload: EntryPayload::Membership(membership),
    };
    let (sender, receiver) = std::sync::mpsc::channel();
    log.append(
        vec![entry],
        Box::new(move |result| {
            let _ = sender.send(result);
        }),
    )?;
    receiver
        .recv_timeout(Duration::from_millis(PROMOTE_WRITE_WAIT_MS))
        .map_err(|_| Error::Log("the membership entry was not written in time".into()))?
        .map_err(|e| Error::Log(format!("writing the membership entry: {e}")))?;
    wait(Some(log.save_vote(Vote::new_committed(term, node_id))?))?;
    log.close_and_join()?;
    tracing::warn!(
        node = node_id,
        term,
        last_index = ?last_index,
        "promoted to the only voter of the replicaset by force"
    );
    Ok(Promotion {
        last_log_index: last_index.unwrap_or(0),
        last_log_term: last_term,
        term,
        learners: members
            .keys()
            .copied()
            .filter(|id| *id != node_id)
            .collect(),
    })
}

pub(crate) fn wait(
    receiver: Option<tokio::sync::oneshot::Receiver<std::io::Result<()>>>,
) -> Result<(), Error> {
    match receiver {
        None => Ok(()),
        Some(receiver) => receiver
            .blocking_recv()
            .map_err(|_| Error::Log("the log writer stopped".into()))?
            .map_err(|e| Error::Log(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_gate_counts_admitted_commands_until_queued_and_refuses_while_held() {
        let gate = WriteGate::default();
        let first = gate.enter().expect("admitted");
        assert_eq!(gate.entering(), 1);
        // A hold refuses new commands but still counts the one already admitted.
        gate.hold(Some(Instant::now() + Duration::from_secs(60)));
        assert!(gate.enter().is_none());
        assert_eq!(gate.entering(), 1);
        drop(first);
        assert_eq!(gate.entering(), 0);
        // Released, or expired: admitted again.
        gate.hold(None);
        assert!(gate.enter().is_some());
        assert_eq!(gate.entering(), 0);
        gate.hold(Some(Instant::now()));
        assert!(gate.enter().is_some());
    }
}
