//! The durable Raft log of one replica: checksummed segment files written by a group-commit
//! writer thread ([`crate::log_writer`]), with every entry since the purge point cached in
//! memory, and the small vote / committed / purge-point files.
//!
//! On disk, under the replica directory:
//! - `log/<first-index:020>.log`: segments; a record is `len u32 LE | crc32c(payload) u32 LE |
//!   payload` where the payload is one bincode [`Entry`] (never empty, so `len > 0`). The open
//!   segment is grown ahead of its data with zeros (see [`crate::log_writer`]) and cut back to
//!   its data when closed, but a crash can leave a zero tail in any segment: zeros from a
//!   record boundary to the end of the file are where the data ends, not damage;
//! - `vote`, `committed`, `purged`: [`crate::durable_file`]s holding a bincode `Vote`,
//!   `Option<LogId>` and `LogId`.
//!
//! Invariants (asserted where cheap):
//! 1. The cached entries are contiguous: `entries[k].index == entries[0].index + k`.
//! 2. When something was purged, the first cached entry (if any) is `purged.index + 1`; when
//!    nothing was, a log read back from disk starts at index 0.
//! 3. Segments are contiguous: each segment's first record is the entry after the previous
//!    segment's last record, and a segment is named after the index of its first record.
//! 4. Every cached entry knows its segment and byte offset, and `segments[s]` is the length
//!    segment `s` has once the writer has drained: appends only ever go to the last segment,
//!    which is rolled when it would outgrow `segment_bytes_max` (unless it is empty).
//! 5. Files change only on the writer thread, in request order; an append's callback runs only
//!    after its bytes are written and synced per the [`SyncMode`].
//! 6. Checksums are computed when a record is encoded and verified when it is read back (open).
//! 7. The purge point is saved before any segment below it is deleted; truncation never cuts
//!    below the purge point.
//! 8. On open, a zero tail of any segment is cut off silently; a torn or corrupt tail of the
//!    *last* segment is cut back to the last whole entry (with a warning); damage anywhere
//!    else is an error, and so are a segment other than the last with no entries and entries
//!    missing between segments.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, OpenOptions};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use openraft::{LogId, Vote};
use tokio::sync::oneshot;

use crate::codec;
use crate::durable_file::{self, Read};
use crate::log_writer::{self, FlushCallback, Piece, WriterCommand};
use crate::{Error, NodeId, SyncMode, TypeConfig};

pub(crate) type Entry = openraft::Entry<TypeConfig>;

/// `len u32 LE | crc32c u32 LE`
const RECORD_HEADER_BYTES: usize = 8;
/// One encoded entry is at most this big: a command of `COMMAND_BYTES_MAX` plus room for the
/// entry's log id and framing.
pub(crate) const LOG_RECORD_BYTES_MAX: usize = crate::COMMAND_BYTES_MAX + (1 << 20);
/// The small state files are at most this big.
const STATE_FILE_BYTES_MAX: usize = 4096;

/// A cached entry and where its record starts.
struct Cached {
    entry: Entry,
    segment: u64,
    offset: u64,
}

/// The log. Lives behind a mutex; no method blocks on I/O except [`DurableLog::open`].
pub(crate) struct DurableLog {
    dir: PathBuf,
    segment_bytes_max: u64,
    /// First index of each segment -> its length in bytes once the writer has drained.
    segments: BTreeMap<u64, u64>,
    entries: VecDeque<Cached>,
    purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    writer: Option<(Sender<WriterCommand>, JoinHandle<()>)>,
    /// Where the latest committed log id waits for the writer to save it.
    committed_slot: log_writer::CommittedSlot,
    /// Record bytes appended since the log was opened, plus the bytes it held then.
    appended_bytes: u64,
    /// What the writer counts.
    stats: Arc<log_writer::LogStats>,
}

impl DurableLog {
    /// Opens the log in the replica directory `dir` (creating it), verifying every record.
    pub(crate) fn open(dir: &Path, sync: SyncMode, segment_bytes_max: u64) -> Result<Self, Error> {
        assert!(segment_bytes_max > 0);
        let log_dir = dir.join("log");
        fs::create_dir_all(&log_dir).map_err(io_error("create log directory", &log_dir))?;

        let vote: Option<Vote<NodeId>> = match read_state(&dir.join("vote"))? {
            Ok(vote) => vote,
            Err(damage) => return Err(Error::Corrupt(format!("the saved vote: {damage}"))),
        };
        let purged: Option<LogId<NodeId>> = match read_state(&dir.join("purged"))? {
            Ok(purged) => purged,
            Err(damage) => return Err(Error::Corrupt(format!("the saved purge point: {damage}"))),
        };
        let committed: Option<LogId<NodeId>> =
            match read_state::<Option<LogId<NodeId>>>(&dir.join("committed"))? {
                Ok(committed) => committed.flatten(),
                Err(damage) => {
                    tracing::warn!(
                    "ignoring the saved committed log id ({damage}); the leader will tell again"
                );
                    None
                }
            };

        let mut log = DurableLog {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            segments: BTreeMap::new(),
            entries: VecDeque::new(),
            purged,
            vote,
            committed: None,
            writer: None,
            committed_slot: Default::default(),
            appended_bytes: 0,
            stats: Arc::default(),
        };
        let names = list_segments(&log_dir)?;
        for (position, first_index) in names.iter().enumerate() {
            let is_last = position + 1 == names.len();
            log.read_segment(&log_dir, *first_index, is_last)?;
        }
        log.apply_purge_point(&log_dir)?;
        log.check_contiguous()?;
        log.appended_bytes = log.segments.values().sum();

        // The committed hint may be ahead of a log whose tail was cut: clamp it.
        let last = log.last_log_id();
        log.committed = match committed {
            Some(committed) if Some(committed.index) > last.map(|l| l.index) => {
                tracing::warn!(
                    committed = %committed,
                    last = ?last,
                    "the saved committed log id is past the end of the log; using the last entry"
                );
                last
            }
            committed => committed,
        };
        let writer = log_writer::spawn(
            dir,
            sync,
            segment_bytes_max,
            log.committed_slot.clone(),
            log.stats.clone(),
        )
        .map_err(io_error("start log writer for", dir))?;
        log.writer = Some(writer);
        Ok(log)
    }

    /// Reads one segment into the cache; cuts a zero tail off, and a damaged tail if it is the
    /// last one.
    fn read_segment(
        &mut self,
        log_dir: &Path,
        first_index: u64,
        is_last: bool,
    ) -> Result<(), Error> {
        let path = log_writer::segment_path(log_dir, first_index);
        let bytes = fs::read(&path).map_err(io_error("read log segment", &path))?;
        let mut records = Records::new(&bytes);
        let mut count = 0u64;
        let mut damage = None;
        for record in records.by_ref() {
            let (entry, offset) = match record {
                Ok(parsed) => parsed,
                Err(why) => {
                    damage = Some(why);
                    break;
                }
            };
            let expected = first_index + count;
            if entry.log_id.index != expected {
                return Err(Error::Corrupt(format!(
                    "{} holds entry {} at byte {offset} where entry {expected} belongs",
                    path.display(),
                    entry.log_id.index
                )));
            }
            self.entries.push_back(Cached {
                entry,
                segment: first_index,
                offset: offset as u64,
            });
            count += 1;
        }
        let offset = records.offset;
        if let Some(why) = damage {
            if !is_last {
                return Err(Error::Corrupt(format!(
                    "{}: {why} at byte {offset} of {}; only the last segment's tail can be cut back",
                    path.display(),
                    bytes.len()
                )));
            }
            tracing::warn!(
                segment = %path.display(),
                kept_bytes = offset,
                dropped_bytes = bytes.len() - offset,
                "the log tail is torn or corrupt ({why}): cut back to the last whole entry, dropping {} bytes",
                bytes.len() - offset
            );
        } else if offset < bytes.len() {
            tracing::debug!(
                segment = %path.display(),
                kept_bytes = offset,
                zero_bytes = bytes.len() - offset,
                "cutting the preallocated zeros off a log segment"
            );
        }
        if count == 0 && !is_last {
            return Err(Error::Corrupt(format!(
                "{} has no entries but is not the last segment",
                path.display()
            )));
        }
        if offset < bytes.len() {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_error("open log segment", &path))?;
            file.set_len(offset as u64)
                .map_err(io_error("cut log segment", &path))?;
            file.sync_all()
                .map_err(io_error("sync log segment", &path))?;
        }
        if count == 0 {
            fs::remove_file(&path).map_err(io_error("remove empty log segment", &path))?;
            return Ok(());
        }
        self.segments.insert(first_index, offset as u64);
        Ok(())
    }

    /// Drops what is below the purge point (segments whose deletion a crash interrupted too).
    fn apply_purge_point(&mut self, log_dir: &Path) -> Result<(), Error> {
        let Some(purged) = self.purged else {
            return Ok(());
        };
        while self
            .entries
            .front()
            .is_some_and(|c| c.entry.log_id.index <= purged.index)
        {
            self.entries.pop_front();
        }
        for first_index in self.segments_below(purged.index) {
            let path = log_writer::segment_path(log_dir, first_index);
            tracing::warn!(segment = %path.display(), "removing a segment left below the purge point");
            fs::remove_file(&path).map_err(io_error("remove purged log segment", &path))?;
            self.segments.remove(&first_index);
        }
        Ok(())
    }

    /// The segments whose every entry is at or below `index`.
    fn segments_below(&self, index: u64) -> Vec<u64> {
        let firsts: Vec<u64> = self.segments.keys().copied().collect();
        let last_index = self.entries.back().map(|c| c.entry.log_id.index);
        firsts
            .iter()
            .enumerate()
            .filter(|(position, _)| {
                let end = match firsts.get(position + 1) {
                    Some(next_first) => Some(next_first - 1),
                    None => last_index,
                };
                end.is_none_or(|end| end <= index)
            })
            .map(|(_, first)| *first)
            .collect()
    }

    fn check_contiguous(&self) -> Result<(), Error> {
        let Some(first) = self.entries.front() else {
            return Ok(());
        };
        // Each segment is contiguous within (checked as it is read): look where they meet.
        let breaks = self.entries.iter().zip(self.entries.iter().skip(1));
        if let Some((before, after)) = breaks
            .filter(|(before, after)| before.segment != after.segment)
            .find(|(before, after)| after.entry.log_id.index != before.entry.log_id.index + 1)
        {
            return Err(Error::Corrupt(format!(
                "in {}, segment {} ends at entry {} but the next segment starts at entry {}: \
                 entries are missing",
                self.dir.display(),
                before.segment,
                before.entry.log_id.index,
                after.entry.log_id.index
            )));
        }
        let first_index = first.entry.log_id.index;
        let expected = self.purged.map_or(0, |p| p.index + 1);
        if first_index != expected {
            return Err(Error::Corrupt(format!(
                "the log in {} starts at entry {first_index} but entry {expected} is expected \
                 (purged up to {:?}): segments are missing",
                self.dir.display(),
                self.purged.map(|p| p.index)
            )));
        }
        self.assert_invariants();
        Ok(())
    }

    fn assert_invariants(&self) {
        if let (Some(first), Some(last)) = (self.entries.front(), self.entries.back()) {
            assert_eq!(
                last.entry.log_id.index - first.entry.log_id.index + 1,
                self.entries.len() as u64
            );
            assert!(self.segments.contains_key(&last.segment));
            assert!(self.segments.contains_key(&first.segment));
        }
        if let (Some(purged), Some(first)) = (self.purged, self.entries.front()) {
            assert_eq!(first.entry.log_id.index, purged.index + 1);
        }
    }

    pub(crate) fn vote(&self) -> Option<Vote<NodeId>> {
        self.vote
    }

    pub(crate) fn committed(&self) -> Option<LogId<NodeId>> {
        self.committed
    }

    pub(crate) fn purged(&self) -> Option<LogId<NodeId>> {
        self.purged
    }

    /// Record bytes appended since the log was opened, plus what it held then: grows with
    /// every append (truncations do not take it back).
    pub(crate) fn stats(&self) -> Arc<log_writer::LogStats> {
        self.stats.clone()
    }

    pub(crate) fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    /// The last entry's id, or the purge point when no entry is left.
    pub(crate) fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.entries.back().map(|c| c.entry.log_id).or(self.purged)
    }

    /// The cached entries within `range` (those present).
    pub(crate) fn read(&self, range: impl RangeBounds<u64>) -> Vec<Entry> {
        let Some(first) = self.entries.front().map(|c| c.entry.log_id.index) else {
            return Vec::new();
        };
        let start = match range.start_bound() {
            Bound::Included(start) => *start,
            Bound::Excluded(start) => start.saturating_add(1),
            Bound::Unbounded => first,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(end) => end.saturating_add(1),
            Bound::Excluded(end) => *end,
            Bound::Unbounded => u64::MAX,
        }
        .min(first + self.entries.len() as u64);
        if start >= end {
            return Vec::new();
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        self.entries
            .range(from..to)
            .map(|c| c.entry.clone())
            .collect()
    }

    /// Appends `entries` (readable at once) and hands their records to the writer; `done` runs
    /// once they are on disk. The first entry must follow the last one (or the purge point).
    pub(crate) fn append(&mut self, entries: Vec<Entry>, done: FlushCallback) -> Result<(), Error> {
        let mut next = self
            .entries
            .back()
            .map(|c| c.entry.log_id.index + 1)
            .or(self.purged.map(|p| p.index + 1));
        let (mut segment, mut segment_bytes) = match self.segments.last_key_value() {
            Some((first, bytes)) => (Some(*first), *bytes),
            None => (None, 0),
        };
        let mut pieces: Vec<Piece> = Vec::new();
        let mut placed = Vec::with_capacity(entries.len());
        for entry in entries {
            let index = entry.log_id.index;
            if let Some(next) = next {
                if index != next {
                    return Err(Error::Log(format!(
                        "appending entry {index} would leave a hole: entry {next} is next"
                    )));
                }
            }
            let record = encode_record(&entry)?;
            let record_bytes = record.len() as u64;
            let roll = segment_bytes > 0 && segment_bytes + record_bytes > self.segment_bytes_max;
            if segment.is_none() || roll {
                segment = Some(index);
                segment_bytes = 0;
            }
            let current = segment.expect("a segment was chosen above");
            match pieces.last_mut() {
                Some(piece) if piece.segment == current => piece.bytes.extend_from_slice(&record),
                _ => pieces.push(Piece {
                    segment: current,
                    offset: segment_bytes,
                    bytes: record,
                }),
            }
            placed.push(Cached {
                entry,
                segment: current,
                offset: segment_bytes,
            });
            segment_bytes += record_bytes;
            next = Some(index + 1);
        }
        let lengths: Vec<(u64, u64)> = pieces
            .iter()
            .map(|p| (p.segment, p.bytes.len() as u64))
            .collect();
        self.send(WriterCommand::Append { pieces, done })?;
        for (segment, bytes) in lengths {
            *self.segments.entry(segment).or_insert(0) += bytes;
            self.appended_bytes += bytes;
        }
        self.entries.extend(placed);
        self.assert_invariants();
        Ok(())
    }

    /// Removes the entries from `index` on. Returns what to await for the files to follow, or
    /// `None` when there was nothing to remove.
    pub(crate) fn truncate(
        &mut self,
        index: u64,
    ) -> Result<Option<oneshot::Receiver<io::Result<()>>>, Error> {
        let Some(first) = self.entries.front().map(|c| c.entry.log_id.index) else {
            return Ok(None);
        };
        if index < first {
            return Err(Error::Log(format!(
                "truncating from entry {index} would cut purged or missing entries (the log starts at {first})"
            )));
        }
        let position = (index - first) as usize;
        let Some(cut) = self.entries.get(position) else {
            return Ok(None);
        };
        let (segment, offset) = (cut.segment, cut.offset);
        let mut remove: Vec<u64> = self
            .segments
            .range(segment + 1..)
            .map(|(first, _)| *first)
            .collect();
        if offset == 0 {
            remove.push(segment);
        }
        let (done, finished) = oneshot::channel();
        self.send(WriterCommand::Truncate {
            segment,
            bytes: offset,
            remove: remove.clone(),
            done,
        })?;
        for first in &remove {
            self.segments.remove(first);
        }
        if offset > 0 {
            self.segments.insert(segment, offset);
        }
        self.entries.truncate(position);
        self.assert_invariants();
        Ok(Some(finished))
    }

    /// Forgets the entries up to and including `log_id` and deletes the segments holding only
    /// such entries. A purge point past the last entry empties the log.
    pub(crate) fn purge(
        &mut self,
        log_id: LogId<NodeId>,
    ) -> Result<Option<oneshot::Receiver<io::Result<()>>>, Error> {
        if self
            .purged
            .is_some_and(|purged| purged.index >= log_id.index)
        {
            return Ok(None);
        }
        let purged = codec::encode(&log_id)
            .map_err(|e| Error::Log(format!("encoding the purge point: {e}")))?;
        let mut entries = std::mem::take(&mut self.entries);
        while entries
            .front()
            .is_some_and(|c| c.entry.log_id.index <= log_id.index)
        {
            entries.pop_front();
        }
        self.entries = entries;
        // With every entry purged, `segments_below` selects every segment.
        let remove = self.segments_below(log_id.index);
        let (done, finished) = oneshot::channel();
        self.send(WriterCommand::Purge {
            purged,
            remove: remove.clone(),
            done,
        })?;
        for first in &remove {
            self.segments.remove(first);
        }
        self.purged = Some(log_id);
        self.assert_invariants();
        Ok(Some(finished))
    }

    /// Saves the vote; await the receiver for it to be on disk.
    pub(crate) fn save_vote(
        &mut self,
        vote: Vote<NodeId>,
    ) -> Result<oneshot::Receiver<io::Result<()>>, Error> {
        let encoded =
            codec::encode(&vote).map_err(|e| Error::Log(format!("encoding the vote: {e}")))?;
        let (done, finished) = oneshot::channel();
        self.send(WriterCommand::SaveVote {
            vote: encoded,
            done,
        })?;
        self.vote = Some(vote);
        Ok(finished)
    }

    /// Records the committed log id; it is saved lazily (it is a start-up hint).
    pub(crate) fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), Error> {
        let encoded = codec::encode(&committed)
            .map_err(|e| Error::Log(format!("encoding the committed log id: {e}")))?;
        let was_empty = self
            .committed_slot
            .lock()
            .unwrap()
            .replace(encoded)
            .is_none();
        if was_empty {
            self.send(WriterCommand::SaveCommitted)?;
        }
        self.committed = committed;
        Ok(())
    }

    /// Stops accepting writes; the returned thread finishes everything queued, then exits.
    pub(crate) fn close(&mut self) -> Option<JoinHandle<()>> {
        self.writer.take().map(|(sender, handle)| {
            drop(sender);
            handle
        })
    }

    /// [`DurableLog::close`], and waits until everything queued is written.
    pub(crate) fn close_and_join(&mut self) -> Result<(), Error> {
        match self.close() {
            Some(writer) => writer
                .join()
                .map_err(|_| Error::Log("the log writer thread panicked".into())),
            None => Ok(()),
        }
    }

    fn send(&self, command: WriterCommand) -> Result<(), Error> {
        let Some((sender, _)) = &self.writer else {
            return Err(Error::Stopped);
        };
        sender
            .send(command)
            .map_err(|_| Error::Log("the log writer thread is gone".into()))
    }
}

impl Drop for DurableLog {
    fn drop(&mut self) {
        // The thread drains the queue and exits on its own.
        drop(self.close());
    }
}

/// One entry of a replica's log as [`read_log`] gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEntry {
    pub index: u64,
    /// The term of the leader that appended it.
    pub term: u64,
    /// The node id of that leader.
    pub leader: NodeId,
    pub payload: LoggedPayload,
}

/// What a [`LoggedEntry`] holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoggedPayload {
    /// A new leader's first entry.
    Blank,
    /// A command: the bytes its [`crate::Machine`] applies.
    Command(Vec<u8>),
    /// A membership change: the voters and learners from then on.
    Membership {
        voters: Vec<NodeId>,
        learners: Vec<NodeId>,
    },
}

/// Reads the log of the replica directory `dir` (as [`crate::ReplicaConfig::dir`] names it)
/// without changing anything, so beside a running replica too (`billcl cat`, Tarantool's
/// `tt cat`): every entry of every segment on disk in index order, entries below the purge
/// point included while their segment is kept, the last ones possibly not committed yet.
/// `each` gets each entry and says whether to go on. A segment's record that is incomplete
/// or damaged ends that segment (a replica appending as it is read, or a crash's torn tail):
/// the notes returned say where, and why.
pub fn read_log(
    dir: &Path,
    mut each: impl FnMut(LoggedEntry) -> std::ops::ControlFlow<()>,
) -> Result<Vec<String>, Error> {
    let log_dir = dir.join("log");
    let mut notes = Vec::new();
    for first_index in list_segments(&log_dir)? {
        let path = log_writer::segment_path(&log_dir, first_index);
        let bytes = fs::read(&path).map_err(io_error("read log segment", &path))?;
        let mut records = Records::new(&bytes);
        while let Some(record) = records.next() {
            let entry = match record {
                Ok((entry, _)) => entry,
                Err(why) if why == INCOMPLETE_RECORD => {
                    notes.push(format!(
                        "{} ends at byte {} in an incomplete record (being written, or torn \
                         by a crash)",
                        path.display(),
                        records.offset
                    ));
                    break;
                }
                Err(why) => {
                    notes.push(format!(
                        "{} is damaged at byte {} ({why}): read up to there",
                        path.display(),
                        records.offset
                    ));
                    break;
                }
            };
            let payload = match entry.payload {
                openraft::EntryPayload::Blank => LoggedPayload::Blank,
                openraft::EntryPayload::Normal(command) => LoggedPayload::Command(command.0),
                openraft::EntryPayload::Membership(membership) => LoggedPayload::Membership {
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                },
            };
            let logged = LoggedEntry {
                index: entry.log_id.index,
                term: entry.log_id.leader_id.term,
                leader: entry.log_id.leader_id.node_id,
                payload,
            };
            if each(logged).is_break() {
                return Ok(notes);
            }
        }
    }
    Ok(notes)
}

/// What [`Records`] says of a record cut short.
const INCOMPLETE_RECORD: &str = "an incomplete record";

/// The records of a segment's bytes in order: each entry with the offset its record starts
/// at. Ends where the data does (the end of the bytes, or a zero tail), or with an `Err` for
/// the first record that is incomplete or damaged, `offset` then being where that record
/// starts.
struct Records<'a> {
    bytes: &'a [u8],
    /// Where the next record starts (after the end: where the data ended).
    offset: usize,
    ended: bool,
}

impl<'a> Records<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Records {
            bytes,
            offset: 0,
            ended: false,
        }
    }
}

impl Iterator for Records<'_> {
    type Item = Result<(Entry, usize), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.bytes[self.offset..];
        if self.ended || rest.is_empty() || is_zero_tail(rest) {
            return None;
        }
        match parse_record(rest) {
            Ok(Some((entry, record_bytes))) => {
                let at = self.offset;
                self.offset += record_bytes;
                Some(Ok((entry, at)))
            }
            Ok(None) => {
                self.ended = true;
                Some(Err(INCOMPLETE_RECORD))
            }
            Err(why) => {
                self.ended = true;
                Some(Err(why))
            }
        }
    }
}

/// Frames one entry: `len u32 LE | crc32c u32 LE | payload`.
fn encode_record(entry: &Entry) -> Result<Vec<u8>, Error> {
    let payload = codec::encode(entry)
        .map_err(|e| Error::Log(format!("encoding entry {}: {e}", entry.log_id)))?;
    if payload.len() > LOG_RECORD_BYTES_MAX {
        return Err(Error::Log(format!(
            "entry {} is {} bytes encoded; the limit is {LOG_RECORD_BYTES_MAX}",
            entry.log_id,
            payload.len()
        )));
    }
    let mut record = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    Ok(record)
}

/// Parses the record at the start of `bytes`: `Ok(None)` when it is incomplete, `Err` when it
/// is damaged, else the entry and the record's length.
fn parse_record(bytes: &[u8]) -> Result<Option<(Entry, usize)>, &'static str> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Ok(None);
    }
    let length = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let checksum = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if length > LOG_RECORD_BYTES_MAX {
        return Err("a record length over the limit");
    }
    if length == 0 {
        // No entry encodes to nothing (and crc32c of nothing is 0, so a zero header would
        // pass the checksum).
        return Err("a record of length 0");
    }
    let Some(payload) = bytes.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + length) else {
        return Ok(None);
    };
    if crc32c::crc32c(payload) != checksum {
        return Err("a checksum mismatch");
    }
    let entry = codec::decode(payload, LOG_RECORD_BYTES_MAX).map_err(|_| "an undecodable entry")?;
    Ok(Some((entry, RECORD_HEADER_BYTES + length)))
}

/// Whether `rest` of a segment, from a record boundary, is zeros only: space the writer grew
/// the file by ahead of its data, where the data ends.
fn is_zero_tail(rest: &[u8]) -> bool {
    // Stops at the first non-zero byte: in a record's length, which is never 0.
    rest.iter().all(|b| *b == 0)
}

/// The first indexes of the segment files in `log_dir`, sorted.
fn list_segments(log_dir: &Path) -> Result<Vec<u64>, Error> {
    let mut firsts = Vec::new();
    let listing = fs::read_dir(log_dir).map_err(io_error("list log directory", log_dir))?;
    for item in listing {
        let item = item.map_err(io_error("list log directory", log_dir))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        let first = name
            .strip_suffix(".log")
            .filter(|stem| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|stem| stem.parse::<u64>().ok());
        match first {
            Some(first) => firsts.push(first),
            None => {
                tracing::warn!(file = %item.path().display(), "ignoring a file that is not a log segment")
            }
        }
    }
    firsts.sort_unstable();
    Ok(firsts)
}

/// Reads a small state file: `Ok(Ok(None))` when missing, `Ok(Err(why))` when damaged.
fn read_state<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Result<Option<T>, String>, Error> {
    match durable_file::read(path).map_err(io_error("read", path))? {
        Read::Missing => Ok(Ok(None)),
        Read::Damaged(why) => Ok(Err(why)),
        Read::Payload(payload) => match codec::decode(&payload, STATE_FILE_BYTES_MAX) {
            Ok(value) => Ok(Ok(Some(value))),
            Err(e) => Ok(Err(format!("{}: {e}", path.display()))),
        },
    }
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::Command;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command::new(format!("command {index}").into_bytes())),
        }
    }

    fn entries(term: u64, indexes: std::ops::Range<u64>) -> Vec<Entry> {
        indexes.map(|index| entry(term, index)).collect()
    }

    /// Appends and waits for the writer's callback.
    fn append(log: &mut DurableLog, batch: Vec<Entry>) {
        let (sender, receiver) = mpsc::channel();
        log.append(batch, Box::new(move |result| sender.send(result).unwrap()))
            .unwrap();
        receiver.recv().unwrap().unwrap();
    }

    fn wait(receiver: Option<oneshot::Receiver<io::Result<()>>>) {
        if let Some(receiver) = receiver {
            receiver.blocking_recv().unwrap().unwrap();
        }
    }

    fn indexes(log: &DurableLog) -> Vec<u64> {
        log.read(..).iter().map(|e| e.log_id.index).collect()
    }

    fn reopen(mut log: DurableLog, dir: &Path, segment_bytes_max: u64) -> DurableLog {
        log.close().unwrap().join().unwrap();
        DurableLog::open(dir, SyncMode::Fsync, segment_bytes_max).unwrap()
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        list_segments(&dir.join("log")).unwrap()
    }

    /// Waits (up to 10 s) for the segment files to be `expected`.
    fn eventually_segment_files(dir: &Path, expected: &[u64]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while segment_files(dir) != expected && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(segment_files(dir), expected);
    }

    #[test]
    fn appends_roll_segments_and_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        append(&mut log, entries(1, 0..5));
        append(&mut log, entries(1, 5..30));
        assert_eq!(indexes(&log), (0..30).collect::<Vec<_>>());
        assert_eq!(log.read(3..6).len(), 3);
        assert_eq!(log.read(28..=40).len(), 2);
        assert!(log.read(30..).is_empty());
        let files = segment_files(dir.path());
        assert!(files.len() > 3, "expected several segments, got {files:?}");
        assert_eq!(files[0], 0);
        for file in &files {
            let length = fs::metadata(log_writer::segment_path(&dir.path().join("log"), *file))
                .unwrap()
                .len();
            assert!(length <= 200, "segment {file} is {length} bytes");
        }

        let log = reopen(log, dir.path(), 200);
        assert_eq!(indexes(&log), (0..30).collect::<Vec<_>>());
        assert_eq!(log.read(7..8)[0], entry(1, 7));
        assert_eq!(log.last_log_id(), Some(entry(1, 29).log_id));
    }

    #[test]
    fn append_refuses_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::None, 200).unwrap();
        append(&mut log, entries(1, 0..3));
        let result = log.append(entries(1, 4..5), Box::new(|_| {}));
        assert!(matches!(result, Err(Error::Log(_))), "{result:?}");
        assert_eq!(indexes(&log), vec![0, 1, 2]);
    }

    #[test]
    fn truncate_across_segments_then_append_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        append(&mut log, entries(1, 0..30));
        let before = segment_files(dir.path()).len();
        wait(log.truncate(12).unwrap());
        assert_eq!(indexes(&log), (0..12).collect::<Vec<_>>());
        assert!(segment_files(dir.path()).len() < before);
        // Entries 12.. of a new term replace the cut ones.
        append(&mut log, entries(2, 12..20));
        assert!(log.truncate(50).unwrap().is_none());

        let log = reopen(log, dir.path(), 200);
        assert_eq!(indexes(&log), (0..20).collect::<Vec<_>>());
        assert_eq!(log.read(12..13)[0], entry(2, 12));
        assert_eq!(log.read(11..12)[0], entry(1, 11));
    }

    #[test]
    fn truncate_at_a_segment_start_removes_that_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        append(&mut log, entries(1, 0..30));
        let second = segment_files(dir.path())[1];
        wait(log.truncate(second).unwrap());
        assert_eq!(segment_files(dir.path()), vec![0]);
        let log = reopen(log, dir.path(), 200);
        assert_eq!(indexes(&log), (0..second).collect::<Vec<_>>());
    }

    #[test]
    fn purge_deletes_whole_segments_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        append(&mut log, entries(1, 0..30));
        let files = segment_files(dir.path());
        // Purge into the middle of the third segment: the first two go, the third stays.
        let purge_at = files[2] + 1;
        wait(log.purge(entry(1, purge_at).log_id).unwrap());
        // Answered once handed to the chores thread, which deletes them soon after.
        eventually_segment_files(dir.path(), &files[2..]);
        assert_eq!(indexes(&log), (purge_at + 1..30).collect::<Vec<_>>());
        assert_eq!(log.purged(), Some(entry(1, purge_at).log_id));
        // Purging again below the purge point changes nothing.
        assert!(log.purge(entry(1, 3).log_id).unwrap().is_none());

        let mut log = reopen(log, dir.path(), 200);
        assert_eq!(log.purged(), Some(entry(1, purge_at).log_id));
        assert_eq!(indexes(&log), (purge_at + 1..30).collect::<Vec<_>>());

        // Past the end: every segment goes and the next append starts after the purge point.
        wait(log.purge(entry(3, 40).log_id).unwrap());
        eventually_segment_files(dir.path(), &[]);
        assert_eq!(log.last_log_id(), Some(entry(3, 40).log_id));
        assert!(log.append(entries(3, 30..31), Box::new(|_| {})).is_err());
        append(&mut log, entries(3, 41..45));
        let log = reopen(log, dir.path(), 200);
        assert_eq!(indexes(&log), (41..45).collect::<Vec<_>>());
        assert_eq!(segment_files(dir.path()), vec![41]);
    }

    #[test]
    fn vote_and_committed_survive_reopen_and_committed_is_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        assert_eq!(log.vote(), None);
        append(&mut log, entries(1, 0..5));
        let vote = Vote::new_committed(3, 2);
        log.save_vote(vote)
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        log.save_committed(Some(entry(1, 4).log_id)).unwrap();
        let log = reopen(log, dir.path(), 200);
        assert_eq!(log.vote(), Some(vote));
        assert_eq!(log.committed(), Some(entry(1, 4).log_id));

        // A committed hint past the end of the log is clamped to the last entry.
        let mut log = log;
        log.save_committed(Some(entry(1, 9).log_id)).unwrap();
        let log = reopen(log, dir.path(), 200);
        assert_eq!(log.committed(), Some(entry(1, 4).log_id));
    }

    /// Commits in quick succession wake the writer at most once per save: the last one is
    /// what is saved, while the writer runs and when it closes.
    #[test]
    fn the_latest_of_many_committed_ids_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
        append(&mut log, entries(1, 0..100));
        for index in 0..100 {
            log.save_committed(Some(entry(1, index).log_id)).unwrap();
        }
        // Saved by the running writer within its interval, not only on close.
        std::thread::sleep(std::time::Duration::from_millis(
            3 * log_writer::COMMITTED_SAVE_INTERVAL_MS,
        ));
        let saved: Option<LogId<NodeId>> = read_state(&dir.path().join("committed"))
            .unwrap()
            .unwrap()
            .flatten();
        assert_eq!(saved, Some(entry(1, 99).log_id));
        for index in 0..50 {
            log.save_committed(Some(entry(1, index).log_id)).unwrap();
        }
        let log = reopen(log, dir.path(), 1 << 20);
        assert_eq!(log.committed(), Some(entry(1, 49).log_id));
    }

    /// (index, term, command bytes) of a logged command.
    type ReadBack = (u64, u64, Vec<u8>);

    /// What [`read_log`] gives of the log in `dir`, and its notes.
    fn read_back(dir: &Path) -> (Vec<ReadBack>, Vec<String>) {
        let mut read = Vec::new();
        let notes = read_log(dir, |logged| {
            let LoggedPayload::Command(bytes) = logged.payload else {
                panic!("not a command: {logged:?}");
            };
            read.push((logged.index, logged.term, bytes));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        (read, notes)
    }

    #[test]
    fn read_log_reads_every_segment_of_a_running_log_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 100).unwrap();
        for index in 0..20 {
            append(
                &mut log,
                entries(if index < 12 { 1 } else { 2 }, index..index + 1),
            );
        }
        // The open segment is grown with zeros ahead of its data: where the reading stops.
        let (read, notes) = read_back(dir.path());
        assert_eq!(notes, Vec::<String>::new());
        let expected: Vec<ReadBack> = (0..20)
            .map(|index| {
                let term = if index < 12 { 1 } else { 2 };
                (index, term, format!("command {index}").into_bytes())
            })
            .collect();
        assert_eq!(read, expected);
        assert!(segment_files(dir.path()).len() > 2);
        // It stops when asked.
        let mut seen = 0;
        read_log(dir.path(), |_| {
            seen += 1;
            if seen == 5 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(seen, 5);
        // The log goes on as it was.
        append(&mut log, entries(2, 20..22));
        assert_eq!(read_back(dir.path()).0.len(), 22);
        let log = reopen(log, dir.path(), 100);
        assert_eq!(indexes(&log), (0..22).collect::<Vec<_>>());
    }

    /// A closed log of ten entries in one segment: that segment's path and length.
    fn closed_log_of_ten(dir: &Path) -> (PathBuf, u64) {
        let mut log = DurableLog::open(dir, SyncMode::Fsync, 1 << 20).unwrap();
        append(&mut log, entries(1, 0..10));
        log.close().unwrap().join().unwrap();
        drop(log);
        let path = log_writer::segment_path(&dir.join("log"), 0);
        let whole = fs::metadata(&path).unwrap().len();
        (path, whole)
    }

    fn set_length(path: &Path, length: u64) {
        let file = fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(length).unwrap();
    }

    #[test]
    fn read_log_names_a_torn_or_damaged_record_and_reads_up_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, whole) = closed_log_of_ten(dir.path());
        set_length(&path, whole - 3);
        let (read, notes) = read_back(dir.path());
        assert_eq!(read.len(), 9);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("incomplete record"), "{notes:?}");

        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let (read, notes) = read_back(dir.path());
        assert!(read.is_empty());
        assert!(notes[0].contains("damaged at byte 0"), "{notes:?}");
        assert!(read_log(&dir.path().join("nowhere"), |_| {
            std::ops::ControlFlow::Continue(())
        })
        .is_err());
    }

    #[test]
    fn torn_tail_is_cut_back_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (path, whole) = closed_log_of_ten(dir.path());

        // Garbage after the last record.
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        fs::write(&path, &bytes).unwrap();
        let log = DurableLog::open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
        assert_eq!(indexes(&log), (0..10).collect::<Vec<_>>());
        assert_eq!(fs::metadata(&path).unwrap().len(), whole);

        // The last record cut in the middle.
        let mut log = log;
        log.close().unwrap().join().unwrap();
        drop(log);
        set_length(&path, whole - 3);
        let log = DurableLog::open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
        assert_eq!(indexes(&log), (0..9).collect::<Vec<_>>());

        // A flipped bit in the last record.
        let mut log = log;
        log.close().unwrap().join().unwrap();
        drop(log);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let log = DurableLog::open(dir.path(), SyncMode::Fsync, 1 << 20).unwrap();
        assert_eq!(indexes(&log), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn corruption_in_a_middle_segment_is_an_error() {
        let dir = closed_log_in_small_segments();
        let files = segment_files(dir.path());
        let path = log_writer::segment_path(&dir.path().join("log"), files[1]);
        let mut bytes = fs::read(&path).unwrap();
        bytes[RECORD_HEADER_BYTES + 1] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_corrupt(dir.path());
    }

    /// A directory holding entries 0..30 of term 1 in 200-byte segments (several of them),
    /// written and closed.
    fn closed_log_in_small_segments() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        append(&mut log, entries(1, 0..30));
        log.close().unwrap().join().unwrap();
        dir
    }

    /// Opening the log in `dir` fails as corrupt.
    fn assert_corrupt(dir: &Path) {
        let result = DurableLog::open(dir, SyncMode::Fsync, 200);
        assert!(
            matches!(result, Err(Error::Corrupt(_))),
            "{:?}",
            result.err()
        );
    }

    fn segment_length(dir: &Path, first_index: u64) -> u64 {
        fs::metadata(log_writer::segment_path(&dir.join("log"), first_index))
            .unwrap()
            .len()
    }

    /// Copies the segment files of `from` into a new replica directory, as a crash would leave
    /// them while the log is open.
    fn crash_copy(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        fs::create_dir_all(to.path().join("log")).unwrap();
        for first_index in segment_files(from) {
            fs::copy(
                log_writer::segment_path(&from.join("log"), first_index),
                log_writer::segment_path(&to.path().join("log"), first_index),
            )
            .unwrap();
        }
        to
    }

    fn extend_with_zeros(dir: &Path, first_index: u64, zero_bytes: u64) {
        let path = log_writer::segment_path(&dir.join("log"), first_index);
        let file = fs::OpenOptions::new().write(true).open(path).unwrap();
        let length = file.metadata().unwrap().len();
        file.set_len(length + zero_bytes).unwrap();
    }

    #[test]
    fn the_open_segment_is_preallocated_and_cut_back_to_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 1 << 30).unwrap();
        append(&mut log, entries(1, 0..5));
        append(&mut log, entries(1, 5..10));
        let data = log.segments[&0];
        assert_eq!(
            segment_length(dir.path(), 0),
            log_writer::PREALLOCATE_BYTES,
            "the open segment holds {data} bytes of data"
        );

        // A crash now leaves the zeros: the reader stops at them and cuts them off.
        let crashed = crash_copy(dir.path());
        let reopened = DurableLog::open(crashed.path(), SyncMode::Fsync, 1 << 30).unwrap();
        assert_eq!(indexes(&reopened), (0..10).collect::<Vec<_>>());
        assert_eq!(segment_length(crashed.path(), 0), data);
        drop(reopened);

        // Closing cuts them off too; appends after a reopen go on at the end of the data.
        log.close().unwrap().join().unwrap();
        assert_eq!(segment_length(dir.path(), 0), data);
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 1 << 30).unwrap();
        append(&mut log, entries(1, 10..12));
        assert_eq!(
            segment_length(dir.path(), 0),
            data + log_writer::PREALLOCATE_BYTES
        );
        let crashed = crash_copy(dir.path());
        let log = reopen(log, dir.path(), 1 << 30);
        assert_eq!(indexes(&log), (0..12).collect::<Vec<_>>());
        assert_eq!(segment_length(dir.path(), 0), log.segments[&0]);
        let reopened = DurableLog::open(crashed.path(), SyncMode::Fsync, 1 << 30).unwrap();
        assert_eq!(reopened.read(..), log.read(..));
    }

    #[test]
    fn preallocation_stops_at_the_segment_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        append(&mut log, entries(1, 0..2));
        assert_eq!(segment_length(dir.path(), 0), 200);
        let crashed = crash_copy(dir.path());
        let reopened = DurableLog::open(crashed.path(), SyncMode::Fsync, 200).unwrap();
        assert_eq!(indexes(&reopened), vec![0, 1]);
    }

    #[test]
    fn a_zero_tail_is_cut_off_any_segment_but_other_damage_only_off_the_last() {
        let dir = closed_log_in_small_segments();
        let files = segment_files(dir.path());
        assert!(files.len() > 3, "expected several segments, got {files:?}");
        let lengths: Vec<u64> = files
            .iter()
            .map(|f| segment_length(dir.path(), *f))
            .collect();

        // Less than a header, a header, and much more, in middle segments and the last.
        extend_with_zeros(dir.path(), files[0], 5);
        extend_with_zeros(dir.path(), files[1], 8);
        extend_with_zeros(dir.path(), files[2], 3000);
        extend_with_zeros(dir.path(), *files.last().unwrap(), 3000);
        let log = DurableLog::open(dir.path(), SyncMode::Fsync, 200).unwrap();
        assert_eq!(indexes(&log), (0..30).collect::<Vec<_>>());
        drop(log);
        let cut: Vec<u64> = files
            .iter()
            .map(|f| segment_length(dir.path(), *f))
            .collect();
        assert_eq!(cut, lengths);

        let path = log_writer::segment_path(&dir.path().join("log"), files[1]);
        let whole = fs::read(&path).unwrap();
        // Not zeros to the end: a zero header followed by something, or plain garbage.
        for tail in [
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 7][..],
            &[0xde, 0xad, 0xbe, 0xef],
        ] {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(tail);
            fs::write(&path, &bytes).unwrap();
            assert_corrupt(dir.path());
        }
        // Zeros only: a middle segment with no entries.
        fs::write(&path, vec![0; whole.len()]).unwrap();
        assert_corrupt(dir.path());
    }

    #[test]
    fn entries_missing_between_segments_are_an_error() {
        let dir = closed_log_in_small_segments();
        // The last record of the first segment turned into zeros: a zero tail, but the next
        // segment does not follow.
        let first_records = segment_files(dir.path())[1];
        let path = log_writer::segment_path(&dir.path().join("log"), 0);
        let mut bytes = fs::read(&path).unwrap();
        let record = bytes.len() / first_records as usize;
        let length = bytes.len();
        bytes[length - record..].fill(0);
        fs::write(&path, &bytes).unwrap();
        assert_corrupt(dir.path());
    }

    #[test]
    fn truncate_then_append_over_preallocated_space_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DurableLog::open(dir.path(), SyncMode::Fsync, 1 << 30).unwrap();
        append(&mut log, entries(1, 0..20));
        // Queued together: the writer cuts, then appends over the cut.
        let cut = log.truncate(12).unwrap();
        append(&mut log, entries(2, 12..16));
        wait(cut);
        append(&mut log, entries(2, 16..25));
        assert!(segment_length(dir.path(), 0) > log.segments[&0]);
        // Cut inside the new entries, then longer entries than the ones cut.
        wait(log.truncate(14).unwrap());
        assert_eq!(segment_length(dir.path(), 0), log.segments[&0]);
        let long = |index| Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), index),
            payload: EntryPayload::Normal(Command::new(vec![index as u8; 300])),
        };
        append(&mut log, (14..18).map(long).collect());

        let mut expected: Vec<Entry> = entries(1, 0..12);
        expected.extend(entries(2, 12..14));
        expected.extend((14..18).map(long));
        let crashed = crash_copy(dir.path());
        let log = reopen(log, dir.path(), 1 << 30);
        assert_eq!(log.read(..), expected);
        assert_eq!(segment_length(dir.path(), 0), log.segments[&0]);
        let reopened = DurableLog::open(crashed.path(), SyncMode::Fsync, 1 << 30).unwrap();
        assert_eq!(reopened.read(..), expected);
    }

    #[test]
    fn a_missing_first_segment_is_an_error() {
        let dir = closed_log_in_small_segments();
        fs::remove_file(log_writer::segment_path(&dir.path().join("log"), 0)).unwrap();
        assert_corrupt(dir.path());
    }
}
