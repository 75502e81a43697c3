//! Custom procedure modules cluster-wide: deploy, activate (rollback), and the per-node
//! procedure log.
//!
//! It exists so that deploying a module is one operator action with one outcome on every
//! replicaset: the router sends a `Deploy` request to each replicaset's leader (refusing up
//! front if one has no reachable leader, so versions never diverge), each leader checks the
//! module against the WIT world with `Runtime::load` and against the procedure names other
//! modules export, and proposes a `Command::Deploy` to its log; every member then records the
//! same version at the same log index. Rollback is a `Command::Activate` through the log the
//! same way. The procedure log is a bounded ring per node with sequence numbers, so
//! `billcl logs --follow` can ask for what came after the last line it saw.

use std::collections::VecDeque;
use std::time::Duration;

use billcl_client::Peer;
use billcl_proto::message::{ErrorCode, ErrorReply, Request, Response};
use billcl_proto::{ProcedureKind, Value};
use billcl_runtime::{LogLevel, Module, MODULE_NAME_BYTES_MAX};
use serde_json::json;

use crate::router::{admin_request, Router};
use crate::state::Command;
use crate::storage::{error, parse_body, parse_optional_body, Shared, StorageNode};

/// How long a deploy may take on one replicaset: the leader compiles the module to check it,
/// and every member compiles it again when it applies the entry.
pub const DEPLOY_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts per replicaset when its leader moved between finding it and sending to it.
const DEPLOY_ATTEMPTS_MAX: usize = 3;
/// Most log lines one `logs` request returns per node.
pub const LOG_LINES_PER_REQUEST_MAX: usize = 1000;

pub(crate) use billcl_replication::off_the_async_workers;

/// Why a module name is not acceptable, if it is not: 1 to 64 bytes of `a-z`, `0-9`, `-`, `_`,
/// starting with a letter.
pub fn check_module_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MODULE_NAME_BYTES_MAX
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "module name `{name}` is not valid: use 1 to {MODULE_NAME_BYTES_MAX} characters \
             a-z, 0-9, '-' or '_', starting with a letter"
        ))
    }
}

/// The procedure names `module` exports that another module (`others`: name and module)
/// already exports, as a refusal reason.
pub fn export_conflict(name: &str, module: &Module, others: &[(String, Module)]) -> Option<String> {
    let clashes: Vec<String> = module
        .procedures()
        .iter()
        .filter_map(|info| {
            others
                .iter()
                .filter(|(other, _)| other != name)
                .find(|(_, other)| other.procedure(&info.name).is_some())
                .map(|(other, other_module)| {
                    format!(
                        "`{}` (exported by {other}@{})",
                        info.name,
                        other_module.version()
                    )
                })
        })
        .collect();
    (!clashes.is_empty()).then(|| {
        format!(
            "module {name} exports {}: procedure names are cluster-wide, rename them or \
             deploy under the other module's name",
            clashes.join(", ")
        )
    })
}

/// The refusal reason if `module`, deployed or activated as `name`, would export a
/// procedure that another active module exports. Deterministic: it reads only the state.
pub(crate) fn conflict_with_active(shared: &Shared, name: &str, module: &Module) -> Option<String> {
    let active: Vec<(String, u32)> = {
        let state = shared.state.read().unwrap();
        state
            .active
            .iter()
            .filter(|(other, _)| *other != name)
            .map(|(other, version)| (other.clone(), *version))
            .collect()
    };
    let others: Vec<(String, Module)> = active
        .into_iter()
        .filter_map(|(other, version)| {
            shared
                .module(&other, version)
                .ok()
                .map(|module| (other, module))
        })
        .collect();
    export_conflict(name, module, &others)
}

/// Applies `Command::Activate`: makes `version` of `name` the one calls run, if it exists and
/// exports nothing another active module exports.
pub(crate) fn apply_activate(shared: &Shared, name: &str, version: u32) -> Response {
    let module = match shared.module(name, version) {
        Ok(module) => module,
        Err(reply) => return Response::Error(reply),
    };
    if let Some(reason) = conflict_with_active(shared, name, &module) {
        return Response::Error(error(ErrorCode::InvalidArgument, reason));
    }
    match shared.state.write().unwrap().activate(name, version) {
        Ok(previous) => {
            tracing::info!(module = %name, version, previous, "module version activated");
            Response::Value(Value::Record(vec![
                ("module".to_string(), Value::String(name.to_string())),
                ("version".to_string(), Value::Uint(u64::from(version))),
                ("previous".to_string(), Value::Uint(u64::from(previous))),
            ]))
        }
        Err(message) => Response::Error(error(ErrorCode::NotFound, message)),
    }
}

fn procedures_json(module: &Module) -> Vec<serde_json::Value> {
    module
        .procedures()
        .iter()
        .map(|info| {
            json!({
                "name": info.name,
                "kind": match info.kind {
                    ProcedureKind::Query => "query",
                    ProcedureKind::Command => "command",
                },
                "signature": info.signature(),
            })
        })
        .collect()
}

/// A storage leader's part of a deploy: check the module, then propose it to the log.
pub(crate) async fn storage_deploy(
    node: &StorageNode,
    name: Option<String>,
    bytes: Vec<u8>,
) -> Result<serde_json::Value, ErrorReply> {
    let shared = &node.shared;
    if let Some(name) = &name {
        check_module_name(name).map_err(|message| error(ErrorCode::InvalidArgument, message))?;
    }
    let runtime = shared.runtime().clone();
    let provisional = name.clone().unwrap_or_else(|| "(unnamed)".to_string());
    let checked_bytes = bytes.clone();
    // Compiling is CPU work: keep it off the async threads.
    let loaded = tokio::task::spawn_blocking(move || runtime.load(&provisional, 0, &checked_bytes))
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("module check failed: {e}")))?;
    let module = loaded.map_err(|e| {
        error(
            ErrorCode::InvalidArgument,
            format!("module refused by {}: {e}", shared.replicaset),
        )
    })?;
    let name = match name {
        Some(name) => name,
        None => {
            let package = module.package_name().ok_or_else(|| {
                error(
                    ErrorCode::InvalidArgument,
                    "the module exports its interfaces without a package name: give it one \
                     with `billcl deploy --name NAME`",
                )
            })?;
            let name = package.to_string();
            check_module_name(&name).map_err(|message| {
                error(
                    ErrorCode::InvalidArgument,
                    format!("{message} (taken from the package name; pass --name)"),
                )
            })?;
            name
        }
    };
    if let Some(reason) = conflict_with_active(shared, &name, &module) {
        return Err(error(ErrorCode::InvalidArgument, reason));
    }
    let command = Command::Deploy {
        name: name.clone(),
        bytes,
    };
    match node.propose(command).await? {
        Response::Value(Value::Record(fields)) => {
            let version = fields
                .iter()
                .find(|(field, _)| field == "version")
                .and_then(|(_, value)| match value {
                    Value::Uint(version) => Some(*version),
                    _ => None,
                })
                .unwrap_or(0);
            Ok(json!({
                "replicaset": shared.replicaset,
                "instance": shared.instance,
                "module": name,
                "version": version,
                "procedures": procedures_json(&module),
            }))
        }
        Response::Error(reply) => Err(reply),
        other => Err(error(
            ErrorCode::Internal,
            format!("unexpected answer to a deploy: {other:?}"),
        )),
    }
}

/// Storage admin verbs of this module: `activate` and `logs`. `None` for other verbs.
pub(crate) async fn storage_admin(
    node: &StorageNode,
    verb: &str,
    body: &str,
) -> Option<Result<serde_json::Value, ErrorReply>> {
    match verb {
        "activate" => Some(storage_activate(node, body).await),
        "logs" => Some(storage_logs(&node.shared, body)),
        _ => None,
    }
}

async fn storage_activate(node: &StorageNode, body: &str) -> Result<serde_json::Value, ErrorReply> {
    let request = parse_body(body)?;
    let name = request["module"]
        .as_str()
        .ok_or_else(|| error(ErrorCode::BadRequest, "activate needs {\"module\": NAME}"))?
        .to_string();
    let version = {
        let state = node.shared.state.read().unwrap();
        let versions = state.modules.get(&name).ok_or_else(|| {
            error(
                ErrorCode::NotFound,
                format!(
                    "no module {name} on {}; `billcl procedures` lists the deployed ones",
                    node.shared.replicaset
                ),
            )
        })?;
        match request["version"].as_u64() {
            Some(version) => u32::try_from(version)
                .map_err(|_| error(ErrorCode::InvalidArgument, "version out of range"))?,
            None => {
                let active = state.active.get(&name).copied().unwrap_or(0);
                versions
                    .iter()
                    .rev()
                    .map(|module| module.version)
                    .find(|version| *version < active)
                    .ok_or_else(|| {
                        error(
                            ErrorCode::NotFound,
                            format!(
                                "module {name} has no version before the active {name}@{active} \
                                 to roll back to"
                            ),
                        )
                    })?
            }
        }
    };
    let command = Command::Activate {
        name: name.clone(),
        version,
    };
    match node.propose(command).await? {
        Response::Value(Value::Record(fields)) => {
            let field = |wanted: &str| {
                fields.iter().find(|(field, _)| field == wanted).and_then(
                    |(_, value)| match value {
                        Value::Uint(value) => Some(*value),
                        _ => None,
                    },
                )
            };
            Ok(json!({
                "replicaset": node.shared.replicaset,
                "module": name,
                "version": field("version"),
                "previous": field("previous"),
            }))
        }
        Response::Error(reply) => Err(reply),
        other => Err(error(
            ErrorCode::Internal,
            format!("unexpected answer to activate: {other:?}"),
        )),
    }
}

fn storage_logs(shared: &Shared, body: &str) -> Result<serde_json::Value, ErrorReply> {
    let request = parse_optional_body(body)?;
    let since = request["since"].as_u64().unwrap_or(0);
    let procedure = request["procedure"]
        .as_str()
        .map(|name| name.replace('_', "-"));
    let limit = request["limit"]
        .as_u64()
        .map_or(LOG_LINES_PER_REQUEST_MAX, |limit| {
            (limit as usize).min(LOG_LINES_PER_REQUEST_MAX)
        });
    let log = shared.procedure_log.lock().unwrap();
    let (lines, next) = log.read(since, procedure.as_deref(), limit);
    Ok(json!({
        "instance": shared.instance,
        "replicaset": shared.replicaset,
        "lines": lines.iter().map(|line| line.text()).collect::<Vec<_>>(),
        "entries": lines.iter().map(|line| line.json()).collect::<Vec<_>>(),
        "next": next,
    }))
}

/// One line a procedure logged.
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    /// Position in this node's log: 1, 2, … since the node started.
    pub seq: u64,
    /// This node's clock when the line was written (Unix ms).
    pub at_ms: i64,
    pub module: String,
    pub procedure: String,
    pub level: LogLevel,
    pub message: String,
}

/// Unix milliseconds as UTC ISO 8601 (`2023-11-14T22:13:20.000Z`), proleptic Gregorian.
pub fn utc_text(at_ms: i64) -> String {
    let (days, ms_of_day) = (at_ms.div_euclid(86_400_000), at_ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

impl LogLine {
    /// `2023-11-14T22:13:20.000Z transfer/transfer info: moved 5 from 1 to 2`.
    pub fn text(&self) -> String {
        format!(
            "{} {}/{} {}: {}",
            utc_text(self.at_ms),
            self.module,
            self.procedure,
            level_name(self.level),
            self.message
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "seq": self.seq,
            "at_ms": self.at_ms,
            "module": self.module,
            "procedure": self.procedure,
            "level": level_name(self.level),
            "message": self.message,
        })
    }
}

/// A node's procedure log: the last `capacity` lines, numbered from 1.
///
/// Invariants: `lines` holds at most `capacity` lines with consecutive `seq` numbers ending at
/// `next_seq - 1`.
#[derive(Debug)]
pub struct ProcedureLog {
    lines: VecDeque<LogLine>,
    next_seq: u64,
    capacity: usize,
}

impl ProcedureLog {
    pub fn new(capacity: usize) -> ProcedureLog {
        assert!(capacity > 0, "a procedure log holds at least one line");
        ProcedureLog {
            lines: VecDeque::new(),
            next_seq: 1,
            capacity,
        }
    }

    pub fn push(
        &mut self,
        at_ms: i64,
        module: &str,
        procedure: &str,
        level: LogLevel,
        message: &str,
    ) {
        if self.lines.len() == self.capacity {
            self.lines.pop_front();
        }
        self.lines.push_back(LogLine {
            seq: self.next_seq,
            at_ms,
            module: module.to_string(),
            procedure: procedure.to_string(),
            level,
            message: message.to_string(),
        });
        self.next_seq += 1;
        debug_assert!(self.lines.len() <= self.capacity);
    }

    /// Up to `limit` lines with `seq >= since`, of `procedure` (a procedure or module name)
    /// if given, oldest first; and the `since` to ask with next time.
    pub fn read(&self, since: u64, procedure: Option<&str>, limit: usize) -> (Vec<&LogLine>, u64) {
        let mut next = since.max(self.lines.front().map_or(self.next_seq, |line| line.seq));
        let mut out = Vec::new();
        for line in self.lines.iter().filter(|line| line.seq >= since) {
            if out.len() == limit {
                break;
            }
            next = line.seq + 1;
            let wanted = procedure.is_none_or(|name| line.procedure == name || line.module == name);
            if wanted {
                out.push(line);
            }
        }
        if out.len() < limit {
            next = next.max(self.next_seq);
        }
        (out, next)
    }
}

/// The router's side of `Request::Deploy`: the same module to every replicaset's leader.
pub(crate) async fn router_deploy(
    router: &Router,
    name: Option<String>,
    bytes: Vec<u8>,
) -> Result<serde_json::Value, ErrorReply> {
    if let Some(name) = &name {
        check_module_name(name).map_err(|message| error(ErrorCode::InvalidArgument, message))?;
    }
    let leaders = router.leaders().await?;
    let request = Request::Deploy { name, bytes };
    let mut deployed: Vec<serde_json::Value> = Vec::new();
    for (replicaset, mut leader, mut peer) in leaders {
        let mut outcome = Err(error(ErrorCode::Unavailable, "no attempt"));
        for attempt in 0..DEPLOY_ATTEMPTS_MAX {
            if attempt > 0 {
                match router.leader_of(&replicaset).await {
                    Some((name, found)) => (leader, peer) = (name, found),
                    None => break,
                }
            }
            outcome = match peer.request_with_timeout(&request, DEPLOY_TIMEOUT).await {
                Ok(Response::Admin(text)) => serde_json::from_str(&text).map_err(|e| {
                    error(ErrorCode::Internal, format!("bad JSON from {leader}: {e}"))
                }),
                Ok(Response::Error(reply)) => Err(reply),
                Ok(other) => Err(error(
                    ErrorCode::Internal,
                    format!("{leader} answered a deploy with {other:?}"),
                )),
                Err(billcl_client::Error::Connect { .. }) => Err(error(
                    ErrorCode::Unavailable,
                    format!("cannot reach {leader}, the leader of {replicaset}"),
                )),
                Err(e) => Err(error(
                    ErrorCode::Timeout,
                    format!(
                        "no answer from {leader}: {e}; the module may or may not be deployed there"
                    ),
                )),
            };
            match &outcome {
                Err(reply)
                    if matches!(reply.code, ErrorCode::NotLeader | ErrorCode::Unavailable) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => break,
            }
        }
        match outcome {
            Ok(answer) => deployed.push(answer),
            Err(reply) if deployed.is_empty() => return Err(reply),
            Err(reply) => {
                let done: Vec<String> = deployed
                    .iter()
                    .map(|d| format!("{} ({}@{})", d["replicaset"], d["module"], d["version"]))
                    .collect();
                return Err(error(
                    reply.code,
                    format!(
                        "{replicaset} did not take the module: {}; already deployed on {}: \
                         deploy again once {replicaset} is healthy, or roll those back",
                        reply.message,
                        done.join(", ")
                    ),
                ));
            }
        }
    }
    router.forget_catalog();
    let first = deployed.first().cloned().unwrap_or_default();
    let same_version = deployed.iter().all(|d| d["version"] == first["version"]);
    Ok(json!({
        "module": first["module"],
        "version": if same_version { first["version"].clone() } else { serde_json::Value::Null },
        "replicasets": deployed,
        "procedures": first["procedures"],
    }))
}

/// Router admin verbs of this module: `activate` (to every replicaset leader) and `logs`
/// (from every storage, or one). `None` for other verbs.
pub(crate) async fn router_admin(
    router: &Router,
    verb: &str,
    body: &str,
) -> Option<Result<serde_json::Value, ErrorReply>> {
    match verb {
        "activate" => Some(router_activate(router, body).await),
        "logs" => Some(router_logs(router, body).await),
        _ => None,
    }
}

async fn router_activate(router: &Router, body: &str) -> Result<serde_json::Value, ErrorReply> {
    let leaders = router.leaders().await?;
    let mut activated: Vec<serde_json::Value> = Vec::new();
    for (replicaset, leader, peer) in leaders {
        match admin_request(&peer, "activate", body).await {
            Ok(answer) => activated.push(answer),
            Err(reply) if activated.is_empty() => {
                return Err(error(
                    reply.code,
                    format!("{replicaset} ({leader}): {}", reply.message),
                ))
            }
            Err(reply) => {
                return Err(error(
                    reply.code,
                    format!(
                        "{replicaset} ({leader}) did not switch: {}; other replicasets did: {}",
                        reply.message,
                        serde_json::Value::Array(activated)
                    ),
                ))
            }
        }
    }
    router.forget_catalog();
    let first = activated.first().cloned().unwrap_or_default();
    let same_version = activated.iter().all(|a| a["version"] == first["version"]);
    Ok(json!({
        "module": first["module"],
        "version": if same_version { first["version"].clone() } else { serde_json::Value::Null },
        "replicasets": activated,
    }))
}

async fn router_logs(router: &Router, body: &str) -> Result<serde_json::Value, ErrorReply> {
    let request = parse_optional_body(body)?;
    let wanted = request["instance"].as_str();
    let storages: Vec<(String, String, Peer)> = router
        .storages()
        .into_iter()
        .filter(|(_, instance, _)| wanted.is_none_or(|wanted| wanted == instance))
        .collect();
    if storages.is_empty() {
        return Err(error(
            ErrorCode::NotFound,
            format!("no storage instance {}", wanted.unwrap_or("")),
        ));
    }
    let mut asks = tokio::task::JoinSet::new();
    for (index, (_, instance, peer)) in storages.iter().enumerate() {
        let body = json!({
            "procedure": request["procedure"],
            "since": request["since"][instance.as_str()].as_u64().unwrap_or(0),
            "limit": request["limit"],
        })
        .to_string();
        let peer = peer.clone();
        asks.spawn(async move { (index, admin_request(&peer, "logs", &body).await) });
    }
    let mut answers: Vec<Option<Result<serde_json::Value, ErrorReply>>> =
        (0..storages.len()).map(|_| None).collect();
    while let Some(joined) = asks.join_next().await {
        if let Ok((index, answer)) = joined {
            answers[index] = Some(answer);
        }
    }
    let instances: Vec<serde_json::Value> = storages
        .iter()
        .zip(answers)
        .map(|((replicaset, instance, _), answer)| match answer {
            Some(Ok(answer)) => answer,
            Some(Err(reply)) => json!({
                "instance": instance, "replicaset": replicaset, "error": reply.message,
            }),
            None => json!({
                "instance": instance, "replicaset": replicaset, "error": "no answer",
            }),
        })
        .collect();
    Ok(json!({ "instances": instances }))
}

/// `billcl deploy PATH [--name NAME]`: prints the version every replicaset assigned.
pub(crate) async fn cli_deploy(
    config: &crate::config::ClusterConfig,
    client: &billcl_client::Client,
    path: &std::path::Path,
    name: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read the module {}: {e}", path.display()))?;
    let max = config.limits.module_bytes_max;
    if bytes.len() > max {
        anyhow::bail!(
            "{} is {} bytes; the cluster accepts modules up to {max} bytes \
             ([limits] module_bytes_max in cluster.toml)",
            path.display(),
            bytes.len()
        );
    }
    let answer: serde_json::Value = serde_json::from_str(&client.deploy(name, bytes).await?)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let module = answer["module"].as_str().unwrap_or("?");
    let replicasets: Vec<&serde_json::Value> = answer["replicasets"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let names: Vec<&str> = replicasets
        .iter()
        .filter_map(|r| r["replicaset"].as_str())
        .collect();
    if answer["version"].is_null() {
        println!("deployed {module} with different versions per replicaset (run `billcl rollback {module} VERSION` to align them):");
        for replicaset in &replicasets {
            println!(
                "  {}: {module}@{}",
                replicaset["replicaset"].as_str().unwrap_or("?"),
                replicaset["version"]
            );
        }
    } else {
        println!(
            "deployed {module}@{} on {}",
            answer["version"],
            names.join(", ")
        );
    }
    for procedure in answer["procedures"].as_array().into_iter().flatten() {
        println!(
            "  {:<8} {}",
            procedure["kind"].as_str().unwrap_or("?"),
            procedure["signature"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// `billcl rollback MODULE [VERSION]`.
pub(crate) async fn cli_rollback(
    client: &billcl_client::Client,
    module: &str,
    version: Option<u32>,
    as_json: bool,
) -> anyhow::Result<()> {
    let body = json!({ "module": module, "version": version }).to_string();
    let answer: serde_json::Value = serde_json::from_str(&client.admin("activate", &body).await?)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    for replicaset in answer["replicasets"].as_array().into_iter().flatten() {
        println!(
            "{}: {module}@{} active (was @{})",
            replicaset["replicaset"].as_str().unwrap_or("?"),
            replicaset["version"],
            replicaset["previous"]
        );
    }
    Ok(())
}

/// How often `billcl logs --follow` asks for new lines.
const LOGS_FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// `billcl logs [--follow] [--procedure NAME] [INSTANCE]`.
pub(crate) async fn cli_logs(
    client: &billcl_client::Client,
    instance: Option<&str>,
    procedure: Option<&str>,
    follow: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut since = serde_json::Map::new();
    loop {
        let body = json!({
            "instance": instance,
            "procedure": procedure,
            "since": since,
        })
        .to_string();
        let answer: serde_json::Value = serde_json::from_str(&client.admin("logs", &body).await?)?;
        if as_json && !follow {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(());
        }
        for node in answer["instances"].as_array().into_iter().flatten() {
            let name = node["instance"].as_str().unwrap_or("?");
            if let Some(message) = node["error"].as_str() {
                if !follow {
                    eprintln!("{name}: {message}");
                }
                continue;
            }
            if as_json {
                for entry in node["entries"].as_array().into_iter().flatten() {
                    let mut entry = entry.clone();
                    entry["instance"] = json!(name);
                    println!("{entry}");
                }
            } else {
                for line in node["lines"].as_array().into_iter().flatten() {
                    println!("{name} | {}", line.as_str().unwrap_or(""));
                }
            }
            since.insert(name.to_string(), node["next"].clone());
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(LOGS_FOLLOW_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_checked() {
        assert!(check_module_name("transfer").is_ok());
        assert!(check_module_name("tariff-2_b").is_ok());
        for bad in ["", "Transfer", "1st", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_module_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_procedure_log_is_bounded_and_read_by_cursor() {
        let mut log = ProcedureLog::new(3);
        for i in 0..5 {
            let procedure = if i % 2 == 0 { "transfer" } else { "charge" };
            log.push(i, "m", procedure, LogLevel::Info, &format!("line {i}"));
        }
        // Lines 1 and 2 fell out of the ring.
        let (lines, next) = log.read(0, None, 10);
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(next, 6);
        let (lines, next) = log.read(6, None, 10);
        assert!(lines.is_empty());
        assert_eq!(next, 6);
        let (lines, _) = log.read(0, Some("transfer"), 10);
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [3, 5]);
        let (lines, _) = log.read(0, Some("m"), 10);
        assert_eq!(lines.len(), 3);
        let (lines, next) = log.read(0, None, 2);
        assert_eq!(lines.len(), 2);
        assert_eq!(next, 5);
        let (lines, next) = log.read(next, None, 2);
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [5]);
        assert_eq!(next, 6);
        assert_eq!(
            lines[0].text(),
            "1970-01-01T00:00:00.004Z m/transfer info: line 4"
        );
    }

    #[test]
    fn log_times_are_utc() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_text(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_text(-1), "1969-12-31T23:59:59.999Z");
    }
}
