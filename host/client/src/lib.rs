//! The billcl client SDK: calls procedures by name through a router over QUIC.
//!
//! A [`Client`] holds one lazily (re)connecting connection per router and fails over to the
//! next router when one cannot be reached. The same pieces serve the nodes: [`Peer`] for
//! router→storage and storage→storage links, [`server_endpoint`] and [`serve`] for the
//! accepting side. No wasmtime, no replication: only the wire protocol and QUIC.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), billcl_client::Error> {
//! use billcl_client::{Client, ClientConfig, Decimal};
//!
//! let ca_pem = std::fs::read_to_string("data/tls/ca.pem").expect("the cluster CA");
//! let config = ClientConfig::new(vec!["127.0.0.1:3301".parse().unwrap()], ca_pem);
//! let client = Client::connect(config).await?;
//! client.add_money(4, Decimal::parse("10.5").unwrap()).await?;
//! let account = client.account(4).await?;
//! println!("account {} holds {}", account.id, account.balance);
//! # Ok(())
//! # }
//! ```
//!
//! # Retries
//!
//! Every call carries an idempotency key, fresh per logical call unless the caller gives one
//! ([`CallOptions::idempotency_key`]). A call that fails with a retryable error (timeout,
//! unavailable, not leader, connection lost: [`Error::is_retryable`]) is sent again with the
//! **same** key until it succeeds, fails for good, or its timeout has passed. The replicaset
//! that owns the key's bucket remembers the first answer of each recent key and returns it to a
//! retry instead of applying the command again, so a retried top-up moves money once
//! (docs/protocol.md, "Idempotency", gives the window).
//!
//! # Batching
//!
//! Calls made while earlier ones to the same router are in flight travel together on one
//! stream, and each is answered as soon as it is done ([`Answers::AsReady`], the default): a
//! call to a replicaset that is down does not hold back the calls to the others.
//! [`ClientConfig::answers`] = [`Answers::Together`] has a batch answered in one frame when its
//! last call is done, which costs the cluster a little less per call when a client saturates
//! it.

#![warn(missing_docs)]

mod batch;
mod depletions;
mod peer;
mod server;
mod tls;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use billcl_proto::{Call, Request, Response};

pub use batch::{Answers, CallBatcher, BATCH_PLACE_HELD_MS, QUEUED_CALLS_MAX};
pub use billcl_proto::{
    find_procedure, split_pinned, Decimal, ErrorCode, LookupError, ProcedureInfo, ProcedureKind,
    ReadMode, Type, Value,
};
pub use depletions::{Depletion, DepletionCursor, Depletions};
pub use peer::{Peer, CONNECT_TIMEOUT_MS, REDIAL_LONG_EVERY, REDIAL_PROBE_MS};
pub use server::{
    serve, serve_counted, Reply, ServerStats, StatsSnapshot, ANSWER_LATENCY_BOUNDS_US,
    CONNECTIONS_MAX,
};
pub use tls::{
    client_config, client_endpoint, server_config, server_endpoint, server_endpoint_with,
    transport_config, transport_config_with, ClientAuth, TlsIdentity, IDLE_TIMEOUT_MS,
    IN_FLIGHT_MAX, KEEP_ALIVE_INTERVAL_MS,
};

/// The name every node's certificate is issued for.
pub const SERVER_NAME_DEFAULT: &str = "billcl";
/// How long a request may take unless configured otherwise.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Sends of one logical call at most (the first and its retries).
pub const CALL_ATTEMPTS_MAX: u32 = 8;
/// The pause before the first retry; it doubles per retry up to [`RETRY_PAUSE_MS_MAX`].
pub const RETRY_PAUSE_MS_MIN: u64 = 10;
/// The longest pause between two sends of a call.
pub const RETRY_PAUSE_MS_MAX: u64 = 500;
/// Calls a client sends to a router in one `CallStream` or `CallBatch` at most (routers refuse
/// larger client batches). Small enough that a `Batch` of answers fits one frame at the
/// default `result_bytes_max` (32 × 1 MiB < `FRAME_BYTES_MAX`); large enough that a few
/// batches in flight carry a connection's usual concurrency.
pub const CLIENT_CALL_BATCH_MAX: usize = 32;
/// Batches holding a place in flight to one router at once; calls made meanwhile wait for
/// the next batch. A batch gives its place back at its first answer ([`Answers::AsReady`]),
/// when it is answered, or after [`BATCH_PLACE_HELD_MS`].
pub const CLIENT_BATCHES_IN_FLIGHT_MAX: usize = 2;

/// Everything that can go wrong with a request. Match on [`Error::kind`] to act on it; the
/// variants say where the failure happened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made; nothing was sent.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// The address dialled.
        address: SocketAddr,
        /// Why the dial failed.
        reason: String,
    },
    /// No answer in time; the request may or may not have taken effect.
    #[error("request to {address} timed out after {after_ms} ms")]
    Timeout {
        /// The router the request went to.
        address: SocketAddr,
        /// How long the call waited in all.
        after_ms: u64,
    },
    /// The connection or stream failed mid-request.
    #[error("transport error: {0}")]
    Transport(String),
    /// The peer sent bytes that are not a valid response.
    #[error("protocol error: {0}")]
    Protocol(#[from] billcl_proto::Error),
    /// The server answered with an error.
    #[error("{message} ({code})")]
    Server {
        /// What kind of failure (see docs/protocol.md, "Error").
        code: ErrorCode,
        /// Names what was wrong and what to do; for [`ErrorCode::ProcedureFailed`], the
        /// procedure's own message (e.g. `account 42 not found`).
        message: String,
    },
    /// The TLS material (CA, certificate, key) is unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The client configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The answer decoded but is not what the call returns (e.g. a typed helper called a
    /// procedure whose result has another shape).
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// What a caller can do about an [`Error`]: the classification of [`Error::kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The thing asked for does not exist (an unknown account, procedure or version). Do not
    /// retry; create it or fix the name.
    NotFound,
    /// An argument is wrong (count, type, range, value). Do not retry; fix the call.
    InvalidArgument,
    /// The procedure ran and returned an error, trapped or ran out of fuel; the message is the
    /// procedure's own. Deterministic: retrying gives the same answer.
    ProcedureFailed,
    /// No answer in time. A command may or may not have taken effect; retrying with the same
    /// idempotency key is safe (the SDK does so within the call's timeout).
    Timeout,
    /// No router, or no member that could serve, is reachable right now. Retryable.
    Unavailable,
    /// The cluster is busy or changing (not leader, bucket moving, too busy). Retryable.
    Retryable,
    /// The cluster has no buckets distributed yet: run `billcl bootstrap`.
    NotBootstrapped,
    /// The request or the answer was malformed, the TLS setup or configuration is wrong, or
    /// the server failed internally. Not retryable; report it.
    Fatal,
}

impl ErrorKind {
    /// A short lowercase name (`not-found`, `timeout`, …), e.g. for counting errors.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::ProcedureFailed => "procedure-failed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Retryable => "retryable",
            ErrorKind::NotBootstrapped => "not-bootstrapped",
            ErrorKind::Fatal => "fatal",
        }
    }
}

impl Error {
    /// Whether the same request may succeed if sent again (to this or another router).
    /// A retried command must carry the same idempotency key (the SDK's retries do).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Transport(_) => true,
            Error::Server { code, .. } => code.is_retryable(),
            Error::Protocol(_) | Error::Tls(_) | Error::Config(_) | Error::Unexpected(_) => false,
        }
    }

    /// What the caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Connect { .. } | Error::Transport(_) => ErrorKind::Unavailable,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Protocol(_) | Error::Tls(_) | Error::Config(_) | Error::Unexpected(_) => {
                ErrorKind::Fatal
            }
            Error::Server { code, message } => match code {
                ErrorCode::NotFound | ErrorCode::UnknownProcedure => ErrorKind::NotFound,
                // The billing procedures answer a missing account with `account N not found`.
                ErrorCode::ProcedureFailed if message.ends_with(" not found") => {
                    ErrorKind::NotFound
                }
                ErrorCode::ProcedureFailed => ErrorKind::ProcedureFailed,
                ErrorCode::InvalidArgument => ErrorKind::InvalidArgument,
                ErrorCode::Timeout => ErrorKind::Timeout,
                ErrorCode::Unavailable => ErrorKind::Unavailable,
                ErrorCode::WrongBucket | ErrorCode::NotLeader | ErrorCode::TooBusy => {
                    ErrorKind::Retryable
                }
                ErrorCode::NotBootstrapped => ErrorKind::NotBootstrapped,
                ErrorCode::BadRequest | ErrorCode::Internal => ErrorKind::Fatal,
            },
        }
    }

    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The procedure's own error message, if the procedure ran and failed
    /// ([`ErrorCode::ProcedureFailed`]).
    pub fn procedure_message(&self) -> Option<&str> {
        match self {
            Error::Server {
                code: ErrorCode::ProcedureFailed,
                message,
            } => Some(message),
            _ => None,
        }
    }

    /// The code a node relaying this failure should answer with.
    pub fn reply_code(&self) -> ErrorCode {
        match self {
            Error::Server { code, .. } => *code,
            Error::Connect { .. } | Error::Transport(_) => ErrorCode::Unavailable,
            Error::Timeout { .. } => ErrorCode::Timeout,
            Error::Protocol(_) | Error::Tls(_) | Error::Config(_) | Error::Unexpected(_) => {
                ErrorCode::Internal
            }
        }
    }
}

/// Where and how a [`Client`] connects.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Routers to try, in order.
    pub routers: Vec<SocketAddr>,
    /// The cluster CA (PEM): the only certificate authority trusted.
    pub ca_pem: String,
    /// The name router certificates are issued for.
    pub server_name: String,
    /// A client certificate, if the routers require mTLS.
    pub identity: Option<TlsIdentity>,
    /// How long one request may take.
    pub timeout: Duration,
    /// Who is calling, as procedures see it.
    pub caller: String,
    /// How the answers to the calls the SDK batches come back: each as soon as it is done
    /// (the default), or a batch's together (fewer packets for a client that saturates the
    /// cluster; a call then waits for the slowest call it travelled with).
    pub answers: Answers,
}

impl ClientConfig {
    /// Server name `billcl`, timeout 10 s, caller `client`, no client certificate.
    pub fn new(routers: Vec<SocketAddr>, ca_pem: String) -> Self {
        ClientConfig {
            routers,
            ca_pem,
            server_name: SERVER_NAME_DEFAULT.to_string(),
            identity: None,
            timeout: Duration::from_millis(REQUEST_TIMEOUT_MS_DEFAULT),
            caller: "client".to_string(),
            answers: Answers::AsReady,
        }
    }
}

/// Per-call options.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Which replicaset member serves a read-only call.
    pub mode: ReadMode,
    /// Pin the call to a module version.
    pub version: Option<u32>,
    /// Overrides the client's timeout.
    pub timeout: Option<Duration>,
    /// Makes a retried command take effect once. `None`: the SDK makes a fresh key for the
    /// call (one per logical call, kept across its retries). Give your own to make a call
    /// you repeat yourself (e.g. after a restart of your program) take effect once.
    pub idempotency_key: Option<u128>,
    /// Do not send the call again after a retryable error; return the error at once.
    pub no_retry: bool,
}

/// An account as `get` shows it: the balance now (drained by the velocity) and the velocity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountBalance {
    /// The account id.
    pub id: u64,
    /// The balance at the moment the call ran.
    pub balance: Decimal,
    /// Units drained per second.
    pub velocity: Decimal,
}

/// A connection to the cluster through its routers. Cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    routers: Vec<Peer>,
    /// Calls to `routers[i]` go through `batchers[i]`: coalesced into one `CallStream` per
    /// stream while earlier ones are in flight.
    batchers: Vec<CallBatcher>,
    /// Index of the router currently used.
    current: AtomicUsize,
    caller: String,
    timeout: Duration,
}

/// How long [`Client::deploy`] waits: the leader checks the module and every member compiles
/// it when it applies the deploy.
pub const DEPLOY_TIMEOUT: Duration = Duration::from_secs(90);

/// A fresh random idempotency key (process-random seed, time and a counter; no rand dep).
pub fn new_idempotency_key() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u64| {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u64(count);
        hasher.write_u64(salt);
        hasher.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

impl Client {
    /// Connects to the first reachable router of `config.routers`.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        let Some(first) = config.routers.first() else {
            return Err(Error::Config("no router addresses given".into()));
        };
        let bind = match first {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let endpoint = client_endpoint(&config.ca_pem, config.identity.as_ref(), bind)?;
        let routers: Vec<Peer> = config
            .routers
            .iter()
            .map(|address| {
                Peer::new(
                    endpoint.clone(),
                    *address,
                    config.server_name.clone(),
                    config.timeout,
                )
            })
            .collect();
        let mut last_error = None;
        for (index, router) in routers.iter().enumerate() {
            match router.connect().await {
                Ok(()) => {
                    let batchers = routers
                        .iter()
                        .map(|router| {
                            CallBatcher::start(
                                router.clone(),
                                CLIENT_CALL_BATCH_MAX,
                                CLIENT_BATCHES_IN_FLIGHT_MAX,
                                config.answers,
                            )
                        })
                        .collect();
                    return Ok(Client {
                        inner: Arc::new(ClientInner {
                            routers,
                            batchers,
                            current: AtomicUsize::new(index),
                            caller: config.caller,
                            timeout: config.timeout,
                        }),
                    });
                }
                Err(error) => {
                    tracing::debug!(%error, "router unreachable");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one router was tried"))
    }

    /// Sends `request` once to the current router, moving on to the next ones while routers
    /// cannot be reached (nothing was sent to those, so this is always safe). Calls travel in
    /// the router's batches.
    async fn request(&self, request: &Request, timeout: Duration) -> Result<Response, Error> {
        let routers = &self.inner.routers;
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..routers.len() {
            let index = (start + offset) % routers.len();
            let sent = match request {
                Request::Call(call) => {
                    let batcher = &self.inner.batchers[index];
                    batcher.request(call.clone(), timeout).await
                }
                other => routers[index].request_with_timeout(other, timeout).await,
            };
            match sent {
                Err(error @ Error::Connect { .. }) => {
                    tracing::debug!(%error, "router unreachable, trying the next");
                    last_error = Some(error);
                }
                result => {
                    if offset > 0 {
                        self.inner.current.store(index, Ordering::Relaxed);
                    }
                    return result;
                }
            }
        }
        Err(last_error.expect("a client has at least one router"))
    }

    /// Sends `request`, and again with the same bytes (so the same idempotency key) after a
    /// retryable failure, until `timeout` has passed since the first send.
    async fn request_retrying(
        &self,
        request: &Request,
        timeout: Duration,
        retry: bool,
    ) -> Result<Response, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut attempt = 0u32;
        // What the cluster last said: more useful to the caller than a later send timing out.
        let mut last_server_error: Option<(ErrorCode, String)> = None;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Leave time for a retry after an attempt that timed out.
            let attempt_timeout = if retry && attempt < CALL_ATTEMPTS_MAX {
                remaining.min((timeout / 2).max(Duration::from_millis(RETRY_PAUSE_MS_MAX)))
            } else {
                remaining
            };
            let failure = match self.request(request, attempt_timeout).await {
                Ok(Response::Error(reply)) if reply.code.is_retryable() => Error::Server {
                    code: reply.code,
                    message: reply.message,
                },
                Err(error) if error.is_retryable() => error,
                other => return other,
            };
            let pause = Duration::from_millis(
                (RETRY_PAUSE_MS_MIN << (attempt - 1).min(16)).min(RETRY_PAUSE_MS_MAX),
            );
            let out_of_time = tokio::time::Instant::now() + pause >= deadline;
            if !retry || attempt >= CALL_ATTEMPTS_MAX || out_of_time {
                let sends = match request {
                    _ if attempt == 1 => String::new(),
                    Request::Call(_) => {
                        format!(" (sent {attempt} times with the same idempotency key)")
                    }
                    _ => format!(" (sent {attempt} times)"),
                };
                return Err(match (failure, last_server_error) {
                    (Error::Server { code, message }, _) => Error::Server {
                        code,
                        message: format!("{message}{sends}"),
                    },
                    (_, Some((code, message))) => Error::Server {
                        code,
                        message: format!("{message}{sends}"),
                    },
                    (Error::Timeout { address, .. }, None) => Error::Timeout {
                        address,
                        after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    },
                    (other, None) => other,
                });
            }
            if let Error::Server { code, message } = &failure {
                last_server_error = Some((*code, message.clone()));
            }
            tracing::debug!(error = %failure, attempt, "retrying the same request");
            tokio::time::sleep(pause).await;
        }
    }

    /// Calls `procedure` with `args` (the first argument is the sharding key; a procedure with
    /// no parameters runs on every replicaset). Queries run on the leader.
    pub async fn call(&self, procedure: &str, args: Vec<Value>) -> Result<Value, Error> {
        self.call_with(procedure, args, CallOptions::default())
            .await
    }

    /// Calls `procedure` with options: read mode, version pin, timeout, idempotency key.
    pub async fn call_with(
        &self,
        procedure: &str,
        args: Vec<Value>,
        options: CallOptions,
    ) -> Result<Value, Error> {
        let request = Request::Call(Call {
            procedure: procedure.to_string(),
            version: options.version,
            args,
            mode: options.mode,
            caller: self.inner.caller.clone(),
            bucket_id: None,
            idempotency_key: Some(options.idempotency_key.unwrap_or_else(new_idempotency_key)),
            timeout_ms: None,
        });
        let timeout = options.timeout.unwrap_or(self.inner.timeout);
        match self
            .request_retrying(&request, timeout, !options.no_retry)
            .await?
        {
            Response::Value(value) => Ok(value),
            other => Err(unexpected(other)),
        }
    }

    /// The procedures the cluster can call, with signatures and versions: every deployed
    /// version, the active ones (`active`, what an unpinned call runs) first. [`find_procedure`]
    /// finds the signature a call — `add_money` or pinned, `add_money@1` — is checked against.
    pub async fn procedures(&self) -> Result<Vec<ProcedureInfo>, Error> {
        match self
            .request_retrying(&Request::Procedures, self.inner.timeout, true)
            .await?
        {
            Response::Procedures(procedures) => Ok(procedures),
            other => Err(unexpected(other)),
        }
    }

    /// An operator verb with a JSON body; returns the JSON answer.
    pub async fn admin(&self, verb: &str, body: &str) -> Result<String, Error> {
        let request = Request::Admin {
            verb: verb.to_string(),
            body: body.to_string(),
        };
        match self.request(&request, self.inner.timeout).await? {
            Response::Admin(json) => Ok(json),
            other => Err(unexpected(other)),
        }
    }

    /// Deploy a procedure module (a wasm component, or a core module carrying its
    /// component type) on every replicaset; `name` defaults to the package the module exports
    /// its interfaces from. Returns the router's JSON answer (module, version, procedures).
    /// Waits up to [`DEPLOY_TIMEOUT`]: every member compiles the module.
    pub async fn deploy(&self, name: Option<&str>, bytes: Vec<u8>) -> Result<String, Error> {
        let request = Request::Deploy {
            name: name.map(str::to_string),
            bytes,
        };
        match self.request(&request, DEPLOY_TIMEOUT).await? {
            Response::Admin(json) => Ok(json),
            other => Err(unexpected(other)),
        }
    }

    /// `get(id)`: the account as `[id, balance, velocity]`, read on the leader.
    pub async fn get(&self, id: u64) -> Result<Value, Error> {
        self.call("get", vec![Value::Uint(id)]).await
    }

    /// `get(id)` as a typed [`AccountBalance`], read where `mode` says.
    pub async fn account_with(&self, id: u64, mode: ReadMode) -> Result<AccountBalance, Error> {
        let options = CallOptions {
            mode,
            ..Default::default()
        };
        let value = self
            .call_with("get", vec![Value::Uint(id)], options)
            .await?;
        if let Value::Tuple(fields) = &value {
            if let [Value::Uint(id), Value::Decimal(balance), Value::Decimal(velocity)] =
                fields.as_slice()
            {
                return Ok(AccountBalance {
                    id: *id,
                    balance: *balance,
                    velocity: *velocity,
                });
            }
        }
        Err(Error::Unexpected(format!(
            "get({id}) returned {value}, not [id, balance, velocity]"
        )))
    }

    /// `get(id)` as a typed [`AccountBalance`], read on the leader (linearizable).
    pub async fn account(&self, id: u64) -> Result<AccountBalance, Error> {
        self.account_with(id, ReadMode::Leader).await
    }

    /// `add-money(id, amount)`: tops the account up by `amount` (> 0). Safe to retry: the SDK
    /// does, with the same idempotency key.
    pub async fn add_money(&self, id: u64, amount: Decimal) -> Result<Value, Error> {
        self.call("add-money", vec![Value::Uint(id), Value::Decimal(amount)])
            .await
    }

    /// `update-velocity(id, velocity)`: sets the spending velocity (units per second, >= 0).
    pub async fn update_velocity(&self, id: u64, velocity: Decimal) -> Result<Value, Error> {
        let args = vec![Value::Uint(id), Value::Decimal(velocity)];
        self.call("update-velocity", args).await
    }
}

/// An error reply becomes `Error::Server`; any other mismatched kind is a protocol error.
fn unexpected(response: Response) -> Error {
    match response {
        Response::Error(reply) => Error::Server {
            code: reply.code,
            message: reply.message,
        },
        other => Error::Protocol(billcl_proto::Error::UnknownKind(other.kind())),
    }
}
