#![no_main]
// See taskserve::fuzzing::echo_args for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| taskserve::fuzzing::echo_args(data));
