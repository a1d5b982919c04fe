//! A Unix socket's permissions are its access control: `Builder::unix_mode` and
//! `echo --unix-mode` set them, and the socket never has others, not even for a moment.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use common::*;
use taskserve::Server;

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Whether `path`'s server answers the user `nobody` (uid 65534) with its echo.
fn serves_nobody(path: &Path) -> bool {
    let client = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.settimeout(20)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(b'hi')\n\
                  sys.stdout.write(s.recv(16).decode())\n";
    // The system's python3: one installed under /root (pyenv) is out of nobody's reach.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c"])
        .arg(client)
        .arg(path)
        .output()
        .expect("run setpriv (util-linux) and /usr/bin/python3 (Debian's python3)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        assert_eq!(String::from_utf8_lossy(&output.stdout), "GOT:hi");
        return true;
    }
    assert!(
        stderr.contains("PermissionError"),
        "failed for another reason than permissions:\n{stderr}"
    );
    false
}

#[test]
fn the_socket_file_has_the_mode_asked_and_nothing_else_is_left_beside_it() {
    let dir = TempDir::new();
    for mode in [0o600, 0o660, 0o666] {
        let path = dir.join(&format!("echo-{mode:o}.sock"));
        let server = Server::builder()
            .threads(1)
            .unix_mode(mode)
            .listen_unix(&path)
            .start(taskserve::echo)
            .unwrap();
        assert_eq!(mode_of(&path), mode, "{mode:o}");
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            entries,
            [path.file_name().unwrap()],
            "left beside the socket"
        );
        let mut client = UnixStream::connect(&path).unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        exchange_unix(&mut client);
        drop(client);
        server.stop();
        assert!(!path.exists(), "the socket file outlived the server");
    }
}

/// One `GOT:` round trip over a Unix socket.
fn exchange_unix(client: &mut UnixStream) {
    use std::io::{Read, Write};
    client.write_all(b"hi").unwrap();
    let mut reply = [0; 6];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"GOT:hi");
}

#[test]
fn a_mode_that_is_not_permission_bits_is_refused() {
    let dir = TempDir::new();
    let error = Server::builder()
        .unix_mode(0o4755)
        .listen_unix(dir.join("echo.sock"))
        .start(taskserve::echo)
        .expect_err("setuid bits on a socket");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
    let (code, _, stderr) = run_echo(&["--unix", "/tmp/x.sock", "--unix-mode", "999"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not a file mode"), "{stderr}");
    let (code, _, stderr) = run_echo(&["--unix-mode", "600"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--unix-mode needs --unix"), "{stderr}");
}

#[test]
#[ignore = "needs root and /usr/bin/python3, to connect as the user nobody: bash .ci/run runs it"]
fn another_user_is_refused_with_mode_600_and_served_with_mode_666() {
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (mode, served) in [("600", false), ("666", true)] {
        let path = dir.join(&format!("echo-{mode}.sock"));
        let path_arg = path.to_str().unwrap();
        let echo = EchoProcess::start(&["--unix", path_arg, "--unix-mode", mode, "-q"]);
        assert_eq!(format!("{:o}", mode_of(&path)), mode);
        assert_eq!(serves_nobody(&path), served, "mode {mode}");
        drop(echo);
    }
}
