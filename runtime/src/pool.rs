//! [`Pool`]: a fixed set of worker processes that run tasks, with Python's `Pool` methods.
//! Its configuration lives in `builder`, one call's options and submission in `call`.

use crate::builder::{Policy, PoolBuilder};
use crate::call::Call;
use crate::chunk::Chunking;
use crate::error::Error;
use crate::imap::IMap;
use crate::result::AsyncResult;
use crate::sched::Shared;
use crate::slot::SlotConfig;
use crate::task::{Task, UnaryTask};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A pool of worker processes.
///
/// Each worker is a fresh copy of this program that serves tasks instead of running
/// `main`'s body: forked from the fork server that `#[multiproc::main]` starts, or this
/// executable started again ([`StartMethod`](crate::StartMethod)). Work is cut into chunks
/// that idle workers pull. A task's panic is an error for that item only; the pool keeps
/// working.
///
/// Dropping a pool **terminates** it, like leaving Python's `with Pool(...)` block: busy
/// workers are killed at once (idle ones are asked to exit, and killed after a second), and
/// work still queued or running resolves to an error of kind
/// [`ErrorKind::Closed`](crate::ErrorKind::Closed). Outcomes that already arrived stay
/// readable. Drop never waits on a task, so it never hangs. To let queued work finish
/// first, call [`close`](Pool::close) then [`join`](Pool::join).
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
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Arc<SlotConfig>,
    pub(crate) processes: usize,
    pub(crate) defaults: Policy,
    /// Held while joining: a second caller of `join` waits for the first.
    pub(crate) joining: Mutex<()>,
}

impl Pool {
    /// Starts a pool of `processes` workers. Same as `Pool::builder().processes(n).build()`,
    /// which says when each worker starts (forked ones when there is work for them).
    ///
    /// # Errors
    ///
    /// As [`PoolBuilder::build`]: mostly [`ErrorKind::Spawn`](crate::ErrorKind::Spawn), when a worker cannot start
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

    /// The number of worker processes: the pool's size, which its work may use at once (a
    /// pool of forked workers starts them as work needs them; see
    /// [`PoolBuilder::build`](crate::PoolBuilder::build)).
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

    /// The process ids of the workers running now (a replaced worker has a new pid). This
    /// first starts the workers not asked for yet (a pool asks for them as work needs them:
    /// see [`PoolBuilder::build`](crate::PoolBuilder::build)), then waits for every first
    /// start under way; a worker the fork server forks counts as started once the server
    /// has answered (read here if it was not yet). One the server did not fork when `build`
    /// asked for it (it stopped answering or died before it did) is not listed until the
    /// pool first uses its place, and starts a worker there by running the executable.
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
        self.shared.launch_cold(&self.config.spawn);
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
    /// Python's `Pool.map`. Items are taken by value (they are encoded for another process):
    /// for a slice, pass `v.iter().copied()` or `v.iter().cloned()`.
    ///
    /// # Errors
    ///
    /// Every item runs; then the error of the first failing item by input position is
    /// returned, naming the task and that position: [`ErrorKind::Panicked`](crate::ErrorKind::Panicked) (the task
    /// panicked), [`ErrorKind::Crashed`](crate::ErrorKind::Crashed) (its worker died), [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) (it ran
    /// past a [deadline](Self::with_timeout)), [`ErrorKind::Codec`](crate::ErrorKind::Codec) (an argument or output
    /// could not be encoded or decoded: an item whose arguments' `Serialize` fails or panics
    /// fails alone, and the others run), [`ErrorKind::Closed`](crate::ErrorKind::Closed) (the pool was closed or
    /// terminated first) or [`ErrorKind::Spawn`](crate::ErrorKind::Spawn) (no worker could be started).
    /// Other items may have failed too (and items whose channel handles died with a crashed
    /// worker did not run): [`imap`](Self::imap) gives each item's outcome.
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

    /// [`map`](Self::map) without blocking on the tasks: returns a handle to the outcome as
    /// soon as the input is read and queued (it is read on the calling thread, to its end:
    /// use [`imap`](Self::imap) for an input that is slow to produce). Errors surface when
    /// the outcome is read ([`AsyncResult::get`]).
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

    /// [`starmap`](Self::starmap) without blocking on the tasks, as
    /// [`map_async`](Self::map_async).
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
    /// all before it have come back. Outputs come back a chunk at a time (a worker may
    /// answer several short chunks at once); [`Chunking::Fixed(1)`](crate::Chunking) sends
    /// each item alone. A failing item yields its `Err` (of the kinds listed for
    /// [`map`](Self::map)) and the stream goes on. An `imap` made after
    /// [`close`](Self::close) yields `Closed` for its first chunk's items and ends there,
    /// without reading the rest of its input. Dropping the iterator stops feeding and
    /// discards what is outstanding: queued chunks are dropped unrun when a worker comes
    /// to them (channel handles in their arguments close then), and those a worker already
    /// has run, their outputs dropped.
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
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed): each item, or the call itself if it
    /// has none); work already submitted still runs, and so
    /// does the rest of a call made before it: an [`imap`](Self::imap) goes on pulling its
    /// input as it is read, until [`join`](Self::join) begins. Follow with `join` to wait
    /// for the work. Python's `Pool.close`.
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
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed). Python's `Pool.terminate`.
    ///
    /// An idle worker is asked to exit, so that its at-exit work runs, and killed if it has
    /// not within a second. Workers whose slots never needed a thread (see
    /// [`PoolBuilder::build`](crate::PoolBuilder::build)) are stopped from this call, which
    /// then returns once they have exited; the others are stopped by their slots' threads,
    /// which [`join`](Self::join) waits for.
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
    /// the pool first. The work already queued runs first; a stream
    /// ([`imap`](Self::imap)) still being read queues no more: it yields what was queued,
    /// then errors of kind [`ErrorKind::Closed`](crate::ErrorKind::Closed), and ends. So read
    /// streams to their end before joining.
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
        self.shared.end_streams();
        // The lock is held while joining, so that a second caller waits for the slots too
        // instead of returning while the first still joins. Slot threads never take it.
        let _joining = self.joining.lock().unwrap_or_else(PoisonError::into_inner);
        self.shared.join_threads();
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
            .field("worker_pids", &self.shared.pids_now())
            .finish_non_exhaustive()
    }
}
