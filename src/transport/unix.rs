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

pub(super) fn bind(path: &Path, backlog: u32) -> io::Result<(UnixListener, SocketFile)> {
    let fail =
        |e: io::Error| io::Error::new(e.kind(), format!("failed to bind {}: {e}", path.display()));
    remove_if_stale(path).map_err(fail)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(fail)?;
    socket.bind(&SockAddr::unix(path)?).map_err(fail)?;
    // Ours from here: a failure below removes the file it made.
    let meta = fs::symlink_metadata(path).map_err(fail)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        id: (meta.dev(), meta.ino()),
    };
    socket
        .listen(super::tcp::clamp_backlog(backlog))
        .map_err(fail)?;
    Ok((UnixListener::from(std::os::fd::OwnedFd::from(socket)), file))
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
