//! Whole files replaced atomically (the vote, the committed log id, the purge point, the
//! snapshot): a crash leaves either the old or the new content, and a checksum tells a damaged
//! file from a good one.
//!
//! Format: crc32c of the payload (u32 LE) | payload.
//! Write: write `<name>.tmp`, fsync it, rename over `<name>`, fsync the directory (the syncs
//! only when `durable`). A durable file is written back as it is written, a
//! [`WRITEBACK_CHUNK_BYTES`] chunk at a time, rather than left dirty for its final fsync: a
//! snapshot is tens of MB, and flushing it in one go held the disk (and every log `fdatasync`
//! queued behind it) for 20-30 ms on this machine; chunk by chunk, the log's syncs pass between
//! chunks (like RocksDB's `bytes_per_sync`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

const CHECKSUM_BYTES: usize = 4;
/// A durable file is written back this many bytes at a time as it is written.
///
/// A log sync waits behind the chunk each snapshotting member has in flight, and the members
/// of a replicaset reach their snapshot trigger together: on the default cluster four
/// snapshots of tens of MB are written at once. With 1 MiB chunks on a disk that writes
/// 85 MB/s that was up to 4 MiB, ≈ 47 ms, ahead of a sync; with 128 KiB the worst
/// `fdatasync` of the leaders' logs over 45 s of add_money at 64 in flight fell from 33-381 ms
/// (2-121 of them over 20 ms) to 21-26 ms (1-3), its p50 and p99 unchanged
/// (docs/performance-history.md, "Snapshots and the disk: the worst stalls").
pub(crate) const WRITEBACK_CHUNK_BYTES: usize = 128 << 10;

/// Replaces `path` with the concatenation of `parts`, atomically.
pub(crate) fn write(path: &Path, parts: &[&[u8]], durable: bool) -> io::Result<()> {
    let checksum = parts
        .iter()
        .fold(0u32, |crc, part| crc32c::crc32c_append(crc, part));
    let tmp = path.with_extension("tmp");
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&checksum.to_le_bytes())?;
        let mut written = CHECKSUM_BYTES as u64;
        for part in parts {
            for chunk in part.chunks(WRITEBACK_CHUNK_BYTES) {
                file.write_all(chunk)?;
                if durable && chunk.len() == WRITEBACK_CHUNK_BYTES {
                    write_back(&file, written, chunk.len() as u64);
                }
                written += chunk.len() as u64;
            }
        }
        if durable {
            file.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if durable {
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
    }
    Ok(())
}

/// Writes `len` bytes of `file` from `offset` back to the disk and waits for them (data only).
/// Only pacing: the final `sync_all` makes the file durable and reports any I/O error, so a
/// file system without `sync_file_range` just gets the whole flush at the end.
fn write_back(file: &File, offset: u64, len: u64) {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a plain syscall on an open descriptor; the range is within what was written.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
}

/// What [`read`] found.
#[derive(Debug)]
pub(crate) enum Read {
    Missing,
    Payload(Vec<u8>),
    /// The file exists but is too short or its checksum does not match.
    Damaged(String),
}

/// Reads a file written by [`write`] and verifies its checksum.
pub(crate) fn read(path: &Path) -> io::Result<Read> {
    let mut bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
        Err(e) => return Err(e),
    };
    if bytes.len() < CHECKSUM_BYTES {
        return Ok(Read::Damaged(format!(
            "{} is {} bytes long",
            path.display(),
            bytes.len()
        )));
    }
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let actual = crc32c::crc32c(&bytes[CHECKSUM_BYTES..]);
    if stored != actual {
        return Ok(Read::Damaged(format!(
            "{}: checksum {actual:#010x} does not match the stored {stored:#010x}",
            path.display()
        )));
    }
    bytes.drain(..CHECKSUM_BYTES);
    Ok(Read::Payload(bytes))
}

/// Makes renames, creations and removals in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        assert!(matches!(read(&path).unwrap(), Read::Missing));
        write(&path, &[b"hello ", b"world"], true).unwrap();
        match read(&path).unwrap() {
            Read::Payload(payload) => assert_eq!(payload, b"hello world"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!path.with_extension("tmp").exists());
        write(&path, &[b"second"], false).unwrap();
        assert!(matches!(read(&path).unwrap(), Read::Payload(p) if p == b"second"));

        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(&path).unwrap(), Read::Damaged(_)));
        fs::write(&path, [1, 2]).unwrap();
        assert!(matches!(read(&path).unwrap(), Read::Damaged(_)));
    }

    #[test]
    fn a_file_of_many_writeback_chunks_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot");
        // Parts that do not fall on chunk boundaries, one of several chunks.
        let head = vec![7u8; 100];
        let body: Vec<u8> = (0..3 * WRITEBACK_CHUNK_BYTES + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        write(&path, &[&head, &body, b"end"], true).unwrap();
        let Read::Payload(payload) = read(&path).unwrap() else {
            panic!("the file does not read back");
        };
        assert_eq!(payload.len(), head.len() + body.len() + 3);
        assert_eq!(&payload[..100], &head[..]);
        assert_eq!(&payload[100..100 + body.len()], &body[..]);
        assert_eq!(&payload[100 + body.len()..], b"end");
    }
}
