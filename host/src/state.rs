//! The replicated state of one replicaset and the commands of its log.
//!
//! Sans-I/O: this module holds data and the rules that change it; it knows nothing of
//! Raft, QUIC or wasmtime. Every member applies the same [`Command`]s in the same order
//! to a [`State`] and so holds the same state.
//!
//! Invariants of a [`State`]:
//! - a bucket id is in `1..=bucket_count`, and an account lives in the bucket of its id;
//! - module versions of one name are numbered 1, 2, … in deploy order, and `active`
//!   names a version that exists.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

mod staging;
mod window;

pub use staging::{bucket_checksum, BucketPart, StagedBucket, STAGED_BUCKET_BYTES_MAX};
pub use window::{
    Remembered, Window, IDEMPOTENCY_KEYS_PER_BUCKET_MAX, IDEMPOTENCY_WINDOW_MS, INLINE_ANSWER_BYTES,
};

use billcl_money::{Account, Decimal};
use billcl_proto::bucket::{bucket_id, Key};
use bincode::Options as _;
use serde::{Deserialize, Serialize};

use crate::depletion::Depletions;

/// The lifecycle states of a bucket on a replicaset (vshard's names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BucketState {
    /// Owned here; reads and writes allowed.
    Active,
    /// Owned here and never moved by the rebalancer.
    Pinned,
    /// Being sent to the replicaset `to` (docs/ARCHITECTURE.md, §7): reads only; its data no
    /// longer changes, so a copy of it is the bucket. The destination is in the log so that
    /// a move cut short is finished towards the same replicaset, never a second one.
    Sending { to: String },
    /// Being received; no calls yet.
    Receiving,
    /// Sent away; kept until garbage-collected.
    Sent,
    /// To be deleted.
    Garbage,
}

impl BucketState {
    pub fn name(&self) -> &'static str {
        match self {
            BucketState::Active => "active",
            BucketState::Pinned => "pinned",
            BucketState::Sending { .. } => "sending",
            BucketState::Receiving => "receiving",
            BucketState::Sent => "sent",
            BucketState::Garbage => "garbage",
        }
    }

    /// Whether calls may write the bucket's data.
    pub fn is_writable(&self) -> bool {
        matches!(self, BucketState::Active | BucketState::Pinned)
    }

    /// Whether calls may read the bucket's data.
    pub fn is_readable(&self) -> bool {
        matches!(
            self,
            BucketState::Active | BucketState::Pinned | BucketState::Sending { .. }
        )
    }
}

/// A bucket's state as an error names it: `absent`, `active`, `sending to storage-c`.
pub fn describe_bucket_state(state: Option<&BucketState>) -> String {
    match state {
        None => "absent".to_string(),
        Some(BucketState::Sending { to }) => format!("sending to {to}"),
        Some(state) => state.name().to_string(),
    }
}

/// An account as stored (serializable mirror of [`billcl_money::Account`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRow {
    pub balance_micros: i64,
    pub velocity_micros: i64,
    pub since_ms: i64,
    pub remainder: u32,
}

impl AccountRow {
    pub fn from_account(account: &Account) -> AccountRow {
        AccountRow {
            balance_micros: account.balance.micros(),
            velocity_micros: account.velocity.micros(),
            since_ms: account.since_ms,
            remainder: account.remainder,
        }
    }

    pub fn to_account(self, id: u64) -> Account {
        Account {
            id,
            balance: Decimal::from_micros(self.balance_micros),
            velocity: Decimal::from_micros(self.velocity_micros),
            since_ms: self.since_ms,
            remainder: self.remainder,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BucketData {
    pub state: BucketState,
    /// A hash map: read by every call and written by every write, where a `BTreeMap` of a
    /// hundred accounts cost a chain of cache misses. Serialized in id order, exactly as the
    /// `BTreeMap` it replaces was.
    #[serde(serialize_with = "serialize_in_key_order")]
    pub accounts: HashMap<u64, AccountRow>,
    /// Module-namespaced key-value data: key = module name, 0x00, user key.
    pub kv: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The idempotency keys of the keyed commands applied in this bucket recently, with their
    /// first answers ([`Window`]). Replicated (changed only by applying log entries),
    /// snapshotted, and moves with the bucket; serialized as the two fields `recent_calls`
    /// and `recent_answers` that held it before (same snapshot bytes, same digest).
    pub window: Window,
}

impl BucketData {
    pub fn new(state: BucketState) -> BucketData {
        BucketData {
            state,
            accounts: HashMap::new(),
            kv: BTreeMap::new(),
            window: Window::default(),
        }
    }

    /// The first answer of the command that carried `key`, if it is still remembered.
    pub fn recent_answer(&self, key: u128) -> Option<&[u8]> {
        self.window.answer(key)
    }

    /// Remember the answer of a keyed command applied at `now_ms` ([`Window::remember`]).
    pub fn remember_answer(&mut self, key: u128, answer: &[u8], now_ms: i64) {
        self.window.remember(key, answer, now_ms);
    }
}

/// A hash map as a serialized `BTreeMap` would be: by ascending key, whatever the map's own
/// order (bincode writes both as length then pairs), so that snapshots and digests are the
/// same on every member.
fn serialize_in_key_order<S: serde::Serializer, K: Ord + Serialize, V: Serialize>(
    map: &HashMap<K, V>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut entries: Vec<(&K, &V)> = map.iter().collect();
    entries.sort_unstable_by_key(|(key, _)| *key);
    serializer.collect_map(entries)
}

/// One deployed version of a procedure module.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleVersion {
    pub name: String,
    pub version: u32,
    /// The component's bytes, exactly as deployed.
    pub bytes: Vec<u8>,
    /// The log index of the deploy entry.
    pub deployed_at_index: u64,
}

/// The most accounts one `FillAccounts` command creates.
pub const FILL_ACCOUNTS_MAX: u64 = 10_000_000;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub bucket_count: u32,
    /// Each bucket behind an `Arc`, so that a snapshot captures the state by cloning 1,000
    /// pointers and serializes it off the apply path; a write to a bucket the snapshot still
    /// holds copies that bucket first (`Arc::make_mut`).
    pub buckets: BTreeMap<u32, Arc<BucketData>>,
    /// Every version of every module, by name; versions in ascending order.
    pub modules: BTreeMap<String, Vec<ModuleVersion>>,
    /// The version of each module that calls run unless they pin one.
    pub active: BTreeMap<String, u32>,
    /// Each bucket's move generation as this replicaset last saw it (absent: 0, never moved
    /// through here): raised by every send from here, taken from its sender by every
    /// receive, and kept when the bucket leaves. A bucket's generation grows along its whole
    /// history, since it is writable in one place at a time and carries it; so a step of a
    /// move that names an older generation than the one here is stale (its driver was
    /// overtaken by another, docs/ARCHITECTURE.md §7) and changes nothing. Replicated (changed
    /// only by applying log entries); not in the derived encoding: a snapshot carries it after
    /// the state ([`State::encode_snapshot`]), so snapshots written before it still restore.
    #[serde(skip)]
    pub moves: BTreeMap<u32, u64>,
    /// The accounts recorded dry and the replicaset's last depletion events
    /// ([`crate::depletion`]). Replicated; in snapshots after the move generations.
    #[serde(skip)]
    pub depletions: Depletions,
    /// The bucket this replicaset is receiving part by part, if any (a bucket larger than a
    /// log entry: [`StagedBucket`]). Replicated; in snapshots after the depletions.
    #[serde(skip)]
    pub staged: Option<StagedBucket>,
}

/// A step of a bucket's move: the bucket and the move's generation, or `None` in a log
/// entry written before moves had generations (applied as it was then).
pub type MoveStep = (u32, Option<u64>);

impl State {
    pub fn new(bucket_count: u32) -> State {
        State {
            bucket_count,
            ..State::default()
        }
    }

    pub fn bucket_of(&self, id: u64) -> u32 {
        bucket_id(&Key::Uint(id), self.bucket_count)
    }

    pub fn bucket_state(&self, bucket: u32) -> Option<&BucketState> {
        self.buckets.get(&bucket).map(|data| &data.state)
    }

    /// The generation of the bucket's last move to, from or being sent from here (0: none).
    pub fn move_generation(&self, bucket: u32) -> u64 {
        self.moves.get(&bucket).copied().unwrap_or(0)
    }

    /// The state as a snapshot holds it: the derived encoding, then the move generations,
    /// the depletions and the staged bucket (a build from before them reads the first parts
    /// and ignores the rest).
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.write_snapshot(&mut bytes)
            .expect("a state always serializes into memory");
        bytes
    }

    /// Writes [`State::encode_snapshot`]'s bytes to `out` as they are serialized.
    pub fn write_snapshot(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let parts = (self, &self.moves, &self.depletions, &self.staged);
        bincode::serialize_into(out, &parts).map_err(|e| match *e {
            bincode::ErrorKind::Io(e) => e,
            other => std::io::Error::other(format!("serializing the state: {other}")),
        })
    }

    /// Reads [`State::encode_snapshot`]'s bytes, or a snapshot written before staged
    /// buckets (none then), before depletions (none then) or before move generations (all
    /// 0 then).
    pub fn decode_snapshot(bytes: &[u8]) -> Result<State, String> {
        type Parts = (State, BTreeMap<u32, u64>, Depletions, Option<StagedBucket>);
        if let Ok((mut state, moves, depletions, staged)) = bincode::deserialize::<Parts>(bytes) {
            state.moves = moves;
            state.depletions = depletions;
            state.staged = staged;
            return Ok(state);
        }
        type BeforeStaging = (State, BTreeMap<u32, u64>, Depletions);
        if let Ok((mut state, moves, depletions)) = bincode::deserialize::<BeforeStaging>(bytes) {
            state.moves = moves;
            state.depletions = depletions;
            return Ok(state);
        }
        match bincode::deserialize::<(State, BTreeMap<u32, u64>)>(bytes) {
            Ok((mut state, moves)) => {
                state.moves = moves;
                Ok(state)
            }
            Err(_) => bincode::deserialize::<State>(bytes)
                .map_err(|e| format!("snapshot is not a billcl state: {e}")),
        }
    }

    pub fn account(&self, id: u64) -> Option<Account> {
        let bucket = self.bucket_of(id);
        let row = self.buckets.get(&bucket)?.accounts.get(&id)?;
        Some(row.to_account(id))
    }

    pub fn account_count(&self) -> usize {
        self.buckets.values().map(|data| data.accounts.len()).sum()
    }

    /// Bucket counts by state name.
    pub fn bucket_counts(&self) -> BTreeMap<&'static str, u32> {
        let mut counts = BTreeMap::new();
        for data in self.buckets.values() {
            *counts.entry(data.state.name()).or_insert(0) += 1;
        }
        counts
    }

    /// Take ownership of buckets (bootstrap). Buckets already here keep their state and
    /// data. Returns how many were new.
    pub fn assign_buckets(&mut self, bucket_ids: &[u32]) -> Result<u32, String> {
        if let Some(bad) = bucket_ids
            .iter()
            .find(|&&id| id == 0 || id > self.bucket_count)
        {
            return Err(format!(
                "bucket {bad} does not exist: bucket ids are 1..={}",
                self.bucket_count
            ));
        }
        let mut added = 0;
        for &id in bucket_ids {
            self.buckets.entry(id).or_insert_with(|| {
                added += 1;
                Arc::new(BucketData::new(BucketState::Active))
            });
        }
        Ok(added)
    }

    /// A move's first step, on the sender (docs/ARCHITECTURE.md, §7): each bucket becomes
    /// `Sending { to }`, so no call writes it any more and its data is final, in a new move
    /// generation ([`State::moves`]) unless `new_generation` is false (a log entry written
    /// before moves had generations: the move is generation 0, as every move before them).
    /// A bucket already being sent to `to` stays so, in the same generation (a move resumed).
    /// All or none: refused if one is absent, pinned or being sent elsewhere. Returns how
    /// many changed state.
    pub fn send_buckets(
        &mut self,
        bucket_ids: &[u32],
        to: &str,
        new_generation: bool,
    ) -> Result<u32, String> {
        let starting: Vec<u32> = bucket_ids
            .iter()
            .copied()
            .filter(|id| new_generation && self.bucket_state(*id) == Some(&BucketState::Active))
            .collect();
        let sending = BucketState::Sending { to: to.to_string() };
        let changed = self.switch_moving_buckets(bucket_ids, to, sending, |id, now| {
            format!("bucket {id} cannot be sent to {to}: it is {now}")
        })?;
        for id in starting {
            *self.moves.entry(id).or_insert(0) += 1;
        }
        Ok(changed)
    }

    /// Pins buckets (`pinned`: the rebalancer never moves them, vshard's `bucket_pin`) or
    /// unpins them (active again). All or none: refused if one is absent here or being moved.
    /// Returns how many changed state.
    pub fn pin_buckets(&mut self, bucket_ids: &[u32], pinned: bool) -> Result<u32, String> {
        let (target, verb) = if pinned {
            (BucketState::Pinned, "pinned")
        } else {
            (BucketState::Active, "unpinned")
        };
        let may = |state: &BucketState| matches!(state, BucketState::Active | BucketState::Pinned);
        self.switch_buckets(bucket_ids, may, target, |id, now| {
            let wait = if now == "absent" {
                ""
            } else {
                " (try again once its move is done)"
            };
            format!("bucket {id} cannot be {verb}: it is {now} here{wait}")
        })
    }

    /// Takes back a move that its receiver refused: buckets being sent to `to` in the
    /// step's generation become active here again. A bucket already active stays so. All or
    /// none: refused if one is absent, in another state or in another move. Returns how many
    /// changed state.
    pub fn cancel_send_buckets(&mut self, steps: &[MoveStep], to: &str) -> Result<u32, String> {
        self.check_generations(steps, to, "taken back")?;
        let bucket_ids: Vec<u32> = steps.iter().map(|(id, _)| *id).collect();
        self.switch_moving_buckets(&bucket_ids, to, BucketState::Active, |id, now| {
            format!("the move of bucket {id} to {to} cannot be taken back: it is {now} here")
        })
    }

    /// Refuses a step on the sender of a bucket being sent in another generation than the
    /// step's: a stale driver's step, which must not end or take back the move under way.
    fn check_generations(&self, steps: &[MoveStep], to: &str, verb: &str) -> Result<(), String> {
        for &(id, generation) in steps {
            let Some(generation) = generation else {
                continue;
            };
            let now = self.move_generation(id);
            if matches!(self.bucket_state(id), Some(BucketState::Sending { .. }))
                && now != generation
            {
                return Err(format!(
                    "bucket {id} is being sent in move generation {now}, not {generation}: this \
                     step to {to} belongs to an earlier move and cannot be {verb} (nothing \
                     changed; `billcl rebalance` finishes the move under way)"
                ));
            }
        }
        Ok(())
    }

    /// Puts buckets that are active or being sent to `to` in state `target` (one of the two),
    /// all or none, as [`State::switch_buckets`].
    fn switch_moving_buckets(
        &mut self,
        bucket_ids: &[u32],
        to: &str,
        target: BucketState,
        refusal: impl Fn(u32, String) -> String,
    ) -> Result<u32, String> {
        let may = |state: &BucketState| match state {
            BucketState::Active => true,
            BucketState::Sending { to: sent_to } => sent_to == to,
            _ => false,
        };
        self.switch_buckets(bucket_ids, may, target, refusal)
    }

    /// Puts buckets in state `target` if every one is in a state `may` accepts; else changes
    /// none and answers `refusal` (the first other bucket's id and its state described).
    /// Returns how many changed state.
    fn switch_buckets(
        &mut self,
        bucket_ids: &[u32],
        may: impl Fn(&BucketState) -> bool,
        target: BucketState,
        refusal: impl Fn(u32, String) -> String,
    ) -> Result<u32, String> {
        for &id in bucket_ids {
            let state = self.bucket_state(id);
            if !state.is_some_and(&may) {
                return Err(refusal(id, describe_bucket_state(state)));
            }
        }
        let mut changed = 0;
        for id in bucket_ids {
            let data = self.buckets.get_mut(id).expect("checked above");
            if data.state != target {
                Arc::make_mut(data).state = target.clone();
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// A move's second step, on the receiver: each bucket as its sender froze it (accounts,
    /// key-value data, idempotency window) becomes active here, in the move's generation. A
    /// bucket already owned here stays as it is (a move resumed after this step), and so
    /// does one whose move is not newer than the last this replicaset saw of the bucket (a
    /// stale step: the bucket came here in that move or a later one and has left since). All
    /// or none: refused if a bucket id is out of range, holds an account of another bucket,
    /// or is being sent from here. Returns how many were taken.
    pub fn receive_buckets(
        &mut self,
        buckets: Vec<(u32, Option<u64>, BucketData)>,
    ) -> Result<u32, String> {
        for (id, generation, data) in &buckets {
            self.check_bucket_id(*id)?;
            if let Some(stray) = data.accounts.keys().find(|a| self.bucket_of(**a) != *id) {
                return Err(format!(
                    "account {stray} sent with bucket {id} belongs to bucket {}",
                    self.bucket_of(*stray)
                ));
            }
            if !self.stale_move(*id, *generation) {
                self.check_not_sending(*id)?;
            }
        }
        let mut taken = 0;
        for (id, generation, mut data) in buckets {
            if self.received_already(id, generation) {
                continue;
            }
            data.state = BucketState::Active;
            self.buckets.insert(id, Arc::new(data));
            if let Some(generation) = generation {
                self.moves.insert(id, generation);
            }
            taken += 1;
        }
        Ok(taken)
    }

    /// Whether a step of the move of `bucket` in `generation` comes too late here: this
    /// replicaset saw the bucket in that move or a later one ([`State::moves`]). Generation
    /// 0 is a move begun before generations (unfenced, as then), and `None` a step from
    /// before generations: never stale.
    fn stale_move(&self, bucket: u32, generation: Option<u64>) -> bool {
        generation.is_some_and(|generation| {
            let seen = self.move_generation(bucket);
            generation < seen || (generation > 0 && generation == seen)
        })
    }

    /// Whether a bucket received in this move has nothing left to take here: it is writable
    /// here already (a move resumed after its receive) or the step is stale.
    fn received_already(&self, bucket: u32, generation: Option<u64>) -> bool {
        self.stale_move(bucket, generation)
            || self
                .bucket_state(bucket)
                .is_some_and(BucketState::is_writable)
    }

    /// Refuses a bucket id out of `1..=bucket_count`.
    fn check_bucket_id(&self, bucket: u32) -> Result<(), String> {
        if bucket == 0 || bucket > self.bucket_count {
            return Err(format!(
                "bucket {bucket} does not exist: bucket ids are 1..={}",
                self.bucket_count
            ));
        }
        Ok(())
    }

    /// Refuses to receive a bucket being sent from here.
    fn check_not_sending(&self, bucket: u32) -> Result<(), String> {
        if let Some(state @ BucketState::Sending { .. }) = self.bucket_state(bucket) {
            return Err(format!(
                "bucket {bucket} cannot be received: it is {} from here",
                state.name()
            ));
        }
        Ok(())
    }

    /// A move's last step, on the sender, once the receiver holds the buckets: they are
    /// forgotten here (their move generation is kept). A bucket already gone stays gone. All
    /// or none: refused if one is here in another state than being sent to `to`, or in
    /// another move than the step's. Returns how many were dropped.
    pub fn drop_sent_buckets(&mut self, steps: &[MoveStep], to: &str) -> Result<u32, String> {
        self.check_generations(steps, to, "dropped")?;
        for (id, _) in steps {
            match self.bucket_state(*id) {
                None => {}
                Some(BucketState::Sending { to: sent_to }) if sent_to == to => {}
                other => {
                    return Err(format!(
                        "bucket {id} was not sent to {to}: it is {} here",
                        describe_bucket_state(other)
                    ))
                }
            }
        }
        let mut dropped = 0;
        for (id, _) in steps {
            self.forget_depletions_in(*id);
            dropped += u32::from(self.buckets.remove(id).is_some());
        }
        Ok(dropped)
    }

    /// Record a new version of a module and make it active. Returns the version.
    pub fn add_module_version(&mut self, name: &str, bytes: Vec<u8>, index: u64) -> u32 {
        let versions = self.modules.entry(name.to_string()).or_default();
        let version = versions.last().map_or(1, |last| last.version + 1);
        versions.push(ModuleVersion {
            name: name.to_string(),
            version,
            bytes,
            deployed_at_index: index,
        });
        self.active.insert(name.to_string(), version);
        version
    }

    /// Make `version` of module `name` the one calls run (rollback or roll forward).
    /// Returns the version that was active.
    pub fn activate(&mut self, name: &str, version: u32) -> Result<u32, String> {
        if self.module_version(name, version).is_none() {
            return Err(format!("module {name} has no version {version}"));
        }
        let previous = self.active.insert(name.to_string(), version);
        Ok(previous.unwrap_or(0))
    }

    pub fn module_version(&self, name: &str, version: u32) -> Option<&ModuleVersion> {
        self.modules
            .get(name)?
            .iter()
            .find(|module| module.version == version)
    }

    /// Create accounts `first_id..first_id + count` (at most [`FILL_ACCOUNTS_MAX`]) holding
    /// `balance_micros`, anchored at `timestamp_ms`, skipping ids that exist or whose bucket
    /// is not writable here. Returns how many were created.
    pub fn fill_accounts(
        &mut self,
        first_id: u64,
        count: u64,
        balance_micros: i64,
        timestamp_ms: i64,
    ) -> Result<u64, String> {
        if count > FILL_ACCOUNTS_MAX || first_id.checked_add(count).is_none() {
            return Err(format!(
                "fill-accounts takes at most {FILL_ACCOUNTS_MAX} accounts with ids below 2^64, got {count} from {first_id}"
            ));
        }
        if balance_micros < 0 {
            return Err(format!("balance must be >= 0, got {balance_micros} micros"));
        }
        let mut created = 0;
        for id in first_id..first_id + count {
            let bucket = self.bucket_of(id);
            let Some(data) = self.buckets.get_mut(&bucket) else {
                continue;
            };
            if !data.state.is_writable() || data.accounts.contains_key(&id) {
                continue;
            }
            Arc::make_mut(data).accounts.insert(
                id,
                AccountRow {
                    balance_micros,
                    velocity_micros: 0,
                    since_ms: timestamp_ms,
                    remainder: 0,
                },
            );
            created += 1;
        }
        Ok(created)
    }

    /// Whether calls may write `bucket` here, and if not, why.
    pub fn check_writable(&self, bucket: u32) -> Result<(), String> {
        let state = self.bucket_state(bucket);
        if state.is_some_and(BucketState::is_writable) {
            return Ok(());
        }
        Err(format!(
            "bucket {bucket} is not writable here ({})",
            describe_bucket_state(state)
        ))
    }

    /// Apply a call's writes, all or none: refused (nothing written) if one of them is in a
    /// bucket that is not writable here, which the leader checked when the call ran, so it
    /// happens only if the bucket changed state in between (the same way on every member).
    pub fn commit(&mut self, writes: Writes) -> Result<(), String> {
        let buckets = writes
            .accounts
            .iter()
            .map(|(id, _)| self.bucket_of(*id))
            .chain(writes.kv.iter().map(|(bucket, ..)| *bucket));
        for bucket in buckets {
            self.check_writable(bucket)?;
        }
        for (id, row) in writes.accounts {
            self.note_written(id, &row);
            let bucket = self.bucket_of(id);
            if let Some(data) = self.buckets.get_mut(&bucket) {
                Arc::make_mut(data).accounts.insert(id, row);
            }
        }
        for (bucket, key, value) in writes.kv {
            if let Some(data) = self.buckets.get_mut(&bucket) {
                let data = Arc::make_mut(data);
                match value {
                    Some(value) => data.kv.insert(key, value),
                    None => data.kv.remove(&key),
                };
            }
        }
        Ok(())
    }
}

/// What a call wrote, held apart from the state until the call succeeds.
#[derive(Clone, Debug, Default)]
pub struct WriteSet {
    pub accounts: BTreeMap<u64, Account>,
    /// (bucket, namespaced key) -> new value, or None for a delete.
    pub kv: BTreeMap<(u32, Vec<u8>), Option<Vec<u8>>>,
}

impl WriteSet {
    /// The writes as entered in the log.
    pub fn to_writes(&self) -> Writes {
        Writes {
            accounts: self
                .accounts
                .iter()
                .map(|(id, account)| (*id, AccountRow::from_account(account)))
                .collect(),
            kv: self
                .kv
                .iter()
                .map(|((bucket, key), value)| (*bucket, key.clone(), value.clone()))
                .collect(),
        }
    }
}

/// A log entry of a replicaset. Command calls are entered as their effects: the leader runs
/// the procedure once and every member applies what it wrote (as Tarantool replicates rows and
/// SpacetimeDB commits row changes); deploys and the other administrative commands are
/// entered as commands and applied by every member.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// A command call as logs written before the effects log held it (every member ran the
    /// procedure when applying it): kept so that such a log still replays, the same way.
    /// Never proposed any more. (The variants' order is the log's format: new ones go last.)
    Call {
        module: String,
        version: u32,
        procedure: String,
        /// The client's call as encoded on the wire (`billcl_proto::Request::Call`).
        call: Vec<u8>,
        bucket_id: Option<u32>,
        /// Assigned by the leader; the procedure's `now-ms`.
        timestamp_ms: i64,
    },
    /// Install a new version of a module.
    Deploy { name: String, bytes: Vec<u8> },
    /// Take ownership of buckets (bootstrap).
    AssignBuckets { bucket_ids: Vec<u32> },
    /// Hash the whole state when applied and remember it by log index (`billcl verify`
    /// compares members at the same index). Changes nothing.
    Digest,
    /// Bulk-create accounts `first_id..first_id + count` with a balance and no velocity
    /// (benchmarks and restart measurements; see [`State::fill_accounts`]).
    FillAccounts {
        first_id: u64,
        count: u64,
        balance_micros: i64,
        timestamp_ms: i64,
    },
    /// Make an existing version of a module the active one (`billcl rollback`).
    Activate { name: String, version: u32 },
    /// Several `Call`s in one entry, as logs written before the effects log held them:
    /// applied in order, each as if it were its own entry. Never proposed any more.
    Batch(Vec<Command>),
    /// `Effects` as logs written before an effect named its call held them: applied the same
    /// way. Never proposed any more.
    EffectsBeforeCalls {
        term: u64,
        effects: Vec<EffectBeforeCalls>,
    },
    /// `SendBucketMoves` as logs written before moves had generations held it: the move is
    /// generation 0. Never proposed any more.
    SendBuckets { bucket_ids: Vec<u32>, to: String },
    /// `ReceiveBucketMoves` as logs written before moves had generations held it: applied
    /// as then (a bucket not owned here is taken). Never proposed any more.
    ReceiveBuckets {
        from: String,
        buckets: Vec<(u32, BucketData)>,
    },
    /// `DropSentBucketMoves` as logs written before moves had generations held it. Never
    /// proposed any more.
    DropSentBuckets { bucket_ids: Vec<u32>, to: String },
    /// `CancelSendBucketMoves` as logs written before moves had generations held it. Never
    /// proposed any more.
    CancelSendBuckets { bucket_ids: Vec<u32>, to: String },
    /// Pin buckets, or unpin them ([`State::pin_buckets`]).
    PinBuckets { bucket_ids: Vec<u32>, pinned: bool },
    /// A move's second step, on the receiver ([`State::receive_buckets`]): the buckets as
    /// their sender froze them, each with its move's generation.
    ReceiveBucketMoves {
        from: String,
        buckets: Vec<(u32, u64, BucketData)>,
    },
    /// A move's last step, on the sender ([`State::drop_sent_buckets`]): (bucket, move
    /// generation) pairs.
    DropSentBucketMoves { to: String, moves: Vec<(u32, u64)> },
    /// A move its receiver refused, taken back on the sender
    /// ([`State::cancel_send_buckets`]): (bucket, move generation) pairs.
    CancelSendBucketMoves { to: String, moves: Vec<(u32, u64)> },
    /// A move's first step, on the sender ([`State::send_buckets`]), in a new generation.
    SendBucketMoves { bucket_ids: Vec<u32>, to: String },
    /// The effects of command calls the leader of `term` ran, in the order it ran them, each
    /// on the state the entries before it leave. Applied only by the log entry of that same
    /// term: a leader that lost and won leadership again in between ran them on a state that
    /// may lack other leaders' entries, so they are refused (answered `NotLeader`, no effect).
    /// Encoded by [`Command::encode`] itself, with variable-length integers.
    #[serde(skip)]
    Effects { term: u64, effects: Vec<Effect> },
    /// Accounts a leader found dry, each with the moment it ran dry
    /// ([`State::record_depletions`]). Encoded by [`Command::encode`] itself, as `Effects`.
    #[serde(skip)]
    RecordDepletions { items: Vec<(u64, i64)> },
    /// A part of a bucket too large for one entry, received part by part
    /// ([`State::stage_bucket_part`]). Encoded by [`Command::encode`] itself.
    #[serde(skip)]
    StageBucketPart(BucketPart),
    /// The bucket staged part by part, received once whole ([`State::staged_to_receive`],
    /// [`StagedBucket::decode`], [`State::take_staged_bucket`]):
    /// checked against its sender's checksum. Encoded by [`Command::encode`] itself.
    #[serde(skip)]
    ReceiveStagedBucket {
        from: String,
        bucket: u32,
        generation: u64,
        checksum: u32,
    },
}

/// What one command call did when the leader ran it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Effect {
    /// The bucket of a keyed call: it must still be writable when the effect is applied.
    pub bucket_id: Option<u32>,
    /// The call's idempotency key: remembered in its bucket with the answer.
    pub idempotency_key: Option<u128>,
    /// The leader's clock when it ran the call (the procedure's `now-ms`); the bucket's
    /// idempotency window counts by it.
    pub timestamp_ms: i64,
    /// The call itself, for the log's readers (`billcl cat`); applying ignores it. `None` in
    /// entries written before effects named their calls.
    pub call: Option<CallRecord>,
    pub outcome: Outcome,
}

/// Which procedure a logged call ran, with what, and for whom: the audit trail of
/// `billcl cat` (Tarantool's `tt cat` shows each request of its log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub module: String,
    pub version: u32,
    /// Kebab-case, e.g. `add-money`.
    pub procedure: String,
    /// The arguments: one tuple value in the binary form of docs/protocol.md.
    pub args: Vec<u8>,
    /// Who called, as the procedure saw it (the call's `caller`, which the caller names).
    pub caller: String,
}

impl CallRecord {
    /// The bytes it adds to an entry, about (its encoding's lengths and fixed fields).
    pub fn bytes(&self) -> usize {
        self.module.len() + self.procedure.len() + self.args.len() + self.caller.len() + 36
    }
}

/// An [`Effect`] as entries written before effects named their calls held it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EffectBeforeCalls {
    pub bucket_id: Option<u32>,
    pub idempotency_key: Option<u128>,
    pub timestamp_ms: i64,
    pub outcome: Outcome,
}

/// An effect as an older build wrote it: the tests' way to write older entries.
#[cfg(test)]
impl From<Effect> for EffectBeforeCalls {
    fn from(effect: Effect) -> EffectBeforeCalls {
        EffectBeforeCalls {
            bucket_id: effect.bucket_id,
            idempotency_key: effect.idempotency_key,
            timestamp_ms: effect.timestamp_ms,
            outcome: effect.outcome,
        }
    }
}

impl From<EffectBeforeCalls> for Effect {
    fn from(effect: EffectBeforeCalls) -> Effect {
        Effect {
            bucket_id: effect.bucket_id,
            idempotency_key: effect.idempotency_key,
            timestamp_ms: effect.timestamp_ms,
            call: None,
            outcome: effect.outcome,
        }
    }
}

/// The outcome of one command call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Outcome {
    /// The call ran: its answer (an encoded response frame) and what it wrote (nothing if it
    /// failed: a trap, no fuel left or an error returned changes nothing).
    Ran {
        answer: Vec<u8>,
        writes: Writes,
        /// Its log lines, kept by every member as it applies the entry.
        logs: Vec<LogRow>,
    },
    /// A retry of a keyed call earlier in the log, made while that one was in flight: it
    /// answers what the first call answered and does nothing.
    Repeat,
}

/// The writes of one call as entered in the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writes {
    pub accounts: Vec<(u64, AccountRow)>,
    /// (bucket, namespaced key, new value or `None` for a delete).
    pub kv: Vec<(u32, Vec<u8>, Option<Vec<u8>>)>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.kv.is_empty()
    }
}

/// A procedure's log line as entered in the log: module, procedure, level (0 debug, 1 info,
/// 2 warn, 3 error), message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    pub module: String,
    pub procedure: String,
    pub level: u8,
    pub message: String,
}

impl Command {
    /// How many kinds of entry this build knows: an entry starts with its kind (the variant's
    /// index, `u32` little-endian), and a kind at or above this one was written by a newer
    /// build. Raised with every new variant ([`Command::kind`] lists them).
    pub const KINDS: u32 = 21;

    /// This command's kind, as its encoding starts with it.
    pub fn kind(&self) -> u32 {
        match self {
            Command::Call { .. } => 0,
            Command::Deploy { .. } => 1,
            Command::AssignBuckets { .. } => 2,
            Command::Digest => 3,
            Command::FillAccounts { .. } => 4,
            Command::Activate { .. } => 5,
            Command::Batch(_) => 6,
            Command::EffectsBeforeCalls { .. } => 7,
            Command::SendBuckets { .. } => 8,
            Command::ReceiveBuckets { .. } => 9,
            Command::DropSentBuckets { .. } => 10,
            Command::CancelSendBuckets { .. } => 11,
            Command::PinBuckets { .. } => 12,
            Command::ReceiveBucketMoves { .. } => 13,
            Command::DropSentBucketMoves { .. } => 14,
            Command::CancelSendBucketMoves { .. } => 15,
            Command::SendBucketMoves { .. } => 16,
            Command::Effects { .. } => EFFECTS_KIND,
            Command::RecordDepletions { .. } => DEPLETIONS_KIND,
            Command::StageBucketPart(_) => STAGE_PART_KIND,
            // The last one: `KINDS` is one more.
            Command::ReceiveStagedBucket { .. } => RECEIVE_STAGED_KIND,
        }
    }

    /// The entry's bytes: its kind (`u32` little-endian), then its fields in bincode. The
    /// fields of `Effects`, the entry of every write, take variable-length integers: its
    /// lengths, ids and times are mostly small. In fixed-width ones (every length 8 bytes) an
    /// add_money effect with its call record took ≈ 70 % more bytes than one without, and the
    /// cluster 15 % more CPU per write (docs/performance-history.md); compact, about the same.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Command::Effects { term, effects } => {
                compact_entry(self.kind(), &(term, effects), 64 + effects.len() * 160)
            }
            Command::RecordDepletions { items } => {
                compact_entry(self.kind(), items, 8 + items.len() * 12)
            }
            Command::StageBucketPart(part) => {
                compact_entry(self.kind(), part, 64 + part.bytes.len())
            }
            Command::ReceiveStagedBucket {
                from,
                bucket,
                generation,
                checksum,
            } => compact_entry(self.kind(), &(from, bucket, generation, checksum), 64),
            _ => bincode::serialize(self).expect("commands always serialize"),
        }
    }

    /// The command in `bytes`, or why not, said for the operator: a kind this build does not
    /// know means a newer build wrote the entry, and this member must be upgraded.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        let kind = bytes
            .first_chunk::<4>()
            .map(|kind| u32::from_le_bytes(*kind));
        let decoded = match kind {
            Some(EFFECTS_KIND) => compact()
                .deserialize::<(u64, Vec<Effect>)>(&bytes[4..])
                .map(|(term, effects)| Command::Effects { term, effects }),
            Some(DEPLETIONS_KIND) => compact()
                .deserialize::<Vec<(u64, i64)>>(&bytes[4..])
                .map(|items| Command::RecordDepletions { items }),
            Some(STAGE_PART_KIND) => compact()
                .deserialize::<BucketPart>(&bytes[4..])
                .map(Command::StageBucketPart),
            Some(RECEIVE_STAGED_KIND) => compact()
                .deserialize::<(String, u32, u64, u32)>(&bytes[4..])
                .map(
                    |(from, bucket, generation, checksum)| Command::ReceiveStagedBucket {
                        from,
                        bucket,
                        generation,
                        checksum,
                    },
                ),
            _ => bincode::deserialize(bytes),
        };
        decoded.map_err(|error| match kind {
            Some(kind) if kind >= Self::KINDS => format!(
                "the entry is of kind {kind}, which a newer billcl wrote (this build knows \
                     kinds 0 to {}): upgrade this member's billcl binary and restart it",
                Self::KINDS - 1
            ),
            _ => format!(
                "the entry cannot be decoded ({error}): the log is damaged, or was written \
                     by another build of billcl"
            ),
        })
    }
}

/// The kind of [`Command::Effects`], whose fields are encoded by [`compact`].
const EFFECTS_KIND: u32 = 17;
/// The kind of [`Command::RecordDepletions`], encoded by [`compact`] too.
const DEPLETIONS_KIND: u32 = 18;
/// The kind of [`Command::StageBucketPart`], encoded by [`compact`] too.
const STAGE_PART_KIND: u32 = 19;
/// The kind of [`Command::ReceiveStagedBucket`], encoded by [`compact`] too.
const RECEIVE_STAGED_KIND: u32 = 20;

/// An entry of `kind` holding `fields` in [`compact`] bincode (`capacity`: its likely size).
fn compact_entry(kind: u32, fields: &impl Serialize, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(&kind.to_le_bytes());
    compact()
        .serialize_into(&mut out, fields)
        .expect("an entry always serializes");
    out
}

/// Bincode with variable-length integers (and no bytes left over), for the entries
/// [`Command::encode`] encodes itself.
fn compact() -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .reject_trailing_bytes()
}

/// Split `1..=bucket_count` into contiguous ranges proportional to the weights.
/// The first replicasets take the remainder, one bucket each.
pub fn split_buckets(bucket_count: u32, weights: &[u32]) -> Vec<Vec<u32>> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return weights.iter().map(|_| Vec::new()).collect();
    }
    let mut counts: Vec<u32> = weights
        .iter()
        .map(|&w| (u64::from(bucket_count) * u64::from(w) / total) as u32)
        .collect();
    let mut left = bucket_count - counts.iter().sum::<u32>();
    for (count, &weight) in counts.iter_mut().zip(weights) {
        if left == 0 {
            break;
        }
        if weight > 0 {
            *count += 1;
            left -= 1;
        }
    }
    let mut next = 1;
    counts
        .into_iter()
        .map(|count| {
            let range: Vec<u32> = (next..next + count).collect();
            next += count;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_by_weight_cover_every_bucket_once() {
        let split = split_buckets(1000, &[1, 1]);
        assert_eq!(split[0].len(), 500);
        assert_eq!(split[1].len(), 500);
        assert_eq!(split[0][0], 1);
        assert_eq!(split[1][499], 1000);
        let split = split_buckets(1000, &[1, 2, 0, 4]);
        let mut all: Vec<u32> = split.concat();
        all.sort_unstable();
        assert_eq!(all, (1..=1000).collect::<Vec<_>>());
        assert!(split[2].is_empty());
        assert!(split[3].len() > split[1].len());
    }

    #[test]
    fn writes_land_in_the_bucket_of_the_account() {
        let mut state = State::new(1000);
        let bucket = state.bucket_of(4);
        assert_eq!(state.assign_buckets(&[bucket]).unwrap(), 1);
        assert_eq!(state.assign_buckets(&[bucket]).unwrap(), 0);
        let mut writes = WriteSet::default();
        let account = Account::new(4, Decimal::from_micros(5), Decimal::ZERO, 10);
        writes.accounts.insert(4, account);
        state.commit(writes.to_writes()).unwrap();
        assert_eq!(state.account(4), Some(account));
        assert_eq!(state.account_count(), 1);
        assert!(state.assign_buckets(&[1001]).is_err());
        // A write into a bucket that is not here is refused, and nothing of the set lands.
        let elsewhere = (5..).find(|id| state.bucket_of(*id) != bucket).unwrap();
        let mut writes = WriteSet::default();
        writes.accounts.insert(
            4,
            Account::new(4, Decimal::from_micros(9), Decimal::ZERO, 11),
        );
        writes.accounts.insert(
            elsewhere,
            Account::new(elsewhere, Decimal::from_micros(1), Decimal::ZERO, 11),
        );
        assert!(state.commit(writes.to_writes()).is_err());
        assert_eq!(state.account(4), Some(account));
    }

    #[test]
    fn module_versions_count_up_and_the_last_is_active() {
        let mut state = State::new(10);
        assert_eq!(state.add_module_version("billing", vec![1], 3), 1);
        assert_eq!(state.add_module_version("billing", vec![2], 7), 2);
        assert_eq!(state.active["billing"], 2);
        assert_eq!(state.module_version("billing", 1).unwrap().bytes, vec![1]);
    }

    /// A snapshot holds the same window: a bucket's remembered answers (inline and shared)
    /// read back as they were, and serialize the same again.
    #[test]
    fn a_buckets_window_reads_back_from_its_bytes() {
        let keys: Vec<u128> = (0..1000u128)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
            .collect();
        let answer = |key: u128| vec![key as u8; key as usize % (2 * INLINE_ANSWER_BYTES + 3)];
        let mut bucket = BucketData::new(BucketState::Active);
        for (at_ms, &key) in keys.iter().enumerate() {
            bucket.remember_answer(key, &answer(key), at_ms as i64);
        }
        let restored: BucketData =
            bincode::deserialize(&bincode::serialize(&bucket).unwrap()).unwrap();
        assert!(restored.window.calls().eq(bucket.window.calls()));
        for &key in &keys {
            assert_eq!(bucket.recent_answer(key), Some(&answer(key)[..]));
            assert_eq!(restored.recent_answer(key), Some(&answer(key)[..]));
        }
        assert_eq!(
            bincode::serialize(&restored).unwrap(),
            bincode::serialize(&bucket).unwrap()
        );
    }

    /// The bucket as it was laid out before its window had a type of its own: the same bytes
    /// both ways, so snapshots and bucket moves between builds of either layout read back.
    #[test]
    fn a_bucket_serializes_as_before_its_window_had_a_type() {
        #[derive(Serialize, Deserialize)]
        struct Before {
            state: BucketState,
            accounts: BTreeMap<u64, AccountRow>,
            kv: BTreeMap<Vec<u8>, Vec<u8>>,
            recent_calls: std::collections::VecDeque<(u128, i64)>,
            recent_answers: BTreeMap<u128, Vec<u8>>,
        }
        let mut bucket = BucketData::new(BucketState::Sending {
            to: "storage-b".into(),
        });
        let mut before = Before {
            state: bucket.state.clone(),
            accounts: BTreeMap::new(),
            kv: BTreeMap::from([(b"m\0k".to_vec(), b"v".to_vec())]),
            recent_calls: Default::default(),
            recent_answers: BTreeMap::new(),
        };
        bucket.kv = before.kv.clone();
        let row = AccountRow {
            balance_micros: 5,
            velocity_micros: 1,
            since_ms: 2,
            remainder: 3,
        };
        for id in [9, 3, 7] {
            bucket.accounts.insert(id, row);
            before.accounts.insert(id, row);
        }
        // Keys out of key order, one of them retried, answers inline and shared.
        for (at_ms, key) in [(10, 30u128), (11, 2), (12, 30), (13, u128::MAX)] {
            let answer = vec![key as u8; (key % 45) as usize];
            bucket.remember_answer(key, &answer, at_ms);
            if let std::collections::btree_map::Entry::Vacant(slot) =
                before.recent_answers.entry(key)
            {
                slot.insert(answer);
                before.recent_calls.push_back((key, at_ms));
            }
        }
        let bytes = bincode::serialize(&before).unwrap();
        assert_eq!(bincode::serialize(&bucket).unwrap(), bytes);
        let read: BucketData = bincode::deserialize(&bytes).unwrap();
        assert!(read.window.calls().eq(before.recent_calls.iter().copied()));
        assert_eq!(read.recent_answer(30), Some(&[30u8; 30][..]));
    }

    #[test]
    fn a_buckets_accounts_serialize_as_the_btreemap_they_replace() {
        let mut bucket = BucketData::new(BucketState::Active);
        let mut ordered = BTreeMap::new();
        // Ids inserted in an order unlike their order.
        for i in 0..500u64 {
            let id = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let row = AccountRow {
                balance_micros: i as i64 * 7,
                velocity_micros: i as i64,
                since_ms: i as i64,
                remainder: i as u32,
            };
            bucket.accounts.insert(id, row);
            ordered.insert(id, row);
        }
        #[derive(Serialize)]
        struct AsBTreeMap<'a> {
            state: BucketState,
            accounts: &'a BTreeMap<u64, AccountRow>,
        }
        let expected = bincode::serialize(&AsBTreeMap {
            state: BucketState::Active,
            accounts: &ordered,
        })
        .unwrap();
        let bytes = bincode::serialize(&bucket).unwrap();
        assert_eq!(&bytes[..expected.len()], &expected[..]);
        let restored: BucketData = bincode::deserialize(&bytes).unwrap();
        assert_eq!(restored.accounts, bucket.accounts);
    }

    #[test]
    fn buckets_remember_the_first_answer_of_recent_keys() {
        let mut bucket = BucketData::new(BucketState::Active);
        assert_eq!(bucket.recent_answer(7), None);
        bucket.remember_answer(7, &[1], 1_000);
        bucket.remember_answer(7, &[2], 1_001);
        assert_eq!(bucket.recent_answer(7), Some(&[1][..]));
        // Many keys within the window: all remembered up to the cap, then the oldest goes.
        for key in 100..100 + IDEMPOTENCY_KEYS_PER_BUCKET_MAX as u128 - 1 {
            bucket.remember_answer(key, &[3], 2_000);
        }
        assert_eq!(bucket.window.len(), IDEMPOTENCY_KEYS_PER_BUCKET_MAX);
        assert_eq!(
            bucket.recent_answer(7),
            Some(&[1][..]),
            "still within the cap"
        );
        bucket.remember_answer(99, &[4], 2_000);
        assert_eq!(bucket.window.len(), IDEMPOTENCY_KEYS_PER_BUCKET_MAX);
        assert_eq!(
            bucket.recent_answer(7),
            None,
            "the oldest key is forgotten at the cap"
        );
        assert_eq!(bucket.recent_answer(100), Some(&[3][..]));
        // Past the window every older key is forgotten.
        bucket.remember_answer(5, &[5], 2_000 + IDEMPOTENCY_WINDOW_MS + 1);
        assert_eq!(bucket.window.len(), 1);
        assert_eq!(bucket.recent_answer(100), None);
        assert_eq!(bucket.recent_answer(5), Some(&[5][..]));
    }

    #[test]
    fn a_pinned_bucket_takes_writes_and_is_never_sent() {
        let mut state = State::new(10);
        state.assign_buckets(&[1, 2, 3]).unwrap();
        assert_eq!(state.pin_buckets(&[1, 2], true), Ok(2));
        assert_eq!(state.pin_buckets(&[1, 3], true), Ok(1), "1 already was");
        assert!(state.bucket_state(1).unwrap().is_writable());
        let refused = state.send_buckets(&[1], "b", true).unwrap_err();
        assert!(refused.contains("it is pinned"), "{refused}");
        assert_eq!(state.pin_buckets(&[1], false), Ok(1));
        assert_eq!(state.send_buckets(&[1], "b", true), Ok(1));
        let moving = state.pin_buckets(&[2, 1], true).unwrap_err();
        assert!(
            moving.contains("bucket 1 cannot be pinned: it is sending to b here (try again"),
            "{moving}"
        );
        assert_eq!(
            state.bucket_state(2),
            Some(&BucketState::Pinned),
            "all or none"
        );
        let absent = state.pin_buckets(&[4], false).unwrap_err();
        assert_eq!(absent, "bucket 4 cannot be unpinned: it is absent here");
    }

    #[test]
    fn a_moved_bucket_is_writable_in_one_place_at_a_time_and_takes_its_data() {
        let mut sender = State::new(10);
        let mut receiver = State::new(10);
        sender.assign_buckets(&[1, 2, 3]).unwrap();
        receiver.assign_buckets(&[4]).unwrap();
        let id = (1..).find(|id| sender.bucket_of(*id) == 2).unwrap();
        assert_eq!(sender.fill_accounts(id, 1, 500, 0), Ok(1));
        Arc::make_mut(sender.buckets.get_mut(&2).unwrap()).remember_answer(9, &[1], 0);
        let write = |balance_micros| Writes {
            accounts: vec![(
                id,
                AccountRow {
                    balance_micros,
                    velocity_micros: 0,
                    since_ms: 0,
                    remainder: 0,
                },
            )],
            kv: Vec::new(),
        };

        assert_eq!(sender.send_buckets(&[2, 3], "b", true), Ok(2));
        assert_eq!(
            sender.send_buckets(&[2], "b", true),
            Ok(0),
            "a resumed move"
        );
        assert!(
            sender.send_buckets(&[2], "c", true).is_err(),
            "one destination"
        );
        assert!(
            sender.send_buckets(&[1, 4], "b", true).is_err(),
            "4 is not here"
        );
        assert_eq!(
            sender.bucket_state(1),
            Some(&BucketState::Active),
            "all or none"
        );
        assert!(
            sender.commit(write(7)).is_err(),
            "a sending bucket is frozen"
        );
        assert!(sender.bucket_state(2).unwrap().is_readable());

        assert_eq!(sender.move_generation(2), 1, "a new move");
        let sent = sent(&sender, &[2, 3]);
        assert_eq!(receiver.receive_buckets(sent.clone()), Ok(2));
        assert_eq!(receiver.move_generation(2), 1, "the move's generation");
        assert_eq!(receiver.account(id), sender.account(id));
        assert_eq!(receiver.buckets[&2].recent_answer(9), Some(&[1][..]));
        assert_eq!(receiver.bucket_state(2), Some(&BucketState::Active));
        receiver.commit(write(9)).unwrap();
        assert_eq!(receiver.receive_buckets(sent), Ok(0), "a resumed move");
        assert_eq!(receiver.account(id).unwrap().balance.micros(), 9, "kept");

        let steps =
            |ids: &[u32]| -> Vec<MoveStep> { ids.iter().map(|id| (*id, Some(1))).collect() };
        assert!(sender.drop_sent_buckets(&steps(&[2, 3]), "c").is_err());
        assert!(
            sender.drop_sent_buckets(&[(1, Some(0))], "b").is_err(),
            "1 is active"
        );
        assert_eq!(sender.drop_sent_buckets(&steps(&[2, 3]), "b"), Ok(2));
        assert_eq!(sender.drop_sent_buckets(&steps(&[2, 3]), "b"), Ok(0));
        assert_eq!(sender.account(id), None);
        assert_eq!(sender.buckets.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(sender.move_generation(2), 1, "kept when the bucket leaves");

        let mut stray = BucketData::new(BucketState::Active);
        stray
            .accounts
            .insert(id, AccountRow::from_account(&receiver.account(id).unwrap()));
        assert!(receiver.receive_buckets(vec![(5, Some(1), stray)]).is_err());
        for out_of_range in [0, 11] {
            let empty = BucketData::new(BucketState::Active);
            assert!(receiver
                .receive_buckets(vec![(out_of_range, Some(1), empty)])
                .is_err());
        }
        sender.send_buckets(&[1], "b", true).unwrap();
        assert!(
            sender.cancel_send_buckets(&[(1, Some(1))], "c").is_err(),
            "not sent to c"
        );
        assert_eq!(sender.cancel_send_buckets(&[(1, Some(1))], "b"), Ok(1));
        assert_eq!(sender.cancel_send_buckets(&[(1, Some(1))], "b"), Ok(0));
        assert!(sender.bucket_state(1).unwrap().is_writable());
        assert!(
            sender.cancel_send_buckets(&[(2, Some(1))], "b").is_err(),
            "2 is gone"
        );

        receiver.send_buckets(&[4], "a", true).unwrap();
        let empty = BucketData::new(BucketState::Active);
        assert!(
            receiver.receive_buckets(vec![(4, Some(5), empty)]).is_err(),
            "sending from here"
        );
    }

    /// The buckets `ids` of `sender` as a receive step carries them.
    fn sent(sender: &State, ids: &[u32]) -> Vec<(u32, Option<u64>, BucketData)> {
        ids.iter()
            .map(|id| {
                let data = (*sender.buckets[id]).clone();
                (*id, Some(sender.move_generation(*id)), data)
            })
            .collect()
    }

    /// Moves `bucket` from `from` to `to` (named `to_name`), all three steps.
    fn move_bucket(from: &mut State, to: &mut State, to_name: &str, bucket: u32) {
        from.send_buckets(&[bucket], to_name, true).unwrap();
        assert_eq!(to.receive_buckets(sent(from, &[bucket])), Ok(1));
        let step = (bucket, Some(from.move_generation(bucket)));
        assert_eq!(from.drop_sent_buckets(&[step], to_name), Ok(1));
    }

    /// Two drivers of one move (a rebalance on each of two routers): the one overtaken
    /// repeats its steps after the bucket moved on, and they change nothing.
    #[test]
    fn a_stale_step_of_an_earlier_move_changes_nothing() {
        let (mut a, mut b) = (State::new(10), State::new(10));
        a.assign_buckets(&[1, 2]).unwrap();
        let id = (1..).find(|id| a.bucket_of(*id) == 1).unwrap();
        a.fill_accounts(id, 1, 500, 0).unwrap();

        // The first driver starts the move and is held up with what a answered.
        a.send_buckets(&[1], "b", true).unwrap();
        let held_up = sent(&a, &[1]);
        // The second finishes it; then the bucket moves back to a, and on to b again with
        // its send step taken.
        assert_eq!(b.receive_buckets(held_up.clone()), Ok(1));
        assert_eq!(a.drop_sent_buckets(&[(1, Some(1))], "b"), Ok(1));
        move_bucket(&mut b, &mut a, "a", 1);
        assert_eq!((a.move_generation(1), b.move_generation(1)), (2, 2));

        // The first driver's receive, late: b saw the bucket in that move and since; it
        // stays where it is (a), not taken twice.
        assert_eq!(b.receive_buckets(held_up.clone()), Ok(0));
        assert_eq!(b.bucket_state(1), None);
        assert_eq!(a.bucket_state(1), Some(&BucketState::Active));
        // Its drop (or take-back) of the move under way now is refused: the bucket, being
        // sent to b again, is not lost.
        a.send_buckets(&[1], "b", true).unwrap();
        assert_eq!(a.move_generation(1), 3);
        let refused = a.drop_sent_buckets(&[(1, Some(1))], "b").unwrap_err();
        assert!(refused.contains("generation 3, not 1"), "{refused}");
        assert!(a.cancel_send_buckets(&[(1, Some(1))], "b").is_err());
        assert_eq!(
            a.bucket_state(1),
            Some(&BucketState::Sending { to: "b".into() })
        );
        // The move under way goes on; a late receive of it is a resumed move.
        let now = sent(&a, &[1]);
        assert_eq!(b.receive_buckets(now.clone()), Ok(1));
        assert_eq!(b.receive_buckets(now), Ok(0));
        assert_eq!(b.receive_buckets(held_up), Ok(0));
        assert_eq!(a.drop_sent_buckets(&[(1, Some(3))], "b"), Ok(1));
        assert_eq!(b.account(id).unwrap().balance.micros(), 500);

        // A log written before generations still replays as it did: taken if not owned here.
        let mut old = State::new(10);
        let data = BucketData::new(BucketState::Active);
        assert_eq!(old.receive_buckets(vec![(2, None, data)]), Ok(1));
        assert_eq!(old.move_generation(2), 0);
        // Its entries keep their places in the log's format (bincode's u32 tag), the new
        // ones come after them.
        let tag = |command: Command| u32::from_le_bytes(command.encode()[..4].try_into().unwrap());
        let (from, to) = (String::new(), String::new());
        let (buckets, bucket_ids) = (Vec::new(), Vec::new());
        assert_eq!(tag(Command::SendBuckets { bucket_ids, to }), 8);
        let to = String::new();
        assert_eq!(tag(Command::ReceiveBuckets { from, buckets }), 9);
        let bucket_ids = Vec::new();
        assert_eq!(tag(Command::CancelSendBuckets { bucket_ids, to }), 11);
        let (from, buckets) = (String::new(), Vec::new());
        assert_eq!(tag(Command::ReceiveBucketMoves { from, buckets }), 13);
        let (to, moves) = (String::new(), Vec::new());
        assert_eq!(tag(Command::CancelSendBucketMoves { to, moves }), 15);
        let (to, bucket_ids) = (String::new(), Vec::new());
        assert_eq!(tag(Command::SendBucketMoves { bucket_ids, to }), 16);
    }

    /// A cluster upgraded with moves behind it and one under way: moves from before
    /// generations are generation 0, the one under way finishes, and later ones are fenced.
    #[test]
    fn moves_from_before_generations_go_on_after_an_upgrade() {
        let (mut a, mut b) = (State::new(10), State::new(10));
        a.assign_buckets(&[1, 2]).unwrap();
        // Replayed from a log written before generations: 1 moved to b, 2 is being sent.
        a.send_buckets(&[1, 2], "b", false).unwrap();
        let data = (*a.buckets[&1]).clone();
        assert_eq!(b.receive_buckets(vec![(1, None, data)]), Ok(1));
        assert_eq!(a.drop_sent_buckets(&[(1, None)], "b"), Ok(1));
        assert!(a.moves.is_empty() && b.moves.is_empty());
        // The move under way, resumed by a driver of this build, is generation 0.
        let resumed = sent(&a, &[2]);
        assert_eq!(resumed[0].1, Some(0));
        assert_eq!(b.receive_buckets(resumed.clone()), Ok(1));
        assert_eq!(a.drop_sent_buckets(&[(2, Some(0))], "b"), Ok(1));
        // Both buckets go back to a and out again: every step lands.
        for bucket in [1, 2] {
            move_bucket(&mut b, &mut a, "a", bucket);
            move_bucket(&mut a, &mut b, "b", bucket);
            assert_eq!(b.move_generation(bucket), 2);
        }
        // A late step of the move begun before the upgrade is stale now.
        move_bucket(&mut b, &mut a, "a", 2);
        assert_eq!(b.receive_buckets(resumed), Ok(0));
        assert_eq!(b.bucket_state(2), None);
    }

    #[test]
    fn snapshots_carry_move_generations_and_those_from_before_them_restore() {
        let mut state = State::new(10);
        state.assign_buckets(&[1, 2]).unwrap();
        state.send_buckets(&[2], "b", true).unwrap();
        let restored = State::decode_snapshot(&state.encode_snapshot()).unwrap();
        assert_eq!(restored.moves, state.moves);
        assert_eq!(restored.bucket_state(2), state.bucket_state(2));
        // Written before generations: the derived encoding alone.
        let before = bincode::serialize(&state).unwrap();
        let restored = State::decode_snapshot(&before).unwrap();
        assert!(restored.moves.is_empty());
        assert_eq!(restored.buckets.len(), 2);
        // What a build from before generations reads of a snapshot now: the same state.
        let read_before: State = bincode::deserialize(&state.encode_snapshot()).unwrap();
        assert_eq!(bincode::serialize(&read_before).unwrap(), before);
        assert!(State::decode_snapshot(b"not a state").is_err());
    }

    #[test]
    fn activating_needs_an_existing_version() {
        let mut state = State::new(10);
        state.add_module_version("transfer", vec![1], 3);
        state.add_module_version("transfer", vec![2], 4);
        assert_eq!(state.activate("transfer", 1), Ok(2));
        assert_eq!(state.active["transfer"], 1);
        assert!(state.activate("transfer", 3).is_err());
        assert!(state.activate("tariff", 1).is_err());
        assert_eq!(state.active["transfer"], 1);
    }

    #[test]
    fn commands_round_trip() {
        let command = Command::AssignBuckets {
            bucket_ids: vec![1, 2, 3],
        };
        match Command::decode(&command.encode()).unwrap() {
            Command::AssignBuckets { bucket_ids } => assert_eq!(bucket_ids, vec![1, 2, 3]),
            other => panic!("{other:?}"),
        }
        assert!(Command::decode(&[0xff; 3]).is_err());
    }

    #[test]
    fn an_entry_starts_with_its_kind_and_a_newer_kind_says_to_upgrade() {
        let commands = [
            Command::Digest,
            Command::Activate {
                name: "m".into(),
                version: 1,
            },
            Command::PinBuckets {
                bucket_ids: vec![7],
                pinned: true,
            },
            Command::SendBucketMoves {
                bucket_ids: vec![7],
                to: "b".into(),
            },
            Command::Effects {
                term: 1,
                effects: Vec::new(),
            },
            Command::RecordDepletions {
                items: vec![(3, 1_500), (6, -1)],
            },
            Command::StageBucketPart(BucketPart {
                from: "a".into(),
                bucket: 7,
                generation: 2,
                total: 1 << 25,
                offset: 1 << 23,
                bytes: vec![1, 2, 3],
            }),
            Command::ReceiveStagedBucket {
                from: "a".into(),
                bucket: 7,
                generation: 2,
                checksum: 0xdead_beef,
            },
        ];
        for command in &commands {
            let bytes = command.encode();
            assert_eq!(bytes[..4], command.kind().to_le_bytes(), "{command:?}");
            assert!(command.kind() < Command::KINDS);
        }
        assert_eq!(commands[4].kind(), 17);
        assert_eq!(commands[5].kind(), 18);
        assert_eq!(commands[7].kind(), Command::KINDS - 1, "the last kind");
        match Command::decode(&commands[5].encode()).unwrap() {
            Command::RecordDepletions { items } => assert_eq!(items, [(3, 1_500), (6, -1)]),
            other => panic!("{other:?}"),
        }
        // A part's bytes are copied whole: the entry is the part and a few bytes more.
        let part_entry = commands[6].encode();
        assert!(part_entry.len() < 3 + 32, "{}", part_entry.len());
        match Command::decode(&part_entry).unwrap() {
            Command::StageBucketPart(part) => {
                assert_eq!(
                    (part.bucket, part.offset, part.bytes),
                    (7, 1 << 23, vec![1, 2, 3])
                )
            }
            other => panic!("{other:?}"),
        }
        match Command::decode(&commands[7].encode()).unwrap() {
            Command::ReceiveStagedBucket {
                from,
                bucket,
                generation,
                checksum,
            } => assert_eq!(
                (from.as_str(), bucket, generation, checksum),
                ("a", 7, 2, 0xdead_beef)
            ),
            other => panic!("{other:?}"),
        }

        let mut newer = Command::KINDS.to_le_bytes().to_vec();
        newer.extend_from_slice(&[0; 16]);
        let why = Command::decode(&newer).unwrap_err();
        assert!(
            why.contains("kind 21, which a newer billcl wrote") && why.contains("upgrade"),
            "{why}"
        );
        let why = Command::decode(&[3, 0, 0]).unwrap_err();
        assert!(why.contains("damaged"), "{why}");
    }
}
