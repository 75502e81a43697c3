//! Buckets too large for one log entry, received part by part (docs/ARCHITECTURE.md, §7).
//!
//! A move's receive step carries its buckets' data in one log entry, and an entry holds at
//! most `COMMAND_BYTES_MAX` (16 MiB). A larger bucket is received in two kinds of entry
//! instead: `StageBucketPart`s, each carrying the next part of the bucket's encoded data
//! (as its sender answers `send-bucket-part`), which every member appends to the one bucket
//! it stages; then `ReceiveStagedBucket`, which checks the whole against its sender's
//! checksum, decodes it and receives it as `ReceiveBucketMoves` would. The staged bytes are
//! replicated state: in snapshots and in `verify`'s digest while there are any, so a
//! member that restores a snapshot between two parts holds what the others do.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{BucketData, State};

/// The largest bucket (its encoded data) a move stages: larger ones stay where they are,
/// named by the rebalance. Every member of the receiving replicaset holds the staged bytes
/// in memory until the bucket is received, and then the decoded bucket as well.
pub const STAGED_BUCKET_BYTES_MAX: u64 = 1 << 30;

/// The bucket a replicaset is receiving part by part: one at a time (a part of another
/// bucket, or of another move of it, starts over).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBucket {
    pub bucket: u32,
    /// The move's generation, as its sender answered it.
    pub generation: u64,
    /// The sending replicaset.
    pub from: String,
    /// The bucket's encoded size: complete when the parts hold this many bytes.
    pub total: u64,
    /// The encoded bucket so far, part after part as they came. Each part is shared, so that
    /// a copy of the state (a snapshot's capture) copies pointers, and a part added while a
    /// snapshot holds the others copies none of them.
    pub parts: Vec<StagedPart>,
}

/// One part of a [`StagedBucket`]'s bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedPart(#[serde(with = "as_shared_bytes")] pub Arc<Vec<u8>>);

impl StagedBucket {
    /// How many of the bucket's bytes are staged.
    pub fn held(&self) -> u64 {
        self.parts.iter().map(|part| part.0.len() as u64).sum()
    }

    /// The staged bytes, part after part, as one reader.
    fn reader(&self) -> PartsReader<'_> {
        PartsReader {
            parts: self.parts.iter(),
            current: &[],
        }
    }

    /// Checks the staged bucket, complete, against its sender's `checksum`, and decodes it.
    /// Reads only: a member runs it outside its state's lock (up to
    /// [`STAGED_BUCKET_BYTES_MAX`] to check and decode).
    pub fn decode(&self, checksum: u32) -> Result<BucketData, String> {
        let (bucket, held) = (self.bucket, self.held());
        if held != self.total {
            return Err(format!(
                "bucket {bucket} has {held} of its {} bytes staged here: send the rest first",
                self.total
            ));
        }
        let found = self
            .parts
            .iter()
            .fold(0, |crc, part| crc32c::crc32c_append(crc, &part.0));
        if found != checksum {
            return Err(format!(
                "bucket {bucket} staged here has checksum {found:08x}, its sender's is \
                 {checksum:08x}: send its parts again from offset 0"
            ));
        }
        bincode::deserialize_from(self.reader())
            .map_err(|e| format!("bucket {bucket} staged here does not decode: {e}"))
    }
}

/// One part of a staged bucket, as a `StageBucketPart` entry carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketPart {
    pub from: String,
    pub bucket: u32,
    pub generation: u64,
    pub total: u64,
    /// Where in the encoded bucket `bytes` starts.
    pub offset: u64,
    #[serde(with = "as_bytes")]
    pub bytes: Vec<u8>,
}

/// The checksum a staged bucket is checked against before it is received: CRC-32C of its
/// encoded data, as the sender computed it.
pub fn bucket_checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

impl State {
    /// Appends a part of a bucket received part by part. A part at offset 0 starts the
    /// bucket over (and replaces any other staged bucket); a later part must start where
    /// the staged bytes end, or lie within them (a repeat: nothing changes). Returns how
    /// many of the bucket's bytes are staged, or its whole size if there is nothing to
    /// receive here (the bucket is writable here already, or the move is stale).
    pub fn stage_bucket_part(&mut self, part: BucketPart) -> Result<u64, String> {
        let BucketPart {
            from,
            bucket,
            generation,
            total,
            offset,
            bytes,
        } = part;
        self.check_bucket_id(bucket)?;
        self.check_not_sending(bucket)?;
        if total > STAGED_BUCKET_BYTES_MAX {
            return Err(format!(
                "bucket {bucket} takes {total} bytes, more than a move stages \
                 ({STAGED_BUCKET_BYTES_MAX})"
            ));
        }
        let end = offset.saturating_add(bytes.len() as u64);
        if end > total {
            return Err(format!(
                "a part of bucket {bucket} ends at byte {end}, past its size {total}"
            ));
        }
        if self.received_already(bucket, Some(generation)) {
            return Ok(total);
        }
        let same_move = |staged: &StagedBucket| {
            (staged.bucket, staged.generation, staged.total) == (bucket, generation, total)
                && staged.from == from
        };
        if offset == 0 {
            self.staged = Some(StagedBucket {
                bucket,
                generation,
                from,
                total,
                parts: vec![StagedPart(Arc::new(bytes))],
            });
            return Ok(end);
        }
        let staged = match &mut self.staged {
            Some(staged) if same_move(staged) => staged,
            _ => {
                return Err(format!(
                    "bucket {bucket} is not staged here from its start (in move {generation} \
                     from {from}): send its parts again from offset 0"
                ))
            }
        };
        let held = staged.held();
        if end <= held {
            return Ok(held);
        }
        if offset != held {
            return Err(format!(
                "bucket {bucket} has {held} bytes staged here, and a part cannot start at \
                 byte {offset}: send from byte {held}"
            ));
        }
        staged.parts.push(StagedPart(Arc::new(bytes)));
        Ok(end)
    }

    /// The bucket staged part by part that a `ReceiveStagedBucket` of this move receives, to
    /// be checked and decoded ([`StagedBucket::decode`]) and then taken
    /// ([`State::take_staged_bucket`]); `None` if there is nothing to receive (the bucket is
    /// writable here already, or the move is stale).
    pub fn staged_to_receive(
        &self,
        from: &str,
        bucket: u32,
        generation: u64,
    ) -> Result<Option<StagedBucket>, String> {
        self.check_bucket_id(bucket)?;
        self.check_not_sending(bucket)?;
        if self.received_already(bucket, Some(generation)) {
            return Ok(None);
        }
        match &self.staged {
            Some(staged)
                if (staged.bucket, staged.generation) == (bucket, generation)
                    && staged.from == from =>
            {
                Ok(Some(staged.clone()))
            }
            _ => Err(format!(
                "bucket {bucket} (move {generation} from {from}) is not staged here: send its \
                 parts first"
            )),
        }
    }

    /// Takes the bucket staged part by part, decoded (`None`: nothing to receive), as
    /// [`State::receive_buckets`] takes one, and lets its staged bytes go. Returns how many
    /// buckets were taken (0 or 1).
    pub fn take_staged_bucket(
        &mut self,
        bucket: u32,
        generation: u64,
        data: Option<BucketData>,
    ) -> Result<u32, String> {
        let taken = match data {
            Some(data) => self.receive_buckets(vec![(bucket, Some(generation), data)])?,
            None => 0,
        };
        if self.staged.as_ref().is_some_and(|s| s.bucket == bucket) {
            self.staged = None;
        }
        Ok(taken)
    }

    /// Receives the bucket staged part by part: [`State::staged_to_receive`], checked and
    /// decoded, then [`State::take_staged_bucket`], all under one borrow. The tests' way; a
    /// member decodes between the two outside its lock (`rebalance::apply_receive_staged`).
    #[cfg(test)]
    pub fn receive_staged_bucket(
        &mut self,
        from: &str,
        bucket: u32,
        generation: u64,
        checksum: u32,
    ) -> Result<u32, String> {
        let data = match self.staged_to_receive(from, bucket, generation)? {
            Some(staged) => Some(staged.decode(checksum)?),
            None => None,
        };
        self.take_staged_bucket(bucket, generation, data)
    }
}

/// Reads a staged bucket's parts one after the other.
struct PartsReader<'a> {
    parts: std::slice::Iter<'a, StagedPart>,
    current: &'a [u8],
}

impl std::io::Read for PartsReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.parts.next() {
                Some(part) => self.current = &part.0,
                None => return Ok(0),
            }
        }
        self.current.read(buf)
    }
}

/// [`as_bytes`] for a shared byte vector.
mod as_shared_bytes {
    use std::sync::Arc;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        bytes: &Arc<Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        super::as_bytes::serialize(bytes, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Arc<Vec<u8>>, D::Error> {
        super::as_bytes::deserialize(deserializer).map(Arc::new)
    }
}

/// Serde for a byte vector as one byte string (bincode: its length, then the bytes copied
/// whole) rather than as a sequence of `u8` values, each serialized on its own.
mod as_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
                Ok(bytes.to_vec())
            }
            fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(bytes)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(byte) = seq.next_element()? {
                    bytes.push(byte);
                }
                Ok(bytes)
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AccountRow, BucketState};

    /// A bucket of `accounts` accounts in bucket 7 of 1000, as its sender encodes it.
    fn encoded_bucket(state: &State, accounts: usize) -> (BucketData, Vec<u8>) {
        let mut data = BucketData::new(BucketState::Sending { to: "b".into() });
        let mut id = 1;
        while data.accounts.len() < accounts {
            if state.bucket_of(id) == 7 {
                data.accounts.insert(
                    id,
                    AccountRow {
                        balance_micros: id as i64,
                        velocity_micros: 0,
                        since_ms: 0,
                        remainder: 0,
                    },
                );
            }
            id += 1;
        }
        data.kv.insert(b"m\0k".to_vec(), vec![9; 1000]);
        let bytes = bincode::serialize(&data).unwrap();
        (data, bytes)
    }

    fn part(generation: u64, total: usize, offset: usize, bytes: &[u8]) -> BucketPart {
        BucketPart {
            from: "a".into(),
            bucket: 7,
            generation,
            total: total as u64,
            offset: offset as u64,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn a_bucket_staged_in_parts_is_received_exactly_as_sent() {
        let mut state = State::new(1000);
        let (data, bytes) = encoded_bucket(&state, 50);
        let total = bytes.len();
        let sum = bucket_checksum(&bytes);
        let (first, rest) = bytes.split_at(total / 3);
        let (second, third) = rest.split_at(total / 3);
        assert_eq!(
            state.stage_bucket_part(part(4, total, 0, first)),
            Ok(first.len() as u64)
        );
        // Not complete yet: refused, nothing changes.
        let early = state.receive_staged_bucket("a", 7, 4, sum).unwrap_err();
        assert!(early.contains("send the rest first"), "{early}");
        let at = first.len();
        assert_eq!(
            state.stage_bucket_part(part(4, total, at, second)),
            Ok((at + second.len()) as u64)
        );
        // A repeat of a part already staged changes nothing; a gap is refused.
        assert_eq!(
            state.stage_bucket_part(part(4, total, at, second)),
            Ok((at + second.len()) as u64)
        );
        let gap = state
            .stage_bucket_part(part(4, total, at + second.len() + 1, &third[1..]))
            .unwrap_err();
        assert!(gap.contains("send from byte"), "{gap}");
        let at = at + second.len();
        // A copy of the state (a snapshot's capture) shares the parts; one added after copies
        // none of them.
        let captured = state.clone();
        assert_eq!(
            state.stage_bucket_part(part(4, total, at, third)),
            Ok(total as u64)
        );
        let before = &captured.staged.as_ref().unwrap().parts;
        let after = &state.staged.as_ref().unwrap().parts;
        assert_eq!((before.len(), after.len()), (2, 3));
        assert!(Arc::ptr_eq(&before[0].0, &after[0].0) && Arc::ptr_eq(&before[1].0, &after[1].0));
        // The staged bytes are in snapshots (and so restore) and in the digest.
        let restored = State::decode_snapshot(&state.encode_snapshot()).unwrap();
        assert_eq!(restored.staged, state.staged);
        // A snapshot written before staging (state, move generations, depletions) has none.
        let before = bincode::serialize(&(&state, &state.moves, &state.depletions)).unwrap();
        assert!(State::decode_snapshot(&before).unwrap().staged.is_none());
        assert_ne!(
            crate::verify::state_digest(&state),
            crate::verify::state_digest(&State::new(1000))
        );

        let wrong = state.receive_staged_bucket("a", 7, 4, sum ^ 1).unwrap_err();
        assert!(wrong.contains("checksum"), "{wrong}");
        assert_eq!(state.receive_staged_bucket("a", 7, 4, sum), Ok(1));
        assert!(state.staged.is_none());
        let received = &state.buckets[&7];
        assert_eq!(received.state, BucketState::Active);
        assert_eq!(received.accounts, data.accounts);
        assert_eq!(received.kv, data.kv);
        assert_eq!(state.move_generation(7), 4);
        // Repeated once received: nothing more to stage or take.
        assert_eq!(
            state.stage_bucket_part(part(4, total, 0, first)),
            Ok(total as u64)
        );
        assert_eq!(state.receive_staged_bucket("a", 7, 4, sum), Ok(0));
        assert!(state.staged.is_none());
    }

    #[test]
    fn a_new_move_starts_staging_over_and_bad_parts_are_refused() {
        let mut state = State::new(1000);
        let (_, bytes) = encoded_bucket(&state, 10);
        let total = bytes.len();
        let half = total / 2;
        state
            .stage_bucket_part(part(1, total, 0, &bytes[..half]))
            .unwrap();
        // The next part of another move of the bucket has nothing to follow.
        let other = state
            .stage_bucket_part(part(2, total, half, &bytes[half..]))
            .unwrap_err();
        assert!(
            other.contains("send its parts again from offset 0"),
            "{other}"
        );
        // Its first part replaces what was staged.
        state
            .stage_bucket_part(part(2, total, 0, &bytes[..half]))
            .unwrap();
        assert_eq!(state.staged.as_ref().unwrap().generation, 2);
        // A part past the bucket's size, a bucket id out of range, too large a bucket.
        assert!(state
            .stage_bucket_part(part(2, total, half, &bytes))
            .unwrap_err()
            .contains("past its size"));
        let mut outside = part(2, total, 0, &bytes);
        outside.bucket = 1001;
        assert!(state.stage_bucket_part(outside).is_err());
        let huge = part(2, STAGED_BUCKET_BYTES_MAX as usize + 1, 0, &bytes);
        assert!(state
            .stage_bucket_part(huge)
            .unwrap_err()
            .contains("more than"));
        // Bytes that are not a bucket are refused on receipt, and stay staged.
        let junk = vec![0xff; 64];
        state.stage_bucket_part(part(3, 64, 0, &junk)).unwrap();
        let why = state
            .receive_staged_bucket("a", 7, 3, bucket_checksum(&junk))
            .unwrap_err();
        assert!(why.contains("does not decode"), "{why}");
        assert!(!state.buckets.contains_key(&7));
        // A stale move stages nothing.
        state.moves.insert(7, 5);
        assert_eq!(
            state.stage_bucket_part(part(5, total, 0, &bytes)),
            Ok(total as u64)
        );
        assert_eq!(state.staged.as_ref().unwrap().generation, 3);
    }
}
