//! [`IMap`]: the lazy streams of `imap` and `imap_unordered`.
//!
//! The input is pulled on the caller's thread, only while fewer than a window of items are
//! outstanding (submitted, not yet yielded). That bounds memory whatever the input's length
//! (an infinite iterator included), unlike Python's `imap`, which reads its input ahead.

use crate::chunk::{ChunkSpec, Chunking, byte_cap, encode_chunks};
use crate::error::Error;
use crate::pool::Pool;
use crate::result::{CallState, Outcomes, OutcomesIter};
use crate::sched::{CallSink, Shared, Stream};
use crate::task::Task;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunks of this duration amortise the per-message cost while keeping the stream lively.
const TARGET_CHUNK_TIME: Duration = Duration::from_millis(2);
/// Upper bound of an adaptive chunk.
const MAX_AUTO_CHUNK: usize = 1 << 14;
/// Items kept in flight per worker, at least, while they are small and short: enough for each
/// slot to keep a deep queue of short chunks in its worker (`slot::MAX_PREFETCH`) and for
/// results to come back in large batches. One item per message costs a fraction as much per
/// item with this depth as with ten chunks per worker (see BENCHMARKS.md, W1').
const WINDOW_ITEMS: usize = 64;
/// ... unless their encoded arguments or results (the largest seen) would take more than
/// this: large items keep to ten chunks per worker.
const WINDOW_BYTES: usize = 16 << 20;
/// ... or they would take longer than this per worker to run: slow items keep to ten chunks
/// per worker, so that other calls' work is not queued behind a deep stream of them.
const WINDOW_TIME: Duration = Duration::from_millis(4);

/// The iterator returned by [`Pool::imap`] (outputs in input order) and
/// [`Pool::imap_unordered`] (outputs in completion order). Each item is the task's output for
/// one input, or that input's error; the stream goes on after an error.
///
/// It pulls its input lazily, keeps a bounded number of items in flight, and does not borrow
/// the pool: it may outlive it, in which case the items the pool could not finish come out
/// as errors of kind [`ErrorKind::Closed`](crate::ErrorKind::Closed). A stream made before
/// [`Pool::close`] runs to its end, as Python's does, until [`Pool::join`] begins: read it
/// before joining. (Its input is pulled on the thread that reads it, so an input that waits
/// for the stream's own outputs, a crawler's frontier fed by its results, say, waits
/// forever: feed such work with `apply_async` instead.) Dropping it stops
/// feeding and discards outstanding outputs without waiting for them. An item's error is
/// one of those listed for [`Pool::map`], and names the task and the item's input position.
///
/// # Examples
///
/// ```no_run
/// # use multiproc::{Pool, task};
/// # #[task] fn square(x: u64) -> u64 { x * x }
/// # fn main() -> Result<(), multiproc::Error> {
/// # let pool = Pool::new(2)?;
/// let first: Vec<u64> = pool.imap(square, 0..).take(3).collect::<Result<_, _>>()?;
/// assert_eq!(first, vec![0, 1, 4]);
/// # Ok(())
/// # }
/// ```
#[must_use = "an IMap does nothing unless iterated"]
pub struct IMap<T: Task, I> {
    shared: Arc<Shared>,
    state: Arc<CallState<T::Output>>,
    input: Option<I>,
    /// While there is input to pull, if the pool was running when the stream was made: its
    /// work is queued after `close()` too, until `join()`.
    stream: Option<Stream>,
    spec: Result<ChunkSpec, Error>,
    chunking: Chunking,
    ordered: bool,
    workers: usize,
    /// Index of the next input item to submit.
    submitted: usize,
    /// Outputs handed to the caller.
    yielded: usize,
    /// Outputs received from the pool (yielded or waiting here).
    arrived: usize,
    /// The batch being yielded.
    current: OutcomesIter<T::Output>,
    /// Ordered mode: index of the next output to yield, and batches that came early, by
    /// their first index.
    next_index: usize,
    early: BTreeMap<usize, Outcomes<T::Output>>,
    /// Adaptive chunking: size of the last chunk, its encoded arguments per item (which cap
    /// the next chunk's size), the largest of those so far (which bounds the window), and
    /// when the stream started.
    last_chunk: usize,
    item_bytes: usize,
    largest_item_bytes: usize,
    started: Instant,
    /// Why a call of no items was refused (a closed pool): yielded once.
    refused: Option<Error>,
}

impl<T: Task, I: Iterator> IMap<T, I>
where
    I::Item: Serialize + 'static,
{
    pub(crate) fn new(
        pool: &Pool,
        input: I,
        spec: Result<ChunkSpec, Error>,
        chunking: Chunking,
        ordered: bool,
    ) -> Self {
        IMap {
            shared: Arc::clone(pool.shared()),
            state: CallState::new(T::NAME, pool.shared().spin),
            input: Some(input),
            stream: pool.shared().open_stream(),
            spec,
            chunking,
            ordered,
            workers: pool.processes(),
            submitted: 0,
            yielded: 0,
            arrived: 0,
            current: Outcomes::Values(Vec::new()).into_iter(),
            next_index: 0,
            early: BTreeMap::new(),
            last_chunk: 0,
            item_bytes: 0,
            largest_item_bytes: 0,
            started: Instant::now(),
            refused: None,
        }
    }

    /// Items that may be outstanding: enough chunks per worker that each has one running and
    /// several queued (short chunks are sent ahead in batches), while the caller consumes;
    /// for small, short items, up to [`WINDOW_ITEMS`] per worker within [`WINDOW_BYTES`] and
    /// [`WINDOW_TIME`].
    // Float arithmetic on counts far below 2^52, and a positive, clamped result.
    #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
    fn window(&self, chunk: usize) -> usize {
        let by_chunks = chunk.saturating_mul(self.workers).saturating_mul(10);
        // Not before results have come back, which says how large they are and times the
        // items (automatic chunks start at one item: a deep window then would fill with
        // one-item chunks).
        let Some(result_bytes) = self.state.largest_result() else {
            return by_chunks;
        };
        if self.measuring() || self.arrived == 0 {
            return by_chunks;
        }
        let item_bytes = self.largest_item_bytes.max(result_bytes).max(1);
        // Wall time per item per worker so far (an overestimate while the caller is slow to
        // consume, which only makes the window shallower).
        let per_item =
            self.started.elapsed().as_secs_f64() * self.workers as f64 / self.arrived as f64;
        let by_time = (WINDOW_TIME.as_secs_f64() / per_item.max(1e-9)) as usize;
        let per_worker = WINDOW_ITEMS.min(by_time);
        by_chunks.max((per_worker * self.workers).min(WINDOW_BYTES / item_bytes))
    }

    /// Automatic chunking, before enough results have arrived to time the items.
    fn measuring(&self) -> bool {
        self.chunking == Chunking::Auto && self.arrived < self.workers * 2
    }

    // Float arithmetic on counts far below 2^52, and a positive, clamped result.
    #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
    fn chunk_size(&self) -> usize {
        match self.chunking {
            Chunking::Fixed(size) => size.max(1),
            Chunking::Auto => {
                if self.measuring() {
                    return 1;
                }
                let done = self.arrived;
                // Wall time per item per worker, so far; the next chunk aims at the target
                // duration and grows at most twofold per step.
                let per_item =
                    self.started.elapsed().as_secs_f64() * self.workers as f64 / done as f64;
                let ideal = (TARGET_CHUNK_TIME.as_secs_f64() / per_item.max(1e-9)) as usize;
                ideal
                    .clamp(1, MAX_AUTO_CHUNK)
                    .min(self.last_chunk.max(1) * 2)
                    .min(byte_cap(self.item_bytes))
            }
        }
    }

    /// Pulls and submits input while the window has room.
    fn feed(&mut self) {
        loop {
            if self.input.is_none() {
                self.stream = None;
                return;
            }
            let size = self.chunk_size();
            if self.submitted - self.yielded >= self.window(size) {
                return;
            }
            let input = self.input.as_mut().expect("checked above");
            let items: Vec<I::Item> = input.by_ref().take(size).collect();
            // An input that says it has nothing left (an exact-size one, read to its end) is
            // ended now: its stream must not wait for the next read to find that out, as a
            // closing pool's workers wait for it.
            let exhausted = items.len() < size || input.size_hint().1 == Some(0);
            if exhausted {
                self.input = None;
            }
            let count = items.len();
            self.state.expect(count, exhausted);
            if count == 0 {
                let streamed = self.stream.take().is_some();
                if self.submitted == 0 && !streamed {
                    // A call of no items made on a pool that takes no calls says so, once
                    // (one made before `close()`, with its stream, just ends).
                    self.refused = self
                        .shared
                        .refuses_calls()
                        .map(|err| err.with_task(T::NAME));
                }
                return;
            }
            let first = self.submitted;
            self.submitted += count;
            self.last_chunk = count;
            let sink: Arc<dyn CallSink> = self.state.clone();
            let spec = match &self.spec {
                Ok(spec) => *spec,
                Err(err) => {
                    sink.fail(first, count, &|index| err.for_item(T::NAME, index));
                    continue;
                }
            };
            let chunks = encode_chunks(&self.shared, &sink, spec, first, &items);
            drop(items);
            for chunk in &chunks {
                self.item_bytes = chunk.item_bytes();
                self.largest_item_bytes = self.largest_item_bytes.max(self.item_bytes);
            }
            if self.shared.submit(self.stream.as_ref(), chunks).is_err() {
                // The pool is gone: the refused items come out as errors; stop there.
                self.input = None;
                self.state.expect(0, true);
            }
        }
    }
}

impl<T: Task, I: Iterator> Iterator for IMap<T, I>
where
    I::Item: Serialize + 'static,
{
    type Item = Result<T::Output, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(output) = self.current.next() {
                self.yielded += 1;
                self.next_index += 1;
                return Some(output);
            }
            if self.ordered
                && let Some(batch) = self.early.remove(&self.next_index)
            {
                self.current = batch.into_iter();
                continue;
            }
            self.feed();
            if let Some(err) = self.refused.take() {
                return Some(Err(err));
            }
            let mut inbox = self
                .state
                .wait_until(None, |inbox| !inbox.ready.is_empty() || inbox.pending == 0);
            let Some(batch) = inbox.ready.pop_front() else {
                drop(inbox);
                if self.input.is_none() && self.early.is_empty() {
                    return None;
                }
                continue;
            };
            self.arrived += batch.outcomes.len();
            if self.ordered {
                self.early.insert(batch.first, batch.outcomes);
                for batch in inbox.ready.drain(..) {
                    self.arrived += batch.outcomes.len();
                    self.early.insert(batch.first, batch.outcomes);
                }
            } else {
                self.current = batch.outcomes.into_iter();
            }
        }
    }

    /// At least the outputs still owed for the input already pulled (each item pulled yields
    /// one, a value or an error); at most those and what the input's own hint allows.
    fn size_hint(&self) -> (usize, Option<usize>) {
        let owed = self.submitted - self.yielded + usize::from(self.refused.is_some());
        let input = self
            .input
            .as_ref()
            .map_or(Some(0), |input| input.size_hint().1);
        (owed, input.and_then(|left| owed.checked_add(left)))
    }
}

impl<T: Task, I> Drop for IMap<T, I> {
    fn drop(&mut self) {
        // Queued chunks of this call are skipped; outputs still arriving are discarded.
        self.state.abandon();
    }
}

impl<T: Task, I> std::fmt::Debug for IMap<T, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IMap")
            .field("task", &T::NAME)
            .field("ordered", &self.ordered)
            .field("submitted", &self.submitted)
            .field("yielded", &self.yielded)
            .finish_non_exhaustive()
    }
}
