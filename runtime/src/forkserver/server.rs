//! The fork server's side: it reads requests and forks each worker.

use super::{Identity, Limits, MAX_REQUEST, Request, corrupt, env_settable, environment};
use crate::error::Error;
use crate::worker::{self, WorkerSpec};
use nix::libc;
use nix::sys::socket::MsgFlags;
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;

/// The answer to a request the server declines: the parent differs from the program as it
/// started (`Identity`), or its environment holds what `set_var` refuses.
pub(super) const DECLINED: i32 = 0;

/// Where glibc keeps its records of the server's one thread, which a fork must set right in
/// the child: glibc's `fork` does, and the server forks with a raw `clone3` (glibc has no
/// `CLONE_PARENT` fork). glibc's `fork`, which made the server, left them set right here.
#[derive(Clone, Copy, Debug)]
pub(super) struct ThreadRecord {
    /// Where glibc caches the thread's id (`pthread_self()`'s, used by
    /// `pthread_setaffinity_np`, `pthread_kill`...): the kernel writes the child's id there
    /// (`CLONE_CHILD_SETTID`), as glibc's `fork` has it do.
    tid: u64,
    /// The thread's robust-mutex list, which the kernel does not carry into a child: the
    /// child registers it again, as glibc's `fork` does.
    robust_head: u64,
    robust_len: usize,
}

impl ThreadRecord {
    /// This thread's records, or `None` where the kernel does not tell them
    /// (`PR_GET_TID_ADDRESS` needs `CONFIG_CHECKPOINT_RESTORE`) or they are not what glibc
    /// keeps: then no server.
    fn read() -> Option<ThreadRecord> {
        let mut tid: *mut libc::pid_t = std::ptr::null_mut();
        // SAFETY: PR_GET_TID_ADDRESS writes one pointer to the address given.
        let got = unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &raw mut tid, 0, 0, 0) };
        if got != 0 || tid.is_null() {
            return None;
        }
        // SAFETY: the kernel's record of where this thread's id is cleared at its exit:
        // glibc's thread descriptor, which lives as long as the thread.
        if unsafe { tid.read_volatile() } != nix::unistd::gettid().as_raw() {
            return None;
        }
        let mut robust_head: *mut libc::c_void = std::ptr::null_mut();
        let mut robust_len: libc::size_t = 0;
        // SAFETY: get_robust_list(0, ...) writes this thread's list head and its length.
        let got = unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                0,
                &raw mut robust_head,
                &raw mut robust_len,
            )
        };
        if got != 0 {
            return None;
        }
        Some(ThreadRecord {
            tid: tid as u64,
            robust_head: robust_head as u64,
            robust_len,
        })
    }
}

/// What the server can fork from; `None` where it cannot fork workers (it then answers
/// every request with `ENOSYS`, and the parent gives it up).
struct Origin {
    /// The program's, as it started.
    identity: Identity,
    thread: ThreadRecord,
    /// The environment every worker inherits: the program's as it started (the server
    /// changes nothing in it). A worker replaces it only when the parent's differs.
    env: Vec<(Vec<u8>, Vec<u8>)>,
    /// The resource limits every worker inherits, the program's as it started; a worker
    /// sets those the parent has changed since.
    limits: Limits,
}

/// The server's process, from the fork that made it: `parent_end` is the parent's end of the
/// socket, which goes.
pub(super) fn run(parent_end: UnixStream, conn: &UnixStream, parent: Pid) -> ! {
    #[cfg(coverage)]
    profile::name_own_file();
    drop(parent_end);
    serve(conn, parent)
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
    let env = environment();
    let origin = match (Identity::now(), ThreadRecord::read()) {
        (Some(identity), Some(thread)) if env_settable(&env) => Some(Origin {
            identity,
            thread,
            env,
            limits: Limits::now(),
        }),
        _ => None,
    };
    loop {
        match read_request(conn) {
            Ok(Incoming::Wake) => {}
            Ok(Incoming::Request(request, fds)) => {
                // Every answer comes after the request's descriptors are closed here: a
                // declined start goes on with them in the parent.
                let pid = match &origin {
                    None => {
                        drop(fds);
                        -libc::ENOSYS
                    }
                    Some(origin)
                        if request.identity != origin.identity || !env_settable(&request.env) =>
                    {
                        drop(fds);
                        DECLINED
                    }
                    Some(origin) => fork_one(conn, origin, request, fds),
                };
                if (&*conn).write_all(&pid.to_le_bytes()).is_err() {
                    exit(1);
                }
            }
            Ok(Incoming::End) => exit(0),
            Err(_) => exit(1),
        }
    }
}

/// What the parent sent.
#[derive(Debug)]
enum Incoming {
    /// A worker to fork, with its descriptors.
    Request(Request, Vec<OwnedFd>),
    /// A start is coming (see `super::wake`): nothing to do or answer.
    Wake,
    /// The parent closed its end.
    End,
}

/// Ends the process without running anything registered to run at exit (the server did
/// nothing of its own that would need it), and without unwinding. A build for coverage
/// writes this process's profile first, which that at-exit work would have done.
fn exit(code: i32) -> ! {
    #[cfg(coverage)]
    profile::write();
    // SAFETY: `_exit` ends the process at once; it is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Reads what the parent sent next: a request and its descriptors, an empty message (a wake),
/// or the end of stream. A request that breaks the format is an error (the server then
/// exits, and the parent falls back to `exec`).
fn read_request(conn: &UnixStream) -> Result<Incoming, Error> {
    let mut head = [0u8; 4];
    let received = crate::fdpass::recv_with(conn.as_fd(), &mut head, MsgFlags::MSG_WAITALL)
        .map_err(|err| Error::io("reading a request failed", err.into()))?;
    if received.bytes == 0 {
        return Ok(Incoming::End);
    }
    if received.bytes < head.len() || received.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(corrupt("a truncated request".to_owned()));
    }
    let len = u32::from_le_bytes(head) as usize;
    if len == 0 && received.fds.is_empty() {
        return Ok(Incoming::Wake);
    }
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
    let expected = 3 + usize::from(request.stdout);
    if received.fds.len() != expected {
        return Err(corrupt(format!(
            "{} descriptors with a request, {expected} expected",
            received.fds.len()
        )));
    }
    Ok(Incoming::Request(request, received.fds))
}

/// `struct clone_args` of `clone3(2)`, as far as `CLONE_ARGS_SIZE_VER0` (64 bytes).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// Forks a worker for `request`; its pid, or minus the error number. The worker's
/// descriptors are closed here before this returns: the server holds none of them.
fn fork_one(conn: &UnixStream, origin: &Origin, request: Request, fds: Vec<OwnedFd>) -> i32 {
    let Ok(spec) = WorkerSpec::decode(&OsString::from(request.spec)) else {
        return -libc::EINVAL;
    };
    // What the worker must change after the fork, found out here once, not in each worker
    // (where every page written is a page copied): most programs change neither their
    // environment nor their directory before they start a pool. The server's directory is
    // read again for each request, as it may have been removed since (and the parent's
    // found again by its path).
    let setting = Setting {
        env: (request.env != origin.env).then_some(request.env),
        cwd: (!request.cwd.is_empty()
            && !std::env::current_dir().is_ok_and(|dir| dir.as_os_str().as_bytes() == request.cwd))
        .then_some(request.cwd),
        limits: request.limits.changed_from(&origin.limits),
    };
    let thread = origin.thread;
    // `fork` would make the worker the server's child; `CLONE_PARENT` makes it the parent's.
    // With no new stack, `clone3` returns in both processes like `fork`.
    let args = CloneArgs {
        flags: (libc::CLONE_PARENT | libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64,
        pidfd: 0,
        child_tid: thread.tid,
        parent_tid: 0,
        // Must be 0 with `CLONE_PARENT`: the worker's exit signals its parent as the
        // server's exit does (SIGCHLD, from the `fork` that made the server).
        exit_signal: 0,
        stack: 0,
        stack_size: 0,
        tls: 0,
    };
    // SAFETY: this process is single-threaded (the server never starts a thread), so the
    // child is a complete copy with no lock held; `thread` sets glibc's records right in it
    // (see `ThreadRecord`); it runs `become_worker` and never returns here. What glibc's
    // `fork` does besides is for threads and `pthread_atfork` handlers, which the server,
    // forked before `main`'s body ran, has none of (short of a constructor registering one).
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        0 => {
            #[cfg(coverage)]
            profile::reset_counters();
            child(conn, thread, spec, setting, fds)
        }
        -1 => -nix::errno::Errno::last_raw(),
        pid => i32::try_from(pid).unwrap_or(-libc::EOVERFLOW),
    }
}

/// The forked child's life: glibc's records set right, then the worker; never returns.
fn child(
    conn: &UnixStream,
    thread: ThreadRecord,
    spec: WorkerSpec,
    setting: Setting,
    fds: Vec<OwnedFd>,
) -> ! {
    // SAFETY: the child's robust-mutex list is empty (the server holds no mutex across a
    // fork), so registering its head again is what glibc's `fork` does.
    unsafe {
        libc::syscall(
            libc::SYS_set_robust_list,
            thread.robust_head,
            thread.robust_len,
        );
    }
    // Nothing may unwind out of the child into the server's loop.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        become_worker(conn, spec, setting, fds)
    }));
    exit(1)
}

/// What a forked worker changes in itself to match its parent: `None`, nothing.
struct Setting {
    /// The parent's environment, where it differs from the program's at start.
    env: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// The parent's working directory, where it is not the server's.
    cwd: Option<Vec<u8>>,
    /// The parent's resource limits that differ from the program's at start. The worker
    /// can set each: the parent did, with the same credentials and capabilities (the
    /// server forks only for a parent whose are the program's, see `Identity`).
    limits: Vec<(nix::sys::resource::Resource, u64, u64)>,
}

/// In the forked child: take the descriptors, the environment and the directory the parent
/// sent, then serve as a worker; never returns.
fn become_worker(conn: &UnixStream, spec: WorkerSpec, setting: Setting, fds: Vec<OwnedFd>) -> ! {
    // Its own process group first, as `exec`'d workers get from `Command::process_group`:
    // the parent kills the group (see `WorkerProcess::kill`).
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    // The server's socket is not this worker's: the parent must see the server's end. (The
    // `UnixStream` is never dropped in this process: it exits without returning.)
    let _ = nix::unistd::close(conn.as_raw_fd());
    let mut fds = fds.into_iter();
    let (Some(channel), Some(stderr), Some(status)) = (fds.next(), fds.next(), fds.next()) else {
        exit(1);
    };
    if let Some(stdout) = fds.next() {
        let _ = nix::unistd::dup2_stdout(&stdout);
    }
    let _ = nix::unistd::dup2_stderr(&stderr);
    drop(stderr);
    if let Some(env) = setting.env {
        // SAFETY: this process is single-threaded (a fresh copy of the server), so nothing
        // reads the environment while it is replaced. Every name and value is one `set_var`
        // takes: the server checked this request's (`env_settable`), and its own at start.
        unsafe {
            for (key, _) in environment() {
                std::env::remove_var(OsString::from_vec(key));
            }
            for (key, value) in env {
                std::env::set_var(OsString::from_vec(key), OsString::from_vec(value));
            }
        }
    }
    if let Some(cwd) = setting.cwd {
        let _ = std::env::set_current_dir(std::ffi::OsStr::from_bytes(&cwd));
    }
    for (resource, soft, hard) in setting.limits {
        let _ = nix::sys::resource::setrlimit(resource, soft, hard);
    }
    #[cfg(coverage)]
    profile::name_own_file();
    worker::serve_forked(spec, channel, status)
}

/// In a build for coverage (`cargo llvm-cov`, which sets `cfg(coverage)`): the server's and
/// each forked worker's coverage profile is its own, as a worker run from the executable has
/// it. Its counters
/// would otherwise start from the server's (the program's start, which the parent's profile
/// counts already), and `%p` in `LLVM_PROFILE_FILE` would name the parent, whose pid the
/// profile runtime read when the program started: every worker's profile would go to the
/// parent's file.
#[cfg(coverage)]
pub(super) mod profile {
    use std::os::unix::ffi::OsStringExt;

    unsafe extern "C" {
        fn __llvm_profile_reset_counters();
        fn __llvm_profile_set_filename(pattern: *const std::ffi::c_char);
        fn __llvm_profile_write_file() -> std::ffi::c_int;
    }

    /// Writes this process's profile, which `_exit` would skip: the server ends by it (as
    /// does a forked child that fails before it becomes a worker). The parent stops the
    /// server as it exits, before the parent-death signal would come: see
    /// `stop_server_at_exit`.
    pub(super) fn write() {
        // SAFETY: the profile runtime's API; this process is single-threaded.
        unsafe {
            __llvm_profile_write_file();
        }
    }

    /// Zeroes the counters: first thing in the child (the server or a worker), so that what
    /// it runs from then on counts (what ran before is its parent's to count).
    pub(in crate::forkserver) fn reset_counters() {
        // SAFETY: the profile runtime's API; this process is single-threaded.
        unsafe { __llvm_profile_reset_counters() }
    }

    /// Parses `LLVM_PROFILE_FILE` (the parent's, now in the environment) again, so that
    /// `%p` is this process's pid.
    pub(in crate::forkserver) fn name_own_file() {
        let Some(pattern) = std::env::var_os("LLVM_PROFILE_FILE").filter(|p| !p.is_empty()) else {
            return;
        };
        let Ok(pattern) = std::ffi::CString::new(pattern.into_vec()) else {
            return;
        };
        // SAFETY: the profile runtime's API; this process is single-threaded, and the
        // runtime copies the pattern. Setting the pattern it has already does nothing: a
        // plain name first, so that the real one is parsed again (naming a file creates
        // none).
        unsafe {
            __llvm_profile_set_filename(c"default.profraw".as_ptr());
            __llvm_profile_set_filename(pattern.as_ptr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
            identity: Identity("Uid: 0".to_owned()),
            limits: Limits(vec![Some((1024, 4096)), None]),
        }
    }

    fn pipe_fds(n: usize) -> Vec<OwnedFd> {
        (0..n).map(|_| nix::unistd::pipe().unwrap().0).collect()
    }

    #[test]
    fn a_request_arrives_with_its_descriptors() {
        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &framed(&request(true)), &pipe_fds(4));
        let Incoming::Request(got, fds) = read_request(&server).unwrap() else {
            panic!("a request")
        };
        assert_eq!(got, request(true));
        assert_eq!(fds.len(), 4);
        send(&parent, &0u32.to_le_bytes(), &[]);
        assert!(matches!(read_request(&server).unwrap(), Incoming::Wake));
        drop(parent);
        assert!(
            matches!(read_request(&server).unwrap(), Incoming::End),
            "end of stream"
        );
    }

    #[test]
    fn requests_sent_back_to_back_keep_their_own_descriptors() {
        // The parent sends a pool's requests before reading any answer: each must be read
        // with its own descriptors, not the next one's.
        let (parent, server) = UnixStream::pair().unwrap();
        let first = pipe_fds(3);
        let second = pipe_fds(4);
        let inode = |fd: &OwnedFd| nix::sys::stat::fstat(fd).unwrap().st_ino;
        send(&parent, &framed(&request(false)), &first);
        send(&parent, &framed(&request(true)), &second);
        let Incoming::Request(got, fds) = read_request(&server).unwrap() else {
            panic!("a request")
        };
        assert_eq!(got, request(false));
        let inodes: Vec<_> = fds.iter().map(inode).collect();
        assert_eq!(inodes, first.iter().map(inode).collect::<Vec<_>>());
        let Incoming::Request(got, fds) = read_request(&server).unwrap() else {
            panic!("a request")
        };
        assert_eq!(got, request(true));
        let inodes: Vec<_> = fds.iter().map(inode).collect();
        assert_eq!(inodes, second.iter().map(inode).collect::<Vec<_>>());
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
        send(&parent, &framed(&request(true)), &pipe_fds(3));
        let err = read_request(&server).unwrap_err();
        assert!(err.to_string().contains("4 expected"), "{err}");

        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &0u32.to_le_bytes(), &pipe_fds(1));
        let err = read_request(&server).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");

        let (parent, server) = UnixStream::pair().unwrap();
        send(&parent, &[1, 0], &[]);
        drop(parent);
        let err = read_request(&server).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
