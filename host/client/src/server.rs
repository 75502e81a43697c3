//! The server side of the stream-per-request model: accept connections and streams, decode
//! one request frame per stream, hand it to the node's handler, write the response frame
//! (or, for a `CallStream`, one `Answer` frame per call as each is ready).
//!
//! A malformed frame gets an error reply on its stream, never a dropped connection; a
//! handler that panics gets an `Internal` reply (for a `CallStream`: each call it had not
//! answered yet). Work is bounded by the per-connection stream limit (see
//! `tls::IN_FLIGHT_MAX`) and [`CONNECTIONS_MAX`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use billcl_proto::{ErrorCode, Frame, Request, Response, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Connections one server holds at once; further ones are refused.
pub const CONNECTIONS_MAX: usize = 4096;

/// What a handler answers a request with.
pub enum Reply {
    /// One response frame: the answer to any request. To a `Request::CallStream`, an `Error`
    /// refuses the whole batch (no call ran), a `Batch` of one answer per call is sent as an
    /// `Answer` per call, and anything else gets `Internal` for each call (a handler bug).
    One(Response),
    /// The answers to a `Request::CallStream` as they become ready, as `(index, answer)`;
    /// those ready together are written at once. Each index of the request comes exactly
    /// once; the server answers `Internal` for any the stream ends (or panics) without.
    Answers(BoxStream<'static, (u32, Response)>),
}

impl From<Response> for Reply {
    fn from(response: Response) -> Reply {
        Reply::One(response)
    }
}

/// The QUIC application close code a node closes its connections with when it shuts down
/// (docs/protocol.md, §1): its peers take it as down at once instead of dialling it again.
pub const SHUTDOWN_CLOSE_CODE: u32 = 0;
/// The reason sent with [`SHUTDOWN_CLOSE_CODE`].
pub const SHUTDOWN_CLOSE_REASON: &[u8] = b"shutting down";
/// How long a shutting-down server waits for its connections to take the close before it
/// drops them.
const SHUTDOWN_CLOSE_WAIT_MS: u64 = 100;

/// Upper bounds, in µs, of the buckets [`ServerStats`] counts call answers in by how long they
/// took (from the request read to the answer written); one more bucket holds the rest.
pub const ANSWER_LATENCY_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// The request kinds [`ServerStats`] counts, by frame kind (`0x01..=0x07`).
const REQUEST_KIND_NAMES: [&str; 7] = [
    "call",
    "procedures",
    "admin",
    "raft",
    "deploy",
    "call-batch",
    "call-stream",
];

/// What a server counts as it serves, in relaxed atomics (a few per request): what a node's
/// `stats` verb reports, as `box.stat()` does for Tarantool.
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    connections_closed: AtomicU64,
    /// By frame kind `0x01..=0x07` (index kind - 1).
    requests: [AtomicU64; 7],
    malformed: AtomicU64,
    /// Calls received, in `Call`, `CallBatch` and `CallStream` requests.
    calls: AtomicU64,
    /// Calls answered with an error, by code (index code - 1); the other answers were values.
    errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Call answers by time taken, per [`ANSWER_LATENCY_BOUNDS_US`] and one more.
    latency: [AtomicU64; ANSWER_LATENCY_BOUNDS_US.len() + 1],
    latency_micros: AtomicU64,
}

/// A copy of a [`ServerStats`] at one moment. Counters only grow while the server runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Connections that completed their handshake.
    pub connections_accepted: u64,
    /// Connections refused at [`CONNECTIONS_MAX`].
    pub connections_refused: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Requests by kind (`call`, `call-stream`, `admin`, `raft`, …).
    pub requests: Vec<(&'static str, u64)>,
    /// Requests whose frame could not be read (answered `BadRequest`).
    pub malformed: u64,
    /// Calls received (in `Call`, `CallBatch` and `CallStream` requests).
    pub calls: u64,
    /// Calls answered with a value.
    pub values: u64,
    /// Calls answered with an error, by code (the codes seen only).
    pub errors: Vec<(ErrorCode, u64)>,
    /// Call answers by time taken: `(upper bound in µs, answers that took at most that)`,
    /// cumulative, [`ANSWER_LATENCY_BOUNDS_US`] then `u64::MAX` for all of them.
    pub latency: Vec<(u64, u64)>,
    /// The time all call answers took, in µs.
    pub latency_micros: u64,
}

impl ServerStats {
    fn request(&self, request: &Request) {
        let kind = usize::from(request.kind());
        if let Some(count) = self.requests.get(kind.wrapping_sub(1)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let calls = match request {
            Request::Call(_) => 1,
            Request::CallBatch(calls) | Request::CallStream(calls) => calls.len(),
            _ => 0,
        };
        self.calls.fetch_add(calls as u64, Ordering::Relaxed);
    }

    /// Counts `answer` to a call if it is an error (what is not is a value).
    fn outcome(&self, answer: &Response) {
        if let Response::Error(reply) = answer {
            let index = ErrorCode::ALL.iter().position(|code| *code == reply.code);
            if let Some(count) = index.and_then(|index| self.errors.get(index)) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `answers` call answers written together, `took` after their request was read.
    fn answered(&self, answers: u64, took: Duration) {
        if answers == 0 {
            return;
        }
        let micros = took.as_micros() as u64;
        let bucket = ANSWER_LATENCY_BOUNDS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(ANSWER_LATENCY_BOUNDS_US.len());
        self.latency[bucket].fetch_add(answers, Ordering::Relaxed);
        self.latency_micros
            .fetch_add(micros * answers, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let accepted = load(&self.connections_accepted);
        let answered: u64 = self.latency.iter().map(load).sum();
        let errors: u64 = self.errors.iter().map(load).sum();
        let mut cumulative = 0;
        let latency = self
            .latency
            .iter()
            .zip(ANSWER_LATENCY_BOUNDS_US.iter().copied().chain([u64::MAX]))
            .map(|(count, bound)| {
                cumulative += load(count);
                (bound, cumulative)
            })
            .collect();
        StatsSnapshot {
            connections_accepted: accepted,
            connections_refused: load(&self.connections_refused),
            connections_open: accepted.saturating_sub(load(&self.connections_closed)),
            requests: REQUEST_KIND_NAMES
                .iter()
                .zip(&self.requests)
                .map(|(name, count)| (*name, load(count)))
                .collect(),
            malformed: load(&self.malformed),
            calls: load(&self.calls),
            values: answered.saturating_sub(errors),
            errors: ErrorCode::ALL
                .iter()
                .zip(&self.errors)
                .map(|(code, count)| (*code, load(count)))
                .filter(|(_, count)| *count > 0)
                .collect(),
            latency,
            latency_micros: load(&self.latency_micros),
        }
    }
}

/// [`serve_counted`] with counters nobody reads.
pub async fn serve<H, F, R>(
    endpoint: quinn::Endpoint,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = R> + Send + 'static,
    R: Into<Reply> + Send + 'static,
{
    serve_counted(endpoint, handler, shutdown, Arc::default()).await;
}

/// Accepts connections on `endpoint` until `shutdown` resolves. For each bidirectional
/// stream: read one request frame (at most [`FRAME_BYTES_MAX`]), call `handler`, write the
/// reply and finish. On shutdown the endpoint is closed and connection tasks stop.
pub async fn serve_counted<H, F, R>(
    endpoint: quinn::Endpoint,
    handler: H,
    shutdown: impl Future<Output = ()>,
    stats: Arc<ServerStats>,
) where
    H: Fn(Request) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = R> + Send + 'static,
    R: Into<Reply> + Send + 'static,
{
    let connections_allowed = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(finished) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = finished {
                    if error.is_panic() {
                        tracing::error!(%error, "a connection task panicked");
                    }
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = connections_allowed.clone().try_acquire_owned() else {
                    tracing::warn!(remote = %incoming.remote_address(), "refusing: too many connections");
                    stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                };
                let handler = handler.clone();
                let stats = stats.clone();
                connections.spawn(async move {
                    let _permit = permit;
                    serve_connection(incoming, handler, stats).await;
                });
            }
        }
    }
    endpoint.close(
        quinn::VarInt::from_u32(SHUTDOWN_CLOSE_CODE),
        SHUTDOWN_CLOSE_REASON,
    );
    // Each connection's task ends once its driver has taken the close (its `accept_bi`
    // fails): aborted before that, it would drop the connection, which quinn then closes
    // first with no reason, and peers could not tell a shutdown from any other close.
    let ended = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_millis(SHUTDOWN_CLOSE_WAIT_MS), ended).await;
    connections.shutdown().await;
}

async fn serve_connection<H, F, R>(incoming: quinn::Incoming, handler: H, stats: Arc<ServerStats>)
where
    H: Fn(Request) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = R> + Send + 'static,
    R: Into<Reply> + Send + 'static,
{
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%remote, %error, "handshake failed");
            return;
        }
    };
    stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
    let mut streams = JoinSet::new();
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%remote, %error, "connection closed");
                break;
            }
        };
        // Reap finished stream tasks so the set does not grow with the connection's age.
        while streams.try_join_next().is_some() {}
        streams.spawn(serve_stream(send, recv, handler.clone(), stats.clone()));
    }
    stats.connections_closed.fetch_add(1, Ordering::Relaxed);
    streams.shutdown().await;
}

/// The request id of a frame whose body failed to decode, so the error reply can be matched.
fn header_request_id(bytes: &[u8]) -> u64 {
    bytes
        .get(6..FRAME_HEADER_BYTES)
        .and_then(|id| id.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

async fn serve_stream<H, F, R>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: H,
    stats: Arc<ServerStats>,
) where
    H: Fn(Request) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = R> + Send + 'static,
    R: Into<Reply> + Send + 'static,
{
    // A streamed batch's size, so that every call gets an answer whatever the handler does.
    let mut streamed_calls = None;
    // Whether the request carries calls, whose answers are counted.
    let mut calls = false;
    let read = recv.read_to_end(FRAME_BYTES_MAX).await;
    let started = Instant::now();
    let (request_id, reply) = match read {
        Err(quinn::ReadToEndError::TooLong) => (
            0,
            Reply::One(Response::error(
                ErrorCode::BadRequest,
                format!("request frame exceeds the limit of {FRAME_BYTES_MAX} bytes"),
            )),
        ),
        Err(error) => {
            tracing::debug!(%error, "request stream failed");
            return;
        }
        Ok(bytes) => {
            let request_id = header_request_id(&bytes);
            let decoded = Frame::decode_exact(&bytes).and_then(|frame| Request::from_frame(&frame));
            match decoded {
                Err(error) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    (
                        request_id,
                        Reply::One(Response::error(
                            ErrorCode::BadRequest,
                            format!("malformed request: {error}"),
                        )),
                    )
                }
                Ok(request) => {
                    stats.request(&request);
                    calls = matches!(
                        request,
                        Request::Call(_) | Request::CallBatch(_) | Request::CallStream(_)
                    );
                    if let Request::CallStream(calls) = &request {
                        streamed_calls = Some(calls.len());
                    }
                    match tokio::spawn(handler(request)).await {
                        Ok(reply) => (request_id, reply.into()),
                        Err(error) => {
                            tracing::error!(%error, "request handler failed");
                            // A streamed batch's calls may have started: each is answered
                            // `Internal` (in doubt), not refused as a whole.
                            let reply = match streamed_calls {
                                Some(_) => Reply::Answers(futures_util::stream::empty().boxed()),
                                None => Reply::One(Response::error(
                                    ErrorCode::Internal,
                                    "the request handler failed",
                                )),
                            };
                            (request_id, reply)
                        }
                    }
                }
            }
        }
    };
    let counted = Counted {
        stats: &stats,
        started,
    };
    let written = match (streamed_calls, reply) {
        (Some(count), Reply::Answers(answers)) => {
            write_answers(&mut send, request_id, count, answers, counted).await
        }
        (Some(count), Reply::One(Response::Batch(responses))) if responses.len() == count => {
            let answers = responses
                .into_iter()
                .zip(0..)
                .map(|(answer, index)| (index, answer));
            let answers = futures_util::stream::iter(answers).boxed();
            write_answers(&mut send, request_id, count, answers, counted).await
        }
        (Some(count), Reply::One(response @ Response::Error(_))) => {
            // The whole stream refused: each of its calls is answered so.
            for _ in 0..count {
                stats.outcome(&response);
            }
            stats.answered(count as u64, started.elapsed());
            write_one(&mut send, request_id, response).await
        }
        (None, Reply::One(response)) => {
            if calls {
                let answers = match &response {
                    Response::Batch(answers) => answers.as_slice(),
                    answer => std::slice::from_ref(answer),
                };
                answers.iter().for_each(|answer| stats.outcome(answer));
                stats.answered(answers.len() as u64, started.elapsed());
            }
            write_one(&mut send, request_id, response).await
        }
        // Its calls may have started: each is answered `Internal` (in doubt), as when the
        // handler panics, not the batch refused as a whole.
        (Some(count), Reply::One(other)) => {
            tracing::error!(
                kind = other.kind(),
                "a handler answered a call stream wrongly"
            );
            let none = futures_util::stream::empty().boxed();
            write_answers(&mut send, request_id, count, none, counted).await
        }
        (None, Reply::Answers(_)) => {
            tracing::error!("a handler streamed answers to a request that is no call stream");
            let reply = Response::error(ErrorCode::Internal, "the request handler failed");
            write_one(&mut send, request_id, reply).await
        }
    };
    if let Err(error) = written {
        tracing::debug!(%error, "cannot write the response");
        return;
    }
    let _ = send.finish();
    // Wait until the peer has the whole response (or is gone) before dropping the stream.
    let _ = send.stopped().await;
}

/// `response`'s frame, or an `Internal` error if it is larger than a frame may be.
fn checked_frame(response: &Response, request_id: u64) -> Frame {
    let frame = response.to_frame(request_id);
    match frame.check_size() {
        Ok(()) => frame,
        Err(error) => Response::error(
            ErrorCode::Internal,
            format!("the response is too large: {error}"),
        )
        .to_frame(request_id),
    }
}

async fn write_one(
    send: &mut quinn::SendStream,
    request_id: u64,
    response: Response,
) -> Result<(), quinn::WriteError> {
    send.write_all(&checked_frame(&response, request_id).to_bytes())
        .await
}

/// Writes an `Answer` frame per call of a `CallStream` of `count` calls as `answers` yields
/// them: whatever is ready together goes in one write. (`now_or_never` may leave a no-op
/// waker with the stream; the next `.await` of `next()` registers the task's again.) Indices
/// out of range or answered twice are dropped (a handler bug, logged); calls left without an
/// answer when `answers` ends or panics are answered `Internal`.
/// Where a stream's call answers are counted, and when its request was read.
#[derive(Clone, Copy)]
struct Counted<'a> {
    stats: &'a ServerStats,
    started: Instant,
}

async fn write_answers(
    send: &mut quinn::SendStream,
    request_id: u64,
    count: usize,
    mut answers: BoxStream<'static, (u32, Response)>,
    counted: Counted<'_>,
) -> Result<(), quinn::WriteError> {
    let mut answered = vec![false; count];
    let mut left = count;
    let mut bytes = Vec::new();
    // Set once the stream has ended or panicked: it is not polled again.
    let mut done = false;
    while left > 0 && !done {
        bytes.clear();
        let mut next = AssertUnwindSafe(answers.next()).catch_unwind().await;
        // Those ready together took as long.
        let took = counted.started.elapsed();
        let mut together = 0;
        loop {
            match next {
                Ok(Some((index, answer))) => match answered.get_mut(index as usize) {
                    Some(slot @ false) => {
                        *slot = true;
                        left -= 1;
                        together += 1;
                        counted.stats.outcome(&answer);
                        answer.encode_answer_frame(index, request_id, &mut bytes);
                    }
                    _ => {
                        tracing::error!(index, count, "a handler answered a call it was not given")
                    }
                },
                Ok(None) => {
                    tracing::error!(
                        left,
                        count,
                        "a call stream's handler ended without answering"
                    );
                    done = true;
                }
                Err(_) => {
                    tracing::error!("a call stream's handler panicked");
                    done = true;
                }
            }
            if left == 0 || done {
                break;
            }
            // Whatever else is ready now goes in the same write.
            match AssertUnwindSafe(answers.next())
                .catch_unwind()
                .now_or_never()
            {
                Some(ready) => next = ready,
                None => break,
            }
        }
        counted.stats.answered(together, took);
        if !bytes.is_empty() {
            send.write_all(&bytes).await?;
        }
    }
    if left > 0 {
        bytes.clear();
        counted
            .stats
            .answered(left as u64, counted.started.elapsed());
        for index in (0..count).filter(|&index| !answered[index]) {
            let failed = Response::error(ErrorCode::Internal, "the request handler failed");
            counted.stats.outcome(&failed);
            let index = u32::try_from(index).expect("a call stream holds at most 1024 calls");
            failed.encode_answer_frame(index, request_id, &mut bytes);
        }
        send.write_all(&bytes).await?;
    }
    Ok(())
}
