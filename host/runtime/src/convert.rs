//! Translation between the wire's typed values ([`Value`], [`Type`]) and wasmtime's dynamic
//! component values (`Val`, `types::Type`).
//!
//! The node, router, SDK and CLI know a procedure only by its WIT signature, so every call goes
//! through here: the catalog turns exported function types into [`Type`]s at load, arguments
//! are checked against those types and lowered to `Val`s, and results are lifted back. A record
//! with exactly one field `micros: s64` is billcl's `decimal` and becomes [`Value::Decimal`].

use billcl_money::Decimal;
use wasmtime::component::{types, Val};

use crate::{Type, Value, VALUE_DEPTH_MAX};

/// The field of the one-field record that is a decimal.
const DECIMAL_FIELD: &str = "micros";

/// The wire type of a component type, or why it cannot be one.
pub(crate) fn wire_type(ty: &types::Type) -> Result<Type, String> {
    wire_type_at(ty, 1)
}

fn wire_type_at(ty: &types::Type, depth: usize) -> Result<Type, String> {
    if depth > VALUE_DEPTH_MAX {
        return Err(format!("types nest deeper than {VALUE_DEPTH_MAX} levels"));
    }
    let inner = |ty: &types::Type| wire_type_at(ty, depth + 1);
    let boxed = |ty: &types::Type| inner(ty).map(Box::new);
    Ok(match ty {
        types::Type::Bool => Type::Bool,
        types::Type::S8 => Type::S8,
        types::Type::U8 => Type::U8,
        types::Type::S16 => Type::S16,
        types::Type::U16 => Type::U16,
        types::Type::S32 => Type::S32,
        types::Type::U32 => Type::U32,
        types::Type::S64 => Type::S64,
        types::Type::U64 => Type::U64,
        types::Type::Float32 => Type::F32,
        types::Type::Float64 => Type::F64,
        types::Type::Char => Type::Char,
        types::Type::String => Type::String,
        types::Type::List(list) => Type::List(boxed(&list.ty())?),
        types::Type::Record(record) => {
            let fields = record
                .fields()
                .map(|field| Ok((field.name.to_string(), inner(&field.ty)?)))
                .collect::<Result<Vec<_>, String>>()?;
            match fields.as_slice() {
                [(name, Type::S64)] if name == DECIMAL_FIELD => Type::Decimal,
                _ => Type::Record(fields),
            }
        }
        types::Type::Tuple(tuple) => {
            let items = tuple
                .types()
                .map(|ty| inner(&ty))
                .collect::<Result<Vec<_>, _>>()?;
            if items.is_empty() {
                // A list of empty tuples occupies no guest memory whatever its length.
                return Err("empty tuples are not supported".to_string());
            }
            Type::Tuple(items)
        }
        types::Type::Variant(variant) => Type::Variant(
            variant
                .cases()
                .map(|case| {
                    Ok((
                        case.name.to_string(),
                        case.ty.as_ref().map(inner).transpose()?,
                    ))
                })
                .collect::<Result<Vec<_>, String>>()?,
        ),
        types::Type::Enum(cases) => Type::Enum(cases.names().map(str::to_string).collect()),
        types::Type::Option(option) => Type::Option(boxed(&option.ty())?),
        types::Type::Result(result) => Type::Result {
            ok: result.ok().as_ref().map(boxed).transpose()?,
            err: result.err().as_ref().map(boxed).transpose()?,
        },
        types::Type::Flags(flags) => Type::Flags(flags.names().map(str::to_string).collect()),
        types::Type::Map(_) => return Err("maps are not supported".to_string()),
        types::Type::FixedLengthList(_) => {
            return Err("fixed-length lists are not supported".to_string())
        }
        types::Type::Own(_) | types::Type::Borrow(_) => {
            return Err("resources are not supported".to_string())
        }
        types::Type::Future(_) | types::Type::Stream(_) | types::Type::ErrorContext => {
            return Err("async types (future, stream, error-context) are not supported".to_string())
        }
    })
}

/// Lowers an argument that `Value::check` accepted for `ty`. An `Err` means the two disagree
/// (a bug); the caller reports it as an invalid argument rather than trusting either.
pub(crate) fn to_val(value: &Value, ty: &Type) -> Result<Val, String> {
    let mismatch = || format!("cannot pass {value} as {ty}");
    let int = |value: &Value| match value {
        Value::Int(int) => Some(i128::from(*int)),
        Value::Uint(uint) => Some(i128::from(*uint)),
        _ => None,
    };
    macro_rules! integer {
        ($variant:ident) => {
            int(value)
                .and_then(|int| int.try_into().ok())
                .map(Val::$variant)
                .ok_or_else(mismatch)?
        };
    }
    Ok(match (ty, value) {
        (Type::Bool, Value::Bool(bool)) => Val::Bool(*bool),
        (Type::S8, _) => integer!(S8),
        (Type::S16, _) => integer!(S16),
        (Type::S32, _) => integer!(S32),
        (Type::S64, _) => integer!(S64),
        (Type::U8, _) => integer!(U8),
        (Type::U16, _) => integer!(U16),
        (Type::U32, _) => integer!(U32),
        (Type::U64, _) => integer!(U64),
        // Narrowing to f32 is the wire's documented meaning of an f32 argument.
        (Type::F32, Value::Float(float)) => Val::Float32(*float as f32),
        (Type::F64, Value::Float(float)) => Val::Float64(*float),
        (Type::Char, Value::Char(char)) => Val::Char(*char),
        (Type::String, Value::String(string)) => Val::String(string.clone()),
        (Type::Decimal, Value::Decimal(decimal)) => Val::Record(vec![(
            DECIMAL_FIELD.to_string(),
            Val::S64(decimal.micros()),
        )]),
        (Type::List(item), Value::List(items)) => Val::List(
            items
                .iter()
                .map(|value| to_val(value, item))
                .collect::<Result<_, _>>()?,
        ),
        (Type::Option(_), Value::Option(None)) => Val::Option(None),
        (Type::Option(inner), Value::Option(Some(value))) => {
            Val::Option(Some(Box::new(to_val(value, inner)?)))
        }
        (Type::Result { ok, err }, Value::Result(result)) => {
            let arm = |ty: &Option<Box<Type>>, value: &Option<Box<Value>>| match (ty, value) {
                (None, None) => Ok(None),
                (Some(ty), Some(value)) => to_val(value, ty).map(|val| Some(Box::new(val))),
                _ => Err(mismatch()),
            };
            Val::Result(match result {
                Ok(value) => Ok(arm(ok, value)?),
                Err(value) => Err(arm(err, value)?),
            })
        }
        (Type::Tuple(types), Value::Tuple(items)) if types.len() == items.len() => Val::Tuple(
            items
                .iter()
                .zip(types)
                .map(|(value, ty)| to_val(value, ty))
                .collect::<Result<_, _>>()?,
        ),
        (Type::Record(fields), Value::Record(values)) if fields.len() == values.len() => {
            Val::Record(
                fields
                    .iter()
                    .zip(values)
                    .map(|((name, ty), (given, value))| {
                        if name != given {
                            return Err(mismatch());
                        }
                        Ok((name.clone(), to_val(value, ty)?))
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        (Type::Enum(cases), Value::Enum(case)) if cases.contains(case) => Val::Enum(case.clone()),
        (Type::Variant(cases), Value::Variant(case, payload)) => {
            let (_, ty) = cases
                .iter()
                .find(|(known, _)| known == case)
                .ok_or_else(mismatch)?;
            let payload = match (ty, payload) {
                (None, None) => None,
                (Some(ty), Some(value)) => Some(Box::new(to_val(value, ty)?)),
                _ => return Err(mismatch()),
            };
            Val::Variant(case.clone(), payload)
        }
        (Type::Flags(names), Value::Flags(set)) if set.iter().all(|flag| names.contains(flag)) => {
            Val::Flags(set.clone())
        }
        _ => return Err(mismatch()),
    })
}

/// Lifts a value a procedure returned. `Err` names what has no wire form (resources, maps…),
/// which the catalog already refuses at load, so it only guards against a mismatch.
pub(crate) fn from_val(val: Val) -> Result<Value, String> {
    Ok(match val {
        Val::Bool(bool) => Value::Bool(bool),
        Val::S8(int) => Value::Int(int.into()),
        Val::S16(int) => Value::Int(int.into()),
        Val::S32(int) => Value::Int(int.into()),
        Val::S64(int) => Value::Int(int),
        Val::U8(uint) => Value::Uint(uint.into()),
        Val::U16(uint) => Value::Uint(uint.into()),
        Val::U32(uint) => Value::Uint(uint.into()),
        Val::U64(uint) => Value::Uint(uint),
        Val::Float32(float) => Value::Float(float.into()),
        Val::Float64(float) => Value::Float(float),
        Val::Char(char) => Value::Char(char),
        Val::String(string) => Value::String(string),
        Val::List(items) => Value::List(items.into_iter().map(from_val).collect::<Result<_, _>>()?),
        Val::Record(mut fields) => {
            if let [(name, Val::S64(micros))] = fields.as_slice() {
                if name == DECIMAL_FIELD {
                    return Ok(Value::Decimal(Decimal::from_micros(*micros)));
                }
            }
            Value::Record(
                fields
                    .drain(..)
                    .map(|(name, val)| Ok((name, from_val(val)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
        Val::Tuple(items) => {
            Value::Tuple(items.into_iter().map(from_val).collect::<Result<_, _>>()?)
        }
        Val::Variant(case, payload) => Value::Variant(case, boxed_from_val(payload)?),
        Val::Enum(case) => Value::Enum(case),
        Val::Option(value) => Value::Option(boxed_from_val(value)?),
        Val::Result(Ok(value)) => Value::Result(Ok(boxed_from_val(value)?)),
        Val::Result(Err(value)) => Value::Result(Err(boxed_from_val(value)?)),
        Val::Flags(flags) => Value::Flags(flags),
        Val::Map(_) => return Err("a map".to_string()),
        Val::FixedLengthList(_) => return Err("a fixed-length list".to_string()),
        Val::Resource(_) => return Err("a resource".to_string()),
        Val::Future(_) | Val::Stream(_) | Val::ErrorContext(_) => {
            return Err("an async value".to_string())
        }
    })
}

fn boxed_from_val(val: Option<Box<Val>>) -> Result<Option<Box<Value>>, String> {
    val.map(|val| from_val(*val).map(Box::new)).transpose()
}

/// Roughly how many bytes a value takes on the wire: what `result_bytes_max` bounds.
pub(crate) fn value_bytes(value: &Value) -> usize {
    const SCALAR_BYTES: usize = 9;
    const HEADER_BYTES: usize = 5;
    let items = |values: &mut dyn Iterator<Item = &Value>| -> usize {
        values.map(value_bytes).sum::<usize>() + HEADER_BYTES
    };
    match value {
        Value::Bool(_)
        | Value::Int(_)
        | Value::Uint(_)
        | Value::Float(_)
        | Value::Char(_)
        | Value::Decimal(_) => SCALAR_BYTES,
        Value::String(string) | Value::Enum(string) => string.len() + HEADER_BYTES,
        Value::List(values) | Value::Tuple(values) => items(&mut values.iter()),
        Value::Option(value) | Value::Result(Ok(value) | Err(value)) => {
            items(&mut value.iter().map(|value| &**value))
        }
        Value::Record(fields) => {
            fields.iter().map(|(name, _)| name.len()).sum::<usize>()
                + items(&mut fields.iter().map(|(_, value)| value))
        }
        Value::Variant(case, value) => case.len() + items(&mut value.iter().map(|value| &**value)),
        Value::Flags(flags) => {
            flags
                .iter()
                .map(|flag| flag.len() + HEADER_BYTES)
                .sum::<usize>()
                + HEADER_BYTES
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_round_trips_through_its_record() {
        let value = Value::Decimal(Decimal::from_micros(1_500_000));
        let val = to_val(&value, &Type::Decimal).unwrap();
        assert_eq!(
            val,
            Val::Record(vec![("micros".to_string(), Val::S64(1_500_000))])
        );
        assert_eq!(from_val(val).unwrap(), value);
    }

    #[test]
    fn a_record_with_other_fields_stays_a_record() {
        let val = Val::Record(vec![
            ("micros".to_string(), Val::S64(1)),
            ("note".to_string(), Val::String("x".to_string())),
        ]);
        assert!(matches!(from_val(val).unwrap(), Value::Record(fields) if fields.len() == 2));
        let val = Val::Record(vec![("micros".to_string(), Val::U64(1))]);
        assert!(matches!(from_val(val).unwrap(), Value::Record(_)));
    }

    #[test]
    fn integers_are_range_checked_when_lowered() {
        assert_eq!(to_val(&Value::Uint(255), &Type::U8).unwrap(), Val::U8(255));
        assert!(to_val(&Value::Uint(256), &Type::U8).is_err());
        assert!(to_val(&Value::Int(-1), &Type::U64).is_err());
        assert_eq!(to_val(&Value::Int(-1), &Type::S8).unwrap(), Val::S8(-1));
    }

    #[test]
    fn nested_values_lower_and_lift() {
        let ty = Type::List(Box::new(Type::Tuple(vec![Type::U64, Type::Decimal])));
        let value = Value::List(vec![Value::Tuple(vec![
            Value::Uint(4),
            Value::Decimal(Decimal::from_micros(7)),
        ])]);
        let val = to_val(&value, &ty).unwrap();
        assert_eq!(from_val(val).unwrap(), value);
    }

    #[test]
    fn value_bytes_grows_with_content() {
        let small = Value::String("a".to_string());
        let large = Value::List(vec![Value::String("a".repeat(1000)); 3]);
        assert!(value_bytes(&small) < 10);
        assert!(value_bytes(&large) > 3000);
    }
}
