//! Starting a worker process: forked by the fork server (`forkserver`) where the program has
//! one, else the current executable, run again with [`ENV`] set. Either
//! way it is connected by a private socket, and a task reads an empty stdin, prints to the
//! parent's stdout, and writes to a stderr pipe the parent forwards (see `stderr`).

use crate::error::{Error, ErrorKind};
use crate::forkserver::{Answer, Asked, Forked, WorkerFds};
use crate::protocol::{self, FrameReader, Header};
use crate::registry::Registry;
use crate::status::{StatusPage, deadline_after};
use crate::stderr::StderrTail;
use crate::worker::{ENV, WorkerSpec};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to start a worker.
#[derive(Clone, Debug)]
pub(crate) struct SpawnOptions {
    pub max_frame_len: u32,
    pub start_timeout: Duration,
    /// The worker's address-space limit (`RLIMIT_AS`), in bytes.
    pub max_memory: Option<u64>,
    /// How long the worker polls for its next request before it sleeps.
    pub spin: Duration,
    /// Run once in every worker before its first task.
    pub initializer: Option<Arc<Initializer>>,
    /// The pool's stop pipe (readable once it is terminated): a start-up in progress ends.
    pub stop: Option<Arc<OwnedFd>>,
    /// Ask the fork server first (see `forkserver`); else always run the executable again.
    pub fork_server: bool,
}

/// How a start-up read ended without its frame.
enum StartEnd {
    TimedOut,
    Exited,
    Stopped,
    Failed(Error),
}

/// A task call that every worker runs once after its handshake, as an encoded `Run` frame.
#[derive(Debug)]
pub(crate) struct Initializer {
    pub task: &'static str,
    pub frame: Vec<u8>,
}

/// A running worker process and the parent's end of its channel.
pub(crate) struct WorkerProcess {
    /// Our child, whichever way it started.
    pid: Pid,
    pub conn: UnixStream,
    /// Where the worker publishes the item it is running.
    pub status: StatusPage,
    /// Its stderr, forwarded to ours, with the last lines kept.
    pub stderr: StderrTail,
    reaped: Option<ExitStatus>,
    /// `Shutdown` was sent ([`WorkerProcess::request_shutdown`]).
    shutdown_sent: bool,
    /// Readable once the worker has exited ([`exit_watch`]).
    exit: Option<OwnedFd>,
}

/// A worker process started, before its handshake ([`Launched::finish`]).
pub(crate) struct Launched {
    /// `None` once taken (dropped, it stops the worker: see `Drop`).
    started: Option<Started>,
    started_at: Instant,
    /// Whether the worker has its status page already (a forked worker takes it with its
    /// other descriptors); else it is the first frame sent.
    status_sent: bool,
}

/// How far a launch is known.
enum Started {
    /// The worker, its pid known.
    Process(WorkerProcess),
    /// Asked of the fork server, whose answer (the pid, or no worker) is not read yet.
    Asked(Unanswered),
}

/// A worker asked of the fork server, its answer not read yet ([`Launching::deferred`]).
struct Unanswered {
    conn: UnixStream,
    status: StatusPage,
    stderr: StderrTail,
    answer: Answer,
}

impl Started {
    /// The worker: `None` when the fork server started none (declined, or its answer was
    /// lost: a worker it may have forked then is reaped by `reap_lost`).
    fn resolve(self) -> Option<WorkerProcess> {
        let asked = match self {
            Started::Process(worker) => return Some(worker),
            Started::Asked(asked) => asked,
        };
        match asked.answer.wait() {
            Forked::Pid(pid) => Some(WorkerProcess::new(
                pid,
                asked.conn,
                asked.status,
                asked.stderr,
            )),
            Forked::Unavailable => None,
            Forked::Lost => {
                reap_lost(asked.conn);
                None
            }
        }
    }
}

impl WorkerProcess {
    fn new(pid: Pid, conn: UnixStream, status: StatusPage, stderr: StderrTail) -> WorkerProcess {
        WorkerProcess {
            pid,
            conn,
            status,
            stderr,
            reaped: None,
            shutdown_sent: false,
            exit: exit_watch(pid),
        }
    }

    /// A descriptor that turns readable once the worker has exited, where the kernel has
    /// one: poll it with the channel. A process the worker forked (a task may) inherits the
    /// worker's end of the channel and can keep it open after the worker is gone, so the
    /// end of the stream does not tell that the worker exited.
    pub(crate) fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.exit.as_ref().map(AsFd::as_fd)
    }

    /// Starts a worker and completes the handshake: protocol version and registry digest must
    /// match this process's, or the worker is killed and the error says why.
    pub(crate) fn spawn(options: &SpawnOptions) -> Result<WorkerProcess, Error> {
        match Self::launch(options, 1)?.launched(true)?.pop().flatten() {
            Some(launched) => launched.finish(options),
            None => Err(Self::start_failure("no way to start a worker".to_owned())),
        }
    }

    /// Starts launching `count` worker processes: asks the fork server for them where
    /// `options` allow it and the program has one, and returns while it forks them.
    /// [`Launching::launched`] completes the launch.
    pub(crate) fn launch(options: &SpawnOptions, count: usize) -> Result<Launching, Error> {
        let started_at = Instant::now();
        let spec = WorkerSpec {
            parent: std::process::id(),
            max_frame_len: options.max_frame_len,
            max_memory: options.max_memory.unwrap_or(0),
            spin_us: u64::try_from(options.spin.as_micros()).unwrap_or(u64::MAX),
        };
        let mut parts = Vec::with_capacity(count);
        for _ in 0..count {
            let (conn, child_end) = channel()?;
            let status = StatusPage::create().map_err(spawn_kind)?;
            let stderr = if options.fork_server {
                Some(
                    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                        .map_err(|err| {
                            Error::io("creating a worker's stderr pipe failed", err.into())
                        })
                        .map_err(spawn_kind)?,
                )
            } else {
                None
            };
            parts.push(Parts {
                conn,
                child_end,
                status,
                stderr,
            });
        }
        let asked = options.fork_server.then(|| {
            let workers: Vec<_> = parts
                .iter()
                .filter_map(|part| {
                    let (_, stderr_end) = part.stderr.as_ref()?;
                    Some(WorkerFds {
                        channel: part.child_end.as_fd(),
                        stderr: stderr_end.as_fd(),
                        status: part.status.fd(),
                    })
                })
                .collect();
            crate::forkserver::ask(&spec, &workers, later(started_at, options.start_timeout))
        });
        Ok(Launching {
            asked,
            parts,
            spec,
            started_at,
        })
    }
}

/// Workers being launched ([`WorkerProcess::launch`]): the fork server's answers are still
/// to be read.
pub(crate) struct Launching {
    // Before `parts`: the requests name their descriptors, which must stay open until the
    // last request is sent.
    asked: Option<Asked>,
    parts: Vec<Parts>,
    spec: WorkerSpec,
    started_at: Instant,
}

impl Drop for Launching {
    fn drop(&mut self) {
        // Dropped before it completed (an error on the way): the workers the server forked
        // are killed and reaped.
        if let Some(asked) = self.asked.take() {
            asked.answers().into_iter().for_each(kill_forked);
        }
    }
}

/// Kills and reaps a worker the fork server forked that nobody will use.
fn kill_forked(forked: Forked) {
    if let Forked::Pid(pid) = forked {
        let _ = signal::kill(pid, Signal::SIGKILL);
        let _ = reap(pid, false);
    }
}

/// What one worker is launched with.
struct Parts {
    conn: UnixStream,
    child_end: OwnedFd,
    status: StatusPage,
    /// The stderr pipe (ours, the worker's), made here for a forked worker.
    stderr: Option<(OwnedFd, OwnedFd)>,
}

impl Launching {
    /// Completes the launch without waiting for the fork server: each worker it was asked
    /// for, with its answer to be read when the worker is first used (by then long there).
    /// `None` for a worker the answers read so far say it did not start. Where the server
    /// did not take the requests (none, given up, unable to fork), as
    /// [`launched`](Self::launched)`(false)`.
    pub(crate) fn deferred(mut self) -> Result<Vec<Option<Launched>>, Error> {
        let Some(answers) = self.asked.as_mut().and_then(Asked::defer) else {
            return self.launched(false);
        };
        self.asked = None;
        let parts = std::mem::take(&mut self.parts);
        let mut launched = Vec::with_capacity(parts.len());
        for (parts, answer) in parts.into_iter().zip(answers) {
            let Parts {
                conn,
                child_end,
                status,
                stderr,
            } = parts;
            // The worker's exit must close the channel and its stderr: our copies of their
            // ends go now.
            drop(child_end);
            let stderr = StderrTail::new(stderr.map(|(ours, _)| ours));
            match answer.get() {
                Some(Forked::Lost) => {
                    reap_lost(conn);
                    launched.push(None);
                }
                Some(Forked::Unavailable) => launched.push(None),
                Some(Forked::Pid(_)) | None => launched.push(Some(Launched {
                    started: Some(Started::Asked(Unanswered {
                        conn,
                        status,
                        stderr,
                        answer,
                    })),
                    started_at: self.started_at,
                    status_sent: true,
                })),
            }
        }
        Ok(launched)
    }

    /// Completes the launch: each worker the fork server started, or (with `exec_fallback`)
    /// the executable run again in its place; `None` for a worker the fork server could
    /// not start when `exec_fallback` is false.
    ///
    /// The thread that runs the executable must outlive the worker (its death is the
    /// parent's death to the kernel); the fork server has no such bound.
    pub(crate) fn launched(mut self, exec_fallback: bool) -> Result<Vec<Option<Launched>>, Error> {
        let mut forked = self.asked.take().map(Asked::answers).unwrap_or_default();
        forked.resize_with(self.parts.len(), || Forked::Unavailable);
        let mut launched = Vec::with_capacity(self.parts.len());
        let mut each = std::mem::take(&mut self.parts).into_iter().zip(forked);
        while let Some((parts, forked)) = each.next() {
            match self.one(parts, forked, exec_fallback) {
                Ok(one) => launched.push(one),
                Err(err) => {
                    // Those launched so far are killed as they drop; the rest here.
                    each.for_each(|(_, forked)| kill_forked(forked));
                    return Err(err);
                }
            }
        }
        Ok(launched)
    }

    /// One worker of [`launched`](Self::launched).
    fn one(
        &self,
        parts: Parts,
        forked: Forked,
        exec_fallback: bool,
    ) -> Result<Option<Launched>, Error> {
        let Parts {
            mut conn,
            mut child_end,
            status,
            stderr,
        } = parts;
        if let Forked::Lost = forked {
            // A worker the server forked before it failed may hold that channel: it is
            // reaped once it says who it is. A start from here takes a new channel.
            drop(child_end);
            reap_lost(conn);
            if !exec_fallback {
                return Ok(None);
            }
            (conn, child_end) = channel()?;
        }
        let (pid, stderr, status_sent) = match (forked, stderr) {
            (Forked::Pid(pid), Some((stderr, _))) => {
                // Our copy of the worker's end goes at once: the worker's exit must close
                // the channel. It took its status page with its other descriptors.
                drop(child_end);
                (pid, StderrTail::new(Some(stderr)), true)
            }
            _ if !exec_fallback => return Ok(None),
            _ => {
                let (pid, stderr) = exec(&self.spec, child_end)?;
                (pid, stderr, false)
            }
        };
        let worker = WorkerProcess::new(pid, conn, status, stderr);
        Ok(Some(Launched {
            started: Some(Started::Process(worker)),
            started_at: self.started_at,
            status_sent,
        }))
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        // Never used: the worker is killed and reaped (as `WorkerProcess` drops).
        if let Some(started) = self.started.take() {
            drop(started.resolve());
        }
    }
}

impl Launched {
    /// The worker's process id, when known: a forked worker's is known once the fork
    /// server's answer is read ([`pid_answer`](Self::pid_answer)).
    pub(crate) fn pid(&self) -> Option<u32> {
        match self.started.as_ref()? {
            Started::Process(worker) => Some(worker.pid()),
            Started::Asked(asked) => asked.answer.get()?.pid(),
        }
    }

    /// The fork server's answer that names the worker, when it is not read yet.
    pub(crate) fn pid_answer(&self) -> Option<Answer> {
        match self.started.as_ref()? {
            Started::Asked(asked) => Some(asked.answer.clone()),
            Started::Process(_) => None,
        }
    }

    fn take(&mut self) -> Started {
        self.started.take().expect("a launch is taken once")
    }

    /// The worker, without its start completed: to stop it (`WorkerProcess::shutdown`
    /// reads past its `Ready`); `None` if the fork server started none.
    pub(crate) fn into_worker(mut self) -> Option<WorkerProcess> {
        self.take().resolve()
    }

    /// The worker, with its `Ready` still to come: for a worker the fork server forked, in
    /// a pool without an initializer (the caller reads `Ready` before any reply, and checks
    /// it with [`check_ready`], within the start timeout from now, as a handshake would).
    /// `None` if the server started none.
    pub(crate) fn adopt(mut self, options: &SpawnOptions) -> Option<WorkerProcess> {
        debug_assert!(self.status_sent && options.initializer.is_none());
        self.take().resolve()
    }

    /// Completes the start: the handshake, then the initializer; a worker the fork server
    /// did not start is started by running the executable (the caller is the slot's
    /// thread). On failure the worker is killed, and the error quotes its last words on
    /// stderr.
    pub(crate) fn finish(mut self, options: &SpawnOptions) -> Result<WorkerProcess, Error> {
        let Some(mut worker) = self.take().resolve() else {
            return WorkerProcess::spawn(options);
        };
        let (started_at, status_sent) = (self.started_at, self.status_sent);
        let registry = Registry::get()?;
        let started = if status_sent {
            Ok(())
        } else {
            worker.send_status_page()
        };
        let started = started
            .and_then(|()| worker.handshake(registry.digest(), options))
            .and_then(|()| match &options.initializer {
                Some(init) => {
                    worker.initialize(init, options, later(started_at, options.start_timeout))
                }
                None => Ok(()),
            });
        match started {
            Ok(()) => Ok(worker),
            Err(err) => {
                worker.kill();
                let tail = worker.stderr.last_lines();
                Err(err.with_stderr_tail(tail))
            }
        }
    }
}

impl WorkerProcess {
    /// The worker's first frame: its status page, as a descriptor. The socket buffer is
    /// empty, so this small write cannot block.
    fn send_status_page(&mut self) -> Result<(), Error> {
        let mut frame = Vec::with_capacity(16);
        protocol::descriptors_frame(&mut frame, 1);
        let sent = crate::fdpass::send_with(
            self.conn.as_fd(),
            &frame,
            &[self.status.fd()],
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        );
        match sent {
            Ok(n) if n == frame.len() => Ok(()),
            // The worker is gone already (a program without the worker entry reports that
            // and exits at once): the handshake reads what it said before it left, or its
            // exit, and says why.
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => Ok(()),
            Ok(_) => Err(Self::start_failure(
                "the status page was sent in part".to_owned(),
            )),
            Err(err) => Err(Self::start_failure(format!(
                "sending the worker its status page failed: {err}"
            ))),
        }
    }

    /// Reads one frame during start-up: until `deadline`, and no longer than the pool lives.
    fn read_start_frame(
        &mut self,
        reader: &mut FrameReader,
        deadline: Instant,
        stop: Option<&OwnedFd>,
    ) -> Result<Range<usize>, StartEnd> {
        let exit = self.exit.as_ref().map(AsFd::as_fd);
        read_start_frame(
            &self.conn,
            reader,
            deadline,
            stop,
            exit,
            Some(&mut self.stderr),
        )
    }

    fn handshake(&mut self, digest: u64, options: &SpawnOptions) -> Result<(), Error> {
        let deadline = deadline_after(options.start_timeout);
        let mut reader = FrameReader::new(1024);
        let range = match self.read_start_frame(&mut reader, deadline, options.stop.as_deref()) {
            Ok(range) => range,
            Err(StartEnd::TimedOut) => {
                return Err(Self::start_failure(format!(
                    "the worker process did not finish its start-up within {:?}; is `fn main` \
                     marked #[multiproc::main], and does it reach that attribute's entry at once?",
                    options.start_timeout
                )));
            }
            Err(StartEnd::Exited) => {
                // It closed its channel: normally by exiting, but do not wait past the start
                // deadline for one that keeps running (killed then, as every failed start is).
                let Some(status) = self.reap_or_kill(deadline) else {
                    return Err(Self::start_failure(
                        "the worker process closed its channel during start-up without \
                         exiting, and was killed: is the executable a program built with \
                         multiproc, with `fn main` marked #[multiproc::main]?"
                            .to_owned(),
                    ));
                };
                return Err(Self::start_failure(format!(
                    "the worker process exited during start-up ({}) before reaching the \
                     worker entry: is `fn main` marked #[multiproc::main]?",
                    describe_status(status)
                )));
            }
            Err(StartEnd::Stopped) => return Err(stopped()),
            Err(StartEnd::Failed(err)) => return Err(spawn_kind(err)),
        };
        let (header, _) = protocol::parse_body(reader.body(range)).map_err(spawn_kind)?;
        match header {
            Header::Ready { .. } => check_ready(&header, self.pid(), digest),
            Header::MissingEntry => Err(Self::start_failure(
                "the worker process ran the program's `fn main` instead of serving tasks: mark \
                 `fn main` with #[multiproc::main] (in tests, use a `harness = false` target \
                 whose main has it)"
                    .to_owned(),
            )),
            other => Err(Self::start_failure(format!(
                "unexpected first frame from a worker: {other:?}"
            ))),
        }
    }

    /// Runs the initializer and checks its outcome: a panic, a failure or a death is an error
    /// that names the initializer.
    fn initialize(
        &mut self,
        init: &Initializer,
        options: &SpawnOptions,
        deadline: Instant,
    ) -> Result<(), Error> {
        use std::io::Write;
        let failed = |message: String| {
            Error::new(
                ErrorKind::Spawn,
                format!("the initializer `{}` {message}", init.task),
            )
        };
        self.conn
            .write_all(&init.frame)
            .map_err(|err| failed(format!("could not be sent to the worker: {err}")))?;
        let mut reader = FrameReader::new(u32::MAX);
        // The initializer's time counts against the start-up timeout.
        let range = match self.read_start_frame(&mut reader, deadline, options.stop.as_deref()) {
            Ok(range) => range,
            Err(StartEnd::TimedOut) => {
                return Err(failed(format!(
                    "did not finish within the start-up timeout of {:?}; raise \
                     `PoolBuilder::start_timeout` for a slow initializer",
                    options.start_timeout
                )));
            }
            Err(StartEnd::Stopped) => return Err(stopped()),
            Err(StartEnd::Exited | StartEnd::Failed(_)) => {
                // As in the handshake: a worker that closed its channel but lingers (an
                // initializer that exec'd another program) is killed at the deadline.
                let Some(status) = self.reap_or_kill(deadline) else {
                    return Err(failed(
                        "closed its worker's channel without the worker exiting; the worker \
                         was killed"
                            .to_owned(),
                    ));
                };
                // The status is appended by `with_status`.
                return Err(failed("killed its worker".to_owned())
                    .with_status(status.signal(), status.code()));
            }
        };
        let (header, outcome) = protocol::parse_body(reader.body(range))?;
        if !matches!(header, Header::Results { count: 1, .. }) {
            return Err(failed(format!("got an unexpected reply: {header:?}")));
        }
        match crate::outcome::failure_of(outcome) {
            None => Ok(()),
            Some((message, location)) => {
                let at = location.map(|at| format!(" at {at}")).unwrap_or_default();
                Err(failed(format!("failed{at}: {message}")))
            }
        }
    }

    fn start_failure(message: String) -> Error {
        Error::new(ErrorKind::Spawn, message)
    }

    /// The worker's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw().cast_unsigned()
    }

    /// Kills the worker and every process it started (its process group), then reaps it.
    ///
    /// A worker this process may no longer signal (EPERM: it gave up the privileges the
    /// worker runs with) is waited for one second at most, then left: its channel closes
    /// with this value, so an idle worker exits; the status says SIGKILL.
    pub(crate) fn kill(&mut self) -> ExitStatus {
        if self.reaped.is_none() {
            // ESRCH (already gone) is fine: we reap below either way.
            let _ = signal::killpg(self.pid, Signal::SIGKILL);
            // A worker forked a moment ago may not have made its process group yet (it
            // does that first thing): the group is then not there, and the worker is
            // killed alone, before it could start anything.
            let alone = signal::kill(self.pid, Signal::SIGKILL);
            // Judged on the worker alone: one that left its group makes the group ESRCH.
            if alone == Err(nix::errno::Errno::EPERM) {
                if self.exited_by(deadline_after(Duration::from_secs(1))) {
                    return self.wait();
                }
                let abandoned = ExitStatus::from_raw(Signal::SIGKILL as i32);
                self.reaped = Some(abandoned);
                return abandoned;
            }
        }
        self.wait()
    }

    /// Waits for the worker to exit until `deadline` (or for 100 ms, if that is later: a
    /// process closes its descriptors a little before it can be reaped), kills what it
    /// started (its process group) and reaps it; if it is still running then, kills it with
    /// its group and returns `None`. Only a failed start waits here.
    fn reap_or_kill(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let deadline = deadline.max(deadline_after(Duration::from_millis(100)));
        if !self.exited_by(deadline) {
            self.kill();
            return None;
        }
        // Not reaped yet, so its process group id is still its own: what it started (an
        // initializer may fork) goes with it, as with every worker that is killed.
        if self.reaped.is_none() {
            let _ = signal::killpg(self.pid, Signal::SIGKILL);
        }
        Some(self.wait())
    }

    /// Whether the worker has exited by `deadline`, without reaping it: through its exit
    /// watch where there is one, else polling, with pauses that grow to 10 ms.
    fn exited_by(&self, deadline: Instant) -> bool {
        use nix::poll::{PollFd, PollFlags, poll};
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        if self.reaped.is_some() {
            return true;
        }
        if let Some(exit) = self.exit_fd() {
            let mut fds = [PollFd::new(exit, PollFlags::POLLIN)];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match poll(&mut fds, crate::status::poll_timeout(left)) {
                    Ok(n) => return n > 0,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => break,
                }
            }
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let mut pause = Duration::from_micros(100);
        loop {
            match waitid(Id::Pid(self.pid), flags) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
                // Exited, or not our child any more (`wait` reports that).
                Ok(_) | Err(_) => return true,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Waits for the worker to exit and reaps it.
    pub(crate) fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.reaped {
            return status;
        }
        let status = match reap(self.pid, false) {
            Ok(Some(status)) => status,
            // Not our child any more (someone else reaped it): report a kill.
            Ok(None) | Err(_) => ExitStatus::from_raw(Signal::SIGKILL as i32),
        };
        self.reaped = Some(status);
        status
    }

    /// Sends `Shutdown` (once), within `timeout`, without waiting for the exit: `shutdown`
    /// does that. The frame is small, and an idle worker's socket buffer empty, so this
    /// cannot block long; if it fails, `shutdown` tries again.
    pub(crate) fn request_shutdown(&mut self, timeout: Duration) {
        use std::io::Write;
        let _ = self.conn.set_nonblocking(false);
        if !self.shutdown_sent {
            let _ = self
                .conn
                .set_write_timeout(Some(timeout.max(Duration::from_millis(1))));
            let frame = protocol::control_frame(&Header::Shutdown);
            self.shutdown_sent = self.conn.write_all(&frame).is_ok();
        }
    }

    /// Asks the worker to exit (unless `request_shutdown` did), waits up to `grace` for it to
    /// close its end of the channel (which it does by exiting), then kills and reaps it: a
    /// worker stuck in a task cannot delay the caller by more than `grace`.
    pub(crate) fn shutdown(&mut self, grace: Duration) {
        use std::io::Read;
        let deadline = deadline_after(grace);
        self.request_shutdown(grace);
        if self.shutdown_sent {
            let mut sink = [0u8; 256];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Ok(seen) = watch(
                    self.conn.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                    self.exit_fd(),
                    None,
                    None,
                    crate::status::poll_timeout(left),
                ) else {
                    break;
                };
                // Exited (its at-exit work done), whoever else holds its end of the channel.
                if seen.exited {
                    break;
                }
                if seen.conn.is_empty() {
                    continue;
                }
                match self.conn.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        // Reaps at once when the worker exited; kills it first when it did not.
        if let Ok(Some(status)) = reap(self.pid, true) {
            self.reaped = Some(status);
        }
        self.kill();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Checks a worker's `Ready`: from worker `pid`, in this process's protocol, with a
/// registry whose digest is `digest` (the same build of the executable).
pub(crate) fn check_ready(ready: &Header, pid: u32, digest: u64) -> Result<(), Error> {
    let &Header::Ready {
        version,
        digest: theirs,
        pid: from,
    } = ready
    else {
        return Err(WorkerProcess::start_failure(format!(
            "unexpected first frame from a worker: {ready:?}"
        )));
    };
    if from != pid {
        return Err(WorkerProcess::start_failure(format!(
            "process {from} answered on the channel of worker {pid}"
        )));
    }
    if version != protocol::PROTOCOL_VERSION {
        return Err(WorkerProcess::start_failure(format!(
            "the worker speaks protocol version {version}, this process {}",
            protocol::PROTOCOL_VERSION
        )));
    }
    if theirs != digest {
        return Err(WorkerProcess::start_failure(
            "the worker's task registry differs from this process's: it runs a different \
             build of the executable"
                .to_owned(),
        ));
    }
    Ok(())
}

/// What one wait on a worker ([`watch`]) saw.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Watched {
    /// The channel's events.
    pub conn: nix::poll::PollFlags,
    /// The exit watch turned readable: the worker has exited.
    pub exited: bool,
    /// The stop pipe turned readable: the pool is terminated.
    pub stopped: bool,
    /// The stderr pipe has something (or ended).
    pub said: bool,
}

/// Waits for `events` on a worker's channel, its exit watch, the pool's stop pipe and its
/// stderr pipe (those given), until `timeout`. Interrupted, it saw nothing.
pub(crate) fn watch(
    conn: BorrowedFd<'_>,
    events: nix::poll::PollFlags,
    exit: Option<BorrowedFd<'_>>,
    stop: Option<BorrowedFd<'_>>,
    stderr: Option<BorrowedFd<'_>>,
    timeout: nix::poll::PollTimeout,
) -> nix::Result<Watched> {
    use nix::poll::{PollFd, PollFlags, poll};
    /// Adds `fd` (if any) to `fds`, waiting for input; its place there.
    fn add<'a>(fds: &mut Vec<PollFd<'a>>, fd: Option<BorrowedFd<'a>>) -> Option<usize> {
        let fd = fd?;
        fds.push(PollFd::new(fd, PollFlags::POLLIN));
        Some(fds.len() - 1)
    }
    let mut fds = vec![PollFd::new(conn, events)];
    let exit_at = add(&mut fds, exit);
    let stop_at = add(&mut fds, stop);
    let stderr_at = add(&mut fds, stderr);
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => {
            return Ok(Watched {
                conn: PollFlags::empty(),
                exited: false,
                stopped: false,
                said: false,
            });
        }
        Err(err) => return Err(err),
    }
    let ready =
        |at: Option<usize>| at.is_some_and(|at| fds[at].revents().is_some_and(|r| !r.is_empty()));
    Ok(Watched {
        conn: fds[0].revents().unwrap_or(PollFlags::empty()),
        exited: ready(exit_at),
        stopped: ready(stop_at),
        said: ready(stderr_at),
    })
}

/// A pidfd of our child `pid` (not reaped yet, so the pid is still its own): it turns
/// readable once the child has exited. `None` where the kernel has no `pidfd_open` (before
/// Linux 5.3): the end of the child's channel alone tells then.
fn exit_watch(pid: Pid) -> Option<OwnedFd> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: `pidfd_open(pid, 0)` returns a new close-on-exec descriptor, or -1.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
        let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: a descriptor just made for us, which nothing else owns.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = pid;
        None
    }
}

/// A worker's channel: the parent's end and the worker's.
fn channel() -> Result<(UnixStream, OwnedFd), Error> {
    let (conn, child_end) = UnixStream::pair()
        .map_err(|err| Error::io("creating a worker channel failed", err))
        .map_err(spawn_kind)?;
    Ok((conn, OwnedFd::from(child_end)))
}

/// Reads one frame from a starting worker's channel: until `deadline`, no longer than the
/// pool lives (`stop`), and no longer than the worker does (`exit`, see
/// [`WorkerProcess::exit_fd`]; what it sent before is read first). Its `stderr` is taken
/// meanwhile: a worker (an initializer) that writes much there must not wait on a full pipe.
fn read_start_frame(
    mut conn: &UnixStream,
    reader: &mut FrameReader,
    deadline: Instant,
    stop: Option<&OwnedFd>,
    exit: Option<BorrowedFd<'_>>,
    mut stderr: Option<&mut StderrTail>,
) -> Result<Range<usize>, StartEnd> {
    use nix::poll::{PollFlags, PollTimeout};
    let mut exited = false;
    loop {
        if let Some(range) = reader.next_frame().map_err(StartEnd::Failed)? {
            return Ok(range);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StartEnd::TimedOut);
        }
        // Once the worker has exited, only what is in the socket already is read.
        let wait = if exited {
            PollTimeout::ZERO
        } else {
            crate::status::poll_timeout(left)
        };
        let seen = watch(
            conn.as_fd(),
            PollFlags::POLLIN,
            exit.filter(|_| !exited),
            stop.map(AsFd::as_fd),
            stderr.as_ref().and_then(|stderr| stderr.fd()),
            wait,
        )
        .map_err(|err| StartEnd::Failed(Error::io("waiting for a worker failed", err.into())))?;
        exited |= seen.exited;
        let (readable, stopped, said) = (!seen.conn.is_empty(), seen.stopped, seen.said);
        if stopped {
            return Err(StartEnd::Stopped);
        }
        if said && let Some(stderr) = stderr.as_mut() {
            stderr.pump();
        }
        if !readable {
            if exited {
                return Err(StartEnd::Exited);
            }
            continue;
        }
        match reader.read_from(&mut conn) {
            Ok(0) => return Err(StartEnd::Exited),
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(err) => {
                return Err(StartEnd::Failed(Error::io(
                    "reading from a starting worker failed",
                    err,
                )));
            }
        }
    }
}

/// A channel whose fork-server request went unanswered: a worker the server forked before it
/// failed may hold the other end, and no slot will use it. Such a worker says `Ready` first
/// thing (it has its status page), with its pid: a thread waits for that, 2 s at most, then
/// kills and reaps the worker, which is this process's child. The thread, for tests.
fn reap_lost(conn: UnixStream) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("multiproc-reaper".to_owned())
        .spawn(move || {
            let mut reader = FrameReader::new(1024);
            let deadline = deadline_after(Duration::from_secs(2));
            let Ok(range) = read_start_frame(&conn, &mut reader, deadline, None, None, None) else {
                return;
            };
            let Ok((Header::Ready { pid, .. }, _)) = protocol::parse_body(reader.body(range))
            else {
                return;
            };
            let pid = Pid::from_raw(pid.cast_signed());
            // Only a child of ours that is not reaped yet: its pid cannot have been reused.
            if let Ok(None) = reap(pid, true) {
                let _ = signal::kill(pid, Signal::SIGKILL);
                let _ = reap(pid, false);
            }
        })
        .ok()
}

/// Starts the worker by running the executable again: its pid and stderr.
fn exec(spec: &WorkerSpec, channel: OwnedFd) -> Result<(Pid, StderrTail), Error> {
    // No `pre_exec`: std then starts the child with `posix_spawn` (a `vfork`-style clone
    // that copies no page tables), not `fork`. The channel goes in as the child's stdin,
    // the only descriptor such a start can hand over besides stdout and stderr; the
    // worker moves it out of the way at once (`worker::take_channel`) and sets what a
    // `pre_exec` would have set (SIGINT ignored, the memory cap) on itself.
    let mut child = Command::new(executable())
        .env(ENV, spec.encode())
        .stdin(Stdio::from(channel))
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills the task and everything it started, and
        // a terminal's Ctrl-C reaches the parent, which stops the pool, not each worker.
        .process_group(0)
        .spawn()
        .map_err(|err| Error::io("starting a worker process failed", err))
        .map_err(spawn_kind)?;
    // `Child` neither kills nor reaps on drop: the worker is ours to reap by pid.
    let stderr = StderrTail::new(child.stderr.take().map(OwnedFd::from));
    Ok((Pid::from_raw(child.id().cast_signed()), stderr))
}

/// Reaps `pid` if it has exited (`nohang`) or once it exits: `Ok(None)` while it runs.
fn reap(pid: Pid, nohang: bool) -> nix::Result<Option<ExitStatus>> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let flags = nohang.then_some(WaitPidFlag::WNOHANG);
    loop {
        // The raw status `ExitStatus` wraps: the code in bits 8-15, or the signal in bits
        // 0-6 with the core-dump flag in bit 7.
        return match waitpid(pid, flags) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Some(ExitStatus::from_raw((code & 0xff) << 8))),
            Ok(WaitStatus::Signaled(_, signal, core)) => Ok(Some(ExitStatus::from_raw(
                signal as i32 | if core { 0x80 } else { 0 },
            ))),
            Ok(WaitStatus::StillAlive) => Ok(None),
            // Stopped or continued (only traced children report these): not an exit.
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => Err(err),
        };
    }
}

/// `signal` and `exit code` of a status, for [`Error::with_status`].
pub(crate) fn status_parts(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.signal(), status.code())
}

pub(crate) fn describe_status(status: ExitStatus) -> String {
    match (status.signal(), status.code()) {
        (Some(signal), _) => format!("killed by {}", crate::error::signal_name(signal)),
        (None, Some(code)) => format!("exit code {code}"),
        (None, None) => status.to_string(),
    }
}

/// `after` past `start`, or as far as an `Instant` goes.
fn later(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .unwrap_or_else(|| deadline_after(after))
}

fn stopped() -> Error {
    Error::closed("the pool was terminated while this worker was starting")
}

fn spawn_kind(err: Error) -> Error {
    if err.kind() == ErrorKind::Spawn {
        err
    } else {
        Error::new(ErrorKind::Spawn, err.to_string()).with_source(err)
    }
}

/// Names another executable to start workers from, for profilers that cannot run
/// `/proc/self/exe` (under valgrind it is valgrind itself). It must be a copy of this very
/// program: the handshake refuses a worker whose task registry differs.
pub(crate) const EXECUTABLE_ENV: &str = "MULTIPROC_WORKER_EXE";

/// The executable to re-run. On Linux, `/proc/self/exe` is this very binary even if the file
/// on disk was replaced since (a rebuild while a program runs); [`EXECUTABLE_ENV`] overrides it.
fn executable() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os(EXECUTABLE_ENV).filter(|path| !path.is_empty()) {
        return path.into();
    }
    if cfg!(any(target_os = "linux", target_os = "android")) {
        "/proc/self/exe".into()
    } else {
        std::env::current_exe()
            .unwrap_or_else(|_| std::env::args_os().next().unwrap_or_default().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ready_from(pid: u32) -> Vec<u8> {
        protocol::control_frame(&Header::Ready {
            version: protocol::PROTOCOL_VERSION,
            digest: 0,
            pid,
        })
    }

    #[test]
    fn a_worker_forked_for_a_lost_request_is_killed_and_reaped() {
        // Stands in for the worker: a child of this process.
        #[allow(clippy::zombie_processes, reason = "`reap_lost` reaps it by pid")]
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let (conn, mut worker_end) = UnixStream::pair().unwrap();
        worker_end.write_all(&ready_from(pid)).unwrap();
        reap_lost(conn).unwrap().join().unwrap();
        assert_eq!(
            reap(Pid::from_raw(pid.cast_signed()), true),
            Err(nix::errno::Errno::ECHILD),
            "reaped"
        );
    }

    #[test]
    fn a_lost_request_names_no_process_that_is_not_our_child() {
        // A process of ours that is not our child: a shell's background job.
        let out = Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let target = Pid::from_raw(pid.cast_signed());
        let (conn, mut worker_end) = UnixStream::pair().unwrap();
        worker_end.write_all(&ready_from(pid)).unwrap();
        reap_lost(conn).unwrap().join().unwrap();
        let alive = signal::kill(target, None);
        let _ = signal::kill(target, Signal::SIGKILL);
        assert_eq!(alive, Ok(()), "left alone");

        // And a channel that closes without a word ends the thread at once.
        let (conn, worker_end) = UnixStream::pair().unwrap();
        drop(worker_end);
        reap_lost(conn).unwrap().join().unwrap();
    }
}
