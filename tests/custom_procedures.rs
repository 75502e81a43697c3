//! Custom procedure modules on real processes (issue 4): deploy → call → upgrade → call →
//! rollback → call across both replicasets; the example modules; hostile modules that each
//! get a clear error while the nodes keep answering; replica reads equal to the leader's after
//! custom-module writes; the procedure log.

mod common;

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
