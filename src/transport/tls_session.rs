//! A TLS session over TCP on rustls's unbuffered API: the handshake, the session its handler
//! reads and writes, and its close, each stage with its own deadline.
//!
//! Why unbuffered: rustls's buffered connection keeps buffers of its own for the connection's
//! whole life (4 KiB at least for what it reads, whether anything comes or not), so an idle TLS
//! client cost several times a plain one. Here ciphertext is read into, and encrypted into,
//! buffers that belong to the worker thread, as the plain path's reads do: a connection keeps
//! only its TLS state, plus what is in flight between two polls (the start of a record whose
//! end has not come, a reply the socket had no room for, the rest of a record longer than the
//! handler's buffer), and nothing once that is gone.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use log::debug;
use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use smol::io::{AsyncRead, AsyncWrite};
use smol::{future, Async};

use super::tls::{noted_server_name, TlsConfig};
use super::tls_io::{Intent, Reached, Tls, INCOMING, MAX_ENCRYPT};
use crate::deadline::within;
use crate::info::{ConnectionInfo, TlsInfo, Transport};
use crate::logging::Peer;

/// The TLS handshake of one connection, within `timeout`: the stream then becomes the
/// decrypted session, `info` learns what was settled, and [`Closing`] ends the session once the
/// handler is done with it. `None`, with the reason logged at debug, when the client fails it,
/// sends something else, or takes too long.
pub(crate) async fn handshake(
    tcp: async_net::TcpStream,
    info: &mut ConnectionInfo,
    tls: &TlsConfig,
    timeout: Duration,
    peer: &Peer,
) -> Option<(TlsSession, Closing)> {
    let conn = match UnbufferedServerConnection::new(tls.current()) {
        Ok(conn) => conn,
        Err(e) => {
            debug!("{peer}: cannot start a TLS session: {e}");
            return None;
        }
    };
    let mut session = Box::new(Session::new(conn, tcp.into()));
    let handshake = future::poll_fn(|cx| session.poll_handshake(cx));
    if let Err(e) = within(timeout, "no handshake", handshake).await {
        debug!("{peer}: TLS handshake failed: {e}");
        return None;
    }
    let conn = &session.tls.conn;
    info.transport = Transport::Tls;
    info.tls = Some(TlsInfo {
        server_name: session.tls.server_name.take(),
        alpn_protocol: conn.alpn_protocol().map(<[u8]>::to_vec),
        client_subject: conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| subject(cert)),
    });
    let closing = Closing::default();
    let session = TlsSession {
        session: Some(session),
        closing: closing.clone(),
    };
    Some((session, closing))
}

/// A TLS session as its handler holds it. Dropped, it hands its stream back to the connection's
/// task ([`Closing::close`]), because ending a session takes more than a drop can do: what the
/// handler wrote last may still wait for room in the socket, and the client is owed a
/// close_notify. (A TCP socket needs none of this: after a close, the kernel sends what it
/// still holds.)
pub(crate) struct TlsSession {
    /// `Some` until dropped.
    session: Option<Box<Session>>,
    closing: Closing,
}

impl TlsSession {
    fn session(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("a TlsSession has its session until dropped")
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            *self
                .closing
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(session);
        }
    }
}

impl AsyncRead for TlsSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().session().poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().session().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().session().tls.poll_send_held(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().session().poll_close(cx)
    }
}

/// Where a [`TlsSession`] leaves its session when dropped, for the connection's task to end
/// it after the handler.
#[derive(Clone, Default)]
pub(crate) struct Closing(Arc<Mutex<Option<Box<Session>>>>);

impl Closing {
    /// Sends what is still held, then close_notify, and shuts the socket's sending side, within
    /// `timeout`: a client that reads nothing is not waited for longer. Nothing to do if the
    /// handler did not drop its session (it handed it to another task) or closed it already.
    pub(crate) async fn close(self, timeout: Duration, peer: &Peer) {
        let session = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut session) = session else {
            return;
        };
        if session.tls.missing_close_notify {
            debug!("{peer}: closed its socket without TLS close_notify, at a record's end: taken as its close");
        }
        let close = future::poll_fn(|cx| session.poll_close(cx));
        // An error means the client left first or did not read: nothing more to do for it.
        if let Err(e) = within(timeout, "not closed", close).await {
            debug!("{peer}: TLS close: {e}");
        }
    }
}

/// A certificate's subject as people write it: `CN=alice, O=Example`.
fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(cert.subject().to_string())
}

/// One connection's TLS session: rustls's state and the socket, and the ciphertext received
/// that rustls could not use yet.
pub(crate) struct Session {
    tls: Tls,
    /// The start of a record (or of a handshake message) whose end has not come; empty, with
    /// no allocation, between records.
    held_in: Vec<u8>,
}

impl Session {
    fn new(conn: UnbufferedServerConnection, socket: Arc<Async<TcpStream>>) -> Self {
        Session {
            tls: Tls::new(conn, socket),
            held_in: Vec::new(),
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let progress = self.poll_receive(cx, &mut Intent::Handshake);
        if let Some(name) = noted_server_name() {
            self.tls.server_name = name;
        }
        match ready!(progress)? {
            Reached::Done => {
                // The session tickets of TLS 1.3 follow the handshake: sent now if they fit,
                // else before the handler's first reply.
                let _ = self.tls.poll_send_held(cx);
                Poll::Ready(Ok(()))
            }
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client closed the TLS session during its handshake",
            ))),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Some(read) = self.tls.read_plaintext(buf) {
            return Poll::Ready(Ok(read));
        }
        let mut intent = Intent::Read { buf, filled: 0 };
        ready!(self.poll_receive(cx, &mut intent))?;
        let Intent::Read { filled, .. } = intent else {
            unreachable!("the intent stays a read")
        };
        Poll::Ready(Ok(filled))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // What was written before goes first; waiting for it is the backpressure that keeps a
        // client that does not read from holding more than one write.
        ready!(self.tls.poll_send_held(cx))?;
        let data = &data[..data.len().min(MAX_ENCRYPT)];
        self.run(&mut Intent::Write(data))?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.tls.close_notify_queued {
            self.tls.close_notify_queued = true;
            self.run(&mut Intent::CloseNotify)?;
        }
        ready!(self.tls.poll_send_held(cx))?;
        match self.tls.socket.get_ref().shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Runs rustls over the ciphertext held back, reading nothing from the socket: for what
    /// needs no bytes from the client (a write, close_notify).
    fn run(&mut self, intent: &mut Intent<'_>) -> io::Result<()> {
        let (used, reached) = self.tls.process(&mut self.held_in, intent)?;
        self.held_in.drain(..used);
        match reached {
            Reached::Done => Ok(()),
            Reached::Closed => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS session is closed",
            )),
            Reached::NeedData => Err(io::Error::other(
                "the TLS session needs the client's bytes to write (is its handshake over?)",
            )),
        }
    }

    /// Runs rustls, reading from the socket as it needs, until `intent` is done: in the worker
    /// thread's buffer, behind what the connection held back; what rustls could not use yet is
    /// held back again.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        intent: &mut Intent<'_>,
    ) -> Poll<io::Result<Reached>> {
        INCOMING.with_borrow_mut(|buf| {
            let mut len = self.held_in.len();
            if len > 0 {
                buf[..len].copy_from_slice(&self.held_in);
            }
            let progress = self.tls.poll_receive(cx, buf, &mut len, intent);
            if len == 0 {
                self.held_in = Vec::new();
            } else {
                self.held_in.clear();
                self.held_in.extend_from_slice(&buf[..len]);
            }
            progress
        })
    }
}
