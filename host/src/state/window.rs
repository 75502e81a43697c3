//! A bucket's idempotency window: the keys of the keyed commands it applied recently, each
//! with its first answer (docs/protocol.md, "Idempotency").
//!
//! Which keys a window holds is replicated state: every member applies the same entries with
//! the same leader timestamps and so remembers and forgets the same keys, in the same order.
//! The rule, kept exactly: keys are remembered oldest first, distinct; before a key is
//! remembered, keys older than [`IDEMPOTENCY_WINDOW_MS`] and, beyond
//! [`IDEMPOTENCY_KEYS_PER_BUCKET_MAX`], the oldest are forgotten; a key already remembered
//! keeps its first answer.
//!
//! **Copy-on-write in two parts.** A snapshot captures the state by sharing its buckets
//! (`Arc<BucketData>`), and the first write to a bucket after that copies the bucket. The
//! window is most of a bucket (at peak thousands of keys, ≈ 90 bytes each), and on this
//! machine the copies of 500 buckets' windows after a capture held a leader's apply path for
//! 0.1–1 s (fresh pages; docs/performance-history.md, "Fresh memory, and the log's chores").
//! So a window keeps the keys it held when it was last copied in a `settled` part behind an
//! `Arc`, which a copy shares rather than copies; while it is shared, new keys go to a `fresh`
//! part and forgetting a settled key only counts it (`forgotten`, with the keys in
//! `forgotten_keys` for lookups). The next change after the sharer let go (the snapshot was
//! written) folds both back into `settled`, in place. A window never copied has an empty
//! `fresh` part: one lookup per key, as a single table.
//!
//! Invariants:
//! - the window's keys, oldest first, are `settled.calls[forgotten..]` then `fresh.calls`:
//!   distinct, at most [`IDEMPOTENCY_KEYS_PER_BUCKET_MAX`];
//! - each part's `answers` holds exactly the keys of its `calls`;
//! - `forgotten_keys` holds exactly the keys of `settled.calls[..forgotten]`;
//! - when `settled` is not shared after [`Window::remember`], `fresh` is empty and nothing is
//!   forgotten.
//!
//! Serialized as the two fields it replaces were (the keys with their times oldest first, then
//! the answers as a map in key order), so snapshots, bucket moves and digests are byte for byte
//! what they were.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

/// How long (by the log entries' leader timestamps) a bucket remembers an idempotency key
/// and its first answer: the retry window. A command retried with the same key within it
/// gets the first answer back instead of running again (docs/protocol.md, "Idempotency").
pub const IDEMPOTENCY_WINDOW_MS: i64 = 60_000;
/// The most keys one bucket remembers, whatever their age: bounds memory for a bucket that
/// takes more than this many keyed commands per window (its window is then shorter).
pub const IDEMPOTENCY_KEYS_PER_BUCKET_MAX: usize = 16_384;

/// Answers up to this many bytes are remembered inline, in the window's table: the built-in
/// commands' answers (a bool) are frames of 16 bytes. A longer one (a number is 23) is kept in
/// an allocation of its own, shared by the copies of its window.
pub const INLINE_ANSWER_BYTES: usize = 22;
// A table slot (key and answer) stays at 40 bytes and a queue entry at 24, where a `u128` key
// (aligned to 16) made them 48 and 32: 87 bytes a key measured with the table's spare room,
// against 107.
const _: () = assert!(std::mem::size_of::<Remembered>() == 24);
const _: () = assert!(std::mem::size_of::<(Key, Remembered)>() == 40);
const _: () = assert!(std::mem::size_of::<(Key, i64)>() == 24);

/// An idempotency key as a window stores it: two halves, aligned to 8 bytes where a `u128` is
/// aligned to 16 (padding every queue entry and table slot by 8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key([u64; 2]);

/// Read as the `u128` it is.
impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u128::deserialize(deserializer).map(Key::new)
    }
}

impl Key {
    fn new(key: u128) -> Key {
        Key([(key >> 64) as u64, key as u64])
    }

    fn get(self) -> u128 {
        u128::from(self.0[0]) << 64 | u128::from(self.0[1])
    }
}

/// The encoded first answer of a keyed command, as a window keeps it: inline when short (up to
/// [`INLINE_ANSWER_BYTES`]: the built-in commands' answers), so remembering or forgetting such a
/// key allocates and frees nothing; shared otherwise, so a copy of the window does not copy it.
/// Serialized as its bytes, exactly as the `Arc<[u8]>` and `Vec<u8>` it replaces were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Remembered {
    Inline {
        len: u8,
        bytes: [u8; INLINE_ANSWER_BYTES],
    },
    Shared(Arc<[u8]>),
}

impl Remembered {
    pub fn new(answer: &[u8]) -> Remembered {
        if answer.len() <= INLINE_ANSWER_BYTES {
            let mut bytes = [0; INLINE_ANSWER_BYTES];
            bytes[..answer.len()].copy_from_slice(answer);
            Remembered::Inline {
                len: answer.len() as u8,
                bytes,
            }
        } else {
            Remembered::Shared(Arc::from(answer))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Remembered::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Remembered::Shared(answer) => answer,
        }
    }
}

/// Whether a window of `len` keys whose oldest was applied at `at_ms` forgets that key before
/// remembering one at `now_ms`: it is past the window, or the window is full (the rule, in one
/// place for both ways a window is worked on).
fn forgets_oldest(len: usize, at_ms: i64, now_ms: i64) -> bool {
    now_ms.saturating_sub(at_ms) > IDEMPOTENCY_WINDOW_MS || len >= IDEMPOTENCY_KEYS_PER_BUCKET_MAX
}

impl Serialize for Remembered {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_bytes().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Remembered {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<u8>::deserialize(deserializer).map(|answer| Remembered::new(&answer))
    }
}

/// Keys oldest first with their leader timestamps, and the answer of each. The answers are a
/// hash map: looked up on every keyed call (on the request path and again when applied), where
/// a `BTreeMap` of a thousand keys cost a chain of cache misses.
#[derive(Clone, Debug, Default)]
struct Keys {
    calls: VecDeque<(Key, i64)>,
    answers: HashMap<Key, Remembered>,
}

impl Keys {
    /// [`Window::remember`] on one table.
    fn remember(&mut self, key: Key, answer: &[u8], now_ms: i64) {
        while let Some(&(oldest, at_ms)) = self.calls.front() {
            if !forgets_oldest(self.calls.len(), at_ms, now_ms) {
                break;
            }
            self.calls.pop_front();
            self.answers.remove(&oldest);
        }
        if let Entry::Vacant(slot) = self.answers.entry(key) {
            slot.insert(Remembered::new(answer));
            self.calls.push_back((key, now_ms));
        }
        assert!(self.calls.len() <= IDEMPOTENCY_KEYS_PER_BUCKET_MAX);
    }

    fn push(&mut self, key: Key, answer: &[u8], now_ms: i64) {
        let fresh = self.answers.insert(key, Remembered::new(answer)).is_none();
        assert!(fresh, "a window's keys are distinct");
        self.calls.push_back((key, now_ms));
    }

    fn pop_oldest(&mut self) {
        let (key, _) = self.calls.pop_front().expect("a key to forget");
        self.answers
            .remove(&key)
            .expect("every key of a window has its answer");
    }
}

/// A bucket's idempotency window (the module's doc: the rule, and how a copy shares it).
#[derive(Clone, Debug, Default)]
pub struct Window {
    settled: Arc<Keys>,
    forgotten: usize,
    forgotten_keys: HashSet<Key>,
    fresh: Keys,
}

impl Window {
    /// How many keys the window remembers.
    pub fn len(&self) -> usize {
        self.settled.calls.len() - self.forgotten + self.fresh.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first answer of the command that carried `key`, if it is still remembered.
    pub fn answer(&self, key: u128) -> Option<&[u8]> {
        self.answer_of(Key::new(key))
    }

    fn answer_of(&self, key: Key) -> Option<&[u8]> {
        if !self.fresh.calls.is_empty() {
            if let Some(answer) = self.fresh.answers.get(&key) {
                return Some(answer.as_bytes());
            }
        }
        let answer = self.settled.answers.get(&key)?;
        if self.forgotten > 0 && self.forgotten_keys.contains(&key) {
            return None;
        }
        Some(answer.as_bytes())
    }

    /// The window's keys with their leader timestamps, oldest first. Its size hint is exact
    /// (a chain of two exact iterators), which bincode needs to write the length first.
    pub fn calls(&self) -> impl Iterator<Item = (u128, i64)> + '_ {
        self.settled
            .calls
            .range(self.forgotten..)
            .chain(self.fresh.calls.iter())
            .map(|&(key, at_ms)| (key.get(), at_ms))
    }

    /// Remember the answer of a keyed command applied at `now_ms` (the log entry's leader
    /// timestamp, so every member forgets the same keys), forgetting keys older than the
    /// window and the oldest beyond the cap. A key already remembered keeps its first answer.
    pub fn remember(&mut self, key: u128, answer: &[u8], now_ms: i64) {
        let key = Key::new(key);
        self.settle();
        if let Some(settled) = Arc::get_mut(&mut self.settled) {
            // Not shared (and so settled): one table, worked on in place.
            settled.remember(key, answer, now_ms);
            return;
        }
        while let Some((oldest, at_ms)) = self.oldest() {
            if !forgets_oldest(self.len(), at_ms, now_ms) {
                break;
            }
            self.forget_oldest(oldest);
        }
        if self.answer_of(key).is_none() {
            self.fresh.push(key, answer, now_ms);
        }
        assert!(self.len() <= IDEMPOTENCY_KEYS_PER_BUCKET_MAX);
    }

    /// Folds the fresh keys and the forgotten count back into `settled` once nothing else
    /// shares it (in place: no copy).
    fn settle(&mut self) {
        if self.forgotten == 0 && self.fresh.calls.is_empty() {
            return;
        }
        let Some(settled) = Arc::get_mut(&mut self.settled) else {
            return;
        };
        for _ in 0..self.forgotten {
            settled.pop_oldest();
        }
        self.forgotten = 0;
        // Dropped rather than cleared: a part kept at its largest would be copied whole,
        // empty, by the next copy of the bucket.
        self.forgotten_keys = HashSet::new();
        let fresh = std::mem::take(&mut self.fresh);
        settled.answers.extend(fresh.answers);
        settled.calls.extend(fresh.calls);
    }

    fn oldest(&self) -> Option<(Key, i64)> {
        self.settled
            .calls
            .get(self.forgotten)
            .or_else(|| self.fresh.calls.front())
            .copied()
    }

    /// Forgets the oldest key, `key`, while `settled` is shared.
    fn forget_oldest(&mut self, key: Key) {
        if self.forgotten == self.settled.calls.len() {
            self.fresh.pop_oldest();
        } else {
            self.forgotten += 1;
            let new = self.forgotten_keys.insert(key);
            assert!(new, "a window's keys are distinct");
        }
    }

    /// The window's answers in ascending key order (as the `BTreeMap` they replace was
    /// serialized).
    fn answers_in_key_order(&self) -> Vec<(u128, &Remembered)> {
        let settled = self
            .settled
            .answers
            .iter()
            .filter(|(key, _)| self.forgotten == 0 || !self.forgotten_keys.contains(key));
        let mut answers: Vec<(u128, &Remembered)> = settled
            .chain(self.fresh.answers.iter())
            .map(|(key, answer)| (key.get(), answer))
            .collect();
        answers.sort_unstable_by_key(|(key, _)| *key);
        answers
    }
}

/// The keys with their times, oldest first: serialized as the `VecDeque` it replaces was.
struct CallsInOrder<'a>(&'a Window);

impl Serialize for CallsInOrder<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.calls())
    }
}

/// The answers by ascending key: serialized as the `BTreeMap` it replaces was.
struct AnswersInKeyOrder<'a>(&'a Window);

impl Serialize for AnswersInKeyOrder<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.answers_in_key_order())
    }
}

/// Two values in a row — the keys with their times, then the answers by key — which bincode
/// writes exactly as the two struct fields `recent_calls` and `recent_answers` that held them.
impl Serialize for Window {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(2)?;
        tuple.serialize_element(&CallsInOrder(self))?;
        tuple.serialize_element(&AnswersInKeyOrder(self))?;
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WindowVisitor;

        impl<'de> Visitor<'de> for WindowVisitor {
            type Value = Window;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an idempotency window: its keys with their times, then its answers")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Window, A::Error> {
                let missing = |what| serde::de::Error::custom(format!("window without {what}"));
                let calls: VecDeque<(Key, i64)> =
                    seq.next_element()?.ok_or_else(|| missing("keys"))?;
                let answers: HashMap<Key, Remembered> =
                    seq.next_element()?.ok_or_else(|| missing("answers"))?;
                if calls.len() != answers.len()
                    || calls.iter().any(|(key, _)| !answers.contains_key(key))
                {
                    return Err(serde::de::Error::custom(
                        "a window's keys and answers differ",
                    ));
                }
                Ok(Window {
                    settled: Arc::new(Keys { calls, answers }),
                    ..Window::default()
                })
            }
        }

        deserializer.deserialize_tuple(2, WindowVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The window as it was, a queue and a table (the rule, written plainly): what every
    /// window must behave and serialize as.
    #[derive(Default, Serialize)]
    struct Plain {
        recent_calls: VecDeque<(u128, i64)>,
        recent_answers: BTreeMap<u128, Vec<u8>>,
    }

    impl Plain {
        fn remember(&mut self, key: u128, answer: &[u8], now_ms: i64) {
            while let Some(&(oldest, at_ms)) = self.recent_calls.front() {
                let expired = now_ms.saturating_sub(at_ms) > IDEMPOTENCY_WINDOW_MS;
                if !expired && self.recent_calls.len() < IDEMPOTENCY_KEYS_PER_BUCKET_MAX {
                    break;
                }
                self.recent_calls.pop_front();
                self.recent_answers.remove(&oldest);
            }
            if self.recent_answers.contains_key(&key) {
                return;
            }
            self.recent_answers.insert(key, answer.to_vec());
            self.recent_calls.push_back((key, now_ms));
        }
    }

    /// A small deterministic generator (xorshift), so a failure replays.
    struct Draw(u64);

    impl Draw {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn answer(key: u128) -> Vec<u8> {
        vec![key as u8; key as usize % (2 * INLINE_ANSWER_BYTES + 3)]
    }

    fn assert_same(window: &Window, plain: &Plain, keys: impl Iterator<Item = u128>) {
        assert_eq!(window.len(), plain.recent_calls.len());
        assert!(window.calls().eq(plain.recent_calls.iter().copied()));
        for key in keys {
            assert_eq!(
                window.answer(key),
                plain.recent_answers.get(&key).map(Vec::as_slice),
                "key {key}"
            );
        }
        assert_eq!(
            bincode::serialize(window).unwrap(),
            bincode::serialize(plain).unwrap(),
            "serialized as the two fields it replaces"
        );
    }

    /// Keys retried and new, time moving by small and window-sized steps, the cap reached,
    /// and copies taken and let go at random points (as snapshots share buckets): the window
    /// remembers, forgets and serializes exactly as the plain queue and table.
    #[test]
    fn a_window_shared_by_copies_keeps_the_plain_rule_exactly() {
        for seed in 1..=3u64 {
            let mut draw = Draw(seed * 0x9e37_79b9_7f4a_7c15);
            let mut window = Window::default();
            let mut plain = Plain::default();
            let mut copies: Vec<(Window, Vec<u8>)> = Vec::new();
            let mut now_ms = 0i64;
            let (mut at_the_cap, mut forgotten_while_shared) = (0, 0);
            // Few distinct keys in some rounds (retries, keys forgotten and seen again), many
            // in others (the cap); time jumping by half a window in some rounds.
            for round in 0..40 {
                let distinct = if round % 3 == 0 { 50 } else { 1_000_000 };
                let jumps = round % 8 == 7;
                for _ in 0..5_000 {
                    now_ms += match draw.below(100) {
                        0 if jumps => IDEMPOTENCY_WINDOW_MS / 2,
                        1..=2 => 50,
                        _ => 0,
                    };
                    let key = u128::from(draw.below(distinct)) << 64 | 7;
                    window.remember(key, &answer(key), now_ms);
                    plain.remember(key, &answer(key), now_ms);
                    at_the_cap += usize::from(window.len() == IDEMPOTENCY_KEYS_PER_BUCKET_MAX);
                    forgotten_while_shared += usize::from(window.forgotten > 0);
                    match draw.below(2_000) {
                        0 => {
                            // A snapshot captures the window; what it serializes must not
                            // change while the live window moves on.
                            let bytes = bincode::serialize(&window).unwrap();
                            copies.push((window.clone(), bytes));
                        }
                        1 if !copies.is_empty() => {
                            let (copy, bytes) = copies.remove(0);
                            assert_eq!(bincode::serialize(&copy).unwrap(), bytes);
                        }
                        _ => {}
                    }
                }
                let probes = (0..200).map(|_| u128::from(draw.below(distinct)) << 64 | 7);
                assert_same(&window, &plain, probes);
            }
            for (copy, bytes) in copies {
                assert_eq!(bincode::serialize(&copy).unwrap(), bytes);
            }
            assert!(
                at_the_cap > 1_000,
                "seed {seed}: the cap reached {at_the_cap} times"
            );
            assert!(
                forgotten_while_shared > 1_000,
                "seed {seed}: forgotten while shared {forgotten_while_shared} times"
            );
        }
    }

    /// While a copy shares the settled keys, new keys and forgetting touch only the window's
    /// own small parts; once the copy is gone they are folded back in place.
    #[test]
    fn a_copy_shares_the_settled_keys_until_it_is_dropped() {
        let mut window = Window::default();
        for key in 0..1_000u128 {
            window.remember(key, &answer(key), key as i64);
        }
        let copy = window.clone();
        assert!(Arc::ptr_eq(&window.settled, &copy.settled));
        // Past the window for the first ten keys: they are forgotten, not removed.
        let now_ms = IDEMPOTENCY_WINDOW_MS + 10;
        for key in 1_000..1_005u128 {
            window.remember(key, &answer(key), now_ms);
        }
        assert!(
            Arc::ptr_eq(&window.settled, &copy.settled),
            "nothing copied"
        );
        assert_eq!((window.forgotten, window.fresh.calls.len()), (10, 5));
        assert_eq!(window.answer(3), None);
        assert_eq!(window.answer(500), Some(&answer(500)[..]));
        assert_eq!(window.answer(1_002), Some(&answer(1_002)[..]));
        // A forgotten key seen again is remembered again, with its new answer.
        window.remember(3, b"again", now_ms);
        assert_eq!(window.answer(3), Some(&b"again"[..]));
        assert_eq!(copy.len(), 1_000);
        assert_eq!(copy.answer(3), Some(&answer(3)[..]));
        drop(copy);
        let settled_before = Arc::as_ptr(&window.settled);
        window.remember(2_000, &answer(2_000), now_ms);
        assert_eq!(
            Arc::as_ptr(&window.settled),
            settled_before,
            "folded in place"
        );
        assert_eq!((window.forgotten, window.fresh.calls.len()), (0, 0));
        assert_eq!(window.len(), 1_000 - 10 + 5 + 1 + 1);
        assert_eq!(window.answer(3), Some(&b"again"[..]));
        assert_eq!(window.calls().last(), Some((2_000, now_ms)));
    }

    #[test]
    fn a_window_whose_keys_and_answers_differ_is_refused() {
        let plain = Plain {
            recent_calls: VecDeque::from([(1, 0), (2, 0)]),
            recent_answers: BTreeMap::from([(1, vec![1]), (3, vec![3])]),
        };
        let bytes = bincode::serialize(&plain).unwrap();
        let error = bincode::deserialize::<Window>(&bytes).unwrap_err();
        assert!(
            error.to_string().contains("keys and answers differ"),
            "{error}"
        );
    }
}
