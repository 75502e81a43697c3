//! Frames: the length-prefixed envelope every request and response travels in.
//!
//! Layout: `len u32 LE` (bytes after this field = 10 + body) | `version u8` | `kind u8` |
//! `request_id u64 LE` | body. A decoder first learns whether a whole frame is there, and
//! rejects an oversize frame from its header before allocating anything.

use crate::error::Error;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// The TLS ALPN protocol id of billcl connections.
pub const ALPN: &[u8] = b"billcl/1";
/// The largest whole frame (header included): bodies carry module deploys and raft snapshots.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes before the body: length (4), version (1), kind (1), request id (8).
pub const FRAME_HEADER_BYTES: usize = 14;
/// Bytes the length field counts besides the body: version, kind and request id.
const LEN_FIELD_BYTES: usize = 4;
const HEADER_AFTER_LEN_BYTES: usize = FRAME_HEADER_BYTES - LEN_FIELD_BYTES;

/// One frame: a message kind, the request id it belongs to, and the message body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub request_id: u64,
    pub body: Vec<u8>,
}

impl Frame {
    /// Bytes the encoded frame takes.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.body.len()
    }

    /// Fails with `Oversize` if the frame is larger than [`FRAME_BYTES_MAX`], so a sender can
    /// refuse it rather than have the receiver drop it.
    pub fn check_size(&self) -> Result<(), Error> {
        let len = self.encoded_len();
        if len > FRAME_BYTES_MAX {
            return Err(Error::Oversize {
                len,
                max: FRAME_BYTES_MAX,
            });
        }
        Ok(())
    }

    /// Appends the encoded frame to `out`. A body that no u32 length can describe cannot be
    /// built by this crate's messages; such a frame is an invariant violation.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = u32::try_from(HEADER_AFTER_LEN_BYTES + self.body.len())
            .expect("frame body longer than u32::MAX bytes");
        out.reserve(self.encoded_len());
        out.extend_from_slice(&len.to_le_bytes());
        out.push(PROTOCOL_VERSION);
        out.push(self.kind);
        out.extend_from_slice(&self.request_id.to_le_bytes());
        out.extend_from_slice(&self.body);
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// `Ok(None)` if `buf` does not yet hold a whole frame; `Err` if the header announces an
    /// oversize frame (checked before allocating), a version other than
    /// [`PROTOCOL_VERSION`], or a length below 10. Otherwise the frame and the bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, Error> {
        let Some(len_bytes) = buf.get(..LEN_FIELD_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(len_bytes.try_into().expect("four bytes")) as usize;
        if len < HEADER_AFTER_LEN_BYTES {
            return Err(Error::ShortFrame { len });
        }
        let total = LEN_FIELD_BYTES + len;
        if total > FRAME_BYTES_MAX {
            return Err(Error::Oversize {
                len: total,
                max: FRAME_BYTES_MAX,
            });
        }
        if let Some(&version) = buf.get(LEN_FIELD_BYTES) {
            if version != PROTOCOL_VERSION {
                return Err(Error::BadVersion {
                    version,
                    supported: PROTOCOL_VERSION,
                });
            }
        }
        let Some(frame) = buf.get(..total) else {
            return Ok(None);
        };
        let kind = frame[5];
        let request_id = u64::from_le_bytes(frame[6..14].try_into().expect("eight bytes"));
        let body = frame[FRAME_HEADER_BYTES..].to_vec();
        Ok(Some((
            Frame {
                kind,
                request_id,
                body,
            },
            total,
        )))
    }

    /// Decodes a buffer that must hold exactly one whole frame (a stream's full contents).
    pub fn decode_exact(buf: &[u8]) -> Result<Frame, Error> {
        match Frame::decode(buf)? {
            None => Err(Error::Truncated),
            Some((frame, used)) if used == buf.len() => Ok(frame),
            Some((_, used)) => Err(Error::TrailingBytes(buf.len() - used)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let frame = Frame {
            kind: 0x81,
            request_id: 0x0102_0304_0506_0708,
            body: vec![9, 8, 7],
        };
        let bytes = frame.to_bytes();
        assert_eq!(
            bytes,
            [13, 0, 0, 0, 1, 0x81, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7],
            "len | version | kind | request id LE | body"
        );
        assert_eq!(
            Frame::decode(&bytes).unwrap(),
            Some((frame.clone(), bytes.len()))
        );
        assert_eq!(Frame::decode_exact(&bytes).unwrap(), frame);
        // Two frames back to back: decode takes the first and says how much it used.
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert_eq!(Frame::decode(&two).unwrap().unwrap().1, bytes.len());
        assert_eq!(
            Frame::decode_exact(&two),
            Err(Error::TrailingBytes(bytes.len()))
        );
    }

    #[test]
    fn incomplete_frames_wait() {
        let bytes = Frame {
            kind: 1,
            request_id: 5,
            body: vec![1; 40],
        }
        .to_bytes();
        for len in 0..bytes.len() {
            assert_eq!(Frame::decode(&bytes[..len]), Ok(None), "prefix {len}");
            assert_eq!(Frame::decode_exact(&bytes[..len]).ok(), None);
        }
    }

    #[test]
    fn bad_headers_are_rejected_early() {
        // Oversize from the length field alone, before any body arrives.
        let oversize = (FRAME_BYTES_MAX as u32).to_le_bytes();
        assert_eq!(
            Frame::decode(&oversize),
            Err(Error::Oversize {
                len: FRAME_BYTES_MAX + 4,
                max: FRAME_BYTES_MAX
            })
        );
        assert!(matches!(
            Frame::decode(&u32::MAX.to_le_bytes()),
            Err(Error::Oversize { .. })
        ));
        assert_eq!(
            Frame::decode(&[9, 0, 0, 0]),
            Err(Error::ShortFrame { len: 9 })
        );
        assert_eq!(
            Frame::decode(&[10, 0, 0, 0, 2]),
            Err(Error::BadVersion {
                version: 2,
                supported: 1
            })
        );
        // The largest allowed frame's header is accepted (and waits for its body).
        let largest = ((FRAME_BYTES_MAX - 4) as u32).to_le_bytes();
        assert_eq!(Frame::decode(&largest), Ok(None));
        let big = Frame {
            kind: 1,
            request_id: 0,
            body: vec![0; FRAME_BYTES_MAX],
        };
        assert!(big.check_size().is_err());
        assert!(Frame {
            kind: 1,
            request_id: 0,
            body: vec![]
        }
        .check_size()
        .is_ok());
    }
}
