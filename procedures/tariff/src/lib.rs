//! An example custom procedure module: per-account tariffs kept in the per-bucket key-value
//! space, and `charge(id, units)` that bills an account by its tariff with no overdraft.
//!
//! It exists to show a module that keeps its own data: `set-tariff` stores a small binary
//! record in `billcl:host/kv` (namespaced by module name by the host, replicated through the
//! log with the call), `charge` reads it, takes `units × unit-price` from the account and
//! updates the usage in the same call, so both writes happen or neither does.

use billcl_money::{Account, Decimal};

wit_bindgen::generate!({
    world: "tariff",
    path: "wit",
    generate_all,
});

use billcl::host::{accounts, context, kv, log, types};
use exports::acme::tariff::query::Tariff;
use exports::acme::tariff::{command, query};

struct Module;

export!(Module);

billcl_money::wit_conversions!(billcl::host::types);

/// Longest tariff name: it is stored in every account's kv record.
const TARIFF_NAME_BYTES_MAX: usize = 64;
/// Layout of a stored tariff: unit price micros (i64 LE), units charged (u64 LE), total
/// charged micros (i64 LE), then the name's UTF-8 bytes.
const FIXED_BYTES: usize = 24;

fn key(id: u64) -> Vec<u8> {
    let mut key = b"tariff/".to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn encode(tariff: &Tariff) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FIXED_BYTES + tariff.name.len());
    bytes.extend_from_slice(&tariff.unit_price.micros.to_le_bytes());
    bytes.extend_from_slice(&tariff.units_charged.to_le_bytes());
    bytes.extend_from_slice(&tariff.total_charged.micros.to_le_bytes());
    bytes.extend_from_slice(tariff.name.as_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Result<Tariff, String> {
    let field = |at: usize| -> Result<[u8; 8], String> {
        bytes
            .get(at..at + 8)
            .and_then(|slice| slice.try_into().ok())
            .ok_or_else(|| "stored tariff is truncated".to_string())
    };
    let name = std::str::from_utf8(bytes.get(FIXED_BYTES..).unwrap_or_default())
        .map_err(|_| "stored tariff name is not UTF-8".to_string())?;
    Ok(Tariff {
        name: name.to_string(),
        unit_price: types::Decimal {
            micros: i64::from_le_bytes(field(0)?),
        },
        units_charged: u64::from_le_bytes(field(8)?),
        total_charged: types::Decimal {
            micros: i64::from_le_bytes(field(16)?),
        },
    })
}

fn stored_tariff(id: u64) -> Result<Tariff, String> {
    let bytes = kv::get(&key(id)).ok_or_else(|| {
        format!("account {id} has no tariff; set one with `set-tariff {id} NAME PRICE`")
    })?;
    decode(&bytes)
}

fn existing_account(id: u64) -> Result<Account, String> {
    accounts::get(id)
        .map(to_money)
        .ok_or_else(|| format!("account {id} not found"))
}

impl query::Guest for Module {
    fn get_tariff(id: u64) -> Result<Tariff, String> {
        stored_tariff(id)
    }
}

impl command::Guest for Module {
    fn set_tariff(id: u64, name: String, unit_price: types::Decimal) -> Result<(), String> {
        existing_account(id)?;
        if name.is_empty() || name.len() > TARIFF_NAME_BYTES_MAX {
            return Err(format!(
                "tariff name must be 1 to {TARIFF_NAME_BYTES_MAX} bytes, got {}",
                name.len()
            ));
        }
        let price = Decimal::from_micros(unit_price.micros);
        if price.is_negative() {
            return Err(format!("unit price must be >= 0, got {price}"));
        }
        let tariff = Tariff {
            name,
            unit_price,
            units_charged: 0,
            total_charged: types::Decimal { micros: 0 },
        };
        kv::set(&key(id), &encode(&tariff))?;
        log::write(
            log::Level::Info,
            &format!("account {id}: tariff {} at {price} per unit", tariff.name),
        );
        Ok(())
    }

    fn charge(id: u64, units: u64) -> Result<types::Decimal, String> {
        if units == 0 {
            return Err("units must be > 0, got 0".to_string());
        }
        let mut tariff = stored_tariff(id)?;
        let price = Decimal::from_micros(tariff.unit_price.micros);
        let too_large =
            || format!("charging {units} units at {price} is beyond the largest amount");
        let cost = i64::try_from(units)
            .ok()
            .and_then(|units| price.micros().checked_mul(units))
            .map(Decimal::from_micros)
            .ok_or_else(too_large)?;
        let now_ms = context::now_ms();
        let mut account = existing_account(id)?.anchored_at(now_ms);
        if account.balance < cost {
            return Err(format!(
                "insufficient funds: account {id} has {}, {units} units of {} cost {cost}",
                account.balance, tariff.name
            ));
        }
        account.balance = account.balance.checked_sub(cost).ok_or_else(too_large)?;
        tariff.units_charged = tariff
            .units_charged
            .checked_add(units)
            .ok_or_else(too_large)?;
        tariff.total_charged.micros = tariff
            .total_charged
            .micros
            .checked_add(cost.micros())
            .ok_or_else(too_large)?;
        accounts::put(to_wit(&account))?;
        kv::set(&key(id), &encode(&tariff))?;
        Ok(to_wit_decimal(account.balance))
    }
}
