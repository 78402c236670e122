//! The work queue shared by the callers (who submit chunks) and the slots (one per worker
//! process, each served by a thread of its own, which pulls chunks when its worker has room:
//! idle workers pull, nobody pushes round-robin). An idle slot waits parked here, where a
//! caller about to block on one chunk may borrow it and do the round trip itself
//! (`Shared::submit_and_wait`). A slot whose worker the fork server forked starts without a
//! thread (dormant): callers borrow it as they would an idle one, the first work queued for
//! it starts its thread, and a closing pool stops its worker from the thread that joins. The
//! slots past a pool's first start dormant and cold, with no worker asked for: work queued
//! for them starts their thread, which starts their worker (`worker_pids` asks for them all
//! at once, `Shared::launch_cold`).

use crate::error::{Error, ErrorKind};
use crate::protocol::{self, Header};
use crate::slot::Slot;
use nix::fcntl::OFlag;
use nix::unistd::pipe2;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where a chunk's outcomes go: the typed state of one call (`map`, `imap`, `apply`, ...).
pub(crate) trait CallSink: Send + Sync {
    /// Unique among the calls of this process.
    fn id(&self) -> u64;
    /// The registered name of the call's task, for errors.
    fn task_name(&self) -> &'static str;
    /// Decodes `count` encoded outcomes for items `first..` and stores them.
    fn deliver(&self, first: usize, count: u32, outcomes: &[u8]);
    /// Stores `error(index)` as the outcome of items `first..first + count`.
    fn fail(&self, first: usize, count: usize, error: &dyn Fn(usize) -> Error);
    /// True once nobody can read the outcomes (a dropped `imap`): its queued chunks are
    /// dropped instead of run.
    fn abandoned(&self) -> bool;
}

/// Finds where the `n`-th encoded argument tuple of a payload starts (typed per task).
pub(crate) type SkipArgs = fn(payload: &[u8], n: u32) -> Option<usize>;

/// A run of consecutive items of one call, encoded as a complete `Run` frame.
pub(crate) struct Chunk {
    pub call: Arc<dyn CallSink>,
    pub seq: u64,
    pub task: u32,
    /// Index in the call's input of the chunk's first item.
    pub first: usize,
    pub count: u32,
    /// Each item's deadline once it starts; its worker is killed past it.
    pub timeout: Option<Duration>,
    /// How often an item whose worker crashed or timed out is run again.
    pub retries: u32,
    /// How often these items already ran into a crash or timeout.
    pub attempt: u32,
    /// How many workers died, unblamed, while this chunk was first in line (being sent,
    /// or finished with its outcomes in transit): bounded, so that a chunk that kills every
    /// worker before its first item starts cannot loop forever.
    pub unblamed_deaths: u32,
    /// A `Descriptors` frame (when `fds` is not empty) followed by the `Run` frame.
    pub frame: Vec<u8>,
    /// Where the arguments start in `frame`.
    pub payload_at: usize,
    pub skip: SkipArgs,
    /// Descriptors the arguments refer to (channel handles), sent with the frame.
    pub fds: Vec<OwnedFd>,
    /// The descriptors went to a worker and the pool kept no copy ([`Chunk::sent`]): the
    /// chunk cannot be sent again.
    pub handles_gone: bool,
}

impl Chunk {
    /// Called once the whole chunk is written to a worker that has said `Ready`. Its channel
    /// handles are the worker's now: the pool keeps no copy of them, so that a handle counts as dropped
    /// when the worker drops it (a `Receiver` then sees its pipe end when the task drops
    /// its `Sender`). With retries the pool keeps them, to send the items again.
    pub(crate) fn sent(&mut self) {
        if self.gives_handles_away() {
            self.fds.clear();
            self.handles_gone = true;
        }
    }

    /// Whether its channel handles go to the worker it is sent to, with no copy kept.
    pub(crate) fn gives_handles_away(&self) -> bool {
        self.retries == 0 && !self.fds.is_empty()
    }

    /// The encoded arguments per item, on average, for sizing later chunks by bytes.
    pub(crate) fn item_bytes(&self) -> usize {
        (self.frame.len() - self.payload_at) / (self.count.max(1) as usize)
    }

    /// A new chunk of items `from..to` (not empty; positions within the chunk) of this one,
    /// for work that must run again after its worker died; or why it cannot be made.
    pub(crate) fn sub(
        &self,
        shared: &Shared,
        from: u32,
        to: u32,
        attempt: u32,
    ) -> Result<Chunk, Unsent> {
        if self.handles_gone {
            return Err(Unsent::HandlesGone);
        }
        let payload = &self.frame[self.payload_at..];
        let count = to.saturating_sub(from);
        // Decodes the arguments before `from..to` and within it to find where they are, with
        // copies of the chunk's descriptors at hand for the channel handles among them (the
        // handles decoded here close their copies as they drop). A user's `Deserialize` that
        // fails or panics on them leaves them unplaced.
        let supplied = crate::fdpass::duplicate(&self.fds).map_err(|_| Unsent::Descriptors)?;
        let (start, end) = crate::fdpass::supply(supplied, || {
            let start = (self.skip)(payload, from)?;
            Some((start, start + (self.skip)(&payload[start..], count)?))
        })
        .ok_or(Unsent::Split)?;
        let seq = shared.next_seq();
        let timed = self.timeout.is_some();
        let header = Header::Run {
            seq,
            task: self.task,
            count,
            timed,
        };
        let fds = crate::fdpass::duplicate(&self.fds).map_err(|_| Unsent::Descriptors)?;
        let mut frame = Vec::with_capacity(32 + end - start);
        protocol::descriptors_frame(&mut frame, fds.len());
        let begin = protocol::begin_frame(&mut frame, &header);
        let payload_at = frame.len();
        frame.extend_from_slice(&payload[start..end]);
        // A part is never larger than the frame it comes from, which had a valid length.
        protocol::end_frame(&mut frame, begin, u32::MAX).map_err(|_| Unsent::Split)?;
        Ok(Chunk {
            call: Arc::clone(&self.call),
            seq,
            task: self.task,
            first: self.first + from as usize,
            count,
            timeout: self.timeout,
            retries: self.retries,
            attempt,
            unblamed_deaths: 0,
            frame,
            payload_at,
            skip: self.skip,
            fds,
            handles_gone: false,
        })
    }

    /// Fails every item of this chunk with `make(index)`.
    pub(crate) fn fail_all(&self, make: &dyn Fn(usize) -> Error) {
        self.call.fail(self.first, self.count as usize, make);
    }
}

/// Why items of a chunk could not be sent again ([`Chunk::sub`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// Their arguments could not be found in the chunk: decoding those before them, or
    /// theirs, failed or panicked (a user's `Deserialize`).
    Split,
    /// The channel handles among their arguments could not be duplicated.
    Descriptors,
    /// The channel handles among their arguments went to the worker that died, and the
    /// pool kept no copy (the call has no retries: see [`Chunk::sent`]).
    HandlesGone,
}

impl Unsent {
    pub(crate) fn error(self) -> Error {
        match self {
            Unsent::Split => Error::new(
                ErrorKind::Codec,
                "its worker died and it could not be sent again: the arguments of the items \
                 before it or its own could not be decoded to find it",
            ),
            Unsent::Descriptors => Error::new(
                ErrorKind::Io,
                "its worker died and it could not be sent again (duplicating its channel \
                 handles failed: out of file descriptors?)",
            ),
            Unsent::HandlesGone => Error::new(
                ErrorKind::Crashed,
                "its worker process ended before its outcome came in, and it cannot run again: \
                 the channel handles among its arguments went to that worker (the pool keeps \
                 copies of them only for a call with retries)",
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// `close()`: no new work; queued work finishes.
    Closing,
    /// `terminate()`: stop now.
    Terminated,
}

struct State {
    queue: VecDeque<Chunk>,
    /// Each slot's parking place, by slot index.
    slots: Vec<Parking>,
    phase: Phase,
    live_slots: usize,
    /// Set when every slot has given up starting its worker: the pool cannot run anything.
    fatal: Option<String>,
    /// Threads decided on for dormant slots and not yet in `Shared::threads`.
    threads_starting: usize,
    /// Dormant slots whose workers `finish_dormant` is stopping.
    leaving: usize,
    /// Live [`Stream`]s: calls made while the pool ran that may still queue work.
    streams: usize,
    /// `join()` has begun: streams may queue no more.
    joining: bool,
}

impl State {
    /// See [`Shared::has_work_to_come`].
    fn work_to_come(&self) -> bool {
        match self.phase {
            Phase::Running => true,
            Phase::Closing => !self.queue.is_empty() || self.awaits_streams(),
            Phase::Terminated => false,
        }
    }

    /// A closing pool waits for the work its live streams may still queue.
    fn awaits_streams(&self) -> bool {
        self.phase == Phase::Closing && self.streams > 0 && !self.joining
    }
}

/// A call made while the pool ran that may go on queueing its work: an `imap` pulling its
/// input as it is read, a `map` encoding its input. It may queue after `close()` (a closing
/// pool's slots wait for it), until `join()` begins; as Python's `imap` made before `close`
/// runs to its end. Dropped once it has queued all it will.
pub(crate) struct Stream {
    shared: Arc<Shared>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.streams -= 1;
        let last = state.streams == 0 && state.phase == Phase::Closing;
        drop(state);
        if last {
            // Idle slots of a closing pool now leave.
            self.shared.wake_all();
        }
    }
}

/// Where a slot waits for work. While its thread waits, the slot itself (its worker, with an
/// empty pipeline) is parked here, so that a caller about to block on a single chunk can
/// borrow it and run the chunk from its own thread ([`Shared::lend`]): two wake-ups per
/// round trip (worker, caller) instead of four (slot thread, worker, slot thread, caller).
#[derive(Default)]
struct Parking {
    /// The slot's thread is in [`Shared::wait_next`].
    waiting: bool,
    /// The slot, while its thread waits and no caller has borrowed it.
    parked: Option<Box<Slot>>,
    /// Woken for work it has not yet looked at: neither woken again nor lent meanwhile.
    woken: bool,
    /// The slot has no thread (`Slot::dormant`): it waits here from the start, callers may
    /// borrow it, and work for it (or anything else it must do) starts its thread.
    dormant: bool,
}

impl Parking {
    /// Waiting with its slot at hand, and not already woken: work for it wakes it.
    fn idle(&self) -> bool {
        self.waiting && self.parked.is_some() && !self.woken
    }

    /// May be borrowed: idle, or dormant with its worker (started or starting) at hand.
    fn lendable(&self) -> bool {
        self.idle()
            || (self.dormant
                && self
                    .parked
                    .as_ref()
                    .is_some_and(|slot| !slot.needs_thread()))
    }

    /// For a dormant slot at hand: its thread is to start. Until it takes the slot, it
    /// counts as a thread woken for work it has not looked at yet.
    fn wake_dormant(&mut self, state_starting: &mut usize) -> bool {
        if !self.dormant || self.parked.is_none() {
            return false;
        }
        self.start_thread(state_starting);
        true
    }

    /// A dormant slot whose worker is not asked for yet (`Slot::cold`).
    fn cold(&self) -> bool {
        self.dormant && self.parked.as_ref().is_some_and(|slot| slot.is_cold())
    }

    /// Marks a dormant slot's thread as to start (see `wake_dormant`).
    fn start_thread(&mut self, state_starting: &mut usize) {
        self.dormant = false;
        self.waiting = true;
        self.woken = true;
        *state_starting += 1;
    }
}

impl State {
    /// Slots waiting with their slot at hand, woken already or not: a busy slot leaves this
    /// many queued chunks to them before it takes one ahead.
    fn waiting(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.waiting && slot.parked.is_some())
            .count()
    }

    /// Wakes up to `chunks` idle slots, one per chunk queued; then dormant ones, whose
    /// threads the caller starts ([`Shared::start_threads`]) once the lock is released.
    /// A cold slot woken owes a first start ([`Slot::owe_first_start`]): the second number is
    /// how many, for [`Shared::wake_idle`] to count.
    #[must_use]
    fn wake_idle(&mut self, chunks: usize, wakers: &[Condvar]) -> (Vec<usize>, usize) {
        let mut left = chunks;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if left == 0 {
                break;
            }
            if slot.idle() {
                slot.woken = true;
                wakers[index].notify_one();
                left -= 1;
            }
        }
        // Dormant slots with a worker (started or starting) first; then those whose worker
        // is still to be asked for, which take a start before they can run anything.
        let mut start = Vec::new();
        let mut owed = 0;
        for cold in [false, true] {
            for (index, slot) in self.slots.iter_mut().enumerate() {
                if left == 0 {
                    return (start, owed);
                }
                if slot.cold() == cold && slot.wake_dormant(&mut self.threads_starting) {
                    if cold && let Some(slot) = slot.parked.as_mut() {
                        slot.owe_first_start();
                        owed += 1;
                    }
                    start.push(index);
                    left -= 1;
                }
            }
        }
        (start, owed)
    }
}

/// State shared by a pool's handle, its callers and its slots.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// One per slot: a slot's thread waits on its own, so a wake-up reaches a slot that can
    /// act on it (an idle one for new work, a lent one when its slot comes back).
    wakers: Vec<Condvar>,
    next_seq: AtomicU64,
    /// Closed on terminate: its read end then polls readable in every slot, waking slots
    /// blocked on a worker's socket.
    stop_write: Mutex<Option<OwnedFd>>,
    pub(crate) stop_read: OwnedFd,
    /// The pid of each slot's current worker, and how many slots have yet to finish their
    /// first start (`worker_pids` waits for them; see [`Shared::first_start_done`]).
    pids: Mutex<Pids>,
    first_starts: Condvar,
    /// How long a thread about to sleep for a reply or an outcome polls first
    /// (`PoolBuilder::spin`).
    pub(crate) spin: Duration,
    /// Set by `terminate()`, for threads that poll.
    stopping: AtomicBool,
    /// The slots' threads, for `Pool::join`.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Notified when a dormant slot comes back from a caller, or a thread decided on for
    /// one is in `threads`: `join_threads` waits for those.
    returned: Condvar,
    /// This, for the threads it starts.
    me: Weak<Shared>,
}

struct Pids {
    /// Each slot's, where known.
    known: Vec<Option<u32>>,
    /// Where a slot's pid is still to be read: the fork server's answer for its worker
    /// (see `Slot::dormant`).
    answers: Vec<Option<crate::forkserver::Answer>>,
    starting: usize,
}

/// What a slot should do next.
pub(crate) enum Next {
    Run(Chunk),
    /// The slot came back from a caller with something for its thread to do: a worker to
    /// replace or recycle, or a chunk still in flight.
    Resume,
    Exit,
}

impl Shared {
    pub(crate) fn new(slots: usize, spin: Duration) -> Result<Arc<Shared>, Error> {
        // Close-on-exec: a worker holding a copy of the write end would keep the pipe open and
        // make terminate() unable to wake the slots.
        let (stop_read, stop_write) = pipe2(OFlag::O_CLOEXEC)
            .map_err(|err| Error::io("creating the pool's stop pipe failed", err.into()))?;
        Ok(Arc::new_cyclic(|me| Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                slots: (0..slots).map(|_| Parking::default()).collect(),
                phase: Phase::Running,
                live_slots: slots,
                fatal: None,
                threads_starting: 0,
                leaving: 0,
                streams: 0,
                joining: false,
            }),
            wakers: (0..slots).map(|_| Condvar::new()).collect(),
            next_seq: AtomicU64::new(1),
            stop_write: Mutex::new(Some(stop_write)),
            stop_read,
            pids: Mutex::new(Pids {
                known: vec![None; slots],
                answers: vec![None; slots],
                starting: slots,
            }),
            first_starts: Condvar::new(),
            spin,
            stopping: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            returned: Condvar::new(),
            me: me.clone(),
        }))
    }

    /// Keeps a slot's thread for `join_threads`.
    pub(crate) fn add_thread(&self, handle: JoinHandle<()>) {
        self.lock_threads().push(handle);
    }

    fn lock_threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`State::wake_idle`], with the first starts that cold slots woken owe counted (under
    /// the state's lock, so that `worker_pids` cannot see a cold slot neither cold nor
    /// counted): `worker_pids` waits for them.
    fn wake_idle(&self, state: &mut State, chunks: usize) -> Vec<usize> {
        let (start, owed) = state.wake_idle(chunks, &self.wakers);
        if owed > 0 {
            self.lock_pids().starting += owed;
        }
        start
    }

    /// Asks for the workers of the dormant slots that have none yet ([`Slot::cold`]), all at
    /// once, as `build` asks for the first: for `worker_pids`, which lists every worker. A
    /// worker the fork server does not take is started at once by the slot's own thread (by
    /// running the executable: a start on this thread could not outlive it).
    pub(crate) fn launch_cold(&self, spawn: &crate::spawn::SpawnOptions) {
        let cold: Vec<Box<Slot>> = {
            let mut state = self.lock();
            // As a replacement: not for a pool that can get no more work.
            if !state.work_to_come() {
                return;
            }
            let cold: Vec<Box<Slot>> = state
                .slots
                .iter_mut()
                .filter(|parking| parking.cold())
                .filter_map(|parking| parking.parked.take())
                .map(|mut slot| {
                    slot.owe_first_start();
                    slot
                })
                .collect();
            // Counted before the lock goes: a concurrent `worker_pids` waits for these.
            if !cold.is_empty() {
                self.lock_pids().starting += cold.len();
            }
            cold
        };
        if cold.is_empty() {
            return;
        }
        let forked = crate::spawn::WorkerProcess::launch(spawn, cold.len())
            .and_then(crate::spawn::Launching::deferred)
            .unwrap_or_default();
        let mut forked = forked.into_iter();
        for mut slot in cold {
            if let Some(launched) = forked.next().flatten() {
                // Its pid (the server's answer) is known: its first start is under way.
                slot.adopt_launched(launched);
                slot.first_start_settled();
            }
            // One the server did not take starts on its thread, which settles it.
            self.give_back(slot);
        }
    }

    /// Parks a slot that has no thread ([`Slot::dormant`]).
    pub(crate) fn park_dormant(&self, slot: Box<Slot>) {
        let index = slot.index();
        self.lock().slots[index] = Parking {
            waiting: false,
            parked: Some(slot),
            woken: false,
            dormant: true,
        };
    }

    /// Starts the threads of the dormant slots at `indices`, which `wake_dormant` marked.
    fn start_threads(&self, indices: Vec<usize>) {
        for index in indices {
            let spawned = match self.me.upgrade() {
                Some(shared) => std::thread::Builder::new()
                    .name(format!("multiproc-slot-{index}"))
                    .spawn(move || {
                        let slot = shared.take_parked(index);
                        if let Some(slot) = slot {
                            Slot::run_resumed(slot);
                        }
                    }),
                None => Err(std::io::Error::other("the pool is gone")),
            };
            let mut more = Vec::new();
            match spawned {
                Ok(handle) => self.add_thread(handle),
                Err(err) => {
                    // Without a thread the slot leaves the pool, as one whose worker cannot
                    // start does; the work it was woken for goes to the others.
                    if let Some(slot) = self.take_parked(index) {
                        let error = Error::io("starting a pool thread failed", err);
                        slot.leave(Some(&error));
                    }
                    let mut state = self.lock();
                    let queued = state.queue.len();
                    more = self.wake_idle(&mut state, queued);
                }
            }
            // After the handle is in `threads`: `join_threads` relies on that order.
            let mut state = self.lock();
            state.threads_starting -= 1;
            self.returned.notify_all();
            drop(state);
            self.start_threads(more);
        }
    }

    /// Takes the slot parked at `index`, for the thread started for it.
    fn take_parked(&self, index: usize) -> Option<Box<Slot>> {
        std::mem::take(&mut self.lock().slots[index]).parked
    }

    /// Once the pool is closing or terminated: stops the workers of the dormant slots at
    /// hand, from this thread (all asked at once, then each waited for).
    fn finish_dormant(&self) {
        let slots: Vec<Box<Slot>> = {
            let mut state = self.lock();
            if state.phase == Phase::Running {
                return;
            }
            let slots: Vec<_> = state
                .slots
                .iter_mut()
                .filter(|parking| parking.dormant)
                .filter_map(|parking| {
                    let slot = parking.parked.take()?;
                    parking.dormant = false;
                    Some(slot)
                })
                .collect();
            state.leaving += slots.len();
            slots
        };
        if slots.is_empty() {
            return;
        }
        let count = slots.len();
        Slot::leave_all(slots);
        let mut state = self.lock();
        state.leaving -= count;
        self.returned.notify_all();
    }

    /// Waits until every slot has left the pool, which must be closing or terminated: joins
    /// the slots' threads, and stops the workers of the dormant slots itself.
    pub(crate) fn join_threads(&self) {
        loop {
            self.finish_dormant();
            let handles = std::mem::take(&mut *self.lock_threads());
            if handles.is_empty() {
                let state = self.lock();
                // A dormant slot still out with a caller comes back (and its return may
                // start its thread); a thread decided on is about to be in `threads`; another
                // thread (a `terminate`) may be stopping dormant slots' workers.
                let out = state
                    .slots
                    .iter()
                    .any(|parking| parking.dormant && parking.parked.is_none());
                // A thread counted out of `threads_starting` is in `threads` already, perhaps
                // since `handles` was taken.
                if !out && state.threads_starting == 0 && state.leaving == 0 {
                    if !self.lock_threads().is_empty() {
                        continue;
                    }
                    return;
                }
                drop(
                    self.returned
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                continue;
            }
            for handle in handles {
                let _ = handle.join();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated (every update
        // is a single push/pop), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// A [`Stream`] for a call starting now; `None` once the pool is closed or terminated
    /// (the call's work is then refused).
    pub(crate) fn open_stream(self: &Arc<Self>) -> Option<Stream> {
        let mut state = self.lock();
        if state.phase != Phase::Running {
            return None;
        }
        state.streams += 1;
        Some(Stream {
            shared: Arc::clone(self),
        })
    }

    /// Queues chunks at the back. Fails them (and returns the error) if the pool no longer
    /// accepts work: it is closed (unless they come from a `stream` made before, and `join`
    /// has not begun) or terminated.
    pub(crate) fn submit(
        &self,
        stream: Option<&Stream>,
        chunks: impl IntoIterator<Item = Chunk>,
    ) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(error) = Self::refusal(&state, stream.is_some()) {
            drop(state);
            for chunk in chunks {
                chunk.fail_all(&|index| error.for_item(chunk.call.task_name(), index));
            }
            return Err(error);
        }
        let before = state.queue.len();
        state.queue.extend(chunks);
        let added = state.queue.len() - before;
        // A slot parks itself under this lock before it sleeps: with none idle, busy slots
        // find the chunks when they next look, and the wake-up system call is saved.
        let start = self.wake_idle(&mut state, added);
        drop(state);
        self.start_threads(start);
        Ok(())
    }

    /// Why a new call is refused now, if it is: for a call with no items, which has none to
    /// fail one by one.
    pub(crate) fn refuses_calls(&self) -> Option<Error> {
        Self::refusal(&self.lock(), false)
    }

    fn refusal(state: &State, streamed: bool) -> Option<Error> {
        match state.phase {
            Phase::Running => state
                .fatal
                .as_ref()
                .map(|message| Error::new(ErrorKind::Spawn, message.clone())),
            Phase::Closing if streamed && !state.joining => {
                if state.live_slots == 0 {
                    Some(Error::closed(
                        "the pool's last worker left before this item could run",
                    ))
                } else {
                    state
                        .fatal
                        .as_ref()
                        .map(|message| Error::new(ErrorKind::Spawn, message.clone()))
                }
            }
            Phase::Closing | Phase::Terminated => Some(Error::closed(
                "the pool is closed: it accepts no new work after close() or terminate()",
            )),
        }
    }

    /// Runs `chunk` from the calling thread on an idle worker when one is free and nothing is
    /// queued, else queues it. For a caller that blocks on the chunk's outcomes right away
    /// (`apply`, the last chunk of `map`): the round trip then wakes two threads, the worker
    /// and the caller, instead of four.
    pub(crate) fn submit_and_wait(
        &self,
        stream: Option<&Stream>,
        chunk: Chunk,
    ) -> Result<(), Error> {
        let Some(slot) = self.lend() else {
            return self.submit(stream, [chunk]);
        };
        let mut lent = Lent {
            shared: self,
            slot: Some(slot),
        };
        lent.slot.as_mut().expect("set above").run_direct(chunk);
        Ok(())
    }

    /// Puts chunks that a dead worker never started back at the front, in order.
    pub(crate) fn requeue_front(&self, chunks: Vec<Chunk>) {
        if chunks.is_empty() {
            return;
        }
        let mut state = self.lock();
        if state.phase == Phase::Terminated {
            drop(state);
            for chunk in chunks {
                chunk.fail_all(&|index| terminated(chunk.call.task_name(), index));
            }
            return;
        }
        let added = chunks.len();
        for chunk in chunks.into_iter().rev() {
            state.queue.push_front(chunk);
        }
        let start = self.wake_idle(&mut state, added);
        drop(state);
        self.start_threads(start);
    }

    /// Parks `slot` until there is a chunk for it, or it has something else to do, or it
    /// should exit; then hands it back. While parked, a caller may borrow it (see
    /// [`lend`](Self::lend)): its thread then waits for its return.
    pub(crate) fn wait_next(&self, slot: Box<Slot>) -> (Next, Box<Slot>) {
        let index = slot.index();
        let mut state = self.lock();
        state.slots[index] = Parking {
            waiting: true,
            parked: Some(slot),
            woken: false,
            dormant: false,
        };
        loop {
            if let Some(slot) = &state.slots[index].parked {
                let next = if state.phase == Phase::Terminated {
                    Some(Next::Exit)
                } else if slot.needs_thread() {
                    Some(Next::Resume)
                } else if let Some(chunk) = Self::pop_live(&mut state) {
                    Some(Next::Run(chunk))
                } else if (state.phase == Phase::Closing && !state.awaits_streams())
                    || state.fatal.is_some()
                {
                    Some(Next::Exit)
                } else {
                    None
                };
                if let Some(next) = next {
                    let parking = std::mem::take(&mut state.slots[index]);
                    let slot = parking.parked.expect("checked above");
                    return (next, slot);
                }
            }
            state.slots[index].woken = false;
            let trim = state.slots[index]
                .parked
                .as_ref()
                .is_some_and(|slot| slot.holds_large_regions());
            if trim {
                // Large shared regions are given up after an idle spell.
                let (guard, waited) = self.wakers[index]
                    .wait_timeout(state, crate::slot::TRIM_AFTER)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                state = guard;
                if waited.timed_out()
                    && let Some(slot) = state.slots[index].parked.as_mut()
                {
                    slot.trim_regions();
                }
            } else {
                state = self.wakers[index]
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }

    /// Borrows an idle slot, to run one chunk from the caller's thread, when the pool
    /// accepts work and nothing is queued (a borrowed slot never overtakes queued work).
    /// Give it back with [`give_back`](Self::give_back).
    pub(crate) fn lend(&self) -> Option<Box<Slot>> {
        let mut state = self.lock();
        if state.phase != Phase::Running || state.fatal.is_some() || !state.queue.is_empty() {
            return None;
        }
        state
            .slots
            .iter_mut()
            .find(|slot| slot.lendable())
            .and_then(|slot| slot.parked.take())
    }

    /// Returns a borrowed slot to its parking place, waking its thread only if there is
    /// something for it to do.
    pub(crate) fn give_back(&self, slot: Box<Slot>) {
        let index = slot.index();
        let mut state = self.lock();
        // Its thread also times the idle spell after which large regions are given up.
        let wake = state.phase != Phase::Running
            || !state.queue.is_empty()
            || slot.needs_thread()
            || slot.holds_large_regions();
        let mut start = Vec::new();
        let State {
            slots,
            threads_starting,
            ..
        } = &mut *state;
        let parking = &mut slots[index];
        parking.parked = Some(slot);
        if parking.dormant {
            if wake && parking.wake_dormant(threads_starting) {
                start.push(index);
            }
            self.returned.notify_all();
        } else if wake {
            parking.woken = true;
            self.wakers[index].notify_one();
        }
        drop(state);
        self.start_threads(start);
    }

    /// A chunk to send ahead while this slot's worker is busy, if taking it leaves enough
    /// queued for the idle slots.
    /// Only a chunk of `call`: every chunk in flight in one worker then belongs to one call
    /// and shares its deadline policy.
    pub(crate) fn try_prefetch(&self, call: u64) -> Option<Chunk> {
        let mut state = self.lock();
        if state.phase == Phase::Terminated || state.queue.len() <= state.waiting() {
            return None;
        }
        Self::drop_abandoned(&mut state);
        let front = state.queue.front()?;
        // A chunk whose channel handles would go with it (no retries: see `Chunk::sent`)
        // waits until its worker is free: queued behind a crash, it could not run again.
        if front.call.id() != call || front.gives_handles_away() {
            return None;
        }
        state.queue.pop_front()
    }

    fn pop_live(state: &mut State) -> Option<Chunk> {
        Self::drop_abandoned(state);
        state.queue.pop_front()
    }

    /// Drops the chunks at the front of the queue whose calls nobody reads any more.
    fn drop_abandoned(state: &mut State) {
        while state
            .queue
            .front()
            .is_some_and(|chunk| chunk.call.abandoned())
        {
            state.queue.pop_front();
        }
    }

    fn wake_all(&self) {
        for waker in &self.wakers {
            waker.notify_all();
        }
    }

    fn lock_pids(&self) -> MutexGuard<'_, Pids> {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_pid(&self, slot: usize, pid: Option<u32>) {
        let mut pids = self.lock_pids();
        pids.known[slot] = pid;
        pids.answers[slot] = None;
    }

    /// The pid of slot `slot`'s worker is the fork server's `answer`, read when asked for.
    pub(crate) fn set_pid_answer(&self, slot: usize, answer: crate::forkserver::Answer) {
        let mut pids = self.lock_pids();
        pids.known[slot] = None;
        pids.answers[slot] = Some(answer);
    }

    /// A slot has finished its first start, with a worker or without.
    pub(crate) fn first_start_done(&self) {
        let mut pids = self.lock_pids();
        pids.starting = pids.starting.saturating_sub(1);
        if pids.starting == 0 {
            self.first_starts.notify_all();
        }
    }

    /// The pids of the workers running now, without waiting for any to start.
    pub(crate) fn pids_now(&self) -> Vec<u32> {
        let pids = self.lock_pids();
        let answered = pids
            .answers
            .iter()
            .flatten()
            .filter_map(|answer| answer.get()?.pid());
        pids.known
            .iter()
            .flatten()
            .copied()
            .chain(answered)
            .collect()
    }

    /// Waits `pause` before a failed worker start is tried again: false when it should not
    /// be, because the pool was terminated (which ends the pause at once) or is closing with
    /// nothing queued.
    pub(crate) fn retry_after(&self, pause: Duration) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.stop_read.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(pause).unwrap_or(PollTimeout::MAX),
        );
        self.has_work_to_come()
    }

    /// Whether a worker may still get work: the pool runs, or is closing with work queued or
    /// a stream that may queue more.
    pub(crate) fn has_work_to_come(&self) -> bool {
        self.lock().work_to_come()
    }

    /// The pids of the workers running now, once every slot has finished its first start
    /// (a pool returns from `build` when its first worker is ready).
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids = self.lock_pids();
        while pids.starting > 0 {
            pids = self
                .first_starts
                .wait(pids)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        // The fork server's answers for dormant slots' workers, read now if they are not
        // yet (they are there as soon as it has forked), without the lock: reading one
        // waits for the server.
        let owed: Vec<_> = pids.answers.iter().cloned().enumerate().collect();
        drop(pids);
        let read: Vec<_> = owed
            .into_iter()
            .filter_map(|(slot, answer)| answer.map(|answer| (slot, answer.wait(), answer)))
            .collect();
        let mut pids = self.lock_pids();
        for (slot, forked, answer) in read {
            // Unless the slot has moved on meanwhile (its worker used, or replaced).
            if pids.answers[slot]
                .as_ref()
                .is_some_and(|now| now.is(&answer))
            {
                pids.answers[slot] = None;
                pids.known[slot] = forked.pid();
            }
        }
        pids.known.iter().flatten().copied().collect()
    }

    /// `terminate()` was called: a cheap check for a thread that polls.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn is_terminated(&self) -> bool {
        self.lock().phase == Phase::Terminated
    }

    /// `close()`: finish what is queued, accept nothing new.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Running {
            state.phase = Phase::Closing;
        }
        drop(state);
        self.wake_all();
    }

    /// `join()` begins: streams made before `close()` may queue no more, and the slots leave
    /// once the queue is empty.
    pub(crate) fn end_streams(&self) {
        self.lock().joining = true;
        self.wake_all();
    }

    /// `terminate()`: fail everything queued with `Closed` and wake every slot.
    pub(crate) fn terminate(&self) {
        let mut state = self.lock();
        state.phase = Phase::Terminated;
        self.stopping.store(true, Ordering::Release);
        let queued: Vec<Chunk> = state.queue.drain(..).collect();
        drop(state);
        self.wake_all();
        drop(
            self.stop_write
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        for chunk in queued {
            chunk.fail_all(&|index| terminated(chunk.call.task_name(), index));
        }
        self.finish_dormant();
    }

    /// A slot is leaving: with `error`, because it gave up starting its worker. When it was
    /// the last, nothing can run what is still queued (work put back by a worker that died
    /// after the others had left a closing pool, say): it fails, with the start error if
    /// there is one, and new work is refused with it.
    pub(crate) fn slot_exited(&self, error: Option<&Error>) {
        let mut state = self.lock();
        state.live_slots -= 1;
        if state.live_slots > 0 {
            // Work it was woken for and could not run goes to the slots left, one of which
            // may not have been woken (a dormant one: it would wait for work forever).
            let queued = state.queue.len();
            if queued > 0 {
                let start = self.wake_idle(&mut state, queued);
                drop(state);
                self.start_threads(start);
            }
            return;
        }
        // A start that fails while the pool closes is not the pool's failure.
        if let Some(error) = error
            && state.phase == Phase::Running
        {
            state.fatal = Some(format!("no worker process could be started: {error}"));
        }
        let fatal = state.fatal.clone();
        let queued: Vec<Chunk> = state.queue.drain(..).collect();
        drop(state);
        self.wake_all();
        for chunk in queued {
            let task = chunk.call.task_name();
            chunk.fail_all(&|index| {
                match &fatal {
                    Some(message) => Error::new(ErrorKind::Spawn, message.clone()),
                    None => Error::closed("the pool's last worker left before this item could run"),
                }
                .with_task(task)
                .with_index(index)
            });
        }
    }
}

/// A borrowed slot; given back when dropped, even by a panic in a result's decoding.
struct Lent<'a> {
    shared: &'a Shared,
    slot: Option<Box<Slot>>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.shared.give_back(slot);
        }
    }
}

pub(crate) fn terminated(task: &str, index: usize) -> Error {
    Error::closed("the pool was terminated before this item finished")
        .with_task(task)
        .with_index(index)
}
