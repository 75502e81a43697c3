//! openraft's network (`RaftNetworkFactory` + `RaftNetwork`) over a [`Transport`], and the
//! receiving side ([`handle`]): the RPC codec lives here, so the transport only moves bytes.
//!
//! A message is the bincode of an [`RpcRequest`]; its answer the bincode of an [`RpcAnswer`]
//! (openraft's `Result<_, RaftError>` for the request kind, or `Malformed` when the message could
//! not be decoded). Both are bounded by [`RPC_BYTES_MAX`].

use std::sync::Arc;
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
}

/// Serves one message that arrived from a peer. Never panics on bad input.
pub(crate) async fn handle(raft: &Raft<TypeConfig>, message: Vec<u8>) -> Vec<u8> {
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
    };
    codec::encode(&answer).unwrap_or_else(|e| {
        tracing::error!(error = %e, "encoding a raft answer");
        codec::encode(&RpcAnswer::Malformed(format!(
            "the answer could not be encoded: {e}"
        )))
        .unwrap_or_default()
    })
}

/// Makes a [`PeerClient`] per target; all share the transport.
pub(crate) struct NetworkFactory<T: Transport> {
    node_id: NodeId,
    transport: Arc<T>,
}

impl<T: Transport> NetworkFactory<T> {
    pub(crate) fn new(node_id: NodeId, transport: T) -> Self {
        NetworkFactory {
            node_id,
            transport: Arc::new(transport),
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
        }
    }
}

/// Sends RPCs to one peer.
pub(crate) struct PeerClient<T: Transport> {
    node_id: NodeId,
    target: NodeId,
    address: String,
    transport: Arc<T>,
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
        match self.call(action, message, option.hard_ttl()).await {
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
