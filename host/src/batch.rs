//! The leader's executor and group commit of command calls.
//!
//! One task per storage node drains the queue of command calls: it runs each call's procedure
//! once, on the leader, in queue order, against the applied state with the writes of its own
//! entries still in flight on top ([`InFlight`]), and proposes what the calls did as one
//! [`Command::Effects`] entry. Every member applies the effects (account rows, key-value writes,
//! answers, log lines) without running wasm; the leader answers each caller once the entry is
//! committed, so no answer shows a write that could still be lost: as the only voter, as soon
//! as the entry is on its disk (`answer_on_disk`), otherwise once it is applied.
//!
//! Every Raft log entry costs a trip through the consensus pipeline (append, flush, commit,
//! apply, several thread hand-offs) whatever its size, so the calls that arrive while earlier
//! entries are in flight go together: under load, entries carry tens or hundreds of calls and
//! the per-entry cost is shared; with one call in flight, the entry is that call alone.
//!
//! Why the effects are right on every member (docs/ARCHITECTURE.md, §6): a leader runs calls
//! only after its state holds every entry of earlier terms (a read barrier at the start of its
//! term, `settle`), its own entries of the term reach the log in the order it ran them
//! (submitted one after the other by this task), and an entry applies only in the term its
//! calls ran in (`Command::Effects::term`). Administrative commands (deploys, bucket
//! assignment, …) go through the same queue and wait for the entries in flight: no call runs
//! while one is in flight.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use billcl_money::Account;
use billcl_proto::message::{Call, ErrorCode, ErrorReply, ProcedureInfo, Response};
use billcl_proto::value::Value;
use billcl_runtime::Module;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::state::{CallRecord, Command, Effect, LogRow, Outcome, Writes};
use crate::storage::{decode_response, encode_response, error, is_remembered, StorageNode};

/// Calls in one entry at most.
pub const BATCH_CALLS_MAX: usize = 1024;
/// An entry is full once its calls' effects take this many bytes (each call's at most
/// [`CALL_EFFECT_BYTES_MAX`]): well under the log's `COMMAND_BYTES_MAX`.
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// One call's effect (answer, writes, log lines) takes at most this many bytes in the log; a
/// call that writes more is refused (`ProcedureFailed`) and does not take effect.
pub const CALL_EFFECT_BYTES_MAX: usize = 4 << 20;
/// Entries in flight at once (submitted, not yet applied); calls arriving while this many are
/// in flight form the next one. Not 2: an entry proposed while the log syncs joins the sync
/// after it, whereas a call held back for a permit waited for an apply first and then for a
/// sync of its own — about one sync more (add_money at half of peak: p99 lower in 5 of 7
/// alternated pairs, by 0.3 ms on average; at peak the same or lower;
/// docs/performance-history.md). Under load the calls still share entries: the executor takes
/// every call queued whenever it runs.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 8;
/// Calls waiting for an entry at most; further calls are refused as `TooBusy`.
pub const QUEUED_CALLS_MAX: usize = 65_536;
/// How often a leader that must settle (see [`run`]) looks whether its log is applied.
const SETTLE_POLL_MS: u64 = 2;

/// What the executor is asked to do.
// Calls are the hot path and administrative commands rare: no box per call.
#[allow(clippy::large_enum_variant)]
pub enum Work {
    /// Run a command procedure (resolved on the request path).
    Call {
        module: Module,
        info: Arc<ProcedureInfo>,
        call: Call,
        /// Not run after this: its caller has stopped waiting (the call's `timeout_ms`).
        deadline: Instant,
    },
    /// Propose an administrative command once the entries in flight are applied. Never
    /// dropped for lateness: the caller waits for its outcome.
    Admin(Command),
}

/// A piece of work waiting for the executor, and where its answer goes.
pub struct Pending {
    work: Work,
    answer: oneshot::Sender<Result<Response, ErrorReply>>,
}

impl Pending {
    /// When a call stops being worth running; an administrative command has no deadline.
    fn deadline(&self) -> Option<Instant> {
        match self.work {
            Work::Call { deadline, .. } => Some(deadline),
            Work::Admin(_) => None,
        }
    }
}

/// The entry point of the leader's executor: cheap to share, one per storage node.
pub struct Batcher {
    queue: mpsc::Sender<Pending>,
}

impl Batcher {
    /// A batcher and the queue its [`run`] task drains.
    pub fn new() -> (Batcher, mpsc::Receiver<Pending>) {
        let (queue, receiver) = mpsc::channel(QUEUED_CALLS_MAX);
        (Batcher { queue }, receiver)
    }

    /// Queues `work` for the executor; await the returned [`Answer`] for its answer. Does not
    /// yield: calls queued one after the other without an `.await` between them go to the log
    /// in one entry. A call still waiting at its deadline is not run any more: it is answered
    /// `Timeout` and never takes effect.
    pub fn enqueue(&self, work: Work) -> Result<Answer, ErrorReply> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending { work, answer };
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

/// The answer of one queued call or command, once its entry is committed (on the only voter's
/// disk, or applied).
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
                    // Its entry was handed to the log, whose Raft node then stopped.
                    Err(error(
                        ErrorCode::Timeout,
                        "the leader's replication stopped with this call in flight (`billcl \
                         info` says why): it may or may not have taken effect; retry it with \
                         the same idempotency key",
                    ))
                })
            })
    }
}

/// A key-value slot: bucket, namespaced key.
type KvSlot = (u32, Vec<u8>);

/// The writes of the leader's entries in flight (submitted, not yet applied), newest value
/// per row, each tagged with the sequence number of its entry; and the idempotency keys of
/// their calls. Calls run on the applied state with these on top.
#[derive(Default)]
pub struct InFlight {
    accounts: HashMap<u64, (u64, Account)>,
    kv: HashMap<KvSlot, (u64, Option<Vec<u8>>)>,
    keys: HashMap<(u32, u128), u64>,
}

impl InFlight {
    /// The newest value in flight of account `id`, if an entry in flight writes it.
    pub fn account(&self, id: u64) -> Option<Account> {
        self.accounts.get(&id).map(|(_, account)| *account)
    }

    /// The newest value in flight of a key-value slot (`Some(None)`: deleted in flight).
    pub fn kv(&self, slot: &KvSlot) -> Option<Option<Vec<u8>>> {
        self.kv.get(slot).map(|(_, value)| value.clone())
    }

    /// Entry `seq` is applied (and so is every entry before it): its rows are in the state.
    fn applied(&mut self, seq: u64) {
        self.accounts.retain(|_, (entry, _)| *entry > seq);
        self.kv.retain(|_, (entry, _)| *entry > seq);
        self.keys.retain(|_, entry| *entry > seq);
    }

    fn clear(&mut self) {
        self.accounts.clear();
        self.kv.clear();
        self.keys.clear();
    }
}

/// Drains the queue: runs calls into entries and proposes them, at most
/// [`PROPOSALS_IN_FLIGHT_MAX`] at once; proposes administrative commands between them. Runs
/// for the life of the node.
pub async fn run(node: Arc<StorageNode>, mut queue: mpsc::Receiver<Pending>) {
    let permits = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let unsettled = Arc::new(AtomicBool::new(false));
    // The term this leader settled in: its state held every earlier term's entry then.
    let mut settled_term: Option<u64> = None;
    let mut next_seq: u64 = 0;
    // Work taken from the queue but not done yet, first in line.
    let mut carried: VecDeque<Pending> = VecDeque::new();
    loop {
        let first = match carried.pop_front() {
            Some(pending) => pending,
            None => match queue.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        if let Work::Admin(command) = first.work {
            // Every entry in flight applied first, so no call runs around the command.
            let all = permits
                .acquire_many(PROPOSALS_IN_FLIGHT_MAX as u32)
                .await
                .expect("the proposal semaphore is never closed");
            let result = node
                .replica
                .propose(command.encode())
                .await
                .map(|answer| decode_response(&answer))
                .map_err(|e| node.propose_error(e));
            let _ = first.answer.send(result);
            drop(all);
            continue;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the proposal semaphore is never closed");
        // Let the tasks that are queueing calls right now (the rest of a router's batch)
        // finish first: a few microseconds, and the calls go to the log together.
        tokio::task::yield_now().await;
        // Everything that queued while the earlier entries were in flight joins this one.
        let mut batch = vec![first];
        while batch.len() < BATCH_CALLS_MAX {
            let next = match carried.pop_front() {
                Some(pending) => pending,
                None => match queue.try_recv() {
                    Ok(pending) => pending,
                    Err(_) => break,
                },
            };
            if matches!(next.work, Work::Admin(_)) {
                carried.push_front(next);
                break;
            }
            batch.push(next);
        }
        // A call whose caller stopped waiting is not started: a copy run late (after an
        // outage, say) would carry a timestamp past the idempotency window of its earlier
        // copies (docs/protocol.md, §4.1).
        let now = Instant::now();
        let is_late = |p: &mut Pending| {
            p.answer.is_closed() || p.deadline().is_some_and(|deadline| deadline <= now)
        };
        for late in batch.extract_if(.., is_late) {
            let _ = late.answer.send(Err(error(
                ErrorCode::Timeout,
                "not started: the call waited for the log longer than its caller waits \
                 (timeout_ms / request_timeout_ms); it did not take effect, retry it",
            )));
        }
        if batch.is_empty() {
            continue;
        }
        let Some(term) = node.replica.leader_term() else {
            answer_all(batch, &node.not_leader_now());
            continue;
        };
        if settled_term != Some(term) || unsettled.swap(false, Ordering::AcqRel) {
            let deadline = batch
                .iter()
                .filter_map(Pending::deadline)
                .max()
                .unwrap_or(now);
            match settle(&node, &permits, deadline).await {
                Ok(settled) if settled == term => {
                    in_flight.lock().unwrap().clear();
                    settled_term = Some(term);
                }
                Ok(_) => {
                    settled_term = None;
                    answer_all(batch, &node.not_leader_now());
                    continue;
                }
                Err(reply) => {
                    settled_term = None;
                    answer_all(batch, &reply);
                    continue;
                }
            }
        }
        next_seq += 1;
        let Executed {
            effects,
            mut waiting,
            early,
            rest,
        } = execute(&node, batch, next_seq, &in_flight);
        // Calls that did not fit the entry go first into the next one.
        for pending in rest.into_iter().rev() {
            carried.push_front(pending);
        }
        if effects.is_empty() {
            continue;
        }
        // The log's writer thread only wakes this entry's task, which answers on the async
        // worker (one wake-up from the writer per entry, not one per caller).
        let (durable, on_disk) = oneshot::channel();
        let on_durable: billcl_replication::OnDurable = Box::new(move |entry_term| {
            let _ = durable.send(entry_term);
        });
        match node
            .replica
            .submit(
                Command::Effects { term, effects }.encode(),
                Some(on_durable),
            )
            .await
        {
            Ok(submitted) => {
                let (node, in_flight, unsettled) =
                    (node.clone(), in_flight.clone(), unsettled.clone());
                let seq = next_seq;
                tokio::spawn(async move {
                    let outcome = node.replica.outcome(submitted);
                    tokio::pin!(outcome);
                    let outcome = tokio::select! {
                        biased;
                        outcome = &mut outcome => outcome,
                        Ok(entry_term) = on_disk => {
                            answer_on_disk(&mut waiting, early, term, entry_term);
                            outcome.await
                        }
                    };
                    if outcome.is_ok() {
                        in_flight.lock().unwrap().applied(seq);
                    } else {
                        // Its outcome may be unknown: settle before running more calls.
                        unsettled.store(true, Ordering::Release);
                    }
                    drop(permit);
                    answer_entry(&node, outcome, waiting);
                });
            }
            Err(e) => {
                // Not in the log, but its writes are in `in_flight`: settle before running
                // more calls.
                unsettled.store(true, Ordering::Release);
                answer_all_of(unanswered(&mut waiting), &node.propose_error(e));
            }
        }
    }
}

/// Where the answers of an entry's calls go, in the entry's order; a caller answered already
/// (from the disk, [`answer_on_disk`]) has `None`. Held by the entry's task, which answers
/// both from the disk and once applied.
type Slots = Vec<Option<Waiting>>;

/// Answers the calls of an entry as soon as it is on the leader's disk, when that makes it
/// committed (the leader is the replicaset's only voter: `Replica::submit`), rather than once
/// it is applied: the hand-offs from the log's writer to openraft's core, to its apply task
/// and back are not waited for. `early` holds each call's answer as the leader ran it, which
/// is what applying the entry answers when the entry is of the term the calls ran in
/// (`entry_term == term`): in that term, the entry applies on the state the calls ran on (its
/// earlier entries', and no administrative command is proposed while calls are in flight). A
/// call whose answer only the apply knows (`None`: a repeated idempotency key) waits for it,
/// and so does every call of an entry appended in a later term (applying it refuses them all,
/// `NotLeader`).
fn answer_on_disk(waiting: &mut Slots, early: Vec<Option<Response>>, term: u64, entry_term: u64) {
    if entry_term != term {
        return;
    }
    for (slot, response) in waiting.iter_mut().zip(early) {
        if let Some(response) = response {
            if let Some(answer) = slot.take() {
                let _ = answer.send(Ok(response));
            }
        }
    }
}

/// The callers of an entry not answered yet.
fn unanswered(waiting: &mut Slots) -> Vec<Waiting> {
    waiting.iter_mut().filter_map(Option::take).collect()
}

/// Hands each caller of an entry not answered from the disk yet its answer.
fn answer_entry(
    node: &StorageNode,
    outcome: Result<Vec<u8>, billcl_replication::ProposeError>,
    mut waiting: Slots,
) {
    match outcome {
        Ok(bytes) => answer_applied(&bytes, &mut waiting),
        Err(e) => answer_all_of(unanswered(&mut waiting), &node.propose_error(e)),
    }
}

/// Hands each caller not answered yet its answer from the applied entry's answers (`bytes`,
/// [`encode_answers`] of one answer per call).
fn answer_applied(bytes: &[u8], waiting: &mut Slots) {
    let count = waiting.len();
    match bincode::deserialize::<Vec<Vec<u8>>>(bytes) {
        Ok(responses) if responses.len() == count => {
            for (slot, response) in waiting.iter_mut().zip(responses) {
                if let Some(answer) = slot.take() {
                    let _ = answer.send(Ok(decode_response(&response)));
                }
            }
        }
        _ => answer_all_of(
            unanswered(waiting),
            &error(
                ErrorCode::Internal,
                format!("the answer to an entry of {count} calls is malformed"),
            ),
        ),
    }
}

/// Waits until this leader's state holds every entry of its log: none of its own entries in
/// flight (every permit but the one the caller holds), a read barrier (every earlier term's entry applied), then the log's
/// end applied (an entry of its own whose outcome was unknown may still be in its log).
/// Returns the term the barrier confirmed.
async fn settle(
    node: &StorageNode,
    permits: &Semaphore,
    deadline: Instant,
) -> Result<u64, ErrorReply> {
    let _others = tokio::time::timeout_at(
        deadline,
        permits.acquire_many(PROPOSALS_IN_FLIGHT_MAX as u32 - 1),
    )
    .await
    .map_err(|_| not_settled(node))?
    .expect("the proposal semaphore is never closed");
    let term = node
        .replica
        .read_barrier()
        .await
        .map_err(|e| node.propose_error(e))?;
    loop {
        let status = node.replica.status();
        if status.term != term || status.role != "leader" {
            return Err(node.not_leader_now());
        }
        if status.last_applied >= status.last_log_index {
            return Ok(term);
        }
        if Instant::now() >= deadline {
            return Err(not_settled(node));
        }
        tokio::time::sleep(Duration::from_millis(SETTLE_POLL_MS)).await;
    }
}

fn not_settled(node: &StorageNode) -> ErrorReply {
    error(
        ErrorCode::Unavailable,
        format!(
            "{}: the leader's log is not applied yet (an earlier entry's outcome is unknown: \
             no quorum?); the call did not take effect, retry",
            node.shared.replicaset
        ),
    )
}

fn answer_all(batch: Vec<Pending>, reply: &ErrorReply) {
    answer_all_of(batch.into_iter().map(|p| p.answer).collect(), reply);
}

fn answer_all_of(waiting: Vec<Waiting>, reply: &ErrorReply) {
    for answer in waiting {
        let _ = answer.send(Err(reply.clone()));
    }
}

/// Where a call's answer goes.
type Waiting = oneshot::Sender<Result<Response, ErrorReply>>;

/// What [`execute`] made of a batch: the calls that need the entry, and those left for the
/// next one.
struct Executed {
    /// The effects of the calls that need the entry, in order.
    effects: Vec<Effect>,
    /// Where their answers go, in the same order.
    waiting: Slots,
    /// Their answers as they ran (`None` for a repeat of a call in flight: only the apply
    /// knows it), in the same order.
    early: Vec<Option<Response>>,
    /// The calls that did not fit the entry (not run).
    rest: Vec<Pending>,
}

/// Runs the calls of one entry in order, until the entry is full ([`BATCH_BYTES_MAX`]).
/// Answers at once the calls that need no entry (a bucket not writable here, a retry of a
/// call already applied, a call that wrote more than [`CALL_EFFECT_BYTES_MAX`]); returns the
/// others and the calls that did not fit.
fn execute(
    node: &StorageNode,
    batch: Vec<Pending>,
    seq: u64,
    in_flight: &Arc<Mutex<InFlight>>,
) -> Executed {
    let shared = &node.shared;
    let timestamp_ms = crate::storage::now_ms();
    let mut effects = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    let mut early = Vec::with_capacity(batch.len());
    let mut bytes = 0;
    let mut calls = batch.into_iter();
    billcl_replication::briefly_inline(&mut calls, |pending| {
        let Pending {
            work: Work::Call {
                module, info, call, ..
            },
            answer: reply_to,
        } = pending
        else {
            unreachable!("administrative commands never join a batch of calls")
        };
        let once = call.bucket_id.zip(call.idempotency_key);
        if let Some((bucket, key)) = once {
            if let Some(answer) = shared.recent_answer(bucket, key) {
                let _ = reply_to.send(Ok(answer));
                return ControlFlow::Continue(());
            }
            if in_flight.lock().unwrap().keys.contains_key(&(bucket, key)) {
                effects.push(Effect {
                    bucket_id: Some(bucket),
                    idempotency_key: Some(key),
                    timestamp_ms,
                    call: Some(call_record(&info, call)),
                    outcome: Outcome::Repeat,
                });
                waiting.push(Some(reply_to));
                early.push(None);
                return ControlFlow::Continue(());
            }
        }
        let (response, call_effects) =
            shared.execute(&module, &info, &call, timestamp_ms, shared, in_flight);
        if let Response::Error(reply) = &response {
            if reply.code == ErrorCode::WrongBucket {
                // Refused by the bucket's state before running: nothing to enter.
                let _ = reply_to.send(Ok(response));
                return ControlFlow::Continue(());
            }
        }
        let answer = encode_response(&response);
        let writes = call_effects.writes.to_writes();
        let bucket_id = call.bucket_id;
        let record = call_record(&info, call);
        let size = effect_bytes(&answer, &writes, &call_effects.logs) + record.bytes();
        if size > CALL_EFFECT_BYTES_MAX {
            let _ = reply_to.send(Err(error(
                ErrorCode::ProcedureFailed,
                format!(
                    "{}: the call's arguments, answer, writes and log lines take {size} bytes; \
                     one call may take at most {CALL_EFFECT_BYTES_MAX} (CALL_EFFECT_BYTES_MAX): \
                     write less per call. It did not take effect.",
                    info.name
                ),
            )));
            return ControlFlow::Continue(());
        }
        let remembered = once.filter(|_| is_remembered(&response));
        {
            let mut in_flight = in_flight.lock().unwrap();
            for (id, account) in &call_effects.writes.accounts {
                in_flight.accounts.insert(*id, (seq, *account));
            }
            for (slot, value) in &call_effects.writes.kv {
                in_flight.kv.insert(slot.clone(), (seq, value.clone()));
            }
            if let Some(key) = remembered {
                in_flight.keys.insert(key, seq);
            }
        }
        effects.push(Effect {
            bucket_id,
            idempotency_key: remembered.map(|(_, key)| key),
            timestamp_ms,
            call: Some(record),
            outcome: Outcome::Ran {
                answer,
                writes,
                logs: call_effects.logs,
            },
        });
        waiting.push(Some(reply_to));
        early.push(Some(response));
        bytes += size;
        if bytes >= BATCH_BYTES_MAX {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    Executed {
        effects,
        waiting,
        early,
        rest: calls.collect(),
    }
}

/// What the log keeps of `call`: the procedure and its version, the arguments, the caller.
fn call_record(info: &ProcedureInfo, call: Call) -> CallRecord {
    CallRecord {
        module: info.module.clone(),
        version: info.version,
        procedure: info.name.clone(),
        args: Value::Tuple(call.args).encode(),
        caller: call.caller,
    }
}

/// About the encoded size of one call's effect in an entry (an upper bound).
fn effect_bytes(answer: &[u8], writes: &Writes, logs: &[LogRow]) -> usize {
    const OVERHEAD: usize = 64;
    let kv: usize = writes
        .kv
        .iter()
        .map(|(_, key, value)| 24 + key.len() + value.as_ref().map_or(0, Vec::len))
        .sum();
    let logs: usize = logs
        .iter()
        .map(|line| 32 + line.module.len() + line.procedure.len() + line.message.len())
        .sum();
    OVERHEAD + answer.len() + writes.accounts.len() * 48 + kv + logs
}

/// The answer bytes of an entry of calls: one encoded response per call, in order.
pub fn encode_answers(responses: &[Vec<u8>]) -> Vec<u8> {
    bincode::serialize(responses).expect("answers always serialize")
}

#[cfg(test)]
mod tests {
    use billcl_proto::Value;

    use super::*;

    fn slots(count: usize) -> (Slots, Vec<oneshot::Receiver<Result<Response, ErrorReply>>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..count)
            .map(|_| oneshot::channel())
            .map(|(s, r)| (Some(s), r))
            .unzip();
        (senders, receivers)
    }

    fn value(n: i64) -> Response {
        Response::Value(Value::Int(n))
    }

    fn answered(
        receiver: &mut oneshot::Receiver<Result<Response, ErrorReply>>,
    ) -> Option<Response> {
        receiver.try_recv().ok().map(|answer| answer.unwrap())
    }

    /// The calls whose answers the leader knows are answered from the disk, once; a repeated
    /// key's caller waits for the apply, and gets the applied answer.
    #[test]
    fn an_entry_on_disk_answers_the_calls_it_knows_and_the_apply_the_rest() {
        let (mut waiting, mut receivers) = slots(3);
        answer_on_disk(
            &mut waiting,
            vec![Some(value(1)), None, Some(value(3))],
            4,
            4,
        );
        assert_eq!(answered(&mut receivers[0]), Some(value(1)));
        assert_eq!(answered(&mut receivers[1]), None);
        assert_eq!(answered(&mut receivers[2]), Some(value(3)));
        let applied = [value(10), value(20), value(30)].map(|r| encode_response(&r));
        answer_applied(&encode_answers(&applied), &mut waiting);
        assert_eq!(answered(&mut receivers[1]), Some(value(20)));
        assert!(waiting.iter().all(Option::is_none));
    }

    /// An entry appended in a later term than its calls ran in is refused when applied: the
    /// disk answers none of them, the apply answers all.
    #[test]
    fn an_entry_of_another_term_is_answered_only_by_its_apply() {
        let (mut waiting, mut receivers) = slots(2);
        answer_on_disk(&mut waiting, vec![Some(value(1)), Some(value(2))], 4, 5);
        assert!(receivers.iter_mut().all(|r| answered(r).is_none()));
        let refused = Response::Error(error(ErrorCode::NotLeader, "the leadership changed"));
        let applied = [encode_response(&refused), encode_response(&refused)];
        answer_applied(&encode_answers(&applied), &mut waiting);
        for receiver in &mut receivers {
            let answer = answered(receiver);
            assert!(
                matches!(answer, Some(Response::Error(ref e)) if e.code == ErrorCode::NotLeader),
                "{answer:?}"
            );
        }
    }
}
