//! `billcl verify`: are the members of each replicaset identical?
//!
//! Comparing states that are still changing proves nothing, so the comparison is made at one
//! log index: `verify` proposes a [`Command::Digest`] on each leader; every member, when it
//! applies that entry, hashes its whole state ([`state_digest`]) and records the hash by index
//! ([`Digests`]). `verify` then asks every member for the hash at that index and reports any
//! difference. The state is all `BTreeMap`s and `Vec`s, so its encoding — and the hash — is
//! the same on members that applied the same commands.
//!
//! The storage side answers two admin verbs ([`storage_admin`]): `digest-propose` (leader) and
//! `digest {"index"}` (any member); and two maintenance verbs: `snapshot` (build one now:
//! `billcl snapshot`, [`snapshot`]) and `fill-accounts` (bulk-create accounts through the log,
//! to measure restarts). The tool side ([`verify`], [`snapshot`]) talks to the storages
//! directly with the cluster's client certificate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use billcl_client::Peer;
use billcl_proto::message::{ErrorCode, ErrorReply, Response};
use billcl_proto::Value;
use serde_json::json;

use crate::config::{ClusterConfig, Role};
use crate::router::admin_request;
use crate::state::{Command, State};
use crate::storage::{error, parse_body, StorageNode};

/// Digests a member keeps (the newest ones, by log index).
pub const DIGESTS_KEPT_MAX: usize = 64;
/// How long `verify` waits for every member to apply the digest entry.
pub const VERIFY_WAIT_MS_MAX: u64 = 15_000;
/// How long `billcl snapshot` waits for one instance's snapshot (serializing and writing
/// 100,000 accounts takes well under a second here; a large state on a slow disk, minutes).
pub const SNAPSHOT_WAIT_MS_MAX: u64 = 600_000;
/// How often `billcl snapshot` looks whether the snapshot is there.
const SNAPSHOT_POLL_MS: u64 = 50;
/// A request for a snapshot made while an older one is being built is ignored: asked again
/// this often until one at the index wanted is there.
const SNAPSHOT_ASK_AGAIN_MS: u64 = 1_000;

/// The digests this member computed, by the log index of their `Digest` entry.
#[derive(Default)]
pub struct Digests(Mutex<BTreeMap<u64, u64>>);

impl Digests {
    fn record(&self, index: u64, digest: u64) {
        let mut digests = self.0.lock().expect("digests lock");
        digests.insert(index, digest);
        while digests.len() > DIGESTS_KEPT_MAX {
            digests.pop_first();
        }
    }

    fn at(&self, index: u64) -> Option<u64> {
        self.0.lock().expect("digests lock").get(&index).copied()
    }
}

/// FNV-1a (64 bits) over everything written to it: a stable hash with no dependency, fed by
/// the state's bincode encoding without materializing it.
struct Fnv64(u64);

impl std::io::Write for Fnv64 {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The hash of a whole replicated state (deterministic: the same on every member that applied
/// the same commands).
pub fn state_digest(state: &State) -> u64 {
    let mut hasher = Fnv64(0xcbf2_9ce4_8422_2325);
    bincode::serialize_into(&mut hasher, state).expect("state always serializes");
    // As before move generations while no bucket has moved (a member of an earlier build
    // digests the same state to the same value).
    if !state.moves.is_empty() {
        bincode::serialize_into(&mut hasher, &state.moves).expect("a map always serializes");
    }
    // The same for depletions while none was recorded.
    if !state.depletions.is_empty() {
        bincode::serialize_into(&mut hasher, &state.depletions).expect("depletions serialize");
    }
    // And for a bucket staged part by part while there is none.
    if let Some(staged) = &state.staged {
        bincode::serialize_into(&mut hasher, staged).expect("a staged bucket serializes");
    }
    hasher.0
}

/// Applies a `Digest` log entry at `index`: hashes the state and records it.
pub fn apply_digest(state: &State, digests: &Digests, index: u64) -> Response {
    let digest = state_digest(state);
    digests.record(index, digest);
    Response::Value(Value::Record(vec![
        ("index".to_string(), Value::Uint(index)),
        ("digest".to_string(), Value::Uint(digest)),
    ]))
}

fn hex(digest: u64) -> String {
    format!("{digest:016x}")
}

/// The storage's answers to the verify verbs; `None` for any other verb.
pub async fn storage_admin(
    node: &StorageNode,
    verb: &str,
    body: &str,
) -> Option<Result<serde_json::Value, ErrorReply>> {
    match verb {
        "digest-propose" => Some(propose_digest(node).await),
        "digest" => Some(digest_at(node, body)),
        "snapshot" => Some(
            node.replica
                .snapshot_now()
                .await
                .map(|()| json!({ "snapshot": "started" }))
                .map_err(|e| error(ErrorCode::Unavailable, e.to_string())),
        ),
        "fill-accounts" => Some(fill_accounts(node, body).await),
        _ => None,
    }
}

/// `fill-accounts {"first_id", "count", "balance"}` (balance in micro-units): bulk-creates
/// accounts through the log, for benchmarks and restart measurements.
async fn fill_accounts(node: &StorageNode, body: &str) -> Result<serde_json::Value, ErrorReply> {
    let request = parse_body(body)?;
    let command = Command::FillAccounts {
        first_id: request["first_id"].as_u64().unwrap_or(1),
        count: request["count"].as_u64().unwrap_or(0),
        balance_micros: request["balance"].as_i64().unwrap_or(0),
        timestamp_ms: crate::storage::now_ms(),
    };
    match node.propose(command).await? {
        Response::Value(Value::Uint(created)) => Ok(json!({ "created": created })),
        Response::Error(reply) => Err(reply),
        other => Err(error(ErrorCode::Internal, format!("unexpected {other:?}"))),
    }
}

async fn propose_digest(node: &StorageNode) -> Result<serde_json::Value, ErrorReply> {
    match node.propose(Command::Digest).await? {
        Response::Value(Value::Record(fields)) => {
            let field = |name: &str| {
                fields.iter().find_map(|(key, value)| match value {
                    Value::Uint(n) if key == name => Some(*n),
                    _ => None,
                })
            };
            match (field("index"), field("digest")) {
                (Some(index), Some(digest)) => Ok(json!({"index": index, "digest": hex(digest)})),
                _ => Err(error(
                    ErrorCode::Internal,
                    "a digest answer without its fields",
                )),
            }
        }
        Response::Error(reply) => Err(reply),
        other => Err(error(ErrorCode::Internal, format!("unexpected {other:?}"))),
    }
}

fn digest_at(node: &StorageNode, body: &str) -> Result<serde_json::Value, ErrorReply> {
    let request = parse_body(body)?;
    let index = request["index"].as_u64().ok_or_else(|| {
        error(
            ErrorCode::InvalidArgument,
            "digest needs {\"index\": N}, the log index of a Digest entry",
        )
    })?;
    let status = node.replica.status();
    Ok(json!({
        "instance": node.shared.instance,
        "index": index,
        "last_applied": status.last_applied,
        "digest": node.shared.digests.at(index).map(hex),
        "halted": status.halted,
    }))
}

/// A direct link from the tool to one storage.
pub struct MemberLink {
    pub name: String,
    pub node_id: u64,
    pub voter: bool,
    pub peer: Peer,
}

/// Links to every member of `replicaset`, over `endpoint` (mTLS with the tool's identity).
pub fn member_links(
    config: &ClusterConfig,
    endpoint: &quinn::Endpoint,
    replicaset: &str,
) -> Vec<MemberLink> {
    let timeout = Duration::from_millis(config.limits.request_timeout_ms);
    config
        .members(replicaset)
        .into_iter()
        .map(|(node_id, name, address, voter)| MemberLink {
            name,
            node_id,
            voter,
            peer: Peer::new(
                endpoint.clone(),
                address,
                crate::tls::SERVER_NAME.to_string(),
                timeout,
            ),
        })
        .collect()
}

/// The tool's QUIC endpoint for talking to storages directly.
pub fn tool_endpoint(config: &ClusterConfig) -> Result<quinn::Endpoint> {
    let ca = crate::tls::ca_pem(config)?;
    let identity = crate::tls::identity(config, crate::tls::CLIENT_IDENTITY)?;
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("a valid address");
    billcl_client::client_endpoint(&ca, Some(&identity), bind)
        .context("cannot open a QUIC endpoint to reach the storages")
}

/// Every member's `status`, asked at once (`Err` text for those that did not answer).
pub async fn statuses(links: &[MemberLink]) -> Vec<Result<serde_json::Value, String>> {
    let asks = links
        .iter()
        .map(|link| async move {
            admin_request(&link.peer, "status", "{}")
                .await
                .map_err(|reply| reply.message)
        })
        .collect::<Vec<_>>();
    futures_join_all(asks).await
}

/// Awaits futures concurrently, in order (a tiny `join_all`, to avoid a dependency).
pub async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send,
{
    let mut outputs = Vec::with_capacity(futures.len());
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    // Poll all of them together; collect in order.
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, future) in results.iter_mut().zip(pinned.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => *slot = Some(output),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.extend(
        results
            .into_iter()
            .map(|r| r.expect("every future finished")),
    );
    outputs
}

/// The index of the member whose status says it is the leader.
pub fn leader_of(statuses: &[Result<serde_json::Value, String>]) -> Option<usize> {
    statuses
        .iter()
        .position(|s| matches!(s, Ok(json) if json["raft"]["role"] == "leader"))
}

/// `billcl verify`: a digest of every member at one log index per replicaset.
pub async fn verify(config: &ClusterConfig, as_json: bool) -> Result<()> {
    let endpoint = tool_endpoint(config)?;
    let mut reports = Vec::new();
    let mut all_agree = true;
    for replicaset in config.replicasets.keys() {
        let report = verify_replicaset(config, &endpoint, replicaset).await;
        all_agree &= report["agree"] == true;
        reports.push(report);
    }
    let answer = json!({ "replicasets": reports, "agree": all_agree });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        for report in &reports {
            let verdict = if report["agree"] == true {
                "identical"
            } else {
                "DIVERGENT or incomplete"
            };
            println!(
                "{} at index {}: {verdict}",
                report["name"].as_str().unwrap_or("?"),
                report["index"]
            );
            if let Some(error) = report["error"].as_str() {
                println!("  {error}");
            }
            for member in report["members"].as_array().into_iter().flatten() {
                println!(
                    "  {:<24} {}",
                    member["name"].as_str().unwrap_or("?"),
                    member["digest"]
                        .as_str()
                        .or(member["error"].as_str())
                        .unwrap_or("?")
                );
            }
        }
    }
    if !all_agree {
        bail!("the members of some replicaset are not identical (or could not be compared)");
    }
    Ok(())
}

/// `billcl snapshot [INSTANCE…]`, Tarantool's `box.snapshot()`: each storage instance named
/// (every one by default), one after the other so that they do not all pause together,
/// builds a snapshot of its state at least as new as what it had applied when asked, and
/// purges its log behind it (keeping the last entries for members slightly behind): a
/// shorter restart, and the snapshot a backup copies (`billcl backup`, [`crate::backup`]).
/// Prints each one's snapshot index, size and time; fails if one did not snapshot (down, or
/// too slow), after the others.
pub async fn snapshot(config: &ClusterConfig, instances: &[String], as_json: bool) -> Result<()> {
    for name in instances {
        if let Role::Router { .. } = config.instance(name)?.role {
            bail!("{name} is a router: only storage instances keep a log and snapshots");
        }
    }
    let endpoint = tool_endpoint(config)?;
    let mut reports = Vec::new();
    let mut all_done = true;
    let links = config
        .replicasets
        .keys()
        .flat_map(|replicaset| member_links(config, &endpoint, replicaset))
        .filter(|link| instances.is_empty() || instances.contains(&link.name));
    for MemberLink { name, peer, .. } in links {
        let started = tokio::time::Instant::now();
        let report = match snapshot_one(&peer).await {
            Ok((index, bytes)) => json!({
                "name": name,
                "index": index,
                "state_bytes": bytes,
                "ms": started.elapsed().as_millis() as u64,
            }),
            Err(why) => {
                all_done = false;
                json!({ "name": name, "error": why })
            }
        };
        if !as_json {
            match report["error"].as_str() {
                Some(why) => println!("{name:<24} {why}"),
                None => println!(
                    "{name:<24} snapshot at log index {}: {:.1} MiB of state, {:.1} s",
                    report["index"],
                    report["state_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                    report["ms"].as_f64().unwrap_or(0.0) / 1000.0
                ),
            }
        }
        reports.push(report);
    }
    if as_json {
        let answer = json!({ "instances": reports, "ok": all_done });
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    if !all_done {
        bail!("some instances did not snapshot (above); start those that are down and run it again for them");
    }
    Ok(())
}

/// Has the storage behind `peer` build a snapshot at least as new as what it has applied
/// now; returns the snapshot's index and state size.
pub async fn snapshot_one(peer: &Peer) -> std::result::Result<(u64, u64), String> {
    let raft = |peer| async move {
        admin_request(peer, "status", "{}")
            .await
            .map(|status| status["raft"].clone())
            .map_err(|reply| format!("unreachable: {}", reply.message))
    };
    let mut status = raft(peer).await?;
    let Some(applied) = status["last_applied"].as_u64() else {
        return Err("has applied nothing yet: nothing to snapshot".to_string());
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(SNAPSHOT_WAIT_MS_MAX);
    let mut asked_at: Option<tokio::time::Instant> = None;
    loop {
        if let Some(index) = status["snapshot_index"].as_u64().filter(|i| *i >= applied) {
            return Ok((index, status["snapshot_bytes"].as_u64().unwrap_or(0)));
        }
        let ask_again = Duration::from_millis(SNAPSHOT_ASK_AGAIN_MS);
        if asked_at.is_none_or(|at| at.elapsed() >= ask_again) {
            admin_request(peer, "snapshot", "{}")
                .await
                .map_err(|reply| format!("refused the snapshot: {}", reply.message))?;
            asked_at = Some(tokio::time::Instant::now());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no snapshot at log index {applied} or later after {} s (its log file says why)",
                SNAPSHOT_WAIT_MS_MAX / 1000
            ));
        }
        tokio::time::sleep(Duration::from_millis(SNAPSHOT_POLL_MS)).await;
        status = raft(peer).await?;
    }
}

async fn verify_replicaset(
    config: &ClusterConfig,
    endpoint: &quinn::Endpoint,
    replicaset: &str,
) -> serde_json::Value {
    let links = member_links(config, endpoint, replicaset);
    let failed = |why: String| json!({"name": replicaset, "agree": false, "error": why, "index": null, "members": []});
    // The leader takes the digest entry; a leader change in between is retried.
    let mut proposed = None;
    let mut last_error = String::from("no leader found");
    for _ in 0..5 {
        let statuses = statuses(&links).await;
        if let Some(leader) = leader_of(&statuses) {
            match admin_request(&links[leader].peer, "digest-propose", "{}").await {
                Ok(answer) => {
                    proposed = Some(answer);
                    break;
                }
                Err(reply) => last_error = reply.message,
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Some(proposed) = proposed else {
        return failed(format!(
            "{replicaset}: cannot propose a digest: {last_error}"
        ));
    };
    let index = proposed["index"].as_u64().unwrap_or(0);
    let expected = proposed["digest"].as_str().unwrap_or("").to_string();
    let body = json!({ "index": index }).to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(VERIFY_WAIT_MS_MAX);
    let mut members = Vec::new();
    let mut agree = true;
    for link in &links {
        let outcome = loop {
            match admin_request(&link.peer, "digest", &body).await {
                Ok(answer) => {
                    if let Some(digest) = answer["digest"].as_str() {
                        break Ok(digest.to_string());
                    }
                    if let Some(why) = answer["halted"].as_str() {
                        break Err(format!("halted before index {index}: {why}"));
                    }
                    if answer["last_applied"].as_u64().is_some_and(|a| a >= index) {
                        break Err(format!(
                            "applied past index {index} without computing its digest (a snapshot was installed); run verify again"
                        ));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break Err(format!(
                            "has not applied index {index} yet (last applied {})",
                            answer["last_applied"]
                        ));
                    }
                }
                Err(reply) => {
                    if tokio::time::Instant::now() >= deadline {
                        break Err(format!("unreachable: {}", reply.message));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match outcome {
            Ok(digest) => {
                agree &= digest == expected;
                members.push(
                    json!({"name": link.name, "digest": digest, "matches": digest == expected}),
                );
            }
            Err(why) => {
                agree = false;
                members.push(json!({"name": link.name, "digest": null, "error": why}));
            }
        }
    }
    json!({
        "name": replicaset,
        "index": index,
        "digest": expected,
        "members": members,
        "agree": agree,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::WriteSet;
    use billcl_money::{Account, Decimal};

    #[test]
    fn equal_states_have_equal_digests_and_a_change_shows() {
        let mut a = State::new(100);
        let mut b = State::new(100);
        let buckets: Vec<u32> = (1..=100).collect();
        a.assign_buckets(&buckets).unwrap();
        b.assign_buckets(&buckets).unwrap();
        for state in [&mut a, &mut b] {
            let mut writes = WriteSet::default();
            for id in [3, 1, 2] {
                writes.accounts.insert(
                    id,
                    Account::new(id, Decimal::from_micros(5), Decimal::ZERO, 10),
                );
            }
            state.commit(writes.to_writes()).unwrap();
        }
        assert_eq!(state_digest(&a), state_digest(&b));
        let mut writes = WriteSet::default();
        writes.accounts.insert(
            2,
            Account::new(2, Decimal::from_micros(6), Decimal::ZERO, 10),
        );
        b.commit(writes.to_writes()).unwrap();
        assert_ne!(state_digest(&a), state_digest(&b));
    }

    #[test]
    fn only_the_newest_digests_are_kept() {
        let digests = Digests::default();
        for index in 0..(DIGESTS_KEPT_MAX as u64 + 10) {
            digests.record(index, index * 7);
        }
        assert_eq!(digests.at(0), None);
        assert_eq!(
            digests.at(DIGESTS_KEPT_MAX as u64 + 9),
            Some((DIGESTS_KEPT_MAX as u64 + 9) * 7)
        );
    }
}
