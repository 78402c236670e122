//! The worker side: what a worker process does once it has its channel.
//!
//! A worker gets a [`WorkerSpec`] (the parent's pid, the frame limit, the memory cap) and a
//! socket. The fork server's copy gets both in memory (`forkserver`, then
//! [`serve_forked`]); an executable run again gets the spec in [`ENV`] and the socket as its
//! stdin, and [`worker_main`], first thing in `main`, takes them. Either then takes the
//! status page the parent sends first, says `Ready`, runs each `Run` chunk it receives and
//! answers with `Results`, until `Shutdown` or end of stream. It never returns to the user's
//! `main` body.

use crate::codec::{self, Sink};
use crate::error::{Error, ErrorKind};
use crate::outcome;
use crate::protocol::{self, FrameReader, Header};
use crate::region::{Region, SHARED_MIN};
use crate::registry::{ItemHooks, Registry};
use crate::status::StatusPage;
use crate::task::Task;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable that tells a process it was started as a worker.
pub(crate) const ENV: &str = "MULTIPROC_WORKER";

/// Set once this process has passed through [`worker_main`] as a worker.
static ENTERED: AtomicBool = AtomicBool::new(false);
/// Set once a missing entry has been reported, so it is reported once.
static REPORTED_MISSING: AtomicBool = AtomicBool::new(false);

/// What a parent tells a worker through [`ENV`]. The channel itself is the worker's stdin
/// at start (see [`take_channel`]): the one descriptor besides stdout and stderr that
/// `posix_spawn` can hand over, and a worker needs no stdin of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkerSpec {
    pub parent: u32,
    pub max_frame_len: u32,
    /// The address-space limit (`RLIMIT_AS`) the worker sets on itself, in bytes; 0: none.
    pub max_memory: u64,
    /// How long it polls for its next request before it sleeps, in microseconds.
    pub spin_us: u64,
}

/// Where the channel arrives in a worker: its stdin.
const CHANNEL_AT_START: RawFd = 0;

impl WorkerSpec {
    pub(crate) fn encode(&self) -> String {
        format!(
            "v{}:{}:{}:{}:{}",
            protocol::PROTOCOL_VERSION,
            self.parent,
            self.max_frame_len,
            self.max_memory,
            self.spin_us
        )
    }

    pub(crate) fn decode(value: &OsString) -> Result<WorkerSpec, String> {
        let value = value.to_str().ok_or("not UTF-8")?;
        let mut parts = value.split(':');
        let version = parts.next().and_then(|v| v.strip_prefix('v'));
        if version != Some(protocol::PROTOCOL_VERSION.to_string().as_str()) {
            return Err(format!(
                "protocol version {version:?} differs from this executable's {}",
                protocol::PROTOCOL_VERSION
            ));
        }
        let mut field = |name: &str| {
            parts
                .next()
                .and_then(|part| part.parse::<u64>().ok())
                .ok_or(format!("missing or malformed {name}"))
        };
        let parent = u32::try_from(field("parent pid")?).map_err(|e| e.to_string())?;
        let max_frame_len = u32::try_from(field("frame limit")?).map_err(|e| e.to_string())?;
        let max_memory = field("memory limit")?;
        let spin_us = field("spin window")?;
        if parts.next().is_some() {
            return Err("trailing fields".to_owned());
        }
        Ok(WorkerSpec {
            parent,
            max_frame_len,
            max_memory,
            spin_us,
        })
    }
}

/// Entry point emitted by `#[multiproc::main]` at the top of `fn main`. Not public API.
///
/// In a parent (no [`ENV`]) it starts the fork server (`forkserver::start`) and returns. In
/// a worker it serves tasks and exits the process: status 0 after `Shutdown` or when the
/// parent goes away, 1 on a protocol error.
#[doc(hidden)]
pub fn worker_main() {
    let Some(value) = std::env::var_os(ENV) else {
        crate::forkserver::start();
        return;
    };
    // Not inherited by what a task starts: another program built with #[multiproc::main]
    // (this one, say) must run its own `main`, not take our descriptors for its own.
    // SAFETY: this runs first thing in `main`, before this process starts any thread, so no
    // other thread reads or writes the environment concurrently.
    unsafe { std::env::remove_var(ENV) };
    ENTERED.store(true, Ordering::SeqCst);
    let served = match WorkerSpec::decode(&value) {
        Ok(spec) => guard_against_orphaning(spec.parent)
            // SAFETY: our parent (checked above) made our stdin this worker's channel, and
            // nothing in this process has used stdin: `worker_main` runs first thing in `main`.
            .and_then(|()| unsafe { take_channel() })
            .and_then(|channel| serve(spec, channel, None)),
        Err(err) => {
            eprintln!("multiproc worker: malformed {ENV}: {err}");
            exit(1);
        }
    };
    exit_after(served)
}

/// The worker entry of a process forked by the fork server (`forkserver`), which hands over
/// the channel itself; never returns.
pub(crate) fn serve_forked(spec: WorkerSpec, channel: OwnedFd, status: OwnedFd) -> ! {
    ENTERED.store(true, Ordering::SeqCst);
    exit_after(
        guard_against_orphaning(spec.parent).and_then(|()| serve(spec, channel, Some(status))),
    )
}

/// Exits a worker: status 0 when it served to the end, 1 after saying what went wrong.
fn exit_after(served: Result<(), Error>) -> ! {
    if let Err(err) = served {
        eprintln!("multiproc worker {}: {err}", std::process::id());
        exit(1);
    }
    exit(0)
}

fn exit(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Whether this process may start workers of its own.
///
/// A parent may; a worker running a task may too (nested pools are allowed: each level spawns
/// its own children, and the no-orphan guarantees hold per level). A process that was started
/// as a worker but never passed through [`worker_main`] may not: its `fn main` lacks
/// `#[multiproc::main]`, and spawning would recurse. It tells its parent once, so the parent
/// reports the missing attribute at once instead of waiting out the start-up timeout.
pub(crate) fn check_may_spawn() -> Result<(), Error> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(());
    };
    if ENTERED.load(Ordering::SeqCst) {
        return Ok(());
    }
    if !REPORTED_MISSING.swap(true, Ordering::SeqCst) && WorkerSpec::decode(&value).is_ok() {
        {
            let frame = protocol::control_frame(&Header::MissingEntry);
            // SAFETY: the parent passed this descriptor to this process for this channel and
            // nothing in a process that never entered the worker closes it; a failed write
            // (the descriptor is not what we think) is ignored, the parent then times out.
            let fd = unsafe { BorrowedFd::borrow_raw(CHANNEL_AT_START) };
            let _ = nix::unistd::write(fd, &frame);
        }
    }
    Err(Error::new(
        ErrorKind::Spawn,
        "this process was started as a multiproc worker, but its `fn main` is not marked \
         #[multiproc::main], so it ran the program instead of serving tasks; add the attribute \
         (in tests: a `harness = false` target whose main has it)",
    ))
}

/// Serves tasks on `fd` until the parent says `Shutdown` or goes away; `status`: the status
/// page, when it came with the channel (else it is the parent's first frame). The caller has
/// checked that the parent is the one that sent the spec: a process whose parent is not the
/// one that wrote ENV must not touch the descriptor numbers in it.
fn serve(spec: WorkerSpec, fd: OwnedFd, status: Option<OwnedFd>) -> Result<(), Error> {
    limit_self(spec)?;
    install_panic_hook();
    let registry = Registry::get()?;
    // Never closed here: it closes as the process exits, after its at-exit work (a coverage
    // runtime writing its profile, say). The parent takes its end of stream, or its pidfd
    // turning readable, for the exit.
    let mut conn = ManuallyDrop::new(UnixStream::from(fd));
    // Under a memory cap, a buffer kept after a large frame would shrink what later tasks may
    // allocate: no more is kept than the shared regions may take.
    let cap = Some(spec.max_memory).filter(|&cap| cap > 0);
    let keep = protocol::own_share(cap).min(protocol::KEEP_AT_MOST);
    let mut reader = FrameReader::new(spec.max_frame_len).keeping(keep);
    let mut received = VecDeque::new();
    let status = match status {
        Some(status) => status,
        None => first_descriptor(&mut reader, &conn, &mut received)?,
    };
    let status = StatusPage::open(status)?;
    if !PARENT_DEATH_SIGNAL {
        start_watchdog(&conn)?;
    }
    let ready = Header::Ready {
        version: protocol::PROTOCOL_VERSION,
        digest: registry.digest(),
        pid: std::process::id(),
    };
    write_all(&mut conn, &protocol::control_frame(&ready))?;

    let spin = std::time::Duration::from_micros(spec.spin_us);
    // No polling for the first request: a pool's first task comes when its program gets to
    // it, and a worker that polls meanwhile takes a CPU from those still starting. After
    // each answer the next request often follows within microseconds: then it polls.
    let mut window = std::time::Duration::ZERO;
    let mut server = Server {
        spec,
        registry,
        status,
        conn,
        received,
        next_fds: Vec::new(),
        out: Out::default(),
        keep,
        requests: None,
        replies: None,
        replies_sent: 0,
    };
    loop {
        while let Some(range) = reader.next_frame()? {
            if let Flow::Exit = server.handle(reader.body(range))? {
                return Ok(());
            }
        }
        server.flush()?;
        let got = read_spinning(&mut reader, &server.conn, &mut server.received, window);
        window = spin;
        match got {
            // End of stream: the parent is gone or closed the channel.
            Ok(0) if reader.buffered() == 0 => return Ok(()),
            Ok(0) => return Err(protocol::truncated(reader.buffered())),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Error::io("reading from the parent failed", err)),
        }
    }
}

/// A worker's state between frames.
struct Server {
    spec: WorkerSpec,
    registry: &'static Registry,
    status: StatusPage,
    conn: ManuallyDrop<UnixStream>,
    /// Descriptors received and not yet claimed by a `Descriptors` or `Region` frame.
    received: VecDeque<OwnedFd>,
    /// The descriptors of the next `Run`.
    next_fds: Vec<OwnedFd>,
    /// Results not yet sent. Every chunk already buffered runs before they go out in one
    /// write: under a stream of short chunks that is one system call per batch, not per
    /// chunk; a chunk that arrives alone (or a timed one) is answered at once. Written
    /// straight into the replies region while it is free (see [`Out`]).
    out: Out,
    /// The largest `out` kept once sent (see `protocol::KEEP_AT_MOST`).
    keep: usize,
    /// The shared regions (see `region`): requests, read here; replies, written here.
    requests: Option<Region>,
    replies: Option<Region>,
    /// The number of the last shared frame written to `replies`.
    replies_sent: u64,
}

/// What the worker does after a frame.
enum Flow {
    Continue,
    Exit,
}

impl Server {
    /// Handles one frame from the parent.
    fn handle(&mut self, body: &[u8]) -> Result<Flow, Error> {
        let (header, payload) = protocol::parse_body(body)?;
        match header {
            Header::Descriptors { count } => {
                let count = count as usize;
                if self.received.len() < count {
                    return Err(Error::new(
                        ErrorKind::Codec,
                        format!(
                            "{count} descriptors announced, {} received",
                            self.received.len()
                        ),
                    ));
                }
                self.next_fds = self.received.drain(..count).collect();
            }
            // Length 0: the parent gave that region up.
            Header::Region { requests, len: 0 } => {
                if requests {
                    self.requests = None;
                } else {
                    self.out.leave_region();
                    self.replies = None;
                }
            }
            Header::Region { requests, len } => {
                let fd = self.received.pop_front().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Codec,
                        "a shared region came without its descriptor",
                    )
                })?;
                // The old one goes first: under a memory cap both may not fit at once.
                if !requests {
                    self.out.leave_region();
                }
                let slot = if requests {
                    &mut self.requests
                } else {
                    &mut self.replies
                };
                *slot = None;
                *slot = Some(Region::open(fd, len)?);
            }
            Header::Shared { n, len } => {
                let region = self.requests.take().ok_or_else(|| {
                    Error::new(ErrorKind::Codec, "a shared frame before any shared region")
                })?;
                let flow = self.handle_shared(&region, len);
                self.requests = Some(region);
                self.status.took(true, n);
                return flow;
            }
            Header::Run {
                seq,
                task,
                count,
                timed,
            } => self.run(seq, task, count, timed, payload)?,
            Header::Shutdown => {
                self.flush()?;
                return Ok(Flow::Exit);
            }
            other => {
                return Err(Error::new(
                    ErrorKind::Codec,
                    format!("unexpected frame from the parent: {other:?}"),
                ));
            }
        }
        Ok(Flow::Continue)
    }

    /// Runs a chunk of `count` items of task `task`, its arguments in `payload`, and adds
    /// its results to `out` (sent at once for a `timed` chunk).
    fn run(
        &mut self,
        seq: u64,
        task: u32,
        count: u32,
        timed: bool,
        payload: &[u8],
    ) -> Result<(), Error> {
        let entry = self
            .registry
            .entry(task)
            .ok_or_else(|| Error::new(ErrorKind::Codec, format!("unknown task id {task}")))?;
        let status = &self.status;
        let publish = |item| status.publish(seq, item, timed);
        let hooks = ItemHooks {
            before_item: &publish,
        };
        let results = Header::Results {
            seq,
            first: 0,
            count,
        };
        if self.out.is_empty()
            && self.replies_free()
            && let Some(region) = &self.replies
        {
            // The parent is done with the region: the results go straight there.
            self.out.enter_region(region);
        }
        let out = &mut self.out;
        let start = protocol::begin_frame(out, &results);
        let fds = std::mem::take(&mut self.next_fds);
        crate::fdpass::supply(fds, || (entry.run())(payload, count, out, &hooks));
        status.publish(seq, count, false);
        if let Err(err) = protocol::end_frame(out.as_mut_slice(), start, self.spec.max_frame_len) {
            // Too large to send: report that for every item instead.
            out.truncate(start);
            let start = protocol::begin_frame(out, &results);
            let message = err.to_string();
            for _ in 0..count {
                outcome::encode_failed(&message, out);
            }
            protocol::end_frame(out.as_mut_slice(), start, u32::MAX)?;
        }
        if timed {
            // Deadlines are tracked chunk by chunk: answer at once.
            self.flush()?;
        }
        Ok(())
    }

    /// Handles the frames of a shared frame: `len` bytes at the start of `region`.
    fn handle_shared(&mut self, region: &Region, len: u64) -> Result<Flow, Error> {
        for body in protocol::frames(region.shared_frame(len)?, self.spec.max_frame_len) {
            if let Flow::Exit = self.handle(body?)? {
                return Ok(Flow::Exit);
            }
        }
        Ok(Flow::Continue)
    }

    /// Whether the parent is done with the last reply it was sent in the replies region.
    fn replies_free(&self) -> bool {
        self.status.taken(false) == self.replies_sent
    }

    /// Tells the parent that a reply of `len` bytes waits in the replies region.
    fn announce_reply(&mut self, len: usize) -> Result<(), Error> {
        self.replies_sent += 1;
        let shared = Header::Shared {
            n: self.replies_sent,
            len: len as u64,
        };
        write_all(&mut self.conn, &protocol::control_frame(&shared))
    }

    /// Sends the results gathered so far: through the replies region when they are large
    /// and it is free and big enough, else through the socket.
    fn flush(&mut self) -> Result<(), Error> {
        if self.out.is_empty() {
            return Ok(());
        }
        let len = self.out.len();
        if self.out.in_region() {
            // Written in place: announced when large, else its bytes go through the socket.
            if len >= SHARED_MIN {
                self.announce_reply(len)?;
            } else {
                write_all(&mut self.conn, self.out.as_mut_slice())?;
            }
            self.out.sent();
            return Ok(());
        }
        let free = self.replies_free();
        match self.replies.as_mut() {
            Some(region) if len >= SHARED_MIN && free && region.len() >= len => {
                region.fill(&self.out.vec);
                self.announce_reply(len)?;
            }
            _ => write_all(&mut self.conn, &self.out.vec)?,
        }
        self.out.vec.clear();
        if self.out.vec.capacity() > self.keep {
            self.out.vec = Vec::new();
        }
        Ok(())
    }
}

/// A worker's results not yet sent: built in a `Vec`, or straight in the replies region
/// while the parent is done with it (`Server::run`), which spares a large reply its copy
/// into the region. A reply that outgrows the region moves to the `Vec` (the parent then
/// makes a larger region), and the region is left before it is replaced or given up.
#[derive(Default)]
pub(crate) struct Out {
    vec: Vec<u8>,
    region: Option<InRegion>,
}

/// The replies region being written: its mapping, its length, and the bytes written.
struct InRegion {
    base: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
}

impl Out {
    fn is_empty(&self) -> bool {
        Sink::len(self) == 0
    }

    fn in_region(&self) -> bool {
        self.region.is_some()
    }

    /// Writes what follows straight into `region`; `self` must be empty. The region must
    /// outlive this until [`leave_region`](Self::leave_region).
    fn enter_region(&mut self, region: &Region) {
        debug_assert!(self.is_empty(), "entering a region with results pending");
        self.region = Some(InRegion {
            base: region.as_ptr(),
            cap: region.len(),
            len: 0,
        });
    }

    /// Stops writing into the region: what was written there and not sent (nothing, after a
    /// flush) moves to the `Vec`.
    fn leave_region(&mut self) {
        if let Some(region) = self.region.take() {
            // SAFETY: the first `len` bytes of the mapping, which outlives region mode and
            // which this process alone writes while it is in it.
            let written = unsafe { std::slice::from_raw_parts(region.base.as_ptr(), region.len) };
            self.vec.extend_from_slice(written);
        }
    }

    /// What was written into the region has been sent: empty again, out of the region.
    fn sent(&mut self) {
        self.region = None;
    }

    /// `bytes` do not fit in the region: what it holds moves to the `Vec`, and they follow.
    #[cold]
    #[inline(never)]
    fn outgrow_region(&mut self, bytes: &[u8]) {
        self.leave_region();
        self.vec.extend_from_slice(bytes);
    }
}

impl Sink for Out {
    #[inline]
    fn push(&mut self, byte: u8) {
        match &mut self.region {
            None => self.vec.push(byte),
            Some(region) if region.len < region.cap => {
                // SAFETY: in bounds (checked above); see `leave_region`.
                unsafe { region.base.as_ptr().add(region.len).write(byte) };
                region.len += 1;
            }
            Some(_) => self.outgrow_region(&[byte]),
        }
    }

    #[inline]
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        match &mut self.region {
            None => self.vec.extend_from_slice(bytes),
            Some(region) if region.cap - region.len >= bytes.len() => {
                // SAFETY: in bounds (checked above); our own bytes cannot overlap the
                // mapping; see `leave_region`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        region.base.as_ptr().add(region.len),
                        bytes.len(),
                    );
                }
                region.len += bytes.len();
            }
            Some(_) => self.outgrow_region(bytes),
        }
    }

    #[inline]
    fn len(&self) -> usize {
        self.region
            .as_ref()
            .map_or(self.vec.len(), |region| region.len)
    }

    fn truncate(&mut self, len: usize) {
        match &mut self.region {
            Some(region) => region.len = region.len.min(len),
            None => self.vec.truncate(len),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.region {
            // SAFETY: see `leave_region`.
            Some(region) => unsafe {
                std::slice::from_raw_parts_mut(region.base.as_ptr(), region.len)
            },
            None => &mut self.vec,
        }
    }
}

/// The default of `PoolBuilder::spin`: how long a worker keeps looking for its next request
/// before it sleeps, and a caller for its reply (`Slot::run_direct`) or outcome.
///
/// Waking a sleeping thread on an idle CPU is the dearest part of a short round trip: on a
/// virtual machine whose idle CPUs halt, tens of microseconds, against a few for the whole
/// round trip between two threads that are awake. A worker that has just answered usually
/// gets its next request within microseconds (a caller's `apply` loop, a `map`'s next chunk),
/// so it polls the socket for a short while first, yielding its CPU to any other runnable
/// thread between polls. The cost is bounded: at most this long per idle spell, and nothing
/// on a machine with one CPU, where polling could only delay the peer it waits for.
pub(crate) const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// [`SPIN`], or zero when this thread may run on one CPU only.
pub(crate) fn spin_window() -> std::time::Duration {
    if cpus_allowed() > 1 {
        SPIN
    } else {
        std::time::Duration::ZERO
    }
}

/// How many CPUs this thread may run on: its affinity mask, one system call. (Not std's
/// `available_parallelism`, which reads the control group's CPU quota from its files too,
/// about 50 us on every pool's start: a quota does not keep two threads from running at
/// once, which is all that polling needs.)
#[cfg(target_os = "linux")]
fn cpus_allowed() -> usize {
    use nix::sched::{CpuSet, sched_getaffinity};
    match sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .count(),
        Err(_) => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
    }
}

#[cfg(not(target_os = "linux"))]
fn cpus_allowed() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Reads what the parent sent, polling without blocking for up to `spin` before a blocking
/// read (see [`SPIN`]).
fn read_spinning(
    reader: &mut FrameReader,
    conn: &UnixStream,
    received: &mut VecDeque<OwnedFd>,
    spin: std::time::Duration,
) -> std::io::Result<usize> {
    // `None`: a window too long to add to now, that is, no end.
    let until = std::time::Instant::now().checked_add(spin);
    loop {
        let mut source = FdStream {
            conn,
            received,
            dontwait: !spin.is_zero()
                && until.is_none_or(|until| std::time::Instant::now() < until),
        };
        match reader.read_from(&mut source) {
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            other => return other,
        }
    }
}

/// Takes the channel from stdin: moves it to a close-on-exec descriptor, so that a process a
/// task starts does not inherit it (it would hold the channel open past this worker's exit
/// and hide that exit from the parent), and puts `/dev/null` in its place, so that a task
/// reading stdin reads nothing rather than the protocol.
///
/// # Safety
///
/// Stdin must be the channel, and nothing else in this process may own or use it.
unsafe fn take_channel() -> Result<OwnedFd, Error> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
    use nix::sys::stat::Mode;
    // SAFETY: the caller guarantees that stdin is the channel and unowned.
    let stdin = unsafe { BorrowedFd::borrow_raw(CHANNEL_AT_START) };
    let moved = fcntl(stdin, FcntlArg::F_DUPFD_CLOEXEC(3))
        .map_err(|err| Error::io("taking the worker channel failed", err.into()))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    let channel = unsafe { OwnedFd::from_raw_fd(moved) };
    let null = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| Error::io("opening /dev/null failed", err.into()))?;
    // Replaces descriptor 0, which the caller guarantees nothing else uses; dup2 clears
    // close-on-exec on the copy, so stdin stays open for what a task starts.
    nix::unistd::dup2_stdin(&null)
        .map_err(|err| Error::io("replacing the worker's stdin failed", err.into()))?;
    Ok(channel)
}

/// What the parent used to set between fork and exec, set by the worker on itself so that
/// the parent can start it with `posix_spawn`: SIGINT ignored (a worker leaves its pool when
/// the parent does, not on a Ctrl-C sent to a process group), and the memory cap. Also
/// SIGTTOU ignored: a worker's process group is its own, a background one on a terminal,
/// where with `stty tostop` a task printing to the program's stdout would be stopped, and
/// its call wait forever; ignored, the write goes through, as it does from the program.
fn limit_self(spec: WorkerSpec) -> Result<(), Error> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installing SIG_IGN runs no handler code.
    unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) }
        .map_err(|err| Error::io("ignoring SIGINT failed", err.into()))?;
    // SAFETY: as above.
    unsafe { signal(Signal::SIGTTOU, SigHandler::SigIgn) }
        .map_err(|err| Error::io("ignoring SIGTTOU failed", err.into()))?;
    if spec.max_memory > 0 {
        use nix::sys::resource::{Resource, setrlimit};
        setrlimit(Resource::RLIMIT_AS, spec.max_memory, spec.max_memory)
            .map_err(|err| Error::io("setting the memory limit failed", err.into()))?;
    }
    Ok(())
}

/// Reads the parent's first frame, which carries the status page: a `Descriptors` frame
/// of one.
fn first_descriptor(
    reader: &mut FrameReader,
    conn: &UnixStream,
    received: &mut VecDeque<OwnedFd>,
) -> Result<OwnedFd, Error> {
    loop {
        if let Some(range) = reader.next_frame()? {
            let (header, _) = protocol::parse_body(reader.body(range))?;
            return match (header, received.pop_front()) {
                (Header::Descriptors { count: 1 }, Some(fd)) if received.is_empty() => Ok(fd),
                (header, _) => Err(Error::new(
                    ErrorKind::Codec,
                    format!("expected the status page first, got {header:?}"),
                )),
            };
        }
        match read_spinning(reader, conn, received, std::time::Duration::ZERO) {
            Ok(0) => return Err(protocol::truncated(reader.buffered())),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Error::io("reading from the parent failed", err)),
        }
    }
}

fn write_all(conn: &mut UnixStream, bytes: &[u8]) -> Result<(), Error> {
    conn.write_all(bytes)
        .map_err(|err| Error::io("writing to the parent failed", err))
}

/// Reads the channel with `recvmsg`, keeping descriptors that arrive (`SCM_RIGHTS`) for
/// the `Descriptors` frame they belong to.
struct FdStream<'a> {
    conn: &'a UnixStream,
    received: &'a mut VecDeque<OwnedFd>,
    /// Read without blocking: `WouldBlock` when nothing is there.
    dontwait: bool,
}

impl std::io::Read for FdStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use nix::sys::socket::MsgFlags;
        use std::os::fd::AsFd;
        let flags = if self.dontwait {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        let received = crate::fdpass::recv_with(self.conn.as_fd(), buf, flags)?;
        if received.flags.contains(MsgFlags::MSG_CTRUNC) {
            // The kernel dropped descriptors that did not fit: the arguments would refer to
            // handles that never arrived.
            return Err(std::io::Error::other(
                "descriptors sent with a frame were lost (control message truncated)",
            ));
        }
        self.received.extend(received.fds);
        Ok(received.bytes)
    }
}

/// Whether the kernel kills a worker whose parent dies (`guard_against_orphaning`). Where it
/// does, a worker needs no watchdog: while the parent lives, it kills a worker it no longer
/// wants (`WorkerProcess::kill`; one it may no longer signal ends at its next read, when the
/// parent closes the channel), and when it dies the kernel does. A watchdog would cost a
/// thread started and stopped with every worker, about a tenth of a millisecond each on the
/// machine of `BENCHMARKS.md`.
const PARENT_DEATH_SIGNAL: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// Exits this worker as soon as the parent's end of the channel closes, even in the middle of
/// a task: "no worker outlives its parent" where the kernel has no parent-death signal
/// ([`PARENT_DEATH_SIGNAL`]). It waits in `poll` for a hang-up, so it costs nothing meanwhile.
fn start_watchdog(conn: &UnixStream) -> Result<(), Error> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let watched = conn
        .try_clone()
        .map_err(|err| Error::io("duplicating the worker channel failed", err))?;
    std::thread::Builder::new()
        .name("multiproc-watchdog".into())
        .spawn(move || {
            loop {
                // No events requested: only a hang-up or an error wakes this thread.
                let mut fds = [PollFd::new(watched.as_fd(), PollFlags::empty())];
                if let Ok(n) = poll(&mut fds, PollTimeout::NONE)
                    && n > 0
                {
                    // SAFETY: `_exit` ends the process at once without running anything that
                    // another thread could be in the middle of; it is async-signal-safe.
                    unsafe { nix::libc::_exit(0) };
                }
            }
        })
        .map_err(|err| Error::io("starting the worker watchdog failed", err))?;
    Ok(())
}

/// Makes this worker die with its parent. On Linux the kernel sends SIGKILL when the parent
/// thread that spawned us exits; the parent pid is checked after arming the signal, which
/// closes the race of a parent that died before that.
fn guard_against_orphaning(parent: u32) -> Result<(), Error> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(|err| Error::io("arming the parent-death signal failed", err.into()))?;
    }
    if nix::unistd::getppid().as_raw().cast_unsigned() != parent {
        return Err(Error::new(
            ErrorKind::Closed,
            "the parent exited before this worker started",
        ));
    }
    Ok(())
}

/// Runs a chunk of items of task `T`. Each item's panic is caught and reported as that item's
/// outcome; the worker goes on with the next item. That holds for the user's code around the
/// call too: a `Deserialize` of the arguments, a `Serialize` or a `Drop` of the result that
/// panics fails the item, never the worker (one catch per item, at no cost while nothing
/// panics).
pub(crate) fn run_chunk<T: Task>(input: &[u8], count: u32, output: &mut Out, hooks: &ItemHooks) {
    let mut rest = input;
    for index in 0..count {
        (hooks.before_item)(index);
        let mark = output.len();
        let mut stage = Stage::Decode;
        let item = run_caught(|| run_item::<T>(&mut rest, &mut stage, output));
        let failure = match item {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => format!("could not decode the arguments: {err}"),
            Err(panic) => match stage {
                Stage::Decode => format!(
                    "could not decode the arguments: decoding them panicked{}",
                    panic.at()
                ),
                Stage::Encode => {
                    output.truncate(mark);
                    outcome::encode_failed(
                        &format!(
                            "could not encode the result: encoding it panicked{}",
                            panic.at()
                        ),
                        output,
                    );
                    continue;
                }
                // The task, or its value's `Drop` once encoded: the task's own panic.
                Stage::Call | Stage::Drop => {
                    output.truncate(mark);
                    outcome::encode_panicked(
                        &panic.message,
                        panic.location.as_deref(),
                        panic.backtrace.as_deref(),
                        output,
                    );
                    continue;
                }
            },
        };
        // Arguments that do not decode: where the next item's start is is unknown, so the
        // rest of the chunk fails with them.
        for _ in index..count {
            outcome::encode_failed(&failure, output);
        }
        return;
    }
}

/// Where in an item a panic happened (see [`run_item`]).
#[derive(Clone, Copy)]
enum Stage {
    Decode,
    Call,
    Encode,
    Drop,
}

/// One item: decodes its arguments from the front of `rest` (and moves `rest` past them),
/// calls the task, encodes its outcome; `stage` says how far it got.
#[inline]
fn run_item<T: Task>(
    rest: &mut &[u8],
    stage: &mut Stage,
    output: &mut Out,
) -> Result<(), postcard::Error> {
    let (args, tail) = codec::decode_value::<T::Args>(rest)?;
    *rest = tail;
    *stage = Stage::Call;
    let value = T::call(args);
    *stage = Stage::Encode;
    let mark = output.len();
    crate::fdpass::forget_refusal();
    if let Err(err) = outcome::encode_ok(&value, output) {
        output.truncate(mark);
        let reason = crate::fdpass::refusal_or(&err);
        outcome::encode_failed(&format!("could not encode the result: {reason}"), output);
    }
    *stage = Stage::Drop;
    drop(value);
    Ok(())
}

/// A caught panic: its message and where it happened.
struct CaughtPanic {
    message: String,
    location: Option<String>,
    backtrace: Option<String>,
}

impl CaughtPanic {
    /// " at LOCATION: MESSAGE", to follow what panicked in a failure's message.
    fn at(&self) -> String {
        match &self.location {
            Some(location) => format!(" at {location}: {}", self.message),
            None => format!(": {}", self.message),
        }
    }
}

thread_local! {
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<CaughtPanic>> = const { RefCell::new(None) };
}

fn run_caught<R>(f: impl FnOnce() -> R) -> Result<R, CaughtPanic> {
    IN_TASK.set(true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    IN_TASK.set(false);
    result.map_err(|payload| {
        let message = panic_message(&*payload);
        match LAST_PANIC.take() {
            // The hook's record of this panic. A panic the task caught itself leaves a record
            // too, which a later `resume_unwind` of another payload (no hook then) must not
            // take for its own.
            Some(recorded) if recorded.message == message => recorded,
            _ => CaughtPanic {
                message,
                location: None,
                backtrace: None,
            },
        }
    })
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

/// In a worker, a task's panic is recorded for the parent instead of printed: the parent
/// reports it as that item's error, with message, location and (with `RUST_BACKTRACE` set) a
/// backtrace. Panics outside a task (threads the task spawned) go to the previous hook.
fn install_panic_hook() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !IN_TASK.get() {
            previous(info);
            return;
        }
        let message = info.payload_as_str().unwrap_or("Box<dyn Any>").to_owned();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        let location = info.location().map(ToString::to_string);
        LAST_PANIC.set(Some(CaughtPanic {
            message,
            location,
            backtrace,
        }));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips() {
        let spec = WorkerSpec {
            parent: 4242,
            max_frame_len: 1 << 20,
            max_memory: 1 << 30,
            spin_us: 50,
        };
        assert_eq!(WorkerSpec::decode(&spec.encode().into()), Ok(spec));
    }

    #[test]
    fn spec_rejects_other_versions_and_garbage() {
        assert!(WorkerSpec::decode(&"v999:7:8:1:1".into()).is_err());
        assert!(WorkerSpec::decode(&"v2:x:8:1:1".into()).is_err());
        assert!(WorkerSpec::decode(&"v2:7:8:1".into()).is_err());
        assert!(WorkerSpec::decode(&"v2:7:8:1:1:1".into()).is_err());
        assert!(WorkerSpec::decode(&"".into()).is_err());
    }

    #[test]
    fn caught_panic_has_message() {
        install_panic_hook();
        let caught = run_caught(|| panic!("boom {}", 7)).expect_err("it panicked");
        assert!(caught.message.starts_with("boom 7"));
        assert!(caught.location.expect("location").contains("worker.rs"));
    }
}
