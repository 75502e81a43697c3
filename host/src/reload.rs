//! `billcl reload`: running routers read the cluster file again, as vshard's
//! `vshard.router.cfg(new_cfg)` does, so that a replicaset or a replica added to it is routed
//! to without restarting them (a restart drops every client's connection).
//!
//! A router takes what it can change under calls in flight: replicasets and members added
//! (appended to what it routes to, so that a bucket map's positions keep their meaning),
//! members removed (`billcl expel`; not the one it knows as its replicaset's leader), members
//! at a new address (a member moved: restarted there), weights (the rebalancer's next round
//! moves buckets to match) and `[rebalancer]` (vshard's `rebalancer_enable()` /
//! `rebalancer_disable()`: the first router's rebalancer reads it at each round). What it
//! cannot take — a bucket count changed, a replicaset removed, a member moved to another
//! replicaset or given another node id (ids are positions by name unless set) — is refused
//! as a whole with what to do instead, and the router goes on as it was. Other sections it
//! reads only at start (`[limits]`, `[replication]`, `[cluster]`'s name and data directory)
//! are named in the answer as waiting for a restart.
//!
//! The storages reload only addresses: each links to the members of its replicaset at the
//! addresses the file gives now, and a leader makes its membership say them too. A new member
//! asks its replicaset's voters to add it, and bucket moves are driven by a router.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde_json::json;

use crate::config::{ClusterConfig, RebalancerSection};

/// What a reload changes in a router that applies `old`, to apply `new`.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ReloadPlan {
    /// Replicasets new to the router, in the file's order.
    pub added_replicasets: Vec<String>,
    /// `(replicaset, member)` new to a replicaset the router knew.
    pub added_members: Vec<(String, String)>,
    /// `(replicaset, member)` gone from the file (`billcl expel` takes it out).
    pub removed_members: Vec<(String, String)>,
    /// `(replicaset, member, address before, address now)`: a member moved (restarted at
    /// another address).
    pub readdressed_members: Vec<(String, String, String, String)>,
    /// `(replicaset, weight before, weight now)`.
    pub weights: Vec<(String, u32, u32)>,
    /// `[rebalancer]` as the file says it now, when that changed.
    pub rebalancer: Option<RebalancerSection>,
    /// Sections that changed but that the router reads only at start.
    pub restart_needed: Vec<String>,
}

impl ReloadPlan {
    /// The members this plan adds to `replicaset`.
    pub(crate) fn added_to(&self, replicaset: &str) -> Vec<&String> {
        members_of(&self.added_members, replicaset)
    }

    /// The members this plan removes from `replicaset`.
    pub(crate) fn removed_from(&self, replicaset: &str) -> Vec<&String> {
        members_of(&self.removed_members, replicaset)
    }

    /// The members of `replicaset` this plan links at a new address.
    pub(crate) fn readdressed_in(&self, replicaset: &str) -> Vec<&String> {
        self.readdressed_members
            .iter()
            .filter(|(of, ..)| of == replicaset)
            .map(|(_, member, ..)| member)
            .collect()
    }
}

fn members_of<'a>(pairs: &'a [(String, String)], replicaset: &str) -> Vec<&'a String> {
    pairs
        .iter()
        .filter(|(of, _)| of == replicaset)
        .map(|(_, member)| member)
        .collect()
}

/// What a reload from `old` (what the router applies) to `new` (the file now) changes, or
/// every reason the router cannot take `new` while it runs.
pub(crate) fn plan(old: &ClusterConfig, new: &ClusterConfig) -> Result<ReloadPlan, Vec<String>> {
    let mut refused = Vec::new();
    if old.cluster.bucket_count != new.cluster.bucket_count {
        refused.push(format!(
            "bucket_count is fixed for the life of the cluster: this router has {}, the file \
             says {} (put {} back)",
            old.cluster.bucket_count, new.cluster.bucket_count, old.cluster.bucket_count
        ));
    }
    let mut plan = ReloadPlan::default();
    for (name, replicaset) in &old.replicasets {
        let Some(now) = new.replicasets.get(name) else {
            refused.push(format!(
                "replicaset {name} is gone from the file: a reload adds replicasets and does not \
                 remove them (empty it first: `weight = 0` and `billcl rebalance`, then restart \
                 the routers without it)"
            ));
            continue;
        };
        for (member, instance) in &replicaset.instances {
            match now.instances.get(member) {
                None => match new
                    .replicasets
                    .iter()
                    .find(|(_, other)| other.instances.contains_key(member))
                {
                    Some((other, _)) => refused.push(format!(
                        "{member} moved from {name} to {other}: a member stays in its \
                         replicaset (`billcl expel {member}` takes it out of {name}; then add \
                         an instance of another name to {other})"
                    )),
                    None => plan.removed_members.push((name.clone(), member.clone())),
                },
                Some(moved) if moved.address != instance.address => {
                    plan.readdressed_members.push((
                        name.clone(),
                        member.clone(),
                        instance.address.to_string(),
                        moved.address.to_string(),
                    ))
                }
                Some(_) => {}
            }
        }
        for member in now.instances.keys() {
            if !replicaset.instances.contains_key(member) {
                plan.added_members.push((name.clone(), member.clone()));
            }
        }
        let ids_now: BTreeMap<&String, u64> = now
            .with_node_ids()
            .map(|(id, member, _)| (member, id))
            .collect();
        for (id, member, _) in replicaset.with_node_ids() {
            match ids_now.get(member) {
                Some(&now) if now != id => refused.push(format!(
                    "{member} would be node {now} of {name}, but it is node {id}: a member \
                     added or removed renumbered the others (ids are positions by name unless \
                     set); give each member of {name} its `node_id` (`node_id = {id}` for \
                     {member})"
                )),
                _ => {}
            }
        }
        if now.weight != replicaset.weight {
            plan.weights
                .push((name.clone(), replicaset.weight, now.weight));
        }
    }
    for name in new.replicasets.keys() {
        if !old.replicasets.contains_key(name) {
            plan.added_replicasets.push(name.clone());
        }
    }
    if !refused.is_empty() {
        return Err(refused);
    }
    let sections = [
        (
            "[cluster] name, data_dir",
            old.cluster.name != new.cluster.name || old.cluster.data_dir != new.cluster.data_dir,
        ),
        ("[replication]", old.replication != new.replication),
        ("[limits]", old.limits != new.limits),
    ];
    plan.rebalancer = (old.rebalancer != new.rebalancer).then(|| new.rebalancer.clone());
    plan.restart_needed = sections
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(section, _)| section.to_string())
        .collect();
    Ok(plan)
}

impl ReloadPlan {
    /// The router's answer to `reload`: what it changed, from which file.
    pub(crate) fn to_json(&self, new: &ClusterConfig) -> serde_json::Value {
        let added_replicasets: Vec<serde_json::Value> = self
            .added_replicasets
            .iter()
            .map(|name| {
                let replicaset = &new.replicasets[name];
                json!({
                    "name": name,
                    "weight": replicaset.weight,
                    "members": replicaset.instances.keys().collect::<Vec<_>>(),
                })
            })
            .collect();
        let added_members: Vec<serde_json::Value> = self
            .added_members
            .iter()
            .map(|(replicaset, member)| json!({"replicaset": replicaset, "member": member}))
            .collect();
        let removed_members: Vec<serde_json::Value> = self
            .removed_members
            .iter()
            .map(|(replicaset, member)| json!({"replicaset": replicaset, "member": member}))
            .collect();
        let readdressed_members: Vec<serde_json::Value> = self
            .readdressed_members
            .iter()
            .map(|(replicaset, member, from, to)| {
                json!({"replicaset": replicaset, "member": member, "from": from, "to": to})
            })
            .collect();
        let weights: Vec<serde_json::Value> = self
            .weights
            .iter()
            .map(|(replicaset, from, to)| json!({"replicaset": replicaset, "from": from, "to": to}))
            .collect();
        json!({
            "file": new.path.display().to_string(),
            "added_replicasets": added_replicasets,
            "added_members": added_members,
            "removed_members": removed_members,
            "readdressed_members": readdressed_members,
            "weights": weights,
            "rebalancer": self.rebalancer.as_ref().map(|rebalancer| json!({
                "enabled": rebalancer.enabled,
                "interval_ms": rebalancer.interval_ms,
                "disbalance_threshold_percent": rebalancer.disbalance_threshold_percent,
            })),
            "restart_needed": self.restart_needed,
        })
    }
}

/// One line per change a router's `reload` answer lists, or that nothing changed.
fn describe(answer: &serde_json::Value) -> Vec<String> {
    let mut lines = Vec::new();
    for added in answer["added_replicasets"].as_array().into_iter().flatten() {
        let members: Vec<&str> = added["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|member| member.as_str())
            .collect();
        lines.push(format!(
            "replicaset {} added (weight {}; {}): it holds no buckets until `billcl rebalance` \
             (or the rebalancer) moves them",
            added["name"].as_str().unwrap_or("?"),
            added["weight"],
            members.join(", ")
        ));
    }
    for added in answer["added_members"].as_array().into_iter().flatten() {
        lines.push(format!(
            "{} added to {}: replica reads go to it too",
            added["member"].as_str().unwrap_or("?"),
            added["replicaset"].as_str().unwrap_or("?")
        ));
    }
    for removed in answer["removed_members"].as_array().into_iter().flatten() {
        lines.push(format!(
            "{} removed from {}: no call goes to it",
            removed["member"].as_str().unwrap_or("?"),
            removed["replicaset"].as_str().unwrap_or("?")
        ));
    }
    for moved in answer["readdressed_members"]
        .as_array()
        .into_iter()
        .flatten()
    {
        lines.push(format!(
            "{} of {} now at {} (was {})",
            moved["member"].as_str().unwrap_or("?"),
            moved["replicaset"].as_str().unwrap_or("?"),
            moved["to"].as_str().unwrap_or("?"),
            moved["from"].as_str().unwrap_or("?")
        ));
    }
    for weight in answer["weights"].as_array().into_iter().flatten() {
        lines.push(format!(
            "{} weight {} → {}: `billcl rebalance` (or the rebalancer) moves buckets to match",
            weight["replicaset"].as_str().unwrap_or("?"),
            weight["from"],
            weight["to"]
        ));
    }
    let rebalancer = &answer["rebalancer"];
    if rebalancer.is_object() {
        lines.push(if rebalancer["enabled"] == true {
            format!(
                "[rebalancer] on: every {} ms, past a {} % disbalance (the first router runs it)",
                rebalancer["interval_ms"], rebalancer["disbalance_threshold_percent"]
            )
        } else {
            "[rebalancer] off: buckets move on `billcl rebalance` only".to_string()
        });
    }
    if lines.is_empty() {
        lines.push("no replicaset, member, weight or rebalancer setting changed".to_string());
    }
    let waiting: Vec<&str> = answer["restart_needed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|section| section.as_str())
        .collect();
    if !waiting.is_empty() {
        lines.push(format!(
            "changed, read only at start (restart the router to apply): {}",
            waiting.join("; ")
        ));
    }
    lines
}

/// `billcl reload [ROUTER…]`: every router of the file (or those named) reads it again, and
/// (none named) every storage its replicaset's addresses. An instance of this machine (a
/// loopback address) that is not running is skipped: it reads the file when it starts. One
/// that refuses or cannot be reached makes the verb fail, after the others were asked.
pub async fn cli_reload(config: &ClusterConfig, names: &[String], as_json: bool) -> Result<()> {
    for name in names {
        if !config.routers.contains_key(name) {
            let routers: Vec<&str> = config.routers.keys().map(String::as_str).collect();
            bail!(
                "{name} is not a router of {} (its routers: {}); storages need no reload",
                config.path.display(),
                routers.join(", ")
            );
        }
    }
    let (mut reports, mut failed) = reload_routers(config, names).await;
    // Routers named: those alone; a file a router refused: not the storages either.
    let (storages, storages_failed) = if names.is_empty() && failed.is_empty() {
        reload_storages(config).await?
    } else {
        Default::default()
    };
    failed.extend(storages_failed);
    if as_json {
        reports.extend(storages);
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print_reports(&reports);
        print_storage_reports(&storages);
    }
    if !failed.is_empty() {
        bail!(
            "{} of the instances asked did not reload: {} (each goes on with what it had)",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Asks every router of `config` (or those of `names`) to reload: each one's answer by name
/// (`{"running": false}` for a local router that does not run, `{"error": why}` for one that
/// did not reload), and the names of those that did not.
pub(crate) async fn reload_routers(
    config: &ClusterConfig,
    names: &[String],
) -> (serde_json::Map<String, serde_json::Value>, Vec<String>) {
    let mut reports = serde_json::Map::new();
    let mut failed = Vec::new();
    for (name, router) in &config.routers {
        if !names.is_empty() && !names.contains(name) {
            continue;
        }
        let local = router.address.ip().is_loopback();
        let report = if local && crate::process::running_pid(config, name).is_none() {
            json!({"running": false})
        } else {
            let mut one = config.clone();
            one.routers.retain(|router, _| router == name);
            let answer = match crate::cli::connect(&one).await {
                Ok(client) => client
                    .admin("reload", "{}")
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("{e:#}")),
            };
            match answer.and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string())) {
                Ok(answer) => answer,
                Err(why) => {
                    failed.push(name.clone());
                    json!({"error": why})
                }
            }
        };
        reports.insert(name.clone(), report);
    }
    (reports, failed)
}

/// Asks every storage that runs to reload the addresses of its replicaset's members (a
/// storage of this machine that does not run reads them when it starts): the answers of
/// those that changed something or could not reload, by name, and the names of the latter.
async fn reload_storages(
    config: &ClusterConfig,
) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<String>)> {
    let endpoint = crate::verify::tool_endpoint(config)?;
    let mut links = Vec::new();
    for (replicaset, members) in &config.replicasets {
        for link in crate::verify::member_links(config, &endpoint, replicaset) {
            let local = members.instances[&link.name].address.ip().is_loopback();
            if !local || crate::process::running_pid(config, &link.name).is_some() {
                links.push(link);
            }
        }
    }
    let asks = links
        .iter()
        .map(|link| crate::router::admin_request(&link.peer, "reload", "{}"))
        .collect();
    let answers = crate::verify::futures_join_all(asks).await;
    let mut reports = serde_json::Map::new();
    let mut failed = Vec::new();
    for (link, answer) in links.iter().zip(answers) {
        match answer {
            Ok(answer) => {
                let changed = answer["readdressed"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                    || answer["membership_readdressed"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                    || answer["restart_needed"] == true;
                if changed {
                    reports.insert(link.name.clone(), answer);
                }
            }
            Err(reply) => {
                failed.push(link.name.clone());
                reports.insert(link.name.clone(), json!({"error": reply.message}));
            }
        }
    }
    Ok((reports, failed))
}

/// [`reload_storages`]' reports as text: the links and membership addresses each changed.
fn print_storage_reports(reports: &serde_json::Map<String, serde_json::Value>) {
    for (name, report) in reports {
        if let Some(why) = report["error"].as_str() {
            eprintln!("{name}: not reloaded: {why}");
            continue;
        }
        for moved in report["readdressed"].as_array().into_iter().flatten() {
            println!(
                "{name}: links to {} at {} (was {})",
                moved["member"].as_str().unwrap_or("?"),
                moved["to"].as_str().unwrap_or("?"),
                moved["from"].as_str().unwrap_or("?")
            );
        }
        let ids = report["membership_readdressed"].as_array();
        if ids.is_some_and(|ids| !ids.is_empty()) {
            println!("{name}: its replicaset's Raft membership gives the new addresses");
        }
        if report["restart_needed"] == true {
            println!(
                "{name}: listens on its old address until it restarts (`billcl restart {name}`)"
            );
        }
    }
}

/// [`reload_routers`]' reports as text: what each router changed, one line per change.
pub(crate) fn print_reports(reports: &serde_json::Map<String, serde_json::Value>) {
    for (name, report) in reports {
        if report["running"] == false {
            println!("{name}: not running (it reads the cluster file when it starts)");
        } else if let Some(why) = report["error"].as_str() {
            eprintln!("{name}: not reloaded: {why}");
        } else {
            for line in describe(report) {
                println!("{name}: {line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ClusterConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, text).unwrap();
        ClusterConfig::load(&path).unwrap()
    }

    const BASE: &str = "[cluster]\nbucket_count = 10\n\
        [routers.r]\naddress = \"127.0.0.1:4000\"\n\
        [replicasets.a]\n\
        [replicasets.a.instances.a-1]\naddress = \"127.0.0.1:4001\"\n\
        [replicasets.a.instances.a-2]\naddress = \"127.0.0.1:4002\"\nvoter = false\n";

    #[test]
    fn additions_weights_and_the_rebalancer_are_planned_and_other_sections_wait_for_a_restart() {
        let old = config(BASE);
        let new = config(&format!(
            "{}[replicasets.a.instances.a-3]\naddress = \"127.0.0.1:4003\"\nvoter = false\n\
             [replicasets.b]\nweight = 3\n\
             [replicasets.b.instances.b-1]\naddress = \"127.0.0.1:4011\"\n\
             [limits]\nrequest_timeout_ms = 9000\n\
             [rebalancer]\nenabled = false\n",
            BASE.replace("[replicasets.a]\n", "[replicasets.a]\nweight = 2\n")
        ));
        let plan = plan(&old, &new).unwrap();
        assert_eq!(
            plan,
            ReloadPlan {
                added_replicasets: vec!["b".into()],
                added_members: vec![("a".into(), "a-3".into())],
                removed_members: vec![],
                readdressed_members: vec![],
                weights: vec![("a".into(), 1, 2)],
                rebalancer: Some(new.rebalancer.clone()),
                restart_needed: vec!["[limits]".into()],
            }
        );
        assert!(!new.rebalancer.enabled);
        let lines = describe(&plan.to_json(&new));
        assert!(
            lines[0].starts_with("replicaset b added (weight 3; b-1)"),
            "{lines:?}"
        );
        assert!(lines[1].starts_with("a-3 added to a"), "{lines:?}");
        assert!(lines[2].starts_with("a weight 1 → 2"), "{lines:?}");
        assert_eq!(
            lines[3], "[rebalancer] off: buckets move on `billcl rebalance` only",
            "{lines:?}"
        );
        assert!(lines[4].ends_with("[limits]"), "{lines:?}");
        assert_eq!(plan_of(BASE, BASE), Ok(ReloadPlan::default()));
        assert_eq!(
            describe(&ReloadPlan::default().to_json(&old)),
            vec!["no replicaset, member, weight or rebalancer setting changed"]
        );
    }

    fn plan_of(old: &str, new: &str) -> Result<ReloadPlan, Vec<String>> {
        plan(&config(old), &config(new))
    }

    #[test]
    fn a_member_gone_from_the_file_is_planned_for_removal() {
        let without_a2 = BASE.split("[replicasets.a.instances.a-2]").next().unwrap();
        let plan = plan_of(BASE, without_a2).unwrap();
        assert_eq!(plan.removed_members, vec![("a".into(), "a-2".into())]);
        let lines = describe(&plan.to_json(&config(without_a2)));
        assert_eq!(lines, vec!["a-2 removed from a: no call goes to it"]);
    }

    #[test]
    fn a_member_at_another_address_is_planned_to_be_linked_there() {
        let moved = BASE.replace("4002", "4009");
        let plan = plan_of(BASE, &moved).unwrap();
        assert_eq!(
            plan.readdressed_members,
            vec![(
                "a".into(),
                "a-2".into(),
                "127.0.0.1:4002".into(),
                "127.0.0.1:4009".into()
            )]
        );
        let lines = describe(&plan.to_json(&config(&moved)));
        assert_eq!(
            lines,
            vec!["a-2 of a now at 127.0.0.1:4009 (was 127.0.0.1:4002)"]
        );
    }

    #[test]
    fn what_a_running_router_cannot_take_is_refused_whole_with_what_to_do() {
        let refused = |new: String| plan_of(BASE, &new).unwrap_err();
        let why = refused(BASE.replace("bucket_count = 10", "bucket_count = 20"));
        assert_eq!(why.len(), 1);
        assert!(
            why[0].contains("fixed for the life of the cluster"),
            "{why:?}"
        );
        assert!(why[0].contains("put 10 back"), "{why:?}");

        let without_a2 = BASE
            .split("[replicasets.a.instances.a-2]")
            .next()
            .unwrap()
            .to_string();
        // A member moved to another replicaset, with a replicaset added in the same file:
        // nothing is applied.
        let why = refused(format!(
            "{without_a2}[replicasets.b.instances.a-2]\naddress = \"127.0.0.1:4002\"\n\
             [replicasets.c.instances.c-1]\naddress = \"127.0.0.1:4021\"\n"
        ));
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("a-2 moved from a to b"), "{why:?}");
        assert!(why[0].contains("`billcl expel a-2`"), "{why:?}");

        let why = plan_of(
            &format!("{BASE}[replicasets.b.instances.b-1]\naddress = \"127.0.0.1:4011\"\n"),
            BASE,
        )
        .unwrap_err();
        assert!(why[0].starts_with("replicaset b is gone"), "{why:?}");
        assert!(why[0].contains("weight = 0"), "{why:?}");

        // A member added whose name sorts first renumbers the others (ids by position).
        let why = refused(format!(
            "{BASE}[replicasets.a.instances.a-0]\naddress = \"127.0.0.1:4005\"\n"
        ));
        assert_eq!(
            why,
            [
                "a-1 would be node 2 of a, but it is node 1: a member added or removed \
                 renumbered the others (ids are positions by name unless set); give each \
                 member of a its `node_id` (`node_id = 1` for a-1)",
                "a-2 would be node 3 of a, but it is node 2: a member added or removed \
                 renumbered the others (ids are positions by name unless set); give each \
                 member of a its `node_id` (`node_id = 2` for a-2)",
            ]
        );
    }
}
