//! Feeds arbitrary bytes to every stream decoder: they must never panic, never
//! consume more than they were given, and whatever decodes must re-encode to
//! exactly the bytes consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proto::stream::{
    MAX_FRAME_LEN, Message, decode_message, decode_open_request, decode_open_response, encode_open_request,
    encode_open_response,
};

fuzz_target!(|data: &[u8]| {
    let _ = decode_open_request(data);
    let _ = decode_open_response(data);
    if let Ok(Some((msg, used))) = decode_message(data) {
        assert!(used <= data.len() && used <= MAX_FRAME_LEN);
        let mut again = Vec::new();
        match &msg {
            Message::OpenRequest(r) => encode_open_request(r, &mut again).expect("decoded requests re-encode"),
            Message::OpenResponse(r) => encode_open_response(r, &mut again),
        }
        assert_eq!(again, &data[..used]);
    }
    // Any split point: a prefix either needs more bytes or fails the same way.
    if data.len() > 1 {
        let cut = usize::from(data[0]) % data.len();
        if let Ok(Some(_)) = decode_message(&data[..cut]) {
            // A complete frame in the prefix must be the same frame as in the whole.
            assert_eq!(decode_message(&data[..cut]).ok(), decode_message(data).ok());
        }
    }
});
