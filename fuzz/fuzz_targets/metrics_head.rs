#![no_main]
// See taskserve::fuzzing::metrics_head for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| taskserve::fuzzing::metrics_head(data));
