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

use std::cell::RefCell;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use log::debug;
use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use smol::io::{AsyncRead, AsyncWrite};
use smol::{future, Async};

use super::tcp::{recv, send};
use super::tls::{noted_server_name, TlsConfig};
use crate::deadline::within;
use crate::info::{ConnectionInfo, TlsInfo, Transport};
use crate::logging::Peer;

/// The most one read from the socket takes: a loopback segment holds up to 64 KiB.
const SOCKET_READ: usize = 64 * 1024;

/// The most ciphertext a connection may leave unprocessed: the start of a record (18,437 bytes
/// at most) or of a handshake message, which rustls joins across records and takes up to
/// 64 KiB of.
const MAX_HELD: usize = 96 * 1024;

/// The most plaintext one write encrypts: five full records, so that a reply made of a 64 KiB
/// read and a few bytes more (`GOT:` and a chunk) is taken by one write.
const MAX_ENCRYPT: usize = 80 * 1024;

/// Room for [`MAX_ENCRYPT`] bytes encrypted: each record adds at most 29 bytes (a header, an
/// explicit nonce with TLS 1.2, a tag).
const ENCRYPTED_ROOM: usize = MAX_ENCRYPT + 4 * 1024;

thread_local! {
    /// What the connection held back, then what the socket gave: rustls reads it in place.
    static INCOMING: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_HELD + SOCKET_READ].into());
    /// Where a write is encrypted before it goes to the socket.
    static OUTGOING: RefCell<Box<[u8]>> = RefCell::new(vec![0; ENCRYPTED_ROOM].into());
}

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

/// Everything of a session but the ciphertext held back, which is lent to rustls apart.
struct Tls {
    conn: UnbufferedServerConnection,
    socket: Arc<Async<TcpStream>>,
    /// Ciphertext for the client that the socket has not taken yet, sent before anything
    /// newer: a handshake flight, an alert, or the part of a write the socket had no room for.
    held_out: Vec<u8>,
    /// How much of `held_out` is sent.
    held_out_sent: usize,
    /// Plaintext decrypted but not read yet: the rest of a record longer than a read's buffer.
    plaintext: Vec<u8>,
    /// How much of `plaintext` is read.
    plaintext_read: usize,
    /// The server name the client asked for, until the handshake is over.
    server_name: Option<String>,
    /// The last read from the socket was short, so the socket is drained: wait for it to be
    /// readable rather than pay a read that would only say "would block".
    drained: bool,
    /// rustls has processed every byte received and needs more to go on.
    wants_bytes: bool,
    /// The client closed its sending side (a read returned 0).
    eof: bool,
    /// The client sent close_notify.
    peer_closed: bool,
    close_notify_queued: bool,
    /// The client closed its socket without close_notify, at a record's end, and that was
    /// taken as its close.
    missing_close_notify: bool,
}

/// What a call into rustls is for.
enum Intent<'a> {
    Handshake,
    Read { buf: &'a mut [u8], filled: usize },
    Write(&'a [u8]),
    CloseNotify,
}

/// Where a call into rustls stopped.
#[derive(Debug, PartialEq)]
enum Reached {
    /// What the intent asked for is done.
    Done,
    /// rustls needs more bytes from the client first.
    NeedData,
    /// Both sides have sent close_notify.
    Closed,
}

impl Session {
    fn new(conn: UnbufferedServerConnection, socket: Arc<Async<TcpStream>>) -> Self {
        Session {
            tls: Tls {
                conn,
                socket,
                held_out: Vec::new(),
                held_out_sent: 0,
                plaintext: Vec::new(),
                plaintext_read: 0,
                server_name: None,
                drained: false,
                wants_bytes: false,
                eof: false,
                peer_closed: false,
                close_notify_queued: false,
                missing_close_notify: false,
            },
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
            buf[..len].copy_from_slice(&self.held_in);
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

impl Tls {
    /// Copies plaintext decrypted earlier into `buf`; `None` if there is none.
    fn read_plaintext(&mut self, buf: &mut [u8]) -> Option<usize> {
        let rest = &self.plaintext[self.plaintext_read..];
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.plaintext_read += n;
        if self.plaintext_read == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_read = 0;
        }
        Some(n)
    }

    /// Processes `buf[..len]`, reading more from the socket behind it as rustls needs, until
    /// `intent` is done. Leaves in `buf[..len]` what rustls could not use yet.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        len: &mut usize,
        intent: &mut Intent<'_>,
    ) -> Poll<io::Result<Reached>> {
        loop {
            // Once rustls has said it needs more bytes, asking it again before they come would
            // only get the same answer: a wait for data starts with the read.
            if !self.wants_bytes {
                let (used, reached) = self.process(&mut buf[..*len], intent)?;
                buf.copy_within(used..*len, 0);
                *len -= used;
                if reached != Reached::NeedData {
                    return Poll::Ready(Ok(reached));
                }
                self.wants_bytes = true;
            }
            // A handshake flight must be out before the client can answer it. If the socket
            // has no room, its writability wakes this task too.
            if let Poll::Ready(Err(e)) = self.poll_send_held(cx) {
                return Poll::Ready(Err(e));
            }
            if self.eof {
                return Poll::Ready(self.ended(*len, intent));
            }
            if *len == buf.len() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a TLS message larger than 96 KiB",
                )));
            }
            let end = buf.len().min(*len + SOCKET_READ);
            let read = ready!(self.poll_recv(cx, &mut buf[*len..end]))?;
            *len += read;
            self.wants_bytes = read == 0;
        }
    }

    /// Reads what the socket has into `buf`; 0 at its end.
    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            if self.drained {
                ready!(self.socket.poll_readable(cx))?;
                self.drained = false;
            }
            match recv(self.socket.get_ref(), buf) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Ok(0));
                }
                Ok(read) => {
                    // A short read means the socket is drained (the hint tokio uses too).
                    self.drained = read < buf.len();
                    return Poll::Ready(Ok(read));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.drained = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// What the end of the client's stream means, `held` bytes into a record.
    fn ended(&mut self, held: usize, intent: &Intent<'_>) -> io::Result<Reached> {
        match intent {
            Intent::Read { .. } if held == 0 => {
                // Closed at a record's end without close_notify: the client only skipped the
                // courtesy, as many do (Go's crypto/tls takes it as a close too).
                self.missing_close_notify = true;
                Ok(Reached::Done)
            }
            Intent::Read { .. } => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed in the middle of a TLS record, without close_notify: what it sent was cut short",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the TLS handshake",
            )),
        }
    }

    /// Sends what is held for the client, until the socket takes all of it.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held_out_sent < self.held_out.len() {
            match send(self.socket.get_ref(), &self.held_out[self.held_out_sent..]) {
                Ok(sent) => self.held_out_sent += sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.socket.poll_writable(cx))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.held_out = Vec::new();
        self.held_out_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Hands `incoming` to rustls until `intent` is done or rustls needs more bytes. Returns
    /// how many bytes at the front of `incoming` rustls is done with.
    fn process(
        &mut self,
        incoming: &mut [u8],
        intent: &mut Intent<'_>,
    ) -> io::Result<(usize, Reached)> {
        let mut used = 0;
        loop {
            if let Intent::Read { buf, filled } = intent {
                if *filled == buf.len() {
                    return Ok((used, Reached::Done));
                }
            }
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut incoming[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.send_alert(&mut incoming[used + discard..]);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            };
            let reached = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record =
                            record.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        used += record.discard;
                        deliver(&mut self.plaintext, record.payload, intent);
                    }
                    // A read that got its bytes and left none behind is done: asking rustls
                    // again would only say it needs more.
                    let rest = incoming.len() - used - discard;
                    match intent {
                        Intent::Read { filled, .. } if *filled > 0 && rest == 0 => {
                            Some(Reached::Done)
                        }
                        _ => None,
                    }
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append(&mut self.held_out, |out| {
                        data.encode(out).map_err(encode_error)
                    })?;
                    None
                }
                // Sent from `held_out`, before anything newer.
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Reached::NeedData),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Reached::Closed),
                ConnectionState::WriteTraffic(mut traffic) => Some(match intent {
                    Intent::Handshake => Reached::NeedData,
                    Intent::Read { filled, .. } if *filled > 0 || self.peer_closed => Reached::Done,
                    Intent::Read { .. } => Reached::NeedData,
                    Intent::Write(data) => {
                        let (held, socket) = (&mut self.held_out, &self.socket);
                        encrypt_and_send(held, socket, |out| {
                            traffic.encrypt(data, out).map_err(encrypt_error)
                        })?;
                        Reached::Done
                    }
                    Intent::CloseNotify => {
                        append(&mut self.held_out, |out| {
                            traffic.queue_close_notify(out).map_err(encrypt_error)
                        })?;
                        Reached::Done
                    }
                }),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS early data",
                    ))
                }
            };
            used += discard;
            match reached {
                // The handshake is over once rustls has the client's Finished; it lets the
                // server write earlier, right after its own flight.
                Some(Reached::NeedData)
                    if matches!(intent, Intent::Handshake) && !self.conn.is_handshaking() =>
                {
                    return Ok((used, Reached::Done))
                }
                Some(reached) => return Ok((used, reached)),
                None => {}
            }
        }
    }

    /// After rustls failed the session, sends the alert it has for the client, if the socket
    /// takes it at once: the session ends either way. `incoming` is what rustls left of the
    /// bytes it failed on, which it may still point into. Asked once: rustls hands out the
    /// alert it queued as it failed; asked again, it would read the same bytes, fail again and
    /// queue a second fatal alert (which its debug builds assert never happens: the
    /// connection's task panicked on any garbage sent to a TLS port).
    fn send_alert(&mut self, incoming: &mut [u8]) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut data)) = state {
            // Ignored, as the send below: the session ends anyway.
            let _ = append(&mut self.held_out, |out| {
                data.encode(out).map_err(encode_error)
            });
        }
        let held = &self.held_out[self.held_out_sent..];
        if !held.is_empty() {
            // Ignored: the client may be gone, and the session ends anyway.
            let _ = send(self.socket.get_ref(), held);
        }
    }
}

/// Gives a decrypted record to the reader, as much as its buffer takes, and keeps the rest.
fn deliver(plaintext: &mut Vec<u8>, payload: &[u8], intent: &mut Intent<'_>) {
    let rest = match intent {
        Intent::Read { buf, filled } => {
            let n = payload.len().min(buf.len() - *filled);
            buf[*filled..*filled + n].copy_from_slice(&payload[..n]);
            *filled += n;
            &payload[n..]
        }
        _ => payload,
    };
    plaintext.extend_from_slice(rest);
}

/// rustls's answer to a buffer that is too small: the size it needs.
type Encoded = Result<usize, EncodeFailed>;

enum EncodeFailed {
    NeedRoom(usize),
    Other(io::Error),
}

fn encode_error(e: EncodeError) -> EncodeFailed {
    match e {
        EncodeError::InsufficientSize(size) => EncodeFailed::NeedRoom(size.required_size),
        e => EncodeFailed::Other(io::Error::other(e)),
    }
}

fn encrypt_error(e: EncryptError) -> EncodeFailed {
    match e {
        EncryptError::InsufficientSize(size) => EncodeFailed::NeedRoom(size.required_size),
        e => EncodeFailed::Other(io::Error::other(e)),
    }
}

/// Encodes with `encode` at the end of `held`, growing it to the size `encode` asks for.
fn append(held: &mut Vec<u8>, mut encode: impl FnMut(&mut [u8]) -> Encoded) -> io::Result<()> {
    let need = match encode(&mut []) {
        Ok(_) => return Ok(()),
        Err(EncodeFailed::NeedRoom(need)) => need,
        Err(EncodeFailed::Other(e)) => return Err(e),
    };
    let start = held.len();
    held.resize(start + need, 0);
    match encode(&mut held[start..]) {
        Ok(written) => {
            held.truncate(start + written);
            Ok(())
        }
        Err(EncodeFailed::NeedRoom(_)) => Err(io::Error::other("TLS record larger than asked")),
        Err(EncodeFailed::Other(e)) => Err(e),
    }
}

/// Encrypts with `encrypt` into the worker thread's buffer and sends it at once: the socket
/// usually takes all of it, and only what it does not is copied, into `held`. Behind anything
/// already held, it is held too, to keep the order.
fn encrypt_and_send(
    held: &mut Vec<u8>,
    socket: &Async<TcpStream>,
    mut encrypt: impl FnMut(&mut [u8]) -> Encoded,
) -> io::Result<()> {
    if !held.is_empty() {
        return append(held, encrypt);
    }
    OUTGOING.with_borrow_mut(|out| {
        let len = match encrypt(out) {
            Ok(len) => len,
            Err(EncodeFailed::NeedRoom(_)) => return append(held, encrypt),
            Err(EncodeFailed::Other(e)) => return Err(e),
        };
        let mut sent = 0;
        while sent < len {
            match send(socket.get_ref(), &out[sent..len]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        held.extend_from_slice(&out[sent..len]);
        Ok(())
    })
}
