//! [`Call`]: one call's options, and how a call's input becomes queued chunks.

use crate::builder::Policy;
use crate::chunk::{ChunkSpec, Chunking, byte_cap, encode_chunks, skip_args};
use crate::error::Error;
use crate::imap::IMap;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::result::{AsyncResult, CallState, collect_in_order};
use crate::sched::CallSink;
use crate::task::{Task, UnaryTask};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

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
    pub(crate) pool: &'a Pool,
    pub(crate) policy: Policy,
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

    /// Sets a deadline for each task of this call (see [`PoolBuilder::task_timeout`](crate::PoolBuilder::task_timeout)).
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
    /// out (see [`PoolBuilder::retries`](crate::PoolBuilder::retries)).
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
        let _ = task;
        self.submit_all::<T, T::Arg>(items, true).get()
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
        let _ = task;
        self.submit_all::<T, T::Args>(items, true).get()
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
        let _ = task;
        self.submit_one::<T>(args, true).get()
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
        self.submit_all::<T, T::Arg>(items, false)
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
        self.submit_all::<T, T::Args>(items, false)
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
    pub fn apply_async<T: Task>(self, task: T, args: T::Args) -> AsyncResult<T::Output> {
        let _ = task;
        self.submit_one::<T>(args, false)
    }

    /// One item, for `apply` (`blocking`) and `apply_async`. The `expect` cannot fire: a
    /// successful call of one item has exactly one output.
    fn submit_one<T: Task>(self, args: T::Args, blocking: bool) -> AsyncResult<T::Output> {
        self.submit_all::<T, T::Args>([args], blocking)
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
        self.stream::<T, I>(items, true)
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
        self.stream::<T, I>(items, false)
    }

    /// The stream of `imap` (`ordered`) or `imap_unordered`.
    fn stream<T: UnaryTask, I>(self, items: I, ordered: bool) -> IMap<T, I::IntoIter>
    where
        I: IntoIterator<Item = T::Arg>,
    {
        let spec = Self::registered::<T>().map(|task| self.chunk_spec::<T>(task));
        IMap::new(
            self.pool,
            items.into_iter(),
            spec,
            self.policy.chunking,
            ordered,
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
    /// encodings are identical), queues the chunks, and returns the handle. `blocking`: the
    /// caller waits for the outcomes as soon as this returns, so the last chunk may run from
    /// its thread (see `Shared::submit_and_wait`).
    fn submit_all<T: Task, A: Serialize + 'static>(
        self,
        items: impl IntoIterator<Item = A>,
        blocking: bool,
    ) -> AsyncResult<Vec<T::Output>> {
        let items = items.into_iter();
        match items.size_hint() {
            (low, Some(high)) if low == high => self.submit_stream::<T, A>(items, low, blocking),
            // Unknown length: the chunk size depends on it, so the input is collected first
            // (as Python's `map` does). `imap` is the lazy alternative.
            _ => {
                let items: Vec<A> = items.collect();
                let len = items.len();
                self.submit_stream::<T, A>(items.into_iter(), len, blocking)
            }
        }
    }

    /// Encodes and queues the input chunk by chunk, so workers start on the first chunk while
    /// the rest is being encoded. `len` sizes the chunks; the input is read to its end
    /// whatever it is.
    fn submit_stream<T: Task, A: Serialize + 'static>(
        self,
        mut items: impl Iterator<Item = A>,
        len: usize,
        blocking: bool,
    ) -> AsyncResult<Vec<T::Output>> {
        let state = CallState::<T::Output>::new(T::NAME, self.pool.shared().spin);
        if len == 0
            && let Some(err) = self.pool.shared().refuses_calls()
        {
            // As Python's `map` of nothing on a closed pool: an error, not an empty list.
            state.refuse();
            return AsyncResult::new(state, move |_| Err(err.with_task(T::NAME)));
        }
        let result = AsyncResult::new(Arc::clone(&state), move |state| {
            collect_in_order(state, len)
        });
        let task = Self::registered::<T>();
        let by_len = self.policy.chunking.for_len(len, self.pool.processes);
        // `Auto` sends one item first and sizes the chunks after it by bytes as well.
        let auto = self.policy.chunking == Chunking::Auto;
        let mut size = if auto { 1 } else { by_len };
        let shared = self.pool.shared();
        // The input goes on being queued if the pool closes meanwhile. One item is queued
        // at once (one chunk, or none if it cannot be encoded), so it needs no stream: a
        // `close()` on another thread comes before the call or after it, as for `apply`'s
        // in Python. That saves `apply` two turns of the pool's lock.
        let stream = if len > 1 { shared.open_stream() } else { None };
        let mut first = 0;
        let mut refused = false;
        loop {
            let batch: Vec<A> = items.by_ref().take(size).collect();
            let count = batch.len();
            if count == 0 {
                break;
            }
            state.expect(count, false);
            let sink: Arc<dyn CallSink> = state.clone();
            let mut chunks = match &task {
                Ok(task) => {
                    encode_chunks(shared, &sink, self.chunk_spec::<T>(*task), first, &batch)
                }
                Err(err) => {
                    sink.fail(first, count, &|index| err.for_item(T::NAME, index));
                    Vec::new()
                }
            };
            drop(batch);
            if auto && let Some(chunk) = chunks.first() {
                size = by_len.min(byte_cap(chunk.item_bytes()));
            }
            first += count;
            if refused {
                // Once refused (a closed pool), the rest fails without being offered.
                for chunk in chunks {
                    chunk.fail_all(&|index| {
                        Error::closed("the pool is closed")
                            .with_task(T::NAME)
                            .with_index(index)
                    });
                }
                continue;
            }
            let last = (blocking && first >= len).then(|| chunks.pop()).flatten();
            if !chunks.is_empty() {
                refused = shared.submit(stream.as_ref(), chunks).is_err();
            }
            if let Some(last) = last {
                refused |= if refused {
                    shared.submit(stream.as_ref(), [last])
                } else {
                    shared.submit_and_wait(stream.as_ref(), last)
                }
                .is_err();
            }
        }
        drop(stream);
        state.expect(0, true);
        result
    }
}
