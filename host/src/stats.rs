//! `billcl stats`: what each instance has served since it started, and at what rate now —
//! Tarantool's `box.stat()` (requests by kind, with their rate), plus what a billing store's
//! operator watches: calls and their errors by code, how long answers took, and on storages
//! the Raft indexes, the log's group commits and `fdatasync`s, accounts, buckets and memory.
//!
//! Each instance counts as it serves ([`billcl_client::ServerStats`]: relaxed atomics, a few
//! per request; its log writer the same, `billcl_replication::LogCounters`) and answers the
//! `stats` admin verb with its counters. The CLI asks every instance twice, `--interval` apart,
//! and prints the totals with the rates between the two; `--prometheus` prints the totals in
//! Prometheus' text format (for node_exporter's textfile collector: every link of the cluster
//! stays QUIC), `--json` both.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};
use billcl_client::{Peer, StatsSnapshot};
use serde_json::{json, Value as Json};

use crate::config::ClusterConfig;
use crate::router::admin_request;

/// What an instance answers to `stats`: its server's counters and its memory; the caller
/// adds what its role knows.
pub fn server_json(snapshot: &StatsSnapshot) -> Json {
    let requests: serde_json::Map<String, Json> = snapshot
        .requests
        .iter()
        .map(|(kind, count)| (kind.to_string(), json!(count)))
        .collect();
    let errors: serde_json::Map<String, Json> = snapshot
        .errors
        .iter()
        .map(|(code, count)| (code.name().to_string(), json!(count)))
        .collect();
    let memory = crate::process::memory_of(std::process::id() as i32).map(|m| m.to_json());
    json!({
        "connections": {
            "accepted": snapshot.connections_accepted,
            "refused": snapshot.connections_refused,
            "open": snapshot.connections_open,
        },
        "requests": requests,
        "malformed": snapshot.malformed,
        "calls": snapshot.calls,
        "answers": { "values": snapshot.values, "errors": errors },
        "latency": {
            // [upper bound in µs (null: none), answers that took at most that], cumulative.
            "buckets": snapshot
                .latency
                .iter()
                .map(|(bound, count)| json!([(*bound != u64::MAX).then_some(*bound), count]))
                .collect::<Vec<_>>(),
            "seconds": snapshot.latency_micros as f64 / 1e6,
        },
        "memory": memory,
    })
}

/// `billcl stats [INSTANCE…]`.
pub async fn cli_stats(
    config: &ClusterConfig,
    names: &[String],
    interval: f64,
    as_json: bool,
    prometheus: bool,
) -> Result<()> {
    let instances = config.instances();
    for name in names {
        if !instances.iter().any(|instance| instance.name == *name) {
            let known: Vec<&str> = instances.iter().map(|i| i.name.as_str()).collect();
            bail!(
                "no instance {name} in {}; known: {}",
                config.path.display(),
                known.join(", ")
            );
        }
    }
    if !(0.0..=60.0).contains(&interval) {
        bail!("--interval is 0 to 60 seconds (0: totals only, no rates), got {interval}");
    }
    let endpoint = crate::verify::tool_endpoint(config)?;
    let timeout = Duration::from_millis(config.limits.request_timeout_ms);
    let peers: Vec<(String, Peer)> = instances
        .into_iter()
        .filter(|instance| names.is_empty() || names.contains(&instance.name))
        .map(|instance| {
            let peer = Peer::new(
                endpoint.clone(),
                instance.address(),
                crate::tls::SERVER_NAME.to_string(),
                timeout,
            );
            (instance.name, peer)
        })
        .collect();
    let ask_all = || async {
        let asks = peers.iter().map(|(_, peer)| async move {
            admin_request(peer, "stats", "{}")
                .await
                .map_err(|reply| reply.message)
        });
        futures_util::future::join_all(asks).await
    };
    let first = ask_all().await;
    let (before, now) = if interval > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(interval)).await;
        (Some(first), ask_all().await)
    } else {
        (None, first)
    };
    let mut reports = BTreeMap::new();
    let mut unreachable = Vec::new();
    for (index, (name, _)) in peers.iter().enumerate() {
        match &now[index] {
            Ok(stats) => {
                let earlier = before.as_ref().and_then(|b| b[index].as_ref().ok());
                let mut report = stats.clone();
                if let Some(earlier) = earlier {
                    report["rates"] = rates(earlier, stats, interval);
                }
                reports.insert(name.clone(), report);
            }
            Err(why) => {
                unreachable.push(name.clone());
                reports.insert(name.clone(), json!({ "error": why }));
            }
        }
    }
    if prometheus {
        print!("{}", prometheus_text(&reports));
    } else if as_json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for (name, report) in &reports {
            print!("{}", describe(name, report));
        }
    }
    if !unreachable.is_empty() {
        bail!(
            "{} did not answer (`billcl status` shows which instances run here)",
            unreachable.join(", ")
        );
    }
    Ok(())
}

/// A counter at `path` (keys into the JSON), 0 when absent.
fn counter(stats: &Json, path: &[&str]) -> f64 {
    path.iter()
        .fold(stats, |json, key| &json[*key])
        .as_f64()
        .unwrap_or(0.0)
}

/// Per-second rates between two answers of one instance, and the answers' latency over the
/// interval (from the histograms' difference).
fn rates(before: &Json, now: &Json, seconds: f64) -> Json {
    let rate = |path: &[&str]| (counter(now, path) - counter(before, path)).max(0.0) / seconds;
    let mut rates = json!({
        "calls": rate(&["calls"]),
        "values": rate(&["answers", "values"]),
        "errors": error_total(now).saturating_sub(error_total(before)) as f64 / seconds,
    });
    let mut requests = serde_json::Map::new();
    for kind in now["requests"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        requests.insert(kind.clone(), json!(rate(&["requests", kind])));
    }
    rates["requests"] = Json::Object(requests);
    if now["log"].is_object() {
        rates["log"] = json!({
            "group_commits": rate(&["log", "group_commits"]),
            "syncs": rate(&["log", "syncs"]),
            "bytes_written": rate(&["log", "bytes_written"]),
        });
        let syncs = counter(now, &["log", "syncs"]) - counter(before, &["log", "syncs"]);
        let sync_seconds =
            counter(now, &["log", "sync_seconds"]) - counter(before, &["log", "sync_seconds"]);
        if syncs > 0.0 {
            rates["log"]["sync_mean_ms"] = json!(sync_seconds / syncs * 1e3);
        }
    }
    let buckets = |stats: &Json| -> Vec<(Option<u64>, u64)> {
        stats["latency"]["buckets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pair| (pair[0].as_u64(), pair[1].as_u64().unwrap_or(0)))
            .collect()
    };
    let (b, n) = (buckets(before), buckets(now));
    if b.len() == n.len() {
        let delta: Vec<(Option<u64>, u64)> = n
            .iter()
            .zip(&b)
            .map(|((bound, now), (_, before))| (*bound, now.saturating_sub(*before)))
            .collect();
        rates["latency"] = latency_json(&delta);
    }
    rates
}

fn error_total(stats: &Json) -> u64 {
    stats["answers"]["errors"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, count)| count.as_u64())
        .sum()
}

/// p50 / p99 / max as the bucket bounds they fall under, from cumulative `(bound, count)`s.
fn latency_json(buckets: &[(Option<u64>, u64)]) -> Json {
    let total = buckets.last().map_or(0, |(_, count)| *count);
    if total == 0 {
        return json!(null);
    }
    let at = |quantile: f64| {
        let rank = ((total as f64) * quantile).ceil().max(1.0) as u64;
        buckets
            .iter()
            .find(|(_, count)| *count >= rank)
            .and_then(|(bound, _)| *bound)
    };
    json!({ "p50_at_most_us": at(0.5), "p99_at_most_us": at(0.99), "answers": total })
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bound_text(bound: &Json) -> String {
    match bound.as_u64() {
        Some(us) if us >= 1000 => format!("≤ {} ms", us as f64 / 1000.0),
        Some(us) => format!("≤ {us} µs"),
        None => "> 1 s".to_string(),
    }
}

/// One instance as `billcl stats` prints it.
fn describe(name: &str, report: &Json) -> String {
    let mut out = String::new();
    if let Some(why) = report["error"].as_str() {
        let _ = writeln!(out, "{name}: no answer: {why}");
        return out;
    }
    let rates = &report["rates"];
    let per_second = |value: &Json| {
        value.as_f64().map_or_else(String::new, |rate| {
            format!(" ({}/s)", thousands(rate.round() as u64))
        })
    };
    let raft = &report["raft"];
    let role = match raft["role"].as_str() {
        Some(role) => format!(
            "storage, {role}, term {}, applied {}",
            raft["term"], raft["last_applied"]
        ),
        None => "router".to_string(),
    };
    let _ = writeln!(
        out,
        "{name} ({role}): {} connections open",
        report["connections"]["open"]
    );
    let errors: Vec<String> = report["answers"]["errors"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(code, count)| format!("{code} {count}"))
        .collect();
    let _ = writeln!(
        out,
        "  calls     {}{}; errors {}{}{}",
        thousands(report["calls"].as_u64().unwrap_or(0)),
        per_second(&rates["calls"]),
        thousands(error_total(report)),
        per_second(&rates["errors"]),
        if errors.is_empty() {
            String::new()
        } else {
            format!(": {}", errors.join(", "))
        }
    );
    let latency = if rates["latency"].is_object() {
        &rates["latency"]
    } else {
        &report["latency"]
    };
    if let Some(p50) = latency.get("p50_at_most_us") {
        let _ = writeln!(
            out,
            "  answers   p50 {}, p99 {} (this interval)",
            bound_text(p50),
            bound_text(&latency["p99_at_most_us"])
        );
    }
    let requests: Vec<String> = report["requests"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, count)| count.as_u64() != Some(0))
        .map(|(kind, count)| {
            format!(
                "{kind} {}{}",
                thousands(count.as_u64().unwrap_or(0)),
                per_second(&rates["requests"][kind])
            )
        })
        .collect();
    let _ = writeln!(out, "  requests  {}", requests.join(", "));
    if report["log"].is_object() {
        let log = &report["log"];
        let mean = rates["log"]["sync_mean_ms"]
            .as_f64()
            .map_or_else(String::new, |ms| format!(", mean {ms:.2} ms"));
        let _ = writeln!(
            out,
            "  log       group commits {}{}; fsyncs {}{}{mean}; {} MB written{}",
            thousands(log["group_commits"].as_u64().unwrap_or(0)),
            per_second(&rates["log"]["group_commits"]),
            thousands(log["syncs"].as_u64().unwrap_or(0)),
            per_second(&rates["log"]["syncs"]),
            log["bytes_written"].as_u64().unwrap_or(0) >> 20,
            rates["log"]["bytes_written"]
                .as_f64()
                .map_or_else(String::new, |bytes| format!(
                    " ({:.1} MB/s)",
                    bytes / f64::from(1 << 20)
                ))
        );
        let _ = writeln!(
            out,
            "  data      {} accounts; buckets {}",
            thousands(report["accounts"].as_u64().unwrap_or(0)),
            report["buckets"]
        );
    }
    if let Some(resident) = report["memory"]["resident_bytes"].as_u64() {
        let _ = writeln!(out, "  memory    {} MB resident", resident >> 20);
    }
    out
}

/// One value per instance: `(metric, type, help, path into an instance's stats, whether
/// storages alone have it)`.
const PER_INSTANCE: [(&str, &str, &str, &[&str], bool); 10] = [
    (
        "billcl_calls_total",
        "counter",
        "Calls an instance received.",
        &["calls"],
        false,
    ),
    (
        "billcl_connections_open",
        "gauge",
        "Connections open to an instance.",
        &["connections", "open"],
        false,
    ),
    (
        "billcl_resident_memory_bytes",
        "gauge",
        "Resident memory of an instance's process.",
        &["memory", "resident_bytes"],
        false,
    ),
    (
        "billcl_log_group_commits_total",
        "counter",
        "Batches of log appends made durable together.",
        &["log", "group_commits"],
        true,
    ),
    (
        "billcl_log_syncs_total",
        "counter",
        "fdatasyncs of log segments.",
        &["log", "syncs"],
        true,
    ),
    (
        "billcl_log_sync_seconds_total",
        "counter",
        "Time spent in fdatasync of log segments.",
        &["log", "sync_seconds"],
        true,
    ),
    (
        "billcl_log_written_bytes_total",
        "counter",
        "Bytes of entries written to the log.",
        &["log", "bytes_written"],
        true,
    ),
    (
        "billcl_raft_last_applied_index",
        "gauge",
        "The last log index this member applied.",
        &["raft", "last_applied"],
        true,
    ),
    (
        "billcl_raft_term",
        "gauge",
        "The Raft term this member is in.",
        &["raft", "term"],
        true,
    ),
    (
        "billcl_accounts",
        "gauge",
        "Accounts this member holds.",
        &["accounts"],
        true,
    ),
];

/// The totals in Prometheus' text exposition format, one family at a time; an instance that
/// did not answer has no lines.
fn prometheus_text(reports: &BTreeMap<String, Json>) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    let answering = || reports.iter().filter(|(_, r)| r["error"].is_null());
    for (metric, kind, help, path, storages_only) in PER_INSTANCE {
        family(&mut out, metric, kind, help);
        for (name, report) in answering() {
            if storages_only && !report["log"].is_object() {
                continue;
            }
            let value = path.iter().fold(report, |json, key| &json[*key]);
            if !value.is_null() {
                let _ = writeln!(out, "{metric}{{instance=\"{name}\"}} {value}");
            }
        }
    }
    let labelled = [
        (
            "billcl_call_answers_total",
            "counter",
            "Calls answered, by outcome: value, or the error code.",
        ),
        (
            "billcl_requests_total",
            "counter",
            "Requests an instance received, by kind.",
        ),
    ];
    for (metric, kind, help) in labelled {
        family(&mut out, metric, kind, help);
        for (name, report) in answering() {
            let lines: Vec<(String, &Json)> = if metric == "billcl_requests_total" {
                let requests = report["requests"].as_object().into_iter().flatten();
                requests
                    .map(|(kind, n)| (format!("kind=\"{kind}\""), n))
                    .collect()
            } else {
                let errors = report["answers"]["errors"]
                    .as_object()
                    .into_iter()
                    .flatten();
                std::iter::once((
                    "outcome=\"value\"".to_string(),
                    &report["answers"]["values"],
                ))
                .chain(errors.map(|(code, n)| (format!("outcome=\"{code}\""), n)))
                .collect()
            };
            for (label, value) in lines {
                let _ = writeln!(out, "{metric}{{instance=\"{name}\",{label}}} {value}");
            }
        }
    }
    family(
        &mut out,
        "billcl_call_answer_seconds",
        "histogram",
        "How long call answers took, from the request read to the answer written.",
    );
    for (name, report) in answering() {
        let buckets = report["latency"]["buckets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for pair in &buckets {
            let le = pair[0]
                .as_u64()
                .map_or_else(|| "+Inf".to_string(), |us| format!("{}", us as f64 / 1e6));
            let _ = writeln!(
                out,
                "billcl_call_answer_seconds_bucket{{instance=\"{name}\",le=\"{le}\"}} {}",
                pair[1]
            );
        }
        let count = buckets.last().map_or(json!(0), |pair| pair[1].clone());
        let sum = &report["latency"]["seconds"];
        let _ = writeln!(
            out,
            "billcl_call_answer_seconds_sum{{instance=\"{name}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "billcl_call_answer_seconds_count{{instance=\"{name}\"}} {count}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(calls: u64, values: u64, latency: &[(Option<u64>, u64)]) -> Json {
        json!({
            "connections": {"accepted": 1, "refused": 0, "open": 1},
            "requests": {"call-stream": calls / 10, "admin": 2},
            "malformed": 0,
            "calls": calls,
            "answers": {"values": values, "errors": {"unavailable": calls - values}},
            "latency": {
                "buckets": latency.iter().map(|(b, c)| json!([b, c])).collect::<Vec<_>>(),
                "seconds": 0.5,
            },
            "log": {
                "group_commits": calls / 5,
                "syncs": calls / 5,
                "sync_seconds": 0.001 * (calls / 5) as f64,
                "bytes_written": calls * 100,
            },
            "raft": {"role": "leader", "term": 2, "last_applied": 9},
            "accounts": 3,
            "buckets": {"active": 500},
            "memory": {"resident_bytes": 50 << 20, "peak_bytes": 60 << 20},
        })
    }

    #[test]
    fn rates_and_latency_come_from_the_difference_of_two_answers() {
        let before = stats(
            1000,
            990,
            &[(Some(100), 500), (Some(1000), 900), (None, 1000)],
        );
        let now = stats(
            3000,
            2980,
            &[(Some(100), 600), (Some(1000), 2880), (None, 3000)],
        );
        let rates = rates(&before, &now, 2.0);
        assert_eq!(rates["calls"], 1000.0);
        assert_eq!(rates["errors"], 5.0);
        assert_eq!(rates["requests"]["call-stream"], 100.0);
        assert_eq!(rates["log"]["syncs"], 200.0);
        assert!((rates["log"]["sync_mean_ms"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        // 2000 answers in the interval: 100 under 100 µs, 1980 under 1 ms, 20 above.
        assert_eq!(rates["latency"]["answers"], 2000);
        assert_eq!(rates["latency"]["p50_at_most_us"], 1000);
        assert_eq!(rates["latency"]["p99_at_most_us"], 1000);
        let mut report = now.clone();
        report["rates"] = rates;
        let text = describe("storage-a-001", &report);
        assert!(
            text.starts_with("storage-a-001 (storage, leader, term 2, applied 9)"),
            "{text}"
        );
        assert!(
            text.contains("calls     3,000 (1,000/s); errors 20 (5/s): unavailable 20"),
            "{text}"
        );
        assert!(text.contains("answers   p50 ≤ 1 ms, p99 ≤ 1 ms"), "{text}");
        assert!(text.contains("fsyncs 600 (200/s), mean 1.00 ms"), "{text}");
    }

    #[test]
    fn prometheus_text_has_a_family_per_metric_and_a_line_per_instance() {
        let mut reports = BTreeMap::new();
        reports.insert(
            "storage-a-001".to_string(),
            stats(10, 9, &[(Some(100), 9), (None, 10)]),
        );
        reports.insert("router-a-001".to_string(), json!({"error": "no answer"}));
        let text = prometheus_text(&reports);
        let calls = "# TYPE billcl_calls_total counter\n\
                     billcl_calls_total{instance=\"storage-a-001\"} 10\n";
        assert!(text.contains(calls), "{text}");
        assert!(text.contains(
            "billcl_call_answers_total{instance=\"storage-a-001\",outcome=\"unavailable\"} 1"
        ));
        assert!(text.contains(
            "billcl_call_answer_seconds_bucket{instance=\"storage-a-001\",le=\"0.0001\"} 9"
        ));
        assert!(text.contains(
            "billcl_call_answer_seconds_bucket{instance=\"storage-a-001\",le=\"+Inf\"} 10"
        ));
        assert!(text.contains("billcl_call_answer_seconds_count{instance=\"storage-a-001\"} 10"));
        assert!(text.contains("billcl_log_syncs_total{instance=\"storage-a-001\"} 2"));
        assert!(
            !text.contains("router-a-001"),
            "an instance that did not answer has no lines"
        );
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }
}
