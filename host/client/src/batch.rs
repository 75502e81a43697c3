//! Call coalescing on one connection: one stream per batch of calls instead of one per call.
//!
//! Under load the cost of a call is the network stack, not the call: every QUIC stream is
//! packets, acknowledgements, stream state and thread wake-ups on both ends. A [`CallBatcher`]
//! in front of a [`Peer`] queues the calls made while earlier batches to that peer are in
//! flight (at most as many as its owner chooses) and sends them as one `Request::CallBatch`,
//! answered by one `Response::Batch` with an answer per call (docs/protocol.md, "CallBatch").
//! A call made while nothing waits goes alone as a plain `Request::Call`, so an idle link adds
//! no latency. The SDK's [`crate::Client`] uses one per router; routers use one per storage
//! member.
//!
//! A batch is answered when its last call is: a call shares the latency of the slowest call
//! it travelled with (a read batched with writes waits for the writes' group commit).

use std::sync::Arc;
use std::time::Duration;

use billcl_proto::message::{Call, Request, Response, CALL_BATCH_MAX};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::{Error, Peer};

/// Calls waiting for one link at most; further calls fail at once (retryable).
pub const QUEUED_CALLS_MAX: usize = 65_536;

/// A call waiting for a batch, with the moment its caller stops waiting.
struct Queued {
    call: Call,
    deadline: Instant,
    answer: oneshot::Sender<Result<Response, Error>>,
}

/// The batching front of one [`Peer`]. Cheap to share (`&self` methods); dropping it stops its
/// task once the queued calls are sent.
#[derive(Debug)]
pub struct CallBatcher {
    queue: mpsc::Sender<Queued>,
    address: std::net::SocketAddr,
}

impl CallBatcher {
    /// Starts the batching task of `peer` (on the current tokio runtime): at most
    /// `batches_in_flight_max` batches in flight at once, each of at most `calls_max` calls
    /// (1..=[`CALL_BATCH_MAX`]).
    pub fn start(peer: Peer, calls_max: usize, batches_in_flight_max: usize) -> CallBatcher {
        assert!(
            (1..=CALL_BATCH_MAX).contains(&calls_max),
            "a batch holds 1..={CALL_BATCH_MAX} calls, got {calls_max}"
        );
        assert!(batches_in_flight_max >= 1, "at least one batch in flight");
        let (queue, receiver) = mpsc::channel(QUEUED_CALLS_MAX);
        let address = peer.address();
        tokio::spawn(run(peer, receiver, calls_max, batches_in_flight_max));
        CallBatcher { queue, address }
    }

    /// Sends `call` in the next batch and waits up to `timeout` for its answer: the contract
    /// of [`Peer::request_with_timeout`] with a `Request::Call` (an error reply is
    /// `Ok(Response::Error(..))`; [`Error::Connect`] means nothing was sent).
    pub async fn request(&self, call: Call, timeout: Duration) -> Result<Response, Error> {
        let deadline = Instant::now() + timeout;
        let (answer, answered) = oneshot::channel();
        self.queue
            .try_send(Queued {
                call,
                deadline,
                answer,
            })
            .map_err(|refused| match refused {
                mpsc::error::TrySendError::Full(_) => Error::Transport(format!(
                    "{QUEUED_CALLS_MAX} calls are already waiting for {}; retry later",
                    self.address
                )),
                mpsc::error::TrySendError::Closed(_) => {
                    Error::Transport("the call batcher stopped".to_string())
                }
            })?;
        let timed_out = || Error::Timeout {
            address: self.address,
            after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        match tokio::time::timeout_at(deadline, answered).await {
            Err(_) => Err(timed_out()),
            Ok(Err(_)) => Err(Error::Transport("the call batcher stopped".to_string())),
            Ok(Ok(result)) => result,
        }
    }
}

async fn run(
    peer: Peer,
    mut queue: mpsc::Receiver<Queued>,
    calls_max: usize,
    batches_in_flight_max: usize,
) {
    let in_flight = Arc::new(Semaphore::new(batches_in_flight_max));
    while let Some(first) = queue.recv().await {
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the batch semaphore is never closed");
        // Let the tasks that are making calls right now (e.g. the rest of a batch a router
        // is forwarding) queue them first: a few microseconds, one batch instead of several.
        tokio::task::yield_now().await;
        let mut batch = Vec::with_capacity(calls_max.min(64));
        batch.push(first);
        while batch.len() < calls_max {
            match queue.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        // Callers that gave up while queued are not sent at all.
        batch.retain(|queued| !queued.answer.is_closed());
        if batch.is_empty() {
            continue;
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
    // Each call tells the next node how long its caller still waits, so that nothing on the
    // way starts it after its caller gave up (docs/protocol.md, §4 0x01 Call, `timeout_ms`).
    let now = Instant::now();
    for queued in &mut batch {
        let left = queued.deadline.saturating_duration_since(now).as_millis();
        queued.call.timeout_ms = Some(u32::try_from(left).unwrap_or(u32::MAX).max(1));
    }
    // The batch waits as long as its most patient caller.
    let deadline = batch
        .iter()
        .map(|queued| queued.deadline)
        .max()
        .expect("a batch is not empty");
    let timeout = deadline.saturating_duration_since(Instant::now());
    if batch.len() == 1 {
        let queued = batch.pop().expect("one call");
        let result = peer
            .request_with_timeout(&Request::Call(queued.call), timeout)
            .await;
        let _ = queued.answer.send(result);
        return;
    }
    let count = batch.len();
    let (calls, answers): (Vec<Call>, Vec<_>) = batch
        .into_iter()
        .map(|queued| (queued.call, queued.answer))
        .unzip();
    match peer
        .request_with_timeout(&Request::CallBatch(calls), timeout)
        .await
    {
        Ok(Response::Batch(responses)) if responses.len() == count => {
            for (answer, response) in answers.into_iter().zip(responses) {
                let _ = answer.send(Ok(response));
            }
        }
        // The peer refused the whole batch (e.g. it is shutting down): each call gets that.
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
            for answer in answers {
                let _ = answer.send(Err(error.duplicate()));
            }
        }
    }
}

impl Error {
    /// The same failure again, for each call of a batch that failed as a whole (the kind,
    /// and so what the caller may do about it, is kept: a `Connect` still says nothing was
    /// sent).
    fn duplicate(&self) -> Error {
        match self {
            Error::Connect { address, reason } => Error::Connect {
                address: *address,
                reason: reason.clone(),
            },
            Error::Timeout { address, after_ms } => Error::Timeout {
                address: *address,
                after_ms: *after_ms,
            },
            Error::Transport(message) => Error::Transport(message.clone()),
            Error::Protocol(error) => Error::Protocol(error.clone()),
            Error::Server { code, message } => Error::Server {
                code: *code,
                message: message.clone(),
            },
            Error::Tls(message) => Error::Tls(message.clone()),
            Error::Config(message) => Error::Config(message.clone()),
            Error::Unexpected(message) => Error::Unexpected(message.clone()),
        }
    }
}
