//! Fuzzes frame decoding: any bytes give a frame, "need more", or an error; never a panic,
//! and a decoded frame re-encodes to exactly the bytes it was read from.
#![no_main]

use billcl_proto::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = Frame::decode(data) {
        assert!(used <= data.len());
        assert_eq!(frame.to_bytes(), &data[..used]);
    }
});
