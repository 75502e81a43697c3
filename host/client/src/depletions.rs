//! Following the accounts that run dry: [`Client::depletions`] (docs/protocol.md, the
//! `depletions` verb; docs/ARCHITECTURE.md, "Depletions").

use std::collections::BTreeMap;

use crate::{Client, Error};

/// An account whose balance drained to zero, as its replicaset recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Depletion {
    /// The replicaset that recorded it.
    pub replicaset: String,
    /// Its number among that replicaset's events, from 1.
    pub seq: u64,
    /// The account.
    pub account: u64,
    /// The account's bucket.
    pub bucket: u32,
    /// The first millisecond at which the balance was zero (Unix time, the leader's clock).
    pub at_ms: i64,
}

/// Where a follower of depletions is: the last event seen of each replicaset. Start from
/// `Default` (every event the replicasets still keep) and pass the same cursor to each
/// [`Client::depletions`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DepletionCursor {
    after: BTreeMap<String, u64>,
}

/// What one [`Client::depletions`] read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Depletions {
    /// The events after the cursor, oldest first within each replicaset.
    pub events: Vec<Depletion>,
    /// Replicasets that could not answer now, each with why (their events come on a later
    /// read: the cursor did not move for them).
    pub unavailable: Vec<(String, String)>,
}

impl Client {
    /// The accounts that ran dry since `cursor`, and moves the cursor past them: call it again
    /// (every half second, say) to follow them. Each dry spell of an account is one event,
    /// recorded through its replicaset's log within about half a second of the moment, with
    /// that exact moment. At least once: an account whose bucket moves to another replicaset
    /// while dry may be reported again by it, with the same `account` and `at_ms`.
    pub async fn depletions(&self, cursor: &mut DepletionCursor) -> Result<Depletions, Error> {
        let after: serde_json::Map<String, serde_json::Value> = cursor
            .after
            .iter()
            .map(|(replicaset, seq)| (replicaset.clone(), (*seq).into()))
            .collect();
        let body = serde_json::json!({ "after": after }).to_string();
        let answer = self.admin("depletions", &body).await?;
        let answer: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|e| Error::Unexpected(format!("depletions answered bad JSON: {e}")))?;
        let mut read = Depletions::default();
        for replicaset in answer["replicasets"].as_array().into_iter().flatten() {
            let name = replicaset["replicaset"].as_str().unwrap_or("?").to_string();
            if let Some(why) = replicaset["error"].as_str() {
                read.unavailable.push((name, why.to_string()));
                continue;
            }
            for event in replicaset["events"].as_array().into_iter().flatten() {
                let field = |name: &str| event[name].as_u64();
                let (Some(seq), Some(account), Some(bucket), Some(at_ms)) = (
                    field("seq"),
                    field("account"),
                    field("bucket").and_then(|b| u32::try_from(b).ok()),
                    event["at_ms"].as_i64(),
                ) else {
                    return Err(Error::Unexpected(format!("a depletion event {event}")));
                };
                read.events.push(Depletion {
                    replicaset: name.clone(),
                    seq,
                    account,
                    bucket,
                    at_ms,
                });
            }
            if let Some(next) = replicaset["next"].as_u64() {
                cursor.after.insert(name, next);
            }
        }
        Ok(read)
    }
}
