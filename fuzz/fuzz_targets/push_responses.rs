//! What APNs, FCM and Google's token endpoint answer, or what a broken proxy in between
//! answers: an outcome for every status, header and body, never a panic.
#![no_main]

use std::time::Instant;

use arbitrary::Arbitrary;
use hyper::HeaderMap;
use hyper::header::HeaderValue;
use libfuzzer_sys::fuzz_target;
use push::Outcome;

#[derive(Arbitrary, Debug)]
struct Input {
    status: u16,
    retry_after: Option<Vec<u8>>,
    body: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    if let Some(v) = input
        .retry_after
        .and_then(|v| HeaderValue::from_bytes(&v).ok())
    {
        headers.insert("retry-after", v);
    }
    let (apns, _reason) = push::apns::response_outcome(input.status, &headers, &input.body);
    let fcm = push::fcm::response_outcome(input.status, &headers, &input.body);
    for outcome in [apns, fcm] {
        assert_eq!(
            input.status == 200,
            outcome == Outcome::Delivered,
            "{outcome:?}"
        );
    }
    let now = Instant::now();
    if let Ok((_, expires)) = push::fcm::parse_token_response(&input.body, now) {
        assert!(expires.duration_since(now).as_secs() <= 3600);
    }
});
