//! The rebalancer on real processes: a replicaset added after bootstrap gets its share of the
//! buckets from `billcl rebalance` while calls keep running. No write is lost or applied
//! twice, an idempotency key remembered before the move still answers after it, and every
//! member of a replicaset ends with the same state.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use billcl_client::{CallOptions, Decimal, Value};
use billcl_host::config::ClusterConfig;
use billcl_host::router::admin_request;
use billcl_proto::bucket::{bucket_id, Key};
use billcl_proto::message::ErrorCode;
use common::{runtime, TestCluster};

/// Accounts 1..=ACCOUNTS, created with a balance of 1000 and no velocity (so a balance is
/// exactly what was added to it).
const ACCOUNTS: u64 = 300;
/// Tasks adding money while the buckets move.
const WRITERS: u64 = 12;

/// The account writer `writer` adds to after `id`: every [`WRITERS`]th, round and round.
fn next_account(id: u64, writer: u64) -> u64 {
    if id + WRITERS > ACCOUNTS {
        1 + writer
    } else {
        id + WRITERS
    }
}

fn money(units: i64) -> Decimal {
    Decimal::from_micros(units * 1_000_000)
}

/// storage-a alone (a leader and a learner), bootstrapped, accounts 1..=[`ACCOUNTS`] created
/// with a balance of 1000 and no velocity; buckets move when asked only
/// (tests/seed_session.rs has the background rebalancer).
fn storage_a_with_accounts(runtime: &tokio::runtime::Runtime) -> TestCluster {
    let cluster = TestCluster::new(
        &[(
            "storage-a",
            &[("storage-a-001", true), ("storage-a-002", false)],
        )],
        "[rebalancer]\nenabled = false\n",
    );
    cluster.ok(&["start"]);
    cluster.wait_ready();
    cluster.ok(&["bootstrap"]);
    runtime.block_on(async {
        let client = cluster.client("rebalance-test").await;
        for id in 1..=ACCOUNTS {
            let args = vec![
                Value::Uint(id),
                Value::Decimal(money(1000)),
                Value::Decimal(Decimal::ZERO),
            ];
            client.call("create-account", args).await.unwrap();
        }
    });
    cluster
}

#[test]
fn a_replicaset_added_after_bootstrap_gets_its_share_while_calls_run() {
    let runtime = runtime();
    let mut cluster = storage_a_with_accounts(&runtime);
    // An account in a bucket that will move (the plan gives away the highest ids first).
    let moving = (1..=ACCOUNTS)
        .find(|id| bucket_id(&Key::Uint(*id), 1000) > 500)
        .unwrap();
    let remembered = CallOptions {
        idempotency_key: Some(0x7e_ba1a),
        ..Default::default()
    };
    runtime.block_on(async {
        let client = cluster.client("rebalance-test").await;
        let args = vec![Value::Uint(moving), Value::Decimal(money(5))];
        let first = client
            .call_with("add_money", args, remembered.clone())
            .await;
        assert_eq!(first.unwrap(), Value::Bool(true));
    });

    add_replicaset(&mut cluster, "storage-c");
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["alerts"][0]["name"], "EMPTY_REPLICASET", "{info}");

    // A move cut short after its first step (as if its driver stopped): the bucket of account
    // `stuck`, one the plan would not move, is frozen on storage-a, sending to storage-c.
    let stuck = (1..=ACCOUNTS)
        .find(|id| bucket_id(&Key::Uint(*id), 1000) <= 500)
        .unwrap();
    let stuck_bucket = bucket_id(&Key::Uint(stuck), 1000);
    runtime.block_on(async {
        let leader = member_peer(&cluster, "storage-a", "storage-a-001");
        let body = format!("{{\"bucket_ids\": [{stuck_bucket}], \"to\": \"storage-c\"}}");
        let sent = admin_request(&leader, "send-buckets", &body).await.unwrap();
        assert_eq!(sent["sending"], 1, "{sent}");
    });
    // It is still read where it is; a write to it waits, then says why it could not land.
    assert!(cluster
        .ok(&["call", "get", &stuck.to_string()])
        .contains("1000"));
    let refused = cluster.fails(&["call", "add_money", &stuck.to_string(), "1"]);
    assert!(refused.contains("sending to storage-c"), "{refused}");
    assert!(
        refused.contains("if it stays so, `billcl rebalance` finishes a move cut short"),
        "{refused}"
    );

    // A dry run plans half the buckets for storage-c and moves nothing.
    let plan = cluster.json(&["rebalance", "--dry-run", "--json"]);
    assert_eq!(plan["left"], 499, "{plan}");
    assert_eq!(plan["in_progress"], 1, "{plan}");
    assert_eq!(plan["finished"], 0, "a dry run finishes nothing: {plan}");
    assert_eq!(plan["plan"][0]["from"], "storage-a", "{plan}");
    assert_eq!(plan["plan"][0]["to"], "storage-c", "{plan}");
    assert_eq!(plan["replicasets"]["storage-c"]["buckets"], 0, "{plan}");
    assert!(cluster
        .ok(&["rebalance", "--dry-run"])
        .contains("would move 499 buckets from storage-a to storage-c"));

    // Writers add 1 to their accounts in turn, counting what succeeded, while the buckets move.
    let added: Arc<Vec<AtomicU64>> = Arc::new((0..=ACCOUNTS).map(|_| AtomicU64::new(0)).collect());
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let (added, failures, stop) = (added.clone(), failures.clone(), stop.clone());
            let client = runtime.block_on(cluster.client("writer"));
            runtime.spawn(async move {
                let mut id = 1 + writer;
                while !stop.load(Ordering::Relaxed) {
                    match client.add_money(id, money(1)).await {
                        Ok(_) => {
                            added[id as usize].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => failures
                            .lock()
                            .unwrap()
                            .push(format!("account {id}: {error}")),
                    }
                    id = next_account(id, writer);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let calls_before: u64 = added.iter().map(|n| n.load(Ordering::Relaxed)).sum();
    let moved = cluster.json(&["rebalance", "--json"]);
    let calls_during: u64 =
        added.iter().map(|n| n.load(Ordering::Relaxed)).sum::<u64>() - calls_before;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        runtime.block_on(writer).unwrap();
    }
    assert_eq!(
        moved["finished"], 1,
        "the move cut short is finished: {moved}"
    );
    assert_eq!(moved["moved"], 499, "{moved}");
    assert_eq!(moved["done"], true, "{moved}");
    assert_eq!(moved["replicasets"]["storage-a"]["buckets"], 500, "{moved}");
    assert_eq!(moved["replicasets"]["storage-c"]["buckets"], 500, "{moved}");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "calls failed during the moves: {failures:?}"
    );
    assert!(calls_during > 0, "no call ran while the buckets moved");

    runtime.block_on(async {
        let client = cluster.client("rebalance-test").await;
        // Every write landed exactly once, wherever its bucket went.
        for id in 1..=ACCOUNTS {
            let extra = if id == moving { 5 } else { 0 };
            let expected = 1000 + extra + added[id as usize].load(Ordering::Relaxed) as i64;
            let account = client.account(id).await.unwrap();
            assert_eq!(account.balance, money(expected), "account {id}");
        }
        // The key remembered on storage-a answers from storage-c, and moves nothing.
        let before = client.account(moving).await.unwrap().balance;
        let args = vec![Value::Uint(moving), Value::Decimal(money(5))];
        let again = client
            .call_with("add_money", args, remembered.clone())
            .await;
        assert_eq!(again.unwrap(), Value::Bool(true));
        assert_eq!(client.account(moving).await.unwrap().balance, before);
    });
    assert!(cluster
        .ok(&["route", &moving.to_string()])
        .contains("storage-c"));
    // storage-c has no replica: a replica-only read of its keys says so, at once.
    let refused = cluster.fails(&["call", "--replica", "get", &moving.to_string()]);
    assert!(
        refused.contains("replicaset storage-c has no replica to read from"),
        "{refused}"
    );
    let prefer = ["call", "--prefer-replica", "get", &moving.to_string()];
    assert!(cluster.ok(&prefer).starts_with(&format!("[{moving}, ")));

    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["status"], "green", "{info}");
    assert_eq!(info["alerts"].as_array().unwrap().len(), 0, "{info}");
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    let again = cluster.ok(&["rebalance"]);
    assert!(again.contains("balanced: nothing to move"), "{again}");
    // The learner applied the moves as its leader did.
    cluster.ok(&["verify"]);
    cluster.ok(&["stop"]);
}

/// A bootstrap that a down replicaset stopped part way is finished by running it again, and
/// the rebalancer moves nothing meanwhile (the shares it would count lack the missing buckets).
#[test]
fn a_bootstrap_stopped_by_a_down_replicaset_is_finished_by_running_it_again() {
    let cluster = two_replicasets_rebalanced_often();
    cluster.ok(&["start", "router-1", "storage-a-001"]);
    cluster.wait_for("storage-a to elect its leader", 60, || {
        let info = cluster.json(&["info", "--json"]);
        let storage_a = info["replicasets"].as_array()?.first()?.clone();
        (!storage_a["leader"].is_null()).then_some(())
    });
    let stopped = cluster.fails(&["bootstrap"]);
    assert!(stopped.contains("storage-b"), "{stopped}");
    let held = |name: &str| buckets_of(&cluster, name)["active"].clone();
    assert_eq!(held("storage-a"), 500);
    // Several rebalancer rounds: nothing moves to or from a half-bootstrapped cluster.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(held("storage-a"), 500);

    cluster.ok(&["start", "storage-b-001"]);
    cluster.wait_ready();
    assert!(cluster.ok(&["bootstrap"]).contains("bootstrapped"));
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    assert_eq!(info["status"], "green", "{info}");
    assert_eq!(
        (held("storage-a"), held("storage-b")),
        (500.into(), 500.into())
    );
    let again = cluster.fails(&["bootstrap"]);
    assert!(again.contains("already bootstrapped"), "{again}");
    cluster.ok(&["stop"]);
}

/// Pinned buckets stay where they are when the rebalancer moves the others (vshard's
/// `bucket_pin`), by id or by key, and move again once unpinned; a bucket that does not exist
/// or a pin that names nothing is refused.
#[test]
fn pinned_buckets_stay_when_the_others_move() {
    let mut cluster = TestCluster::new(
        &[("storage-a", &[("storage-a-001", true)])],
        "[rebalancer]\nenabled = false\n",
    );
    cluster.ok(&["start"]);
    cluster.wait_ready();
    let early = cluster.fails(&["pin", "5"]);
    assert!(early.contains("run `billcl bootstrap` first"), "{early}");
    cluster.ok(&["bootstrap"]);
    // A key in a bucket the plan gives away (the highest ids first), and the highest bucket.
    let key = (1..=1000u64)
        .find(|id| bucket_id(&Key::Uint(*id), 1000) > 500)
        .unwrap();
    let key_bucket = bucket_id(&Key::Uint(key), 1000);
    let text = cluster.ok(&["pin", "1000", "--key", &key.to_string()]);
    let mut ids = [key_bucket, 1000];
    ids.sort();
    assert_eq!(
        text,
        format!("storage-a: pinned bucket {}, {}", ids[0], ids[1]),
        "{text}"
    );
    let again = cluster.json(&["pin", "1000", "--json"]);
    assert_eq!(again["changed"], 0, "{again}");
    assert_eq!(again["replicasets"]["storage-a"]["bucket_ids"][0], 1000);
    assert_eq!(buckets_of(&cluster, "storage-a")["pinned"], 2);

    add_replicaset_and_rebalance(&mut cluster, "storage-b");
    let held = buckets_of(&cluster, "storage-a");
    assert_eq!(
        (&held["active"], &held["pinned"]),
        (&498.into(), &2.into()),
        "{held}"
    );
    assert_eq!(buckets_of(&cluster, "storage-b")["active"], 500);
    let route = cluster.ok(&["route", &key.to_string()]);
    assert!(route.ends_with("-> storage-a"), "{route}");
    assert_eq!(
        cluster.ok(&["buckets", "--state", "pinned"]),
        format!(
            "storage-a: pinned {}, {} (2)\nstorage-b: none",
            ids[0], ids[1]
        )
    );
    let listing = cluster.ok(&["buckets"]);
    assert!(
        listing.contains("storage-b: active ") && listing.contains("(500)"),
        "{listing}"
    );

    let unpinned = cluster.ok(&["unpin", "--key", &key.to_string()]);
    assert_eq!(unpinned, format!("storage-a: unpinned bucket {key_bucket}"));
    assert_eq!(buckets_of(&cluster, "storage-a")["pinned"], 1);
    // Unpinned, the key's bucket is among storage-a's highest again and moves; 1000 stays.
    add_replicaset_and_rebalance(&mut cluster, "storage-c");
    let held = buckets_of(&cluster, "storage-a");
    assert_eq!(held["pinned"], 1, "{held}");
    assert_eq!(buckets_of(&cluster, "storage-c")["active"], 333);
    let route = cluster.ok(&["route", &key.to_string()]);
    assert!(!route.ends_with("-> storage-a"), "{route}");

    let error = cluster.fails(&["pin", "0"]);
    assert!(error.contains("bucket 0 does not exist"), "{error}");
    let error = cluster.fails(&["pin"]);
    assert!(error.contains("name the buckets"), "{error}");
    cluster.ok(&["stop"]);
}

/// A link to `instance` of `replicaset`, as the tools open one (for a storage's admin verbs);
/// within a runtime.
fn member_peer(cluster: &TestCluster, replicaset: &str, instance: &str) -> billcl_client::Peer {
    let config = ClusterConfig::load(&cluster.config).unwrap();
    let endpoint = billcl_host::verify::tool_endpoint(&config).unwrap();
    billcl_host::verify::member_links(&config, &endpoint, replicaset)
        .into_iter()
        .find(|link| link.name == instance)
        .unwrap()
        .peer
}

/// A replicaset's buckets by state, as `info` lists them.
fn buckets_of(cluster: &TestCluster, name: &str) -> serde_json::Value {
    let info = cluster.json(&["info", "--json"]);
    info["replicasets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .map(|r| r["buckets"].clone())
        .unwrap()
}

/// Adds replicaset `name` (one voter, `NAME-001`, empty) and has the running router read the
/// file again to know it (`billcl reload`).
fn add_replicaset(cluster: &mut TestCluster, name: &str) {
    let instance = format!("{name}-001");
    let router = cluster.pid_of("router-1");
    cluster.add_replicaset(name, &instance);
    cluster.ok(&["start", &instance]);
    cluster.wait_ready();
    let reloaded = cluster.ok(&["reload"]);
    assert!(
        reloaded.contains(&format!(
            "router-1: replicaset {name} added (weight 1; {instance}): it holds no buckets"
        )),
        "{reloaded}"
    );
    cluster.assert_not_restarted("router-1", router);
}

/// [`add_replicaset`], then rebalances.
fn add_replicaset_and_rebalance(cluster: &mut TestCluster, name: &str) {
    add_replicaset(cluster, name);
    cluster.ok(&["rebalance"]);
}

/// The background rebalancer leaves a disbalance within `disbalance_threshold_percent` (1 %
/// by default, vshard's `rebalancer_disbalance_threshold`) alone; `billcl rebalance` does not
/// wait for it, and past it the background one moves buckets to the exact shares by itself.
#[test]
fn the_background_rebalancer_waits_for_the_disbalance_threshold() {
    let cluster = two_replicasets_rebalanced_often();
    cluster.ok(&["start"]);
    cluster.wait_ready();
    cluster.ok(&["bootstrap"]);
    let set_weights = |a: u32, b: u32| {
        let text = std::fs::read_to_string(&cluster.config).unwrap();
        let text = with_weights(&text, a, b);
        std::fs::write(&cluster.config, text).unwrap();
        let reloaded = cluster.ok(&["reload"]);
        assert!(reloaded.contains("storage-b weight"), "{reloaded}");
    };
    let target = |name: &str| {
        let plan = cluster.json(&["rebalance", "--dry-run", "--json"]);
        plan["replicasets"][name]["target"].as_u64().unwrap()
    };

    // 100 : 101 wants storage-a at 498 of its 500: 0.4 % off, within 1 %.
    set_weights(100, 101);
    let share = target("storage-a");
    assert!(share < 500 && (500 - share) * 100 <= share, "{share}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(buckets_of(&cluster, "storage-a")["active"], 500);
    cluster.ok(&["rebalance"]);
    assert_eq!(buckets_of(&cluster, "storage-a")["active"], share);

    // 100 : 110 wants about 476: 4.6 % off; the rebalancer goes all the way by itself.
    set_weights(100, 110);
    let share = target("storage-a");
    cluster.wait_for("the background rebalancer to reach the shares", 60, || {
        (buckets_of(&cluster, "storage-a")["active"] == share).then_some(())
    });
    cluster.ok(&["stop"]);
}

/// The cluster file with storage-a's and storage-b's weights set to `a` and `b`, whatever
/// they were.
fn with_weights(text: &str, a: u32, b: u32) -> String {
    let mut out = String::new();
    let mut section = String::new();
    for line in text.lines() {
        if line.starts_with('[') {
            section = line.to_string();
        }
        let weight = match section.as_str() {
            "[replicasets.storage-a]" => Some(a),
            "[replicasets.storage-b]" => Some(b),
            _ => None,
        };
        match weight {
            Some(weight) if line.starts_with("weight = ") => {
                out.push_str(&format!("weight = {weight}\n"))
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// storage-a and storage-b, one voter each, the background rebalancer looking every 200 ms.
fn two_replicasets_rebalanced_often() -> TestCluster {
    TestCluster::new(
        &[
            ("storage-a", &[("storage-a-001", true)]),
            ("storage-b", &[("storage-b-001", true)]),
        ],
        "[rebalancer]\ninterval_ms = 200\n",
    )
}

/// Two drivers of one move (a rebalance from each of two routers): the steps of the one that
/// was overtaken, arriving after the bucket moved on, change nothing. Without move
/// generations its late receive would make the bucket writable on storage-b as well as where
/// it is, and its late drop would forget the bucket on storage-a while it is being sent again.
#[test]
fn late_steps_of_an_overtaken_move_change_nothing() {
    let cluster = two_replicasets_bootstrapped();
    let id = (1..)
        .find(|id| bucket_id(&Key::Uint(*id), 1000) <= 500)
        .unwrap();
    let bucket = bucket_id(&Key::Uint(id), 1000);
    cluster.ok(&["call", "create-account", &id.to_string(), "100", "0"]);
    let runtime = runtime();
    runtime.block_on(async {
        let a = member_peer(&cluster, "storage-a", "storage-a-001");
        let b = member_peer(&cluster, "storage-b", "storage-b-001");
        let step = |peer: &billcl_client::Peer, verb: &'static str, body: serde_json::Value| {
            let peer = peer.clone();
            async move { admin_request(&peer, verb, &body.to_string()).await }
        };
        let send = |to: &str| serde_json::json!({ "bucket_ids": [bucket], "to": to });
        let receive = |from: &str, sent: &serde_json::Value| {
            serde_json::json!({ "from": from, "buckets": sent["buckets"] })
        };
        let end = |to: &str, generation: u64| {
            serde_json::json!({ "buckets": [[bucket, generation]], "to": to })
        };

        // The first driver sends the bucket to storage-b and is held up.
        let held_up = step(&a, "send-buckets", send("storage-b")).await.unwrap();
        assert_eq!(held_up["buckets"][0][2], 1, "{held_up}");
        // The second finishes that move, then the bucket moves back to storage-a.
        let taken = step(&b, "receive-buckets", receive("storage-a", &held_up));
        assert_eq!(taken.await.unwrap()["taken"], 1);
        step(&a, "drop-sent-buckets", end("storage-b", 1)).await.unwrap();
        let back = step(&b, "send-buckets", send("storage-a")).await.unwrap();
        assert_eq!(back["buckets"][0][2], 2, "{back}");
        let taken = step(&a, "receive-buckets", receive("storage-b", &back));
        assert_eq!(taken.await.unwrap()["taken"], 1);
        step(&b, "drop-sent-buckets", end("storage-a", 2)).await.unwrap();

        // The first driver's receive, late: storage-b takes nothing.
        let late = step(&b, "receive-buckets", receive("storage-a", &held_up));
        assert_eq!(late.await.unwrap()["taken"], 0);
        assert_eq!(buckets_of(&cluster, "storage-b")["active"], 500);
        assert_eq!(buckets_of(&cluster, "storage-a")["active"], 500);

        // A new move of the bucket starts; the first driver's drop, late, is refused and
        // the bucket is still there to be sent.
        let again = step(&a, "send-buckets", send("storage-b")).await.unwrap();
        assert_eq!(again["buckets"][0][2], 3, "{again}");
        let refused = step(&a, "drop-sent-buckets", end("storage-b", 1))
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused:?}");
        assert!(
            refused.message.contains("generation 3, not 1"),
            "{refused:?}"
        );
        let refused = step(&a, "cancel-send-buckets", end("storage-b", 1)).await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(buckets_of(&cluster, "storage-a")["sending"], 1);
    });

    // The move under way is finished by the next rebalance, with the account's money.
    let moved = cluster.json(&["rebalance", "--json"]);
    assert_eq!(moved["finished"], 1, "{moved}");
    assert!(cluster
        .ok(&["route", &id.to_string()])
        .contains("storage-b"));
    cluster.ok(&["call", "add_money", &id.to_string(), "5"]);
    assert!(cluster
        .ok(&["call", "get", &id.to_string()])
        .contains("105"));
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    cluster.ok(&["verify"]);
    cluster.ok(&["stop"]);
}

/// Module `bulk`: `command/fill(key: u64, n: u32) -> result<_, string>` sets key-value entry
/// `n` (4 bytes, little-endian) of `key`'s bucket to 1,000,000 zero bytes.
const BULK_WAT: &str = r#"(component
  (import "billcl:host/kv@0.1.0" (instance $kv
    (export "set" (func (param "key" (list u8)) (param "value" (list u8))
      (result (result (error string)))))))
  (core module $libc
    (memory (export "memory") 20)
    (global $next (mut i32) (i32.const 1200000))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $at i32)
      (local.set $at (global.get $next))
      (global.set $next (i32.add (global.get $next) (local.get 3)))
      (local.get $at)))
  (core instance $libc (instantiate $libc))
  (core func $set (canon lower (func $kv "set")
    (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))
  (core module $m
    (import "host" "set" (func $set (param i32 i32 i32 i32 i32)))
    (import "libc" "memory" (memory 1))
    (func (export "fill") (param i64 i32) (result i32)
      (i32.store (i32.const 0) (local.get 1))
      (call $set (i32.const 0) (i32.const 4) (i32.const 64) (i32.const 1000000) (i32.const 16))
      i32.const 16))
  (core instance $i (instantiate $m
    (with "host" (instance (export "set" (func $set))))
    (with "libc" (instance $libc))))
  (func $fill (param "key" u64) (param "n" u32) (result (result (error string)))
    (canon lift (core func $i "fill") (memory (core memory $libc "memory"))
      (realloc (core func $libc "realloc"))))
  (instance $command (export "fill" (func $fill)))
  (export "test:bulk/command@0.1.0" (instance $command)))"#;

/// Buckets too large to move in one answer or one log entry: the group's data is answered in
/// parts (it would not fit one frame), and the bucket larger than a log entry holds is sent
/// part by part, staged on the receiver's members and received whole. Every bucket moves, in
/// one rebalance, and takes writes where it went.
#[test]
fn large_buckets_move_and_one_larger_than_a_log_entry_moves_in_parts() {
    let cluster = two_replicasets_bootstrapped();
    deploy_bulk(&cluster);
    let key_in = |bucket: u32| {
        (1..)
            .find(|id| bucket_id(&Key::Uint(*id), 1000) == bucket)
            .unwrap()
            .to_string()
    };
    // storage-a gives away its 8 highest buckets (493..=500) in one group: 17 MB in bucket
    // 500 (more than one 16 MiB log entry takes), 3 MB in each of the others: 38 MB in all,
    // 76 MB as the hex of send-buckets' answer, beyond a 64 MiB frame.
    for (bucket, entries) in (493..500).map(|b| (b, 3)).chain([(500, 17)]) {
        let key = key_in(bucket);
        for n in 0..entries {
            cluster.ok(&["call", "fill", &key, &n.to_string()]);
        }
    }
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    std::fs::write(&cluster.config, with_weights(&text, 492, 508)).unwrap();
    cluster.ok(&["reload"]);

    let moved = cluster.json(&["rebalance", "--json"]);
    assert_eq!(moved["moved"], 8, "{moved}");
    assert_eq!(moved["done"], true, "{moved}");
    for bucket in 493..=500 {
        let route = cluster.ok(&["route", &key_in(bucket)]);
        assert!(route.contains("storage-b"), "bucket {bucket}: {route}");
    }
    assert_eq!(buckets_of(&cluster, "storage-a")["active"], 492);
    assert_eq!(buckets_of(&cluster, "storage-b")["active"], 508);
    // The receiver's log: bucket 500's parts (17 MB in 8 MiB parts: three), then the bucket.
    let log = cluster.ok(&["cat", "storage-b-001"]);
    let parts = log.matches("of bucket 500 (move").count();
    assert_eq!(parts, 3, "{log}");
    assert!(log.contains("receive bucket 500 (move"), "{log}");
    assert!(log.contains("staged in parts"), "{log}");
    // The moved buckets take writes on storage-b, and the members agree.
    cluster.ok(&["call", "fill", &key_in(500), "99"]);
    cluster.ok(&["call", "fill", &key_in(499), "99"]);
    cluster.ok(&["verify"]);
    cluster.ok(&["stop"]);
}

/// A bucket moved part by part whose receiver restarts between two parts: the staged bytes
/// are replicated state, in the receiver's snapshot, so the next part follows on from them;
/// a driver that starts over (the next rebalance) finishes the move from the first part.
#[test]
fn a_bucket_staged_in_parts_outlives_a_restart_of_its_receiver() {
    let cluster = two_replicasets_bootstrapped();
    let key = storage_a_key_with_megabytes(&cluster, 17);
    let bucket = bucket_id(&Key::Uint(key), 1000);
    let runtime = runtime();
    let step = |replicaset: &str, member: &str, verb: &'static str, body: serde_json::Value| {
        runtime.block_on(async {
            let peer = member_peer(&cluster, replicaset, member);
            admin_request(&peer, verb, &body.to_string()).await
        })
    };
    let send = serde_json::json!({ "bucket_ids": [bucket], "to": "storage-b", "staged": true });
    let sent = step("storage-a", "storage-a-001", "send-buckets", send).unwrap();
    assert_eq!(sent["buckets"], serde_json::json!([]), "{sent}");
    let generation = sent["large"][0][1].as_u64().unwrap();
    let part = |offset: u64| {
        let ask = serde_json::json!({ "bucket": bucket, "generation": generation,
                                      "offset": offset });
        let part = step("storage-a", "storage-a-001", "send-bucket-part", ask).unwrap();
        serde_json::json!({ "from": "storage-a", "bucket": bucket, "generation": generation,
                            "total": part["total"], "offset": offset, "hex": part["hex"] })
    };
    let staged = step("storage-b", "storage-b-001", "stage-bucket-part", part(0)).unwrap();
    let first = staged["staged"].as_u64().unwrap();
    assert_eq!(first, 8 << 20, "{staged}");

    // The receiver snapshots (its log purged behind) and restarts: it holds the part still.
    cluster.ok(&["snapshot", "storage-b-001"]);
    cluster.ok(&["restart", "storage-b-001"]);
    cluster.wait_ready();
    // A part that does not follow on is refused; the next one is taken.
    let gap = step(
        "storage-b",
        "storage-b-001",
        "stage-bucket-part",
        part(first + 1),
    );
    let gap = gap.unwrap_err();
    assert_eq!(gap.code, ErrorCode::InvalidArgument, "{gap:?}");
    let next = step(
        "storage-b",
        "storage-b-001",
        "stage-bucket-part",
        part(first),
    )
    .unwrap();
    assert_eq!(next["staged"].as_u64().unwrap(), 2 * first, "{next}");
    // Received before it is whole: refused, and nothing moved.
    let early = serde_json::json!({ "from": "storage-a", "bucket": bucket,
                                    "generation": generation, "checksum": 0 });
    let early = step("storage-b", "storage-b-001", "receive-staged-bucket", early);
    assert!(early.unwrap_err().message.contains("send the rest first"));
    assert_eq!(buckets_of(&cluster, "storage-b")["active"], 500);

    // The next rebalance finishes the move, from the first part.
    let moved = cluster.json(&["rebalance", "--json"]);
    assert_eq!(moved["finished"], 1, "{moved}");
    assert!(cluster
        .ok(&["route", &key.to_string()])
        .contains("storage-b"));
    // (and moves another bucket back, to the equal shares)
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    cluster.ok(&["call", "fill", &key.to_string(), "99"]);
    cluster.ok(&["verify"]);
    cluster.ok(&["stop"]);
}

/// Two routers move one bucket larger than a log entry at once (`billcl move` through each,
/// there and back, three times): however their parts interleave (one's first part starts the
/// bucket over under the other), the bucket is never writable in two replicasets, and once a
/// rebalance has finished what they left, every bucket is writable in exactly one, with its
/// data.
#[test]
fn two_routers_moving_one_large_bucket_at_once_never_make_it_writable_twice() {
    let mut cluster = TestCluster::new(
        &[
            ("storage-a", &[("storage-a-001", true)]),
            ("storage-b", &[("storage-b-001", true)]),
        ],
        "[rebalancer]\nenabled = false\n",
    );
    cluster.add_router("router-2");
    cluster.ok(&["start"]);
    cluster.wait_ready();
    cluster.ok(&["bootstrap"]);
    let key = storage_a_key_with_megabytes(&cluster, 17).to_string();
    let writable_once = |cluster: &TestCluster| {
        let a = buckets_of(cluster, "storage-a");
        let b = buckets_of(cluster, "storage-b");
        let count = |v: &serde_json::Value, state: &str| v[state].as_u64().unwrap_or(0);
        let writable = ["active", "pinned"]
            .iter()
            .map(|state| count(&a, state) + count(&b, state))
            .sum::<u64>();
        let sending = count(&a, "sending") + count(&b, "sending");
        assert!(writable <= 1000, "a bucket writable twice: {a} {b}");
        assert_eq!(writable + sending, 1000, "{a} {b}");
    };
    for to in ["storage-b", "storage-a", "storage-b"] {
        std::thread::scope(|scope| {
            for router in ["router-1", "router-2"] {
                let cluster = &cluster;
                let key = &key;
                scope.spawn(move || {
                    cluster.billcl(&["--router", router, "move", "--key", key, "--to", to])
                });
            }
        });
        writable_once(&cluster);
        // What a driver left half done, finished.
        cluster.ok(&["rebalance"]);
        let info = cluster.json(&["info", "--json"]);
        assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
        writable_once(&cluster);
    }
    cluster.ok(&["call", "fill", &key, "99"]);
    cluster.ok(&["verify"]);
    cluster.ok(&["stop"]);
}

/// A bucket moved in parts whose staging another driver keeps starting over (here, parts of
/// another move of it at offset 0): the move stops at a refused part and is left to be
/// finished, the bucket still being sent, never taken back (the other driver could be about
/// to make it active on the receiver); the next rebalance finishes it.
#[test]
fn a_move_in_parts_refused_midway_is_left_to_finish_not_taken_back() {
    let cluster = two_replicasets_bootstrapped();
    let key = storage_a_key_with_megabytes(&cluster, 17);
    let bucket = bucket_id(&Key::Uint(key), 1000);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let moved = std::thread::scope(|scope| {
        scope.spawn(|| {
            let runtime = runtime();
            runtime.block_on(async {
                let b = member_peer(&cluster, "storage-b", "storage-b-001");
                let other = serde_json::json!({ "from": "storage-a", "bucket": bucket,
                    "generation": 999, "total": 100, "offset": 0, "hex": "00" });
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = admin_request(&b, "stage-bucket-part", &other.to_string()).await;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            });
        });
        let moved = cluster.fails(&["move", "--key", &key.to_string(), "--to", "storage-b"]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        moved
    });
    assert!(moved.contains("stage-bucket-part") || moved.contains("receive-staged-bucket"));
    assert!(moved.contains("run `billcl rebalance` again"), "{moved}");
    assert_eq!(buckets_of(&cluster, "storage-a")["sending"], 1, "{moved}");
    let done = cluster.json(&["rebalance", "--json"]);
    assert_eq!(done["finished"], 1, "{done}");
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    cluster.ok(&["verify"]);
    cluster.ok(&["stop"]);
}

/// Deploys module `bulk` ([`BULK_WAT`]).
fn deploy_bulk(cluster: &TestCluster) {
    let path = cluster.dir.path().join("bulk.wat");
    std::fs::write(&path, BULK_WAT).unwrap();
    cluster.ok(&["deploy", path.to_str().unwrap()]);
}

/// Deploys `bulk` and fills the bucket of the first key of storage-a (buckets 1..=500 after
/// bootstrap) with `megabytes` entries of 1 MB; the key.
fn storage_a_key_with_megabytes(cluster: &TestCluster, megabytes: u32) -> u64 {
    deploy_bulk(cluster);
    let key = (1..)
        .find(|id| bucket_id(&Key::Uint(*id), 1000) <= 500)
        .unwrap();
    for n in 0..megabytes {
        cluster.ok(&["call", "fill", &key.to_string(), &n.to_string()]);
    }
    key
}

/// storage-a and storage-b, one voter each, started and bootstrapped; buckets move only when
/// asked.
fn two_replicasets_bootstrapped() -> TestCluster {
    let cluster = TestCluster::new(
        &[
            ("storage-a", &[("storage-a-001", true)]),
            ("storage-b", &[("storage-b-001", true)]),
        ],
        "[rebalancer]\nenabled = false\n",
    );
    cluster.ok(&["start"]);
    cluster.wait_ready();
    cluster.ok(&["bootstrap"]);
    cluster
}

/// The leader a rebalance moves buckets from is killed (SIGKILL) while its buckets move under
/// keyed writes, then started again: [`killed_while_buckets_move`].
#[test]
fn a_source_leader_killed_while_its_buckets_move_loses_and_doubles_nothing() {
    killed_while_buckets_move("storage-a-001");
}

/// The same with the leader the buckets move to.
#[test]
fn a_destination_leader_killed_while_buckets_move_to_it_loses_and_doubles_nothing() {
    killed_while_buckets_move("storage-c-001");
}

/// The same with the router that drives the moves (and carries the writes).
#[test]
fn the_router_killed_while_it_moves_buckets_loses_and_doubles_nothing() {
    killed_while_buckets_move("router-1");
}

/// The same with storage-a's leadership handed to its learner (`billcl failover`, graceful)
/// instead of a kill: the moves go on with the new leader.
#[test]
fn a_failover_of_the_source_while_its_buckets_move_loses_and_doubles_nothing() {
    killed_while_buckets_move(FAILOVER);
}

/// What [`killed_while_buckets_move`] does instead of a kill: `billcl failover storage-a --to
/// storage-a-002`.
const FAILOVER: &str = "failover";

/// Buckets move from storage-a (a leader and a learner) to a new storage-c under keyed
/// writes, and `victim` is killed (SIGKILL) as soon as storage-c holds its first bucket, then
/// started again ([`FAILOVER`]: storage-a's leadership is handed over instead): the next `billcl rebalance` finishes the moves cut short, every bucket is
/// writable on exactly one replicaset, no acknowledged write is lost and none is applied twice
/// (each account's balance lies between what was acknowledged and that plus what was left
/// uncertain), and the learner holds what its leader holds.
fn killed_while_buckets_move(victim: &str) {
    let runtime = runtime();
    let mut cluster = storage_a_with_accounts(&runtime);
    add_replicaset(&mut cluster, "storage-c");

    // Writers add 1 to their accounts in turn; the SDK retries a failed call with its key.
    // A call that fails for good (the leader down longer than the client waits) may or may not
    // have taken effect: it counts as uncertain.
    let counters = || {
        Arc::new(
            (0..=ACCOUNTS)
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>(),
        )
    };
    let (acknowledged, uncertain) = (counters(), counters());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let (acknowledged, uncertain) = (acknowledged.clone(), uncertain.clone());
            let stop = stop.clone();
            let client = runtime.block_on(cluster.client("writer"));
            runtime.spawn(async move {
                let mut id = 1 + writer;
                while !stop.load(Ordering::Relaxed) {
                    let counter = match client.add_money(id, money(1)).await {
                        Ok(_) => &acknowledged,
                        Err(_) => &uncertain,
                    };
                    counter[id as usize].fetch_add(1, Ordering::Relaxed);
                    id = next_account(id, writer);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // The rebalance runs in a thread; the victim is killed as soon as storage-c holds its
    // first bucket.
    let rebalance = {
        let (exe, config) = (common::billcl_exe(), cluster.config.clone());
        std::thread::spawn(move || {
            std::process::Command::new(exe)
                .args(["--config", config.to_str().unwrap(), "rebalance", "--json"])
                .output()
                .unwrap()
        })
    };
    let held_at_kill = runtime.block_on(async {
        let storage_c = member_peer(&cluster, "storage-c", "storage-c-001");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = admin_request(&storage_c, "status", "{}").await.unwrap();
            let held: u64 = status["buckets"]
                .as_object()
                .map(|counts| counts.values().filter_map(|n| n.as_u64()).sum())
                .unwrap_or(0);
            if held > 0 {
                return held;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no bucket reached storage-c: {status}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    if victim == FAILOVER {
        cluster.ok(&["failover", "storage-a", "--to", "storage-a-002"]);
    } else {
        cluster.kill9(victim);
    }
    let cut_short = rebalance.join().unwrap();
    let report = String::from_utf8_lossy(&cut_short.stdout).to_string()
        + &String::from_utf8_lossy(&cut_short.stderr);
    println!("{victim} with {held_at_kill} buckets on storage-c; the rebalance said: {report}");
    assert!(
        held_at_kill < 500,
        "every bucket had moved before the kill: {report}"
    );
    if victim.starts_with("router") {
        assert!(
            report.contains("router router-1 stopped answering; is it running?"),
            "{report}"
        );
    }

    if victim != FAILOVER {
        cluster.ok(&["start", victim]);
    }
    cluster.wait_ready();
    let finished = cluster.wait_for("a rebalance that finishes the moves", 60, || {
        let run = cluster.billcl(&["rebalance", "--json"]);
        let answer: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
        (run.ok && answer["done"] == true).then_some(answer)
    });
    assert_eq!(
        finished["replicasets"]["storage-a"]["buckets"], 500,
        "{finished}"
    );
    assert_eq!(
        finished["replicasets"]["storage-c"]["buckets"], 500,
        "{finished}"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        runtime.block_on(writer).unwrap();
    }

    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    assert_eq!(info["status"], "green", "{info}");
    runtime.block_on(async {
        let client = cluster.client("rebalance-test").await;
        let (mut total_acknowledged, mut total_uncertain) = (0, 0);
        for id in 1..=ACCOUNTS {
            let acknowledged = acknowledged[id as usize].load(Ordering::Relaxed) as i64;
            let uncertain = uncertain[id as usize].load(Ordering::Relaxed) as i64;
            let added = client.account(id).await.unwrap().balance.micros() / 1_000_000 - 1000;
            assert!(
                acknowledged <= added && added <= acknowledged + uncertain,
                "account {id}: {added} added, {acknowledged} acknowledged, {uncertain} uncertain"
            );
            total_acknowledged += acknowledged;
            total_uncertain += uncertain;
        }
        println!("{total_acknowledged} writes acknowledged, {total_uncertain} uncertain");
        assert!(total_acknowledged > 0, "no write was acknowledged");
    });
    let again = cluster.ok(&["rebalance"]);
    assert!(again.contains("balanced: nothing to move"), "{again}");
    cluster.wait_for("storage-a's members to agree (billcl verify)", 60, || {
        cluster.billcl(&["verify"]).ok.then_some(())
    });
    cluster.ok(&["stop"]);
}

/// `billcl move` (vshard's `bucket_send`): a key's bucket moved by hand to the replicaset
/// named, its account with it, and pinned there so that a rebalance leaves it; a pinned
/// bucket, a replicaset that does not exist and a bucket already there are answered so.
#[test]
fn a_bucket_moved_by_hand_goes_where_it_is_sent_and_stays_when_pinned() {
    let cluster = two_replicasets_bootstrapped();
    cluster.ok(&["call", "create-account", "4", "100", "0"]);
    let bucket = bucket_id(&Key::Uint(4), 1000);
    assert!(cluster.ok(&["route", "4"]).contains("storage-a"));

    let moved = cluster.ok(&["move", "--key", "4", "--to", "storage-b", "--pin"]);
    assert_eq!(
        moved.trim(),
        format!("moved 1 bucket to storage-b: {bucket}; pinned on storage-b")
    );
    assert!(cluster.ok(&["route", "4"]).contains("storage-b"));
    assert_eq!(cluster.ok(&["call", "get", "4"]), "[4, 100, 0]");
    cluster.ok(&["call", "add_money", "4", "5"]);
    assert_eq!(buckets_of(&cluster, "storage-b")["pinned"], 1);
    assert_eq!(buckets_of(&cluster, "storage-a")["active"], 499);

    // A rebalance restores the shares with other buckets: the pinned one stays.
    let rebalanced = cluster.json(&["rebalance", "--json"]);
    assert_eq!(rebalanced["done"], true, "{rebalanced}");
    assert!(cluster.ok(&["route", "4"]).contains("storage-b"));
    assert_eq!(cluster.ok(&["call", "get", "4"]), "[4, 105, 0]");

    let refused = cluster.fails(&["move", &bucket.to_string(), "--to", "storage-a"]);
    assert!(
        refused.contains(&format!(
            "bucket {bucket} is pinned to storage-b (`billcl unpin {bucket}` first)"
        )),
        "{refused}"
    );
    let refused = cluster.fails(&["move", "--key", "4", "--to", "storage-z"]);
    assert!(refused.contains("no replicaset storage-z"), "{refused}");
    let already = cluster.ok(&["move", "--key", "4", "--to", "storage-b"]);
    assert_eq!(already.trim(), format!("already on storage-b: {bucket}"));
    cluster.ok(&["stop"]);
}
