//! `billcl:host/log`: a procedure's log lines, handed to the node's [`crate::Space`] with the
//! module name, each cut to [`crate::LOG_MESSAGE_BYTES_MAX`].

use super::billcl::host::log::{Host, Level};
use super::HostState;
use crate::{LogLevel, LOG_MESSAGE_BYTES_MAX};

impl Host for HostState {
    fn write(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        let mut end = message.len().min(LOG_MESSAGE_BYTES_MAX);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.space.log(&self.module, level, &message[..end]);
        Ok(())
    }
}
