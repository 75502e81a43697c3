//! Router → storage call batching: one stream per batch of calls instead of one per call.
//!
//! The profile of a router under load is the network stack: every call costs a QUIC stream
//! (and its packets, acknowledgements and wake-ups) on the router → storage hop. A
//! [`MemberBatcher`] per replicaset member queues the calls routed to that member while earlier
//! batches are in flight (at most [`BATCHES_IN_FLIGHT_MAX`]) and sends them as one
//! `Request::CallBatch`, answered by one `Response::Batch` with an answer per call. With one
//! call waiting, it goes alone as a plain `Request::Call` (no added latency when idle).

use std::sync::Arc;

use billcl_client::{Error, Peer};
use billcl_proto::message::{Call, Request, Response, CALL_BATCH_MAX};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Batches in flight to one member at once; calls arriving meanwhile form the next batch.
pub const BATCHES_IN_FLIGHT_MAX: usize = 2;
/// Calls waiting for one member at most; further calls fail at once as unavailable.
pub const QUEUED_CALLS_MAX: usize = 65_536;

struct Queued {
    call: Call,
    answer: oneshot::Sender<Result<Response, Error>>,
}

/// The batching front of one member's [`Peer`].
pub struct MemberBatcher {
    queue: mpsc::Sender<Queued>,
}

impl MemberBatcher {
    /// Starts the batching task of `peer` (on the current tokio runtime).
    pub fn start(peer: Peer) -> MemberBatcher {
        let (queue, receiver) = mpsc::channel(QUEUED_CALLS_MAX);
        tokio::spawn(run(peer, receiver));
        MemberBatcher { queue }
    }

    /// Sends `call` in the next batch to this member; the same contract as
    /// [`Peer::request`] with a `Request::Call`.
    pub async fn request(&self, call: Call) -> Result<Response, Error> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .try_send(Queued { call, answer })
            .map_err(|_| Error::Transport("too many calls queued for this member".to_string()))?;
        answered
            .await
            .map_err(|_| Error::Transport("the call batcher stopped".to_string()))?
    }
}

async fn run(peer: Peer, mut queue: mpsc::Receiver<Queued>) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the batch semaphore is never closed");
        let mut batch = vec![first];
        while batch.len() < CALL_BATCH_MAX {
            match queue.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        let peer = peer.clone();
        tokio::spawn(async move {
            send(&peer, batch).await;
            drop(permit);
        });
    }
}

async fn send(peer: &Peer, mut batch: Vec<Queued>) {
    assert!(!batch.is_empty() && batch.len() <= CALL_BATCH_MAX);
    if batch.len() == 1 {
        let queued = batch.pop().expect("one call");
        let result = peer.request(&Request::Call(queued.call)).await;
        let _ = queued.answer.send(result);
        return;
    }
    let count = batch.len();
    let (calls, answers): (Vec<Call>, Vec<_>) = batch
        .into_iter()
        .map(|queued| (queued.call, queued.answer))
        .unzip();
    match peer.request(&Request::CallBatch(calls)).await {
        Ok(Response::Batch(responses)) if responses.len() == count => {
            for (answer, response) in answers.into_iter().zip(responses) {
                let _ = answer.send(Ok(response));
            }
        }
        // The member refused the whole batch (e.g. it is shutting down): each call gets that.
        Ok(Response::Error(reply)) => {
            for answer in answers {
                let _ = answer.send(Ok(Response::Error(reply.clone())));
            }
        }
        Ok(other) => {
            let message = format!(
                "{} answered a batch of {count} calls with a {:#04x} frame",
                peer.address(),
                other.kind()
            );
            for answer in answers {
                let _ = answer.send(Err(Error::Unexpected(message.clone())));
            }
        }
        Err(error) => {
            let retryable = error.is_retryable();
            let message = error.to_string();
            for answer in answers {
                let error = if retryable {
                    Error::Transport(message.clone())
                } else {
                    Error::Unexpected(message.clone())
                };
                let _ = answer.send(Err(error));
            }
        }
    }
}
