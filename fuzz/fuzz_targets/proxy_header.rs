#![no_main]
// See taskserve::fuzzing::proxy_header for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| taskserve::fuzzing::proxy_header(data));
