//! The README's library examples build in a crate of their own with only the dependencies the
//! README prints, as a user would copy them. (Doctests cannot tell: they see this crate's
//! dev-dependencies too.)

mod common;

use std::path::Path;
use std::process::Command;

use common::standalone_target_dir;

/// The fenced blocks of `markdown` whose info string starts with `lang`, in order.
fn blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find("\n```") {
        let after = &rest[start + 4..];
        let info_end = after.find('\n').unwrap_or(after.len());
        let info = &after[..info_end];
        let body = &after[(info_end + 1).min(after.len())..];
        let Some(end) = body.find("\n```") else {
            break;
        };
        if info.split(',').next() == Some(lang) {
            found.push(&body[..end + 1]);
        }
        rest = &body[end + 4..];
    }
    found
}

#[test]
fn readme_library_examples_build_in_a_separate_crate_with_the_printed_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let library = &readme[readme.find("## Library").expect("a Library section")..];
    let toml = blocks(library, "toml");
    let dependencies = toml
        .first()
        .expect("a [dependencies] block")
        .replace("../taskserve", &root.display().to_string());
    let programs = blocks(library, "rust");
    assert!(programs.len() >= 3, "the Library section's Rust blocks");

    let dir = root.join("target").join("readme-crate");
    let bin = dir.join("src").join("bin");
    // Programs left by an earlier run, from a README that had more of them, must not be built.
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    let manifest = format!(
        "[package]\nname = \"readme-examples\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         [workspace]\n\n{dependencies}"
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    // The same versions as this crate's own build, and nothing to download.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    for (n, program) in programs.iter().enumerate() {
        std::fs::write(bin.join(format!("example{n}.rs")), program).unwrap();
    }
    let output = Command::new(env!("CARGO"))
        .args(["build", "--offline", "--quiet", "--bins"])
        .current_dir(&dir)
        // Shared with tests/examples_standalone.rs: taskserve and its dependencies build once.
        .env("CARGO_TARGET_DIR", standalone_target_dir())
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "the README's examples do not build with only its dependencies:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
