//! The typed state of one call, and [`AsyncResult`], the handle to its outcome.
//!
//! Slots decode outcomes on their own threads and store them in the call's [`CallState`];
//! the caller's handle only waits and assembles. Because the handle owns the state (not the
//! pool), an outcome that arrived stays readable after the pool is closed or dropped, and
//! work the pool can no longer finish is failed with [`ErrorKind::Closed`](crate::ErrorKind)
//! by the pool as it stops: nothing waits forever.

use crate::error::{Error, ErrorKind};
use crate::outcome::{self, Outcome};
use crate::sched::CallSink;
use crate::task::Payload;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// Set on the pool's own threads (see [`contained`]).
    static POOL_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one of the pool's own, which serve workers.
pub(crate) fn mark_pool_thread() {
    POOL_THREAD.set(true);
}

/// Runs `f`, which runs the user's code: a `Drop` of outputs nobody read, a waker. On a
/// pool thread, a panic in it is caught there (after the panic hook has reported it), so
/// that the thread goes on serving its worker: unwound, it would leave the chunks it had in
/// flight unanswered, and calls waiting for them waiting forever. Elsewhere it unwinds as
/// usual, in the user's own thread.
fn contained(f: impl FnOnce()) {
    if POOL_THREAD.get() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    } else {
        f();
    }
}

/// Outcomes of one call, filled by slots, drained by the caller.
pub(crate) struct CallState<O> {
    id: u64,
    task: &'static str,
    inbox: Mutex<Inbox<O>>,
    changed: Condvar,
    /// How long a waiting thread polls before it sleeps.
    spin: Duration,
    /// Deliveries so far (batches stored, expectations changed), for a polling waiter.
    stores: AtomicU64,
    /// The largest encoded outcome per item of any delivery so far, plus one (0: none yet):
    /// the size of the results, for `imap` to bound what it keeps in flight.
    largest_result: AtomicU64,
}

pub(crate) struct Inbox<O> {
    /// Outcomes in arrival order, in batches of consecutive items.
    pub ready: VecDeque<Batch<O>>,
    /// Items submitted whose outcome has not arrived.
    pub pending: usize,
    /// No more items will be submitted.
    pub sealed: bool,
    /// Some item failed.
    pub failed: bool,
    /// Nobody will read the outcomes any more.
    pub abandoned: bool,
    /// Threads blocked in `wait_until`: with none, a delivery makes no wake-up system call.
    waiters: usize,
    waker: Option<Waker>,
}

impl<O> Drop for CallState<O> {
    /// Outputs nobody read are dropped where the last handle to the call goes: a pool thread
    /// when the caller dropped its `AsyncResult` before they came.
    fn drop(&mut self) {
        let inbox = self.inbox.get_mut().unwrap_or_else(PoisonError::into_inner);
        let unread = std::mem::take(&mut inbox.ready);
        contained(|| drop(unread));
    }
}

/// Outcomes of consecutive items `first..first + outcomes.len()`: one batch per delivery,
/// so storing and assembling cost one operation per chunk, not per item.
pub(crate) struct Batch<O> {
    pub first: usize,
    pub outcomes: Outcomes<O>,
}

/// A batch's outcomes. A chunk with no failure (the common case) is kept as plain values, so
/// assembling a `map` moves whole vectors instead of unwrapping a `Result` per item.
pub(crate) enum Outcomes<O> {
    Values(Vec<O>),
    Mixed(Vec<Result<O, Error>>),
}

impl<O> Outcomes<O> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Outcomes::Values(values) => values.len(),
            Outcomes::Mixed(outcomes) => outcomes.len(),
        }
    }

    fn has_error(&self) -> bool {
        matches!(self, Outcomes::Mixed(outcomes) if outcomes.iter().any(Result::is_err))
    }
}

impl<O> IntoIterator for Outcomes<O> {
    type Item = Result<O, Error>;
    type IntoIter = OutcomesIter<O>;

    fn into_iter(self) -> OutcomesIter<O> {
        match self {
            Outcomes::Values(values) => OutcomesIter::Values(values.into_iter()),
            Outcomes::Mixed(outcomes) => OutcomesIter::Mixed(outcomes.into_iter()),
        }
    }
}

/// Iterates a batch's outcomes as `Result`s.
pub(crate) enum OutcomesIter<O> {
    Values(std::vec::IntoIter<O>),
    Mixed(std::vec::IntoIter<Result<O, Error>>),
}

impl<O> Iterator for OutcomesIter<O> {
    type Item = Result<O, Error>;

    fn next(&mut self) -> Option<Result<O, Error>> {
        match self {
            OutcomesIter::Values(values) => values.next().map(Ok),
            OutcomesIter::Mixed(outcomes) => outcomes.next(),
        }
    }
}

impl<O> Inbox<O> {
    pub(crate) fn is_complete(&self) -> bool {
        self.sealed && self.pending == 0
    }
}

impl<O: Payload> CallState<O> {
    /// `spin`: how long a waiting thread polls before it sleeps (the pool's `Shared::spin`).
    pub(crate) fn new(task: &'static str, spin: Duration) -> Arc<CallState<O>> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Arc::new(CallState {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            task,
            inbox: Mutex::new(Inbox {
                ready: VecDeque::new(),
                pending: 0,
                sealed: false,
                failed: false,
                abandoned: false,
                waiters: 0,
                waker: None,
            }),
            changed: Condvar::new(),
            spin,
            stores: AtomicU64::new(0),
            largest_result: AtomicU64::new(0),
        })
    }

    /// The largest encoded outcome per item (averaged within each delivery) delivered so
    /// far; `None` before any.
    pub(crate) fn largest_result(&self) -> Option<usize> {
        let plus_one = self.largest_result.load(Ordering::Relaxed).checked_sub(1)?;
        Some(usize::try_from(plus_one).unwrap_or(usize::MAX))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inbox<O>> {
        // Every update is a short, panic-free sequence: a poisoned lock is still consistent.
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A call refused as a whole (no items to fail one by one): complete, and failed.
    pub(crate) fn refuse(&self) {
        self.lock().failed = true;
        self.expect(0, true);
    }

    /// Counts `items` more submitted items; `seal` when the input is exhausted.
    pub(crate) fn expect(&self, items: usize, seal: bool) {
        let mut inbox = self.lock();
        inbox.pending += items;
        inbox.sealed |= seal;
        let done = inbox.is_complete();
        let waker = done.then(|| inbox.waker.take()).flatten();
        let notify = done && inbox.waiters > 0;
        drop(inbox);
        self.stores.fetch_add(1, Ordering::Release);
        if notify {
            self.changed.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Blocks until `ready(inbox)` holds or `deadline` passes; returns the guard either way.
    /// Looks again without sleeping for up to the pool's spin window first (see
    /// `worker::SPIN`): outcomes of short tasks arrive within microseconds, and a sleeping
    /// thread takes longer to wake.
    pub(crate) fn wait_until(
        &self,
        deadline: Option<Instant>,
        ready: impl Fn(&Inbox<O>) -> bool,
    ) -> MutexGuard<'_, Inbox<O>> {
        let mut inbox = self.lock();
        if !ready(&inbox) && !self.spin.is_zero() {
            // Polls a counter of deliveries, not the lock, so as not to slow the deliveries.
            // Never past the caller's deadline; `None`: no end (a window too long to add).
            let until = match (deadline, Instant::now().checked_add(self.spin)) {
                (Some(deadline), Some(window)) => Some(deadline.min(window)),
                (deadline, window) => deadline.or(window),
            };
            let polling = || until.is_none_or(|until| Instant::now() < until);
            while !ready(&inbox) && polling() {
                let seen = self.stores.load(Ordering::Acquire);
                drop(inbox);
                while self.stores.load(Ordering::Acquire) == seen && polling() {
                    std::thread::yield_now();
                }
                inbox = self.lock();
            }
        }
        while !ready(&inbox) {
            let left = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
            if left.is_some_and(|left| left.is_zero()) {
                break;
            }
            inbox.waiters += 1;
            inbox = match left {
                None => self
                    .changed
                    .wait(inbox)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(left) => {
                    self.changed
                        .wait_timeout(inbox, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            inbox.waiters -= 1;
        }
        inbox
    }

    pub(crate) fn abandon(&self) {
        let mut inbox = self.lock();
        inbox.abandoned = true;
        inbox.ready.clear();
    }

    fn store(&self, batch: Batch<O>) {
        let mut inbox = self.lock();
        inbox.pending -= batch.outcomes.len();
        let unread = if inbox.abandoned {
            Some(batch)
        } else {
            inbox.failed |= batch.outcomes.has_error();
            inbox.ready.push_back(batch);
            None
        };
        // A future is woken once, when the work is done, not for each batch on the way.
        let waker = inbox.is_complete().then(|| inbox.waker.take()).flatten();
        let notify = inbox.waiters > 0;
        drop(inbox);
        contained(|| drop(unread));
        self.stores.fetch_add(1, Ordering::Release);
        if notify {
            self.changed.notify_all();
        }
        if let Some(waker) = waker {
            contained(|| waker.wake());
        }
    }

    /// Decodes the outcomes of items `first..first + count`.
    fn decode(&self, first: usize, count: usize, outcomes: &[u8]) -> Outcomes<O> {
        // Plain values until the first failure, then results from there on.
        let mut values = Vec::with_capacity(count);
        let mut mixed: Option<Vec<Result<O, Error>>> = None;
        let mut rest = outcomes;
        for index in first..first + count {
            match outcome::decode::<O>(rest) {
                Ok((Outcome::Ok(value), tail)) => {
                    rest = tail;
                    match &mut mixed {
                        None => values.push(value),
                        Some(outcomes) => outcomes.push(Ok(value)),
                    }
                }
                Ok((failure, tail)) => {
                    rest = tail;
                    let outcomes = mixed.get_or_insert_with(|| values.drain(..).map(Ok).collect());
                    outcomes.push(self.convert(index, failure));
                }
                Err(err) => {
                    // The stream position is lost: this item and the rest of the frame fail.
                    let outcomes = mixed.get_or_insert_with(|| values.drain(..).map(Ok).collect());
                    for index in index..first + count {
                        let error = Error::codec("the result could not be decoded", err.clone());
                        outcomes.push(Err(error.with_task(self.task).with_index(index)));
                    }
                    break;
                }
            }
        }
        match mixed {
            None => Outcomes::Values(values),
            Some(outcomes) => Outcomes::Mixed(outcomes),
        }
    }

    fn convert(&self, index: usize, outcome: Outcome<O>) -> Result<O, Error> {
        outcome
            .into_result()
            .map_err(|err| err.with_task(self.task).with_index(index))
    }
}

impl<O: Payload> CallSink for CallState<O> {
    fn id(&self) -> u64 {
        self.id
    }

    fn task_name(&self) -> &'static str {
        self.task
    }

    fn deliver(&self, first: usize, count: u32, outcomes: &[u8]) {
        let per_item = outcomes.len() as u64 / u64::from(count.max(1));
        self.largest_result
            .fetch_max(per_item.saturating_add(1), Ordering::Relaxed);
        // A `Deserialize` impl of the user's may panic: that fails these items, and neither
        // the slot thread nor a caller running a chunk itself unwinds through the pool.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decode(first, count as usize, outcomes)
        }));
        let outcomes = decoded.unwrap_or_else(|panic| {
            let message = crate::worker::panic_message(&*panic);
            Outcomes::Mixed(
                (first..first + count as usize)
                    .map(|index| {
                        Err(Error::new(
                            ErrorKind::Codec,
                            format!("decoding the result panicked: {message}"),
                        )
                        .with_task(self.task)
                        .with_index(index))
                    })
                    .collect(),
            )
        });
        self.store(Batch { first, outcomes });
    }

    fn fail(&self, first: usize, count: usize, error: &dyn Fn(usize) -> Error) {
        let outcomes = (first..first + count)
            .map(|index| Err(error(index)))
            .collect();
        self.store(Batch {
            first,
            outcomes: Outcomes::Mixed(outcomes),
        });
    }

    fn abandoned(&self) -> bool {
        self.lock().abandoned
    }
}

/// What an [`AsyncResult`] needs of a call, whatever its output type.
trait Completion: Send + Sync {
    fn is_complete(&self) -> bool;
    fn has_failed(&self) -> bool;
    /// Waits until complete or `deadline`; true when complete.
    fn wait(&self, deadline: Option<Instant>) -> bool;
    /// Registers `waker` unless already complete; true when complete.
    fn register(&self, waker: &Waker) -> bool;
    /// The task the call runs.
    fn task(&self) -> &'static str;
}

impl<O: Payload> Completion for CallState<O> {
    fn is_complete(&self) -> bool {
        self.lock().is_complete()
    }

    fn has_failed(&self) -> bool {
        self.lock().failed
    }

    fn wait(&self, deadline: Option<Instant>) -> bool {
        self.wait_until(deadline, Inbox::is_complete).is_complete()
    }

    fn register(&self, waker: &Waker) -> bool {
        let mut inbox = self.lock();
        if inbox.is_complete() {
            return true;
        }
        match &mut inbox.waker {
            Some(existing) if existing.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
        false
    }

    fn task(&self) -> &'static str {
        self.task
    }
}

type Finish<T> = Box<dyn FnOnce() -> Result<T, Error> + Send>;

/// The outcome of work submitted with `map_async`, `starmap_async` or `apply_async`: check
/// it, wait for it, or take it, now or later. It also implements [`Future`], with no
/// dependency on any async runtime.
///
/// It owns what it needs: a result whose work completed stays readable after the pool was
/// closed or dropped, and work the pool can no longer run resolves to an error of kind
/// [`ErrorKind::Closed`]. Waiting never hangs on a pool that is gone.
///
/// # Examples
///
/// ```rust,standalone_crate
/// # use multiproc::{Pool, task};
/// # #[task] fn square(x: u64) -> u64 { x * x }
/// # #[multiproc::main]
/// # fn main() -> Result<(), multiproc::Error> {
/// let pool = Pool::new(4)?;
/// let result = pool.map_async(square, 0..8u64);
/// // ... do something else meanwhile ...
/// result.wait();                     // Python's "wait inside the pool's scope"
/// drop(pool);
/// assert_eq!(result.get()?, vec![0, 1, 4, 9, 16, 25, 36, 49]); // "get outside"
/// # Ok(())
/// # }
/// ```
#[must_use = "the work runs either way; an AsyncResult that is never read discards its outcome"]
pub struct AsyncResult<T> {
    state: Arc<dyn Completion>,
    finish: Option<Finish<T>>,
}

impl<T> AsyncResult<T> {
    pub(crate) fn new<O: Payload>(
        state: Arc<CallState<O>>,
        finish: impl FnOnce(&CallState<O>) -> Result<T, Error> + Send + 'static,
    ) -> AsyncResult<T> {
        let owned = Arc::clone(&state);
        AsyncResult {
            state,
            finish: Some(Box::new(move || finish(&owned))),
        }
    }

    /// True when the work is done (successfully or not). Never blocks.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.apply_async(pow, (2, 10));
    /// while !r.ready() { /* do something useful */ }
    /// # Ok(())
    /// # }
    /// ```
    pub fn ready(&self) -> bool {
        self.state.is_complete()
    }

    /// Whether the work succeeded: `None` while it is not done.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.map_async(square, [1, 2]);
    /// r.wait();
    /// assert_eq!(r.successful(), Some(true));
    /// # Ok(())
    /// # }
    /// ```
    pub fn successful(&self) -> Option<bool> {
        self.ready().then(|| !self.state.has_failed())
    }

    /// Blocks until the work is done.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.map_async(square, 0..100);
    /// r.wait();
    /// assert!(r.ready());
    /// # Ok(())
    /// # }
    /// ```
    pub fn wait(&self) {
        self.state.wait(None);
    }

    /// Blocks until the work is done or `timeout` passes; true when done. Nothing is killed
    /// when it returns false: the work goes on.
    ///
    /// ```no_run
    /// # use multiproc::{Pool, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) -> u64 { std::thread::sleep(std::time::Duration::from_secs(secs)); secs }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let r = pool.apply_async(slow, (10,));
    /// if !r.wait_timeout(Duration::from_secs(1)) { println!("still running"); }
    /// # Ok(())
    /// # }
    /// ```
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.state.wait(Instant::now().checked_add(timeout))
    }

    /// Waits for the work and returns its outcome.
    ///
    /// # Errors
    ///
    /// The error of the first failing item by input position (for `apply_async`, of its one
    /// call): [`ErrorKind::Panicked`],
    /// [`Crashed`](crate::ErrorKind::Crashed), [`Timeout`](crate::ErrorKind::Timeout) (a
    /// task's deadline), [`Codec`](crate::ErrorKind::Codec),
    /// [`Closed`](crate::ErrorKind::Closed) (the pool was closed before the call, or
    /// terminated before the item finished) or
    /// [`Spawn`](crate::ErrorKind::Spawn) (no worker could be started).
    ///
    /// # Examples
    ///
    /// ```rust,standalone_crate
    /// # use multiproc::{Pool, task};
    /// # #[task] fn square(x: u64) -> u64 { x * x }
    /// # #[multiproc::main]
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// let squares = pool.map_async(square, [1, 2, 3]).get()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn get(mut self) -> Result<T, Error> {
        self.state.wait(None);
        self.take()
    }

    /// Like [`get`](Self::get), but gives up after `timeout` with an error of kind
    /// [`ErrorKind::Timeout`]. Python's semantics: nothing is
    /// killed, the work goes on and its worker is freed when it ends. To keep the result
    /// after a timeout, use [`wait_timeout`](Self::wait_timeout) and then `get`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Timeout`] when the work is not done within
    /// `timeout`; otherwise those of [`get`](Self::get).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{ErrorKind, Pool, task};
    /// # use std::time::Duration;
    /// # #[task] fn sleep_secs(secs: u64) -> u64 { std::thread::sleep(std::time::Duration::from_secs(secs)); secs }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let pool = Pool::new(2)?;
    /// match pool.map_async(sleep_secs, 0..8).get_timeout(Duration::from_secs(5)) {
    ///     Ok(values) => println!("{values:?}"),
    ///     Err(err) if err.kind() == ErrorKind::Timeout => println!("TimeoutError"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn get_timeout(mut self, timeout: Duration) -> Result<T, Error> {
        if self.state.wait(Instant::now().checked_add(timeout)) {
            self.take()
        } else {
            Err(Error::wait_timeout(timeout).with_task(self.state.task()))
        }
    }

    /// Converts the value once it is taken.
    pub(crate) fn map_output<U>(mut self, f: impl FnOnce(T) -> U + Send + 'static) -> AsyncResult<U>
    where
        T: 'static,
    {
        let finish = self.finish.take().expect("a fresh AsyncResult");
        AsyncResult {
            state: Arc::clone(&self.state),
            finish: Some(Box::new(move || finish().map(f))),
        }
    }

    fn take(&mut self) -> Result<T, Error> {
        let finish = self.finish.take().expect("an AsyncResult is taken once");
        finish()
    }
}

/// Awaiting an `AsyncResult` gives what [`get`](AsyncResult::get) returns, without blocking
/// the executor's thread: the pool's threads wake the task when the work is done.
///
/// # Panics
///
/// Polling it again after it returned `Poll::Ready` panics, as the outcome was taken.
///
/// # Examples
///
/// ```no_run
/// # use multiproc::{Pool, task};
/// # #[task] fn square(x: u64) -> u64 { x * x }
/// async fn squares(pool: &Pool) -> Result<Vec<u64>, multiproc::Error> {
///     pool.map_async(square, [1, 2, 3]).await
/// }
/// # fn main() {}
/// ```
impl<T> Future for AsyncResult<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        assert!(
            self.finish.is_some(),
            "AsyncResult polled after it completed"
        );
        if self.state.register(cx.waker()) {
            Poll::Ready(self.take())
        } else {
            Poll::Pending
        }
    }
}

impl<T> std::fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

/// Assembles a complete call's outcomes in input order: the values, or the error of the
/// lowest-indexed failing item. `len` (the expected count) only sizes the result.
pub(crate) fn collect_in_order<O: Payload>(
    state: &CallState<O>,
    len: usize,
) -> Result<Vec<O>, Error> {
    let mut batches: Vec<Batch<O>> = state.lock().ready.drain(..).collect();
    // Batches partition the input; chunks usually complete in order, so this sort is cheap.
    batches.sort_unstable_by_key(|batch| batch.first);
    let mut values = Vec::with_capacity(len);
    for batch in batches {
        debug_assert_eq!(batch.first, values.len(), "batches partition the input");
        match batch.outcomes {
            Outcomes::Values(mut batch) => values.append(&mut batch),
            Outcomes::Mixed(outcomes) => {
                for outcome in outcomes {
                    values.push(outcome?); // the lowest-indexed error, since batches are sorted
                }
            }
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An awaited result is woken when its work is done, not for each batch on the way: a
    /// large `map_async` under an executor is polled twice, not once per chunk.
    #[test]
    fn a_future_is_woken_once_when_the_work_is_done() {
        let state = CallState::<u64>::new("t", Duration::ZERO);
        state.expect(2, true);
        let woken = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&woken));
        assert!(!state.register(&waker));
        state.fail(0, 1, &|_| Error::closed("one"));
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            0,
            "woken for a batch on the way"
        );
        assert!(!state.register(&waker));
        state.fail(1, 1, &|_| Error::closed("two"));
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "woken when done");
        assert!(state.register(&waker));
    }
}
