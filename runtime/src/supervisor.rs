//! The thread that owns a [`Process`](crate::Process)'s child from its spawn to its reaping.
//!
//! It spawns the worker: on Linux the parent-death signal fires when the *thread* that
//! spawned a child exits, and this thread lives until its child is reaped, so the child is
//! tied to the parent process, not to whichever thread started it. It sends the `Run` frame
//! with the descriptors of any channel handles in the arguments, watches the child's stderr
//! (see `stderr`: its last lines are kept), reads the outcome, tells the child to exit, and
//! reaps it.
//!
//! Signals (`terminate`, `kill`, and the kill of a dropped `Process`) go to the child's
//! process group only while the child is not reaped, under the lock that the reaping takes:
//! the supervisor first waits for the exit without reaping (`waitid` with `WNOWAIT`), then
//! reaps under the lock. A signal can never reach a recycled process id.

use crate::error::{Error, ErrorKind, signal_name};
use crate::fdpass;
use crate::protocol::{self, DEFAULT_MAX_FRAME_LEN, FrameReader, Header};
use crate::spawn::{SpawnOptions, WorkerProcess, status_parts, watch};
use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::signal::{Signal, killpg};
use nix::sys::socket::MsgFlags;
use nix::unistd::Pid;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitStatus;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A started child: its pid, what its supervisor reports, and the supervisor thread.
pub(crate) struct Supervised {
    pid: u32,
    life: Arc<Life>,
    supervisor: Option<JoinHandle<()>>,
}

/// What the supervisor thread shares with the `Process` handle.
#[derive(Default)]
struct Life {
    state: Mutex<LifeState>,
    changed: Condvar,
}

#[derive(Default)]
struct LifeState {
    /// Set when the child is reaped: from then on, no signal may be sent to its pid.
    status: Option<ExitStatus>,
    /// The encoded outcome, or why there is none; taken by the first `join`.
    reply: Option<Result<Vec<u8>, Error>>,
    /// The strongest signal sent by `terminate` or `kill`, for the error message.
    stopped_with: Option<Signal>,
}

impl Life {
    fn lock(&self) -> MutexGuard<'_, LifeState> {
        // Every update is a short, panic-free sequence: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Supervised {
    /// Starts the supervisor thread, which spawns the child and sends it `frame` with `fds`;
    /// returns once the child is up.
    pub(crate) fn start(
        task: &'static str,
        frame: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> Result<Supervised, Error> {
        let life = Arc::new(Life::default());
        let (started_tx, started_rx) = mpsc::sync_channel(1);
        let supervisor = std::thread::Builder::new()
            .name("multiproc-process".into())
            .spawn({
                let life = Arc::clone(&life);
                move || supervise(task, &frame, fds, &life, &started_tx)
            })
            .map_err(|err| Error::io("starting a process supervisor thread failed", err))?;
        match started_rx.recv() {
            Ok(Ok(pid)) => Ok(Supervised {
                pid,
                life,
                supervisor: Some(supervisor),
            }),
            Ok(Err(err)) => {
                let _ = supervisor.join();
                Err(err.with_task(task))
            }
            Err(_) => {
                let _ = supervisor.join();
                Err(Error::new(
                    ErrorKind::Spawn,
                    "the process supervisor thread stopped before the child started",
                )
                .with_task(task))
            }
        }
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// How the child exited, once reaped.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        self.life.lock().status
    }

    /// Waits until the child is reaped (or `deadline`), then takes its reply.
    pub(crate) fn wait(&mut self, deadline: Option<Instant>) -> Result<Vec<u8>, Error> {
        let mut state = self.life.lock();
        while state.status.is_none() {
            state = match deadline {
                None => self
                    .life
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::new(ErrorKind::Timeout, "the process is running"));
                    }
                    self.life
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        let reply = state.reply.take();
        drop(state);
        if let Some(supervisor) = self.supervisor.take() {
            // It has reaped the child: it is finishing.
            let _ = supervisor.join();
        }
        reply.ok_or_else(|| {
            Error::new(
                ErrorKind::Closed,
                "the outcome of this process was already returned by an earlier join",
            )
        })?
    }

    /// Signals the child and its process group while the child runs: not once it has
    /// exited, though the supervisor may not have reaped it yet (it first forwards the
    /// child's last stderr, which can take a while), so that what the task left running
    /// outlives a finished child's handle, as it does once the child is reaped.
    pub(crate) fn signal(&self, signal: Signal) {
        let mut state = self.life.lock();
        if state.status.is_some() || exited(self.pid, false) {
            return;
        }
        // Not reaped, so the pid (and its group id) still name our child. ESRCH (it is
        // exiting) needs nothing.
        if signal_child(self.pid, signal) && state.stopped_with != Some(Signal::SIGKILL) {
            state.stopped_with = Some(signal);
        }
    }
}

impl Drop for Supervised {
    /// Kills a child still running, and waits for the supervisor to reap it.
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
    }
}

/// The supervisor thread's body: spawn, send, read the reply, reap.
fn supervise(
    task: &'static str,
    frame: &[u8],
    fds: Vec<OwnedFd>,
    life: &Life,
    started: &mpsc::SyncSender<Result<u32, Error>>,
) {
    let options = SpawnOptions {
        max_frame_len: DEFAULT_MAX_FRAME_LEN,
        start_timeout: Duration::from_secs(30),
        max_memory: None,
        // One task, then `Shutdown`: nothing to poll for.
        spin: Duration::ZERO,
        initializer: None,
        stop: None,
        fork_server: true,
    };
    let mut worker = match WorkerProcess::spawn(&options) {
        Ok(worker) => worker,
        Err(err) => {
            let _ = started.send(Err(err));
            return;
        }
    };
    let pid = worker.pid();
    let _ = started.send(Ok(pid));
    // A write that fails because the child died needs nothing: reading then finds the end
    // of its stream. Any other failure (the kernel refusing the descriptors, say) leaves a
    // child waiting for the rest of its task: it is stopped, and the failure is the reply.
    let unsent = write_frame(&worker.conn, frame, &fds).err().filter(|err| {
        !matches!(
            err.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        )
    });
    drop(fds);
    let reply = match unsent {
        Some(err) => {
            signal_child(pid, Signal::SIGKILL);
            Err(Error::io("sending the task to its process failed", err))
        }
        None => read_reply(&mut worker),
    };
    if reply.is_err() {
        // A malformed reply: stop the child. Not reaped yet, so the group id is still ours.
        signal_child(pid, Signal::SIGKILL);
    }
    exited(pid, true);
    worker.stderr.settle(None);
    let mut state = life.lock();
    let status = worker.wait();
    state.status = Some(status);
    state.reply = Some(match reply {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => {
            let (signal, code) = status_parts(status);
            let message = match state.stopped_with {
                // The exit status, which the error shows, names the signal.
                Some(sent) if signal == Some(sent as i32) => {
                    format!("process {pid} was stopped before the task finished")
                }
                Some(sent) => format!(
                    "process {pid} was stopped with {} before the task finished",
                    signal_name(sent as i32)
                ),
                None => format!("process {pid} died while running it"),
            };
            Err(Error::new(ErrorKind::Crashed, message)
                .with_task(task)
                .with_status(signal, code)
                .with_stderr_tail(worker.stderr.last_lines()))
        }
        Err(err) => Err(err.with_task(task)),
    });
    drop(state);
    life.changed.notify_all();
}

/// Sends `signal` to the child `pid`, which must not be reaped yet, and to its process group
/// (what the task started); whether the child got it. A child that moved to another group
/// (`setpgid`) gets it on its own: signalling its old group alone would miss it, and a drop
/// waiting for its exit would wait forever.
fn signal_child(pid: u32, signal: Signal) -> bool {
    let pid = Pid::from_raw(pid.cast_signed());
    let group = killpg(pid, signal);
    // Checked after the group's signal: a child that leaves its group later got that one.
    if nix::unistd::getpgid(Some(pid)) == Ok(pid) {
        group.is_ok()
    } else {
        nix::sys::signal::kill(pid, signal).is_ok()
    }
}

/// Writes the whole frame, its descriptors riding on the first byte.
fn write_frame(conn: &UnixStream, frame: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let sent = fdpass::send_with(conn.as_fd(), frame, fds, MsgFlags::MSG_NOSIGNAL)?;
    let mut conn = conn;
    conn.write_all(&frame[sent..])
}

/// Reads until the child has exited (its end of the channel closes, or its exit watch
/// says so: a process it forked may hold that end open), watching its stderr meanwhile.
/// The encoded outcome, if it sent one (it is then told to exit); `Err` for a reply that
/// breaks the protocol.
fn read_reply(worker: &mut WorkerProcess) -> Result<Option<Vec<u8>>, Error> {
    let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
    let mut reply = None;
    let mut exited = false;
    loop {
        // Once the child has exited, only what is in the socket already is read.
        let wait = if exited {
            PollTimeout::ZERO
        } else {
            PollTimeout::NONE
        };
        let seen = watch(
            worker.conn.as_fd(),
            PollFlags::POLLIN,
            worker.exit_fd().filter(|_| !exited),
            None,
            worker.stderr.fd(),
            wait,
        )
        .map_err(|err| Error::io("waiting on a child process failed", err.into()))?;
        exited |= seen.exited;
        let (conn_ready, stderr_ready) = (!seen.conn.is_empty(), seen.said);
        if stderr_ready {
            worker.stderr.pump();
        }
        if !conn_ready {
            if exited {
                return Ok(reply);
            }
            continue;
        }
        match reader.read_from(&mut worker.conn) {
            Ok(0) => return Ok(reply),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                return match err.downcast::<Error>() {
                    Ok(err) => Err(err),
                    // A reset connection: the child died.
                    Err(_) => Ok(reply),
                };
            }
        }
        while let Some(range) = reader.next_frame()? {
            let (header, payload) = protocol::parse_body(reader.body(range))?;
            match header {
                Header::Results { count: 1, .. } if reply.is_none() => {
                    reply = Some(payload.to_vec());
                    // Done: the worker exits on `Shutdown`, and its stream ends.
                    let shutdown = protocol::control_frame(&Header::Shutdown);
                    let _ = (&worker.conn).write_all(&shutdown);
                }
                other => {
                    return Err(Error::new(
                        ErrorKind::Codec,
                        format!("unexpected frame from a child process: {other:?}"),
                    ));
                }
            }
        }
    }
}

/// Whether child `pid`, not reaped yet, has exited, without reaping it: reaping happens
/// under the lock that signals take. With `block`, waits until it has.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn exited(pid: u32, block: bool) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    let mut flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    if !block {
        flags |= WaitPidFlag::WNOHANG;
    }
    loop {
        match waitid(Id::Pid(Pid::from_raw(pid.cast_signed())), flags) {
            Err(Errno::EINTR) => {}
            Ok(WaitStatus::StillAlive) | Err(_) => return false,
            Ok(_) => return true,
        }
    }
}

/// Elsewhere a child is taken as running until reaped, and the reaping itself waits, under
/// the lock: once its stream has ended, the child is exiting.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn exited(_pid: u32, _block: bool) -> bool {
    false
}
