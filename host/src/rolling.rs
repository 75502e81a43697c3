//! `billcl restart --rolling`: every running instance restarted one at a time, so that calls
//! go on (a new billcl binary put in place is how the cluster is upgraded without downtime).
//!
//! Per replicaset, its members other than the leader first, each waited for until it has
//! applied what the leader had when it came back; then leadership is handed to the most
//! caught-up of them (`billcl failover`'s graceful hand-over: the leader holds new writes,
//! which routers retry, until the target has its whole log, so no acknowledged write is lost),
//! the old leader is restarted and caught up in turn, and leadership is handed back to it: the
//! replicaset ends as it began. A replicaset of one running member cannot keep serving while
//! it restarts: its calls are refused for that moment (retryable) and the output says so.
//! Then the routers, one at a time (their clients reconnect; the SDK's retries carry their
//! idempotency keys). This is also the order an upgrade needs: a leader of a newer build may
//! write log entries an older member stops at, so the followers go first
//! (docs/ARCHITECTURE.md, "Decisions").

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use billcl_client::Peer;
use serde_json::json;

use crate::config::{ClusterConfig, Role};
use crate::failover::hand_over;
use crate::process::running_pid;
use crate::router::admin_request;
use crate::verify::{leader_of, member_links, statuses, tool_endpoint, MemberLink};

/// How long a restarted instance may take to answer, and a restarted member to catch up with
/// its leader.
pub const ROLLING_WAIT_MS_MAX: u64 = 120_000;
/// How often a rolling restart looks whether an instance is back.
const ROLLING_POLL_MS: u64 = 100;

/// `billcl restart --rolling`.
pub async fn rolling_restart(config: &ClusterConfig, as_json: bool) -> Result<()> {
    let endpoint = tool_endpoint(config)?;
    let mut steps = Vec::new();
    let mut say = |step: String| {
        if !as_json {
            println!("{step}");
        }
        steps.push(step);
    };
    for replicaset in config.replicasets.keys() {
        let links = member_links(config, &endpoint, replicaset);
        let running: Vec<&MemberLink> = links
            .iter()
            .filter(|link| running_pid(config, &link.name).is_some())
            .collect();
        if running.is_empty() {
            say(format!("{replicaset}: no member runs here; left as it is"));
            continue;
        }
        let leader = leader_of(&statuses(&links).await).map(|at| &links[at]);
        let Some(leader) = leader.filter(|leader| running.iter().any(|l| l.name == leader.name))
        else {
            bail!(
                "{replicaset} has no leader running here to hand over from: `billcl info` says \
                 why; nothing more was restarted"
            );
        };
        for member in running.iter().filter(|link| link.name != leader.name) {
            restart(config, member)?;
            let applied = caught_up(member, leader).await?;
            say(format!(
                "{}: restarted, and applied its leader's log up to index {applied}",
                member.name
            ));
        }
        if running.len() == 1 {
            restart(config, leader)?;
            wait_for_leader(replicaset, &links).await?;
            say(format!(
                "{}: restarted; {replicaset} has no other member running, so its calls were \
                 refused (retryable) while it restarted",
                leader.name
            ));
            continue;
        }
        // A voter takes over if one runs (no membership change), else a learner.
        let mut others: Vec<&&MemberLink> = running
            .iter()
            .filter(|link| link.name != leader.name)
            .collect();
        others.sort_by_key(|link| !link.voter);
        let moved = hand_over(config, replicaset, &links, Some(&others[0].name)).await?;
        let new_name = moved["leader"].as_str().unwrap_or_default().to_string();
        say(format!(
            "{replicaset}: leadership handed to {new_name} ({} ms)",
            moved["elapsed_ms"]
        ));
        let new_leader = links
            .iter()
            .find(|link| link.name == new_name)
            .context("the new leader is a member")?;
        // The hand-over may have swapped the voter flags of the cluster file (a learner that
        // took over is a voter now, the old leader a learner): read it again.
        let config = ClusterConfig::load(&config.path)?;
        restart(&config, leader)?;
        let applied = caught_up(leader, new_leader).await?;
        say(format!(
            "{}: restarted, and applied its leader's log up to index {applied}",
            leader.name
        ));
        let back = hand_over(&config, replicaset, &links, Some(&leader.name)).await?;
        say(format!(
            "{replicaset}: leadership handed back to {} ({} ms)",
            leader.name, back["elapsed_ms"]
        ));
    }
    for instance in config.instances() {
        let Role::Router { address } = instance.role else {
            continue;
        };
        if running_pid(config, &instance.name).is_none() {
            continue;
        }
        let link = MemberLink {
            name: instance.name.clone(),
            node_id: 0,
            voter: false,
            peer: Peer::new(
                endpoint.clone(),
                address,
                crate::tls::SERVER_NAME.to_string(),
                Duration::from_millis(config.limits.request_timeout_ms),
            ),
        };
        restart(config, &link)?;
        answers(&link, "stats").await?;
        say(format!(
            "{}: restarted (its clients reconnect; calls in flight were refused, retryable)",
            instance.name
        ));
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "steps": steps }))?
        );
    }
    Ok(())
}

/// Stops and starts one instance (the process calls block: off the async workers).
fn restart(config: &ClusterConfig, link: &MemberLink) -> Result<()> {
    let names = std::slice::from_ref(&link.name);
    tokio::task::block_in_place(|| {
        crate::process::stop(config, names)?;
        crate::process::start(config, names)
    })
}

/// Waits until `member` answers and has applied what `leader` had applied when it did;
/// answers that index.
async fn caught_up(member: &MemberLink, leader: &MemberLink) -> Result<u64> {
    answers(member, "status").await?;
    let applied = |status: &serde_json::Value| status["raft"]["last_applied"].as_u64();
    let target = admin_request(&leader.peer, "status", "{}")
        .await
        .ok()
        .as_ref()
        .and_then(applied)
        .with_context(|| format!("{} does not answer its status", leader.name))?;
    poll(member, "status", "to apply its leader's log", |status| {
        applied(status).filter(|at| *at >= target)
    })
    .await
}

/// Waits until `link` answers `verb` (a storage its `status`, a router its `stats`).
async fn answers(link: &MemberLink, verb: &str) -> Result<()> {
    poll(link, verb, "to answer", |_| Some(0)).await.map(|_| ())
}

/// Asks `link` the admin `verb` every [`ROLLING_POLL_MS`] until `done` gives a value from its
/// answer, for at most [`ROLLING_WAIT_MS_MAX`].
async fn poll(
    link: &MemberLink,
    verb: &str,
    what: &str,
    mut done: impl FnMut(&serde_json::Value) -> Option<u64>,
) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_millis(ROLLING_WAIT_MS_MAX);
    loop {
        if let Ok(status) = admin_request(&link.peer, verb, "{}").await {
            if let Some(value) = done(&status) {
                return Ok(value);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not come back {what} within {} s (its log file says why); the rolling \
                 restart stops here",
                link.name,
                ROLLING_WAIT_MS_MAX / 1000
            );
        }
        tokio::time::sleep(Duration::from_millis(ROLLING_POLL_MS)).await;
    }
}

/// Waits until `replicaset` has a leader again.
async fn wait_for_leader(replicaset: &str, links: &[MemberLink]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(ROLLING_WAIT_MS_MAX);
    while leader_of(&statuses(links).await).is_none() {
        if Instant::now() >= deadline {
            bail!("{replicaset} has no leader again after its restart; `billcl info` says why");
        }
        tokio::time::sleep(Duration::from_millis(ROLLING_POLL_MS)).await;
    }
    Ok(())
}
