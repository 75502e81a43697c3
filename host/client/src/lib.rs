//! The billcl client SDK: calls procedures by name through a router over QUIC.
//!
//! A [`Client`] holds one lazily (re)connecting connection per router and fails over to the
//! next router when one cannot be reached. The same pieces serve the nodes: [`Peer`] for
//! router→storage and storage→storage links, [`server_endpoint`] and [`serve`] for the
//! accepting side. No wasmtime, no replication: only the wire protocol and QUIC.

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

pub use billcl_proto::{Decimal, ErrorCode, ProcedureInfo, ReadMode, Type, Value};
pub use peer::Peer;
pub use server::{serve, CONNECTIONS_MAX};
pub use tls::{
    client_config, client_endpoint, server_config, server_endpoint, server_endpoint_with,
    transport_config, ClientAuth, TlsIdentity, IDLE_TIMEOUT_MS, IN_FLIGHT_MAX,
    KEEP_ALIVE_INTERVAL_MS,
};

/// The name every node's certificate is issued for.
pub const SERVER_NAME_DEFAULT: &str = "billcl";
/// How long a request may take unless configured otherwise.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Everything the SDK goes wrong with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made; nothing was sent.
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: SocketAddr, reason: String },
    /// No answer in time; the request may or may not have taken effect.
    #[error("request to {address} timed out after {after_ms} ms")]
    Timeout { address: SocketAddr, after_ms: u64 },
    /// The connection or stream failed mid-request.
    #[error("transport error: {0}")]
    Transport(String),
    /// The peer sent bytes that are not a valid response.
    #[error("protocol error: {0}")]
    Protocol(#[from] billcl_proto::Error),
    /// The server answered with an error.
    #[error("{message} ({code})")]
    Server { code: ErrorCode, message: String },
    /// The TLS material (CA, certificate, key) is unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The client configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether the same request may succeed if sent again (to this or another router).
    /// A retried command should carry an idempotency key.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Transport(_) => true,
            Error::Server { code, .. } => code.is_retryable(),
            Error::Protocol(_) | Error::Tls(_) | Error::Config(_) => false,
        }
    }

    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The code a node relaying this failure should answer with.
    pub fn reply_code(&self) -> ErrorCode {
        match self {
            Error::Server { code, .. } => *code,
            Error::Connect { .. } | Error::Transport(_) => ErrorCode::Unavailable,
            Error::Timeout { .. } => ErrorCode::Timeout,
            Error::Protocol(_) | Error::Tls(_) | Error::Config(_) => ErrorCode::Internal,
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
    /// Makes a retried command take effect once.
    pub idempotency_key: Option<u128>,
}

/// A connection to the cluster through its routers. Cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    routers: Vec<Peer>,
    /// Index of the router currently used.
    current: AtomicUsize,
    caller: String,
    timeout: Duration,
}

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
                    return Ok(Client {
                        inner: Arc::new(ClientInner {
                            routers,
                            current: AtomicUsize::new(index),
                            caller: config.caller,
                            timeout: config.timeout,
                        }),
                    })
                }
                Err(error) => {
                    tracing::debug!(%error, "router unreachable");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("at least one router was tried"))
    }

    /// Sends `request` to the current router, moving on to the next ones while routers
    /// cannot be reached (nothing was sent to those, so this is always safe).
    async fn request(&self, request: &Request, timeout: Duration) -> Result<Response, Error> {
        let routers = &self.inner.routers;
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..routers.len() {
            let index = (start + offset) % routers.len();
            match routers[index].request_with_timeout(request, timeout).await {
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

    /// Calls `procedure` on the leader.
    pub async fn call(&self, procedure: &str, args: Vec<Value>) -> Result<Value, Error> {
        self.call_with(procedure, args, CallOptions::default())
            .await
    }

    /// Calls `procedure` with options.
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
            idempotency_key: options.idempotency_key,
        });
        match self
            .request(&request, options.timeout.unwrap_or(self.inner.timeout))
            .await?
        {
            Response::Value(value) => Ok(value),
            other => Err(unexpected(other)),
        }
    }

    /// The procedures the cluster can call, with signatures and versions.
    pub async fn procedures(&self) -> Result<Vec<ProcedureInfo>, Error> {
        match self
            .request(&Request::Procedures, self.inner.timeout)
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

    /// `get(id)`: the account as `[id, balance, velocity]`.
    pub async fn get(&self, id: u64) -> Result<Value, Error> {
        self.call("get", vec![Value::Uint(id)]).await
    }

    /// `add-money(id, amount)`, with a fresh idempotency key.
    pub async fn add_money(&self, id: u64, amount: Decimal) -> Result<Value, Error> {
        let options = CallOptions {
            idempotency_key: Some(new_idempotency_key()),
            ..Default::default()
        };
        self.call_with(
            "add-money",
            vec![Value::Uint(id), Value::Decimal(amount)],
            options,
        )
        .await
    }

    /// `update-velocity(id, velocity)`, with a fresh idempotency key.
    pub async fn update_velocity(&self, id: u64, velocity: Decimal) -> Result<Value, Error> {
        let options = CallOptions {
            idempotency_key: Some(new_idempotency_key()),
            ..Default::default()
        };
        let args = vec![Value::Uint(id), Value::Decimal(velocity)];
        self.call_with("update-velocity", args, options).await
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
