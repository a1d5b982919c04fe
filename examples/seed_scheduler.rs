//! The seed's scheduler itself, in Rust, on one thread: a queue of tasks, a poller in place of
//! `select()`, and the seed's echo server on it, answering each chunk with `GOT:` + the chunk.
//!
//! ```text
//! cargo run --example seed_scheduler                  # listens on 127.0.0.1:25003
//! cargo run --example seed_scheduler -- [ADDR]
//! nc localhost 25003                                  # in other terminals: type lines
//! ```
//!
//! A lesson, not the product: read it beside the seed and `docs/how-it-works.md`. A task is a
//! future instead of a generator. `yield 'recv', sock` is `sock.ready(Event::readable).await`:
//! the future leaves its waker in `waiting` (the seed's `recv_wait`) and returns `Pending`.
//! `select()` is `Poller::wait`, epoll on Linux: the poller under async-io. Waking a task puts
//! it back on `tasks`, as `tasks.append(recv_wait.pop(s))` does.
//!
//! The real server (`cargo run --bin echo`) adds N worker threads that steal tasks from each
//! other (async-executor), holds no buffer for an idle client, caps open connections, closes
//! idle ones, keeps a panicking handler to its own connection, backs off when out of file
//! descriptors, and stops gracefully.
//!
//! It does not use taskserve. Copied into a crate of your own, it needs:
//!
//! ```toml
//! [dependencies]
//! polling = "3"  # the poller under async-io: epoll on Linux
//! ```

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use polling::{AsRawSource, AsSource, Event, Events, Poller};

/// The seed's global state: the run queue, and the reactor standing in for `select()`.
///
/// Mutexes and atomics, though one thread runs everything: std's `Waker` may be sent to any
/// thread, so what it reaches must be thread-safe, and `stop` comes from another thread.
pub struct Scheduler {
    /// The seed's `tasks`: tasks ready to run, in order.
    tasks: Mutex<VecDeque<Arc<Task>>>,
    /// The seed's `recv_wait` and `send_wait`: the waker of the task waiting on each socket.
    waiting: Mutex<HashMap<usize, Waker>>,
    /// Tells which sockets are ready, as `select()` does: epoll on Linux, kqueue on macOS.
    poller: Poller,
    next_key: AtomicUsize,
    stopping: AtomicBool,
}

/// A task: the seed's generator, as a future that `run` polls until it is `Ready`.
struct Task {
    future: Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    scheduler: Arc<Scheduler>,
}

impl Wake for Task {
    /// Waking a task puts it back on the queue: `tasks.append(task)`.
    fn wake(self: Arc<Self>) {
        let scheduler = Arc::clone(&self.scheduler);
        scheduler.tasks.lock().unwrap().push_back(self);
    }
}

impl Scheduler {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Scheduler {
            tasks: Mutex::default(),
            waiting: Mutex::default(),
            poller: Poller::new()?,
            next_key: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        }))
    }

    /// Serves the seed's echo protocol on `listener` until [`Scheduler::stop`].
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.spawn(tcp_server(Async::new(listener, self)?, Arc::clone(self)));
        let result = self.run();
        // Drop every task, which closes its socket, as dropping async-executor's executor does.
        let queued = std::mem::take(&mut *self.tasks.lock().unwrap());
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap());
        drop((queued, waiting));
        result
    }

    /// Makes `serve` return, from any thread.
    pub fn stop(&self) {
        self.stopping.store(true, SeqCst);
        let _ = self.poller.notify(); // ends a `Poller::wait` in progress
    }

    fn spawn(self: &Arc<Self>, future: impl Future<Output = ()> + Send + 'static) {
        let future = Mutex::new(Some(Box::pin(future) as Pin<Box<_>>));
        let task = Arc::new(Task {
            future,
            scheduler: Arc::clone(self),
        });
        self.tasks.lock().unwrap().push_back(task);
    }

    /// The seed's `run()`.
    fn run(&self) -> io::Result<()> {
        let mut events = Events::new();
        while !self.stopping.load(SeqCst) {
            let task = self.tasks.lock().unwrap().pop_front();
            let Some(task) = task else {
                // Nothing to run: wait for the sockets that tasks wait on, as `select()` does.
                events.clear();
                self.poller.wait(&mut events, None)?;
                let mut waiting = self.waiting.lock().unwrap();
                for waker in events.iter().filter_map(|event| waiting.remove(&event.key)) {
                    waker.wake();
                }
                continue;
            };
            // `task.send(None)`: run the task until it waits or ends.
            let waker = Waker::from(Arc::clone(&task));
            let mut future = task.future.lock().unwrap();
            if let Some(f) = future.as_mut() {
                if f.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
                    *future = None; // the seed's `StopIteration`: dropping it closes its socket
                }
            }
        }
        Ok(())
    }
}

/// A non-blocking socket registered with the poller: async-io's `Async<T>`, in small.
struct Async<T: AsSource> {
    io: T,
    key: usize,
    scheduler: Arc<Scheduler>,
}

impl<T: AsSource> Async<T>
where
    for<'a> &'a T: AsRawSource,
{
    fn new(io: T, scheduler: &Arc<Scheduler>) -> io::Result<Self> {
        let key = scheduler.next_key.fetch_add(1, SeqCst);
        // SAFETY: `drop` deletes the socket from the poller before the socket is closed.
        unsafe { scheduler.poller.add(&io, Event::none(key))? };
        Ok(Async {
            io,
            key,
            scheduler: Arc::clone(scheduler),
        })
    }

    /// The seed's `yield 'recv', sock` (or `'send'`): completes once the socket is ready.
    async fn ready(&self, interest: fn(usize) -> Event) -> io::Result<()> {
        let mut asked = false;
        poll_fn(|cx| {
            let mut waiting = self.scheduler.waiting.lock().unwrap();
            if asked && !waiting.contains_key(&self.key) {
                return Poll::Ready(Ok(())); // `run` took our waker out to wake us: it is ready
            }
            if !asked {
                // One event, then the poller ignores the socket again (oneshot), as `pop` does.
                self.scheduler.poller.modify(&self.io, interest(self.key))?;
                asked = true;
            }
            waiting.insert(self.key, cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl<T: AsSource> Drop for Async<T> {
    fn drop(&mut self) {
        let _ = self.scheduler.poller.delete(&self.io);
    }
}

/// The seed's `tcp_server`: accepts clients and spawns a task for each.
async fn tcp_server(listener: Async<TcpListener>, scheduler: Arc<Scheduler>) {
    loop {
        if let Err(e) = listener.ready(Event::readable).await {
            return eprintln!("cannot wait for clients: {e}");
        }
        let accepted = listener.io.accept().and_then(|(client, addr)| {
            client.set_nonblocking(true)?;
            Ok((Async::new(client, &scheduler)?, addr))
        });
        match accepted {
            Ok((client, addr)) => scheduler.spawn(echo_handler(client, addr)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Out of file descriptors, this retries at once: taskserve backs off instead.
            Err(e) => eprintln!("accept failed: {e}"),
        }
    }
}

/// The seed's `echo_handler`, one change: a reply is sent in full, though `send` may take part.
async fn echo_handler(client: Async<TcpStream>, addr: SocketAddr) {
    println!("Connection from {addr}");
    if let Err(e) = echo(&client).await {
        println!("{addr}: {e}");
    }
    println!("Connection closed: {addr}");
}

async fn echo(client: &Async<TcpStream>) -> io::Result<()> {
    let mut data = [0; 1000];
    loop {
        client.ready(Event::readable).await?;
        let n = match (&client.io).read(&mut data) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let reply = [b"GOT:", &data[..n]].concat();
        let mut sent = 0;
        // While a client does not read, this loop waits, and nothing more is read from it.
        while sent < reply.len() {
            client.ready(Event::writable).await?;
            match (&client.io).write(&reply[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn main() -> ExitCode {
    let addr = std::env::args().nth(1);
    let addr = addr.as_deref().unwrap_or("127.0.0.1:25003");
    let served = TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("failed to bind {addr}: {e}")))
        .and_then(|listener| Scheduler::new()?.serve(listener));
    if let Err(e) = served {
        eprintln!("seed_scheduler: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
