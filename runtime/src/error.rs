//! The one error type of multiproc: [`Error`] with its [`ErrorKind`].
//!
//! A task's panic, a worker's crash (with its signal or exit code) and a timeout are data that
//! a caller can inspect, not strings to parse.

use std::fmt;
use std::time::Duration;

/// What went wrong, in categories a caller can match on.
///
/// # Examples
///
/// ```
/// use multiproc::ErrorKind;
///
/// fn retryable(kind: ErrorKind) -> bool {
///     matches!(kind, ErrorKind::Crashed | ErrorKind::Timeout)
/// }
/// assert!(retryable(ErrorKind::Crashed));
/// assert!(!retryable(ErrorKind::Panicked));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The task panicked; the worker caught the panic and lives on.
    Panicked,
    /// The worker process died while running the task: a signal (abort, segfault, the OOM
    /// killer, a kill from outside) or an exit without a reply (`std::process::exit`). Also
    /// the kind of items whose channel handles died with a crashed worker before they ran:
    /// they cannot run again (see the README, "Guarantees").
    Crashed,
    /// The task ran past its deadline (its worker was killed), or a wait ended before what it
    /// waited for was ready (nothing was killed): a result's `get_timeout`,
    /// [`Process::join_timeout`](crate::Process::join_timeout), a channel's `recv_timeout`
    /// or a queue's `get_timeout`. The first names its task and item ([`Error::task`],
    /// [`Error::index`]); the second has no item (a result's and a process's name their
    /// task).
    Timeout,
    /// A worker process could not be started or failed its start-up handshake; also a pool
    /// of zero processes, and a [`Process`](crate::Process) joined before it was started or
    /// started twice.
    Spawn,
    /// A value could not be encoded or decoded, or a frame on the wire was malformed.
    Codec,
    /// The pool was closed or terminated before the work could run, or terminated (or
    /// dropped) while it ran; also a second [`Process::join`](crate::Process::join), whose
    /// outcome the first took.
    Closed,
    /// The other end of a channel is gone: every sender dropped, or the peer process died.
    Disconnected,
    /// An operating-system call failed.
    Io,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Panicked => "panicked",
            ErrorKind::Crashed => "crashed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Spawn => "spawn failed",
            ErrorKind::Codec => "codec error",
            ErrorKind::Closed => "closed",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Io => "i/o error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from multiproc: what kind it is, which task and item it concerns, and the details
/// a person needs to act (panic message and location, signal or exit code, the worker's last
/// lines of stderr).
///
/// # Examples
///
/// ```
/// use multiproc::{Error, ErrorKind};
///
/// fn report(err: &Error) -> String {
///     match err.kind() {
///         ErrorKind::Panicked => format!("bug in {}: {}", err.task().unwrap_or("?"), err.message()),
///         ErrorKind::Crashed => format!("worker died (signal {:?})", err.signal()),
///         _ => err.to_string(),
///     }
/// }
/// # let _ = report;
/// ```
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    task: Option<String>,
    index: Option<usize>,
    location: Option<String>,
    signal: Option<i32>,
    exit_code: Option<i32>,
    stderr_tail: Option<String>,
    backtrace: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind` with a specific, lowercase message.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                task: None,
                index: None,
                location: None,
                signal: None,
                exit_code: None,
                stderr_tail: None,
                backtrace: None,
                source: None,
            }),
        }
    }

    pub(crate) fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, context).with_source(err)
    }

    pub(crate) fn codec(context: impl Into<String>, err: postcard::Error) -> Self {
        Error::new(ErrorKind::Codec, context).with_source(err)
    }

    pub(crate) fn closed(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Closed, message)
    }

    pub(crate) fn wait_timeout(after: Duration) -> Self {
        Error::new(
            ErrorKind::Timeout,
            format!("the result was not ready within {after:?}; the work goes on"),
        )
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.inner.source = Some(Box::new(source));
        self
    }

    pub(crate) fn with_task(mut self, task: &str) -> Self {
        self.inner.task = Some(task.to_owned());
        self
    }

    pub(crate) fn with_index(mut self, index: usize) -> Self {
        self.inner.index = Some(index);
        self
    }

    /// This error's kind and message, as item `index` of `task`'s: one error that fails
    /// several items, each with its own copy.
    pub(crate) fn for_item(&self, task: &str, index: usize) -> Self {
        Error::new(self.kind(), self.message().to_owned())
            .with_task(task)
            .with_index(index)
    }

    pub(crate) fn with_location(mut self, location: Option<String>) -> Self {
        self.inner.location = location;
        self
    }

    pub(crate) fn with_status(mut self, signal: Option<i32>, exit_code: Option<i32>) -> Self {
        self.inner.signal = signal;
        self.inner.exit_code = exit_code;
        self
    }

    pub(crate) fn with_backtrace(mut self, backtrace: Option<String>) -> Self {
        self.inner.backtrace = backtrace;
        self
    }

    pub(crate) fn with_stderr_tail(mut self, tail: Option<String>) -> Self {
        self.inner.stderr_tail = tail;
        self
    }

    /// The category of this error.
    ///
    /// ```
    /// # use multiproc::{Error, ErrorKind};
    /// # fn check(err: Error) {
    /// if err.kind() == ErrorKind::Timeout { /* retry later */ }
    /// # }
    /// ```
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The registered name of the task this error concerns, if any.
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// println!("failing task: {}", err.task().unwrap_or("<none>"));
    /// # }
    /// ```
    pub fn task(&self) -> Option<&str> {
        self.inner.task.as_deref()
    }

    /// The position of the failing item in the input of `map`, `starmap` or `imap` (0 for
    /// `apply`'s one item). `None` for errors that concern no item, such as a wait's timeout
    /// or a call of no items on a closed pool.
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// if let Some(i) = err.index() { println!("item {i} failed"); }
    /// # }
    /// ```
    pub fn index(&self) -> Option<usize> {
        self.inner.index
    }

    /// The message of this error without its task, item or location context: for a panic,
    /// the panic's own message.
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// eprintln!("{}", err.message());
    /// # }
    /// ```
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// Where a task panicked, as `file:line:column`.
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// if let Some(at) = err.location() { println!("panicked at {at}"); }
    /// # }
    /// ```
    pub fn location(&self) -> Option<&str> {
        self.inner.location.as_deref()
    }

    /// The signal that killed the worker, for [`ErrorKind::Crashed`]. A timeout has none: the
    /// pool's own kill tells nothing about the task.
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// if err.signal() == Some(11) { println!("segmentation fault"); }
    /// # }
    /// ```
    pub fn signal(&self) -> Option<i32> {
        self.inner.signal
    }

    /// The worker's exit code, when it exited by itself in the middle of a task.
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// if let Some(code) = err.exit_code() { println!("worker exited with {code}"); }
    /// # }
    /// ```
    pub fn exit_code(&self) -> Option<i32> {
        self.inner.exit_code
    }

    /// The backtrace of a task's panic, captured in the worker when `RUST_BACKTRACE` (or
    /// `RUST_LIB_BACKTRACE`) enables it there. Not part of `Display`.
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// if let Some(trace) = err.backtrace() { eprintln!("{trace}"); }
    /// # }
    /// ```
    pub fn backtrace(&self) -> Option<&str> {
        self.inner.backtrace.as_deref()
    }

    /// The last lines the worker wrote to its stderr before it died, when they were captured
    /// (twelve at most; a backtrace's frames count as one line that says how many there
    /// were, so that the line before them, which says what went wrong, stays in).
    ///
    /// ```
    /// # fn check(err: multiproc::Error) {
    /// if let Some(tail) = err.stderr_tail() { eprintln!("worker said:\n{tail}"); }
    /// # }
    /// ```
    pub fn stderr_tail(&self) -> Option<&str> {
        self.inner.stderr_tail.as_deref()
    }
}

/// A signal number as its conventional name (`SIGSEGV`), for messages.
pub(crate) fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal).map_or_else(
        |_| format!("signal {signal}"),
        |sig| sig.as_str().to_owned(),
    )
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        if let Some(task) = &inner.task {
            write!(f, "task `{task}`")?;
            if let Some(index) = inner.index {
                write!(f, " (item {index})")?;
            }
            match inner.kind {
                ErrorKind::Panicked => {
                    f.write_str(" panicked")?;
                    if let Some(location) = &inner.location {
                        write!(f, " at {location}")?;
                    }
                    f.write_str(": ")?;
                }
                _ => f.write_str(": ")?,
            }
        }
        f.write_str(&inner.message)?;
        if let Some(signal) = inner.signal {
            write!(f, " (killed by {})", signal_name(signal))?;
        } else if let Some(code) = inner.exit_code {
            write!(f, " (exit code {code})")?;
        }
        if let Some(tail) = &inner.stderr_tail {
            write!(f, "; last lines of its stderr:\n{tail}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        let mut s = f.debug_struct("Error");
        s.field("kind", &inner.kind)
            .field("message", &inner.message);
        if let Some(task) = &inner.task {
            s.field("task", task);
        }
        if let Some(index) = inner.index {
            s.field("index", &index);
        }
        if let Some(location) = &inner.location {
            s.field("location", location);
        }
        if let Some(signal) = inner.signal {
            s.field("signal", &signal);
        }
        if let Some(code) = inner.exit_code {
            s.field("exit_code", &code);
        }
        if let Some(source) = &inner.source {
            s.field("source", source);
        }
        s.finish_non_exhaustive()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_task_item_location_and_message() {
        let err = Error::new(ErrorKind::Panicked, "boom")
            .with_task("demo::square")
            .with_index(3)
            .with_location(Some("src/main.rs:4:5".into()));
        assert_eq!(
            err.to_string(),
            "task `demo::square` (item 3) panicked at src/main.rs:4:5: boom"
        );
        assert_eq!(err.kind(), ErrorKind::Panicked);
    }

    #[test]
    fn display_names_signal() {
        let err = Error::new(ErrorKind::Crashed, "worker process died")
            .with_task("t")
            .with_status(Some(11), None);
        assert_eq!(
            err.to_string(),
            "task `t`: worker process died (killed by SIGSEGV)"
        );
    }

    #[test]
    fn is_send_sync_static_error() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<Error>();
    }
}
