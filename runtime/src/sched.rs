//! The work queue shared by the callers (who submit chunks) and the slots (one thread per
//! worker process, which pull chunks when their worker has room: idle workers pull, nobody
//! pushes round-robin).

use crate::error::{Error, ErrorKind};
use crate::protocol::{self, Header};
use nix::fcntl::OFlag;
use nix::unistd::pipe2;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    fn fail(&self, first: usize, count: u32, error: &dyn Fn(usize) -> Error);
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
}

impl Chunk {
    /// A new chunk of items `from..to` of this one (positions within the chunk), for work
    /// that must run again after its worker died. `None` if the range is empty or the
    /// arguments cannot be re-split (which cannot happen for frames we encoded).
    pub(crate) fn sub(&self, shared: &Shared, from: u32, to: u32, attempt: u32) -> Option<Chunk> {
        if from >= to {
            return None;
        }
        let payload = &self.frame[self.payload_at..];
        let start = (self.skip)(payload, from)?;
        let end = start + (self.skip)(&payload[start..], to - from)?;
        let seq = shared.next_seq();
        let timed = self.timeout.is_some();
        let header = Header::Run {
            seq,
            task: self.task,
            count: to - from,
            timed,
        };
        let fds = crate::fdpass::duplicate(&self.fds).ok()?;
        let mut frame = Vec::with_capacity(32 + end - start);
        protocol::descriptors_frame(&mut frame, fds.len());
        let begin = protocol::begin_frame(&mut frame, &header);
        let payload_at = frame.len();
        frame.extend_from_slice(&payload[start..end]);
        protocol::end_frame(&mut frame, begin, u32::MAX).ok()?;
        Some(Chunk {
            call: Arc::clone(&self.call),
            seq,
            task: self.task,
            first: self.first + from as usize,
            count: to - from,
            timeout: self.timeout,
            retries: self.retries,
            attempt,
            unblamed_deaths: 0,
            frame,
            payload_at,
            skip: self.skip,
            fds,
        })
    }

    /// Fails every item of this chunk with `make(index)`.
    pub(crate) fn fail_all(&self, make: &dyn Fn(usize) -> Error) {
        self.call.fail(self.first, self.count, make);
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
    /// Slots blocked waiting for work: a slot takes a second chunk ahead only when more
    /// chunks are queued than there are idle slots, so prefetching never starves a worker.
    idle: usize,
    phase: Phase,
    live_slots: usize,
    /// Set when every slot has given up starting its worker: the pool cannot run anything.
    fatal: Option<String>,
}

/// State shared by a pool's handle, its callers and its slots.
pub(crate) struct Shared {
    state: Mutex<State>,
    work: Condvar,
    next_seq: AtomicU64,
    /// Closed on terminate: its read end then polls readable in every slot, waking slots
    /// blocked on a worker's socket.
    stop_write: Mutex<Option<OwnedFd>>,
    pub(crate) stop_read: OwnedFd,
    /// The pid of each slot's current worker.
    pids: Mutex<Vec<Option<u32>>>,
}

/// What a slot should do next.
pub(crate) enum Next {
    Run(Chunk),
    Exit,
}

impl Shared {
    pub(crate) fn new(slots: usize) -> Result<Shared, Error> {
        // Close-on-exec: a worker holding a copy of the write end would keep the pipe open and
        // make terminate() unable to wake the slots.
        let (stop_read, stop_write) = pipe2(OFlag::O_CLOEXEC)
            .map_err(|err| Error::io("creating the pool's stop pipe failed", err.into()))?;
        Ok(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                idle: 0,
                phase: Phase::Running,
                live_slots: slots,
                fatal: None,
            }),
            work: Condvar::new(),
            next_seq: AtomicU64::new(1),
            stop_write: Mutex::new(Some(stop_write)),
            stop_read,
            pids: Mutex::new(vec![None; slots]),
        })
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

    /// Queues chunks at the back. Fails them (and returns the error) if the pool no longer
    /// accepts work.
    pub(crate) fn submit(&self, chunks: impl IntoIterator<Item = Chunk>) -> Result<(), Error> {
        let mut state = self.lock();
        if let Some(error) = Self::refusal(&state) {
            drop(state);
            for chunk in chunks {
                chunk.fail_all(&|index| clone_for(&error, chunk.call.task_name(), index));
            }
            return Err(error);
        }
        let before = state.queue.len();
        state.queue.extend(chunks);
        let added = state.queue.len() - before;
        // A slot counts itself idle under this lock before it sleeps: with none idle, busy
        // slots find the chunks when they next look, and the wake-up system call is saved.
        let idle = state.idle;
        drop(state);
        if idle > 0 {
            if added == 1 {
                self.work.notify_one();
            } else if added > 1 {
                self.work.notify_all();
            }
        }
        Ok(())
    }

    fn refusal(state: &State) -> Option<Error> {
        if let Some(message) = &state.fatal {
            return Some(Error::new(ErrorKind::Spawn, message.clone()));
        }
        match state.phase {
            Phase::Running => None,
            Phase::Closing | Phase::Terminated => Some(Error::closed(
                "the pool is closed: it accepts no new work after close() or terminate()",
            )),
        }
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
        for chunk in chunks.into_iter().rev() {
            state.queue.push_front(chunk);
        }
        drop(state);
        self.work.notify_all();
    }

    /// Blocks until there is a chunk for this slot, or the slot should exit.
    pub(crate) fn wait_next(&self) -> Next {
        let mut state = self.lock();
        loop {
            if state.phase == Phase::Terminated {
                return Next::Exit;
            }
            if let Some(chunk) = Self::pop_live(&mut state) {
                return Next::Run(chunk);
            }
            if state.phase == Phase::Closing || state.fatal.is_some() {
                return Next::Exit;
            }
            state.idle += 1;
            state = self
                .work
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.idle -= 1;
        }
    }

    /// A chunk to send ahead while this slot's worker is busy, if taking it leaves enough
    /// queued for the idle slots.
    /// Only a chunk of `call`: every chunk in flight in one worker then belongs to one call
    /// and shares its deadline policy.
    pub(crate) fn try_prefetch(&self, call: u64) -> Option<Chunk> {
        let mut state = self.lock();
        if state.phase == Phase::Terminated || state.queue.len() <= state.idle {
            return None;
        }
        while state
            .queue
            .front()
            .is_some_and(|chunk| chunk.call.abandoned())
        {
            state.queue.pop_front();
        }
        if state.queue.front()?.call.id() != call {
            return None;
        }
        state.queue.pop_front()
    }

    fn pop_live(state: &mut State) -> Option<Chunk> {
        while let Some(chunk) = state.queue.pop_front() {
            if !chunk.call.abandoned() {
                return Some(chunk);
            }
        }
        None
    }

    pub(crate) fn set_pid(&self, slot: usize, pid: Option<u32>) {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[slot] = pid;
    }

    /// The pids of the workers running now.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .flatten()
            .copied()
            .collect()
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
        self.work.notify_all();
    }

    /// `terminate()`: fail everything queued with `Closed` and wake every slot.
    pub(crate) fn terminate(&self) {
        let mut state = self.lock();
        state.phase = Phase::Terminated;
        let queued: Vec<Chunk> = state.queue.drain(..).collect();
        drop(state);
        self.work.notify_all();
        drop(
            self.stop_write
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        for chunk in queued {
            chunk.fail_all(&|index| terminated(chunk.call.task_name(), index));
        }
    }

    /// A slot is leaving: with `error`, because it gave up starting its worker. When it was
    /// the last, nothing can run what is still queued (work put back by a worker that died
    /// after the others had left a closing pool, say): it fails, with the start error if
    /// there is one, and new work is refused with it.
    pub(crate) fn slot_exited(&self, error: Option<&Error>) {
        let mut state = self.lock();
        state.live_slots -= 1;
        if state.live_slots > 0 {
            return;
        }
        if let Some(error) = error {
            state.fatal = Some(format!("no worker process could be started: {error}"));
        }
        let fatal = state.fatal.clone();
        let queued: Vec<Chunk> = state.queue.drain(..).collect();
        drop(state);
        self.work.notify_all();
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

pub(crate) fn terminated(task: &str, index: usize) -> Error {
    Error::closed("the pool was terminated before this item finished")
        .with_task(task)
        .with_index(index)
}

fn clone_for(error: &Error, task: &str, index: usize) -> Error {
    Error::new(error.kind(), error.message().to_owned())
        .with_task(task)
        .with_index(index)
}
