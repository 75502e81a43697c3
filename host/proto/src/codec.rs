//! Byte-level primitives of the message codec: little-endian integers, u32-length strings and
//! byte strings, u32 counts.
//!
//! The reader checks every length against the input that remains before it allocates, so a
//! hostile length field costs an error, never memory.

use crate::error::Error;

/// Appends fields to a message body.
#[derive(Default)]
pub(crate) struct Writer {
    pub(crate) out: Vec<u8>,
}

impl Writer {
    pub(crate) fn u8(&mut self, value: u8) {
        self.out.push(value);
    }
    pub(crate) fn u16(&mut self, value: u16) {
        self.out.extend_from_slice(&value.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, value: u32) {
        self.out.extend_from_slice(&value.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, value: u64) {
        self.out.extend_from_slice(&value.to_le_bytes());
    }
    pub(crate) fn i64(&mut self, value: i64) {
        self.out.extend_from_slice(&value.to_le_bytes());
    }
    pub(crate) fn u128(&mut self, value: u128) {
        self.out.extend_from_slice(&value.to_le_bytes());
    }
    /// A count or length; the protocol carries them as u32. Anything longer cannot fit in a
    /// frame, so the assertion guards an invariant, not input.
    pub(crate) fn len(&mut self, len: usize) {
        let len = u32::try_from(len).expect("a length that fits no frame");
        self.u32(len);
    }
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.len(bytes.len());
        self.out.extend_from_slice(bytes);
    }
    pub(crate) fn str(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }
    pub(crate) fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }
}

/// Reads fields from a message body, never past its end.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Reader<'a> {
        Reader { input }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.input.len()
    }

    /// Fails with `TrailingBytes` if anything is left.
    pub(crate) fn finish(&self) -> Result<(), Error> {
        match self.input.len() {
            0 => Ok(()),
            left => Err(Error::TrailingBytes(left)),
        }
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], Error> {
        if len > self.input.len() {
            return Err(Error::Truncated);
        }
        let (head, tail) = self.input.split_at(len);
        self.input = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let bytes = self.take(N)?;
        let mut array = [0u8; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, Error> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(crate) fn u128(&mut self) -> Result<u128, Error> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    pub(crate) fn bool(&mut self, what: &'static str) -> Result<bool, Error> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(Error::BadTag { what, tag }),
        }
    }

    /// A u32 count of items each at least `item_bytes_min` long: fails as truncated if the
    /// input cannot hold that many, so callers may allocate `count` slots.
    pub(crate) fn count(&mut self, item_bytes_min: usize) -> Result<usize, Error> {
        let count = self.u32()? as usize;
        if count.saturating_mul(item_bytes_min.max(1)) > self.input.len() {
            return Err(Error::Truncated);
        }
        Ok(count)
    }

    /// [`Reader::count`] of at most `max` items (`TooLong` naming `what` beyond).
    pub(crate) fn count_max(
        &mut self,
        item_bytes_min: usize,
        max: usize,
        what: &'static str,
    ) -> Result<usize, Error> {
        let count = self.count(item_bytes_min)?;
        if count > max {
            return Err(Error::TooLong {
                what,
                len: count,
                max,
            });
        }
        Ok(count)
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, Error> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Error::BadUtf8)
    }

    /// A string no longer than `max` bytes.
    pub(crate) fn str_max(&mut self, what: &'static str, max: usize) -> Result<&'a str, Error> {
        let text = self.str()?;
        if text.len() > max {
            return Err(Error::TooLong {
                what,
                len: text.len(),
                max,
            });
        }
        Ok(text)
    }
}
