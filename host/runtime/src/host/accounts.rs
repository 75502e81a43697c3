//! `billcl:host/accounts`: the accounts space of the call, backed by the node's [`Space`].
//!
//! Converts between the WIT account record and `billcl_money::Account`, refuses writes from
//! queries, and refuses accounts that break the billing model's invariants before they reach
//! storage (a stored account is trusted by every later read).

use billcl_money::{Account, Decimal};

use super::billcl::host::accounts::Host;
use super::{HostState, WitAccount, WitDecimal};
use crate::{Space, REMAINDER_MAX};

impl Host for HostState {
    fn get(&mut self, id: u64) -> wasmtime::Result<Option<WitAccount>> {
        Ok(self.space.account(id).map(|account| to_wit(&account)))
    }

    fn put(&mut self, account: WitAccount) -> wasmtime::Result<Result<(), String>> {
        if let Err(message) = self.check_writable() {
            return Ok(Err(message));
        }
        let account = match from_wit(&account) {
            Ok(account) => account,
            Err(message) => return Ok(Err(message)),
        };
        Ok(Space::put_account(self.space.as_mut(), account))
    }

    fn owns(&mut self, id: u64) -> wasmtime::Result<bool> {
        Ok(self.space.owns(id))
    }
}

fn to_wit(account: &Account) -> WitAccount {
    WitAccount {
        id: account.id,
        balance: WitDecimal {
            micros: account.balance.micros(),
        },
        velocity: WitDecimal {
            micros: account.velocity.micros(),
        },
        since_ms: account.since_ms,
        remainder: account.remainder,
    }
}

/// The account a guest asked to store, if it keeps the model's invariants: a balance never
/// below zero and a carried remainder below one micro-unit.
fn from_wit(account: &WitAccount) -> Result<Account, String> {
    let id = account.id;
    let balance = Decimal::from_micros(account.balance.micros);
    if balance.is_negative() {
        return Err(format!("account {id}: balance must be >= 0, got {balance}"));
    }
    if account.remainder > REMAINDER_MAX {
        return Err(format!(
            "account {id}: remainder must be at most {REMAINDER_MAX}, got {}",
            account.remainder
        ));
    }
    Ok(Account {
        id,
        balance,
        velocity: Decimal::from_micros(account.velocity.micros),
        since_ms: account.since_ms,
        remainder: account.remainder,
    })
}
