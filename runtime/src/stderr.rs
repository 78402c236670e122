//! A worker's stderr: a pipe, forwarded to the parent's stderr, with its last lines kept so
//! an error about a worker that died can quote what it said before dying.
//!
//! The worker's owner (its slot, or a `Process`'s supervisor) polls the pipe with the
//! worker's channel until it first has something to say. From then on the pipe belongs to
//! the process's one forwarding thread ([`Forwarder`], started at that moment), which reads
//! it, keeps its tail, and writes what it reads to the parent's stderr (file descriptor 2,
//! without std's lock on it: as a worker writing to an inherited stderr would) until end of
//! stream, that is until every process holding its write end is gone, those a task started
//! included. So:
//! - a slow, full or held stderr stalls only the workers writing to it (as an inherited one
//!   would), never a thread that enforces deadlines or waits for results;
//! - a process a task started can go on writing to stderr after its worker is gone;
//! - a program whose workers write nothing to stderr never starts the thread.
//!
//! When a worker is stopped, its owner waits (a moment at most) for what it wrote to be
//! written out ([`StderrTail::settle`]), so that it comes before what the program writes
//! next.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of a worker's stderr kept for error reports: room for a backtrace (with
/// `RUST_BACKTRACE`) after the line that says what went wrong.
const KEEP: usize = 32 * 1024;
/// Lines quoted in an error.
const LINES: usize = 12;
/// Bytes read from a pipe at a time.
const READ: usize = 16 * 1024;
/// Bytes an owner reads at most at once: more than a pipe holds by default, and a bound
/// when a process a task started writes without end.
const TAKE: usize = 256 * 1024;
/// A line longer than this is written in parts (while the rest of it has not come).
const LINE_MAX: usize = 8 * 1024;
/// How long [`StderrTail::settle`] waits for a stopped worker's output to be written, at most.
const SETTLE: Duration = Duration::from_secs(1);

/// One worker's stderr pipe.
pub(crate) struct StderrTail {
    /// The read end, until its end of stream.
    pipe: Option<Arc<File>>,
    /// What was read of it, shared with the forwarder once it has the pipe.
    shared: Arc<Shared>,
    /// The forwarder has the pipe: its owner no longer polls it.
    handed_over: bool,
}

/// What was read of one pipe, and a signal for each write of it.
#[derive(Default)]
struct Shared {
    seen: Mutex<Seen>,
    written: Condvar,
}

#[derive(Default)]
struct Seen {
    /// The last [`KEEP`] bytes.
    tail: VecDeque<u8>,
    /// Bytes read by the owner that the forwarder has yet to write.
    unwritten: Vec<u8>,
    /// The start of a line whose end has not come yet: whole lines are written, so that
    /// workers' lines do not interleave (a line is often several writes: `eprintln!` makes
    /// one per piece).
    partial: Vec<u8>,
    /// The worker is gone: write `partial` too.
    flush: bool,
    /// Bytes read, and bytes written to the parent's stderr (or dropped, when it takes none).
    read: u64,
    written: u64,
}

/// What one read of a pipe found.
enum Got {
    /// Bytes (kept in the tail already).
    Bytes(Vec<u8>),
    /// Nothing for now: its writers are still there.
    Nothing,
    /// End of stream: no process holds the write end any more.
    End,
}

impl Seen {
    /// Reads what `pipe` (non-blocking) has now, up to [`READ`] bytes, into the tail.
    fn read_from(&mut self, pipe: &File) -> Got {
        let mut buf = vec![0u8; READ];
        loop {
            match (&*pipe).read(&mut buf) {
                Ok(0) => return Got::End,
                Ok(n) => {
                    buf.truncate(n);
                    self.read += n as u64;
                    self.tail.extend(&buf);
                    let excess = self.tail.len().saturating_sub(KEEP);
                    self.tail.drain(..excess);
                    return Got::Bytes(buf);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Got::Nothing,
                // Not a pipe that can be read: as if it had ended.
                Err(_) => return Got::End,
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    /// Writes the whole lines of what is held back followed by `bytes` (all of it at the
    /// pipe's end, once the worker is gone, or past [`LINE_MAX`]), then counts them written.
    fn forward(&self, bytes: &[u8], end: bool) {
        let out = {
            let mut seen = self.lock();
            let mut out = std::mem::take(&mut seen.partial);
            out.extend_from_slice(bytes);
            let lines = out.iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
            let whole = if end || seen.flush || out.len() - lines > LINE_MAX {
                out.len()
            } else {
                lines
            };
            // A flush is for what was read before it: once written, lines are whole again
            // (a process the task started may write on).
            if whole == out.len() {
                seen.flush = false;
            }
            seen.partial = out.split_off(whole);
            out
        };
        if out.is_empty() {
            return;
        }
        write_stderr(&out);
        self.lock().written += out.len() as u64;
        self.written.notify_all();
    }

    /// Writes what the owner read (all of it with `end`).
    fn forward_unwritten(&self, end: bool) {
        let bytes = std::mem::take(&mut self.lock().unwritten);
        self.forward(&bytes, end);
    }
}

impl StderrTail {
    /// Takes the read end of a worker's stderr, made non-blocking.
    pub(crate) fn new(pipe: Option<OwnedFd>) -> StderrTail {
        let pipe = pipe.map(File::from);
        if let Some(pipe) = &pipe {
            use nix::fcntl::{FcntlArg, OFlag, fcntl};
            let _ = fcntl(pipe.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        }
        StderrTail {
            pipe: pipe.map(Arc::new),
            shared: Arc::default(),
            handed_over: false,
        }
    }

    /// The descriptor for the owner to poll: until the pipe first has something to say.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.pipe
            .as_ref()
            .filter(|_| !self.handed_over)
            .map(|pipe| pipe.as_fd())
    }

    /// Takes what the pipe has now, never waiting: bytes go to the forwarder, which gets
    /// the pipe with the first of them and reads the rest itself; end of stream closes it.
    pub(crate) fn pump(&mut self) {
        self.take(false);
    }

    /// Reads what the pipe has now for the forwarder to write: with `gone` (its worker is
    /// gone), all of it (up to [`TAKE`]: the forwarder reads the rest) and its last line
    /// ended or not; else, while its owner still polls it, its first bytes.
    fn take(&mut self, gone: bool) {
        let Some(pipe) = &self.pipe else {
            return;
        };
        let mut seen = self.shared.lock();
        let mut read = Vec::new();
        let ended = loop {
            match seen.read_from(pipe) {
                Got::Bytes(bytes) => {
                    read.extend_from_slice(&bytes);
                    // The rest is the forwarder's to read, once it has the pipe.
                    if !gone && !self.handed_over || read.len() >= TAKE {
                        break false;
                    }
                }
                Got::Nothing => break false,
                Got::End => break true,
            }
        };
        let any = !read.is_empty();
        seen.unwritten.append(&mut read);
        seen.flush |= gone || ended;
        let due = seen.written < seen.read;
        drop(seen);
        if ended {
            self.pipe = None;
        }
        if !any && !due {
            return;
        }
        let Some(forwarder) = Forwarder::get() else {
            // No thread to forward with: written from here (it may wait).
            self.shared.forward_unwritten(false);
            return;
        };
        match &self.pipe {
            Some(pipe) if !self.handed_over => {
                self.handed_over = true;
                forwarder.adopt(Arc::clone(pipe), Arc::clone(&self.shared));
            }
            _ => forwarder.adopt_unwritten(Arc::clone(&self.shared)),
        }
    }

    /// For a worker that is gone: takes all the pipe has, and waits until the forwarder has
    /// written it (so that it comes out before what the program writes next), for
    /// [`SETTLE`] at most, and not past `until` (workers stopped together share one): a
    /// stderr that takes nothing gets the rest later, or never.
    pub(crate) fn settle(&mut self, until: Option<Instant>) {
        let deadline = until.map_or(Instant::now() + SETTLE, |until| {
            until.min(Instant::now() + SETTLE)
        });
        self.take(true);
        let mut seen = self.shared.lock();
        while seen.written < seen.read {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            seen = self
                .shared
                .written
                .wait_timeout(seen, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The last lines a worker that is gone wrote, for an error message: once all it wrote
    /// is written out ([`settle`](Self::settle)), so that the error comes after them.
    pub(crate) fn last_lines(&mut self) -> Option<String> {
        self.settle(None);
        let seen = self.shared.lock();
        let (front, back) = seen.tail.as_slices();
        let text = String::from_utf8_lossy(&[front, back].concat()).into_owned();
        drop(seen);
        let lines = without_backtraces(text.lines().filter(|line| !line.trim().is_empty()));
        let start = lines.len().saturating_sub(LINES);
        let tail = lines[start..].join("\n");
        (!tail.is_empty()).then_some(tail)
    }
}

/// The lines, each run of backtrace frames (`  12: symbol`, `      at file:line`) in one
/// line that counts them: a backtrace printed as a worker dies (`RUST_BACKTRACE` set) would
/// otherwise fill the quote and push out the line that says what went wrong (a failed
/// allocation, say). The whole backtrace is on the program's stderr.
fn without_backtraces<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<std::borrow::Cow<'a, str>> {
    let mut kept = Vec::new();
    let mut frames = 0;
    let fold = |kept: &mut Vec<std::borrow::Cow<'a, str>>, frames: &mut usize| {
        if *frames > 0 {
            kept.push(format!("  [{frames} lines of backtrace, on stderr]").into());
            *frames = 0;
        }
    };
    for line in lines {
        if is_backtrace_frame(line) {
            frames += 1;
        } else {
            fold(&mut kept, &mut frames);
            kept.push(line.into());
        }
    }
    fold(&mut kept, &mut frames);
    kept
}

/// A line of a Rust backtrace's frames: indented, then `N: ` or `at `.
fn is_backtrace_frame(line: &str) -> bool {
    let text = line.trim_start();
    if text.len() == line.len() {
        return false;
    }
    text.starts_with("at ")
        || text
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Drop for StderrTail {
    /// The worker is gone, but a process it started may hold the write end and write to it
    /// later: unless the pipe has ended, the forwarder takes it, until it does.
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        self.take(true);
        if let Some(pipe) = self.pipe.take()
            && !self.handed_over
            && let Some(forwarder) = Forwarder::get()
        {
            forwarder.adopt(pipe, Arc::clone(&self.shared));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The process's stderr forwarding thread: reads the pipes handed to it, writes what it
/// reads to file descriptor 2, and closes each pipe at its end of stream.
struct Forwarder {
    /// The process it forwards for.
    pid: u32,
    /// Its thread: [`NONE`], [`STARTING`] or [`RUNNING`].
    thread: AtomicU8,
    work: Mutex<Work>,
    /// Written to, to wake the thread for new work (non-blocking: a full pipe wakes it too).
    wake_write: OwnedFd,
    wake_read: OwnedFd,
}

const NONE: u8 = 0;
const STARTING: u8 = 1;
const RUNNING: u8 = 2;

#[derive(Default)]
struct Work {
    /// Pipes to read, with what was read of each.
    pipes: Vec<(Arc<File>, Arc<Shared>)>,
    /// Pipes whose owner read bytes that are still to be written.
    unwritten: Vec<Arc<Shared>>,
}

impl Forwarder {
    /// This process's forwarder, its thread started on first use; `None` where no thread
    /// could be started now (a later call tries again, and that thread then takes what was
    /// handed over meanwhile). A copy of the program made with `fork` has none of its
    /// parent's threads: it makes its own forwarder, and never touches its parent's (whose
    /// locks another thread may have held at the fork).
    fn get() -> Option<&'static Forwarder> {
        let forwarder = Forwarder::current()?;
        loop {
            match forwarder.thread.load(Ordering::Acquire) {
                RUNNING => return Some(forwarder),
                // Another thread is starting it.
                STARTING => std::thread::yield_now(),
                _ => {
                    if forwarder
                        .thread
                        .compare_exchange(NONE, STARTING, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    let started = std::thread::Builder::new()
                        .name("multiproc-stderr".to_owned())
                        .spawn(move || forwarder.run())
                        .is_ok();
                    let now = if started { RUNNING } else { NONE };
                    forwarder.thread.store(now, Ordering::Release);
                    return started.then_some(forwarder);
                }
            }
        }
    }

    /// This process's forwarder, made if there is none yet (its thread may not be started).
    fn current() -> Option<&'static Forwarder> {
        static FORWARDER: AtomicPtr<Forwarder> = AtomicPtr::new(std::ptr::null_mut());
        let pid = std::process::id();
        loop {
            let current = FORWARDER.load(Ordering::Acquire);
            // SAFETY: a non-null pointer here is a leaked `Box`, never freed.
            if let Some(forwarder) = unsafe { current.as_ref() }
                && forwarder.pid == pid
            {
                return Some(forwarder);
            }
            let new = Box::into_raw(Box::new(Forwarder::new(pid)?));
            if FORWARDER
                .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // SAFETY: leaked just above: it lives as long as the process.
                return Some(unsafe { &*new });
            }
            // Another thread put its own in place first; ours was never shared.
            // SAFETY: made by `Box::into_raw` above, and not published.
            drop(unsafe { Box::from_raw(new) });
        }
    }

    fn new(pid: u32) -> Option<Forwarder> {
        use nix::fcntl::OFlag;
        let (wake_read, wake_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).ok()?;
        Some(Forwarder {
            pid,
            thread: AtomicU8::new(NONE),
            work: Mutex::default(),
            wake_write,
            wake_read,
        })
    }

    /// Takes `pipe`, to read and forward until its end of stream, after what its owner read.
    fn adopt(&self, pipe: Arc<File>, shared: Arc<Shared>) {
        let mut work = lock(&self.work);
        work.unwritten.push(Arc::clone(&shared));
        work.pipes.push((pipe, shared));
        drop(work);
        self.wake();
    }

    /// Writes what the owner of `shared` read.
    fn adopt_unwritten(&self, shared: Arc<Shared>) {
        lock(&self.work).unwritten.push(shared);
        self.wake();
    }

    fn wake(&self) {
        let _ = nix::unistd::write(&self.wake_write, &[1]);
    }

    fn run(&self) -> ! {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut sink = [0u8; 64];
        loop {
            let (pipes, unwritten) = {
                let mut work = lock(&self.work);
                (work.pipes.clone(), std::mem::take(&mut work.unwritten))
            };
            for shared in unwritten {
                shared.forward_unwritten(false);
            }
            let mut fds = vec![PollFd::new(self.wake_read.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                pipes
                    .iter()
                    .map(|(pipe, _)| PollFd::new(pipe.as_fd(), PollFlags::POLLIN)),
            );
            if poll(&mut fds, PollTimeout::NONE).is_err() {
                continue;
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            if ready[0] {
                while matches!(nix::unistd::read(&self.wake_read, &mut sink), Ok(n) if n > 0) {}
            }
            let mut ended = Vec::new();
            for ((pipe, shared), _) in pipes.iter().zip(&ready[1..]).filter(|(_, ready)| **ready) {
                // What the owner read comes first: it came first.
                let (mut bytes, got) = {
                    let mut seen = shared.lock();
                    let earlier = std::mem::take(&mut seen.unwritten);
                    (earlier, seen.read_from(pipe))
                };
                let end = match got {
                    Got::Bytes(more) => {
                        bytes.extend_from_slice(&more);
                        false
                    }
                    Got::Nothing => false,
                    Got::End => {
                        ended.push(Arc::clone(pipe));
                        true
                    }
                };
                shared.forward(&bytes, end);
            }
            if !ended.is_empty() {
                lock(&self.work)
                    .pipes
                    .retain(|(pipe, _)| !ended.iter().any(|end| Arc::ptr_eq(end, pipe)));
            }
        }
    }
}

/// Writes `bytes` to file descriptor 2, whatever it is now, waiting while it is full; drops
/// them if it is closed or broken (forwarding is best effort: the pool goes on regardless).
fn write_stderr(mut bytes: &[u8]) {
    use nix::errno::Errno;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let stderr = io::stderr();
    let fd = stderr.as_fd();
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => {}
            // A non-blocking stderr that is full: wait until it takes more.
            Err(Errno::EAGAIN) => {
                let _ = poll(
                    &mut [PollFd::new(fd, PollFlags::POLLOUT)],
                    PollTimeout::NONE,
                );
            }
            Err(_) => return,
        }
    }
}
