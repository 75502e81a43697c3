//! A real cluster for whole-system tests: a generated cluster.toml on free 127.0.0.1 ports
//! (picked at run time: [`free_udp_port`]) in a temp dir, driven through the real `billcl`
//! binary. On drop it kills exactly the processes this cluster started (their pid files,
//! checked against /proc to still be `billcl run` of this cluster's config).

#![allow(dead_code)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct Instance {
    pub name: String,
    pub replicaset: Option<String>,
    pub address: String,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub instances: Vec<Instance>,
}

/// The result of one `billcl` invocation.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} stdout={:?} stderr={:?}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// A free UDP port on 127.0.0.1 for an instance, not handed out before by this test process.
///
/// Chosen below the kernel's ephemeral range: every instance binds its outgoing QUIC endpoint
/// to port 0, so a port picked from that range and released could be given to some other
/// cluster's process before the instance it was picked for binds it (a test once failed
/// with `Address already in use` that way). Below the range only these tests pick ports, and
/// each is picked once per process, as free at that moment.
fn free_udp_port() -> u16 {
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_from.max(10_001));
    let mut handed_out = HANDED_OUT.lock().unwrap();
    // A different start per process and call; then upwards from it.
    let seed = std::process::id() as usize * 7919 + handed_out.len() * 104_729;
    let span = usize::from(high - low);
    for step in 0..span {
        let port = low + ((seed + step) % span) as u16;
        if handed_out.contains(&port) || UdpSocket::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        handed_out.push(port);
        return port;
    }
    panic!("no free UDP port on 127.0.0.1 in {low}..{high}");
}

/// The `billcl` binary under test: cargo's, or `BILLCL_TEST_EXE` (e.g. a copy kept apart
/// from rebuilds while a flaky test is run in a loop).
pub fn billcl_exe() -> String {
    std::env::var("BILLCL_TEST_EXE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_billcl").to_string())
}

impl TestCluster {
    /// `replicasets`: (name, [(instance, voter)]). One router `router-1`.
    pub fn new(replicasets: &[(&str, &[(&str, bool)])], extra: &str) -> TestCluster {
        TestCluster::with_replication(replicasets, "", extra)
    }

    /// Like [`TestCluster::new`], with `replication` (lines such as `sync = "write"`) added to
    /// the `[replication]` section.
    pub fn with_replication(
        replicasets: &[(&str, &[(&str, bool)])],
        replication: &str,
        extra: &str,
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from(
            "[cluster]\nname = \"test\"\nbucket_count = 1000\ndata_dir = \"data\"\n\n\
             [replication]\nheartbeat_ms = 100\nelection_timeout_ms = 1000\n",
        );
        text.push_str(replication);
        text.push_str("\n\n[limits]\nrequest_timeout_ms = 2000\n\n");
        text.push_str(extra);
        let mut instances = Vec::new();
        let router_address = format!("127.0.0.1:{}", free_udp_port());
        text.push_str(&format!(
            "[routers.router-1]\naddress = \"{router_address}\"\n\n"
        ));
        instances.push(Instance {
            name: "router-1".into(),
            replicaset: None,
            address: router_address,
        });
        for (replicaset, members) in replicasets {
            text.push_str(&replicaset_toml(replicaset));
            for (name, voter) in members.iter() {
                let address = format!("127.0.0.1:{}", free_udp_port());
                text.push_str(&instance_toml(replicaset, name, &address, *voter));
                instances.push(Instance {
                    name: name.to_string(),
                    replicaset: Some(replicaset.to_string()),
                    address,
                });
            }
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, text).unwrap();
        TestCluster {
            dir,
            config,
            instances,
        }
    }

    /// The seed topology: storage-a and storage-b, a voter and a learner each.
    pub fn seed() -> TestCluster {
        TestCluster::new(
            &[
                (
                    "storage-a",
                    &[("storage-a-001", true), ("storage-a-002", false)],
                ),
                (
                    "storage-b",
                    &[("storage-b-001", true), ("storage-b-002", false)],
                ),
            ],
            "",
        )
    }

    /// Adds a replicaset of weight 1 with one voter `instance` on a fresh port to the cluster
    /// file (the instances already running read the file at their next start).
    pub fn add_replicaset(&mut self, name: &str, instance: &str) {
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push('\n');
        text.push_str(&replicaset_toml(name));
        std::fs::write(&self.config, text).unwrap();
        self.add_instance(name, instance, true);
    }

    /// Adds instance `name` (a voter or a learner) on a fresh port to replicaset `replicaset`
    /// in the cluster file (the instances already running read the file at their next start).
    pub fn add_instance(&mut self, replicaset: &str, name: &str, voter: bool) {
        let address = format!("127.0.0.1:{}", free_udp_port());
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push('\n');
        text.push_str(&instance_toml(replicaset, name, &address, voter));
        std::fs::write(&self.config, text).unwrap();
        self.instances.push(Instance {
            name: name.to_string(),
            replicaset: Some(replicaset.to_string()),
            address,
        });
    }

    /// Gives instance `name` a fresh port in the cluster file (it listens there once it
    /// restarts); answers the new address.
    pub fn move_instance(&mut self, name: &str) -> String {
        let address = format!("127.0.0.1:{}", free_udp_port());
        let instance = self.instances.iter_mut().find(|i| i.name == name).unwrap();
        let text = std::fs::read_to_string(&self.config).unwrap();
        let old = format!("address = \"{}\"", instance.address);
        assert_eq!(text.matches(&old).count(), 1, "{old} in {text}");
        let text = text.replace(&old, &format!("address = \"{address}\""));
        std::fs::write(&self.config, text).unwrap();
        instance.address = address.clone();
        address
    }

    /// Adds a router `name` on a fresh port to the cluster file (before `start`); clients pick
    /// one with `billcl --router NAME`.
    pub fn add_router(&mut self, name: &str) {
        let address = format!("127.0.0.1:{}", free_udp_port());
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(&format!("\n[routers.{name}]\naddress = \"{address}\"\n"));
        std::fs::write(&self.config, text).unwrap();
        self.instances.push(Instance {
            name: name.to_string(),
            replicaset: None,
            address,
        });
    }

    /// The address of instance `name`.
    pub fn address_of(&self, name: &str) -> std::net::SocketAddr {
        let instance = self.instances.iter().find(|i| i.name == name);
        let instance = instance.unwrap_or_else(|| panic!("no instance {name}"));
        instance.address.parse().unwrap()
    }

    /// Run `billcl --config CONFIG ARGS…`, killed if it takes over two minutes.
    pub fn billcl(&self, args: &[&str]) -> Run {
        self.billcl_fed(args, None)
    }

    /// Like [`TestCluster::billcl`], with `input` (if any) as its standard input, which is
    /// then closed.
    pub fn billcl_fed(&self, args: &[&str], input: Option<&str>) -> Run {
        let mut command = Command::new(billcl_exe());
        command
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if input.is_some() {
            command.stdin(std::process::Stdio::piped());
        }
        let mut child = command.spawn().unwrap();
        if let Some(input) = input {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.as_bytes()).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if child.try_wait().unwrap().is_some() {
                return Run::from(child.wait_with_output().unwrap());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let run = Run::from(child.wait_with_output().unwrap());
                panic!("billcl {args:?} hung for two minutes: {run:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like `billcl`, but the command must succeed; returns stdout trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let run = self.billcl(args);
        assert!(run.ok, "billcl {args:?} failed: {run:?}");
        run.stdout.trim().to_string()
    }

    /// Like `billcl`, but the command must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let run = self.billcl(args);
        assert!(!run.ok, "billcl {args:?} should have failed: {run:?}");
        run.stderr
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid_of(&self, instance: &str) -> Option<i32> {
        let path = self
            .data_dir()
            .join(instance)
            .join(format!("{instance}.pid"));
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Asserts that `instance` still runs as the process `before` ([`Self::pid_of`] read
    /// earlier): whatever happened since did not restart it.
    pub fn assert_not_restarted(&self, instance: &str, before: Option<i32>) {
        assert!(before.is_some(), "{instance} did not run to begin with");
        assert_eq!(
            self.pid_of(instance),
            before,
            "{instance} was restarted (or stopped)"
        );
    }

    /// The lowest and the highest nice value among an instance's threads (`None` if it does
    /// not run).
    pub fn nice_of(&self, instance: &str) -> Option<(i32, i32)> {
        let pid = self.pid_of(instance)?;
        let mut nices = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            nices.push(stat_nice(&entry.ok()?.path().join("stat"))?);
        }
        Some((*nices.iter().min()?, *nices.iter().max()?))
    }

    /// Waits until `instance`'s threads run at `nice` (a snapshot thread, if one runs, at
    /// least at 10).
    pub fn wait_nice(&self, instance: &str, nice: i32) {
        self.wait_for(
            &format!("{instance}'s threads to run at nice {nice}"),
            10,
            || {
                let (lowest, highest) = self.nice_of(instance)?;
                (lowest == nice && highest <= nice.max(10)).then_some(())
            },
        );
    }

    /// Whether `pid` is a live `billcl run` process of this cluster's config.
    pub fn is_ours(&self, pid: i32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let config = self.config.to_string_lossy();
        let text = String::from_utf8_lossy(&cmdline);
        text.contains(config.as_ref()) && text.contains("run")
    }

    /// Sends `signal` to one instance this cluster started (SIGSTOP 19, SIGCONT 18 on Linux).
    pub fn signal(&self, instance: &str, signal: i32) {
        let pid = self.pid_of(instance).expect("instance has a pid file");
        assert!(self.is_ours(pid), "pid {pid} is not ours");
        assert_eq!(unsafe { libc_kill(pid, signal) }, 0, "kill -{signal} {pid}");
    }

    /// kill -9 one instance this cluster started.
    pub fn kill9(&self, instance: &str) {
        let pid = self.pid_of(instance).expect("instance has a pid file");
        assert!(self.is_ours(pid), "pid {pid} is not ours");
        unsafe { libc_kill(pid, 9) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Poll `check` every 200 ms until it returns Some, or panic after `seconds`.
    pub fn wait_for<T>(&self, what: &str, seconds: u64, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            if let Some(value) = check() {
                return value;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .instances
                    .iter()
                    .map(|i| {
                        let log = self
                            .data_dir()
                            .join(&i.name)
                            .join(format!("{}.log", i.name));
                        let text = std::fs::read_to_string(log).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(15).collect();
                        format!(
                            "--- {} ---\n{}",
                            i.name,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!("timed out waiting for {what}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An SDK client of this cluster's routers (its CA, the client identity), named `caller`.
    pub async fn client(&self, caller: &str) -> billcl_client::Client {
        let config = billcl_host::config::ClusterConfig::load(&self.config).unwrap();
        let mut client_config = billcl_client::ClientConfig::new(
            config.router_addresses(),
            billcl_host::tls::ca_pem(&config).unwrap(),
        );
        client_config.identity =
            Some(billcl_host::tls::identity(&config, billcl_host::tls::CLIENT_IDENTITY).unwrap());
        // The router gives up after request_timeout_ms (2 s in tests) and says why.
        client_config.timeout = Duration::from_secs(5);
        client_config.caller = caller.into();
        billcl_client::Client::connect(client_config).await.unwrap()
    }

    /// Start every instance, wait until ready, bootstrap, and create the seed's accounts.
    pub fn start_seeded(&self) {
        self.ok(&["start"]);
        self.wait_ready();
        self.ok(&["bootstrap"]);
        self.ok(&["call", "insert_data"]);
    }

    /// Wait until every replicaset has a leader and serves the built-in procedures.
    pub fn wait_ready(&self) {
        self.wait_for(
            "every replicaset to elect a leader and list its procedures",
            90,
            || {
                let run = self.billcl(&["info", "--json"]);
                if !run.ok {
                    return None;
                }
                let info: serde_json::Value = serde_json::from_str(&run.stdout).ok()?;
                let all_led = info["replicasets"]
                    .as_array()?
                    .iter()
                    .all(|r| !r["leader"].is_null());
                let procedures = self.billcl(&["procedures"]);
                (all_led && procedures.ok && procedures.stdout.contains("add-money")).then_some(())
            },
        );
    }
}

/// A runtime of two workers for a test's SDK clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The cluster file's table of a replicaset, of weight 1.
fn replicaset_toml(replicaset: &str) -> String {
    format!("[replicasets.{replicaset}]\nweight = 1\n\n")
}

/// The cluster file's table of one instance of `replicaset`.
fn instance_toml(replicaset: &str, name: &str, address: &str, voter: bool) -> String {
    format!(
        "[replicasets.{replicaset}.instances.{name}]\naddress = \"{address}\"\nvoter = {voter}\n\n"
    )
}

/// The nice value in a `/proc/…/stat` file.
pub fn stat_nice(path: &Path) -> Option<i32> {
    billcl_host::process::stat_nice(&std::fs::read_to_string(path).ok()?)
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for instance in &self.instances {
            if let Some(pid) = self.pid_of(&instance.name) {
                if self.is_ours(pid) {
                    unsafe { libc_kill(pid, 9) };
                }
            }
        }
        // For a post-mortem: BILLCL_TEST_KEEP=1 keeps a failed test's cluster directory,
        // BILLCL_TEST_KEEP=all every test's.
        let keep = std::env::var("BILLCL_TEST_KEEP").unwrap_or_default();
        if keep == "all" || (!keep.is_empty() && std::thread::panicking()) {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("kept the cluster directory {}", dir.keep().display());
        }
    }
}
