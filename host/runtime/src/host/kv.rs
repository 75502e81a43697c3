//! `billcl:host/kv`: a module's own key-value data, namespaced by module name so two modules
//! never see each other's keys. Keys and values are bounded here, before they reach storage.

use super::billcl::host::kv::Host;
use super::HostState;
use crate::{KV_KEY_BYTES_MAX, KV_VALUE_BYTES_MAX};

impl Host for HostState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        if key.len() > KV_KEY_BYTES_MAX {
            return Ok(None);
        }
        Ok(self.space.kv_get(&self.module, &key))
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        if let Err(message) = self.check_writable().and_then(|()| check_key(&key)) {
            return Ok(Err(message));
        }
        if value.len() > KV_VALUE_BYTES_MAX {
            return Ok(Err(format!(
                "kv value is {} bytes; the limit is {KV_VALUE_BYTES_MAX}",
                value.len()
            )));
        }
        Ok(self.space.kv_set(&self.module, &key, &value))
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        if let Err(message) = self.check_writable().and_then(|()| check_key(&key)) {
            return Ok(Err(message));
        }
        Ok(self.space.kv_delete(&self.module, &key))
    }
}

fn check_key(key: &[u8]) -> Result<(), String> {
    if key.len() > KV_KEY_BYTES_MAX {
        return Err(format!(
            "kv key is {} bytes; the limit is {KV_KEY_BYTES_MAX}",
            key.len()
        ));
    }
    Ok(())
}
