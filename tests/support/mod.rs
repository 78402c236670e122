//! Shared by the integration tests. Each test target is `harness = false` with a
//! `#[multiproc::main] fn main` that hands its test functions to libtest-mimic: worker
//! processes re-execute the test binary and must pass through `#[multiproc::main]`, which
//! libtest's own generated `main` would not do.

#![allow(dead_code)]

use std::time::{Duration, Instant};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A named test function.
pub type Test = (&'static str, fn() -> TestResult);

/// Runs `tests` (name, function) with libtest's command line and output.
pub fn run(tests: Vec<Test>) -> ! {
    run_with(&libtest_mimic::Arguments::from_args(), tests)
}

/// [`run`], one test at a time: for tests that measure the process's own memory.
pub fn run_one_at_a_time(tests: Vec<Test>) -> ! {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    run_with(&args, tests)
}

fn run_with(args: &libtest_mimic::Arguments, tests: Vec<Test>) -> ! {
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                test().map_err(|err| format!("{err:?}").into())
            })
        })
        .collect();
    libtest_mimic::run(args, trials).exit()
}

/// `tests![a, b]` builds the list for [`run`] from test function names.
#[macro_export]
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), $name as fn() -> $crate::support::TestResult)),*]
    };
}

/// Fails the test if `f` takes longer than `limit`: proves something does not hang. The
/// limit is generous on purpose; timing belongs in benchmarks.
pub fn within<T>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String>
where
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).map_err(|_| {
        format!(
            "{what} did not finish within {limit:?} (started {:?} ago)",
            started.elapsed()
        )
    })
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

pub fn ensure(condition: bool, message: impl Into<String>) -> TestResult {
    if condition {
        Ok(())
    } else {
        Err(message.into().into())
    }
}

/// A gate a task can wait at: the task reads a FIFO, which blocks until the test opens it.
/// Lets a test hold a task in the middle of its work without any sleep.
pub struct Gate {
    dir: std::path::PathBuf,
}

impl Gate {
    pub fn new() -> Gate {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("multiproc-gate-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("gate dir");
        nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        Gate { dir }
    }

    /// What the task gets: the FIFO's path.
    pub fn path(&self) -> String {
        self.dir.join("fifo").to_string_lossy().into_owned()
    }

    /// Lets the waiting task through (blocks until it has opened the FIFO).
    pub fn open(&self) {
        std::fs::write(self.dir.join("fifo"), b"go").expect("open the gate");
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Task side of a [`Gate`]: blocks until the test opens it.
pub fn pass_gate(path: &str) {
    let _ = std::fs::read(path);
}

/// Waits until process `pid` has exited, up to `limit`, using a pidfd (an event, not
/// polling). True when it is gone.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    use nix::libc;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.cast_signed(), 0) };
    if raw < 0 {
        return !alive(pid); // ESRCH: already gone
    }
    // SAFETY: a fresh descriptor from pidfd_open, owned here alone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(limit).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0) || !alive(pid)
}

/// Bytes that say which message they belong to and where they sit in it: a torn or
/// interleaved message cannot match.
pub fn pattern(producer: u32, index: u32, size: usize) -> Vec<u8> {
    let seed = (u64::from(producer) << 32) | u64::from(index);
    let mut bytes = vec![0; size];
    for (i, word) in bytes.chunks_exact_mut(8).enumerate() {
        let value = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        word.copy_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// The processes whose parent is `pid`, whichever of its threads started them.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children: Vec<u32> = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    children.sort_unstable();
    children
}

/// A task: forks a child that keeps the process's descriptors, its channel among them, open for two
/// minutes (unless it is killed first); writes the child's pid to `pid_file`; then aborts
/// the process.
#[multiproc::task]
pub fn fork_then_abort(pid_file: String) -> u64 {
    // SAFETY: the process runs one thread, so the child is a whole copy of it.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            std::thread::sleep(Duration::from_mins(2));
            // SAFETY: ends the copy at once, as a forked child should.
            unsafe { nix::libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            std::fs::write(&pid_file, child.to_string()).expect("write pid");
            std::process::abort()
        }
    }
}

/// Runs this test binary again with `envs` (a scenario's name, say) and without
/// `MULTIPROC_START_METHOD`; kills it if it has not ended within `limit`. Its exit status,
/// stdout and stderr.
pub fn run_self_within(
    envs: &[(&str, &str)],
    limit: Duration,
) -> Result<(std::process::ExitStatus, String, String), Box<dyn std::error::Error>> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .env_remove("MULTIPROC_START_METHOD")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (key, value) in envs {
        command.env(key, value);
    }
    let child = command.spawn()?;
    let pid = child.id();
    let out = match within(limit, "the scenario", move || child.wait_with_output()) {
        Ok(out) => out?,
        Err(hung) => {
            // Its workers die with it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.cast_signed()),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(hung.into());
        }
    };
    Ok((
        out.status,
        String::from_utf8(out.stdout)?,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// This process's sockets (descriptor numbers).
pub fn sockets() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|to| to.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// In a worker: writes `frame` (a length prefix and a body) onto its channel to the parent,
/// as a task that forges frames would.
pub fn write_raw_frame(frame: &[u8]) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let fd = sockets().into_iter().min().expect("the worker's channel");
    // SAFETY: the worker's channel descriptor; ManuallyDrop keeps it open for the worker.
    let mut channel = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    channel.write_all(frame).expect("write");
}

/// Bytes whose content says where they are, so that a shifted or mixed-up copy cannot match.
pub fn patterned(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}
