//! The log's writer thread: the only code that mutates log files, so that every write happens
//! in the order it was requested, and appends are group-committed.
//!
//! The thread takes one command, then drains everything else already queued (up to
//! [`WRITER_BATCH_COMMANDS_MAX`]), executes the batch in order, syncs once per [`SyncMode`]
//! (fsync: `sync_data` of the touched segments and, after a segment was created, the
//! directory; write: `write()` per append, no sync; none: buffered, flushed per batch), and only
//! then completes the appends' callbacks. Truncate, purge and vote first complete the appends
//! queued before them. The committed log id is coalesced and saved, never synced (it is a
//! start-up hint), at most every [`COMMITTED_SAVE_INTERVAL_MS`] (and when the log closes): the
//! log leaves the latest one in a [`CommittedSlot`] and wakes the writer only when the slot was
//! empty, so the commits of a busy log (hundreds a second) cost no thread wake-ups. After an I/O
//! error the writer refuses everything: the files no longer match what the log believes.
//!
//! What no append needs to wait for is handed to a second thread, the log's chores: saving the
//! committed log id, and a purge's work (saving the purge point, then deleting the segments
//! below it). A file replaced by a rename, or a 64 MiB segment deleted, took up to 45 ms on
//! this machine's disk under load, and every append queued behind it waited as long
//! (docs/performance-history.md, "Fresh memory, and the log's chores"). A purge is answered
//! once it is handed over: the entries are gone from memory already, and a crash before the
//! chores are done leaves segments that the next open reads again (no purge point saved) or
//! deletes (one saved). Segments a truncation removes are deleted by the writer itself: a later
//! append may create a segment of the same name.
//!
//! Bytes go to the open segment with positioned writes, at the offset the log placed them at,
//! through a write buffer. When a write would end past the file's end, the file is first grown
//! by zeros up to [`PREALLOCATE_BYTES`] further (in every [`SyncMode`], so that the files look
//! the same whatever the mode; capped at the log's segment size unless a record goes further):
//! most appends then overwrite blocks that are already allocated and written, and their
//! `fdatasync` has no file size to persist. A segment is cut back to the end of its data when
//! it is closed (rolled, truncated, or the writer stops); a crash can still leave a zero tail
//! in any segment, which the reader takes for the end of the data
//! ([`crate::durable_log`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{durable_file, SyncMode};

/// At most this many commands are executed before one group commit.
const WRITER_BATCH_COMMANDS_MAX: usize = 1024;
/// The write buffer in front of the open segment.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// How far past its end a segment is grown, with zeros, when a write would end past it.
///
/// An `fdatasync` that also has to persist a new file size costs a journal commit (on ext4,
/// ~60-75 µs of CPU here against ~35-55 µs for a write into blocks already allocated and
/// written), and the log syncs hundreds of times a second. Zeros are written rather than
/// `fallocate`d: ext4 keeps fallocated extents "unwritten", and the first write into one needs
/// a journal commit all the same.
pub(crate) const PREALLOCATE_BYTES: u64 = 1 << 20;
/// Zeros are written a chunk at a time from [`ZEROS`].
const ZERO_CHUNK_BYTES: usize = 64 << 10;
static ZEROS: [u8; ZERO_CHUNK_BYTES] = [0; ZERO_CHUNK_BYTES];
/// The committed log id is saved at most this often (it is only a start-up hint).
pub(crate) const COMMITTED_SAVE_INTERVAL_MS: u64 = 50;

/// What the writer did since the log was opened, counted as it goes (read by
/// [`crate::Replica::status`]).
#[derive(Debug, Default)]
pub(crate) struct LogStats {
    /// Group commits: batches of appends completed together.
    pub group_commits: AtomicU64,
    /// `fdatasync`s of segments (`sync = "fsync"` only), and the time they took.
    pub syncs: AtomicU64,
    pub sync_micros: AtomicU64,
    /// Bytes written to segments (entries; not the zeros that preallocate).
    pub bytes_written: AtomicU64,
}

/// Called once the append it belongs to is on disk (per [`SyncMode`]), or failed.
pub(crate) type FlushCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Bytes to add at the end of one segment.
pub(crate) struct Piece {
    /// The segment, named by its first index.
    pub segment: u64,
    /// Where the bytes start in the segment: where its data ends so far.
    pub offset: u64,
    pub bytes: Vec<u8>,
}

pub(crate) enum WriterCommand {
    Append {
        pieces: Vec<Piece>,
        done: FlushCallback,
    },
    /// Cut `segment` to `bytes` long and delete the segments in `remove`.
    Truncate {
        segment: u64,
        bytes: u64,
        remove: Vec<u64>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Save the purge point, then delete the segments in `remove`.
    Purge {
        purged: Vec<u8>,
        remove: Vec<u64>,
        done: oneshot::Sender<io::Result<()>>,
    },
    SaveVote {
        vote: Vec<u8>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// A committed log id waits in the [`CommittedSlot`].
    SaveCommitted,
}

/// Work of the log that no append waits for (see the module's documentation).
enum Chore {
    /// Save the committed log id (encoded), unsynced.
    SaveCommitted(Vec<u8>),
    /// Save the purge point (encoded), then delete these segments below it.
    Purge {
        purged: Vec<u8>,
        remove: Vec<PathBuf>,
    },
}

/// Runs the chores in the order they come until the writer lets go of its sender.
fn do_chores(dir: &Path, durable: bool, chores: Receiver<Chore>) {
    for chore in chores {
        match chore {
            Chore::SaveCommitted(committed) => {
                // Only a start-up hint (never trusted past the synced log, checked again on
                // open): a lost update means a little more is applied again from the leader,
                // and a file damaged by a crash is ignored (its checksum tells). So never
                // synced.
                let path = dir.join("committed");
                if let Err(e) = durable_file::write(&path, &[&committed], false) {
                    tracing::warn!(
                        error = %e,
                        path = %path.display(),
                        "saving the committed log id"
                    );
                }
            }
            Chore::Purge { purged, remove } => {
                let path = dir.join("purged");
                if let Err(e) = durable_file::write(&path, &[&purged], durable) {
                    tracing::error!(
                        error = %e,
                        path = %path.display(),
                        "saving the purge point; the segments below it stay (and are read again \
                         at the next start) until a purge saves one"
                    );
                    continue;
                }
                if let Err(e) = remove_files(&remove, durable) {
                    tracing::error!(
                        error = %e,
                        "deleting purged log segments; the next start deletes what is left"
                    );
                }
            }
        }
    }
}

/// Deletes `paths` (those already gone are fine), then makes that durable when `durable`.
fn remove_files(paths: &[PathBuf], durable: bool) -> io::Result<()> {
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match paths.first().and_then(|path| path.parent()) {
        Some(dir) if durable => durable_file::sync_dir(dir),
        _ => Ok(()),
    }
}

/// The latest committed log id (encoded) not taken by the writer yet.
pub(crate) type CommittedSlot = Arc<Mutex<Option<Vec<u8>>>>;

/// `dir/log/<first-index:020>.log`
pub(crate) fn segment_path(log_dir: &Path, first_index: u64) -> PathBuf {
    log_dir.join(format!("{first_index:020}.log"))
}

/// Starts the writer thread for the replica directory `dir` of a log whose segments are rolled
/// at `segment_bytes_max` (preallocation stops there). Dropping the sender stops it after it
/// has executed and synced everything queued.
pub(crate) fn spawn(
    dir: &Path,
    sync: SyncMode,
    segment_bytes_max: u64,
    committed: CommittedSlot,
    stats: Arc<LogStats>,
) -> io::Result<(Sender<WriterCommand>, JoinHandle<()>)> {
    let (sender, receiver) = mpsc::channel();
    let (chores, chores_receiver) = mpsc::channel();
    let chores_dir = dir.to_path_buf();
    let durable = sync == SyncMode::Fsync;
    let chores_thread = std::thread::Builder::new()
        .name("billcl-log-chores".into())
        .spawn(move || do_chores(&chores_dir, durable, chores_receiver))?;
    let writer = Writer {
        dir: dir.to_path_buf(),
        log_dir: dir.join("log"),
        sync,
        segment_bytes_max,
        segment: None,
        pending: Vec::with_capacity(WRITE_BUFFER_BYTES),
        unsynced: false,
        dir_unsynced: false,
        waiting: Vec::new(),
        committed,
        committed_saved_at: None,
        chores: Some((chores, chores_thread)),
        failure: None,
        stats,
    };
    let handle = std::thread::Builder::new()
        .name("billcl-log-writer".into())
        .spawn(move || writer.run(receiver))?;
    Ok((sender, handle))
}

/// The segment appends go to.
///
/// Invariants: the file is `allocated` bytes long; the data ends at `data_end`, of which the
/// last `Writer::pending.len()` bytes are not written yet; everything written past the data
/// is zeros; `data_end - pending <= allocated`.
struct OpenSegment {
    first_index: u64,
    file: File,
    allocated: u64,
    data_end: u64,
}

impl OpenSegment {
    /// Writes `bytes` at `offset`, then, when they ended past the file's end, grows the file
    /// by zeros to [`PREALLOCATE_BYTES`] past its old end (at most to `segment_bytes_max`).
    fn write_at(&mut self, offset: u64, bytes: &[u8], segment_bytes_max: u64) -> io::Result<()> {
        assert!(
            offset <= self.allocated,
            "a write would leave a hole in the segment"
        );
        self.file.write_all_at(bytes, offset)?;
        let end = offset + bytes.len() as u64;
        if end > self.allocated {
            let target = end.max((self.allocated + PREALLOCATE_BYTES).min(segment_bytes_max));
            let mut at = end;
            while at < target {
                let chunk = (target - at).min(ZERO_CHUNK_BYTES as u64) as usize;
                self.file.write_all_at(&ZEROS[..chunk], at)?;
                at += chunk as u64;
            }
            self.allocated = target;
        }
        Ok(())
    }
}

struct Writer {
    dir: PathBuf,
    log_dir: PathBuf,
    sync: SyncMode,
    segment_bytes_max: u64,
    segment: Option<OpenSegment>,
    /// The write buffer: bytes of the open segment not written yet, ending at its `data_end`.
    pending: Vec<u8>,
    /// The open segment has data that is not synced yet.
    unsynced: bool,
    /// A segment was created since the last directory sync.
    dir_unsynced: bool,
    /// Appends written but not yet group-committed.
    waiting: Vec<FlushCallback>,
    /// The latest committed log id not saved yet, left by the log.
    committed: CommittedSlot,
    committed_saved_at: Option<Instant>,
    /// The chores thread and what feeds it; let go of (and joined) when the writer stops.
    chores: Option<(Sender<Chore>, JoinHandle<()>)>,
    failure: Option<String>,
    stats: Arc<LogStats>,
}

impl Writer {
    fn run(mut self, commands: Receiver<WriterCommand>) {
        let interval = Duration::from_millis(COMMITTED_SAVE_INTERVAL_MS);
        loop {
            let committed_waiting = self.committed.lock().unwrap().is_some();
            let first = if committed_waiting {
                let elapsed = self.committed_saved_at.map_or(interval, |at| at.elapsed());
                match commands.recv_timeout(interval.saturating_sub(elapsed)) {
                    Ok(command) => Some(command),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => break,
                }
            };
            if let Some(command) = first {
                self.execute(command);
                for command in commands.try_iter().take(WRITER_BATCH_COMMANDS_MAX - 1) {
                    self.execute(command);
                }
            }
            self.group_commit();
            self.save_committed(false);
        }
        self.group_commit();
        self.save_committed(true);
        if self.failure.is_none() {
            if let Err(e) = self.close_segment() {
                self.fail(e);
            }
        }
        // What was handed over is done before the log is closed.
        if let Some((chores, thread)) = self.chores.take() {
            drop(chores);
            let _ = thread.join();
        }
    }

    fn hand_over(&self, chore: Chore) {
        if let Some((chores, _)) = &self.chores {
            // Fails only if the chores thread panicked; the next open repairs what it left.
            let _ = chores.send(chore);
        }
    }

    fn execute(&mut self, command: WriterCommand) {
        match command {
            WriterCommand::Append { pieces, done } => {
                if let Some(failure) = &self.failure {
                    done(Err(failed(failure)));
                    return;
                }
                let mut result = pieces.iter().try_for_each(|piece| self.write_piece(piece));
                if result.is_ok() && self.sync == SyncMode::Write {
                    result = self.flush();
                }
                match result {
                    Ok(()) => self.waiting.push(done),
                    Err(e) => {
                        done(Err(io::Error::new(e.kind(), e.to_string())));
                        self.fail(e);
                    }
                }
            }
            WriterCommand::Truncate {
                segment,
                bytes,
                remove,
                done,
            } => {
                let result = self.exclusive(|writer| writer.truncate(segment, bytes, &remove));
                let _ = done.send(result);
            }
            WriterCommand::Purge {
                purged,
                remove,
                done,
            } => {
                let result = self.exclusive(|writer| writer.purge(&purged, &remove));
                let _ = done.send(result);
            }
            WriterCommand::SaveVote { vote, done } => {
                let durable = self.sync == SyncMode::Fsync;
                let path = self.dir.join("vote");
                let result = self.exclusive(|_| durable_file::write(&path, &[&vote], durable));
                let _ = done.send(result);
            }
            // Only a wake-up: the loop looks at the slot.
            WriterCommand::SaveCommitted => {}
        }
    }

    /// Runs `operation` after the appends queued before it are committed; fails the writer if
    /// it fails.
    fn exclusive(&mut self, operation: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        self.group_commit();
        if let Some(failure) = &self.failure {
            return Err(failed(failure));
        }
        operation(self).inspect_err(|e| self.fail(io::Error::new(e.kind(), e.to_string())))
    }

    fn write_piece(&mut self, piece: &Piece) -> io::Result<()> {
        if self.segment.as_ref().map(|s| s.first_index) != Some(piece.segment) {
            self.close_segment()?;
            self.open_segment(piece.segment, piece.offset)?;
        }
        let segment = self.segment.as_mut().expect("a segment was just opened");
        if piece.offset != segment.data_end {
            return Err(io::Error::other(format!(
                "bytes for offset {} of segment {} do not follow its data, which ends at {}",
                piece.offset, piece.segment, segment.data_end
            )));
        }
        if self.pending.len() + piece.bytes.len() > WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        let segment = self.segment.as_mut().expect("a segment is open");
        if piece.bytes.len() >= WRITE_BUFFER_BYTES {
            segment.write_at(piece.offset, &piece.bytes, self.segment_bytes_max)?;
        } else {
            self.pending.extend_from_slice(&piece.bytes);
        }
        segment.data_end += piece.bytes.len() as u64;
        self.unsynced = true;
        self.stats
            .bytes_written
            .fetch_add(piece.bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Opens segment `first_index` (creating it) to append at `data_end`, where the log
    /// believes its data ends; the file may be longer (zeros), never shorter.
    fn open_segment(&mut self, first_index: u64, data_end: u64) -> io::Result<()> {
        let path = segment_path(&self.log_dir, first_index);
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        if !existed {
            self.dir_unsynced = true;
        }
        let allocated = file.metadata()?.len();
        if allocated < data_end {
            return Err(io::Error::other(format!(
                "{} is {allocated} bytes but the log's data in it ends at byte {data_end}",
                path.display()
            )));
        }
        self.segment = Some(OpenSegment {
            first_index,
            file,
            allocated,
            data_end,
        });
        Ok(())
    }

    /// Writes the write buffer out.
    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let segment = self
            .segment
            .as_mut()
            .expect("buffered bytes belong to the open segment");
        let offset = segment.data_end - self.pending.len() as u64;
        segment.write_at(offset, &self.pending, self.segment_bytes_max)?;
        self.pending.clear();
        Ok(())
    }

    /// Flushes (and per the mode syncs) the open segment, cuts its preallocated zeros off and
    /// closes it. The cut is not synced: a crash may bring the zeros back, which the reader
    /// takes for the end of the data.
    fn close_segment(&mut self) -> io::Result<()> {
        self.sync_segment()?;
        if let Some(segment) = self.segment.take() {
            if segment.allocated > segment.data_end {
                segment.file.set_len(segment.data_end)?;
            }
        }
        Ok(())
    }

    fn sync_segment(&mut self) -> io::Result<()> {
        self.flush()?;
        if self.sync == SyncMode::Fsync && self.unsynced {
            if let Some(segment) = &self.segment {
                let started = Instant::now();
                segment.file.sync_data()?;
                let micros = started.elapsed().as_micros() as u64;
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.stats.sync_micros.fetch_add(micros, Ordering::Relaxed);
            }
        }
        self.unsynced = false;
        Ok(())
    }

    /// Makes the appends written so far durable (per the mode) and completes their callbacks.
    fn group_commit(&mut self) {
        if self.failure.is_none() {
            let mut result = self.sync_segment();
            if result.is_ok() && self.sync == SyncMode::Fsync && self.dir_unsynced {
                result = durable_file::sync_dir(&self.log_dir);
            }
            self.dir_unsynced = false;
            if let Err(e) = result {
                self.fail(e);
            }
        }
        let waiting = std::mem::take(&mut self.waiting);
        if !waiting.is_empty() {
            self.stats.group_commits.fetch_add(1, Ordering::Relaxed);
        }
        for done in waiting {
            match &self.failure {
                None => done(Ok(())),
                Some(failure) => done(Err(failed(failure))),
            }
        }
    }

    fn truncate(&mut self, segment: u64, bytes: u64, remove: &[u64]) -> io::Result<()> {
        let open = self.segment.as_ref().map(|s| s.first_index);
        if open == Some(segment) || open.is_some_and(|open| remove.contains(&open)) {
            self.close_segment()?;
        }
        // From the last segment down, then the cut: a crash part way leaves a shorter log that
        // is still contiguous (what it still holds past the cut was never committed).
        let mut remove = remove.to_vec();
        remove.sort_unstable_by(|a, b| b.cmp(a));
        self.remove_segments(&remove)?;
        if !remove.contains(&segment) {
            let file = OpenOptions::new()
                .write(true)
                .open(segment_path(&self.log_dir, segment))?;
            file.set_len(bytes)?;
            if self.sync == SyncMode::Fsync {
                file.sync_data()?;
            }
        }
        Ok(())
    }

    /// Closes the open segment if it is to go, and hands the rest to the chores thread.
    fn purge(&mut self, purged: &[u8], remove: &[u64]) -> io::Result<()> {
        let open = self.segment.as_ref().map(|s| s.first_index);
        if open.is_some_and(|open| remove.contains(&open)) {
            self.close_segment()?;
        }
        let remove = remove
            .iter()
            .map(|first_index| segment_path(&self.log_dir, *first_index))
            .collect();
        self.hand_over(Chore::Purge {
            purged: purged.to_vec(),
            remove,
        });
        Ok(())
    }

    fn remove_segments(&mut self, remove: &[u64]) -> io::Result<()> {
        let paths: Vec<PathBuf> = remove
            .iter()
            .map(|first_index| segment_path(&self.log_dir, *first_index))
            .collect();
        remove_files(&paths, self.sync == SyncMode::Fsync)
    }

    fn save_committed(&mut self, now: bool) {
        if self.failure.is_some() {
            return;
        }
        let due = self
            .committed_saved_at
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(COMMITTED_SAVE_INTERVAL_MS));
        if !(now || due) {
            return;
        }
        let Some(committed) = self.committed.lock().unwrap().take() else {
            return;
        };
        self.hand_over(Chore::SaveCommitted(committed));
        self.committed_saved_at = Some(Instant::now());
    }

    fn fail(&mut self, error: io::Error) {
        tracing::error!(error = %error, dir = %self.dir.display(), "log write failed; the log refuses further writes");
        if self.failure.is_none() {
            self.failure = Some(error.to_string());
        }
        self.segment = None;
        self.pending.clear();
    }
}

fn failed(failure: &str) -> io::Error {
    io::Error::other(format!(
        "the log failed earlier and refuses writes: {failure}"
    ))
}
