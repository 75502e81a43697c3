//! billcl's wire protocol, sans-I/O: shared by the node and the client SDK.
//!
//! Three layers: bytes → [`Frame`] (length, version, kind, request id) → typed [`Request`] /
//! [`Response`]. Values travel typed ([`Value`] checked against a WIT [`Type`]), and
//! [`bucket::bucket_id`] maps a sharding key to its bucket exactly as vshard did. Nothing here
//! does I/O or reads a clock; `docs/protocol.md` specifies the bytes.

pub mod bucket;
pub mod catalog;
mod codec;
pub mod error;
pub mod frame;
pub mod message;
pub mod value;

pub use billcl_money::Decimal;
pub use bucket::{bucket_id, msgpack_key, tarantool_crc32, Key, BUCKET_COUNT_DEFAULT};
pub use catalog::{find_procedure, split_pinned, LookupError};
pub use error::Error;
pub use frame::{Frame, ALPN, FRAME_BYTES_MAX, FRAME_HEADER_BYTES, PROTOCOL_VERSION};
pub use message::{
    Call, ErrorCode, ErrorReply, ProcedureInfo, ProcedureKind, ReadMode, Request, Response,
};
pub use value::{Type, Value, VALUE_DEPTH_MAX};
