//! Call coalescing on one connection: one stream per batch of calls instead of one per call.
//!
//! Under load the cost of a call is the network stack, not the call: every QUIC stream is
//! packets, acknowledgements, stream state and thread wake-ups on both ends. A [`CallBatcher`]
//! in front of a [`Peer`] queues the calls made while earlier batches to that peer are in
//! flight (at most as many as its owner chooses) and sends them as one `Request::CallStream`,
//! answered by an `Answer` frame per call as each is done (docs/protocol.md, "CallStream"),
//! or, with [`Answers::Together`], as one `Request::CallBatch` answered by one `Batch`.
//! A call made while nothing waits goes alone as a plain `Request::Call`, so an idle link adds
//! no latency. The SDK's [`crate::Client`] uses one per router; routers use one per storage
//! member.
//!
//! With [`Answers::AsReady`] (the default) each caller gets its answer as soon as it arrives:
//! a read batched with writes does not wait for their group commit, a call for one replicaset
//! not for another's. A batch holds one of the places in flight until it is answered, until
//! its first answer ([`Answers::AsReady`]), or for [`BATCH_PLACE_HELD_MS`] at most.

use std::sync::Arc;
use std::time::Duration;

use billcl_proto::message::{Call, Request, Response, CALL_BATCH_MAX};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::{Error, Peer};

/// Calls waiting for one link at most; further calls fail at once (retryable).
pub const QUEUED_CALLS_MAX: usize = 65_536;

/// The longest a batch keeps its place among the batches in flight while its answers are out
/// (the places make calls coalesce while answers come back quickly). A batch slower than this
/// (a call in it waits on a replicaset that is failing over, say) stays in flight but lets
/// the calls made after it go; so does an `AsReady` batch at its first answer.
pub const BATCH_PLACE_HELD_MS: u64 = 10;

/// How the answers to a batch of calls come back (docs/protocol.md, "CallStream").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Answers {
    /// Each call's answer as soon as it is done (`CallStream`): a call waits for nothing but
    /// itself, not for a call to another replicaset (one that is failing over, say) nor a
    /// read for writes' group commit. Costs more packets per call when a batch's calls
    /// finish at different moments.
    #[default]
    AsReady,
    /// All the answers together when the last call is done (`CallBatch`): one frame per
    /// batch, the least work per call for a client that saturates the cluster; a call shares
    /// the latency of the slowest call it travelled with.
    Together,
}

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
    /// (1..=[`CALL_BATCH_MAX`]), answered as `answers` says.
    pub fn start(
        peer: Peer,
        calls_max: usize,
        batches_in_flight_max: usize,
        answers: Answers,
    ) -> CallBatcher {
        assert!(
            (1..=CALL_BATCH_MAX).contains(&calls_max),
            "a batch holds 1..={CALL_BATCH_MAX} calls, got {calls_max}"
        );
        assert!(batches_in_flight_max >= 1, "at least one batch in flight");
        let (queue, receiver) = mpsc::channel(QUEUED_CALLS_MAX);
        let address = peer.address();
        tokio::spawn(run(
            peer,
            receiver,
            calls_max,
            batches_in_flight_max,
            answers,
        ));
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
    answers: Answers,
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
            let place = std::sync::Mutex::new(Some(permit));
            let sending = send(&peer, batch, answers, &place);
            tokio::pin!(sending);
            // A slow batch (a call in it waits on a replicaset that is failing over, say)
            // gives its place back, so that the calls made after it go on.
            let slow = tokio::time::sleep(Duration::from_millis(BATCH_PLACE_HELD_MS));
            tokio::select! {
                biased;
                () = &mut sending => return,
                () = slow => drop(place.lock().unwrap().take()),
            }
            sending.await;
        });
    }
}

/// Sends `batch` and hands out its answers. `place` holds the batch's place among the
/// batches in flight: given back when the batch is done, after [`BATCH_PLACE_HELD_MS`] (by
/// the caller), or, with [`Answers::AsReady`], at its first answer, so that calls still
/// waiting in it do not hold back the calls made after them.
async fn send(
    peer: &Peer,
    mut batch: Vec<Queued>,
    answers: Answers,
    place: &std::sync::Mutex<Option<OwnedSemaphorePermit>>,
) {
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
    let (calls, mut waiting): (Vec<Call>, Vec<_>) = batch
        .into_iter()
        .map(|queued| (queued.call, Some(queued.answer)))
        .unzip();
    let result = match answers {
        Answers::AsReady => {
            // Each call's answer goes to its caller as soon as it arrives.
            let mut first = true;
            let mut on_answer = |index: u32, response: Response| {
                if std::mem::take(&mut first) {
                    drop(place.lock().unwrap().take());
                }
                if let Some(answer) = waiting.get_mut(index as usize).and_then(Option::take) {
                    let _ = answer.send(Ok(response));
                }
            };
            peer.request_answers(calls, timeout, &mut on_answer).await
        }
        Answers::Together => {
            match peer
                .request_with_timeout(&Request::CallBatch(calls), timeout)
                .await
            {
                Ok(Response::Batch(responses)) if responses.len() == count => {
                    for (answer, response) in waiting.iter_mut().zip(responses) {
                        if let Some(answer) = answer.take() {
                            let _ = answer.send(Ok(response));
                        }
                    }
                    Ok(None)
                }
                Ok(response) => Ok(Some(response)),
                Err(error) => Err(error),
            }
        }
    };
    // The calls still waiting get the batch's fate.
    let unanswered = waiting.into_iter().flatten();
    match result {
        Ok(None) => {}
        // The peer refused the whole batch (e.g. it is shutting down): each call gets that.
        Ok(Some(Response::Error(reply))) => {
            for answer in unanswered {
                let _ = answer.send(Ok(Response::Error(reply.clone())));
            }
        }
        Ok(Some(other)) => {
            let message = format!(
                "{} answered a batch of {count} calls with a {:#04x} frame",
                peer.address(),
                other.kind()
            );
            for answer in unanswered {
                let _ = answer.send(Err(Error::Unexpected(message.clone())));
            }
        }
        Err(error) => {
            for answer in unanswered {
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
