//! The one error type of the wire protocol: everything that can be wrong with bytes received.
//!
//! Every decoder returns these instead of panicking, so a malformed or hostile frame costs the
//! receiver one error reply and nothing else.

/// What was wrong with bytes that failed to decode as a frame or message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input ended in the middle of a field.
    #[error("truncated input: the message ended in the middle of a field")]
    Truncated,
    /// A frame header announced more bytes than a frame may hold.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversize { len: usize, max: usize },
    /// The frame's length field is smaller than the fixed header after it.
    #[error("frame length {len} is shorter than the 10-byte header it must cover")]
    ShortFrame { len: usize },
    /// The frame carries a protocol version this side does not speak.
    #[error("protocol version {version} is not supported (this side speaks version {supported})")]
    BadVersion { version: u8, supported: u8 },
    /// The frame kind is not one this decoder accepts.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A tag byte inside a message has no meaning for the field it introduces.
    #[error("unknown {what} tag 0x{tag:02x}")]
    BadTag { what: &'static str, tag: u8 },
    /// An error reply carries a code this side does not know.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
    /// A string field is not valid UTF-8.
    #[error("a string field is not valid UTF-8")]
    BadUtf8,
    /// A char field is not a Unicode scalar value.
    #[error("0x{0:x} is not a Unicode scalar value")]
    BadChar(u32),
    /// Values or types nest deeper than the limit.
    #[error("value nests deeper than {max} levels")]
    TooDeep { max: usize },
    /// A field is longer than its limit.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// Bytes were left after the message ended.
    #[error("{0} unexpected bytes after the end of the message")]
    TrailingBytes(usize),
}
