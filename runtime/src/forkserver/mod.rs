//! The fork server: a copy of the program taken as it starts, which forks workers on request.
//!
//! Starting a worker by running the executable again costs a whole program start: `exec`,
//! the dynamic loader, the runtime's start-up, before the worker can say `Ready`. Forking the
//! parent instead would be cheap but unsafe: by then it runs threads (a lock held by one of
//! them stays held in the child) and holds the program's state (connections, caches) that a
//! worker must not share. So `#[multiproc::main]` forks one process, the server, first thing
//! in `main`, while the program is still single-threaded and has done nothing of its own.
//! The server waits on a socket. To start a worker the parent sends it the worker's
//! descriptors (channel, stderr, status page, stdout), its [`WorkerSpec`], and the parent's
//! current environment, working directory and resource limits; the server forks a copy of
//! itself (`server`), which takes them and becomes the worker exactly as a re-executed
//! worker would after its `exec`. A pool's requests go out back to back ([`ask`]): the
//! server forks the next worker while the first sets itself up, and the parent sets the
//! pool up meanwhile. `Pool::new` first sends an empty message ([`wake`]), so that the
//! server is up when they arrive, and need not wait for the answers ([`Asked::defer`]): each
//! is read when its worker is first used, `worker_pids` asks, or the pool drops
//! ([`Answer`]), by then long there. The server answers in order, so whoever reads an
//! answer reads those owed before it, and the next pool's requests wait for every answer
//! still owed (16 at most, see [`WINDOW`]).
//!
//! The copy is made with `clone3(CLONE_PARENT)`: the worker is the *parent's* child, not the
//! server's. So the parent reaps it, reads its exit status and signal, kills its process
//! group, and the kernel's parent-death signal ties it to the parent, all as for a worker
//! the parent started itself. The server holds no worker's descriptors past the fork.
//!
//! The server is an optimisation, never a dependency. A worker is started by running the
//! executable again when the program has no server (no `#[multiproc::main]`,
//! [`START_METHOD_ENV`] set to `spawn`, a worker starting a pool of its own, a process the
//! program forked), when the server stops answering, and whenever what the kernel knows of
//! the asking thread differs from what it knew at start ([`Identity`]: credentials and
//! capabilities, umask, CPU affinity, seccomp filters, control group...), which a forked
//! copy would not share: the server, which is the program as it started, declines those
//! requests.
//!
//! The parent does as little as it can at start: it checks that it runs one thread and
//! forks. Everything else the server finds out for itself, off the parent's path.
//!
//! It dies with the parent: the parent-death signal, and end of stream on its socket.

mod server;

use crate::error::{Error, ErrorKind};
use crate::worker::WorkerSpec;
use nix::sys::socket::MsgFlags;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Set to `spawn` to start every worker by running the executable again, never from the fork
/// server; read once, when the program starts. `PoolBuilder::start_method` chooses per pool.
pub(crate) const START_METHOD_ENV: &str = "MULTIPROC_START_METHOD";

/// The largest request the server reads: a larger environment is sent by `exec` instead.
const MAX_REQUEST: usize = 4 << 20;

/// How long a request may take to send and answer, at most: a fork takes a fraction of a
/// millisecond, so a server this slow is stopped or broken, and is given up.
const ANSWER_LIMIT: Duration = Duration::from_secs(2);

/// The parent's end of the server's socket, while the server answers.
static SERVER: Mutex<Option<Server>> = Mutex::new(None);

/// The process that started the server, read before [`SERVER`] is locked. A copy of the
/// program made with `fork` inherits the server's socket, but the server's workers would
/// not be its children; and it may have been made while another thread held the lock,
/// which no thread of the copy would ever release.
static OWNER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

struct Server {
    conn: UnixStream,
    pid: Pid,
    /// The answers not read yet to requests already sent, oldest first (the server answers
    /// in order): whoever reads answers next reads these first.
    owed: VecDeque<Answer>,
}

/// What a forked worker shares with the program as it started, not with the thread that
/// asks for it as it is now (a worker run from the executable would take that thread's):
/// the credentials, capabilities, umask, `no_new_privs`, seccomp filters and CPU affinity
/// of `/proc/thread-self/status`, and the control group. Each request carries the asking
/// thread's, and the server forks only while they equal its own; a parent that dropped
/// privileges or sandboxed itself, say, gets `exec`'d workers, which keep that (and which
/// it can still kill). Not compared: namespaces and security-module labels.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct Identity(String);

impl Identity {
    fn now() -> Option<Identity> {
        const FIELDS: [&str; 13] = [
            "Uid:",
            "Gid:",
            "Groups:",
            "CapInh:",
            "CapPrm:",
            "CapEff:",
            "CapBnd:",
            "CapAmb:",
            "Seccomp_filters:",
            "Umask:",
            "NoNewPrivs:",
            "Seccomp:",
            "Cpus_allowed:",
        ];
        let status = read_proc("/proc/thread-self/status")?;
        let mut identity: String = status
            .lines()
            .filter(|line| FIELDS.iter().any(|field| line.starts_with(field)))
            .collect();
        identity.push_str(&read_proc("/proc/thread-self/cgroup")?);
        Some(Identity(identity))
    }
}

/// A small file of `/proc`, read with one large read instead of `read_to_string`'s growing
/// ones: the kernel writes the whole file out again for each read.
fn read_proc(path: &str) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
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
    /// The parent's, now.
    identity: Identity,
    /// The parent's resource limits, now.
    limits: Limits,
}

/// The resource limits of a process, soft and hard, as `getrlimit` gives them: one entry per
/// resource of [`RESOURCES`], in order (`None`: not read). A forked worker takes its
/// parent's, as a worker run from the executable inherits them: a program that raised its
/// limit of open files after it started, say, gets workers that may open as many.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
struct Limits(Vec<Option<(u64, u64)>>);

/// Every resource Linux limits.
const RESOURCES: [nix::sys::resource::Resource; 16] = {
    use nix::sys::resource::Resource as R;
    [
        R::RLIMIT_AS,
        R::RLIMIT_CORE,
        R::RLIMIT_CPU,
        R::RLIMIT_DATA,
        R::RLIMIT_FSIZE,
        R::RLIMIT_LOCKS,
        R::RLIMIT_MEMLOCK,
        R::RLIMIT_MSGQUEUE,
        R::RLIMIT_NICE,
        R::RLIMIT_NOFILE,
        R::RLIMIT_NPROC,
        R::RLIMIT_RSS,
        R::RLIMIT_RTPRIO,
        R::RLIMIT_RTTIME,
        R::RLIMIT_SIGPENDING,
        R::RLIMIT_STACK,
    ]
};

impl Limits {
    fn now() -> Limits {
        Limits(
            RESOURCES
                .iter()
                .map(|&resource| nix::sys::resource::getrlimit(resource).ok())
                .collect(),
        )
    }

    /// The limits of `self` that differ from `from`'s, to set with `setrlimit`.
    fn changed_from(&self, from: &Limits) -> Vec<(nix::sys::resource::Resource, u64, u64)> {
        RESOURCES
            .iter()
            .zip(self.0.iter().zip(&from.0))
            .filter_map(|(&resource, (now, then))| match now {
                Some((soft, hard)) if now != then => Some((resource, *soft, *hard)),
                _ => None,
            })
            .collect()
    }
}

/// How a request for a worker ended.
#[derive(Clone, Copy)]
pub(crate) enum Forked {
    /// The worker, the caller's child.
    Pid(Pid),
    /// No worker, and the caller's descriptors are still its alone: no server, or one that
    /// did not take them.
    Unavailable,
    /// No answer: a worker may hold the caller's channel now, so that channel must not
    /// serve another start. The server is given up.
    Lost,
}

impl Forked {
    /// The worker's process id, if the server forked one.
    pub(crate) fn pid(self) -> Option<u32> {
        match self {
            Forked::Pid(pid) => Some(pid.as_raw().cast_unsigned()),
            Forked::Unavailable | Forked::Lost => None,
        }
    }
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
    // in `main`), so the child is a complete copy of it; glibc's `fork` keeps its own
    // records (the thread's id, its robust-mutex list) right in the child.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // (In a build for coverage, what this branch runs itself is not counted.)
            #[cfg(coverage)]
            server::profile::reset_counters();
            server::run(conn, &server_end, parent)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            *lock() = Some(Server {
                conn,
                pid: child,
                owed: VecDeque::new(),
            });
            OWNER.store(parent.as_raw(), std::sync::atomic::Ordering::SeqCst);
            #[cfg(coverage)]
            // SAFETY: registers a plain function to run at exit.
            unsafe {
                nix::libc::atexit(stop_server_at_exit);
            }
        }
        Err(_) => {}
    }
}

/// In a build for coverage: stops the server as the program exits and waits for it, so that
/// it writes its profile whole; the parent-death signal would kill it first. Waits 10 s at
/// most, and not at all for a stopped server.
#[cfg(coverage)]
extern "C" fn stop_server_at_exit() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    if OWNER.load(std::sync::atomic::Ordering::SeqCst) != nix::unistd::getpid().as_raw() {
        return;
    }
    let server = match SERVER.try_lock() {
        Ok(mut guard) => guard.take(),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner().take(),
        // Another thread in the middle of a start: let the server be.
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    let Some(Server { conn, pid, .. }) = server else {
        return;
    };
    // End of stream, even where a copy of this program made by `fork` holds the socket too:
    // the server writes its profile and exits.
    let _ = conn.shutdown(std::net::Shutdown::Both);
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(1)),
            _ => return,
        }
    }
}

/// Whether this process runs one thread: field 20 of `/proc/self/stat`.
fn single_threaded() -> bool {
    read_proc("/proc/self/stat").is_some_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, fields)| fields.split_whitespace().nth(17))
            == Some("1")
    })
}

fn environment() -> Vec<(Vec<u8>, Vec<u8>)> {
    std::env::vars_os()
        .map(|(key, value)| (key.into_vec(), value.into_vec()))
        .collect()
}

/// Whether a forked worker can take this environment with `std::env::set_var`, which
/// refuses an empty name, a name with `=`, and a NUL anywhere (an environment built by
/// hand can hold them; `exec` carries it as it is).
fn env_settable(env: &[(Vec<u8>, Vec<u8>)]) -> bool {
    env.iter().all(|(key, value)| {
        !key.is_empty() && !key.contains(&b'=') && !key.contains(&0) && !value.contains(&0)
    })
}

fn lock() -> std::sync::MutexGuard<'static, Option<Server>> {
    SERVER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The descriptors a forked worker takes: its channel, its stderr and its status page
/// (stdout, the parent's, is added to each request).
pub(crate) struct WorkerFds<'a> {
    pub channel: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    pub status: BorrowedFd<'a>,
}

/// How many requests may wait for their answers at once. The answers the server writes
/// meanwhile must fit in the socket's buffer (each is a small packet), or the server would
/// block on them while the parent blocks sending: a few dozen would; the pools that ask for
/// more than this wait for the first answers as they go. So at most this many answers are
/// ever owed ([`Asked::defer`]), and they are read before the next requests go out.
const WINDOW: usize = 16;

/// Tells the server that a request follows soon, so that it wakes up while the caller gets
/// the request ready: a sleeping process takes a while to run again (0.1-0.2 ms on a virtual
/// machine whose idle CPUs halt), and a pool's start waits for it. Costs one small message,
/// which the server reads and does not answer; never waits.
pub(crate) fn wake() {
    if OWNER.load(std::sync::atomic::Ordering::SeqCst) != nix::unistd::getpid().as_raw() {
        return;
    }
    // Another start holds the lock: the server is awake already.
    let Ok(guard) = SERVER.try_lock() else {
        return;
    };
    if let Some(server) = guard.as_ref() {
        let message = 0u32.to_le_bytes();
        // A full socket or a gone server: the request that follows finds out. A message
        // sent in part is completed, or the requests behind it would be misread (if that
        // fails too, the server finds a malformed request and exits, and is given up).
        if let Ok(sent @ 1..4) = nix::sys::socket::send(
            server.conn.as_raw_fd(),
            &message,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            let _ = server.conn.set_write_timeout(Some(ANSWER_LIMIT));
            let _ = (&server.conn).write_all(&message[sent..]);
        }
    }
}

/// Asks the server for one worker per entry of `workers`, to be answered until `deadline`
/// (each request sent, and each answer read, within [`ANSWER_LIMIT`]); [`Asked::answers`]
/// reads the answers. The requests go out back to back, so the server forks the next worker
/// while the first sets itself up, and the caller can do its own work meanwhile; what they
/// share (identity, environment, directory) is read once.
pub(crate) fn ask(spec: &WorkerSpec, workers: &[WorkerFds], deadline: Instant) -> Asked {
    let mut asked = Asked {
        server: None,
        message: Vec::new(),
        fds: Vec::new(),
        stdout: None,
        sent: 0,
        answers: Vec::new(),
        count: workers.len(),
        deadline,
    };
    if OWNER.load(std::sync::atomic::Ordering::SeqCst) != nix::unistd::getpid().as_raw() {
        // No server, or a copy of the program made by `fork`: the server is the
        // original's, not ours to ask, kill or reap (see `OWNER`).
        return asked;
    }
    let mut guard = lock();
    // Their answers come before those to the requests below.
    settle(&mut guard, None);
    if guard.is_none() {
        return asked;
    }
    let Some(identity) = Identity::now() else {
        return asked;
    };
    let stdout = std::io::stdout().as_fd().try_clone_to_owned().ok();
    let request = Request {
        spec: spec.encode(),
        cwd: std::env::current_dir()
            .map(|dir| dir.into_os_string().into_vec())
            .unwrap_or_default(),
        env: environment(),
        stdout: stdout.is_some(),
        identity,
        limits: Limits::now(),
    };
    match postcard::to_allocvec(&request) {
        Ok(body) if body.len() <= MAX_REQUEST => {
            asked.message = (body.len() as u32).to_le_bytes().to_vec();
            asked.message.extend_from_slice(&body);
        }
        // Too large to send: `exec` these.
        _ => {
            asked.answers = workers.iter().map(|_| Err(Refused::Once)).collect();
            return asked;
        }
    }
    asked.fds = workers
        .iter()
        .map(|worker| {
            let mut fds = vec![
                worker.channel.as_raw_fd(),
                worker.stderr.as_raw_fd(),
                worker.status.as_raw_fd(),
            ];
            fds.extend(stdout.as_ref().map(AsRawFd::as_raw_fd));
            fds
        })
        .collect();
    asked.stdout = stdout;
    asked.server = Some(guard);
    asked.exchange(false);
    asked
}

/// Requests on their way to the server, sent by [`ask`]. It holds the server's lock until
/// every answer is read or owed ([`defer`](Self::defer)), so no other start's requests come
/// in between; dropped early, it reads them still (the descriptors named in `fds` must stay
/// open until the last request is sent).
pub(crate) struct Asked {
    /// The server's lock, while there are requests to send or answers to read.
    server: Option<std::sync::MutexGuard<'static, Option<Server>>>,
    message: Vec<u8>,
    /// Each request's descriptors: channel, stderr, status page, and `stdout`.
    fds: Vec<Vec<RawFd>>,
    stdout: Option<OwnedFd>,
    sent: usize,
    answers: Vec<Result<Pid, Refused>>,
    count: usize,
    deadline: Instant,
}

impl Asked {
    /// One per worker asked for, in order.
    pub(crate) fn answers(mut self) -> Vec<Forked> {
        self.exchange(true);
        std::mem::take(&mut self.answers)
            .iter()
            .map(forked)
            .collect()
    }

    /// Leaves the answers not read yet to be read when first needed ([`Answer::wait`]), and
    /// lets the server go: the caller does not wait for the forks. One per worker asked
    /// for, in order. `None`, with `self` as it was, when there is no server to read them
    /// from (none was asked, it was given up, or an answer read already says it cannot
    /// fork): [`answers`](Self::answers) then says what became of each request.
    pub(crate) fn defer(&mut self) -> Option<Vec<Answer>> {
        if self
            .answers
            .iter()
            .any(|answer| matches!(answer, Err(Refused::Always)))
        {
            return None;
        }
        let mut guard = self.server.take()?;
        let Some(server) = guard.as_mut() else {
            self.server = Some(guard);
            return None;
        };
        let mut answers: Vec<Answer> = self
            .answers
            .iter()
            .map(|a| Answer::known(forked(a)))
            .collect();
        // Every request was sent (`ask` sends them all before it returns), and the answers
        // read so far are in `self.answers`: the rest are owed.
        self.answers.clear();
        for _ in answers.len()..self.count {
            let answer = Answer(Arc::new(OnceLock::new()));
            server.owed.push_back(answer.clone());
            answers.push(answer);
        }
        Some(answers)
    }

    /// Sends the requests the window allows, and reads answers: until every one is read
    /// when `finish`, else only while a request waits for room. Lets the server go once
    /// every answer is in, and gives it up if one was lost or says it cannot fork.
    fn exchange(&mut self, finish: bool) {
        let Some(guard) = self.server.as_mut() else {
            self.answers.resize_with(self.count, || Err(Refused::Once));
            return;
        };
        let Some(server) = guard.as_mut() else {
            return;
        };
        while self.answers.len() < self.count {
            // Each exchange gets its own limit: a large pool's requests take longer in all.
            let limit = self.deadline.min(Instant::now() + ANSWER_LIMIT);
            let next = if self.sent < self.count && self.sent - self.answers.len() < WINDOW {
                server
                    .send(&self.message, &self.fds[self.sent], limit)
                    .map(|()| self.sent += 1)
            } else if finish || self.sent < self.count {
                server.answer(limit).map(|answer| self.answers.push(answer))
            } else {
                return;
            };
            if next.is_err() {
                break;
            }
        }
        // Unanswered, or not sent after a failure: lost, as far as the caller knows.
        self.answers.resize_with(self.count, || Err(Refused::Lost));
        let Some(mut guard) = self.server.take() else {
            return;
        };
        if self
            .answers
            .iter()
            .any(|answer| matches!(answer, Err(Refused::Always | Refused::Lost)))
        {
            give_up(&mut guard);
        }
    }
}

/// What became of a request, from its answer.
fn forked(answer: &Result<Pid, Refused>) -> Forked {
    match answer {
        Ok(pid) => Forked::Pid(*pid),
        // Too large to send, declined (see `Identity`, `env_settable`), no fork this time
        // (a process limit), or no fork at all: `exec` this one.
        Err(Refused::Once | Refused::Always) => Forked::Unavailable,
        Err(Refused::Lost) => Forked::Lost,
    }
}

/// Gives the server up: it is gone, stopped, confused, or unable to fork this way, and is
/// never asked again. The answers still owed are lost. A worker it may have forked before
/// it failed holds the channel, which the caller gives up (the worker is reaped once it says
/// who it is: `spawn::reap_lost`).
fn give_up(guard: &mut std::sync::MutexGuard<'static, Option<Server>>) {
    if let Some(Server { conn, pid, owed }) = guard.take() {
        for answer in owed {
            let _ = answer.0.set(Forked::Lost);
        }
        // Our end closes first: a server that still reads exits at end of stream.
        drop(conn);
        // Reaped only if it could be killed: a server this process may no longer signal (it
        // dropped privileges) dies with it, by the parent-death signal.
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

/// Reads the answers owed ([`Server::owed`]), oldest first: until `until` is known, or all
/// of them. Each is given [`ANSWER_LIMIT`]; one that does not come, or that says the server
/// cannot fork at all, gives the server up.
fn settle(guard: &mut std::sync::MutexGuard<'static, Option<Server>>, until: Option<&Answer>) {
    while until.is_none_or(|answer| answer.get().is_none()) {
        let Some(server) = guard.as_mut() else {
            return;
        };
        let Some(next) = server.owed.pop_front() else {
            return;
        };
        let read = server.answer(Instant::now() + ANSWER_LIMIT);
        let failed = matches!(read, Err(()) | Ok(Err(Refused::Always)));
        let _ = next
            .0
            .set(read.map_or(Forked::Lost, |answer| forked(&answer)));
        if failed {
            give_up(guard);
        }
    }
}

/// The fork server's answer to one request, read when it is first needed ([`Asked::defer`]):
/// the server answers in order, so whoever needs one reads those owed before it too, under
/// the server's lock.
#[derive(Clone)]
pub(crate) struct Answer(Arc<OnceLock<Forked>>);

impl Answer {
    fn known(forked: Forked) -> Answer {
        Answer(Arc::new(OnceLock::from(forked)))
    }

    /// The answer, if it has been read.
    pub(crate) fn get(&self) -> Option<Forked> {
        self.0.get().copied()
    }

    /// Whether `other` is this same answer.
    pub(crate) fn is(&self, other: &Answer) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The answer: read now if it has not been, with those owed before it, in
    /// [`ANSWER_LIMIT`] each at most (the server answers as soon as it has forked).
    pub(crate) fn wait(&self) -> Forked {
        if let Some(forked) = self.get() {
            return forked;
        }
        if OWNER.load(std::sync::atomic::Ordering::SeqCst) != nix::unistd::getpid().as_raw() {
            // A copy of the program made by `fork`: the server and its workers are the
            // original's (see `OWNER`), not ours to read, reap or kill.
            return Forked::Unavailable;
        }
        settle(&mut lock(), Some(self));
        // Not there after all: the server was given up, which loses what it owed.
        *self.0.get_or_init(|| Forked::Lost)
    }
}

impl Drop for Asked {
    fn drop(&mut self) {
        // Answers left in the socket would be read as the next start's.
        if self.server.is_some() {
            self.exchange(true);
        }
    }
}

/// Why a request got no worker.
enum Refused {
    /// The request was too large to send, or the server declined it or could not fork
    /// this time (a process limit): ask again next time. No worker holds the descriptors.
    Once,
    /// The server cannot fork workers at all here (`clone3` refused, glibc's records out of
    /// reach, an environment at start that `set_var` refuses): give it up. It took and
    /// closed the descriptors without a worker.
    Always,
    /// The request or its answer was lost (or never sent, after an earlier one was).
    Lost,
}

impl Server {
    /// Sends one request with its descriptors. A stopped server must not hold a start (and
    /// every start behind this one, waiting for the lock) past the deadline: both ways
    /// time out.
    fn send(&self, message: &[u8], fds: &[RawFd], deadline: Instant) -> Result<(), ()> {
        self.conn
            .set_write_timeout(Some(time_left(deadline)))
            .map_err(drop)?;
        let sent = crate::fdpass::send_gathered(
            self.conn.as_fd(),
            &[std::io::IoSlice::new(message)],
            fds,
            MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(drop)?;
        (&self.conn).write_all(&message[sent..]).map_err(drop)
    }

    /// Reads the answer to the oldest request not answered yet: `Err` if none came.
    fn answer(&self, deadline: Instant) -> Result<Result<Pid, Refused>, ()> {
        let mut reply = [0u8; 4];
        self.conn
            .set_read_timeout(Some(time_left(deadline)))
            .and_then(|()| (&self.conn).read_exact(&mut reply))
            .map_err(drop)?;
        Ok(match i32::from_le_bytes(reply) {
            pid if pid > 0 => Ok(Pid::from_raw(pid)),
            server::DECLINED => Err(Refused::Once),
            errno if errno == -nix::libc::EAGAIN || errno == -nix::libc::ENOMEM => {
                Err(Refused::Once)
            }
            _ => Err(Refused::Always),
        })
    }
}

/// What is left until `deadline`, and a millisecond at least (a zero timeout means none).
fn time_left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// An error of kind [`ErrorKind::Codec`] about a request.
fn corrupt(what: String) -> Error {
    Error::new(ErrorKind::Codec, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkerSpec {
        WorkerSpec {
            parent: std::process::id(),
            max_frame_len: 1 << 20,
            max_memory: 0,
            spin_us: 0,
        }
    }

    /// The tests here take turns: they use the one `SERVER` of this process.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A process that stands in for the server: killed and reaped when it is given up.
    fn stand_in() -> Pid {
        #[allow(
            clippy::zombie_processes,
            reason = "giving the server up reaps it by pid"
        )]
        let stand_in = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        Pid::from_raw(stand_in.id().cast_signed())
    }

    fn answer_with(peer: &UnixStream, answers: &[i32]) {
        for answer in answers {
            (&*peer).write_all(&answer.to_le_bytes()).unwrap();
        }
    }

    fn is_pid(forked: Option<Forked>, expected: i32) -> bool {
        matches!(forked, Some(Forked::Pid(pid)) if pid.as_raw() == expected)
    }

    #[test]
    fn owed_answers_are_read_in_order_when_first_needed() {
        let _turn = one_at_a_time();
        let (conn, peer) = UnixStream::pair().unwrap();
        let pid = stand_in();
        *lock() = Some(Server {
            conn,
            pid,
            owed: VecDeque::new(),
        });
        OWNER.store(
            nix::unistd::getpid().as_raw(),
            std::sync::atomic::Ordering::SeqCst,
        );
        let fds: Vec<(UnixStream, OwnedFd, OwnedFd)> = (0..3)
            .map(|_| {
                let (channel, _) = UnixStream::pair().unwrap();
                let (_, stderr) = nix::unistd::pipe().unwrap();
                let status = nix::unistd::dup(&stderr).unwrap();
                (channel, stderr, status)
            })
            .collect();
        let workers: Vec<WorkerFds> = fds
            .iter()
            .map(|(channel, stderr, status)| WorkerFds {
                channel: channel.as_fd(),
                stderr: stderr.as_fd(),
                status: status.as_fd(),
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);

        let answers = ask(&spec(), &workers, deadline).defer().expect("deferred");
        assert!(answers.iter().all(|answer| answer.get().is_none()));
        assert_eq!(lock().as_ref().map(|server| server.owed.len()), Some(3));
        // The server answers in order; waiting for the last answer reads them all.
        answer_with(&peer, &[4242, server::DECLINED, 4343]);
        assert!(is_pid(Some(answers[2].wait()), 4343));
        assert!(is_pid(answers[0].get(), 4242));
        assert!(matches!(answers[1].get(), Some(Forked::Unavailable)));
        assert_eq!(lock().as_ref().map(|server| server.owed.len()), Some(0));

        // The next requests wait for what is owed: their answers come after it.
        let owed = ask(&spec(), &workers[..1], deadline)
            .defer()
            .expect("deferred");
        answer_with(&peer, &[4444]);
        let next = ask(&spec(), &workers[..1], deadline)
            .defer()
            .expect("deferred");
        assert!(is_pid(owed[0].get(), 4444), "read before the next requests");
        assert!(next[0].get().is_none());

        // A copy of this program made by `fork` reads nothing: the server is not its own.
        OWNER.store(1, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(next[0].wait(), Forked::Unavailable));
        assert!(next[0].get().is_none(), "left for the original");
        OWNER.store(
            nix::unistd::getpid().as_raw(),
            std::sync::atomic::Ordering::SeqCst,
        );

        // A server that goes away loses what it owed, and is given up.
        drop(peer);
        assert!(matches!(next[0].wait(), Forked::Lost));
        assert!(lock().is_none(), "given up");
        assert_eq!(
            nix::sys::signal::kill(pid, None),
            Err(nix::errno::Errno::ESRCH),
            "killed and reaped"
        );
    }

    #[test]
    fn another_processs_server_is_left_alone_and_a_silent_one_is_given_up() {
        let _turn = one_at_a_time();
        let (conn, peer) = UnixStream::pair().unwrap();
        let pid = stand_in();
        let (channel, _) = UnixStream::pair().unwrap();
        let channel = OwnedFd::from(channel);
        let (_, stderr) = nix::unistd::pipe().unwrap();
        let soon = || Instant::now() + Duration::from_millis(100);

        *lock() = Some(Server {
            conn,
            pid,
            owed: VecDeque::new(),
        });
        OWNER.store(1, std::sync::atomic::Ordering::SeqCst);
        let status = nix::unistd::dup(&stderr).unwrap();
        let workers = [WorkerFds {
            channel: channel.as_fd(),
            stderr: stderr.as_fd(),
            status: status.as_fd(),
        }];
        assert!(matches!(
            ask(&spec(), &workers, soon()).answers()[..],
            [Forked::Unavailable]
        ));
        peer.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert!((&peer).read(&mut byte).is_err(), "nothing was sent");
        assert_eq!(nix::sys::signal::kill(pid, None), Ok(()), "nor killed");

        OWNER.store(
            nix::unistd::getpid().as_raw(),
            std::sync::atomic::Ordering::SeqCst,
        );
        assert!(matches!(
            ask(&spec(), &workers, soon()).answers()[..],
            [Forked::Lost]
        ));
        assert!(lock().is_none(), "given up");
        assert_eq!(
            nix::sys::signal::kill(pid, None),
            Err(nix::errno::Errno::ESRCH),
            "killed and reaped"
        );
    }
}
