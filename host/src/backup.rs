//! `billcl backup DIR` and `billcl restore DIR`: the whole cluster's data at one moment, copied
//! while it runs, and put back (Tarantool's `box.backup.start()` lists a consistent set of
//! files to copy; vshard's operators back up every replicaset's master the same way).
//!
//! A backup holds, per replicaset, a snapshot its leader builds when asked (`billcl snapshot`'s
//! verb: at least as new as what it had applied, so every write acknowledged before the backup
//! started), read from the leader part by part (`snapshot-read`, [`storage_snapshot_read`])
//! and verified as the file it was ([`SnapshotCopy::from_file_bytes`]), then `backup.json`,
//! written last, naming them. The
//! snapshots of different replicasets are taken one after the other, so a bucket moving
//! between them could be in two of them or in none: the states are checked to hold each bucket
//! as the cluster did at some moment (`holders`), and taken again if not.
//!
//! A restore, with every instance stopped, moves each storage member's data directory aside
//! and makes it anew from its replicaset's snapshot
//! ([`billcl_replication::restore_snapshot`]): every member of a replicaset starts from the
//! same state at the same index, and its voters elect a leader as after any restart. Writes
//! made after the backup are not in it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use billcl_proto::message::{ErrorCode, ErrorReply};
use billcl_replication::{read_snapshot, read_snapshot_part, restore_snapshot, SnapshotCopy};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::ClusterConfig;
use crate::rebalance::{from_hex, to_hex};
use crate::router::admin_request;
use crate::state::{BucketState, State};
use crate::storage::{error, parse_body, StorageNode};
use crate::verify::{leader_of, member_links, snapshot_one, statuses, tool_endpoint, MemberLink};

/// The file of a backup directory that names its snapshots; written last.
pub const MANIFEST_FILE: &str = "backup.json";
/// How many times a backup takes its snapshots again when a bucket moved between two of them
/// (or a replicaset's, when a newer one replaced it while it was read).
pub const BACKUP_ATTEMPTS_MAX: usize = 3;
/// The most bytes of a snapshot file one `snapshot-read` answer carries (twice that in hex,
/// well within a frame).
pub const SNAPSHOT_PART_BYTES: usize = 8 << 20;

/// `backup.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub cluster: String,
    pub bucket_count: u32,
    /// When the backup was finished (UTC, RFC 3339).
    pub taken_at: String,
    pub replicasets: Vec<ReplicasetBackup>,
}

/// One replicaset's snapshot in a backup.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicasetBackup {
    pub name: String,
    /// The member it was copied from (its leader then).
    pub from: String,
    /// The file, in the backup directory.
    pub file: String,
    pub index: u64,
    pub term: u64,
    pub state_bytes: u64,
    pub accounts: u64,
    pub buckets: u64,
}

/// A replicaset's snapshot, copied into the backup directory, and what its state holds. Only
/// this summary stays in memory: the copy is on disk, and the state was decoded one
/// replicaset at a time, so that a backup needs about one replicaset's snapshot and state in
/// memory at once rather than every replicaset's.
struct Taken {
    replicaset: String,
    from: String,
    /// The file, in the backup directory.
    file: String,
    index: u64,
    term: u64,
    state_bytes: u64,
    accounts: u64,
    /// [`holds`] of its state.
    holdings: Vec<(u32, bool)>,
}

/// `billcl backup DIR`.
pub async fn backup(config: &ClusterConfig, dir: &Path, as_json: bool) -> Result<()> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if manifest_path.exists() {
        bail!(
            "{} holds a backup already: name a new directory (a backup is never overwritten)",
            dir.display()
        );
    }
    let endpoint = tool_endpoint(config)?;
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let taken = match take_all(config, &endpoint, dir).await {
        Ok(taken) => taken,
        Err(e) => {
            // No backup here: the snapshot files this one wrote go, and the directory if
            // it made it.
            for replicaset in config.replicasets.keys() {
                let _ = std::fs::remove_file(dir.join(snapshot_file(replicaset)));
            }
            if created {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    let replicasets = taken
        .into_iter()
        .map(|taken| ReplicasetBackup {
            name: taken.replicaset,
            from: taken.from,
            file: taken.file,
            index: taken.index,
            term: taken.term,
            state_bytes: taken.state_bytes,
            accounts: taken.accounts,
            buckets: taken
                .holdings
                .iter()
                .filter(|(_, writable)| *writable)
                .count() as u64,
        })
        .collect();
    let manifest = Manifest {
        cluster: config.cluster.name.clone(),
        bucket_count: config.cluster.bucket_count,
        taken_at: crate::deploy::utc_text(crate::storage::now_ms()),
        replicasets,
    };
    let text = serde_json::to_string_pretty(&manifest)?;
    crate::identity::write_durably(&manifest_path, text.as_bytes())
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    if as_json {
        println!("{text}");
        return Ok(());
    }
    for replicaset in &manifest.replicasets {
        println!(
            "{}: from {} at log index {} (term {}): {} accounts, {} buckets, {:.1} MiB -> {}",
            replicaset.name,
            replicaset.from,
            replicaset.index,
            replicaset.term,
            replicaset.accounts,
            replicaset.buckets,
            replicaset.state_bytes as f64 / (1u64 << 20) as f64,
            dir.join(&replicaset.file).display()
        );
    }
    println!(
        "backup of cluster {} in {} (put it back with `billcl restore {}` while the cluster \
         is stopped)",
        manifest.cluster,
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// The file of `replicaset`'s snapshot in a backup directory.
fn snapshot_file(replicaset: &str) -> String {
    format!("{replicaset}.snapshot")
}

/// Every replicaset's snapshot, copied into `dir`, taken again (all of them) while a bucket
/// moved between two of them ([`holders`]).
async fn take_all(
    config: &ClusterConfig,
    endpoint: &quinn::Endpoint,
    dir: &Path,
) -> Result<Vec<Taken>> {
    let mut attempt = 1;
    loop {
        let mut taken = Vec::new();
        for replicaset in config.replicasets.keys() {
            taken.push(take(config, endpoint, replicaset, dir).await?);
        }
        let holdings: Vec<(&str, &[(u32, bool)])> = taken
            .iter()
            .map(|taken| (taken.replicaset.as_str(), taken.holdings.as_slice()))
            .collect();
        match holders(config.cluster.bucket_count, &holdings) {
            Ok(()) => return Ok(taken),
            Err(why) if attempt < BACKUP_ATTEMPTS_MAX => {
                tracing::info!("the snapshots do not agree ({why}); taking them again");
                attempt += 1;
            }
            Err(why) => bail!(
                "buckets moved while the snapshots were taken, {BACKUP_ATTEMPTS_MAX} times \
                 ({why}): pause the rebalancer (`[rebalancer] enabled = false` in {}, then \
                 `billcl reload`) and make no `billcl move` until the backup is done",
                config.path.display()
            ),
        }
    }
}

/// Has `replicaset`'s leader snapshot now, copies the snapshot out of its data directory into
/// `dir`, and sums up its state.
async fn take(
    config: &ClusterConfig,
    endpoint: &quinn::Endpoint,
    replicaset: &str,
    dir: &Path,
) -> Result<Taken> {
    let links = member_links(config, endpoint, replicaset);
    let statuses = statuses(&links).await;
    let Some(leader) = leader_of(&statuses) else {
        let why = statuses
            .iter()
            .zip(&links)
            .map(|(status, link)| match status {
                Ok(_) => format!("{}: not the leader", link.name),
                Err(why) => format!("{}: {why}", link.name),
            })
            .collect::<Vec<_>>()
            .join("; ");
        bail!("{replicaset} has no leader to take its snapshot from ({why}): start its members");
    };
    let link = &links[leader];
    let mut attempt = 1;
    let copy = loop {
        let (index, _) = snapshot_one(&link.peer)
            .await
            .map_err(|why| anyhow::anyhow!("{}: {why}", link.name))?;
        match fetch_snapshot(link, index).await {
            Ok(copy) => break copy,
            // A newer snapshot replaced it while it was read: take that one.
            Err(reply) if reply.code == ErrorCode::NotFound && attempt < BACKUP_ATTEMPTS_MAX => {
                attempt += 1;
            }
            Err(reply) => bail!("{}: {}", link.name, reply.message),
        }
    };
    let state = State::decode_snapshot(copy.state())
        .map_err(|why| anyhow::anyhow!("{}'s snapshot: {why}", link.name))?;
    let file = snapshot_file(replicaset);
    copy.write(&dir.join(&file))?;
    Ok(Taken {
        replicaset: replicaset.to_string(),
        from: link.name.clone(),
        file,
        index: copy.last_log_index(),
        term: copy.last_log_term(),
        state_bytes: copy.state().len() as u64,
        accounts: state.account_count() as u64,
        holdings: holds(&state).collect(),
    })
}

/// Reads the snapshot at log index `index` from the member behind `link`, part by part
/// (`snapshot-read`), and verifies it as the file it was.
async fn fetch_snapshot(link: &MemberLink, index: u64) -> Result<SnapshotCopy, ErrorReply> {
    let mut bytes: Vec<u8> = Vec::new();
    loop {
        let body = json!({ "index": index, "offset": bytes.len() }).to_string();
        let part = admin_request(&link.peer, "snapshot-read", &body).await?;
        let hex = part["hex"].as_str().unwrap_or_default();
        let total = part["total"].as_u64().unwrap_or(0) as usize;
        let read = from_hex(hex).map_err(|why| error(ErrorCode::Internal, why))?;
        if read.is_empty() && bytes.len() < total {
            return Err(error(ErrorCode::Internal, "an empty part before the end"));
        }
        bytes.extend_from_slice(&read);
        if bytes.len() >= total {
            break;
        }
    }
    let what = format!("{}'s snapshot at log index {index}", link.name);
    SnapshotCopy::from_file_bytes(bytes, &what)
        .map_err(|e| error(ErrorCode::Internal, format!("{e}")))
}

/// The storage's `snapshot-read {"index": N, "offset": BYTES}`: the next part of its snapshot
/// file, as hex, while the snapshot on disk is the one at log index N (`NotFound` once a newer
/// one replaced it: start over). Answers `{"index", "total", "offset", "hex"}`, at most
/// [`SNAPSHOT_PART_BYTES`] of the file per answer.
pub async fn storage_snapshot_read(
    node: &StorageNode,
    body: &str,
) -> Result<serde_json::Value, ErrorReply> {
    let request = parse_body(body)?;
    let Some(index) = request["index"].as_u64() else {
        return Err(error(
            ErrorCode::BadRequest,
            "snapshot-read needs {\"index\": N, \"offset\": BYTES}",
        ));
    };
    let offset = request["offset"].as_u64().unwrap_or(0);
    let path = node.replica.snapshot_path();
    // Reading megabytes: off the async workers.
    let read = tokio::task::spawn_blocking(move || {
        read_snapshot_part(&path, index, offset, SNAPSHOT_PART_BYTES)
    })
    .await
    .map_err(|e| error(ErrorCode::Internal, format!("reading the snapshot: {e}")))?;
    match read.map_err(|e| error(ErrorCode::Unavailable, e.to_string()))? {
        None => Err(error(
            ErrorCode::NotFound,
            format!(
                "the snapshot at log index {index} was replaced by a newer one: read that one \
                 from the start"
            ),
        )),
        Some((total, _)) if offset > total => Err(error(
            ErrorCode::InvalidArgument,
            format!("offset {offset} is past the snapshot's {total} bytes"),
        )),
        Some((total, part)) => Ok(json!({
            "index": index,
            "total": total,
            "offset": offset,
            "hex": to_hex(&part),
        })),
    }
}

/// The buckets a state holds: those whose data is there and its own (a bucket being sent is
/// still its sender's, until its receiver takes it).
fn holds(state: &State) -> impl Iterator<Item = (u32, bool)> + '_ {
    state
        .buckets
        .iter()
        .filter_map(|(id, data)| match data.state {
            BucketState::Active | BucketState::Pinned => Some((*id, true)),
            BucketState::Sending { .. } => Some((*id, false)),
            _ => None,
        })
}

/// Whether the replicasets' `states` ([`holds`] of each) hold each bucket once, as the
/// cluster did at some moment (or none at all: a cluster not bootstrapped), or which bucket
/// they do not. A bucket is
/// writable in one place at a time: a move's receiver takes it while its sender still lists
/// it as being sent (the move's last step drops it there), so a bucket sent by one and active
/// on another is a move in flight, which a router finishes after a restore. Active in two, or
/// in none and sent by none, it moved between two snapshots.
fn holders(bucket_count: u32, states: &[(&str, &[(u32, bool)])]) -> Result<(), String> {
    let mut writable: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    let mut sending: BTreeSet<u32> = BTreeSet::new();
    for (replicaset, holdings) in states {
        for &(bucket, is_writable) in *holdings {
            if is_writable {
                writable.entry(bucket).or_default().push(replicaset);
            } else {
                sending.insert(bucket);
            }
        }
    }
    if writable.is_empty() && sending.is_empty() {
        return Ok(());
    }
    if let Some((bucket, twice)) = writable.iter().find(|(_, holders)| holders.len() > 1) {
        return Err(format!(
            "bucket {bucket} is active in {}",
            twice.join(" and ")
        ));
    }
    match (1..=bucket_count).find(|b| !writable.contains_key(b) && !sending.contains(b)) {
        Some(bucket) => Err(format!("bucket {bucket} is in none of them")),
        None => Ok(()),
    }
}

/// `billcl restore DIR`.
pub fn restore(config: &ClusterConfig, dir: &Path, as_json: bool) -> Result<()> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).with_context(|| {
            format!(
                "{} is not a backup: no {MANIFEST_FILE} to read there",
                dir.display()
            )
        })?)
        .with_context(|| format!("{} is unreadable", manifest_path.display()))?;
    if manifest.bucket_count != config.cluster.bucket_count {
        bail!(
            "the backup has {} buckets and {} says {}: a backup goes back into a cluster of \
             its bucket count",
            manifest.bucket_count,
            config.path.display(),
            config.cluster.bucket_count
        );
    }
    let backed_up: BTreeSet<&str> = manifest
        .replicasets
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    let in_file: BTreeSet<&str> = config.replicasets.keys().map(String::as_str).collect();
    if backed_up != in_file {
        bail!(
            "the backup holds replicasets {} and {} names {}: a backup goes back into a \
             cluster of the same replicasets",
            names(&backed_up),
            config.path.display(),
            names(&in_file)
        );
    }
    let running: Vec<String> = config
        .instances()
        .into_iter()
        .filter(|instance| crate::process::running_pid(config, &instance.name).is_some())
        .map(|instance| instance.name)
        .collect();
    if !running.is_empty() {
        bail!(
            "{} running: stop the cluster first (`billcl stop`); a restore replaces every \
             storage's data",
            running.join(", ")
        );
    }
    // Every snapshot read and checked against the file before any directory is touched.
    let mut copies = Vec::new();
    for replicaset in &manifest.replicasets {
        let copy = read_snapshot(&dir.join(&replicaset.file))?;
        if copy.last_log_index() != replicaset.index {
            bail!(
                "{} holds log index {}, but {} says {}: the backup was changed",
                dir.join(&replicaset.file).display(),
                copy.last_log_index(),
                MANIFEST_FILE,
                replicaset.index
            );
        }
        let members = config.members(&replicaset.name);
        let ids: BTreeSet<u64> = members.iter().map(|(id, ..)| *id).collect();
        if let Some(voter) = copy.voters().into_iter().find(|voter| !ids.contains(voter)) {
            bail!(
                "{}'s voters in the backup include node {voter}, which {} does not have: it \
                 could not elect a leader (give the member that was node {voter} back to the \
                 file, with `node_id = {voter}`)",
                replicaset.name,
                config.path.display()
            );
        }
        copies.push((replicaset, members, copy));
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut restored = Vec::new();
    for (replicaset, members, copy) in &copies {
        for (node_id, name, ..) in members {
            let data = config.instance_dir(name);
            let aside = if data.exists() {
                let aside = data.with_file_name(format!("{name}.before-restore-{stamp}"));
                std::fs::rename(&data, &aside)
                    .with_context(|| format!("cannot move {} aside", data.display()))?;
                Some(aside)
            } else {
                None
            };
            let raft = data.join("raft");
            crate::identity::check(
                &data,
                &raft,
                name,
                &crate::identity::Identity {
                    replicaset: replicaset.name.clone(),
                    node_id: *node_id,
                },
            )?;
            restore_snapshot(&raft, copy, *node_id)
                .with_context(|| format!("cannot restore {name}"))?;
            restored.push(Restored {
                instance: name.clone(),
                replicaset: replicaset.name.clone(),
                index: copy.last_log_index(),
                data_before: aside,
            });
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&restored)?);
        return Ok(());
    }
    for restored in &restored {
        let before = match &restored.data_before {
            Some(aside) => format!("its data before is in {}", aside.display()),
            None => "it had no data".to_string(),
        };
        println!(
            "{}: {} restored at log index {}; {before}",
            restored.instance, restored.replicaset, restored.index
        );
    }
    println!(
        "restored the backup of {} ({}); start the cluster: `billcl start`",
        manifest.taken_at,
        dir.display()
    );
    Ok(())
}

/// One member made from a backup.
#[derive(Serialize)]
struct Restored {
    instance: String,
    replicaset: String,
    index: u64,
    data_before: Option<PathBuf>,
}

fn names(set: &BTreeSet<&str>) -> String {
    set.iter().copied().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::BucketData;

    fn holding(buckets: &[(u32, BucketState)]) -> Vec<(u32, bool)> {
        let mut state = State::new(4);
        for (id, bucket_state) in buckets {
            let data = BucketData::new(bucket_state.clone());
            state.buckets.insert(*id, Arc::new(data));
        }
        holds(&state).collect()
    }

    #[test]
    fn a_backup_holds_each_bucket_once_and_a_move_between_its_snapshots_is_found() {
        use BucketState::*;
        let a = holding(&[(1, Active), (2, Pinned)]);
        let b = holding(&[(3, Active), (4, Active)]);
        assert_eq!(holders(4, &[("a", &a), ("b", &b)]), Ok(()));
        // A move under way: still its sender's, then its receiver's before the sender drops it.
        let sending = holding(&[(1, Active), (2, Sending { to: "b".into() })]);
        let receiving = holding(&[(2, Receiving), (3, Active), (4, Active)]);
        assert_eq!(holders(4, &[("a", &sending), ("b", &receiving)]), Ok(()));
        let received = holding(&[(2, Active), (3, Active), (4, Active)]);
        assert_eq!(holders(4, &[("a", &sending), ("b", &received)]), Ok(()));
        // a before it sent bucket 2, b after it received it.
        assert_eq!(
            holders(4, &[("a", &a), ("b", &received)]),
            Err("bucket 2 is active in a and b".into())
        );
        // b before it received bucket 2, a after it dropped it.
        let sent = holding(&[(1, Active), (2, Sent)]);
        assert_eq!(
            holders(4, &[("a", &sent), ("b", &b)]),
            Err("bucket 2 is in none of them".into())
        );
        // Not bootstrapped: no bucket anywhere.
        assert_eq!(holders(4, &[("a", &[]), ("b", &[])]), Ok(()));
    }
}
