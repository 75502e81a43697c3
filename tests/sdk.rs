//! The SDK against a real cluster: safe retries. A command sent twice with the same
//! idempotency key moves money once, also when the first answer is lost on the way back and
//! the SDK retries by itself.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use billcl_client::{
    CallOptions, Client, ClientConfig, Decimal, ErrorKind, ReadMode, TlsIdentity, Value,
};
use common::TestCluster;
use tokio::net::UdpSocket;

fn client_config(cluster: &TestCluster, router: SocketAddr) -> ClientConfig {
    let tls = cluster.data_dir().join("tls");
    let read = |name: &str| std::fs::read_to_string(tls.join(name)).unwrap();
    let mut config = ClientConfig::new(vec![router], read("ca.pem"));
    config.identity = Some(TlsIdentity {
        cert_chain_pem: read("client.pem"),
        key_pem: read("client.key"),
    });
    config
}

fn money(text: &str) -> Decimal {
    Decimal::parse(text).unwrap()
}

/// A UDP relay between one client and the router that can drop everything the router sends
/// back: requests arrive, answers are lost.
struct AnswerDropper {
    address: SocketAddr,
    dropping: Arc<AtomicBool>,
}

impl AnswerDropper {
    async fn start(router: SocketAddr) -> AnswerDropper {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(router).await.unwrap();
        let address = front.local_addr().unwrap();
        let dropping = Arc::new(AtomicBool::new(false));
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        {
            let (front, back, client) = (front.clone(), back.clone(), client.clone());
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                while let Ok((len, from)) = front.recv_from(&mut buffer).await {
                    *client.lock().unwrap() = Some(from);
                    let _ = back.send(&buffer[..len]).await;
                }
            });
        }
        {
            let dropping = dropping.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                while let Ok(len) = back.recv(&mut buffer).await {
                    let to = *client.lock().unwrap();
                    if let (false, Some(to)) = (dropping.load(Ordering::SeqCst), to) {
                        let _ = front.send_to(&buffer[..len], to).await;
                    }
                }
            });
        }
        AnswerDropper { address, dropping }
    }
}

/// The seed cluster started and seeded, its router's address, and a runtime for the client.
fn seeded() -> (TestCluster, SocketAddr, tokio::runtime::Runtime) {
    let cluster = TestCluster::seed();
    cluster.start_seeded();
    let router: SocketAddr = cluster.instances[0].address.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (cluster, router, runtime)
}

#[test]
fn retried_commands_take_effect_once() {
    let (cluster, router, runtime) = seeded();
    runtime.block_on(async {
        let client = Client::connect(client_config(&cluster, router))
            .await
            .unwrap();
        // Account 4 of the seed: balance 0, velocity 0.
        assert_eq!(client.account(4).await.unwrap().balance, Decimal::ZERO);

        // The same call with the same key, twice: both succeed, the money moves once.
        let options = CallOptions {
            idempotency_key: Some(0x5eed_0004),
            ..Default::default()
        };
        let args = vec![Value::Uint(4), Value::Decimal(money("10"))];
        let first = client
            .call_with("add_money", args.clone(), options.clone())
            .await
            .unwrap();
        let second = client
            .call_with("add_money", args.clone(), options.clone())
            .await
            .unwrap();
        assert_eq!((first, second), (Value::Bool(true), Value::Bool(true)));
        assert_eq!(client.account(4).await.unwrap().balance, money("10"));
        // Replicas applied the entry once too (the second send was answered from memory
        // or applied as a no-op).
        let replica = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let read = client.account_with(4, ReadMode::Replica).await;
                if read.as_ref().is_ok_and(|a| a.balance == money("10")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        replica.await.expect("the replica reaches balance 10");

        // A failed first answer is remembered too: a retry gets the same error.
        let bad = CallOptions {
            idempotency_key: Some(0x5eed_0005),
            ..Default::default()
        };
        let missing = vec![Value::Uint(999_999), Value::Decimal(money("1"))];
        for _ in 0..2 {
            let error = client
                .call_with("add_money", missing.clone(), bad.clone())
                .await
                .unwrap_err();
            assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
            assert_eq!(error.procedure_message(), Some("account 999999 not found"));
        }

        // The answer is lost on the way back: the SDK's send times out (half the call's
        // timeout), it sends again with the same key, and the replicaset answers the retry
        // with the first answer. The money moves once.
        let dropper = AnswerDropper::start(router).await;
        let mut config = client_config(&cluster, dropper.address);
        config.timeout = Duration::from_secs(8);
        let lossy = Client::connect(config).await.unwrap();
        assert_eq!(lossy.account(4).await.unwrap().balance, money("10"));
        dropper.dropping.store(true, Ordering::SeqCst);
        let top_up = tokio::spawn({
            let lossy = lossy.clone();
            async move { lossy.add_money(4, money("5")).await }
        });
        // Longer than one send's timeout (4 s): the first send is given up on.
        tokio::time::sleep(Duration::from_millis(4500)).await;
        dropper.dropping.store(false, Ordering::SeqCst);
        let answer = top_up.await.unwrap().expect("the retried top-up succeeds");
        assert_eq!(answer, Value::Bool(true));
        assert_eq!(client.account(4).await.unwrap().balance, money("15"));

        // Copies of one keyed call sent at once, mixed with other top-ups of the same account:
        // they meet in the leader's same log entry or in entries in flight together (the first
        // copy runs, the others repeat its answer; the other top-ups run on the balance the
        // first copy left, not on what a copy would have left). Every copy answers what the
        // first did, and the money moves once per logical call. Account 4 reads 15 now.
        let burst = CallOptions {
            idempotency_key: Some(0x5eed_0104),
            ..Default::default()
        };
        let calls: Vec<_> = (0..48)
            .map(|i| {
                let client = client.clone();
                let options = if i % 3 == 2 {
                    CallOptions::default()
                } else {
                    burst.clone()
                };
                tokio::spawn(async move {
                    let args = vec![Value::Uint(4), Value::Decimal(money("1"))];
                    client.call_with("add_money", args, options).await
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), Value::Bool(true));
        }
        // 15 + 1 (the keyed call) + 16 (the others).
        assert_eq!(client.account(4).await.unwrap().balance, money("32"));
    });
}

/// One replicaset's leader is stopped: the calls a client makes at once, batched together
/// whichever replicaset they go to, are answered one by one, so the healthy replicaset's all
/// come back before the first call to the stopped one gives up.
#[test]
fn calls_to_a_healthy_replicaset_do_not_wait_for_one_that_is_down() {
    let (cluster, router, runtime) = seeded();
    runtime.block_on(async {
        let mut config = client_config(&cluster, router);
        config.timeout = Duration::from_secs(4);
        let client = Client::connect(config).await.unwrap();
        let mut owners = Vec::new();
        for key in 1..=40u64 {
            let route = client.admin("route", &format!("{{\"key\": {key}}}")).await;
            let route: serde_json::Value = serde_json::from_str(&route.unwrap()).unwrap();
            owners.push((key, route["replicaset"].as_str().unwrap().to_string()));
        }
        assert!(owners.iter().any(|(_, owner)| owner == "storage-a"));
        assert!(owners.iter().any(|(_, owner)| owner == "storage-b"));

        cluster.ok(&["stop", "storage-a-001"]);
        let started = std::time::Instant::now();
        let calls: Vec<_> = owners
            .iter()
            .map(|(key, owner)| {
                let (client, key, owner) = (client.clone(), *key, owner.clone());
                tokio::spawn(async move {
                    let result = client.get(key).await;
                    (owner, started.elapsed(), result)
                })
            })
            .collect();
        let mut healthy_done = Duration::ZERO;
        let mut down_first = Duration::MAX;
        for call in calls {
            let (owner, at, result) = call.await.unwrap();
            if owner == "storage-b" {
                // An account of the seed, or one it does not have: storage-b answered.
                assert!(
                    result.is_ok() || result.as_ref().unwrap_err().kind() == ErrorKind::NotFound,
                    "{result:?}"
                );
                healthy_done = healthy_done.max(at);
            } else {
                let error = result.expect_err("storage-a has no leader");
                assert!(error.is_retryable(), "{error}");
                down_first = down_first.min(at);
            }
        }
        assert!(
            healthy_done < down_first,
            "storage-b's calls were answered by {healthy_done:?}, the first call to the stopped \
             storage-a gave up at {down_first:?}"
        );
    });
}
