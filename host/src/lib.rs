//! billcl-host: the node program. One binary, `billcl`, is both an instance of the
//! cluster (a router or a storage, `billcl run NAME`) and the tool that manages and
//! talks to the cluster (`start`, `info`, `call`, …), as `tarantool` and `tt` were.
//!
//! Bottom-up: [`config`] reads cluster.toml; [`tls`] holds the cluster CA;
//! [`state`] is the sans-I/O replicated state and its log commands; [`storage`] runs a
//! replicaset member (Raft via billcl-replication, procedures via billcl-runtime);
//! [`router`] routes calls by bucket; [`node`] runs one instance; [`process`] and
//! [`cli`] are the command line.

pub mod backup;
pub mod batch;
pub mod bench;
pub mod cat;
pub mod cli;
pub mod cluster_file;
pub mod config;
pub mod cpu_usage;
pub mod depletion;
pub mod deploy;
pub mod failover;
pub mod identity;
pub mod instance_log;
pub mod node;
pub mod priority;
pub mod process;
pub mod rebalance;
pub mod reload;
pub mod rolling;
pub mod router;
pub mod state;
pub mod stats;
pub mod storage;
pub mod tls;
pub mod verify;
