//! Every checked-in input of `fuzz/` through its target's entry point, in a plain `cargo test`
//! on stable: what the fuzzer once found stays fixed, and the seeds stay valid input.

use std::path::Path;

/// Runs `entry` on every file of `fuzz/corpus/TARGET` and `fuzz/regressions/TARGET`. Either
/// missing or empty is a failure: a replay of nothing would pass whatever broke.
fn replay(target: &str, entry: impl Fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fuzz = root.join("fuzz");
    // The crate as published leaves fuzz/ out (Cargo.toml's `exclude`); cargo marks such a copy
    // with the Cargo.toml.orig it writes. A clone has no such file, and must have fuzz/.
    if !fuzz.exists() && root.join("Cargo.toml.orig").exists() {
        return;
    }
    for dir in ["corpus", "regressions"].map(|dir| fuzz.join(dir).join(target)) {
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|file| file.unwrap().path())
            .collect();
        assert!(!files.is_empty(), "{}: no inputs", dir.display());
        for file in files {
            // Shown with the panic's message, if this input makes one.
            eprintln!("replaying {}", file.display());
            entry(&std::fs::read(&file).unwrap());
        }
    }
}

#[test]
fn proxy_header_inputs_replay() {
    replay("proxy_header", super::proxy_header);
}

#[cfg(feature = "metrics")]
#[test]
fn metrics_head_inputs_replay() {
    replay("metrics_head", super::metrics_head);
}

#[cfg(feature = "tls")]
#[test]
fn tls_pem_inputs_replay() {
    replay("tls_pem", super::tls_pem);
}

#[cfg(unix)]
#[test]
fn echo_args_inputs_replay() {
    replay("echo_args", super::echo_args);
}
