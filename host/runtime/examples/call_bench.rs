//! Prints how long one billing call takes through the runtime, on a warm instance as every call
//! runs (the first call of each kind also pays for a fresh store and instance):
//! `cargo run --release -p billcl-runtime --example call_bench [CALLS]`.
//!
//! A benchmark, not a test: it prints figures and asserts nothing about time.

use std::collections::HashMap;
use std::time::Instant;

use billcl_money::{Account, Decimal};
use billcl_runtime::{
    CallContext, Limits, LogLevel, ProcedureKind, Runtime, Space, Value, BILLING_COMPONENT,
    BILLING_MODULE_NAME,
};

const CALLS_DEFAULT: u32 = 20_000;

/// Accounts in a map; owns everything; drops kv and logs (billing uses neither).
#[derive(Default)]
struct MapSpace {
    accounts: HashMap<u64, Account>,
}

impl Space for MapSpace {
    fn account(&mut self, id: u64) -> Option<Account> {
        self.accounts.get(&id).copied()
    }
    fn put_account(&mut self, account: Account) -> Result<(), String> {
        self.accounts.insert(account.id, account);
        Ok(())
    }
    fn owns(&mut self, _id: u64) -> bool {
        true
    }
    fn kv_get(&mut self, _module: &str, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn kv_set(&mut self, _module: &str, _key: &[u8], _value: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn kv_delete(&mut self, _module: &str, _key: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn log(&mut self, _module: &str, _level: LogLevel, _message: &str) {}
}

fn main() {
    let calls: u32 = std::env::args()
        .nth(1)
        .and_then(|text| text.parse().ok())
        .unwrap_or(CALLS_DEFAULT);
    let runtime = Runtime::new(Limits::default()).expect("runtime");
    let started = Instant::now();
    let module = runtime
        .load(BILLING_MODULE_NAME, 1, BILLING_COMPONENT)
        .expect("billing loads");
    println!("load (compile) billing: {:?}", started.elapsed());

    let mut space: Box<dyn Space + Send> = Box::new(MapSpace::default());
    let context = |now_ms: i64, kind| CallContext {
        now_ms,
        bucket_id: 1,
        caller: "bench".to_string(),
        kind,
    };
    let (created, returned) = runtime.call(
        &module,
        "insert-data",
        &[],
        context(0, ProcedureKind::Command),
        space,
    );
    space = returned;
    println!("insert-data: {:?}", created.expect("insert-data"));

    // Every call runs on a warm instance of the module; a command's writes go to the space.
    for (label, procedure, kind, args) in [
        (
            "get (query)",
            "get",
            ProcedureKind::Query,
            vec![Value::Uint(5)],
        ),
        (
            "get (run as a command)",
            "get",
            ProcedureKind::Command,
            vec![Value::Uint(5)],
        ),
        (
            "add-money (command)",
            "add-money",
            ProcedureKind::Command,
            vec![Value::Uint(5), Value::Decimal(Decimal::from_micros(1))],
        ),
    ] {
        let started = Instant::now();
        for call in 0..calls {
            let (result, returned) = runtime.call(
                &module,
                procedure,
                &args,
                context(i64::from(call), kind),
                space,
            );
            space = returned;
            result.expect("call succeeds");
        }
        let elapsed = started.elapsed();
        println!(
            "{label}: {calls} calls in {elapsed:?}: {:.1} µs per call",
            elapsed.as_secs_f64() * 1e6 / f64::from(calls)
        );
    }
}
