//! Fuzzes request decoding: the first byte picks the frame kind, the rest is the body. A
//! request that decodes must re-encode to a frame that decodes to the same request.
#![no_main]

use billcl_proto::{Frame, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let frame = Frame { kind, request_id: 1, body: body.to_vec() };
    if let Ok(request) = Request::from_frame(&frame) {
        let again = Request::from_frame(&request.to_frame(1)).expect("re-encoded request decodes");
        // Floats: NaN payloads compare unequal, so compare the encodings instead.
        assert_eq!(again.to_frame(1), request.to_frame(1));
    }
});
