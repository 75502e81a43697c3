//! The host side of the WIT contract (`wit/host.wit`): the bindings wasmtime generates from it,
//! and the per-call state every host function works on.
//!
//! Each WIT interface has one module here implementing its `Host` trait (`accounts`, `kv`,
//! `context`, `log`; `types` has no functions). Host functions return
//! `wasmtime::Result<Result<T, String>>` where the WIT has a `result`: the outer error would
//! trap the guest (none of ours does), the inner one is an answer the guest sees.

mod accounts;
mod context;
mod kv;
mod log;

use std::sync::Arc;

use crate::{CallContext, ProcedureKind, Space};

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "billcl:host/procedures",
    imports: { default: trappable },
});

pub(crate) use self::billcl::host::types::{Account as WitAccount, Decimal as WitDecimal};

/// What one call's host functions see: the storage space, the call's context, and who is
/// calling. Lives in the call's `Store` and is taken back out when the call ends.
pub(crate) struct HostState {
    pub(crate) space: Box<dyn Space + Send>,
    pub(crate) context: CallContext,
    /// The module's name: the kv namespace and the log's source.
    pub(crate) module: Arc<str>,
    /// The procedure being run, for messages.
    pub(crate) procedure: String,
    /// Whether the procedure is exported as a query or a command.
    pub(crate) procedure_kind: ProcedureKind,
    /// The cap on each linear memory of the guest.
    pub(crate) guest_memory_bytes_max: usize,
    /// The size a refused `memory.grow` asked for, so a later trap can say why.
    pub(crate) memory_refused_bytes: Option<usize>,
    /// The largest linear memory the instance was granted (at creation or by a grow).
    pub(crate) memory_bytes: usize,
}

/// Memory growth past `guest_memory_bytes_max` fails the wasm way (`memory.grow` returns -1)
/// and is remembered, so the trap that usually follows is reported as running out of memory.
/// The pooling allocator enforces the same cap; this is what names it.
impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.guest_memory_bytes_max {
            self.memory_refused_bytes = Some(desired);
            return Ok(false);
        }
        self.memory_bytes = self.memory_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= crate::TABLE_ELEMENTS_MAX)
    }
}

impl HostState {
    /// `Err(message)` (an answer the guest sees) unless this call may write: a query, either by
    /// the procedure's own kind or by how the caller runs it, never writes.
    pub(crate) fn check_writable(&self) -> Result<(), String> {
        let kinds = [self.procedure_kind, self.context.kind];
        if kinds.contains(&ProcedureKind::Query) {
            return Err(format!(
                "procedure {} is a query: it cannot write",
                self.procedure
            ));
        }
        Ok(())
    }
}

impl billcl::host::types::Host for HostState {}

/// Adds every `billcl:host` interface to `linker`.
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    Procedures::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
        linker,
        |state| state,
    )
}
