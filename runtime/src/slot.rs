//! A slot: the parent-side thread that owns one worker process.
//!
//! The slot pulls chunks from the shared queue when its worker has room, writes their frames,
//! reads results and hands them to each call's sink. Its socket is non-blocking and driven by
//! `poll`, so a large request and a large reply can never block each other.
//!
//! Prefetch: while chunks are short (under [`PREFETCH_BELOW`]), the slot keeps more chunks
//! queued in the worker's socket behind the running one, so the worker never waits a round
//! trip for its next chunk: seven, or as many as make [`PREFETCH_BELOW`] of work when chunks
//! are shorter than that, up to [`MAX_PREFETCH`] in flight (`Slot::prefetch_depth`). Long
//! chunks are never queued behind a busy worker: a round trip is negligible next to them,
//! and a queued chunk could wait there while another worker sits idle.
//!
//! The slot is also the worker's supervisor. It watches the worker's stderr until the worker
//! first writes there, then hands it to the stderr forwarder (`stderr`), which keeps the last
//! lines for error reports; it wakes at the running item's deadline and kills the worker
//! (and its process group) past it; it notices the worker's death (its pidfd, or the end of
//! the channel), reads the status page to blame exactly the item that was running, puts the
//! rest back in the queue, and starts a replacement; it replaces a worker that has run
//! `max_tasks_per_child` items.
//! Workers are spawned from this thread, which lives as long as the pool: on Linux the
//! parent-death signal fires when the spawning *thread* exits.

use crate::error::{Error, ErrorKind};
use crate::protocol::{self, FrameReader, Header};
use crate::region::{Region, SHARED_MIN};
use crate::sched::{Chunk, Next, Shared, terminated};
use crate::spawn::{
    Launched, SpawnOptions, Watched, WorkerProcess, check_ready, describe_status, status_parts,
    watch,
};
use crate::status::{self, Published, monotonic_ns};
use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::socket::MsgFlags;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

/// How long a terminating pool lets an idle worker take to exit cleanly before killing it.
const TERMINATE_GRACE: Duration = Duration::from_secs(1);

/// How often a slot looks at the status page while chunks with a deadline are in flight but
/// none has started yet (at most; a quarter of the shortest timeout if that is less).
const RECHECK: Duration = Duration::from_millis(20);
/// Beyond the deadlines of the items left in the front chunk (and one more), how long the
/// slot waits for it without word from the status page before it takes the worker as past
/// its deadline (see `Slot::next_check`).
const BACKSTOP_GRACE: Duration = Duration::from_secs(1);

/// How often a slot polling without sleeping (`PoolBuilder::spin`) looks at its worker's
/// stderr, which it otherwise polls with the channel: longer than the default window, so
/// that a short spell costs nothing, and short enough that a task writing more than a pipe
/// holds is not held up by a long one.
const SPIN_STDERR_EVERY_NS: u64 = 200_000;

/// Unblamed worker deaths a chunk may see while first in line before its items fail.
const MAX_UNBLAMED_DEATHS: u32 = 3;

/// Regions up to this size are kept while a worker is idle; larger ones are given up once it
/// has been idle for [`TRIM_AFTER`].
const RETAIN_REGION: usize = 32 << 20;

/// See [`RETAIN_REGION`].
pub(crate) const TRIM_AFTER: Duration = Duration::from_secs(1);

/// The most chunks in flight to one worker: deep enough that chunks of a microsecond go
/// out, and come back, in batches of dozens per system call.
const MAX_PREFETCH: usize = 32;

/// Chunks shorter than this are worth queueing ahead of time in a busy worker.
const PREFETCH_BELOW: Duration = Duration::from_millis(2);

/// Settings a slot needs, shared by all slots of a pool.
#[derive(Clone, Debug)]
pub(crate) struct SlotConfig {
    pub spawn: SpawnOptions,
    /// Chunks in flight per worker: one running plus the ones queued behind it.
    pub prefetch: usize,
    /// How long a closing pool waits for an idle worker to exit before killing it.
    pub shutdown_grace: Duration,
    /// Replace a worker once it has run this many items (checked between chunks).
    pub max_tasks_per_child: Option<u64>,
    /// Consecutive failed starts of a replacement worker before the slot gives up.
    pub restart_attempts: u32,
}

struct InFlight {
    chunk: Chunk,
    /// Items of the chunk whose outcomes have arrived.
    done: u32,
    /// What goes on the socket for this chunk, decided when its sending starts
    /// (`Slot::prepare`): `prefix` (regions announced, or the `Shared` frame), then the
    /// chunk's frame unless `shared` (it is in the requests region).
    prepared: bool,
    prefix: Vec<u8>,
    /// Descriptors of the regions `prefix` announces, owned by the slot; they ride on the
    /// first byte, before the chunk's own.
    prefix_fds: Vec<RawFd>,
    shared: bool,
    /// When it was fully written to the worker (monotonic ns), if it has a deadline; 0
    /// until then, and for a chunk without one.
    sent_at: u64,
}

impl InFlight {
    fn new(chunk: Chunk) -> InFlight {
        InFlight {
            chunk,
            done: 0,
            prepared: false,
            prefix: Vec::new(),
            prefix_fds: Vec::new(),
            shared: false,
            sent_at: 0,
        }
    }

    /// The bytes this chunk puts on the socket, in two parts.
    fn wire(&self) -> (&[u8], &[u8]) {
        let frame: &[u8] = if self.shared { &[] } else { &self.chunk.frame };
        (&self.prefix, frame)
    }

    fn wire_len(&self) -> usize {
        let (prefix, frame) = self.wire();
        prefix.len() + frame.len()
    }

    /// Sent as it is, in a batch with others: small, without descriptors, nothing to
    /// announce.
    fn plain(&self) -> bool {
        self.prefix.is_empty() && self.chunk.fds.is_empty() && self.chunk.frame.len() < SHARED_MIN
    }

    /// Fails the items whose outcomes have not arrived, each with `error(index)`.
    fn fail_rest(&self, error: &dyn Fn(usize) -> Error) {
        let first = self.chunk.first + self.done as usize;
        let left = self.chunk.count - self.done;
        self.chunk.call.fail(first, left as usize, error);
    }
}

/// Why a worker is gone.
enum Lost {
    /// End of stream or a failed write: the process died (or closed its channel).
    Died,
    /// Item `item` of `inflight[chunk]` ran past its deadline; we killed the worker.
    TimedOut {
        chunk: usize,
        item: u32,
        after: Duration,
    },
    /// It sent something that breaks the protocol; we kill it.
    Protocol(Error),
}

/// What `next_check` asks of the poll loop.
enum Check {
    /// Kill the worker at `at` if item `item` of `inflight[chunk]` still runs.
    Kill {
        at: u64,
        chunk: usize,
        item: u32,
        after: Duration,
    },
    /// Look at the status page again at `at`.
    Recheck { at: u64 },
    /// Give the worker up at `at` if it has not said `Ready` (see `Slot::awaiting_ready`).
    Start { at: u64 },
}

impl Check {
    fn at(&self) -> u64 {
        match self {
            Check::Kill { at, .. } | Check::Recheck { at } | Check::Start { at } => *at,
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

enum Pumped {
    /// At least one chunk completed: go and refill.
    Progress,
    /// The pool was terminated.
    Stop,
    Lost(Lost),
}

pub(crate) struct Slot {
    index: usize,
    shared: Arc<Shared>,
    config: Arc<SlotConfig>,
    worker: Option<WorkerProcess>,
    /// A worker launched and not yet past its handshake: the first of a slot that starts
    /// without a thread (see [`Slot::dormant`]), taken over by whoever runs the slot first.
    pending: Option<Launched>,
    /// The worker has not said `Ready` yet, which it must by then (monotonic ns): a caller
    /// that borrows a dormant slot sends its chunk first (`run_direct`), and the `Ready`
    /// comes in ahead of the replies.
    awaiting_ready: Option<u64>,
    inflight: VecDeque<InFlight>,
    /// `inflight[..sent_chunks]` are fully written; `sent_bytes` of the next one are.
    sent_chunks: usize,
    sent_bytes: usize,
    reader: FrameReader,
    /// When the front chunk started running as far as the parent can tell (monotonic ns).
    front_since: u64,
    /// When bytes last came from the worker (monotonic ns) while the front chunk had a
    /// deadline: its `Ready`, results on the way.
    heard_ns: u64,
    /// The call of the last completed chunk and how long that chunk ran. Prefetching is
    /// decided per call, from its own measured chunks: a short call must not make the long
    /// one that follows queue its chunks behind one busy worker.
    last_chunk: Option<(u64, Duration)>,
    /// Chunks completed in the frames being handled, and their call (see `time_completed`).
    completed: (u64, u32),
    /// Items the current worker has completed.
    items_run: u64,
    /// Shared regions with the current worker (see `region`): requests, written here;
    /// replies, read here.
    requests: Option<Region>,
    replies: Option<Region>,
    /// Where a reply in `replies` is copied to be decoded (see `on_shared`); kept between
    /// replies, and given up with a large region.
    reply_copy: Vec<u8>,
    /// The number of the last shared frame written to `requests`.
    requests_sent: u64,
    /// How large a replies region the worker's replies call for: the largest reply seen on
    /// the socket that a region could have carried. (Not sized from requests: a large
    /// argument often has a small result, and regions count against `max_memory_per_child`.)
    want_replies: usize,
    /// A first start this slot owes `worker_pids` (see `owe_first_start`).
    owes_first_start: bool,
}

impl Slot {
    pub(crate) fn new(index: usize, shared: Arc<Shared>, config: Arc<SlotConfig>) -> Slot {
        let reader = FrameReader::new(config.spawn.max_frame_len);
        Slot {
            index,
            shared,
            config,
            worker: None,
            pending: None,
            awaiting_ready: None,
            inflight: VecDeque::new(),
            sent_chunks: 0,
            sent_bytes: 0,
            reader,
            front_since: monotonic_ns(),
            heard_ns: 0,
            last_chunk: None,
            completed: (0, 0),
            items_run: 0,
            requests: None,
            replies: None,
            reply_copy: Vec::new(),
            requests_sent: 0,
            want_replies: 0,
            owes_first_start: false,
        }
    }

    /// The slot thread's body. Reports the first worker's start on `ready` while `build` is
    /// listening: it returns once one worker is ready, or fails with the first failure. A
    /// worker that fails to start after that (`build` has returned) is retried as a
    /// replacement would be; if it still cannot start, the pool goes on without this slot.
    /// `launched`: where the thread that builds the pool hands over the first worker, when
    /// it asked the fork server for it (`None` when the server did not start it).
    pub(crate) fn run(
        self,
        ready: Sender<Result<u32, Error>>,
        launched: Option<Receiver<Option<Launched>>>,
    ) {
        crate::result::mark_pool_thread();
        let mut slot = Box::new(self);
        // Counts this slot's first start as done however it ends, a panic included: callers
        // of `worker_pids` wait for it.
        let first_start = FirstStart(Arc::clone(&slot.shared));
        let first = match launched.map(|launched| launched.recv()) {
            // The thread that built the pool failed before it could hand the worker over.
            Some(Err(_)) => Err(Error::closed("the pool was not built")),
            Some(Ok(launched)) => slot.start_worker(launched, 1),
            None => slot.start_worker(None, 1),
        };
        let started = match first {
            Ok(pid) => {
                let _ = ready.send(Ok(pid));
                drop(first_start);
                Ok(())
            }
            Err(err) => {
                // If no worker was ready before, `build` fails with this and terminates the
                // pool; else nobody reads it, and the slot retries as a replacement would,
                // after a back-off that a terminate ends (and not at all once the pool is
                // closing with nothing queued).
                let _ = ready.send(Err(err));
                drop(first_start);
                if slot.shared.retry_after(Duration::from_millis(100)) {
                    slot.start_worker(None, slot.config.restart_attempts)
                        .map(drop)
                        .map_err(Some)
                } else {
                    Err(None)
                }
            }
        };
        drop(ready);
        if let Err(err) = started {
            slot.shared.slot_exited(err.as_ref());
            return;
        }
        let (mut slot, gave_up) = Slot::serve(slot);
        slot.finish();
        slot.shared.slot_exited(gave_up.as_ref());
    }

    /// A slot that starts without a thread: `launched`, a worker the fork server forked,
    /// finishes its start with whoever runs the slot first, a caller that borrows it for a
    /// round trip or the thread that work for it starts ([`Slot::run_resumed`]). A pool
    /// that only ever makes calls of one chunk at a time (`apply`) then runs no thread of
    /// its own.
    pub(crate) fn dormant(mut self, launched: Launched) -> Box<Slot> {
        self.adopt_launched(launched);
        self.shared.first_start_done();
        Box::new(self)
    }

    /// A slot whose worker is not asked for yet (`Slot::dormant` without a worker): one of a
    /// pool's forked workers past the first, started when there is work for it or
    /// `worker_pids` asks (`Shared::launch_cold`). It does not count as starting.
    pub(crate) fn cold(self) -> Box<Slot> {
        self.shared.first_start_done();
        Box::new(self)
    }

    /// A cold slot leaves the cold state: `worker_pids` (through `Pids::starting`, which the
    /// caller increments) waits until its first start attempt is settled.
    pub(crate) fn owe_first_start(&mut self) {
        self.owes_first_start = true;
    }

    /// The first start attempt this slot owed is over (with a worker or without), or the
    /// slot leaves without one.
    pub(crate) fn first_start_settled(&mut self) {
        if std::mem::take(&mut self.owes_first_start) {
            self.shared.first_start_done();
        }
    }

    /// A dormant slot without a worker: one that a thread must start (`needs_thread`).
    pub(crate) fn is_cold(&self) -> bool {
        self.worker.is_none() && self.pending.is_none()
    }

    /// Takes `launched`, a worker the fork server is forking, as this slot's pending one.
    pub(crate) fn adopt_launched(&mut self, launched: Launched) {
        match launched.pid_answer() {
            Some(answer) => self.shared.set_pid_answer(self.index, answer),
            None => self.shared.set_pid(self.index, launched.pid()),
        }
        self.pending = Some(launched);
    }

    /// The body of a thread started for a slot that had none: serves until the pool stops.
    pub(crate) fn run_resumed(slot: Box<Slot>) {
        crate::result::mark_pool_thread();
        let (slot, gave_up) = Slot::serve(slot);
        slot.leave(gave_up.as_ref());
    }

    /// Leaves the pool (see `finish`); `error`: why, if the slot gave up.
    pub(crate) fn leave(mut self: Box<Self>, error: Option<&Error>) {
        self.finish();
        self.shared.slot_exited(error);
    }

    /// Leaves the pool with each of `slots`, which are idle: their workers are all asked to
    /// exit first, then each is waited for, so that they exit side by side.
    #[allow(
        clippy::vec_box,
        reason = "slots live boxed: they move whole between threads and parking places"
    )]
    pub(crate) fn leave_all(mut slots: Vec<Box<Slot>>) {
        let Some(first) = slots.first() else {
            return;
        };
        let deadline = std::time::Instant::now() + first.idle_grace();
        for slot in &mut slots {
            if slot.inflight.is_empty()
                && let Some(worker) = slot.leaving_worker()
            {
                worker.request_shutdown(Duration::from_secs(1));
            }
        }
        for mut slot in slots {
            slot.finish_by(Some(deadline));
            slot.shared.slot_exited(None);
        }
    }

    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// True when the slot cannot be lent as it is: its worker is gone or must be recycled,
    /// or work is in flight (a slot given back in the middle of a chunk).
    pub(crate) fn needs_thread(&self) -> bool {
        (self.worker.is_none() && self.pending.is_none())
            || self.budget_left() == Some(0)
            || !self.inflight.is_empty()
    }

    /// Runs until the pool stops or closes; `Some` if it gave up starting a worker. The slot
    /// moves into the shared state while it waits for work (it may be lent meanwhile), hence
    /// `Box<Self>` in and out.
    fn serve(mut slot: Box<Slot>) -> (Box<Slot>, Option<Error>) {
        loop {
            if slot.worker.is_none() {
                // No replacement (after a crash, or `max_tasks_per_child`) for a pool that
                // is terminated, or closing with nothing left to run: `join` would start it,
                // initializer and all, only to stop it. A first start already under way
                // (`pending`) is finished, and its worker then asked to exit as usual.
                if slot.shared.is_terminated()
                    || (slot.pending.is_none() && !slot.shared.has_work_to_come())
                {
                    slot.first_start_settled();
                    return (slot, None);
                }
                let pending = slot.pending.take();
                let started = slot.start_worker(pending, slot.config.restart_attempts);
                slot.first_start_settled();
                if let Err(err) = started {
                    return (slot, Some(err));
                }
            }
            if slot.inflight.is_empty() {
                if slot.budget_left() == Some(0) {
                    slot.recycle_worker();
                    continue;
                }
                // A worker killed while idle is found out when this chunk meets the end of
                // its stream; the status page then shows the chunk never started, and it goes
                // back to the queue unblamed.
                let shared = Arc::clone(&slot.shared);
                let (next, back) = shared.wait_next(slot);
                slot = back;
                match next {
                    Next::Run(chunk) => slot.push(chunk),
                    Next::Resume => continue,
                    Next::Exit => return (slot, None),
                }
            }
            while let Some(call) = slot.prefetch_call()
                && slot.inflight.len() < slot.prefetch_depth()
                && slot
                    .budget_left()
                    .is_none_or(|left| left > slot.items_in_flight())
            {
                match slot.shared.try_prefetch(call) {
                    Some(chunk) => slot.push(chunk),
                    None => break,
                }
            }
            match slot.pump(Duration::ZERO) {
                Pumped::Progress => {}
                Pumped::Stop => return (slot, None),
                Pumped::Lost(why) => slot.on_worker_lost(&why),
            }
        }
    }

    /// Runs `chunk` on this (lent, idle) slot's worker from the calling thread, until its
    /// outcomes are stored, the worker is lost (handled as the slot thread would: blame,
    /// re-queue) or the pool is terminated (the slot thread then fails what is in flight).
    ///
    /// A dormant slot's worker (forked, in a pool without an initializer) gets the chunk
    /// before its `Ready` comes in: it runs the chunk as soon as it is up, instead of
    /// waiting for the caller to see its `Ready` and send it.
    pub(crate) fn run_direct(&mut self, chunk: Chunk) {
        if let Some(launched) = self.pending.take() {
            // A failure to set the worker up is as if it died.
            let installed = launched
                .adopt(&self.config.spawn)
                .is_some_and(|worker| self.install(worker).is_ok());
            if !installed {
                self.shared.set_pid(self.index, None);
                // The slot's thread, which its return starts (it has no worker), starts
                // one as for a replacement, and runs the chunk or leaves it to another slot.
                self.shared.requeue_front(vec![chunk]);
                return;
            }
            // As long as a handshake would wait from now: a pool may sit idle for longer
            // than that before its first call, with the `Ready` in the socket all along.
            self.awaiting_ready =
                Some(monotonic_ns().saturating_add(nanos(self.config.spawn.start_timeout)));
        }
        self.push(chunk);
        while !self.inflight.is_empty() {
            match self.pump(self.shared.spin) {
                Pumped::Progress => {}
                Pumped::Stop => return,
                Pumped::Lost(why) => {
                    self.on_worker_lost(&why);
                    return;
                }
            }
        }
    }

    /// The call whose chunks are worth queueing behind the running one: the front chunk's,
    /// once one of its chunks measured short. `None`: do not prefetch.
    fn prefetch_call(&self) -> Option<u64> {
        let call = self.inflight.front()?.chunk.call.id();
        let (measured, took) = self.last_chunk?;
        (measured == call && took < PREFETCH_BELOW).then_some(call)
    }

    /// How many chunks to keep in flight while they are short: `config.prefetch`, or as many
    /// as make [`PREFETCH_BELOW`] of work when they are shorter than that allows (at most
    /// [`MAX_PREFETCH`]). Work queued in one worker stays under the larger of the two, so
    /// another worker is never left idle behind much more than today's queue.
    fn prefetch_depth(&self) -> usize {
        let Some((_, took)) = self.last_chunk else {
            return self.config.prefetch;
        };
        let fit = PREFETCH_BELOW.as_nanos() / took.as_nanos().max(1);
        usize::try_from(fit)
            .unwrap_or(usize::MAX)
            .clamp(self.config.prefetch, MAX_PREFETCH.max(self.config.prefetch))
    }

    /// Items the current worker may still start under `max_tasks_per_child`.
    fn budget_left(&self) -> Option<u64> {
        self.config
            .max_tasks_per_child
            .map(|max| max.saturating_sub(self.items_run))
    }

    fn items_in_flight(&self) -> u64 {
        self.inflight
            .iter()
            .map(|flight| u64::from(flight.chunk.count - flight.done))
            .sum()
    }

    /// Leaves the pool: a terminated pool kills its worker and fails what was in flight;
    /// a closed one lets the idle worker exit cleanly.
    fn finish(&mut self) {
        self.finish_by(None);
    }

    /// [`finish`](Self::finish); an idle worker's grace ends at `deadline` at the latest
    /// (workers asked to exit together share one).
    fn finish_by(&mut self, deadline: Option<std::time::Instant>) {
        self.first_start_settled();
        let busy = !self.inflight.is_empty();
        for flight in self.inflight.drain(..) {
            let task = flight.chunk.call.task_name();
            flight.fail_rest(&|index| terminated(task, index));
        }
        self.leaving_worker();
        if let Some(mut worker) = self.worker.take() {
            if busy {
                // Terminated in the middle of work: stop now.
                worker.kill();
            } else {
                // An idle worker exits normally, even on terminate: at-exit work such as a
                // coverage runtime writing its profile happens, and it takes a moment.
                let grace = self.idle_grace();
                let grace = deadline.map_or(grace, |deadline| {
                    grace.min(deadline.saturating_duration_since(std::time::Instant::now()))
                });
                worker.shutdown(grace);
            }
            worker.stderr.settle(deadline);
        }
        self.shared.set_pid(self.index, None);
    }

    /// The worker, as the slot leaves: one whose start was never finished (see `pending`)
    /// is stopped as any other.
    fn leaving_worker(&mut self) -> Option<&mut WorkerProcess> {
        if let Some(launched) = self.pending.take() {
            self.worker = launched.into_worker();
        }
        self.worker.as_mut()
    }

    /// How long an idle worker asked to exit may take before it is killed.
    fn idle_grace(&self) -> Duration {
        if self.shared.is_terminated() {
            TERMINATE_GRACE.min(self.config.shutdown_grace)
        } else {
            self.config.shutdown_grace
        }
    }

    /// Starts a worker, retrying transient failures with a growing back-off: a worker that
    /// cannot start (a failing initializer, say) costs a bounded number of attempts, never an
    /// endless respawn loop. `launched`: a first attempt already under way.
    fn start_worker(
        &mut self,
        mut launched: Option<Launched>,
        attempts: u32,
    ) -> Result<u32, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = match launched.take() {
                Some(launched) => launched.finish(&self.config.spawn),
                None => WorkerProcess::spawn(&self.config.spawn),
            };
            match started {
                Ok(worker) => {
                    return self
                        .install(worker)
                        .map_err(|err| Error::io("configuring a worker channel failed", err));
                }
                Err(err) if attempt >= attempts || self.shared.is_terminated() => return Err(err),
                Err(err) => {
                    if !self
                        .shared
                        .retry_after(Duration::from_millis(50 << attempt.min(6)))
                    {
                        return Err(err);
                    }
                }
            }
        }
    }

    /// Makes `worker`, whose start is done (or, from `run_direct`, whose `Ready` is still to
    /// come), this slot's: its channel non-blocking, its pid published. Its pid; on failure
    /// the worker is dropped, which kills it.
    fn install(&mut self, worker: WorkerProcess) -> std::io::Result<u32> {
        worker.conn.set_nonblocking(true)?;
        let pid = worker.pid();
        self.worker = Some(worker);
        self.items_run = 0;
        self.shared.set_pid(self.index, Some(pid));
        Ok(pid)
    }

    /// `max_tasks_per_child` reached: the idle worker exits cleanly and the next loop starts
    /// a fresh one.
    fn recycle_worker(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.shutdown(self.config.shutdown_grace);
            worker.stderr.settle(None);
        }
        self.reset_channel_state();
    }

    fn push(&mut self, chunk: Chunk) {
        if self.inflight.is_empty() {
            self.front_since = monotonic_ns();
        }
        self.inflight.push_back(InFlight::new(chunk));
    }

    fn reset_channel_state(&mut self) {
        self.sent_chunks = 0;
        self.sent_bytes = 0;
        self.requests = None;
        self.replies = None;
        self.requests_sent = 0;
        self.want_replies = 0;
        self.awaiting_ready = None;
        self.reader = FrameReader::new(self.config.spawn.max_frame_len);
        self.shared.set_pid(self.index, None);
    }

    /// What the worker is running according to its status page: the position in `inflight`
    /// of the chunk, and the item in it. `None` between chunks. (A worker sends the results
    /// of short chunks in batches, so the running chunk need not be the front one.)
    fn running(&self, page: Published) -> Option<(usize, u32)> {
        let index = self.inflight.iter().position(|flight| {
            status::seq_tag(flight.chunk.seq) == page.seq
                && (flight.done..flight.chunk.count).contains(&page.item)
        })?;
        Some((index, page.item))
    }

    /// A chunk of one item with a deadline that finished, as the status page shows, but
    /// whose outcome has not come in: the worker died between the item and its answer. The
    /// item is then the one to blame (at `(position, 0)`, as for `running`): with a deadline
    /// and chunks of one, nothing runs twice unless retried (see the README, "Guarantees").
    /// The finished items of a larger chunk run again, unblamed, as those that finished
    /// before a crash in their chunk do.
    fn finished_unanswered(&self, page: Published) -> Option<(usize, u32)> {
        let index = self.inflight.iter().position(|flight| {
            status::seq_tag(flight.chunk.seq) == page.seq
                && flight.chunk.timeout.is_some()
                && flight.chunk.count == 1
                && page.item == 1
                && flight.done == 0
        })?;
        Some((index, 0))
    }

    /// When the slot must look at its worker again, if chunks with a deadline are in flight.
    /// While an item of one runs: at its deadline, counted from the start the worker
    /// published, to kill it. While none has started as far as the status page shows
    /// (arguments or outcomes in transit): after a short interval, to see whether one has; a
    /// deadline never counts from a guess.
    ///
    /// The page is the worker's to write, and so a task's: one that scribbles on it could
    /// hide its start, or move it later. So the front chunk is also given a deadline of the
    /// parent's own: the deadlines of all its items left, and one more, plus
    /// [`BACKSTOP_GRACE`], from when it was both the front one and fully sent, or from the
    /// last bytes the worker sent if later (its `Ready`, results still coming in); past
    /// that, its next item is taken as past its deadline. So time its arguments or results
    /// spend in transit does not count, and a frame left half written stalls nothing.
    fn next_check(&self) -> Option<Check> {
        if let Some(at) = self.awaiting_ready {
            // Nothing runs before `Ready`.
            return Some(Check::Start { at });
        }
        let page = self.worker.as_ref()?.status.read();
        let now = monotonic_ns();
        let backstop = self.inflight.front().and_then(|front| {
            let after = front.chunk.timeout?;
            if front.sent_at == 0 {
                return None;
            }
            let items = u64::from(front.chunk.count - front.done) + 1;
            let at = self
                .front_since
                .max(front.sent_at)
                .max(self.heard_ns)
                .saturating_add(nanos(after).saturating_mul(items))
                .saturating_add(nanos(BACKSTOP_GRACE));
            Some((at, front.done, after))
        });
        if let Some((chunk, item)) = self.running(page)
            && let Some(after) = self.inflight[chunk].chunk.timeout
        {
            // A start in the future is not one.
            let at = page.started_ns.min(now).saturating_add(nanos(after));
            return Some(Check::Kill {
                at: backstop.map_or(at, |(backstop, ..)| at.min(backstop)),
                chunk,
                item,
                after,
            });
        }
        if let Some((at, item, after)) = backstop
            && now >= at
        {
            return Some(Check::Kill {
                at,
                chunk: 0,
                item,
                after,
            });
        }
        let shortest = self
            .inflight
            .iter()
            .filter_map(|flight| flight.chunk.timeout)
            .min()?;
        let interval = (shortest / 4).clamp(Duration::from_millis(1), RECHECK);
        let at = now.saturating_add(nanos(interval));
        Some(Check::Recheck {
            at: backstop.map_or(at, |(backstop, ..)| at.min(backstop)),
        })
    }

    /// Sends and receives until a chunk completes, the worker is lost or the pool stops.
    /// While only replies are awaited, polls without sleeping for up to `spin` first (see
    /// `worker::SPIN`).
    fn pump(&mut self, spin: Duration) -> Pumped {
        let mut spin_until = self.spin_until(spin);
        // While polling without sleeping, the worker's stderr is looked at this often (until
        // it first says something, when the forwarder takes it): a long window must not leave
        // a task blocked on a full pipe.
        let mut stderr_at = monotonic_ns().saturating_add(SPIN_STDERR_EVERY_NS);
        loop {
            let awaiting = self.awaiting_ready.is_some();
            match self.drain_frames() {
                Ok(true) => return Pumped::Progress,
                Ok(false) => {}
                // Not the `Ready` of this worker (it cannot be, for a copy of this program):
                // a worker that failed its start, killed, its chunk run elsewhere unless the
                // status page shows it started. A replacement's handshake reports the cause
                // if it persists.
                Err(_) if self.awaiting_ready.is_some() => return Pumped::Lost(Lost::Died),
                Err(err) => return Pumped::Lost(Lost::Protocol(err)),
            }
            if awaiting && self.awaiting_ready.is_none() {
                // The worker is up, with the chunk in its socket: the reply often follows
                // within microseconds.
                spin_until = self.spin_until(spin);
            }
            if let Err(lost) = self.write_some() {
                // The worker closed its end (it died, or is dying). What it sent before, the
                // results of the chunks it ran, is read first (the top of the loop takes
                // it; the next write fails again and comes back here), so that those chunks
                // do not run again.
                match self.receive() {
                    Ok(true) => continue,
                    Ok(false) => return Pumped::Lost(lost),
                    Err(lost) => return Pumped::Lost(lost),
                }
            }
            let now = monotonic_ns();
            if self.sent_chunks == self.inflight.len()
                && now < spin_until
                && !self.shared.stopping()
            {
                if let Err(lost) = self.spin_once(now, &mut stderr_at) {
                    return Pumped::Lost(lost);
                }
                continue;
            }
            let mut wait = PollTimeout::NONE;
            if let Some(check) = self.next_check() {
                let now = monotonic_ns();
                let at = match check {
                    Check::Kill {
                        at,
                        chunk,
                        item,
                        after,
                    } if now >= at => {
                        return Pumped::Lost(Lost::TimedOut { chunk, item, after });
                    }
                    // Given up, as one that died before it started the chunk, unless its
                    // `Ready` came in since the socket was last read (while the pool runs:
                    // a worker that keeps sending without a `Ready` fills a frame, which is
                    // then not its `Ready`).
                    Check::Start { at } if now >= at => match self.receive() {
                        Ok(true) if !self.shared.stopping() => continue,
                        Ok(_) => return Pumped::Lost(Lost::Died),
                        Err(lost) => return Pumped::Lost(lost),
                    },
                    check => check.at(),
                };
                // Round up so that we wake at or after the time, not just before it.
                let ms = at.saturating_sub(now).div_ceil(1_000_000);
                wait = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            }
            let worker = self.worker.as_ref().expect("pump runs with a worker");
            let mut events = PollFlags::POLLIN;
            if self.sent_chunks < self.inflight.len() {
                events |= PollFlags::POLLOUT;
            }
            let Ok(Watched {
                conn: conn_events,
                exited,
                stopped: stop,
                said: stderr_ready,
            }) = watch(
                worker.conn.as_fd(),
                events,
                worker.exit_fd(),
                Some(self.shared.stop_read.as_fd()),
                worker.stderr.fd(),
                wait,
            )
            else {
                return Pumped::Lost(Lost::Died);
            };
            if stop {
                return Pumped::Stop;
            }
            let worker = self.worker.as_mut().expect("pump runs with a worker");
            if stderr_ready {
                worker.stderr.pump();
            }
            if exited {
                // The worker is gone, though a process it forked may keep its end of the
                // channel open (no end of stream then). What it sent before is read first:
                // the top of the loop takes it, and the next poll comes back here at once.
                match self.receive() {
                    Ok(true) => continue,
                    Ok(false) => return Pumped::Lost(Lost::Died),
                    Err(lost) => return Pumped::Lost(lost),
                }
            }
            if conn_events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                && let Err(lost) = self.receive()
            {
                return Pumped::Lost(lost);
            }
        }
    }

    /// One look of `pump`'s polling without sleeping: the channel, and the stderr when due
    /// (`stderr_at`); then the CPU is yielded if nothing came.
    fn spin_once(&mut self, now: u64, stderr_at: &mut u64) -> Result<(), Lost> {
        if self.receive()? {
            return Ok(());
        }
        if now >= *stderr_at {
            *stderr_at = now.saturating_add(SPIN_STDERR_EVERY_NS);
            let worker = self.worker.as_mut().expect("pump runs with a worker");
            if worker.stderr.fd().is_some() {
                worker.stderr.pump();
            }
        }
        std::thread::yield_now();
        Ok(())
    }

    /// Until when `pump` may poll without sleeping: `spin` from now, but never past a
    /// deadline check (or a terminate, which it looks for as it polls).
    fn spin_until(&self, spin: Duration) -> u64 {
        let until = monotonic_ns().saturating_add(nanos(spin));
        self.next_check()
            .map_or(until, |check| until.min(check.at()))
    }

    /// Reads what the worker sent, without blocking. False when nothing was there.
    fn receive(&mut self) -> Result<bool, Lost> {
        let worker = self.worker.as_mut().expect("receive runs with a worker");
        match self.reader.read_from(&mut worker.conn) {
            Ok(0) => Err(Lost::Died),
            Ok(_) => {
                // For the backstop of a chunk with a deadline alone (see `next_check`): an
                // older value is never wrong there, and other chunks need no clock read.
                if self
                    .inflight
                    .front()
                    .is_some_and(|front| front.chunk.timeout.is_some())
                {
                    self.heard_ns = monotonic_ns();
                }
                Ok(true)
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(err) => match err.downcast::<Error>() {
                Ok(err) => Err(Lost::Protocol(err)),
                Err(_) => Err(Lost::Died),
            },
        }
    }

    /// Writes as much of the pending frames as the socket takes without blocking: several
    /// frames per system call when short chunks are queued.
    fn write_some(&mut self) -> Result<(), Lost> {
        /// Frames gathered into one `sendmsg`.
        const GATHER: usize = 32;
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        while self.sent_chunks < self.inflight.len() {
            if self.sent_bytes == 0 {
                self.prepare(self.sent_chunks);
            }
            let worker = self.worker.as_ref().expect("write_some runs with a worker");
            let flight = &self.inflight[self.sent_chunks];
            let (prefix, frame) = flight.wire();
            let mut slices = Vec::with_capacity(GATHER + 1);
            if self.sent_bytes < prefix.len() {
                slices.push(IoSlice::new(&prefix[self.sent_bytes..]));
                slices.push(IoSlice::new(frame));
            } else {
                slices.push(IoSlice::new(&frame[self.sent_bytes - prefix.len()..]));
            }
            let mut fds = Vec::new();
            if self.sent_bytes == 0 {
                // Descriptors ride on the first byte: the regions the prefix announces, then
                // the chunk's own (its frame starts with their `Descriptors` frame).
                fds.extend_from_slice(&flight.prefix_fds);
                fds.extend(flight.chunk.fds.iter().map(AsRawFd::as_raw_fd));
            }
            if fds.is_empty() {
                slices.extend(
                    self.inflight
                        .range(self.sent_chunks + 1..)
                        .take(GATHER - 1)
                        .take_while(|next| next.plain())
                        .map(|next| IoSlice::new(&next.chunk.frame)),
                );
            }
            match crate::fdpass::send_gathered(worker.conn.as_fd(), &slices, &fds, flags) {
                Ok(mut n) => {
                    while n > 0 {
                        let left = self.inflight[self.sent_chunks].wire_len() - self.sent_bytes;
                        if n >= left {
                            n -= left;
                            // A worker not known to be up yet may fail its start: the
                            // chunk then runs elsewhere, its handles with it.
                            if self.awaiting_ready.is_none() {
                                self.inflight[self.sent_chunks].chunk.sent();
                            }
                            let flight = &mut self.inflight[self.sent_chunks];
                            // Read by the backstop of a chunk with a deadline alone.
                            if flight.chunk.timeout.is_some() {
                                flight.sent_at = monotonic_ns();
                            }
                            self.sent_chunks += 1;
                            self.sent_bytes = 0;
                        } else {
                            self.sent_bytes += n;
                            n = 0;
                        }
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => return Ok(()),
                Err(_) => return Err(Lost::Died),
            }
        }
        Ok(())
    }

    /// The largest region this slot makes ([`protocol::own_share`]).
    fn region_cap(&self) -> usize {
        protocol::own_share(self.config.spawn.max_memory)
    }

    /// True when the slot holds a region that an idle spell should give up.
    pub(crate) fn holds_large_regions(&self) -> bool {
        large(self.requests.as_ref())
            || large(self.replies.as_ref())
            || self.reply_copy.capacity() > RETAIN_REGION
    }

    /// With nothing in flight: gives up regions larger than [`RETAIN_REGION`], here and in the
    /// worker (a `Region` frame of length 0), so that one large call does not pin its
    /// memory in every worker for the life of the pool. Called once the slot has been idle
    /// for [`TRIM_AFTER`] (`Shared::wait_next`): calls that follow each other keep their
    /// regions. If the frame cannot be written at once, the regions stay.
    pub(crate) fn trim_regions(&mut self) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        if !self.inflight.is_empty() {
            return;
        }
        if self.reply_copy.capacity() > RETAIN_REGION {
            self.reply_copy = Vec::new();
        }
        let (requests, replies) = (large(self.requests.as_ref()), large(self.replies.as_ref()));
        let mut frames = Vec::new();
        for (which, given_up) in [(true, requests), (false, replies)] {
            if given_up {
                let header = Header::Region {
                    requests: which,
                    len: 0,
                };
                frames.extend_from_slice(&protocol::control_frame(&header));
            }
        }
        if frames.is_empty() {
            return;
        }
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        if matches!(nix::sys::socket::send(worker.conn.as_raw_fd(), &frames, flags), Ok(n) if n == frames.len())
        {
            if requests {
                self.requests = None;
            }
            if replies {
                self.replies = None;
                self.want_replies = 0;
            }
        }
    }

    /// Decides what goes on the socket for `inflight[at]`, whose sending starts: a large
    /// frame goes into the requests region when the worker is done with the last one there
    /// (a larger region is made when needed), and a replies region is made or enlarged when
    /// large replies call for one and none can be outstanding (nothing at the worker). Shared
    /// memory is an optimisation: when a region cannot be made, the frame takes the socket.
    fn prepare(&mut self, at: usize) {
        let worker = self.worker.as_ref().expect("prepare runs with a worker");
        let flight = &self.inflight[at];
        if flight.prepared {
            return;
        }
        let len = flight.chunk.frame.len();
        let cap = self.region_cap();
        let large = len >= SHARED_MIN && flight.chunk.fds.is_empty();
        let mut prefix = Vec::new();
        let mut fds = Vec::new();
        // Not with a chunk that carries descriptors: its own may already be as many as one
        // message can carry.
        if at == 0
            && flight.chunk.fds.is_empty()
            && self.want_replies >= SHARED_MIN
            && Region::size_for(self.want_replies) <= cap
            && self
                .replies
                .as_ref()
                .is_none_or(|region| region.len() < self.want_replies)
            && let Ok(region) =
                Region::create(c"multiproc-region", Region::size_for(self.want_replies))
        {
            announce(&mut prefix, &mut fds, &region, false);
            self.replies = Some(region);
        }
        let mut shared = false;
        if large && worker.status.taken(true) == self.requests_sent {
            if self
                .requests
                .as_ref()
                .is_none_or(|region| region.len() < len)
                && Region::size_for(len) <= cap
                && let Ok(region) = Region::create(c"multiproc-region", Region::size_for(len))
            {
                announce(&mut prefix, &mut fds, &region, true);
                self.requests = Some(region);
            }
            if let Some(region) = self.requests.as_mut().filter(|region| region.len() >= len) {
                region.fill(&flight.chunk.frame);
                self.requests_sent += 1;
                let header = Header::Shared {
                    n: self.requests_sent,
                    len: len as u64,
                };
                prefix.extend_from_slice(&protocol::control_frame(&header));
                shared = true;
            }
        }
        let flight = &mut self.inflight[at];
        flight.prepared = true;
        flight.prefix = prefix;
        flight.prefix_fds = fds;
        flight.shared = shared;
    }

    /// Handles every complete frame buffered. True when at least one chunk completed.
    fn drain_frames(&mut self) -> Result<bool, Error> {
        // Out of `self` while its frames are handled, which borrow it.
        let mut reader = std::mem::replace(&mut self.reader, FrameReader::new(0));
        let drained = self.drain_from(&mut reader);
        self.reader = reader;
        self.time_completed();
        drained
    }

    /// Records how long the chunks completed since the last call ran, each: a worker answers
    /// the short chunks it has queued in one batch, so the time since the front chunk started
    /// is shared among them (timing each from the previous one's arrival would measure
    /// microseconds, however long they ran).
    fn time_completed(&mut self) {
        let (call, count) = std::mem::take(&mut self.completed);
        if count == 0 {
            return;
        }
        let now = monotonic_ns();
        let took = Duration::from_nanos(now.saturating_sub(self.front_since)) / count;
        self.last_chunk = Some((call, took));
        self.front_since = now;
    }

    fn drain_from(&mut self, reader: &mut FrameReader) -> Result<bool, Error> {
        let mut progress = false;
        while let Some(range) = reader.next_frame()? {
            progress |= self.on_frame(reader.body(range), true)?;
        }
        Ok(progress)
    }

    /// Handles one frame from the worker, read from the socket (`socket`) or from the
    /// replies region. True when it completed a chunk.
    fn on_frame(&mut self, body: &[u8], socket: bool) -> Result<bool, Error> {
        let (header, payload) = protocol::parse_body(body)?;
        if self.awaiting_ready.is_some() {
            let worker = self.worker.as_ref().expect("frames come from a worker");
            check_ready(
                &header,
                worker.pid(),
                crate::registry::Registry::get()?.digest(),
            )?;
            self.awaiting_ready = None;
            for flight in self.inflight.iter_mut().take(self.sent_chunks) {
                flight.chunk.sent();
            }
            return Ok(false);
        }
        match header {
            Header::Results { seq, first, count } => {
                if socket && body.len() >= SHARED_MIN {
                    self.want_replies = self.want_replies.max(body.len() + 64);
                }
                self.on_results(seq, first, count, payload)
            }
            Header::Shared { n, len } if socket => {
                let region = self.replies.as_ref().ok_or_else(|| {
                    protocol_error("a shared frame from a worker that has no region".to_owned())
                })?;
                // Decoded from a copy: the worker's task may be writing the region (see
                // `Region::copy_frame`). Copied, the region is the worker's again at once,
                // for its next reply while this one is decoded.
                let mut copy = std::mem::take(&mut self.reply_copy);
                let copied = region.copy_frame(len, &mut copy);
                let worker = self.worker.as_ref().expect("frames come from a worker");
                worker.status.took(false, n);
                let handled = copied.and_then(|()| self.on_shared(&copy));
                self.reply_copy = copy;
                handled
            }
            other => Err(protocol_error(format!(
                "unexpected frame from a worker: {other:?}"
            ))),
        }
    }

    /// Handles the frames of a shared frame, copied out of the replies region.
    fn on_shared(&mut self, frames: &[u8]) -> Result<bool, Error> {
        let mut progress = false;
        for body in protocol::frames(frames, self.config.spawn.max_frame_len) {
            progress |= self.on_frame(body?, false)?;
        }
        Ok(progress)
    }

    /// Stores the outcomes of a `Results` frame. True when they complete a chunk.
    fn on_results(
        &mut self,
        seq: u64,
        first: u32,
        count: u32,
        payload: &[u8],
    ) -> Result<bool, Error> {
        let front = self
            .inflight
            .front_mut()
            .filter(|front| front.chunk.seq == seq && front.done == first)
            .filter(|front| count > 0 && count <= front.chunk.count - front.done)
            .ok_or_else(|| protocol_error(format!("results for an unexpected chunk {seq}")))?;
        front
            .chunk
            .call
            .deliver(front.chunk.first + first as usize, count, payload);
        front.done += count;
        if front.done < front.chunk.count {
            return Ok(false);
        }
        self.items_run += u64::from(front.chunk.count);
        let call = front.chunk.call.id();
        self.inflight.pop_front();
        self.sent_chunks -= 1;
        // Timed per batch, in `drain_frames`: chunks answered together ran one after another.
        self.completed = (call, self.completed.1 + 1);
        Ok(true)
    }

    /// The worker is gone. The status page says what it was doing: the one item it was
    /// running fails (or runs again, under `retries`); items that never started, in its chunk
    /// and in the chunks queued behind it, go back to the front of the queue; items that had
    /// finished but whose outcomes died with the worker (outcomes are sent per chunk, or per
    /// batch of short chunks) run again. The next loop starts a replacement.
    fn on_worker_lost(&mut self, why: &Lost) {
        let Some(mut worker) = self.worker.take() else {
            return;
        };
        let pid = worker.pid();
        // Reaps a dead worker, or kills one that timed out or broke the protocol, with every
        // process it started.
        let status = worker.kill();
        let page = worker.status.read();
        let stderr_tail = worker.stderr.last_lines();
        drop(worker);
        let finished = matches!(why, Lost::Died)
            .then(|| self.finished_unanswered(page))
            .flatten();
        let culprit = match why {
            Lost::TimedOut { chunk, item, .. } => Some((*chunk, *item)),
            Lost::Died => self.running(page).or(finished),
            Lost::Protocol(_) => None,
        };
        self.reset_channel_state();
        let mut again = Vec::new();
        for (position, flight) in std::mem::take(&mut self.inflight).into_iter().enumerate() {
            let chunk = &flight.chunk;
            let task = chunk.call.task_name();
            match (why, culprit) {
                (Lost::Died | Lost::TimedOut { .. }, Some((at, item))) if at == position => {
                    if chunk.attempt < chunk.retries {
                        self.resend(chunk, item, item + 1, chunk.attempt + 1, 0, &mut again);
                    } else {
                        let finished = finished.is_some();
                        let error = lost_error(why, pid, status, chunk.attempt + 1, finished);
                        chunk.call.fail(chunk.first + item as usize, 1, &|index| {
                            error
                                .for_item(task, index)
                                .with_status(error.signal(), error.exit_code())
                                .with_stderr_tail(stderr_tail.clone())
                        });
                    }
                    self.resend(chunk, flight.done, item, chunk.attempt, 0, &mut again);
                    self.resend(chunk, item + 1, chunk.count, chunk.attempt, 0, &mut again);
                }
                // A malformed reply: the items it concerned fail rather than run again into
                // the same fault.
                (Lost::Protocol(err), _) if position == 0 => {
                    let message = format!(
                        "worker process {pid} sent a malformed reply and was stopped ({}): {err}",
                        describe_status(status)
                    );
                    flight.fail_rest(&|index| {
                        Error::new(ErrorKind::Codec, message.clone())
                            .with_task(task)
                            .with_index(index)
                    });
                }
                // Not started, or finished with its outcomes lost: run it (again), unblamed;
                // but a chunk first in line when worker after worker dies fails in the end.
                // Only when no item is to blame: a worker runs every chunk it has before it
                // answers, so the front chunk of a batch may have finished, its outcomes lost
                // with a worker that a later chunk's item crashed.
                _ => {
                    let first_in_line =
                        position == 0 && matches!(why, Lost::Died) && culprit.is_none();
                    let deaths = chunk.unblamed_deaths + u32::from(first_in_line);
                    if deaths > MAX_UNBLAMED_DEATHS {
                        let (signal, code) = status_parts(status);
                        let message = format!(
                            "{deaths} worker processes died while this item was being sent to \
                             them, before it started as far as their status pages show; an \
                             argument larger than `max_memory_per_child` does this"
                        );
                        flight.fail_rest(&|index| {
                            Error::new(ErrorKind::Crashed, message.clone())
                                .with_task(task)
                                .with_index(index)
                                .with_status(signal, code)
                                .with_stderr_tail(stderr_tail.clone())
                        });
                    } else if flight.done == 0 && !chunk.handles_gone {
                        let mut whole = flight.chunk;
                        whole.unblamed_deaths = deaths;
                        again.push(whole);
                    } else {
                        self.resend(
                            chunk,
                            flight.done,
                            chunk.count,
                            chunk.attempt,
                            deaths,
                            &mut again,
                        );
                    }
                }
            }
        }
        self.shared.requeue_front(again);
    }

    /// Queues items `from..to` of `chunk` to run again; if they cannot be re-sent (see
    /// [`Unsent`]), they fail instead of being lost.
    fn resend(
        &self,
        chunk: &Chunk,
        from: u32,
        to: u32,
        attempt: u32,
        deaths: u32,
        again: &mut Vec<Chunk>,
    ) {
        if from >= to {
            return;
        }
        match chunk.sub(&self.shared, from, to, attempt) {
            Ok(mut part) => {
                part.unblamed_deaths = deaths;
                again.push(part);
            }
            Err(unsent) => {
                let task = chunk.call.task_name();
                chunk.call.fail(
                    chunk.first + from as usize,
                    (to - from) as usize,
                    &|index| unsent.error().with_task(task).with_index(index),
                );
            }
        }
    }
}

/// Counts a slot's first start as done when dropped (see `Slot::run`).
struct FirstStart(Arc<Shared>);

impl Drop for FirstStart {
    fn drop(&mut self) {
        self.0.first_start_done();
    }
}

/// The error for the item a lost worker was running.
/// `finished`: the worker died after the item, before its outcome came back (see
/// `Slot::finished_unanswered`).
fn lost_error(
    why: &Lost,
    pid: u32,
    status: std::process::ExitStatus,
    attempts: u32,
    finished: bool,
) -> Error {
    let (kind, message, (signal, code)) = match why {
        Lost::TimedOut { after, .. } => (
            ErrorKind::Timeout,
            format!(
                "ran past its deadline of {after:?}; worker process {pid} and every process it \
                 started were killed"
            ),
            (None, None),
        ),
        _ if finished => (
            ErrorKind::Crashed,
            format!(
                "worker process {pid} died after it finished, before its outcome came back \
                 (with a deadline, an item does not run again unless retried)"
            ),
            status_parts(status),
        ),
        _ => (
            ErrorKind::Crashed,
            format!("worker process {pid} died while running it"),
            status_parts(status),
        ),
    };
    let message = if attempts > 1 {
        format!("{message}, on each of {attempts} attempts")
    } else {
        message
    };
    Error::new(kind, message).with_status(signal, code)
}

/// A region larger than an idle worker keeps (see [`RETAIN_REGION`]).
fn large(region: Option<&Region>) -> bool {
    region.is_some_and(|region| region.len() > RETAIN_REGION)
}

/// Appends a `Region` frame for `region` to `prefix`, and its descriptor to `fds`.
fn announce(prefix: &mut Vec<u8>, fds: &mut Vec<RawFd>, region: &Region, requests: bool) {
    let header = Header::Region {
        requests,
        len: region.len() as u64,
    };
    prefix.extend_from_slice(&protocol::control_frame(&header));
    fds.push(region.fd().as_raw_fd());
}

fn protocol_error(message: String) -> Error {
    Error::new(ErrorKind::Codec, message)
}
