//! The transport under [`pipe`](fn@crate::pipe), [`duplex`](crate::duplex) and
//! [`Queue`](crate::Queue): one end of a Unix `SOCK_SEQPACKET` socket pair, and the format of
//! one message on it.
//!
//! # Why sequenced packets, and no locks
//!
//! Every message is one datagram. The kernel delivers a datagram whole or not at all, so:
//!
//! - messages from producers sending at the same time are never torn or interleaved, in
//!   any number of processes and threads;
//! - a producer that dies in the middle of a send leaves no half message behind;
//! - consumers in several processes may receive from the same end (each holds a duplicate of
//!   one descriptor), and each message goes to exactly one of them;
//! - a consumer that dies in the middle of a receive loses at most that message.
//!
//! There is no lock in user space, so no process can die holding one. Python's
//! `multiprocessing.Queue` guards its pipe with a lock shared between processes, and a
//! process killed while it holds that lock deadlocks every other user of the queue
//! (Python issue gh-96062); that cannot happen here. Sockets are never made non-blocking (the
//! flag would be shared by every process holding a duplicate): calls that must not block pass
//! `MSG_DONTWAIT` instead.
//!
//! # One message on the wire
//!
//! A value is encoded with postcard. Channel handles inside it (a `Sender` sent through a
//! `Queue`, say) are carried as descriptors (`SCM_RIGHTS`) by the same machinery as task
//! arguments (`fdpass`). The datagram is then one of:
//!
//! ```text
//! [0] [encoded value ...]                       descriptors: the handles in the value
//! [1] [u64 LE length] [padding ...]             descriptors: a memfd with the encoded
//!                                               value, then the handles in the value
//! ```
//!
//! Values that encode to more than [`INLINE_MAX`] bytes (64 KiB, well below the socket
//! buffer) travel in an anonymous in-memory file (`memfd_create`), whose descriptor rides in
//! the datagram: a value of any size is still one datagram. The datagram of such a message is
//! padded to 1/[`PAD_RATIO`] of the value's size (at most 64 KiB) so that it takes its share
//! of the socket buffer: a fast producer of large messages is held back after a few of them
//! instead of piling up memory files nobody has read yet.

use crate::codec;
use crate::error::{Error, ErrorKind};
use crate::fdpass;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, socketpair};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::Cell;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// Values that encode to at most this many bytes travel inside their datagram.
pub(crate) const INLINE_MAX: usize = 64 * 1024;
/// The datagram that announces a value in a memory file is padded to this fraction of the
/// value's size, for back-pressure.
pub(crate) const PAD_RATIO: usize = 32;

const INLINE: u8 = 0;
const IN_FILE: u8 = 1;
/// Tag and length of a message whose value is in a memory file.
const FILE_HEADER: usize = 1 + 8;
/// The largest value a channel carries, encoded: as large as a pool's frames may be by
/// default. The sender refuses a larger one; the receiver checks the length a message
/// claims against it before it allocates (a forged message could claim any length).
pub(crate) const MAX_MESSAGE: usize = crate::protocol::DEFAULT_MAX_FRAME_LEN as usize;

/// One end of a `SOCK_SEQPACKET` socket pair. Duplicates (in this or other processes) share
/// the socket.
#[derive(Debug)]
pub(crate) struct Endpoint {
    fd: OwnedFd,
}

/// A connected pair of endpoints: what one end sends, the other receives.
pub(crate) fn endpoint_pair() -> Result<(Endpoint, Endpoint), Error> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|err| Error::io("creating a channel (a socket pair) failed", err.into()))?;
    Ok((Endpoint { fd: a }, Endpoint { fd: b }))
}

impl Endpoint {
    /// A second descriptor of the same socket.
    pub(crate) fn duplicate(&self) -> Result<Endpoint, Error> {
        self.fd
            .try_clone()
            .map(|fd| Endpoint { fd })
            .map_err(|err| Error::io("duplicating a channel descriptor failed", err))
    }

    /// Sends `value` as one message, blocking while the socket buffer is full.
    ///
    /// `Disconnected` when no descriptor of the other end is open any more, in any process.
    pub(crate) fn send<T: Serialize + 'static>(&self, value: &T) -> Result<(), Error> {
        let mut datagram = vec![INLINE];
        let (encoded, handles) = fdpass::collect(|| codec::encode_value(value, &mut datagram));
        encoded.map_err(|err| {
            fdpass::encode_error(
                format!(
                    "a message of type `{}` could not be encoded",
                    std::any::type_name::<T>()
                ),
                err,
            )
        })?;
        let len = datagram.len() - 1;
        if len <= INLINE_MAX {
            return self.send_datagram(&datagram, &handles);
        }
        if len > MAX_MESSAGE {
            return Err(Error::new(
                ErrorKind::Codec,
                format!(
                    "a message of type `{}` encodes to {len} bytes, more than the {MAX_MESSAGE} \
                     a channel carries",
                    std::any::type_name::<T>()
                ),
            ));
        }
        // Checked before the file is written: the file takes one of the descriptors.
        if handles.len() >= fdpass::MAX_FDS {
            return Err(Error::new(
                ErrorKind::Codec,
                format!(
                    "a message larger than {INLINE_MAX} bytes can carry at most {} channel \
                     handles",
                    fdpass::MAX_FDS - 1
                ),
            ));
        }
        let file = write_memory_file(&datagram[1..])?;
        let padding = (len / PAD_RATIO).min(INLINE_MAX - FILE_HEADER);
        datagram.clear();
        datagram.push(IN_FILE);
        datagram.extend_from_slice(&(len as u64).to_le_bytes());
        datagram.resize(FILE_HEADER + padding, 0);
        let mut fds = Vec::with_capacity(1 + handles.len());
        fds.push(file);
        fds.extend(handles);
        self.send_datagram(&datagram, &fds)
    }

    fn send_datagram(&self, datagram: &[u8], fds: &[OwnedFd]) -> Result<(), Error> {
        match fdpass::send_with(self.fd.as_fd(), datagram, fds, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => Ok(()),
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => Err(Error::new(
                ErrorKind::Disconnected,
                "every receiving end of the channel is closed, in every process",
            )),
            Err(err) => Err(Error::io("sending a message failed", err.into())),
        }
    }

    /// Receives one message, blocking until there is one.
    ///
    /// `Disconnected` when no descriptor of the other end is open any more, in any process,
    /// and every message sent before has been received.
    pub(crate) fn recv<T: DeserializeOwned + 'static>(&self) -> Result<T, Error> {
        loop {
            if let Some(value) = self.recv_now(MsgFlags::empty())? {
                return Ok(value);
            }
            // Only if something made the shared socket non-blocking: wait, then try again.
            self.wait_readable(None)?;
        }
    }

    /// Receives one message, waiting until `deadline` at the latest: `Ok(None)` when it
    /// passed first. A deadline already past receives a waiting message without blocking.
    pub(crate) fn recv_until<T: DeserializeOwned + 'static>(
        &self,
        deadline: Instant,
    ) -> Result<Option<T>, Error> {
        loop {
            // Another consumer may take the message that woke us: then wait again.
            if let Some(value) = self.recv_now(MsgFlags::MSG_DONTWAIT)? {
                return Ok(Some(value));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // A wait longer than `poll` takes (about 24 days) comes back early: the loop
            // waits again for what is left.
            self.wait_readable(Some(left))?;
        }
    }

    /// Receives one message within `timeout` from now (however large); when none arrived,
    /// an error of kind `Timeout` that says `nothing` (what did not happen) and how long.
    pub(crate) fn recv_timeout<T: DeserializeOwned + 'static>(
        &self,
        timeout: Duration,
        nothing: &str,
    ) -> Result<T, Error> {
        let received = match Instant::now().checked_add(timeout) {
            Some(deadline) => self.recv_until(deadline)?,
            None => Some(self.recv()?),
        };
        received.ok_or_else(|| Error::new(ErrorKind::Timeout, format!("{nothing} {timeout:?}")))
    }

    /// Receives a message if one is waiting, without blocking: `Ok(None)` when none is.
    pub(crate) fn try_recv<T: DeserializeOwned + 'static>(&self) -> Result<Option<T>, Error> {
        self.recv_until(Instant::now())
    }

    /// True when a message (or the end of the channel) is ready within `timeout` (`None`:
    /// no limit).
    fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, Error> {
        let timeout = match timeout {
            // Round up, so that a wait never returns just before its deadline.
            Some(timeout) => crate::status::poll_timeout(timeout),
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(n) => Ok(n > 0),
            Err(Errno::EINTR) => Ok(true),
            Err(err) => Err(Error::io("waiting for a message failed", err.into())),
        }
    }

    /// Whether the other end is closed, in every process (the socket reports a hang-up).
    fn hung_up(&self) -> bool {
        // The last close of the other end shuts this end down both ways: `POLLHUP`.
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1..))
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLHUP))
    }

    /// How many bytes the messages queued at this end hold (`SIOCINQ`, which sums them on
    /// a seqpacket socket); 0 where it cannot tell.
    fn queued_bytes(&self) -> usize {
        let mut queued: nix::libc::c_int = 0;
        // SAFETY: FIONREAD (SIOCINQ) writes one int to the address given.
        let got = unsafe {
            nix::libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                nix::libc::FIONREAD,
                &raw mut queued,
            )
        };
        if got == 0 {
            usize::try_from(queued).unwrap_or(0)
        } else {
            0
        }
    }

    /// One `recvmsg`, blocking unless `flags` has `MSG_DONTWAIT`; `Ok(None)` when it would
    /// block.
    fn recv_now<T: DeserializeOwned + 'static>(&self, flags: MsgFlags) -> Result<Option<T>, Error> {
        let mut buf = ReceiveBuffer::take();
        let received = match fdpass::recv_with(self.fd.as_fd(), buf.bytes(), flags) {
            Ok(received) => received,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::ECONNRESET | Errno::ENOTCONN) => return Err(disconnected()),
            Err(err) => return Err(Error::io("receiving a message failed", err.into())),
        };
        if received.bytes == 0 {
            // Every message is at least its tag byte: an empty read is the end of the channel,
            // or an empty datagram that something else wrote (the channel goes on then, to
            // the messages still queued behind it even if every sender has closed since).
            return Err(if self.hung_up() && self.queued_bytes() == 0 {
                disconnected()
            } else {
                malformed()
            });
        }
        if received
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        {
            return Err(Error::new(
                ErrorKind::Codec,
                "a message on the channel was larger than any this library sends, and was \
                 discarded",
            ));
        }
        let datagram = &buf.bytes()[..received.bytes];
        let mut fds = received.fds;
        let decoded = match datagram[0] {
            INLINE => decode::<T>(&datagram[1..], fds),
            IN_FILE => {
                let len = datagram
                    .get(1..FILE_HEADER)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map(u64::from_le_bytes);
                if len.is_none() || fds.is_empty() {
                    return Err(malformed());
                }
                let file = fds.remove(0);
                let payload = read_memory_file(file, len.unwrap_or_default())?;
                decode::<T>(&payload, fds)
            }
            _ => return Err(malformed()),
        };
        decoded.map(Some)
    }
}

/// Decodes a value, handing it the descriptors of the handles it contains. The value must
/// take the whole payload: bytes left over mean the message is not what was sent.
fn decode<T: DeserializeOwned + 'static>(payload: &[u8], fds: Vec<OwnedFd>) -> Result<T, Error> {
    fdpass::supply(fds, || codec::decode_value::<T>(payload))
        .and_then(|(value, rest)| {
            if rest.is_empty() {
                Ok(value)
            } else {
                Err(postcard::Error::DeserializeBadEncoding)
            }
        })
        .map_err(|err| {
            Error::codec(
                format!(
                    "a message could not be decoded as `{}`",
                    std::any::type_name::<T>()
                ),
                err,
            )
        })
}

fn write_memory_file(bytes: &[u8]) -> Result<OwnedFd, Error> {
    let fd = crate::status::anonymous_file(c"multiproc-message")
        .map_err(|err| Error::io("creating a memory file for a large message failed", err))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)
        .map_err(|err| Error::io("writing a large message to its memory file failed", err))?;
    Ok(file.into())
}

fn read_memory_file(fd: OwnedFd, len: u64) -> Result<Vec<u8>, Error> {
    let file = std::fs::File::from(fd);
    let size = file
        .metadata()
        .map_err(|err| Error::io("reading a large message failed", err))?
        .len();
    // The length comes from the datagram, and the file's size from the sender: check both
    // against what a channel carries before allocating, and allocate without aborting.
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= MAX_MESSAGE && len as u64 <= size)
        .ok_or_else(malformed)?;
    let mut payload = Vec::new();
    payload.try_reserve_exact(len).map_err(|_| {
        Error::new(
            ErrorKind::Codec,
            format!("no memory for a message of {len} bytes"),
        )
    })?;
    payload.resize(len, 0);
    // At offset 0: the sender's writes moved the offset these duplicates share.
    file.read_exact_at(&mut payload, 0)
        .map_err(|err| Error::io("reading a large message failed", err))?;
    Ok(payload)
}

fn disconnected() -> Error {
    Error::new(
        ErrorKind::Disconnected,
        "every sending end of the channel is closed, in every process, and no message is left",
    )
}

fn malformed() -> Error {
    Error::new(
        ErrorKind::Codec,
        "a message on the channel is malformed (was something other than this library \
         writing to it?)",
    )
}

/// A per-thread buffer that holds the largest datagram, allocated once per thread. It is
/// taken out while in use, so a value's `Deserialize` that receives from another channel
/// gets a buffer of its own instead of a borrow conflict.
struct ReceiveBuffer(Vec<u8>);

thread_local! {
    static RECEIVE_BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl ReceiveBuffer {
    fn take() -> ReceiveBuffer {
        let mut buf = RECEIVE_BUFFER.take();
        buf.resize(1 + INLINE_MAX, 0);
        ReceiveBuffer(buf)
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for ReceiveBuffer {
    fn drop(&mut self) {
        RECEIVE_BUFFER.set(std::mem::take(&mut self.0));
    }
}

/// `Serialize` of a handle: its descriptor, attached to the message being encoded.
pub(crate) fn serialize_fd<S: Serializer>(
    fd: BorrowedFd<'_>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let index = fdpass::attach(fd).map_err(serde::ser::Error::custom)?;
    serializer.serialize_u32(index)
}

/// `Deserialize` of a handle: its descriptor, taken from the message being decoded.
pub(crate) fn deserialize_fd<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<OwnedFd, D::Error> {
    let index = u32::deserialize(deserializer)?;
    fdpass::take(index).map_err(serde::de::Error::custom)
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_fd(self.fd.as_fd(), serializer)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_fd(deserializer).map(|fd| Endpoint { fd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_values_round_trip() {
        let (a, b) = endpoint_pair().unwrap();
        a.send(&(1u32, "one".to_owned())).unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        std::thread::scope(|scope| {
            scope.spawn(|| a.send(&big).unwrap());
            let first: (u32, String) = b.recv().unwrap();
            assert_eq!(first, (1, "one".to_owned()));
            let second: Vec<u8> = b.recv().unwrap();
            assert_eq!(second, big);
        });
    }

    #[test]
    fn closing_the_other_end_disconnects_after_the_queued_messages() {
        let (a, b) = endpoint_pair().unwrap();
        a.send(&7u8).unwrap();
        drop(a);
        assert_eq!(b.recv::<u8>().unwrap(), 7);
        assert_eq!(b.recv::<u8>().unwrap_err().kind(), ErrorKind::Disconnected);
        let (a, b) = endpoint_pair().unwrap();
        drop(b);
        assert_eq!(a.send(&1u8).unwrap_err().kind(), ErrorKind::Disconnected);
    }

    #[test]
    fn a_deadline_that_passes_is_none() {
        let (_a, b) = endpoint_pair().unwrap();
        assert!(b.recv_until::<u8>(Instant::now()).unwrap().is_none());
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(b.recv_until::<u8>(soon).unwrap().is_none());
        assert!(Instant::now() >= soon);
    }

    #[test]
    fn a_value_of_the_wrong_type_is_a_codec_error() {
        let (a, b) = endpoint_pair().unwrap();
        a.send(&()).unwrap();
        let err = b.recv::<u64>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    }

    #[test]
    fn too_many_handles_in_a_message_is_a_codec_error_that_says_so() {
        let (a, _b) = endpoint_pair().unwrap();
        let (c, _d) = endpoint_pair().unwrap();
        let many: Vec<Endpoint> = (0..=fdpass::MAX_FDS)
            .map(|_| c.duplicate().unwrap())
            .collect();
        let err = a.send(&many).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(err.to_string().contains("at most 253"), "{err}");
    }

    /// What another writer could put on the socket: raw bytes, descriptors riding along.
    fn forge(end: &Endpoint, bytes: &[u8], fds: &[OwnedFd]) {
        fdpass::send_with(end.fd.as_fd(), bytes, fds, MsgFlags::MSG_NOSIGNAL).unwrap();
    }

    #[test]
    fn forged_messages_are_codec_errors_and_the_channel_goes_on() {
        let (a, b) = endpoint_pair().unwrap();
        // A memory file that claims 1 TiB, and (sparse) is that large: refused before any
        // allocation, as one that claims more than its size is.
        let huge = crate::status::anonymous_file(c"forged").unwrap();
        nix::unistd::ftruncate(&huge, 1 << 40).unwrap();
        let mut header = vec![IN_FILE];
        header.extend_from_slice(&(1u64 << 40).to_le_bytes());
        forge(&a, &header, &[huge]);
        // An empty datagram, while the other end is open: not the end of the channel.
        forge(&a, &[], &[]);
        // A value with bytes left over.
        forge(&a, &[INLINE, 5, 6], &[]);
        a.send(&7u8).unwrap();
        for forged in ["a 1 TiB file", "an empty datagram", "bytes left over"] {
            let err = b.recv::<u8>().expect_err(forged);
            assert_eq!(err.kind(), ErrorKind::Codec, "{forged}: {err}");
        }
        assert_eq!(b.recv::<u8>().unwrap(), 7);
        drop(a);
        assert_eq!(b.recv::<u8>().unwrap_err().kind(), ErrorKind::Disconnected);
    }

    /// An empty datagram, then a message, then the writer closes: the message still comes
    /// out before the end (the empty read, with the other end closed, was taken for it).
    #[test]
    fn an_empty_datagram_before_the_end_hides_no_message() {
        let (a, b) = endpoint_pair().unwrap();
        forge(&a, &[], &[]);
        a.send(&7u8).unwrap();
        drop(a);
        let err = b.recv::<u8>().expect_err("an empty datagram");
        assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
        assert_eq!(b.recv::<u8>().unwrap(), 7);
        assert_eq!(b.recv::<u8>().unwrap_err().kind(), ErrorKind::Disconnected);
    }

    #[test]
    fn endpoints_travel_inside_messages() {
        let (a, b) = endpoint_pair().unwrap();
        let (inner_a, inner_b) = endpoint_pair().unwrap();
        a.send(&inner_a).unwrap();
        drop(inner_a);
        let received: Endpoint = b.recv().unwrap();
        received.send(&5u16).unwrap();
        assert_eq!(inner_b.recv::<u16>().unwrap(), 5);
        drop(received);
        assert_eq!(
            inner_b.recv::<u16>().unwrap_err().kind(),
            ErrorKind::Disconnected
        );
    }
}
