//! Depletions: the moment an account runs dry, recorded through the log and given to whoever
//! follows them — the role `expirationd` played in the Tarantool cluster, which scanned the
//! accounts for those that had run out.
//!
//! An account drains at its velocity, and the moment its balance reaches zero is exact
//! (`Account::depleted_at_ms`), but nothing happens in the state at that moment: reads
//! compute the balance. So each leader scans its accounts every [`DEPLETION_SCAN_MS`] for
//! those that drain (velocity above zero) and are dry by its clock, and proposes them
//! (`Command::RecordDepletions`: each account with the moment it ran dry). Every member
//! applies the entry the same way: an account is recorded if it is still in a writable bucket
//! here, still drains, still runs dry at that same moment (no write re-anchored it since the
//! scan) and is not recorded dry already; it is then dry until a write leaves it a positive
//! balance (a top-up), and its event — a sequence number of the replicaset, the account, its
//! bucket and the moment — joins the replicaset's last [`DEPLETION_EVENTS_KEPT`] events, read
//! with the router's `depletions` verb (`billcl depletions [--follow]`; an application through
//! the SDK's `Client::depletions`). They are replicated state: every member holds them, a new
//! leader goes on from them, and they are in snapshots.
//!
//! An event is delivered at least once: an account whose bucket moves while it is dry is
//! recorded again by its new replicaset (an event is named by its account and moment, which a
//! consumer uses to drop the repeat).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use billcl_proto::message::{ErrorReply, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::state::{AccountRow, Command, State};
use crate::storage::{parse_optional_body, StorageNode};

/// How often a leader looks for accounts that ran dry: an event follows the moment within
/// this (plus the log's commit).
pub const DEPLETION_SCAN_MS: u64 = 500;
/// The events a replicaset keeps (the oldest are forgotten first).
pub const DEPLETION_EVENTS_KEPT: usize = 10_000;
/// The most accounts one `RecordDepletions` entry records (a scan that finds more proposes
/// several).
pub const DEPLETIONS_PER_ENTRY_MAX: usize = 10_000;
/// The most events one `depletions` answer carries.
pub const DEPLETIONS_PER_ANSWER_MAX: usize = 1_000;

/// A replicaset's record of dry accounts (replicated: changed only by applying the log).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Depletions {
    /// Accounts recorded dry and not topped up since.
    dry: BTreeSet<u64>,
    /// The last events, oldest first.
    events: VecDeque<DepletionEvent>,
    /// The sequence number of the last event (0: none yet).
    last_seq: u64,
}

/// An account that ran dry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepletionEvent {
    /// Its number in its replicaset's events, from 1.
    pub seq: u64,
    pub account: u64,
    pub bucket: u32,
    /// The first millisecond at which its balance was zero (leader time).
    pub at_ms: i64,
}

impl Depletions {
    pub fn is_empty(&self) -> bool {
        self.dry.is_empty() && self.events.is_empty() && self.last_seq == 0
    }

    /// The events after sequence number `after`, at most `limit`; and the sequence number to
    /// ask after next. A cursor past the last event (the replicaset went back: restored from a
    /// backup) is answered from the start, so that no event after the restore is skipped.
    pub fn after(&self, after: u64, limit: usize) -> (Vec<DepletionEvent>, u64) {
        let after = if after > self.last_seq { 0 } else { after };
        let events: Vec<DepletionEvent> = self
            .events
            .iter()
            .filter(|event| event.seq > after)
            .take(limit)
            .cloned()
            .collect();
        let next = events.last().map_or(after.max(self.last_seq), |e| e.seq);
        (events, next)
    }
}

/// The moment an account as stored runs dry, if it drains.
fn runs_dry_at(id: u64, row: &AccountRow) -> Option<i64> {
    if row.velocity_micros <= 0 {
        return None;
    }
    (*row).to_account(id).depleted_at_ms()
}

impl State {
    /// The accounts of writable buckets here that drain, ran dry by `now_ms` and are not
    /// recorded dry: (account, the moment), in account order. (The leader's scan goes bucket
    /// by bucket, [`State::due_depletions_in`], letting go of the lock in between.)
    #[cfg(test)]
    pub fn due_depletions(&self, now_ms: i64) -> Vec<(u64, i64)> {
        let mut due: Vec<(u64, i64)> = self
            .buckets
            .keys()
            .flat_map(|bucket| self.due_depletions_in(*bucket, now_ms))
            .collect();
        due.sort_unstable();
        due
    }

    /// The accounts of `bucket` that drain, ran dry by `now_ms` and are not recorded dry:
    /// (account, the moment); none if the bucket is not writable here.
    pub fn due_depletions_in(&self, bucket: u32, now_ms: i64) -> Vec<(u64, i64)> {
        let Some(data) = self.buckets.get(&bucket).filter(|d| d.state.is_writable()) else {
            return Vec::new();
        };
        data.accounts
            .iter()
            .filter(|(id, _)| !self.depletions.dry.contains(id))
            .filter_map(|(id, row)| Some((*id, runs_dry_at(*id, row)?)))
            .filter(|(_, at_ms)| *at_ms <= now_ms)
            .collect()
    }

    /// Applies `RecordDepletions`: records each account that still runs dry at that moment
    /// and is not recorded already (the module's doc); answers how many were recorded.
    pub fn record_depletions(&mut self, items: &[(u64, i64)]) -> u32 {
        let mut recorded = 0;
        for &(id, at_ms) in items {
            let bucket = self.bucket_of(id);
            let Some(data) = self.buckets.get(&bucket) else {
                continue;
            };
            let still_dry = data.state.is_writable()
                && data
                    .accounts
                    .get(&id)
                    .is_some_and(|row| runs_dry_at(id, row) == Some(at_ms));
            if !still_dry || !self.depletions.dry.insert(id) {
                continue;
            }
            let depletions = &mut self.depletions;
            depletions.last_seq += 1;
            depletions.events.push_back(DepletionEvent {
                seq: depletions.last_seq,
                account: id,
                bucket,
                at_ms,
            });
            while depletions.events.len() > DEPLETION_EVENTS_KEPT {
                depletions.events.pop_front();
            }
            recorded += 1;
        }
        recorded
    }

    /// A write left account `id` as `row`: a positive balance ends its dry spell.
    pub fn note_written(&mut self, id: u64, row: &AccountRow) {
        if row.balance_micros > 0 && !self.depletions.dry.is_empty() {
            self.depletions.dry.remove(&id);
        }
    }

    /// Bucket `bucket` left: its accounts are no longer this replicaset's to record.
    pub fn forget_depletions_in(&mut self, bucket: u32) {
        if self.depletions.dry.is_empty() {
            return;
        }
        if let Some(data) = self.buckets.get(&bucket) {
            for id in data.accounts.keys() {
                self.depletions.dry.remove(id);
            }
        }
    }
}

/// The leader's scan: every [`DEPLETION_SCAN_MS`], while this member leads, proposes the
/// accounts that ran dry. Runs as long as the node.
pub async fn scan(node: Arc<StorageNode>) {
    let mut every = tokio::time::interval(Duration::from_millis(DEPLETION_SCAN_MS));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if node.replica.leader_term().is_none() {
            continue;
        }
        // Bucket by bucket, each under the lock for a moment (a write's apply waits for
        // it), off the async workers: a million draining accounts take ≈ 12 ms.
        let shared = node.shared.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let now_ms = crate::storage::now_ms();
            let buckets: Vec<u32> = shared
                .state
                .read()
                .unwrap()
                .buckets
                .keys()
                .copied()
                .collect();
            let mut due = Vec::new();
            for bucket in buckets {
                due.extend(
                    shared
                        .state
                        .read()
                        .unwrap()
                        .due_depletions_in(bucket, now_ms),
                );
            }
            due.sort_unstable();
            due
        })
        .await;
        let Ok(due) = scanned else {
            continue;
        };
        for items in due.chunks(DEPLETIONS_PER_ENTRY_MAX) {
            let command = Command::RecordDepletions {
                items: items.to_vec(),
            };
            match node.propose(command).await {
                Ok(Response::Value(_)) => {}
                Ok(other) => tracing::warn!("recording depletions: {other:?}"),
                // Not the leader any more, or writes held: the next leader scans.
                Err(reply) => tracing::debug!("recording depletions: {}", reply.message),
            }
        }
    }
}

/// The storage's `depletions {"after": SEQ, "limit": N}`: its replicaset's events after
/// `after`, answered by any member; by the leader after a read barrier, so that a new leader
/// still applying its predecessor's entries never answers an older list (a cursor past its
/// last event would read as a restore, and every event would be answered again).
pub async fn storage_depletions(
    node: &StorageNode,
    body: &str,
) -> Result<serde_json::Value, ErrorReply> {
    if node.replica.leader_term().is_some() {
        node.replica
            .read_barrier()
            .await
            .map_err(|e| node.propose_error(e))?;
    }
    let request = parse_optional_body(body)?;
    let after = request["after"].as_u64().unwrap_or(0);
    let limit = request["limit"]
        .as_u64()
        .map_or(DEPLETIONS_PER_ANSWER_MAX, |limit| limit as usize)
        .min(DEPLETIONS_PER_ANSWER_MAX);
    let state = node.shared.state.read().unwrap();
    let (events, next) = state.depletions.after(after, limit);
    Ok(json!({
        "replicaset": node.shared.replicaset,
        "instance": node.shared.instance,
        "events": events,
        "next": next,
        "dry": state.depletions.dry.len(),
    }))
}

/// The router's `depletions {"after": {REPLICASET: SEQ, …}, "limit": N}`: every replicaset's
/// events after its sequence number, from its leader (a replicaset without a reachable leader
/// says so, and the others answer).
pub async fn router_depletions(
    router: &crate::router::Router,
    body: &str,
) -> Result<serde_json::Value, ErrorReply> {
    let request = parse_optional_body(body)?;
    let mut names: Vec<String> = Vec::new();
    for (replicaset, ..) in router.storages() {
        if !names.contains(&replicaset) {
            names.push(replicaset);
        }
    }
    let mut answers = Vec::new();
    for name in names {
        let body = json!({
            "after": request["after"][name.as_str()].as_u64().unwrap_or(0),
            "limit": request["limit"],
        })
        .to_string();
        let answer = match router.leader_of(&name).await {
            Some((leader, peer)) => {
                match crate::router::admin_request(&peer, "depletions", &body).await {
                    Ok(answer) => answer,
                    Err(reply) => {
                        json!({"replicaset": name, "error": format!("{leader}: {}", reply.message)})
                    }
                }
            }
            None => json!({"replicaset": name, "error": "no reachable leader"}),
        };
        answers.push(answer);
    }
    Ok(json!({ "replicasets": answers }))
}

/// How often `billcl depletions --follow` asks for new events.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// `billcl depletions [--follow] [--json]`: the accounts that ran dry, oldest first, per
/// replicaset; with `--follow`, then each new one as it is recorded (through the SDK's
/// [`billcl_client::Client::depletions`], as an application follows them).
pub async fn cli_depletions(
    client: &billcl_client::Client,
    follow: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut cursor = billcl_client::DepletionCursor::default();
    let mut told: BTreeSet<String> = BTreeSet::new();
    loop {
        let read = client.depletions(&mut cursor).await?;
        let event_json = |event: &billcl_client::Depletion| {
            json!({"replicaset": event.replicaset, "seq": event.seq, "account": event.account,
                   "bucket": event.bucket, "at_ms": event.at_ms,
                   "at": crate::deploy::utc_text(event.at_ms)})
        };
        if as_json && !follow {
            let events: Vec<serde_json::Value> = read.events.iter().map(event_json).collect();
            let unavailable: Vec<serde_json::Value> = read
                .unavailable
                .iter()
                .map(|(replicaset, why)| json!({"replicaset": replicaset, "error": why}))
                .collect();
            let answer = json!({"events": events, "unavailable": unavailable});
            println!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(());
        }
        for (replicaset, why) in &read.unavailable {
            if told.insert(replicaset.clone()) {
                eprintln!("{replicaset}: {why}");
            }
        }
        told.retain(|name| read.unavailable.iter().any(|(down, _)| down == name));
        for event in &read.events {
            if as_json {
                println!("{}", event_json(event));
            } else {
                println!(
                    "{}  account {} ran dry  (bucket {}, {} #{})",
                    crate::deploy::utc_text(event.at_ms),
                    event.account,
                    event.bucket,
                    event.replicaset,
                    event.seq
                );
            }
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use billcl_money::{Account, Decimal};

    use super::*;
    use crate::state::{BucketData, BucketState, Writes};

    /// A state whose buckets are all active, holding `accounts` (id, balance, velocity per
    /// second in micro-units) anchored at time 0.
    fn state_with(accounts: &[(u64, i64, i64)]) -> State {
        let mut state = State::new(10);
        for bucket in 1..=10 {
            let data = BucketData::new(BucketState::Active);
            state.buckets.insert(bucket, Arc::new(data));
        }
        let mut writes = Writes::default();
        for &(id, balance, velocity) in accounts {
            let account = Account::new(
                id,
                Decimal::from_micros(balance),
                Decimal::from_micros(velocity),
                0,
            );
            writes
                .accounts
                .push((id, AccountRow::from_account(&account)));
        }
        state.commit(writes).unwrap();
        state
    }

    #[test]
    fn an_account_that_ran_dry_is_recorded_once_until_it_is_topped_up() {
        // 1.5 at 1/s runs dry at 1,500 ms; 5 at 0.5/s at 10,000 ms; 7 never drains; 9 is
        // empty but does not drain either.
        let mut state = state_with(&[
            (3, 1_500_000, 1_000_000),
            (6, 5_000_000, 500_000),
            (7, 9_000_000, 0),
            (9, 0, 0),
        ]);
        assert_eq!(state.due_depletions(1_499), []);
        assert_eq!(state.due_depletions(1_500), [(3, 1_500)]);
        assert_eq!(state.due_depletions(20_000), [(3, 1_500), (6, 10_000)]);

        assert_eq!(state.record_depletions(&[(3, 1_500)]), 1);
        // Again (a second scan before the first entry applied): nothing.
        assert_eq!(state.record_depletions(&[(3, 1_500)]), 0);
        // A moment the account no longer runs dry at (a write re-anchored it): nothing.
        assert_eq!(state.record_depletions(&[(6, 9_999)]), 0);
        assert_eq!(state.due_depletions(20_000), [(6, 10_000)]);
        let (events, next) = state.depletions.after(0, 10);
        assert_eq!(
            events,
            [DepletionEvent {
                seq: 1,
                account: 3,
                bucket: state.bucket_of(3),
                at_ms: 1_500
            }]
        );
        assert_eq!(next, 1);

        // Topped up at 2,000 ms with 1 (at 1/s: dry again at 3,000 ms): a new dry spell.
        let topped_up = Account::new(
            3,
            Decimal::from_micros(1_000_000),
            Decimal::from_micros(1_000_000),
            2_000,
        );
        let row = AccountRow::from_account(&topped_up);
        state.note_written(3, &row);
        let mut writes = Writes::default();
        writes.accounts.push((3, row));
        state.commit(writes).unwrap();
        assert_eq!(state.due_depletions(2_999), []);
        assert_eq!(state.due_depletions(10_000), [(3, 3_000), (6, 10_000)]);
        assert_eq!(state.record_depletions(&[(3, 3_000), (6, 10_000)]), 2);
        let (events, next) = state.depletions.after(1, 10);
        let seen: Vec<(u64, u64, i64)> =
            events.iter().map(|e| (e.seq, e.account, e.at_ms)).collect();
        assert_eq!(seen, [(2, 3, 3_000), (3, 6, 10_000)]);
        assert_eq!(next, 3);
        assert_eq!(state.depletions.after(3, 10), (vec![], 3));
        // A cursor from before a restore to an older state: everything it holds, again.
        assert_eq!(state.depletions.after(9, 10).0.len(), 3);
        assert_eq!(state.due_depletions(i64::MAX), []);
    }

    #[test]
    fn depletions_are_in_snapshots_and_a_snapshot_without_them_still_restores() {
        let mut state = state_with(&[(3, 1_500_000, 1_000_000)]);
        assert_eq!(state.record_depletions(&[(3, 1_500)]), 1);
        let restored = State::decode_snapshot(&state.encode_snapshot()).unwrap();
        assert_eq!(restored.depletions, state.depletions);
        assert_eq!(
            crate::verify::state_digest(&restored),
            crate::verify::state_digest(&state)
        );
        // As a build before depletions wrote it: the state and its move generations.
        let older = bincode::serialize(&(&state, &state.moves)).unwrap();
        let restored = State::decode_snapshot(&older).unwrap();
        assert!(restored.depletions.is_empty());
        assert_eq!(restored.account(3), state.account(3));
    }

    #[test]
    fn the_events_kept_are_bounded() {
        let accounts: Vec<(u64, i64, i64)> = (1..=(DEPLETION_EVENTS_KEPT as u64 + 5))
            .map(|id| (id, 1_000_000, 1_000_000))
            .collect();
        let mut state = state_with(&accounts);
        let due = state.due_depletions(1_000);
        assert_eq!(due.len(), accounts.len());
        assert_eq!(state.record_depletions(&due), accounts.len() as u32);
        assert_eq!(state.depletions.events.len(), DEPLETION_EVENTS_KEPT);
        let (events, next) = state.depletions.after(0, 3);
        assert_eq!(events[0].seq, 6);
        assert_eq!(next, 8);
    }
}
