//! openraft's network (`RaftNetworkFactory` + `RaftNetwork`) over a [`Transport`], and the
//! receiving side ([`handle`]): the RPC codec lives here, so the transport only moves bytes.
//!
//! A message is the bincode of an [`RpcRequest`]; its answer the bincode of an [`RpcAnswer`]
//! (openraft's `Result<_, RaftError>` for the request kind, or `Malformed` when the message could
//! not be decoded). Both are bounded by [`RPC_BYTES_MAX`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RPCTypes, Raft, RaftNetwork, RaftNetworkFactory};
use serde::{Deserialize, Serialize};

use crate::{codec, NodeId, Transport, TypeConfig, RPC_BYTES_MAX};

/// One RPC, as sent to a peer.
#[derive(Serialize, Deserialize)]
pub(crate) enum RpcRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// What Raft state the receiver holds: asked by a member about to found its replicaset
    /// ([`crate::Replica::initialize`]). After the older kinds, so that they keep their tags.
    Probe,
    /// Add the sender, node `node_id` at `address`, as a learner: asked by a learner that is
    /// not a member yet (an instance added to the cluster file after its replicaset was
    /// founded) of each voter in turn; the leader does it. Last, as `Probe` above.
    Join {
        node_id: NodeId,
        address: String,
    },
}

/// The answer to one [`RpcRequest`].
#[derive(Serialize, Deserialize)]
pub(crate) enum RpcAnswer {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The message could not be decoded.
    Malformed(String),
    /// This member has stopped applying the log ([`crate::Replica::halted`]) and takes no
    /// message until restarted: the sender treats it as unreachable (and backs off) instead of
    /// having every message refused by a stopped Raft core, logged at length each time.
    Halted(String),
    /// The answer to [`RpcRequest::Probe`].
    Probe(Holding),
    /// The answer to [`RpcRequest::Join`]: whether the sender was added now (false: it was a
    /// member already), or why not (this member is not the leader, another member has its id).
    Join(Result<bool, String>),
}

/// The Raft state a member holds, as it answers [`RpcRequest::Probe`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Holding {
    /// The term of its vote (0: it never voted nor heard of a leader).
    pub(crate) term: u64,
    pub(crate) last_log_index: Option<u64>,
    pub(crate) snapshot_index: Option<u64>,
    /// The voters of the membership it knows.
    pub(crate) voters: Vec<NodeId>,
}

impl Holding {
    fn of(raft: &Raft<TypeConfig>) -> Self {
        let metrics = raft.metrics().borrow().clone();
        Holding {
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            snapshot_index: metrics.snapshot.map(|id| id.index),
            voters: metrics.membership_config.membership().voter_ids().collect(),
        }
    }

    /// Whether this member belongs to a replicaset that was founded: it voted, or holds a
    /// log or a snapshot.
    pub(crate) fn holds_state(&self) -> bool {
        self.term > 0 || self.last_log_index.is_some() || self.snapshot_index.is_some()
    }
}

/// Serves one message that arrived from a peer. Never panics on bad input.
pub(crate) async fn handle(
    raft: &Raft<TypeConfig>,
    halted: Option<String>,
    message: Vec<u8>,
) -> Vec<u8> {
    if let Some(why) = halted {
        return codec::encode(&RpcAnswer::Halted(why)).unwrap_or_default();
    }
    let answer = match codec::decode::<RpcRequest>(&message, RPC_BYTES_MAX) {
        Err(e) => {
            tracing::warn!(bytes = message.len(), error = %e, "malformed raft message");
            RpcAnswer::Malformed(format!(
                "malformed raft message of {} bytes: {e}",
                message.len()
            ))
        }
        Ok(RpcRequest::AppendEntries(request)) => {
            RpcAnswer::AppendEntries(raft.append_entries(request).await)
        }
        Ok(RpcRequest::Vote(request)) => RpcAnswer::Vote(raft.vote(request).await),
        Ok(RpcRequest::InstallSnapshot(request)) => {
            RpcAnswer::InstallSnapshot(raft.install_snapshot(request).await)
        }
        Ok(RpcRequest::Probe) => RpcAnswer::Probe(Holding::of(raft)),
        Ok(RpcRequest::Join { node_id, address }) => {
            RpcAnswer::Join(add_learner(raft, node_id, address).await)
        }
    };
    codec::encode(&answer).unwrap_or_else(|e| {
        tracing::error!(error = %e, "encoding a raft answer");
        codec::encode(&RpcAnswer::Malformed(format!(
            "the answer could not be encoded: {e}"
        )))
        .unwrap_or_default()
    })
}

/// On the leader: adds node `node_id` at `address` as a learner, unless it is a member
/// already (false). Refused elsewhere, and for an id a member at another address has.
async fn add_learner(
    raft: &Raft<TypeConfig>,
    node_id: NodeId,
    address: String,
) -> Result<bool, String> {
    let known = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state != openraft::ServerState::Leader {
            return Err(match metrics.current_leader {
                Some(leader) => format!("not the leader (node {leader} is)"),
                None => "not the leader (none is known)".to_string(),
            });
        }
        let membership = metrics.membership_config.membership();
        membership.get_node(&node_id).map(|node| node.addr.clone())
    };
    match known {
        Some(known) if known == address => return Ok(false),
        Some(known) => {
            return Err(format!(
                "node {node_id} is a member already, at {known}: two instances of the replicaset \
                 have one node id, or this one moved (its address is not changed this way)"
            ))
        }
        None => {}
    }
    raft.add_learner(node_id, BasicNode::new(&address), false)
        .await
        .map(|_| {
            tracing::info!(learner = node_id, %address, "added a learner that asked to join");
            true
        })
        .map_err(|e| format!("cannot add node {node_id} yet: {e}"))
}

/// How often a leader sends a learner its log ([`crate::ReplicaConfig::learner_batch_ms`]).
#[derive(Clone)]
pub(crate) struct LearnerPacing {
    pub(crate) interval: Duration,
    /// Whether a member is a learner now (a failover may just have made it a voter).
    pub(crate) is_learner: Arc<dyn Fn(NodeId) -> bool + Send + Sync>,
}

impl LearnerPacing {
    /// Pacing by the current membership of `raft`, once it is set (the network is built
    /// before the Raft node it serves).
    pub(crate) fn by_membership(interval: Duration, raft: Arc<OnceLock<Raft<TypeConfig>>>) -> Self {
        LearnerPacing {
            interval,
            is_learner: Arc::new(move |target| {
                raft.get().is_some_and(|raft| {
                    let metrics = raft.metrics();
                    let metrics = metrics.borrow();
                    let membership = metrics.membership_config.membership();
                    membership.get_node(&target).is_some()
                        && !membership.voter_ids().any(|voter| voter == target)
                })
            }),
        }
    }

    fn holds_back(&self, target: NodeId) -> bool {
        !self.interval.is_zero() && (self.is_learner)(target)
    }
}

/// Makes a [`PeerClient`] per target; all share the transport.
pub(crate) struct NetworkFactory<T: Transport> {
    node_id: NodeId,
    transport: Arc<T>,
    pacing: LearnerPacing,
}

impl<T: Transport> NetworkFactory<T> {
    pub(crate) fn new(node_id: NodeId, transport: Arc<T>, pacing: LearnerPacing) -> Self {
        NetworkFactory {
            node_id,
            transport,
            pacing,
        }
    }
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            node_id: self.node_id,
            target,
            address: node.addr.clone(),
            transport: self.transport.clone(),
            pacing: self.pacing.clone(),
        }
    }
}

/// Sends RPCs to one peer.
pub(crate) struct PeerClient<T: Transport> {
    node_id: NodeId,
    target: NodeId,
    address: String,
    transport: Arc<T>,
    pacing: LearnerPacing,
}

/// Why a call got no answer of the expected kind.
enum CallError {
    Timeout(Duration),
    Unreachable(String),
    Network(String),
}

impl<T: Transport> PeerClient<T> {
    async fn call(
        &self,
        action: RPCTypes,
        message: Vec<u8>,
        ttl: Duration,
    ) -> Result<RpcAnswer, CallError> {
        let send = self.transport.send(self.target, &self.address, message);
        let answer = match tokio::time::timeout(ttl, send).await {
            Err(_) => return Err(CallError::Timeout(ttl)),
            Ok(Err(e)) => return Err(CallError::Unreachable(e)),
            Ok(Ok(answer)) => answer,
        };
        match codec::decode::<RpcAnswer>(&answer, RPC_BYTES_MAX) {
            Ok(RpcAnswer::Malformed(why)) => Err(CallError::Network(format!(
                "node {} refused {action}: {why}",
                self.target
            ))),
            Ok(RpcAnswer::Halted(why)) => Err(CallError::Unreachable(format!(
                "node {} {why}",
                self.target
            ))),
            Ok(answer) => Ok(answer),
            Err(e) => Err(CallError::Network(format!(
                "node {} answered {action} with bad bytes: {e}",
                self.target
            ))),
        }
    }

    fn error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        error: CallError,
    ) -> RPCError<NodeId, BasicNode, E> {
        match error {
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: self.node_id,
                target: self.target,
                timeout,
            }),
            CallError::Unreachable(why) => {
                RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)))
            }
            CallError::Network(why) => {
                RPCError::Network(NetworkError::new(&std::io::Error::other(why)))
            }
        }
    }

    fn unexpected<E: std::error::Error>(&self, action: RPCTypes) -> RPCError<NodeId, BasicNode, E> {
        let why = format!(
            "node {} answered {action} with another kind of answer",
            self.target
        );
        RPCError::Network(NetworkError::new(&std::io::Error::other(why)))
    }
}

fn encode(request: &RpcRequest) -> Result<Vec<u8>, std::io::Error> {
    codec::encode(request)
        .map_err(|e| std::io::Error::other(format!("encoding a raft message: {e}")))
}

impl<T: Transport> RaftNetwork<TypeConfig> for PeerClient<T> {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let action = RPCTypes::AppendEntries;
        let entries = request.entries.len() as u64;
        let message = encode(&RpcRequest::AppendEntries(request))
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if message.len() > RPC_BYTES_MAX && entries > 1 {
            // openraft retries with at most this many entries.
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(entries / 2),
            ));
        }
        let sent = tokio::time::Instant::now();
        let answer = self.call(action, message, option.hard_ttl()).await;
        if self.pacing.holds_back(self.target) {
            // openraft sends a member its next entries as soon as this returns, all that were
            // logged meanwhile: returning no sooner than the interval after sending gathers a
            // few ms of entries into the learner's next append.
            // Well inside openraft's time limit for the call, whatever the configuration.
            let hold = self.pacing.interval.min(option.hard_ttl() / 2);
            tokio::time::sleep_until(sent + hold).await;
        }
        match answer {
            Ok(RpcAnswer::AppendEntries(Ok(response))) => Ok(response),
            Ok(RpcAnswer::AppendEntries(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(self.unexpected(action)),
            Err(e) => Err(self.error(action, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let action = RPCTypes::InstallSnapshot;
        let message = encode(&RpcRequest::InstallSnapshot(request))
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        match self.call(action, message, option.hard_ttl()).await {
            Ok(RpcAnswer::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(RpcAnswer::InstallSnapshot(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(self.unexpected(action)),
            Err(e) => Err(self.error(action, e)),
        }
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let action = RPCTypes::Vote;
        let message = encode(&RpcRequest::Vote(request))
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        match self.call(action, message, option.hard_ttl()).await {
            Ok(RpcAnswer::Vote(Ok(response))) => Ok(response),
            Ok(RpcAnswer::Vote(Err(e))) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(self.unexpected(action)),
            Err(e) => Err(self.error(action, e)),
        }
    }
}

/// What a member `target` at `address` answered a [`RpcRequest::Probe`]: its [`Holding`], or
/// why it could not tell (down, halted, or an older build that does not know the probe).
pub(crate) async fn probe<T: Transport>(
    transport: &T,
    target: NodeId,
    address: &str,
    ttl: Duration,
) -> Result<Holding, String> {
    match ask(transport, target, address, &RpcRequest::Probe, ttl).await? {
        RpcAnswer::Probe(holding) => Ok(holding),
        _ => Err("it answered another question".to_string()),
    }
}

/// What member `target` at `address` answered a [`RpcRequest::Join`] of node `node_id` at
/// `node_address`: whether it added it now (false: it was a member), or why not.
pub(crate) async fn ask_to_join<T: Transport>(
    transport: &T,
    (target, address): (NodeId, &str),
    node_id: NodeId,
    node_address: &str,
    ttl: Duration,
) -> Result<bool, String> {
    let join = RpcRequest::Join {
        node_id,
        address: node_address.to_string(),
    };
    match ask(transport, target, address, &join, ttl).await? {
        RpcAnswer::Join(answer) => answer,
        _ => Err("it answered another question".to_string()),
    }
}

/// Sends one of the members' own questions (not openraft's) to `target` at `address`, and
/// decodes its answer; a refusal to hear it (halted, or a billcl that does not know the
/// question) is an error.
async fn ask<T: Transport>(
    transport: &T,
    target: NodeId,
    address: &str,
    request: &RpcRequest,
    ttl: Duration,
) -> Result<RpcAnswer, String> {
    let message = codec::encode(request).map_err(|e| e.to_string())?;
    let answer = match tokio::time::timeout(ttl, transport.send(target, address, message)).await {
        Err(_) => return Err(format!("no answer in {} ms", ttl.as_millis())),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(answer)) => answer,
    };
    match codec::decode::<RpcAnswer>(&answer, RPC_BYTES_MAX) {
        Ok(RpcAnswer::Halted(why)) => Err(format!("it is halted: {why}")),
        Ok(RpcAnswer::Malformed(why)) => Err(format!(
            "it does not know the question (an older billcl?): {why}"
        )),
        Ok(answer) => Ok(answer),
        Err(e) => Err(format!("it answered with bad bytes: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::Vote;

    /// A peer that accepts every append at once.
    struct Accepting;

    impl Transport for Accepting {
        async fn send(&self, _: NodeId, _: &str, _: Vec<u8>) -> Result<Vec<u8>, String> {
            codec::encode(&RpcAnswer::AppendEntries(Ok(
                AppendEntriesResponse::Success,
            )))
            .map_err(|e| e.to_string())
        }
    }

    fn client(interval: Duration, learner: NodeId) -> PeerClient<Accepting> {
        PeerClient {
            node_id: 1,
            target: 2,
            address: "127.0.0.1:1".to_string(),
            transport: Arc::new(Accepting),
            pacing: LearnerPacing {
                interval,
                is_learner: Arc::new(move |target| target == learner),
            },
        }
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    async fn three_appends(client: &mut PeerClient<Accepting>) -> Duration {
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            let option = RPCOption::new(Duration::from_secs(5));
            let answer = client.append_entries(heartbeat(), option).await;
            assert!(matches!(answer, Ok(AppendEntriesResponse::Success)));
        }
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_learner_is_sent_at_most_once_per_interval_and_a_voter_at_once() {
        let interval = Duration::from_millis(40);
        // Target 2 is a learner: each append returns no sooner than the interval after it
        // was sent, so openraft's next one carries what was logged meanwhile.
        let paced = three_appends(&mut client(interval, 2)).await;
        assert!(paced >= 3 * interval, "learner appends took {paced:?}");
        // Target 2 is a voter (the learner is someone else): never held back.
        let voter = three_appends(&mut client(interval, 3)).await;
        assert!(voter < interval, "voter appends took {voter:?}");
        // Pacing off.
        let off = three_appends(&mut client(Duration::ZERO, 2)).await;
        assert!(off < interval, "unpaced appends took {off:?}");
    }
}
