//! The one binary encoding used on disk and on the wire (bincode, varint integers), so that every
//! decoder of untrusted or possibly damaged bytes has a size limit and rejects trailing bytes.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
}

/// Encodes `value`.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::Error> {
    options().serialize(value)
}

/// Decodes exactly `bytes` (no trailing bytes), refusing inputs over `limit_bytes`. Decoding
/// from a slice never allocates more than the slice holds (lengths are checked against it).
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    limit_bytes: usize,
) -> Result<T, bincode::Error> {
    if bytes.len() > limit_bytes {
        return Err(Box::new(bincode::ErrorKind::SizeLimit));
    }
    options().deserialize(bytes)
}

/// `#[serde(with = "codec::bytes")]` for `Vec<u8>` fields: one length-prefixed byte string
/// instead of a sequence of `u8` values.
pub(crate) mod bytes {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("a byte string")
        }

        fn visit_bytes<E: de::Error>(self, value: &[u8]) -> Result<Vec<u8>, E> {
            Ok(value.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, value: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(value)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Never trust a size hint for the allocation.
            let mut value = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                value.push(byte);
            }
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;

    #[test]
    fn command_round_trips_as_a_byte_string() {
        let command = Command::new(vec![1, 2, 3, 255]);
        let bytes = encode(&command).unwrap();
        // varint length 4 then the raw bytes.
        assert_eq!(bytes, vec![4, 1, 2, 3, 255]);
        assert_eq!(decode::<Command>(&bytes, 64).unwrap(), command);
    }

    #[test]
    fn decode_refuses_oversize_and_trailing_bytes() {
        let bytes = encode(&Command::new(vec![7; 100])).unwrap();
        assert!(decode::<Command>(&bytes, 50).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode::<Command>(&trailing, 1000).is_err());
        // A length prefix claiming 2^60 bytes is rejected, not allocated.
        let huge = encode(&(1u64 << 60)).unwrap();
        assert!(decode::<Command>(&huge, 1 << 20).is_err());
    }
}
