//! The typed cluster configuration: one `cluster.toml` describes every instance of a
//! cluster (routers, replicasets and their members), the replication and sandbox
//! limits, and where data lives. Every process of the cluster reads the same file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use billcl_replication::SyncMode;
use serde::Deserialize;

/// The file name looked for when `--config` is not given.
pub const CONFIG_FILE_NAME: &str = "cluster.toml";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    #[serde(default)]
    pub replication: ReplicationSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub rebalancer: RebalancerSection,
    #[serde(default)]
    pub routers: BTreeMap<String, RouterConfig>,
    #[serde(default)]
    pub replicasets: BTreeMap<String, ReplicasetConfig>,
    /// The file this was read from (not in the file).
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_bucket_count")]
    pub bucket_count: u32,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSection {
    #[serde(default)]
    pub sync: SyncMode,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: u64,
    #[serde(default = "default_snapshot_entries")]
    pub snapshot_entries: u64,
    #[serde(default = "default_learner_batch_ms")]
    pub learner_batch_ms: u64,
    /// The nice value (0..=19) a learner's threads run at (`crate::priority`).
    #[serde(default = "default_learner_nice")]
    pub learner_nice: i32,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            sync: SyncMode::default(),
            heartbeat_ms: default_heartbeat_ms(),
            election_timeout_ms: default_election_timeout_ms(),
            snapshot_entries: default_snapshot_entries(),
            learner_batch_ms: default_learner_batch_ms(),
            learner_nice: default_learner_nice(),
        }
    }
}

/// `[rebalancer]`: moving buckets by weight without being asked, as vshard's rebalancer does
/// (`billcl rebalance` does it on demand either way).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebalancerSection {
    /// Whether the first router (by name) looks for buckets to move by itself.
    #[serde(default = "default_rebalancer_enabled")]
    pub enabled: bool,
    /// How often it looks, in ms.
    #[serde(default = "default_rebalancer_interval_ms")]
    pub interval_ms: u64,
    /// It moves buckets only when some replicaset's count differs from its weight's share by
    /// more than this percent of that share (vshard's `rebalancer_disbalance_threshold`), and
    /// then moves them to the exact shares. `billcl rebalance` ignores it.
    #[serde(
        default = "default_disbalance_threshold_percent",
        deserialize_with = "integer_or_float"
    )]
    pub disbalance_threshold_percent: f64,
}

impl Default for RebalancerSection {
    fn default() -> Self {
        RebalancerSection {
            enabled: default_rebalancer_enabled(),
            interval_ms: default_rebalancer_interval_ms(),
            disbalance_threshold_percent: default_disbalance_threshold_percent(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    #[serde(default = "default_call_fuel_max")]
    pub call_fuel_max: u64,
    #[serde(default = "default_guest_memory_bytes_max")]
    pub guest_memory_bytes_max: usize,
    #[serde(default = "default_module_bytes_max")]
    pub module_bytes_max: usize,
    #[serde(default = "default_result_bytes_max")]
    pub result_bytes_max: usize,
    #[serde(default = "default_in_flight_max")]
    pub in_flight_max: u32,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            call_fuel_max: default_call_fuel_max(),
            guest_memory_bytes_max: default_guest_memory_bytes_max(),
            module_bytes_max: default_module_bytes_max(),
            result_bytes_max: default_result_bytes_max(),
            in_flight_max: default_in_flight_max(),
            request_timeout_ms: default_request_timeout_ms(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasetConfig {
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub instances: BTreeMap<String, InstanceConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    pub address: SocketAddr,
    #[serde(default = "default_voter")]
    pub voter: bool,
    /// Its Raft node id in its replicaset; by default its 1-based position there by name. An
    /// instance added whose name sorts before others' renumbers them, so set it on every
    /// instance of the replicaset then, each to the id it had (a member's data records the id
    /// it was written with, and it refuses to start as another).
    #[serde(default)]
    pub node_id: Option<u64>,
}

impl ReplicasetConfig {
    /// Each instance with its Raft node id (its `node_id`, or else its 1-based position by
    /// name), in name order.
    pub fn with_node_ids(&self) -> impl Iterator<Item = (u64, &String, &InstanceConfig)> {
        self.instances
            .iter()
            .enumerate()
            .map(|(index, (name, instance))| {
                (instance.node_id.unwrap_or(index as u64 + 1), name, instance)
            })
    }
}

/// What one named instance is, resolved from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Router {
        address: SocketAddr,
    },
    Storage {
        replicaset: String,
        /// 1-based position of the instance in its replicaset, by name: its Raft node id.
        node_id: u64,
        address: SocketAddr,
        voter: bool,
    },
}

/// One instance of the cluster, as listed by `billcl status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub role: Role,
}

impl Instance {
    pub fn address(&self) -> SocketAddr {
        match &self.role {
            Role::Router { address } => *address,
            Role::Storage { address, .. } => *address,
        }
    }
}

impl ClusterConfig {
    /// Read and check a cluster file.
    pub fn load(path: &Path) -> Result<ClusterConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read cluster config {}", path.display()))?;
        let mut config: ClusterConfig = toml::from_str(&text)
            .with_context(|| format!("cluster config {} is not valid", path.display()))?;
        config.path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        config.check()?;
        Ok(config)
    }

    /// Find the config: the given path, else `$BILLCL_CONFIG`, else `cluster.toml` in the
    /// current directory or the nearest parent that has one.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
        if let Some(path) = explicit {
            return Ok(path.to_path_buf());
        }
        if let Some(path) = std::env::var_os("BILLCL_CONFIG") {
            return Ok(PathBuf::from(path));
        }
        let mut dir = std::env::current_dir()?;
        loop {
            let candidate = dir.join(CONFIG_FILE_NAME);
            if candidate.is_file() {
                return Ok(candidate);
            }
            if !dir.pop() {
                bail!(
                    "no {CONFIG_FILE_NAME} here or in any parent directory; \
                     pass --config PATH or set BILLCL_CONFIG"
                );
            }
        }
    }

    fn check(&self) -> Result<()> {
        if self.cluster.bucket_count == 0 {
            bail!("cluster.bucket_count must be > 0");
        }
        let replication = &self.replication;
        billcl_replication::check_learner_batch_ms(
            replication.learner_batch_ms,
            replication.heartbeat_ms,
        )
        .map_err(|reason| anyhow::anyhow!("[replication] {reason}"))?;
        if !(0..=19).contains(&replication.learner_nice) {
            bail!(
                "[replication] learner_nice must be 0..=19 (a nice value; 0 runs learners at the \
                 priority of the other instances), got {}",
                replication.learner_nice
            );
        }
        if self.rebalancer.interval_ms < 100 {
            bail!(
                "[rebalancer] interval_ms must be >= 100, got {}",
                self.rebalancer.interval_ms
            );
        }
        let threshold = self.rebalancer.disbalance_threshold_percent;
        if !(0.0..=100.0).contains(&threshold) {
            bail!("[rebalancer] disbalance_threshold_percent must be 0..=100, got {threshold}");
        }
        if self.routers.is_empty() {
            bail!("the cluster has no router: add a [routers.NAME] section with an address");
        }
        if self.replicasets.is_empty() {
            bail!("the cluster has no replicaset: add a [replicasets.NAME] section");
        }
        let mut names = std::collections::BTreeSet::new();
        let mut addresses = std::collections::BTreeMap::new();
        for instance in self.instances() {
            if !names.insert(instance.name.clone()) {
                bail!("instance name {} is used twice", instance.name);
            }
            if let Some(other) = addresses.insert(instance.address(), instance.name.clone()) {
                bail!(
                    "instances {} and {} have the same address {}",
                    other,
                    instance.name,
                    instance.address()
                );
            }
        }
        for (name, replicaset) in &self.replicasets {
            if replicaset.instances.is_empty() {
                bail!("replicaset {name} has no instance");
            }
            if !replicaset.instances.values().any(|instance| instance.voter) {
                bail!("replicaset {name} has no voter: mark one instance `voter = true`");
            }
            let mut ids = std::collections::BTreeMap::new();
            for (id, instance, _) in replicaset.with_node_ids() {
                if id == 0 {
                    bail!("{instance}: node_id must be >= 1");
                }
                if let Some(other) = ids.insert(id, instance) {
                    bail!(
                        "{other} and {instance} of replicaset {name} both have node id {id} (an \
                         instance's node id is its `node_id`, or else its 1-based position by \
                         name in its replicaset): give them distinct `node_id`s, and every \
                         member started before keeps the id its data was written with"
                    );
                }
            }
        }
        Ok(())
    }

    /// Every instance: routers first, then storages by replicaset and name.
    pub fn instances(&self) -> Vec<Instance> {
        let mut out = Vec::new();
        for (name, router) in &self.routers {
            out.push(Instance {
                name: name.clone(),
                role: Role::Router {
                    address: router.address,
                },
            });
        }
        for (replicaset_name, replicaset) in &self.replicasets {
            for (node_id, name, instance) in replicaset.with_node_ids() {
                out.push(Instance {
                    name: name.clone(),
                    role: Role::Storage {
                        replicaset: replicaset_name.clone(),
                        node_id,
                        address: instance.address,
                        voter: instance.voter,
                    },
                });
            }
        }
        out
    }

    pub fn instance(&self, name: &str) -> Result<Instance> {
        self.instances()
            .into_iter()
            .find(|instance| instance.name == name)
            .with_context(|| {
                let known: Vec<String> = self.instances().into_iter().map(|i| i.name).collect();
                format!(
                    "no instance {name} in {}; known: {}",
                    self.path.display(),
                    known.join(", ")
                )
            })
    }

    /// Async worker threads for instance `name` on a host with `cores` cores: the cores shared
    /// among the instances of this file that run on the same host (the same IP address as
    /// `name`), at least one. Five processes each starting a worker per core on a small
    /// machine (the default cluster: all on 127.0.0.1) spend their time waking each other
    /// across cores; one worker each cut the CPU per call by 10-15 %
    /// (docs/performance-history.md).
    /// A CPU-heavy call never holds its worker: one that outruns its inline fuel
    /// (`INLINE_CALL_FUEL`) runs again off the async workers.
    pub fn worker_threads(&self, name: &str, cores: usize) -> usize {
        let Ok(me) = self.instance(name) else {
            return cores.max(1);
        };
        let ip = me.address().ip();
        let on_this_host = self
            .instances()
            .iter()
            .filter(|instance| instance.address().ip() == ip)
            .count();
        (cores / on_this_host.max(1)).max(1)
    }

    /// The directory holding all instance data and the TLS material.
    pub fn data_dir(&self) -> PathBuf {
        let base = self.path.parent().unwrap_or(Path::new("."));
        base.join(&self.cluster.data_dir)
    }

    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.data_dir().join(name)
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir().join("tls")
    }

    /// The members of a replicaset as (node id, name, address, voter), in node id order.
    pub fn members(&self, replicaset: &str) -> Vec<(u64, String, SocketAddr, bool)> {
        let mut members: Vec<_> = self
            .replicasets
            .get(replicaset)
            .into_iter()
            .flat_map(|set| set.with_node_ids())
            .map(|(id, name, instance)| (id, name.clone(), instance.address, instance.voter))
            .collect();
        members.sort_by_key(|(id, ..)| *id);
        members
    }

    pub fn router_addresses(&self) -> Vec<SocketAddr> {
        self.routers.values().map(|router| router.address).collect()
    }
}

fn default_name() -> String {
    "billcl".to_string()
}
fn default_bucket_count() -> u32 {
    1000
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_heartbeat_ms() -> u64 {
    100
}
fn default_election_timeout_ms() -> u64 {
    1000
}
fn default_snapshot_entries() -> u64 {
    10_000
}
fn default_learner_batch_ms() -> u64 {
    2
}
fn default_rebalancer_enabled() -> bool {
    true
}
/// A number written either way in TOML (`1` or `1.0`).
fn integer_or_float<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Integer(i64),
        Float(f64),
    }
    Ok(match Number::deserialize(deserializer)? {
        Number::Integer(n) => n as f64,
        Number::Float(x) => x,
    })
}

fn default_disbalance_threshold_percent() -> f64 {
    1.0
}

fn default_rebalancer_interval_ms() -> u64 {
    5_000
}
fn default_learner_nice() -> i32 {
    crate::priority::LEARNER_NICE_DEFAULT
}
fn default_call_fuel_max() -> u64 {
    50_000_000
}
fn default_guest_memory_bytes_max() -> usize {
    64 << 20
}
fn default_module_bytes_max() -> usize {
    16 << 20
}
fn default_result_bytes_max() -> usize {
    1 << 20
}
fn default_in_flight_max() -> u32 {
    1024
}
fn default_request_timeout_ms() -> u64 {
    5000
}
fn default_weight() -> u32 {
    1
}
fn default_voter() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cluster_file_is_the_seed_topology() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml");
        let config = ClusterConfig::load(&path).unwrap();
        assert_eq!(config.cluster.bucket_count, 1000);
        let names: Vec<String> = config.instances().into_iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            [
                "router-a-001",
                "storage-a-001",
                "storage-a-002",
                "storage-b-001",
                "storage-b-002"
            ]
        );
        let leader = config.instance("storage-a-001").unwrap();
        assert!(matches!(
            leader.role,
            Role::Storage {
                node_id: 1,
                voter: true,
                ..
            }
        ));
        let replica = config.instance("storage-b-002").unwrap();
        assert!(matches!(
            replica.role,
            Role::Storage {
                node_id: 2,
                voter: false,
                ..
            }
        ));
        assert_eq!(config.replication.sync, SyncMode::Fsync);
        // Five instances on 127.0.0.1 share the cores.
        assert_eq!(config.worker_threads("storage-a-001", 2), 1);
        assert_eq!(config.worker_threads("router-a-001", 16), 3);
        assert_eq!(config.worker_threads("nobody", 4), 4);
    }

    #[test]
    fn an_instance_alone_on_its_host_gets_every_core() {
        let text = r#"
            [cluster]
            [routers.r]
            address = "10.0.0.1:1"
            [replicasets.s.instances.s1]
            address = "10.0.0.2:2"
            voter = true
            [replicasets.s.instances.s2]
            address = "10.0.0.2:3"
            voter = false
        "#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, text).unwrap();
        let config = ClusterConfig::load(&path).unwrap();
        assert_eq!(config.worker_threads("r", 8), 8);
        assert_eq!(config.worker_threads("s1", 8), 4);
        assert_eq!(config.worker_threads("s2", 1), 1);
    }

    #[test]
    fn a_replicaset_without_voters_is_refused() {
        let text = r#"
            [cluster]
            [routers.r]
            address = "127.0.0.1:1"
            [replicasets.s.instances.s1]
            address = "127.0.0.1:2"
            voter = false
        "#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, text).unwrap();
        let error = ClusterConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("no voter"), "{error}");
    }

    /// Node ids: an instance's `node_id`, or else its position by name; an instance added
    /// before the others renumbers them unless every instance has its id; two instances with
    /// one id are refused.
    #[test]
    fn node_ids_come_from_the_file_or_the_position_and_are_distinct() {
        let load = |ids: [&str; 3]| {
            let text = format!(
                "[cluster]\n[routers.r]\naddress = \"127.0.0.1:1\"\n\
                 [replicasets.s.instances.s-001]\naddress = \"127.0.0.1:2\"\n{}\n\
                 [replicasets.s.instances.s-002]\naddress = \"127.0.0.1:3\"\nvoter = false\n{}\n\
                 [replicasets.s.instances.s-000]\naddress = \"127.0.0.1:4\"\nvoter = false\n{}\n",
                ids[0], ids[1], ids[2]
            );
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("cluster.toml");
            std::fs::write(&path, text).unwrap();
            ClusterConfig::load(&path)
        };
        let ids = |config: &ClusterConfig| -> Vec<(u64, String)> {
            let members = config.members("s");
            members
                .into_iter()
                .map(|(id, name, ..)| (id, name))
                .collect()
        };
        let named = |pairs: &[(u64, &str)]| -> Vec<(u64, String)> {
            pairs
                .iter()
                .map(|(id, name)| (*id, name.to_string()))
                .collect()
        };
        // s-000 sorts first: by position it is node 1, and the others move up (what their
        // data's recorded identity refuses at start: crate::identity).
        assert_eq!(
            ids(&load(["", "", ""]).unwrap()),
            named(&[(1, "s-000"), (2, "s-001"), (3, "s-002")])
        );
        let config = load(["node_id = 1", "node_id = 2", "node_id = 3"]).unwrap();
        assert_eq!(
            ids(&config),
            named(&[(1, "s-001"), (2, "s-002"), (3, "s-000")])
        );
        let role = config.instance("s-000").unwrap().role;
        assert!(matches!(role, Role::Storage { node_id: 3, .. }), "{role:?}");
        // An id on the new instance alone: s-001 is at position 2 now, as s-000 says it is.
        let error = load(["", "", "node_id = 2"]).unwrap_err().to_string();
        assert!(
            error.contains("s-000 and s-001 of replicaset s both have node id 2"),
            "{error}"
        );
        let error = load(["", "", "node_id = 0"]).unwrap_err().to_string();
        assert!(error.contains("s-000: node_id must be >= 1"), "{error}");
    }

    /// A one-router, one-instance cluster file with `sections` added, loaded.
    fn load_with(sections: &str) -> Result<ClusterConfig> {
        let text = format!(
            "[cluster]\n{sections}\n[routers.r]\naddress = \"127.0.0.1:1\"\n\
             [replicasets.s.instances.s1]\naddress = \"127.0.0.1:2\"\nvoter = true\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, text).unwrap();
        ClusterConfig::load(&path)
    }

    #[test]
    fn learner_pacing_longer_than_a_quarter_heartbeat_is_refused() {
        let load = |replication: &str| load_with(&format!("[replication]\n{replication}"));
        let config = load("").unwrap();
        assert_eq!(config.replication.learner_batch_ms, 2);
        assert!(load("heartbeat_ms = 100\nlearner_batch_ms = 25").is_ok());
        let error = load("heartbeat_ms = 100\nlearner_batch_ms = 26")
            .unwrap_err()
            .to_string();
        assert!(error.contains("learner_batch_ms (26)"), "{error}");
        assert_eq!(config.replication.learner_nice, 19);
        assert_eq!(
            load("learner_nice = 0").unwrap().replication.learner_nice,
            0
        );
        for wrong in ["-1", "20"] {
            let error = load(&format!("learner_nice = {wrong}"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("learner_nice must be 0..=19"), "{error}");
        }
    }

    #[test]
    fn the_rebalancer_threshold_is_a_percent() {
        let load = |rebalancer: &str| load_with(&format!("[rebalancer]\n{rebalancer}"));
        let threshold = |config: ClusterConfig| config.rebalancer.disbalance_threshold_percent;
        assert_eq!(threshold(load("").unwrap()), 1.0);
        assert_eq!(
            threshold(load("disbalance_threshold_percent = 0").unwrap()),
            0.0
        );
        let error = load("disbalance_threshold_percent = 150.0")
            .unwrap_err()
            .to_string();
        assert!(error.contains("must be 0..=100, got 150"), "{error}");
    }
}
