//! The SDK against a real `serve` over real QUIC on 127.0.0.1: round trips, concurrency,
//! error replies, unreachable servers, timeouts, malformed frames, mTLS and reconnection.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use billcl_client::{
    client_endpoint, serve, server_endpoint, Answers, CallBatcher, CallOptions, Client,
    ClientConfig, Decimal, Error, ErrorCode, Peer, ProcedureInfo, Reply, TlsIdentity, Type, Value,
};
use billcl_proto::{Frame, ProcedureKind, Request, Response};
use futures_util::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A cluster CA and certificates it issued, as PEM.
struct Pki {
    ca_pem: String,
    server: TlsIdentity,
    client: TlsIdentity,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let issue = |purpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["billcl".to_string()]).unwrap();
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &issuer).unwrap();
        TlsIdentity {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: issue(ExtendedKeyUsagePurpose::ServerAuth),
        client: issue(ExtendedKeyUsagePurpose::ClientAuth),
    }
}

/// How many times the `flaky` and `slow-once` procedures saw each idempotency key.
/// The `record` calls the test server ran: tag and `timeout_ms` as received.
static RECORDED: std::sync::Mutex<Vec<(String, Option<u32>)>> = std::sync::Mutex::new(Vec::new());

static SENDS_BY_KEY: std::sync::Mutex<std::collections::BTreeMap<u128, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The test handler: `echo` returns its arguments and call metadata, `fail` answers an
/// error, `sleep` answers after two seconds, `panic` panics. A batch is answered call by call,
/// as a router does; a streamed batch's calls run one after the other, each answer sent as
/// soon as its call is done (a panic is left to `serve`).
async fn handle(request: Request) -> Reply {
    match request {
        Request::Call(call) => handle_call(call).await.into(),
        // A stream led by `panic` panics before it is answered at all.
        Request::CallStream(calls)
            if calls.first().is_some_and(|call| call.procedure == "panic") =>
        {
            panic!("the handler panics on purpose")
        }
        Request::CallStream(calls) => Reply::Answers(
            futures_util::stream::iter(calls.into_iter().zip(0u32..))
                .then(|(call, index)| async move { (index, handle_call(call).await) })
                .boxed(),
        ),
        Request::CallBatch(calls) => {
            let tasks: Vec<_> = calls
                .into_iter()
                .map(|call| tokio::spawn(handle_call(call)))
                .collect();
            let mut answers = Vec::new();
            for task in tasks {
                answers.push(task.await.unwrap_or_else(|_| {
                    Response::error(ErrorCode::Internal, "the request handler failed")
                }));
            }
            Response::Batch(answers).into()
        }
        other => handle_other(other).into(),
    }
}

async fn handle_call(call: billcl_proto::Call) -> Response {
    match call.procedure.as_str() {
        "echo" => Response::Value(Value::Record(vec![
            ("args".into(), Value::Tuple(call.args)),
            ("caller".into(), Value::String(call.caller)),
            ("keyed".into(), Value::Bool(call.idempotency_key.is_some())),
        ])),
        "fail" => Response::error(ErrorCode::InvalidArgument, "amount must be > 0, got -5"),
        "sleep" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Response::Value(Value::Bool(true))
        }
        "panic" => panic!("the handler panics on purpose"),
        // Fails retryably on the first send of a key, then answers how many sends of that
        // key it saw.
        "flaky" | "slow-once" => {
            let key = call.idempotency_key.expect("the SDK keys every call");
            let sends = {
                let mut seen = SENDS_BY_KEY.lock().unwrap();
                let sends = seen.entry(key).or_insert(0);
                *sends += 1;
                *sends
            };
            if sends == 1 && call.procedure == "flaky" {
                return Response::error(ErrorCode::NotLeader, "not the leader; retry");
            }
            if sends == 1 {
                // The answer to the first send comes too late: as good as dropped.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Response::Value(Value::Uint(sends))
        }
        // Remembers that it ran, with the time its caller still had (first argument: a tag).
        "record" => {
            let tag = call
                .args
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            RECORDED.lock().unwrap().push((tag, call.timeout_ms));
            Response::Value(Value::Bool(true))
        }
        other => Response::error(ErrorCode::UnknownProcedure, format!("no procedure {other}")),
    }
}

fn handle_other(request: Request) -> Response {
    match request {
        Request::Call(_) | Request::CallBatch(_) | Request::CallStream(_) => {
            unreachable!("calls go to handle_call")
        }
        Request::Procedures => Response::Procedures(vec![ProcedureInfo {
            name: "echo".into(),
            module: "test".into(),
            version: 1,
            active: true,
            kind: ProcedureKind::Query,
            params: vec![("id".into(), Type::U64)],
            result: None,
        }]),
        Request::Admin { verb, body } => Response::Admin(format!("{{\"{verb}\": {body}}}")),
        Request::Raft(bytes) => Response::Raft(bytes),
        Request::Deploy { name, bytes } => Response::Admin(format!(
            "{{\"{}\": {}}}",
            name.unwrap_or_default(),
            bytes.len()
        )),
    }
}

struct Server {
    address: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    async fn shut_down(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}

fn start(pki: &Pki, bind: SocketAddr, mtls: bool) -> Server {
    let client_ca = mtls.then_some(pki.ca_pem.as_str());
    let endpoint = server_endpoint(
        bind,
        &pki.server.cert_chain_pem,
        &pki.server.key_pem,
        client_ca,
    )
    .unwrap();
    let address = endpoint.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(endpoint, handle, async move {
        let _ = stopped.await;
    }));
    Server {
        address,
        stop,
        task,
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config(pki: &Pki, routers: Vec<SocketAddr>) -> ClientConfig {
    let mut config = ClientConfig::new(routers, pki.ca_pem.clone());
    config.timeout = Duration::from_secs(3);
    config.caller = "tester".into();
    config
}

fn echoed_args(value: Value) -> Vec<Value> {
    let Value::Record(fields) = value else {
        panic!("echo returns a record, got {value}")
    };
    let Value::Tuple(args) = fields[0].1.clone() else {
        panic!("args is a tuple")
    };
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_round_trip() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let client = Client::connect(config(&pki, vec![server.address]))
        .await
        .unwrap();

    let amount = Decimal::parse("1.5").unwrap();
    let args = vec![
        Value::Uint(4),
        Value::Decimal(amount),
        Value::String("ж".into()),
    ];
    let answer = client.call("echo", args.clone()).await.unwrap();
    assert_eq!(
        answer,
        Value::Record(vec![
            ("args".into(), Value::Tuple(args)),
            ("caller".into(), Value::String("tester".into())),
            // Every call carries an idempotency key, so the SDK may retry it safely.
            ("keyed".into(), Value::Bool(true)),
        ])
    );
    let options = CallOptions {
        idempotency_key: Some(7),
        ..Default::default()
    };
    let keyed = client.call_with("echo", vec![], options).await.unwrap();
    assert_eq!(
        keyed.to_string(),
        "{args: [], caller: \"tester\", keyed: true}"
    );

    let procedures = client.procedures().await.unwrap();
    assert_eq!(procedures[0].signature(), "echo(id: u64)");
    assert_eq!(
        client.admin("info", "[1]").await.unwrap(),
        "{\"info\": [1]}"
    );
    // The helpers name the billing procedures, which this server does not have.
    let missing = client.get(4).await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::UnknownProcedure));
    assert_eq!(missing.to_string(), "no procedure get (unknown-procedure)");
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_share_one_connection() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let client = Client::connect(config(&pki, vec![server.address]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for index in 0..200u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let answer = client.call("echo", vec![Value::Uint(index)]).await.unwrap();
            assert_eq!(echoed_args(answer), vec![Value::Uint(index)]);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    server.shut_down().await;
}

/// Concurrent calls travel in batches (one stream each): every call still gets its own
/// answer, an error for one does not touch the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_calls_get_their_own_answers() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let client = Client::connect(config(&pki, vec![server.address]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for index in 0..100u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let procedure = if index % 3 == 0 { "fail" } else { "echo" };
            let options = CallOptions {
                no_retry: true,
                ..Default::default()
            };
            let result = client
                .call_with(procedure, vec![Value::Uint(index)], options)
                .await;
            if index % 3 == 0 {
                let error = result.unwrap_err();
                assert_eq!(error.code(), Some(ErrorCode::InvalidArgument), "{error}");
            } else {
                assert_eq!(echoed_args(result.unwrap()), vec![Value::Uint(index)]);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    server.shut_down().await;
}

fn test_call(procedure: &str, arg: u64) -> billcl_proto::Call {
    billcl_proto::Call {
        procedure: procedure.into(),
        version: None,
        args: vec![Value::Uint(arg)],
        mode: billcl_proto::ReadMode::Leader,
        caller: "tester".into(),
        bucket_id: None,
        idempotency_key: None,
        timeout_ms: None,
    }
}

/// Sends `calls` as one streamed batch; each answer with when it came.
async fn stream_calls(
    peer: &Peer,
    calls: Vec<billcl_proto::Call>,
) -> (
    Result<Option<Response>, Error>,
    Vec<(u32, Duration, Response)>,
) {
    let started = Instant::now();
    let mut answers = Vec::new();
    let mut on_answer = |index, response| answers.push((index, started.elapsed(), response));
    let result = peer
        .request_answers(calls, Duration::from_secs(5), &mut on_answer)
        .await;
    (result, answers)
}

fn test_peer(pki: &Pki, server: &Server) -> Peer {
    let endpoint = client_endpoint(&pki.ca_pem, None, localhost()).unwrap();
    Peer::new(
        endpoint,
        server.address,
        "billcl".into(),
        Duration::from_secs(5),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_batch_answers_each_call_when_it_is_done() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let peer = test_peer(&pki, &server);
    // The handler runs them in order: the first two are answered two seconds before the
    // third, which a Batch would have made them wait for.
    let calls = vec![
        test_call("echo", 1),
        test_call("fail", 2),
        test_call("sleep", 3),
    ];
    let (result, answers) = stream_calls(&peer, calls).await;
    assert_eq!(result.unwrap(), None);
    let indices: Vec<u32> = answers.iter().map(|(index, _, _)| *index).collect();
    assert_eq!(indices, [0, 1, 2]);
    let (_, echoed_at, echoed) = &answers[0];
    let Response::Value(value) = echoed else {
        panic!("echo answers a value, got {echoed:?}")
    };
    assert_eq!(echoed_args(value.clone()), [Value::Uint(1)]);
    assert!(
        matches!(&answers[1].2, Response::Error(reply) if reply.code == ErrorCode::InvalidArgument)
    );
    assert_eq!(answers[2].2, Response::Value(Value::Bool(true)));
    let slept_at = answers[2].1;
    assert!(slept_at >= Duration::from_secs(2), "{slept_at:?}");
    assert!(
        *echoed_at + Duration::from_secs(1) < slept_at,
        "the echo came at {echoed_at:?}, the sleep at {slept_at:?}"
    );
    // The connection goes on serving, streamed or not.
    let (result, answers) = stream_calls(&peer, vec![test_call("echo", 4)]).await;
    assert_eq!((result.unwrap(), answers.len()), (None, 1));
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_does_not_hold_back_the_calls_made_after_it() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    for answers in [Answers::AsReady, Answers::Together] {
        // One batch in flight at a time, and the slow call takes it.
        let batcher = Arc::new(CallBatcher::start(test_peer(&pki, &server), 32, 1, answers));
        let slow = tokio::spawn({
            let batcher = batcher.clone();
            async move {
                batcher
                    .request(test_call("sleep", 0), Duration::from_secs(5))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        for round in 1..=3u64 {
            let calls = (0..4).map(|index| {
                let batcher = batcher.clone();
                async move {
                    let call = test_call("echo", round * 10 + index);
                    batcher.request(call, Duration::from_secs(5)).await
                }
            });
            for answer in futures_util::future::join_all(calls).await {
                assert!(matches!(answer, Ok(Response::Value(_))), "{answer:?}");
            }
        }
        assert!(
            !slow.is_finished(),
            "{answers:?}: the calls made after the slow one waited for it"
        );
        assert_eq!(
            slow.await.unwrap().unwrap(),
            Response::Value(Value::Bool(true))
        );
    }
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_streamed_batch_fails_only_the_calls_not_yet_answered() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let peer = test_peer(&pki, &server);
    let calls = vec![
        test_call("echo", 1),
        test_call("panic", 2),
        test_call("echo", 3),
    ];
    let (result, mut answers) = stream_calls(&peer, calls).await;
    assert_eq!(result.unwrap(), None);
    answers.sort_by_key(|(index, _, _)| *index);
    assert!(
        matches!(answers[0].2, Response::Value(_)),
        "{:?}",
        answers[0]
    );
    for (index, _, answer) in &answers[1..] {
        assert!(
            matches!(answer, Response::Error(reply) if reply.code == ErrorCode::Internal),
            "call {index}: {answer:?}"
        );
    }
    assert_eq!(answers.len(), 3);
    // A handler that panics before answering: each call is answered `Internal` (in doubt),
    // not the batch refused as a whole (which would say that none ran).
    let calls = vec![test_call("panic", 1), test_call("echo", 2)];
    let (result, answers) = stream_calls(&peer, calls).await;
    assert_eq!(result.unwrap(), None);
    assert_eq!(answers.len(), 2);
    for (index, _, answer) in &answers {
        assert!(
            matches!(answer, Response::Error(reply) if reply.code == ErrorCode::Internal),
            "call {index}: {answer:?}"
        );
    }
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_are_server_errors() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let client = Client::connect(config(&pki, vec![server.address]))
        .await
        .unwrap();
    match client.call("fail", vec![]).await {
        Err(Error::Server { code, message }) => {
            assert_eq!(code, ErrorCode::InvalidArgument);
            assert_eq!(message, "amount must be > 0, got -5");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    let panicked = client.call("panic", vec![]).await.unwrap_err();
    assert_eq!(panicked.code(), Some(ErrorCode::Internal));
    assert!(!panicked.is_retryable());
    // The connection still serves after both.
    assert_eq!(
        echoed_args(client.call("echo", vec![]).await.unwrap()),
        vec![]
    );
    server.shut_down().await;
}

/// An address where nothing listens: bind a UDP port, then free it.
fn dead_address() -> SocketAddr {
    let socket = UdpSocket::bind(localhost()).unwrap();
    socket.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_connect_error() {
    let pki = pki();
    let mut config = config(&pki, vec![dead_address()]);
    config.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let error = Client::connect(config).await.unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fails_over_to_a_reachable_router() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let mut config = config(&pki, vec![dead_address(), server.address]);
    config.timeout = Duration::from_millis(500);
    let client = Client::connect(config).await.unwrap();
    assert_eq!(
        echoed_args(client.call("echo", vec![]).await.unwrap()),
        vec![]
    );
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_fire() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let client = Client::connect(config(&pki, vec![server.address]))
        .await
        .unwrap();
    let options = CallOptions {
        timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let started = Instant::now();
    let error = client
        .call_with("sleep", vec![], options)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Timeout { after_ms: 200, .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // The timed-out stream does not spoil the connection.
    assert_eq!(
        echoed_args(client.call("echo", vec![]).await.unwrap()),
        vec![]
    );
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_with_the_same_key() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let client = Client::connect(config(&pki, vec![server.address]))
        .await
        .unwrap();
    // A not-leader answer, then success: the second send carried the first one's key.
    let key = 0xfeed_0001;
    let options = CallOptions {
        idempotency_key: Some(key),
        ..Default::default()
    };
    let answer = client.call_with("flaky", vec![], options).await.unwrap();
    assert_eq!(answer, Value::Uint(2));
    assert_eq!(SENDS_BY_KEY.lock().unwrap()[&key], 2);
    // An answer that never arrives in time: the SDK gives up on that send (half the call's
    // timeout) and sends again with the same key, within the call's timeout.
    let key = 0xfeed_0002;
    let options = CallOptions {
        idempotency_key: Some(key),
        timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let answer = client
        .call_with("slow-once", vec![], options)
        .await
        .unwrap();
    assert_eq!(answer, Value::Uint(2));
    // The SDK's own keys: fresh per call, kept across that call's retries.
    let first = client.call("flaky", vec![]).await.unwrap();
    let second = client.call("flaky", vec![]).await.unwrap();
    assert_eq!((first, second), (Value::Uint(2), Value::Uint(2)));
    // With retries off, the first failure is the answer.
    let options = CallOptions {
        no_retry: true,
        ..Default::default()
    };
    let error = client
        .call_with("flaky", vec![], options)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NotLeader));
    assert!(error.is_retryable());
    assert_eq!(error.kind(), billcl_client::ErrorKind::Retryable);
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_bad_request_on_a_live_connection() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let endpoint = client_endpoint(&pki.ca_pem, None, localhost()).unwrap();
    let connection = endpoint
        .connect(server.address, "billcl")
        .unwrap()
        .await
        .unwrap();
    let exchange = |bytes: Vec<u8>| {
        let connection = connection.clone();
        async move {
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            let answer = recv.read_to_end(1 << 20).await.unwrap();
            let frame = Frame::decode_exact(&answer).unwrap();
            (frame.request_id, Response::from_frame(&frame).unwrap())
        }
    };
    // A call frame whose body is cut short, and plain garbage.
    let mut truncated = Request::Procedures.to_frame(9);
    truncated.kind = 0x01;
    let (id, response) = exchange(truncated.to_bytes()).await;
    assert_eq!(id, 9);
    let Response::Error(reply) = response else {
        panic!("expected an error, got {response:?}")
    };
    assert_eq!(reply.code, ErrorCode::BadRequest);
    assert!(reply.message.contains("truncated"), "{}", reply.message);
    let (_, garbage) = exchange(b"hello there, server".to_vec()).await;
    assert!(matches!(garbage, Response::Error(reply) if reply.code == ErrorCode::BadRequest));
    // The same connection still serves a good request.
    let (id, good) = exchange(Request::Raft(vec![1, 2]).to_frame(10).to_bytes()).await;
    assert_eq!((id, good), (10, Response::Raft(vec![1, 2])));
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_cluster_certificate() {
    let pki = pki();
    let server = start(&pki, localhost(), true);
    let mut with_identity = config(&pki, vec![server.address]);
    with_identity.identity = Some(pki.client.clone());
    let client = Client::connect(with_identity).await.unwrap();
    assert_eq!(
        echoed_args(client.call("echo", vec![]).await.unwrap()),
        vec![]
    );

    // Without a certificate the handshake or the first request fails.
    let without = config(&pki, vec![server.address]);
    let refused = match Client::connect(without).await {
        Err(error) => error,
        Ok(client) => client.call("echo", vec![]).await.unwrap_err(),
    };
    assert!(
        matches!(refused, Error::Connect { .. } | Error::Transport(_)),
        "{refused:?}"
    );

    // A certificate from another CA is not trusted by the client either.
    let mut other = pki_other_ca(&pki);
    other.routers = vec![server.address];
    let error = Client::connect(other).await.unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    server.shut_down().await;
}

/// A client config that trusts a different CA than the server's.
fn pki_other_ca(pki: &Pki) -> ClientConfig {
    let stranger = self::pki();
    let mut config = config(pki, vec![]);
    config.ca_pem = stranger.ca_pem;
    config.identity = Some(stranger.client);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_reconnects_after_the_server_restarts() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let address = server.address;
    let endpoint = client_endpoint(&pki.ca_pem, None, localhost()).unwrap();
    let peer = Peer::new(endpoint, address, "billcl".into(), Duration::from_secs(3));
    assert_eq!(peer.address(), address);
    let ping = Request::Raft(vec![7]);
    assert_eq!(peer.request(&ping).await.unwrap(), Response::Raft(vec![7]));

    server.shut_down().await;
    let down = peer.request(&ping).await.unwrap_err();
    assert!(down.is_retryable(), "{down:?}");

    // Same port again: the peer connects afresh by itself (its background dial, as it knows
    // the server shut down); until then each request fails at once, retryably.
    let restarted = start_again_at(&pki, address).await;
    let mut failed = 0;
    loop {
        match peer.request(&ping).await {
            Ok(answer) => break assert_eq!(answer, Response::Raft(vec![7])),
            Err(error) => assert!(error.is_retryable(), "{error:?}"),
        }
        failed += 1;
        assert!(failed < 200, "the peer never connected again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    restarted.shut_down().await;
}

/// A server on `address` again, once the port is free.
async fn start_again_at(pki: &Pki, address: SocketAddr) -> Server {
    for _ in 0..50 {
        if let Ok(endpoint) = server_endpoint(
            address,
            &pki.server.cert_chain_pem,
            &pki.server.key_pem,
            None,
        ) {
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(endpoint, handle, async move {
                let _ = stopped.await;
            }));
            return Server {
                address,
                stop,
                task,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{address} is not free again");
}

/// A peer whose handshake timed out is down: the requests after it fail at once, saying so,
/// instead of each waiting for a handshake of its own, and a background dial hands the next
/// request a connection once the peer is back. A dial cut short by the caller's own time
/// proves nothing and does not mark the peer down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_peer_fails_at_once_and_is_dialled_again_in_the_background() {
    let pki = pki();
    let address = dead_address();
    let endpoint = client_endpoint(&pki.ca_pem, None, localhost()).unwrap();
    let peer = Peer::new(endpoint, address, "billcl".into(), Duration::from_secs(3));
    let ping = Request::Raft(vec![7]);

    let hasty = peer
        .request_with_timeout(&ping, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        hasty
            .to_string()
            .contains("time ran out during the QUIC handshake"),
        "{hasty}"
    );
    assert_eq!(
        peer.down_for(),
        None,
        "the caller's time ran out, not the peer"
    );
    // A warm-up dial (a router's, to members that may still be starting) marks nothing either.
    let warm_up = peer
        .connect_within(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(warm_up, Error::Connect { .. }), "{warm_up:?}");
    assert_eq!(peer.down_for(), None, "a warm-up dial marked the peer down");

    let first = peer.request(&ping).await.unwrap_err();
    assert!(matches!(first, Error::Connect { .. }), "{first:?}");
    assert!(
        first.to_string().contains("no QUIC handshake in time"),
        "{first}"
    );
    assert!(peer.down_for().is_some());
    for _ in 0..3 {
        let again = peer.request(&ping).await.unwrap_err();
        assert!(matches!(again, Error::Connect { .. }), "{again:?}");
        assert!(again.is_retryable());
        assert!(
            again.to_string().contains("down for") && again.to_string().contains("background"),
            "answered from the down mark, without a dial of its own: {again}"
        );
    }

    back_by_itself(&pki, &peer, address).await;
}

/// A server that shuts down closes its connections saying so (docs/protocol.md, §1): its
/// peers take it as down at once, instead of dialling it and waiting out a handshake first,
/// and have it back once it is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_shut_down_is_down_at_once() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let address = server.address;
    let peer = test_peer(&pki, &server);
    let ping = Request::Raft(vec![7]);
    assert_eq!(peer.request(&ping).await.unwrap(), Response::Raft(vec![7]));
    server.shut_down().await;

    // The close crosses loopback at once; a request racing it may fail otherwise first.
    let mut shut_down = None;
    let mut others = Vec::new();
    for _ in 0..40 {
        let error = peer.request(&ping).await.unwrap_err();
        if error.to_string().contains("it shut down") {
            shut_down = Some(error);
            break;
        }
        others.push(error.to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = shut_down.unwrap_or_else(|| panic!("the peer never said it shut down: {others:?}"));
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert!(
        error.to_string().contains("down for") && error.to_string().contains("background"),
        "{error}"
    );
    assert!(peer.down_for().is_some());

    back_by_itself(&pki, &peer, address).await;
}

/// Starts a server at `address` again and waits until `peer`'s background dial has its
/// connection back, then checks a request goes through.
async fn back_by_itself(pki: &Pki, peer: &Peer, address: SocketAddr) {
    let server = start_again_at(pki, address).await;
    let mut waited = 0;
    while peer.down_for().is_some() {
        assert!(waited < 200, "the background dial never got through");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    let ping = Request::Raft(vec![7]);
    assert_eq!(peer.request(&ping).await.unwrap(), Response::Raft(vec![7]));
    server.shut_down().await;
}

/// Relays UDP datagrams between one client and `server`, each held `delay` first: a slow
/// network, where a QUIC handshake takes several times `delay`.
async fn slow_relay(server: SocketAddr, delay: Duration) -> SocketAddr {
    let outer = std::sync::Arc::new(tokio::net::UdpSocket::bind(localhost()).await.unwrap());
    let inner = std::sync::Arc::new(tokio::net::UdpSocket::bind(localhost()).await.unwrap());
    let address = outer.local_addr().unwrap();
    let client = std::sync::Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (to_server, from_client) = (inner.clone(), outer.clone());
    let seen = client.clone();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65536];
        while let Ok((len, from)) = from_client.recv_from(&mut buffer).await {
            *seen.lock().unwrap() = Some(from);
            let (datagram, to_server) = (buffer[..len].to_vec(), to_server.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = to_server.send_to(&datagram, server).await;
            });
        }
    });
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65536];
        while let Ok((len, _)) = inner.recv_from(&mut buffer).await {
            let Some(client) = *client.lock().unwrap() else {
                continue;
            };
            let (datagram, outer) = (buffer[..len].to_vec(), outer.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = outer.send_to(&datagram, client).await;
            });
        }
    });
    address
}

fn record(tag: &str, timeout_ms: u32) -> Request {
    Request::Call(billcl_proto::Call {
        procedure: "record".into(),
        version: None,
        args: vec![Value::String(tag.into())],
        mode: billcl_proto::ReadMode::Leader,
        caller: "tester".into(),
        bucket_id: None,
        idempotency_key: None,
        timeout_ms: Some(timeout_ms),
    })
}

/// A request that waits for a connection another request is dialling is bounded by its own
/// time: when that runs out first it is not sent at all (it used to go out once the dial
/// succeeded, after its caller had given up, carrying the time it had when it started
/// waiting), and a request that still has time is sent with the time it has left, not the
/// time it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_not_sent_after_its_time_ran_out_waiting_for_a_dial() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    // About 0.3-0.6 s per handshake: longer than the hasty call waits.
    let relay = slow_relay(server.address, Duration::from_millis(100)).await;
    let endpoint = client_endpoint(&pki.ca_pem, None, localhost()).unwrap();
    let peer = Peer::new(endpoint, relay, "billcl".into(), Duration::from_secs(5));
    let patient = {
        let peer = peer.clone();
        tokio::spawn(async move {
            peer.request_with_timeout(&record("patient", 3000), Duration::from_millis(3000))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let hasty = peer
        .request_with_timeout(&record("hasty", 100), Duration::from_millis(100))
        .await;
    assert!(
        matches!(&hasty, Err(Error::Connect { .. })),
        "out of time before a connection: not sent, said so; got {hasty:?}"
    );
    assert_eq!(
        patient.await.unwrap().unwrap(),
        Response::Value(Value::Bool(true))
    );
    // Let anything sent late arrive (through the relay).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded = RECORDED.lock().unwrap().clone();
    let tags: Vec<&str> = recorded.iter().map(|(tag, _)| tag.as_str()).collect();
    assert_eq!(tags, ["\"patient\""], "the hasty call must never run");
    let patient_ms = recorded[0].1.expect("sent with a time limit");
    assert!(
        patient_ms <= 3000 - 200,
        "the patient call waited for the handshake (at least two relay round trips), \
         and says it has that much less time: {patient_ms} ms"
    );
    server.shut_down().await;
}

/// A UDP relay between one client and a server that can drop everything the server sends
/// back, and counts the QUIC Initial packets the client sends (one or more per handshake) and
/// the datagrams the server sends back.
struct LossyPath {
    address: SocketAddr,
    dropping: Arc<std::sync::atomic::AtomicBool>,
    initials: Arc<std::sync::atomic::AtomicU64>,
    datagrams_back: Arc<std::sync::atomic::AtomicU64>,
}

impl LossyPath {
    async fn start(server: SocketAddr) -> LossyPath {
        LossyPath::start_with(server, false).await
    }

    /// `paced`: forwards what the client sends 4 datagrams at a time, 1 ms apart, so that the
    /// server receives them in small groups (as from a busy peer), not in one batch.
    async fn start_with(server: SocketAddr, paced: bool) -> LossyPath {
        use std::sync::atomic::Ordering;
        let front = Arc::new(tokio::net::UdpSocket::bind(localhost()).await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind(localhost()).await.unwrap());
        back.connect(server).await.unwrap();
        let path = LossyPath {
            address: front.local_addr().unwrap(),
            dropping: Arc::default(),
            initials: Arc::default(),
            datagrams_back: Arc::default(),
        };
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let (to_server, initials) = (front.clone(), path.initials.clone());
        let (forward, seen) = (back.clone(), client.clone());
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 65536];
            let mut forwarded = 0u64;
            while let Ok((len, from)) = to_server.recv_from(&mut buffer).await {
                forwarded += 1;
                if paced && forwarded.is_multiple_of(4) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                *seen.lock().unwrap() = Some(from);
                // A long header (0x80) of type Initial (bits 0x30 clear), fixed bit set.
                if buffer[0] & 0xf0 == 0xc0 {
                    initials.fetch_add(1, Ordering::SeqCst);
                }
                let _ = forward.send(&buffer[..len]).await;
            }
        });
        let (dropping, datagrams_back) = (path.dropping.clone(), path.datagrams_back.clone());
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 65536];
            while let Ok(len) = back.recv(&mut buffer).await {
                datagrams_back.fetch_add(1, Ordering::SeqCst);
                let to = *client.lock().unwrap();
                if let (false, Some(to)) = (dropping.load(Ordering::SeqCst), to) {
                    let _ = front.send_to(&buffer[..len], to).await;
                }
            }
        });
        path
    }

    /// Waits until the server has sent nothing for 50 ms (at most 5 s): what it sent after
    /// the last answer (delayed acknowledgements, new connection IDs) has reached the client.
    async fn wait_quiet(&self) {
        use std::sync::atomic::Ordering;
        for _ in 0..100 {
            let seen = self.datagrams_back.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.datagrams_back.load(Ordering::SeqCst) == seen {
                return;
            }
        }
        panic!("the server kept sending for 5 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_went_silent_is_dialled_again_for_the_next_request() {
    use std::sync::atomic::Ordering;
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let path = LossyPath::start(server.address).await;
    let endpoint = client_endpoint(&pki.ca_pem, None, localhost()).unwrap();
    let peer = Peer::new(
        endpoint,
        path.address,
        "billcl".into(),
        Duration::from_secs(5),
    );
    let echo = Request::Call(test_call("echo", 1));
    assert!(matches!(
        peer.request(&echo).await.unwrap(),
        Response::Value(_)
    ));
    let handshakes_before = path.initials.load(Ordering::SeqCst);
    assert!(handshakes_before > 0);

    // Nothing comes back, not even acknowledgements: the request times out. (Only once what
    // the server sent after the answer has arrived: a datagram of before the outage that the
    // client reads during the request would count as heard, and rightly keep the connection.)
    path.wait_quiet().await;
    path.dropping.store(true, Ordering::SeqCst);
    let error = peer
        .request_with_timeout(&echo, Duration::from_millis(600))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");

    // The path is back: the next request goes over a new connection (a new handshake), not
    // the old one, whose retransmission timers have backed off meanwhile.
    path.dropping.store(false, Ordering::SeqCst);
    assert!(matches!(
        peer.request(&echo).await.unwrap(),
        Response::Value(_)
    ));
    assert!(
        path.initials.load(Ordering::SeqCst) > handshakes_before,
        "the request after the silent one reused the old connection"
    );

    // A request that times out while the peer acknowledges it (a slow call) keeps the
    // connection: the next one needs no handshake.
    let handshakes = path.initials.load(Ordering::SeqCst);
    let slow = Request::Call(test_call("sleep", 2));
    let error = peer
        .request_with_timeout(&slow, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert!(matches!(
        peer.request(&echo).await.unwrap(),
        Response::Value(_)
    ));
    assert_eq!(path.initials.load(Ordering::SeqCst), handshakes);
    server.shut_down().await;
}

/// The datagrams the server sends back while it receives one request of about 300 KB (a few
/// hundred packets) over a connection with `transport`, on a paced path of its own.
async fn datagrams_back_for_a_large_request(
    pki: &Pki,
    server: SocketAddr,
    transport: Arc<quinn::TransportConfig>,
) -> u64 {
    use std::sync::atomic::Ordering;
    let path = LossyPath::start_with(server, true).await;
    let mut config = billcl_client::client_config(&pki.ca_pem, None).unwrap();
    config.transport_config(transport);
    let mut endpoint = quinn::Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(config);
    let peer = Peer::new(
        endpoint,
        path.address,
        "billcl".into(),
        Duration::from_secs(5),
    );
    // The handshake, and the ACK_FREQUENCY frame, before counting.
    let small = Request::Call(test_call("fail", 1));
    peer.request(&small).await.unwrap();
    let before = path.datagrams_back.load(Ordering::SeqCst);
    let mut large = test_call("fail", 1);
    large.args = vec![Value::String("x".repeat(300_000))];
    let answer = peer.request(&Request::Call(large)).await.unwrap();
    assert!(matches!(answer, Response::Error(_)), "{answer:?}");
    path.datagrams_back.load(Ordering::SeqCst) - before
}

/// Every billcl connection asks its peer (QUIC ACK frequency extension) to acknowledge after
/// 8 ack-eliciting packets instead of every other one, so a request of many packets draws
/// fewer ACK-only packets back (about 27 against 63 here), each a system call and a wake-up on
/// both ends. Node-to-node links take their transport from `transport_config_with` for that
/// (they once kept QUIC's default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_draws_few_acknowledgements() {
    let pki = pki();
    let server = start(&pki, localhost(), false);
    let ours =
        billcl_client::transport_config_with(Duration::from_secs(1), Duration::from_secs(10));
    let delayed = datagrams_back_for_a_large_request(&pki, server.address, ours).await;
    let quic_default = Arc::new(quinn::TransportConfig::default());
    let every_other = datagrams_back_for_a_large_request(&pki, server.address, quic_default).await;
    println!("datagrams back: {delayed} (billcl's transport), {every_other} (QUIC's default)");
    assert!(
        delayed * 3 < every_other * 2,
        "{delayed} datagrams back with billcl's transport against {every_other} with QUIC's default"
    );
    server.shut_down().await;
}
