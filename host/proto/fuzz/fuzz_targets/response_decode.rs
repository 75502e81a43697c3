//! Fuzzes response decoding: the first byte picks the frame kind, the rest is the body. A
//! response that decodes must re-encode to a frame that decodes to the same response.
#![no_main]

use billcl_proto::{Frame, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let frame = Frame { kind, request_id: 1, body: body.to_vec() };
    if let Ok(response) = Response::from_frame(&frame) {
        let again =
            Response::from_frame(&response.to_frame(1)).expect("re-encoded response decodes");
        assert_eq!(again.to_frame(1), response.to_frame(1));
    }
});
