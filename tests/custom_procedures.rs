//! Custom procedure modules on real processes (issue 4): deploy → call → upgrade → call →
//! rollback → call across both replicasets; the example modules; hostile modules that each
//! get a clear error while the nodes keep answering; replica reads equal to the leader's after
//! custom-module writes; the procedure log, also for calls that run past an async worker's
//! inline slice.

mod common;

use billcl_client::{CallOptions, Client, ClientConfig, ErrorKind, TlsIdentity, Value};
use billcl_proto::bucket::{bucket_id, Key};
use common::TestCluster;

/// A module `probe` whose `command/probe(key: u64) -> u32` returns `VERSION`, so a call shows
/// which version ran.
fn probe_wat(version: u32) -> String {
    format!(
        r#"(component
  (core module $m
    (func (export "probe") (param i64) (result i32) i32.const {version}))
  (core instance $i (instantiate $m))
  (func $probe (param "key" u64) (result u32) (canon lift (core func $i "probe")))
  (instance $command (export "probe" (func $probe)))
  (export "acme:probe/command@0.1.0" (instance $command)))"#
    )
}

/// Module `pinned`, whose `command/f` changes its parameters between versions:
/// v1 `f(id: u64, flag: bool) -> u32` returns 10 + flag; v2 `f(id: u64, note: string) -> u32`
/// returns the length of `note` (lowered into its memory through its `realloc`).
const PINNED_V1_WAT: &str = r#"(component
  (core module $m
    (func (export "f") (param i64 i32) (result i32)
      (i32.add (local.get 1) (i32.const 10))))
  (core instance $i (instantiate $m))
  (func $f (param "id" u64) (param "flag" bool) (result u32) (canon lift (core func $i "f")))
  (instance $command (export "f" (func $f)))
  (export "acme:pinned/command@0.1.0" (instance $command)))"#;

const PINNED_V2_WAT: &str = r#"(component
  (core module $m
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $at i32)
      (local.set $at (global.get $next))
      (global.set $next (i32.add (global.get $next) (local.get 3)))
      (local.get $at))
    (func (export "f") (param i64 i32 i32) (result i32)
      (local.get 2)))
  (core instance $i (instantiate $m))
  (func $f (param "id" u64) (param "note" string) (result u32)
    (canon lift (core func $i "f") (memory (core memory $i "memory"))
      (realloc (core func $i "realloc"))))
  (instance $command (export "f" (func $f)))
  (export "acme:pinned/command@0.1.0" (instance $command)))"#;

/// Hostile procedures, each keyed so the router can route them: loop forever, trap, allocate
/// without end, return a 60 MiB list.
const HOSTILE_WAT: &str = r#"(component
  (core module $m
    (memory (export "memory") 1000)
    (func (export "spin") (param i64) (result i32)
      (loop $forever (br $forever))
      i32.const 0)
    (func (export "crash") (param i64) (result i32)
      unreachable)
    (func (export "hog") (param i64) (result i32)
      (loop $more
        (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
      unreachable)
    (func (export "flood") (param i64) (result i32)
      (i32.store (i32.const 0) (i32.const 16))
      (i32.store (i32.const 4) (i32.const 62914560))
      i32.const 0))
  (core instance $i (instantiate $m))
  (func $spin (param "key" u64) (result u32) (canon lift (core func $i "spin")))
  (func $crash (param "key" u64) (result u32) (canon lift (core func $i "crash")))
  (func $hog (param "key" u64) (result u32) (canon lift (core func $i "hog")))
  (func $flood (param "key" u64) (result (list u8))
    (canon lift (core func $i "flood") (memory (core memory $i "memory"))))
  (instance $query (export "flood" (func $flood)))
  (instance $command
    (export "spin" (func $spin))
    (export "crash" (func $crash))
    (export "hog" (func $hog)))
  (export "acme:hostile/query@0.1.0" (instance $query))
  (export "acme:hostile/command@0.1.0" (instance $command)))"#;

/// Module `slow`: a query `slow-read` and a command `slow-write`, each of which logs one line
/// (through `billcl:host/log`) and then counts down from 200,000, far past the fuel an async
/// worker gives a call before running it again off the workers (`INLINE_CALL_FUEL`), and well
/// within `call_fuel_max`. The first run's line must not be kept beside the second's.
const SLOW_WAT: &str = r#"(component
  (import "billcl:host/log@0.1.0" (instance $log
    (type $level (enum "debug" "info" "warn" "error"))
    (export "level" (type $level_export (eq $level)))
    (type $write_type (func (param "level" $level_export) (param "message" string)))
    (export "write" (func (type $write_type)))))
  (core module $memory (memory (export "memory") 1))
  (core instance $memory_instance (instantiate $memory))
  (alias export $log "write" (func $write))
  (core func $write_lowered
    (canon lower (func $write) (memory (core memory $memory_instance "memory"))))
  (core instance $log_instance (export "write" (func $write_lowered)))
  (core module $m
    (import "env" "memory" (memory 1))
    (import "log" "write" (func $write (param i32 i32 i32)))
    (data (i32.const 16) "slow read ran")
    (data (i32.const 48) "slow write ran")
    (func $count_down
      (local $left i32)
      (local.set $left (i32.const 200000))
      (loop $more
        (local.set $left (i32.sub (local.get $left) (i32.const 1)))
        (br_if $more (local.get $left))))
    (func (export "slow-read") (param i64) (result i32)
      (call $write (i32.const 1) (i32.const 16) (i32.const 13))
      (call $count_down)
      i32.const 1)
    (func (export "slow-write") (param i64) (result i32)
      (call $write (i32.const 1) (i32.const 48) (i32.const 14))
      (call $count_down)
      i32.const 2))
  (core instance $i (instantiate $m
    (with "env" (instance $memory_instance))
    (with "log" (instance $log_instance))))
  (func $slow_read (param "key" u64) (result u32) (canon lift (core func $i "slow-read")))
  (func $slow_write (param "key" u64) (result u32) (canon lift (core func $i "slow-write")))
  (instance $query (export "slow-read" (func $slow_read)))
  (instance $command (export "slow-write" (func $slow_write)))
  (export "acme:slow/query@0.1.0" (instance $query))
  (export "acme:slow/command@0.1.0" (instance $command)))"#;

/// A key of each replicaset, given the 500/500 split of the test cluster.
fn key_in(replicaset: &str) -> u64 {
    (1..)
        .find(|&key| {
            let bucket = bucket_id(&Key::Uint(key), 1000);
            (bucket <= 500) == (replicaset == "storage-a")
        })
        .unwrap()
}

fn write(cluster: &TestCluster, name: &str, bytes: &[u8]) -> String {
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_string_lossy().into_owned()
}

fn example(name: &str) -> &'static [u8] {
    billcl_runtime::EXAMPLE_COMPONENTS
        .iter()
        .find(|(example, _)| *example == name)
        .map(|(_, bytes)| *bytes)
        .unwrap_or_else(|| panic!("no example module {name}"))
}

#[test]
fn custom_procedures_end_to_end() {
    let cluster = TestCluster::seed();
    cluster.start_seeded();
    let key_a = key_in("storage-a");
    let key_b = key_in("storage-b");
    let (key_a_text, key_b_text) = (key_a.to_string(), key_b.to_string());

    // Deploy → call → upgrade → call → rollback → call, on both replicasets.
    let v1 = write(&cluster, "probe1.wat", probe_wat(1).as_bytes());
    let v2 = write(&cluster, "probe2.wat", probe_wat(2).as_bytes());
    let out = cluster.ok(&["deploy", &v1]);
    assert!(
        out.starts_with("deployed probe@1 on storage-a, storage-b"),
        "{out}"
    );
    assert!(out.contains("probe(key: u64) -> u32"), "{out}");
    for key in [&key_a_text, &key_b_text] {
        assert_eq!(cluster.ok(&["call", "probe", key]), "1");
    }
    let answer = cluster.json(&["deploy", &v2, "--json"]);
    assert_eq!(answer["module"], "probe");
    assert_eq!(answer["version"], 2, "{answer}");
    for key in [&key_a_text, &key_b_text] {
        assert_eq!(cluster.ok(&["call", "probe", key]), "2");
        assert_eq!(cluster.ok(&["call", "probe@1", key]), "1", "pinned call");
    }
    let procedures = cluster.json(&["procedures", "--json"]);
    let probe = procedures
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "probe")
        .unwrap_or_else(|| panic!("probe not listed: {procedures}"));
    assert_eq!(probe["module"], "probe");
    assert_eq!(probe["version"], 2);
    assert_eq!(probe["kind"], "command");
    assert_eq!(probe["signature"], "probe(key: u64) -> u32");
    let out = cluster.ok(&["rollback", "probe"]);
    assert!(out.contains("storage-a: probe@1 active (was @2)"), "{out}");
    assert!(out.contains("storage-b: probe@1 active (was @2)"), "{out}");
    for key in [&key_a_text, &key_b_text] {
        assert_eq!(cluster.ok(&["call", "probe", key]), "1");
    }
    let text = cluster.ok(&["procedures"]);
    assert!(
        text.contains("command  probe@1  probe(key: u64) -> u32"),
        "{text}"
    );
    let error = cluster.fails(&["rollback", "probe"]);
    assert!(error.contains("no version before"), "{error}");
    cluster.ok(&["rollback", "probe", "2"]);
    assert_eq!(cluster.ok(&["call", "probe", &key_a_text]), "2");

    // Refusals, with the reason and a non-zero exit.
    let not_a_module = write(&cluster, "junk.wasm", b"\0asm\x0d\0\x01\0junk");
    let error = cluster.fails(&["deploy", &not_a_module]);
    assert!(error.contains("not a valid wasm component"), "{error}");
    let foreign = write(
        &cluster,
        "foreign.wat",
        br#"(component (import "wasi:random/insecure@0.2.0"
             (instance (export "get-insecure-random-u64" (func (result u64))))))"#,
    );
    let error = cluster.fails(&["deploy", &foreign]);
    assert!(error.contains("wasi:random/insecure@0.2.0"), "{error}");
    let clash = write(
        &cluster,
        "clash.wat",
        probe_wat(3).replace("acme:probe", "acme:other").as_bytes(),
    );
    let error = cluster.fails(&["deploy", &clash]);
    assert!(
        error.contains("`probe` (exported by probe@2)"),
        "a name another module exports is refused: {error}"
    );

    // The example modules: transfer and tariff, as components and as a core module.
    let transfer = write(&cluster, "transfer.wasm", example("transfer"));
    let out = cluster.ok(&["deploy", &transfer]);
    assert!(out.starts_with("deployed transfer@1"), "{out}");
    let tariff = write(&cluster, "tariff.wasm", example("tariff"));
    assert!(cluster
        .ok(&["deploy", &tariff])
        .starts_with("deployed tariff@1"));
    let (from, to) = same_bucket_accounts();
    cluster.ok(&["call", "create_account", &to, "10", "0"]);
    let error = cluster.fails(&["call", "transfer", &from, "6", "1"]);
    assert!(error.contains("not in this call's bucket"), "{error}");
    let moved = cluster.ok(&["call", "transfer", &from, &to, "0.5"]);
    assert!(moved.starts_with('['), "{moved}");
    let error = cluster.fails(&["call", "transfer", &from, &to, "1000000000"]);
    assert!(error.contains("insufficient funds"), "{error}");
    cluster.ok(&["call", "set_tariff", "5", "calls", "0.25"]);
    cluster.ok(&["call", "charge", "5", "4"]);
    // An upgrade from the core module (the guest build's output, componentized by the host).
    let core = billcl_runtime::EXAMPLE_CORE_MODULES
        .iter()
        .find(|(name, _)| *name == "transfer")
        .map(|(_, bytes)| *bytes)
        .unwrap();
    let transfer_core = write(&cluster, "transfer.core.wasm", core);
    let out = cluster.ok(&["deploy", &transfer_core]);
    assert!(out.starts_with("deployed transfer@2"), "{out}");
    let moved_again = cluster.ok(&["call", "transfer", &from, &to, "0.25"]);
    assert!(moved_again.starts_with('['), "{moved_again}");
    let usage = cluster.ok(&["call", "get_tariff", "5"]);
    assert!(
        usage.contains("units-charged: 4") && usage.contains("total-charged: 1"),
        "{usage}"
    );

    // A replica read equals the leader's after custom-module writes.
    cluster.wait_for("the replica to apply the charge", 20, || {
        let replica = cluster.billcl(&["call", "--replica", "get_tariff", "5"]);
        (replica.ok && replica.stdout.trim() == usage).then_some(())
    });
    let leader = cluster.ok(&["call", "get", &from]);
    cluster.wait_for("the replica to apply the transfer", 20, || {
        let replica = cluster.billcl(&["call", "--replica", "get", &from]);
        // The balance drains with time; the velocity and id must match exactly.
        (replica.ok && same_account(&replica.stdout, &leader)).then_some(())
    });

    // Every member's state digest agrees at one log index after the custom-module writes.
    let verify = cluster.json(&["verify", "--json"]);
    assert_eq!(verify["agree"], true, "{verify}");

    // The procedure log: the transfer's line, filtered by procedure, on the leader.
    let logs = cluster.ok(&["logs", "--procedure", "transfer"]);
    assert!(
        logs.contains(&format!("transfer 0.5 from {from} to {to}")),
        "{logs}"
    );
    assert!(!logs.contains("tariff calls"), "filtered: {logs}");
    let logs = cluster.json(&["logs", "--json"]);
    assert!(logs["instances"].as_array().unwrap().len() == 4, "{logs}");

    // Hostile modules: a clear error each, and the nodes keep answering.
    let hostile = write(&cluster, "hostile.wat", HOSTILE_WAT.as_bytes());
    assert!(cluster
        .ok(&["deploy", &hostile])
        .starts_with("deployed hostile@1"));
    for (procedure, expected) in [
        ("spin", "ran out of fuel"),
        ("crash", "unreachable"),
        ("hog", "ran out of memory"),
        ("flood", "return less"),
    ] {
        for key in [&key_a_text, &key_b_text] {
            let error = cluster.fails(&["call", procedure, key]);
            assert!(error.contains(expected), "{procedure}: {error}");
            let account = cluster.ok(&["call", "get", "5"]);
            assert!(account.starts_with("[5, "), "after {procedure}: {account}");
        }
    }

    // Calls past the async worker's inline slice run again off the workers: each answers
    // once and its line is in the procedure log once per member that ran it (the query on
    // the one member that served it, the command on each member that applied it).
    let slow = write(&cluster, "slow.wat", SLOW_WAT.as_bytes());
    assert!(cluster
        .ok(&["deploy", &slow])
        .starts_with("deployed slow@1"));
    assert_eq!(cluster.ok(&["call", "slow-read", &key_a_text]), "1");
    assert_eq!(cluster.ok(&["call", "slow-write", &key_a_text]), "2");
    let lines_per_instance = |message: &str| {
        let logs = cluster.ok(&["logs", "--procedure", "slow"]);
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for line in logs.lines().filter(|line| line.ends_with(message)) {
            let instance = line.split(" | ").next().unwrap_or_default().to_string();
            *counts.entry(instance).or_default() += 1;
        }
        (counts, logs)
    };
    let (reads, logs) = lines_per_instance("slow read ran");
    assert_eq!(
        reads.values().sum::<usize>(),
        1,
        "the query's line once: {logs}"
    );
    let (writes, logs) = lines_per_instance("slow write ran");
    assert!(
        !writes.is_empty() && writes.values().all(|&count| count == 1),
        "the command's line once per member: {logs}"
    );

    // A replicaset without a reachable leader: the deploy is refused before anything changes.
    cluster.ok(&["stop", "storage-b-001"]);
    let v3 = write(&cluster, "probe3.wat", probe_wat(3).as_bytes());
    let error = cluster.fails(&["deploy", &v3]);
    assert!(
        error.contains("storage-b has no reachable leader"),
        "{error}"
    );
    assert_eq!(
        cluster.ok(&["call", "probe", &key_a_text]),
        "2",
        "storage-a did not change"
    );
}

/// Seed account 5, and a new account id in the same bucket (a transfer stays in one bucket).
fn same_bucket_accounts() -> (String, String) {
    let bucket = bucket_id(&Key::Uint(5), 1000);
    let to = (11..)
        .find(|&id| bucket_id(&Key::Uint(id), 1000) == bucket)
        .unwrap();
    ("5".to_string(), to.to_string())
}

/// Whether two printed `[id, balance, velocity]` triples have the same id and velocity.
fn same_account(a: &str, b: &str) -> bool {
    let parts = |text: &str| -> Vec<String> {
        text.trim()
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|part| part.trim().to_string())
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    a.len() == 3 && b.len() == 3 && a[0] == b[0] && a[2] == b[2]
}

/// An SDK client that goes through router `router` only.
async fn sdk_through(cluster: &TestCluster, router: &str) -> Client {
    let tls = cluster.data_dir().join("tls");
    let read = |name: &str| std::fs::read_to_string(tls.join(name)).unwrap();
    let mut config = ClientConfig::new(vec![cluster.address_of(router)], read("ca.pem"));
    config.identity = Some(TlsIdentity {
        cert_chain_pem: read("client.pem"),
        key_pem: read("client.key"),
    });
    config.caller = format!("test via {router}");
    Client::connect(config).await.unwrap()
}

/// A pinned call (`f@1`) is parsed and checked against that version's own signature by the
/// CLI, the router and the SDK; an unknown version is refused with the versions that exist.
/// Deploys, upgrades and rollbacks made through router-1 are followed by router-2, which keeps
/// running: calls through it by name get the signature the storages run.
#[test]
fn pinned_versions_through_two_routers() {
    let mut cluster = TestCluster::seed();
    cluster.add_router("router-2");
    cluster.start_seeded();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sdk = runtime.block_on(sdk_through(&cluster, "router-2"));
    let keys = [key_in("storage-a"), key_in("storage-b")];
    let call = |name: &str, version: Option<u32>, args: Vec<Value>| {
        let options = CallOptions {
            version,
            ..CallOptions::default()
        };
        runtime.block_on(sdk.call_with(name, args, options))
    };
    let flag = |key: u64, flag: bool| vec![Value::Uint(key), Value::Bool(flag)];
    let note = |key: u64, note: &str| vec![Value::Uint(key), Value::String(note.into())];
    let via_1 = |args: &[&str]| cluster.ok(&[&["--router", "router-1"], args].concat());
    let via_2 = |args: &[&str]| cluster.ok(&[&["--router", "router-2"], args].concat());
    let fails_via_2 = |args: &[&str]| cluster.fails(&[&["--router", "router-2"], args].concat());

    // router-2 has read the catalog (only the built-in module) before any deploy.
    let account = call("get", None, vec![Value::Uint(5)]).unwrap().to_string();
    assert!(account.starts_with("[5, "), "{account}");

    // Deploy v1 through router-1; router-2 finds the new name.
    let v1 = write(&cluster, "pinned1.wat", PINNED_V1_WAT.as_bytes());
    let v2 = write(&cluster, "pinned2.wat", PINNED_V2_WAT.as_bytes());
    assert!(via_1(&["deploy", &v1]).starts_with("deployed pinned@1"));
    for key in keys {
        assert_eq!(call("f", None, flag(key, true)).unwrap(), Value::Uint(11));
    }

    // Upgrade through router-1 to v2, whose second parameter is a string, not a bool.
    assert!(via_1(&["deploy", &v2]).starts_with("deployed pinned@2"));
    for key in keys {
        // router-2's cached v1 signature does not fit: it reads the catalog again.
        assert_eq!(call("f", None, note(key, "hello")).unwrap(), Value::Uint(5));
        let error = call("f", None, flag(key, true)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
        assert!(
            error
                .to_string()
                .contains("f: parameter `note`: expected string"),
            "{error}"
        );
        // Pinned to v1: v1's own parameters work, v2's are refused naming v1's parameter.
        assert_eq!(
            call("f", Some(1), flag(key, true)).unwrap(),
            Value::Uint(11)
        );
        assert_eq!(
            call("f", Some(1), flag(key, false)).unwrap(),
            Value::Uint(10)
        );
        let error = call("f", Some(1), note(key, "hello")).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
        assert!(
            error
                .to_string()
                .contains("f@1: parameter `flag`: expected bool"),
            "{error}"
        );
        assert_eq!(
            call("f", Some(2), note(key, "abc")).unwrap(),
            Value::Uint(3)
        );
        let error = call("f", Some(9), flag(key, true)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
        assert!(
            error.to_string().contains(
                "no version 9 of `f`: module pinned has `f` in versions 1, 2 (2 is active)"
            ),
            "{error}"
        );
    }

    // The CLI through router-2 parses a pinned call against that version's signature.
    for key in keys.map(|key| key.to_string()) {
        assert_eq!(via_2(&["call", "f@1", &key, "true"]), "11");
        assert_eq!(via_2(&["call", "f", &key, "hello"]), "5");
        assert_eq!(via_2(&["call", "f@2", &key, "hello"]), "5");
        let error = fails_via_2(&["call", "f@1", &key, "hello"]);
        assert!(
            error.contains("f@1: parameter `flag`: expected bool"),
            "names v1's parameter and its type: {error}"
        );
        let error = fails_via_2(&["call", "f@1", &key, "true", "extra"]);
        assert!(
            error.contains("f@1 takes 2 argument(s), got 3: f(id: u64, flag: bool) -> u32"),
            "{error}"
        );
        let error = fails_via_2(&["call", "f@9", &key, "true"]);
        assert!(
            error.contains("no version 9 of `f`: module pinned has `f` in versions 1, 2"),
            "{error}"
        );
        let error = fails_via_2(&["call", "f@latest", &key, "true"]);
        assert!(error.contains("NAME@VERSION"), "{error}");
    }
    let error = cluster.fails(&["--router", "router-9", "call", "get", "5"]);
    assert!(
        error.contains("no router `router-9`; its routers: router-1, router-2"),
        "{error}"
    );

    // The catalog lists both versions, with their own signatures.
    let text = via_2(&["procedures"]);
    assert!(
        text.contains(
            "command  pinned@2  f(id: u64, note: string) -> u32\n\
             command  pinned@1  f(id: u64, flag: bool) -> u32  (inactive: call as f@1)"
        ),
        "{text}"
    );
    let listed = cluster.json(&["--router", "router-2", "procedures", "--json"]);
    let versions: Vec<(u64, bool, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["name"] == "f")
        .map(|entry| {
            (
                entry["version"].as_u64().unwrap(),
                entry["active"].as_bool().unwrap(),
                entry["signature"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            (2, true, "f(id: u64, note: string) -> u32".to_string()),
            (1, false, "f(id: u64, flag: bool) -> u32".to_string()),
        ],
        "{listed}"
    );

    // Roll back through router-1: router-2 follows (its cached v2 signature does not fit).
    via_1(&["rollback", "pinned"]);
    for key in keys {
        assert_eq!(call("f", None, flag(key, true)).unwrap(), Value::Uint(11));
        let error = call("f", None, note(key, "hello")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("f: parameter `flag`: expected bool"),
            "{error}"
        );
        assert_eq!(
            call("f", Some(2), note(key, "hello")).unwrap(),
            Value::Uint(5)
        );
    }

    // Roll forward through router-1. router-2's catalog (v1 active) still accepts v1's
    // arguments, but the storages run v2 and refuse them, naming v2's parameter; after that
    // router-2 reads the catalog again.
    via_1(&["rollback", "pinned", "2"]);
    for key in keys {
        let error = call("f", None, flag(key, true)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
        assert!(error.to_string().contains("`note`"), "{error}");
        assert_eq!(call("f", None, note(key, "hello")).unwrap(), Value::Uint(5));
        assert_eq!(
            call("f", Some(1), flag(key, true)).unwrap(),
            Value::Uint(11)
        );
    }
    assert_eq!(via_2(&["call", "f", &keys[0].to_string(), "hey"]), "3");
}
