//! The runtime against real modules: the built-in billing component (built by build.rs) and
//! small hand-written WAT components for what billing never does (loop forever, trap, import
//! something foreign), all running against an in-memory [`Space`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use billcl_money::{Account, Decimal};
use billcl_runtime::{
    CallContext, CallError, Error, Limits, LogLevel, Module, ProcedureKind, Runtime, Space, Type,
    Value, BILLING_COMPONENT, BILLING_MODULE_NAME,
};

const T0_MS: i64 = 1_700_000_000_000;

/// What a test space holds; shared so the test can look at it after the call.
#[derive(Clone, Debug, Default, PartialEq)]
struct Storage {
    accounts: BTreeMap<u64, Account>,
    kv: BTreeMap<(String, Vec<u8>), Vec<u8>>,
    logs: Vec<(String, String)>,
}

/// An in-memory space owning every account, or only those `owned` lists.
#[derive(Clone, Default)]
struct MemorySpace {
    storage: Arc<Mutex<Storage>>,
    owned: Option<Vec<u64>>,
}

impl MemorySpace {
    fn storage(&self) -> Storage {
        self.storage.lock().unwrap().clone()
    }

    fn account(&self, id: u64) -> Option<Account> {
        self.storage.lock().unwrap().accounts.get(&id).copied()
    }
}

impl Space for MemorySpace {
    fn account(&mut self, id: u64) -> Option<Account> {
        MemorySpace::account(self, id)
    }
    fn put_account(&mut self, account: Account) -> Result<(), String> {
        if !self.owns(account.id) {
            return Err(format!(
                "account {} is not in this call's bucket",
                account.id
            ));
        }
        self.storage
            .lock()
            .unwrap()
            .accounts
            .insert(account.id, account);
        Ok(())
    }
    fn owns(&mut self, id: u64) -> bool {
        self.owned.as_ref().is_none_or(|owned| owned.contains(&id))
    }
    fn kv_get(&mut self, module: &str, key: &[u8]) -> Option<Vec<u8>> {
        let storage = self.storage.lock().unwrap();
        storage.kv.get(&(module.to_string(), key.to_vec())).cloned()
    }
    fn kv_set(&mut self, module: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        let mut storage = self.storage.lock().unwrap();
        storage
            .kv
            .insert((module.to_string(), key.to_vec()), value.to_vec());
        Ok(())
    }
    fn kv_delete(&mut self, module: &str, key: &[u8]) -> Result<(), String> {
        let mut storage = self.storage.lock().unwrap();
        storage.kv.remove(&(module.to_string(), key.to_vec()));
        Ok(())
    }
    fn log(&mut self, module: &str, level: LogLevel, message: &str) {
        let mut storage = self.storage.lock().unwrap();
        storage
            .logs
            .push((module.to_string(), format!("{level:?}: {message}")));
    }
}

fn runtime() -> Runtime {
    Runtime::new(Limits {
        instances_max: 4,
        ..Limits::default()
    })
    .unwrap()
}

fn billing(runtime: &Runtime) -> Module {
    runtime
        .load(BILLING_MODULE_NAME, 1, BILLING_COMPONENT)
        .unwrap()
}

fn context(now_ms: i64, kind: ProcedureKind) -> CallContext {
    CallContext {
        now_ms,
        bucket_id: 7,
        caller: "test".to_string(),
        kind,
    }
}

fn decimal(text: &str) -> Value {
    Value::Decimal(Decimal::parse(text).unwrap())
}

/// Runs one call at `now_ms`, as a query if the procedure is one, else as a command.
fn call(
    runtime: &Runtime,
    module: &Module,
    space: &MemorySpace,
    procedure: &str,
    args: &[Value],
    now_ms: i64,
) -> Result<Value, CallError> {
    let kind = module
        .procedure(procedure)
        .map_or(ProcedureKind::Command, |info| info.kind);
    let (result, _) = runtime.call(
        module,
        procedure,
        args,
        context(now_ms, kind),
        Box::new(space.clone()),
    );
    result
}

#[test]
fn billing_catalog_has_typed_procedures() {
    let runtime = runtime();
    let module = billing(&runtime);
    assert_eq!(module.name(), "billing");
    assert_eq!(module.version(), 1);
    let names: Vec<(&str, ProcedureKind)> = module
        .procedures()
        .iter()
        .map(|info| (info.name.as_str(), info.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("get", ProcedureKind::Query),
            ("add-money", ProcedureKind::Command),
            ("update-velocity", ProcedureKind::Command),
            ("update-spending-velocity", ProcedureKind::Command),
            ("create-account", ProcedureKind::Command),
            ("insert-data", ProcedureKind::Command),
        ]
    );
    let get = module.procedure("get").unwrap();
    assert_eq!(get.params, [("id".to_string(), Type::U64)]);
    assert_eq!(
        get.signature(),
        "get(id: u64) -> result<tuple<u64, decimal, decimal>, string>"
    );
    let add_money = module.procedure("add_money").unwrap();
    assert_eq!(add_money.name, "add-money");
    assert_eq!(
        add_money.params,
        [
            ("id".to_string(), Type::U64),
            ("amount".to_string(), Type::Decimal)
        ]
    );
    assert_eq!(
        add_money.result,
        Some(Type::Result {
            ok: Some(Box::new(Type::Bool)),
            err: Some(Box::new(Type::String)),
        })
    );
    let insert_data = module.procedure("insert-data").unwrap();
    assert!(insert_data.params.is_empty());
    assert_eq!(
        insert_data.signature(),
        "insert-data() -> result<u32, string>"
    );
    assert!(module.procedure("update_spending_velocity").is_some());
    // Either separator anywhere in the name, as `billcl_proto::find_procedure` accepts.
    assert_eq!(
        module
            .procedure("update_spending-velocity")
            .map(|info| info.name.as_str()),
        Some("update-spending-velocity")
    );
    assert!(module.procedure("drop-everything").is_none());
    assert!(module.procedure("drop_everything").is_none());
    assert!(module.procedure("add__money").is_none());
}

#[test]
fn a_core_module_is_componentized_at_load() {
    let core = include_bytes!(concat!(env!("OUT_DIR"), "/billing.core.wasm"));
    let runtime = runtime();
    let from_core = runtime.load("billing", 2, core).unwrap();
    let from_component = billing(&runtime);
    let signatures = |module: &Module| -> Vec<String> {
        module
            .procedures()
            .iter()
            .map(|info| info.signature())
            .collect()
    };
    assert_eq!(signatures(&from_core), signatures(&from_component));
    let space = MemorySpace::default();
    let created = call(&runtime, &from_core, &space, "insert-data", &[], T0_MS);
    assert_eq!(created, Ok(Value::Uint(10)));
}

#[test]
fn insert_data_creates_the_seed_accounts_once() {
    let runtime = runtime();
    let module = billing(&runtime);
    let space = MemorySpace::default();
    assert_eq!(
        call(&runtime, &module, &space, "insert_data", &[], T0_MS),
        Ok(Value::Uint(10))
    );
    let storage = space.storage();
    assert_eq!(storage.accounts.len(), 10);
    assert_eq!(
        storage.accounts[&8],
        Account::new(
            8,
            Decimal::parse("1").unwrap(),
            Decimal::parse("0.00001").unwrap(),
            T0_MS
        )
    );
    assert_eq!(
        storage.accounts[&10].balance,
        Decimal::parse("912308").unwrap()
    );
    assert_eq!(
        call(&runtime, &module, &space, "insert-data", &[], T0_MS + 5),
        Ok(Value::Uint(0))
    );
    assert_eq!(
        space.storage(),
        storage,
        "a second insert-data changes nothing"
    );

    let odd = MemorySpace {
        owned: Some(vec![1, 3, 5, 7, 9]),
        ..MemorySpace::default()
    };
    assert_eq!(
        call(&runtime, &module, &odd, "insert-data", &[], T0_MS),
        Ok(Value::Uint(5))
    );
    let ids: Vec<u64> = odd.storage().accounts.keys().copied().collect();
    assert_eq!(ids, [1, 3, 5, 7, 9]);
}

#[test]
fn add_money_get_and_velocity_follow_the_drain() {
    let runtime = runtime();
    let module = billing(&runtime);
    let space = MemorySpace::default();
    call(&runtime, &module, &space, "insert-data", &[], T0_MS).unwrap();

    // Account 4: 0 balance, no velocity. `billcl call add_money 4 1000`.
    let added = call(
        &runtime,
        &module,
        &space,
        "add_money",
        &[Value::Uint(4), decimal("1000")],
        T0_MS + 10,
    );
    assert_eq!(added, Ok(Value::Bool(true)));
    assert_eq!(
        call(
            &runtime,
            &module,
            &space,
            "get",
            &[Value::Uint(4)],
            T0_MS + 20
        ),
        Ok(Value::Tuple(vec![
            Value::Uint(4),
            decimal("1000"),
            decimal("0")
        ]))
    );

    // Account 3: 1.5 draining at 1/s. Half a second later 1.0 is left.
    let get3 = |now_ms| call(&runtime, &module, &space, "get", &[Value::Uint(3)], now_ms);
    assert_eq!(
        get3(T0_MS + 500),
        Ok(Value::Tuple(vec![
            Value::Uint(3),
            decimal("1"),
            decimal("1")
        ]))
    );
    // A top-up at 1 s re-anchors: 0.5 left + 2 = 2.5.
    call(
        &runtime,
        &module,
        &space,
        "add-money",
        &[Value::Uint(3), decimal("2")],
        T0_MS + 1000,
    )
    .unwrap();
    let account = space.account(3).unwrap();
    assert_eq!(account.balance, Decimal::parse("2.5").unwrap());
    assert_eq!(account.since_ms, T0_MS + 1000);
    // Slow it to 0.5/s at 2 s (1.5 left); at 3 s 1.0 is left.
    assert_eq!(
        call(
            &runtime,
            &module,
            &space,
            "update_spending_velocity",
            &[Value::Uint(3), decimal("0.5")],
            T0_MS + 2000,
        ),
        Ok(Value::Bool(true))
    );
    assert_eq!(
        get3(T0_MS + 3000),
        Ok(Value::Tuple(vec![
            Value::Uint(3),
            decimal("1"),
            decimal("0.5")
        ]))
    );
    // Never below zero.
    assert_eq!(
        get3(T0_MS + 1_000_000),
        Ok(Value::Tuple(vec![
            Value::Uint(3),
            decimal("0"),
            decimal("0.5")
        ]))
    );
}

#[test]
fn procedure_errors_name_what_was_wrong() {
    let runtime = runtime();
    let module = billing(&runtime);
    let space = MemorySpace::default();
    call(&runtime, &module, &space, "insert-data", &[], T0_MS).unwrap();
    let before = space.storage();

    let missing = call(&runtime, &module, &space, "get", &[Value::Uint(42)], T0_MS);
    assert_eq!(
        missing,
        Err(CallError::Procedure("account 42 not found".to_string()))
    );
    let missing = call(
        &runtime,
        &module,
        &space,
        "add-money",
        &[Value::Uint(42), decimal("1")],
        T0_MS,
    );
    assert_eq!(
        missing,
        Err(CallError::Procedure("account 42 not found".to_string()))
    );
    for (amount, message) in [
        ("0", "amount must be > 0, got 0"),
        ("-5", "amount must be > 0, got -5"),
    ] {
        let result = call(
            &runtime,
            &module,
            &space,
            "add-money",
            &[Value::Uint(4), decimal(amount)],
            T0_MS,
        );
        assert_eq!(result, Err(CallError::Procedure(message.to_string())));
    }
    let negative = call(
        &runtime,
        &module,
        &space,
        "update-velocity",
        &[Value::Uint(4), decimal("-0.25")],
        T0_MS,
    );
    assert_eq!(
        negative,
        Err(CallError::Procedure(
            "velocity must be >= 0, got -0.25".to_string()
        ))
    );
    // Top up to the very maximum, then one micro more overflows.
    let to_max = Decimal::from_micros(i64::MAX - 1_000_000_000);
    call(
        &runtime,
        &module,
        &space,
        "add-money",
        &[Value::Uint(5), Value::Decimal(to_max)],
        T0_MS,
    )
    .unwrap();
    let overflow = call(
        &runtime,
        &module,
        &space,
        "add-money",
        &[Value::Uint(5), decimal("0.000001")],
        T0_MS,
    );
    let Err(CallError::Procedure(message)) = overflow else {
        panic!("expected an overflow error, got {overflow:?}");
    };
    assert!(message.contains("account 5"), "{message}");
    assert!(message.contains("9223372036854.775807"), "{message}");
    let mut expected = before;
    expected.accounts.get_mut(&5).unwrap().balance = Decimal::from_micros(i64::MAX);
    assert_eq!(space.storage(), expected, "failed calls wrote nothing");
}

#[test]
fn arguments_are_checked_against_the_signature() {
    let runtime = runtime();
    let module = billing(&runtime);
    let space = MemorySpace::default();
    let wrong_type = call(
        &runtime,
        &module,
        &space,
        "add-money",
        &[Value::String("four".to_string()), decimal("1")],
        T0_MS,
    );
    let Err(CallError::InvalidArgument(message)) = wrong_type else {
        panic!("expected InvalidArgument, got {wrong_type:?}");
    };
    assert!(message.contains("`id`"), "{message}");
    assert!(message.contains("u64"), "{message}");

    let float_money = call(
        &runtime,
        &module,
        &space,
        "add-money",
        &[Value::Uint(4), Value::Float(1.5)],
        T0_MS,
    );
    let Err(CallError::InvalidArgument(message)) = float_money else {
        panic!("expected InvalidArgument, got {float_money:?}");
    };
    assert!(message.contains("`amount`"), "{message}");
    assert!(message.contains("decimal"), "{message}");

    let too_few = call(
        &runtime,
        &module,
        &space,
        "add-money",
        &[Value::Uint(4)],
        T0_MS,
    );
    assert!(
        matches!(&too_few, Err(CallError::InvalidArgument(message)) if message.contains("2 arguments")),
        "{too_few:?}"
    );
    let unknown = call(&runtime, &module, &space, "steal", &[], T0_MS);
    assert_eq!(
        unknown,
        Err(CallError::UnknownProcedure("steal".to_string()))
    );
}

#[test]
fn a_query_call_cannot_write() {
    let runtime = runtime();
    let module = billing(&runtime);
    let space = MemorySpace::default();
    call(&runtime, &module, &space, "insert-data", &[], T0_MS).unwrap();
    let before = space.storage();
    let (result, _) = runtime.call(
        &module,
        "add-money",
        &[Value::Uint(4), decimal("1000")],
        context(T0_MS, ProcedureKind::Query),
        Box::new(space.clone()),
    );
    assert_eq!(
        result,
        Err(CallError::Procedure(
            "procedure add-money is a query: it cannot write".to_string()
        ))
    );
    assert_eq!(space.storage(), before);
}

#[test]
fn the_same_calls_give_the_same_results_and_state() {
    let runtime = runtime();
    let module = billing(&runtime);
    let script: Vec<(&str, Vec<Value>, i64)> = vec![
        ("insert-data", vec![], 0),
        ("add-money", vec![Value::Uint(9), decimal("0.123457")], 333),
        (
            "update-velocity",
            vec![Value::Uint(9), decimal("7.77")],
            1_001,
        ),
        ("get", vec![Value::Uint(9)], 5_555),
        ("add-money", vec![Value::Uint(8), decimal("-1")], 6_000),
        ("get", vec![Value::Uint(10)], 86_400_000),
        ("get", vec![Value::Uint(11)], 86_400_001),
    ];
    let run = || {
        let space = MemorySpace::default();
        let results: Vec<Result<Value, CallError>> = script
            .iter()
            .map(|(procedure, args, offset_ms)| {
                call(
                    &runtime,
                    &module,
                    &space,
                    procedure,
                    args,
                    T0_MS + offset_ms,
                )
            })
            .collect();
        (results, space.storage())
    };
    let first = run();
    let second = run();
    assert_eq!(first, second);
    assert_eq!(first.0.iter().filter(|result| result.is_err()).count(), 2);
}

/// A component whose `command` interface has `spin` (loops forever) and `crash` (traps).
const LOOPING_COMPONENT: &str = r#"
(component
  (core module $m
    (func (export "spin") (result i32)
      (loop $forever (br $forever))
      i32.const 0)
    (func (export "crash") (result i32)
      unreachable))
  (core instance $i (instantiate $m))
  (func $spin (result u32) (canon lift (core func $i "spin")))
  (func $crash (result u32) (canon lift (core func $i "crash")))
  (instance $command
    (export "spin" (func $spin))
    (export "crash" (func $crash)))
  (export "test:looping/command@0.1.0" (instance $command)))
"#;

#[test]
fn an_endless_loop_runs_out_of_fuel_and_the_runtime_keeps_serving() {
    let runtime = Runtime::new(Limits {
        call_fuel_max: 1_000_000,
        instances_max: 2,
        ..Limits::default()
    })
    .unwrap();
    let looping = runtime
        .load("looping", 1, LOOPING_COMPONENT.as_bytes())
        .unwrap();
    assert_eq!(
        looping.procedure("spin").map(|info| info.signature()),
        Some("spin() -> u32".to_string())
    );
    let space = MemorySpace::default();
    // More calls than instance slots: every failed call gives its slot back.
    for _ in 0..3 {
        let result = call(&runtime, &looping, &space, "spin", &[], T0_MS);
        assert_eq!(result, Err(CallError::OutOfFuel { fuel: 1_000_000 }));
        assert!(result.unwrap_err().is_deterministic());
    }
    let crashed = call(&runtime, &looping, &space, "crash", &[], T0_MS);
    let Err(CallError::Trap(message)) = &crashed else {
        panic!("expected a trap, got {crashed:?}");
    };
    assert!(message.contains("unreachable"), "{message}");
    eprintln!("trap message: {message}");
    assert_eq!(
        crashed,
        call(&runtime, &looping, &space, "crash", &[], T0_MS),
        "the trap message is the same every time"
    );

    let module = billing(&runtime);
    assert_eq!(
        call(&runtime, &module, &space, "insert-data", &[], T0_MS),
        Ok(Value::Uint(10))
    );
}

#[test]
fn modules_are_checked_at_load() {
    let runtime = Runtime::new(Limits {
        module_bytes_max: 1024 * 1024,
        instances_max: 2,
        ..Limits::default()
    })
    .unwrap();
    let too_large = runtime.load("big", 1, &vec![0; 1024 * 1024 + 1]);
    assert!(
        matches!(
            too_large,
            Err(Error::ModuleTooLarge {
                bytes: 1_048_577,
                ..
            })
        ),
        "{too_large:?}"
    );
    let garbage = runtime.load("garbage", 1, b"\0asm\x0d\0\x01\0garbage");
    assert!(matches!(garbage, Err(Error::Invalid { .. })), "{garbage:?}");

    let foreign_import = r#"
    (component
      (import "wasi:random/insecure@0.2.0"
        (instance (export "get-insecure-random-u64" (func (result u64))))))
    "#;
    let error = runtime
        .load("random", 1, foreign_import.as_bytes())
        .unwrap_err();
    assert!(
        matches!(&error, Error::ForbiddenImport { import, .. } if import == "wasi:random/insecure@0.2.0"),
        "{error:?}"
    );
    assert!(error.to_string().contains("wasi:random/insecure@0.2.0"));

    let no_procedures = r#"
    (component
      (core module $m (func (export "f") (result i32) i32.const 1))
      (core instance $i (instantiate $m))
      (func $f (result u32) (canon lift (core func $i "f")))
      (instance $api (export "f" (func $f)))
      (export "test:x/api@0.1.0" (instance $api)))
    "#;
    let error = runtime
        .load("api", 1, no_procedures.as_bytes())
        .unwrap_err();
    assert!(
        matches!(&error, Error::NoProcedures { exports, .. } if exports == "test:x/api@0.1.0"),
        "{error:?}"
    );

    let too_much_memory = r#"
    (component
      (core module $m
        (memory 2048)
        (func (export "f") (result i32) i32.const 1))
      (core instance $i (instantiate $m))
      (func $f (result u32) (canon lift (core func $i "f")))
      (instance $query (export "f" (func $f)))
      (export "test:x/query@0.1.0" (instance $query)))
    "#;
    let error = runtime
        .load("hungry", 1, too_much_memory.as_bytes())
        .unwrap_err();
    // Refused when compiled against the pool's limits: 128 MiB minimum > 64 MiB cap.
    assert!(matches!(error, Error::Invalid { .. }), "{error:?}");
    assert!(error.to_string().contains("134217728"), "{error}");
}

/// The fewest fuel with which `procedure` succeeds on the seed accounts (a binary search over
/// `call_within`).
fn fuel_needed(runtime: &Runtime, module: &Module, procedure: &str, args: &[Value]) -> u64 {
    let kind = module.procedure(procedure).unwrap().kind;
    let (mut low, mut high) = (1, Limits::default().call_fuel_max);
    while low < high {
        let fuel = low + (high - low) / 2;
        let space = MemorySpace::default();
        call(runtime, module, &space, "insert-data", &[], T0_MS).unwrap();
        let run = context(T0_MS, kind);
        let (result, _) = runtime.call_within(module, procedure, args, run, Box::new(space), fuel);
        match result {
            Err(CallError::SliceSpent { fuel: given }) => {
                assert_eq!(given, fuel);
                low = fuel + 1;
            }
            Ok(_) => high = fuel,
            other => panic!("{procedure} with {fuel} fuel: {other:?}"),
        }
    }
    low
}

#[test]
fn the_built_in_procedures_finish_well_within_an_inline_slice() {
    let runtime = runtime();
    let module = billing(&runtime);
    let amount = decimal("12.5");
    for (procedure, args) in [
        ("get", vec![Value::Uint(4)]),
        ("add_money", vec![Value::Uint(4), amount.clone()]),
        ("update_velocity", vec![Value::Uint(4), amount]),
    ] {
        let needed = fuel_needed(&runtime, &module, procedure, &args);
        eprintln!("{procedure}: {needed} fuel");
        assert!(
            needed * 4 <= billcl_runtime::INLINE_CALL_FUEL,
            "{procedure} needs {needed} fuel, more than a quarter of INLINE_CALL_FUEL"
        );
    }
}

#[test]
fn a_call_past_its_slice_changes_nothing_kept_and_runs_again_with_its_whole_budget() {
    let runtime = runtime();
    let module = billing(&runtime);
    // insert-data writes ten accounts: with too little fuel it stops part way, says so (not
    // deterministic: not a result), and the next call on the same runtime works.
    let space = MemorySpace::default();
    let command = context(T0_MS, ProcedureKind::Command);
    let (sliced, _) = runtime.call_within(
        &module,
        "insert-data",
        &[],
        command,
        Box::new(space.clone()),
        50,
    );
    assert_eq!(sliced, Err(CallError::SliceSpent { fuel: 50 }));
    assert!(!sliced.unwrap_err().is_deterministic());
    let again = MemorySpace::default();
    assert_eq!(
        call(&runtime, &module, &again, "insert-data", &[], T0_MS),
        Ok(Value::Uint(10))
    );
    assert_eq!(again.storage().accounts.len(), 10);

    // A slice of at least call_fuel_max is the whole budget: running out is the result.
    let looping = runtime
        .load("looping", 1, LOOPING_COMPONENT.as_bytes())
        .unwrap();
    let max = Limits::default().call_fuel_max;
    let command = context(T0_MS, ProcedureKind::Command);
    let (spun, _) = runtime.call_within(
        &looping,
        "spin",
        &[],
        command.clone(),
        Box::new(MemorySpace::default()),
        billcl_runtime::INLINE_CALL_FUEL,
    );
    assert_eq!(
        spun,
        Err(CallError::SliceSpent {
            fuel: billcl_runtime::INLINE_CALL_FUEL
        })
    );
    let (spun, _) = runtime.call_within(
        &looping,
        "spin",
        &[],
        command,
        Box::new(MemorySpace::default()),
        u64::MAX,
    );
    assert_eq!(spun, Err(CallError::OutOfFuel { fuel: max }));
}
