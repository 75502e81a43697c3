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
use std::os::unix::fs::FileExt;
use std::path::Path;

pub(crate) const CHECKSUM_BYTES: usize = 4;
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
    write_with(path, durable, |out| {
        parts.iter().try_for_each(|part| out.write_all(part))
    })
    .map(|_| ())
}

/// Replaces `path` with what `fill` writes, atomically, without holding it all in memory:
/// written a [`WRITEBACK_CHUNK_BYTES`] chunk at a time, the checksum put in front at the
/// end. Returns the payload's length.
pub(crate) fn write_with(
    path: &Path,
    durable: bool,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let payload_bytes = {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut out = ChunkedWriter {
            file,
            durable,
            chunk: Vec::with_capacity(WRITEBACK_CHUNK_BYTES),
            written: CHECKSUM_BYTES as u64,
            checksum: 0,
        };
        // The checksum's place; it is known once the payload is.
        out.file.write_all(&[0; CHECKSUM_BYTES])?;
        fill(&mut out)?;
        out.write_chunk()?;
        out.file.write_all_at(&out.checksum.to_le_bytes(), 0)?;
        if durable {
            out.file.sync_all()?;
        }
        out.written - CHECKSUM_BYTES as u64
    };
    fs::rename(&tmp, path)?;
    if durable {
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
    }
    Ok(payload_bytes)
}

/// Writes what it is given to `file` in chunks, checksumming it, and writes each full chunk
/// back to the disk when `durable`.
struct ChunkedWriter {
    file: File,
    durable: bool,
    chunk: Vec<u8>,
    /// Bytes in the file so far, the checksum's place included.
    written: u64,
    checksum: u32,
}

impl ChunkedWriter {
    fn write_chunk(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.chunk)?;
        self.checksum = crc32c::crc32c_append(self.checksum, &self.chunk);
        if self.durable && self.chunk.len() == WRITEBACK_CHUNK_BYTES {
            write_back(&self.file, self.written, self.chunk.len() as u64);
        }
        self.written += self.chunk.len() as u64;
        self.chunk.clear();
        Ok(())
    }
}

impl Write for ChunkedWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = WRITEBACK_CHUNK_BYTES - self.chunk.len();
        let taken = bytes.len().min(room);
        self.chunk.extend_from_slice(&bytes[..taken]);
        if self.chunk.len() == WRITEBACK_CHUNK_BYTES {
            self.write_chunk()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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
    match fs::read(path) {
        Ok(bytes) => Ok(verify(bytes, &path.display().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Read::Missing),
        Err(e) => Err(e),
    }
}

/// The payload of a file's bytes as [`write`] wrote them (`what` names them in a complaint),
/// its checksum verified.
pub(crate) fn verify(mut bytes: Vec<u8>, what: &str) -> Read {
    if bytes.len() < CHECKSUM_BYTES {
        return Read::Damaged(format!("{what} is {} bytes long", bytes.len()));
    }
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let actual = crc32c::crc32c(&bytes[CHECKSUM_BYTES..]);
    if stored != actual {
        return Read::Damaged(format!(
            "{what}: checksum {actual:#010x} does not match the stored {stored:#010x}"
        ));
    }
    bytes.drain(..CHECKSUM_BYTES);
    Read::Payload(bytes)
}

/// Makes renames, creations and removals in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_piece_by_piece_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot");
        // Pieces of every size across chunk boundaries: 1 byte, then growing.
        let pieces: Vec<Vec<u8>> = (0..2000u32)
            .map(|n| vec![(n % 251) as u8; (n as usize * 37) % 1000 + 1])
            .collect();
        let whole: Vec<u8> = pieces.concat();
        assert!(whole.len() > 3 * WRITEBACK_CHUNK_BYTES);
        let written = write_with(&path, true, |out| {
            pieces.iter().try_for_each(|piece| out.write_all(piece))
        })
        .unwrap();
        assert_eq!(written, whole.len() as u64);
        assert!(matches!(read(&path).unwrap(), Read::Payload(p) if p == whole));
        // What fill fails with is the write's error, and the old file stays.
        let failed = write_with(&path, true, |out| {
            out.write_all(b"partial")?;
            Err(io::Error::other("the state could not be serialized"))
        });
        assert!(failed.is_err());
        assert!(matches!(read(&path).unwrap(), Read::Payload(p) if p == whole));
    }

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
