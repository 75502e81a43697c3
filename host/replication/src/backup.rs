//! A replica's snapshot file copied out of its directory (a backup), and a replica directory
//! made from such a copy alone (a restore): `billcl backup` and `billcl restore`, like
//! Tarantool's `box.backup.start()` and a restart on the files it listed.
//!
//! A restored member holds the snapshot, an empty log purged up to the snapshot's last entry
//! and a vote in that entry's term (a member's vote is never below its log's last term); with
//! every member of a replicaset restored from the same copy, they all hold the same state at
//! the same index, and the voters elect a leader in the next term as after any restart.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use openraft::Vote;

use crate::durable_file::CHECKSUM_BYTES;
use crate::durable_file::{self, Read};
use crate::durable_log::DurableLog;
use crate::state_machine::{parse_snapshot, snapshot_path, Meta, SNAPSHOT_HEADER_BYTES_MAX};
use crate::{Error, NodeId, SyncMode};

/// A snapshot file as [`read_snapshot`] read and verified it.
pub struct SnapshotCopy {
    /// The file's payload (its checksum verified).
    payload: Vec<u8>,
    meta: Meta,
    /// Where the machine's bytes start in `payload`.
    state_at: usize,
}

impl SnapshotCopy {
    /// The index of the last entry the snapshot holds.
    pub fn last_log_index(&self) -> u64 {
        self.meta.last_log_id.map_or(0, |id| id.index)
    }

    /// The term of the last entry the snapshot holds.
    pub fn last_log_term(&self) -> u64 {
        self.meta.last_log_id.map_or(0, |id| id.leader_id.term)
    }

    /// The voters of the membership the snapshot holds.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.meta.last_membership.membership().voter_ids().collect()
    }

    /// What [`crate::Machine::snapshot`] wrote: the state, for the machine's
    /// [`crate::Machine::restore`].
    pub fn state(&self) -> &[u8] {
        &self.payload[self.state_at..]
    }

    /// Writes the copy to `path` as a snapshot file (durably; replaced atomically).
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        durable_file::write(path, &[&self.payload], true).map_err(|source| Error::Io {
            action: "write the snapshot copy",
            path: path.to_path_buf(),
            source,
        })
    }
}

/// The snapshot file of the replica whose directory is `dir`.
pub fn replica_snapshot_path(dir: &Path) -> PathBuf {
    snapshot_path(dir)
}

/// Reads the snapshot file at `path` (a replica's [`replica_snapshot_path`], or a copy of it)
/// in one read, so that a snapshot written meanwhile (which replaces the file by a rename) does
/// not mix with it, and verifies its checksum and header.
pub fn read_snapshot(path: &Path) -> Result<SnapshotCopy, Error> {
    let read = durable_file::read(path).map_err(|source| Error::Io {
        action: "read the snapshot",
        path: path.to_path_buf(),
        source,
    })?;
    SnapshotCopy::from_read(read, &path.display().to_string())
}

impl SnapshotCopy {
    /// A snapshot file's bytes ([`read_snapshot_part`] reads them, from another machine say),
    /// verified as [`read_snapshot`] does; `what` names them in a complaint.
    pub fn from_file_bytes(bytes: Vec<u8>, what: &str) -> Result<SnapshotCopy, Error> {
        SnapshotCopy::from_read(durable_file::verify(bytes, what), what)
    }

    fn from_read(read: Read, what: &str) -> Result<SnapshotCopy, Error> {
        let damaged = |why: String| Error::Corrupt(format!("{what}: {why}"));
        let payload = match read {
            Read::Payload(payload) => payload,
            Read::Missing => return Err(damaged("no snapshot there".into())),
            Read::Damaged(why) => return Err(Error::Corrupt(why)),
        };
        let (meta, state_at) = parse_snapshot(&payload).map_err(damaged)?;
        if meta.last_log_id.is_none() {
            return Err(damaged("the snapshot holds no entry".into()));
        }
        Ok(SnapshotCopy {
            payload,
            meta,
            state_at,
        })
    }
}

/// Up to `len` bytes of the snapshot file at `path` from `offset`, with the file's length, read
/// only while the file holds the snapshot up to log index `index` (`None` once another, newer
/// one replaced it). The header and the part come from one open file, so they belong to the
/// same snapshot even if it is replaced meanwhile; and only the part is read, not the whole
/// file for each part. The reader checks the checksum of the whole once it has every part
/// ([`SnapshotCopy::from_file_bytes`]).
pub fn read_snapshot_part(
    path: &Path,
    index: u64,
    offset: u64,
    len: usize,
) -> Result<Option<(u64, Vec<u8>)>, Error> {
    let io = |action: &'static str| {
        move |source| Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let damaged = |why: String| Error::Corrupt(format!("{}: {why}", path.display()));
    let file = File::open(path).map_err(io("open the snapshot"))?;
    let total = file
        .metadata()
        .map_err(io("read the snapshot's size"))?
        .len();
    // The checksum, then the header's length and the header.
    let mut prefix = vec![0; CHECKSUM_BYTES + 4];
    file.read_exact_at(&mut prefix, 0)
        .map_err(io("read the snapshot's header"))?;
    let header_len = u32::from_le_bytes(prefix[CHECKSUM_BYTES..].try_into().expect("4 bytes"));
    if header_len as usize > SNAPSHOT_HEADER_BYTES_MAX {
        return Err(damaged(format!("a header of {header_len} bytes")));
    }
    prefix.resize(prefix.len() + header_len as usize, 0);
    file.read_exact_at(&mut prefix, 0)
        .map_err(io("read the snapshot's header"))?;
    let (meta, _) = parse_snapshot(&prefix[CHECKSUM_BYTES..]).map_err(damaged)?;
    if meta.last_log_id.map(|id| id.index) != Some(index) {
        return Ok(None);
    }
    let end = offset.saturating_add(len as u64).min(total);
    let mut part = vec![0; end.saturating_sub(offset) as usize];
    file.read_exact_at(&mut part, offset)
        .map_err(io("read the snapshot"))?;
    Ok(Some((total, part)))
}

/// Makes `dir`, which must hold no file (a member's Raft directory moved aside, or a new one),
/// the Raft directory of node `node_id` holding `snapshot`: the snapshot file, a log that
/// starts after its last entry, and a vote in that entry's term. Started, the member restores
/// the state from the snapshot and takes part in the next election (or, not in the snapshot's
/// membership, asks to join as a learner). Blocks until the files are durable: not for an
/// async worker.
pub fn restore_snapshot(dir: &Path, snapshot: &SnapshotCopy, node_id: NodeId) -> Result<(), Error> {
    if holds_a_file(dir) {
        return Err(Error::Config(format!(
            "{} holds Raft state already: a restore starts from an empty directory",
            dir.display()
        )));
    }
    let last = snapshot.meta.last_log_id.expect("read_snapshot checks it");
    let path = snapshot_path(dir);
    let snapshot_dir = path.parent().expect("the snapshot file is in a directory");
    std::fs::create_dir_all(snapshot_dir).map_err(|source| Error::Io {
        action: "create snapshot directory",
        path: snapshot_dir.to_path_buf(),
        source,
    })?;
    snapshot.write(&path)?;
    let mut log = DurableLog::open(dir, SyncMode::Fsync, crate::LOG_SEGMENT_BYTES_MAX)?;
    let purged = log.purge(last)?;
    crate::failover::wait(purged)?;
    let voted = log.save_vote(Vote::new(last.leader_id.term, node_id))?;
    crate::failover::wait(Some(voted))?;
    log.close_and_join()?;
    tracing::info!(
        node = node_id,
        index = last.index,
        term = last.leader_id.term,
        "restored from a snapshot copy"
    );
    Ok(())
}

/// Whether `dir` or a directory within it holds a file.
fn holds_a_file(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| match entry.file_type() {
        Ok(kind) if kind.is_dir() => holds_a_file(&entry.path()),
        _ => true,
    })
}
