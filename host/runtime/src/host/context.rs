//! `billcl:host/context`: the call's deterministic context (time from the log entry, bucket,
//! caller). A procedure has no other source of time: there is no WASI clock.

use super::billcl::host::context::Host;
use super::HostState;

impl Host for HostState {
    fn now_ms(&mut self) -> wasmtime::Result<i64> {
        Ok(self.context.now_ms)
    }

    fn bucket_id(&mut self) -> wasmtime::Result<u32> {
        Ok(self.context.bucket_id)
    }

    fn caller(&mut self) -> wasmtime::Result<String> {
        Ok(self.context.caller.clone())
    }
}
