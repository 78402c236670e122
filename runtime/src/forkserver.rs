//! The fork server: a copy of the program taken as it starts, which forks workers on request.
//!
//! Starting a worker by running the executable again costs a whole program start: `exec`,
//! the dynamic loader, the runtime's start-up, before the worker can say `Ready`. Forking the
//! parent instead would be cheap but unsafe: by then it runs threads (a lock held by one of
//! them stays held in the child) and holds the program's state (connections, caches) that a
//! worker must not share. So `#[multiproc::main]` forks one process, the server, first thing
//! in `main`, while the program is still single-threaded and has done nothing of its own.
//! The server waits on a socket. To start a worker the parent sends it the worker's
//! descriptors (channel, stderr, stdout), its [`WorkerSpec`], and the parent's current
//! environment and working directory; the server forks a copy of itself, which takes them
//! and becomes the worker exactly as a re-executed worker would after its `exec`.
//!
//! The copy is made with `clone(CLONE_PARENT)`: the worker is the *parent's* child, not the
//! server's. So the parent reaps it, reads its exit status and signal, kills its process
//! group, and the kernel's parent-death signal ties it to the parent, all as for a worker
//! the parent started itself. The server holds no worker's descriptors past the fork.
//!
//! The server is an optimisation, never a dependency: when it is missing (a program without
//! `#[multiproc::main]`, [`START_METHOD_ENV`] set to `spawn`, a worker starting a pool of its
//! own), or stops answering, a worker is started by running the executable again.
//!
//! It dies with the parent: the parent-death signal, and end of stream on its socket.

use crate::error::{Error, ErrorKind};
use crate::worker::{self, WorkerSpec};
use nix::sys::socket::MsgFlags;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Instant;

/// Set to `spawn` to start every worker by running the executable again, never from the fork
/// server; read once, when the program starts. `PoolBuilder::start_method` chooses per pool.
pub(crate) const START_METHOD_ENV: &str = "MULTIPROC_START_METHOD";

/// The largest request the server reads: a larger environment is sent by `exec` instead.
const MAX_REQUEST: usize = 4 << 20;

/// The parent's end of the server's socket, while the server answers.
static SERVER: Mutex<Option<Server>> = Mutex::new(None);

struct Server {
    conn: UnixStream,
    pid: Pid,
}

/// What the parent sends for one worker; its descriptors ride along.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Request {
    /// The worker's [`WorkerSpec`], encoded as for its environment variable.
    spec: String,
    /// The parent's working directory; empty when it has none.
    cwd: Vec<u8>,
    /// The parent's environment, in order.
    env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether a stdout descriptor comes third (the parent may have none).
    stdout: bool,
}

/// Starts the server. Called by `worker_main` in a parent, first thing in `main`.
pub(crate) fn start() {
    if !cfg!(target_os = "linux")
        || std::env::var_os(START_METHOD_ENV).is_some_and(|method| method == "spawn")
        // A chosen worker executable (a profiler's wrapper) must be the one that runs.
        || std::env::var_os(crate::spawn::EXECUTABLE_ENV).is_some_and(|exe| !exe.is_empty())
    {
        return;
    }
    // A thread started before `main` (a constructor's) could hold a lock that would stay
    // held in every copy: no server then.
    if !single_threaded() {
        return;
    }
    let Ok((conn, server_end)) = UnixStream::pair() else {
        return;
    };
    let parent = nix::unistd::getpid();
    // SAFETY: this process is single-threaded (checked above; `worker_main` runs first thing
    // in `main`), so the child is a complete copy of it.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(conn);
            serve(&server_end, parent)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            *lock() = Some(Server { conn, pid: child });
        }
        Err(_) => {}
    }
}

/// Whether this process runs one thread: field 20 of `/proc/self/stat`.
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/stat").is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, fields)| fields.split_whitespace().nth(17))
            == Some("1")
    })
}

fn lock() -> std::sync::MutexGuard<'static, Option<Server>> {
    SERVER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Asks the server for a worker with these descriptors; `None` when there is no server or it
/// failed (it is then given up, and the caller runs the executable instead). Waits for the
/// answer until `deadline`.
pub(crate) fn fork_worker(
    spec: &WorkerSpec,
    channel: &OwnedFd,
    stderr: &OwnedFd,
    deadline: Instant,
) -> Option<Pid> {
    let mut guard = lock();
    let server = guard.as_mut()?;
    match server.request(spec, channel, stderr, deadline) {
        Ok(Some(pid)) => Some(pid),
        // The server could not fork this once (a process limit): `exec` reports it better.
        Ok(None) => None,
        Err(_) => {
            // Gone, stopped or confused: never asked again. A worker it may have forked
            // before it failed ends when its channel closes with the caller's attempt.
            let server = guard.take()?;
            let _ = nix::sys::signal::kill(server.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(server.pid, None);
            None
        }
    }
}

impl Server {
    /// `Ok(None)`: the server answered that it could not fork.
    fn request(
        &mut self,
        spec: &WorkerSpec,
        channel: &OwnedFd,
        stderr: &OwnedFd,
        deadline: Instant,
    ) -> Result<Option<Pid>, Error> {
        let stdout = std::io::stdout().as_fd().try_clone_to_owned().ok();
        let request = Request {
            spec: spec.encode(),
            cwd: std::env::current_dir()
                .map(|dir| dir.into_os_string().into_vec())
                .unwrap_or_default(),
            env: std::env::vars_os()
                .map(|(key, value)| (key.into_vec(), value.into_vec()))
                .collect(),
            stdout: stdout.is_some(),
        };
        let body = postcard::to_allocvec(&request)
            .map_err(|err| Error::new(ErrorKind::Codec, err.to_string()))?;
        if body.len() > MAX_REQUEST {
            return Ok(None);
        }
        let mut message = (body.len() as u32).to_le_bytes().to_vec();
        message.extend_from_slice(&body);
        let mut fds = vec![channel.as_raw_fd(), stderr.as_raw_fd()];
        fds.extend(stdout.as_ref().map(AsRawFd::as_raw_fd));
        let sent = crate::fdpass::send_gathered(
            self.conn.as_fd(),
            &[std::io::IoSlice::new(&message)],
            &fds,
            MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|err| Error::io("asking the fork server failed", err.into()))?;
        self.conn
            .write_all(&message[sent..])
            .map_err(|err| Error::io("asking the fork server failed", err))?;
        let mut reply = [0u8; 4];
        // A server that stopped (SIGSTOP) must not hold a start past its deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        self.conn
            .set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .and_then(|()| (&self.conn).read_exact(&mut reply))
            .map_err(|err| Error::io("reading the fork server's answer failed", err))?;
        let pid = i32::from_le_bytes(reply);
        Ok((pid > 0).then(|| Pid::from_raw(pid)))
    }
}

/// The server's life: answers requests until the parent closes the socket, then exits.
fn serve(conn: &UnixStream, parent: Pid) -> ! {
    use nix::sys::signal::{SigHandler, Signal, signal};
    let alive =
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_ok() && nix::unistd::getppid() == parent;
    if !alive {
        exit(0);
    }
    // A terminal's Ctrl-C reaches the parent's process group: the parent decides what it
    // means, and workers forked after it still start from here.
    // SAFETY: installing SIG_IGN runs no handler code.
    let _ = unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) };
    // The server keeps no copy of the program's stdio: whoever reads the program's output
    // to its end waits for the parent and its workers only. Each worker gets the parent's.
    if let Ok(null) = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
    // Workers inherit the registry built once here instead of each building its own.
    let _ = crate::registry::Registry::get();
    loop {
        match read_request(conn) {
            Ok(Some((request, fds))) => {
                let pid = fork_one(conn, request, fds);
                if (&*conn).write_all(&pid.to_le_bytes()).is_err() {
                    exit(1);
                }
            }
            Ok(None) => exit(0),
            Err(_) => exit(1),
        }
    }
}

/// Ends the server without running anything registered to run at exit: it did nothing of
/// its own that would need it.
fn exit(code: i32) -> ! {
    // SAFETY: `_exit` ends the process at once; it is async-signal-safe.
    unsafe { nix::libc::_exit(code) }
}

/// Reads one request and its descriptors; `None` at end of stream. A request that breaks
/// the format is an error (the server then exits, and the parent falls back to `exec`).
fn read_request(conn: &UnixStream) -> Result<Option<(Request, Vec<OwnedFd>)>, Error> {
    let mut head = [0u8; 4];
    let received = crate::fdpass::recv_with(conn.as_fd(), &mut head, MsgFlags::MSG_WAITALL)
        .map_err(|err| Error::io("reading a request failed", err.into()))?;
    if received.bytes == 0 {
        return Ok(None);
    }
    let corrupt = |what: String| Error::new(ErrorKind::Codec, what);
    if received.bytes < head.len() || received.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(corrupt("a truncated request".to_owned()));
    }
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_REQUEST {
        return Err(corrupt(format!("a request of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    let mut stream = conn;
    stream
        .read_exact(&mut body)
        .map_err(|err| Error::io("reading a request failed", err))?;
    let request: Request = postcard::from_bytes(&body)
        .map_err(|err| corrupt(format!("a malformed request: {err}")))?;
    let expected = 2 + usize::from(request.stdout);
    if received.fds.len() != expected {
        return Err(corrupt(format!(
            "{} descriptors with a request, {expected} expected",
            received.fds.len()
        )));
    }
    Ok(Some((request, received.fds)))
}

/// Forks a worker for `request`; its pid, or minus the error number.
fn fork_one(conn: &UnixStream, request: Request, fds: Vec<OwnedFd>) -> i32 {
    let Ok(spec) = WorkerSpec::decode(&OsString::from(request.spec.clone())) else {
        return -nix::libc::EINVAL;
    };
    // `fork` would make the worker the server's child; `CLONE_PARENT` makes it the parent's.
    // With no new stack, `clone` returns in both processes like `fork`.
    // SAFETY: this process is single-threaded (the server never starts a thread), so the
    // child is a complete copy; it runs `become_worker` and never returns here.
    let pid = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_clone,
            nix::libc::CLONE_PARENT | nix::libc::SIGCHLD,
            0,
            0,
            0,
            0,
        )
    };
    match pid {
        0 => become_worker(conn, spec, request, fds),
        -1 => -nix::errno::Errno::last_raw(),
        // The worker's descriptors close here as `fds` drops: the server must hold none.
        pid => i32::try_from(pid).unwrap_or(-nix::libc::EOVERFLOW),
    }
}

/// In the forked child: take the descriptors, the environment and the directory the parent
/// sent, then serve as a worker; never returns.
fn become_worker(conn: &UnixStream, spec: WorkerSpec, request: Request, fds: Vec<OwnedFd>) -> ! {
    // Its own process group first, as `exec`'d workers get from `Command::process_group`:
    // the parent kills the group (see `WorkerProcess::kill`).
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    // The server's socket is not this worker's: the parent must see the server's end.
    let _ = nix::unistd::close(conn.as_raw_fd());
    let mut fds = fds.into_iter();
    let (Some(channel), Some(stderr)) = (fds.next(), fds.next()) else {
        exit(1);
    };
    if let Some(stdout) = fds.next() {
        let _ = nix::unistd::dup2_stdout(&stdout);
    }
    let _ = nix::unistd::dup2_stderr(&stderr);
    drop(stderr);
    // Most programs change neither before they start a pool: then nothing is written (each
    // page written is a page copied from the server).
    let inherited: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .map(|(key, value)| (key.into_vec(), value.into_vec()))
        .collect();
    if inherited != request.env {
        // SAFETY: this process is single-threaded (a fresh copy of the server), so nothing
        // reads the environment while it is replaced.
        unsafe {
            for (key, _) in inherited {
                std::env::remove_var(OsString::from_vec(key));
            }
            for (key, value) in request.env {
                std::env::set_var(OsString::from_vec(key), OsString::from_vec(value));
            }
        }
    }
    let cwd = std::ffi::OsStr::from_bytes(&request.cwd);
    if !cwd.is_empty() && std::env::current_dir().is_ok_and(|dir| dir.as_os_str() != cwd) {
        let _ = std::env::set_current_dir(cwd);
    }
    worker::serve_forked(spec, channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(conn: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) {
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        crate::fdpass::send_gathered(
            conn.as_fd(),
            &[std::io::IoSlice::new(bytes)],
            &raw,
            MsgFlags::empty(),
        )
        .unwrap();
    }

    fn framed(request: &Request) -> Vec<u8> {
        let body = postcard::to_allocvec(request).unwrap();
        let mut message = (body.len() as u32).to_le_bytes().to_vec();
        message.extend_from_slice(&body);
        message
    }

    fn request(stdout: bool) -> Request {
        Request {
            spec: "v1:2:3:4:5".to_owned(),
            cwd: b"/".to_vec(),
            env: vec![(b"A".to_vec(), b"b".to_vec())],
            stdout,
        }
    }

    fn pipe_fds(n: usize) -> Vec<OwnedFd> {
        (0..n).map(|_| nix::unistd::pipe().unwrap().0).collect()
    }

    #[test]
    fn a_request_arrives_with_its_descriptors() {
        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &framed(&request(true)), &pipe_fds(3));
        let (got, fds) = read_request(&server).unwrap().unwrap();
        assert_eq!(got, request(true));
        assert_eq!(fds.len(), 3);
        drop(parent);
        assert!(read_request(&server).unwrap().is_none(), "end of stream");
    }

    #[test]
    fn a_corrupt_request_is_an_error_without_a_large_allocation() {
        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &u32::MAX.to_le_bytes(), &pipe_fds(2));
        let err = read_request(&server).unwrap_err();
        assert!(err.to_string().contains("a request of"), "{err}");

        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &[3, 0, 0, 0, 0xff, 0xff, 0xff], &pipe_fds(2));
        let err = read_request(&server).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");

        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &framed(&request(true)), &pipe_fds(2));
        let err = read_request(&server).unwrap_err();
        assert!(err.to_string().contains("3 expected"), "{err}");

        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &[1, 0], &[]);
        drop(parent);
        let err = read_request(&server).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
