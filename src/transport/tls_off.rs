//! TLS with the `tls` feature off: the same names as `tls.rs`, as types that have no values.
//! No TLS listener can be asked for (`Builder::listen_tls` is not there), so the code that
//! handles TLS compiles unchanged and its TLS branches cannot be reached.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use smol::io::{AsyncRead, AsyncWrite};

use crate::info::ConnectionInfo;
use crate::logging::Peer;

/// A TLS configuration, of which there is none without the `tls` feature.
#[derive(Debug, Clone)]
pub(crate) enum TlsConfig {}

impl TlsConfig {
    pub(crate) fn reload(&self) -> io::Result<()> {
        match *self {}
    }
}

/// A TLS session, of which there is none without the `tls` feature.
pub(crate) enum TlsSession {}

/// The end of a TLS session, of which there is none without the `tls` feature.
pub(crate) enum Closing {}

impl Closing {
    pub(crate) async fn close(self, _: Duration, _: &Peer) {
        match self {}
    }
}

pub(crate) async fn handshake(
    _: async_net::TcpStream,
    _: &mut ConnectionInfo,
    tls: &TlsConfig,
    _: Duration,
    _: &Peer,
) -> Option<(TlsSession, Closing)> {
    match *tls {}
}

impl AsyncRead for TlsSession {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match *self {}
    }
}

impl AsyncWrite for TlsSession {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        match *self {}
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self {}
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self {}
    }
}
