//! `billcl bench`: a load generator like redis-benchmark, through the router with the SDK.
//!
//! It exists so that operators size a cluster with the same client path applications use:
//! `concurrency` calls stay in flight (spread over `connections` QUIC connections), keys are
//! drawn uniformly or from a Zipf distribution over `accounts` accounts (created first with the
//! billing module's `create-account`), and every call's latency is recorded exactly. A progress
//! line is printed every second; at the end, throughput, latency percentiles, errors by kind and
//! where the CPU went (the local cluster's processes and the bench per call, the machine's busy
//! and stolen time: [`crate::cpu_usage`]) and each local instance's memory at the end (resident
//! and peak: [`crate::process::Memory`]), as text or `--json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use billcl_client::{
    Answers, CallOptions, Client, ClientConfig, Decimal, ErrorKind, ProcedureInfo, ReadMode, Type,
    Value,
};
use serde_json::json;

use crate::config::ClusterConfig;
use crate::cpu_usage::{self, CpuSample};
use crate::tls;

/// Calls one bench keeps in flight at most.
pub const CONCURRENCY_MAX: usize = 100_000;
/// Client connections one bench opens at most.
pub const CONNECTIONS_MAX: usize = 256;
/// Latency samples kept at most (a 4-byte sample each); further calls are counted only.
pub const LATENCY_SAMPLES_MAX: usize = 50_000_000;
/// Calls in flight while accounts are created.
const CREATE_CONCURRENCY: usize = 128;

/// What `billcl bench` runs.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// get | add_money | update_velocity | mix | any procedure name (its first argument is the
    /// account id; give the others with --arg).
    #[arg(default_value = "get")]
    pub workload: String,
    /// For `mix`: the fraction of calls that are writes (add_money), the rest are gets.
    #[arg(long, default_value_t = 0.5)]
    pub write_ratio: f64,
    /// Accounts 1..=N are used; they are created first (create-account) unless they exist.
    #[arg(long, default_value_t = 100_000)]
    pub accounts: u64,
    /// Do not create the accounts (they must exist).
    #[arg(long)]
    pub no_create: bool,
    /// How keys are drawn: uniform or zipf.
    #[arg(long, default_value = "uniform")]
    pub distribution: String,
    /// The Zipf exponent (with --distribution zipf).
    #[arg(long, default_value_t = 0.99)]
    pub zipf_exponent: f64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// QUIC connections to the router(s) the calls are spread over.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Threads driving the calls (as redis-benchmark's --threads). One keeps up with a cluster
    /// on the same few cores and costs it the least CPU; more for a remote cluster that takes
    /// more than one core of client work.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seconds to run (after the warm-up).
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Target calls per second over all tasks (0: as fast as the calls come back). Each task
    /// waits for its own schedule slot before its next call (closed loop: a call that outlasts
    /// its task's period makes it skip the slots it missed, so use a rate the cluster
    /// sustains; the report gives the rate reached). The slots ride the runtime's 1 ms timer:
    /// the calls due within a millisecond leave together, as one burst.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Read mode of queries: leader, replica, prefer-replica, balance.
    #[arg(long, default_value = "leader")]
    pub read_mode: String,
    /// How the router answers the calls the SDK batches: `as-ready` (each as soon as it is
    /// done, the SDK's default) or `together` (a batch's answers in one frame: fewer packets
    /// when the cluster is saturated, a call waits for the slowest of its batch).
    #[arg(long, default_value = "as-ready")]
    pub answers: String,
    /// Further arguments of a custom procedure after the key, parsed against its signature.
    #[arg(long = "arg", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Print the report as JSON (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write every measured call to this file, one line each in the order they started:
    /// `start_us latency_us r|w ok|ERROR_KIND` (start in µs from the moment the header's
    /// `origin_monotonic_s` gives, on the clock `perf record -k CLOCK_MONOTONIC` uses), so a
    /// tail can be placed in time: one stall or many small waits, and what ran then.
    #[arg(long, value_name = "FILE")]
    pub latency_log: Option<std::path::PathBuf>,
}

/// One kind of call the bench sends.
#[derive(Clone, Debug)]
enum Operation {
    Get,
    AddMoney,
    UpdateVelocity,
    /// A procedure by name: the key's type, then the fixed further arguments.
    Custom {
        name: String,
        key: Type,
        rest: Vec<Value>,
    },
}

impl Operation {
    fn request(&self, id: u64, sequence: u64) -> (&str, Vec<Value>) {
        match self {
            Operation::Get => ("get", vec![Value::Uint(id)]),
            Operation::AddMoney => (
                "add-money",
                vec![Value::Uint(id), Value::Decimal(Decimal::from_micros(1_000))],
            ),
            Operation::UpdateVelocity => (
                "update-velocity",
                vec![
                    Value::Uint(id),
                    Value::Decimal(Decimal::from_micros((sequence % 1000) as i64)),
                ],
            ),
            Operation::Custom { name, key, rest } => {
                let key = match key {
                    Type::String => Value::String(id.to_string()),
                    Type::S8 | Type::S16 | Type::S32 | Type::S64 => Value::Int(id as i64),
                    _ => Value::Uint(id),
                };
                let mut args = Vec::with_capacity(rest.len() + 1);
                args.push(key);
                args.extend(rest.iter().cloned());
                (name, args)
            }
        }
    }
}

/// Draws account ids in 1..=accounts.
enum Keys {
    Uniform {
        accounts: u64,
    },
    /// Cumulative probabilities of ids 1..=accounts (rank 1 is the most popular).
    Zipf {
        cumulative: Arc<Vec<f64>>,
    },
}

impl Keys {
    fn new(args: &BenchArgs) -> Result<Keys> {
        match args.distribution.as_str() {
            "uniform" => Ok(Keys::Uniform {
                accounts: args.accounts,
            }),
            "zipf" => {
                if args.zipf_exponent <= 0.0 {
                    bail!("--zipf-exponent must be > 0, got {}", args.zipf_exponent);
                }
                let mut cumulative = Vec::with_capacity(args.accounts as usize);
                let mut total = 0.0;
                for rank in 1..=args.accounts {
                    total += 1.0 / (rank as f64).powf(args.zipf_exponent);
                    cumulative.push(total);
                }
                for value in &mut cumulative {
                    *value /= total;
                }
                Ok(Keys::Zipf {
                    cumulative: Arc::new(cumulative),
                })
            }
            other => bail!("--distribution is uniform or zipf, got `{other}`"),
        }
    }

    fn clone_for_task(&self) -> Keys {
        match self {
            Keys::Uniform { accounts } => Keys::Uniform {
                accounts: *accounts,
            },
            Keys::Zipf { cumulative } => Keys::Zipf {
                cumulative: cumulative.clone(),
            },
        }
    }

    fn draw(&self, random: &mut Random) -> u64 {
        match self {
            Keys::Uniform { accounts } => 1 + random.next() % accounts,
            Keys::Zipf { cumulative } => {
                let point = random.unit();
                let rank = cumulative.partition_point(|&c| c < point);
                (rank as u64 + 1).min(cumulative.len() as u64)
            }
        }
    }
}

/// xorshift64*: fast, seeded per task; the bench needs spread, not secrecy.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What all tasks count, shared.
#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
}

/// One measured call, for `--latency-log`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CallRecord {
    /// When it started, µs after the bench's origin.
    start_us: u64,
    latency_us: u32,
    write: bool,
    /// The error's kind, or `None` if it succeeded.
    error: Option<&'static str>,
}

/// What one task recorded while measuring.
#[derive(Default)]
struct TaskReport {
    latencies_us: Vec<u32>,
    /// Every measured call, with `--latency-log` only.
    log: Vec<CallRecord>,
    calls: u64,
    reads: u64,
    writes: u64,
    errors: BTreeMap<&'static str, u64>,
    first_errors: BTreeMap<&'static str, String>,
}

async fn connect(
    config: &ClusterConfig,
    connections: usize,
    answers: Answers,
) -> Result<Vec<Client>> {
    let mut client_config = ClientConfig::new(config.router_addresses(), tls::ca_pem(config)?);
    client_config.answers = answers;
    client_config.identity = Some(tls::identity(config, tls::CLIENT_IDENTITY)?);
    client_config.timeout = Duration::from_millis(config.limits.request_timeout_ms + 3000);
    client_config.caller = "billcl-bench".to_string();
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        // Each Client has its own endpoint, so its own connection (and UDP socket).
        let client = Client::connect(client_config.clone())
            .await
            .map_err(|e| anyhow!("{e}; is the router running? (`billcl status`)"))?;
        clients.push(client);
    }
    Ok(clients)
}

fn answers(text: &str) -> Result<Answers> {
    Ok(match text {
        "as-ready" => Answers::AsReady,
        "together" => Answers::Together,
        other => bail!("--answers is as-ready or together, got {other:?}"),
    })
}

fn read_mode(text: &str) -> Result<ReadMode> {
    Ok(match text {
        "leader" => ReadMode::Leader,
        "replica" => ReadMode::Replica,
        "prefer-replica" => ReadMode::PreferReplica,
        "balance" => ReadMode::Balance,
        other => bail!("--read-mode is leader, replica, prefer-replica or balance, got `{other}`"),
    })
}

/// The operations of the workload, with the cut-off of writes for `mix`.
fn workload(args: &BenchArgs, procedures: &[ProcedureInfo]) -> Result<(Operation, Operation)> {
    let simple = |name: &str| match name.replace('_', "-").as_str() {
        "get" => Some(Operation::Get),
        "add-money" => Some(Operation::AddMoney),
        "update-velocity" => Some(Operation::UpdateVelocity),
        _ => None,
    };
    if args.workload == "mix" {
        if !(0.0..=1.0).contains(&args.write_ratio) {
            bail!("--write-ratio is in 0..=1, got {}", args.write_ratio);
        }
        return Ok((Operation::Get, Operation::AddMoney));
    }
    if let (Some(operation), true) = (simple(&args.workload), args.args.is_empty()) {
        return Ok((operation.clone(), operation));
    }
    let wanted = args.workload.replace('_', "-");
    let info = procedures
        .iter()
        .find(|info| info.name == wanted)
        .ok_or_else(|| {
            anyhow!(
                "no procedure `{}`; workloads: get, add_money, update_velocity, mix, or one of: {}",
                args.workload,
                procedures
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let Some(((_, key), rest_types)) = info.params.split_first() else {
        bail!(
            "{} takes no arguments: a bench needs a procedure keyed by account id",
            info.signature()
        );
    };
    if rest_types.len() != args.args.len() {
        bail!(
            "{} needs {} --arg value(s) after the key, got {}",
            info.signature(),
            rest_types.len(),
            args.args.len()
        );
    }
    let mut rest = Vec::new();
    for ((param, ty), text) in rest_types.iter().zip(&args.args) {
        rest.push(
            Value::parse(text, ty).map_err(|message| anyhow!("--arg for `{param}`: {message}"))?,
        );
    }
    let operation = Operation::Custom {
        name: info.name.clone(),
        key: key.clone(),
        rest,
    };
    Ok((operation.clone(), operation))
}

/// Create accounts 1..=accounts that do not exist yet.
async fn create_accounts(clients: &[Client], accounts: u64, quiet: bool) -> Result<()> {
    let probe = clients[0].account(accounts).await;
    if probe.is_ok() && clients[0].account(1 + accounts / 2).await.is_ok() {
        if !quiet {
            eprintln!("accounts 1..={accounts} exist already");
        }
        return Ok(());
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(1));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..CREATE_CONCURRENCY {
        let client = clients[task % clients.len()].clone();
        let next = next.clone();
        let failures = failures.clone();
        tasks.spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id > accounts {
                    return;
                }
                let args = vec![
                    Value::Uint(id),
                    Value::Decimal(Decimal::from_micros(1_000_000_000)),
                    Value::Decimal(Decimal::from_micros(10)),
                ];
                if let Err(error) = client.call("create-account", args).await {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("account {id}: {error}"));
                    return;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let failures = failures.lock().unwrap();
    if let Some(first) = failures.first() {
        bail!(
            "creating accounts failed ({} failures), first: {first}",
            failures.len()
        );
    }
    if !quiet {
        eprintln!(
            "created accounts 1..={accounts} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn load_task(
    client: Client,
    read: Operation,
    write: Operation,
    write_ratio: f64,
    keys: Keys,
    mode: ReadMode,
    seed: u64,
    pacing: Option<(tokio::time::Instant, Duration)>,
    counters: Arc<Counters>,
    // Where `--latency-log` times are counted from; `None` without the log.
    log_origin: Option<Instant>,
) -> TaskReport {
    let mut random = Random::new(seed);
    let mut pacing = pacing.map(|(first, period)| {
        let mut interval = tokio::time::interval_at(first, period);
        // A call that outlasts its task's period makes the task skip the slots it missed
        // and keep its own schedule. Restarting the schedule from the late answer instead
        // (`Delay`, before) put every task a stall held up back in step at its end, and
        // they stayed so: the load grew burstier with each stall until the run ended
        // (docs/performance-history.md, "The bench's pacing fell into step").
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        interval
    });
    let mut report = TaskReport::default();
    let mut sequence = 0u64;
    while !counters.stop.load(Ordering::Relaxed) {
        if let Some(interval) = pacing.as_mut() {
            interval.tick().await;
        }
        sequence += 1;
        let id = keys.draw(&mut random);
        let is_write = write_ratio > 0.0 && random.unit() < write_ratio;
        let operation = if is_write { &write } else { &read };
        let (name, args) = operation.request(id, sequence);
        let options = CallOptions {
            mode,
            // A bench shows failures as they happen rather than hiding them in retries.
            no_retry: true,
            ..CallOptions::default()
        };
        let started = Instant::now();
        let result = client.call_with(name, args, options).await;
        let elapsed_us = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if !counters.measuring.load(Ordering::Relaxed) {
            continue;
        }
        report.calls += 1;
        if is_write {
            report.writes += 1;
        } else {
            report.reads += 1;
        }
        if let Some(origin) = log_origin {
            if report.log.len() < LATENCY_SAMPLES_MAX {
                report.log.push(CallRecord {
                    start_us: started.saturating_duration_since(origin).as_micros() as u64,
                    latency_us: elapsed_us,
                    write: is_write,
                    error: result.as_ref().err().map(|error| error.kind().name()),
                });
            }
        }
        match result {
            Ok(_) => {
                if report.latencies_us.len() < LATENCY_SAMPLES_MAX {
                    report.latencies_us.push(elapsed_us);
                }
            }
            Err(error) => {
                let kind = error.kind().name();
                *report.errors.entry(kind).or_insert(0) += 1;
                report
                    .first_errors
                    .entry(kind)
                    .or_insert_with(|| error.to_string());
                if error.kind() == ErrorKind::Fatal {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    report
}

/// The moment `--latency-log` counts from, as an [`Instant`] and on `CLOCK_MONOTONIC` (which
/// `Instant` reads on Linux, but does not show).
struct LogOrigin {
    instant: Instant,
    monotonic_s: f64,
}

impl LogOrigin {
    fn now() -> LogOrigin {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        LogOrigin {
            instant: Instant::now(),
            monotonic_s: now.tv_sec as f64 + now.tv_nsec as f64 / 1e9,
        }
    }
}

/// `--latency-log`: a header naming the run and the clock, then one line per call, `calls`
/// in the order they started.
fn write_latency_log(
    out: &mut impl Write,
    origin: &LogOrigin,
    args: &BenchArgs,
    calls: &[CallRecord],
) -> std::io::Result<()> {
    writeln!(
        out,
        "# billcl bench {}: {} in flight, rate {}/s; origin_monotonic_s {:.6}; \
         columns: start_us latency_us r|w ok|ERROR_KIND",
        args.workload, args.concurrency, args.rate, origin.monotonic_s
    )?;
    for call in calls {
        writeln!(
            out,
            "{} {} {} {}",
            call.start_us,
            call.latency_us,
            if call.write { 'w' } else { 'r' },
            call.error.unwrap_or("ok")
        )?;
    }
    Ok(())
}

fn percentile(sorted: &[u32], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[index]) / 1000.0
}

/// `billcl bench`: run the workload and print the report.
pub fn run(config: ClusterConfig, args: BenchArgs) -> Result<()> {
    if args.concurrency == 0 || args.concurrency > CONCURRENCY_MAX {
        bail!(
            "--concurrency is 1..={CONCURRENCY_MAX}, got {}",
            args.concurrency
        );
    }
    if args.connections == 0 || args.connections > CONNECTIONS_MAX {
        bail!(
            "--connections is 1..={CONNECTIONS_MAX}, got {}",
            args.connections
        );
    }
    if args.rate.is_nan() || args.rate < 0.0 {
        bail!("--rate must be >= 0, got {}", args.rate);
    }
    if args.accounts == 0 {
        bail!("--accounts must be > 0");
    }
    if args.duration.is_nan() || args.duration <= 0.0 || args.warmup.is_nan() || args.warmup < 0.0 {
        bail!("--duration must be > 0 and --warmup >= 0");
    }
    let mode = read_mode(&args.read_mode)?;
    let answers = answers(&args.answers)?;
    let keys = Keys::new(&args)?;
    if args.threads == 0 {
        bail!("--threads must be > 0");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let clients = connect(&config, args.connections, answers).await?;
        let procedures = clients[0].procedures().await?;
        let (read, write) = workload(&args, &procedures)?;
        let write_ratio = match (&args.workload[..], &read) {
            ("mix", _) => args.write_ratio,
            (_, Operation::AddMoney | Operation::UpdateVelocity) => 1.0,
            (_, Operation::Custom { name, .. }) => {
                let command = procedures
                    .iter()
                    .any(|p| &p.name == name && p.kind == billcl_client::ProcedureKind::Command);
                if command {
                    1.0
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        if !args.no_create {
            create_accounts(&clients, args.accounts, false).await?;
        }
        let counters = Arc::new(Counters::default());
        let period =
            (args.rate > 0.0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate));
        let paced_from = tokio::time::Instant::now();
        let log_origin = args.latency_log.as_ref().map(|_| LogOrigin::now());
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..args.concurrency {
            // The tasks' schedules are spread over one period, so that paced calls arrive
            // evenly instead of all tasks calling at the same instant once per period.
            let pacing = period.map(|period| {
                let offset = period.mul_f64(task as f64 / args.concurrency as f64);
                (paced_from + offset, period)
            });
            tasks.spawn(load_task(
                clients[task % clients.len()].clone(),
                read.clone(),
                write.clone(),
                write_ratio,
                keys.clone_for_task(),
                mode,
                0x5eed + task as u64,
                pacing,
                counters.clone(),
                log_origin.as_ref().map(|origin| origin.instant),
            ));
        }
        let warmup = Duration::from_secs_f64(args.warmup);
        tokio::time::sleep(warmup).await;
        counters.measuring.store(true, Ordering::SeqCst);
        let cpu_before = CpuSample::take(&config);
        let started = Instant::now();
        let duration = Duration::from_secs_f64(args.duration);
        let mut last_calls = counters.calls.load(Ordering::Relaxed);
        let mut last_at = Instant::now();
        while started.elapsed() < duration {
            let left = duration.saturating_sub(started.elapsed());
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
            let calls = counters.calls.load(Ordering::Relaxed);
            let rate = (calls - last_calls) as f64 / last_at.elapsed().as_secs_f64();
            last_calls = calls;
            last_at = Instant::now();
            eprint!(
                "\r{:>5.1} s / {:.0} s  {:>9.0} calls/s  errors {:<8}",
                started.elapsed().as_secs_f64(),
                args.duration,
                rate,
                counters.errors.load(Ordering::Relaxed)
            );
            let _ = std::io::stderr().flush();
        }
        counters.measuring.store(false, Ordering::SeqCst);
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_after = CpuSample::take(&config);
        let memory = crate::process::instances_memory(&config);
        counters.stop.store(true, Ordering::SeqCst);
        eprintln!();
        let mut total = TaskReport::default();
        while let Some(joined) = tasks.join_next().await {
            let report = joined.context("a load task failed")?;
            total.calls += report.calls;
            total.reads += report.reads;
            total.writes += report.writes;
            total.latencies_us.extend(report.latencies_us);
            total.log.extend(report.log);
            for (kind, count) in report.errors {
                *total.errors.entry(kind).or_insert(0) += count;
            }
            for (kind, message) in report.first_errors {
                total.first_errors.entry(kind).or_insert(message);
            }
        }
        total.latencies_us.sort_unstable();
        if let (Some(path), Some(origin)) = (&args.latency_log, &log_origin) {
            total.log.sort_unstable_by_key(|call| call.start_us);
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create the latency log {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            write_latency_log(&mut out, origin, &args, &total.log)
                .and_then(|()| out.flush())
                .with_context(|| format!("cannot write the latency log {}", path.display()))?;
        }
        let ok = total.latencies_us.len() as u64;
        let error_count: u64 = total.errors.values().sum();
        let report = json!({
            "workload": args.workload,
            "write_ratio": write_ratio,
            "accounts": args.accounts,
            "distribution": args.distribution,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "answers": args.answers,
            "read_mode": args.read_mode,
            "target_rate_per_s": args.rate,
            "duration_s": elapsed,
            "calls": total.calls,
            "reads": total.reads,
            "writes": total.writes,
            "ok": ok,
            "errors": error_count,
            "throughput_per_s": ok as f64 / elapsed,
            "latency_ms": {
                "p50": percentile(&total.latencies_us, 0.50),
                "p90": percentile(&total.latencies_us, 0.90),
                "p99": percentile(&total.latencies_us, 0.99),
                "p99.9": percentile(&total.latencies_us, 0.999),
                "max": percentile(&total.latencies_us, 1.0),
            },
            "errors_by_kind": total.errors,
            "first_error_by_kind": total.first_errors,
            "latency_log": args.latency_log,
            "cpu": cpu_before.report(&cpu_after, total.calls),
            "memory": memory
                .iter()
                .map(|(name, memory)| (name.clone(), memory.to_json()))
                .collect::<serde_json::Map<_, _>>(),
        });
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            let latency = &report["latency_ms"];
            println!(
                "{}: {} accounts ({}), {} in flight over {} connection(s), answers {}, {:.1} s",
                args.workload,
                args.accounts,
                args.distribution,
                args.concurrency,
                args.connections,
                args.answers,
                elapsed
            );
            println!(
                "  throughput  {:.0} calls/s ({} ok, {} errors; {} reads, {} writes)",
                ok as f64 / elapsed,
                ok,
                error_count,
                total.reads,
                total.writes
            );
            println!(
                "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                latency["p50"].as_f64().unwrap_or(0.0),
                latency["p90"].as_f64().unwrap_or(0.0),
                latency["p99"].as_f64().unwrap_or(0.0),
                latency["p99.9"].as_f64().unwrap_or(0.0),
                latency["max"].as_f64().unwrap_or(0.0),
            );
            for line in cpu_usage::describe(&report["cpu"]) {
                println!("{line}");
            }
            if !memory.is_empty() {
                let instances: Vec<String> = memory
                    .iter()
                    .map(|(name, memory)| format!("{name} {}", memory.describe()))
                    .collect();
                println!("  memory      {}", instances.join(", "));
            }
            if let Some(path) = &args.latency_log {
                println!("  each call   in {}", path.display());
            }
            for (kind, count) in &total.errors {
                println!(
                    "  errors      {kind}: {count} (first: {})",
                    total.first_errors.get(kind).map_or("", String::as_str)
                );
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_keys_favour_low_ids_and_stay_in_range() {
        let mut cumulative = Vec::new();
        let mut total = 0.0;
        for rank in 1..=1000u64 {
            total += 1.0 / (rank as f64).powf(0.99);
            cumulative.push(total);
        }
        let cumulative: Vec<f64> = cumulative.iter().map(|c| c / total).collect();
        let keys = Keys::Zipf {
            cumulative: Arc::new(cumulative),
        };
        let mut random = Random::new(1);
        let mut low = 0;
        for _ in 0..10_000 {
            let id = keys.draw(&mut random);
            assert!((1..=1000).contains(&id));
            if id <= 10 {
                low += 1;
            }
        }
        // Ids 1..=10 carry about 39% of the mass with s = 0.99 over 1000 keys.
        assert!(low > 3000, "{low}");
        let uniform = Keys::Uniform { accounts: 5 };
        assert!((0..1000).all(|_| (1..=5).contains(&uniform.draw(&mut random))));
    }

    #[test]
    fn the_latency_log_has_a_header_and_a_line_per_call() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let args =
            <Command as clap::Parser>::try_parse_from(["bench", "add_money", "--rate", "100"])
                .unwrap()
                .bench;
        let origin = LogOrigin {
            instant: Instant::now(),
            monotonic_s: 12.5,
        };
        let calls = [
            CallRecord {
                start_us: 7,
                latency_us: 1200,
                write: true,
                error: None,
            },
            CallRecord {
                start_us: 9,
                latency_us: 30,
                write: false,
                error: Some("timeout"),
            },
        ];
        let mut out = Vec::new();
        write_latency_log(&mut out, &origin, &args, &calls).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("# billcl bench add_money: 64 in flight, rate 100/s;")
                && lines[0].contains("origin_monotonic_s 12.500000;"),
            "{text}"
        );
        assert_eq!(lines[1..], ["7 1200 w ok", "9 30 r timeout"]);
    }

    #[test]
    fn percentiles_pick_the_sample_at_or_above_the_rank() {
        let sorted: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 0.5), 0.5);
        assert_eq!(percentile(&sorted, 0.99), 0.99);
        assert_eq!(percentile(&sorted, 1.0), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
