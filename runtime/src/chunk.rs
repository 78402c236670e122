//! Splitting input into chunks and encoding them as `Run` frames.

use crate::codec;
use crate::error::{Error, ErrorKind};
use crate::protocol::{self, Header};
use crate::sched::{CallSink, Chunk, Shared, SkipArgs};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// How many items go into one chunk (one message to a worker).
///
/// # Examples
///
/// ```
/// use multiproc::Chunking;
///
/// assert_eq!(Chunking::default(), Chunking::Auto);
/// let fixed = Chunking::Fixed(64);
/// # let _ = fixed;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Chunking {
    /// Chosen by the pool. For an input of known length (`map`, `starmap`):
    /// `ceil(len / (4 × workers))`, Python's rule, so each worker gets about four chunks and
    /// the last ones balance the load. For a stream (`imap`): starts at one item and adapts
    /// to the measured time per item, aiming at chunks of a few milliseconds.
    ///
    /// In both cases a chunk also stops at about 1 MiB of encoded arguments, measured on the
    /// chunks already sent (a `map` sends its first item alone to measure it): batching
    /// saves a fixed cost per message, which large items dwarf, while a large chunk delays
    /// its first result and needs as much memory again to travel. Items of 1 MiB or more go
    /// one per chunk.
    #[default]
    Auto,
    /// Exactly this many items per chunk (the last one may hold fewer). `Fixed(0)` acts as 1.
    Fixed(usize),
}

impl Chunking {
    /// The chunk size for an input of `len` items on `workers` workers, before any item has
    /// been measured.
    pub(crate) fn for_len(self, len: usize, workers: usize) -> usize {
        match self {
            Chunking::Fixed(size) => size.max(1),
            Chunking::Auto => len.div_ceil(4 * workers.max(1)).max(1),
        }
    }
}

/// Under [`Chunking::Auto`], the encoded arguments a chunk aims not to exceed (see there).
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

/// The most items of `item_bytes` encoded bytes each that fit [`CHUNK_BYTES`]; at least one.
pub(crate) fn byte_cap(item_bytes: usize) -> usize {
    (CHUNK_BYTES / item_bytes.max(1)).max(1)
}

/// How a call encodes its chunks.
#[derive(Clone, Copy)]
pub(crate) struct ChunkSpec {
    pub task: u32,
    pub timeout: Option<Duration>,
    pub retries: u32,
    pub max_frame_len: u32,
    pub skip: SkipArgs,
}

/// [`SkipArgs`] for argument tuples of type `A`. It decodes them with the user's
/// `Deserialize`, which may panic: that is `None` too, never an unwind into the pool.
pub(crate) fn skip_args<A: DeserializeOwned + 'static>(payload: &[u8], n: u32) -> Option<usize> {
    std::panic::catch_unwind(|| {
        let mut rest = payload;
        for _ in 0..n {
            rest = codec::decode_value::<A>(rest).ok()?.1;
        }
        Some(payload.len() - rest.len())
    })
    .ok()
    .flatten()
}

/// A `Run` frame, its arguments, and the descriptors of the channel handles among them.
pub(crate) struct RunFrame {
    pub frame: Vec<u8>,
    /// Where the arguments start in `frame`.
    pub payload_at: usize,
    pub fds: Vec<OwnedFd>,
}

/// Builds a `Run` frame for `header` of at most `max_len` bytes: `encode` writes the
/// arguments straight into it (its error says what could not be encoded: see
/// [`fdpass::encode_error`](crate::fdpass::encode_error)), collecting the descriptors of any
/// channel handles among them; only then, and only if there are some, a `Descriptors` frame
/// is put in front (one copy, in that rare case alone).
pub(crate) fn run_frame(
    header: &Header,
    capacity: usize,
    max_len: u32,
    encode: impl FnOnce(&mut Vec<u8>) -> Result<(), Error>,
) -> Result<RunFrame, Error> {
    let mut frame = Vec::with_capacity(capacity);
    let mut start = protocol::begin_frame(&mut frame, header);
    let mut payload_at = frame.len();
    let (encoded, fds) = crate::fdpass::collect(|| encode(&mut frame));
    encoded?;
    if !fds.is_empty() {
        let mut with_fds = Vec::with_capacity(16 + frame.len());
        protocol::descriptors_frame(&mut with_fds, fds.len());
        let shift = with_fds.len();
        with_fds.extend_from_slice(&frame);
        frame = with_fds;
        start += shift;
        payload_at += shift;
    }
    protocol::end_frame(&mut frame, start, max_len)?;
    Ok(RunFrame {
        frame,
        payload_at,
        fds,
    })
}

/// Encodes `items` (the input positions `first..`) as chunks of `call`: one, unless the
/// arguments of an item cannot be encoded (their `Serialize` fails or panics). That item
/// alone then fails, with a [`Codec`](ErrorKind::Codec) error that names it, as Python's
/// pool fails the one task it cannot pickle; the items before and after it go in chunks of
/// their own. An encoding that fails part way through a run is tried again from the item
/// where it stopped, as the first of its chunk: the fault may be the chunk's (more channel
/// handles than one message carries), and only an item that fails first in its chunk is
/// blamed. A chunk too large for a frame fails as a whole.
pub(crate) fn encode_chunks<A: Serialize + 'static>(
    shared: &Shared,
    call: &Arc<dyn CallSink>,
    spec: ChunkSpec,
    first: usize,
    items: &[A],
) -> Vec<Chunk> {
    // Nearly always one chunk.
    let first_try = match encode_chunk(shared, call, spec, first, items) {
        Ok(chunk) => return vec![chunk],
        Err(failed) => failed,
    };
    let mut chunks = Vec::new();
    // Runs of items still to encode (offset, length), the next one last.
    let mut todo = vec![(0, items.len())];
    let mut first_try = Some(first_try);
    while let Some((at, len)) = todo.pop() {
        if len == 0 {
            continue;
        }
        let encoded = match first_try.take() {
            Some(failed) => Err(failed),
            None => encode_chunk(shared, call, spec, first + at, &items[at..at + len]),
        };
        match encoded {
            Ok(chunk) => chunks.push(chunk),
            Err((Some(0), err)) => {
                call.fail(first + at, 1, &|index| {
                    err.for_item(call.task_name(), index)
                });
                todo.push((at + 1, len - 1));
            }
            Err((Some(bad), _)) => {
                // Those before it encoded once already: encoded again, on their own.
                todo.push((at + bad, len - bad));
                todo.push((at, bad));
            }
            Err((None, err)) => {
                call.fail(first + at, len, &|index| {
                    err.for_item(call.task_name(), index)
                });
            }
        }
    }
    chunks
}

/// Encodes `items` (the input positions `first..`) as one chunk of `call`; on failure, the
/// offset of the item whose arguments could not be encoded, if it was one item's fault.
fn encode_chunk<A: Serialize + 'static>(
    shared: &Shared,
    call: &Arc<dyn CallSink>,
    spec: ChunkSpec,
    first: usize,
    items: &[A],
) -> Result<Chunk, (Option<usize>, Error)> {
    let count = items.len();
    let seq = shared.next_seq();
    let Ok(count32) = u32::try_from(count) else {
        let err = Error::new(
            ErrorKind::Codec,
            "a chunk cannot hold more than u32::MAX items",
        );
        return Err((None, err));
    };
    let header = Header::Run {
        seq,
        task: spec.task,
        count: count32,
        timed: spec.timeout.is_some(),
    };
    let mut reached = 0;
    let encoded = run_frame(&header, 32 + count * 8, spec.max_frame_len, |frame| {
        // A `Serialize` of the user's may panic: that item fails, as one that returns an
        // error does, and the caller does not unwind through the pool.
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for item in items {
                codec::encode_value(item, frame)?;
                reached += 1;
            }
            Ok(())
        }));
        let context = || {
            format!(
                "the arguments of item {} could not be encoded",
                first + reached
            )
        };
        match encoded {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(crate::fdpass::encode_error(context(), err)),
            Err(panic) => Err(Error::new(
                ErrorKind::Codec,
                format!(
                    "{}: their Serialize panicked: {}",
                    context(),
                    crate::worker::panic_message(&*panic)
                ),
            )),
        }
    });
    let RunFrame {
        frame,
        payload_at,
        fds,
    } = match encoded {
        Ok(encoded) => encoded,
        Err(err) => return Err(((reached < count).then_some(reached), err)),
    };
    Ok(Chunk {
        call: Arc::clone(call),
        seq,
        task: spec.task,
        first,
        count: count32,
        timeout: spec.timeout,
        retries: spec.retries,
        attempt: 0,
        unblamed_deaths: 0,
        frame,
        payload_at,
        skip: spec.skip,
        fds,
        handles_gone: false,
    })
}
