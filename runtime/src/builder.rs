//! [`PoolBuilder`]: a pool's settings, and starting its slots and workers.

use crate::chunk::Chunking;
use crate::error::{Error, ErrorKind};
use crate::pool::Pool;
use crate::protocol::DEFAULT_MAX_FRAME_LEN;
use crate::registry::Registry;
use crate::sched::Shared;
use crate::slot::{Slot, SlotConfig};
use crate::spawn::{Initializer, Launching, SpawnOptions, WorkerProcess};
use crate::task::Task;
use crate::worker;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// The least [`PoolBuilder::max_frame_len`].
const MIN_FRAME_LEN: u32 = 4096;

/// Per-call settings, defaulted from the builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    pub(crate) chunking: Chunking,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: u32,
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
    /// How long a thread polls before it sleeps; `None`: the default for this machine.
    spin: Option<Duration>,
    /// The initializer's name and encoded arguments (or why they could not be encoded).
    initializer: Option<(&'static str, Result<Vec<u8>, String>)>,
    start_method: StartMethod,
}

/// How a pool starts its worker processes; see [`PoolBuilder::start_method`].
///
/// Both give a worker that is a fresh copy of the program as it started: it runs no part of
/// the caller's `main`, shares none of its state, and sees the caller's environment and
/// working directory as they are when the worker starts.
///
/// # Examples
///
/// ```no_run
/// use multiproc::{Pool, StartMethod};
/// # fn main() -> Result<(), multiproc::Error> {
/// let pool = Pool::builder().start_method(StartMethod::Spawn).build()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StartMethod {
    /// Fork each worker from the fork server, a copy of the program that
    /// `#[multiproc::main]` makes first thing in `main`, while the program is still
    /// single-threaded. A worker is ready in a fraction of a millisecond, against a whole
    /// program start (`BENCHMARKS.md`, W4). The worker gets the caller's current
    /// environment, working directory, resource limits and stdout (its stderr is forwarded
    /// to the caller's, as a spawned worker's is). Without an initializer, `build` returns
    /// without waiting for forked workers, and the pool starts no thread until its work
    /// needs one (see [`PoolBuilder::build`]).
    ///
    /// Falls back to [`Spawn`](StartMethod::Spawn), for one start or for good:
    /// - where there is no fork server: on systems other than Linux; in a program started
    ///   with `MULTIPROC_START_METHOD=spawn` or `MULTIPROC_WORKER_EXE` (for profilers) in
    ///   its environment, or with more than one thread before `main`; in a worker that
    ///   starts a pool of its own; in a copy of the program made with `fork`;
    /// - while the starting thread's credentials (user, groups, capabilities), umask, CPU
    ///   affinity, control group, `no_new_privs` or seccomp filters differ from the
    ///   program's at start: a forked worker would keep the old ones, escaping a sandbox or
    ///   a privilege drop (and a parent that dropped privileges could not kill it);
    /// - while the environment holds a name or value that `std::env::set_var` refuses;
    /// - once the server has not answered for 2 seconds, or cannot fork workers here.
    ///
    /// A pool without an initializer does not wait for the server's answers, and learns
    /// that it did not fork a worker when it first needs that worker: it starts one by
    /// running the executable then.
    ///
    /// What a forked worker still keeps from the program's start, unlike a spawned one:
    /// its arguments (a spawned worker's are the executable's path alone), signal
    /// dispositions, scheduling priority, namespaces and security-module label, and the
    /// descriptors open when the program started.
    ///
    /// The server is a child of the program from the first line of `main` to its exit:
    /// code that waits for *any* child until none is left (`wait(2)` until `ECHILD`) would
    /// wait for it too; start such a program with `MULTIPROC_START_METHOD=spawn`.
    #[default]
    ForkServer,
    /// Run the program's executable again for each worker (`posix_spawn`), as Python's
    /// `spawn` start method does: each worker pays a whole program start, about 1.5-2 ms.
    Spawn,
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
            spin: None,
            initializer: None,
            start_method: StartMethod::ForkServer,
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
    /// started is killed, with its worker and the worker's process group (the processes the
    /// task started, unless one moved to a group or session of its own, as a daemon does),
    /// and its outcome is an error of kind [`ErrorKind::Timeout`]. The worker is replaced;
    /// other tasks are unaffected. [`Pool::with_timeout`] sets it per call.
    ///
    /// Under a deadline a worker sends each chunk's results as soon as the chunk ends
    /// (without one, the results of short chunks go back in batches): with
    /// [`Chunking::Fixed(1)`](Chunking::Fixed), a crash then runs no finished item again.
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
    /// Default: 0. [`Pool::with_retries`] sets it per call. With retries, the pool keeps
    /// copies of the channel handles among a task's arguments until its outcome is in (to
    /// send them again), so a handle the task drops counts as open until then.
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
    /// and checked between chunks: a chunk that is running finishes first, so a worker may
    /// run up to a chunk more (a `map` of 100 short items on 2 workers with a limit of 10
    /// may see 8 workers, not 10). Use [`Chunking::Fixed(1)`](Chunking::Fixed) for an exact
    /// count. `0` acts as 1.
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
    /// above what a task really needs. The pool's own share of it stays small: the shared
    /// regions a large frame travels in are at most an eighth of `bytes` each (larger frames
    /// take the socket), and a worker keeps no frame buffer over an eighth once it is empty.
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
    /// error instead of respawning forever. Its time counts against
    /// [`start_timeout`](Self::start_timeout) (30 s by default): raise that for a slow one.
    /// Nothing is checked here: a task that is not registered, or arguments that cannot be
    /// encoded, are reported by `build`.
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
    /// rejected before anything is allocated for them. At least 4 KiB: a smaller limit is
    /// raised to that, which the start-up handshake and the control frames need.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().max_frame_len(64 << 20).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_frame_len(mut self, bytes: u32) -> Self {
        self.max_frame_len = bytes.max(MIN_FRAME_LEN);
        self
    }

    /// How workers start. Default: [`StartMethod::ForkServer`], which falls back to
    /// [`StartMethod::Spawn`] where there is no fork server.
    ///
    /// ```no_run
    /// use multiproc::{Pool, StartMethod};
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().start_method(StartMethod::Spawn).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = method;
        self
    }

    /// How long a thread that is about to sleep until a message arrives looks for it first,
    /// without sleeping: a worker that has just answered, waiting for its next request, and a
    /// caller blocked on a short task's outcome. Default: 50 µs, or zero when the thread that
    /// builds the pool may run on one CPU only (its affinity mask). Zero: never poll.
    ///
    /// Waking a sleeping thread costs more than a whole short round trip on many machines
    /// (tens of microseconds on a virtual machine whose idle CPUs halt), so polling briefly
    /// makes back-to-back short tasks several times faster (see `BENCHMARKS.md`). It costs
    /// at most this much CPU time per idle spell, and the polling thread yields its CPU to
    /// any other runnable thread between looks (in a long window it also looks at the
    /// worker's stderr every 0.2 ms, so that a task writing much there is not held up).
    /// Set zero where every CPU cycle is accounted
    /// for and latency is not the concern.
    ///
    /// ```no_run
    /// # use multiproc::Pool;
    /// # use std::time::Duration;
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let pool = Pool::builder().spin(Duration::ZERO).build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn spin(mut self, window: Duration) -> Self {
        self.spin = Some(window);
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

    /// Starts the workers and returns as soon as one has completed its handshake (and run the
    /// [`initializer`](Self::initializer)); the others finish starting in the background,
    /// so a program's first task does not wait for its last worker. A worker that then
    /// cannot start is retried as a replacement would be; if it still cannot, the pool
    /// carries on with fewer workers ([`Pool::worker_pids`] lists those running).
    ///
    /// Workers the fork server forks, in a pool without an initializer, are not waited for
    /// at all: a copy of this program can hardly fail its handshake, so `build` returns once
    /// the server has the request for the first worker, and forks it while the program goes
    /// on. The others are asked for when there is work for them: work queued beyond the
    /// workers running (a `map`, an `imap`, a second call while the first runs), or
    /// [`Pool::worker_pids`], which lists every worker. So a program that calls `apply` one
    /// call at a time never starts more than one, and a `map` on a fresh pool starts the
    /// others side by side, each from the thread that will serve it. The first call to use a worker reads the server's
    /// answer, sends its work at once and reads the worker's handshake ahead of the reply. A worker that died meanwhile is
    /// replaced then, like one that dies while idle, and so is one the server declined to
    /// fork (see [`StartMethod::ForkServer`]: it is then started by running the
    /// executable). Such a pool also runs no thread of its own until its work needs one:
    /// `apply` (and the last chunk of `map`) runs from the caller's thread on an idle
    /// worker, and the first work queued for a worker starts the thread that serves it.
    ///
    /// # Errors
    ///
    /// - [`ErrorKind::Spawn`] when a worker cannot start or does not complete its handshake
    ///   within the [`start_timeout`](Self::start_timeout) (a forked worker that a pool
    ///   without an initializer does not wait for is replaced instead, when first used),
    ///   when the executable's `fn main` lacks `#[multiproc::main]`, when two tasks share a
    ///   name, when [`processes`](Self::processes) is 0, when the
    ///   [`initializer`](Self::initializer) is not a registered task or fails in the first
    ///   workers, or when this process is itself a worker that never passed through
    ///   `#[multiproc::main]`;
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
        if self.start_method == StartMethod::ForkServer {
            crate::forkserver::wake();
        }
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
        let spin = self.spin.unwrap_or_else(worker::spin_window);
        let mut spawn = SpawnOptions {
            max_frame_len: self.max_frame_len,
            start_timeout: self.start_timeout,
            max_memory: self.max_memory_per_child,
            spin,
            initializer,
            stop: None,
            fork_server: self.start_method == StartMethod::ForkServer,
        };
        // Workers the fork server starts are asked for from this thread, first: the server
        // forks them while this thread sets up the pool, then the slots take them over
        // (`start_slots`). Any other start must happen on the slot's thread, which outlives
        // the worker.
        // Without an initializer, one worker is asked for now and the others when there is
        // work for them (see `start_slots`).
        let launching = if spawn.fork_server {
            let now = if spawn.initializer.is_none() {
                1
            } else {
                processes
            };
            Some(WorkerProcess::launch(&spawn, now)?)
        } else {
            None
        };
        let shared = Shared::new(processes, spin)?;
        spawn.stop = Some(Arc::new(shared.stop_read.try_clone().map_err(|err| {
            Error::io("duplicating the pool's stop pipe failed", err)
        })?));
        let config = Arc::new(SlotConfig {
            spawn,
            prefetch: self.prefetch.max(1),
            shutdown_grace: Duration::from_secs(5),
            max_tasks_per_child: self.max_tasks_per_child,
            restart_attempts: 4,
        });
        let ready = start_slots(&shared, &config, processes, launching)?;
        let pool = Pool {
            shared,
            config,
            processes,
            defaults: self.defaults,
            joining: Mutex::new(()),
        };
        let Some(ready) = ready else {
            return Ok(pool);
        };
        // The first worker to be ready is enough to run tasks: the others finish starting
        // while the program goes on (and `worker_pids` waits for them). A failure reported
        // before that fails the pool: it is most likely every worker's (a missing
        // `#[multiproc::main]`, a failing initializer).
        match ready.recv() {
            Ok(Ok(_pid)) => Ok(pool),
            Ok(Err(err)) => Err(err), // dropping `pool` terminates the others
            Err(_) => Err(Error::new(ErrorKind::Spawn, "a pool thread stopped")),
        }
    }
}

/// Gives each slot its first worker. Without an initializer, a worker the fork server
/// started needs no thread to finish its start: its slot waits without one
/// (`Slot::dormant`), for a caller to borrow or for work to start its thread. Every other
/// slot gets a thread, handed its worker once the server has answered (or left to start
/// one). The first-start reports of those threads, when `build` is to wait for one: `None`
/// when a slot is dormant (`build` then returns at once).
fn start_slots(
    shared: &Arc<Shared>,
    config: &Arc<SlotConfig>,
    processes: usize,
    mut launching: Option<Launching>,
) -> Result<Option<mpsc::Receiver<Result<u32, Error>>>, Error> {
    let mut forked = Vec::new();
    let mut lazy = false;
    if config.spawn.initializer.is_none()
        && let Some(launching) = launching.take()
    {
        // Without waiting for the server: each answer is read when its worker is first
        // used (`Launched::adopt`), or asked for (`worker_pids`).
        forked = launching.deferred()?;
        lazy = true;
    }
    let mut dormant = 0;
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut handovers = Vec::with_capacity(processes);
    for index in 0..processes {
        let slot = Slot::new(index, Arc::clone(shared), Arc::clone(config));
        if let Some(launched) = forked.get_mut(index).and_then(Option::take) {
            shared.park_dormant(slot.dormant(launched));
            dormant += 1;
            continue;
        }
        if lazy && index >= forked.len() {
            // Past the first worker: asked for when there is work for it. (Not counted in
            // `dormant`: when the first worker did not fork, `build` waits for its start.)
            shared.park_dormant(slot.cold());
            continue;
        }
        let ready = ready_tx.clone();
        let launched = launching.is_some().then(|| {
            let (handover, launched) = mpsc::sync_channel(1);
            handovers.push(handover);
            launched
        });
        let spawned = std::thread::Builder::new()
            .name(format!("multiproc-slot-{index}"))
            .spawn(move || slot.run(ready, launched));
        match spawned {
            Ok(handle) => shared.add_thread(handle),
            Err(err) => {
                shared.terminate();
                return Err(Error::io("starting a pool thread failed", err));
            }
        }
    }
    if let Some(launching) = launching {
        // A worker the server did not start (`None`) is started by its slot's thread.
        let launched = launching
            .launched(false)
            .inspect_err(|_| shared.terminate())?;
        for (handover, launched) in handovers.into_iter().zip(launched) {
            let _ = handover.send(launched);
        }
    }
    Ok((dormant == 0).then_some(ready_rx))
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
