//! The worker threads: each runs the server's one executor, stealing work from the others, until
//! the server releases them.

use std::io;
use std::sync::Arc;
use std::thread;

use async_executor::Executor;
use smol::channel;

use crate::stop::Lifecycle;

/// Starts `threads` workers on `executor`, each running it until `released` closes. On a failure
/// the workers started so far are returned with the error, for the caller to stop.
pub(super) fn spawn(
    threads: usize,
    executor: &Arc<Executor<'static>>,
    lifecycle: &Arc<Lifecycle>,
    released: &channel::Receiver<()>,
    workers: &mut Vec<thread::JoinHandle<()>>,
) -> io::Result<()> {
    for n in 0..threads {
        // Linux keeps 15 bytes of a thread name: `taskserve-worker-N` would lose its number.
        let name = format!("taskserve-w{n}");
        let (executor, released) = (Arc::clone(executor), released.clone());
        let lifecycle = Arc::clone(lifecycle);
        let worker = thread::Builder::new()
            .name(name.clone())
            .spawn(move || run_worker(&executor, &lifecycle, released))
            .map_err(|e| io::Error::new(e.kind(), format!("failed to start {name}: {e}")))?;
        workers.push(worker);
    }
    Ok(())
}

/// One worker thread: runs the shared executor until the server releases it.
///
/// `smol::block_on` (async-io's) lets an idle worker wait on the reactor itself, instead of every
/// I/O event hopping through async-io's helper thread. A panicking task does not unwind into
/// here: async-executor keeps a task's panic in the task, and connection tasks log it first.
fn run_worker(
    executor: &Executor<'static>,
    lifecycle: &Arc<Lifecycle>,
    released: channel::Receiver<()>,
) {
    WORKER_OF.set(Arc::as_ptr(lifecycle) as usize);
    // `recv` fails once the server drops the sender: that is the signal to return.
    let _ = smol::block_on(executor.run(released.recv()));
}

thread_local! {
    /// On a worker thread, the address of its server's [`Lifecycle`]: a worker must not wait for
    /// its own server to stop, since the stop joins it.
    static WORKER_OF: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

pub(super) fn on_worker_of(lifecycle: &Arc<Lifecycle>) -> bool {
    WORKER_OF.get() == Arc::as_ptr(lifecycle) as usize
}
