//! The session workers: a few threads, each running its own single-threaded
//! Tokio runtime with its own epoll. The accept loops run on the first worker
//! and hand every admitted connection to the least-loaded worker (itself
//! included, then with no hand-off at all), and the session lives there to the
//! end: its client socket, its upstream socket, its TLS state and its timers
//! are all touched by one thread. (A pooled server session outlives its client;
//! its socket moves to the worker of its next client: `upstream::NodeSocket`.)
//!
//! Why the accept loops are not on the control runtime: a hand-off costs a
//! thread wake-up and two `epoll_ctl` per connection. Measured on 2 cores (one
//! worker, `pgbench -C -S`, 4 clients, pooled): 6.9 → 5.9 scheduler slices and
//! about 10 % less proxy CPU per connection.
//!
//! Why not one work-stealing runtime: a relay's work is a few syscalls per
//! message, and on a busy host a multi-threaded scheduler adds cross-thread
//! wake-ups (futex) and migrations to every message. Measured on 2 cores
//! (pgbench -S, 8 clients): ~0.4 futex calls per transaction and about 10 %
//! more proxy CPU than one thread that owns its sessions.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How long a worker's runtime waits for its blocking tasks when it stops.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// One worker thread and its runtime.
struct Worker {
    handle: Handle,
    thread_id: ThreadId,
    /// Sessions living on this worker.
    load: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The pool of session workers. Dropping it stops the workers (their runtimes
/// drop whatever tasks are left) and joins the threads.
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
    stop: CancellationToken,
}

/// A worker's share of the load, held by a session; released on drop.
#[derive(Debug)]
pub struct Assignment(Arc<AtomicUsize>);

impl Drop for Assignment {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Workers {
    /// Starts `count` (at least one) worker threads.
    ///
    /// # Errors
    /// When a runtime or a thread cannot be created.
    pub fn start(count: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stopped = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sqlgate-w{index}"))
                .spawn(move || {
                    runtime.block_on(stopped.cancelled());
                    // Ends the runtime here, on its own thread: what is left
                    // (nothing, after a drain) is cancelled, and a blocking
                    // task that hangs (a stuck DNS lookup) is abandoned after
                    // a bound instead of holding the exit.
                    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
                })?;
            workers.push(Worker {
                handle,
                thread_id: thread.thread().id(),
                load: Arc::new(AtomicUsize::new(0)),
                thread: Some(thread),
            });
        }
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The first worker: the accept loops run there (a session it takes
    /// stays on the thread that accepted it: no hand-off).
    pub fn first(&self) -> Placement {
        self.workers[0].placement()
    }

    /// The least-loaded worker (ties broken round-robin) and a share of its
    /// load for the session to hold.
    pub fn assign(&self) -> (Placement, Assignment) {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best = start % n;
        let mut best_load = usize::MAX;
        for i in 0..n {
            let at = (start + i) % n;
            let load = self.workers[at].load.load(Ordering::Acquire);
            if load < best_load {
                best = at;
                best_load = load;
            }
        }
        let worker = &self.workers[best];
        worker.load.fetch_add(1, Ordering::AcqRel);
        (worker.placement(), Assignment(Arc::clone(&worker.load)))
    }
}

/// Where a task runs: a worker's runtime, and its thread.
#[derive(Debug, Clone)]
pub struct Placement {
    pub handle: Handle,
    thread_id: ThreadId,
}

impl Placement {
    /// Whether the caller runs on this worker's thread (its runtime).
    pub fn is_current(&self) -> bool {
        std::thread::current().id() == self.thread_id
    }
}

impl Worker {
    fn placement(&self) -> Placement {
        Placement {
            handle: self.handle.clone(),
            thread_id: self.thread_id,
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for worker in &mut self.workers {
            // The last owner may be a task on a worker (an accept loop whose
            // runtime is being dropped): a thread cannot join itself.
            if let Some(thread) = worker.thread.take()
                && thread.thread().id() != std::thread::current().id()
                && thread.join().is_err()
            {
                tracing::error!("a session worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigns_to_the_least_loaded_worker() {
        let workers = Workers::start(3).expect("workers");
        assert_eq!(workers.len(), 3);
        let held: Vec<_> = (0..6).map(|_| workers.assign().1).collect();
        let loads: Vec<_> = workers
            .workers
            .iter()
            .map(|w| w.load.load(Ordering::Acquire))
            .collect();
        assert_eq!(loads, vec![2, 2, 2], "six sessions spread evenly");
        drop(held);
        assert!(
            workers
                .workers
                .iter()
                .all(|w| w.load.load(Ordering::Acquire) == 0),
            "loads are released when sessions end"
        );
    }

    #[test]
    fn runs_tasks_on_worker_threads_and_stops_on_drop() {
        let workers = Workers::start(2).expect("workers");
        let (placement, _share) = workers.assign();
        assert!(!placement.is_current(), "the test thread is no worker");
        let name = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let seen = Arc::clone(&name);
        let (tx, rx) = std::sync::mpsc::channel();
        let there = placement.clone();
        placement.handle.spawn(async move {
            *seen.lock().expect("lock") = std::thread::current().name().unwrap_or("").to_owned();
            let _ = tx.send(there.is_current());
        });
        let current = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("task ran");
        assert!(current, "a task on a worker is on that worker's thread");
        assert!(name.lock().expect("lock").starts_with("sqlgate-w"));
        drop(workers); // joins; a hang here fails the test by timeout
    }
}
