//! One lazily (re)connecting QUIC connection to one address, carrying requests.
//!
//! Each request is one bidirectional stream: the request frame, then the send side finished;
//! the response frame (for a `CallStream`, an `Answer` frame per call as each is ready), then
//! the server finishes. Many requests share the connection at once,
//! bounded by a semaphore. Used by the SDK for router links and by nodes for router→storage
//! and storage→storage links.
//!
//! A connection is dialled again when it has closed, and also after a request timed out with
//! nothing at all heard from the peer meanwhile (not even an acknowledgement): after seconds
//! of one-way loss both ends of the old connection wait out a doubled-and-redoubled
//! retransmission timer, which could hold a retry back for seconds after the path is back; a
//! fresh handshake goes through as soon as it is.
//!
//! A peer whose handshake timed out is **down**: from then on requests fail at once with
//! [`Error::Connect`] (nothing was sent) saying how long it has been down, instead of each
//! waiting [`CONNECT_TIMEOUT_MS`] for a handshake that will not come, while one background
//! task dials it again and again ([`REDIAL_PROBE_MS`]) and puts the connection back for the
//! next request as soon as one gets through. A caller asks [`Peer::down_for`] to tell a peer
//! known to be down from one that merely failed a request.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use billcl_proto::{Call, Frame, Request, Response, FRAME_BYTES_MAX};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::{timeout_at, Instant};

use crate::tls::IN_FLIGHT_MAX;
use crate::Error;

/// The longest a QUIC handshake may take. A handshake on a live network takes a few round
/// trips; waiting longer only delays the "node is down" answer.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// How long each background dial of a down peer waits for its handshake, back to back: a
/// dial's first packet is lost while the peer is down (QUIC sends it again only after about a
/// second), so short dials notice a peer that is back within this long. Every
/// [`REDIAL_LONG_EVERY`]th dial waits the whole [`CONNECT_TIMEOUT_MS`], for a peer that is up
/// but slow to shake hands.
pub const REDIAL_PROBE_MS: u64 = 250;
/// See [`REDIAL_PROBE_MS`].
pub const REDIAL_LONG_EVERY: u32 = 4;
/// A peer down this long is dialled once a second ([`CONNECT_TIMEOUT_MS`] each) instead of
/// four times: a node gone for good costs its links one packet a second.
pub const REDIAL_SLOW_AFTER_MS: u64 = 60_000;
/// How long dropping a connection may wait for the connection slot past the call's deadline
/// (a request that timed out drops its silent connection after the deadline). Another request
/// holds the slot for microseconds to clone the connection, or for a whole dial; during a dial
/// the slot holds no live connection, so there is nothing to drop and the wait ends here.
const FORGET_WAIT_MS: u64 = 10;

/// Why a dial failed.
enum DialError {
    /// No handshake within [`CONNECT_TIMEOUT_MS`] (or the dial's own bound): the peer is down.
    TimedOut(String),
    /// The caller's time ran out first: this proves nothing about the peer.
    OutOfTime(String),
    Failed(String),
}

/// Since when a peer is down, and why (what its last dial said).
struct Down {
    since: Instant,
    reason: String,
    /// It went down saying it shut down: its dials' failures are told after that.
    shut_down: bool,
}

/// A cheap-to-clone handle on one peer's connection.
#[derive(Clone)]
pub struct Peer {
    inner: Arc<PeerInner>,
}

struct PeerInner {
    endpoint: quinn::Endpoint,
    address: SocketAddr,
    server_name: String,
    timeout: Duration,
    /// The live connection, if any. Held across a handshake so concurrent requests share it.
    connection: Mutex<Option<quinn::Connection>>,
    /// Set while the peer is down: a background task is dialling it (it clears this once a
    /// dial gets through). Only set and cleared with `connection` locked.
    down: std::sync::Mutex<Option<Down>>,
    in_flight: Semaphore,
    next_request_id: AtomicU64,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("address", &self.inner.address)
            .field("server_name", &self.inner.server_name)
            .finish_non_exhaustive()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Peer {
    /// A peer at `address` reached through `endpoint` (which must have a default client
    /// config), expecting a certificate for `server_name`; requests time out after `timeout`.
    /// Nothing is dialled until the first request.
    pub fn new(
        endpoint: quinn::Endpoint,
        address: SocketAddr,
        server_name: String,
        timeout: Duration,
    ) -> Peer {
        Peer {
            inner: Arc::new(PeerInner {
                endpoint,
                address,
                server_name,
                timeout,
                connection: Mutex::new(None),
                down: std::sync::Mutex::new(None),
                in_flight: Semaphore::new(IN_FLIGHT_MAX),
                next_request_id: AtomicU64::new(1),
            }),
        }
    }

    /// The peer's address.
    pub fn address(&self) -> SocketAddr {
        self.inner.address
    }

    /// How long the peer has been down (its handshake timed out, and no background dial has
    /// got through since), or `None` if it is not known to be down.
    pub fn down_for(&self) -> Option<Duration> {
        let down = self.inner.down.lock().unwrap();
        down.as_ref().map(|down| down.since.elapsed())
    }

    /// Dials now (if not connected) instead of at the first request.
    pub async fn connect(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.inner.timeout;
        self.connection(deadline).await.map(drop)
    }

    /// Dials now (if not connected), giving up after `within`. A dial cut short by `within`
    /// (shorter than [`CONNECT_TIMEOUT_MS`]) proves nothing about the peer and does not mark
    /// it down: for warming a link up to a peer that may still be starting.
    pub async fn connect_within(&self, within: Duration) -> Result<(), Error> {
        self.connection(Instant::now() + within).await.map(drop)
    }

    /// Sends `request` and waits for its response, within the peer's timeout. An error reply
    /// from the server is `Ok(Response::Error(..))`.
    pub async fn request(&self, request: &Request) -> Result<Response, Error> {
        self.request_with_timeout(request, self.inner.timeout).await
    }

    /// [`Peer::request`] with its own timeout.
    pub async fn request_with_timeout(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, Error> {
        let response = self.send_request(request, timeout, None).await?;
        Ok(response.expect("a request that is no call stream has one response"))
    }

    /// Sends `Request::CallStream(calls)` and hands each call's answer to `on_answer` with
    /// the call's index as it arrives, within `timeout` for all of them. `Ok(None)` once every
    /// call has its answer; `Ok(Some(Response::Error(..)))` if the peer refused the whole
    /// batch (no call ran). On an error, the calls without an answer yet are in doubt, as a
    /// single call that timed out ([`Error::Connect`]: nothing was sent).
    pub async fn request_answers(
        &self,
        calls: Vec<Call>,
        timeout: Duration,
        on_answer: &mut (dyn FnMut(u32, Response) + Send),
    ) -> Result<Option<Response>, Error> {
        let count = calls.len();
        let request = Request::CallStream(calls);
        self.send_request(&request, timeout, Some((count, on_answer)))
            .await
    }

    /// The exchange of [`Peer::request_with_timeout`] and [`Peer::request_answers`]: with
    /// `answers`, the response is `count` `Answer` frames handed to the callback (`Ok(None)`),
    /// or one `Error` frame.
    async fn send_request<'f>(
        &self,
        request: &Request,
        timeout: Duration,
        mut answers: Option<Streamed<'_, 'f>>,
    ) -> Result<Option<Response>, Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let frame = request.to_frame(request_id);
        frame.check_size()?;
        let mut bytes = frame.to_bytes();
        let timed_out = || Error::Timeout {
            address: self.inner.address,
            after_ms: millis(timeout),
        };
        // Out of time before the request went out: nothing was sent.
        let not_sent = || Error::Connect {
            address: self.inner.address,
            reason: format!(
                "the call's {} ms ran out before the request went out; nothing was sent",
                millis(timeout)
            ),
        };
        let _permit = timeout_at(deadline, self.inner.in_flight.acquire())
            .await
            .map_err(|_| timed_out())?
            .expect("the in-flight semaphore is never closed");
        let mut connection = self.connection(deadline).await?;
        let mut redialled = false;
        loop {
            if Instant::now() >= deadline {
                return Err(not_sent());
            }
            // What waited here (for a permit, for a dial: one can last until a peer that was
            // down is back) is taken off each call's time left, so that the next node does not
            // start a call after its caller gave up (docs/protocol.md, §4 0x01 `timeout_ms`).
            if let Some(aged) = aged(request, started.elapsed()) {
                bytes = aged.to_frame(request_id).to_bytes();
            }
            let streamed = answers
                .as_mut()
                .map(|(count, on_answer)| (*count, &mut **on_answer));
            let heard = connection.stats().udp_rx.datagrams;
            let exchange = self.exchange(&connection, &bytes, request_id, streamed);
            match timeout_at(deadline, exchange).await {
                Err(_) => {
                    // Not even an acknowledgement came back (a live peer acknowledges within
                    // milliseconds, however long the call runs): the path or the peer is gone.
                    // The next request dials afresh rather than wait out this connection's
                    // loss-recovery backoff, which after seconds of silence can outlast the
                    // retry that follows; calls still on it keep it until they end.
                    if connection.stats().udp_rx.datagrams == heard {
                        tracing::debug!(address = %self.inner.address, "connection silent; dropped");
                        self.forget(&connection, deadline).await;
                    }
                    return Err(timed_out());
                }
                Ok(Ok(response)) => return Ok(response),
                // The connection died before the request went out (e.g. the peer restarted):
                // nothing was sent, so one fresh connection may carry it safely.
                Ok(Err(ExchangeError::NotSent(reason))) if !redialled => {
                    tracing::debug!(address = %self.inner.address, %reason, "redialling");
                    self.forget(&connection, deadline).await;
                    connection = self.connection(deadline).await?;
                    redialled = true;
                }
                Ok(Err(ExchangeError::NotSent(reason) | ExchangeError::Failed(reason))) => {
                    if connection.close_reason().is_some() {
                        self.forget(&connection, deadline).await;
                    }
                    return Err(reason);
                }
            }
        }
    }

    /// The live connection, dialling if there is none or it has closed; by `deadline`, the
    /// wait for another request's dial (which can last until a peer that was down is back)
    /// included.
    async fn connection(&self, deadline: Instant) -> Result<quinn::Connection, Error> {
        let mut slot = timeout_at(deadline, self.inner.connection.lock())
            .await
            .map_err(|_| Error::Connect {
                address: self.inner.address,
                reason: "no connection in time (another request is still dialling); nothing \
                         was sent"
                    .to_string(),
            })?;
        if let Some(connection) = slot.as_ref() {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
            self.inner.down_if_shut_down(connection);
        }
        *slot = None;
        if let Some(down) = self.inner.down.lock().unwrap().as_ref() {
            return Err(Error::Connect {
                address: self.inner.address,
                reason: format!(
                    "{}; down for {:.1} s, dialled again in the background",
                    down.reason,
                    down.since.elapsed().as_secs_f64()
                ),
            });
        }
        let result = self.inner.dial(deadline).await;
        match &result {
            Ok(connection) => *slot = Some(connection.clone()),
            Err(DialError::TimedOut(reason)) => self.inner.mark_down(reason.clone(), false),
            Err(DialError::OutOfTime(_) | DialError::Failed(_)) => {}
        }
        result.map_err(|error| {
            let reason = match error {
                DialError::TimedOut(reason)
                | DialError::OutOfTime(reason)
                | DialError::Failed(reason) => reason,
            };
            Error::Connect {
                address: self.inner.address,
                reason,
            }
        })
    }

    /// Drops `connection` from the slot if it is still the cached one. Waits for the slot no
    /// later than `deadline` or [`FORGET_WAIT_MS`] from now, whichever is later: another
    /// request may hold it while dialling; that one replaces a closed connection itself.
    async fn forget(&self, connection: &quinn::Connection, deadline: Instant) {
        let until = deadline.max(Instant::now() + Duration::from_millis(FORGET_WAIT_MS));
        let Ok(mut slot) = timeout_at(until, self.inner.connection.lock()).await else {
            return;
        };
        if slot
            .as_ref()
            .is_some_and(|cached| cached.stable_id() == connection.stable_id())
        {
            *slot = None;
            self.inner.down_if_shut_down(connection);
        }
    }

    async fn exchange<'f>(
        &self,
        connection: &quinn::Connection,
        bytes: &[u8],
        request_id: u64,
        answers: Option<Streamed<'_, 'f>>,
    ) -> Result<Option<Response>, ExchangeError> {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|error| ExchangeError::NotSent(transport("open a stream", error)))?;
        let failed = |what: &str, error: &dyn fmt::Display| {
            ExchangeError::Failed(Error::Transport(format!(
                "{what} ({}): {error}",
                self.inner.address
            )))
        };
        send.write_all(bytes)
            .await
            .map_err(|error| failed("send the request", &error))?;
        send.finish()
            .map_err(|error| failed("finish the request", &error))?;
        let check_id = |frame: &Frame| {
            if frame.request_id == request_id {
                return Ok(());
            }
            Err(failed(
                "match the response",
                &format!(
                    "response carries request id {}, sent {request_id}",
                    frame.request_id
                ),
            ))
        };
        let protocol = |error| ExchangeError::Failed(Error::Protocol(error));
        let Some((count, on_answer)) = answers else {
            let answer = recv
                .read_to_end(FRAME_BYTES_MAX)
                .await
                .map_err(|error| failed("read the response", &error))?;
            let frame = Frame::decode_exact(&answer).map_err(protocol)?;
            check_id(&frame)?;
            return Response::from_frame(&frame).map(Some).map_err(protocol);
        };
        let mut answered = vec![false; count];
        let mut frames = FrameReader::default();
        for received in 0..count {
            let frame = match frames.next(&mut recv).await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    return Err(failed(
                        "read the answers",
                        &format!("the stream ended after {received} of {count}"),
                    ))
                }
                Err(ReadFrameError::Protocol(error)) => return Err(protocol(error)),
                Err(ReadFrameError::Read(error)) => return Err(failed("read the answers", &error)),
            };
            check_id(&frame)?;
            match Response::from_frame(&frame).map_err(protocol)? {
                // The whole batch refused, before any answer.
                refusal @ Response::Error(_) if received == 0 => return Ok(Some(refusal)),
                Response::Answer { index, answer } => {
                    match answered.get_mut(index as usize) {
                        Some(done @ false) => *done = true,
                        _ => {
                            return Err(failed(
                                "read the answers",
                                &format!("answer to call {index} of {count} is unexpected"),
                            ))
                        }
                    }
                    on_answer(index, *answer);
                }
                other => {
                    return Err(failed(
                        "read the answers",
                        &format!("a {:#04x} frame among the answers", other.kind()),
                    ))
                }
            }
        }
        Ok(None)
    }
}

/// Why a peer that closed its connections as it shut down is down.
const SHUT_DOWN: &str = "it shut down";

/// Whether `close` is a node's close of its connections as it shuts down.
fn is_shutdown(close: &quinn::ApplicationClose) -> bool {
    close.error_code == quinn::VarInt::from_u32(crate::server::SHUTDOWN_CLOSE_CODE)
        && &close.reason[..] == crate::server::SHUTDOWN_CLOSE_REASON
}

impl PeerInner {
    /// Marks the peer down if `connection` closed because the peer said it is shutting down:
    /// it is down now, not after a dial that would wait out the handshake's timeout first.
    /// Called with the connection slot locked.
    fn down_if_shut_down(self: &Arc<Self>, connection: &quinn::Connection) {
        if let Some(quinn::ConnectionError::ApplicationClosed(close)) = connection.close_reason() {
            if is_shutdown(&close) {
                self.mark_down(SHUT_DOWN.to_string(), true);
            }
        }
    }

    /// Marks the peer down for `reason` and starts the background dialling that puts its
    /// connection back; a peer already down stays down since when it went. Called with the
    /// connection slot locked.
    fn mark_down(self: &Arc<Self>, reason: String, shut_down: bool) {
        let mut down = self.down.lock().unwrap();
        if down.is_some() {
            return;
        }
        tracing::debug!(address = %self.address, %reason, "peer down");
        *down = Some(Down {
            since: Instant::now(),
            reason,
            shut_down,
        });
        tokio::spawn(redial(Arc::downgrade(self)));
    }

    /// One handshake, bounded by `deadline` and [`CONNECT_TIMEOUT_MS`] from now.
    async fn dial(&self, deadline: Instant) -> Result<quinn::Connection, DialError> {
        let own = Instant::now() + Duration::from_millis(CONNECT_TIMEOUT_MS);
        self.dial_within(deadline.min(own), deadline < own).await
    }

    /// One handshake by `deadline`; `callers`: the deadline is the caller's, shorter than a
    /// handshake may take, so running out of it says nothing about the peer.
    async fn dial_within(
        &self,
        deadline: Instant,
        callers: bool,
    ) -> Result<quinn::Connection, DialError> {
        let connecting = self
            .endpoint
            .connect(self.address, &self.server_name)
            .map_err(|error| DialError::Failed(error.to_string()))?;
        match timeout_at(deadline, connecting).await {
            Err(_) if callers => Err(DialError::OutOfTime(
                "the call's time ran out during the QUIC handshake; nothing was sent".to_string(),
            )),
            Err(_) => Err(DialError::TimedOut(
                "no QUIC handshake in time (is the node running?)".to_string(),
            )),
            Ok(Err(error)) => Err(DialError::Failed(error.to_string())),
            Ok(Ok(connection)) => Ok(connection),
        }
    }
}

/// Dials a down peer until a handshake gets through, then hands the connection to the next
/// request and clears the peer's down mark; ends early once the peer is dropped.
async fn redial(peer: Weak<PeerInner>) {
    let mut dials = 0u32;
    loop {
        let Some(inner) = peer.upgrade() else {
            return;
        };
        dials += 1;
        let long_down =
            inner.down.lock().unwrap().as_ref().is_some_and(|down| {
                down.since.elapsed() > Duration::from_millis(REDIAL_SLOW_AFTER_MS)
            });
        let wait = if long_down || dials.is_multiple_of(REDIAL_LONG_EVERY) {
            CONNECT_TIMEOUT_MS
        } else {
            REDIAL_PROBE_MS
        };
        let started = Instant::now();
        match inner
            .dial_within(started + Duration::from_millis(wait), false)
            .await
        {
            Ok(connection) => {
                let mut slot = inner.connection.lock().await;
                if slot
                    .as_ref()
                    .is_none_or(|cached| cached.close_reason().is_some())
                {
                    *slot = Some(connection);
                }
                *inner.down.lock().unwrap() = None;
                tracing::debug!(address = %inner.address, dials, "peer back");
                return;
            }
            Err(DialError::TimedOut(reason) | DialError::OutOfTime(reason))
            | Err(DialError::Failed(reason)) => {
                if let Some(down) = inner.down.lock().unwrap().as_mut() {
                    down.reason = if down.shut_down {
                        format!("{SHUT_DOWN}; then: {reason}")
                    } else {
                        reason
                    };
                }
                // A dial refused at once (not a lost packet) is not repeated in a busy loop.
                let paced = started + Duration::from_millis(REDIAL_PROBE_MS);
                drop(inner);
                tokio::time::sleep_until(paced).await;
            }
        }
    }
}

/// A streamed batch's size and where its answers go, as `(index, answer)`.
type Streamed<'a, 'f> = (usize, &'a mut (dyn FnMut(u32, Response) + Send + 'f));

enum ReadFrameError {
    Protocol(billcl_proto::Error),
    Read(quinn::ReadError),
}

/// Frames read one after another from a stream, through a buffer filled a chunk at a time
/// (a read of the stream per chunk rather than two per frame).
#[derive(Default)]
struct FrameReader {
    buffer: Vec<u8>,
}

impl FrameReader {
    /// The next whole frame (at most [`FRAME_BYTES_MAX`], refused from its header before it
    /// is buffered), or `None` if the stream ended cleanly before one began.
    async fn next(
        &mut self,
        recv: &mut quinn::RecvStream,
    ) -> Result<Option<Frame>, ReadFrameError> {
        loop {
            if let Some((frame, used)) =
                Frame::decode(&self.buffer).map_err(ReadFrameError::Protocol)?
            {
                self.buffer.drain(..used);
                return Ok(Some(frame));
            }
            match recv
                .read_chunk(FRAME_BYTES_MAX, true)
                .await
                .map_err(ReadFrameError::Read)?
            {
                Some(chunk) => self.buffer.extend_from_slice(&chunk.bytes),
                None if self.buffer.is_empty() => return Ok(None),
                None => return Err(ReadFrameError::Protocol(billcl_proto::Error::Truncated)),
            }
        }
    }
}

fn transport(what: &str, error: impl fmt::Display) -> Error {
    Error::Transport(format!("cannot {what}: {error}"))
}

enum ExchangeError {
    /// Failed before any byte of the request left: safe to send again.
    NotSent(Error),
    Failed(Error),
}

/// `request` with `waited` taken off each call's `timeout_ms` (`Some(0)`: the next node does
/// not start it, and answers `Timeout`), or `None` when that changes nothing (under a
/// millisecond, or no call with a time limit).
fn aged(request: &Request, waited: Duration) -> Option<Request> {
    let waited_ms = u32::try_from(waited.as_millis()).unwrap_or(u32::MAX);
    if waited_ms == 0 {
        return None;
    }
    let age = |call: &Call| {
        let mut call = call.clone();
        call.timeout_ms = call.timeout_ms.map(|ms| ms.saturating_sub(waited_ms));
        call
    };
    match request {
        Request::Call(call) if call.timeout_ms.is_some() => Some(Request::Call(age(call))),
        Request::CallBatch(calls) if calls.iter().any(|call| call.timeout_ms.is_some()) => {
            Some(Request::CallBatch(calls.iter().map(age).collect()))
        }
        Request::CallStream(calls) if calls.iter().any(|call| call.timeout_ms.is_some()) => {
            Some(Request::CallStream(calls.iter().map(age).collect()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use billcl_proto::message::ReadMode;

    fn call(timeout_ms: Option<u32>) -> Call {
        Call {
            procedure: "add-money".to_string(),
            version: None,
            args: Vec::new(),
            mode: ReadMode::Leader,
            caller: String::new(),
            bucket_id: None,
            idempotency_key: None,
            timeout_ms,
        }
    }

    fn timeouts(request: &Request) -> Vec<Option<u32>> {
        match request {
            Request::Call(call) => vec![call.timeout_ms],
            Request::CallBatch(calls) => calls.iter().map(|call| call.timeout_ms).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn time_spent_before_sending_is_taken_off_each_calls_time_left() {
        let batch = Request::CallBatch(vec![call(Some(100)), call(Some(20)), call(None)]);
        // A request that waited 30 ms for its connection (a dial to a peer coming back).
        let aged_batch = aged(&batch, Duration::from_millis(30)).expect("the batch changes");
        // The second call's caller gave up while it waited: sent with no time left, it is
        // not started. A call without a limit keeps the next node's own.
        assert_eq!(timeouts(&aged_batch), [Some(70), Some(0), None]);
        let single = aged(&Request::Call(call(Some(100))), Duration::from_secs(2)).unwrap();
        assert_eq!(timeouts(&single), [Some(0)]);
        // Under a millisecond, no call with a limit, or no call at all: sent as built.
        assert!(aged(&batch, Duration::from_micros(900)).is_none());
        assert!(aged(&Request::Call(call(None)), Duration::from_secs(1)).is_none());
        assert!(aged(&Request::Procedures, Duration::from_secs(1)).is_none());
    }
}
