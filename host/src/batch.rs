//! Group commit of command calls on a replicaset leader.
//!
//! Every Raft log entry costs a trip through the consensus pipeline (append, flush, commit,
//! apply, several thread hand-offs) whatever its size, so one entry per call caps writes at a
//! few thousand per second however many are in flight. The [`Batcher`] instead queues the
//! command calls that arrive while earlier proposals are in flight and proposes them as one
//! [`Command::Batch`] entry: under load, entries carry tens or hundreds of calls and the
//! per-entry cost is shared; with one call in flight, the entry is that call alone (no waiting).
//!
//! A batch is still a list of commands, not of effects: every member applies its calls in
//! order, each with its own timestamp, exactly as if they were separate entries, and each
//! caller gets its own answer.

use std::sync::Arc;

use billcl_proto::message::{ErrorCode, ErrorReply, Response};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::state::Command;
use crate::storage::{decode_response, error, StorageNode};

/// Calls in one batch entry at most.
pub const BATCH_CALLS_MAX: usize = 1024;
/// Encoded calls in one batch entry at most, in bytes (well under the log's
/// `COMMAND_BYTES_MAX`).
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// Proposals (batches) in flight at once; calls arriving meanwhile form the next batch.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 2;
/// Calls waiting for a batch at most; further calls are refused as `TooBusy`.
pub const QUEUED_CALLS_MAX: usize = 65_536;

/// A call waiting to be proposed, and where its answer goes.
pub struct Pending {
    command: Command,
    bytes: usize,
    /// Not proposed after this: its caller has stopped waiting (the call's `timeout_ms`).
    deadline: Instant,
    answer: oneshot::Sender<Result<Response, ErrorReply>>,
}

/// The entry point of the leader's group commit: cheap to share, one per storage node.
pub struct Batcher {
    queue: mpsc::Sender<Pending>,
}

impl Batcher {
    /// A batcher and the queue its [`run`] task drains.
    pub fn new() -> (Batcher, mpsc::Receiver<Pending>) {
        let (queue, receiver) = mpsc::channel(QUEUED_CALLS_MAX);
        (Batcher { queue }, receiver)
    }

    /// Queues `command` (a [`Command::Call`]) for the next batch; await the returned
    /// [`Answer`] for its answer. Does not yield: commands queued one after the other without
    /// an `.await` between them go to the log in one batch.
    /// A command still waiting at `deadline` is not proposed any more: it is answered
    /// `Timeout` and never takes effect.
    pub fn enqueue(&self, command: Command, deadline: Instant) -> Result<Answer, ErrorReply> {
        let bytes = match &command {
            Command::Call { call, .. } => call.len() + 64,
            other => other.encode().len(),
        };
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            command,
            bytes,
            deadline,
            answer,
        };
        if let Err(refused) = self.queue.try_send(pending) {
            let reason = match refused {
                mpsc::error::TrySendError::Full(_) => {
                    format!("{QUEUED_CALLS_MAX} calls are already waiting for the log; retry later")
                }
                mpsc::error::TrySendError::Closed(_) => "the node is shutting down".to_string(),
            };
            return Err(error(ErrorCode::TooBusy, reason));
        }
        Ok(Answer(answered))
    }
}

/// The answer of one queued command, once its batch is applied.
pub struct Answer(oneshot::Receiver<Result<Response, ErrorReply>>);

impl std::future::Future for Answer {
    type Output = Result<Response, ErrorReply>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(context)
            .map(|answered| {
                answered.unwrap_or_else(|_| {
                    Err(error(ErrorCode::Internal, "the batch proposer stopped"))
                })
            })
    }
}

/// Drains the queue into batches and proposes them, at most [`PROPOSALS_IN_FLIGHT_MAX`] at
/// once. Runs for the life of the node.
pub async fn run(node: Arc<StorageNode>, mut queue: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(pending) => pending,
            None => match queue.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the proposal semaphore is never closed");
        // Let the tasks that are queueing calls right now (the rest of a router's batch)
        // finish first: a few microseconds, and the calls go to the log together.
        tokio::task::yield_now().await;
        // Everything that queued while the earlier proposals were in flight joins this one.
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < BATCH_CALLS_MAX {
            match queue.try_recv() {
                Ok(pending) if bytes + pending.bytes > BATCH_BYTES_MAX => {
                    carried = Some(pending);
                    break;
                }
                Ok(pending) => {
                    bytes += pending.bytes;
                    batch.push(pending);
                }
                Err(_) => break,
            }
        }
        // A call whose caller stopped waiting is not started: a copy proposed late (after an
        // outage, say) would carry a timestamp past the idempotency window of its earlier
        // copies (docs/protocol.md, §4.1).
        let now = Instant::now();
        for late in batch.extract_if(.., |p| p.answer.is_closed() || p.deadline <= now) {
            let _ = late.answer.send(Err(error(
                ErrorCode::Timeout,
                "not started: the call waited for the log longer than its caller waits \
                 (timeout_ms / request_timeout_ms); it did not take effect, retry it",
            )));
        }
        if batch.is_empty() {
            continue;
        }
        let node = node.clone();
        tokio::spawn(async move {
            propose(&node, batch).await;
            drop(permit);
        });
    }
}

/// Proposes one batch and hands every caller its answer.
async fn propose(node: &StorageNode, mut batch: Vec<Pending>) {
    assert!(!batch.is_empty() && batch.len() <= BATCH_CALLS_MAX);
    if batch.len() == 1 {
        let pending = batch.pop().expect("one call");
        let result = node
            .replica
            .propose(pending.command.encode())
            .await
            .map(|answer| decode_response(&answer))
            .map_err(|e| node.propose_error(e));
        let _ = pending.answer.send(result);
        return;
    }
    let (commands, answers): (Vec<Command>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.command, pending.answer))
        .unzip();
    let count = commands.len();
    match node
        .replica
        .propose(Command::Batch(commands).encode())
        .await
    {
        Err(e) => {
            let reply = node.propose_error(e);
            for answer in answers {
                let _ = answer.send(Err(reply.clone()));
            }
        }
        Ok(bytes) => match bincode::deserialize::<Vec<Vec<u8>>>(&bytes) {
            Ok(responses) if responses.len() == count => {
                for (answer, response) in answers.into_iter().zip(responses) {
                    let _ = answer.send(Ok(decode_response(&response)));
                }
            }
            _ => {
                let reply = error(
                    ErrorCode::Internal,
                    format!("the answer to a batch of {count} calls is malformed"),
                );
                for answer in answers {
                    let _ = answer.send(Err(reply.clone()));
                }
            }
        },
    }
}

/// The answer bytes of a batch entry: one encoded response per call, in order.
pub fn encode_answers(responses: &[Vec<u8>]) -> Vec<u8> {
    bincode::serialize(responses).expect("answers always serialize")
}
