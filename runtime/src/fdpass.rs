//! Carrying file descriptors inside serialized values: how a channel handle (`Sender`,
//! `Receiver`, `Connection`, `Queue`) given as a task argument reaches the worker.
//!
//! While the parent encodes a chunk, [`collect`] is active: a handle's `Serialize` calls
//! [`attach`], which duplicates its descriptor into a thread-local list and returns the
//! index it encodes. The chunk then travels as a `Descriptors` frame that carries those
//! descriptors (`SCM_RIGHTS` on the Unix socket) followed by its `Run` frame. The worker
//! decodes the arguments inside [`supply`], where a handle's `Deserialize` calls [`take`]
//! with its index. A channel message is encoded and decoded inside the same scopes (see
//! `channel`), so handles also travel inside messages. Outside these scopes, attaching or
//! taking is an error that says where handles can travel.

use crate::error::{Error, ErrorKind};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use std::cell::RefCell;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::thread::LocalKey;

/// The most descriptors one message can carry (Linux's `SCM_MAX_FD`).
pub(crate) const MAX_FDS: usize = 253;

thread_local! {
    static OUTGOING: RefCell<Option<Vec<OwnedFd>>> = const { RefCell::new(None) };
    static INCOMING: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
    /// Why the last handle that refused to be encoded refused: postcard keeps no message
    /// for a custom serialization error, so the encoder's caller reads it here.
    static REFUSAL: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Room for the control message of a receive, kept for the next one: a worker receives
    /// on every read.
    static CONTROL: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` (an encoding) with descriptor collection on; returns what it attached.
pub(crate) fn collect<R>(f: impl FnOnce() -> R) -> (R, Vec<OwnedFd>) {
    REFUSAL.take();
    let scope = Scope::enter(&OUTGOING, Vec::new());
    let result = f();
    (result, scope.leave().unwrap_or_default())
}

/// Runs `f` (a decoding) with `fds` available to [`take`] by index.
pub(crate) fn supply<R>(fds: Vec<OwnedFd>, f: impl FnOnce() -> R) -> R {
    let scope = Scope::enter(&INCOMING, fds.into_iter().map(Some).collect());
    let result = f();
    drop(scope.leave());
    result
}

/// A thread-local list set for the length of a scope; what it replaced is put back as the
/// scope ends, also when a `Serialize` or `Deserialize` inside panics (else handles would
/// go on being collected, or taken, outside any message on that thread).
struct Scope<T: 'static> {
    key: &'static LocalKey<RefCell<Option<T>>>,
    /// What the scope replaced.
    outer: Option<T>,
    ended: bool,
}

impl<T: 'static> Scope<T> {
    fn enter(key: &'static LocalKey<RefCell<Option<T>>>, value: T) -> Scope<T> {
        let outer = key.replace(Some(value));
        Scope {
            key,
            outer,
            ended: false,
        }
    }

    /// Ends the scope: the list it set, as it is now.
    fn leave(mut self) -> Option<T> {
        self.ended = true;
        self.key.replace(self.outer.take())
    }
}

impl<T: 'static> Drop for Scope<T> {
    fn drop(&mut self) {
        if !self.ended {
            self.key.replace(self.outer.take());
        }
    }
}

/// Serialize side of a handle: duplicates `fd` into the message being encoded and returns
/// its index there.
///
/// # Errors
///
/// When no message that can carry descriptors is being encoded.
// Callers: the channel handles' Serialize impls.
pub(crate) fn attach(fd: BorrowedFd<'_>) -> Result<u32, String> {
    let attached = OUTGOING.with_borrow_mut(|outgoing| {
        let Some(list) = outgoing else {
            return Err(
                "a channel handle can only be sent as an argument of a task (Pool or Process) \
                 or inside a message on a channel; it cannot be encoded anywhere else"
                    .to_owned(),
            );
        };
        if list.len() >= MAX_FDS {
            return Err(format!(
                "one message (a chunk of task arguments, or a channel message) can carry at \
                 most {MAX_FDS} channel handles"
            ));
        }
        let dup = fd
            .try_clone_to_owned()
            .map_err(|err| format!("duplicating a descriptor failed: {err}"))?;
        list.push(dup);
        Ok(u32::try_from(list.len() - 1).expect("below MAX_FDS"))
    });
    if let Err(reason) = &attached {
        REFUSAL.set(Some(reason.clone()));
    }
    attached
}

/// The error of an encoding that failed: with the reason a channel handle gave when one
/// refused to be encoded (postcard's own error says only "Serde Serialization Error").
pub(crate) fn encode_error(context: String, err: postcard::Error) -> Error {
    match REFUSAL.take() {
        Some(reason) => Error::new(ErrorKind::Codec, format!("{context}: {reason}")),
        None => Error::codec(context, err),
    }
}

/// Forgets the reason of an earlier refusal that nobody read (a task that encoded a handle
/// with a serializer of its own, say): called before an encoding whose failure
/// [`refusal_or`] explains, so that it cannot quote a stale reason.
pub(crate) fn forget_refusal() {
    REFUSAL.take();
}

/// Why an encoding failed, as text: the reason a channel handle gave when one refused,
/// else the codec's error.
pub(crate) fn refusal_or(err: &postcard::Error) -> String {
    REFUSAL.take().unwrap_or_else(|| err.to_string())
}

/// Deserialize side of a handle: the descriptor sent at `index`, once.
///
/// # Errors
///
/// Outside a decoding that received descriptors, or for an index that is missing or taken.
// Callers: the channel handles' Deserialize impls.
pub(crate) fn take(index: u32) -> Result<OwnedFd, String> {
    INCOMING.with_borrow_mut(|incoming| {
        let list = incoming.as_mut().ok_or(
            "a channel handle can only be decoded from a task's arguments or a channel message",
        )?;
        list.get_mut(index as usize)
            .and_then(Option::take)
            .ok_or_else(|| format!("channel handle {index} is missing from the message"))
    })
}

/// Sends `bytes` on the Unix socket `socket`, with `fds` riding along (`SCM_RIGHTS`) when
/// there are any. Returns the bytes sent, like `send(2)`; the descriptors travel with the
/// first byte. A call interrupted by a signal is made again.
pub(crate) fn send_with(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[impl AsRawFd],
    flags: MsgFlags,
) -> nix::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    send_gathered(socket, &[IoSlice::new(bytes)], &raw, flags)
}

/// [`send_with`] for bytes gathered from several slices.
pub(crate) fn send_gathered(
    socket: BorrowedFd<'_>,
    slices: &[IoSlice<'_>],
    fds: &[RawFd],
    flags: MsgFlags,
) -> nix::Result<usize> {
    let control = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &control };
    loop {
        match sendmsg::<()>(socket.as_raw_fd(), slices, control, flags, None) {
            Err(nix::errno::Errno::EINTR) => {}
            sent => return sent,
        }
    }
}

/// What [`recv_with`] received.
pub(crate) struct Received {
    /// Bytes written to the buffer.
    pub bytes: usize,
    /// The message's flags: `MSG_TRUNC` or `MSG_CTRUNC` mean part of it was lost.
    pub flags: MsgFlags,
    /// Descriptors that came with it, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Receives into `buf` from the Unix socket `socket` with `recvmsg`, keeping any descriptors
/// that arrive with the bytes (`SCM_RIGHTS`, up to [`MAX_FDS`]). A call interrupted by a
/// signal is made again.
pub(crate) fn recv_with(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> nix::Result<Received> {
    let mut space = CONTROL.take();
    if space.is_empty() {
        space = nix::cmsg_space!([RawFd; MAX_FDS]);
    }
    let received = receive_into(socket, buf, flags, &mut space);
    CONTROL.set(space);
    received
}

#[allow(
    clippy::ptr_arg,
    reason = "nix's `recvmsg` takes the control buffer as a `Vec`"
)]
fn receive_into(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
    space: &mut Vec<u8>,
) -> nix::Result<Received> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(space),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => {}
            received => break received?,
        }
    };
    let mut fds = Vec::new();
    for control in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = control {
            // SAFETY: the kernel installed these descriptors in our table for this message;
            // nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(Received {
        bytes: msg.bytes,
        flags: msg.flags,
        fds,
    })
}

/// Duplicates every descriptor (for a chunk that must be sent again).
pub(crate) fn duplicate(fds: &[OwnedFd]) -> std::io::Result<Vec<OwnedFd>> {
    fds.iter()
        .map(|fd| fd.as_fd().try_clone_to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_a_scope_ends_it() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let panicked = std::panic::catch_unwind(|| {
            collect(|| {
                attach(r.as_fd()).unwrap();
                panic!("a Serialize that panics");
            })
        });
        assert!(panicked.is_err());
        assert!(
            attach(r.as_fd()).is_err(),
            "collection ended with the panic"
        );
        let panicked = std::panic::catch_unwind(|| supply(Vec::new(), || panic!("in Deserialize")));
        assert!(panicked.is_err());
        assert!(take(0).unwrap_err().contains("can only be decoded"));
    }

    #[test]
    fn attach_outside_collect_is_an_error() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(
            attach(r.as_fd())
                .unwrap_err()
                .contains("argument of a task")
        );
    }

    #[test]
    fn a_refusal_reaches_the_encoding_error_once() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(attach(r.as_fd()).is_err());
        let err = encode_error("ctx".to_owned(), postcard::Error::SerdeSerCustom);
        assert!(
            err.to_string()
                .starts_with("ctx: a channel handle can only be sent"),
            "{err}"
        );
        let err = encode_error("ctx".to_owned(), postcard::Error::SerdeSerCustom);
        assert_eq!(err.to_string(), "ctx", "taken once");
        assert!(attach(r.as_fd()).is_err());
        let _ = collect(|| ());
        assert_eq!(
            refusal_or(&postcard::Error::SerdeSerCustom),
            "Serde Serialization Error"
        );
    }

    #[test]
    fn descriptors_round_trip_by_index() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (indices, fds) = collect(|| (attach(r.as_fd()).unwrap(), attach(w.as_fd()).unwrap()));
        assert_eq!(indices, (0, 1));
        assert_eq!(fds.len(), 2);
        supply(fds, || {
            assert!(take(1).is_ok());
            assert!(take(1).is_err(), "taken once");
            assert!(take(0).is_ok());
            assert!(take(2).is_err());
        });
        assert!(take(0).is_err(), "outside supply");
    }
}
