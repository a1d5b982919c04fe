#![no_main]
// See taskserve::fuzzing::tls_pem for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| taskserve::fuzzing::tls_pem(data));
