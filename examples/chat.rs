//! A chat room: each line one client sends reaches every other client, prefixed with the
//! sender's address, and everyone hears who joins and leaves. Shows state shared by connection
//! tasks that run on several threads.
//!
//! ```text
//! cargo run --example chat                            # listens on 127.0.0.1:25002
//! cargo run --example chat -- [ADDR]
//! nc localhost 25002                                  # in two or more other terminals
//! ```
//!
//! The library's default idle timeout applies: a client that neither sends nor receives
//! anything for 300 seconds (it stopped reading, or the room is silent) is disconnected. When
//! the server stops (Ctrl-C), every client is told `server shutting down` before it is closed.
//!
//! Copied into a crate of your own, it needs these beside `taskserve`:
//!
//! ```toml
//! [dependencies]
//! env_logger = { version = "0.11", default-features = false }  # the log on stderr
//! smol = "2"  # a channel per client, and racing futures with `or`
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use smol::channel::{self, Sender};
use smol::future::FutureExt;
use taskserve::io::{self, AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use taskserve::{Addr, Connection};

/// Messages waiting for one client before it starts missing some (see `Room::broadcast`).
const QUEUE: usize = 64;
/// The most bytes read as one line; a longer line is passed on in pieces.
const MAX_LINE: u64 = 4096;

/// Everyone in the room, each with the queue of messages their task writes to them.
#[derive(Default)]
pub struct Room(Mutex<HashMap<Addr, Sender<Arc<str>>>>);

impl Room {
    fn members(&self) -> MutexGuard<'_, HashMap<Addr, Sender<Arc<str>>>> {
        // Nothing panics while holding the lock, and the map stays sound even if something did.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many are in the room. (For tests/examples.rs, which waits for its clients to join.)
    pub fn headcount(&self) -> usize {
        self.members().len()
    }

    /// Queues `message` for everyone but `from`, without waiting for anyone.
    fn broadcast(&self, from: &Addr, message: String) {
        let message = Arc::<str>::from(message);
        for (_, queue) in self.members().iter().filter(|(peer, _)| *peer != from) {
            // A full queue means that client reads slower than the room talks: it misses this
            // message rather than hold up everyone. A closed one means it is leaving right now.
            let _ = queue.try_send(Arc::clone(&message));
        }
    }
}

/// A client's place in the room. Leaving is in `drop`, so it happens however the connection
/// ends, even when the server cancels the task (idle timeout, stop) and no code after an
/// `.await` runs.
struct Member(Arc<Room>, Addr);

impl Drop for Member {
    fn drop(&mut self) {
        let Member(room, peer) = self;
        room.members().remove(peer);
        room.broadcast(peer, format!("{peer} left\n"));
    }
}

/// One client: its lines go to the room, and the room's messages go back to it, until either
/// side ends or the server stops.
/// (`pub` for tests/examples.rs, which serves it in-process.)
pub async fn chat(room: Arc<Room>, conn: Connection) -> io::Result<()> {
    let peer = conn.peer_addr();
    let stop = conn.stop_handle().clone();
    // Two halves, so that one task can wait for a line while it writes the room's messages.
    let (reader, mut writer) = io::split(conn);
    let (queue, messages) = channel::bounded(QUEUE);
    room.members().insert(peer.clone(), queue);
    let _member = Member(Arc::clone(&room), peer.clone());
    room.broadcast(&peer, format!("{peer} joined\n"));
    let read_lines = async {
        let (mut reader, mut line) = (BufReader::new(reader), Vec::new());
        while read_line(&mut reader, &mut line).await? > 0 {
            // Clients send any bytes they like: invalid UTF-8 becomes U+FFFD, not an error.
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            room.broadcast(&peer, format!("{peer}: {text}\n"));
        }
        Ok(()) // the client closed its side
    };
    let write_messages = async {
        while let Ok(message) = messages.recv().await {
            writer.write_all(message.as_bytes()).await?;
        }
        Ok(())
    };
    let server_stops = async {
        stop.stopping().await;
        Err(io::Error::other("server shutting down"))
    };
    // Whichever ends first (the client hung up, a write failed, the server stops) ends the rest.
    match read_lines.or(write_messages).or(server_stops).await {
        Err(e) if stop.is_stopping() => {
            // A goodbye, rather than a connection that just drops.
            writer.write_all(format!("{e}\n").as_bytes()).await?;
            writer.close().await
        }
        ended => ended,
    }
}

/// Reads the next line into `line`, or its first `MAX_LINE` bytes, so that a client cannot make
/// the server buffer an endless line. Returns 0 at the end of the stream.
async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> io::Result<usize> {
    line.clear();
    reader.take(MAX_LINE).read_until(b'\n', line).await
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let addr = std::env::args().nth(1);
    let room = Arc::new(Room::default());
    let handler = move |conn| chat(Arc::clone(&room), conn);
    // Four worker threads: tasks of one room really do run in parallel, hence the mutex.
    let server = taskserve::Server::builder().threads(4);
    if let Err(e) = server
        .listen_tcp(addr.as_deref().unwrap_or("127.0.0.1:25002"))
        .serve(handler)
    {
        eprintln!("chat: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
