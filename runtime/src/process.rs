//! [`Process`]: one call of a task in a child process of its own. Python's
//! `multiprocessing.Process`.
//!
//! A process is a worker like a pool's (forked by the fork server, or this executable run
//! again and diverted into the worker loop by `#[multiproc::main]`), which finds the task by
//! its registered name. It gets one
//! `Run` frame of one item, answers with its outcome, and is told to exit.
//!
//! Each process has a supervisor thread in the parent (see `supervisor`), which owns the
//! child from its spawn to its reaping. This module is the typed side: it encodes the call,
//! and decodes the outcome as the task's output or an error.

use crate::chunk;
use crate::codec;
use crate::error::{Error, ErrorKind};
use crate::outcome;
use crate::protocol::{DEFAULT_MAX_FRAME_LEN, Header};
use crate::registry::Registry;
use crate::supervisor::Supervised;
use crate::task::Task;
use crate::worker;
use nix::sys::signal::Signal;
use std::fmt;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// One call of task `T` in a child process of its own: Python's `Process(target=f,
/// args=(...))`.
///
/// [`new`](Process::new) prepares it, [`start`](Process::start) starts the child,
/// [`join`](Process::join) waits for it and returns the task's output; a panic or a crash
/// is an error, as for a [`Pool`](crate::Pool). Channel handles
/// ([`Sender`](crate::Sender), [`Receiver`](crate::Receiver),
/// [`Connection`](crate::Connection), [`Queue`](crate::Queue)) in the arguments reach the
/// child; the parent's own copies in the arguments are dropped when the child has started.
///
/// The child's stdout is the parent's; its stderr is forwarded to the parent's (see the
/// README, "Protocol"), also for what the child started, after the child is gone. It runs
/// in a process group of its own:
/// [`terminate`](Process::terminate) and [`kill`](Process::kill) signal it and every process
/// it started.
///
/// **Dropping a `Process` that is still running kills it** (with its process group) and
/// reaps it: a `Process` never leaves an orphan or a zombie behind. Join it first to let it
/// finish. If the parent process dies, its children die with it (Linux's parent-death
/// signal, and a worker exits when its channel to the parent closes).
///
/// # Examples
///
/// ```rust,standalone_crate
/// use multiproc::{task, Process};
///
/// #[task]
/// fn greet(name: String) {
///     println!("hello {name}");
/// }
///
/// #[task]
/// fn add(x: i64, y: i64) -> i64 {
///     x + y
/// }
///
/// #[multiproc::main]
/// fn main() -> Result<(), multiproc::Error> {
///     let mut p = Process::new(greet, ("alice".to_owned(),));
///     p.start()?;
///     p.join()?;
///     let mut p = Process::spawn(greet, ("bob".to_owned(),))?;
///     p.join()?;
///     assert!(p.exit_status().is_some_and(|status| status.success()));
///     let mut p = Process::spawn(add, (2, 3))?;
///     assert_eq!(p.join()?, 5); // join returns what the task returned
///     Ok(())
/// }
/// ```
pub struct Process<T: Task> {
    /// The arguments, until the child has started.
    args: Option<T::Args>,
    child: Option<Supervised>,
}

impl<T: Task> Process<T> {
    /// Prepares a call of `task` with `args` (a tuple: `(x,)` for one argument). Nothing
    /// starts until [`start`](Self::start).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Process, task};
    /// # #[task] fn greet(name: String) { println!("hello {name}"); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let mut p = Process::new(greet, ("alice".to_owned(),));
    /// assert!(!p.is_alive());
    /// p.start()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(task: T, args: T::Args) -> Process<T> {
        let _ = task; // a task is a zero-sized name: its type says everything
        Process {
            args: Some(args),
            child: None,
        }
    }

    /// [`new`](Self::new) and [`start`](Self::start) in one call.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Process, task};
    /// # #[task] fn greet(name: String) { println!("hello {name}"); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let mut p = Process::spawn(greet, ("bob".to_owned(),))?;
    /// p.join()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn spawn(task: T, args: T::Args) -> Result<Process<T>, Error> {
        let mut process = Process::new(task, args);
        process.start()?;
        Ok(process)
    }

    /// Starts the child process and sends it the call; returns once the child is up (its
    /// start-up handshake done), without waiting for the task. Python's `start()`. The child
    /// starts as a pool's workers do by default ([`StartMethod::ForkServer`](crate::StartMethod),
    /// with the same fall-backs); `MULTIPROC_START_METHOD=spawn` runs the executable again.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Codec`] when the arguments cannot be encoded; [`ErrorKind::Spawn`] when
    /// the child cannot start (`fn main` lacks `#[multiproc::main]`, the task is not in the
    /// registry) or when this process was started already. A process whose start failed may
    /// be started again.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Process, task};
    /// # #[task] fn greet(name: String) { println!("hello {name}"); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let mut p = Process::new(greet, ("alice".to_owned(),));
    /// p.start()?;
    /// assert!(p.pid().is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub fn start(&mut self) -> Result<(), Error> {
        let Some(args) = &self.args else {
            return Err(Error::new(
                ErrorKind::Spawn,
                "a process can be started only once",
            ));
        };
        worker::check_may_spawn()?;
        let task = Registry::get()?.id_of_task::<T>()?;
        let (frame, fds) = run_frame::<T>(task, args)?;
        let child = Supervised::start(T::NAME, frame, fds)?;
        // The child holds the handles in the arguments now: the parent's copies close, so a
        // receiver sees the end of a pipe when the child drops its sender.
        self.args = None;
        self.child = Some(child);
        Ok(())
    }

    /// Waits for the child to exit and returns the task's output. Python's `join()`, which
    /// here also hands over what the task returned. A child blocked sending on a full
    /// [`pipe`](crate::pipe) or [`Queue`](crate::Queue) does not exit: read what it sends
    /// before (or while) joining it.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Panicked`] when the task panicked (with its message and location);
    /// [`ErrorKind::Crashed`] when the child died without an outcome (a signal, including
    /// [`terminate`](Self::terminate) and [`kill`](Self::kill), or an exit in the middle of
    /// the task), with its signal or exit code and the last lines of its stderr;
    /// [`ErrorKind::Codec`] when the output cannot be decoded; [`ErrorKind::Spawn`] when the
    /// process was never started; [`ErrorKind::Closed`] when an earlier `join` already
    /// returned the outcome.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Process, task};
    /// # #[task] fn add(x: i64, y: i64) -> i64 { x + y }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let mut p = Process::spawn(add, (2, 3))?;
    /// assert_eq!(p.join()?, 5);
    /// # Ok(())
    /// # }
    /// ```
    pub fn join(&mut self) -> Result<T::Output, Error> {
        self.finish(None)
    }

    /// Like [`join`](Self::join), but gives up after `timeout` with an error of kind
    /// [`ErrorKind::Timeout`]. Nothing is killed then: the child goes on, and a later `join`
    /// gets its outcome.
    ///
    /// # Errors
    ///
    /// As [`join`](Self::join), and [`ErrorKind::Timeout`] while the child runs.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{ErrorKind, Process, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) { std::thread::sleep(Duration::from_secs(secs)); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let mut p = Process::spawn(slow, (60,))?;
    /// match p.join_timeout(Duration::from_secs(1)) {
    ///     Err(err) if err.kind() == ErrorKind::Timeout => p.kill(),
    ///     other => println!("{other:?}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<T::Output, Error> {
        // A timeout too large for the clock waits forever.
        self.finish(Instant::now().checked_add(timeout))
            .map_err(|err| {
                if err.kind() == ErrorKind::Timeout {
                    Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the process did not finish within {timeout:?}; it goes on running"
                        ),
                    )
                    .with_task(T::NAME)
                } else {
                    err
                }
            })
    }

    fn finish(&mut self, deadline: Option<Instant>) -> Result<T::Output, Error> {
        let Some(child) = &mut self.child else {
            return Err(Error::new(
                ErrorKind::Spawn,
                "the process was never started: call start() before join()",
            )
            .with_task(T::NAME));
        };
        let bytes = child.wait(deadline)?;
        let decoded = outcome::decode::<T::Output>(&bytes)
            .map_err(|err| Error::codec("the task's output could not be decoded", err))
            .and_then(|(outcome, _)| outcome.into_result());
        decoded.map_err(|err| err.with_task(T::NAME))
    }

    /// True from a successful [`start`](Self::start) until the child has exited (and been
    /// reaped, which the parent does at once). Python's `is_alive()`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Process, task};
    /// # #[task] fn greet(name: String) { println!("hello {name}"); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let mut p = Process::spawn(greet, ("alice".to_owned(),))?;
    /// p.join()?;
    /// assert!(!p.is_alive());
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_alive(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|child| child.status().is_none())
    }

    /// The child's process id, once started. Python's `pid`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Process, task};
    /// # #[task] fn greet(name: String) { println!("hello {name}"); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// let p = Process::spawn(greet, ("alice".to_owned(),))?;
    /// if let Some(pid) = p.pid() {
    ///     println!("running as {pid}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Supervised::pid)
    }

    /// How the child exited, once it has: `None` before, and while it runs. Python's
    /// `exitcode`, as a [`std::process::ExitStatus`]: `code()` is its exit code (0 after a
    /// task that returned), and on Unix `ExitStatusExt::signal()` the signal that killed it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{Process, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) { std::thread::sleep(Duration::from_secs(secs)); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let mut p = Process::spawn(slow, (60,))?;
    /// use std::os::unix::process::ExitStatusExt;
    /// assert!(p.exit_status().is_none()); // still running
    /// p.kill();
    /// let _ = p.join();
    /// assert_eq!(p.exit_status().and_then(|s| s.signal()), Some(9));
    /// # Ok(())
    /// # }
    /// ```
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child.as_ref().and_then(Supervised::status)
    }

    /// Sends `SIGTERM` to the child and every process it started (its process group), if it
    /// is still running. Returns at once: [`join`](Self::join) to wait for the exit, which
    /// it reports as [`ErrorKind::Crashed`] unless the task had finished. Python's
    /// `terminate()`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{ErrorKind, Process, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) { std::thread::sleep(Duration::from_secs(secs)); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let mut p = Process::spawn(slow, (60,))?;
    /// p.terminate();
    /// assert_eq!(p.join().unwrap_err().kind(), ErrorKind::Crashed);
    /// # Ok(())
    /// # }
    /// ```
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            child.signal(Signal::SIGTERM);
        }
    }

    /// Sends `SIGKILL` to the child and every process it started (its process group), if it
    /// is still running. Returns at once: [`join`](Self::join) to wait for the exit. Python's
    /// `kill()`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use multiproc::{ErrorKind, Process, task};
    /// # use std::time::Duration;
    /// # #[task] fn slow(secs: u64) { std::thread::sleep(Duration::from_secs(secs)); }
    /// # fn main() -> Result<(), multiproc::Error> {
    /// # let mut p = Process::spawn(slow, (60,))?;
    /// p.kill();
    /// let err = p.join().unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Crashed);
    /// assert_eq!(err.signal(), Some(9));
    /// # Ok(())
    /// # }
    /// ```
    pub fn kill(&self) {
        if let Some(child) = &self.child {
            child.signal(Signal::SIGKILL);
        }
    }
}

impl<T: Task> fmt::Debug for Process<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("task", &T::NAME)
            .field("pid", &self.pid())
            .field("alive", &self.is_alive())
            .field("exit_status", &self.exit_status())
            .finish()
    }
}

/// The `Run` frame of one call, after a `Descriptors` frame when the arguments hold channel
/// handles, and those handles' descriptors.
fn run_frame<T: Task>(task: u32, args: &T::Args) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
    let header = Header::Run {
        seq: 1,
        task,
        count: 1,
        timed: false,
    };
    let encoded = chunk::run_frame(&header, 64, DEFAULT_MAX_FRAME_LEN, |frame| {
        codec::encode_value(args, frame).map_err(|err| {
            crate::fdpass::encode_error("the arguments could not be encoded".to_owned(), err)
        })
    })
    .map_err(|err| err.with_task(T::NAME))?;
    Ok((encoded.frame, encoded.fds))
}
