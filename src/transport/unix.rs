//! Unix sockets: a socket file that outlives a crashed server is replaced only when nothing
//! answers on it, and the file is removed when the server stops.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{debug, info};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::info::PeerCredentials;

/// The socket file a listener made; removed on drop if it is still that file.
#[derive(Debug)]
pub(super) struct SocketFile {
    path: PathBuf,
    /// Device and inode: another server may have replaced the file since.
    id: (u64, u64),
}

impl SocketFile {
    /// The socket file now at `path`, which this listener made.
    fn at(path: &Path) -> io::Result<SocketFile> {
        let meta = fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == self.id);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                debug!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Binds a listening socket at `path`, with the file permissions `mode` if given (else as the
/// umask leaves them).
pub(super) fn bind(
    path: &Path,
    backlog: u32,
    mode: Option<u32>,
) -> io::Result<(UnixListener, SocketFile)> {
    let fail =
        |e: io::Error| io::Error::new(e.kind(), format!("failed to bind {}: {e}", path.display()));
    remove_if_stale(path).map_err(fail)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(fail)?;
    let backlog = super::tcp::clamp_backlog(backlog);
    let file = match mode {
        None => {
            socket.bind(&SockAddr::unix(path)?).map_err(fail)?;
            // Ours from here: a failure below removes the file it made.
            let file = SocketFile::at(path).map_err(fail)?;
            socket.listen(backlog).map_err(fail)?;
            file
        }
        Some(mode) => bind_with_mode(&socket, path, backlog, mode).map_err(fail)?,
    };
    Ok((UnixListener::from(std::os::fd::OwnedFd::from(socket)), file))
}

/// Binds and listens at `path` with the permissions `mode`, with no moment in which the socket
/// is open to more users than `mode` allows. A chmod after binding at `path` would leave one: a
/// socket's permissions are its access control, and between the bind and the chmod it would
/// have the umask's. So the socket is bound inside a new directory that only this user can
/// enter (0700), given its mode there, made to listen, and only then linked at `path`: from the
/// first moment anyone else can reach it, it has its final mode. `link` rather than `rename`,
/// because `link` refuses to replace a file that appeared at `path` meanwhile.
fn bind_with_mode(socket: &Socket, path: &Path, backlog: i32, mode: u32) -> io::Result<SocketFile> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    // Beside `path`, so that the link stays on one file system; short, for sun_path's 108 bytes.
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let private = parent.join(format!(".taskserve-{}-{}", std::process::id(), unique()));
    fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inside = private.join("s");
    let bound = (|| {
        socket.bind(&SockAddr::unix(&inside)?)?;
        fs::set_permissions(&inside, fs::Permissions::from_mode(mode))?;
        socket.listen(backlog)?;
        fs::hard_link(&inside, path)
    })();
    // The socket stays bound to its inode; the private name and directory go either way.
    let _ = fs::remove_file(&inside);
    let _ = fs::remove_dir(&private);
    bound?;
    SocketFile::at(path)
}

/// A number no other call in this process returns, for a private directory's name.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Removes a socket file that nothing listens on any more, left by a server that crashed.
/// A live socket is an "address in use" error, and a file that is not a socket is left
/// alone: binding then fails on it.
fn remove_if_stale(path: &Path) -> io::Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(()); // nothing there
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a server is listening on it (Address in use)",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("removing stale socket file {}", path.display());
            fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
pub(super) fn peer_credentials(stream: &UnixStream) -> Option<PeerCredentials> {
    let cred = rustix::net::sockopt::socket_peercred(stream).ok()?;
    Some(PeerCredentials {
        uid: cred.uid.as_raw(),
        gid: cred.gid.as_raw(),
        pid: u32::try_from(cred.pid.as_raw_nonzero().get()).ok(),
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) fn peer_credentials(_stream: &UnixStream) -> Option<PeerCredentials> {
    None
}
