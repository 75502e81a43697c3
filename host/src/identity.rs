//! What a storage member's data was written as: its replicaset and Raft node id, recorded in
//! its data directory the first time it holds Raft state there, and checked at every start.
//!
//! A member's node id comes from the cluster file (its `node_id`, or else its 1-based position
//! by name in its replicaset), and its Raft state (votes, memberships, the log) names members
//! by those ids. An instance added whose name sorts before the others renumbers them: started
//! again, `storage-a-001` would take node 2's place with node 1's data, and its replicaset would
//! have no leader, with messages about everything but the cause. So a member whose Raft state
//! was written under another id or replicaset refuses to start and says how to fix the file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The file, in an instance's data directory, that records its identity.
pub const IDENTITY_FILE: &str = "identity.json";

/// What a member's Raft data was written as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub replicaset: String,
    pub node_id: u64,
}

/// Checks that `instance`, whose data directory is `dir` (its Raft state in `raft_dir`), may
/// start as `wanted`: refuses when its Raft state was written as another member. Records
/// `wanted` when the directory has no identity yet (a new member, or data from a build that did
/// not record one) or holds no Raft state (whatever it was before, it starts anew).
pub fn check(dir: &Path, raft_dir: &Path, instance: &str, wanted: &Identity) -> Result<()> {
    let path = dir.join(IDENTITY_FILE);
    let holds_state = holds_a_file(raft_dir);
    let recorded = match std::fs::read(&path) {
        Ok(bytes) => Some(serde_json::from_slice::<Identity>(&bytes).with_context(|| {
            format!(
                "{} is unreadable; it records what {instance}'s data was written as (delete it \
                 to record the cluster file's identity again)",
                path.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    match recorded {
        Some(recorded) if recorded == *wanted => return Ok(()),
        Some(recorded) if holds_state => bail!(
            "{instance}'s data ({}) was written as node {} of replicaset {}, but the cluster \
             file now makes it node {} of replicaset {}. A member's node id is its `node_id`, \
             or else its 1-based position by name in its replicaset, so an instance added \
             whose name sorts before others renumbers them: give the instances of {} their ids \
             explicitly (`node_id = {}` in [replicasets.{}.instances.{instance}]), or name the \
             new instance so that it sorts after the others",
            dir.display(),
            recorded.node_id,
            recorded.replicaset,
            wanted.node_id,
            wanted.replicaset,
            recorded.replicaset,
            recorded.node_id,
            recorded.replicaset,
        ),
        _ => {}
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = serde_json::to_vec(wanted).expect("an identity serializes");
    write_durably(&path, &bytes)
        .with_context(|| format!("cannot record {instance}'s identity in {}", path.display()))
}

/// Replaces the file at `path` with `bytes`, durably and atomically: written to `NAME.partial`
/// beside it and synced, renamed over it, and the directory synced; a crash leaves the old file
/// or the new one.
pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, bytes)?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Whether `dir` or a directory within it holds a file: a member that never held Raft state
/// has only the empty directories it made at start.
fn holds_a_file(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| match entry.file_type() {
        Ok(kind) if kind.is_dir() => holds_a_file(&entry.path()),
        Ok(_) => true,
        Err(_) => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(replicaset: &str, node_id: u64) -> Identity {
        Identity {
            replicaset: replicaset.to_string(),
            node_id,
        }
    }

    #[test]
    fn a_member_renumbered_over_its_raft_data_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let raft = dir.path().join("raft");
        let check = |wanted: &Identity| check(dir.path(), &raft, "storage-a-001", wanted);
        // No Raft state yet (at most the empty directories a start makes): any identity is
        // recorded, the last one wins.
        check(&identity("storage-a", 2)).unwrap();
        std::fs::create_dir_all(raft.join("log")).unwrap();
        std::fs::create_dir_all(raft.join("snapshot")).unwrap();
        check(&identity("storage-a", 1)).unwrap();
        std::fs::write(raft.join("log").join("00000000000000000000.log"), b"x").unwrap();
        check(&identity("storage-a", 1)).unwrap();

        let renumbered = check(&identity("storage-a", 2)).unwrap_err().to_string();
        assert!(
            renumbered.contains(
                "was written as node 1 of replicaset storage-a, but the cluster \
                 file now makes it node 2 of replicaset storage-a"
            ),
            "{renumbered}"
        );
        assert!(renumbered.contains("`node_id = 1`"), "{renumbered}");
        let moved = check(&identity("storage-b", 1)).unwrap_err().to_string();
        assert!(moved.contains("node 1 of replicaset storage-b"), "{moved}");
        // The refusals changed nothing: the recorded identity still starts.
        check(&identity("storage-a", 1)).unwrap();

        // Its Raft state gone (moved aside, wiped), it starts anew under the file's identity.
        std::fs::remove_dir_all(&raft).unwrap();
        check(&identity("storage-a", 3)).unwrap();
        check(&identity("storage-a", 2)).unwrap();
        let recorded: Identity =
            serde_json::from_slice(&std::fs::read(dir.path().join(IDENTITY_FILE)).unwrap())
                .unwrap();
        assert_eq!(recorded, identity("storage-a", 2));
    }

    #[test]
    fn data_without_a_recorded_identity_takes_the_cluster_files() {
        let dir = tempfile::tempdir().unwrap();
        let raft = dir.path().join("raft");
        std::fs::create_dir_all(&raft).unwrap();
        std::fs::write(raft.join("vote"), b"x").unwrap();
        check(
            dir.path(),
            &raft,
            "storage-a-002",
            &identity("storage-a", 2),
        )
        .unwrap();
        let error = check(
            dir.path(),
            &raft,
            "storage-a-002",
            &identity("storage-a", 3),
        );
        assert!(error.is_err());
        std::fs::write(dir.path().join(IDENTITY_FILE), b"{").unwrap();
        let unreadable = check(
            dir.path(),
            &raft,
            "storage-a-002",
            &identity("storage-a", 2),
        )
        .unwrap_err()
        .to_string();
        assert!(unreadable.contains("is unreadable"), "{unreadable}");
    }
}
