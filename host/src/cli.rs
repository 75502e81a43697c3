//! The `billcl` command line: process management (`start`, `stop`, `status`,
//! `restart`), cluster verbs through the router (`bootstrap`, `info`, `route`,
//! `call`, `procedures`, `connect`) and `run`, which is an instance process itself.
//! Every reporting verb takes `--json`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use billcl_client::{CallOptions, Client, ClientConfig};
use billcl_proto::message::{ProcedureInfo, ReadMode};
use billcl_proto::{find_procedure, split_pinned, ProcedureKind, Value};
use clap::{Parser, Subcommand};

use crate::config::ClusterConfig;
use crate::{process, tls};

#[derive(Parser, Debug)]
#[command(
    name = "billcl",
    version,
    about = "billcl: a sharded, replicated billing store"
)]
struct Cli {
    /// The cluster file (default: $BILLCL_CONFIG, else cluster.toml here or in a parent).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The router a client verb goes through (a [routers.NAME] of the cluster file; default:
    /// the first one that answers).
    #[arg(long, global = true, value_name = "NAME")]
    router: Option<String>,
    #[command(subcommand)]
    command: Verb,
}

/// The buckets `pin` and `unpin` change: by id, or as the buckets of keys.
#[derive(clap::Args, Debug)]
struct MoveArgs {
    /// Bucket ids.
    buckets: Vec<u32>,
    /// A sharding key whose bucket moves (repeat for more).
    #[arg(long = "key", value_name = "KEY")]
    keys: Vec<String>,
    /// The replicaset the buckets go to.
    #[arg(long, value_name = "REPLICASET")]
    to: String,
    /// Pin them there, so that the rebalancer does not move them back.
    #[arg(long)]
    pin: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct PinArgs {
    /// Bucket ids (1..=bucket_count).
    buckets: Vec<u32>,
    /// A key whose bucket to change (an integer or a string; repeat for more).
    #[arg(long = "key", value_name = "KEY")]
    keys: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Start the cluster's instances (all, or those named) in the background.
    Start { instances: Vec<String> },
    /// Stop the cluster's instances (all, or those named).
    Stop { instances: Vec<String> },
    /// Stop, then start (all, or those named). `--rolling`: every running instance one at a
    /// time, leadership handed over around each leader, while calls go on (an upgrade).
    Restart {
        instances: Vec<String>,
        /// One instance at a time while calls go on (an upgrade with no downtime): in each
        /// replicaset the other members, then leadership handed to one of them, the old leader
        /// restarted and leadership handed back; then the routers
        #[arg(long, conflicts_with = "instances")]
        rolling: bool,
        #[arg(long, requires = "rolling")]
        json: bool,
    },
    /// Show the instances' own log files, the last lines of each (tt log): all, or those
    /// named; `--follow` prints new lines as they come, across rotations. (`billcl logs` shows
    /// what procedures logged.)
    Log {
        instances: Vec<String>,
        /// How many of the last lines of each file.
        #[arg(long, short = 'n', default_value_t = 10)]
        lines: usize,
        /// Keep printing new lines as they come (until interrupted).
        #[arg(long, short)]
        follow: bool,
    },
    /// Begin the instances' log files anew without a restart (tt logrotate): each `NAME.log`
    /// is renamed to `NAME.log.YYYYMMDDTHHMMSSZ` beside it, and a running instance opens a new
    /// one (signalled with SIGUSR1). All, or those named.
    Logrotate { instances: Vec<String> },
    /// Show each instance: running or not, pid, address, role.
    Status {
        instances: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Spread the buckets over the replicasets by weight (once, on a new cluster).
    Bootstrap {
        #[arg(long)]
        json: bool,
    },
    /// Make the running routers read the cluster file again (vshard's `router.cfg()` with the
    /// new config): replicasets and replicas added to it are routed to, members expelled are
    /// not, weights changed are rebalanced to, members at a new address are reached there
    /// (the storages relink to them too), with no restart. What a router cannot take (a
    /// replicaset removed, a member moved to another replicaset or renumbered, a bucket count
    /// changed) is refused, changing nothing. Every router (and storage), or the routers named.
    Reload {
        routers: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Move buckets between replicasets until each holds its weight's share (after adding a
    /// replicaset or changing a weight); finishes a move cut short. Calls keep working.
    Rebalance {
        /// Show what would move, move nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Pin buckets where they are: the rebalancer never moves them (vshard's `bucket_pin`).
    /// `billcl pin 17 42`, or by key: `billcl pin --key 4 --key alice`.
    Pin(PinArgs),
    /// Unpin buckets: the rebalancer may move them again.
    Unpin(PinArgs),
    /// Move buckets to a replicaset by hand (vshard's `bucket_send`), while calls go on:
    /// `billcl move --key 4 --to storage-b --pin`. Without --pin the rebalancer may move
    /// buckets again to restore the weights' shares.
    Move(MoveArgs),
    /// Which buckets each replicaset holds, by state (vshard's `buckets_info`):
    /// `storage-a: active 1-41, 43-500 (499); pinned 42 (1)`.
    Buckets {
        /// Only buckets in this state (active, pinned, sending).
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Replicasets, leaders and replicas, buckets by state, totals and alerts.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// The bucket of a key and the replicaset that owns it.
    Route {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Call a procedure through the router: `billcl call add_money 4 1000`.
    /// `NAME@VERSION` pins a module version (arguments follow that version's signature).
    Call {
        procedure: String,
        /// Arguments, parsed against the procedure's signature.
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
        /// Read from a replica (vshard callro); fails if none is reachable.
        #[arg(long, conflicts_with_all = ["prefer_replica", "balance"])]
        replica: bool,
        /// Read from a replica if one is reachable, else the leader (callre).
        #[arg(long, conflicts_with = "balance")]
        prefer_replica: bool,
        /// Spread reads over all members (callbro).
        #[arg(long)]
        balance: bool,
        #[arg(long)]
        json: bool,
    },
    /// List every callable procedure with its signature, module and version, and the other
    /// deployed versions a pinned call (`NAME@VERSION`) reaches.
    Procedures {
        #[arg(long)]
        json: bool,
    },
    /// An interactive console (tt connect): type `get 4`, `add_money 4 1000`, `info`, a verb
    /// such as `route 4` or `stats`, `help`, `\q`.
    Connect,
    /// Install or upgrade a procedure module on every replicaset; prints the version assigned.
    Deploy {
        /// The module: a wasm component, a core module built with wit-bindgen, or component WAT.
        path: PathBuf,
        /// The module name (default: the package its interfaces are exported from).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make an earlier (or any deployed) version of a module the active one, everywhere.
    Rollback {
        module: String,
        /// The version to activate (default: the one before the active version).
        version: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Show what procedures logged, per storage instance (all, or INSTANCE).
    Logs {
        instance: Option<String>,
        /// Keep printing new lines as they come.
        #[arg(long, short)]
        follow: bool,
        /// Only lines of this procedure (or module).
        #[arg(long)]
        procedure: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The accounts that ran dry (their balance drained to zero), with the moment each did,
    /// as every replicaset recorded them through its log (expirationd's role in the Tarantool
    /// cluster); `--follow` prints each new one as it is recorded
    Depletions {
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print storage instances' Raft logs from their data directories (those named, or the
    /// first member of each replicaset), entry by entry (Tarantool's `tt cat`): the calls each
    /// leader ran, with their time, bucket, idempotency key, answer and the accounts they
    /// wrote; deploys, bucket moves, membership. Reads the files only: on a stopped instance or
    /// beside a running one. `billcl cat storage-a-001 --account 4` is that account's history.
    Cat {
        instances: Vec<String>,
        /// Only entries from this log index on.
        #[arg(long)]
        from: Option<u64>,
        /// Only entries up to this log index.
        #[arg(long)]
        to: Option<u64>,
        /// Only the calls that wrote this account (and the bulk creations and bucket moves
        /// that hold it).
        #[arg(long)]
        account: Option<u64>,
        /// Only the calls of this procedure (`add_money` or `add-money`).
        #[arg(long)]
        procedure: Option<String>,
        /// One JSON object per entry and line.
        #[arg(long)]
        json: bool,
    },
    /// Compare a digest of every member's state at one log index, per replicaset.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Build a snapshot of each storage instance's state now and purge its log behind it
    /// (Tarantool's `box.snapshot()`), one instance after the other (all, or those named):
    /// a shorter restart (`billcl backup` copies them).
    Snapshot {
        instances: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Copy the whole cluster's data, while it runs, into a new directory: each replicaset's
    /// leader snapshots now and its snapshot is copied and verified (Tarantool's
    /// `box.backup.start()`)
    Backup {
        dir: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Put a backup back, with the cluster stopped: every storage member's data directory is
    /// moved aside and made anew from its replicaset's snapshot in the backup; writes made
    /// after the backup are not in it. Then `billcl start`
    Restore {
        dir: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Move a replicaset's leadership to another member (graceful, no lost write), or with
    /// --force promote a learner when the voters are gone (loses what it had not received).
    Failover {
        replicaset: String,
        /// The member to lead (default: the most caught-up voter, else learner).
        #[arg(long)]
        to: Option<String>,
        /// No leader is reachable: make --to the only voter by rewriting its Raft state.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Which members of a replicaset vote (elect its leader and make its quorum), changed
    /// while it runs: `billcl voters storage-a --add storage-a-002 --add storage-a-003`, and
    /// three voters elect a new leader by themselves when one is lost. A member made a voter
    /// must have joined (a learner) and gets the leader's log first; the leader is not made a
    /// learner (`billcl failover` first). The cluster file is rewritten to match. Without
    /// --add/--remove: the voters and learners of every replicaset, or of the one named.
    Voters {
        replicaset: Option<String>,
        /// A learner to make a voter (repeat for more).
        #[arg(long, value_name = "MEMBER")]
        add: Vec<String>,
        /// A voter to make a learner (repeat for more).
        #[arg(long, value_name = "MEMBER")]
        remove: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Take members out of their replicaset for good (tt's `replicaset expel`): out of its
    /// Raft membership (through the leader; a voter through joint consensus), stopped if it
    /// runs on this machine, its section removed from the cluster file (the others keep their
    /// node ids), and the routers reload. A dead member is expelled the same way. The leader
    /// is not (`billcl failover` first). Its data directory here is moved aside
    /// (NAME.expelled-…), so the name can be used again.
    Expel {
        #[arg(required = true)]
        instances: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// What each instance has served since it started and at what rate now (Tarantool's
    /// `box.stat()`): calls and errors by code, answer latency, requests by kind, connections;
    /// on storages the Raft indexes, the log's group commits and fsyncs, accounts and memory.
    /// Every instance, or those named; `--prometheus` prints Prometheus' text format.
    Stats {
        instances: Vec<String>,
        /// Seconds between the two readings the rates come from (0: totals only).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// The totals in Prometheus' text format (for node_exporter's textfile collector).
        #[arg(long)]
        prometheus: bool,
    },
    /// Load-test the cluster through the router: throughput, latency percentiles, errors, and
    /// the CPU each call cost the local instances and the bench (with the machine's busy and
    /// stolen time). `billcl bench add_money --accounts 100000 --concurrency 64 --duration 20`.
    Bench(crate::bench::BenchArgs),
    /// Run one instance in the foreground (what `start` launches).
    #[command(hide = true)]
    Run { instance: String },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Verb::Run { .. }) {
        // A tool whose reader went away (`billcl cat | head`) ends quietly, as other command
        // line tools do, instead of panicking on its next line. (An instance keeps Rust's
        // default: its log lines to a closed pipe are dropped, and it serves on.)
        // SAFETY: restores a signal's default disposition before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    let path = ClusterConfig::locate(cli.config.as_deref())?;
    let mut config = ClusterConfig::load(&path)?;
    // The verbs that manage this machine's instance processes rather than talk to the cluster.
    let manages_processes = matches!(
        cli.command,
        Verb::Start { .. }
            | Verb::Stop { .. }
            | Verb::Restart { .. }
            | Verb::Status { .. }
            | Verb::Log { .. }
            | Verb::Logrotate { .. }
            | Verb::Run { .. }
    );
    if let Some(router) = &cli.router {
        if manages_processes {
            bail!(
                "--router picks the router a client verb (call, deploy, info, …) goes \
                 through; to manage the router process, name it: `billcl stop {router}`"
            );
        }
        only_router(&mut config, router)?;
    }
    // A paused process (kill -STOP, Ctrl-Z, a debugger) is "unreachable" to the cluster yet
    // "already running" to `start`: a client verb that fails while one is paused here says so
    // (the process verbs say it themselves).
    let result = run_verb(&config, cli.command);
    if manages_processes {
        return result;
    }
    result.map_err(|e| {
        let paused = process::paused_instances(&config);
        if paused.is_empty() {
            return e;
        }
        let notes: Vec<String> = paused
            .iter()
            .map(|(name, pid)| format!("note: {}", process::paused_advice(name, *pid)))
            .collect();
        anyhow!("{e:#}\n{}", notes.join("\n"))
    })
}

fn run_verb(config: &ClusterConfig, command: Verb) -> Result<()> {
    let config = config.clone();
    match command {
        Verb::Start { instances } => process::start(&config, &instances),
        Verb::Stop { instances } => process::stop(&config, &instances),
        Verb::Restart {
            rolling: true,
            json,
            ..
        } => runtime()?.block_on(crate::rolling::rolling_restart(&config, json)),
        Verb::Restart { instances, .. } => {
            process::stop(&config, &instances)?;
            process::start(&config, &instances)
        }
        Verb::Status { instances, json } => process::status(&config, &instances, json),
        Verb::Log {
            instances,
            lines,
            follow,
        } => crate::instance_log::show(&config, &instances, lines, follow),
        Verb::Logrotate { instances } => crate::instance_log::rotate(&config, &instances),
        Verb::Run { instance } => run_instance(config, &instance),
        Verb::Bench(args) => crate::bench::run(config, args),
        Verb::Cat {
            instances,
            from,
            to,
            account,
            procedure,
            json,
        } => crate::cat::cat(
            &config,
            &crate::cat::CatArgs {
                instances,
                from,
                to,
                account,
                bucket_count: config.cluster.bucket_count,
                procedure: procedure.map(|name| name.replace('_', "-")),
                json,
            },
        ),
        Verb::Verify { json } => runtime()?.block_on(crate::verify::verify(&config, json)),
        Verb::Voters {
            replicaset,
            add,
            remove,
            json,
        } => runtime()?.block_on(crate::failover::voters(
            &config,
            replicaset.as_deref(),
            &add,
            &remove,
            json,
        )),
        Verb::Stats {
            instances,
            interval,
            json,
            prometheus,
        } => runtime()?.block_on(crate::stats::cli_stats(
            &config, &instances, interval, json, prometheus,
        )),
        Verb::Expel { instances, json } => {
            runtime()?.block_on(crate::failover::expel(&config, &instances, json))
        }
        Verb::Reload { routers, json } => {
            runtime()?.block_on(crate::reload::cli_reload(&config, &routers, json))
        }
        Verb::Snapshot { instances, json } => {
            runtime()?.block_on(crate::verify::snapshot(&config, &instances, json))
        }
        Verb::Backup { dir, json } => {
            runtime()?.block_on(crate::backup::backup(&config, &dir, json))
        }
        Verb::Restore { dir, json } => crate::backup::restore(&config, &dir, json),
        Verb::Failover {
            replicaset,
            to,
            force,
            json,
        } => runtime()?.block_on(crate::failover::failover(
            &config,
            &replicaset,
            to.as_deref(),
            force,
            json,
        )),
        Verb::Deploy { path, name, json } => runtime()?.block_on(async {
            let client = connect(&config).await?;
            crate::deploy::cli_deploy(&config, &client, &path, name.as_deref(), json).await
        }),
        Verb::Rollback {
            module,
            version,
            json,
        } => runtime()?.block_on(async {
            let client = connect(&config).await?;
            crate::deploy::cli_rollback(&client, &module, version, json).await
        }),
        Verb::Logs {
            instance,
            follow,
            procedure,
            json,
        } => runtime()?.block_on(async {
            let client = connect(&config).await?;
            crate::deploy::cli_logs(
                &client,
                instance.as_deref(),
                procedure.as_deref(),
                follow,
                json,
            )
            .await
        }),
        verb => {
            let routers = config.routers.clone();
            runtime()?
                .block_on(client_verb(config, verb))
                .map_err(|error| with_silent_router_hint(&routers, error))
        }
    }
}

/// A router that stops answering mid-request (killed, or its host gone: no QUIC close reaches
/// the CLI) leaves the SDK's bare timeout; this names the router and what to do.
fn with_silent_router_hint(
    routers: &BTreeMap<String, crate::config::RouterConfig>,
    error: anyhow::Error,
) -> anyhow::Error {
    let name = match error.downcast_ref::<billcl_client::Error>() {
        Some(billcl_client::Error::Timeout { address, .. }) => routers
            .iter()
            .find(|(_, router)| router.address == *address)
            .map_or_else(|| address.to_string(), |(name, _)| name.clone()),
        // The link broke mid-request (no address in the error): the one router, if one.
        Some(billcl_client::Error::Transport(_)) if routers.len() == 1 => {
            routers.keys().next().cloned().unwrap_or_default()
        }
        _ => return error,
    };
    anyhow!(
        "{error}: router {name} stopped answering; is it running? (`billcl status`, `billcl \
         start {name}`). What was asked may or may not have been done: read what a call \
         changed (`billcl call get KEY`, `billcl cat --account KEY`) before calling again; \
         run a rebalance or a bootstrap again to finish it"
    )
}

/// Keeps only the router named `name` in `config`, so clients go through that one.
fn only_router(config: &mut ClusterConfig, name: &str) -> Result<()> {
    if !config.routers.contains_key(name) {
        let names: Vec<&str> = config.routers.keys().map(String::as_str).collect();
        bail!(
            "--router {name}: the cluster file has no router `{name}`; its routers: {}",
            names.join(", ")
        );
    }
    config.routers.retain(|router, _| router == name);
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The runtime of a node: as many workers as its share of the host's cores
/// ([`ClusterConfig::worker_threads`]) unless `TOKIO_WORKER_THREADS` says otherwise.
fn instance_runtime(config: &ClusterConfig, instance: &str) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        builder.worker_threads(config.worker_threads(instance, cores));
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run_instance(config: ClusterConfig, instance: &str) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BILLCL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_ansi(false)
        // A line that cannot be written (the disk holding the log file is full) is dropped.
        // Otherwise tracing says so with `eprintln!`, which panics when stderr — the same
        // file — fails too, and the panic kills whichever task was logging: the leader's
        // executor, so that the node refused every call while its Raft node ran on.
        .log_internal_errors(false)
        .init();
    let instance = instance.to_string();
    if let Err(e) = crate::priority::start_as(&config, &instance) {
        tracing::warn!("cannot lower this learner's priority; it runs at the normal one: {e}");
    }
    let log = process::log_file(&config, &instance);
    instance_runtime(&config, &instance)?.block_on(async move {
        tokio::spawn(crate::instance_log::reopen_on_signal(log));
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            tracing::info!("shutting down");
        };
        crate::node::run(config, &instance, shutdown).await
    })
}

pub(crate) async fn connect(config: &ClusterConfig) -> Result<Client> {
    let mut client_config = ClientConfig::new(config.router_addresses(), tls::ca_pem(config)?);
    client_config.identity = Some(tls::identity(config, tls::CLIENT_IDENTITY)?);
    // The router gives up on a call after request_timeout_ms; leave it time to say why.
    client_config.timeout = Duration::from_millis(config.limits.request_timeout_ms + 3000);
    client_config.caller = "billcl-cli".to_string();
    Client::connect(client_config)
        .await
        .map_err(|e| anyhow!("{e}; is the router running? (`billcl status`, `billcl start`)"))
}

async fn client_verb(config: ClusterConfig, verb: Verb) -> Result<()> {
    let client = connect(&config).await?;
    match verb {
        Verb::Bootstrap { json } => {
            let answer: serde_json::Value =
                serde_json::from_str(&client.admin("bootstrap", "{}").await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                for (name, entry) in answer.as_object().into_iter().flatten() {
                    println!("{name}: {} buckets", entry["buckets"]);
                }
                println!("bootstrapped: {} buckets", config.cluster.bucket_count);
            }
            Ok(())
        }
        Verb::Rebalance { dry_run, json } => rebalance(&client, dry_run, json).await,
        Verb::Buckets { state, json } => buckets(&client, state.as_deref(), json).await,
        Verb::Pin(args) => pin(&client, args, true).await,
        Verb::Unpin(args) => pin(&client, args, false).await,
        Verb::Move(args) => move_buckets(&client, args).await,
        Verb::Info { json } => {
            let mut answer: serde_json::Value =
                serde_json::from_str(&client.admin("info", "{}").await?)?;
            note_paused_members(&config, &mut answer);
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", format_info(&answer));
            }
            Ok(())
        }
        Verb::Route { key, json } => {
            let key_json = key_json(&key);
            let body = serde_json::json!({ "key": key_json }).to_string();
            let answer: serde_json::Value =
                serde_json::from_str(&client.admin("route", &body).await?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!(
                    "key {} -> bucket {} -> {}",
                    key,
                    answer["bucket_id"],
                    answer["replicaset"]
                        .as_str()
                        .unwrap_or("no replicaset (run `billcl bootstrap`)")
                );
            }
            Ok(())
        }
        Verb::Procedures { json } => {
            let list = client.procedures().await?;
            if json {
                let rows: Vec<serde_json::Value> = list.iter().map(procedure_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for line in format_procedures(&list) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Verb::Call {
            procedure,
            args,
            replica,
            prefer_replica,
            balance,
            json,
        } => {
            let mode = if replica {
                ReadMode::Replica
            } else if prefer_replica {
                ReadMode::PreferReplica
            } else if balance {
                ReadMode::Balance
            } else {
                ReadMode::Leader
            };
            let value = call(&client, &procedure, &args, mode).await?;
            print_value(&value, json);
            Ok(())
        }
        Verb::Connect => console(&config, &client).await,
        Verb::Depletions { follow, json } => {
            crate::depletion::cli_depletions(&client, follow, json).await
        }
        Verb::Start { .. }
        | Verb::Stop { .. }
        | Verb::Restart { .. }
        | Verb::Status { .. }
        | Verb::Log { .. }
        | Verb::Logrotate { .. }
        | Verb::Verify { .. }
        | Verb::Reload { .. }
        | Verb::Voters { .. }
        | Verb::Expel { .. }
        | Verb::Stats { .. }
        | Verb::Cat { .. }
        | Verb::Snapshot { .. }
        | Verb::Backup { .. }
        | Verb::Restore { .. }
        | Verb::Failover { .. }
        | Verb::Deploy { .. }
        | Verb::Rollback { .. }
        | Verb::Logs { .. }
        | Verb::Bench(_)
        | Verb::Run { .. } => unreachable!("handled without a client"),
    }
}

/// Parse the arguments against the signature of the procedure's version (the active one,
/// or the one pinned with `NAME@VERSION`) and call it.
async fn call(client: &Client, procedure: &str, args: &[String], mode: ReadMode) -> Result<Value> {
    let (name, version) = split_pinned(procedure).map_err(|message| anyhow!(message))?;
    let procedures = client.procedures().await?;
    let info = find_procedure(&procedures, name, version)?;
    let called_as = match version {
        Some(version) => format!("{}@{version}", info.name),
        None => info.name.clone(),
    };
    if args.len() != info.params.len() {
        bail!(
            "{called_as} takes {} argument(s), got {}: {}",
            info.params.len(),
            args.len(),
            info.signature()
        );
    }
    let mut values = Vec::with_capacity(args.len());
    for ((param, ty), text) in info.params.iter().zip(args) {
        let value = Value::parse(text, ty)
            .map_err(|message| anyhow!("{called_as}: parameter `{param}`: {message}"))?;
        values.push(value);
    }
    let options = CallOptions {
        mode,
        version,
        ..CallOptions::default()
    };
    match client.call_with(&info.name, values, options).await {
        Err(error) if is_missing_account(&error) => {
            let id = args.first().map_or("ID", String::as_str);
            let creatable = procedures
                .iter()
                .any(|p| p.active && p.name == "create-account");
            let hint = if creatable {
                format!("create it: `billcl call create-account {id} BALANCE VELOCITY`")
            } else {
                "create it first (no active module exports create-account)".to_string()
            };
            Err(anyhow!("{error}\nhint: {hint}"))
        }
        answer => Ok(answer?),
    }
}

/// Whether a call failed because the account it names does not exist (the billing procedures
/// answer that with `account N not found`, which the SDK counts as [`ErrorKind::NotFound`]).
fn is_missing_account(error: &billcl_client::Error) -> bool {
    error.kind() == billcl_client::ErrorKind::NotFound
        && error
            .procedure_message()
            .is_some_and(|message| message.starts_with("account "))
}

/// The procedure list for people: each active procedure (`KIND MODULE@VERSION SIGNATURE`),
/// followed by the other deployed versions of it that a pinned call reaches.
fn format_procedures(list: &[ProcedureInfo]) -> Vec<String> {
    let line = |info: &ProcedureInfo| {
        let row = format!(
            "{:<8} {}@{}  {}",
            kind_name(info.kind),
            info.module,
            info.version,
            info.signature()
        );
        if info.active {
            row
        } else {
            format!("{row}  (inactive: call as {})", info.call_name())
        }
    };
    let mut lines = Vec::new();
    for active in list.iter().filter(|info| info.active) {
        lines.push(line(active));
        lines.extend(
            list.iter()
                .filter(|other| {
                    !other.active && other.name == active.name && other.module == active.module
                })
                .map(line),
        );
    }
    lines
}

fn kind_name(kind: ProcedureKind) -> &'static str {
    match kind {
        ProcedureKind::Query => "query",
        ProcedureKind::Command => "command",
    }
}

fn procedure_json(info: &ProcedureInfo) -> serde_json::Value {
    serde_json::json!({
        "name": info.name,
        "module": info.module,
        "version": info.version,
        "active": info.active,
        "call": info.call_name(),
        "kind": kind_name(info.kind),
        "params": info.params.iter().map(|(n, t)| serde_json::json!({"name": n, "type": t.to_string()})).collect::<Vec<_>>(),
        "result": info.result.as_ref().map(|t| t.to_string()),
        "signature": info.signature(),
    })
}

fn print_value(value: &Value, as_json: bool) {
    if as_json {
        println!("{}", value_json(value));
    } else {
        println!("{value}");
    }
}

/// A value as JSON. Decimals are strings, so no client reads them as floats.
pub fn value_json(value: &Value) -> serde_json::Value {
    use serde_json::json;
    match value {
        Value::Bool(b) => json!(b),
        Value::Int(n) => json!(n),
        Value::Uint(n) => json!(n),
        Value::Float(f) => json!(f),
        Value::Char(c) => json!(c.to_string()),
        Value::String(s) => json!(s),
        Value::Decimal(d) => json!(d.to_string()),
        Value::List(items) | Value::Tuple(items) => {
            serde_json::Value::Array(items.iter().map(value_json).collect())
        }
        Value::Option(inner) => inner
            .as_ref()
            .map_or(serde_json::Value::Null, |v| value_json(v)),
        Value::Result(Ok(inner)) => json!({ "ok": inner.as_ref().map(|v| value_json(v)) }),
        Value::Result(Err(inner)) => json!({ "error": inner.as_ref().map(|v| value_json(v)) }),
        Value::Record(fields) => serde_json::Value::Object(
            fields
                .iter()
                .map(|(name, value)| (name.clone(), value_json(value)))
                .collect(),
        ),
        Value::Enum(case) => json!(case),
        Value::Variant(case, payload) => {
            json!({ case.clone(): payload.as_ref().map(|v| value_json(v)) })
        }
        Value::Flags(flags) => json!(flags),
    }
}

/// Adds to the router's `info` what only this machine knows: a member the router finds
/// unreachable whose process runs here but is paused (kill -STOP, Ctrl-Z, a debugger) gets
/// `"process": {"pid", "state": "paused"}` and the way to resume it in its `error`, and a
/// `PAUSED_INSTANCE` alert comes first — the router's own advice (`billcl start …`) cannot
/// tell a paused process from a dead one.
pub fn note_paused_members(config: &ClusterConfig, info: &mut serde_json::Value) {
    let paused = process::paused_instances(config);
    if paused.is_empty() {
        return;
    }
    let note = |member: &mut serde_json::Value| {
        let Some((_, pid)) = paused
            .iter()
            .find(|(name, _)| member["name"].as_str() == Some(name.as_str()))
        else {
            return;
        };
        if member["status"] == "available" {
            return;
        }
        member["process"] = serde_json::json!({ "pid": pid, "state": "paused" });
        let error = member["error"].as_str().unwrap_or("").to_string();
        member["error"] = serde_json::json!(format!(
            "{error}; its process {pid} on this machine is paused: `kill -CONT {pid}`"
        ));
    };
    for replicaset in info["replicasets"].as_array_mut().into_iter().flatten() {
        note(&mut replicaset["leader"]);
        for replica in replicaset["replicas"].as_array_mut().into_iter().flatten() {
            note(replica);
        }
    }
    let mut alerts: Vec<serde_json::Value> = paused
        .iter()
        .map(|(name, pid)| {
            serde_json::json!({
                "name": "PAUSED_INSTANCE",
                "level": "orange",
                "message": process::paused_advice(name, *pid),
            })
        })
        .collect();
    alerts.extend(info["alerts"].as_array().cloned().unwrap_or_default());
    info["alerts"] = serde_json::Value::Array(alerts);
    if info["status"] == "green" || info["status"] == "yellow" {
        info["status"] = serde_json::json!("orange");
    }
}

/// Human form of `info` (the layout of `vshard.router.info()`).
pub fn format_info(info: &serde_json::Value) -> String {
    let mut out = String::new();
    let member_line = |role: &str, member: &serde_json::Value| -> String {
        let name = member["name"].as_str().unwrap_or("?");
        let address = member["address"].as_str().unwrap_or("?");
        let status = member["status"].as_str().unwrap_or("?");
        let detail = if status == "available" {
            let behind = member["behind"]
                .as_u64()
                .map(|n| format!(", {n} behind"))
                .unwrap_or_default();
            let founding = member["founding_waits_for"]
                .as_array()
                .map(|names| {
                    let names: Vec<&str> = names.iter().filter_map(|n| n.as_str()).collect();
                    format!("; founding, waits for {} to answer", names.join(", "))
                })
                .unwrap_or_default();
            format!(
                "{}, applied {}{behind}{founding}",
                member["role"].as_str().unwrap_or("?"),
                member["last_applied"]
            )
        } else {
            member["error"].as_str().unwrap_or("").to_string()
        };
        format!("    {role:<8} {name:<16} {address:<21} {status:<12} {detail}\n")
    };
    out.push_str("replicasets:\n");
    for replicaset in info["replicasets"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} (weight {}):\n",
            replicaset["name"].as_str().unwrap_or("?"),
            replicaset["weight"]
        ));
        if replicaset["leader"].is_null() {
            out.push_str("    leader   none reachable\n");
        } else {
            out.push_str(&member_line("leader", &replicaset["leader"]));
        }
        for replica in replicaset["replicas"].as_array().into_iter().flatten() {
            out.push_str(&member_line("replica", replica));
        }
        let buckets: Vec<String> = replicaset["buckets"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(state, count)| format!("{state} {count}"))
            .collect();
        out.push_str(&format!(
            "    buckets  {}\n",
            if buckets.is_empty() {
                "none".to_string()
            } else {
                buckets.join(", ")
            }
        ));
    }
    out.push_str("bucket:\n");
    for key in ["available_rw", "available_ro", "unreachable", "unknown"] {
        out.push_str(&format!("  {key}: {}\n", info["bucket"][key]));
    }
    let alerts = info["alerts"].as_array().cloned().unwrap_or_default();
    if alerts.is_empty() {
        out.push_str("alerts: none\n");
    } else {
        out.push_str("alerts:\n");
        for alert in alerts {
            out.push_str(&format!(
                "  {} ({}): {}\n",
                alert["name"].as_str().unwrap_or("?"),
                alert["level"].as_str().unwrap_or("?"),
                alert["message"].as_str().unwrap_or("")
            ));
        }
    }
    out.push_str(&format!(
        "status: {}\n",
        info["status"].as_str().unwrap_or("?")
    ));
    out
}

/// Split a console line into words; quotes group, brackets and braces nest.
pub fn split_words(line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in line.chars() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                    if depth > 0 {
                        word.push(c);
                    }
                } else {
                    word.push(c);
                }
            }
            None => match c {
                '"' | '\'' => {
                    quote = Some(c);
                    in_word = true;
                    if depth > 0 {
                        word.push(c);
                    }
                }
                '[' | '{' => {
                    depth += 1;
                    in_word = true;
                    word.push(c);
                }
                ']' | '}' => {
                    depth -= 1;
                    word.push(c);
                }
                c if c.is_whitespace() && depth == 0 => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                }
                c => {
                    in_word = true;
                    word.push(c);
                }
            },
        }
    }
    if quote.is_some() {
        bail!("unclosed quote");
    }
    if depth != 0 {
        bail!("unbalanced brackets");
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// What `help` prints in `billcl connect`.
const CONSOLE_HELP: &str = r"
NAME ARG...          call a procedure through the router, e.g. `get 4`, `add_money 4 1000`
                     (a query reads from the leader; `billcl call --replica` reads from replicas)
NAME@VERSION ARG...  call a pinned module version, e.g. `add_money@1 4 10`
call NAME ARG...     the same, for a procedure named like a verb below
procedures           every callable procedure with its signature
info                 replicasets, leaders and replicas, buckets, alerts
VERB ARG...          a billcl verb, run as at the shell with this cluster file: status, route,
                     buckets, stats, voters, verify, logs, depletions, cat, snapshot, reload,
                     rebalance, pin, unpin, move, failover, expel, deploy, rollback, bootstrap,
                     start, stop, restart (e.g. `route 4`, `stats --interval 2`)
help, \h, \?         this list
\q, quit, exit       leave (so does the end of input)
";

/// The verbs `billcl connect` runs as the shell would (a child `billcl` with this cluster file),
/// besides calls, `info` and `procedures`.
const CONSOLE_VERBS: &[&str] = &[
    "status",
    "route",
    "buckets",
    "stats",
    "voters",
    "verify",
    "logs",
    "depletions",
    "cat",
    "snapshot",
    "reload",
    "rebalance",
    "pin",
    "unpin",
    "move",
    "failover",
    "expel",
    "deploy",
    "rollback",
    "bootstrap",
    "start",
    "stop",
    "restart",
];

/// Runs `billcl --config FILE WORDS…` for the console, its output and errors on the console's.
async fn console_verb(config: &ClusterConfig, words: &[String]) -> Result<()> {
    std::io::stdout().flush()?;
    let exe = std::env::current_exe().context("cannot find the billcl executable")?;
    let path = config.path.clone();
    let words = words.to_vec();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .arg("--config")
            .arg(path)
            .args(words)
            .stdin(std::process::Stdio::null())
            .status()
    })
    .await?
    .context("cannot run billcl")?;
    Ok(())
}

async fn console(config: &ClusterConfig, client: &Client) -> Result<()> {
    println!(
        "connected; type a call (`get 4`, `add_money 4 1000`), `procedures`, `info`, a verb \
         (`route 4`, `stats`), `help`, or \\q"
    );
    let stdin = std::io::stdin();
    loop {
        print!("billcl> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        let words = match split_words(line.trim()) {
            Ok(words) => words,
            Err(e) => {
                println!("error: {e}");
                continue;
            }
        };
        let Some((first, rest)) = words.split_first() else {
            continue;
        };
        let outcome: Result<String> = match first.as_str() {
            "\\q" | "quit" | "exit" => return Ok(()),
            "help" | "\\h" | "\\help" | "\\?" => Ok(CONSOLE_HELP.trim().to_string()),
            "info" => {
                async {
                    let mut answer: serde_json::Value =
                        serde_json::from_str(&client.admin("info", "{}").await?)?;
                    note_paused_members(config, &mut answer);
                    Ok(format_info(&answer).trim_end().to_string())
                }
                .await
            }
            "procedures" => client
                .procedures()
                .await
                .map_err(Into::into)
                .map(|list| format_procedures(&list).join("\n")),
            "call" => match rest.split_first() {
                Some((procedure, args)) => call(client, procedure, args, ReadMode::Leader)
                    .await
                    .map(|value| value.to_string()),
                None => Err(anyhow!("call NAME ARG...: which procedure?")),
            },
            verb if CONSOLE_VERBS.contains(&verb) => {
                // It prints its own answer, or its error.
                console_verb(config, &words).await.map(|()| String::new())
            }
            procedure => call(client, procedure, rest, ReadMode::Leader)
                .await
                .map(|value| value.to_string()),
        };
        match outcome {
            Ok(text) if text.is_empty() => {}
            Ok(text) => println!("{text}"),
            Err(e) => println!("error: {e:#}"),
        }
    }
}

/// A key typed at the command line as JSON: an integer if it reads as one, else a string.
fn key_json(key: &str) -> serde_json::Value {
    match key.parse::<u64>() {
        Ok(n) => serde_json::json!(n),
        Err(_) => match key.parse::<i64>() {
            Ok(n) => serde_json::json!(n),
            Err(_) => serde_json::json!(key),
        },
    }
}

/// `billcl buckets`: the router's `buckets` verb, as id ranges per state and replicaset.
async fn buckets(client: &Client, only: Option<&str>, json: bool) -> Result<()> {
    let answer: serde_json::Value = serde_json::from_str(&client.admin("buckets", "{}").await?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    for replicaset in answer["replicasets"].as_array().into_iter().flatten() {
        let name = replicaset["name"].as_str().unwrap_or("?");
        if let Some(error) = replicaset["error"].as_str() {
            println!("{name}: not listed ({error})");
            continue;
        }
        // State (with a sending bucket's destination) -> ids, ascending as listed.
        let mut by_state: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for entry in replicaset["buckets"].as_array().into_iter().flatten() {
            let state = entry[1].as_str().unwrap_or("?");
            if only.is_some_and(|only| only != state) {
                continue;
            }
            let state = match entry[2].as_str() {
                Some(to) => format!("{state} to {to}"),
                None => state.to_string(),
            };
            by_state
                .entry(state)
                .or_default()
                .push(entry[0].as_u64().unwrap_or(0));
        }
        let parts: Vec<String> = by_state
            .iter()
            .map(|(state, ids)| format!("{state} {} ({})", id_ranges(ids), ids.len()))
            .collect();
        let listed = if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join("; ")
        };
        println!("{name}: {listed}");
    }
    Ok(())
}

/// Ascending ids as ranges: `1-41, 43, 45-50`.
pub(crate) fn id_ranges(ids: &[u64]) -> String {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &id in ids {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => ranges.push((id, id)),
        }
    }
    ranges
        .iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `billcl pin` and `billcl unpin`: the router's `pin` verb.
async fn pin(client: &Client, args: PinArgs, pinned: bool) -> Result<()> {
    if args.buckets.is_empty() && args.keys.is_empty() {
        bail!("name the buckets (`billcl pin 17 42`) or keys (`billcl pin --key 4`)");
    }
    let keys: Vec<serde_json::Value> = args.keys.iter().map(|key| key_json(key)).collect();
    let body = serde_json::json!({ "bucket_ids": args.buckets, "keys": keys, "pinned": pinned });
    let answer: serde_json::Value =
        serde_json::from_str(&client.admin("pin", &body.to_string()).await?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let verb = if pinned { "pinned" } else { "unpinned" };
    for (name, part) in answer["replicasets"].as_object().into_iter().flatten() {
        let ids: Vec<String> = part["bucket_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|id| id.to_string())
            .collect();
        let changed = part["changed"].as_u64().unwrap_or(0);
        let already = ids.len() as u64 - changed.min(ids.len() as u64);
        let note = if already > 0 {
            format!(" ({already} already were)")
        } else {
            String::new()
        };
        println!("{name}: {verb} bucket {}{note}", ids.join(", "));
    }
    Ok(())
}

/// `billcl move`.
async fn move_buckets(client: &Client, args: MoveArgs) -> Result<()> {
    if args.buckets.is_empty() && args.keys.is_empty() {
        bail!("name the buckets (`billcl move 17 42 --to storage-b`) or keys (`--key 4`)");
    }
    let keys: Vec<serde_json::Value> = args.keys.iter().map(|key| key_json(key)).collect();
    let body = serde_json::json!({
        "bucket_ids": args.buckets, "keys": keys, "to": args.to, "pin": args.pin,
    });
    let answer: serde_json::Value =
        serde_json::from_str(&client.admin("move", &body.to_string()).await?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let ids = |field: &str| -> Vec<u64> {
        answer[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|id| id.as_u64())
            .collect()
    };
    let (moved, already) = (ids("moved"), ids("already_there"));
    let mut lines = Vec::new();
    if !moved.is_empty() {
        lines.push(format!(
            "moved {} bucket{} to {}: {}",
            moved.len(),
            if moved.len() == 1 { "" } else { "s" },
            args.to,
            id_ranges(&moved)
        ));
    }
    if !already.is_empty() {
        lines.push(format!("already on {}: {}", args.to, id_ranges(&already)));
    }
    if args.pin {
        lines.push(format!("pinned on {}", args.to));
    }
    println!("{}", lines.join("; "));
    Ok(())
}

/// `billcl rebalance`: asks the router to move buckets a step at a time until the plan is
/// done, printing each step's progress.
async fn rebalance(client: &Client, dry_run: bool, json: bool) -> Result<()> {
    let body = serde_json::json!({ "dry_run": dry_run }).to_string();
    let (mut moved, mut finished) = (0, 0);
    // (from, to) -> buckets moved, over every step.
    let mut by_pair: std::collections::BTreeMap<(String, String), u64> = Default::default();
    loop {
        let answer: serde_json::Value =
            serde_json::from_str(&client.admin("rebalance", &body).await?)?;
        moved += answer["moved"].as_u64().unwrap_or(0);
        finished += answer["finished"].as_u64().unwrap_or(0);
        let pairs = if dry_run { "plan" } else { "moved_by_pair" };
        for group in answer[pairs].as_array().into_iter().flatten() {
            let pair = (
                group["from"].as_str().unwrap_or("?").to_string(),
                group["to"].as_str().unwrap_or("?").to_string(),
            );
            *by_pair.entry(pair).or_default() += group["buckets"].as_u64().unwrap_or(0);
        }
        let done = answer["done"].as_bool().unwrap_or(true);
        if !json && !dry_run && !done {
            println!(
                "moved {moved} buckets, {} to go",
                answer["left"].as_u64().unwrap_or(0)
            );
        }
        if done || dry_run {
            let mut summary = answer.clone();
            summary["moved"] = moved.into();
            summary["finished"] = finished.into();
            summary["moved_by_pair"] = by_pair
                .iter()
                .filter(|_| !dry_run)
                .map(|((from, to), buckets)| {
                    serde_json::json!({ "from": from, "to": to, "buckets": buckets })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
                return Ok(());
            }
            if finished > 0 {
                println!("finished {finished} bucket moves cut short");
            }
            let in_progress = answer["in_progress"].as_u64().unwrap_or(0);
            if dry_run && in_progress > 0 {
                println!("would finish {in_progress} bucket moves cut short");
            }
            for ((from, to), buckets) in &by_pair {
                println!(
                    "{} {buckets} buckets from {from} to {to}",
                    if dry_run { "would move" } else { "moved" },
                );
            }
            for (name, entry) in answer["replicasets"].as_object().into_iter().flatten() {
                println!(
                    "{name}: {} buckets (weight {}, share {})",
                    entry["buckets"], entry["weight"], entry["target"]
                );
            }
            println!(
                "{}",
                if dry_run {
                    "dry run: nothing moved"
                } else if moved == 0 && finished == 0 {
                    "balanced: nothing to move"
                } else {
                    "balanced"
                }
            );
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_ids_print_as_ranges() {
        assert_eq!(id_ranges(&[1, 2, 3, 5, 7, 8]), "1-3, 5, 7-8");
        assert_eq!(id_ranges(&[42]), "42");
        assert_eq!(id_ranges(&[]), "");
    }

    /// The console's verbs are the CLI's, and its help lists each of them.
    #[test]
    fn every_console_verb_is_a_cli_verb_and_in_the_help() {
        use clap::CommandFactory;
        let cli = Cli::command();
        for verb in CONSOLE_VERBS {
            assert!(
                cli.find_subcommand(verb).is_some(),
                "{verb} is no billcl verb"
            );
            assert!(
                CONSOLE_HELP.contains(verb),
                "{verb} is not in the console's help"
            );
        }
    }

    #[test]
    fn console_words_respect_quotes_and_brackets() {
        assert_eq!(
            split_words("add_money 4 1000").unwrap(),
            ["add_money", "4", "1000"]
        );
        assert_eq!(
            split_words(r#"put "a b" [1, 2] {x: "y z"}"#).unwrap(),
            ["put", "a b", "[1, 2]", r#"{x: "y z"}"#]
        );
        assert!(split_words("get \"4").is_err());
        assert!(split_words("get [4").is_err());
    }

    #[test]
    fn decimals_are_json_strings() {
        let value = Value::Tuple(vec![
            Value::Uint(4),
            Value::Decimal(billcl_money::Decimal::from_micros(1_500_000)),
        ]);
        assert_eq!(value_json(&value).to_string(), r#"[4,"1.5"]"#);
    }
}
