//! [`Pool`]: a fixed set of worker processes that run tasks, with Python's `Pool` methods.

use crate::chunk::{ChunkSpec, Chunking, encode_chunk, skip_args};
use crate::error::{Error, ErrorKind};
use crate::imap::IMap;
use crate::protocol::DEFAULT_MAX_FRAME_LEN;
use crate::registry::Registry;
use crate::result::{AsyncResult, CallState, collect_in_order};
use crate::sched::{CallSink, Shared};
use crate::slot::{Slot, SlotConfig};
use crate::spawn::{Initializer, SpawnOptions};
use crate::task::{Task, UnaryTask};
use crate::worker;
use serde::Serialize;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// A pool of worker processes.
///
/// Each worker is this executable, started again and handed to `#[multiproc::main]`, which
/// serves tasks instead of running `main`'s body. Work is cut into chunks that idle workers
/// pull. A task's panic is an error for that item only; the pool keeps working.
///
/// Dropping a pool **terminates** it, like leaving Python's `with Pool(...)` block: workers
/// are killed at once, and work still queued or running resolves to an error of kind
/// [`ErrorKind::Closed`]. Outcomes that already arrived stay readable. Drop never waits on
/// a task, so it never hangs. To let queued work finish first, call [`close`](Pool::close)
/// then [`join`](Pool::join).
///
/// # Examples
///
/// ```rust,standalone_crate
/// use multiproc::{task, Pool};
///
/// #[task]
/// fn square(x: u64) -> u64 { x * x }
///
/// #[multiproc::main]
/// fn main() -> Result<(), multiproc::Error> {
///     let pool = Pool::new(4)?;
///     assert_eq!(pool.map(square, [1, 2, 3])?, vec![1, 4, 9]);
///     Ok(())
/// }
/// ```
pub struct Pool {
    shared: Arc<Shared>,
    config: Arc<SlotConfig>,
    processes: usize,
    defaults: Policy,
    slots: Mutex<Vec<JoinHandle<()>>>,
}

/// Per-call settings, defaulted from the builder.
#[derive(Clone, Copy, Debug)]
struct Policy {
    chunking: Chunking,
    timeout: Option<Duration>,
    retries: u32,
}

/// Configures a [`Pool`] before starting it.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> Result<(), multiproc::Error> {
/// let pool = multiproc::Pool::builder().processes(2).build()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until .build() is called"]
pub struct PoolBuilder {
    processes: Option<usize>,
    defaults: Policy,
    max_frame_len: u32,
    start_timeout: Duration,
    prefetch: usize,
    max_tasks_per_child: Option<u64>,
    max_memory_per_child: Option<u64>,
    /// The initializer's name and encoded arguments (or why they could not be encoded).
    initializer: Option<(&'static str, Result<Vec<u8>, String>)>,
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder {
            processes: None,
            defaults: Policy {
                chunking: Chunking::Auto,
                timeout: None,
                retries: 0,
            },
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            start_timeout: Duration::from_secs(30),
            prefetch: 8,
            max_tasks_per_child: None,
            max_memory_per_child: None,
            initializer: None,
        }
    }
}

impl PoolBuilder {
    /// Number of worker processes. Default: the parallelism available to this process,
    /// which honours CPU affinity and cgroup CPU quotas.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().processes(8).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn processes(mut self, processes: usize) -> Self {
        self.processes = Some(processes);
        self
    }

    /// The default chunk size of the pool's calls. Default: [`Chunking::Auto`].
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool};
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().chunking(Chunking::Fixed(100)).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn chunking(mut self, chunking: Chunking) -> Self {
        self.defaults.chunking = chunking;
        self
    }

    /// A deadline for every task of every call: a task still running `timeout` after it
    /// started is killed, with its worker and every process it started (the worker's process
    /// group), and its outcome is an error of kind [`ErrorKind::Timeout`]. The worker is
    /// replaced; other tasks are unaffected. [`Pool::with_timeout`] sets it per call.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # use std::time::Duration;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().task_timeout(Duration::from_secs(10)).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.defaults.timeout = Some(timeout);
        self
    }

    /// Runs a task again, up to `retries` more times, when its worker crashed or it timed out
    /// (panics are not retried: they are the task's own answer). Only for idempotent tasks.
    /// Default: 0. [`Pool::with_retries`] sets it per call.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().retries(2).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn retries(mut self, retries: u32) -> Self {
        self.defaults.retries = retries;
        self
    }

    /// Replaces a worker after it has run `tasks` items, to contain leaks. Counted in items
    /// and checked between chunks: a chunk that is running finishes first, so use
    /// [`Chunking::Fixed(1)`](Chunking::Fixed) for an exact count. `0` acts as 1.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().max_tasks_per_child(100).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_tasks_per_child(mut self, tasks: u64) -> Self {
        self.max_tasks_per_child = Some(tasks.max(1));
        self
    }

    /// Caps each worker's memory: its address space (`RLIMIT_AS`) is limited to `bytes`, so a
    /// runaway task fails to allocate, which aborts its worker: that task's outcome is an
    /// error of kind [`ErrorKind::Crashed`] (quoting the allocation failure from the worker's
    /// stderr) instead of the machine going into swap. Address space counts reservations as
    /// well as use (thread stacks, allocator arenas): leave a margin of a few hundred MiB
    /// above what a task really needs.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().max_memory_per_child(2 << 30).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_memory_per_child(mut self, bytes: u64) -> Self {
        self.max_memory_per_child = Some(bytes);
        self
    }

    /// Runs `task(args)` once in every worker before its first task, replacements included:
    /// to load a model, open a file, set up a global. If it panics or kills its worker,
    /// [`build`](Self::build) fails with an error of kind [`ErrorKind::Spawn`] naming it; a
    /// replacement worker whose initializer fails is retried a few times with a growing
    /// back-off, and if none can start, the pool's pending and future work fails with that
    /// error instead of respawning forever. Nothing is checked here: a task that is not
    /// registered, or arguments that cannot be encoded, are reported by `build`.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn load_model(path: String) { let _ = path; }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().initializer(load_model, ("model.bin".into(),)).build()?;
    /// # Ok(())
    /// # }
    /// ```
    // By value, like `Pool::apply(task, args)`: the call reads the same way.
    #[allow(clippy::needless_pass_by_value)]
    pub fn initializer<T: Task>(mut self, task: T, args: T::Args) -> Self {
        let _ = task;
        let mut encoded = Vec::new();
        let encoded = crate::codec::encode_into(&args, &mut encoded)
            .map(|()| encoded)
            .map_err(|err| format!("the initializer's arguments could not be encoded: {err}"));
        self.initializer = Some((T::NAME, encoded));
        self
    }

    /// The largest frame (one chunk of arguments or results) accepted on a worker channel, in
    /// bytes. Default: 1 GiB. Larger frames are an error of kind [`ErrorKind::Codec`] and are
    /// rejected before anything is allocated for them.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().max_frame_len(64 << 20).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_frame_len(mut self, bytes: u32) -> Self {
        self.max_frame_len = bytes;
        self
    }

    /// How long a new worker may take to start and complete its handshake. Default: 30 s.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # use std::time::Duration;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().start_timeout(Duration::from_secs(5)).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Starts the workers and waits for each to complete its handshake.
    ///
    /// # Errors
    ///
    /// - [`ErrorKind::Spawn`] when a worker cannot start or does not complete its handshake
    ///   within the [`start_timeout`](Self::start_timeout), when the executable's `fn main`
    ///   lacks `#[multiproc::main]`, when two tasks share a name, when
    ///   [`processes`](Self::processes) is 0, when the [`initializer`](Self::initializer) is
    ///   not a registered task or fails in the first workers, or when this process is itself
    ///   a worker that never passed through `#[multiproc::main]`;
    /// - [`ErrorKind::Codec`] when the initializer's arguments cannot be encoded;
    /// - [`ErrorKind::Io`] when the operating system refuses a pipe or a thread.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn build(self) -> Result<Pool, Error> {
        worker::check_may_spawn()?;
        Registry::get()?;
        let processes = match self.processes {
            Some(0) => {
                return Err(Error::new(
                    ErrorKind::Spawn,
                    "a pool needs at least one process",
                ));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        };
        let initializer = match self.initializer {
            None => None,
            Some((name, args)) => Some(Arc::new(initializer_frame(name, args)?)),
        };
        let shared = Arc::new(Shared::new(processes)?);
        let config = Arc::new(SlotConfig {
            spawn: SpawnOptions {
                max_frame_len: self.max_frame_len,
                start_timeout: self.start_timeout,
                max_memory: self.max_memory_per_child,
                initializer,
            },
            prefetch: self.prefetch.max(1),
            shutdown_grace: Duration::from_secs(5),
            max_tasks_per_child: self.max_tasks_per_child,
            restart_attempts: 4,
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::with_capacity(processes);
        for index in 0..processes {
            let slot = Slot::new(index, Arc::clone(&shared), Arc::clone(&config));
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("multiproc-slot-{index}"))
                .spawn(move || slot.run(ready));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(err) => {
                    shared.terminate();
                    return Err(Error::io("starting a pool thread failed", err));
                }
            }
        }
        drop(ready_tx);
        let pool = Pool {
            shared,
            config,
            processes,
            defaults: self.defaults,
            slots: Mutex::new(handles),
        };
        for _ in 0..processes {
            match ready_rx.recv() {
                Ok(Ok(_pid)) => {}
                Ok(Err(err)) => return Err(err), // dropping `pool` terminates the others
                Err(_) => return Err(Error::new(ErrorKind::Spawn, "a pool thread stopped")),
            }
        }
        Ok(pool)
    }
}

impl Pool {
    /// Starts a pool of `processes` workers. Same as `Pool::builder().processes(n).build()`.
    ///
    /// # Errors
    ///
    /// As [`PoolBuilder::build`]: mostly [`ErrorKind::Spawn`], when a worker cannot start
    /// (for example because `fn main` lacks `#[multiproc::main]`) or `processes` is 0.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::new(4)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(processes: usize) -> Result<Pool, Error> {
        Pool::builder().processes(processes).build()
    }

    /// A builder with every option at its default.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().processes(2).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of worker processes.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// assert_eq!(Pool::new(3)?.processes(), 3);
    /// # Ok(())
    /// # }
    /// ```
    pub fn processes(&self) -> usize {
        self.processes
    }

    /// The process ids of the workers running now (a replaced worker has a new pid).
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// for pid in pool.worker_pids() { println!("worker {pid}"); }
    /// # Ok(())
    /// # }
    /// ```
    pub fn worker_pids(&self) -> Vec<u32> {
        self.shared.pids()
    }

    /// Per-call options, to change the chunk size of one call.
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let out = pool.with_chunking(Chunking::Fixed(1)).map(square, 0..10)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_chunking(&self, chunking: Chunking) -> Call<'_> {
        self.call().with_chunking(chunking)
    }

    /// Per-call options, to give the tasks of one call a deadline (see
    /// [`PoolBuilder::task_timeout`]).
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) -> u64 { std::thread::sleep(std::time::Duration::from_secs(secs)); secs }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let out = pool.with_timeout(Duration::from_secs(1)).map(slow, 0..10);
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> Call<'_> {
        self.call().with_timeout(timeout)
    }

    /// Per-call options, to run a task again when its worker crashed or it timed out (see
    /// [`PoolBuilder::retries`]).
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn flaky(x: u64) -> u64 { x } // imagine it sometimes crashes its worker
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let out = pool.with_retries(3).map(flaky, 0..10)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_retries(&self, retries: u32) -> Call<'_> {
        self.call().with_retries(retries)
    }

    fn call(&self) -> Call<'_> {
        Call {
            pool: self,
            policy: self.defaults,
        }
    }

    /// Applies a one-argument task to every item, in parallel; the outputs in input order.
    /// Python's `Pool.map`.
    ///
    /// # Errors
    ///
    /// Every item runs; then the error of the first failing item by input position is
    /// returned, naming the task and that position: [`ErrorKind::Panicked`] (the task
    /// panicked), [`ErrorKind::Crashed`] (its worker died), [`ErrorKind::Timeout`] (it ran
    /// past a [deadline](Self::with_timeout)), [`ErrorKind::Codec`] (an argument or output
    /// could not be encoded or decoded), [`ErrorKind::Closed`] (the pool was closed or
    /// terminated first) or [`ErrorKind::Spawn`] (no worker could be started).
    ///
    /// # Examples
    ///
    /// ```rust,standalone_crate
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # #[multiproc::main]
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// assert_eq!(pool.map(square, [1, 2, 3, 4, 5])?, vec![1, 4, 9, 16, 25]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn map<T: UnaryTask>(
        &self,
        task: T,
        items: impl IntoIterator<Item = T::Arg>,
    ) -> Result<Vec<T::Output>, Error> {
        self.call().map(task, items)
    }

    /// Like [`map`](Self::map), for tasks of several arguments: each item is the tuple of
    /// one call's arguments. Python's `Pool.starmap`.
    ///
    /// # Errors
    ///
    /// As [`map`](Self::map): the error of the first failing item by input position.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// assert_eq!(pool.starmap(pow, [(1, 3), (2, 4)])?, vec![1, 16]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn starmap<T: Task>(
        &self,
        task: T,
        items: impl IntoIterator<Item = T::Args>,
    ) -> Result<Vec<T::Output>, Error> {
        self.call().starmap(task, items)
    }

    /// Runs one call of a task on a worker and returns its output. Python's `Pool.apply`.
    ///
    /// # Errors
    ///
    /// The call's error, of the kinds listed for [`map`](Self::map).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// assert_eq!(pool.apply(pow, (2, 10))?, 1024);
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply<T: Task>(&self, task: T, args: T::Args) -> Result<T::Output, Error> {
        self.call().apply(task, args)
    }

    /// [`map`](Self::map) without blocking: returns at once with a handle to the outcome.
    /// Errors surface when the outcome is read ([`AsyncResult::get`]).
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.map_async(square, 0..8);
    /// assert_eq!(r.get()?, vec![0, 1, 4, 9, 16, 25, 36, 49]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn map_async<T: UnaryTask>(
        &self,
        task: T,
        items: impl IntoIterator<Item = T::Arg>,
    ) -> AsyncResult<Vec<T::Output>> {
        self.call().map_async(task, items)
    }

    /// [`starmap`](Self::starmap) without blocking.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.starmap_async(pow, [(1, 3), (2, 4)]);
    /// assert_eq!(r.get()?, vec![1, 16]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn starmap_async<T: Task>(
        &self,
        task: T,
        items: impl IntoIterator<Item = T::Args>,
    ) -> AsyncResult<Vec<T::Output>> {
        self.call().starmap_async(task, items)
    }

    /// [`apply`](Self::apply) without blocking.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.apply_async(pow, (2, 10));
    /// assert_eq!(r.get()?, 1024);
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply_async<T: Task>(&self, task: T, args: T::Args) -> AsyncResult<T::Output> {
        self.call().apply_async(task, args)
    }

    /// A lazy, ordered stream of outputs: pulls the input as workers need it (a bounded
    /// number of items in flight), and yields each output in input order as soon as it and
    /// all before it are done. A failing item yields its `Err` (of the kinds listed for
    /// [`map`](Self::map)) and the stream goes on. Dropping the iterator stops feeding and
    /// discards what is outstanding.
    ///
    /// ```rust,standalone_crate
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # #[multiproc::main]
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// for value in pool.imap(square, 0..).take(1000) { println!("{}", value?); }
    /// # Ok(())
    /// # }
    /// ```
    pub fn imap<T: UnaryTask, I>(&self, task: T, items: I) -> IMap<T, I::IntoIter>
    where
        I: IntoIterator<Item = T::Arg>,
    {
        self.call().imap(task, items)
    }

    /// Like [`imap`](Self::imap), but yields outputs in completion order; each comes with
    /// nothing but its value, so pair inputs with an id when you need to match them.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let mut all: Vec<u64> = pool.imap_unordered(square, 0..10).collect::<Result<_, _>>()?;
    /// all.sort();
    /// # Ok(())
    /// # }
    /// ```
    pub fn imap_unordered<T: UnaryTask, I>(&self, task: T, items: I) -> IMap<T, I::IntoIter>
    where
        I: IntoIterator<Item = T::Arg>,
    {
        self.call().imap_unordered(task, items)
    }

    /// Stops accepting new work (calls made after it resolve to an error of kind
    /// [`ErrorKind::Closed`]); work already submitted still runs. Follow with
    /// [`join`](Self::join) to wait for it. Python's `Pool.close`.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.map_async(square, 0..8);
    /// pool.close();
    /// pool.join();
    /// assert!(r.ready());
    /// # Ok(())
    /// # }
    /// ```
    pub fn close(&self) {
        self.shared.close();
    }

    /// Stops now: kills every worker; queued and running work resolves to an error of kind
    /// [`ErrorKind::Closed`]. Python's `Pool.terminate`.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// pool.terminate();
    /// pool.join();
    /// # Ok(())
    /// # }
    /// ```
    pub fn terminate(&self) {
        self.shared.terminate();
    }

    /// Waits for the workers to exit, after [`close`](Self::close) or
    /// [`terminate`](Self::terminate). Without either it would wait forever, so it closes
    /// the pool first.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// pool.close();
    /// pool.join();
    /// # Ok(())
    /// # }
    /// ```
    pub fn join(&self) {
        self.shared.close();
        let handles: Vec<_> =
            std::mem::take(&mut *self.slots.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in handles {
            let _ = handle.join();
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn max_frame_len(&self) -> u32 {
        self.config.spawn.max_frame_len
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
        self.join();
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.processes)
            .field("worker_pids", &self.worker_pids())
            .finish_non_exhaustive()
    }
}

/// One call's options, from [`Pool::with_chunking`], [`Pool::with_timeout`] or
/// [`Pool::with_retries`]. Chain more options, then run the call with the methods [`Pool`]
/// has for it: `map`, `starmap`, `apply`, their `_async` forms, `imap` and `imap_unordered`.
/// It borrows the pool for the length of one expression; what those methods return does not.
///
/// # Examples
///
/// ```no_run
/// # use multiproc::{Chunking, Pool, task};
/// # #[task] fn square(x: u64) -> u64 { x * x }
/// # fn main() -> Result<(), multiproc::Error> {
/// # let pool = Pool::new(2)?;
/// let outputs = pool.with_chunking(Chunking::Fixed(10)).map(square, 0..1000)?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
#[must_use = "call map, imap or another method on it"]
pub struct Call<'a> {
    pool: &'a Pool,
    policy: Policy,
}

impl Call<'_> {
    /// Sets the chunk size for this call.
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let out = pool
    ///     .with_chunking(Chunking::Auto)
    ///     .with_chunking(Chunking::Fixed(2)) // the last setting wins
    ///     .map(square, 0..4)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_chunking(mut self, chunking: Chunking) -> Self {
        self.policy.chunking = chunking;
        self
    }

    /// Sets a deadline for each task of this call (see [`PoolBuilder::task_timeout`]).
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) -> u64 { std::thread::sleep(std::time::Duration::from_secs(secs)); secs }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let out = pool
    ///     .with_chunking(Chunking::Fixed(1))
    ///     .with_timeout(Duration::from_secs(2))
    ///     .map(slow, 0..4);
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.policy.timeout = Some(timeout);
        self
    }

    /// Sets how often a task of this call runs again after its worker crashed or it timed
    /// out (see [`PoolBuilder::retries`]).
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) -> u64 { std::thread::sleep(std::time::Duration::from_secs(secs)); secs }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let out = pool.with_timeout(Duration::from_secs(2)).with_retries(1).map(slow, 0..4);
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.policy.retries = retries;
        self
    }

    /// [`Pool::map`] with these options.
    ///
    /// # Errors
    ///
    /// As [`Pool::map`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// pool.with_chunking(Chunking::Fixed(1)).map(square, [1, 2])?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn map<T: UnaryTask>(
        self,
        task: T,
        items: impl IntoIterator<Item = T::Arg>,
    ) -> Result<Vec<T::Output>, Error> {
        self.map_async(task, items).get()
    }

    /// [`Pool::starmap`] with these options.
    ///
    /// # Errors
    ///
    /// As [`Pool::starmap`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// pool.with_chunking(Chunking::Fixed(1)).starmap(pow, [(2, 2)])?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn starmap<T: Task>(
        self,
        task: T,
        items: impl IntoIterator<Item = T::Args>,
    ) -> Result<Vec<T::Output>, Error> {
        self.starmap_async(task, items).get()
    }

    /// [`Pool::apply`] with these options.
    ///
    /// # Errors
    ///
    /// As [`Pool::apply`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// pool.with_chunking(Chunking::Auto).apply(pow, (2, 3))?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply<T: Task>(self, task: T, args: T::Args) -> Result<T::Output, Error> {
        self.apply_async(task, args).get()
    }

    /// [`Pool::map_async`] with these options.
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.with_chunking(Chunking::Fixed(4)).map_async(square, 0..8);
    /// # Ok(())
    /// # }
    /// ```
    pub fn map_async<T: UnaryTask>(
        self,
        task: T,
        items: impl IntoIterator<Item = T::Arg>,
    ) -> AsyncResult<Vec<T::Output>> {
        let _ = task;
        self.submit_all::<T, T::Arg>(items)
    }

    /// [`Pool::starmap_async`] with these options.
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.with_chunking(Chunking::Fixed(4)).starmap_async(pow, [(2, 2)]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn starmap_async<T: Task>(
        self,
        task: T,
        items: impl IntoIterator<Item = T::Args>,
    ) -> AsyncResult<Vec<T::Output>> {
        let _ = task;
        self.submit_all::<T, T::Args>(items)
    }

    /// [`Pool::apply_async`] with these options.
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.with_chunking(Chunking::Auto).apply_async(pow, (2, 3));
    /// # Ok(())
    /// # }
    /// ```
    // The `expect` cannot fire: a successful call of one item has exactly one output.
    #[allow(clippy::missing_panics_doc)]
    pub fn apply_async<T: Task>(self, task: T, args: T::Args) -> AsyncResult<T::Output> {
        self.starmap_async(task, [args])
            .map_output(|mut values| values.pop().expect("apply has exactly one output"))
    }

    /// [`Pool::imap`] with these options.
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let it = pool.with_chunking(Chunking::Fixed(100)).imap(square, 0..);
    /// # Ok(())
    /// # }
    /// ```
    pub fn imap<T: UnaryTask, I>(self, task: T, items: I) -> IMap<T, I::IntoIter>
    where
        I: IntoIterator<Item = T::Arg>,
    {
        let _ = task;
        let spec = Self::registered::<T>().map(|task| self.chunk_spec::<T>(task));
        IMap::new(
            self.pool,
            items.into_iter(),
            spec,
            self.policy.chunking,
            true,
        )
    }

    /// [`Pool::imap_unordered`] with these options.
    ///
    /// ```no_run
    /// # use multiproc::{Chunking, Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let it = pool.with_chunking(Chunking::Fixed(100)).imap_unordered(square, 0..);
    /// # Ok(())
    /// # }
    /// ```
    pub fn imap_unordered<T: UnaryTask, I>(self, task: T, items: I) -> IMap<T, I::IntoIter>
    where
        I: IntoIterator<Item = T::Arg>,
    {
        let _ = task;
        let spec = Self::registered::<T>().map(|task| self.chunk_spec::<T>(task));
        IMap::new(
            self.pool,
            items.into_iter(),
            spec,
            self.policy.chunking,
            false,
        )
    }

    fn registered<T: Task>() -> Result<u32, Error> {
        Registry::get().and_then(Registry::id_of_task::<T>)
    }

    fn chunk_spec<T: Task>(&self, task: u32) -> ChunkSpec {
        ChunkSpec {
            task,
            timeout: self.policy.timeout,
            retries: self.policy.retries,
            max_frame_len: self.pool.max_frame_len(),
            skip: skip_args::<T::Args>,
        }
    }

    /// Encodes every item (each `A` is the task's argument tuple, or its one argument: the
    /// encodings are identical), queues the chunks, and returns the handle.
    fn submit_all<T: Task, A: Serialize>(
        self,
        items: impl IntoIterator<Item = A>,
    ) -> AsyncResult<Vec<T::Output>> {
        let items = items.into_iter();
        match items.size_hint() {
            (low, Some(high)) if low == high => self.submit_stream::<T, A>(items, low),
            // Unknown length: the chunk size depends on it, so the input is collected first
            // (as Python's `map` does). `imap` is the lazy alternative.
            _ => {
                let items: Vec<A> = items.collect();
                let len = items.len();
                self.submit_stream::<T, A>(items.into_iter(), len)
            }
        }
    }

    /// Encodes and queues the input chunk by chunk, so workers start on the first chunk while
    /// the rest is being encoded. `len` sizes the chunks; the input is read to its end
    /// whatever it is.
    fn submit_stream<T: Task, A: Serialize>(
        self,
        mut items: impl Iterator<Item = A>,
        len: usize,
    ) -> AsyncResult<Vec<T::Output>> {
        let state = CallState::<T::Output>::new(T::NAME);
        let result = AsyncResult::new(Arc::clone(&state), move |state| {
            collect_in_order(state, len)
        });
        let task = Self::registered::<T>();
        let size = self.policy.chunking.for_len(len, self.pool.processes);
        let shared = self.pool.shared();
        let mut first = 0;
        let mut refused = false;
        loop {
            let chunk: Vec<A> = items.by_ref().take(size).collect();
            let count = chunk.len();
            if count == 0 {
                break;
            }
            state.expect(count, false);
            let sink: Arc<dyn CallSink> = state.clone();
            let encoded = match &task {
                Ok(task) => encode_chunk(
                    shared,
                    sink,
                    self.chunk_spec::<T>(*task),
                    first,
                    chunk.into_iter(),
                ),
                Err(err) => Err((sink, count, clone_error(err, T::NAME, first))),
            };
            match encoded {
                // Once refused (a closed pool), the rest fails without being offered.
                Ok(chunk) if !refused => refused = shared.submit([chunk]).is_err(),
                Ok(chunk) => chunk.fail_all(&|index| {
                    Error::closed("the pool is closed")
                        .with_task(T::NAME)
                        .with_index(index)
                }),
                Err((sink, count, err)) => {
                    sink.fail(first, count as u32, &|index| {
                        clone_error(&err, T::NAME, index)
                    });
                }
            }
            first += count;
        }
        state.expect(0, true);
        result
    }
}

/// The `Run` frame of an initializer (seq 0: it precedes every chunk).
fn initializer_frame(
    name: &'static str,
    args: Result<Vec<u8>, String>,
) -> Result<Initializer, Error> {
    let args = args.map_err(|message| Error::new(ErrorKind::Codec, message))?;
    let task = Registry::get()?.id_of(name).ok_or_else(|| {
        Error::new(
            ErrorKind::Spawn,
            format!("the initializer `{name}` is not a registered task"),
        )
    })?;
    let header = crate::protocol::Header::Run {
        seq: 0,
        task,
        count: 1,
        timed: false,
    };
    let mut frame = Vec::with_capacity(16 + args.len());
    let start = crate::protocol::begin_frame(&mut frame, &header);
    frame.extend_from_slice(&args);
    crate::protocol::end_frame(&mut frame, start, u32::MAX)?;
    Ok(Initializer { task: name, frame })
}

pub(crate) fn clone_error(err: &Error, task: &str, index: usize) -> Error {
    Error::new(err.kind(), err.message().to_owned())
        .with_task(task)
        .with_index(index)
}
