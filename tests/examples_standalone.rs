//! Each example builds in a crate of its own with only `taskserve` and the dependencies its
//! `//!` header lists (in a ```toml block), as a user who copies it would. Inside this repository
//! `cargo run --example` sees every dev-dependency, so it cannot tell.

mod common;

use std::path::Path;
use std::process::Command;

use common::standalone_target_dir;

/// The lines of the ```toml block in `source`'s `//!` header, `[dependencies]` left out.
fn header_dependencies(source: &str) -> Vec<String> {
    let header = source.lines().map_while(|line| line.strip_prefix("//!"));
    let mut lines = header.map(|line| line.strip_prefix(' ').unwrap_or(line));
    let mut dependencies = Vec::new();
    if lines.any(|line| line == "```toml") {
        for line in lines.take_while(|line| *line != "```") {
            if line != "[dependencies]" {
                dependencies.push(line.to_string());
            }
        }
    }
    dependencies
}

/// Builds `example` (a file of examples/) alone in a crate under target/, offline with this
/// repository's Cargo.lock; the build's stderr if it fails. An example is one file
/// (`chat.rs`) or a folder whose `main.rs` has the header, beside its modules (`kv/`).
fn build_alone(root: &Path, example: &str) -> Result<(), String> {
    let path = root.join("examples").join(example);
    let files: Vec<(String, String)> = if path.is_dir() {
        std::fs::read_dir(&path)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|file| file.ends_with(".rs"))
            .map(|file| {
                let source = std::fs::read_to_string(path.join(&file)).unwrap();
                (file, source)
            })
            .collect()
    } else {
        vec![("main.rs".into(), std::fs::read_to_string(&path).unwrap())]
    };
    let source = &files
        .iter()
        .find(|(file, _)| file == "main.rs")
        .unwrap_or_else(|| panic!("{example} has no main.rs"))
        .1;
    let name = example.trim_end_matches(".rs");
    let dir = root.join("target").join("standalone-examples").join(name);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = format!(
        "[package]\nname = \"standalone-{}\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         [workspace]\n\n[dependencies]\ntaskserve = {{ path = {:?} }}\n{}\n",
        name.replace('_', "-"),
        root.display().to_string(),
        header_dependencies(source).join("\n")
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    for (file, source) in &files {
        std::fs::write(dir.join("src").join(file), source).unwrap();
    }
    let output = Command::new(env!("CARGO"))
        .args(["build", "--offline", "--quiet"])
        .current_dir(&dir)
        // One target directory for all of them and the README's: taskserve and its
        // dependencies build once.
        .env("CARGO_TARGET_DIR", standalone_target_dir())
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn every_example_builds_with_only_the_dependencies_its_header_lists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut examples: Vec<String> = std::fs::read_dir(root.join("examples"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".rs") || root.join("examples").join(name).is_dir())
        .collect();
    examples.sort();
    assert!(examples.len() >= 6, "{examples:?}");
    let failures: Vec<String> = examples
        .iter()
        .filter_map(|example| {
            let e = build_alone(root, example).err()?;
            Some(format!("{example}:\n{e}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "examples that do not build with only what their header lists:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_header_lists_its_dependencies_in_a_toml_block() {
    let source = "//! Text.\n//!\n//! ```toml\n//! [dependencies]\n//! smol = \"2\"\n//! ```\n\nfn main() {}\n";
    assert_eq!(header_dependencies(source), ["smol = \"2\""]);
    assert!(header_dependencies("//! No block.\nfn main() {}\n").is_empty());
}
