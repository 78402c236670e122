//! A slot: the parent-side thread that owns one worker process.
//!
//! The slot pulls chunks from the shared queue when its worker has room, writes
//! their frames, reads results and hands them to each call's sink. Its socket is non-blocking
//! and driven by `poll`, so a large request and a large reply can never block each other.
//!
//! Prefetch: while chunks are short (under [`PREFETCH_BELOW`]), the slot keeps up to
//! `prefetch - 1` more chunks queued in the worker's socket behind the running one, so the
//! worker never waits a round trip for its next chunk. Long chunks are never queued behind a
//! busy worker: a round trip is negligible next to them, and a queued chunk could wait there
//! while another worker sits idle.
//!
//! The slot is also the worker's supervisor: it notices the worker's death (end of stream),
//! turns it into a `Crashed` error for the items that were running, puts the chunks that had
//! not started back in the queue, and starts a replacement. Workers are spawned from this
//! thread, which lives as long as the pool: on Linux the parent-death signal fires when the
//! spawning *thread* exits.

use crate::error::{Error, ErrorKind};
use crate::protocol::{self, FrameReader, Header};
use crate::sched::{Chunk, Next, Shared, terminated};
use crate::spawn::{SpawnOptions, WorkerProcess, describe_status, status_parts};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, send};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

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
}

struct InFlight {
    chunk: Chunk,
    /// Items of the chunk whose outcomes have arrived.
    done: u32,
}

/// Why a worker is gone.
enum Lost {
    /// End of stream or a failed write: the process died (or closed its channel).
    Died,
    /// It sent something that breaks the protocol; we kill it.
    Protocol(Error),
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
    inflight: VecDeque<InFlight>,
    /// `inflight[..sent_chunks]` are fully written; `sent_bytes` of the next one are.
    sent_chunks: usize,
    sent_bytes: usize,
    reader: FrameReader,
    /// When the front chunk started running (as far as the parent can tell), and how long
    /// the last completed chunk ran.
    front_since: Instant,
    last_chunk: Option<Duration>,
}

impl Slot {
    pub(crate) fn new(index: usize, shared: Arc<Shared>, config: Arc<SlotConfig>) -> Slot {
        let reader = FrameReader::new(config.spawn.max_frame_len);
        Slot {
            index,
            shared,
            config,
            worker: None,
            inflight: VecDeque::new(),
            sent_chunks: 0,
            sent_bytes: 0,
            reader,
            front_since: Instant::now(),
            last_chunk: None,
        }
    }

    /// The slot thread's body. Reports the first worker's start on `ready`.
    pub(crate) fn run(mut self, ready: Sender<Result<u32, Error>>) {
        match self.start_worker(1) {
            Ok(pid) => {
                let _ = ready.send(Ok(pid));
            }
            Err(err) => {
                self.shared.slot_lost(&err);
                let _ = ready.send(Err(err));
                return;
            }
        }
        drop(ready);
        self.serve();
        self.finish();
    }

    fn serve(&mut self) {
        loop {
            if self.worker.is_none() {
                if self.shared.is_terminated() {
                    return;
                }
                if let Err(err) = self.start_worker(3) {
                    self.shared.slot_lost(&err);
                    return;
                }
            }
            if self.inflight.is_empty() {
                match self.shared.wait_next() {
                    Next::Run(chunk) => {
                        if self.worker_died_while_idle() {
                            self.shared.requeue_front(vec![chunk]);
                            self.discard_worker();
                            continue;
                        }
                        self.push(chunk);
                    }
                    Next::Exit => return,
                }
            }
            while self.inflight.len() < self.config.prefetch
                && self.last_chunk.is_some_and(|took| took < PREFETCH_BELOW)
            {
                match self.shared.try_prefetch() {
                    Some(chunk) => self.push(chunk),
                    None => break,
                }
            }
            match self.pump() {
                Pumped::Progress => {}
                Pumped::Stop => return,
                Pumped::Lost(why) => self.on_worker_lost(&why),
            }
        }
    }

    /// Leaves the pool: a terminated pool kills its worker and fails what was in flight;
    /// a closed one lets the idle worker exit cleanly.
    fn finish(&mut self) {
        let terminated_now = self.shared.is_terminated();
        for flight in self.inflight.drain(..) {
            let task = flight.chunk.call.task_name();
            let first = flight.chunk.first + flight.done as usize;
            flight
                .chunk
                .call
                .fail(first, flight.chunk.count - flight.done, &|index| {
                    terminated(task, index)
                });
        }
        if let Some(mut worker) = self.worker.take() {
            if terminated_now {
                worker.kill();
            } else {
                worker.shutdown(self.config.shutdown_grace);
            }
        }
        self.shared.set_pid(self.index, None);
    }

    fn start_worker(&mut self, attempts: u32) -> Result<u32, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match WorkerProcess::spawn(&self.config.spawn) {
                Ok(worker) => {
                    let pid = worker.pid();
                    worker
                        .conn
                        .set_nonblocking(true)
                        .map_err(|err| Error::io("configuring a worker channel failed", err))?;
                    self.worker = Some(worker);
                    self.shared.set_pid(self.index, Some(pid));
                    return Ok(pid);
                }
                Err(err) if attempt >= attempts || self.shared.is_terminated() => return Err(err),
                // Transient failures (fork limits, a loaded machine) get a short back-off.
                Err(_) => std::thread::sleep(Duration::from_millis(50 * u64::from(attempt))),
            }
        }
    }

    fn push(&mut self, chunk: Chunk) {
        if self.inflight.is_empty() {
            self.front_since = Instant::now();
        }
        self.inflight.push_back(InFlight { chunk, done: 0 });
    }

    /// An idle worker has nothing to say: readable means end of stream (it was killed while
    /// idle). Its replacement then takes the chunk, which never started.
    fn worker_died_while_idle(&self) -> bool {
        let Some(worker) = &self.worker else {
            return true;
        };
        let mut fds = [PollFd::new(worker.conn.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    fn discard_worker(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.kill();
        }
        self.reset_channel_state();
    }

    fn reset_channel_state(&mut self) {
        self.sent_chunks = 0;
        self.sent_bytes = 0;
        self.reader = FrameReader::new(self.config.spawn.max_frame_len);
        self.shared.set_pid(self.index, None);
    }

    fn pump(&mut self) -> Pumped {
        loop {
            match self.drain_frames() {
                Ok(true) => return Pumped::Progress,
                Ok(false) => {}
                Err(err) => return Pumped::Lost(Lost::Protocol(err)),
            }
            if let Err(lost) = self.write_some() {
                return Pumped::Lost(lost);
            }
            let worker = self.worker.as_ref().expect("pump runs with a worker");
            let mut events = PollFlags::POLLIN;
            if self.sent_chunks < self.inflight.len() {
                events |= PollFlags::POLLOUT;
            }
            let (conn_events, stop) = {
                let mut fds = [
                    PollFd::new(worker.conn.as_fd(), events),
                    PollFd::new(self.shared.stop_read.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(_) => return Pumped::Lost(Lost::Died),
                }
                (
                    fds[0].revents().unwrap_or(PollFlags::empty()),
                    fds[1].revents().is_some_and(|r| !r.is_empty()),
                )
            };
            if stop {
                return Pumped::Stop;
            }
            if conn_events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                let worker = self.worker.as_mut().expect("pump runs with a worker");
                match self.reader.read_from(&mut worker.conn) {
                    Ok(0) => return Pumped::Lost(Lost::Died),
                    Ok(_) => {}
                    Err(err)
                        if matches!(
                            err.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(err) => match err.downcast::<Error>() {
                        Ok(err) => return Pumped::Lost(Lost::Protocol(err)),
                        Err(_) => return Pumped::Lost(Lost::Died),
                    },
                }
            }
        }
    }

    /// Writes as much of the pending frames as the socket takes without blocking.
    fn write_some(&mut self) -> Result<(), Lost> {
        let worker = self.worker.as_ref().expect("write_some runs with a worker");
        while let Some(flight) = self.inflight.get(self.sent_chunks) {
            let frame = &flight.chunk.frame[self.sent_bytes..];
            match send(
                worker.conn.as_raw_fd(),
                frame,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => {
                    self.sent_bytes += n;
                    if self.sent_bytes == flight.chunk.frame.len() {
                        self.sent_chunks += 1;
                        self.sent_bytes = 0;
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => return Ok(()),
                Err(_) => return Err(Lost::Died),
            }
        }
        Ok(())
    }

    /// Handles every complete frame buffered. True when at least one chunk completed.
    fn drain_frames(&mut self) -> Result<bool, Error> {
        let mut progress = false;
        while let Some(range) = self.reader.next_frame()? {
            let (header, payload) = protocol::parse_body(self.reader.body(range))?;
            let Header::Results { seq, first, count } = header else {
                return Err(protocol_error(format!(
                    "unexpected frame from a worker: {header:?}"
                )));
            };
            let front = self
                .inflight
                .front_mut()
                .filter(|front| front.chunk.seq == seq && front.done == first)
                .filter(|front| count <= front.chunk.count - front.done)
                .ok_or_else(|| protocol_error(format!("results for an unexpected chunk {seq}")))?;
            front
                .chunk
                .call
                .deliver(front.chunk.first + first as usize, count, payload);
            front.done += count;
            if front.done == front.chunk.count {
                self.inflight.pop_front();
                self.sent_chunks -= 1;
                progress = true;
                let now = Instant::now();
                self.last_chunk = Some(now - self.front_since);
                self.front_since = now;
            }
        }
        Ok(progress)
    }

    /// The worker is gone. The status page says what it was doing: the one item it was
    /// running fails; items of that chunk that never started, and the chunks queued behind
    /// it, go back to the front of the queue; items of that chunk that had finished but whose
    /// outcomes died with the worker (they are sent per chunk) run again. The next loop starts
    /// a replacement.
    fn on_worker_lost(&mut self, why: &Lost) {
        let Some(mut worker) = self.worker.take() else {
            return;
        };
        let pid = worker.pid();
        // Reaps a dead worker, or kills one that broke the protocol.
        let status = worker.kill();
        let published = worker.status.read();
        drop(worker);
        self.reset_channel_state();
        let mut inflight = std::mem::take(&mut self.inflight);
        let mut again = Vec::new();
        if let Some(front) = inflight.pop_front() {
            let chunk = &front.chunk;
            let task = chunk.call.task_name();
            let running = (published.seq == chunk.seq
                && (front.done..chunk.count).contains(&published.item))
            .then_some(published.item);
            match (why, running) {
                (Lost::Died, Some(culprit)) => {
                    let (signal, code) = status_parts(status);
                    chunk
                        .call
                        .fail(chunk.first + culprit as usize, 1, &|index| {
                            Error::new(
                                ErrorKind::Crashed,
                                format!("worker process {pid} died while running it"),
                            )
                            .with_task(task)
                            .with_index(index)
                            .with_status(signal, code)
                        });
                    again.extend(chunk.sub(&self.shared, front.done, culprit));
                    again.extend(chunk.sub(&self.shared, culprit + 1, chunk.count));
                }
                // It died before starting the chunk, or after finishing it: nothing to blame.
                (Lost::Died, None) => {
                    again.extend(chunk.sub(&self.shared, front.done, chunk.count));
                }
                // A malformed reply: its items fail rather than run again into the same fault.
                (Lost::Protocol(err), _) => {
                    let message = format!(
                        "worker process {pid} sent a malformed reply and was stopped ({}): {err}",
                        describe_status(status)
                    );
                    chunk.call.fail(
                        chunk.first + front.done as usize,
                        chunk.count - front.done,
                        &|index| {
                            Error::new(ErrorKind::Codec, message.clone())
                                .with_task(task)
                                .with_index(index)
                        },
                    );
                }
            }
        }
        again.extend(inflight.into_iter().map(|flight| flight.chunk));
        self.shared.requeue_front(again);
    }
}

fn protocol_error(message: String) -> Error {
    Error::new(ErrorKind::Codec, message)
}
