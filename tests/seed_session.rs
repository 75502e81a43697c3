//! The seed session, end to end, on real processes: what a user of the original
//! Tarantool + vshard cluster did, step by step (issue 2), including a restart and the
//! errors bad input and down nodes must give.

mod common;

use billcl_proto::bucket::{bucket_id, Key};
use common::TestCluster;

/// `[id, balance, velocity]` printed by `get`, parsed.
fn account(text: &str) -> (u64, f64, String) {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    let parts: Vec<&str> = inner.split(',').map(str::trim).collect();
    assert_eq!(
        parts.len(),
        3,
        "not an [id, balance, velocity] triple: {text}"
    );
    (
        parts[0].parse().unwrap(),
        parts[1].parse().unwrap(),
        parts[2].to_string(),
    )
}

/// `billcl connect` fed `input` on its standard input; what it printed.
fn console(cluster: &TestCluster, input: &str) -> String {
    let run = cluster.billcl_fed(&["connect"], Some(input));
    assert!(run.ok, "billcl connect: {run:?}");
    run.stdout
}

#[test]
fn seed_session() {
    let cluster = TestCluster::seed();

    // 1. start prints each instance; status lists them running with pid and address.
    let out = cluster.ok(&["start"]);
    for name in [
        "router-1",
        "storage-a-001",
        "storage-a-002",
        "storage-b-001",
        "storage-b-002",
    ] {
        assert!(out.contains(name), "start did not mention {name}: {out}");
    }
    let status = cluster.ok(&["status"]);
    for instance in &cluster.instances {
        let line = status
            .lines()
            .find(|l| l.starts_with(&instance.name))
            .unwrap_or_else(|| panic!("{} missing from status: {status}", instance.name));
        assert!(
            line.contains("RUNNING") && line.contains(&instance.address),
            "{line}"
        );
        let pid = cluster.pid_of(&instance.name).unwrap();
        assert!(line.contains(&pid.to_string()), "{line}");
    }
    // Learners yield the CPU to the leaders and the router (`learner_nice`, 19 by default);
    // the others run at the nice they were started with (this test's).
    let own = i64::from(common::stat_nice(std::path::Path::new("/proc/self/stat")).unwrap());
    for row in cluster.json(&["status", "--json"]).as_array().unwrap() {
        let learner = row["role"].as_str().unwrap().contains("learner");
        let expected = if learner { own.max(19) } else { own };
        assert_eq!(row["nice"], expected, "{row}");
        // Each instance's memory, as `ps` would count it (a running node holds megabytes).
        let resident = row["memory"]["resident_bytes"].as_u64().unwrap();
        let peak = row["memory"]["peak_bytes"].as_u64().unwrap();
        assert!(resident > 1 << 20 && peak >= resident, "{row}");
    }
    assert!(
        status.contains("RSS MB") && status.contains("PEAK MB"),
        "{status}"
    );
    // No instance faults in transparent huge pages (2 MiB zeroed inside a page fault stalled a
    // leader's worker for milliseconds; host/main.rs).
    for instance in &cluster.instances {
        let pid = cluster.pid_of(&instance.name).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.lines().any(|line| line == "THP_enabled:\t0"),
            "{}: {status}",
            instance.name
        );
    }
    cluster.wait_ready();

    // 7 (before bootstrap). A call before bootstrap is a clear error.
    let error = cluster.fails(&["call", "get", "4"]);
    assert!(error.contains("bootstrap"), "{error}");
    let info = cluster.json(&["info", "--json"]);
    assert!(
        info["alerts"].to_string().contains("NOT_BOOTSTRAPPED"),
        "{info}"
    );

    // 2. bootstrap spreads 500 / 500; info shows leaders, replicas, totals, no alerts.
    cluster.ok(&["bootstrap"]);
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    assert_eq!(info["bucket"]["unreachable"], 0, "{info}");
    assert_eq!(info["alerts"].as_array().unwrap().len(), 0, "{info}");
    assert_eq!(info["status"], "green", "{info}");
    for (replicaset, leader, replica) in [
        ("storage-a", "storage-a-001", "storage-a-002"),
        ("storage-b", "storage-b-001", "storage-b-002"),
    ] {
        let entry = info["replicasets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == replicaset)
            .unwrap();
        assert_eq!(entry["buckets"]["active"], 500, "{entry}");
        assert_eq!(entry["leader"]["name"], leader, "{entry}");
        assert_eq!(entry["leader"]["status"], "available", "{entry}");
        assert_eq!(entry["replicas"][0]["name"], replica, "{entry}");
    }
    let human = cluster.ok(&["info"]);
    assert!(
        human.contains("available_rw: 1000") && human.contains("alerts: none"),
        "{human}"
    );
    assert!(
        !cluster.billcl(&["bootstrap"]).ok,
        "a second bootstrap must be refused"
    );

    // route: the bucket of key 4 is vshard's bucket_id_mpcrc32(4).
    let bucket_of_4 = bucket_id(&Key::Uint(4), 1000);
    let route = cluster.json(&["route", "4", "--json"]);
    assert_eq!(route["bucket_id"], bucket_of_4);
    let owner_of = |id: u64| {
        if bucket_id(&Key::Uint(id), 1000) <= 500 {
            "storage-a"
        } else {
            "storage-b"
        }
    };
    assert_eq!(route["replicaset"], owner_of(4));

    // 3. insert_data creates the ten seed accounts, each on the replicaset owning it.
    let created = cluster.json(&["call", "insert_data", "--json"]);
    let on_a = (1..=10).filter(|&id| owner_of(id) == "storage-a").count() as u64;
    assert_eq!(created["storage-a"], on_a, "{created}");
    assert_eq!(created["storage-b"], 10 - on_a, "{created}");
    let info = cluster.json(&["info", "--json"]);
    for replicaset in info["replicasets"].as_array().unwrap() {
        let expected = if replicaset["name"] == "storage-a" {
            on_a
        } else {
            10 - on_a
        };
        assert_eq!(replicaset["leader"]["accounts"], expected, "{replicaset}");
        // Replication lag as the leader sees it: replicas only.
        assert!(replicaset["leader"]["behind"].is_null(), "{replicaset}");
        assert!(replicaset["replicas"][0]["behind"].is_u64(), "{replicaset}");
    }
    // Idle, every replica catches up with its leader.
    cluster.wait_for("the replicas to catch up (info: 0 behind)", 30, || {
        let human = cluster.ok(&["info"]);
        (human.matches(", 0 behind").count() == 2).then_some(())
    });
    assert_eq!(account(&cluster.ok(&["call", "get", "3"])).2, "1");
    assert_eq!(account(&cluster.ok(&["call", "get", "8"])).2, "0.00001");
    let (_, balance_7, _) = account(&cluster.ok(&["call", "get", "7"]));
    assert!(balance_7 > 23948000.0, "{balance_7}");

    // 4. The seed session on account 4.
    assert_eq!(cluster.ok(&["call", "get", "4"]), "[4, 0, 0]");
    assert_eq!(cluster.ok(&["call", "add_money", "4", "1000"]), "true");
    assert_eq!(cluster.ok(&["call", "get", "4"]), "[4, 1000, 0]");
    assert_eq!(cluster.ok(&["call", "update_velocity", "4", "100"]), "true");
    let (id, balance, velocity) = account(&cluster.ok(&["call", "get", "4"]));
    assert_eq!((id, velocity.as_str()), (4, "100"));
    assert!(balance > 900.0 && balance <= 1000.0, "{balance}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (_, balance, _) = account(&cluster.ok(&["call", "get", "4"]));
    assert!(
        (700.0..=800.0).contains(&balance),
        "two seconds at 100/s from 1000: {balance}"
    );
    // The seed's name for update_velocity; velocity 0 stops the drain.
    assert_eq!(
        cluster.ok(&["call", "update_spending_velocity", "4", "0"]),
        "true"
    );
    let (_, frozen, velocity) = account(&cluster.ok(&["call", "get", "4"]));
    assert_eq!(velocity, "0");
    // A balance never goes below zero.
    assert_eq!(
        cluster.ok(&["call", "update_velocity", "6", "1000"]),
        "true"
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(cluster.ok(&["call", "get", "6"]), "[6, 0, 1000]");

    // 5. A replica read returns the same account (the learner applied the same log).
    let replica_view = cluster.wait_for("the replica to apply account 4's writes", 20, || {
        let run = cluster.billcl(&["call", "--replica", "get", "4"]);
        (run.ok && account(&run.stdout) == (4, frozen, "0".to_string())).then_some(run.stdout)
    });
    assert_eq!(account(&replica_view).1, frozen);

    // 5b. Account 4's history from its replicaset's log (`tt cat`), read from the files of a
    // running member: the leader's time, bucket and answer of each call, and the row it wrote.
    let on_a_or_b = |replicaset: &str| {
        if replicaset == "storage-a" {
            on_a
        } else {
            10 - on_a
        }
    };
    let history: Vec<serde_json::Value> = cluster
        .ok(&["cat", "--account", "4", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let rows: Vec<(String, String)> = history
        .iter()
        .flat_map(|entry| {
            assert_eq!(entry["instance"], format!("{}-001", owner_of(4)), "{entry}");
            assert_eq!(entry["kind"], "calls", "{entry}");
            entry["calls"].as_array().unwrap().clone()
        })
        .enumerate()
        .map(|(nth, call)| {
            if nth == 0 {
                // insert_data: one call per replicaset, unkeyed, writing its seed accounts.
                assert!(call["bucket"].is_null(), "{call}");
                assert_eq!(call["answer"], on_a_or_b(owner_of(4)), "{call}");
            } else {
                assert_eq!(call["bucket"], bucket_of_4, "{call}");
                assert_eq!(call["answer"], true, "{call}");
            }
            assert!(call["at"].as_str().unwrap().ends_with('Z'), "{call}");
            let rows = call["accounts"].as_array().unwrap();
            let row = rows.iter().find(|row| row["id"] == 4).unwrap_or_else(|| {
                panic!("account 4 written: {call}");
            });
            let text = |field: &str| row[field].as_str().unwrap().to_string();
            (text("balance"), text("velocity"))
        })
        .collect();
    // insert_data, add_money 1000, update_velocity 100, update_spending_velocity 0.
    assert_eq!(rows.len(), 4, "{history:?}");
    assert_eq!(rows[0], ("0".to_string(), "0".to_string()));
    assert_eq!(rows[1], ("1000".to_string(), "0".to_string()));
    assert_eq!(rows[2].1, "100");
    assert_eq!(rows[3], (format!("{frozen}"), "0".to_string()));
    // Each call as it was made: procedure, version, arguments and caller (the audit trail).
    let calls: Vec<String> = history
        .iter()
        .flat_map(|entry| entry["calls"].as_array().unwrap().clone())
        .map(|call| {
            assert_eq!(call["caller"], "billcl-cli", "{call}");
            let name = |field: &str| call[field].as_str().unwrap().to_string();
            let version = &call["version"];
            format!(
                "{}@{version} {}{}",
                name("module"),
                name("procedure"),
                call["args"]
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            "billing@1 insert-data[]",
            r#"billing@1 add-money[4,"1000"]"#,
            r#"billing@1 update-velocity[4,"100"]"#,
            r#"billing@1 update-spending-velocity[4,"0"]"#,
        ],
        "{history:?}"
    );
    let printed = cluster.ok(&["cat", &format!("{}-002", owner_of(4)), "--account", "4"]);
    assert!(
        printed.contains("billing@1 add-money(4, 1000) by billcl-cli  bucket ")
            && printed.contains("account 4: balance 1000 velocity 0 at "),
        "the replica's log holds the same calls: {printed}"
    );
    let printed = cluster.ok(&["cat", "--procedure", "add_money"]);
    assert!(
        printed.contains("add-money(4, 1000)")
            && !printed.contains("update-velocity")
            && !printed.contains("insert-data")
            && !printed.contains("membership"),
        "only add_money's calls: {printed}"
    );
    let error = cluster.fails(&["cat", "router-1"]);
    assert!(error.contains("not a storage instance"), "{error}");

    // 7. Bad input gets a clear error, a non-zero exit, and changes nothing.
    let error = cluster.fails(&["call", "no_such_procedure", "4"]);
    assert!(
        error.contains("no procedure `no_such_procedure`"),
        "{error}"
    );
    let error = cluster.fails(&["call", "add_money", "4", "abc"]);
    assert!(
        error.contains("amount") && error.contains("decimal"),
        "{error}"
    );
    let error = cluster.fails(&["call", "add_money", "4"]);
    assert!(error.contains("2 argument"), "{error}");
    let error = cluster.fails(&["call", "add_money", "4", "0"]);
    assert!(error.contains("must be > 0"), "{error}");
    let error = cluster.fails(&["call", "add_money", "4", "-5"]);
    assert!(error.contains("must be > 0"), "{error}");
    let error = cluster.fails(&["call", "add_money", "4", "9223372036854"]);
    assert!(error.contains("exceed the maximum balance"), "{error}");
    let error = cluster.fails(&["call", "add_money", "4", "99999999999999999999"]);
    assert!(error.contains("amount"), "{error}");
    let error = cluster.fails(&["call", "get", "424242"]);
    assert!(error.contains("account 424242 not found"), "{error}");
    assert!(
        error.contains("hint: create it: `billcl call create-account 424242 BALANCE VELOCITY`"),
        "says what to do: {error}"
    );
    let error = cluster.fails(&["call", "add_money", "424242", "5"]);
    assert!(error.contains("account 424242 not found"), "{error}");

    // The console (`tt connect`): calls, a wrong one that does not end the session, help, and
    // the end of input closes it.
    let printed = console(&cluster, "get 3\nnosuch 1\nget\nhelp\nget 4\n");
    let lines: Vec<&str> = printed.lines().collect();
    assert!(lines[0].starts_with("connected;"), "{printed}");
    assert!(lines[1].starts_with("billcl> [3, "), "{printed}");
    assert!(
        lines[2].starts_with("billcl> error: no procedure `nosuch`"),
        "{printed}"
    );
    assert!(
        lines[3].starts_with("billcl> error: get takes 1 argument(s), got 0"),
        "{printed}"
    );
    assert!(lines[4].starts_with("billcl> NAME ARG..."), "{printed}");
    assert!(
        printed.contains("billcl> [4, "),
        "the session went on after help: {printed}"
    );
    // The operator's verbs run as at the shell; `call` reaches a procedure by any name.
    let printed = console(
        &cluster,
        "route 4\nstats storage-a-001 --interval 0\ncall get 4\n",
    );
    assert!(
        printed.contains("billcl> key 4 -> bucket 42 -> storage-a\n"),
        "{printed}"
    );
    assert!(
        printed.contains("billcl> storage-a-001 (storage, leader, term "),
        "{printed}"
    );
    assert!(printed.contains("billcl> [4, "), "{printed}");
    assert!(
        console(&cluster, "\\q\nget 3\n")
            .trim_end()
            .ends_with("billcl>"),
        "\\q ends it"
    );
    assert_eq!(
        account(&cluster.ok(&["call", "get", "4"])),
        (4, frozen, "0".to_string())
    );

    // `billcl snapshot` (Tarantool's `box.snapshot()`): every storage snapshots its state as
    // of now, one after the other; the restart below starts from those snapshots.
    let snapshots = cluster.json(&["snapshot", "--json"]);
    assert_eq!(snapshots["ok"], true, "{snapshots}");
    let instances = snapshots["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 4, "{snapshots}");
    for instance in instances {
        assert!(instance["index"].as_u64().unwrap() > 0, "{snapshots}");
        assert!(instance["state_bytes"].as_u64().unwrap() > 0, "{snapshots}");
    }
    // A write after it: the next snapshot of its leader is newer.
    let owner = if cluster.ok(&["route", "10"]).contains("storage-a") {
        "storage-a-001"
    } else {
        "storage-b-001"
    };
    let before = instances.iter().find(|i| i["name"] == owner).unwrap()["index"]
        .as_u64()
        .unwrap();
    cluster.ok(&["call", "add_money", "10", "1"]);
    let again = cluster.json(&["snapshot", owner, "--json"]);
    assert_eq!(again["instances"].as_array().unwrap().len(), 1, "{again}");
    assert!(
        again["instances"][0]["index"].as_u64().unwrap() > before,
        "{again} after {snapshots}"
    );
    let text = cluster.ok(&["snapshot", "storage-b-002"]);
    assert!(
        text.starts_with("storage-b-002") && text.contains("snapshot at log index"),
        "{text}"
    );
    let error = cluster.fails(&["snapshot", "router-1"]);
    assert!(error.contains("is a router"), "{error}");

    // 6. stop, start: every account is still there, from the log and snapshots on disk.
    cluster.ok(&["stop"]);
    let status = cluster.ok(&["status"]);
    assert_eq!(status.matches("NOT RUNNING").count(), 5, "{status}");
    cluster.ok(&["start"]);
    cluster.wait_ready();
    cluster.wait_for("buckets to be known after restart", 30, || {
        cluster.billcl(&["call", "get", "4"]).ok.then_some(())
    });
    assert_eq!(
        account(&cluster.ok(&["call", "get", "4"])),
        (4, frozen, "0".to_string())
    );
    assert_eq!(cluster.ok(&["call", "get", "6"]), "[6, 0, 1000]");
    for id in 1..=10u64 {
        cluster.ok(&["call", "get", &id.to_string()]);
    }
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");

    // 8. `billcl bench` (creates accounts 1..=200, the seed's among them, and moves their money):
    // throughput, latency percentiles, no errors, and the CPU each call cost every local
    // instance and the bench, with the machine's busy and stolen time; every call in the
    // latency log.
    let latency_log = cluster.dir.path().join("calls.log");
    let report = cluster.json(&[
        "bench",
        "add_money",
        "--accounts",
        "200",
        "--concurrency",
        "8",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--latency-log",
        latency_log.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["writes"], report["calls"], "{report}");
    let percentile = |name: &str| report["latency_ms"][name].as_f64().unwrap();
    assert!(
        0.0 < percentile("p50")
            && percentile("p50") <= percentile("p99")
            && percentile("p99") <= percentile("p99.9")
            && percentile("p99.9") <= percentile("max"),
        "{report}"
    );
    let log = std::fs::read_to_string(&latency_log).unwrap();
    let mut lines = log.lines();
    let header = lines.next().unwrap();
    assert!(header.contains("origin_monotonic_s"), "{header}");
    let calls: Vec<(u64, u64)> = lines
        .map(|line| match line.split(' ').collect::<Vec<_>>()[..] {
            [start, latency, "w", "ok"] => (start.parse().unwrap(), latency.parse().unwrap()),
            _ => panic!("a latency log line: {line}"),
        })
        .collect();
    assert_eq!(calls.len() as u64, report["calls"].as_u64().unwrap());
    assert!(calls.windows(2).all(|pair| pair[0].0 <= pair[1].0));
    let slowest = calls.iter().map(|call| call.1).max().unwrap();
    assert_eq!(slowest as f64 / 1000.0, percentile("max"), "{report}");
    let cpu = &report["cpu"];
    for instance in &cluster.instances {
        assert!(
            cpu["by_instance_us_per_call"][&instance.name].is_f64(),
            "no CPU figure for {}: {report}",
            instance.name
        );
    }
    assert!(
        cpu["cluster_us_per_call"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(cpu["bench_us_per_call"].is_f64(), "{report}");
    for instance in &cluster.instances {
        let memory = &report["memory"][&instance.name];
        assert!(
            memory["resident_bytes"].as_u64().unwrap() > 1 << 20
                && memory["peak_bytes"].as_u64() >= memory["resident_bytes"].as_u64(),
            "no memory figure for {}: {report}",
            instance.name
        );
    }
    let busy = cpu["machine_busy_percent"].as_f64().unwrap();
    let steal = cpu["machine_steal_percent"].as_f64().unwrap();
    assert!(busy > 0.0 && busy + steal <= 100.0, "{report}");
    let text = cluster.ok(&[
        "bench",
        "get",
        "--accounts",
        "200",
        "--no-create",
        "--duration",
        "0.5",
        "--warmup",
        "0",
    ]);
    assert!(
        text.contains("throughput")
            && text.contains("p99.9")
            && text.contains("cpu         cluster ")
            && text.contains("memory      ")
            && text.contains(" MB (peak "),
        "{text}"
    );
    let error = cluster.fails(&[
        "bench",
        "no_such_procedure",
        "--accounts",
        "10",
        "--no-create",
        "--duration",
        "0.5",
    ]);
    assert!(error.contains("no_such_procedure"), "{error}");

    // A leader down: a named alert, replica reads still served, writes a clear error.
    let key_on_a = (1..=10u64)
        .find(|&id| owner_of(id) == "storage-a")
        .unwrap()
        .to_string();
    cluster.ok(&["stop", "storage-a-001"]);
    let info = cluster.json(&["info", "--json"]);
    let names: Vec<&str> = info["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|alert| alert["name"].as_str().unwrap())
        .collect();
    // The stopped leader is the master alert, not also an unreachable replica.
    assert_eq!(names, ["UNREACHABLE_MASTER"], "{info}");
    assert_eq!(info["status"], "orange", "{info}");
    cluster.ok(&["call", "--replica", "get", &key_on_a]);
    // Its only voter is down and replicas do not campaign: the error says what to do.
    let error = cluster.fails(&["call", "add_money", &key_on_a, "1"]);
    assert!(
        error.contains("replicaset storage-a has no leader")
            && error.contains("`billcl start storage-a-001`")
            && error.contains("`billcl failover storage-a --to storage-a-002 --force`"),
        "{error}"
    );

    // The whole replicaset down: an error naming it, no hang.
    let key_on_b = (1..=10u64)
        .find(|&id| owner_of(id) == "storage-b")
        .unwrap()
        .to_string();
    cluster.ok(&["stop", "storage-b-001", "storage-b-002"]);
    let error = cluster.fails(&["call", "get", &key_on_b]);
    assert!(
        error.contains("replicaset storage-b is down")
            && error.contains("`billcl start storage-b-001 storage-b-002`"),
        "{error}"
    );
    // Reads of the replicaset that is still up are not held back by the one that is down.
    let (id, _, _) = account(&cluster.ok(&["call", "--replica", "get", &key_on_a]));
    assert_eq!(id.to_string(), key_on_a);
    let info = cluster.json(&["info", "--json"]);
    assert!(
        info["alerts"]
            .to_string()
            .contains("UNREACHABLE_REPLICASET"),
        "{info}"
    );
    assert_eq!(info["bucket"]["unreachable"], 500, "{info}");
    assert_eq!(info["status"], "red", "{info}");
    // The alerts say what to do about members known to be down.
    let alerts = info["alerts"].to_string();
    assert!(
        alerts.contains("`billcl start storage-b-001 storage-b-002`")
            && alerts.contains("`billcl failover storage-a --to storage-a-002 --force`"),
        "{info}"
    );
    cluster.ok(&["stop"]);
}

/// A replicaset added to the cluster file after bootstrap holds no bucket until the
/// rebalancer moves its share: with the rebalancer off, `info` says so (a yellow alert)
/// instead of showing green while every call still works; turned on, the first router moves
/// the buckets by itself and `info` is green again.
#[test]
fn a_replicaset_added_after_bootstrap_is_reported_empty_then_filled_by_the_rebalancer() {
    let mut cluster = TestCluster::new(
        &[("storage-a", &[("storage-a-001", true)])],
        "[rebalancer]\nenabled = false\ninterval_ms = 300\n",
    );
    cluster.start_seeded();
    cluster.add_replicaset("storage-c", "storage-c-001");
    cluster.ok(&["start", "storage-c-001"]);
    cluster.wait_ready();
    cluster.ok(&["reload"]);

    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["bucket"]["available_rw"], 1000, "{info}");
    let alerts = info["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{info}");
    assert_eq!(alerts[0]["name"], "EMPTY_REPLICASET", "{info}");
    assert!(
        alerts[0]["message"].as_str().unwrap().contains("storage-c"),
        "{info}"
    );
    assert_eq!(info["status"], "yellow", "{info}");
    let human = cluster.ok(&["info"]);
    assert!(
        human.contains("EMPTY_REPLICASET (yellow)") && human.contains("status: yellow"),
        "{human}"
    );
    assert!(cluster.ok(&["route", "4"]).contains("storage-a"));
    cluster.ok(&["call", "add_money", "4", "10"]);

    // The background rebalancer of the first router, turned on, gives storage-c its share by
    // itself.
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    let text = text.replace("enabled = false", "enabled = true");
    std::fs::write(&cluster.config, text).unwrap();
    let router = cluster.pid_of("router-1");
    let reloaded = cluster.ok(&["reload"]);
    assert!(
        reloaded.contains("router-1: [rebalancer] on: every 300 ms, past a 1.0 % disbalance"),
        "{reloaded}"
    );
    cluster.wait_for("the rebalancer to give storage-c its share", 60, || {
        let info = cluster.json(&["info", "--json"]);
        let storage_c = info["replicasets"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == "storage-c")?
            .clone();
        (storage_c["buckets"]["active"] == 500 && info["status"] == "green").then_some(())
    });
    assert!(cluster.ok(&["route", "4"]).contains("storage-a"));
    let (_, balance, _) = account(&cluster.ok(&["call", "get", "4"]));
    assert!(balance >= 10.0, "{balance}");
    let logs = std::fs::read_to_string(cluster.data_dir().join("router-1").join("router-1.log"))
        .unwrap_or_default();
    assert!(logs.contains("rebalancer moved buckets"), "{logs}");

    // Turned off again (vshard's rebalancer_disable()), it moves nothing for a weight changed.
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    let text = text.replace("enabled = true", "enabled = false").replace(
        "[replicasets.storage-c]\nweight = 1",
        "[replicasets.storage-c]\nweight = 3",
    );
    std::fs::write(&cluster.config, text).unwrap();
    let reloaded = cluster.ok(&["reload"]);
    assert!(
        reloaded.contains("router-1: storage-c weight 1 → 3")
            && reloaded.contains("router-1: [rebalancer] off"),
        "{reloaded}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(info["replicasets"][1]["name"], "storage-c", "{info}");
    assert_eq!(info["replicasets"][1]["buckets"]["active"], 500, "{info}");
    cluster.assert_not_restarted("router-1", router);
    cluster.ok(&["stop"]);
}

/// A router dials every member as it starts: a member that stops later says so as it closes
/// the connection, and the router knows it is down at once — even a learner it never sent a
/// request to (before, the first request that needed that learner, a catalog read among
/// them, waited a second for a handshake that never came).
#[test]
fn a_router_knows_at_once_that_a_member_it_never_asked_has_stopped() {
    let cluster = TestCluster::seed();
    cluster.start_seeded();
    cluster.ok(&["restart", "router-1"]);
    // Calls through the leaders only: the restarted router asks no learner anything.
    for id in 1..=4u64 {
        let id = id.to_string();
        cluster.wait_for("the restarted router to serve calls", 30, || {
            cluster.billcl(&["call", "get", &id]).ok.then_some(())
        });
    }
    cluster.ok(&["stop", "storage-a-002"]);
    let info = cluster.json(&["info", "--json"]);
    let learner = info["replicasets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["replicas"].as_array().unwrap())
        .find(|m| m["name"] == "storage-a-002")
        .unwrap_or_else(|| panic!("no storage-a-002 in {info}"))
        .clone();
    assert_eq!(learner["status"], "unreachable", "{info}");
    assert!(
        learner["error"].as_str().unwrap().contains("it shut down"),
        "{learner}"
    );

    // Restarted behind the router's back (the router's next use of its link finds the link
    // closed by the shutdown): `info` shows it as it is, not "unreachable: it shut down".
    let learner_status = |info: &serde_json::Value| {
        info["replicasets"][0]["replicas"][0]["status"]
            .as_str()
            .map(str::to_string)
    };
    cluster.ok(&["start", "storage-a-002"]);
    cluster.wait_for("the router to find storage-a-002 back", 30, || {
        let info = cluster.json(&["info", "--json"]);
        (learner_status(&info).as_deref() == Some("available")).then_some(())
    });
    cluster.ok(&["restart", "storage-a-002"]);
    // Up again, as its own links say (verify asks every member directly, not the router).
    cluster.wait_for("storage-a-002 to answer after its restart", 30, || {
        cluster.billcl(&["verify"]).ok.then_some(())
    });
    let info = cluster.json(&["info", "--json"]);
    assert_eq!(
        learner_status(&info).as_deref(),
        Some("available"),
        "{info}"
    );
    cluster.ok(&["stop"]);
}

/// The seed cluster, started and seeded; seed account 4 (no velocity: its balance is exact)
/// and the replicaset that holds it.
fn seeded_with_key_of_a_replicaset() -> (TestCluster, &'static str, String) {
    let cluster = TestCluster::seed();
    cluster.start_seeded();
    let key = "4";
    let replicaset = cluster.json(&["route", key, "--json"])["replicaset"]
        .as_str()
        .unwrap()
        .to_string();
    (cluster, key, replicaset)
}

/// A leader paused by a signal (kill -STOP, Ctrl-Z, a debugger) keeps its pid and ports but
/// answers nothing: the cluster sees it unreachable while `billcl start` finds it running.
/// Every verb says which process is paused and how to resume it (before: `status` said
/// RUNNING, `info` advised `billcl start`, which answered "already running", and `stop`
/// waited out its grace period and killed it).
#[test]
fn a_paused_leader_is_named_with_the_way_to_resume_it() {
    const SIGSTOP: i32 = 19;
    let (cluster, key, replicaset) = seeded_with_key_of_a_replicaset();
    let leader = format!("{replicaset}-001");
    let pid = cluster.pid_of(&leader).unwrap();
    let resume = format!("kill -CONT {pid}");
    cluster.signal(&leader, SIGSTOP);

    let status = cluster.ok(&["status"]);
    let line = status.lines().find(|l| l.starts_with(&leader)).unwrap();
    assert!(line.contains("PAUSED"), "{status}");
    assert!(status.contains(&resume), "{status}");
    assert_eq!(
        cluster.json(&["status", "--json", &leader])[0]["status"],
        "paused"
    );

    let error = cluster.fails(&["start", &leader]);
    assert!(
        error.contains(&resume) && error.contains("paused"),
        "{error}"
    );

    // A write to its buckets fails (no leader answers) and the error names the paused process.
    let error = cluster.fails(&["call", "add_money", key, "1"]);
    assert!(error.contains(&replicaset), "{error}");
    assert!(
        error.contains(&format!("note: {leader}'s process {pid}")),
        "{error}"
    );
    assert!(error.contains(&resume), "{error}");

    let info = cluster.wait_for(
        "the router to find the paused leader unreachable",
        30,
        || {
            let info = cluster.json(&["info", "--json"]);
            let member = info["replicasets"]
                .as_array()?
                .iter()
                .flat_map(|r| r["replicas"].as_array().into_iter().flatten())
                .find(|m| m["name"] == leader.as_str())?
                .clone();
            (member["status"] == "unreachable").then_some((info, member))
        },
    );
    let (info, member) = info;
    assert_eq!(member["process"]["pid"], pid, "{member}");
    assert_eq!(member["process"]["state"], "paused", "{member}");
    assert!(
        member["error"].as_str().unwrap().contains(&resume),
        "{member}"
    );
    assert_eq!(info["alerts"][0]["name"], "PAUSED_INSTANCE", "{info}");
    assert!(
        info["alerts"][0]["message"]
            .as_str()
            .unwrap()
            .contains(&resume),
        "{info}"
    );
    let text = cluster.ok(&["info"]);
    assert!(text.contains("PAUSED_INSTANCE (orange)"), "{text}");

    // `stop` resumes it so that it shuts down cleanly at once, not killed after the grace.
    let stopped = cluster.ok(&["stop", &leader]);
    assert!(stopped.contains("has been stopped"), "{stopped}");
    cluster.ok(&["start", &leader]);
    cluster.wait_for("writes to resume after the restart", 60, || {
        cluster
            .billcl(&["call", "add_money", key, "1"])
            .ok
            .then_some(())
    });
    assert!(!cluster.ok(&["status"]).contains("PAUSED"));
    cluster.ok(&["stop"]);
}

/// The only voter of a replicaset comes back with no data (a new disk, its directory removed).
/// Before, it founded a new, empty replicaset in the same term, the router served that, and
/// its replica took the new entries for the ones it held (same term, leader and index) and
/// diverged silently. Now it halts, the cluster says which replica holds the data and the
/// failover that promotes it, and after that failover nothing acknowledged is missing.
#[test]
fn a_leader_that_lost_its_data_halts_and_names_the_replica_to_promote() {
    let (cluster, key, replicaset) = seeded_with_key_of_a_replicaset();
    let (leader, replica) = (format!("{replicaset}-001"), format!("{replicaset}-002"));
    cluster.ok(&["call", "add_money", key, "25"]);
    let before = cluster.ok(&["call", "get", key]);
    // Everything the leader acknowledged is on the replica before the leader goes.
    // A replica still catching up after the seeding may not have applied the module's deploy
    // yet (its answer: no procedure `get`), so a failed read is asked again too.
    cluster.wait_for("the replica to hold the write", 30, || {
        let read = cluster.billcl(&["call", "--replica", "get", key]);
        (read.ok && read.stdout.trim() == before).then_some(())
    });
    cluster.ok(&["stop", &leader]);
    std::fs::remove_dir_all(cluster.data_dir().join(&leader).join("raft")).unwrap();
    cluster.ok(&["start", &leader]);

    let promote = format!("billcl failover {replicaset} --to {replica} --force");
    let info = cluster.wait_for("the leader to halt on its lost data", 30, || {
        let info = cluster.json(&["info", "--json"]);
        let halted = info.to_string().contains("lost its data");
        halted.then_some(info)
    });
    let alert = info["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "HALTED_REPLICA")
        .unwrap_or_else(|| panic!("no HALTED_REPLICA in {info}"))
        .clone();
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains(&leader) && message.contains(&promote),
        "{alert}"
    );
    // The router does not take the halted member's empty state for the replicaset's.
    let rs = info["replicasets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == replicaset.as_str())
        .unwrap();
    assert!(rs["buckets"]["active"].as_u64().unwrap() > 0, "{rs}");
    // Writes and leader reads say why and what to do; the replica still serves reads.
    let error = cluster.fails(&["call", "add_money", key, "1"]);
    assert!(
        error.contains("lost its data") && error.contains(&promote),
        "{error}"
    );
    assert_eq!(cluster.ok(&["call", "--replica", "get", key]), before);

    // What it advises.
    cluster.ok(&["failover", &replicaset, "--to", &replica, "--force"]);
    cluster.wait_for("writes after the promotion", 60, || {
        cluster
            .billcl(&["call", "add_money", key, "1"])
            .ok
            .then_some(())
    });
    let after = cluster.ok(&["call", "get", key]);
    let balance = |text: &str| {
        text.split(',')
            .nth(1)
            .unwrap()
            .trim()
            .parse::<f64>()
            .unwrap()
    };
    // Key 4 has no velocity: its balance is exact, and holds every acknowledged write.
    assert_eq!(
        balance(&after),
        balance(&before) + 1.0,
        "{before} -> {after}"
    );
    cluster.wait_for("every member identical", 60, || {
        cluster.billcl(&["verify"]).ok.then_some(())
    });
    cluster.ok(&["stop"]);
}

/// A new cluster started without one of a replicaset's members: its first voter waits to hear
/// from every member before it founds the replicaset (one that holds data must not be replaced
/// by a new, empty one), and `billcl info` says so and whom to start.
#[test]
fn a_replicaset_is_founded_once_every_member_answers_and_info_says_whom_it_waits_for() {
    let cluster = TestCluster::seed();
    cluster.ok(&[
        "start",
        "router-1",
        "storage-a-001",
        "storage-b-001",
        "storage-b-002",
    ]);
    let info = cluster.wait_for("info to say storage-a waits for storage-a-002", 30, || {
        let info = cluster.json(&["info", "--json"]);
        let alert = info["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == "NOT_FOUNDED")?
            .clone();
        Some((info, alert))
    });
    let (info, alert) = info;
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.contains("storage-a-001") && message.contains("`billcl start storage-a-002`"),
        "{alert}"
    );
    assert!(info["replicasets"][0]["leader"].is_null(), "{info}");
    let text = cluster.ok(&["info"]);
    assert!(text.contains("founding, waits for storage-a-002"), "{text}");
    cluster.ok(&["start", "storage-a-002"]);
    cluster.wait_ready();
    let info = cluster.json(&["info", "--json"]);
    assert!(!info.to_string().contains("founding_waits_for"), "{info}");
    cluster.ok(&["bootstrap"]);
    cluster.ok(&["call", "insert_data"]);
    cluster.ok(&["stop"]);
}

/// `billcl stats` counts what each instance served (Tarantool's `box.stat()`): calls and
/// their errors by code at the router; the calls, group commits and fsyncs of the leader that
/// took them; rates over an interval; the same totals in Prometheus' text format.
#[test]
fn stats_count_each_instances_calls_errors_and_log_syncs() {
    let cluster = TestCluster::seed();
    cluster.start_seeded();
    assert!(cluster.ok(&["route", "4"]).contains("storage-a"));
    let before = cluster.json(&["stats", "--interval", "0", "--json"]);
    for _ in 0..5 {
        cluster.ok(&["call", "add_money", "4", "1"]);
    }
    cluster.fails(&["call", "get", "999999"]);
    let after = cluster.json(&["stats", "--interval", "0", "--json"]);
    let grew = |instance: &str, path: &[&str]| {
        let at = |stats: &serde_json::Value| {
            path.iter()
                .fold(&stats[instance], |json, key| &json[*key])
                .as_u64()
                .unwrap_or(0)
        };
        at(&after) - at(&before)
    };
    assert!(grew("router-1", &["calls"]) >= 6, "{before}\n{after}");
    assert!(grew("router-1", &["answers", "values"]) >= 5, "{after}");
    assert!(
        grew("router-1", &["answers", "errors", "procedure-failed"]) >= 1,
        "{after}"
    );
    assert!(grew("storage-a-001", &["calls"]) >= 5, "{after}");
    assert!(
        grew("storage-a-001", &["log", "group_commits"]) >= 5,
        "{after}"
    );
    assert!(grew("storage-a-001", &["log", "syncs"]) >= 5, "{after}");
    assert_eq!(after["storage-a-002"]["raft"]["role"], "learner", "{after}");
    assert_eq!(after["storage-b-001"]["buckets"]["active"], 500, "{after}");

    let human = cluster.ok(&["stats", "storage-a-001", "--interval", "0.2"]);
    assert!(
        human.starts_with("storage-a-001 (storage, leader, term ")
            && human.contains("  log       group commits ")
            && human.contains("/s)"),
        "{human}"
    );
    let prometheus = cluster.ok(&["stats", "--prometheus", "--interval", "0"]);
    assert!(
        prometheus.contains("# TYPE billcl_calls_total counter\n")
            && prometheus.contains("billcl_log_syncs_total{instance=\"storage-a-001\"} ")
            && prometheus.contains(
                "billcl_call_answers_total{instance=\"router-1\",outcome=\"procedure-failed\"} "
            ),
        "{prometheus}"
    );
    let refused = cluster.fails(&["stats", "nosuch"]);
    assert!(refused.contains("no instance nosuch"), "{refused}");
    cluster.ok(&["stop", "storage-b-002"]);
    let partial = cluster.billcl(&["stats", "--interval", "0"]);
    assert!(!partial.ok, "{}", partial.stdout);
    assert!(
        partial.stdout.contains("storage-b-002: no answer")
            && partial.stderr.contains("storage-b-002 did not answer"),
        "{}\n{}",
        partial.stdout,
        partial.stderr
    );
    cluster.ok(&["stop"]);
}

/// The events of `billcl depletions` for one account, as (seq, at_ms), oldest first.
fn depletions_of(cluster: &TestCluster, account: u64) -> Vec<(u64, i64)> {
    let answer = cluster.json(&["depletions", "--json"]);
    assert_eq!(answer["unavailable"], serde_json::json!([]), "{answer}");
    answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["account"] == account)
        .map(|event| {
            (
                event["seq"].as_u64().unwrap(),
                event["at_ms"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// An account that drains to zero is recorded dry, once, at the moment it ran dry (the role
/// expirationd played): seed account 3 holds 1.5 and drains 1 a second. Topped up, it runs dry
/// again, a new event; the events are replicated (`verify`) and a new leader goes on from them.
#[test]
fn an_account_that_runs_dry_is_recorded_once_per_dry_spell_and_followed() {
    let cluster = TestCluster::seed();
    let started_ms = billcl_host::storage::now_ms();
    cluster.start_seeded();
    let first = cluster.wait_for("account 3 to be recorded dry", 30, || {
        let events = depletions_of(&cluster, 3);
        (!events.is_empty()).then_some(events)
    });
    assert_eq!(first.len(), 1, "{first:?}");
    let (seq, dry_at) = first[0];
    // 1.5 at 1 a second, from insert_data: dry 1.5 s after it.
    assert!(dry_at >= started_ms + 1_500, "{dry_at} vs {started_ms}");
    assert!(dry_at <= billcl_host::storage::now_ms(), "{dry_at}");
    assert_eq!(cluster.ok(&["call", "get", "3"]), "[3, 0, 1]");
    let text = cluster.ok(&["depletions"]);
    assert!(
        text.contains(&format!(
            "account 3 ran dry  (bucket {}",
            bucket_id(&Key::Uint(3), 1000)
        )),
        "{text}"
    );

    // Topped up with 1: dry again a second later, a new event; the first is not repeated.
    cluster.ok(&["call", "add_money", "3", "1"]);
    let replicaset = cluster.json(&["route", "3", "--json"])["replicaset"]
        .as_str()
        .unwrap()
        .to_string();
    let second = cluster.wait_for("account 3 to be recorded dry again", 30, || {
        let events = depletions_of(&cluster, 3);
        (events.len() == 2).then_some(events)
    });
    assert_eq!(second[0], (seq, dry_at));
    assert!(
        second[1].0 > seq && second[1].1 >= dry_at + 1_000,
        "{second:?}"
    );
    cluster.ok(&["verify"]);
    let cat = cluster.ok(&["cat", "--account", "3"]);
    assert!(cat.contains("ran dry: account 3 at"), "{cat}");

    // The replica leads now: it holds the events and records the next dry spell after them.
    cluster.ok(&["failover", &replicaset]);
    cluster.ok(&["call", "add_money", "3", "1"]);
    let third = cluster.wait_for("the new leader to record account 3 dry", 30, || {
        let events = depletions_of(&cluster, 3);
        (events.len() == 3).then_some(events)
    });
    assert_eq!(third[..2], second[..]);
    assert!(third[2].0 > second[1].0, "{third:?}");
    cluster.ok(&["verify"]);
    cluster.ok(&["stop"]);
}

/// `billcl log` shows each instance's own log file, and `billcl logrotate` begins each anew
/// without a restart: the old lines stay in the renamed file, the instance writes the new
/// file from then on, and a stopped instance's log is renamed only.
#[test]
fn instance_logs_are_shown_and_rotated_without_a_restart() {
    let cluster = TestCluster::new(&[("storage-a", &[("storage-a-001", true)])], "");
    cluster.ok(&["start"]);
    cluster.wait_ready();
    let three = cluster.ok(&["log", "storage-a-001", "-n", "3"]);
    assert_eq!(three.lines().count(), 3, "{three}");
    assert!(
        !three.starts_with("storage-a-001: "),
        "one instance: no prefix\n{three}"
    );
    let every = cluster.ok(&["log", "-n", "1"]);
    let names: Vec<&str> = every.lines().filter_map(|l| l.split(": ").next()).collect();
    assert!(names.contains(&"storage-a-001"), "{every}");
    assert!(
        names.len() >= 2,
        "each instance's last line, named\n{every}"
    );

    let dir = cluster.data_dir().join("storage-a-001");
    let log = dir.join("storage-a-001.log");
    let before = std::fs::read_to_string(&log).unwrap();
    assert!(before.contains("starting"), "{before}");
    let pid = cluster.pid_of("storage-a-001");
    let rotated = cluster.ok(&["logrotate"]);
    assert!(rotated.contains("storage-a-001: "), "{rotated}");
    let old: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            name.starts_with("storage-a-001.log.")
        })
        .collect();
    assert_eq!(old.len(), 1, "{old:?}");
    assert!(rotated.contains(&*old[0].to_string_lossy()), "{rotated}");
    assert!(std::fs::read_to_string(&old[0])
        .unwrap()
        .starts_with(&before));
    // The instance writes the new file, with no restart; the next lines go there too.
    let now = std::fs::read_to_string(&log).unwrap();
    assert!(now.contains("log file opened anew"), "{now}");
    assert!(!now.contains("starting"), "{now}");
    cluster.assert_not_restarted("storage-a-001", pid);
    cluster.ok(&["snapshot", "storage-a-001"]);
    cluster.wait_for("the snapshot's line in the new log", 10, || {
        let now = std::fs::read_to_string(&log).ok()?;
        now.contains("snapshot").then_some(())
    });

    // Stopped: the file is renamed, and the next start begins a new one.
    cluster.ok(&["stop", "storage-a-001"]);
    let stopped = cluster.ok(&["logrotate", "storage-a-001"]);
    assert!(stopped.contains("not running"), "{stopped}");
    assert!(!log.exists());
    cluster.ok(&["start", "storage-a-001"]);
    assert!(std::fs::read_to_string(&log).unwrap().contains("starting"));

    // A reader that goes away at once (`billcl logrotate | head -0`) stops the printing, not
    // the rotation: every instance's log is rotated.
    let rotated_logs = |instance: &str| {
        std::fs::read_dir(cluster.data_dir().join(instance))
            .unwrap()
            .filter(|entry| {
                let name = entry.as_ref().unwrap().file_name();
                name.to_string_lossy()
                    .starts_with(&format!("{instance}.log."))
            })
            .count()
    };
    let instances: Vec<String> = std::fs::read_dir(cluster.data_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().to_string())
        .filter(|name| cluster.pid_of(name).is_some())
        .collect();
    assert!(instances.len() >= 2, "{instances:?}");
    let before: Vec<usize> = instances.iter().map(|i| rotated_logs(i)).collect();
    let mut closed = std::process::Command::new(common::billcl_exe())
        .arg("--config")
        .arg(&cluster.config)
        .arg("logrotate")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(closed.stdout.take());
    let status = closed.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut closed.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{status:?}: {stderr}");
    let after: Vec<usize> = instances.iter().map(|i| rotated_logs(i)).collect();
    let more: Vec<usize> = before.iter().map(|b| b + 1).collect();
    assert_eq!(after, more, "{instances:?} {status:?}: {stderr}");
    cluster.ok(&["stop"]);
}
