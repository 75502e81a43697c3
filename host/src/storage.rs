//! The storage role: one member of a replicaset. It serves calls routed to it, runs
//! command procedures through its replicaset's Raft log and query procedures against
//! its state, and answers Raft messages of its peers — all over one QUIC endpoint.
//!
//! The chain is: request → [`StorageNode::handle`] → (command) the leader's executor
//! ([`crate::batch`]: wasm runtime → effects) → Raft log → answer once committed, while every
//! member applies the effects (`StorageMachine`, no wasm); (query) → wasm runtime → answer.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use billcl_client::{Peer, Reply};
use billcl_money::Account;
use billcl_proto::message::{
    Call, ErrorCode, ErrorReply, ProcedureInfo, ReadMode, Request, Response,
};
use billcl_proto::{ProcedureKind, Value};
use billcl_replication::{Member, ProposeError, Replica, ReplicaConfig, Transport};
use billcl_runtime::{CallContext, CallError, LogLevel, Module, Runtime, Space, INLINE_CALL_FUEL};
use futures_util::stream::{self, BoxStream, FuturesUnordered};
use futures_util::{FutureExt, StreamExt};
use serde_json::json;

use crate::config::ClusterConfig;
use crate::state::{BucketState, Command, Effect, LogRow, Outcome, State, WriteSet, Writes};

/// Lines of procedure log kept per node.
pub const PROCEDURE_LOG_LINES_MAX: usize = 10_000;

/// What the state machine and the request path share.
pub struct Shared {
    pub instance: String,
    pub replicaset: String,
    pub state: RwLock<State>,
    runtime: Runtime,
    /// Compiled modules by name and version. Filled on deploy or first use.
    modules: Mutex<HashMap<String, HashMap<u32, Module>>>,
    pub(crate) procedure_log: Mutex<crate::deploy::ProcedureLog>,
    /// State digests computed by `Digest` log entries (`billcl verify`).
    pub digests: crate::verify::Digests,
}

/// The compiled `version` of module `name` in the cache, if there.
fn cached<'a>(
    modules: &'a HashMap<String, HashMap<u32, Module>>,
    name: &str,
    version: u32,
) -> Option<&'a Module> {
    modules.get(name)?.get(&version)
}

impl Shared {
    /// The compiled module of this name and version, compiling it from the state if
    /// it is not in the cache yet.
    pub(crate) fn module(&self, name: &str, version: u32) -> Result<Module, ErrorReply> {
        if let Some(module) = cached(&self.modules.lock().unwrap(), name, version) {
            return Ok(module.clone());
        }
        let bytes = {
            let state = self.state.read().unwrap();
            state
                .module_version(name, version)
                .map(|module| module.bytes.clone())
                .ok_or_else(|| {
                    error(
                        ErrorCode::UnknownProcedure,
                        format!("module {name} has no version {version}"),
                    )
                })?
        };
        let module = self
            .runtime
            .load(name, version, &bytes)
            .map_err(|e| error(ErrorCode::Internal, format!("module {name}@{version}: {e}")))?;
        self.remember_module(name, version, module.clone());
        Ok(module)
    }

    fn remember_module(&self, name: &str, version: u32, module: Module) {
        self.modules
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .insert(version, module);
    }

    /// The catalog of the Procedures request: every procedure a call can reach. First each
    /// active module version's procedures (`active`), then, newest first, each module's other
    /// versions' procedures that its active version also exports (a call reaches them pinned,
    /// `NAME@VERSION`; see `billcl_proto::catalog`). Versions not compiled since start-up are
    /// compiled here, once (they stay cached).
    pub fn catalog(&self) -> Vec<ProcedureInfo> {
        let modules: Vec<(String, u32, Vec<u32>)> = {
            let state = self.state.read().unwrap();
            state
                .active
                .iter()
                .map(|(name, active)| {
                    let versions = state.modules.get(name).map_or_else(Vec::new, |versions| {
                        versions.iter().map(|module| module.version).collect()
                    });
                    (name.clone(), *active, versions)
                })
                .collect()
        };
        let mut current = Vec::new();
        let mut other_versions = Vec::new();
        for (name, active_version, versions) in modules {
            let active = match self.module(&name, active_version) {
                Ok(module) => module,
                Err(reply) => {
                    tracing::warn!(module = %name, version = active_version, "not listed: {}", reply.message);
                    continue;
                }
            };
            current.extend(active.procedures().iter().map(|info| ProcedureInfo {
                active: true,
                ..(**info).clone()
            }));
            for version in versions.into_iter().rev().filter(|v| *v != active_version) {
                match self.module(&name, version) {
                    Ok(module) => other_versions.extend(
                        module
                            .procedures()
                            .iter()
                            .filter(|info| active.procedure(&info.name).is_some())
                            .map(|info| ProcedureInfo {
                                active: false,
                                ..(**info).clone()
                            }),
                    ),
                    Err(reply) => {
                        tracing::warn!(module = %name, version, "not listed: {}", reply.message)
                    }
                }
            }
        }
        current.extend(other_versions);
        current
    }

    /// Find the module and procedure a call names (`add_money` or `add-money`, optionally
    /// pinned to a version): the rule of `billcl_proto::catalog::find_procedure`.
    fn resolve(&self, call: &Call) -> Result<(Module, Arc<ProcedureInfo>), ErrorReply> {
        if call.version.is_none() {
            // The path of nearly every call: the active modules are compiled, and the look-up
            // allocates nothing (it runs for every call a storage serves).
            let state = self.state.read().unwrap();
            let modules = self.modules.lock().unwrap();
            let mut all_compiled = true;
            for (name, version) in &state.active {
                let Some(module) = cached(&modules, name, *version) else {
                    all_compiled = false;
                    break;
                };
                if let Some(info) = module.procedure(&call.procedure) {
                    return Ok((module.clone(), info.clone()));
                }
            }
            if all_compiled {
                return Err(self.unknown_procedure(call));
            }
        }
        let active: Vec<(String, u32)> = {
            let state = self.state.read().unwrap();
            state.active.iter().map(|(n, v)| (n.clone(), *v)).collect()
        };
        for (name, active_version) in active {
            let module = self.module(&name, active_version)?;
            if let Some(info) = module.procedure(&call.procedure) {
                let info = info.clone();
                let version = match call.version {
                    Some(version) if version != active_version => version,
                    _ => return Ok((module, info)),
                };
                let pinned = match self.module(&name, version) {
                    Ok(pinned) => pinned,
                    Err(reply) if reply.code == ErrorCode::UnknownProcedure => {
                        return Err(self.unknown_version(&call.procedure, version))
                    }
                    Err(reply) => return Err(reply),
                };
                return match pinned.procedure(&call.procedure).cloned() {
                    Some(info) => Ok((pinned, info)),
                    None => Err(self.unknown_version(&call.procedure, version)),
                };
            }
        }
        Err(self.unknown_procedure(call))
    }

    fn unknown_procedure(&self, call: &Call) -> ErrorReply {
        error(
            ErrorCode::UnknownProcedure,
            format!(
                "no procedure `{}` on {}; `billcl procedures` lists the callable ones",
                call.procedure, self.replicaset
            ),
        )
    }

    /// The error for a call pinned to a version of its module that does not have it: lists
    /// the versions that do.
    fn unknown_version(&self, procedure: &str, version: u32) -> ErrorReply {
        let message = match billcl_proto::find_procedure(&self.catalog(), procedure, Some(version))
        {
            Err(lookup) => format!("{lookup} (on {})", self.replicaset),
            Ok(_) => format!(
                "no version {version} of `{procedure}` on {}",
                self.replicaset
            ),
        };
        error(ErrorCode::UnknownProcedure, message)
    }

    /// Run a query procedure against the applied state (it cannot write: the runtime refuses).
    fn run(
        &self,
        module: &Module,
        info: &Arc<ProcedureInfo>,
        call: &Call,
        now_ms: i64,
        shared: &Arc<Shared>,
    ) -> Response {
        self.run_on(module, info, call, now_ms, shared, None).0
    }

    /// Run a command procedure on the leader, against the applied state with the writes of
    /// the entries in flight (`in_flight`) on top. Returns its answer and what it did (nothing
    /// written unless it succeeded); its log lines are returned, not kept, so that every
    /// member keeps them when it applies the entry.
    pub(crate) fn execute(
        &self,
        module: &Module,
        info: &Arc<ProcedureInfo>,
        call: &Call,
        now_ms: i64,
        shared: &Arc<Shared>,
        in_flight: &Arc<Mutex<crate::batch::InFlight>>,
    ) -> (Response, CallEffects) {
        self.run_on(module, info, call, now_ms, shared, Some(in_flight.clone()))
    }

    fn run_on(
        &self,
        module: &Module,
        info: &Arc<ProcedureInfo>,
        call: &Call,
        now_ms: i64,
        shared: &Arc<Shared>,
        in_flight: Option<Arc<Mutex<crate::batch::InFlight>>>,
    ) -> (Response, CallEffects) {
        if let Some(bucket) = call.bucket_id {
            let refusal = {
                let state = self.state.read().unwrap();
                let state = state.bucket_state(bucket);
                let allowed = match info.kind {
                    ProcedureKind::Query => state.is_some_and(|s| s.is_readable()),
                    ProcedureKind::Command => state.is_some_and(|s| s.is_writable()),
                };
                (!allowed).then(|| crate::state::describe_bucket_state(state))
            };
            if let Some(why) = refusal {
                let refused = Response::Error(error(
                    ErrorCode::WrongBucket,
                    format!(
                        "bucket {bucket} is not {} on {} ({why})",
                        if info.kind == ProcedureKind::Query {
                            "readable"
                        } else {
                            "writable"
                        },
                        self.replicaset,
                    ),
                ));
                return (refused, CallEffects::default());
            }
        }
        let query = in_flight.is_none();
        let effects = Arc::new(Mutex::new(CallEffects::default()));
        let overlay = || {
            Box::new(Overlay {
                shared: shared.clone(),
                call_bucket: call.bucket_id,
                in_flight: in_flight.clone(),
                effects: effects.clone(),
                logged_bytes: 0,
                procedure: info.clone(),
            })
        };
        let context = CallContext {
            now_ms,
            bucket_id: call.bucket_id.unwrap_or(0),
            caller: call.caller.clone(),
            kind: info.kind,
        };
        let (args, name) = (&call.args, &info.name);
        // A call may burn its whole fuel budget (a hostile loop: 60 ms to 0.4 s at the default
        // call_fuel_max, by machine), which must not hold up the other tasks of an async
        // worker (Raft heartbeats, other calls). So on a worker it first runs with
        // INLINE_CALL_FUEL; one that needs more runs again from the start, with its whole
        // budget, off the workers (what the first run wrote or logged is dropped: it kept only
        // what it captured).
        let inline = billcl_replication::on_an_async_worker().then(|| {
            let context = context.clone();
            let space = overlay();
            (self.runtime)
                .call_within(module, name, args, context, space, INLINE_CALL_FUEL)
                .0
        });
        let result = match inline {
            Some(result) if !matches!(result, Err(CallError::SliceSpent { .. })) => result,
            _ => {
                *effects.lock().unwrap() = CallEffects::default();
                crate::deploy::off_the_async_workers(|| {
                    self.runtime.call(module, name, args, context, overlay()).0
                })
            }
        };
        let mut effects = std::mem::take(&mut *effects.lock().unwrap());
        if query {
            // A query's log lines are this member's own: into its procedure log now.
            self.keep_log_lines(self::now_ms(), std::mem::take(&mut effects.logs));
        }
        match result {
            Ok(value) => (Response::Value(value), effects),
            Err(call_error) => {
                effects.writes = WriteSet::default();
                (
                    Response::Error(call_error_reply(&info.name, call_error)),
                    effects,
                )
            }
        }
    }

    /// Adds a call's log lines to this member's procedure log, stamped `at_ms`.
    fn keep_log_lines(&self, at_ms: i64, lines: Vec<LogRow>) {
        if lines.is_empty() {
            return;
        }
        let mut procedure_log = self.procedure_log.lock().unwrap();
        for line in lines {
            let level = log_level(line.level);
            procedure_log.push(at_ms, &line.module, &line.procedure, level, &line.message);
        }
    }

    /// The first answer of an already applied command with idempotency key `key` in
    /// `bucket`, if the bucket still remembers it (see `IDEMPOTENCY_WINDOW_MS`).
    pub(crate) fn recent_answer(&self, bucket: u32, key: u128) -> Option<Response> {
        let state = self.state.read().unwrap();
        let answer = state.buckets.get(&bucket)?.recent_answer(key)?;
        Some(decode_response(answer))
    }

    /// The wasm runtime (deploys check modules with it before proposing them).
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}

/// Whether a keyed command's answer is remembered in its bucket, so a retry gets it back
/// instead of running again. Only answers that are the call's result are kept: a call refused
/// because the bucket is not here, or failed by this node, did not run.
pub(crate) fn is_remembered(response: &Response) -> bool {
    match response {
        Response::Error(reply) => !matches!(
            reply.code,
            ErrorCode::WrongBucket
                | ErrorCode::NotLeader
                | ErrorCode::Unavailable
                | ErrorCode::Timeout
                | ErrorCode::TooBusy
                | ErrorCode::Internal
        ),
        _ => true,
    }
}

fn call_error_reply(procedure: &str, call_error: CallError) -> ErrorReply {
    let code = match &call_error {
        CallError::UnknownProcedure(_) => ErrorCode::UnknownProcedure,
        CallError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        CallError::Internal(_) | CallError::SliceSpent { .. } => ErrorCode::Internal,
        _ => ErrorCode::ProcedureFailed,
    };
    let message = match call_error {
        CallError::Procedure(message) => message,
        other => format!("{procedure}: {other}"),
    };
    error(code, message)
}

pub fn error(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

/// An admin verb's JSON body, or `BadRequest` saying why not.
pub(crate) fn parse_body(body: &str) -> Result<serde_json::Value, ErrorReply> {
    serde_json::from_str(body).map_err(|e| error(ErrorCode::BadRequest, format!("bad JSON: {e}")))
}

/// [`parse_body`] for a verb whose fields are all optional: an empty body is `{}`.
pub(crate) fn parse_optional_body(body: &str) -> Result<serde_json::Value, ErrorReply> {
    if body.trim().is_empty() {
        return Ok(serde_json::json!({}));
    }
    parse_body(body)
}

/// What a call did besides answering: its writes and (for a command) its log lines.
#[derive(Default)]
pub(crate) struct CallEffects {
    pub writes: WriteSet,
    pub logs: Vec<LogRow>,
}

/// The storage a call sees: the state; for a command on the leader, the writes of the
/// entries in flight on top; and the call's own writes on top of all.
struct Overlay {
    shared: Arc<Shared>,
    call_bucket: Option<u32>,
    in_flight: Option<Arc<Mutex<crate::batch::InFlight>>>,
    /// What the call wrote and logged: a command's go into its log entry (every member keeps
    /// its log lines when it applies the entry), a query's lines into this member's procedure
    /// log once the call is over.
    effects: Arc<Mutex<CallEffects>>,
    /// Bytes of the log lines in `effects`.
    logged_bytes: usize,
    /// The procedure running, for its log lines.
    procedure: Arc<ProcedureInfo>,
}

impl Overlay {
    fn kv_key(&self, module: &str, key: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let bucket = self.call_bucket.ok_or(
            "the key-value space needs a keyed call (a procedure whose first parameter is the key)",
        )?;
        let mut full = Vec::with_capacity(module.len() + 1 + key.len());
        full.extend_from_slice(module.as_bytes());
        full.push(0);
        full.extend_from_slice(key);
        Ok((bucket, full))
    }
}

impl Space for Overlay {
    fn account(&mut self, id: u64) -> Option<Account> {
        if let Some(account) = self.effects.lock().unwrap().writes.accounts.get(&id) {
            return Some(*account);
        }
        if let Some(account) = self
            .in_flight
            .as_ref()
            .and_then(|in_flight| in_flight.lock().unwrap().account(id))
        {
            return Some(account);
        }
        self.shared.state.read().unwrap().account(id)
    }

    fn put_account(&mut self, account: Account) -> Result<(), String> {
        if !self.owns(account.id) {
            let bucket = self.shared.state.read().unwrap().bucket_of(account.id);
            return Err(match self.call_bucket {
                Some(call_bucket) => format!(
                    "account {} is in bucket {bucket}; this call may only write bucket {call_bucket}",
                    account.id
                ),
                None => format!(
                    "account {} is in bucket {bucket}, which {} does not own",
                    account.id, self.shared.replicaset
                ),
            });
        }
        self.effects
            .lock()
            .unwrap()
            .writes
            .accounts
            .insert(account.id, account);
        Ok(())
    }

    fn owns(&mut self, id: u64) -> bool {
        let state = self.shared.state.read().unwrap();
        let bucket = state.bucket_of(id);
        match self.call_bucket {
            Some(call_bucket) if call_bucket != bucket => false,
            _ => state.bucket_state(bucket).is_some_and(|s| s.is_writable()),
        }
    }

    fn kv_get(&mut self, module: &str, key: &[u8]) -> Option<Vec<u8>> {
        let (bucket, full) = self.kv_key(module, key).ok()?;
        let slot = (bucket, full);
        if let Some(value) = self.effects.lock().unwrap().writes.kv.get(&slot) {
            return value.clone();
        }
        if let Some(value) = self
            .in_flight
            .as_ref()
            .and_then(|in_flight| in_flight.lock().unwrap().kv(&slot))
        {
            return value;
        }
        let (bucket, full) = slot;
        let state = self.shared.state.read().unwrap();
        state.buckets.get(&bucket)?.kv.get(&full).cloned()
    }

    fn kv_set(&mut self, module: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        let slot = self.kv_key(module, key)?;
        self.effects
            .lock()
            .unwrap()
            .writes
            .kv
            .insert(slot, Some(value.to_vec()));
        Ok(())
    }

    fn kv_delete(&mut self, module: &str, key: &[u8]) -> Result<(), String> {
        let slot = self.kv_key(module, key)?;
        self.effects.lock().unwrap().writes.kv.insert(slot, None);
        Ok(())
    }

    fn log(&mut self, module: &str, level: LogLevel, message: &str) {
        // Bounded: past the most one call's effects may take (a command that logged that much
        // fails for it), further lines are dropped.
        if self.logged_bytes > crate::batch::CALL_EFFECT_BYTES_MAX {
            return;
        }
        self.logged_bytes += message.len();
        self.effects.lock().unwrap().logs.push(LogRow {
            module: module.to_string(),
            procedure: self.procedure.name.clone(),
            level: log_level_row(level),
            message: message.to_string(),
        });
    }
}

/// What to do about a member whose replication data at `raft_dir` is damaged
/// (docs/ARCHITECTURE.md §9); `promote` is the command that promotes a replica of its
/// replicaset, if it has one.
fn damaged_member_advice(raft_dir: &std::path::Path, voter: bool, promote: Option<&str>) -> String {
    if voter {
        format!(
            "This voter's log is the replicaset's acknowledged history: restore {} from a \
             backup{}; with other voters, moving it aside and starting it again makes the \
             leader send it the state, but a write that only it and a voter that fails \
             meanwhile held would be lost",
            raft_dir.display(),
            promote.map_or(String::new(), |command| format!(
                ", or promote a replica: {command}"
            ))
        )
    } else {
        format!(
            "This replica holds nothing the others do not: move {} aside and start it again, \
             and its leader sends it the state",
            raft_dir.display()
        )
    }
}

/// The replicated state machine: applies committed log entries.
pub struct StorageMachine {
    shared: Arc<Shared>,
}

impl billcl_replication::Machine for StorageMachine {
    fn apply(
        &mut self,
        term: u64,
        index: u64,
        command: &[u8],
    ) -> Result<Vec<u8>, billcl_replication::CannotApply> {
        tracing::debug!(target: "billcl::apply", term, index, bytes = command.len(), "entry");
        // An entry this build cannot read (a newer build's kind, or damage the checksums did
        // not catch) halts this member there: skipping it would leave this member's state
        // different from the members that applied it, and answer reads from that.
        let command = Command::decode(command).map_err(billcl_replication::CannotApply)?;
        Ok(self.apply_command(term, index, command))
    }

    fn snapshot(&mut self) -> billcl_replication::SnapshotJob {
        // A copy-on-write capture: the buckets are shared (`Arc`), and a bucket written
        // before the job has serialized it is copied by that write (`Arc::make_mut`).
        let state = self.shared.state.read().unwrap().clone();
        Box::new(move |out| state.write_snapshot(out))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let state = State::decode_snapshot(snapshot)?;
        // The old state is dropped after the lock is let go: freeing its accounts takes
        // milliseconds per 100,000, and a short read on an async worker waits for this lock.
        let replaced = std::mem::replace(&mut *self.shared.state.write().unwrap(), state);
        self.shared.modules.lock().unwrap().clear();
        drop(replaced);
        Ok(())
    }
}

impl StorageMachine {
    /// Applies one decoded entry; the bytes are the answer to its proposer.
    fn apply_command(&mut self, term: u64, index: u64, command: Command) -> Vec<u8> {
        let response = match command {
            call @ Command::Call { .. } => self.apply_legacy_call(call),
            Command::Batch(calls) => {
                let answers: Vec<Vec<u8>> = crate::deploy::off_the_async_workers(|| {
                    calls
                        .into_iter()
                        .map(|call| encode_response(&self.apply_legacy_call(call)))
                        .collect()
                });
                return crate::batch::encode_answers(&answers);
            }
            Command::Effects {
                term: ran_in,
                effects,
            } => return self.apply_effects(term, ran_in, effects),
            Command::EffectsBeforeCalls {
                term: ran_in,
                effects,
            } => {
                let effects = effects.into_iter().map(Effect::from).collect();
                return self.apply_effects(term, ran_in, effects);
            }
            Command::Deploy { name, bytes } => {
                // Compile before recording, so a module that does not load is refused
                // the same way on every member.
                let next = {
                    let state = self.shared.state.read().unwrap();
                    state
                        .modules
                        .get(&name)
                        .and_then(|v| v.last())
                        .map_or(1, |m| m.version + 1)
                };
                let loaded = crate::deploy::off_the_async_workers(|| {
                    self.shared.runtime.load(&name, next, &bytes)
                });
                let conflict = loaded.as_ref().ok().and_then(|module| {
                    crate::deploy::conflict_with_active(&self.shared, &name, module)
                });
                match loaded {
                    Err(load_error) => Response::Error(error(
                        ErrorCode::InvalidArgument,
                        format!("module {name} refused: {load_error}"),
                    )),
                    Ok(_) if conflict.is_some() => Response::Error(error(
                        ErrorCode::InvalidArgument,
                        conflict.unwrap_or_default(),
                    )),
                    Ok(module) => {
                        let version = self
                            .shared
                            .state
                            .write()
                            .unwrap()
                            .add_module_version(&name, bytes, index);
                        debug_assert_eq!(version, next);
                        self.shared.remember_module(&name, version, module);
                        tracing::info!(module = %name, version, index, "module deployed");
                        Response::Value(Value::Record(vec![
                            ("module".to_string(), Value::String(name)),
                            ("version".to_string(), Value::Uint(u64::from(version))),
                        ]))
                    }
                }
            }
            Command::FillAccounts {
                first_id,
                count,
                balance_micros,
                timestamp_ms,
            } => match self.shared.state.write().unwrap().fill_accounts(
                first_id,
                count,
                balance_micros,
                timestamp_ms,
            ) {
                Ok(created) => Response::Value(Value::Uint(created)),
                Err(message) => Response::Error(error(ErrorCode::InvalidArgument, message)),
            },
            Command::RecordDepletions { items } => {
                let recorded = self.shared.state.write().unwrap().record_depletions(&items);
                Response::Value(Value::Uint(u64::from(recorded)))
            }
            Command::Digest => {
                let state = self.shared.state.read().unwrap();
                crate::verify::apply_digest(&state, &self.shared.digests, index)
            }
            Command::Activate { name, version } => {
                crate::deploy::apply_activate(&self.shared, &name, version)
            }
            command @ (Command::SendBuckets { .. }
            | Command::SendBucketMoves { .. }
            | Command::ReceiveBuckets { .. }
            | Command::ReceiveBucketMoves { .. }
            | Command::DropSentBuckets { .. }
            | Command::DropSentBucketMoves { .. }
            | Command::CancelSendBuckets { .. }
            | Command::CancelSendBucketMoves { .. }
            | Command::PinBuckets { .. }
            | Command::StageBucketPart(_)) => {
                crate::rebalance::apply(&mut self.shared.state.write().unwrap(), command)
            }
            Command::ReceiveStagedBucket {
                from,
                bucket,
                generation,
                checksum,
            } => crate::rebalance::apply_receive_staged(
                &self.shared.state,
                (&from, bucket, generation),
                checksum,
            ),
            Command::AssignBuckets { bucket_ids } => {
                match self
                    .shared
                    .state
                    .write()
                    .unwrap()
                    .assign_buckets(&bucket_ids)
                {
                    Ok(added) => Response::Value(Value::Uint(u64::from(added))),
                    Err(message) => Response::Error(error(ErrorCode::InvalidArgument, message)),
                }
            }
        };
        encode_response(&response)
    }

    /// Applies the effects of an entry of command calls in order (no wasm runs: the leader
    /// ran them); answers one encoded response per call (`batch::encode_answers`).
    fn apply_effects(&self, entry_term: u64, ran_in: u64, effects: Vec<Effect>) -> Vec<u8> {
        if entry_term != ran_in {
            // The leader of `ran_in` ran these calls, but the entry was appended in a later
            // term of its own: other leaders' entries may lie between what it ran them on and
            // here. None takes effect; the callers retry.
            let refused = encode_response(&Response::Error(error(
                ErrorCode::NotLeader,
                format!(
                    "{}: the leadership changed while the call was in flight (term {ran_in} -> \
                     {entry_term}); it did not take effect, retry",
                    self.shared.replicaset
                ),
            )));
            return crate::batch::encode_answers(&vec![refused; effects.len()]);
        }
        let mut state = self.shared.state.write().unwrap();
        let answers: Vec<Vec<u8>> = effects
            .into_iter()
            .map(|effect| {
                let once = effect.bucket_id.zip(effect.idempotency_key);
                let remembered = once.and_then(|(bucket, key)| {
                    state.buckets.get(&bucket)?.recent_answer(key).map(<[u8]>::to_vec)
                });
                if let (Some((bucket, _)), None) = (once, &remembered) {
                    // Its bucket left (or is leaving) between the call and here: nothing is
                    // written or remembered, and the caller's retry finds the bucket's new
                    // home, where the idempotency window went with it.
                    if let Err(why) = state.check_writable(bucket) {
                        return self.not_applied(&why);
                    }
                }
                let (answer, logs) = match (effect.outcome, remembered) {
                    (_, Some(remembered)) => {
                        tracing::debug!(target: "billcl::apply", ?once, "keyed call answered again");
                        return remembered;
                    }
                    (Outcome::Repeat, None) => {
                        return encode_response(&Response::Error(error(
                            ErrorCode::Internal,
                            "the first call with this idempotency key is not remembered any \
                             more; read the account to learn whether it took effect",
                        )))
                    }
                    (Outcome::Ran { answer, writes, logs }, None) => {
                        match self.commit_call(&mut state, once, answer, writes, effect.timestamp_ms) {
                            Ok(answer) => (answer, logs),
                            Err(refused) => return refused,
                        }
                    }
                };
                self.shared.keep_log_lines(effect.timestamp_ms, logs);
                // Post-mortems of the apply order: BILLCL_LOG=info,billcl::apply=debug.
                tracing::debug!(
                    target: "billcl::apply",
                    ?once,
                    timestamp_ms = effect.timestamp_ms,
                    "call applied"
                );
                answer
            })
            .collect();
        crate::batch::encode_answers(&answers)
    }
}

impl StorageMachine {
    /// Applies a command call of a log written before the effects log (`Command::Call`):
    /// runs it, as every member did then, so that such a log replays to the same state.
    fn apply_legacy_call(&self, command: Command) -> Response {
        let Command::Call {
            module,
            version,
            procedure,
            call,
            bucket_id,
            timestamp_ms,
        } = command
        else {
            return Response::Error(error(ErrorCode::Internal, "a batch entry holds only calls"));
        };
        let call = match billcl_proto::frame::Frame::decode(&call) {
            Ok(Some((frame, _))) => match Request::from_frame(&frame) {
                Ok(Request::Call(call)) => Call { bucket_id, ..call },
                _ => return Response::Error(error(ErrorCode::Internal, "bad call in the log")),
            },
            _ => return Response::Error(error(ErrorCode::Internal, "truncated call in the log")),
        };
        let once = bucket_id.zip(call.idempotency_key);
        if let Some(answer) = once.and_then(|(bucket, key)| self.shared.recent_answer(bucket, key))
        {
            return answer;
        }
        let module = match self.shared.module(&module, version) {
            Ok(module) => module,
            Err(reply) => return Response::Error(reply),
        };
        let Some(info) = module.procedure(&procedure).cloned() else {
            return Response::Error(error(
                ErrorCode::UnknownProcedure,
                format!("{}@{version} has no procedure {procedure}", module.name()),
            ));
        };
        let (response, effects) =
            self.shared
                .run_on(&module, &info, &call, timestamp_ms, &self.shared, None);
        let mut state = self.shared.state.write().unwrap();
        let once = once.filter(|_| is_remembered(&response));
        let answer = encode_response(&response);
        match self.commit_call(
            &mut state,
            once,
            answer,
            effects.writes.to_writes(),
            timestamp_ms,
        ) {
            Ok(_) => response,
            Err(refused) => decode_response(&refused),
        }
    }

    /// What every member does with a call that ran (on the leader, or here for a legacy
    /// entry): commit its writes, all or none, and remember its encoded answer under its
    /// bucket and idempotency key (`once`: only answers that are the call's result). Returns
    /// the answer, or, if a written bucket is not writable here, the encoded refusal (nothing
    /// written, nothing remembered).
    /// The encoded answer of a call whose bucket is not writable here when its effect is
    /// applied: it did not take effect, and its retry finds the bucket (`WrongBucket`).
    fn not_applied(&self, why: &str) -> Vec<u8> {
        encode_response(&Response::Error(error(
            ErrorCode::WrongBucket,
            format!(
                "{}: {why}; the call did not take effect",
                self.shared.replicaset
            ),
        )))
    }

    fn commit_call(
        &self,
        state: &mut State,
        once: Option<(u32, u128)>,
        answer: Vec<u8>,
        writes: Writes,
        timestamp_ms: i64,
    ) -> Result<Vec<u8>, Vec<u8>> {
        if !writes.is_empty() {
            state.commit(writes).map_err(|why| self.not_applied(&why))?;
        }
        if let Some((bucket, key)) = once {
            if let Some(data) = state.buckets.get_mut(&bucket) {
                Arc::make_mut(data).remember_answer(key, &answer, timestamp_ms);
            }
        }
        Ok(answer)
    }
}

/// A log level as entered in the log ([`LogRow::level`]).
fn log_level_row(level: LogLevel) -> u8 {
    match level {
        LogLevel::Debug => 0,
        LogLevel::Info => 1,
        LogLevel::Warn => 2,
        LogLevel::Error => 3,
    }
}

fn log_level(row: u8) -> LogLevel {
    match row {
        0 => LogLevel::Debug,
        1 => LogLevel::Info,
        2 => LogLevel::Warn,
        _ => LogLevel::Error,
    }
}

pub(crate) fn encode_response(response: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    response.to_frame(0).encode(&mut out);
    out
}

pub(crate) fn decode_response(bytes: &[u8]) -> Response {
    match billcl_proto::frame::Frame::decode(bytes) {
        Ok(Some((frame, _))) => Response::from_frame(&frame).unwrap_or_else(|e| {
            Response::Error(error(
                ErrorCode::Internal,
                format!("bad answer from the log: {e}"),
            ))
        }),
        _ => Response::Error(error(ErrorCode::Internal, "truncated answer from the log")),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Raft messages to peers over QUIC.
#[derive(Clone)]
pub struct QuicTransport {
    /// The members of the cluster file, then those met since: a learner that joined after
    /// this member read the file (openraft gives its address from the membership). Shared by
    /// the clones: the storage keeps one, to follow an address changed in the file.
    peers: Arc<RwLock<BTreeMap<u64, Peer>>>,
    endpoint: quinn::Endpoint,
    timeout: Duration,
}

impl QuicTransport {
    /// Links to `members` (node id, address from the cluster file: what openraft's
    /// membership says later does not replace it); a member met only in a membership gets
    /// its link when first sent to ([`QuicTransport::peer`]).
    fn new(
        endpoint: quinn::Endpoint,
        timeout: Duration,
        members: impl IntoIterator<Item = (u64, SocketAddr)>,
    ) -> QuicTransport {
        let transport = QuicTransport {
            peers: Arc::default(),
            endpoint,
            timeout,
        };
        transport.peers.write().unwrap().extend(
            members
                .into_iter()
                .map(|(id, address)| (id, transport.link(address))),
        );
        transport
    }

    fn link(&self, address: SocketAddr) -> Peer {
        Peer::new(
            self.endpoint.clone(),
            address,
            crate::tls::SERVER_NAME.to_string(),
            self.timeout,
        )
    }

    /// Links to member `target` at `address` from now on: the address its link had, or
    /// `None` if it had none (a link is made) or the same one (nothing changes).
    fn readdress(&self, target: u64, address: SocketAddr) -> Option<SocketAddr> {
        let mut peers = self.peers.write().unwrap();
        let before = peers.get(&target).map(Peer::address);
        if before == Some(address) {
            return None;
        }
        peers.insert(target, self.link(address));
        before
    }

    /// The link to member `target`, made for `address` if there is none yet.
    fn peer(&self, target: u64, address: &str) -> Result<Peer, String> {
        if let Some(peer) = self.peers.read().unwrap().get(&target) {
            return Ok(peer.clone());
        }
        let at: SocketAddr = address
            .parse()
            .map_err(|e| format!("node {target} has no usable address ({address:?}: {e})"))?;
        let peer = self.link(at);
        let mut peers = self.peers.write().unwrap();
        Ok(peers.entry(target).or_insert(peer).clone())
    }
}

impl Transport for QuicTransport {
    async fn send(&self, target: u64, address: &str, message: Vec<u8>) -> Result<Vec<u8>, String> {
        let peer = self.peer(target, address)?;
        match peer.request(&Request::Raft(message)).await {
            Ok(Response::Raft(bytes)) => Ok(bytes),
            Ok(Response::Error(reply)) => Err(reply.message),
            Ok(_) => Err("unexpected answer to a raft message".to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Where the answer of one call of a request comes from.
enum Slot {
    Answered(Response),
    Command(crate::batch::Answer),
}

/// How often, at most, a member reads the cluster file again for the name of a member it met
/// in the membership without having read it there.
const LATER_NAMES_READ_MS: u64 = 5_000;

/// A running storage instance.
pub struct StorageNode {
    pub shared: Arc<Shared>,
    pub replica: Replica<StorageMachine, QuicTransport>,
    /// The address this member listens on (the cluster file's when it started).
    listening: Option<SocketAddr>,
    /// The name of each member's node id as this member read the cluster file when it
    /// started and at each reload since (members added). An id never changes its name here:
    /// a file that gives a known id to another member renumbered the members, and a reload
    /// refuses it.
    names: Mutex<BTreeMap<u64, String>>,
    /// The links to the other members (shared with the Raft network), which `reload` points
    /// at the addresses the cluster file gives now.
    transport: QuicTransport,
    /// Names of members met in the membership but not in the file this member started with
    /// (added and joined since), from the file read again: when, and what it said.
    later_names: Mutex<(Option<std::time::Instant>, BTreeMap<u64, String>)>,
    /// The cluster file and this member's replicaset in it.
    config_path: std::path::PathBuf,
    replicaset: String,
    /// The leader's group commit of command calls.
    batcher: crate::batch::Batcher,
    /// `request_timeout_ms`: the longest a call is worked on after it arrives.
    call_timeout: Duration,
    /// What its server counts (the `stats` verb).
    pub stats: Arc<billcl_client::ServerStats>,
    /// The last bucket encoded for `send-bucket-part`, so that each part of a bucket moved
    /// part by part does not encode it again ([`crate::rebalance`]).
    pub(crate) sending: Mutex<Option<crate::rebalance::EncodedBucket>>,
}

impl StorageNode {
    pub async fn start(
        config: &ClusterConfig,
        instance: &str,
        replicaset: &str,
        node_id: u64,
        client_endpoint: quinn::Endpoint,
    ) -> Result<Arc<StorageNode>> {
        let limits = billcl_runtime::Limits {
            call_fuel_max: config.limits.call_fuel_max,
            guest_memory_bytes_max: config.limits.guest_memory_bytes_max,
            module_bytes_max: config.limits.module_bytes_max,
            result_bytes_max: config.limits.result_bytes_max,
            ..billcl_runtime::Limits::default()
        };
        let runtime = Runtime::new(limits).context("cannot start the wasm runtime")?;
        let shared = Arc::new(Shared {
            instance: instance.to_string(),
            replicaset: replicaset.to_string(),
            state: RwLock::new(State::new(config.cluster.bucket_count)),
            runtime,
            modules: Mutex::new(HashMap::new()),
            procedure_log: Mutex::new(crate::deploy::ProcedureLog::new(PROCEDURE_LOG_LINES_MAX)),
            digests: crate::verify::Digests::default(),
        });
        let members = config.members(replicaset);
        let timeout = Duration::from_millis(config.limits.request_timeout_ms);
        let transport = QuicTransport::new(
            client_endpoint.clone(),
            timeout,
            members
                .iter()
                .filter(|(id, ..)| *id != node_id)
                .map(|(id, _, address, _)| (*id, *address)),
        );
        let raft_dir = config.instance_dir(instance).join("raft");
        let identity = crate::identity::Identity {
            replicaset: replicaset.to_string(),
            node_id,
        };
        crate::identity::check(
            &config.instance_dir(instance),
            &raft_dir,
            instance,
            &identity,
        )?;
        let replica_config = ReplicaConfig {
            node_id,
            dir: raft_dir.clone(),
            members: members
                .iter()
                .map(|(id, _, address, voter)| {
                    (
                        *id,
                        Member {
                            address: address.to_string(),
                            voter: *voter,
                        },
                    )
                })
                .collect(),
            sync: config.replication.sync,
            heartbeat_ms: config.replication.heartbeat_ms,
            election_timeout_ms: config.replication.election_timeout_ms,
            snapshot_entries: config.replication.snapshot_entries,
            learner_batch_ms: config.replication.learner_batch_ms,
        };
        let replica = Replica::start(
            replica_config,
            StorageMachine {
                shared: shared.clone(),
            },
            transport.clone(),
        )
        .await
        .map_err(|e| match e {
            billcl_replication::Error::Corrupt(_) => {
                let voter = members
                    .iter()
                    .any(|(id, _, _, voter)| *id == node_id && *voter);
                let promote =
                    members
                        .iter()
                        .find(|(_, _, _, voter)| !voter)
                        .map(|(_, name, ..)| {
                            format!("`billcl failover {replicaset} --to {name} --force`")
                        });
                let advice = damaged_member_advice(&raft_dir, voter, promote.as_deref());
                anyhow::anyhow!("{e}. {advice}")
            }
            other => anyhow::Error::new(other),
        })
        .context("cannot start replication")?;
        let (batcher, batch_queue) = crate::batch::Batcher::new();
        let node = Arc::new(StorageNode {
            shared,
            replica,
            listening: members
                .iter()
                .find(|(id, ..)| *id == node_id)
                .map(|(.., address, _)| *address),
            names: Mutex::new(
                members
                    .iter()
                    .map(|(id, name, ..)| (*id, name.clone()))
                    .collect(),
            ),
            transport,
            later_names: Mutex::default(),
            config_path: config.path.clone(),
            replicaset: replicaset.to_string(),
            batcher,
            call_timeout: timeout,
            stats: Arc::default(),
            sending: Mutex::default(),
        });
        tokio::spawn(crate::batch::run(node.clone(), batch_queue));
        tokio::spawn(crate::depletion::scan(node.clone()));
        let founder = node.clone();
        tokio::spawn(async move { founder.found().await });
        Ok(node)
    }

    /// Initialize the Raft group if this node founds it, and make sure the built-in
    /// module is deployed once a leader exists.
    async fn found(self: Arc<Self>) {
        let initializer = self.clone();
        tokio::spawn(async move {
            match initializer.replica.initialize().await {
                Ok(()) => {}
                Err(billcl_replication::Error::DataLost {
                    node_id,
                    holder,
                    term,
                    last_log_index,
                    voters,
                }) => initializer.lost_data(node_id, holder, term, last_log_index, &voters),
                Err(e) => tracing::warn!("replicaset initialization: {e}"),
            }
        });
        loop {
            let deployed = self
                .shared
                .state
                .read()
                .unwrap()
                .active
                .contains_key(billcl_runtime::BILLING_MODULE_NAME);
            if deployed {
                return;
            }
            if self.replica.status().role == "leader" {
                let command = Command::Deploy {
                    name: billcl_runtime::BILLING_MODULE_NAME.to_string(),
                    bytes: billcl_runtime::BILLING_COMPONENT.to_vec(),
                };
                match self.propose(command).await {
                    Ok(Response::Error(reply)) => {
                        tracing::warn!("deploying the built-in module: {}", reply.message)
                    }
                    Ok(_) => tracing::info!("built-in billing module deployed"),
                    Err(reply) => {
                        tracing::warn!("deploying the built-in module: {}", reply.message)
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// This member (node `me`) would have founded its replicaset but holds no data while
    /// member `holder` belongs to it (term `term`, log up to `last_log_index`, `voters` in its
    /// membership): its data was lost. With other voters, the leader among them sends it the
    /// state; as the only voter it halts, naming the replica to promote, rather than serve an
    /// empty replicaset in place of the one its replica holds.
    fn lost_data(
        &self,
        me: u64,
        holder: u64,
        term: u64,
        last_log_index: Option<u64>,
        voters: &[u64],
    ) {
        let held = format!(
            "{} holds replicaset {}'s log (term {term}, up to index {})",
            self.member_name(holder),
            self.shared.replicaset,
            last_log_index.map_or("none".to_string(), |index| index.to_string())
        );
        if voters.iter().any(|voter| *voter != me) {
            tracing::warn!(
                "this member holds no data but {held}: its data was lost; it does not found a \
                 new replicaset, and the replicaset's leader sends it the state"
            );
            return;
        }
        let replicaset = &self.shared.replicaset;
        let reason = format!(
            "lost its data: it holds no Raft state but {held}, and it was the replicaset's only \
             voter; it does not found a new, empty replicaset in place of that one. Promote the \
             replica that has the data: `billcl failover {replicaset} --to {} --force` (writes \
             it had not received are lost; this member then rejoins as its replica and \
             catches up)",
            self.member_name(holder)
        );
        tracing::error!("{reason}");
        self.replica.halt(reason);
    }

    /// Takes the names the cluster file gives the members' node ids (a member added), or
    /// refuses a file that gives a known id to another member than it did: a member added or
    /// removed renumbered the others (ids by position), and linking by it would be wrong. The
    /// members added since this one started are known too, so that a later change that
    /// renumbers only them is refused as well.
    fn adopt_names(&self, members: &[(u64, String, SocketAddr, bool)]) -> Result<(), ErrorReply> {
        let mut names = self.names.lock().unwrap();
        for (id, name, ..) in members {
            if let Some(known) = names.get(id).filter(|known| *known != name) {
                return Err(error(
                    ErrorCode::BadRequest,
                    format!(
                        "{} gives node id {id} to {name}, but it is {known}'s: a member added \
                         or removed renumbered the others; give each member of {} its \
                         `node_id` (as `billcl expel` does); nothing was changed",
                        self.config_path.display(),
                        self.replicaset
                    ),
                ));
            }
        }
        for (id, name, ..) in members {
            names.entry(*id).or_insert_with(|| name.clone());
        }
        Ok(())
    }

    /// The storage's `reload`: reads the cluster file again and links to each member of its
    /// replicaset at the address it gives now (a member moved: restarted at a new address);
    /// on the leader, the membership's addresses follow the file too (`SetNodes` through the
    /// log), so that a member that reads them there finds it. This member's own address is
    /// the one it listens on until it restarts.
    async fn reload(&self) -> Result<serde_json::Value, ErrorReply> {
        let config = ClusterConfig::load(&self.config_path)
            .map_err(|e| error(ErrorCode::BadRequest, format!("{e:#}; nothing was changed")))?;
        let own = self.replica.node_id();
        let mut readdressed = Vec::new();
        let mut restart_needed = false;
        let members = config.members(&self.replicaset);
        self.adopt_names(&members)?;
        for (id, name, address, _) in &members {
            if *id == own {
                restart_needed = self.listening.is_some_and(|at| at != *address);
                continue;
            }
            if let Some(from) = self.transport.readdress(*id, *address) {
                tracing::info!(member = %name, %from, to = %address, "member readdressed");
                readdressed.push(json!({"member": name, "from": from.to_string(),
                                        "to": address.to_string()}));
            }
        }
        let mut membership = Vec::new();
        if self.replica.leader_term().is_some() {
            let addresses = members
                .iter()
                .map(|(id, _, address, _)| (*id, address.to_string()))
                .collect();
            membership = self
                .replica
                .set_member_addresses(addresses)
                .await
                .map_err(|e| self.propose_error(e))?;
        }
        Ok(json!({
            "instance": self.shared.instance,
            "readdressed": readdressed,
            "membership_readdressed": membership,
            "restart_needed": restart_needed,
        }))
    }

    fn member_name(&self, node_id: u64) -> String {
        if let Some(name) = self.names.lock().unwrap().get(&node_id) {
            return name.clone();
        }
        // A member added to the file after this one started: read the file again, at most
        // every LATER_NAMES_READ_MS.
        let mut later = self.later_names.lock().unwrap();
        let stale = later.0.is_none_or(|read| {
            read.elapsed() >= Duration::from_millis(LATER_NAMES_READ_MS)
                && !later.1.contains_key(&node_id)
        });
        if stale {
            later.0 = Some(std::time::Instant::now());
            if let Ok(config) = ClusterConfig::load(&self.config_path) {
                later.1 = config
                    .members(&self.replicaset)
                    .into_iter()
                    .map(|(id, name, ..)| (id, name))
                    .collect();
            }
        }
        later
            .1
            .get(&node_id)
            .cloned()
            .unwrap_or_else(|| format!("node {node_id}"))
    }

    /// Whether the Raft membership this member knows makes it a voter (`None` while it knows
    /// none, or one without it).
    pub fn is_voter(&self) -> Option<bool> {
        let status = self.replica.status();
        status
            .members
            .iter()
            .find(|(id, _)| *id == status.node_id)
            .map(|(_, voter)| *voter)
    }

    /// Wakes when this member's role may have changed ([`Self::is_voter`] to see).
    pub fn role_changes(&self) -> billcl_replication::RoleChanges {
        self.replica.role_changes()
    }

    /// `NotLeader`, naming the leader this member knows of now, or why it serves nothing at
    /// all ([`StorageNode::halted`]).
    pub(crate) fn not_leader_now(&self) -> ErrorReply {
        match self.halted() {
            Err(halted) => halted,
            Ok(()) => self.not_leader(self.replica.status().leader),
        }
    }

    fn not_leader(&self, leader: Option<u64>) -> ErrorReply {
        let hint = match leader {
            Some(id) => format!("; the leader is {}", self.member_name(id)),
            None => "; no leader is known (an election may be under way), retry".to_string(),
        };
        error(
            ErrorCode::NotLeader,
            format!(
                "{} is not the leader of {}{hint}",
                self.shared.instance, self.shared.replicaset
            ),
        )
    }

    /// Propose an administrative `command` to the replicaset's log and decode what applying
    /// it answered. It goes through the executor's queue, in order with the command calls,
    /// and only once their entries in flight are applied (no call runs while it is in flight).
    pub(crate) async fn propose(&self, command: Command) -> Result<Response, ErrorReply> {
        self.batcher
            .enqueue(crate::batch::Work::Admin(command))?
            .await
    }

    pub(crate) fn propose_error(&self, e: ProposeError) -> ErrorReply {
        match e {
            ProposeError::NotLeader { leader, .. } => self.not_leader(leader),
            ProposeError::Unavailable(message) => error(
                ErrorCode::Unavailable,
                format!("{}: {message}", self.shared.replicaset),
            ),
            ProposeError::Uncertain(message) => error(
                ErrorCode::Timeout,
                format!("{}: {message}", self.shared.replicaset),
            ),
            ProposeError::Fatal(message) => match self.halted() {
                Err(halted) => halted,
                Ok(()) => error(ErrorCode::Internal, message),
            },
        }
    }

    /// `Unavailable`, saying why, once this member has stopped applying the log
    /// ([`billcl_replication::Replica::halted`]): its state is frozen where it stopped, so it
    /// serves no read and takes no write until restarted (the router reads from another
    /// member).
    fn halted(&self) -> Result<(), ErrorReply> {
        match self.replica.halted() {
            None => Ok(()),
            Some(why) => Err(error(
                ErrorCode::Unavailable,
                format!("{} {why}", self.shared.instance),
            )),
        }
    }

    pub async fn handle(self: Arc<Self>, request: Request) -> Reply {
        let response = match request {
            Request::CallStream(calls) => return Reply::Answers(self.call_stream(calls)),
            Request::Raft(bytes) => Response::Raft(self.replica.handle(bytes).await),
            // May compile module versions not used since start-up.
            Request::Procedures => {
                Response::Procedures(crate::deploy::off_the_async_workers(|| {
                    self.shared.catalog()
                }))
            }
            Request::Deploy { name, bytes } => {
                match crate::deploy::storage_deploy(&self, name, bytes).await {
                    Ok(json) => Response::Admin(json.to_string()),
                    Err(reply) => Response::Error(reply),
                }
            }
            Request::Call(call) => match self.call(call).await {
                Ok(response) => response,
                Err(reply) => Response::Error(reply),
            },
            Request::CallBatch(calls) => Response::Batch(self.call_batch(calls).await),
            Request::Admin { verb, body } => match self.admin(&verb, &body).await {
                Ok(json) => Response::Admin(json.to_string()),
                Err(reply) => Response::Error(reply),
            },
        };
        response.into()
    }

    /// A router's streamed batch (docs/protocol.md, "CallStream"): each call's answer, what
    /// the call alone would have got, as soon as it is ready. Every command is queued before
    /// this returns, so they meet in the leader's group commit. The queries share one read
    /// barrier, taken after the whole batch arrived (so it is linearizable for each of them,
    /// as its own would be), and run one after the other, on the async worker while they are
    /// short (`billcl_replication::briefly_inline`); their answers do not wait for the
    /// commands'.
    fn call_stream(self: &Arc<Self>, calls: Vec<Call>) -> BoxStream<'static, (u32, Response)> {
        let mut ready = Vec::new();
        let mut queries = Vec::new();
        let commands = FuturesUnordered::new();
        for (call, index) in calls.into_iter().zip(0u32..) {
            match self.shared.resolve(&call) {
                Err(reply) => ready.push((index, Response::Error(reply))),
                Ok((module, info)) if info.kind == ProcedureKind::Query => {
                    queries.push((index, module, info, call));
                }
                Ok((module, info)) => match self.command(module, info, call) {
                    Slot::Answered(answer) => ready.push((index, answer)),
                    Slot::Command(answer) => commands.push(
                        answer.map(move |answer| (index, answer.unwrap_or_else(Response::Error))),
                    ),
                },
            }
        }
        let node = (!queries.is_empty()).then(|| self.clone());
        let queries = async move {
            match node {
                Some(node) => node.run_queries(queries).await,
                None => Vec::new(),
            }
        };
        let queries = stream::once(queries).flat_map(stream::iter);
        stream::iter(ready)
            .chain(stream::select(commands, queries))
            .boxed()
    }

    /// The queries of one batch, behind one read barrier if any reads from the leader.
    async fn run_queries(
        &self,
        queries: Vec<(u32, Module, Arc<ProcedureInfo>, Call)>,
    ) -> Vec<(u32, Response)> {
        if let Err(halted) = self.halted() {
            return queries
                .iter()
                .map(|(index, ..)| (*index, Response::Error(halted.clone())))
                .collect();
        }
        let leader_reads = queries
            .iter()
            .any(|(_, _, _, call)| call.mode == ReadMode::Leader);
        let barrier = if leader_reads {
            self.replica
                .read_barrier()
                .await
                .map(|_term| ())
                .map_err(|e| self.propose_error(e))
        } else {
            Ok(())
        };
        let now_ms = now_ms();
        let shared = &self.shared;
        let mut answers = Vec::with_capacity(queries.len());
        billcl_replication::briefly_inline(&mut queries.iter(), |(index, module, info, call)| {
            let answer = match &barrier {
                Err(reply) if call.mode == ReadMode::Leader => Response::Error(reply.clone()),
                _ => shared.run(module, info, call, now_ms, shared),
            };
            answers.push((*index, answer));
            ControlFlow::Continue(())
        });
        answers
    }

    /// A router's batch (`CallBatch`): the streamed batch's answers, in the calls' order.
    async fn call_batch(self: &Arc<Self>, calls: Vec<Call>) -> Vec<Response> {
        let mut answers: Vec<Option<Response>> = vec![None; calls.len()];
        let mut stream = self.call_stream(calls);
        while let Some((index, answer)) = stream.next().await {
            answers[index as usize] = Some(answer);
        }
        answers
            .into_iter()
            .map(|answer| answer.expect("a batch answers each of its calls"))
            .collect()
    }

    async fn call(&self, call: Call) -> Result<Response, ErrorReply> {
        // A halted member's state is frozen (or empty, when it lost its data): nothing is
        // resolved against it, so a caller learns why it serves nothing, not of a procedure
        // missing from that state.
        self.halted()?;
        let (module, info) = self.shared.resolve(&call)?;
        match info.kind {
            ProcedureKind::Query => {
                if call.mode == ReadMode::Leader {
                    self.replica
                        .read_barrier()
                        .await
                        .map_err(|e| self.propose_error(e))?;
                }
                Ok(self
                    .shared
                    .run(&module, &info, &call, now_ms(), &self.shared))
            }
            ProcedureKind::Command => match self.command(module, info, call) {
                Slot::Answered(answer) => Ok(answer),
                Slot::Command(answer) => answer.await,
            },
        }
    }

    /// The moment `call`, read now, is no longer worth starting: its caller stops waiting
    /// then (`timeout_ms`, at most `request_timeout_ms`). A command not in the log by then
    /// never goes there (docs/protocol.md, §4.1).
    fn deadline(&self, call: &Call) -> tokio::time::Instant {
        tokio::time::Instant::now() + call.budget(self.call_timeout)
    }

    /// Queues a command call for the leader's executor (which answers a retry of a call
    /// already applied with its first answer, without a new log entry).
    fn command(&self, module: Module, info: Arc<ProcedureInfo>, call: Call) -> Slot {
        let deadline = self.deadline(&call);
        let work = crate::batch::Work::Call {
            module,
            info,
            call,
            deadline,
        };
        match self.batcher.enqueue(work) {
            Ok(answer) => Slot::Command(answer),
            Err(reply) => Slot::Answered(Response::Error(reply)),
        }
    }

    async fn admin(&self, verb: &str, body: &str) -> Result<serde_json::Value, ErrorReply> {
        if let Some(answer) = crate::verify::storage_admin(self, verb, body).await {
            return answer;
        }
        if let Some(answer) = crate::deploy::storage_admin(self, verb, body).await {
            return answer;
        }
        if let Some(answer) = crate::failover::storage_admin(self, verb, body).await {
            return answer;
        }
        if let Some(answer) = crate::rebalance::storage_admin(self, verb, body).await {
            return answer;
        }
        match verb {
            "ping" => Ok(json!({"instance": self.shared.instance})),
            "depletions" => crate::depletion::storage_depletions(self, body).await,
            "snapshot-read" => crate::backup::storage_snapshot_read(self, body).await,
            "status" => Ok(self.status_json()),
            "reload" => self.reload().await,
            "stats" => {
                let status = self.replica.status();
                let mut stats = crate::stats::server_json(&self.stats.snapshot());
                stats["raft"] = json!({
                    "role": status.role,
                    "term": status.term,
                    "last_log_index": status.last_log_index,
                    "last_applied": status.last_applied,
                    "snapshot_index": status.snapshot_index,
                });
                stats["log"] = json!(status.log);
                let state = self.shared.state.read().unwrap();
                stats["accounts"] = json!(state.account_count());
                stats["buckets"] = json!(state.bucket_counts());
                Ok(stats)
            }
            "buckets" => {
                // Frozen where it halted (empty, if it lost its data): a router asks another
                // member, rather than take this listing for the replicaset's.
                self.halted()?;
                let state = self.shared.state.read().unwrap();
                let buckets: Vec<serde_json::Value> = state
                    .buckets
                    .iter()
                    .map(|(id, data)| match &data.state {
                        BucketState::Sending { to } => json!([id, data.state.name(), to]),
                        state => json!([id, state.name()]),
                    })
                    .collect();
                Ok(json!({
                    "replicaset": self.shared.replicaset,
                    "buckets": buckets,
                }))
            }
            "assign-buckets" => {
                let request = parse_body(body)?;
                let bucket_ids: Vec<u32> = request["bucket_ids"]
                    .as_array()
                    .map(|ids| {
                        ids.iter()
                            .filter_map(|id| id.as_u64())
                            .map(|id| id as u32)
                            .collect()
                    })
                    .unwrap_or_default();
                let command = Command::AssignBuckets { bucket_ids };
                match self.propose(command).await? {
                    Response::Value(Value::Uint(added)) => Ok(json!({ "added": added })),
                    Response::Error(reply) => Err(reply),
                    other => Err(error(ErrorCode::Internal, format!("unexpected {other:?}"))),
                }
            }
            _ => Err(error(
                ErrorCode::BadRequest,
                format!("unknown admin verb `{verb}` for a storage"),
            )),
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        let status = self.replica.status();
        let state = self.shared.state.read().unwrap();
        let modules: BTreeMap<&String, &u32> = state.active.iter().collect();
        let waiting: Vec<String> = status
            .waiting_to_found
            .iter()
            .map(|id| self.member_name(*id))
            .collect();
        json!({
            "instance": self.shared.instance,
            "replicaset": self.shared.replicaset,
            "raft": status,
            "leader": status.leader.map(|id| self.member_name(id)),
            "founding_waits_for": waiting,
            "buckets": state.bucket_counts(),
            "accounts": state.account_count(),
            "modules": modules,
        })
    }
}

#[cfg(test)]
mod tests {
    use billcl_replication::Machine;

    use super::*;
    use crate::state::AccountRow;
    use billcl_proto::bucket::Key;

    fn machine() -> StorageMachine {
        let mut state = State::new(1000);
        state
            .assign_buckets(&(1..=1000).collect::<Vec<_>>())
            .unwrap();
        let shared = Arc::new(Shared {
            instance: "storage-a-1".to_string(),
            replicaset: "storage-a".to_string(),
            state: RwLock::new(state),
            runtime: Runtime::new(billcl_runtime::Limits::default()).unwrap(),
            modules: Mutex::new(HashMap::new()),
            procedure_log: Mutex::new(crate::deploy::ProcedureLog::new(16)),
            digests: crate::verify::Digests::default(),
        });
        StorageMachine { shared }
    }

    fn row(balance_micros: i64) -> AccountRow {
        AccountRow {
            balance_micros,
            velocity_micros: 0,
            since_ms: 10,
            remainder: 0,
        }
    }

    fn ran(id: u64, balance_micros: i64, key: Option<u128>, answer: &Response) -> Effect {
        Effect {
            bucket_id: Some(billcl_proto::bucket::bucket_id(&Key::Uint(id), 1000)),
            idempotency_key: key,
            timestamp_ms: 20,
            call: None,
            outcome: Outcome::Ran {
                answer: encode_response(answer),
                writes: Writes {
                    accounts: vec![(id, row(balance_micros))],
                    kv: Vec::new(),
                },
                logs: vec![LogRow {
                    module: "billing".to_string(),
                    procedure: "add-money".to_string(),
                    level: 1,
                    message: format!("account {id}"),
                }],
            },
        }
    }

    fn apply(machine: &mut StorageMachine, term: u64, entry: Command) -> Vec<Response> {
        let bytes = machine.apply(term, 7, &entry.encode()).unwrap();
        bincode::deserialize::<Vec<Vec<u8>>>(&bytes)
            .unwrap()
            .iter()
            .map(|answer| decode_response(answer))
            .collect()
    }

    fn log_lines(machine: &StorageMachine) -> usize {
        let log = machine.shared.procedure_log.lock().unwrap();
        log.read(0, None, 10).0.len()
    }

    fn balance(machine: &StorageMachine, id: u64) -> Option<i64> {
        let state = machine.shared.state.read().unwrap();
        state.account(id).map(|account| account.balance.micros())
    }

    fn apply_one(machine: &mut StorageMachine, entry: Command) -> Response {
        decode_response(&machine.apply(1, 9, &entry.encode()).unwrap())
    }

    fn legacy_call(procedure: &str, args: Vec<Value>, key: u128) -> Command {
        let id = match args[0] {
            Value::Uint(id) => id,
            _ => unreachable!("the tests key calls by account id"),
        };
        let bucket_id = Some(billcl_proto::bucket::bucket_id(&Key::Uint(id), 1000));
        let call = Call {
            procedure: procedure.to_string(),
            version: None,
            args,
            mode: ReadMode::Leader,
            caller: "test".to_string(),
            bucket_id,
            idempotency_key: Some(key),
            timeout_ms: None,
        };
        let mut bytes = Vec::new();
        Request::Call(call).to_frame(0).encode(&mut bytes);
        Command::Call {
            module: billcl_runtime::BILLING_MODULE_NAME.to_string(),
            version: 1,
            procedure: procedure.to_string(),
            call: bytes,
            bucket_id,
            timestamp_ms: 10,
        }
    }

    /// The answers of the built-in commands (add_money, update_velocity: a bool, 16 bytes as
    /// a frame) are remembered in the window's table itself, not in an allocation per key; a
    /// number (23 bytes) is not.
    #[test]
    fn the_built_in_answers_are_remembered_inline() {
        for value in [Value::Bool(true), Value::Bool(false)] {
            let answer = encode_response(&Response::Value(value.clone()));
            assert!(
                answer.len() <= crate::state::INLINE_ANSWER_BYTES,
                "{value:?}: {} bytes",
                answer.len()
            );
        }
        let number = encode_response(&Response::Value(Value::Uint(7)));
        assert_eq!(number.len(), crate::state::INLINE_ANSWER_BYTES + 1);
    }

    #[test]
    fn a_log_written_before_the_effects_log_replays_the_same_way() {
        // The variants keep their places in the log's format (bincode's u32 tag).
        assert_eq!(Command::Digest.encode(), 3u32.to_le_bytes());
        assert_eq!(Command::Batch(Vec::new()).encode()[..4], 6u32.to_le_bytes());
        let mut machine = machine();
        let deploy = Command::Deploy {
            name: billcl_runtime::BILLING_MODULE_NAME.to_string(),
            bytes: billcl_runtime::BILLING_COMPONENT.to_vec(),
        };
        assert!(matches!(
            apply_one(&mut machine, deploy),
            Response::Value(_)
        ));
        let micros = |m: i64| Value::Decimal(billcl_money::Decimal::from_micros(m));
        let create = legacy_call(
            "create-account",
            vec![Value::Uint(4), micros(5_000_000), micros(0)],
            41,
        );
        // An old entry is run when applied, and its key remembered: a copy answers the same.
        let first = apply_one(&mut machine, create.clone());
        assert!(matches!(first, Response::Value(_)), "{first:?}");
        assert_eq!(balance(&machine, 4), Some(5_000_000));
        assert_eq!(apply_one(&mut machine, create), first);
        let batch = Command::Batch(vec![
            legacy_call("add-money", vec![Value::Uint(4), micros(1_000_000)], 42),
            legacy_call("add-money", vec![Value::Uint(4), micros(1_000_000)], 42),
        ]);
        let answers = apply(&mut machine, 1, batch);
        assert_eq!(answers.len(), 2);
        assert_eq!(answers[0], answers[1]);
        assert_eq!(balance(&machine, 4), Some(6_000_000));
    }

    #[test]
    fn effects_apply_only_in_the_term_they_ran_in() {
        let mut machine = machine();
        let entry = Command::Effects {
            term: 3,
            effects: vec![ran(4, 5, None, &Response::Value(Value::Bool(true)))],
        };
        // Appended in a later term than the one the leader ran it in: refused, nothing lands.
        let answers = apply(&mut machine, 4, entry.clone());
        assert!(
            matches!(&answers[..], [Response::Error(reply)] if reply.code == ErrorCode::NotLeader),
            "{answers:?}"
        );
        assert_eq!(balance(&machine, 4), None);
        assert_eq!(log_lines(&machine), 0);
        // In its own term: the row lands and the log line is kept.
        let answers = apply(&mut machine, 3, entry);
        assert_eq!(answers, vec![Response::Value(Value::Bool(true))]);
        assert_eq!(balance(&machine, 4), Some(5));
        assert_eq!(log_lines(&machine), 1);
    }

    #[test]
    fn effects_written_before_they_named_their_calls_apply_as_before() {
        let mut machine = machine();
        let effect = ran(4, 5, Some(9), &Response::Value(Value::Bool(true)));
        let bucket_id = effect.bucket_id;
        let older = Command::EffectsBeforeCalls {
            term: 1,
            effects: vec![effect.into()],
        };
        // Its place in the format is the one `Effects` had.
        assert_eq!(older.encode()[..4], 7u32.to_le_bytes());
        let answers = apply(&mut machine, 1, older);
        assert_eq!(answers, vec![Response::Value(Value::Bool(true))]);
        assert_eq!(balance(&machine, 4), Some(5));
        assert_eq!(log_lines(&machine), 1);
        let bucket = bucket_id.unwrap();
        assert!(machine.shared.recent_answer(bucket, 9).is_some());
    }

    #[test]
    fn a_keyed_call_takes_effect_once_whatever_copies_follow_it() {
        let mut machine = machine();
        let first = Response::Value(Value::Uint(1));
        let entry = Command::Effects {
            term: 1,
            effects: vec![
                ran(4, 5, Some(77), &first),
                // A retry made while the first was in flight.
                Effect {
                    bucket_id: Some(billcl_proto::bucket::bucket_id(&Key::Uint(4), 1000)),
                    idempotency_key: Some(77),
                    timestamp_ms: 21,
                    call: None,
                    outcome: Outcome::Repeat,
                },
                // A copy that ran as well (defensive: the leader never makes one): its
                // writes must not land.
                ran(4, 9, Some(77), &Response::Value(Value::Uint(2))),
            ],
        };
        let answers = apply(&mut machine, 1, entry);
        assert_eq!(answers, vec![first.clone(), first.clone(), first]);
        assert_eq!(balance(&machine, 4), Some(5));
        // A repeat whose first call is not remembered cannot be answered: it says so.
        let orphan = Command::Effects {
            term: 1,
            effects: vec![Effect {
                bucket_id: Some(1),
                idempotency_key: Some(78),
                timestamp_ms: 22,
                call: None,
                outcome: Outcome::Repeat,
            }],
        };
        let answers = apply(&mut machine, 1, orphan);
        assert!(
            matches!(&answers[..], [Response::Error(reply)] if reply.message.contains("not remembered")),
            "{answers:?}"
        );
    }

    /// A snapshot is captured on the apply path and serialized later, off it: what it holds
    /// is the state at the capture, whatever is applied in between, and it restores to that.
    #[test]
    fn a_snapshot_holds_the_state_it_captured_while_later_writes_land() {
        let mut machine = machine();
        let effects = |id, balance_micros| Command::Effects {
            term: 1,
            effects: vec![ran(
                id,
                balance_micros,
                None,
                &Response::Value(Value::Bool(true)),
            )],
        };
        apply(&mut machine, 1, effects(4, 5));
        let captured = machine.shared.state.read().unwrap().encode_snapshot();
        let job = billcl_replication::Machine::snapshot(&mut machine);
        // The same bucket written again, and a row added in another one, before serializing.
        apply(&mut machine, 1, effects(4, 6));
        let other = (5..)
            .find(|id| {
                billcl_proto::bucket::bucket_id(&Key::Uint(*id), 1000)
                    != billcl_proto::bucket::bucket_id(&Key::Uint(4), 1000)
            })
            .unwrap();
        apply(&mut machine, 1, effects(other, 7));
        let mut bytes = Vec::new();
        job(&mut bytes).unwrap();
        assert_eq!(bytes, captured);
        assert_eq!(balance(&machine, 4), Some(6));
        billcl_replication::Machine::restore(&mut machine, &bytes).unwrap();
        assert_eq!(balance(&machine, 4), Some(5));
        assert_eq!(balance(&machine, other), None);
    }

    #[test]
    fn an_entry_this_build_cannot_read_halts_the_member_instead_of_being_skipped() {
        let mut machine = machine();
        let mut newer = Command::KINDS.to_le_bytes().to_vec();
        newer.extend_from_slice(&[1; 32]);
        let refused = machine.apply(1, 12, &newer).unwrap_err();
        assert!(
            refused.0.contains("a newer billcl wrote")
                && refused.0.contains("upgrade this member's billcl binary"),
            "{refused}"
        );
        let refused = machine.apply(1, 13, &[2, 0, 0, 0, 0xff]).unwrap_err();
        assert!(refused.0.contains("the log is damaged"), "{refused}");
        // Nothing changed: the member stops there (billcl_replication halts it).
        assert_eq!(machine.shared.state.read().unwrap().account_count(), 0);
    }

    #[test]
    fn a_damaged_member_is_told_what_to_do_by_its_role() {
        let dir = std::path::Path::new("/d/storage-a-002/raft");
        let replica = damaged_member_advice(dir, false, None);
        assert!(
            replica.contains("move /d/storage-a-002/raft aside and start it again"),
            "{replica}"
        );
        let promote = "`billcl failover storage-a --to storage-a-002 --force`";
        let voter = damaged_member_advice(dir, true, Some(promote));
        assert!(
            voter.contains("restore /d/storage-a-002/raft from a backup")
                && voter.contains(promote),
            "{voter}"
        );
        assert!(!damaged_member_advice(dir, true, None).contains("promote"));
    }

    #[test]
    fn writes_to_a_bucket_not_writable_here_do_not_land() {
        let mut machine = machine();
        {
            let mut state = State::new(1000);
            state.assign_buckets(&[1]).unwrap();
            *machine.shared.state.write().unwrap() = state;
        }
        let id = (1..).find(|id| billcl_proto::bucket::bucket_id(&Key::Uint(*id), 1000) != 1);
        let id = id.unwrap();
        let entry = Command::Effects {
            term: 1,
            effects: vec![ran(id, 5, Some(3), &Response::Value(Value::Bool(true)))],
        };
        let answers = apply(&mut machine, 1, entry);
        assert!(
            matches!(&answers[..], [Response::Error(reply)] if reply.code == ErrorCode::WrongBucket),
            "{answers:?}"
        );
        assert_eq!(balance(&machine, id), None);
    }
}
