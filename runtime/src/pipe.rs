//! Pipes between processes: [`pipe`] (one way: a [`Sender`] and a [`Receiver`]) and
//! [`duplex`] (both ways: two [`Connection`]s). Python's `multiprocessing.Pipe`.
//!
//! Python's `Pipe()` is two-way unless called as `Pipe(duplex=False)`. Here the two kinds are
//! two functions, each typed: `pipe::<T>()` for values of type `T` flowing one way,
//! `duplex::<A, B>()` for `A` flowing one way and `B` the other.
//!
//! Every handle is a descriptor of one end of a socket pair (see the `channel` module for why
//! `SOCK_SEQPACKET`): cloning one duplicates the descriptor, and passing one as a task
//! argument (to a [`Process`](crate::Process) or a [`Pool`](crate::Pool) task) or inside a
//! message sends the descriptor to the other process. Any number of processes may send on
//! clones of one `Sender` and receive on clones of one `Receiver`: messages are never torn or
//! interleaved, and each goes to exactly one receiver.
//!
//! A `Receiver` holds no descriptor of the sending end, so it sees the end of the pipe: once
//! every `Sender` is dropped, in every process (a process that dies drops its handles), and
//! the messages sent before are received, `recv` returns an error of kind
//! [`Disconnected`](crate::ErrorKind::Disconnected) instead of blocking forever. Likewise
//! `send` once every `Receiver` is gone. A handle given to a [`Pool`](crate::Pool) task goes
//! to its worker, and the pool keeps no copy (unless the call has retries: then it keeps
//! one until the item's outcome is in, to send the item again if its worker dies).

use crate::channel::{Endpoint, endpoint_pair};
use crate::error::{Error, ErrorKind};
use crate::task::Payload;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

/// Creates a one-way pipe for values of type `T`: what the [`Sender`] sends, the
/// [`Receiver`] receives, in this process or in others that the handles are passed to.
///
/// Python's `Pipe(duplex=False)`; for Python's default two-way `Pipe()`, see [`duplex`].
///
/// # Errors
///
/// [`ErrorKind::Io`] when the system cannot create a socket pair (out of descriptors).
///
/// # Examples
///
/// ```
/// let (tx, rx) = multiproc::pipe::<(i32, Option<i32>, String)>()?;
/// tx.send((42, None, "hello".to_owned()))?;
/// assert_eq!(rx.recv()?, (42, None, "hello".to_owned()));
/// drop(tx);
/// assert_eq!(rx.recv().unwrap_err().kind(), multiproc::ErrorKind::Disconnected);
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// With a child process: the `Sender` goes to it as a task argument, and the parent's copy
/// closes once the child has started, so the pipe is disconnected when the child is done.
///
/// ```rust,standalone_crate
/// use multiproc::{pipe, task, ErrorKind, Process, Sender};
///
/// type Message = (i32, Option<i32>, String);
///
/// /// Errors cross the process boundary as values the parent can decode: a message here.
/// #[task]
/// fn produce(tx: Sender<Message>) -> Result<(), String> {
///     tx.send((42, None, "hello".to_owned()))
///         .map_err(|err| err.to_string())
/// }
///
/// #[multiproc::main]
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let (tx, rx) = pipe::<Message>()?;
///     let mut child = Process::spawn(produce, (tx,))?;
///     assert_eq!(rx.recv()?, (42, None, "hello".to_owned()));
///     child.join()??; // the child's own outcome, then the task's
///     assert_eq!(rx.recv().unwrap_err().kind(), ErrorKind::Disconnected);
///     Ok(())
/// }
/// ```
pub fn pipe<T: Payload>() -> Result<(Sender<T>, Receiver<T>), Error> {
    let (tx, rx) = endpoint_pair()?;
    Ok((
        Sender {
            end: tx,
            _values: PhantomData,
        },
        Receiver {
            end: rx,
            _values: PhantomData,
        },
    ))
}

/// Creates a two-way pipe: the left [`Connection`] sends `A` and receives `B`, the right one
/// sends `B` and receives `A`. Python's default `Pipe()` (`duplex=True`).
///
/// # Errors
///
/// [`ErrorKind::Io`] when the system cannot create a socket pair (out of descriptors).
///
/// # Examples
///
/// ```
/// let (left, right) = multiproc::duplex::<String, u64>()?;
/// left.send("ping".to_owned())?;
/// assert_eq!(right.recv()?, "ping");
/// right.send(4)?;
/// assert_eq!(left.recv()?, 4);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[allow(
    clippy::type_complexity,
    reason = "the pair of ends is the API, as for `pipe`"
)]
pub fn duplex<A: Payload, B: Payload>() -> Result<(Connection<A, B>, Connection<B, A>), Error> {
    let (left, right) = endpoint_pair()?;
    Ok((
        Connection {
            end: left,
            _values: PhantomData,
        },
        Connection {
            end: right,
            _values: PhantomData,
        },
    ))
}

/// The sending end of a [`pipe`]. Clone it to send from several threads or processes.
///
/// # Examples
///
/// ```
/// let (tx, rx) = multiproc::pipe::<u32>()?;
/// let tx2 = tx.clone();
/// tx.send(1)?;
/// tx2.send(2)?;
/// assert_eq!((rx.recv()?, rx.recv()?), (1, 2));
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Sender<T> {
    end: Endpoint,
    _values: PhantomData<fn(T)>,
}

impl<T: Payload> Sender<T> {
    /// Sends `value` as one message. It blocks only while the pipe's buffer (the kernel's
    /// socket buffer: a few hundred small messages, about 200 KiB) is full, until a receiver
    /// takes messages out. So a process that sends much must be read from while it runs:
    /// joining it before reading what it sent can wait forever, as in Python.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Disconnected`] when every [`Receiver`] of the pipe is dropped, in every
    /// process; [`ErrorKind::Codec`] when `value` cannot be encoded (its `Serialize` fails,
    /// it holds more channel handles than one message can carry, or it encodes to more
    /// than 1 GiB).
    ///
    /// # Examples
    ///
    /// ```
    /// let (tx, rx) = multiproc::pipe::<Vec<u8>>()?;
    /// tx.send(vec![0; 1 << 20])?; // large values travel whole, as one message
    /// assert_eq!(rx.recv()?.len(), 1 << 20);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[allow(
        clippy::needless_pass_by_value,
        reason = "the value moves to the receiver: channel handles in it close here once sent"
    )]
    pub fn send(&self, value: T) -> Result<(), Error> {
        self.end.send(&value)
    }
}

/// The receiving end of a [`pipe`]. Clone it to receive from several threads or processes:
/// each message goes to exactly one of them.
///
/// # Examples
///
/// ```
/// let (tx, rx) = multiproc::pipe::<String>()?;
/// tx.send("hello".to_owned())?;
/// assert_eq!(rx.recv()?, "hello");
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Receiver<T> {
    end: Endpoint,
    _values: PhantomData<fn() -> T>,
}

impl<T: Payload> Receiver<T> {
    /// Receives the next message, blocking until one arrives.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Disconnected`] once every [`Sender`] is dropped, in every process, and
    /// every message sent before was received; [`ErrorKind::Codec`] when a message cannot
    /// be decoded (it is then lost).
    ///
    /// # Examples
    ///
    /// ```
    /// let (tx, rx) = multiproc::pipe::<u8>()?;
    /// tx.send(7)?;
    /// drop(tx);
    /// assert_eq!(rx.recv()?, 7);
    /// assert!(rx.recv().is_err()); // disconnected: no sender left
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn recv(&self) -> Result<T, Error> {
        self.end.recv()
    }

    /// Like [`recv`](Self::recv), but gives up after `timeout` with an error of kind
    /// [`ErrorKind::Timeout`].
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv), and [`ErrorKind::Timeout`] when no message arrived in time.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let (_tx, rx) = multiproc::pipe::<u8>()?;
    /// let err = rx.recv_timeout(Duration::from_millis(10)).unwrap_err();
    /// assert_eq!(err.kind(), multiproc::ErrorKind::Timeout);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, Error> {
        self.end.recv_timeout(timeout, "no message arrived within")
    }

    /// Receives a message if one is waiting, without blocking: `Ok(None)` when none is.
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv).
    ///
    /// # Examples
    ///
    /// ```
    /// let (tx, rx) = multiproc::pipe::<u8>()?;
    /// assert_eq!(rx.try_recv()?, None);
    /// tx.send(1)?;
    /// assert_eq!(rx.try_recv()?, Some(1));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_recv(&self) -> Result<Option<T>, Error> {
        self.end.try_recv()
    }

    /// Iterates over the messages until the pipe is disconnected: each item is what
    /// [`recv`](Self::recv) returns, and the iteration ends (without an item) at
    /// [`ErrorKind::Disconnected`].
    ///
    /// # Examples
    ///
    /// ```
    /// let (tx, rx) = multiproc::pipe::<u32>()?;
    /// for i in 0..3 {
    ///     tx.send(i)?;
    /// }
    /// drop(tx);
    /// let all: Result<Vec<u32>, _> = rx.iter().collect();
    /// assert_eq!(all?, vec![0, 1, 2]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn iter(&self) -> Messages<'_, T> {
        Messages { receiver: self }
    }
}

impl<'a, T: Payload> IntoIterator for &'a Receiver<T> {
    type Item = Result<T, Error>;
    type IntoIter = Messages<'a, T>;

    fn into_iter(self) -> Messages<'a, T> {
        self.iter()
    }
}

/// The messages of a [`Receiver`] until it is disconnected; see [`Receiver::iter`].
///
/// # Examples
///
/// ```
/// let (tx, rx) = multiproc::pipe::<u32>()?;
/// tx.send(5)?;
/// drop(tx);
/// let mut messages: multiproc::Messages<'_, u32> = rx.iter();
/// assert_eq!(messages.next().transpose()?, Some(5));
/// assert!(messages.next().is_none());
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Debug)]
#[must_use = "an iterator does nothing unless iterated"]
pub struct Messages<'a, T> {
    receiver: &'a Receiver<T>,
}

impl<T: Payload> Iterator for Messages<'_, T> {
    type Item = Result<T, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.recv() {
            Err(err) if err.kind() == ErrorKind::Disconnected => None,
            other => Some(other),
        }
    }
}

/// One end of a [`duplex`] pipe: sends `S` to the other end and receives `R` from it. Clone
/// it to use it from several threads or processes.
///
/// # Examples
///
/// ```
/// let (left, right) = multiproc::duplex::<u32, String>()?;
/// left.send(3)?;
/// let n = right.recv()?;
/// right.send("x".repeat(n as usize))?;
/// assert_eq!(left.recv()?, "xxx");
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Connection<S, R> {
    end: Endpoint,
    _values: PhantomData<fn(S) -> R>,
}

impl<S: Payload, R: Payload> Connection<S, R> {
    /// Sends `value` to the other end, as one message; blocks only while the buffer is full.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Disconnected`] when every handle of the other end is dropped, in every
    /// process; [`ErrorKind::Codec`] when `value` cannot be encoded.
    ///
    /// # Examples
    ///
    /// ```
    /// let (left, right) = multiproc::duplex::<u8, u8>()?;
    /// drop(right);
    /// assert!(left.send(1).is_err()); // disconnected
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[allow(
        clippy::needless_pass_by_value,
        reason = "the value moves to the receiver: channel handles in it close here once sent"
    )]
    pub fn send(&self, value: S) -> Result<(), Error> {
        self.end.send(&value)
    }

    /// Receives the next message from the other end, blocking until one arrives.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Disconnected`] once every handle of the other end is dropped, in every
    /// process (a process that dies drops its handles), and the messages it sent were
    /// received; [`ErrorKind::Codec`] when a message cannot be decoded (it is then lost).
    ///
    /// # Examples
    ///
    /// ```
    /// let (left, right) = multiproc::duplex::<u8, u8>()?;
    /// right.send(9)?;
    /// assert_eq!(left.recv()?, 9);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn recv(&self) -> Result<R, Error> {
        self.end.recv()
    }

    /// Like [`recv`](Self::recv), but gives up after `timeout` with an error of kind
    /// [`ErrorKind::Timeout`].
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv), and [`ErrorKind::Timeout`] when no message arrived in time.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let (left, _right) = multiproc::duplex::<u8, u8>()?;
    /// assert!(left.recv_timeout(Duration::from_millis(10)).is_err());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn recv_timeout(&self, timeout: Duration) -> Result<R, Error> {
        self.end.recv_timeout(timeout, "no message arrived within")
    }

    /// Receives a message if one is waiting, without blocking: `Ok(None)` when none is.
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv).
    ///
    /// # Examples
    ///
    /// ```
    /// let (left, right) = multiproc::duplex::<u8, u8>()?;
    /// assert_eq!(left.try_recv()?, None);
    /// right.send(2)?;
    /// assert_eq!(left.try_recv()?, Some(2));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_recv(&self) -> Result<Option<R>, Error> {
        self.end.try_recv()
    }
}

/// `Clone`, `try_clone`, `Debug` and serde for a handle type made of one endpoint.
macro_rules! endpoint_handle {
    ($name:ident < $($param:ident),+ >, $example:literal) => {
        impl<$($param),+> $name<$($param),+> {
            /// A second handle to the same end: the descriptor duplicated.
            ///
            /// # Errors
            ///
            /// [`ErrorKind::Io`] when the process is out of descriptors.
            ///
            /// # Examples
            ///
            #[doc = $example]
            pub fn try_clone(&self) -> Result<Self, Error> {
                Ok($name {
                    end: self.end.duplicate()?,
                    _values: PhantomData,
                })
            }
        }

        impl<$($param),+> Clone for $name<$($param),+> {
            /// Duplicates the descriptor; see `try_clone` for a version that returns errors.
            ///
            /// # Panics
            ///
            /// When the process is out of descriptors.
            fn clone(&self) -> Self {
                self.try_clone()
                    .unwrap_or_else(|err| panic!("cloning a channel handle: {err}"))
            }
        }

        impl<$($param),+> fmt::Debug for $name<$($param),+> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.end).finish()
            }
        }

        /// Encodes the handle's descriptor for the process it is sent to. Only possible as a
        /// task argument or inside a channel message.
        impl<$($param),+> Serialize for $name<$($param),+> {
            fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
                self.end.serialize(serializer)
            }
        }

        impl<'de, $($param),+> Deserialize<'de> for $name<$($param),+> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                Endpoint::deserialize(deserializer).map(|end| $name {
                    end,
                    _values: PhantomData,
                })
            }
        }
    };
}

endpoint_handle!(
    Sender<T>,
    "```\nlet (tx, _rx) = multiproc::pipe::<u8>()?;\nlet tx2 = tx.try_clone()?;\n\
     tx2.send(1)?;\n# Ok::<(), multiproc::Error>(())\n```"
);
endpoint_handle!(
    Receiver<T>,
    "```\nlet (tx, rx) = multiproc::pipe::<u8>()?;\nlet rx2 = rx.try_clone()?;\n\
     tx.send(1)?;\nassert_eq!(rx2.recv()?, 1);\n# Ok::<(), multiproc::Error>(())\n```"
);
endpoint_handle!(
    Connection<S, R>,
    "```\nlet (left, right) = multiproc::duplex::<u8, u8>()?;\n\
     let left2 = left.try_clone()?;\nleft2.send(1)?;\nassert_eq!(right.recv()?, 1);\n\
     # Ok::<(), multiproc::Error>(())\n```"
);
