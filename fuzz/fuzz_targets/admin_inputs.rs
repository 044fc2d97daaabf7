//! Admin API query strings and action bodies: a clear refusal or acceptance, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, Vec<u8>, String)| {
    let (query, body, time) = input;
    let _ = relay::admin::check_inputs(&query, &body);
    if let Some(ms) = relay::admin::parse_time(&time) {
        // Every time it reads back, it prints, and the print reads back the same.
        assert_eq!(
            relay::admin::parse_time(&relay::admin::rfc3339(ms)),
            Some(ms)
        );
    }
    let _ = relay::audit::parse_cursor(&time);
});
