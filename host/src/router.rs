//! The router role: the clients' entry point. It computes a call's bucket from its key,
//! sends the call to the replicaset that owns the bucket (its leader, or a replica for
//! replica reads), and retries transparently when its bucket map or leader guess is
//! stale. It also runs the cluster-wide verbs: `info`, `bootstrap`, `route`.
//!
//! The router holds no billing data: its bucket map and procedure catalog are caches of
//! what the storages say. The catalog is re-read when a call does not fit it (an unknown
//! name or version, arguments that do not match), when a storage refuses what it accepted,
//! after a deploy or rollback through this router, and in the background once it is older
//! than [`CATALOG_STALE_MS_MAX`]: a deploy through another router is seen within that bound.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use billcl_client::{Peer, Reply};
use billcl_proto::bucket::{bucket_id, Key};
use billcl_proto::message::{
    Call, ErrorCode, ErrorReply, ProcedureInfo, ReadMode, Request, Response,
};
use billcl_proto::{find_procedure, ProcedureKind, Value};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde_json::json;

use crate::config::{ClusterConfig, InstanceConfig, ReplicasetConfig};
use crate::state::split_buckets;
use crate::storage::error;

/// Room a call's answer takes in a batch answer besides its result (frame, tags, error text).
const BATCH_ANSWER_OVERHEAD_BYTES: usize = 4 * 1024;

/// Calls in one router → storage batch at most: [`CALL_BATCH_MAX`], fewer when that many
/// results of `result_bytes_max` each could make the batch's answer outgrow one frame
/// (`FRAME_BYTES_MAX`), which would fail every call of a `CallBatch`. Routers send
/// `CallStream`s, answered a frame per call, but keep the bound: it also bounds what one
/// batch can make a storage hold at once.
///
/// [`CALL_BATCH_MAX`]: billcl_proto::message::CALL_BATCH_MAX
fn member_batch_calls_max(result_bytes_max: usize) -> usize {
    let room = billcl_proto::frame::FRAME_BYTES_MAX
        / result_bytes_max.saturating_add(BATCH_ANSWER_OVERHEAD_BYTES);
    room.clamp(1, billcl_proto::message::CALL_BATCH_MAX)
}

/// How long a starting router keeps trying to connect to every storage member
/// ([`Router::dial_members`]).
pub const MEMBER_WARM_UP_MS: u64 = 30_000;
/// Each of those tries waits this long for its handshake, then pauses as long: less than the
/// handshake timeout, so that a member still starting is not marked down.
pub const MEMBER_WARM_UP_DIAL_MS: u64 = 500;
/// How many times a call is re-sent after a stale-map or not-leader answer.
pub const CALL_ATTEMPTS_MAX: usize = 4;
/// Call batches in flight to one storage member at once; calls routed to it meanwhile form
/// the next batch.
pub const MEMBER_BATCHES_IN_FLIGHT_MAX: usize = 2;
/// How long a router uses its cached procedure catalog before it re-reads it from the
/// storages (in the background, while calls still use the cached one). A call that does not
/// fit the cached catalog re-reads it at once; this bounds what may otherwise go unseen, e.g.
/// whether a procedure that a deploy through another router changed is now a query or a
/// command (which decides whether a timed-out call is retried).
pub const CATALOG_STALE_MS_MAX: u64 = 2_000;

/// The router's copy of the storages' catalog (every deployed version's procedures, active
/// ones first). Sans-I/O: time comes in as an argument.
///
/// Invariants: `read_at` is `None` until a read is stored and after [`forget`]; a read is
/// stored only if no `forget` happened since it began (`generation` unchanged), so a read
/// that started before a deploy never passes for one made after it.
///
/// [`forget`]: CatalogCache::forget
#[derive(Default)]
struct CatalogCache {
    /// Shared with the calls that use an entry: no copy of a signature per call.
    procedures: Vec<Arc<ProcedureInfo>>,
    read_at: Option<Instant>,
    generation: u64,
}

/// What the cache knows of the procedure a call names.
#[derive(Debug, PartialEq)]
enum Cached {
    /// Read less than [`CATALOG_STALE_MS_MAX`] ago.
    Fresh(Arc<ProcedureInfo>),
    /// Usable, but time to re-read the catalog.
    Stale(Arc<ProcedureInfo>),
    /// Not in the catalog, or no catalog: read it before answering.
    Missing,
}

impl CatalogCache {
    fn find(&self, name: &str, version: Option<u32>, now: Instant) -> Cached {
        let Some(read_at) = self.read_at else {
            return Cached::Missing;
        };
        match find_procedure(&self.procedures, name, version) {
            Err(_) => Cached::Missing,
            Ok(info)
                if now.saturating_duration_since(read_at).as_millis()
                    < u128::from(CATALOG_STALE_MS_MAX) =>
            {
                Cached::Fresh(info.clone())
            }
            Ok(info) => Cached::Stale(info.clone()),
        }
    }

    /// Starts a read: pass the result to [`CatalogCache::store`].
    fn begin_read(&self) -> u64 {
        self.generation
    }

    /// Stores a read begun at `generation`, unless the cache was forgotten since.
    fn store(&mut self, generation: u64, procedures: Vec<ProcedureInfo>, now: Instant) -> bool {
        if generation != self.generation {
            return false;
        }
        self.procedures = procedures.into_iter().map(Arc::new).collect();
        self.read_at = Some(now);
        true
    }

    fn forget(&mut self) {
        self.generation += 1;
        self.read_at = None;
    }
}

struct MemberLink {
    name: String,
    /// Whether it votes, as last heard: from the cluster file, then from each `status` it
    /// answers (a failover changes the membership while the router runs).
    voter: Arc<AtomicBool>,
    peer: Peer,
    /// Calls to this member go through here: batched on one stream under load.
    batcher: billcl_client::CallBatcher,
}

struct ReplicasetLink {
    name: String,
    weight: u32,
    /// In the cluster file's order at start, then those a reload added: a position changes
    /// only when a reload removes a member (its link then gets a new `leader`), so `leader`
    /// stays true across other reloads.
    members: Vec<Arc<MemberLink>>,
    /// Index into `members` of the believed leader.
    leader: Arc<AtomicUsize>,
    /// The leader its members named when the last search found none among `members`: one
    /// added to the cluster file after this router read it (`billcl reload`).
    unknown_leader: Arc<Mutex<Option<String>>>,
    /// Round-robin position for balanced replica reads.
    next_read: AtomicUsize,
}

/// The replicasets a router routes to: the cluster file's at start, then those a reload
/// added, appended, so that a position (the bucket map's) means the same replicaset for the
/// router's whole life. A reload replaces the whole list; a call keeps the one it read.
type Replicasets = Arc<[Arc<ReplicasetLink>]>;

pub struct Router {
    bucket_count: u32,
    /// A call gives up (with the last error) once this has passed since it arrived.
    call_timeout: Duration,
    replicasets: RwLock<Replicasets>,
    /// What a link to a member is made with (a reload adds members).
    endpoint: quinn::Endpoint,
    member_batch_calls_max: usize,
    /// The cluster file as this router applies it: as read at start, with the replicasets of
    /// each reload since. Held through a reload: one at a time.
    applied: tokio::sync::Mutex<ClusterConfig>,
    /// bucket id -> index into `replicasets`; index 0 unused.
    bucket_map: RwLock<Vec<Option<usize>>>,
    /// One bucket discovery at a time; a caller that waited for another's sees its map.
    discovering: tokio::sync::Mutex<()>,
    /// Bumped by every discovery that rebuilt the map.
    map_generation: AtomicUsize,
    /// Whether the last discovery saw a bucket being sent (a move under way or cut short).
    sending_seen: AtomicBool,
    /// One rebalance at a time on this router (the background rebalancer and `billcl
    /// rebalance`).
    pub(crate) rebalancing: tokio::sync::Mutex<()>,
    /// Buckets a move found too large to move, and when: the planner leaves them where they
    /// are (moving others instead) for [`crate::rebalance::UNMOVABLE_RETRY`].
    pub(crate) unmovable: Mutex<BTreeMap<u32, Instant>>,
    catalog: RwLock<CatalogCache>,
    /// A background catalog read is under way (at most one at a time).
    catalog_refreshing: AtomicBool,
    /// What its server counts (the `stats` verb).
    pub stats: Arc<billcl_client::ServerStats>,
}

impl Router {
    pub fn new(config: &ClusterConfig, endpoint: quinn::Endpoint) -> Router {
        let mut router = Router {
            bucket_count: config.cluster.bucket_count,
            call_timeout: Duration::from_millis(config.limits.request_timeout_ms),
            replicasets: RwLock::new(Arc::new([])),
            endpoint,
            member_batch_calls_max: member_batch_calls_max(config.limits.result_bytes_max),
            applied: tokio::sync::Mutex::new(config.clone()),
            bucket_map: RwLock::new(vec![None; config.cluster.bucket_count as usize + 1]),
            discovering: tokio::sync::Mutex::new(()),
            map_generation: AtomicUsize::new(0),
            sending_seen: AtomicBool::new(false),
            rebalancing: tokio::sync::Mutex::new(()),
            unmovable: Mutex::new(BTreeMap::new()),
            catalog: RwLock::new(CatalogCache::default()),
            catalog_refreshing: AtomicBool::new(false),
            stats: Arc::default(),
        };
        let replicasets: Vec<Arc<ReplicasetLink>> = config
            .replicasets
            .iter()
            .map(|(name, replicaset)| Arc::new(router.replicaset_link(name, replicaset)))
            .collect();
        router.replicasets = RwLock::new(replicasets.into());
        router
    }

    /// The replicasets as they are now (a reload may replace them meanwhile).
    fn replicasets(&self) -> Replicasets {
        self.replicasets.read().unwrap().clone()
    }

    /// A link to a replicaset of the cluster file, its members in the file's order.
    fn replicaset_link(&self, name: &str, replicaset: &ReplicasetConfig) -> ReplicasetLink {
        ReplicasetLink {
            name: name.to_string(),
            weight: replicaset.weight,
            members: replicaset
                .instances
                .iter()
                .map(|(member, instance)| self.member_link(member, instance))
                .collect(),
            leader: Arc::new(AtomicUsize::new(0)),
            unknown_leader: Arc::default(),
            next_read: AtomicUsize::new(0),
        }
    }

    fn member_link(&self, name: &str, instance: &InstanceConfig) -> Arc<MemberLink> {
        let peer = Peer::new(
            self.endpoint.clone(),
            instance.address,
            crate::tls::SERVER_NAME.to_string(),
            self.call_timeout,
        );
        Arc::new(MemberLink {
            name: name.to_string(),
            voter: Arc::new(AtomicBool::new(instance.voter)),
            batcher: billcl_client::CallBatcher::start(
                peer.clone(),
                self.member_batch_calls_max,
                MEMBER_BATCHES_IN_FLIGHT_MAX,
                // A storage answers its reads without waiting for the batch's writes, which
                // commit together.
                billcl_client::Answers::AsReady,
            ),
            peer,
        })
    }

    pub async fn handle(self: Arc<Self>, request: Request) -> Reply {
        let result = match request {
            Request::CallStream(calls) => return self.call_stream(calls),
            Request::Call(call) => self.call(call).await.map(Response::Value),
            Request::Procedures => self.procedures().await.map(Response::Procedures),
            Request::Admin { verb, body } => self
                .admin(&verb, &body)
                .await
                .map(|json| Response::Admin(json.to_string())),
            Request::Raft(_) => Err(error(
                ErrorCode::BadRequest,
                "a router takes no raft messages; send them to a storage",
            )),
            Request::CallBatch(calls) => self.call_batch(calls).await,
            Request::Deploy { name, bytes } => crate::deploy::router_deploy(&self, name, bytes)
                .await
                .map(|json| Response::Admin(json.to_string())),
        };
        result.unwrap_or_else(Response::Error).into()
    }

    /// A client's streamed batch (docs/protocol.md, "CallStream"): each call runs as if it came
    /// alone, all at once (the calls for one storage member meet again in that member's
    /// batcher), and each answer goes back as soon as its call is done: a call to one
    /// replicaset does not wait for another's.
    fn call_stream(self: Arc<Self>, calls: Vec<Call>) -> Reply {
        if let Err(reply) = client_batch_size(calls.len()) {
            return Reply::One(Response::Error(reply));
        }
        let calls: FuturesUnordered<_> = calls
            .into_iter()
            .zip(0u32..)
            .map(|(call, index)| {
                let router = self.clone();
                async move { (index, router.answer(call).await) }
            })
            .collect();
        Reply::Answers(calls.boxed())
    }

    /// A client's batch of calls (docs/protocol.md, "CallBatch"): each call runs as if it
    /// came alone, all at once (the calls for one storage member meet again in that member's
    /// batcher), and the answers go back in order in one `Batch`.
    async fn call_batch(self: Arc<Self>, calls: Vec<Call>) -> Result<Response, ErrorReply> {
        client_batch_size(calls.len())?;
        // Concurrently within this task (a task per call cost its allocation and scheduling).
        let calls = calls.into_iter().map(|call| self.answer(call));
        Ok(Response::Batch(futures_util::future::join_all(calls).await))
    }

    /// One call of a client's batch, as if it came alone: its value or its error.
    async fn answer(self: &Arc<Self>, call: Call) -> Response {
        self.call(call)
            .await
            .map_or_else(Response::Error, Response::Value)
    }

    /// Every replicaset's leader, found afresh: `(replicaset, leader, peer)`. An error naming
    /// the replicasets without a reachable leader if any has none (deploys go everywhere or
    /// nowhere).
    pub(crate) async fn leaders(&self) -> Result<Vec<(String, String, Peer)>, ErrorReply> {
        let mut leaders = Vec::new();
        let mut missing = Vec::new();
        for replicaset in self.replicasets().iter() {
            match self.leader_of(&replicaset.name).await {
                Some((name, peer)) => leaders.push((replicaset.name.clone(), name, peer)),
                None => missing.push(replicaset.name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(error(
                ErrorCode::Unavailable,
                format!(
                    "{} {} no reachable leader; nothing was changed (this goes to every \
                     replicaset or to none, so module versions never diverge): retry once \
                     `billcl info` shows a leader everywhere",
                    missing.join(", "),
                    if missing.len() == 1 { "has" } else { "have" }
                ),
            ));
        }
        Ok(leaders)
    }

    /// The leader of the named replicaset, found afresh, if one answers.
    pub(crate) async fn leader_of(&self, replicaset: &str) -> Option<(String, Peer)> {
        let replicasets = self.replicasets();
        let link = replicasets.iter().find(|r| r.name == replicaset)?;
        let index = self.find_leader(link).await?;
        let member = &link.members[index];
        admin_request(&member.peer, "ping", "{}").await.ok()?;
        Some((member.name.clone(), member.peer.clone()))
    }

    /// Every storage instance: `(replicaset, instance, peer)`.
    pub(crate) fn storages(&self) -> Vec<(String, String, Peer)> {
        self.replicasets()
            .iter()
            .flat_map(|replicaset| {
                replicaset.members.iter().map(|member| {
                    (
                        replicaset.name.clone(),
                        member.name.clone(),
                        member.peer.clone(),
                    )
                })
            })
            .collect()
    }

    /// Dials every storage member in the background (the router's start): one that stops
    /// later then says so as it closes the connection, and the router knows it is down at
    /// once, even a member it has not sent a request yet (a catalog read or a replica read asks
    /// every replicaset: with a replicaset stopped, the first call of a healthy one's key took
    /// a second, the dial of the stopped learner the router had never talked to). Members may
    /// still be starting (`billcl start` starts the router first), so each is tried with short
    /// dials that mark nothing ([`MEMBER_WARM_UP_DIAL_MS`]) for [`MEMBER_WARM_UP_MS`]; one not
    /// up by then is dialled by the first request that needs it. Keep-alives hold the
    /// connections.
    pub fn dial_members(&self) {
        let replicasets = self.replicasets();
        dial_in_background(replicasets.iter().flat_map(|r| r.members.iter()));
    }

    /// Drop the cached procedure catalog (after a deploy or rollback changed it).
    pub(crate) fn forget_catalog(&self) {
        self.catalog.write().unwrap().forget();
    }

    /// The replicaset that holds `bucket` as this router last heard, if it knows one.
    pub(crate) fn owner_of(&self, bucket: u32) -> Option<String> {
        let owner = self.bucket_map.read().unwrap()[bucket as usize]?;
        Some(self.replicasets()[owner].name.clone())
    }

    pub(crate) fn bucket_count(&self) -> u32 {
        self.bucket_count
    }

    /// Whether the cached bucket map says there is nothing to move: every bucket known, none
    /// being sent at the last discovery, and each replicaset holding its weight's share. Asks
    /// nothing of the storages, so the background rebalancer stays off the network (and off
    /// a down replicaset's links) while the cluster is balanced.
    pub(crate) fn looks_balanced(&self, threshold_percent: f64) -> bool {
        if self.sending_seen.load(Ordering::Relaxed) {
            return false;
        }
        let map = self.bucket_map.read().unwrap();
        let replicasets = self.replicasets();
        let mut held = vec![0usize; replicasets.len()];
        for owner in &map[1..] {
            match owner {
                Some(index) => held[*index] += 1,
                None => return false,
            }
        }
        let weights: Vec<u32> = replicasets.iter().map(|r| r.weight).collect();
        let shares: Vec<usize> = split_buckets(self.bucket_count, &weights)
            .iter()
            .map(Vec::len)
            .collect();
        within_threshold(&held, &shares, threshold_percent)
    }

    /// The configured replicasets' names and weights.
    pub(crate) fn replicaset_weights(&self) -> Vec<(String, u32)> {
        self.replicasets()
            .iter()
            .map(|replicaset| (replicaset.name.clone(), replicaset.weight))
            .collect()
    }

    /// Ask every replicaset which buckets it holds and rebuild the map. A bucket being moved
    /// is listed by its sender (`sending`: read there) and, once received, by its receiver
    /// (`active`): the writable copy wins. Calls that find the map stale at once share one
    /// discovery: a caller that waited for another's takes its map.
    pub(crate) async fn discover_buckets(&self) {
        let seen = self.map_generation.load(Ordering::Acquire);
        let _one_at_a_time = self.discovering.lock().await;
        if self.map_generation.load(Ordering::Acquire) != seen {
            return;
        }
        let mut map = vec![None; self.bucket_count as usize + 1];
        // Whether `map[bucket]` came from a writable (active, pinned) listing.
        let mut writable = vec![false; map.len()];
        let mut sending = false;
        for (index, replicaset) in self.replicasets().iter().enumerate() {
            let Ok(json) = self.ask_any(replicaset, "buckets").await else {
                // Keep what we knew about an unreachable replicaset.
                let old = self.bucket_map.read().unwrap();
                for (bucket, owner) in old.iter().enumerate() {
                    if *owner == Some(index) {
                        map[bucket] = Some(index);
                    }
                }
                continue;
            };
            for entry in json["buckets"].as_array().into_iter().flatten() {
                let bucket = entry[0].as_u64().unwrap_or(0) as usize;
                if bucket == 0 || bucket >= map.len() {
                    continue;
                }
                match entry[1].as_str() {
                    Some("active" | "pinned") => {
                        map[bucket] = Some(index);
                        writable[bucket] = true;
                    }
                    Some("sending") => {
                        sending = true;
                        if !writable[bucket] {
                            map[bucket] = Some(index);
                        }
                    }
                    _ => {}
                }
            }
        }
        *self.bucket_map.write().unwrap() = map;
        self.sending_seen.store(sending, Ordering::Relaxed);
        self.map_generation.fetch_add(1, Ordering::Release);
    }

    /// The router's `buckets` verb: every replicaset's buckets as a member lists them (the
    /// leader first), at once; a replicaset that does not answer has `"error"` instead.
    async fn bucket_listing(&self) -> serde_json::Value {
        let links = self.replicasets();
        let lists = futures_util::future::join_all(
            links
                .iter()
                .map(|replicaset| self.ask_any(replicaset, "buckets")),
        );
        let replicasets: Vec<serde_json::Value> = links
            .iter()
            .zip(lists.await)
            .map(|(replicaset, listed)| match listed {
                Ok(json) => json!({"name": replicaset.name, "buckets": json["buckets"]}),
                Err(reply) => json!({"name": replicaset.name, "error": reply.message}),
            })
            .collect();
        json!({ "replicasets": replicasets })
    }

    /// An admin request answered by any member that can (the leader first).
    async fn ask_any(
        &self,
        replicaset: &ReplicasetLink,
        verb: &str,
    ) -> Result<serde_json::Value, ErrorReply> {
        let ask = |member: &MemberLink| {
            let peer = member.peer.clone();
            async move {
                let answer = admin_request(&peer, verb, "{}").await;
                answer.map_err(|reply| reply.message)
            }
        };
        leader_first(replicaset, ask).await.map_err(|failures| {
            error(
                ErrorCode::Unavailable,
                format!(
                    "replicaset {} is unavailable ({})",
                    replicaset.name,
                    failures.join("; ")
                ),
            )
        })
    }

    /// Find the leader of a replicaset by asking all its members at once; remembers it.
    async fn find_leader(&self, replicaset: &ReplicasetLink) -> Option<usize> {
        leader_among(
            member_peers(replicaset),
            &replicaset.leader,
            &replicaset.unknown_leader,
        )
        .await
    }

    /// Looks for the leader of `replicaset` in a background task (bounded by the call
    /// timeout): a call that ran out of time answers at once, and the next calls still go to
    /// the new leader.
    fn rediscover_leader(&self, replicaset: &ReplicasetLink) {
        let members = member_peers(replicaset);
        let leader = replicaset.leader.clone();
        let unknown = replicaset.unknown_leader.clone();
        let timeout = self.call_timeout;
        tokio::spawn(async move {
            let search = leader_among(members, &leader, &unknown);
            let _ = tokio::time::timeout(timeout, search).await;
        });
    }

    /// Reads the catalog from the storages (one member of each replicaset) and caches it:
    /// every deployed version's procedures, the active ones first (by name), then the others
    /// (by name, newest first).
    async fn procedures(&self) -> Result<Vec<ProcedureInfo>, ErrorReply> {
        let generation = self.catalog.read().unwrap().begin_read();
        // (not active, name, newest first, module) orders the list; one entry per version,
        // as the first replicaset to answer lists it.
        let mut entries: BTreeMap<(bool, String, Reverse<u32>, String), ProcedureInfo> =
            BTreeMap::new();
        let mut listed: HashSet<(String, u32, String)> = HashSet::new();
        let mut failures = Vec::new();
        // Every replicaset at once, each through its leader first (a learner may not have
        // applied a deploy yet), so that a replicaset that is down costs no more than one
        // member's dial and the others do not wait for it.
        let replicasets = self.replicasets();
        let lists = futures_util::future::join_all(replicasets.iter().map(|r| catalog_of(r)));
        for (replicaset, answer) in replicasets.iter().zip(lists.await) {
            match answer {
                Ok(list) => {
                    for info in list {
                        let version = (info.name.clone(), info.version, info.module.clone());
                        if listed.insert(version) {
                            let order = (
                                !info.active,
                                info.name.clone(),
                                Reverse(info.version),
                                info.module.clone(),
                            );
                            entries.insert(order, info);
                        }
                    }
                }
                Err(member_failures) => {
                    failures.extend(member_failures);
                    failures.push(format!("replicaset {} did not answer", replicaset.name));
                }
            }
        }
        if entries.is_empty() {
            return Err(error(
                ErrorCode::Unavailable,
                format!("no storage listed its procedures: {}", failures.join("; ")),
            ));
        }
        let procedures: Vec<ProcedureInfo> = entries.into_values().collect();
        self.catalog
            .write()
            .unwrap()
            .store(generation, procedures.clone(), Instant::now());
        Ok(procedures)
    }

    /// Re-reads the catalog in a background task, unless one is already doing it.
    fn refresh_catalog_in_background(self: &Arc<Self>) {
        if self.catalog_refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let router = self.clone();
        tokio::spawn(async move {
            let _ = router.procedures().await;
            router.catalog_refreshing.store(false, Ordering::Release);
        });
    }

    /// The procedure a call runs (`NAME` or pinned, `NAME@VERSION`: that version's own
    /// signature), its arguments checked against it. A call that does not fit the cached
    /// catalog has it re-read before it is refused: a deploy or rollback made through another
    /// router may have changed it.
    async fn checked_procedure(
        self: &Arc<Self>,
        call: &Call,
    ) -> Result<Arc<ProcedureInfo>, ErrorReply> {
        let cached =
            self.catalog
                .read()
                .unwrap()
                .find(&call.procedure, call.version, Instant::now());
        match cached {
            Cached::Fresh(info) if info.check_args(&call.args).is_ok() => return Ok(info),
            Cached::Stale(info) if info.check_args(&call.args).is_ok() => {
                self.refresh_catalog_in_background();
                return Ok(info);
            }
            Cached::Fresh(_) | Cached::Stale(_) | Cached::Missing => {}
        }
        let procedures = self.procedures().await?;
        let info = find_procedure(&procedures, &call.procedure, call.version)
            .map_err(|lookup| error(ErrorCode::UnknownProcedure, lookup.to_string()))?;
        info.check_args(&call.args)
            .map_err(|message| error(ErrorCode::InvalidArgument, message))?;
        Ok(Arc::new(info.clone()))
    }

    async fn call(self: &Arc<Self>, mut call: Call) -> Result<Value, ErrorReply> {
        let deadline = self.deadline(&call);
        let info = self.checked_procedure(&call).await?;
        if call.procedure != info.name {
            call.procedure = info.name.clone();
        }
        let answer = self.forward(call, &info, deadline).await;
        if let Err(reply) = &answer {
            if matches!(
                reply.code,
                ErrorCode::UnknownProcedure | ErrorCode::InvalidArgument
            ) {
                // A storage refused what the cached catalog accepted: it may have changed
                // through another router. The next call reads it again.
                self.forget_catalog();
            }
        }
        answer
    }

    /// When this router gives up on `call`, read now: after the time its caller still waits
    /// (`timeout_ms`), at most `request_timeout_ms`. Nothing is sent on its behalf after that,
    /// so a call whose caller gave up is never started late (docs/protocol.md, §4.1).
    fn deadline(&self, call: &Call) -> tokio::time::Instant {
        tokio::time::Instant::now() + call.budget(self.call_timeout)
    }

    /// Sends a checked call to the replicaset that owns its key's bucket (or to every
    /// replicaset, for a procedure without parameters), retrying on stale maps and leaders
    /// until `deadline`.
    async fn forward(
        &self,
        mut call: Call,
        info: &ProcedureInfo,
        deadline: tokio::time::Instant,
    ) -> Result<Value, ErrorReply> {
        if info.params.is_empty() {
            return self.map_call(call, deadline).await;
        }
        let key = Key::from_value(&call.args[0]).ok_or_else(|| {
            error(
                ErrorCode::InvalidArgument,
                format!(
                    "{}: the first argument is the sharding key and must be an integer or a string",
                    info.name
                ),
            )
        })?;
        let bucket = bucket_id(&key, self.bucket_count);
        call.bucket_id = Some(bucket);
        let mut last_error = None;
        let mut attempts = 0;
        // Pauses for a bucket being moved: they do not count as attempts.
        let mut moving_waits = 0u32;
        let mut attempt = 0;
        // The replicaset of the last attempt.
        let mut last_link: Option<Arc<ReplicasetLink>> = None;
        while attempt < CALL_ATTEMPTS_MAX {
            if attempts > 0 && tokio::time::Instant::now() >= deadline {
                break;
            }
            attempts += 1;
            let owner = self.bucket_map.read().unwrap()[bucket as usize];
            let owner = match owner {
                Some(owner) => owner,
                None => {
                    self.discover_buckets().await;
                    match self.bucket_map.read().unwrap()[bucket as usize] {
                        Some(owner) => owner,
                        None => return Err(self.ownerless(bucket, Some(&call.args[0]))),
                    }
                }
            };
            let link = self.replicasets()[owner].clone();
            last_link = Some(link.clone());
            let replicaset: &ReplicasetLink = &link;
            // The call's deadline bounds every attempt (`send` gives each request the time
            // left), so a caller never waits much longer than `request_timeout_ms` (an
            // attempt cut short may still take effect).
            match self.send(replicaset, &call, deadline).await {
                Ok(value) => return Ok(value),
                Err(reply) => match reply.code {
                    ErrorCode::WrongBucket => {
                        self.discover_buckets().await;
                        last_error = Some(reply);
                        if self.bucket_map.read().unwrap()[bucket as usize] == Some(owner) {
                            // Still there: it is being moved (a sending bucket takes no
                            // writes), which takes a few log entries. Wait for it: 2, 4, …,
                            // 64 ms, up to the deadline.
                            let pause = Duration::from_millis(2 << moving_waits.min(5));
                            moving_waits += 1;
                            let until = tokio::time::Instant::now() + pause;
                            if until >= deadline {
                                // An attempt after the wait would have next to no time left
                                // and fail as a timeout: the move is the answer.
                                break;
                            }
                            tokio::time::sleep_until(until).await;
                            continue;
                        }
                    }
                    // No answer, or the storage could not tell whether the command was
                    // applied: a read (or a command carrying an idempotency key, which the
                    // storage applies once) is retried; any other command is answered
                    // `Timeout` at once, after finding the leader for the next calls.
                    ErrorCode::Timeout
                        if info.kind == ProcedureKind::Command
                            && call.idempotency_key.is_none() =>
                    {
                        self.rediscover_leader(replicaset);
                        return Err(reply);
                    }
                    ErrorCode::NotLeader | ErrorCode::Unavailable | ErrorCode::Timeout => {
                        let reply_code = reply.code;
                        // Every member down (each one's handshake timed out, and the
                        // background dials have not got through since): no one can answer
                        // before one is started again, so say so now rather than wait out the
                        // deadline.
                        if reply_code == ErrorCode::Unavailable {
                            if let Some(down) = all_down(replicaset) {
                                return Err(down);
                            }
                        }
                        last_error = Some(reply);
                        if attempt + 1 == CALL_ATTEMPTS_MAX {
                            break;
                        }
                        // A member that answered `NotLeader` is alive and leadership is
                        // moving (a hand-over takes tens of ms): look again soon, after 25,
                        // 50, 100 ms. No answer: back off 100, 200, 400 ms.
                        let pause = if reply_code == ErrorCode::NotLeader {
                            Duration::from_millis(25 << attempt)
                        } else {
                            Duration::from_millis(100 << attempt)
                        };
                        tokio::time::sleep_until(
                            (tokio::time::Instant::now() + pause).min(deadline),
                        )
                        .await;
                        if tokio::time::Instant::now() >= deadline {
                            // Out of time: still learn the leader for the next calls.
                            self.rediscover_leader(replicaset);
                            break;
                        }
                        let found = tokio::time::timeout_at(deadline, self.find_leader(replicaset));
                        let Ok(leader) = found.await else {
                            self.rediscover_leader(replicaset);
                            break;
                        };
                        // No leader that answers, and the members that answered just now say
                        // every voter is down: none will be elected until someone acts.
                        let leader_up = leader.is_some_and(|index| {
                            replicaset.members[index].peer.down_for().is_none()
                        });
                        let leader_only =
                            call.mode == ReadMode::Leader || info.kind == ProcedureKind::Command;
                        if !leader_up && leader_only {
                            if let Some(reply) = voters_down(replicaset) {
                                return Err(reply);
                            }
                        }
                    }
                    _ => return Err(reply),
                },
            }
            attempt += 1;
        }
        let reply = last_error.expect("the loop ran at least once");
        // Still frozen after every wait: the move is slow, or was cut short (its driver or the
        // destination stopped) and waits for the next rebalance.
        let unknown_leader = last_link.and_then(|link| {
            let leader = link.unknown_leader.lock().unwrap().clone()?;
            Some(unknown_leader_advice(&link.name, &leader))
        });
        let stuck = if reply.code == ErrorCode::WrongBucket && moving_waits > 0 {
            "; the bucket is being moved and the move has not finished: if it stays so, `billcl \
             rebalance` finishes a move cut short (the replicaset it moves to must be up)"
                .to_string()
        } else if let Some(advice) = unknown_leader {
            format!("; {advice}")
        } else {
            String::new()
        };
        Err(error(
            reply.code,
            format!("{}; tried {attempts} times{stuck}", reply.message),
        ))
    }

    /// The error for a bucket (a call's, with its key) that no replicaset this router knows holds.
    pub(crate) fn ownerless(&self, bucket: u32, key: Option<&Value>) -> ErrorReply {
        let named = match key {
            Some(key) => format!("bucket {bucket} (key {key})"),
            None => format!("bucket {bucket}"),
        };
        let known = self.bucket_map.read().unwrap().iter().flatten().count();
        if known == 0 {
            return error(
                ErrorCode::NotBootstrapped,
                format!("{named} belongs to no replicaset: run `billcl bootstrap` first"),
            );
        }
        let down: Vec<String> = self
            .replicasets()
            .iter()
            .filter_map(|replicaset| all_down(replicaset).map(|reply| reply.message))
            .collect();
        if !down.is_empty() {
            return error(
                ErrorCode::Unavailable,
                format!(
                    "{named} is on no replicaset this router can reach ({known} \
                     of {} buckets are), most likely on one that is down: {}",
                    self.bucket_count,
                    down.join("; ")
                ),
            );
        }
        error(
            ErrorCode::Unavailable,
            format!(
                "{named} is on no replicaset this router knows ({known} of {} \
                 buckets are): it is on a replicaset down since this router started, or on one \
                 added to cluster.toml after it started (`billcl reload` makes the routers read \
                 the file again)",
                self.bucket_count
            ),
        )
    }

    /// Send one call to the right member of a replicaset, to be answered by `deadline`.
    async fn send(
        &self,
        replicaset: &ReplicasetLink,
        call: &Call,
        deadline: tokio::time::Instant,
    ) -> Result<Value, ErrorReply> {
        let order = self.member_order(replicaset, call.mode);
        let leader = replicaset.leader.load(Ordering::Relaxed) % replicaset.members.len();
        if order.is_empty() {
            // A replica read of a replicaset of one member: no retry would find another.
            return Err(error(
                ErrorCode::InvalidArgument,
                format!(
                    "replicaset {} has no replica to read from (its one member, {}, is its \
                     leader): read from the leader (read mode leader), or prefer-replica, which \
                     falls back to the leader",
                    replicaset.name, replicaset.members[leader].name
                ),
            ));
        }
        let mut failures = Vec::new();
        for index in order {
            let member = &replicaset.members[index];
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(error(
                    ErrorCode::Timeout,
                    format!(
                        "the call's time ran out before it reached replicaset {} (not sent to {})",
                        replicaset.name, member.name
                    ),
                ));
            }
            match member.batcher.request(call.clone(), left).await {
                Ok(Response::Value(value)) => return Ok(value),
                Ok(Response::Error(reply)) => match reply.code {
                    // Another member may serve it (a member that is not the leader, or one
                    // that serves nothing now: it stopped applying the log).
                    ErrorCode::NotLeader | ErrorCode::Unavailable
                        if call.mode != ReadMode::Leader =>
                    {
                        failures.push(format!("{}: {}", member.name, reply.message))
                    }
                    // The catalog this call was checked against has the procedure, so a
                    // replica that does not know it has not applied its deploy yet (it lags
                    // the leader, by a few ms to seconds): another member answers, the
                    // leader last. Only the leader's "unknown" is the replicaset's answer.
                    ErrorCode::UnknownProcedure
                        if call.mode != ReadMode::Leader && index != leader =>
                    {
                        let procedure = match call.version {
                            Some(version) => format!("{}@{version}", call.procedure),
                            None => call.procedure.clone(),
                        };
                        failures.push(format!(
                            "{} does not know {procedure} yet: it has not applied its deploy \
                             (it lags the leader; retry, or read from the leader: --read-mode \
                             leader)",
                            member.name
                        ))
                    }
                    _ => return Err(reply),
                },
                Ok(other) => {
                    return Err(error(
                        ErrorCode::Internal,
                        format!("{} answered a call with {other:?}", member.name),
                    ))
                }
                // The request may have arrived: say so, so that a command is not re-sent.
                // Only a failed dial proves it was not sent.
                Err(e)
                    if call.mode == ReadMode::Leader
                        && !matches!(e, billcl_client::Error::Connect { .. }) =>
                {
                    return Err(error(
                        ErrorCode::Timeout,
                        format!(
                            "no answer from {} ({}) of replicaset {}: {e}; the call may or may \
                             not have taken effect",
                            member.name,
                            member.peer.address(),
                            replicaset.name
                        ),
                    ));
                }
                Err(e) => {
                    failures.push(format!("{} ({}): {e}", member.name, member.peer.address()))
                }
            }
            if call.mode == ReadMode::Leader {
                // Writes and linearizable reads only go to the leader; a retry after
                // finding the leader is the caller's loop.
                break;
            }
        }
        Err(error(
            ErrorCode::Unavailable,
            format!(
                "replicaset {} is unavailable: {}",
                replicaset.name,
                failures.join("; ")
            ),
        ))
    }

    fn member_order(&self, replicaset: &ReplicasetLink, mode: ReadMode) -> Vec<usize> {
        let count = replicaset.members.len();
        let leader = replicaset.leader.load(Ordering::Relaxed) % count;
        let replicas: Vec<usize> = (0..count).filter(|&i| i != leader).collect();
        match mode {
            ReadMode::Leader => vec![leader],
            ReadMode::Replica => replicas,
            ReadMode::PreferReplica => replicas.into_iter().chain([leader]).collect(),
            ReadMode::Balance => {
                let start = replicaset.next_read.fetch_add(1, Ordering::Relaxed);
                (0..count).map(|i| (start + i) % count).collect()
            }
        }
    }

    /// A call with no key runs once on every replicaset (vshard's map_callrw).
    async fn map_call(
        &self,
        call: Call,
        deadline: tokio::time::Instant,
    ) -> Result<Value, ErrorReply> {
        let mut results = Vec::new();
        for replicaset in self.replicasets().iter() {
            let mut outcome = self.send(replicaset, &call, deadline).await;
            for _ in 1..CALL_ATTEMPTS_MAX {
                match &outcome {
                    Err(reply)
                        if matches!(reply.code, ErrorCode::NotLeader | ErrorCode::Unavailable) =>
                    {
                        if self.find_leader(replicaset).await.is_none() {
                            break;
                        }
                        outcome = self.send(replicaset, &call, deadline).await;
                    }
                    _ => break,
                }
            }
            match outcome {
                Ok(value) => results.push((replicaset.name.clone(), value)),
                Err(reply) => {
                    return Err(error(
                        reply.code,
                        format!(
                            "{} on {}: {} (replicasets before it ran the call: {})",
                            call.procedure,
                            replicaset.name,
                            reply.message,
                            if results.is_empty() {
                                "none".to_string()
                            } else {
                                results
                                    .iter()
                                    .map(|(n, _)| n.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    ))
                }
            }
        }
        Ok(Value::Record(results))
    }

    async fn admin(&self, verb: &str, body: &str) -> Result<serde_json::Value, ErrorReply> {
        if let Some(answer) = crate::deploy::router_admin(self, verb, body).await {
            return answer;
        }
        match verb {
            "ping" => Ok(json!({"role": "router"})),
            "info" => Ok(self.info().await),
            "depletions" => crate::depletion::router_depletions(self, body).await,
            "bootstrap" => self.bootstrap().await,
            "rebalance" => crate::rebalance::router_rebalance(self, body).await,
            "reload" => self.reload().await,
            "stats" => {
                let mut stats = crate::stats::server_json(&self.stats.snapshot());
                stats["bucket_map_rebuilds"] = json!(self.map_generation.load(Ordering::Relaxed));
                Ok(stats)
            }
            "pin" => crate::rebalance::router_pin(self, body).await,
            "move" => crate::rebalance::router_move(self, body).await,
            "buckets" => Ok(self.bucket_listing().await),
            "route" => {
                let request = crate::storage::parse_body(body)?;
                let key = key_of_json(&request["key"])?;
                let bucket = bucket_id(&key, self.bucket_count);
                if self.bucket_map.read().unwrap()[bucket as usize].is_none() {
                    self.discover_buckets().await;
                }
                let owner = self.bucket_map.read().unwrap()[bucket as usize];
                Ok(json!({
                    "key": request["key"],
                    "bucket_id": bucket,
                    "replicaset": owner.map(|i| self.replicasets()[i].name.clone()),
                }))
            }
            _ => Err(error(
                ErrorCode::BadRequest,
                format!("unknown admin verb `{verb}` for a router"),
            )),
        }
    }

    /// The `[rebalancer]` section as this router applies it (the file's at start, then at the
    /// last reload).
    pub(crate) async fn rebalancer_settings(&self) -> crate::config::RebalancerSection {
        self.applied.lock().await.rebalancer.clone()
    }

    /// Reads the cluster file this router started with again and routes to the replicasets
    /// and members added since, at the weights it gives now ([`crate::reload`]). What a
    /// running router cannot take is refused whole: it goes on as it was.
    pub async fn reload(&self) -> Result<serde_json::Value, ErrorReply> {
        let mut applied = self.applied.lock().await;
        let file = ClusterConfig::load(&applied.path)
            .map_err(|e| error(ErrorCode::BadRequest, format!("{e:#}; nothing was changed")))?;
        let plan = crate::reload::plan(&applied, &file).map_err(|refused| {
            error(
                ErrorCode::BadRequest,
                format!("{}; nothing was changed", refused.join("; ")),
            )
        })?;
        // A leader stays: without it the replicaset's writes would have nowhere to go.
        for link in self.replicasets().iter() {
            let removed = plan.removed_from(&link.name);
            if removed.is_empty() {
                continue;
            }
            let found = tokio::time::timeout(self.call_timeout, self.find_leader(link)).await;
            let leader = match found {
                Ok(Some(index)) => index,
                _ => link.leader.load(Ordering::Relaxed) % link.members.len(),
            };
            let leader = &link.members[leader].name;
            if removed.contains(&leader) {
                return Err(error(
                    ErrorCode::BadRequest,
                    format!(
                        "{leader} is gone from the file but leads {}: hand its leadership over \
                         first (`billcl failover {}`), then take it out (`billcl expel \
                         {leader}`); nothing was changed",
                        link.name, link.name
                    ),
                ));
            }
        }
        let mut added: Vec<Arc<MemberLink>> = Vec::new();
        let mut links: Vec<Arc<ReplicasetLink>> = Vec::new();
        for link in self.replicasets().iter() {
            let replicaset = &file.replicasets[&link.name];
            let removed = plan.removed_from(&link.name);
            let new: Vec<Arc<MemberLink>> = plan
                .added_to(&link.name)
                .into_iter()
                .map(|name| self.member_link(name, &replicaset.instances[name]))
                .collect();
            let moved = plan.readdressed_in(&link.name);
            if new.is_empty()
                && removed.is_empty()
                && moved.is_empty()
                && replicaset.weight == link.weight
            {
                links.push(link.clone());
                continue;
            }
            added.extend(new.iter().cloned());
            // The same positions (a moved member's with a link to its new address) and then
            // the new members, so the leader's position holds (calls under way may still move
            // it); with members removed, a new position.
            let mut relinked = Vec::new();
            let members: Vec<Arc<MemberLink>> = link
                .members
                .iter()
                .filter(|member| !removed.contains(&&member.name))
                .map(|member| {
                    if !moved.contains(&&member.name) {
                        return member.clone();
                    }
                    let now = self.member_link(&member.name, &replicaset.instances[&member.name]);
                    relinked.push(now.clone());
                    now
                })
                .chain(new)
                .collect();
            added.extend(relinked);
            let leader = if removed.is_empty() {
                link.leader.clone()
            } else {
                let leader = link.leader.load(Ordering::Relaxed) % link.members.len();
                let leader = &link.members[leader].name;
                let at = members.iter().position(|member| member.name == *leader);
                Arc::new(AtomicUsize::new(at.unwrap_or(0)))
            };
            links.push(Arc::new(ReplicasetLink {
                name: link.name.clone(),
                weight: replicaset.weight,
                members,
                leader,
                unknown_leader: Arc::default(),
                next_read: AtomicUsize::new(0),
            }));
        }
        for name in &plan.added_replicasets {
            let link = self.replicaset_link(name, &file.replicasets[name]);
            added.extend(link.members.iter().cloned());
            links.push(Arc::new(link));
        }
        *self.replicasets.write().unwrap() = links.into();
        dial_in_background(added.iter());
        if !plan.added_replicasets.is_empty() {
            // Read the catalog of every replicaset, the new ones too.
            self.forget_catalog();
        }
        applied.replicasets = file.replicasets.clone();
        applied.rebalancer = file.rebalancer.clone();
        tracing::info!(
            added_replicasets = ?plan.added_replicasets,
            added_members = ?plan.added_members,
            removed_members = ?plan.removed_members,
            readdressed_members = ?plan.readdressed_members,
            weights = ?plan.weights,
            rebalancer = ?plan.rebalancer,
            restart_needed = ?plan.restart_needed,
            "reloaded {}",
            file.path.display()
        );
        Ok(plan.to_json(&file))
    }

    async fn bootstrap(&self) -> Result<serde_json::Value, ErrorReply> {
        self.discover_buckets().await;
        let assigned = self
            .bucket_map
            .read()
            .unwrap()
            .iter()
            .filter(|o| o.is_some())
            .count();
        if assigned == self.bucket_count as usize {
            return Err(error(
                ErrorCode::BadRequest,
                format!(
                    "the cluster is already bootstrapped: all {} buckets are assigned (`billcl info` shows where; `billcl rebalance` moves them by weight)",
                    self.bucket_count
                ),
            ));
        }
        // A bootstrap stopped part way (a replicaset was down) is finished: each replicaset
        // is given the buckets of its share that nobody holds yet.
        let replicasets = self.replicasets();
        let weights: Vec<u32> = replicasets.iter().map(|r| r.weight).collect();
        let split: Vec<Vec<u32>> = {
            let map = self.bucket_map.read().unwrap();
            split_buckets(self.bucket_count, &weights)
                .into_iter()
                .map(|share| {
                    share
                        .into_iter()
                        .filter(|&bucket| map[bucket as usize].is_none())
                        .collect()
                })
                .collect()
        };
        let mut report = serde_json::Map::new();
        for (replicaset, bucket_ids) in replicasets.iter().zip(split) {
            if bucket_ids.is_empty() {
                report.insert(replicaset.name.clone(), json!({ "buckets": 0, "added": 0 }));
                continue;
            }
            let body = json!({ "bucket_ids": bucket_ids }).to_string();
            let mut answer = Err(error(ErrorCode::Unavailable, "no attempt"));
            for _ in 0..CALL_ATTEMPTS_MAX {
                let Some(leader) = self.find_leader(replicaset).await else {
                    answer = Err(error(
                        ErrorCode::Unavailable,
                        format!("replicaset {} has no reachable leader", replicaset.name),
                    ));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                answer =
                    admin_request(&replicaset.members[leader].peer, "assign-buckets", &body).await;
                if answer.is_ok() {
                    break;
                }
            }
            let answer = answer.map_err(|reply| {
                error(
                    reply.code,
                    format!(
                        "bootstrap stopped at {}: {} (run `billcl bootstrap` again once it is up)",
                        replicaset.name, reply.message
                    ),
                )
            })?;
            report.insert(
                replicaset.name.clone(),
                json!({ "buckets": bucket_ids.len(), "added": answer["added"] }),
            );
        }
        self.discover_buckets().await;
        Ok(serde_json::Value::Object(report))
    }

    /// What `vshard.router.info()` showed: replicasets with their leader and replicas,
    /// bucket totals and alerts.
    async fn info(&self) -> serde_json::Value {
        let mut replicasets = Vec::new();
        let mut alerts = Vec::new();
        let mut totals = BTreeMap::from([
            ("available_rw", 0u64),
            ("available_ro", 0u64),
            ("unreachable", 0u64),
            ("unknown", 0u64),
        ]);
        let mut known = 0u64;
        let mut holdings = Vec::new();
        let cached = self.bucket_map.read().unwrap().clone();
        let links = self.replicasets();
        for (index, replicaset) in links.iter().enumerate() {
            let mut members = Vec::new();
            let mut leader_name = None;
            // The leader its members name, which may be one this router does not know.
            let mut named_leader = None;
            let mut leader_raft = serde_json::Value::Null;
            let mut buckets = serde_json::Value::Null;
            for member in &replicaset.members {
                let mut status = admin_request(&member.peer, "status", "{}").await;
                let just_found_down = member.peer.down_for().is_some_and(|down| {
                    down < Duration::from_millis(billcl_client::REDIAL_PROBE_MS)
                });
                if status.is_err() && just_found_down {
                    // This request found the link closed by the member's shutdown: a member
                    // restarted since (the router learns of the close only when it next uses
                    // the link) is found back by the background dial's first probe.
                    let probe = Duration::from_millis(billcl_client::REDIAL_PROBE_MS + 50);
                    tokio::time::sleep(probe).await;
                    status = admin_request(&member.peer, "status", "{}").await;
                }
                let entry = match &status {
                    Ok(json) => {
                        if json["raft"]["role"] == "leader" {
                            leader_name = Some(member.name.clone());
                            leader_raft = json["raft"].clone();
                        }
                        if let Some(named) = json["leader"].as_str() {
                            named_leader = Some(named.to_string());
                        }
                        if let Some(voter) = voter_in_membership(json) {
                            member.voter.store(voter, Ordering::Relaxed);
                        }
                        // A halted member's buckets are frozen where it stopped (none, when it
                        // lost its data): a member that applies the log, or the router's map,
                        // tells better.
                        let halted = json["raft"]["halted"].as_str();
                        if halted.is_none()
                            && (buckets.is_null() || json["raft"]["role"] == "leader")
                        {
                            buckets = json["buckets"].clone();
                        }
                        let mut entry = json!({
                            "name": member.name,
                            "address": member.peer.address().to_string(),
                            "status": "available",
                            // What the member's Raft membership says (a failover changes it
                            // while this router runs), else the cluster file.
                            "voter": member.voter.load(Ordering::Relaxed),
                            "role": json["raft"]["role"],
                            "term": json["raft"]["term"],
                            "last_applied": json["raft"]["last_applied"],
                            "node_id": json["raft"]["node_id"],
                            "accounts": json["accounts"],
                        });
                        // A founder waiting to hear from every member before it founds.
                        if json["founding_waits_for"]
                            .as_array()
                            .is_some_and(|names| !names.is_empty())
                        {
                            entry["founding_waits_for"] = json["founding_waits_for"].clone();
                        }
                        // Up, but stopped applying the log: it serves nothing until restarted.
                        if let Some(why) = halted {
                            entry["status"] = json!("halted");
                            entry["error"] = json!(why);
                        }
                        entry
                    }
                    Err(reply) => json!({
                        "name": member.name,
                        "address": member.peer.address().to_string(),
                        "status": "unreachable",
                        "voter": member.voter.load(Ordering::Relaxed),
                        "error": reply.message,
                    }),
                };
                members.push(entry);
            }
            for member in &mut members {
                if let Some(behind) = entries_behind(&leader_raft, member) {
                    member["behind"] = json!(behind);
                }
            }
            let reachable = members
                .iter()
                .filter(|m| m["status"] == "available")
                .count();
            let bucket_total = if buckets.is_null() {
                // Nobody answered: count what the router's map says.
                let count = cached.iter().filter(|o| **o == Some(index)).count() as u64;
                buckets = json!({ "unknown": count });
                count
            } else {
                buckets
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(state, _)| matches!(state.as_str(), "active" | "pinned"))
                            .filter_map(|(_, n)| n.as_u64())
                            .sum()
                    })
                    .unwrap_or(0)
            };
            known += bucket_total;
            holdings.push(Holding {
                replicaset: &replicaset.name,
                weight: replicaset.weight,
                reachable: reachable > 0,
                buckets: bucket_total,
            });
            if reachable == 0 {
                *totals.get_mut("unreachable").expect("key exists") += bucket_total;
                alerts.push(alert(
                    AlertLevel::Red,
                    "UNREACHABLE_REPLICASET",
                    // What to do, when the members are known down (their dials timed out).
                    all_down(replicaset).map_or_else(
                        || {
                            let halted = members.iter().filter(|m| m["status"] == "halted");
                            let why = match halted.count() {
                                0 => "answers".to_string(),
                                n => format!("serves ({n} halted: see HALTED_REPLICA)"),
                            };
                            format!(
                                "replicaset {} is unreachable: none of its {} instances {why}",
                                replicaset.name,
                                members.len(),
                            )
                        },
                        |reply| reply.message,
                    ),
                ));
            } else if leader_name.is_none() {
                *totals.get_mut("available_ro").expect("key exists") += bucket_total;
                alerts.push(alert(
                    AlertLevel::Orange,
                    "UNREACHABLE_MASTER",
                    match named_leader {
                        Some(named) if !replicaset.members.iter().any(|m| m.name == named) => {
                            unknown_leader_advice(&replicaset.name, &named)
                        }
                        _ => voters_down(replicaset).map_or_else(
                            || {
                                format!(
                                    "replicaset {} has no reachable leader: writes fail, \
                                     replica reads work",
                                    replicaset.name
                                )
                            },
                            |reply| reply.message,
                        ),
                    },
                ));
            } else {
                *totals.get_mut("available_rw").expect("key exists") += bucket_total;
            }
            for member in &members {
                if let Some(waits) = member["founding_waits_for"].as_array() {
                    let names: Vec<&str> = waits.iter().filter_map(|n| n.as_str()).collect();
                    alerts.push(alert(
                        AlertLevel::Orange,
                        "NOT_FOUNDED",
                        format!(
                            "replicaset {} is not founded yet: {} founds it once every member \
                             has said it holds no data (one that does must not be replaced by \
                             a new, empty replicaset), and {} has not answered: start it \
                             (`billcl start {}`)",
                            replicaset.name,
                            member["name"].as_str().unwrap_or("?"),
                            names.join(", "),
                            names.join(" ")
                        ),
                    ));
                }
                if member["status"] == "halted" {
                    alerts.push(alert(
                        AlertLevel::Yellow,
                        "HALTED_REPLICA",
                        format!(
                            "{} of replicaset {} {}",
                            member["name"].as_str().unwrap_or("?"),
                            replicaset.name,
                            member["error"]
                                .as_str()
                                .unwrap_or("stopped applying the log")
                        ),
                    ));
                    continue;
                }
                // A voter down while there is no leader is what UNREACHABLE_MASTER says.
                let in_master_alert = leader_name.is_none() && member["voter"] == true;
                if member["status"] != "available" && reachable > 0 && !in_master_alert {
                    alerts.push(alert(
                        AlertLevel::Yellow,
                        "UNREACHABLE_REPLICA",
                        format!(
                            "{} ({}) of replicaset {} is unreachable",
                            member["name"].as_str().unwrap_or("?"),
                            member["address"].as_str().unwrap_or("?"),
                            replicaset.name
                        ),
                    ));
                }
            }
            let (leader, replicas): (Vec<_>, Vec<_>) = members
                .into_iter()
                .partition(|m| Some(m["name"].as_str().unwrap_or("")) == leader_name.as_deref());
            replicasets.push(json!({
                "name": replicaset.name,
                "weight": replicaset.weight,
                "leader": leader.into_iter().next(),
                "replicas": replicas,
                "buckets": buckets,
            }));
        }
        let unknown = u64::from(self.bucket_count).saturating_sub(known);
        *totals.get_mut("unknown").expect("key exists") = unknown;
        if unknown == u64::from(self.bucket_count) {
            alerts.push(alert(
                AlertLevel::Red,
                "NOT_BOOTSTRAPPED",
                "no bucket is assigned yet: run `billcl bootstrap`".to_string(),
            ));
        } else {
            if unknown > 0 {
                alerts.push(alert(
                    AlertLevel::Red,
                    "UNKNOWN_BUCKETS",
                    format!("{unknown} buckets are not known to any reachable replicaset"),
                ));
            }
            alerts.extend(empty_replicaset_alerts(&holdings));
        }
        json!({
            "replicasets": replicasets,
            "bucket": totals,
            "bucket_count": self.bucket_count,
            "status": status_of(&alerts),
            "alerts": alerts,
        })
    }
}

/// Whether a member is a voter, per the membership in its own `status` answer.
/// Refuses a client batch (`CallBatch` or `CallStream`) of more than
/// `CLIENT_CALL_BATCH_MAX` calls: a `Batch` of more answers might not fit one frame, and the
/// same bound keeps what one client stream makes the router do at once small.
fn client_batch_size(calls: usize) -> Result<(), ErrorReply> {
    if calls > billcl_client::CLIENT_CALL_BATCH_MAX {
        return Err(error(
            ErrorCode::BadRequest,
            format!(
                "a batch of {calls} calls; a router takes at most {} per batch",
                billcl_client::CLIENT_CALL_BATCH_MAX
            ),
        ));
    }
    Ok(())
}

/// How bad an `info` alert is: vshard's levels; the worst one present is `info`'s status
/// (green when there is none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AlertLevel {
    /// Redundancy is lower, nothing is unavailable (a replica down, an empty replicaset).
    Yellow,
    /// Some calls fail: writes to a replicaset without a leader.
    Orange,
    /// Some buckets cannot be reached at all, or none is assigned.
    Red,
}

impl AlertLevel {
    fn name(self) -> &'static str {
        match self {
            AlertLevel::Yellow => "yellow",
            AlertLevel::Orange => "orange",
            AlertLevel::Red => "red",
        }
    }
}

fn alert(level: AlertLevel, name: &str, message: String) -> serde_json::Value {
    json!({ "name": name, "level": level.name(), "message": message })
}

/// `info`'s status: the worst level among `alerts`, or "green".
fn status_of(alerts: &[serde_json::Value]) -> &'static str {
    [AlertLevel::Red, AlertLevel::Orange, AlertLevel::Yellow]
        .into_iter()
        .find(|level| alerts.iter().any(|a| a["level"] == level.name()))
        .map_or("green", AlertLevel::name)
}

/// What one replicaset holds, as `info` found it.
struct Holding<'a> {
    replicaset: &'a str,
    weight: u32,
    reachable: bool,
    /// Active and pinned buckets.
    buckets: u64,
}

/// A reachable replicaset with a weight but no bucket, in a bootstrapped cluster: buckets are
/// placed once, by `bootstrap`, and never moved yet (no rebalancer), so a replicaset added to
/// the cluster file afterwards stays empty; say so rather than show green.
fn empty_replicaset_alerts(holdings: &[Holding]) -> Vec<serde_json::Value> {
    holdings
        .iter()
        .filter(|h| h.reachable && h.weight > 0 && h.buckets == 0)
        .map(|h| {
            alert(
                AlertLevel::Yellow,
                "EMPTY_REPLICASET",
                format!(
                    "replicaset {} (weight {}) holds no bucket and serves nothing yet: the first router's rebalancer moves its share to it when enabled, or run `billcl rebalance`",
                    h.replicaset, h.weight
                ),
            )
        })
        .collect()
}

fn voter_in_membership(status: &serde_json::Value) -> Option<bool> {
    let node_id = status["raft"]["node_id"].as_u64()?;
    status["raft"]["members"]
        .as_array()?
        .iter()
        .find(|pair| pair[0].as_u64() == Some(node_id))
        .and_then(|pair| pair[1].as_bool())
}

/// Dials `members` in the background, each with short dials that mark nothing for
/// [`MEMBER_WARM_UP_MS`] ([`Router::dial_members`]).
fn dial_in_background<'a>(members: impl Iterator<Item = &'a Arc<MemberLink>>) {
    for member in members {
        let peer = member.peer.clone();
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_millis(MEMBER_WARM_UP_MS);
            let dial = Duration::from_millis(MEMBER_WARM_UP_DIAL_MS);
            // Stop once connected, or once a request found it down (its redials go on).
            while peer.connect_within(dial).await.is_err()
                && peer.down_for().is_none()
                && Instant::now() < until
            {
                tokio::time::sleep(dial).await;
            }
        });
    }
}

/// The (name, link, whether it votes) of every member of `replicaset`.
fn member_peers(replicaset: &ReplicasetLink) -> Vec<(String, Peer, Arc<AtomicBool>)> {
    replicaset
        .members
        .iter()
        .map(|member| {
            let voter = member.voter.clone();
            (member.name.clone(), member.peer.clone(), voter)
        })
        .collect()
}

/// A sharding key given as JSON: an integer or a string.
pub(crate) fn key_of_json(key: &serde_json::Value) -> Result<Key, ErrorReply> {
    match key {
        serde_json::Value::Number(n) if n.is_u64() => Ok(Key::Uint(n.as_u64().unwrap_or(0))),
        serde_json::Value::Number(n) if n.is_i64() => Ok(Key::Int(n.as_i64().unwrap_or(0))),
        serde_json::Value::String(s) => Ok(Key::Str(s.clone())),
        other => Err(error(
            ErrorCode::InvalidArgument,
            format!("a key is an integer or a string, got {other}"),
        )),
    }
}

/// Whether every replicaset holds its share of the buckets to within `threshold_percent` of
/// that share (vshard's disbalance: |share - held| / share × 100); a replicaset whose share
/// is 0 must hold none.
fn within_threshold(held: &[usize], shares: &[usize], threshold_percent: f64) -> bool {
    held.iter().zip(shares).all(|(&held, &share)| {
        if share == 0 {
            return held == 0;
        }
        held.abs_diff(share) as f64 * 100.0 <= threshold_percent * share as f64
    })
}

/// `member`'s name, address and how long it has been down ([`Peer::down_for`]), or `None` if
/// it is not known to be down.
fn down_member(member: &MemberLink) -> Option<String> {
    let down_for = member.peer.down_for()?;
    Some(format!(
        "{} at {} for {:.1} s",
        member.name,
        member.peer.address(),
        down_for.as_secs_f64()
    ))
}

/// The error for a call to a replicaset whose every member is down, or `None` if some member
/// may answer.
fn all_down(replicaset: &ReplicasetLink) -> Option<ErrorReply> {
    let members: Vec<String> = replicaset
        .members
        .iter()
        .map(|member| down_member(member))
        .collect::<Option<_>>()?;
    let names: Vec<&str> = replicaset.members.iter().map(|m| m.name.as_str()).collect();
    Some(error(
        ErrorCode::Unavailable,
        format!(
            "replicaset {} is down: none of its members answers ({}); calls to its buckets \
             fail until one is back: start them (`billcl start {}`)",
            replicaset.name,
            members.join(", "),
            names.join(" ")
        ),
    ))
}

/// The error for a call only a leader serves when every voter of `replicaset` (as its members
/// last said) is down, so that none can be elected: replicas do not campaign. `None` if some
/// voter may be up.
fn voters_down(replicaset: &ReplicasetLink) -> Option<ErrorReply> {
    let voters: Vec<&MemberLink> = replicaset
        .members
        .iter()
        .map(|member| &**member)
        .filter(|member| member.voter.load(Ordering::Relaxed))
        .collect();
    if voters.is_empty() {
        return None;
    }
    let down: Vec<String> = voters
        .iter()
        .map(|member| down_member(member))
        .collect::<Option<_>>()?;
    let names: Vec<&str> = voters.iter().map(|m| m.name.as_str()).collect();
    let replica = replicaset
        .members
        .iter()
        .find(|member| !member.voter.load(Ordering::Relaxed) && member.peer.down_for().is_none())
        .map_or("REPLICA", |member| member.name.as_str());
    Some(error(
        ErrorCode::Unavailable,
        format!(
            "replicaset {} has no leader: its voters are down ({}) and its replicas do not \
             elect one; writes and leader reads fail until one is back (`billcl start {}`) or \
             a replica is promoted, losing what it has not received (`billcl failover {} --to \
             {replica} --force`); replica reads still work (read mode replica or \
             prefer-replica)",
            replicaset.name,
            down.join(", "),
            names.join(" "),
            replicaset.name
        ),
    ))
}

/// How many entries the leader (its `status`'s `raft`) has logged that `member` (an `info`
/// entry) has not acknowledged: its replication lag, as the leader sees it. `None` for the
/// leader itself, or when the leader did not answer or does not know the member yet.
fn entries_behind(leader_raft: &serde_json::Value, member: &serde_json::Value) -> Option<u64> {
    let node_id = member["node_id"].as_u64()?;
    if leader_raft["node_id"].as_u64()? == node_id {
        return None;
    }
    let last = leader_raft["last_log_index"].as_u64()?;
    // Null: known, nothing acknowledged yet.
    let matched = leader_raft["matched"].get(node_id.to_string())?;
    Some(last.saturating_sub(matched.as_u64().unwrap_or(0)))
}

/// The catalog of one replicaset, from its believed leader first, then the other members in
/// turn; the members' failures if none lists it.
async fn catalog_of(replicaset: &ReplicasetLink) -> Result<Vec<ProcedureInfo>, Vec<String>> {
    let ask = |member: &MemberLink| {
        let peer = member.peer.clone();
        async move {
            match peer.request(&Request::Procedures).await {
                Ok(Response::Procedures(list)) => Ok(list),
                Ok(Response::Error(reply)) => Err(reply.message),
                Ok(_) => Err("unexpected answer".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    leader_first(replicaset, ask).await
}

/// Asks the members of `replicaset` one at a time, its believed leader first, until one
/// answers; if none does, each one's failure as `MEMBER: why`.
async fn leader_first<T, Fut>(
    replicaset: &ReplicasetLink,
    ask: impl Fn(&MemberLink) -> Fut,
) -> Result<T, Vec<String>>
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let count = replicaset.members.len();
    let leader = replicaset.leader.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    for offset in 0..count {
        let member = &replicaset.members[(leader + offset) % count];
        match ask(member).await {
            Ok(answer) => return Ok(answer),
            Err(why) => failures.push(format!("{}: {why}", member.name)),
        }
    }
    Err(failures)
}

/// Finds the leader among `members` by asking them all at once, and stores its position in
/// `leader`: the first that says it leads, else the one the others name.
async fn leader_among(
    members: Vec<(String, Peer, Arc<AtomicBool>)>,
    leader: &AtomicUsize,
    unknown_leader: &Mutex<Option<String>>,
) -> Option<usize> {
    let mut asks = tokio::task::JoinSet::new();
    for (index, (_, peer, _)) in members.iter().enumerate() {
        let peer = peer.clone();
        asks.spawn(async move { (index, admin_request(&peer, "status", "{}").await) });
    }
    let mut named = None;
    let mut unknown = None;
    while let Some(joined) = asks.join_next().await {
        let Ok((index, Ok(json))) = joined else {
            continue;
        };
        if let Some(voter) = voter_in_membership(&json) {
            members[index].2.store(voter, Ordering::Relaxed);
        }
        if json["raft"]["role"] == "leader" {
            leader.store(index, Ordering::Relaxed);
            *unknown_leader.lock().unwrap() = None;
            return Some(index);
        }
        if let Some(name) = json["leader"].as_str() {
            match members.iter().position(|(n, _, _)| n == name) {
                Some(found) => named = Some(found),
                None => unknown = Some(name.to_string()),
            }
        }
    }
    if let Some(found) = named {
        leader.store(found, Ordering::Relaxed);
    }
    *unknown_leader.lock().unwrap() = if named.is_none() { unknown } else { None };
    named
}

/// What to do about a replicaset led by a member this router does not know.
fn unknown_leader_advice(replicaset: &str, leader: &str) -> String {
    format!(
        "replicaset {replicaset} is led by {leader}, which this router does not route to (it \
         was added to the cluster file after the router read it): `billcl reload` has the \
         routers read the file again"
    )
}

/// Send an admin verb to one peer and parse its JSON answer.
pub async fn admin_request(
    peer: &Peer,
    verb: &str,
    body: &str,
) -> Result<serde_json::Value, ErrorReply> {
    let request = Request::Admin {
        verb: verb.to_string(),
        body: body.to_string(),
    };
    match peer.request(&request).await {
        Ok(Response::Admin(text)) => serde_json::from_str(&text)
            .map_err(|e| error(ErrorCode::Internal, format!("bad JSON from a node: {e}"))),
        Ok(Response::Error(reply)) => Err(reply),
        Ok(other) => Err(error(
            ErrorCode::Internal,
            format!("unexpected answer to {verb}: {other:?}"),
        )),
        Err(e) => Err(error(ErrorCode::Unavailable, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use billcl_proto::Type;

    /// A replicaset of two real QUIC servers: `s-1`, the leader (index 0, where a router
    /// starts), answers every call `true`; `s-2`, a replica that has not applied a deploy yet,
    /// answers as a storage does for a procedure it does not know. Returns the router, the
    /// servers' shutdown and the temporary directory their TLS material is in.
    fn router_with_a_lagging_replica(
        runtime: &tokio::runtime::Runtime,
    ) -> (Router, tokio::sync::watch::Sender<()>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        // The servers serve on these very sockets: no other test can take a port between
        // choosing it and serving on it.
        let [leader_socket, replica_socket] =
            [(); 2].map(|()| std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let [leader, replica] = [&leader_socket, &replica_socket].map(|s| s.local_addr().unwrap());
        let path = dir.path().join("cluster.toml");
        std::fs::write(
            &path,
            format!(
                "[cluster]\nname = \"lag\"\nbucket_count = 10\n\n\
                 [routers.r-1]\naddress = \"127.0.0.1:1\"\n\n\
                 [replicasets.rs]\nweight = 1\n\n\
                 [replicasets.rs.instances.s-1]\naddress = \"{leader}\"\nvoter = true\n\n\
                 [replicasets.rs.instances.s-2]\naddress = \"{replica}\"\nvoter = false\n"
            ),
        )
        .unwrap();
        let config = ClusterConfig::load(&path).unwrap();
        crate::tls::ensure(&config).unwrap();
        let ca = crate::tls::ca_pem(&config).unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(());
        let _guard = runtime.enter();
        for (name, socket, knows) in [("s-1", leader_socket, true), ("s-2", replica_socket, false)]
        {
            let identity = crate::tls::identity(&config, name).unwrap();
            let server = billcl_client::server_config(
                &identity.cert_chain_pem,
                &identity.key_pem,
                billcl_client::ClientAuth::Required { ca_pem: &ca },
            )
            .unwrap();
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .unwrap();
            let mut stopped = stopped.clone();
            runtime.spawn(billcl_client::serve(
                endpoint,
                move |request| async move {
                    let Request::Call(call) = request else {
                        return Response::Error(error(ErrorCode::BadRequest, "calls only"));
                    };
                    if knows {
                        Response::Value(Value::Bool(true))
                    } else {
                        Response::Error(error(
                            ErrorCode::UnknownProcedure,
                            format!("no procedure `{}` on rs", call.procedure),
                        ))
                    }
                },
                async move {
                    let _ = stopped.changed().await;
                },
            ));
        }
        let identity = crate::tls::identity(&config, "r-1").unwrap();
        let client =
            billcl_client::client_endpoint(&ca, Some(&identity), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        (Router::new(&config, client), stop, dir)
    }

    /// A replica that does not know a procedure the catalog has lags behind its deploy: a read
    /// that may go elsewhere is answered by the leader; one that must stay on replicas is
    /// refused as unavailable for now (retryable), naming the lag, not the procedure as
    /// unknown. The leader's own "unknown" stays the answer.
    #[test]
    fn a_replica_behind_a_deploy_hands_the_read_on() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (router, _stop, _dir) = router_with_a_lagging_replica(&runtime);
        let call = |mode| Call {
            procedure: "probe".to_string(),
            version: None,
            args: vec![Value::Int(4)],
            mode,
            caller: "test".to_string(),
            bucket_id: Some(1),
            idempotency_key: None,
            timeout_ms: None,
        };
        let deadline = || tokio::time::Instant::now() + Duration::from_secs(5);
        let replicasets = router.replicasets();
        let replicaset = &replicasets[0];
        runtime.block_on(async {
            for mode in [
                ReadMode::PreferReplica,
                ReadMode::Balance,
                ReadMode::Balance,
            ] {
                let answer = router.send(replicaset, &call(mode), deadline()).await;
                assert_eq!(answer, Ok(Value::Bool(true)), "{mode:?}");
            }
            let refused = router
                .send(replicaset, &call(ReadMode::Replica), deadline())
                .await
                .unwrap_err();
            assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
            assert!(
                refused
                    .message
                    .contains("s-2 does not know probe yet: it has not applied its deploy"),
                "{refused:?}"
            );
            assert!(refused.code.is_retryable(), "{refused:?}");
            // Were the replica the leader, its answer would be the replicaset's, even with
            // another member left to ask (a balanced read that starts at it).
            replicaset.leader.store(1, Ordering::Relaxed);
            replicaset.next_read.store(1, Ordering::Relaxed);
            let unknown = router
                .send(replicaset, &call(ReadMode::Balance), deadline())
                .await
                .unwrap_err();
            assert_eq!(unknown.code, ErrorCode::UnknownProcedure, "{unknown:?}");
        });
    }

    #[test]
    fn a_disbalance_within_the_threshold_is_balanced_enough() {
        assert!(within_threshold(&[500, 500], &[500, 500], 0.0));
        assert!(!within_threshold(&[501, 499], &[500, 500], 0.0));
        assert!(within_threshold(&[505, 495], &[500, 500], 1.0));
        assert!(!within_threshold(&[506, 494], &[500, 500], 1.0));
        // A replicaset added (share 333, none held) is far out of any threshold.
        assert!(!within_threshold(
            &[500, 500, 0],
            &[334, 333, 333],
            100.0 - 1e-9
        ));
        assert!(
            !within_threshold(&[1, 999], &[0, 1000], 100.0),
            "weight 0 empties it"
        );
    }

    #[test]
    fn info_status_is_the_worst_alert_level() {
        assert_eq!(status_of(&[]), "green");
        let replica = alert(AlertLevel::Yellow, "UNREACHABLE_REPLICA", String::new());
        let master = alert(AlertLevel::Orange, "UNREACHABLE_MASTER", String::new());
        let whole = alert(AlertLevel::Red, "UNREACHABLE_REPLICASET", String::new());
        assert_eq!(status_of(std::slice::from_ref(&replica)), "yellow");
        assert_eq!(status_of(&[replica.clone(), master.clone()]), "orange");
        assert_eq!(status_of(&[master, whole, replica]), "red");
    }

    #[test]
    fn a_reachable_weighted_replicaset_without_buckets_is_an_alert() {
        let holding = |replicaset, weight, reachable, buckets| Holding {
            replicaset,
            weight,
            reachable,
            buckets,
        };
        let alerts = empty_replicaset_alerts(&[
            holding("storage-a", 1, true, 500),
            holding("storage-b", 1, true, 500),
            holding("storage-c", 2, true, 0),
            // Weight 0 asks for no buckets; an unreachable one has its own alert.
            holding("storage-d", 0, true, 0),
            holding("storage-e", 1, false, 0),
        ]);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0]["name"], "EMPTY_REPLICASET");
        assert_eq!(alerts[0]["level"], "yellow");
        let message = alerts[0]["message"].as_str().unwrap();
        assert!(message.contains("storage-c (weight 2)"), "{message}");
        assert!(message.contains("billcl rebalance"), "{message}");
    }

    fn entry(version: u32, active: bool, params: &[(&str, Type)]) -> ProcedureInfo {
        ProcedureInfo {
            name: "f".into(),
            module: "m".into(),
            version,
            active,
            kind: ProcedureKind::Command,
            params: params
                .iter()
                .map(|(name, ty)| (name.to_string(), ty.clone()))
                .collect(),
            result: Some(Type::U32),
        }
    }

    fn catalog() -> Vec<ProcedureInfo> {
        vec![
            entry(2, true, &[("id", Type::U64), ("note", Type::String)]),
            entry(1, false, &[("id", Type::U64), ("flag", Type::Bool)]),
        ]
    }

    #[test]
    fn a_cached_catalog_is_fresh_then_stale_within_the_bound() {
        let start = Instant::now();
        let mut cache = CatalogCache::default();
        assert_eq!(cache.find("f", None, start), Cached::Missing, "never read");
        let generation = cache.begin_read();
        assert!(cache.store(generation, catalog(), start));
        let fresh = start + Duration::from_millis(CATALOG_STALE_MS_MAX - 1);
        assert_eq!(
            cache.find("f", None, fresh),
            Cached::Fresh(Arc::new(catalog()[0].clone()))
        );
        assert_eq!(
            cache.find("f", Some(1), fresh),
            Cached::Fresh(Arc::new(catalog()[1].clone())),
            "a pinned call gets that version's own signature"
        );
        assert_eq!(cache.find("f", Some(9), fresh), Cached::Missing);
        assert_eq!(cache.find("g", None, fresh), Cached::Missing);
        let stale = start + Duration::from_millis(CATALOG_STALE_MS_MAX);
        assert_eq!(
            cache.find("f", None, stale),
            Cached::Stale(Arc::new(catalog()[0].clone()))
        );
    }

    #[test]
    fn a_read_begun_before_a_forget_is_not_stored() {
        let now = Instant::now();
        let mut cache = CatalogCache::default();
        let generation = cache.begin_read();
        assert!(cache.store(generation, catalog(), now));
        let before_deploy = cache.begin_read();
        cache.forget();
        assert_eq!(cache.find("f", None, now), Cached::Missing, "forgotten");
        assert!(!cache.store(before_deploy, catalog(), now));
        assert_eq!(cache.find("f", None, now), Cached::Missing);
        let after_deploy = cache.begin_read();
        assert!(cache.store(after_deploy, catalog(), now));
        assert_eq!(
            cache.find("f", None, now),
            Cached::Fresh(Arc::new(catalog()[0].clone()))
        );
    }

    #[test]
    fn member_batches_answer_within_one_frame() {
        use billcl_proto::frame::FRAME_BYTES_MAX;
        use billcl_proto::message::CALL_BATCH_MAX;
        // The default 1 MiB results: 63 calls, whose answers fit one frame.
        let calls = member_batch_calls_max(1 << 20);
        assert_eq!(calls, 63);
        assert!(calls * ((1 << 20) + BATCH_ANSWER_OVERHEAD_BYTES) <= FRAME_BYTES_MAX);
        // Small results: the protocol's batch limit.
        assert_eq!(member_batch_calls_max(1024), CALL_BATCH_MAX);
        // Results as large as a frame: still one call at a time.
        assert_eq!(member_batch_calls_max(FRAME_BYTES_MAX), 1);
        assert_eq!(member_batch_calls_max(usize::MAX), 1);
    }
}
