//! The bucket function: which of the cluster's buckets a sharding key belongs to.
//!
//! It reproduces vshard's `bucket_id_mpcrc32` exactly, so bucket numbers match the Tarantool
//! cluster billcl descends from: the key is encoded in its smallest MessagePack form (strings
//! are hashed as their raw bytes, as vshard does) and hashed with Tarantool's CRC-32C, which
//! starts from 0xFFFFFFFF and skips the final XOR.

use crate::value::Value;

/// Buckets in a cluster unless configured otherwise (the seed cluster's count).
pub const BUCKET_COUNT_DEFAULT: u32 = 1000;

/// A sharding key: an integer or a string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Int(i64),
    Uint(u64),
    Str(String),
}

impl Key {
    /// The key a value stands for, if it is an integer or a string.
    pub fn from_value(value: &Value) -> Option<Key> {
        match value {
            Value::Int(int) => Some(Key::Int(*int)),
            Value::Uint(uint) => Some(Key::Uint(*uint)),
            Value::String(text) => Some(Key::Str(text.clone())),
            _ => None,
        }
    }
}

/// The key in its smallest MessagePack form: non-negative integers as positive fixint or
/// uint8/16/32/64, negative ones as negative fixint or int8/16/32/64, strings as
/// fixstr/str8/str16/str32. Multi-byte numbers are big-endian, as MessagePack requires.
pub fn msgpack_key(key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    match key {
        Key::Uint(uint) => msgpack_uint(*uint, &mut out),
        Key::Int(int) if *int >= 0 => msgpack_uint(*int as u64, &mut out),
        Key::Int(int) => {
            let int = *int;
            if int >= -32 {
                out.push(int as i8 as u8);
            } else if int >= i64::from(i8::MIN) {
                out.push(0xd0);
                out.push(int as i8 as u8);
            } else if int >= i64::from(i16::MIN) {
                out.push(0xd1);
                out.extend_from_slice(&(int as i16).to_be_bytes());
            } else if int >= i64::from(i32::MIN) {
                out.push(0xd2);
                out.extend_from_slice(&(int as i32).to_be_bytes());
            } else {
                out.push(0xd3);
                out.extend_from_slice(&int.to_be_bytes());
            }
        }
        Key::Str(text) => {
            let len = text.len();
            if len <= 31 {
                out.push(0xa0 | len as u8);
            } else if len <= usize::from(u8::MAX) {
                out.push(0xd9);
                out.push(len as u8);
            } else if len <= usize::from(u16::MAX) {
                out.push(0xda);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                // Longer than 4 GiB cannot be a key: frames are far smaller.
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                out.push(0xdb);
                out.extend_from_slice(&len.to_be_bytes());
            }
            out.extend_from_slice(text.as_bytes());
        }
    }
    out
}

fn msgpack_uint(uint: u64, out: &mut Vec<u8>) {
    if uint <= 0x7f {
        out.push(uint as u8);
    } else if uint <= u64::from(u8::MAX) {
        out.push(0xcc);
        out.push(uint as u8);
    } else if uint <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(uint as u16).to_be_bytes());
    } else if uint <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(uint as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&uint.to_be_bytes());
    }
}

/// Tarantool's `digest.crc32`: CRC-32C (Castagnoli) with initial value 0xFFFFFFFF and no final
/// XOR, which is the bitwise complement of the standard CRC-32C.
pub fn tarantool_crc32(bytes: &[u8]) -> u32 {
    !crc32c::crc32c(bytes)
}

/// The bucket (1..=bucket_count) a key belongs to: `tarantool_crc32(msgpack(key)) %
/// bucket_count + 1`, with string keys hashed as their raw bytes (vshard's
/// `bucket_id_mpcrc32`). A `bucket_count` of zero is treated as one bucket.
pub fn bucket_id(key: &Key, bucket_count: u32) -> u32 {
    let hash = match key {
        Key::Str(text) => tarantool_crc32(text.as_bytes()),
        _ => tarantool_crc32(&msgpack_key(key)),
    };
    hash % bucket_count.max(1) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bitwise reference of Tarantool's crc32, written from the definition (reflected
    /// Castagnoli polynomial 0x82F63B78, init 0xFFFFFFFF, no final XOR). The same in Python:
    /// ```python
    /// def crc(data):
    ///     c = 0xFFFFFFFF
    ///     for b in data:
    ///         c ^= b
    ///         for _ in range(8):
    ///             c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    ///     return c
    /// ```
    fn reference_crc(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for byte in bytes {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = (crc >> 1) ^ if crc & 1 == 1 { 0x82F6_3B78 } else { 0 };
            }
        }
        crc
    }

    #[test]
    fn crc_matches_bitwise_reference() {
        // The standard CRC-32C check value of "123456789" is 0xE3069283; without the final
        // XOR it is its complement.
        assert_eq!(tarantool_crc32(b"123456789"), !0xE306_9283);
        assert_eq!(tarantool_crc32(b""), 0xFFFF_FFFF);
        let mut state = 1u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 56) as u8
                })
                .collect();
            assert_eq!(
                tarantool_crc32(&bytes),
                reference_crc(&bytes),
                "length {len}"
            );
        }
    }

    #[test]
    fn msgpack_smallest_forms() {
        let cases: &[(Key, &[u8])] = &[
            (Key::Uint(0), &[0x00]),
            (Key::Uint(127), &[0x7f]),
            (Key::Uint(128), &[0xcc, 0x80]),
            (Key::Uint(255), &[0xcc, 0xff]),
            (Key::Uint(256), &[0xcd, 0x01, 0x00]),
            (Key::Uint(65_535), &[0xcd, 0xff, 0xff]),
            (Key::Uint(65_536), &[0xce, 0x00, 0x01, 0x00, 0x00]),
            (
                Key::Uint(u64::from(u32::MAX) + 1),
                &[0xcf, 0, 0, 0, 1, 0, 0, 0, 0],
            ),
            (Key::Int(4), &[0x04]),
            (Key::Int(1000), &[0xcd, 0x03, 0xe8]),
            (Key::Int(-1), &[0xff]),
            (Key::Int(-32), &[0xe0]),
            (Key::Int(-33), &[0xd0, 0xdf]),
            (Key::Int(-128), &[0xd0, 0x80]),
            (Key::Int(-129), &[0xd1, 0xff, 0x7f]),
            (Key::Int(-32_769), &[0xd2, 0xff, 0xff, 0x7f, 0xff]),
            (Key::Int(i64::MIN), &[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            (Key::Str("ab".into()), &[0xa2, b'a', b'b']),
        ];
        for (key, bytes) in cases {
            assert_eq!(msgpack_key(key), *bytes, "{key:?}");
        }
        let long = "x".repeat(40);
        assert_eq!(msgpack_key(&Key::Str(long.clone()))[..2], [0xd9, 40]);
        let longer = "x".repeat(300);
        assert_eq!(msgpack_key(&Key::Str(longer))[..3], [0xda, 0x01, 0x2c]);
    }

    #[test]
    fn bucket_ids_match_reference() {
        // Independent computation for key 4: msgpack 0x04, bitwise CRC, mod 1000, plus one.
        assert_eq!(
            bucket_id(&Key::Uint(4), 1000),
            reference_crc(&[0x04]) % 1000 + 1
        );
        // Vectors computed with the Python reference above.
        assert_eq!(reference_crc(&[0x04]), 0x6a18_3bb1);
        assert_eq!(bucket_id(&Key::Uint(4), 1000), 42);
        assert_eq!(bucket_id(&Key::Uint(1), 1000), 614);
        assert_eq!(bucket_id(&Key::Uint(1000), 1000), 355);
        assert_eq!(bucket_id(&Key::Str("alice".into()), 1000), 354);
        for id in 0..5_000u64 {
            let key = Key::Uint(id);
            let expected = reference_crc(&msgpack_key(&key)) % 1000 + 1;
            let bucket = bucket_id(&key, BUCKET_COUNT_DEFAULT);
            assert_eq!(bucket, expected);
            assert!((1..=1000).contains(&bucket));
            assert_eq!(
                bucket_id(&Key::Int(id as i64), 1000),
                bucket,
                "int and uint agree"
            );
        }
        assert_eq!(
            bucket_id(&Key::Str("alice".into()), 1000),
            reference_crc(b"alice") % 1000 + 1
        );
        assert_eq!(bucket_id(&Key::Uint(7), 1), 1);
        assert_eq!(bucket_id(&Key::Uint(7), 0), 1);
    }

    #[test]
    fn keys_from_values() {
        assert_eq!(Key::from_value(&Value::Uint(4)), Some(Key::Uint(4)));
        assert_eq!(Key::from_value(&Value::Int(-4)), Some(Key::Int(-4)));
        assert_eq!(
            Key::from_value(&Value::String("a".into())),
            Some(Key::Str("a".into()))
        );
        assert_eq!(Key::from_value(&Value::Bool(true)), None);
    }
}
