//! [`Queue`]: a first-in, first-out queue shared by any number of producers and consumers
//! in any number of processes. Python's `multiprocessing.Queue`.
//!
//! A queue is one `SOCK_SEQPACKET` socket pair (see the `channel` module): producers send on
//! one end, consumers receive from the other, and every clone of the queue, in every
//! process, holds a descriptor of both ends. So a queue is never disconnected while any
//! clone lives: [`get`](Queue::get) waits for a producer however many have come and gone,
//! like Python's.
//!
//! Unlike Python's queue, it has no lock and no feeder thread: each message is one datagram
//! that the kernel delivers whole, to exactly one consumer. A producer or a consumer killed
//! in the middle of a message (even one of many megabytes) leaves the queue working for
//! everyone else; at worst the message it was receiving is lost. `put` hands the message to
//! the kernel before it returns, so a process may exit right after `put` without losing it.
//!
//! The price: the queue is bounded by the kernel's socket buffer (by default about 200 KiB:
//! a few hundred small messages, or two or three of many megabytes), and `put` blocks while
//! it is full, until a consumer takes messages out. Python's `put` never blocks (its feeder
//! thread buffers without bound). So start the consumers before putting many messages, and
//! take a producer's messages before (or while) joining it.

use crate::channel::{Endpoint, endpoint_pair};
use crate::error::Error;
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::task::Payload;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

/// A FIFO queue of values of type `T` shared between processes. Clone it, or pass it as a
/// task argument (to a [`Process`](crate::Process) or a [`Pool`](crate::Pool) task), and
/// [`put`](Queue::put) and [`get`](Queue::get) from anywhere.
///
/// Messages from one producer arrive in the order it put them; messages from several
/// producers interleave whole, never torn.
///
/// # Examples
///
/// ```
/// use multiproc::Queue;
///
/// let q: Queue<Vec<u8>> = Queue::new()?;
/// let q2 = q.clone();
/// q2.put(vec![1, 2, 3])?;
/// assert_eq!(q.get()?, vec![1, 2, 3]);
/// assert_eq!(q.try_get()?, None);
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// With a child process (`f` is a `#[multiproc::task]` that takes the queue and puts
/// `(42, None, "hello")`):
///
/// ```no_run
/// # use multiproc::{Process, Queue, task};
/// # type Message = (i32, Option<i32>, String);
/// # #[task]
/// # fn f(q: Queue<Message>) -> Result<(), String> {
/// #     q.put((42, None, "hello".to_owned())).map_err(|err| err.to_string())
/// # }
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let q = Queue::new()?;
/// let mut p = Process::spawn(f, (q.clone(),))?;
/// println!("{:?}", q.get()?); // (42, None, "hello")
/// p.join()??; // the child's own outcome, then the task's
/// # Ok(())
/// # }
/// ```
pub struct Queue<T> {
    /// Producers send on this end.
    put_end: Endpoint,
    /// Consumers receive on this one.
    get_end: Endpoint,
    _values: PhantomData<fn(T) -> T>,
}

impl<T: Payload> Queue<T> {
    /// Creates an empty queue.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] when the system cannot create a socket pair (out of descriptors).
    ///
    /// # Examples
    ///
    /// ```
    /// let q = multiproc::Queue::<String>::new()?;
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new() -> Result<Queue<T>, Error> {
        let (put_end, get_end) = endpoint_pair()?;
        Ok(Queue {
            put_end,
            get_end,
            _values: PhantomData,
        })
    }

    /// Puts `value` at the end of the queue, as one message. Blocks only while the queue's
    /// buffer (the kernel's socket buffer, about 200 KiB by default) is full, until a consumer
    /// takes messages out.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Codec`] when `value` cannot be encoded; [`ErrorKind::Io`] when the
    /// system refuses the message.
    ///
    /// # Examples
    ///
    /// ```
    /// let q = multiproc::Queue::new()?;
    /// q.put((42, None::<i32>, "hello".to_owned()))?;
    /// assert_eq!(q.get()?, (42, None, "hello".to_owned()));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[allow(
        clippy::needless_pass_by_value,
        reason = "the value moves to the consumer: channel handles in it close here once sent"
    )]
    pub fn put(&self, value: T) -> Result<(), Error> {
        self.put_end.send(&value)
    }

    /// Takes the message at the front of the queue, blocking until there is one.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Codec`] when a message cannot be decoded (it is then lost).
    ///
    /// # Examples
    ///
    /// ```
    /// let q = multiproc::Queue::new()?;
    /// q.put(1u8)?;
    /// q.put(2u8)?;
    /// assert_eq!((q.get()?, q.get()?), (1, 2));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get(&self) -> Result<T, Error> {
        self.get_end.recv()
    }

    /// Like [`get`](Self::get), but gives up after `timeout` with an error of kind
    /// [`ErrorKind::Timeout`]. Python's `get(timeout=...)`.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get), and [`ErrorKind::Timeout`] when the queue stayed empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let q = multiproc::Queue::<u8>::new()?;
    /// let err = q.get_timeout(Duration::from_millis(10)).unwrap_err();
    /// assert_eq!(err.kind(), multiproc::ErrorKind::Timeout);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, Error> {
        self.get_end
            .recv_timeout(timeout, "the queue stayed empty for")
    }

    /// Takes the message at the front of the queue if there is one, without blocking:
    /// `Ok(None)` when the queue is empty. Python's `get_nowait()`.
    ///
    /// # Errors
    ///
    /// As [`get`](Self::get).
    ///
    /// # Examples
    ///
    /// ```
    /// let q = multiproc::Queue::new()?;
    /// assert_eq!(q.try_get()?, None);
    /// q.put('x')?;
    /// assert_eq!(q.try_get()?, Some('x'));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_get(&self) -> Result<Option<T>, Error> {
        self.get_end.try_recv()
    }
}

impl<T> Queue<T> {
    /// A second handle to the same queue: both descriptors duplicated.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] when the process is out of descriptors.
    ///
    /// # Examples
    ///
    /// ```
    /// let q = multiproc::Queue::<u8>::new()?;
    /// let q2 = q.try_clone()?;
    /// q2.put(1)?;
    /// assert_eq!(q.get()?, 1);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_clone(&self) -> Result<Queue<T>, Error> {
        Ok(Queue {
            put_end: self.put_end.duplicate()?,
            get_end: self.get_end.duplicate()?,
            _values: PhantomData,
        })
    }
}

impl<T> Clone for Queue<T> {
    /// Duplicates the descriptors; see [`Queue::try_clone`] for a version that returns
    /// errors.
    ///
    /// # Panics
    ///
    /// When the process is out of descriptors.
    fn clone(&self) -> Self {
        self.try_clone()
            .unwrap_or_else(|err| panic!("cloning a queue: {err}"))
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("put_end", &self.put_end)
            .field("get_end", &self.get_end)
            .finish()
    }
}

/// Encodes both descriptors for the process the queue is sent to. Only possible as a task
/// argument or inside a channel message.
impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (&self.put_end, &self.get_end).serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (put_end, get_end) = <(Endpoint, Endpoint)>::deserialize(deserializer)?;
        Ok(Queue {
            put_end,
            get_end,
            _values: PhantomData,
        })
    }
}
