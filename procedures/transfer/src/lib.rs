//! An example custom procedure module: `transfer(from, to, amount)` between two accounts of one
//! bucket, with no overdraft, and the read-only `can-transfer(from, amount)`.
//!
//! It exists to show what a billing operator's own module looks like (procedures/README.md
//! walks through it): imports from `billcl:host` only, exact decimals through `billcl-money`,
//! time from the call's context, an `err(message)` that names what was wrong (and makes the
//! host discard every write of the call), and a log line per transfer.

use billcl_money::{Account, Decimal};

wit_bindgen::generate!({
    world: "transfer",
    path: "wit",
    generate_all,
});

use billcl::host::{accounts, context, log, types};
use exports::acme::transfer::{command, query};

struct Transfer;

export!(Transfer);

billcl_money::wit_conversions!(billcl::host::types);

/// Account `id` re-anchored at `now_ms` (its balance drained to now), or why it cannot be used.
fn account_now(id: u64, now_ms: i64) -> Result<Account, String> {
    if !accounts::owns(id) {
        return Err(format!(
            "account {id} is not in this call's bucket; a transfer moves money within one \
             bucket (`billcl route {id}` shows its bucket)"
        ));
    }
    accounts::get(id)
        .map(|account| to_money(account).anchored_at(now_ms))
        .ok_or_else(|| format!("account {id} not found"))
}

fn positive_amount(amount: types::Decimal) -> Result<Decimal, String> {
    let amount = Decimal::from_micros(amount.micros);
    if !amount.is_positive() {
        return Err(format!("amount must be > 0, got {amount}"));
    }
    Ok(amount)
}

impl query::Guest for Transfer {
    fn can_transfer(from: u64, amount: types::Decimal) -> Result<bool, String> {
        let amount = positive_amount(amount)?;
        let account = accounts::get(from)
            .map(to_money)
            .ok_or_else(|| format!("account {from} not found"))?;
        Ok(account.balance_at(context::now_ms()) >= amount)
    }
}

impl command::Guest for Transfer {
    fn transfer(
        from: u64,
        to: u64,
        amount: types::Decimal,
    ) -> Result<(types::Decimal, types::Decimal), String> {
        let amount = positive_amount(amount)?;
        if from == to {
            return Err(format!("cannot transfer from account {from} to itself"));
        }
        let now_ms = context::now_ms();
        let mut source = account_now(from, now_ms)?;
        let mut target = account_now(to, now_ms)?;
        if source.balance < amount {
            return Err(format!(
                "insufficient funds: account {from} has {}, the transfer needs {amount}",
                source.balance
            ));
        }
        source.balance = source
            .balance
            .checked_sub(amount)
            .ok_or("balance underflow")?;
        target.balance = target.balance.checked_add(amount).ok_or_else(|| {
            format!(
                "account {to}: adding {amount} to {} would exceed the maximum balance {}",
                target.balance,
                Decimal::MAX
            )
        })?;
        accounts::put(to_wit(&source))?;
        accounts::put(to_wit(&target))?;
        log::write(
            log::Level::Info,
            &format!(
                "transfer {amount} from {from} to {to} by {}",
                context::caller()
            ),
        );
        Ok((
            to_wit_decimal(source.balance),
            to_wit_decimal(target.balance),
        ))
    }
}
