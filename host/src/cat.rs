//! `billcl cat`: a storage instance's Raft log, read from its data directory entry by entry, as
//! Tarantool's `tt cat` prints a WAL: what each entry did and, for the calls the leader ran,
//! when, in which bucket, what they answered and the accounts they wrote. It reads the files
//! only ([`billcl_replication::read_log`]), so it works on a stopped instance and beside a
//! running one; `--account` makes it the history of one account.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{bail, Result};
use billcl_money::Decimal;
use billcl_proto::bucket::{bucket_id, Key};
use billcl_proto::{Response, Value};
use billcl_replication::{LoggedEntry, LoggedPayload};
use serde_json::json;

use crate::config::{ClusterConfig, Role};
use crate::deploy::utc_text;
use crate::state::{AccountRow, BucketData, CallRecord, Command, Effect, Outcome};

/// What `billcl cat` prints.
#[derive(Debug, Default)]
pub struct CatArgs {
    /// Storage instances; none: the first member of each replicaset.
    pub instances: Vec<String>,
    pub from: Option<u64>,
    pub to: Option<u64>,
    /// Only what wrote this account.
    pub account: Option<u64>,
    /// The cluster's bucket count: which bucket `account` is in (a bucket received in parts
    /// is part of its history; 0 leaves those entries out).
    pub bucket_count: u32,
    /// Only the calls of this procedure, kebab-case as the log names it (the CLI turns
    /// `add_money` into `add-money`).
    pub procedure: Option<String>,
    pub json: bool,
}

impl CatArgs {
    /// Whether the listing is only of what passes a filter on calls (`--account`,
    /// `--procedure`).
    fn filters(&self) -> bool {
        self.account.is_some() || self.procedure.is_some()
    }

    /// Whether a call passes the filters on calls.
    fn keeps(&self, effect: &Effect) -> bool {
        self.account.is_none_or(|id| writes_account(effect, id))
            && self.procedure.as_deref().is_none_or(|name| {
                effect
                    .call
                    .as_ref()
                    .is_some_and(|call| call.procedure == name)
            })
    }
}

/// Prints the log of each instance asked for.
pub fn cat(config: &ClusterConfig, args: &CatArgs) -> Result<()> {
    let storages: Vec<String> = config
        .instances()
        .into_iter()
        .filter(|instance| matches!(instance.role, Role::Storage { .. }))
        .map(|instance| instance.name)
        .collect();
    let instances = if args.instances.is_empty() {
        first_member_of_each_replicaset(config)
    } else {
        args.instances.clone()
    };
    for name in &instances {
        if !storages.contains(name) {
            bail!(
                "`{name}` is not a storage instance of {}; its storage instances: {} (a router \
                 keeps no log)",
                config.path.display(),
                storages.join(", ")
            );
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut any_entry = false;
    for name in &instances {
        let dir = config.instance_dir(name).join("raft");
        if !dir.join("log").is_dir() {
            bail!(
                "{name} has no log at {}: it was never started with this cluster file (`billcl \
                 start {name}`), or its data directory was moved",
                dir.join("log").display()
            );
        }
        let mut printed = 0u64;
        let mut failed: Option<std::io::Error> = None;
        let write = |out: &mut dyn Write, logged: &LoggedEntry, shown: &Shown| {
            if args.json {
                writeln!(out, "{}", entry_json(name, logged, shown))
            } else {
                write_entry(out, logged, shown, args.account)
            }
        };
        if !args.json {
            if let Err(e) = writeln!(out, "{name} ({})", dir.display()) {
                return quiet_if_closed(e);
            }
        }
        let notes = billcl_replication::read_log(&dir, |logged| {
            if args.to.is_some_and(|to| logged.index > to) {
                return ControlFlow::Break(());
            }
            if args.from.is_some_and(|from| logged.index < from) {
                return ControlFlow::Continue(());
            }
            let Some(shown) = describe(&logged, args) else {
                return ControlFlow::Continue(());
            };
            printed += 1;
            match write(&mut out, &logged, &shown) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        if let Some(e) = failed {
            return quiet_if_closed(e);
        }
        any_entry |= printed > 0;
        if !args.json && printed == 0 {
            if let Err(e) = writeln!(out, "  (no entry{})", filter_text(args)) {
                return quiet_if_closed(e);
            }
        }
        if let Err(e) = out.flush() {
            return quiet_if_closed(e);
        }
        for note in notes {
            eprintln!("note: {note}");
        }
    }
    if args.json && !any_entry {
        eprintln!("note: no entry{}", filter_text(args));
    }
    Ok(())
}

/// Stdout closed by its reader (`billcl cat | head`) ends the listing without an error.
fn quiet_if_closed(error: std::io::Error) -> Result<()> {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        return Ok(());
    }
    Err(anyhow::Error::new(error).context("writing the log out"))
}

/// The instances `billcl cat` reads when none is named: one per replicaset (every member's log
/// holds the same entries), the first by name.
fn first_member_of_each_replicaset(config: &ClusterConfig) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    config
        .instances()
        .into_iter()
        .filter_map(|instance| match instance.role {
            Role::Storage { replicaset, .. } => seen.insert(replicaset).then_some(instance.name),
            Role::Router { .. } => None,
        })
        .collect()
}

fn filter_text(args: &CatArgs) -> String {
    let mut filters = Vec::new();
    if let Some(from) = args.from {
        filters.push(format!("from index {from}"));
    }
    if let Some(to) = args.to {
        filters.push(format!("up to index {to}"));
    }
    if let Some(account) = args.account {
        filters.push(format!("that wrote account {account}"));
    }
    if let Some(procedure) = &args.procedure {
        filters.push(format!("of procedure {procedure}"));
    }
    if filters.is_empty() {
        String::new()
    } else {
        format!(" {}", filters.join(", "))
    }
}

/// What an entry shows: the entry itself, or for calls those that pass the filter.
enum Shown {
    /// A one-line description and its JSON fields.
    Line(String, serde_json::Value),
    /// The calls of an effects entry run by the leader of `term`.
    Calls { term: u64, calls: Vec<Effect> },
}

/// What to show of `logged`, or nothing when a filter (`--account`, `--procedure`) leaves it
/// out.
fn describe(logged: &LoggedEntry, args: &CatArgs) -> Option<Shown> {
    let account = args.account;
    let bytes = match &logged.payload {
        LoggedPayload::Blank => {
            return (!args.filters()).then(|| {
                Shown::Line(
                    "a new leader's first entry".into(),
                    json!({"kind": "blank"}),
                )
            })
        }
        LoggedPayload::Membership { voters, learners } => {
            return (!args.filters()).then(|| {
                Shown::Line(
                    format!(
                        "membership: voters {}, learners {}",
                        node_list(voters),
                        node_list(learners)
                    ),
                    json!({"kind": "membership", "voters": voters, "learners": learners}),
                )
            })
        }
        LoggedPayload::Command(bytes) => bytes,
    };
    let command = match Command::decode(bytes) {
        Ok(command) => command,
        Err(why) => {
            return Some(Shown::Line(
                format!("an entry this build cannot read ({why})"),
                json!({"kind": "unreadable", "why": why}),
            ))
        }
    };
    let holds = |buckets: Vec<&BucketData>| match account {
        None => true,
        Some(id) => buckets
            .iter()
            .any(|bucket| bucket.accounts.contains_key(&id)),
    };
    let line = |text: String, fields: serde_json::Value| Some(Shown::Line(text, fields));
    // Whether `bucket` is `--account`'s (every bucket without it).
    let in_bucket = |bucket: u32| match account {
        None => true,
        Some(id) => args.bucket_count > 0 && bucket_id(&Key::Uint(id), args.bucket_count) == bucket,
    };
    match command {
        Command::Effects { term, effects } => calls_shown(term, effects, args),
        Command::EffectsBeforeCalls { term, effects } => {
            calls_shown(term, effects.into_iter().map(Effect::from), args)
        }
        // Only calls are a procedure's.
        _ if args.procedure.is_some() => None,
        Command::FillAccounts {
            first_id,
            count,
            balance_micros,
            timestamp_ms,
        } => {
            let last_id = first_id.saturating_add(count).saturating_sub(1);
            if account.is_some_and(|id| !(first_id..=last_id).contains(&id)) {
                return None;
            }
            let balance = Decimal::from_micros(balance_micros).to_string();
            line(
                format!(
                    "{}  create accounts {first_id}-{last_id} ({count}), balance {balance} each",
                    utc_text(timestamp_ms)
                ),
                json!({"kind": "fill-accounts", "first_id": first_id, "count": count,
                       "balance": balance, "at": utc_text(timestamp_ms)}),
            )
        }
        Command::ReceiveBucketMoves { from, buckets } => {
            if !holds(buckets.iter().map(|(_, _, data)| data).collect()) {
                return None;
            }
            let ids: Vec<u64> = buckets.iter().map(|(id, _, _)| u64::from(*id)).collect();
            received(&from, &ids)
        }
        Command::ReceiveBuckets { from, buckets } => {
            if !holds(buckets.iter().map(|(_, data)| data).collect()) {
                return None;
            }
            let ids: Vec<u64> = buckets.iter().map(|(id, _)| u64::from(*id)).collect();
            received(&from, &ids)
        }
        Command::RecordDepletions { items } => {
            let items: Vec<(u64, i64)> = items
                .into_iter()
                .filter(|(id, _)| account.is_none_or(|wanted| wanted == *id))
                .collect();
            if items.is_empty() {
                return None;
            }
            let mut text: Vec<String> = items
                .iter()
                .take(DEPLETIONS_SHOWN_MAX)
                .map(|(id, at_ms)| format!("account {id} at {}", utc_text(*at_ms)))
                .collect();
            if items.len() > DEPLETIONS_SHOWN_MAX {
                text.push(format!("{} more", items.len() - DEPLETIONS_SHOWN_MAX));
            }
            let accounts: Vec<serde_json::Value> = items
                .iter()
                .map(|(id, at_ms)| json!({"account": id, "at": utc_text(*at_ms)}))
                .collect();
            line(
                format!("ran dry: {}", text.join(", ")),
                json!({"kind": "depletions", "accounts": accounts}),
            )
        }
        Command::StageBucketPart(part) => {
            if !in_bucket(part.bucket) {
                return None;
            }
            let end = part.offset + part.bytes.len() as u64;
            line(
                format!(
                    "stage bytes {}..{end} of {} of bucket {} (move {}) from {}",
                    part.offset, part.total, part.bucket, part.generation, part.from
                ),
                json!({"kind": "stage-bucket-part", "bucket": part.bucket,
                       "generation": part.generation, "from": part.from,
                       "offset": part.offset, "end": end, "total": part.total}),
            )
        }
        Command::ReceiveStagedBucket {
            from,
            bucket,
            generation,
            checksum,
        } if in_bucket(bucket) => line(
            format!(
                "receive bucket {bucket} (move {generation}) from {from}, staged in parts \
                 (checksum {checksum:08x})"
            ),
            json!({"kind": "receive-staged-bucket", "bucket": bucket, "generation": generation,
                   "from": from, "checksum": checksum}),
        ),
        // A bucket received in parts, not the account's.
        Command::ReceiveStagedBucket { .. } => None,
        _ if account.is_some() => None,
        Command::Call {
            module,
            version,
            procedure,
            bucket_id,
            timestamp_ms,
            ..
        } => {
            line(
                format!(
                "{}  {module}@{version} {procedure}{} (run by every member, as logs before the \
                 effects log held calls)",
                utc_text(timestamp_ms),
                bucket_id.map(|b| format!(" in bucket {b}")).unwrap_or_default()
            ),
                json!({"kind": "call", "module": module, "version": version,
                   "procedure": procedure, "bucket": bucket_id, "at": utc_text(timestamp_ms)}),
            )
        }
        Command::Batch(calls) => line(
            format!(
                "{} calls run by every member (an older log's batch)",
                calls.len()
            ),
            json!({"kind": "batch", "calls": calls.len()}),
        ),
        Command::Deploy { name, bytes } => line(
            format!("deploy a version of module {name} ({} bytes)", bytes.len()),
            json!({"kind": "deploy", "module": name, "bytes": bytes.len()}),
        ),
        Command::Activate { name, version } => line(
            format!("make version {version} of module {name} the active one"),
            json!({"kind": "activate", "module": name, "version": version}),
        ),
        Command::Digest => line(
            "digest of the state (`billcl verify`)".into(),
            json!({"kind": "digest"}),
        ),
        Command::AssignBuckets { bucket_ids } => {
            buckets_line("assign", "take {}", bucket_ids, None)
        }
        Command::PinBuckets { bucket_ids, pinned } => match pinned {
            true => buckets_line("pin", "pin {}", bucket_ids, None),
            false => buckets_line("unpin", "unpin {}", bucket_ids, None),
        },
        Command::SendBucketMoves { bucket_ids, to } | Command::SendBuckets { bucket_ids, to } => {
            buckets_line("send", "start sending {} to", bucket_ids, Some(to))
        }
        Command::DropSentBucketMoves { to, moves } => {
            buckets_line("drop-sent", DROPPED, of_moves(&moves), Some(to))
        }
        Command::DropSentBuckets { bucket_ids, to } => {
            buckets_line("drop-sent", DROPPED, bucket_ids, Some(to))
        }
        Command::CancelSendBucketMoves { to, moves } => {
            buckets_line("cancel-send", TAKEN_BACK, of_moves(&moves), Some(to))
        }
        Command::CancelSendBuckets { bucket_ids, to } => {
            buckets_line("cancel-send", TAKEN_BACK, bucket_ids, Some(to))
        }
    }
}

/// The most accounts a depletions entry names in `cat`'s text (the JSON has them all).
const DEPLETIONS_SHOWN_MAX: usize = 10;

/// The calls of an effects entry that the filters keep; the entry with none of them only
/// when nothing filters calls.
fn calls_shown(
    term: u64,
    effects: impl IntoIterator<Item = Effect>,
    args: &CatArgs,
) -> Option<Shown> {
    let calls: Vec<Effect> = effects
        .into_iter()
        .filter(|effect| args.keeps(effect))
        .collect();
    (!calls.is_empty() || !args.filters()).then_some(Shown::Calls { term, calls })
}

fn received(from: &str, ids: &[u64]) -> Option<Shown> {
    Some(Shown::Line(
        format!(
            "receive buckets {} ({}) from {from}, with their accounts",
            crate::cli::id_ranges(ids),
            ids.len()
        ),
        json!({"kind": "receive-buckets", "buckets": ids, "from": from}),
    ))
}

const DROPPED: &str = "drop {}, taken by";
const TAKEN_BACK: &str = "take back {}, refused by";

/// The buckets of (bucket, move generation) pairs.
fn of_moves(moves: &[(u32, u64)]) -> Vec<u32> {
    moves.iter().map(|(id, _)| *id).collect()
}

/// A bucket command's line: `what` with `{}` standing for the buckets, then the peer if any.
fn buckets_line(kind: &str, what: &str, ids: Vec<u32>, peer: Option<String>) -> Option<Shown> {
    let ids: Vec<u64> = ids.into_iter().map(u64::from).collect();
    let buckets = format!("buckets {} ({})", crate::cli::id_ranges(&ids), ids.len());
    let mut text = what.replace("{}", &buckets);
    let mut fields = json!({"kind": format!("{kind}-buckets"), "buckets": ids});
    if let Some(peer) = peer {
        text.push_str(&format!(" {peer}"));
        fields["peer"] = json!(peer);
    }
    Some(Shown::Line(text, fields))
}

fn node_list(nodes: &[u64]) -> String {
    if nodes.is_empty() {
        return "none".into();
    }
    nodes
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn writes_account(effect: &Effect, id: u64) -> bool {
    match &effect.outcome {
        Outcome::Ran { writes, .. } => writes.accounts.iter().any(|(written, _)| *written == id),
        Outcome::Repeat => false,
    }
}

fn write_entry(
    out: &mut dyn Write,
    logged: &LoggedEntry,
    shown: &Shown,
    account: Option<u64>,
) -> std::io::Result<()> {
    let head = format!("{:>8}  T{} N{}", logged.index, logged.term, logged.leader);
    match shown {
        Shown::Line(text, _) => writeln!(out, "{head}  {text}"),
        Shown::Calls { term, calls } => {
            let ran = if *term == logged.term {
                String::new()
            } else {
                format!(" (run by the leader of term {term}: refused, no effect)")
            };
            let count = match calls.len() {
                1 => "1 call".to_string(),
                n => format!("{n} calls"),
            };
            writeln!(out, "{head}  {count}{ran}")?;
            for call in calls {
                writeln!(out, "{:>8}  {}", "", call_text(call, account))?;
            }
            Ok(())
        }
    }
}

/// One call's line; with `account`, of the rows it wrote only that account's in full.
fn call_text(call: &Effect, account: Option<u64>) -> String {
    let mut text = utc_text(call.timestamp_ms);
    if let Some(record) = &call.call {
        text.push_str(&format!("  {}", record_text(record)));
    }
    if let Some(bucket) = call.bucket_id {
        text.push_str(&format!("  bucket {bucket}"));
    }
    if let Some(key) = call.idempotency_key {
        text.push_str(&format!("  key {key:032x}"));
    }
    match &call.outcome {
        Outcome::Repeat => text.push_str("  a retry: answered as its first call, no effect"),
        Outcome::Ran {
            answer,
            writes,
            logs,
        } => {
            match crate::storage::decode_response(answer) {
                Response::Value(value) => text.push_str(&format!("  -> {value}")),
                Response::Error(error) => text.push_str(&format!("  -> error {error}")),
                other => text.push_str(&format!("  -> {other:?}")),
            }
            let mut others = 0usize;
            for (id, row) in &writes.accounts {
                if account.is_none_or(|account| account == *id) {
                    text.push_str(&format!("  account {id}: {}", row_text(row)));
                } else {
                    others += 1;
                }
            }
            text.push_str(&counted(others, "other account"));
            text.push_str(&counted(writes.kv.len(), "kv write"));
            text.push_str(&counted(logs.len(), "log line"));
        }
    }
    text
}

/// `  2 log lines` (`  1 log line`; nothing for none).
fn counted(count: usize, what: &str) -> String {
    match count {
        0 => String::new(),
        1 => format!("  1 {what}"),
        n => format!("  {n} {what}s"),
    }
}

/// `billing@1 add-money(4, 1000) by billcl-cli`, as a call's line starts.
fn record_text(record: &CallRecord) -> String {
    let args = match record_args(record) {
        Ok(args) => args
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        Err(why) => format!("arguments unreadable: {why}"),
    };
    let mut text = format!(
        "{}@{} {}({args})",
        record.module, record.version, record.procedure
    );
    if !record.caller.is_empty() {
        text.push_str(&format!(" by {}", record.caller));
    }
    text
}

/// The arguments a logged call ran with, decoded.
fn record_args(record: &CallRecord) -> Result<Vec<Value>, String> {
    match Value::decode(&record.args) {
        Ok(Value::Tuple(args)) => Ok(args),
        Ok(other) => Err(format!("a {} where a tuple belongs", other.kind_name())),
        Err(why) => Err(why.to_string()),
    }
}

fn row_text(row: &AccountRow) -> String {
    format!(
        "balance {} velocity {} at {}",
        Decimal::from_micros(row.balance_micros),
        Decimal::from_micros(row.velocity_micros),
        utc_text(row.since_ms)
    )
}

fn entry_json(instance: &str, logged: &LoggedEntry, shown: &Shown) -> serde_json::Value {
    let mut object = json!({
        "instance": instance,
        "index": logged.index,
        "term": logged.term,
        "leader": logged.leader,
    });
    let fields = match shown {
        Shown::Line(_, fields) => fields.clone(),
        Shown::Calls { term, calls } => json!({
            "kind": "calls",
            "ran_in_term": term,
            "calls": calls.iter().map(call_json).collect::<Vec<_>>(),
        }),
    };
    if let (Some(object), serde_json::Value::Object(fields)) = (object.as_object_mut(), fields) {
        object.extend(fields);
    }
    object
}

fn call_json(call: &Effect) -> serde_json::Value {
    let mut object = json!({
        "at": utc_text(call.timestamp_ms),
        "at_ms": call.timestamp_ms,
        "bucket": call.bucket_id,
        "idempotency_key": call.idempotency_key.map(|key| format!("{key:032x}")),
    });
    if let Some(record) = &call.call {
        object["module"] = json!(record.module);
        object["version"] = json!(record.version);
        object["procedure"] = json!(record.procedure);
        object["args"] = match record_args(record) {
            Ok(args) => args.iter().map(crate::cli::value_json).collect(),
            Err(why) => json!({"unreadable": why}),
        };
        object["caller"] = json!(record.caller);
    }
    match &call.outcome {
        Outcome::Repeat => object["repeat"] = json!(true),
        Outcome::Ran {
            answer,
            writes,
            logs,
        } => {
            object["answer"] = match crate::storage::decode_response(answer) {
                Response::Value(value) => crate::cli::value_json(&value),
                Response::Error(error) => {
                    json!({"error": {"code": error.code.name(), "message": error.message}})
                }
                other => json!(format!("{other:?}")),
            };
            object["accounts"] = writes
                .accounts
                .iter()
                .map(|(id, row)| {
                    json!({
                        "id": id,
                        "balance": Decimal::from_micros(row.balance_micros).to_string(),
                        "velocity": Decimal::from_micros(row.velocity_micros).to_string(),
                        "at": utc_text(row.since_ms),
                    })
                })
                .collect();
            object["kv_writes"] = json!(writes.kv.len());
            object["log_lines"] = json!(logs.len());
        }
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BucketState, Writes};

    fn logged(command: Command) -> LoggedEntry {
        LoggedEntry {
            index: 7,
            term: 2,
            leader: 1,
            payload: LoggedPayload::Command(command.encode()),
        }
    }

    fn text(command: Command, account: Option<u64>) -> Option<String> {
        text_of(
            command,
            &CatArgs {
                account,
                ..CatArgs::default()
            },
        )
    }

    fn text_of(command: Command, args: &CatArgs) -> Option<String> {
        let entry = logged(command);
        let shown = describe(&entry, args)?;
        let mut out = Vec::new();
        write_entry(&mut out, &entry, &shown, args.account).unwrap();
        Some(String::from_utf8(out).unwrap())
    }

    fn row(balance_micros: i64) -> AccountRow {
        AccountRow {
            balance_micros,
            velocity_micros: 0,
            since_ms: 0,
            remainder: 0,
        }
    }

    fn call_writing(id: u64, balance_micros: i64) -> Effect {
        Effect {
            bucket_id: Some(3),
            idempotency_key: Some(0xabc),
            timestamp_ms: 1_700_000_000_000,
            call: Some(CallRecord {
                module: "billing".into(),
                version: 2,
                procedure: "add-money".into(),
                args: Value::Tuple(vec![
                    Value::Uint(id),
                    Value::Decimal(Decimal::from_micros(balance_micros)),
                ])
                .encode(),
                caller: "billcl-cli".into(),
            }),
            outcome: Outcome::Ran {
                answer: crate::storage::encode_response(&Response::Value(
                    billcl_proto::Value::Bool(true),
                )),
                writes: Writes {
                    accounts: vec![(id, row(balance_micros))],
                    kv: Vec::new(),
                },
                logs: Vec::new(),
            },
        }
    }

    #[test]
    fn bucket_moves_name_their_buckets_and_peer() {
        let send = Command::SendBucketMoves {
            bucket_ids: vec![1, 2, 3, 9],
            to: "storage-b".into(),
        };
        let printed = text(send, None).unwrap();
        assert!(
            printed.ends_with("T2 N1  start sending buckets 1-3, 9 (4) to storage-b\n"),
            "{printed}"
        );
        let dropped = Command::DropSentBucketMoves {
            to: "storage-b".into(),
            moves: vec![(5, 1), (6, 1)],
        };
        let printed = text(dropped, None).unwrap();
        assert!(
            printed.contains("drop buckets 5-6 (2), taken by storage-b"),
            "{printed}"
        );
        let pin = logged(Command::PinBuckets {
            bucket_ids: vec![4],
            pinned: true,
        });
        let json = entry_json("s", &pin, &describe(&pin, &CatArgs::default()).unwrap());
        assert_eq!(json["kind"], "pin-buckets");
        assert_eq!(json["buckets"], json!([4]));
    }

    #[test]
    fn an_account_filter_keeps_what_wrote_or_holds_that_account() {
        let effects = Command::Effects {
            term: 2,
            effects: vec![call_writing(4, 1_000_000), call_writing(5, 2_000_000)],
        };
        let printed = text(effects.clone(), Some(4)).unwrap();
        assert!(printed.contains("1 call\n"), "{printed}");
        assert!(
            printed.contains(
                "billing@2 add-money(4, 1) by billcl-cli  bucket 3  key \
                 00000000000000000000000000000abc  -> true  account 4: balance 1 velocity 0"
            ),
            "{printed}"
        );
        assert!(!printed.contains("account 5"), "{printed}");
        assert!(text(effects, Some(6)).is_none());

        let fill = Command::FillAccounts {
            first_id: 1,
            count: 10,
            balance_micros: 5_000_000,
            timestamp_ms: 0,
        };
        assert!(text(fill.clone(), Some(10))
            .unwrap()
            .contains("create accounts 1-10 (10)"));
        assert!(text(fill, Some(11)).is_none());

        let mut bucket = BucketData::new(BucketState::Receiving);
        bucket.accounts.insert(4, row(1));
        let received = Command::ReceiveBucketMoves {
            from: "storage-a".into(),
            buckets: vec![(3, 1, bucket)],
        };
        assert!(text(received.clone(), Some(4))
            .unwrap()
            .contains("receive buckets 3 (1) from storage-a"));
        assert!(text(received, Some(5)).is_none());
        // Entries that write no account are not an account's history.
        assert!(text(Command::Digest, Some(4)).is_none());
        assert!(text(Command::Digest, None)
            .unwrap()
            .contains("digest of the state"));
    }

    #[test]
    fn a_bucket_received_in_parts_is_in_the_history_of_its_accounts_only() {
        let in_bucket = |bucket: u32| {
            (1..)
                .find(|id| bucket_id(&Key::Uint(*id), 1000) == bucket)
                .unwrap()
        };
        let (mine, other) = (in_bucket(7), in_bucket(8));
        let of = |account| CatArgs {
            account: Some(account),
            bucket_count: 1000,
            ..CatArgs::default()
        };
        let part = Command::StageBucketPart(crate::state::BucketPart {
            from: "storage-a".into(),
            bucket: 7,
            generation: 2,
            total: 20,
            offset: 8,
            bytes: vec![0; 4],
        });
        let received = Command::ReceiveStagedBucket {
            from: "storage-a".into(),
            bucket: 7,
            generation: 2,
            checksum: 0xab,
        };
        let shown = text_of(part.clone(), &of(mine)).unwrap();
        assert!(
            shown.contains("stage bytes 8..12 of 20 of bucket 7 (move 2) from storage-a"),
            "{shown}"
        );
        assert!(text_of(received.clone(), &of(mine))
            .unwrap()
            .contains("receive bucket 7 (move 2) from storage-a, staged in parts"));
        assert!(text_of(part.clone(), &of(other)).is_none());
        assert!(text_of(received.clone(), &of(other)).is_none());
        assert!(text_of(part, &CatArgs::default()).is_some());
    }

    #[test]
    fn a_call_is_shown_with_its_procedure_and_arguments_and_an_older_entry_without() {
        let current = logged(Command::Effects {
            term: 2,
            effects: vec![call_writing(4, 1_500_000)],
        });
        let json = entry_json(
            "s",
            &current,
            &describe(&current, &CatArgs::default()).unwrap(),
        );
        let call = &json["calls"][0];
        assert_eq!(call["module"], "billing");
        assert_eq!(call["version"], 2);
        assert_eq!(call["procedure"], "add-money");
        assert_eq!(call["args"], json!([4, "1.5"]));
        assert_eq!(call["caller"], "billcl-cli");

        // An entry written before effects named their calls reads as one without.
        let older = Command::EffectsBeforeCalls {
            term: 2,
            effects: vec![call_writing(4, 1_500_000).into()],
        };
        let older = Command::decode(&older.encode()).unwrap();
        let printed = text(older, Some(4)).unwrap();
        assert!(
            printed.contains(".000Z  bucket 3  key 00000000000000000000000000000abc  -> true"),
            "{printed}"
        );
        assert!(!printed.contains("add-money"), "{printed}");
    }

    #[test]
    fn an_entry_naming_its_calls_takes_fewer_bytes_than_one_without_did() {
        let effects: Vec<Effect> = (1..=16)
            .map(|nth| Effect {
                idempotency_key: Some(u128::MAX / 3 - nth as u128),
                ..call_writing(nth * 7919, 1_000_000_000 + nth as i64)
            })
            .collect();
        let older = Command::EffectsBeforeCalls {
            term: 5,
            effects: effects.iter().cloned().map(Into::into).collect(),
        };
        let current = Command::Effects {
            term: 5,
            effects: effects.clone(),
        };
        let bytes = current.encode();
        assert!(
            bytes.len() < older.encode().len(),
            "{} bytes, {} before",
            bytes.len(),
            older.encode().len()
        );
        let Ok(Command::Effects {
            term,
            effects: read,
        }) = Command::decode(&bytes)
        else {
            panic!("an effects entry reads back");
        };
        assert_eq!(term, 5);
        assert_eq!(read.len(), 16);
        for (read, written) in read.iter().zip(&effects) {
            assert_eq!(read.call, written.call);
            assert_eq!(read.idempotency_key, written.idempotency_key);
            assert_eq!(read.timestamp_ms, written.timestamp_ms);
        }
        // A byte short, or one too many, is refused as damaged.
        assert!(Command::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Command::decode(&longer).unwrap_err().contains("damaged"));
    }

    #[test]
    fn a_procedure_filter_keeps_its_calls_and_an_account_filter_folds_other_rows() {
        let mut velocity = call_writing(6, 3_000_000);
        if let Some(call) = &mut velocity.call {
            call.procedure = "update-velocity".into();
        }
        let mut transfer = call_writing(4, 500_000);
        if let Outcome::Ran { writes, .. } = &mut transfer.outcome {
            writes.accounts.push((5, row(2_500_000)));
        }
        let effects = Command::Effects {
            term: 2,
            effects: vec![call_writing(4, 1_000_000), velocity, transfer],
        };
        let of = |procedure: &str| CatArgs {
            procedure: Some(procedure.replace('_', "-")),
            ..CatArgs::default()
        };
        let printed = text_of(effects.clone(), &of("add_money")).unwrap();
        assert!(printed.contains("2 calls\n"), "{printed}");
        assert!(!printed.contains("update-velocity"), "{printed}");
        let printed = text_of(effects.clone(), &of("update-velocity")).unwrap();
        assert!(
            printed.contains("1 call\n") && printed.contains("account 6"),
            "{printed}"
        );
        assert!(text_of(effects.clone(), &of("transfer")).is_none());
        // Only calls are a procedure's.
        assert!(text_of(Command::Digest, &of("add-money")).is_none());
        for payload in [
            LoggedPayload::Blank,
            LoggedPayload::Membership {
                voters: vec![1],
                learners: vec![2],
            },
        ] {
            let entry = LoggedEntry {
                payload,
                ..logged(Command::Digest)
            };
            assert!(describe(&entry, &of("add-money")).is_none());
            assert!(describe(&entry, &CatArgs::default()).is_some());
        }

        let printed = text(effects, Some(5)).unwrap();
        assert!(
            printed.contains("account 5: balance 2.5 velocity 0 at ")
                && printed.ends_with("  1 other account\n")
                && !printed.contains("account 4:"),
            "{printed}"
        );
    }

    #[test]
    fn calls_from_an_earlier_term_are_named_refused() {
        let effects = Command::Effects {
            term: 1,
            effects: vec![call_writing(4, 1)],
        };
        let printed = text(effects, None).unwrap();
        assert!(
            printed.contains("(run by the leader of term 1: refused, no effect)"),
            "{printed}"
        );
    }
}
