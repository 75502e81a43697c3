//! billcl's wasm runtime: loads procedure modules (wasm components) and runs one procedure call
//! at a time against a storage [`Space`] the node provides.
//!
//! It exists so that all business logic, built-in or deployed, runs sandboxed and
//! deterministically on every replica: fuel (not wall-clock epochs) bounds each call, NaN
//! canonicalization is on, guest memory is capped, and the only sources of time and identity
//! are the [`CallContext`] the caller passes (from the log entry). A trap, an exhausted budget
//! or a guest error is a [`CallError`] that is the same on every replica; the runtime keeps
//! serving afterwards.
//!
//! The runtime knows nothing of Raft or QUIC: the node decides which calls run and what their
//! writes become. A module is checked at load (size, imports, exported `query` / `command`
//! interfaces, supported signatures) and its procedure catalog is read from its WIT types, so a
//! new module needs no change anywhere else.

mod convert;
mod host;

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::{types, Component, ComponentExportIndex, InstancePre, Linker, Val};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig,
    Store, Trap,
};

pub use billcl_proto::{ProcedureInfo, ProcedureKind, Type, Value, VALUE_DEPTH_MAX};

use crate::host::HostState;

/// The built-in billing module (procedures/billing), built as a component by build.rs.
pub const BILLING_COMPONENT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/billing.component.wasm"));
/// The name the built-in billing module is loaded under.
pub const BILLING_MODULE_NAME: &str = "billing";
/// The example modules (every guest crate under procedures/ but `billing` and `money`), built
/// as components by build.rs: `(directory name, component bytes)`, e.g. `("transfer", …)`.
pub const EXAMPLE_COMPONENTS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/examples.rs"));
/// The same example modules as core wasm modules carrying wit-bindgen's component-type section
/// (what the guest build produces; `Runtime::load` and `billcl deploy` accept these too).
pub const EXAMPLE_CORE_MODULES: &[(&str, &[u8])] =
    include!(concat!(env!("OUT_DIR"), "/example_core_modules.rs"));

/// Largest carried drain an account may hold, in thousandths of a micro-unit.
pub const REMAINDER_MAX: u32 = 999;
/// Largest key a procedure may use in its kv space.
pub const KV_KEY_BYTES_MAX: usize = 1024;
/// Largest value a procedure may store in its kv space.
pub const KV_VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Longest log line a procedure may write; longer ones are cut.
pub const LOG_MESSAGE_BYTES_MAX: usize = 4096;
/// Core wasm instances one component may create (a wit-component build uses a handful).
pub const CORE_INSTANCES_PER_COMPONENT_MAX: u32 = 16;
/// Linear memories one component may hold.
pub const MEMORIES_PER_COMPONENT_MAX: u32 = 2;
/// Tables one component may hold.
pub const TABLES_PER_COMPONENT_MAX: u32 = 4;
/// Warm instances kept per module between calls. Each holds a slot of the instance pool
/// (`Limits::instances_max`); over all modules at most a quarter of the slots are warm.
pub const WARM_INSTANCES_PER_MODULE_MAX: usize = 8;
/// Calls one instance serves before it is replaced by a fresh one: what a guest keeps in its
/// own memory between calls (a leak, a fragmented heap) lives a bounded time.
pub const WARM_INSTANCE_CALLS_MAX: u32 = 10_000;
/// An instance whose linear memory grew past this is replaced after its call instead of
/// being kept warm: it holds that memory while idle, and a guest that grows per call would
/// otherwise end up failing calls at `guest_memory_bytes_max` that a fresh instance serves.
pub const WARM_INSTANCE_MEMORY_BYTES_MAX: usize = KEEP_RESIDENT_BYTES;
/// Size of one wasm page: guest memory limits are whole pages.
const WASM_PAGE_BYTES: usize = 64 * 1024;
/// Bytes of each linear memory and table slot that are reset in place (memset, only the
/// touched pages where the kernel has `PAGEMAP_SCAN`) instead of `madvise`d away when an
/// instance ends: the next fresh instance in that slot then starts exactly as a new one
/// would (zeroed memory, the module's data image), without page faults or TLB shoot-downs.
const KEEP_RESIDENT_BYTES: usize = 2 << 20;
/// Elements a guest table may grow to (a wit-component build needs a few dozen).
pub const TABLE_ELEMENTS_MAX: usize = 100_000;
/// Longest module name (`billcl deploy --name`), as the wire allows for names.
pub const MODULE_NAME_BYTES_MAX: usize = 64;

/// The fuel a call gets on an async worker, where it shares the thread with the node's other
/// tasks: tens of microseconds of plain guest code (a spinning guest burned `call_fuel_max`, 50
/// million, in about 60 ms on the 2-vCPU machine), 50 times what `add_money` burns (375; `get`
/// 127). A call that needs more runs again off the workers with all of `call_fuel_max`
/// ([`Runtime::call_within`]).
pub const INLINE_CALL_FUEL: u64 = 20_000;
/// What wasmtime says when a guest passes more data than the store's hostcall fuel.
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

/// The host interfaces a module may import (`billcl:host/<name>@<version>`).
const HOST_PACKAGE: &str = "billcl:host";
const HOST_INTERFACES: [&str; 5] = ["types", "accounts", "kv", "context", "log"];

/// Bounds on what one call and one module may use. Configure the same limits on every member
/// of a replicaset: fuel and memory limits decide results, and any voter may lead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) one call may burn, instantiation included.
    pub call_fuel_max: u64,
    /// Bytes one linear memory of a guest may grow to (whole 64 KiB pages).
    pub guest_memory_bytes_max: usize,
    /// Bytes of a module accepted by [`Runtime::load`].
    pub module_bytes_max: usize,
    /// Bytes (as carried on the wire) of a value a call may return.
    pub result_bytes_max: usize,
    /// Component instances alive at once (calls running concurrently), sizing the pooling
    /// allocator.
    pub instances_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            call_fuel_max: 50_000_000,
            guest_memory_bytes_max: 64 * 1024 * 1024,
            module_bytes_max: 16 * 1024 * 1024,
            result_bytes_max: 1024 * 1024,
            instances_max: 256,
        }
    }
}

/// What a call is: when, where, by whom, and whether it may write. The same for every member
/// running the same log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallContext {
    /// Unix milliseconds: the log entry's timestamp for a command, the member's clock for a
    /// query.
    pub now_ms: i64,
    /// The bucket of the call's key; 0 for a map call.
    pub bucket_id: u32,
    /// Who called, as the router saw it.
    pub caller: String,
    /// How the call runs: a `Query` never writes, whatever the procedure's own kind.
    pub kind: ProcedureKind,
}

/// Severity of a procedure's log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// The storage a call sees. The node implements it (a write-set over its state). Contract:
/// - reads see the call's own earlier writes;
/// - an `Err` from a write is shown to the guest as is, so it names what was wrong;
/// - the runtime refuses writes of queries itself, before calling `put_account` / `kv_set` /
///   `kv_delete`, and keeps kv keys and values within [`KV_KEY_BYTES_MAX`] /
///   [`KV_VALUE_BYTES_MAX`];
/// - every method is deterministic for the same state and call (no clocks, no randomness).
pub trait Space {
    /// The account, as stored (not drained to now).
    fn account(&mut self, id: u64) -> Option<billcl_money::Account>;
    /// Insert or replace an account; `Err` if this call may not write its bucket.
    fn put_account(&mut self, account: billcl_money::Account) -> Result<(), String>;
    /// Whether this call may touch account `id`.
    fn owns(&mut self, id: u64) -> bool;
    /// A value of `module`'s kv namespace.
    fn kv_get(&mut self, module: &str, key: &[u8]) -> Option<Vec<u8>>;
    /// Set a value of `module`'s kv namespace.
    fn kv_set(&mut self, module: &str, key: &[u8], value: &[u8]) -> Result<(), String>;
    /// Delete a key of `module`'s kv namespace (deleting a missing key is not an error).
    fn kv_delete(&mut self, module: &str, key: &[u8]) -> Result<(), String>;
    /// Record one log line of `module`.
    fn log(&mut self, module: &str, level: LogLevel, message: &str);
}

/// Why a call produced no value. All but `Internal` and `SliceSpent` are deterministic: the
/// same entry gives the same error on every replica, so it is the call's result, not a node
/// failure.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CallError {
    #[error("unknown procedure `{0}`")]
    UnknownProcedure(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The procedure returned `err(message)`; its writes must be discarded.
    #[error("{0}")]
    Procedure(String),
    #[error("procedure trapped: {0}")]
    Trap(String),
    #[error("procedure ran out of fuel (call_fuel_max = {fuel}); it loops or does too much work")]
    OutOfFuel { fuel: u64 },
    /// The call needed more than the `fuel` [`Runtime::call_within`] gave it, and may have up
    /// to `call_fuel_max`: not a result. Run it again with [`Runtime::call`].
    #[error("the call needs more than {fuel} fuel: run it again with its whole budget")]
    SliceSpent { fuel: u64 },
    #[error("procedure result is {bytes} bytes; the limit is {max} (result_bytes_max)")]
    ResultTooLarge { bytes: usize, max: usize },
    /// The guest handed the host (as its result, or as the arguments of one host call) more
    /// data than [`Runtime::host_transfer_bytes_max`]: refused while it was being copied,
    /// before the host allocated it all.
    #[error(
        "procedure passed more than {max} bytes to the host in one go (its result, or one host \
         call's arguments); the limit follows result_bytes_max = {result_bytes_max}: return less"
    )]
    TooMuchData { max: usize, result_bytes_max: usize },
    /// The guest asked for more linear memory than the limit and then failed.
    #[error(
        "procedure ran out of memory: it asked for more than guest_memory_bytes_max = {max} \
         bytes ({detail})"
    )]
    OutOfMemory { max: usize, detail: String },
    /// A failure of this node (e.g. every instance slot busy): not the call's result.
    #[error("internal runtime error: {0}")]
    Internal(String),
}

impl CallError {
    /// Whether every replica running the same call gets the same error.
    pub fn is_deterministic(&self) -> bool {
        !matches!(self, CallError::Internal(_) | CallError::SliceSpent { .. })
    }
}

/// Why a runtime could not be created or a module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid runtime limits: {0}")]
    Limits(String),
    #[error("cannot create the wasm engine: {0}")]
    Engine(String),
    #[error("module `{module}` is {bytes} bytes; the limit is {max} bytes (module_bytes_max)")]
    ModuleTooLarge {
        module: String,
        bytes: usize,
        max: usize,
    },
    #[error("module `{module}` is not a valid wasm component: {reason}")]
    Invalid { module: String, reason: String },
    #[error(
        "module `{module}` imports `{import}`; a procedure module may import only the \
         {HOST_PACKAGE} interfaces (types, accounts, kv, context, log)"
    )]
    ForbiddenImport { module: String, import: String },
    #[error(
        "module `{module}` exports no `query` or `command` interface (it exports: {exports}); \
         export your procedures from interfaces named `query` (read-only) and `command`"
    )]
    NoProcedures { module: String, exports: String },
    #[error("module `{module}`: procedure `{procedure}` {reason}")]
    UnsupportedProcedure {
        module: String,
        procedure: String,
        reason: String,
    },
    #[error("module `{module}` cannot be instantiated: {reason}")]
    Instantiate { module: String, reason: String },
}

/// Loads modules and runs calls. Cheap to clone; `Send + Sync`, so one runtime serves every
/// thread of the node.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<HostState>,
    limits: Limits,
    /// Warm instances alive over all modules (in a pool or serving a query); kept at most a
    /// quarter of `limits.instances_max`, so warm instances never starve fresh ones.
    warm_instances: Arc<std::sync::atomic::AtomicUsize>,
}

/// A loaded module: its compiled component, ready to instantiate, and its procedure catalog.
/// Cheap to clone.
#[derive(Clone)]
pub struct Module {
    inner: Arc<ModuleInner>,
}

struct ModuleInner {
    name: Arc<str>,
    version: u32,
    /// The package of the first procedure interface, without namespace and version.
    package: Option<String>,
    instance_pre: InstancePre<HostState>,
    /// Catalog order: queries first, then commands, each in export order. Shared, so that
    /// a storage resolving a call hands its description on without copying it.
    procedures: Vec<Arc<ProcedureInfo>>,
    /// Parallel to `procedures`: where each function is exported.
    exports: Vec<ComponentExportIndex>,
    /// Kebab name, and snake-case name where it differs -> index into `procedures`: a call
    /// names its procedure either way, and is looked up without building a string.
    by_name: HashMap<String, usize>,
    /// Instances kept warm between calls (see [`Runtime::call`]), at most
    /// [`WARM_INSTANCES_PER_MODULE_MAX`].
    warm: std::sync::Mutex<Vec<WarmInstance>>,
}

/// An instance that served a call and may serve the next: its store, the functions looked up
/// so far (by procedure index), so the store does not grow per call, and how many calls it
/// served.
struct WarmInstance {
    store: Store<HostState>,
    instance: wasmtime::component::Instance,
    funcs: Vec<Option<wasmtime::component::Func>>,
    calls: u32,
    _counted: WarmCount,
}

/// One warm instance counted in `RuntimeInner::warm_instances` while it lives.
struct WarmCount(Arc<std::sync::atomic::AtomicUsize>);

impl WarmCount {
    fn new(total: &Arc<std::sync::atomic::AtomicUsize>) -> WarmCount {
        total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        WarmCount(total.clone())
    }
}

impl Drop for WarmCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Module {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn version(&self) -> u32 {
        self.inner.version
    }

    pub fn procedures(&self) -> &[Arc<ProcedureInfo>] {
        &self.inner.procedures
    }

    /// The name of the package exporting the procedures (`transfer` for
    /// `acme:transfer/command@0.1.0`): what `billcl deploy` names a module by default. `None`
    /// if the interfaces are exported without a package (bare `query` / `command`).
    pub fn package_name(&self) -> Option<&str> {
        self.inner.package.as_deref()
    }

    /// The procedure by its WIT name (`add-money`) or its snake-case form (`add_money`).
    pub fn procedure(&self, name: &str) -> Option<&Arc<ProcedureInfo>> {
        self.index_of(name)
            .map(|index| &self.inner.procedures[index])
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        match self.inner.by_name.get(name) {
            Some(index) => Some(*index),
            // A name that mixes the two spellings (`add_money-now`).
            None if name.contains('_') => self.inner.by_name.get(&name.replace('_', "-")).copied(),
            None => None,
        }
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("procedures", &self.inner.procedures.len())
            .finish()
    }
}

/// A [`Space`] with nothing in it and no writes, for the trial instantiation at load.
struct EmptySpace;

impl Space for EmptySpace {
    fn account(&mut self, _id: u64) -> Option<billcl_money::Account> {
        None
    }
    fn put_account(&mut self, _account: billcl_money::Account) -> Result<(), String> {
        Err("a module cannot write while it is being loaded".to_string())
    }
    fn owns(&mut self, _id: u64) -> bool {
        false
    }
    fn kv_get(&mut self, _module: &str, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn kv_set(&mut self, _module: &str, _key: &[u8], _value: &[u8]) -> Result<(), String> {
        Err("a module cannot write while it is being loaded".to_string())
    }
    fn kv_delete(&mut self, _module: &str, _key: &[u8]) -> Result<(), String> {
        Err("a module cannot write while it is being loaded".to_string())
    }
    fn log(&mut self, _module: &str, _level: LogLevel, _message: &str) {}
}

impl Runtime {
    /// A runtime whose engine and instance pool are sized by `limits`.
    pub fn new(limits: Limits) -> Result<Runtime, Error> {
        check_limits(&limits)?;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(limits.instances_max)
            .total_core_instances(limits.instances_max * CORE_INSTANCES_PER_COMPONENT_MAX)
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT_MAX)
            .total_memories(limits.instances_max * MEMORIES_PER_COMPONENT_MAX)
            .max_memories_per_component(MEMORIES_PER_COMPONENT_MAX)
            .total_tables(limits.instances_max * TABLES_PER_COMPONENT_MAX)
            .max_tables_per_component(TABLES_PER_COMPONENT_MAX)
            .max_memory_size(limits.guest_memory_bytes_max)
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES)
            .pagemap_scan(wasmtime::Enabled::Auto);
        // Wasm threads stay off: wasmtime is built without its `threads` feature.
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|error| Error::Engine(format!("{error:#}")))?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(|error| Error::Engine(format!("{error:#}")))?;
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                limits,
                warm_instances: Arc::default(),
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Accepts a component, or a core module carrying wit-bindgen's component-type section
    /// (componentized here); WAT text of a component is accepted too (hand-written modules,
    /// tests). Checks: size <= module_bytes_max; imports only billcl:host interfaces; exports
    /// an interface named `query` and/or `command` (`<pkg>/query[@ver]`), each function with a
    /// supported signature; and the module instantiates within the limits. Builds the
    /// procedure catalog (kebab names, typed params/result, kind).
    pub fn load(&self, name: &str, version: u32, bytes: &[u8]) -> Result<Module, Error> {
        let limits = &self.inner.limits;
        if bytes.len() > limits.module_bytes_max {
            return Err(Error::ModuleTooLarge {
                module: name.to_string(),
                bytes: bytes.len(),
                max: limits.module_bytes_max,
            });
        }
        let invalid = |reason: String| Error::Invalid {
            module: name.to_string(),
            reason,
        };
        let componentized;
        let component_bytes = if is_core_module(bytes) {
            componentized = wit_component::ComponentEncoder::default()
                .module(bytes)
                .and_then(|encoder| encoder.validate(true).encode())
                .map_err(|error| {
                    invalid(format!(
                        "a core module that cannot be made a component \
                         (was it built with wit-bindgen?): {error:#}"
                    ))
                })?;
            &componentized[..]
        } else {
            bytes
        };
        let engine = &self.inner.engine;
        let component = Component::new(engine, component_bytes)
            .map_err(|error| invalid(format!("{error:#}")))?;
        let component_type = component.component_type();
        for (import, _) in component_type.imports(engine) {
            if !is_host_import(import) {
                return Err(Error::ForbiddenImport {
                    module: name.to_string(),
                    import: import.to_string(),
                });
            }
        }
        let catalog = catalog(engine, &component, name, version)?;
        let instance_pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|error| Error::Instantiate {
                module: name.to_string(),
                reason: format!("{error:#}"),
            })?;
        let module = Module {
            inner: Arc::new(ModuleInner {
                name: Arc::from(name),
                version,
                package: catalog.package,
                instance_pre,
                by_name: catalog
                    .procedures
                    .iter()
                    .enumerate()
                    .flat_map(|(index, info)| {
                        let snake = info.name.replace('-', "_");
                        [(info.name.clone(), index), (snake, index)]
                    })
                    .collect(),
                procedures: catalog.procedures.into_iter().map(Arc::new).collect(),
                exports: catalog.exports,
                warm: std::sync::Mutex::new(Vec::new()),
            }),
        };
        self.try_instantiate(&module)?;
        Ok(module)
    }

    /// Instantiates `module` once, so that a module which cannot start (memory minimum above
    /// the cap, too many instances, a trapping start function) fails at load, not on every
    /// call.
    fn try_instantiate(&self, module: &Module) -> Result<(), Error> {
        let context = CallContext {
            now_ms: 0,
            bucket_id: 0,
            caller: String::new(),
            kind: ProcedureKind::Query,
        };
        let mut store = self
            .store(
                module,
                "(load)",
                ProcedureKind::Query,
                context,
                Box::new(EmptySpace),
                self.inner.limits.call_fuel_max,
            )
            .map_err(|(error, _)| Error::Instantiate {
                module: module.name().to_string(),
                reason: error.to_string(),
            })?;
        module
            .inner
            .instance_pre
            .instantiate(&mut store)
            .map_err(|error| Error::Instantiate {
                module: module.name().to_string(),
                reason: self.call_error(error).to_string(),
            })?;
        Ok(())
    }

    /// Run one procedure. `space` is the storage the host functions read and write; it is
    /// handed back so the caller can commit or discard what the call wrote (discard it on any
    /// error). Args are checked against the signature first. A returned `result::err(string)`
    /// is [`CallError::Procedure`]; an `ok(value)` is returned as `value` (a bare `ok` as the
    /// empty tuple, as is a function with no result).
    pub fn call(
        &self,
        module: &Module,
        procedure: &str,
        args: &[Value],
        context: CallContext,
        space: Box<dyn Space + Send>,
    ) -> (Result<Value, CallError>, Box<dyn Space + Send>) {
        let fuel = self.inner.limits.call_fuel_max;
        self.call_within(module, procedure, args, context, space, fuel)
    }

    /// [`Runtime::call`] with at most `fuel` (capped at `call_fuel_max`). A call that needs
    /// more than `fuel` but may have up to `call_fuel_max` ends with
    /// [`CallError::SliceSpent`], having changed nothing the caller keeps (discard `space`'s
    /// writes): run it again with [`Runtime::call`]. Its result is then what it would have
    /// been anyway, since fuel decides only whether a call finishes. This lets a caller run
    /// short calls where a long one must not run (an async worker) and move the rest.
    pub fn call_within(
        &self,
        module: &Module,
        procedure: &str,
        args: &[Value],
        context: CallContext,
        space: Box<dyn Space + Send>,
        fuel: u64,
    ) -> (Result<Value, CallError>, Box<dyn Space + Send>) {
        let Some(index) = module.index_of(procedure) else {
            return (
                Err(CallError::UnknownProcedure(procedure.to_string())),
                space,
            );
        };
        let info = &module.inner.procedures[index];
        let params = match lower_args(info, args) {
            Ok(params) => params,
            Err(error) => return (Err(error), space),
        };
        let fuel = fuel.min(self.inner.limits.call_fuel_max);
        let (result, space) = self.call_warm(module, index, &params, context, space, fuel);
        match result {
            Err(CallError::OutOfFuel { .. }) if fuel < self.inner.limits.call_fuel_max => {
                (Err(CallError::SliceSpent { fuel }), space)
            }
            result => (result, space),
        }
    }

    /// A call on a warm instance of the module (instantiated by an earlier call), or on a new
    /// one that is kept warm afterwards, as SpacetimeDB keeps module instances: a fresh store
    /// and instance cost about five times the call itself. What a guest keeps in its own
    /// memory or globals from one call to the next is not replicated state (a command's
    /// writes and answer go through the log as effects, run once on the leader), so a
    /// procedure must keep what matters in accounts and kv, and must not rely on globals
    /// surviving: an instance is replaced after its call trapped, ran out of fuel or memory or
    /// failed in the host (a trapped instance cannot be entered again), after
    /// [`WARM_INSTANCE_CALLS_MAX`] calls, and when its memory grew past
    /// [`WARM_INSTANCE_MEMORY_BYTES_MAX`]; a new leader starts with none.
    fn call_warm(
        &self,
        module: &Module,
        index: usize,
        params: &[Val],
        context: CallContext,
        space: Box<dyn Space + Send>,
        fuel: u64,
    ) -> (Result<Value, CallError>, Box<dyn Space + Send>) {
        let info = &module.inner.procedures[index];
        let warm = module.inner.warm.lock().unwrap().pop();
        let mut warm = match warm {
            Some(mut warm) => {
                let state = warm.store.data_mut();
                state.space = space;
                state.context = context;
                state.procedure.clear();
                state.procedure.push_str(&info.name);
                state.procedure_kind = info.kind;
                state.memory_refused_bytes = None;
                warm.store.set_hostcall_fuel(self.host_transfer_bytes_max());
                if let Err(error) = warm.store.set_fuel(fuel) {
                    let space = warm.store.into_data().space;
                    return (
                        Err(CallError::Internal(format!("cannot set fuel: {error:#}"))),
                        space,
                    );
                }
                warm
            }
            None => {
                let store = self.store(module, &info.name, info.kind, context, space, fuel);
                let mut store = match store {
                    Ok(store) => store,
                    Err((error, space)) => return (Err(error), space),
                };
                match module.inner.instance_pre.instantiate(&mut store) {
                    Ok(instance) => WarmInstance {
                        store,
                        instance,
                        funcs: vec![None; module.inner.procedures.len()],
                        calls: 0,
                        _counted: WarmCount::new(&self.inner.warm_instances),
                    },
                    Err(error) => {
                        let error = self.call_error(error);
                        return (Err(error), store.into_data().space);
                    }
                }
            }
        };
        let func = match warm.funcs[index] {
            Some(func) => Some(func),
            None => warm
                .instance
                .get_func(&mut warm.store, module.inner.exports[index]),
        };
        let Some(func) = func else {
            let space = warm.store.into_data().space;
            let error = CallError::Internal(format!("export of {} vanished", info.name));
            return (Err(error), space);
        };
        warm.funcs[index] = Some(func);
        let result = self.invoke(&mut warm.store, func, module, index, params);
        let space = std::mem::replace(&mut warm.store.data_mut().space, Box::new(EmptySpace));
        // The guest returned normally (with a value or its own error): its state is sound.
        let warm_max = (self.inner.limits.instances_max as usize / 4).max(1);
        let warm_total = self
            .inner
            .warm_instances
            .load(std::sync::atomic::Ordering::Relaxed);
        warm.calls += 1;
        let sound = matches!(result, Ok(_) | Err(CallError::Procedure(_)));
        let fit = warm.calls < WARM_INSTANCE_CALLS_MAX
            && warm.store.data().memory_bytes <= WARM_INSTANCE_MEMORY_BYTES_MAX;
        if sound && fit && warm_total <= warm_max {
            let mut pool = module.inner.warm.lock().unwrap();
            if pool.len() < WARM_INSTANCES_PER_MODULE_MAX {
                pool.push(warm);
            }
        }
        (result, space)
    }

    /// A new store for an instance, set up for its first call (with the call's fuel).
    fn store(
        &self,
        module: &Module,
        procedure: &str,
        procedure_kind: ProcedureKind,
        context: CallContext,
        space: Box<dyn Space + Send>,
        fuel: u64,
    ) -> Result<Store<HostState>, (CallError, Box<dyn Space + Send>)> {
        let state = HostState {
            space,
            context,
            module: module.inner.name.clone(),
            procedure: procedure.to_string(),
            procedure_kind,
            guest_memory_bytes_max: self.inner.limits.guest_memory_bytes_max,
            memory_refused_bytes: None,
            memory_bytes: 0,
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|state| state);
        // Bounds what the host allocates while copying data out of the guest (the result,
        // host-call arguments) *before* it is allocated: wasmtime charges every lifted value.
        store.set_hostcall_fuel(self.host_transfer_bytes_max());
        match store.set_fuel(fuel) {
            Ok(()) => Ok(store),
            Err(error) => Err((
                CallError::Internal(format!("cannot set fuel: {error:#}")),
                store.into_data().space,
            )),
        }
    }

    /// Calls `func`, the export of procedure `index`, and converts its result.
    fn invoke(
        &self,
        store: &mut Store<HostState>,
        func: wasmtime::component::Func,
        module: &Module,
        index: usize,
        params: &[Val],
    ) -> Result<Value, CallError> {
        let info = &module.inner.procedures[index];
        let mut results = vec![Val::Bool(false); usize::from(info.result.is_some())];
        func.call(&mut *store, params, &mut results)
            .map_err(|error| self.call_error(error))
            .map_err(|error| self.memory_error(store, error))?;
        let value = match results.pop() {
            None => Value::Tuple(Vec::new()),
            Some(val) => convert::from_val(val).map_err(|what| {
                CallError::Trap(format!(
                    "{} returned {what}, which has no wire form",
                    info.name
                ))
            })?,
        };
        let bytes = convert::value_bytes(&value);
        let max = self.inner.limits.result_bytes_max;
        if bytes > max {
            return Err(CallError::ResultTooLarge { bytes, max });
        }
        match value {
            Value::Result(Ok(value)) if matches!(info.result, Some(Type::Result { .. })) => {
                Ok(value.map_or_else(|| Value::Tuple(Vec::new()), |value| *value))
            }
            Value::Result(Err(error)) if matches!(info.result, Some(Type::Result { .. })) => {
                Err(CallError::Procedure(match error.map(|error| *error) {
                    Some(Value::String(message)) => message,
                    Some(other) => other.to_string(),
                    None => format!("procedure {} failed", info.name),
                }))
            }
            value => Ok(value),
        }
    }

    /// Host bytes a guest may make the host allocate in one transfer out of the guest (its
    /// result, or one host call's arguments), as wasmtime counts them (`size_of::<Val>()` per
    /// lifted value, plus string bytes). Derived from `result_bytes_max` (every value takes at
    /// least one byte on the wire), and never below what a kv write needs.
    pub fn host_transfer_bytes_max(&self) -> usize {
        let per_value = std::mem::size_of::<Val>();
        let result_bound = self.inner.limits.result_bytes_max.saturating_mul(per_value);
        let kv_bound = (KV_KEY_BYTES_MAX + KV_VALUE_BYTES_MAX).saturating_mul(2);
        result_bound.max(kv_bound)
    }

    /// A trap after the guest was refused memory is reported as running out of memory.
    fn memory_error(&self, store: &Store<HostState>, error: CallError) -> CallError {
        match (store.data().memory_refused_bytes, &error) {
            (Some(desired), CallError::Trap(trap)) => CallError::OutOfMemory {
                max: self.inner.limits.guest_memory_bytes_max,
                detail: format!("growing to {desired} bytes was refused, then: {trap}"),
            },
            _ => error,
        }
    }

    /// Classifies an error from instantiating or running a guest.
    fn call_error(&self, error: wasmtime::Error) -> CallError {
        if let Some(trap) = error.downcast_ref::<Trap>() {
            if *trap == Trap::OutOfFuel {
                return CallError::OutOfFuel {
                    fuel: self.inner.limits.call_fuel_max,
                };
            }
            return CallError::Trap(trap_message(&error, trap));
        }
        if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
            return CallError::Internal(format!(
                "every instance slot is busy (instances_max = {}): {error}",
                self.inner.limits.instances_max
            ));
        }
        if error.downcast_ref::<wasmtime::OutOfMemory>().is_some() {
            return CallError::Internal(format!("{error:#}"));
        }
        // wasmtime's hostcall-fuel error type is private; its message is stable for the pinned
        // version (=48.0.8), and a unit test below keeps it honest.
        if format!("{error:#}").contains(HOSTCALL_FUEL_EXHAUSTED) {
            return CallError::TooMuchData {
                max: self.host_transfer_bytes_max(),
                result_bytes_max: self.inner.limits.result_bytes_max,
            };
        }
        // Anything else comes from what the guest did (e.g. returning invalid UTF-8): the same
        // on every replica.
        CallError::Trap(format!("{error:#}"))
    }
}

/// The trap and the innermost wasm frame, without addresses: the message must be identical
/// on every replica.
fn trap_message(error: &wasmtime::Error, trap: &Trap) -> String {
    let frame = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|backtrace| backtrace.frames().first())
        .and_then(|frame| frame.func_name().map(str::to_string));
    match frame {
        Some(function) => format!("{trap} (in {function})"),
        None => trap.to_string(),
    }
}

fn check_limits(limits: &Limits) -> Result<(), Error> {
    let fail = |message: &str| Err(Error::Limits(message.to_string()));
    if limits.call_fuel_max == 0 {
        return fail("call_fuel_max must be > 0");
    }
    if limits.instances_max == 0 {
        return fail("instances_max must be > 0");
    }
    if limits
        .instances_max
        .checked_mul(CORE_INSTANCES_PER_COMPONENT_MAX)
        .is_none()
    {
        return fail("instances_max is too large");
    }
    if limits.guest_memory_bytes_max < WASM_PAGE_BYTES
        || !limits
            .guest_memory_bytes_max
            .is_multiple_of(WASM_PAGE_BYTES)
        || limits.guest_memory_bytes_max as u64 > 1 << 32
    {
        return fail(
            "guest_memory_bytes_max must be a whole number of 64 KiB pages, at most 4 GiB",
        );
    }
    if limits.module_bytes_max == 0 || limits.result_bytes_max == 0 {
        return fail("module_bytes_max and result_bytes_max must be > 0");
    }
    Ok(())
}

/// Whether `bytes` is a binary core wasm module (magic, then version 1, layer 0), as opposed
/// to a component (layer 1) or WAT text.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\0asm\x01\0\0\0")
}

/// Whether an import name is one of `billcl:host/<interface>[@version]`.
fn is_host_import(import: &str) -> bool {
    let Some(interface) = import
        .strip_prefix(HOST_PACKAGE)
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    let interface = interface.split('@').next().unwrap_or(interface);
    HOST_INTERFACES.contains(&interface)
}

/// The interface part of an export name: `query` for `billcl:billing/query@0.1.0` or `query`.
fn interface_name(export: &str) -> &str {
    let unversioned = export.split('@').next().unwrap_or(export);
    unversioned.rsplit('/').next().unwrap_or(unversioned)
}

struct Catalog {
    procedures: Vec<ProcedureInfo>,
    exports: Vec<ComponentExportIndex>,
    package: Option<String>,
}

/// The package name of an export (`transfer` for `acme:transfer/command@0.1.0`), if it has one.
fn package_of(export: &str) -> Option<String> {
    let unversioned = export.split('@').next().unwrap_or(export);
    let (package, _interface) = unversioned.rsplit_once('/')?;
    let name = package.rsplit(':').next().unwrap_or(package);
    (!name.is_empty()).then(|| name.to_string())
}

fn catalog(
    engine: &Engine,
    component: &Component,
    module: &str,
    version: u32,
) -> Result<Catalog, Error> {
    let component_type = component.component_type();
    let mut catalog = Catalog {
        procedures: Vec::new(),
        exports: Vec::new(),
        package: None,
    };
    let mut export_names = Vec::new();
    let mut interfaces = Vec::new();
    for (export, item) in component_type.exports(engine) {
        export_names.push(export.to_string());
        let kind = match interface_name(export) {
            "query" => ProcedureKind::Query,
            "command" => ProcedureKind::Command,
            _ => continue,
        };
        let types::ComponentItem::ComponentInstance(instance) = item.ty else {
            continue;
        };
        interfaces.push((kind, export, instance));
    }
    if interfaces.is_empty() {
        return Err(Error::NoProcedures {
            module: module.to_string(),
            exports: if export_names.is_empty() {
                "nothing".to_string()
            } else {
                export_names.join(", ")
            },
        });
    }
    // Queries first, so the catalog reads the same whatever the export order.
    interfaces.sort_by_key(|(kind, _, _)| *kind == ProcedureKind::Command);
    catalog.package = interfaces
        .iter()
        .find_map(|(_, export, _)| package_of(export));
    for (kind, export, instance) in interfaces {
        let instance_index =
            component
                .get_export_index(None, export)
                .ok_or_else(|| Error::Invalid {
                    module: module.to_string(),
                    reason: format!("export `{export}` has no index"),
                })?;
        for (name, item) in instance.exports(engine) {
            let unsupported = |reason: String| Error::UnsupportedProcedure {
                module: module.to_string(),
                procedure: name.to_string(),
                reason,
            };
            let func = match item.ty {
                types::ComponentItem::ComponentFunc(func) => func,
                // Type exports (e.g. `use`d records) are not procedures.
                types::ComponentItem::Type(_) => continue,
                _ => {
                    return Err(unsupported(format!(
                        "is not a function (interface `{export}` may export only functions \
                         and types)"
                    )))
                }
            };
            if func.async_() {
                return Err(unsupported(
                    "is async; only synchronous functions are supported".to_string(),
                ));
            }
            let params = func
                .params()
                .map(|(param, ty)| {
                    convert::wire_type(&ty)
                        .map(|ty| (param.to_string(), ty))
                        .map_err(|reason| unsupported(format!("parameter `{param}`: {reason}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut results = func.results();
            let result = results
                .next()
                .map(|ty| convert::wire_type(&ty))
                .transpose()
                .map_err(|reason| unsupported(format!("result: {reason}")))?;
            if results.next().is_some() {
                return Err(unsupported("has more than one result".to_string()));
            }
            if catalog.procedures.iter().any(|info| info.name == name) {
                return Err(unsupported(
                    "is exported twice (by `query` and `command`, or by two packages)".to_string(),
                ));
            }
            let function_index = component
                .get_export_index(Some(&instance_index), name)
                .ok_or_else(|| unsupported("has no export index".to_string()))?;
            catalog.procedures.push(ProcedureInfo {
                name: name.to_string(),
                module: module.to_string(),
                version,
                // Which version is active is the storage's state, not the module's: its
                // catalog sets this.
                active: false,
                kind,
                params,
                result,
            });
            catalog.exports.push(function_index);
        }
    }
    Ok(catalog)
}

/// Checks the arguments against the signature and lowers them.
fn lower_args(info: &ProcedureInfo, args: &[Value]) -> Result<Vec<Val>, CallError> {
    if args.len() != info.params.len() {
        return Err(CallError::InvalidArgument(format!(
            "{} takes {} argument{} ({}), got {}",
            info.name,
            info.params.len(),
            if info.params.len() == 1 { "" } else { "s" },
            info.signature(),
            args.len()
        )));
    }
    args.iter()
        .zip(&info.params)
        .map(|(value, (param, ty))| {
            let invalid = |message: String| {
                CallError::InvalidArgument(format!("{}: argument `{param}`: {message}", info.name))
            };
            value.check(ty).map_err(invalid)?;
            convert::to_val(value, ty).map_err(invalid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_imports_are_recognized() {
        assert!(is_host_import("billcl:host/accounts@0.1.0"));
        assert!(is_host_import("billcl:host/log"));
        assert!(!is_host_import("wasi:cli/environment@0.2.0"));
        assert!(!is_host_import("billcl:host/clock@0.1.0"));
        assert!(!is_host_import("billcl:hostile/kv@0.1.0"));
    }

    #[test]
    fn interface_names_drop_package_and_version() {
        assert_eq!(interface_name("billcl:billing/query@0.1.0"), "query");
        assert_eq!(interface_name("a:b/command"), "command");
        assert_eq!(interface_name("query"), "query");
        assert_eq!(interface_name("a:b/queries@1.0.0"), "queries");
    }

    #[test]
    fn package_names_come_from_export_names() {
        assert_eq!(
            package_of("acme:transfer/command@0.1.0").as_deref(),
            Some("transfer")
        );
        assert_eq!(package_of("a:b/query").as_deref(), Some("b"));
        assert_eq!(package_of("query"), None);
    }

    #[test]
    fn limits_are_checked() {
        assert!(check_limits(&Limits::default()).is_ok());
        let odd_memory = Limits {
            guest_memory_bytes_max: 100_000,
            ..Limits::default()
        };
        assert!(matches!(check_limits(&odd_memory), Err(Error::Limits(_))));
        let no_fuel = Limits {
            call_fuel_max: 0,
            ..Limits::default()
        };
        assert!(matches!(check_limits(&no_fuel), Err(Error::Limits(_))));
    }

    #[test]
    fn only_internal_errors_are_not_deterministic() {
        assert!(CallError::OutOfFuel { fuel: 1 }.is_deterministic());
        assert!(CallError::Procedure("x".to_string()).is_deterministic());
        assert!(!CallError::Internal("x".to_string()).is_deterministic());
    }
}
