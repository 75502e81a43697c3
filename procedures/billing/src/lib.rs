//! The built-in billing module: the seed cluster's stored procedures (`get`, `add_money`,
//! `update_spending_velocity`, `insert_data`) as a wasm component.
//!
//! It exists so that billcl's own business logic runs exactly like any user procedure: in the
//! sandbox, against the host's accounts space, with time taken from the call's context (the log
//! entry's timestamp), never from a clock. All arithmetic goes through `billcl_money`, the same
//! crate the host uses, so a balance read here and one computed by the node agree to the micro.

use billcl_money::{Account, Decimal};

wit_bindgen::generate!({
    world: "billing",
    path: "wit",
    // The host package lives in wit/deps/host; generate its bindings here too.
    generate_all,
});

use billcl::host::{accounts, context, types};
use exports::billcl::billing::{command, query};

/// The seed's ten accounts: `(id, balance micros, velocity micros per second)`.
const SEED_ACCOUNTS: [(u64, i64, i64); 10] = [
    (1, 87_000_000, 1_000),
    (2, 123_000_000, 10_000),
    (3, 1_500_000, 1_000_000),
    (4, 0, 0),
    (5, 1_000_000_000, 100_000),
    (6, 5_000_000, 500_000),
    (7, 23_948_792_000_000, 100_000),
    (8, 1_000_000, 10),
    (9, 900_000_000, 23_000_000),
    (10, 912_308_000_000, 837_000_000),
];

struct Billing;

export!(Billing);

billcl_money::wit_conversions!(billcl::host::types);

/// The stored account `id`, or the error every procedure returns for a missing one.
fn existing_account(id: u64) -> Result<Account, String> {
    accounts::get(id)
        .map(to_money)
        .ok_or_else(|| format!("account {id} not found"))
}

/// Re-anchor account `id` at the call's time, let `change` modify it, and store it.
fn update_account(
    id: u64,
    change: impl FnOnce(&mut Account) -> Result<(), String>,
) -> Result<bool, String> {
    let now_ms = context::now_ms();
    let mut account = existing_account(id)?.anchored_at(now_ms);
    change(&mut account)?;
    accounts::put(to_wit(&account))?;
    Ok(true)
}

fn set_velocity(id: u64, velocity: types::Decimal) -> Result<bool, String> {
    let velocity = Decimal::from_micros(velocity.micros);
    if velocity.is_negative() {
        return Err(format!("velocity must be >= 0, got {velocity}"));
    }
    update_account(id, |account| {
        account.velocity = velocity;
        Ok(())
    })
}

impl query::Guest for Billing {
    fn get(id: u64) -> Result<(u64, types::Decimal, types::Decimal), String> {
        let account = existing_account(id)?;
        let balance = account.balance_at(context::now_ms());
        Ok((
            id,
            to_wit_decimal(balance),
            to_wit_decimal(account.velocity),
        ))
    }
}

impl command::Guest for Billing {
    fn add_money(id: u64, amount: types::Decimal) -> Result<bool, String> {
        let amount = Decimal::from_micros(amount.micros);
        if !amount.is_positive() {
            return Err(format!("amount must be > 0, got {amount}"));
        }
        update_account(id, |account| {
            account.balance = account.balance.checked_add(amount).ok_or_else(|| {
                format!(
                    "account {id}: adding {amount} to {} would exceed the maximum balance {}",
                    account.balance,
                    Decimal::from_micros(i64::MAX)
                )
            })?;
            Ok(())
        })
    }

    fn update_velocity(id: u64, velocity: types::Decimal) -> Result<bool, String> {
        set_velocity(id, velocity)
    }

    fn update_spending_velocity(id: u64, velocity: types::Decimal) -> Result<bool, String> {
        set_velocity(id, velocity)
    }

    fn create_account(
        id: u64,
        balance: types::Decimal,
        velocity: types::Decimal,
    ) -> Result<bool, String> {
        let balance = Decimal::from_micros(balance.micros);
        let velocity = Decimal::from_micros(velocity.micros);
        if balance.is_negative() {
            return Err(format!("balance must be >= 0, got {balance}"));
        }
        if velocity.is_negative() {
            return Err(format!("velocity must be >= 0, got {velocity}"));
        }
        if accounts::get(id).is_some() {
            return Ok(false);
        }
        let account = Account::new(id, balance, velocity, context::now_ms());
        accounts::put(to_wit(&account))?;
        Ok(true)
    }

    fn insert_data() -> Result<u32, String> {
        let now_ms = context::now_ms();
        let mut created = 0;
        for (id, balance_micros, velocity_micros) in SEED_ACCOUNTS {
            if !accounts::owns(id) || accounts::get(id).is_some() {
                continue;
            }
            let account = Account::new(
                id,
                Decimal::from_micros(balance_micros),
                Decimal::from_micros(velocity_micros),
                now_ms,
            );
            accounts::put(to_wit(&account))?;
            created += 1;
        }
        Ok(created)
    }
}
