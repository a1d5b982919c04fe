//! `taskserve-echo`: the `echo` server under the name to install, which shadows no system
//! command (`cargo install --path . --bin taskserve-echo`).
//!
//! The whole program is `echo/main.rs`, compiled here as a module, so the two cannot drift apart.

#[path = "echo/main.rs"]
mod echo;

fn main() -> std::process::ExitCode {
    echo::main()
}
