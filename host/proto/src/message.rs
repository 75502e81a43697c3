//! Typed requests and responses and their compact binary bodies.
//!
//! The codec is hand-written so another language can follow `docs/protocol.md` byte by byte:
//! little-endian integers, u32-length strings and byte strings, u32-count lists, u8 tags.
//! Every length is checked against the remaining input before anything is allocated.

use std::fmt;

use crate::codec::{Reader, Writer};
use crate::error::Error;
use crate::frame::Frame;
use crate::value::{decode_type, decode_value, encode_type, encode_value, Type, Value};

/// Frame kinds of requests.
pub mod kind {
    pub const CALL: u8 = 0x01;
    pub const PROCEDURES: u8 = 0x02;
    pub const ADMIN: u8 = 0x03;
    pub const RAFT: u8 = 0x04;
    pub const DEPLOY: u8 = 0x05;
    /// Several calls to one replicaset member in one frame (routers to storages).
    pub const CALL_BATCH: u8 = 0x06;
    /// Several calls in one frame, each answered by its own `ANSWER` frame as soon as it is
    /// done (clients to routers, routers to storages).
    pub const CALL_STREAM: u8 = 0x07;
    /// Frame kinds of responses.
    pub const VALUE: u8 = 0x81;
    pub const PROCEDURES_REPLY: u8 = 0x82;
    pub const ADMIN_REPLY: u8 = 0x83;
    pub const RAFT_REPLY: u8 = 0x84;
    /// The answers to a `CALL_BATCH`, in order.
    pub const BATCH_REPLY: u8 = 0x86;
    /// The answer to one call of a `CALL_STREAM`, with the call's index.
    pub const ANSWER: u8 = 0x87;
    pub const ERROR: u8 = 0xff;
}

/// Longest procedure or module name.
pub const PROCEDURE_NAME_BYTES_MAX: usize = 256;
/// Longest caller name.
pub const CALLER_BYTES_MAX: usize = 256;
/// Longest admin verb.
pub const ADMIN_VERB_BYTES_MAX: usize = 64;
/// Most arguments of one call (WIT functions have few parameters; this bounds hostile input).
pub const CALL_ARGS_MAX: usize = 256;
/// Most calls in one `CallBatch` or `CallStream` (and answers in one `Batch` response).
pub const CALL_BATCH_MAX: usize = 1024;

/// Which member of a replicaset serves a read-only call (vshard's callrw / callro / callbro /
/// callre). Commands always go to the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// The leader, linearizable.
    #[default]
    Leader,
    /// A replica only.
    Replica,
    /// A replica if one is up, else the leader.
    PreferReplica,
    /// Any member, spreading load.
    Balance,
}

/// Whether a procedure only reads (served without the log) or changes state (goes through it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcedureKind {
    Query,
    Command,
}

/// A callable procedure of one module version, as the procedure list reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcedureInfo {
    /// Kebab-case name, e.g. `add-money`.
    pub name: String,
    pub module: String,
    pub version: u32,
    /// Whether `version` is the module's active version, the one a call runs unless it pins
    /// another (`add-money@1`). The procedure list holds every deployed version
    /// ([`crate::catalog`]); a module on its own does not know which one is active.
    pub active: bool,
    pub kind: ProcedureKind,
    pub params: Vec<(String, Type)>,
    pub result: Option<Type>,
}

impl ProcedureInfo {
    /// `add-money(id: u64, amount: decimal) -> result<bool, string>`.
    pub fn signature(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(name, ty)| format!("{name}: {ty}"))
            .collect();
        match &self.result {
            Some(result) => format!("{}({}) -> {result}", self.name, params.join(", ")),
            None => format!("{}({})", self.name, params.join(", ")),
        }
    }
}

/// A procedure call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub procedure: String,
    /// A module version to pin the call to; `None` is the active version.
    pub version: Option<u32>,
    pub args: Vec<Value>,
    pub mode: ReadMode,
    pub caller: String,
    /// The bucket the router resolved; `None` from clients and for map calls.
    pub bucket_id: Option<u32>,
    /// Makes a retried command take effect once.
    pub idempotency_key: Option<u128>,
    /// How long the caller still waits for the answer, in ms from when a node receives the
    /// call (`None`: the node's own request timeout). A node gives up on the call after that:
    /// a router stops retrying it and a storage does not start a command any more, so a call
    /// whose caller gave up never takes effect late (docs/protocol.md, §4.1).
    pub timeout_ms: Option<u32>,
}

impl Call {
    /// How long a node that reads this call now works on it: the time its caller still waits
    /// (`timeout_ms`), at most the node's own `node_max` (its `request_timeout_ms`, also used
    /// when the caller said nothing).
    pub fn budget(&self, node_max: std::time::Duration) -> std::time::Duration {
        self.timeout_ms
            .map_or(node_max, |ms| {
                std::time::Duration::from_millis(u64::from(ms))
            })
            .min(node_max)
    }
}

/// A request: the body of one request frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Call(Call),
    /// List the callable procedures.
    Procedures,
    /// An operator verb with a JSON body.
    Admin {
        verb: String,
        body: String,
    },
    /// An opaque replication message between members of a replicaset.
    Raft(Vec<u8>),
    /// Install a procedure module (a wasm component) on every replicaset; answered with
    /// `Response::Admin` JSON. `name` defaults to the package the module exports from.
    Deploy {
        name: Option<String>,
        bytes: Vec<u8>,
    },
    /// Several calls for one replicaset member, answered by one `Response::Batch` with an
    /// answer per call in the same order. Routers send these to storages.
    CallBatch(Vec<Call>),
    /// Several calls, each answered by its own `Response::Answer` frame on the request's
    /// stream as soon as it is done, in no particular order: a call does not wait for the
    /// slowest call it travelled with.
    CallStream(Vec<Call>),
}

/// A response: the body of one response frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    Value(Value),
    Procedures(Vec<ProcedureInfo>),
    /// JSON.
    Admin(String),
    Raft(Vec<u8>),
    Error(ErrorReply),
    /// The answers to a `Request::CallBatch`, in order: each a `Value` or an `Error`.
    Batch(Vec<Response>),
    /// The answer (a `Value` or an `Error`) to the call at `index` of a
    /// `Request::CallStream`.
    Answer {
        index: u32,
        answer: Box<Response>,
    },
}

/// Why a request failed. Codes are stable on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request was malformed.
    BadRequest = 1,
    /// No procedure by that name (or version).
    UnknownProcedure = 2,
    /// An argument has the wrong type or value.
    InvalidArgument = 3,
    /// The procedure ran and failed (guest error, trap, fuel exhausted).
    ProcedureFailed = 4,
    /// The thing asked for does not exist.
    NotFound = 5,
    /// The bucket is not (or no longer) on this replicaset.
    WrongBucket = 6,
    /// This member is not the leader.
    NotLeader = 7,
    /// No member that could serve the request is reachable.
    Unavailable = 8,
    /// The request took too long.
    Timeout = 9,
    /// The cluster's buckets have not been distributed yet (`billcl bootstrap`).
    NotBootstrapped = 10,
    /// A bug or an I/O failure on the server.
    Internal = 11,
    /// The server is at its limit of work in flight.
    TooBusy = 12,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownProcedure,
        ErrorCode::InvalidArgument,
        ErrorCode::ProcedureFailed,
        ErrorCode::NotFound,
        ErrorCode::WrongBucket,
        ErrorCode::NotLeader,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::NotBootstrapped,
        ErrorCode::Internal,
        ErrorCode::TooBusy,
    ];

    /// Whether sending the same request again may succeed: the failure was about where or
    /// when it ran, not what it asked. A retried command should carry an idempotency key.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::WrongBucket
                | ErrorCode::NotLeader
                | ErrorCode::Unavailable
                | ErrorCode::Timeout
                | ErrorCode::TooBusy
        )
    }

    /// The code on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a wire value, if known.
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|known| known.as_u16() == code)
    }

    /// A kebab-case name, e.g. `not-leader`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnknownProcedure => "unknown-procedure",
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::ProcedureFailed => "procedure-failed",
            ErrorCode::NotFound => "not-found",
            ErrorCode::WrongBucket => "wrong-bucket",
            ErrorCode::NotLeader => "not-leader",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotBootstrapped => "not-bootstrapped",
            ErrorCode::Internal => "internal",
            ErrorCode::TooBusy => "too-busy",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error(ErrorReply::new(code, message))
    }
}

fn read_mode_tag(mode: ReadMode) -> u8 {
    match mode {
        ReadMode::Leader => 0,
        ReadMode::Replica => 1,
        ReadMode::PreferReplica => 2,
        ReadMode::Balance => 3,
    }
}

fn read_mode_from_tag(tag: u8) -> Result<ReadMode, Error> {
    Ok(match tag {
        0 => ReadMode::Leader,
        1 => ReadMode::Replica,
        2 => ReadMode::PreferReplica,
        3 => ReadMode::Balance,
        tag => {
            return Err(Error::BadTag {
                what: "read mode",
                tag,
            })
        }
    })
}

fn encode_call(call: &Call, out: &mut Writer) {
    out.str(&call.procedure);
    out.bool(call.version.is_some());
    if let Some(version) = call.version {
        out.u32(version);
    }
    out.len(call.args.len());
    for arg in &call.args {
        encode_value(arg, out);
    }
    out.u8(read_mode_tag(call.mode));
    out.str(&call.caller);
    out.bool(call.bucket_id.is_some());
    if let Some(bucket_id) = call.bucket_id {
        out.u32(bucket_id);
    }
    out.bool(call.idempotency_key.is_some());
    if let Some(key) = call.idempotency_key {
        out.u128(key);
    }
    out.bool(call.timeout_ms.is_some());
    if let Some(timeout_ms) = call.timeout_ms {
        out.u32(timeout_ms);
    }
}

fn decode_call(input: &mut Reader<'_>) -> Result<Call, Error> {
    let procedure = input
        .str_max("procedure name", PROCEDURE_NAME_BYTES_MAX)?
        .to_string();
    let version = match input.bool("version presence")? {
        true => Some(input.u32()?),
        false => None,
    };
    let count = input.count_max(2, CALL_ARGS_MAX, "argument list")?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        args.push(decode_value(input, 1)?);
    }
    let mode = read_mode_from_tag(input.u8()?)?;
    let caller = input.str_max("caller", CALLER_BYTES_MAX)?.to_string();
    let bucket_id = match input.bool("bucket id presence")? {
        true => Some(input.u32()?),
        false => None,
    };
    let idempotency_key = match input.bool("idempotency key presence")? {
        true => Some(input.u128()?),
        false => None,
    };
    let timeout_ms = match input.bool("timeout presence")? {
        true => Some(input.u32()?),
        false => None,
    };
    Ok(Call {
        procedure,
        version,
        args,
        mode,
        caller,
        bucket_id,
        idempotency_key,
        timeout_ms,
    })
}

fn encode_procedure(info: &ProcedureInfo, out: &mut Writer) {
    out.str(&info.name);
    out.str(&info.module);
    out.u32(info.version);
    out.bool(info.active);
    out.u8(match info.kind {
        ProcedureKind::Query => 0,
        ProcedureKind::Command => 1,
    });
    out.len(info.params.len());
    for (name, ty) in &info.params {
        out.str(name);
        encode_type(ty, out);
    }
    out.bool(info.result.is_some());
    if let Some(result) = &info.result {
        encode_type(result, out);
    }
}

fn decode_procedure(input: &mut Reader<'_>) -> Result<ProcedureInfo, Error> {
    let name = input
        .str_max("procedure name", PROCEDURE_NAME_BYTES_MAX)?
        .to_string();
    let module = input
        .str_max("module name", PROCEDURE_NAME_BYTES_MAX)?
        .to_string();
    let version = input.u32()?;
    let active = input.bool("procedure active flag")?;
    let kind = match input.u8()? {
        0 => ProcedureKind::Query,
        1 => ProcedureKind::Command,
        tag => {
            return Err(Error::BadTag {
                what: "procedure kind",
                tag,
            })
        }
    };
    let count = input.count(5)?;
    let mut params = Vec::with_capacity(count);
    for _ in 0..count {
        let name = input.str()?.to_string();
        params.push((name, decode_type(input, 1)?));
    }
    let result = match input.bool("result presence")? {
        true => Some(decode_type(input, 1)?),
        false => None,
    };
    Ok(ProcedureInfo {
        name,
        module,
        version,
        active,
        kind,
        params,
        result,
    })
}

impl Request {
    /// The frame kind of this request.
    pub fn kind(&self) -> u8 {
        match self {
            Request::Call(_) => kind::CALL,
            Request::Procedures => kind::PROCEDURES,
            Request::Admin { .. } => kind::ADMIN,
            Request::Raft(_) => kind::RAFT,
            Request::Deploy { .. } => kind::DEPLOY,
            Request::CallBatch(_) => kind::CALL_BATCH,
            Request::CallStream(_) => kind::CALL_STREAM,
        }
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        let mut out = Writer::default();
        match self {
            Request::Call(call) => encode_call(call, &mut out),
            Request::Procedures => {}
            Request::Admin { verb, body } => {
                out.str(verb);
                out.str(body);
            }
            Request::Raft(bytes) => out.out.extend_from_slice(bytes),
            Request::Deploy { name, bytes } => {
                out.bool(name.is_some());
                if let Some(name) = name {
                    out.str(name);
                }
                out.bytes(bytes);
            }
            Request::CallBatch(calls) | Request::CallStream(calls) => {
                out.len(calls.len());
                for call in calls {
                    encode_call(call, &mut out);
                }
            }
        }
        Frame {
            kind: self.kind(),
            request_id,
            body: out.out,
        }
    }

    pub fn from_frame(frame: &Frame) -> Result<Request, Error> {
        let mut input = Reader::new(&frame.body);
        let request = match frame.kind {
            kind::CALL => Request::Call(decode_call(&mut input)?),
            kind::PROCEDURES => Request::Procedures,
            kind::ADMIN => {
                let verb = input
                    .str_max("admin verb", ADMIN_VERB_BYTES_MAX)?
                    .to_string();
                let body = input.str()?.to_string();
                Request::Admin { verb, body }
            }
            kind::RAFT => Request::Raft(input.take(input.remaining())?.to_vec()),
            kind::DEPLOY => {
                let name = if input.bool("deploy name presence")? {
                    Some(
                        input
                            .str_max("module name", PROCEDURE_NAME_BYTES_MAX)?
                            .to_string(),
                    )
                } else {
                    None
                };
                let bytes = input.bytes()?.to_vec();
                Request::Deploy { name, bytes }
            }
            kind::CALL_BATCH => Request::CallBatch(decode_calls(&mut input)?),
            kind::CALL_STREAM => Request::CallStream(decode_calls(&mut input)?),
            other => return Err(Error::UnknownKind(other)),
        };
        input.finish()?;
        Ok(request)
    }
}

/// The calls of a `CallBatch` or `CallStream` body.
fn decode_calls(input: &mut Reader<'_>) -> Result<Vec<Call>, Error> {
    // Smallest call: name length, version presence, arg count, mode, caller length, bucket,
    // key and timeout presence.
    let count = input.count_max(17, CALL_BATCH_MAX, "call batch")?;
    let mut calls = Vec::with_capacity(count);
    for _ in 0..count {
        calls.push(decode_call(input)?);
    }
    Ok(calls)
}

/// One call's answer inside a `Batch` or `Answer` body: its kind (`VALUE` or `ERROR`), then
/// its body as length-prefixed bytes, written in place (no frame per answer): the length is
/// patched once the body is there.
fn encode_answer(answer: &Response, out: &mut Writer) {
    out.u8(answer.kind());
    let at = out.out.len();
    out.len(0);
    answer.encode_body(out);
    let body_len = out.out.len() - at - 4;
    let body_len = u32::try_from(body_len).expect("a length that fits no frame");
    out.out[at..at + 4].copy_from_slice(&body_len.to_le_bytes());
}

/// The inverse of [`encode_answer`]: anything but a `Value` or an `Error` (a nested batch or
/// answer) is refused.
fn decode_answer(input: &mut Reader<'_>) -> Result<Response, Error> {
    let kind = input.u8()?;
    if kind != kind::VALUE && kind != kind::ERROR {
        return Err(Error::BadTag {
            what: "batch answer kind",
            tag: kind,
        });
    }
    Response::from_body(kind, input.bytes()?)
}

impl Response {
    /// The frame kind of this response.
    pub fn kind(&self) -> u8 {
        match self {
            Response::Value(_) => kind::VALUE,
            Response::Procedures(_) => kind::PROCEDURES_REPLY,
            Response::Admin(_) => kind::ADMIN_REPLY,
            Response::Raft(_) => kind::RAFT_REPLY,
            Response::Error(_) => kind::ERROR,
            Response::Batch(_) => kind::BATCH_REPLY,
            Response::Answer { .. } => kind::ANSWER,
        }
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        let mut out = Writer::default();
        self.encode_body(&mut out);
        Frame {
            kind: self.kind(),
            request_id,
            body: out.out,
        }
    }

    fn encode_body(&self, out: &mut Writer) {
        match self {
            Response::Value(value) => encode_value(value, out),
            Response::Procedures(procedures) => {
                out.len(procedures.len());
                for info in procedures {
                    encode_procedure(info, out);
                }
            }
            Response::Admin(json) => out.str(json),
            Response::Raft(bytes) => out.out.extend_from_slice(bytes),
            Response::Error(reply) => {
                out.u16(reply.code.as_u16());
                out.str(&reply.message);
            }
            Response::Batch(responses) => {
                out.len(responses.len());
                for response in responses {
                    encode_answer(response, out);
                }
            }
            Response::Answer { index, answer } => {
                out.u32(*index);
                encode_answer(answer, out);
            }
        }
    }

    pub fn from_frame(frame: &Frame) -> Result<Response, Error> {
        Response::from_body(frame.kind, &frame.body)
    }

    /// Appends the `Answer` frame of the call at `index` of a `CallStream` to `out` without
    /// building the message first; an answer too large for a frame is replaced by an
    /// `Internal` error.
    pub fn encode_answer_frame(&self, index: u32, request_id: u64, out: &mut Vec<u8>) {
        let start = out.len();
        let mut writer = Writer {
            out: std::mem::take(out),
        };
        // The frame header, its length patched below.
        writer.len(0);
        writer.u8(crate::frame::PROTOCOL_VERSION);
        writer.u8(kind::ANSWER);
        writer.u64(request_id);
        writer.u32(index);
        encode_answer(self, &mut writer);
        *out = writer.out;
        let frame_len = out.len() - start;
        if frame_len > crate::frame::FRAME_BYTES_MAX {
            out.truncate(start);
            let too_large = Response::error(
                ErrorCode::Internal,
                format!(
                    "the answer is too large: {frame_len} bytes, a frame holds at most {}",
                    crate::frame::FRAME_BYTES_MAX
                ),
            );
            return too_large.encode_answer_frame(index, request_id, out);
        }
        let len = u32::try_from(frame_len - 4).expect("checked against FRAME_BYTES_MAX");
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The response of frame kind `kind` whose body is `body`.
    fn from_body(kind: u8, body: &[u8]) -> Result<Response, Error> {
        let mut input = Reader::new(body);
        let response = match kind {
            kind::VALUE => Response::Value(decode_value(&mut input, 1)?),
            kind::PROCEDURES_REPLY => {
                // Smallest procedure: two empty strings, version, active, kind, param count,
                // result presence.
                let count = input.count(19)?;
                let mut procedures = Vec::with_capacity(count);
                for _ in 0..count {
                    procedures.push(decode_procedure(&mut input)?);
                }
                Response::Procedures(procedures)
            }
            kind::ADMIN_REPLY => Response::Admin(input.str()?.to_string()),
            kind::RAFT_REPLY => Response::Raft(input.take(input.remaining())?.to_vec()),
            kind::ERROR => {
                let code = input.u16()?;
                let code = ErrorCode::from_u16(code).ok_or(Error::UnknownErrorCode(code))?;
                Response::Error(ErrorReply {
                    code,
                    message: input.str()?.to_string(),
                })
            }
            kind::BATCH_REPLY => {
                // Smallest answer: kind byte and body length.
                let count = input.count_max(5, CALL_BATCH_MAX, "batch answer")?;
                let mut responses = Vec::with_capacity(count);
                for _ in 0..count {
                    responses.push(decode_answer(&mut input)?);
                }
                Response::Batch(responses)
            }
            kind::ANSWER => {
                let index = input.u32()?;
                let answer = Box::new(decode_answer(&mut input)?);
                Response::Answer { index, answer }
            }
            other => return Err(Error::UnknownKind(other)),
        };
        input.finish()?;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::tests::samples;
    use billcl_money::Decimal;

    #[test]
    fn call_batches_round_trip_and_refuse_nesting() {
        let call = Call {
            procedure: "add-money".into(),
            version: None,
            args: vec![Value::Uint(4), Value::Decimal(Decimal::from_micros(5))],
            mode: ReadMode::Leader,
            caller: "router".into(),
            bucket_id: Some(42),
            idempotency_key: Some(7),
            timeout_ms: None,
        };
        let request = Request::CallBatch(vec![call.clone(), call.clone()]);
        let frame = request.to_frame(9);
        assert_eq!(Request::from_frame(&frame).unwrap(), request);
        // A streamed batch has the same body under its own kind.
        let streamed = Request::CallStream(vec![call.clone(), call]);
        let streamed_frame = streamed.to_frame(9);
        assert_eq!(streamed_frame.kind, kind::CALL_STREAM);
        assert_eq!(streamed_frame.body, frame.body);
        assert_eq!(Request::from_frame(&streamed_frame).unwrap(), streamed);
        let response = Response::Batch(vec![
            Response::Value(Value::Bool(true)),
            Response::error(ErrorCode::ProcedureFailed, "account 4 not found"),
        ]);
        let frame = response.to_frame(9);
        assert_eq!(Response::from_frame(&frame).unwrap(), response);
        // A batch answer holds values and errors only: no nested batches.
        let nested = Response::Batch(vec![response]).to_frame(1);
        assert!(matches!(
            Response::from_frame(&nested),
            Err(Error::BadTag { .. })
        ));
        // A streamed answer carries one value or error and its call's index, nothing nested.
        let answer = Response::Answer {
            index: 7,
            answer: Box::new(Response::error(ErrorCode::Timeout, "too late")),
        };
        let frame = answer.to_frame(9);
        assert_eq!(frame.body[..4], 7u32.to_le_bytes());
        assert_eq!(Response::from_frame(&frame).unwrap(), answer);
        // Written in place after what a buffer holds: the same bytes as the message's frame.
        let mut out = b"before".to_vec();
        let Response::Answer { answer: inner, .. } = &answer else {
            unreachable!()
        };
        inner.encode_answer_frame(7, 9, &mut out);
        assert_eq!(&out[..6], b"before");
        assert_eq!(out[6..], frame.to_bytes());
        for nested in [
            Response::Answer {
                index: 0,
                answer: Box::new(answer),
            },
            Response::Answer {
                index: 0,
                answer: Box::new(Response::Batch(vec![])),
            },
        ] {
            assert!(matches!(
                Response::from_frame(&nested.to_frame(1)),
                Err(Error::BadTag { .. })
            ));
        }
        // A count larger than the bytes left is refused before allocating.
        let lying = Frame {
            kind: kind::CALL_STREAM,
            request_id: 1,
            body: u32::MAX.to_le_bytes().to_vec(),
        };
        assert!(Request::from_frame(&lying).is_err());
    }

    fn requests() -> Vec<Request> {
        let all_values: Vec<Value> = samples().into_iter().map(|(value, _)| value).collect();
        vec![
            Request::Call(Call {
                procedure: "get".into(),
                version: None,
                args: vec![Value::Uint(4)],
                mode: ReadMode::Leader,
                caller: "client".into(),
                bucket_id: None,
                idempotency_key: None,
                timeout_ms: None,
            }),
            Request::Call(Call {
                procedure: "add-money".into(),
                version: Some(3),
                args: all_values,
                mode: ReadMode::PreferReplica,
                caller: "router-1".into(),
                bucket_id: Some(42),
                idempotency_key: Some(u128::MAX - 5),
                timeout_ms: Some(2_000),
            }),
            Request::Call(Call {
                procedure: "x".into(),
                version: None,
                args: vec![],
                mode: ReadMode::Balance,
                caller: String::new(),
                bucket_id: None,
                idempotency_key: Some(0),
                timeout_ms: None,
            }),
            Request::Procedures,
            Request::Admin {
                verb: "info".into(),
                body: "{\"json\": true}".into(),
            },
            Request::Raft(vec![1, 2, 3]),
            Request::Raft(vec![]),
            Request::Deploy {
                name: Some("transfer".into()),
                bytes: b"\0asm\x0d\0\x01\0".to_vec(),
            },
            Request::Deploy {
                name: None,
                bytes: vec![],
            },
            Request::CallStream(vec![]),
        ]
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::Value(Value::Decimal(Decimal::from_micros(1_500_000))),
            Response::Value(Value::Result(Err(Some(Box::new(Value::String(
                "no".into(),
            )))))),
            Response::Procedures(vec![]),
            Response::Procedures(vec![
                ProcedureInfo {
                    name: "add-money".into(),
                    module: "billing".into(),
                    version: 2,
                    active: true,
                    kind: ProcedureKind::Command,
                    params: vec![("id".into(), Type::U64), ("amount".into(), Type::Decimal)],
                    result: Some(Type::Result {
                        ok: Some(Box::new(Type::Bool)),
                        err: Some(Box::new(Type::String)),
                    }),
                },
                ProcedureInfo {
                    name: "ping".into(),
                    module: "x".into(),
                    version: 1,
                    active: false,
                    kind: ProcedureKind::Query,
                    params: vec![],
                    result: None,
                },
            ]),
            Response::Admin("{}".into()),
            Response::Raft(vec![0xff; 10]),
            Response::error(
                ErrorCode::NotLeader,
                "storage-a-2 is not the leader; try storage-a-1",
            ),
            Response::Answer {
                index: u32::MAX,
                answer: Box::new(Response::Value(Value::Bool(false))),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (index, request) in requests().into_iter().enumerate() {
            let frame = request.to_frame(index as u64);
            let decoded = Frame::decode_exact(&frame.to_bytes()).unwrap();
            assert_eq!(decoded.request_id, index as u64);
            assert_eq!(Request::from_frame(&decoded).unwrap(), request);
            assert_eq!(
                Response::from_frame(&decoded),
                Err(Error::UnknownKind(request.kind()))
            );
        }
        for (index, response) in responses().into_iter().enumerate() {
            let frame = response.to_frame(u64::MAX - index as u64);
            let decoded = Frame::decode_exact(&frame.to_bytes()).unwrap();
            assert_eq!(Response::from_frame(&decoded).unwrap(), response);
            assert_eq!(
                Request::from_frame(&decoded),
                Err(Error::UnknownKind(response.kind()))
            );
        }
        for code in ErrorCode::ALL {
            let response = Response::error(code, code.name());
            assert_eq!(
                Response::from_frame(&response.to_frame(1)).unwrap(),
                response
            );
        }
    }

    #[test]
    fn signature_reads_like_wit() {
        let Response::Procedures(procedures) = &responses()[3] else {
            unreachable!()
        };
        assert_eq!(
            procedures[0].signature(),
            "add-money(id: u64, amount: decimal) -> result<bool, string>"
        );
        assert_eq!(procedures[1].signature(), "ping()");
    }

    #[test]
    fn error_codes() {
        for (index, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.as_u16(), index as u16 + 1);
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(13), None);
        assert!(ErrorCode::NotLeader.is_retryable());
        assert!(ErrorCode::WrongBucket.is_retryable());
        assert!(!ErrorCode::InvalidArgument.is_retryable());
        assert!(!ErrorCode::ProcedureFailed.is_retryable());
        let mut body = 99u16.to_le_bytes().to_vec();
        body.extend([0, 0, 0, 0]);
        let frame = Frame {
            kind: kind::ERROR,
            request_id: 0,
            body,
        };
        assert_eq!(
            Response::from_frame(&frame),
            Err(Error::UnknownErrorCode(99))
        );
    }

    /// The worked example of docs/protocol.md: `get 4` as request 1.
    #[test]
    fn a_call_budget_is_its_timeout_within_the_node_limit() {
        use std::time::Duration;
        let mut call = Call {
            procedure: "get".into(),
            version: None,
            args: vec![],
            mode: ReadMode::Leader,
            caller: String::new(),
            bucket_id: None,
            idempotency_key: None,
            timeout_ms: None,
        };
        let node = Duration::from_secs(2);
        assert_eq!(call.budget(node), node);
        call.timeout_ms = Some(500);
        assert_eq!(call.budget(node), Duration::from_millis(500));
        call.timeout_ms = Some(60_000);
        assert_eq!(call.budget(node), node);
        call.timeout_ms = Some(0);
        assert_eq!(call.budget(node), Duration::ZERO);
    }

    #[test]
    fn get_4_call_bytes() {
        let call = Request::Call(Call {
            procedure: "get".into(),
            version: None,
            args: vec![Value::Uint(4)],
            mode: ReadMode::Leader,
            caller: "client".into(),
            bucket_id: None,
            idempotency_key: None,
            timeout_ms: None,
        });
        let hex: String = call
            .to_frame(1)
            .to_bytes()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        assert_eq!(
            hex,
            concat!(
                "2d000000",
                "01",
                "01",
                "0100000000000000", // len 45, version, Call, id 1
                "03000000",
                "676574", // "get"
                "00",     // no version
                "01000000",
                "03",
                "0400000000000000", // 1 arg: uint 4
                "00",               // leader
                "06000000",
                "636c69656e74", // "client"
                "00",           // no bucket id
                "00",           // no idempotency key
                "00",           // no timeout
            )
        );
    }

    /// The worked answer of docs/protocol.md: `[4, 1000, 0.00001]` for request 1.
    #[test]
    fn get_4_answer_bytes() {
        let answer = Response::Value(Value::Result(Ok(Some(Box::new(Value::Tuple(vec![
            Value::Uint(4),
            Value::Decimal(Decimal::parse("1000").unwrap()),
            Value::Decimal(Decimal::parse("0.00001").unwrap()),
        ]))))));
        let hex: String = answer
            .to_frame(1)
            .to_bytes()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        assert_eq!(
            hex,
            concat!(
                "2c000000",
                "01",
                "81",
                "0100000000000000",   // len 44, version, Value, id 1
                "0a02",               // result: ok, carries a value
                "0b03000000",         // tuple of 3
                "030400000000000000", // uint 4
                "0700ca9a3b00000000", // decimal 1000
                "070a00000000000000", // decimal 0.00001
            )
        );
        let Response::Value(value) = answer else {
            unreachable!()
        };
        assert_eq!(value.to_string(), "[4, 1000, 0.00001]");
    }

    #[test]
    fn deploy_bytes() {
        let request = Request::Deploy {
            name: Some("tx".into()),
            bytes: vec![0xaa, 0xbb],
        };
        let frame = request.to_frame(3);
        assert_eq!(frame.kind, 0x05);
        assert_eq!(
            frame.body,
            [1, 2, 0, 0, 0, b't', b'x', 2, 0, 0, 0, 0xaa, 0xbb]
        );
        assert_eq!(Request::from_frame(&frame), Ok(request));
        let unnamed = Request::Deploy {
            name: None,
            bytes: vec![7],
        };
        assert_eq!(unnamed.to_frame(1).body, [0, 1, 0, 0, 0, 7]);
        let mut long_name = Request::Deploy {
            name: Some("n".repeat(PROCEDURE_NAME_BYTES_MAX + 1)),
            bytes: vec![],
        }
        .to_frame(1);
        assert!(Request::from_frame(&long_name).is_err());
        long_name.body[0] = 2;
        assert!(Request::from_frame(&long_name).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for request in requests() {
            let frame = request.to_frame(7);
            for len in 0..frame.body.len() {
                let cut = Frame {
                    body: frame.body[..len].to_vec(),
                    ..frame.clone()
                };
                if request == Request::Procedures || matches!(request, Request::Raft(_)) {
                    continue; // bodies with no structure: every prefix is a valid message
                }
                assert!(
                    Request::from_frame(&cut).is_err(),
                    "{request:?} cut at {len}"
                );
            }
            let mut longer = frame.clone();
            longer.body.push(0);
            if !matches!(request, Request::Raft(_)) {
                assert_eq!(Request::from_frame(&longer), Err(Error::TrailingBytes(1)));
            }
        }
        for response in responses() {
            let frame = response.to_frame(7);
            for len in 0..frame.body.len() {
                if matches!(response, Response::Raft(_)) {
                    continue;
                }
                let cut = Frame {
                    body: frame.body[..len].to_vec(),
                    ..frame.clone()
                };
                assert!(
                    Response::from_frame(&cut).is_err(),
                    "{response:?} cut at {len}"
                );
            }
        }
    }

    #[test]
    fn hostile_counts_fail_without_allocating() {
        // A call whose argument count claims four billion values.
        let mut body = Vec::new();
        body.extend(3u32.to_le_bytes());
        body.extend(b"get");
        body.push(0);
        body.extend(u32::MAX.to_le_bytes());
        let frame = Frame {
            kind: kind::CALL,
            request_id: 0,
            body,
        };
        assert_eq!(Request::from_frame(&frame), Err(Error::Truncated));
        let procedures = Frame {
            kind: kind::PROCEDURES_REPLY,
            request_id: 0,
            body: vec![0xff; 4],
        };
        assert_eq!(Response::from_frame(&procedures), Err(Error::Truncated));
        let long_name = "x".repeat(PROCEDURE_NAME_BYTES_MAX + 1);
        let call = Request::Call(Call {
            procedure: long_name,
            version: None,
            args: vec![],
            mode: ReadMode::Leader,
            caller: String::new(),
            bucket_id: None,
            idempotency_key: None,
            timeout_ms: None,
        });
        assert!(matches!(
            Request::from_frame(&call.to_frame(0)),
            Err(Error::TooLong { .. })
        ));
    }

    /// A tiny deterministic generator (Knuth's MMIX LCG), so the smoke test needs no dep.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Lcg(2024);
        let seeds: Vec<Vec<u8>> = requests()
            .iter()
            .map(|request| request.to_frame(1).to_bytes())
            .chain(
                responses()
                    .iter()
                    .map(|response| response.to_frame(1).to_bytes()),
            )
            .collect();
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                let len = (rng.next() % 64) as usize;
                (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
            } else {
                // Mutate a valid frame: flip a few bytes, keep the header sane half the time.
                let mut bytes = seeds[(rng.next() as usize) % seeds.len()].clone();
                for _ in 0..1 + rng.next() % 4 {
                    let at = (rng.next() as usize) % bytes.len();
                    bytes[at] = rng.next() as u8;
                }
                if rng.next() & 1 == 0 {
                    let len = (bytes.len() - 4) as u32;
                    bytes[..4].copy_from_slice(&len.to_le_bytes());
                    bytes[4] = 1;
                }
                bytes
            };
            if round % 7 == 0 {
                bytes.truncate((rng.next() as usize) % (bytes.len() + 1));
            }
            if let Ok(Some((frame, _))) = Frame::decode(&bytes) {
                let _ = Request::from_frame(&frame);
                let _ = Response::from_frame(&frame);
            }
            let _ = Value::decode(&bytes);
            let _ = Type::decode(&bytes);
        }
    }
}
