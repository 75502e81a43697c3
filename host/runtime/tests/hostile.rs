//! Hostile modules against the runtime: each gets a clear, deterministic error for its call,
//! and the runtime keeps serving other calls. The modules are small WAT components (the
//! runtime accepts component WAT text), so each shows exactly the behaviour under test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use billcl_money::Account;
use billcl_runtime::{
    CallContext, CallError, Limits, LogLevel, Module, ProcedureKind, Runtime, Space, Value,
    BILLING_COMPONENT, BILLING_MODULE_NAME, EXAMPLE_COMPONENTS,
};

/// Accounts in a shared map; owns everything.
#[derive(Clone, Default)]
struct MemorySpace {
    accounts: Arc<Mutex<BTreeMap<u64, Account>>>,
    kv: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Space for MemorySpace {
    fn account(&mut self, id: u64) -> Option<Account> {
        self.accounts.lock().unwrap().get(&id).copied()
    }
    fn put_account(&mut self, account: Account) -> Result<(), String> {
        self.accounts.lock().unwrap().insert(account.id, account);
        Ok(())
    }
    fn owns(&mut self, _id: u64) -> bool {
        true
    }
    fn kv_get(&mut self, module: &str, key: &[u8]) -> Option<Vec<u8>> {
        let key = [module.as_bytes(), b"\0", key].concat();
        self.kv.lock().unwrap().get(&key).cloned()
    }
    fn kv_set(&mut self, module: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        let key = [module.as_bytes(), b"\0", key].concat();
        self.kv.lock().unwrap().insert(key, value.to_vec());
        Ok(())
    }
    fn kv_delete(&mut self, module: &str, key: &[u8]) -> Result<(), String> {
        let key = [module.as_bytes(), b"\0", key].concat();
        self.kv.lock().unwrap().remove(&key);
        Ok(())
    }
    fn log(&mut self, module: &str, level: LogLevel, message: &str) {
        self.logs
            .lock()
            .unwrap()
            .push(format!("{module} {level:?}: {message}"));
    }
}

fn runtime() -> Runtime {
    Runtime::new(Limits {
        call_fuel_max: 5_000_000,
        instances_max: 4,
        ..Limits::default()
    })
    .unwrap()
}

fn call(
    runtime: &Runtime,
    module: &Module,
    space: &MemorySpace,
    procedure: &str,
    args: &[Value],
) -> Result<Value, CallError> {
    let kind = module
        .procedure(procedure)
        .map_or(ProcedureKind::Command, |info| info.kind);
    let context = CallContext {
        now_ms: 1_700_000_000_000,
        bucket_id: 7,
        caller: "test".to_string(),
        kind,
    };
    runtime
        .call(module, procedure, args, context, Box::new(space.clone()))
        .0
}

/// The built-in module still answers after a hostile call: the runtime keeps serving.
fn assert_still_serving(runtime: &Runtime, space: &MemorySpace) {
    let billing = runtime
        .load(BILLING_MODULE_NAME, 1, BILLING_COMPONENT)
        .unwrap();
    call(runtime, &billing, space, "insert-data", &[]).unwrap();
    let got = call(runtime, &billing, space, "get", &[Value::Uint(4)]).unwrap();
    assert!(matches!(got, Value::Tuple(_)), "{got:?}");
}

/// Peak resident memory of this process, in bytes (Linux).
fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

const HOSTILE: &str = r#"
(component
  (core module $m
    (memory (export "memory") 1000)
    (func (export "spin") (result i32)
      (loop $forever (br $forever))
      i32.const 0)
    (func (export "crash") (result i32)
      unreachable)
    ;; grows memory a page at a time; traps when growth is refused
    (func (export "hog") (result i32)
      (loop $more
        (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
      unreachable)
    ;; returns a 60 MiB list<u8> from its (zeroed) memory
    (func (export "flood") (result i32)
      (i32.store (i32.const 0) (i32.const 16))
      (i32.store (i32.const 4) (i32.const 62914560))
      i32.const 0)
    ;; returns a 60 MiB string
    (func (export "shout") (result i32)
      (i32.store (i32.const 0) (i32.const 16))
      (i32.store (i32.const 4) (i32.const 62914560))
      i32.const 0)
    ;; returns a 2 MiB string: within what may be copied, above result_bytes_max
    (func (export "chatter") (result i32)
      (i32.store (i32.const 0) (i32.const 16))
      (i32.store (i32.const 4) (i32.const 2097152))
      i32.const 0)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 0))
  (core instance $i (instantiate $m))
  (func $spin (result u32) (canon lift (core func $i "spin")))
  (func $crash (result u32) (canon lift (core func $i "crash")))
  (func $hog (result u32) (canon lift (core func $i "hog")))
  (func $flood (result (list u8))
    (canon lift (core func $i "flood") (memory (core memory $i "memory"))))
  (func $shout (result string)
    (canon lift (core func $i "shout") (memory (core memory $i "memory"))))
  (func $chatter (result string)
    (canon lift (core func $i "chatter") (memory (core memory $i "memory"))))
  (instance $query
    (export "flood" (func $flood))
    (export "shout" (func $shout))
    (export "chatter" (func $chatter)))
  (instance $command
    (export "spin" (func $spin))
    (export "crash" (func $crash))
    (export "hog" (func $hog)))
  (export "test:hostile/query@0.1.0" (instance $query))
  (export "test:hostile/command@0.1.0" (instance $command)))
"#;

fn hostile(runtime: &Runtime) -> Module {
    let module = runtime.load("hostile", 1, HOSTILE.as_bytes()).unwrap();
    assert_eq!(module.package_name(), Some("hostile"));
    module
}

#[test]
fn an_infinite_loop_runs_out_of_fuel() {
    let runtime = runtime();
    let module = hostile(&runtime);
    let space = MemorySpace::default();
    for _ in 0..6 {
        let result = call(&runtime, &module, &space, "spin", &[]);
        assert_eq!(result, Err(CallError::OutOfFuel { fuel: 5_000_000 }));
    }
    assert_still_serving(&runtime, &space);
}

#[test]
fn a_trap_is_an_error_naming_it() {
    let runtime = runtime();
    let module = hostile(&runtime);
    let space = MemorySpace::default();
    let result = call(&runtime, &module, &space, "crash", &[]);
    let Err(CallError::Trap(message)) = &result else {
        panic!("expected a trap, got {result:?}");
    };
    assert!(message.contains("unreachable"), "{message}");
    // A trapped instance cannot be entered again: it is replaced, not put back warm.
    assert_eq!(result, call(&runtime, &module, &space, "crash", &[]));
    assert_still_serving(&runtime, &space);
}

#[test]
fn unbounded_allocation_runs_out_of_memory() {
    let runtime = runtime();
    let module = hostile(&runtime);
    let space = MemorySpace::default();
    let result = call(&runtime, &module, &space, "hog", &[]);
    let Err(error @ CallError::OutOfMemory { max, .. }) = &result else {
        panic!("expected running out of memory, got {result:?}");
    };
    assert_eq!(*max, Limits::default().guest_memory_bytes_max);
    assert!(error.is_deterministic());
    eprintln!("hog: {error}");
    assert_eq!(result, call(&runtime, &module, &space, "hog", &[]));
    assert_still_serving(&runtime, &space);
}

#[test]
fn an_enormous_result_is_refused_before_the_host_allocates_it() {
    let runtime = runtime();
    let module = hostile(&runtime);
    let space = MemorySpace::default();
    let before = peak_resident_bytes();
    // 60 MiB of list<u8>: ~2 GiB of host values if lifted whole.
    let flood = call(&runtime, &module, &space, "flood", &[]);
    assert!(
        matches!(flood, Err(CallError::TooMuchData { .. })),
        "{flood:?}"
    );
    eprintln!("flood: {}", flood.unwrap_err());
    let shout = call(&runtime, &module, &space, "shout", &[]);
    assert!(
        matches!(shout, Err(CallError::TooMuchData { .. })),
        "{shout:?}"
    );
    let chatter = call(&runtime, &module, &space, "chatter", &[]);
    assert!(
        matches!(
            chatter,
            Err(CallError::ResultTooLarge { max: 1_048_576, .. })
        ),
        "{chatter:?}"
    );
    let grown = peak_resident_bytes().saturating_sub(before);
    eprintln!(
        "peak resident memory grew by {} MiB over the enormous results",
        grown >> 20
    );
    assert!(
        grown < 512 << 20,
        "the host allocated {} MiB for refused results",
        grown >> 20
    );
    assert_still_serving(&runtime, &space);
}

/// A component whose `query` export calls `billcl:host/accounts.put` (through the canonical
/// ABI by hand: a libc module gives memory and realloc, the main module calls the lowered
/// import and returns its `result<_, string>`).
const SNEAKY_QUERY: &str = r#"
(component
  (import "billcl:host/accounts@0.1.0" (instance $accounts
    (type $decimal-type (record (field "micros" s64)))
    (export "decimal" (type $decimal (eq $decimal-type)))
    (type $account-type (record
      (field "id" u64)
      (field "balance" $decimal)
      (field "velocity" $decimal)
      (field "since-ms" s64)
      (field "remainder" u32)))
    (export "account" (type $account (eq $account-type)))
    (export "put" (func (param "account" $account) (result (result (error string)))))))
  (core module $libc
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $at i32)
      (local.set $at (global.get $next))
      (global.set $next (i32.add (global.get $next) (local.get 3)))
      (local.get $at)))
  (core instance $libc (instantiate $libc))
  (core func $put (canon lower (func $accounts "put")
    (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))
  (core module $m
    (import "host" "put" (func $put (param i64 i64 i64 i64 i32 i32)))
    (func (export "steal") (param i64) (result i32)
      (call $put (local.get 0) (i64.const 1000000000) (i64.const 0) (i64.const 0)
        (i32.const 0) (i32.const 64))
      i32.const 64))
  (core instance $i (instantiate $m
    (with "host" (instance (export "put" (func $put))))))
  (func $steal (param "id" u64) (result (result (error string)))
    (canon lift (core func $i "steal") (memory (core memory $libc "memory"))
      (realloc (core func $libc "realloc"))))
  (instance $query (export "steal" (func $steal)))
  (export "test:sneaky/query@0.1.0" (instance $query)))
"#;

#[test]
fn a_query_that_writes_is_refused() {
    let runtime = runtime();
    let module = runtime.load("sneaky", 1, SNEAKY_QUERY.as_bytes()).unwrap();
    let space = MemorySpace::default();
    let result = call(&runtime, &module, &space, "steal", &[Value::Uint(4)]);
    assert_eq!(
        result,
        Err(CallError::Procedure(
            "procedure steal is a query: it cannot write".to_string()
        ))
    );
    assert!(space.accounts.lock().unwrap().is_empty());
}

#[test]
fn the_example_modules_load_and_work() {
    let runtime = runtime();
    let names: Vec<&str> = EXAMPLE_COMPONENTS.iter().map(|(name, _)| *name).collect();
    assert!(
        names.contains(&"transfer") && names.contains(&"tariff"),
        "{names:?}"
    );
    let space = MemorySpace::default();
    let billing = runtime
        .load(BILLING_MODULE_NAME, 1, BILLING_COMPONENT)
        .unwrap();
    call(&runtime, &billing, &space, "insert-data", &[]).unwrap();
    let load = |name: &str| {
        let (_, bytes) = EXAMPLE_COMPONENTS.iter().find(|(n, _)| *n == name).unwrap();
        runtime.load(name, 1, bytes).unwrap()
    };
    let decimal = |text: &str| Value::Decimal(billcl_money::Decimal::parse(text).unwrap());

    let transfer = load("transfer");
    assert_eq!(transfer.package_name(), Some("transfer"));
    let signature = transfer.procedure("transfer").unwrap().signature();
    assert_eq!(
        signature,
        "transfer(from: u64, to: u64, amount: decimal) -> result<tuple<decimal, decimal>, string>"
    );
    // Seed account 5 holds 1000 (velocity 0.1/s, no time passes in this test).
    let moved = call(
        &runtime,
        &transfer,
        &space,
        "transfer",
        &[Value::Uint(5), Value::Uint(4), decimal("250.5")],
    );
    assert_eq!(
        moved,
        Ok(Value::Tuple(vec![decimal("749.5"), decimal("250.5")]))
    );
    let overdraft = call(
        &runtime,
        &transfer,
        &space,
        "transfer",
        &[Value::Uint(4), Value::Uint(5), decimal("1000")],
    );
    assert_eq!(
        overdraft,
        Err(CallError::Procedure(
            "insufficient funds: account 4 has 250.5, the transfer needs 1000".to_string()
        ))
    );
    assert!(space.logs.lock().unwrap()[0].contains("transfer 250.5 from 5 to 4"));

    let tariff = load("tariff");
    assert_eq!(
        call(&runtime, &tariff, &space, "get-tariff", &[Value::Uint(4)]),
        Err(CallError::Procedure(
            "account 4 has no tariff; set one with `set-tariff 4 NAME PRICE`".to_string()
        ))
    );
    let set = call(
        &runtime,
        &tariff,
        &space,
        "set-tariff",
        &[
            Value::Uint(4),
            Value::String("calls".into()),
            decimal("0.25"),
        ],
    );
    assert_eq!(set, Ok(Value::Tuple(vec![])));
    assert_eq!(
        call(
            &runtime,
            &tariff,
            &space,
            "charge",
            &[Value::Uint(4), Value::Uint(10)]
        ),
        Ok(decimal("248"))
    );
    let usage = call(&runtime, &tariff, &space, "get-tariff", &[Value::Uint(4)]).unwrap();
    assert_eq!(
        usage,
        Value::Record(vec![
            ("name".into(), Value::String("calls".into())),
            ("unit-price".into(), decimal("0.25")),
            ("units-charged".into(), Value::Uint(10)),
            ("total-charged".into(), decimal("2.5")),
        ])
    );
    let broke = call(
        &runtime,
        &tariff,
        &space,
        "charge",
        &[Value::Uint(4), Value::Uint(10_000)],
    );
    assert!(
        matches!(&broke, Err(CallError::Procedure(m)) if m.starts_with("insufficient funds")),
        "{broke:?}"
    );
}

/// A command that leaves traces in its instance: it bumps a counter in memory (initialised
/// by a data segment) and a global, grows memory by a page and writes there, and returns what
/// it found before changing anything.
const LITTERING: &str = r#"
(component
  (core module $m
    (memory 1)
    (global $calls (mut i32) (i32.const 0))
    (data (i32.const 16) "\07")
    (func (export "litter") (result i32)
      (local $found i32)
      ;; what an earlier call could have left: the counter, the global, the memory size and
      ;; the first byte of a second page
      (local.set $found
        (i32.add
          (i32.add (i32.load8_u (i32.const 16)) (i32.mul (global.get $calls) (i32.const 100)))
          (i32.mul (memory.size) (i32.const 10000))))
      (if (i32.gt_u (memory.size) (i32.const 1))
        (then (local.set $found
          (i32.add (local.get $found) (i32.mul (i32.load8_u (i32.const 65536)) (i32.const 1000000))))))
      (i32.store8 (i32.const 16) (i32.add (i32.load8_u (i32.const 16)) (i32.const 1)))
      (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
      (drop (memory.grow (i32.const 1)))
      (i32.store8 (i32.const 65536) (i32.const 9))
      (local.get $found)))
  (core instance $i (instantiate $m))
  (func $litter (result u32) (canon lift (core func $i "litter")))
  (instance $command (export "litter" (func $litter)))
  (export "test:litter/command@0.1.0" (instance $command)))
"#;

/// Calls share warm instances (a fresh store and instance cost about five times the call), so
/// a guest's memory and globals outlive a call, but not for long: an instance whose memory grew
/// past `WARM_INSTANCE_MEMORY_BYTES_MAX` is replaced after its call, and the next call starts on
/// a fresh one exactly as a new instance would (no page, global or memory size left behind).
#[test]
fn a_warm_instance_is_replaced_once_its_memory_outgrows_the_bound() {
    let runtime = runtime();
    let module = runtime.load("litter", 1, LITTERING.as_bytes()).unwrap();
    let space = MemorySpace::default();
    let page = 64 * 1024;
    // The instance holds k + 1 pages after its k-th call: it is replaced after the call that
    // takes it past the bound.
    let calls_per_instance = (billcl_runtime::WARM_INSTANCE_MEMORY_BYTES_MAX / page) as u32;
    let expected = |k: u32| {
        // k-th call on one instance: the counter (7 + k - 1), the global (k - 1), the memory
        // size (k pages) and, from the second call on, the 9 left on the second page.
        let second_page = if k > 1 { 9_000_000 } else { 0 };
        6 + k + (k - 1) * 100 + k * 10_000 + second_page
    };
    for call_number in 0..calls_per_instance * 2 + 3 {
        let k = call_number % calls_per_instance + 1;
        assert_eq!(
            call(&runtime, &module, &space, "litter", &[]),
            Ok(Value::Uint(u64::from(expected(k)))),
            "call {call_number} should be call {k} of its instance"
        );
    }
}
