//! `billcl failover REPLICASET [--to INSTANCE] [--force]`: moving a replicaset's leadership.
//!
//! Graceful (a leader is up): the leader holds new commands (they answer `NotLeader`, so
//! routers retry and follow), waits until the target has every entry of its log, then the
//! target campaigns until it wins, which it can because its log is as long as the leader's
//! (see `elect` for the old leader's lease). No acknowledged write is lost: the target holds
//! all of them before it asks for votes. A learner target is made a voter first and the old
//! leader becomes a learner after, so the replicaset keeps its number of voters (the seed
//! shape, one voter and one learner, swaps roles).
//!
//! Forced (`--force`, no leader reachable, the voters are gone): the target learner is stopped,
//! its Raft state rewritten to make it the only voter of a new term
//! ([`billcl_replication::promote_offline`]), and started again. Writes the old leader
//! acknowledged after the last entry the learner received are lost; the command says up to
//! which index the learner had the log.
//!
//! `billcl voters REPLICASET [--add MEMBER]… [--remove MEMBER]…`: which members vote, changed
//! while the replicaset runs (Raft's joint consensus through the leader): a learner that joined
//! a running replicaset becomes a voter once it has the leader's log, so that three voters
//! elect a new leader by themselves when one is lost.
//!
//! The storage side is six admin verbs ([`storage_admin`]): `hold-writes {"ms"}`,
//! `wait-replicated {"target", "wait_ms"}`, `elect`, `elections {"allow"}`, `heartbeat`,
//! `change-voters {"add", "remove"}`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use billcl_proto::message::{ErrorCode, ErrorReply};
use billcl_replication::Member;
use serde_json::json;

use crate::config::ClusterConfig;
use crate::router::admin_request;
use crate::storage::{error, StorageNode};
use crate::verify::{leader_of, member_links, statuses, tool_endpoint, MemberLink};

/// How long the leader holds new commands during a hand-over (released as soon as it is over).
pub const HANDOVER_HOLD_MS: u64 = 10_000;
/// How long the target may take to receive the leader's whole log.
pub const HANDOVER_CATCH_UP_MS: u64 = 5_000;
/// How long the target may take to win its election.
pub const HANDOVER_ELECTION_MS: u64 = 10_000;
/// How often the hand-over looks at the target and the old leader while the target campaigns.
const ELECTION_POLL_MS: u64 = 25;
/// A campaign not won after this long is started again (a new term).
const ELECTION_RETRY_MS: u64 = 300;

/// The storage's answers to the failover verbs; `None` for any other verb.
pub async fn storage_admin(
    node: &StorageNode,
    verb: &str,
    body: &str,
) -> Option<Result<serde_json::Value, ErrorReply>> {
    let parse = || -> Result<serde_json::Value, ErrorReply> {
        serde_json::from_str(if body.is_empty() { "{}" } else { body })
            .map_err(|e| error(ErrorCode::BadRequest, format!("bad JSON: {e}")))
    };
    let answer = match verb {
        "hold-writes" => parse().map(|request| {
            let ms = request["ms"].as_u64().unwrap_or(0);
            node.replica.hold_writes(ms);
            tracing::info!(ms, "holding new commands for a leadership hand-over");
            json!({ "held_ms": ms })
        }),
        "wait-replicated" => match parse() {
            Err(reply) => Err(reply),
            Ok(request) => {
                let target = request["target"].as_u64().unwrap_or(0);
                let wait_ms = request["wait_ms"]
                    .as_u64()
                    .unwrap_or(HANDOVER_CATCH_UP_MS)
                    .min(HANDOVER_HOLD_MS);
                node.replica
                    .wait_replicated(target, wait_ms)
                    .await
                    .map(|index| json!({ "last_log_index": index }))
                    .map_err(|why| error(ErrorCode::Unavailable, why))
            }
        },
        "elect" => node
            .replica
            .elect()
            .await
            .map(|()| json!({ "electing": node.shared.instance }))
            .map_err(|e| error(ErrorCode::Unavailable, e.to_string())),
        "elections" => parse().map(|request| {
            let allow = request["allow"].as_bool().unwrap_or(false);
            node.replica.allow_elections(allow);
            tracing::info!(allow, "elections on this member");
            json!({ "allow": allow })
        }),
        "heartbeat" => node
            .replica
            .heartbeat()
            .await
            .map(|()| json!({ "heartbeat": node.shared.instance }))
            .map_err(|e| error(ErrorCode::Unavailable, e.to_string())),
        "change-voters" => match parse() {
            Err(reply) => Err(reply),
            Ok(request) => {
                let (add, remove) = (node_ids(&request, "add"), node_ids(&request, "remove"));
                node.replica
                    .change_voters(add, remove)
                    .await
                    .map(|()| json!({ "changed": true }))
                    .map_err(|e| node.propose_error(e))
            }
        },
        "remove-members" => match parse() {
            Err(reply) => Err(reply),
            Ok(request) => {
                let ids = node_ids(&request, "remove");
                if ids.contains(&node.replica.node_id()) {
                    return Some(Err(error(
                        ErrorCode::BadRequest,
                        format!(
                            "{} leads {}: a leader does not remove itself (hand its leadership \
                             over first: `billcl failover {}`)",
                            node.shared.instance, node.shared.replicaset, node.shared.replicaset
                        ),
                    )));
                }
                node.replica
                    .remove_members(ids)
                    .await
                    .map(|()| json!({ "removed": true }))
                    .map_err(|e| node.propose_error(e))
            }
        },
        _ => return None,
    };
    Some(answer)
}

/// The node ids a request lists under `key` (`[node_id…]`; anything else is left out).
fn node_ids(request: &serde_json::Value, key: &str) -> BTreeSet<u64> {
    request[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_u64())
        .collect()
}

/// `billcl failover`.
pub async fn failover(
    config: &ClusterConfig,
    replicaset: &str,
    to: Option<&str>,
    force: bool,
    as_json: bool,
) -> Result<()> {
    check_replicaset(config, replicaset)?;
    let endpoint = tool_endpoint(config)?;
    let links = member_links(config, &endpoint, replicaset);
    if let Some(to) = to {
        if !links.iter().any(|link| link.name == to) {
            bail!("{to} is not a member of {replicaset}");
        }
    }
    let answer = if force {
        let to =
            to.ok_or_else(|| anyhow!("--force needs --to INSTANCE (the learner to promote)"))?;
        promote(config, replicaset, &links, to).await?
    } else {
        hand_over(config, replicaset, &links, to).await?
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", answer["message"].as_str().unwrap_or(""));
    }
    Ok(())
}

/// `billcl voters`: the voters of `replicaset` (or of every replicaset), or changes them.
pub async fn voters(
    config: &ClusterConfig,
    replicaset: Option<&str>,
    add: &[String],
    remove: &[String],
    as_json: bool,
) -> Result<()> {
    let changing = !add.is_empty() || !remove.is_empty();
    let replicasets: Vec<String> = match replicaset {
        Some(name) => {
            check_replicaset(config, name)?;
            vec![name.to_string()]
        }
        None if changing => bail!("--add and --remove need the REPLICASET they change"),
        None => config.replicasets.keys().cloned().collect(),
    };
    let endpoint = tool_endpoint(config)?;
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for name in &replicasets {
        let links = member_links(config, &endpoint, name);
        if changing {
            reports.push(change_voters(config, name, &links, add, remove).await?);
            continue;
        }
        match membership(name, &links).await {
            Ok(report) => reports.push(report),
            Err(e) => {
                failed.push(name.clone());
                reports.push(json!({ "replicaset": name, "error": format!("{e:#}") }));
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for report in &reports {
            match report["error"].as_str() {
                Some(why) => eprintln!("{why}"),
                None => println!("{}", report["message"].as_str().unwrap_or("")),
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "no reachable leader told the voters of {}",
            failed.join(", ")
        );
    }
    Ok(())
}

fn check_replicaset(config: &ClusterConfig, replicaset: &str) -> Result<()> {
    if !config.replicasets.contains_key(replicaset) {
        bail!(
            "no replicaset `{replicaset}` in {}; it has: {}",
            config.path.display(),
            config
                .replicasets
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The leader of `links` and the Raft membership it applies (node id → votes).
async fn leader_and_membership(
    replicaset: &str,
    links: &[MemberLink],
) -> Result<(usize, BTreeMap<u64, bool>)> {
    leader_and_membership_in(replicaset, &statuses(links).await)
}

/// [`leader_and_membership`] from the members' statuses, read already.
fn leader_and_membership_in(
    replicaset: &str,
    statuses: &[Result<serde_json::Value, String>],
) -> Result<(usize, BTreeMap<u64, bool>)> {
    let leader = leader_of(statuses).ok_or_else(|| {
        anyhow!(
            "{replicaset} has no reachable leader (its voters are down, or electing one): the \
             membership is the leader's to tell and to change; `billcl info` shows why"
        )
    })?;
    let status = statuses[leader].as_ref().expect("the leader answered");
    let members = status["raft"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| Some((pair[0].as_u64()?, pair[1].as_bool()?)))
        .collect();
    Ok((leader, members))
}

/// What `voters` answers for one replicaset: its voters (the leader first) and learners.
fn membership_report(
    replicaset: &str,
    links: &[MemberLink],
    leader: usize,
    members: &BTreeMap<u64, bool>,
) -> serde_json::Value {
    let name_of = |id: u64| {
        links
            .iter()
            .find(|link| link.node_id == id)
            .map_or_else(|| format!("node {id}"), |link| link.name.clone())
    };
    let leader_id = links[leader].node_id;
    let mut voters: Vec<String> = vec![links[leader].name.clone()];
    voters.extend(
        members
            .iter()
            .filter(|(id, votes)| **votes && **id != leader_id)
            .map(|(id, _)| name_of(*id)),
    );
    let learners: Vec<String> = members
        .iter()
        .filter(|(_, votes)| !**votes)
        .map(|(id, _)| name_of(*id))
        .collect();
    let mut message = format!(
        "{replicaset}: voters {} (leader){}; learners {}",
        voters[0],
        voters[1..]
            .iter()
            .map(|name| format!(", {name}"))
            .collect::<String>(),
        if learners.is_empty() {
            "none".to_string()
        } else {
            learners.join(", ")
        }
    );
    if voters.len().is_multiple_of(2) {
        message.push_str(&format!(
            "\nnote: {} voters elect a leader with {} of them, so they survive the loss of no \
             more voters than {} would; an odd number is the usual choice",
            voters.len(),
            voters.len() / 2 + 1,
            voters.len() - 1
        ));
    }
    json!({
        "replicaset": replicaset,
        "leader": voters[0],
        "voters": voters,
        "learners": learners,
        "message": message,
    })
}

async fn membership(replicaset: &str, links: &[MemberLink]) -> Result<serde_json::Value> {
    let (leader, members) = leader_and_membership(replicaset, links).await?;
    Ok(membership_report(replicaset, links, leader, &members))
}

/// Makes the learners `add` voters (each once it has the leader's log) and the voters
/// `remove` learners, through the leader, then rewrites the cluster file to match.
async fn change_voters(
    config: &ClusterConfig,
    replicaset: &str,
    links: &[MemberLink],
    add: &[String],
    remove: &[String],
) -> Result<serde_json::Value> {
    let link_of = |name: &String| {
        links.iter().find(|link| link.name == *name).ok_or_else(|| {
            let names: Vec<&str> = links.iter().map(|link| link.name.as_str()).collect();
            anyhow!(
                "{name} is not a member of {replicaset} in {}; its members: {}",
                config.path.display(),
                names.join(", ")
            )
        })
    };
    if let Some(both) = add.iter().find(|name| remove.contains(name)) {
        bail!("{both} is both in --add and in --remove");
    }
    let (leader, mut members) = leader_and_membership(replicaset, links).await?;
    let leader_link = &links[leader];
    let mut adding = Vec::new();
    let mut removing = Vec::new();
    let mut notes = Vec::new();
    for name in add {
        let link = link_of(name)?;
        match members.get(&link.node_id) {
            None => bail!(
                "{name} is not in {replicaset}'s Raft membership yet: start it (`billcl start \
                 {name}`), it asks to join as a learner; then make it a voter"
            ),
            Some(true) => notes.push(format!("{name} votes already")),
            Some(false) => adding.push(link),
        }
    }
    for name in remove {
        let link = link_of(name)?;
        if link.node_id == leader_link.node_id {
            bail!(
                "{name} leads {replicaset}: hand its leadership over first (`billcl failover \
                 {replicaset}`), then make it a learner"
            );
        }
        match members.get(&link.node_id) {
            Some(true) => removing.push(link),
            _ => notes.push(format!("{name} does not vote already")),
        }
    }
    let changing: Vec<String> = adding
        .iter()
        .chain(&removing)
        .map(|link| link.name.clone())
        .collect();
    crate::cluster_file::check_editable(&config.path, replicaset, &changing)?;
    for link in &adding {
        // A voter behind the leader would hold back every commit that needs it.
        ask(
            leader_link,
            "wait-replicated",
            json!({ "target": link.node_id, "wait_ms": HANDOVER_CATCH_UP_MS }),
        )
        .await
        .with_context(|| {
            format!(
                "{} was not made a voter: it did not catch up with the leader within {} ms \
                 (retry once `billcl info` shows it 0 behind)",
                link.name, HANDOVER_CATCH_UP_MS
            )
        })?;
        // A learner in the membership does not campaign whatever this says; once a voter,
        // it may (it started from a file that said it does not).
        ask(link, "elections", json!({ "allow": true })).await?;
    }
    if !adding.is_empty() || !removing.is_empty() {
        let ids = |links: &[&MemberLink]| links.iter().map(|l| l.node_id).collect::<Vec<_>>();
        let change = json!({ "add": ids(&adding), "remove": ids(&removing) });
        if let Err(e) = ask(leader_link, "change-voters", change).await {
            for link in &adding {
                let _ = ask(link, "elections", json!({ "allow": false })).await;
            }
            return Err(e.context(format!("the voters of {replicaset} are unchanged")));
        }
        for link in &removing {
            // One that is down reads `voter = false` from the file when it starts.
            let _ = ask(link, "elections", json!({ "allow": false })).await;
        }
        let mut flags = Vec::new();
        for (link, votes) in adding
            .iter()
            .map(|link| (link, true))
            .chain(removing.iter().map(|link| (link, false)))
        {
            members.insert(link.node_id, votes);
            flags.push((link.name.clone(), votes));
        }
        // The cluster file keeps describing the membership (a member started on empty data
        // reads its role there).
        crate::cluster_file::set_voters(&config.path, replicaset, &flags)?;
    }
    let mut report = membership_report(replicaset, links, leader, &members);
    let names = |links: &[&MemberLink]| {
        links
            .iter()
            .map(|link| link.name.clone())
            .collect::<Vec<_>>()
    };
    let mut lines = Vec::new();
    if !adding.is_empty() {
        lines.push(format!(
            "{replicaset}: {} now vote{} (with the leader's log first)",
            names(&adding).join(", "),
            if adding.len() == 1 { "s" } else { "" }
        ));
    }
    if !removing.is_empty() {
        lines.push(format!(
            "{replicaset}: {} no longer vote{}",
            names(&removing).join(", "),
            if removing.len() == 1 { "s" } else { "" }
        ));
    }
    if !adding.is_empty() || !removing.is_empty() {
        lines.push(format!("{} says so", config.path.display()));
    }
    lines.extend(notes);
    lines.push(report["message"].as_str().unwrap_or("").to_string());
    report["added"] = json!(names(&adding));
    report["removed"] = json!(names(&removing));
    report["message"] = json!(lines.join("\n"));
    Ok(report)
}

/// `billcl expel`: takes `names` out of their replicasets for good (see the verb's help).
pub async fn expel(config: &ClusterConfig, names: &[String], as_json: bool) -> Result<()> {
    let mut by_replicaset: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in names {
        if config.routers.contains_key(name) {
            bail!(
                "{name} is a router, not a member of a replicaset: stop it (`billcl stop {name}`) \
                 and delete its [routers.{name}] section from {}",
                config.path.display()
            );
        }
        let replicaset = config
            .replicasets
            .iter()
            .find(|(_, replicaset)| replicaset.instances.contains_key(name))
            .map(|(replicaset, _)| replicaset.clone())
            .ok_or_else(|| {
                anyhow!(
                    "no instance `{name}` in {}: nothing was expelled",
                    config.path.display()
                )
            })?;
        by_replicaset
            .entry(replicaset)
            .or_default()
            .push(name.clone());
    }
    let endpoint = tool_endpoint(config)?;
    // Every replicaset checked before any changes.
    let mut checked = Vec::new();
    for (replicaset, names) in &by_replicaset {
        let links = member_links(config, &endpoint, replicaset);
        let statuses = statuses(&links).await;
        let (leader, members) = expel_check(replicaset, names, &links, &statuses)?;
        // Those that keep their ids by a `node_id` line get one.
        let every: Vec<String> = config.replicasets[replicaset]
            .instances
            .keys()
            .cloned()
            .collect();
        crate::cluster_file::check_editable(&config.path, replicaset, &every)?;
        checked.push((replicaset, names, links, statuses, leader, members));
    }
    let mut expelled: Vec<serde_json::Value> = Vec::new();
    let mut lines = Vec::new();
    for (replicaset, names, links, statuses, leader, members) in &checked {
        let (replicaset, leader) = (*replicaset, *leader);
        let leaving: Vec<(&MemberLink, bool)> = links
            .iter()
            .zip(statuses)
            .filter(|(link, _)| names.contains(&link.name))
            .map(|(link, status)| (link, status.is_ok()))
            .collect();
        // One that runs must not campaign once it no longer hears the leader.
        for (link, answers) in &leaving {
            if *answers {
                let _ = ask(link, "elections", json!({ "allow": false })).await;
            }
        }
        let ids: Vec<u64> = leaving
            .iter()
            .map(|(link, _)| link.node_id)
            .filter(|id| members.contains_key(id))
            .collect();
        if !ids.is_empty() {
            ask(&links[leader], "remove-members", json!({ "remove": ids }))
                .await
                .map_err(|e| {
                    let done: Vec<&str> = expelled
                        .iter()
                        .filter_map(|member| member["name"].as_str())
                        .collect();
                    let done = if done.is_empty() {
                        "nothing was expelled".to_string()
                    } else {
                        format!("expelled before it: {}", done.join(", "))
                    };
                    e.context(format!(
                        "{replicaset}'s membership is unchanged; {done} (a voter leaves through \
                         a quorum of the voters before and after)"
                    ))
                })?;
        }
        for (link, answers) in &leaving {
            let instance = &config.replicasets[replicaset].instances[&link.name];
            let runs_here = crate::process::running_pid(config, &link.name).is_some();
            let runs_elsewhere = !runs_here && *answers;
            let process = if runs_here {
                manage(config, "stop", std::slice::from_ref(&link.name))?;
                "stopped"
            } else if runs_elsewhere {
                "still runs on its machine: stop it there"
            } else {
                "not running"
            };
            let was = match members.get(&link.node_id) {
                Some(true) => "a voter",
                Some(false) => "a learner",
                None => "not in it (it never joined)",
            };
            // Its data moved aside, so that the name can be used again for a new member
            // (one that starts on this data would believe it is still a member).
            let mut data = config.instance_dir(&link.name);
            let data_note = if !runs_elsewhere && data.is_dir() {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = data.with_file_name(format!("{}.expelled-{stamp}", link.name));
                std::fs::rename(&data, &aside)
                    .with_context(|| format!("cannot move {} aside", data.display()))?;
                data = aside;
                format!(
                    "its data is moved aside to {} (delete it once it is not needed)",
                    data.display()
                )
            } else {
                "its data directory on its machine is left as it was (delete it before a new \
                 member of that name starts there)"
                    .to_string()
            };
            lines.push(format!(
                "{} expelled from {replicaset}: out of its Raft membership (it was {was}); \
                 {process}; {data_note}",
                link.name,
            ));
            expelled.push(json!({
                "name": link.name,
                "replicaset": replicaset,
                "was": was,
                "process": process,
                "address": instance.address.to_string(),
                "data_dir": data.display().to_string(),
            }));
        }
        // The others keep their node ids (a member's data records its id).
        let remaining: Vec<(u64, &String)> = config.replicasets[replicaset]
            .with_node_ids()
            .filter(|(_, name, _)| !names.contains(name))
            .map(|(id, name, _)| (id, name))
            .collect();
        let mut edits: BTreeMap<String, crate::cluster_file::InstanceEdit> = names
            .iter()
            .map(|name| (name.clone(), crate::cluster_file::InstanceEdit::remove()))
            .collect();
        for (position, (id, name)) in remaining.iter().enumerate() {
            if *id != position as u64 + 1 {
                let edit = crate::cluster_file::InstanceEdit::set("node_id", id.to_string());
                edits.insert((*name).clone(), edit);
            }
        }
        crate::cluster_file::edit_instances(&config.path, replicaset, &edits)?;
    }
    lines.push(format!("{} says so", config.path.display()));
    let config = ClusterConfig::load(&config.path)?;
    let mut replicasets = Vec::new();
    for replicaset in by_replicaset.keys() {
        let links = member_links(&config, &endpoint, replicaset);
        match membership(replicaset, &links).await {
            Ok(report) => {
                lines.push(report["message"].as_str().unwrap_or("").to_string());
                replicasets.push(report);
            }
            Err(e) => lines.push(format!("{e:#}")),
        }
    }
    let (routers, failed) = crate::reload::reload_routers(&config, &[]).await;
    if as_json {
        let answer =
            json!({ "expelled": expelled, "replicasets": replicasets, "routers": routers });
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        for line in &lines {
            println!("{line}");
        }
        crate::reload::print_reports(&routers);
    }
    if !failed.is_empty() {
        bail!(
            "expelled, but {} did not reload: run `billcl reload` once {} up (until then {} \
             still list{} what was expelled)",
            failed.join(", "),
            if failed.len() == 1 {
                "it is"
            } else {
                "they are"
            },
            if failed.len() == 1 { "it" } else { "they" },
            if failed.len() == 1 { "s" } else { "" },
        );
    }
    Ok(())
}

/// Whether `names` of `replicaset` can be expelled now: none leads, and a voter among them
/// leaves a quorum of answering voters before and after (joint consensus). The leader's
/// position in `links` and the membership it applies.
fn expel_check(
    replicaset: &str,
    names: &[String],
    links: &[MemberLink],
    statuses: &[Result<serde_json::Value, String>],
) -> Result<(usize, BTreeMap<u64, bool>)> {
    let (leader, members) = leader_and_membership_in(replicaset, statuses)?;
    let leader_name = &links[leader].name;
    if names.contains(leader_name) {
        bail!(
            "{leader_name} leads {replicaset}: hand its leadership over first (`billcl failover \
             {replicaset}`), then expel it; nothing was expelled"
        );
    }
    let answers = |id: u64| {
        let mut found = links.iter().zip(statuses);
        found.any(|(link, status)| link.node_id == id && status.is_ok())
    };
    let leaving: Vec<u64> = links
        .iter()
        .filter(|link| names.contains(&link.name))
        .map(|link| link.node_id)
        .collect();
    if leaving.iter().any(|id| members.get(id) == Some(&true)) {
        let before: Vec<u64> = members
            .iter()
            .filter(|(_, votes)| **votes)
            .map(|(id, _)| *id)
            .collect();
        let after: Vec<u64> = before
            .iter()
            .copied()
            .filter(|id| !leaving.contains(id))
            .collect();
        for (voters, when) in [(&before, "before"), (&after, "after")] {
            let up = voters.iter().filter(|id| answers(**id)).count();
            if up <= voters.len() / 2 {
                bail!(
                    "{replicaset} cannot let a voter go now: that takes a quorum of the voters \
                     before and after the change, and {up} of the {} voters {when} it answer; \
                     start those that are down (or, if they are gone for good, `billcl \
                     failover {replicaset} --to MEMBER --force`); nothing was expelled",
                    voters.len()
                );
            }
        }
    }
    Ok((leader, members))
}

async fn ask(link: &MemberLink, verb: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    admin_request(&link.peer, verb, &body.to_string())
        .await
        .map_err(|reply| anyhow!("{} ({verb}): {}", link.name, reply.message))
}

pub(crate) async fn hand_over(
    config: &ClusterConfig,
    replicaset: &str,
    links: &[MemberLink],
    to: Option<&str>,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let statuses = statuses(links).await;
    let leader = leader_of(&statuses).ok_or_else(|| {
        anyhow!(
            "{replicaset} has no reachable leader (no quorum of voters?). If its voters are \
             gone, `billcl failover {replicaset} --to LEARNER --force` promotes a learner, \
             losing what it had not received"
        )
    })?;
    let leader_status = statuses[leader].as_ref().expect("the leader answered");
    let voters: BTreeMap<u64, bool> = leader_status["raft"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| Some((pair[0].as_u64()?, pair[1].as_bool()?)))
        .collect();
    let matched = |link: &MemberLink| {
        leader_status["raft"]["matched"][link.node_id.to_string()]
            .as_u64()
            .unwrap_or(0)
    };
    let target = match to {
        Some(name) => links
            .iter()
            .position(|link| link.name == name)
            .expect("checked"),
        None => {
            // The most caught-up voter, else the most caught-up learner.
            let mut candidates: Vec<usize> = (0..links.len()).filter(|&i| i != leader).collect();
            candidates.sort_by_key(|&i| {
                (
                    voters.get(&links[i].node_id).copied().unwrap_or(false),
                    matched(&links[i]),
                )
            });
            *candidates
                .last()
                .ok_or_else(|| anyhow!("{replicaset} has no other member to lead it"))?
        }
    };
    let (old, new) = (&links[leader], &links[target]);
    if target == leader {
        return Ok(json!({
            "replicaset": replicaset, "leader": new.name, "moved": false,
            "message": format!("{} already leads {replicaset}", new.name),
        }));
    }
    let learner_target = !voters.get(&new.node_id).copied().unwrap_or(false);
    if !voters.contains_key(&new.node_id) {
        bail!("{} is not in {replicaset}'s Raft membership yet", new.name);
    }
    if learner_target {
        ask(old, "change-voters", json!({ "add": [new.node_id] })).await?;
    }
    ask(old, "hold-writes", json!({ "ms": HANDOVER_HOLD_MS })).await?;
    let outcome = async {
        let caught_up = ask(
            old,
            "wait-replicated",
            json!({ "target": new.node_id, "wait_ms": HANDOVER_CATCH_UP_MS }),
        )
        .await?;
        let index = caught_up["last_log_index"].as_u64().unwrap_or(0);
        elect(old, new).await?;
        Ok::<u64, anyhow::Error>(index)
    }
    .await;
    // Release the old leader whatever happened (it refuses commands as a follower anyway).
    let released = ask(old, "hold-writes", json!({ "ms": 0 })).await;
    let index = outcome.with_context(|| {
        format!(
            "leadership of {replicaset} stays with {} (its writes are released)",
            old.name
        )
    })?;
    if let Err(e) = released {
        tracing::warn!("releasing the old leader: {e:#}");
    }
    let mut demoted = false;
    if learner_target {
        // Keep the number of voters: the old leader becomes the learner.
        for _ in 0..20 {
            match ask(new, "change-voters", json!({ "remove": [old.node_id] })).await {
                Ok(_) => {
                    demoted = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        // The cluster file keeps describing the membership (a member started on empty data
        // reads its role there).
        let mut flags = vec![(new.name.clone(), true)];
        if demoted {
            flags.push((old.name.clone(), false));
        }
        crate::cluster_file::set_voters(&config.path, replicaset, &flags)?;
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let mut message = format!(
        "{replicaset}: leadership moved from {} to {} in {elapsed_ms} ms; {} had every entry up \
         to index {index} before it was elected, so no acknowledged write is lost",
        old.name, new.name, new.name
    );
    if learner_target {
        message.push_str(&if demoted {
            format!("; {} is now a voter and {} a learner", new.name, old.name)
        } else {
            format!(
                "; {} is now a voter; {} is still a voter too (demoting it failed: retry \
                 `billcl failover`)",
                new.name, old.name
            )
        });
    }
    Ok(json!({
        "replicaset": replicaset,
        "from": old.name,
        "leader": new.name,
        "moved": true,
        "index": index,
        "elapsed_ms": elapsed_ms,
        "message": message,
    }))
}

/// Has `new` (holding every entry of the old leader's log) campaign until it leads.
///
/// The old leader grants the vote unless its own leader lease still runs (it was elected less
/// than a lease, 2 x `election_timeout_ms`, ago); the other voters refuse while its heartbeats
/// renew their leases. A refused campaign still ends that leadership: the old leader's next
/// heartbeat to `new` meets the higher term and it steps down, its vote now the campaign's,
/// uncommitted, which carries no lease. So the old leader is asked for that heartbeat at once
/// (not at its next tick), and as soon as it is seen stepped down `new` campaigns again, and
/// wins; a campaign not won is started again every [`ELECTION_RETRY_MS`].
async fn elect(old: &MemberLink, new: &MemberLink) -> Result<()> {
    let role = |status: &serde_json::Value| status["raft"]["role"].as_str().map(str::to_string);
    let deadline = Instant::now() + Duration::from_millis(HANDOVER_ELECTION_MS);
    ask(new, "elect", json!({})).await?;
    let mut campaigned_at = Instant::now();
    // Whether the old leader led when the current campaign started.
    let mut old_led_at_campaign = true;
    loop {
        let (new_status, old_status) = tokio::join!(
            admin_request(&new.peer, "status", "{}"),
            admin_request(&old.peer, "status", "{}")
        );
        if new_status.as_ref().ok().and_then(role).as_deref() == Some("leader") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not win an election within {HANDOVER_ELECTION_MS} ms",
                new.name
            );
        }
        let old_leads = old_status.as_ref().ok().and_then(role).as_deref() == Some("leader");
        if old_leads {
            // Best effort: the tick sends one anyway.
            let _ = admin_request(&old.peer, "heartbeat", "{}").await;
        }
        let campaigning = campaigned_at.elapsed();
        // A step-down seen right after a campaign started may be its vote being granted: give
        // the win two polls to show before campaigning again.
        let stepped_down = old_led_at_campaign
            && !old_leads
            && campaigning >= Duration::from_millis(2 * ELECTION_POLL_MS);
        if stepped_down || campaigning >= Duration::from_millis(ELECTION_RETRY_MS) {
            ask(new, "elect", json!({})).await?;
            campaigned_at = Instant::now();
            old_led_at_campaign = old_leads;
        }
        tokio::time::sleep(Duration::from_millis(ELECTION_POLL_MS)).await;
    }
}

async fn promote(
    config: &ClusterConfig,
    replicaset: &str,
    links: &[MemberLink],
    to: &str,
) -> Result<serde_json::Value> {
    let statuses = statuses(links).await;
    if let Some(leader) = leader_of(&statuses) {
        bail!(
            "{replicaset} has a leader ({}): a forced promotion could lose writes for nothing; \
             run `billcl failover {replicaset} --to {to}` without --force",
            links[leader].name
        );
    }
    let target = links
        .iter()
        .find(|link| link.name == to)
        .expect("checked by the caller");
    let members: BTreeMap<u64, Member> = config
        .members(replicaset)
        .into_iter()
        .map(|(id, _, address, voter)| {
            (
                id,
                Member {
                    address: address.to_string(),
                    voter,
                },
            )
        })
        .collect();
    // The most caught-up member must be the one promoted: a member with a longer log may
    // hold committed entries the target lacks, which it would then have to throw away.
    let target_last = statuses
        .iter()
        .zip(links)
        .find(|(_, link)| link.name == to)
        .and_then(|(status, _)| status.as_ref().ok())
        .and_then(|status| status["raft"]["last_log_index"].as_u64());
    for (status, link) in statuses.iter().zip(links) {
        let last = status
            .as_ref()
            .ok()
            .and_then(|status| status["raft"]["last_log_index"].as_u64());
        if link.name != to && last > target_last {
            bail!(
                "{} has a longer log (index {}) than {to} ({}): promote it instead \
                 (`billcl failover {replicaset} --to {} --force`)",
                link.name,
                last.unwrap_or(0),
                target_last.map_or("unknown".to_string(), |i| i.to_string()),
                link.name
            );
        }
    }
    // Every member stops: the target to be rewritten, the others because their Raft state
    // describes the old membership. Their data is moved aside, so that they come back empty,
    // as learners of the new membership, and catch up from the new leader.
    let others: Vec<String> = links
        .iter()
        .filter(|link| link.name != to)
        .map(|link| link.name.clone())
        .collect();
    let names = [to.to_string()];
    let every: Vec<String> = names.iter().chain(&others).cloned().collect();
    crate::cluster_file::check_editable(&config.path, replicaset, &every)?;
    manage(config, "stop", &names)?;
    if !others.is_empty() {
        manage(config, "stop", &others)?;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut moved = Vec::new();
    for name in &others {
        let raft = config.instance_dir(name).join("raft");
        if raft.exists() {
            let aside = config
                .instance_dir(name)
                .join(format!("raft.stale-{stamp}"));
            std::fs::rename(&raft, &aside)
                .with_context(|| format!("cannot move {} aside", raft.display()))?;
            moved.push(aside.display().to_string());
        }
    }
    let flags: Vec<(String, bool)> = std::iter::once((to.to_string(), true))
        .chain(others.iter().map(|name| (name.clone(), false)))
        .collect();
    crate::cluster_file::set_voters(&config.path, replicaset, &flags)?;
    let dir = config.instance_dir(to).join("raft");
    let node_id = target.node_id;
    let promotion = tokio::task::spawn_blocking(move || {
        billcl_replication::promote_offline(&dir, node_id, &members)
    })
    .await
    .context("the promotion panicked")?
    .with_context(|| format!("cannot promote {to}"))?;
    manage(config, "start", &names)?;
    if !others.is_empty() {
        manage(config, "start", &others)?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(status) = admin_request(&target.peer, "status", "{}").await {
            if status["raft"]["role"] == "leader" {
                break;
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{to} was promoted but does not lead after 30 s; see `billcl status` and its log"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let message = format!(
        "{replicaset}: {to} promoted BY FORCE and now leads term {} as the only voter. It had the \
         log up to index {} (term {}): writes the old leader acknowledged after that index are \
         LOST. The other members ({}) are learners now, restarted empty to catch up from {to}; \
         their old Raft data is kept aside ({}). {} now says so (voter = true for {to} only). \
         Never restart a member on its old Raft data: it would lead its old membership.",
        promotion.term,
        promotion.last_log_index,
        promotion.last_log_term,
        others.join(", "),
        if moved.is_empty() {
            "none was found".to_string()
        } else {
            moved.join(", ")
        },
        config.path.display()
    );
    Ok(json!({
        "replicaset": replicaset,
        "leader": to,
        "forced": true,
        "term": promotion.term,
        "last_log_index": promotion.last_log_index,
        "message": message,
    }))
}

/// `billcl stop|start NAMES…` as a child process whose report goes to stderr (stdout is this
/// command's answer, JSON with `--json`), reading the cluster file as it is now.
fn manage(config: &ClusterConfig, verb: &str, names: &[String]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the billcl executable")?;
    let status = std::process::Command::new(exe)
        .arg("--config")
        .arg(&config.path)
        .arg(verb)
        .args(names)
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("cannot run billcl {verb}"))?;
    if !status.success() {
        bail!("billcl {verb} {} failed ({status})", names.join(" "));
    }
    Ok(())
}
