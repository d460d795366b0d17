//! Fuzzes `taskgate::fuzz_api::http1_reply`; its docs say what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| taskgate::fuzz_api::http1_reply(data));
