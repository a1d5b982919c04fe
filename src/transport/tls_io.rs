//! One TLS session's records to and from its socket: rustls's unbuffered state machine, fed
//! from and encrypting into buffers that belong to the worker thread (see `tls_session`, which
//! drives it for the handshake, the handler and the close).

use std::cell::RefCell;
use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, ReadTraffic, UnbufferedStatus, WriteTraffic,
};
use smol::Async;

use super::tcp::{recv, send, ReadableWait};

/// The most one read from the socket takes: a loopback segment holds up to 64 KiB.
const SOCKET_READ: usize = 64 * 1024;

/// The most ciphertext a connection may leave unprocessed: the start of a record (18,437 bytes
/// at most) or of a handshake message, which rustls joins across records and takes up to
/// 64 KiB of.
const MAX_HELD: usize = 96 * 1024;

/// The most plaintext one write encrypts: five full records, so that a reply made of a 64 KiB
/// read and a few bytes more (`GOT:` and a chunk) is taken by one write.
pub(super) const MAX_ENCRYPT: usize = 80 * 1024;

/// Room for [`MAX_ENCRYPT`] bytes encrypted: each record adds at most 29 bytes (a header, an
/// explicit nonce with TLS 1.2, a tag).
const ENCRYPTED_ROOM: usize = MAX_ENCRYPT + 4 * 1024;

thread_local! {
    /// What the connection held back, then what the socket gave: rustls reads it in place.
    pub(super) static INCOMING: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_HELD + SOCKET_READ].into());
    /// Where a write is encrypted before it goes to the socket.
    static OUTGOING: RefCell<Box<[u8]>> = RefCell::new(vec![0; ENCRYPTED_ROOM].into());
}

/// Everything of a session but the ciphertext held back, which is lent to rustls apart.
pub(super) struct Tls {
    pub(super) conn: UnbufferedServerConnection,
    pub(super) socket: Arc<Async<TcpStream>>,
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
    pub(super) server_name: Option<String>,
    /// The last read from the socket was short, so the socket is drained: wait for it to be
    /// readable rather than pay a read that would only say "would block".
    drained: bool,
    readable: ReadableWait,
    /// rustls has processed every byte received and needs more to go on.
    wants_bytes: bool,
    /// The client closed its sending side (a read returned 0).
    eof: bool,
    /// The client sent close_notify.
    peer_closed: bool,
    pub(super) close_notify_queued: bool,
    /// The client closed its socket without close_notify, at a record's end, and that was
    /// taken as its close.
    pub(super) missing_close_notify: bool,
}

/// What a call into rustls is for.
pub(super) enum Intent<'a> {
    Handshake,
    Read { buf: &'a mut [u8], filled: usize },
    Write(&'a [u8]),
    CloseNotify,
}

/// Where a call into rustls stopped.
#[derive(Debug, PartialEq)]
pub(super) enum Reached {
    /// What the intent asked for is done.
    Done,
    /// rustls needs more bytes from the client first.
    NeedData,
    /// Both sides have sent close_notify.
    Closed,
}

impl Tls {
    pub(super) fn new(conn: UnbufferedServerConnection, socket: Arc<Async<TcpStream>>) -> Self {
        Tls {
            conn,
            socket,
            held_out: Vec::new(),
            held_out_sent: 0,
            plaintext: Vec::new(),
            plaintext_read: 0,
            server_name: None,
            drained: false,
            readable: ReadableWait::default(),
            wants_bytes: false,
            eof: false,
            peer_closed: false,
            close_notify_queued: false,
            missing_close_notify: false,
        }
    }

    /// Copies plaintext decrypted earlier into `buf`; `None` if there is none.
    pub(super) fn read_plaintext(&mut self, buf: &mut [u8]) -> Option<usize> {
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
    pub(super) fn poll_receive(
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
                if used > 0 && used < *len {
                    buf.copy_within(used..*len, 0);
                }
                *len -= used;
                if reached != Reached::NeedData {
                    // A read that used every byte received leaves rustls nothing to do until
                    // more come (the records it read were all application data, or it would
                    // still hold some), so the next read starts at the socket: one call into
                    // rustls a request fewer.
                    self.wants_bytes = reached == Reached::Done
                        && *len == 0
                        && matches!(intent, Intent::Read { .. })
                        && !self.peer_closed;
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
                ready!(self.readable.poll(&self.socket, cx))?;
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
    pub(super) fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    pub(super) fn process(
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
                ConnectionState::ReadTraffic(records) => {
                    used += read_records(records, &mut self.plaintext, intent)?;
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
                ConnectionState::WriteTraffic(traffic) => Some(write_traffic(
                    traffic,
                    intent,
                    &mut self.held_out,
                    &self.socket,
                    self.peer_closed,
                )?),
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

/// Hands each decrypted record to the reader, as much as its buffer takes, and keeps the rest.
/// Returns the bytes to discard beyond what rustls's status said.
fn read_records<D>(
    mut records: ReadTraffic<'_, '_, D>,
    plaintext: &mut Vec<u8>,
    intent: &mut Intent<'_>,
) -> io::Result<usize> {
    let mut discard = 0;
    while let Some(record) = records.next_record() {
        let record = record.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        discard += record.discard;
        deliver(plaintext, record.payload, intent);
    }
    Ok(discard)
}

/// What `intent` comes to once rustls may send application data: the handshake is waiting for
/// the client, a read for its bytes (or done), a write or close_notify is encrypted and sent.
fn write_traffic<D>(
    mut traffic: WriteTraffic<'_, D>,
    intent: &mut Intent<'_>,
    held_out: &mut Vec<u8>,
    socket: &Async<TcpStream>,
    peer_closed: bool,
) -> io::Result<Reached> {
    Ok(match intent {
        Intent::Handshake => Reached::NeedData,
        Intent::Read { filled, .. } if *filled > 0 || peer_closed => Reached::Done,
        Intent::Read { .. } => Reached::NeedData,
        Intent::Write(data) => {
            encrypt_and_send(held_out, socket, |out| {
                traffic.encrypt(data, out).map_err(encrypt_error)
            })?;
            Reached::Done
        }
        Intent::CloseNotify => {
            append(held_out, |out| {
                traffic.queue_close_notify(out).map_err(encrypt_error)
            })?;
            Reached::Done
        }
    })
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
