//! The wire protocol between a parent and its workers.
//!
//! A connection carries frames: a little-endian `u32` body length, then the body. The body is
//! a [`Header`] encoded with postcard, followed by a payload whose meaning the header gives
//! (the encoded arguments of a chunk of items, or their encoded outcomes). Keeping payloads
//! outside the header means they are written once, straight into the frame buffer, and read
//! in place: never copied into an envelope.
//!
//! Nothing here assumes a local pipe: the same frames travel over any byte stream, which is
//! what lets a worker later be reached over an authenticated TCP socket.
//!
//! Why postcard: a maintained serde codec with a documented, stable wire format (a
//! specification, versioned 1.0), compact varints for the small integers that dominate task
//! arguments, and no self-description overhead. bincode 3.x on crates.io is a tombstone
//! release; bitcode's format is explicitly unstable between versions. Measured here: a `u64`
//! argument or result encodes and decodes in about 5 ns each way, once per-item paths avoid
//! serde's derived-enum machinery (see `outcome`) and per-slice `memcpy` calls (see `codec`);
//! the figures and their command are in BENCHMARKS.md.

use crate::error::{Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::io::{self, Read};
use std::ops::Range;

/// Bumped on any change to [`Header`] or to the payload layouts.
pub(crate) const PROTOCOL_VERSION: u32 = 2;

/// The default upper bound on one frame's body: larger lengths are rejected before any
/// allocation. [`crate::PoolBuilder::max_frame_len`] changes it.
pub(crate) const DEFAULT_MAX_FRAME_LEN: u32 = 1 << 30;

/// Bytes of the length prefix.
const PREFIX: usize = 4;

/// Reads grow the buffer in steps of at least this much, and at most double what a frame has
/// actually delivered: a corrupt length never makes us allocate memory for bytes that never
/// arrive. One page at first: each page of a fresh buffer costs a page fault and its
/// zeroing, which a short-lived pool's few small frames (handshake, one task) never need.
/// Larger frames grow the buffer, geometrically, and it stays grown (a read fills all the
/// room there is); so does a stream of small frames that fills each read, up to
/// [`MAX_READ`].
const MIN_READ: usize = 4 * 1024;

/// The most a stream of small frames grows the room of a read to.
const MAX_READ: usize = 64 * 1024;
/// A reader's buffer larger than this is given back once it is empty, as is a worker's
/// buffer of encoded results (see `worker`): one large frame does not pin its memory for
/// the life of the worker (the shared regions keep as much, see `slot::TRIM_AFTER`).
pub(crate) const KEEP_AT_MOST: usize = 32 << 20;

/// The largest buffer or shared region of the pool's own in a worker whose address space is
/// capped at `max_memory` (`PoolBuilder::max_memory_per_child`): an eighth of it, so that a
/// worker's two regions and its buffers never take much of it. Unbounded without a cap.
pub(crate) fn own_share(max_memory: Option<u64>) -> usize {
    max_memory.map_or(usize::MAX, |cap| {
        usize::try_from(cap / 8).unwrap_or(usize::MAX)
    })
}

/// What a frame is about. Variant order is part of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Header {
    /// Worker → parent, first frame: who it is and which registry it has.
    Ready { version: u32, digest: u64, pid: u32 },
    /// Worker → parent, instead of `Ready`: this process was started as a worker but its
    /// `fn main` never passed through the worker entry (`#[multiproc::main]` is missing).
    MissingEntry,
    /// Parent → worker: run `count` items of task `task`; the payload holds their encoded
    /// argument tuples, one after another.
    /// With `timed`, the worker also publishes when each item starts, for deadlines.
    Run {
        seq: u64,
        task: u32,
        count: u32,
        timed: bool,
    },
    /// Worker → parent: outcomes of items `first..first + count` of chunk `seq`; the payload
    /// holds one encoded [`crate::outcome::Outcome`] per item.
    Results { seq: u64, first: u32, count: u32 },
    /// Parent → worker: finish and exit with status 0.
    Shutdown,
    /// Either way: the next frame's payload refers to `count` descriptors, which travel
    /// with this frame's first byte (`SCM_RIGHTS`). See `fdpass`.
    Descriptors { count: u32 },
    /// Parent → worker: a shared region of `len` bytes (see `region`), whose memfd travels
    /// with this frame's first byte: from now on the requests region (`requests`) or the
    /// replies region, replacing the previous one. Length 0, without a descriptor: that
    /// region is given up.
    Region { requests: bool, len: u64 },
    /// Either way: shared frame number `n`, `len` bytes of whole frames at the start of the
    /// sender's region, to be read there instead of from the socket.
    Shared { n: u64, len: u64 },
}

/// Starts a frame in `buf`: a placeholder length, then the encoded header. The caller then
/// appends the payload and calls [`end_frame`].
pub(crate) fn begin_frame<S: crate::codec::Sink>(buf: &mut S, header: &Header) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; PREFIX]);
    // Encoding our own enum cannot fail: no custom Serialize, no size limit.
    crate::codec::encode_into(header, buf).expect("encoding a header cannot fail");
    start
}

/// Writes the length of the frame started at `start`, checking it against `max_len`.
pub(crate) fn end_frame(buf: &mut [u8], start: usize, max_len: u32) -> Result<(), Error> {
    let len = buf.len() - start - PREFIX;
    let len = u32::try_from(len)
        .ok()
        .filter(|&len| len <= max_len)
        .ok_or_else(|| oversized(len as u64, max_len))?;
    buf[start..start + PREFIX].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// A frame with an empty payload, ready to write.
pub(crate) fn control_frame(header: &Header) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16);
    let start = begin_frame(&mut buf, header);
    end_frame(&mut buf, start, u32::MAX).expect("a control frame is small");
    buf
}

/// Appends a `Descriptors` frame announcing `count` descriptors, if there are any.
pub(crate) fn descriptors_frame(buf: &mut Vec<u8>, count: usize) {
    if count > 0 {
        let count = u32::try_from(count).expect("at most MAX_FDS descriptors");
        let start = begin_frame(buf, &Header::Descriptors { count });
        end_frame(buf, start, u32::MAX).expect("a control frame is small");
    }
}

/// The bodies of the frames in `bytes`, a run of whole frames (a shared frame's bytes); an
/// `Err` for a length over `max_len` or past the end ends it.
pub(crate) fn frames(bytes: &[u8], max_len: u32) -> impl Iterator<Item = Result<&[u8], Error>> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let bytes = rest.filter(|bytes| !bytes.is_empty())?;
        let split = split_frame(bytes, max_len);
        rest = split.as_ref().ok().map(|&(_, tail)| tail);
        Some(split.map(|(body, _)| body))
    })
}

/// The first frame in `bytes`: its body and what follows it. `Err` for a length over
/// `max_len` or past the end.
fn split_frame(bytes: &[u8], max_len: u32) -> Result<(&[u8], &[u8]), Error> {
    let prefix: [u8; PREFIX] = bytes
        .get(..PREFIX)
        .and_then(|prefix| prefix.try_into().ok())
        .ok_or_else(|| truncated(bytes.len()))?;
    let len = u32::from_le_bytes(prefix);
    if len > max_len {
        return Err(oversized(u64::from(len), max_len));
    }
    let rest = &bytes[PREFIX..];
    if rest.len() < len as usize {
        return Err(truncated(bytes.len()));
    }
    Ok(rest.split_at(len as usize))
}

/// Splits a frame body into its header and payload.
pub(crate) fn parse_body(body: &[u8]) -> Result<(Header, &[u8]), Error> {
    postcard::take_from_bytes::<Header>(body)
        .map_err(|err| Error::codec("corrupt frame: its header could not be decoded", err))
}

fn oversized(len: u64, max_len: u32) -> Error {
    Error::new(
        ErrorKind::Codec,
        format!(
            "frame of {len} bytes exceeds the limit of {max_len} bytes; raise it with \
             `PoolBuilder::max_frame_len` if such payloads are intended"
        ),
    )
}

/// Reassembles frames from a byte stream, blocking or not.
///
/// The declared length is checked against the limit before the buffer grows for it, and the
/// buffer then grows only as bytes arrive.
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_len: u32,
    /// The least room a read gets: [`MIN_READ`], doubled (to [`MAX_READ`]) each time a read
    /// fills all the room it had.
    min_room: usize,
    /// The largest buffer kept once it is empty ([`KEEP_AT_MOST`] unless set).
    keep: usize,
}

impl FrameReader {
    pub(crate) fn new(max_len: u32) -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_len,
            min_room: MIN_READ,
            keep: KEEP_AT_MOST,
        }
    }

    /// Keeps a buffer of at most `bytes` once it is empty (a worker under a memory cap keeps
    /// less).
    pub(crate) fn keeping(mut self, bytes: usize) -> Self {
        self.keep = bytes;
        self
    }

    /// Bytes received and not yet returned as frames.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The next complete frame, if one is buffered, as a range for [`FrameReader::body`].
    /// `Err` for a length over the limit.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Range<usize>>, Error> {
        let available = self.end - self.start;
        if available < PREFIX {
            return Ok(None);
        }
        let len = self.declared_len()?;
        if available < PREFIX + len {
            return Ok(None);
        }
        let body = self.start + PREFIX..self.start + PREFIX + len;
        self.start = body.end;
        Ok(Some(body))
    }

    /// The bytes of a frame returned by `next_frame` or `read_frame`; valid until the next read.
    pub(crate) fn body(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    fn declared_len(&self) -> Result<usize, Error> {
        let prefix: [u8; PREFIX] = self.buf[self.start..self.start + PREFIX]
            .try_into()
            .expect("slice of PREFIX bytes");
        let len = u32::from_le_bytes(prefix);
        if len > self.max_len {
            return Err(oversized(u64::from(len), self.max_len));
        }
        Ok(len as usize)
    }

    /// Reads once from `source` into the buffer. `Ok(0)` is end of stream.
    pub(crate) fn read_from(&mut self, source: &mut impl Read) -> io::Result<usize> {
        self.make_room().map_err(io::Error::other)?;
        let room = self.buf.len() - self.end;
        let n = source.read(&mut self.buf[self.end..])?;
        self.end += n;
        if n == room {
            self.min_room = (self.min_room * 2).min(MAX_READ);
        }
        Ok(n)
    }

    /// Blocks until a whole frame is buffered. `Ok(None)` is a clean end of stream between
    /// frames; a stream that ends inside a frame is an error.
    #[cfg(test)]
    pub(crate) fn read_frame(
        &mut self,
        source: &mut impl Read,
    ) -> Result<Option<Range<usize>>, Error> {
        loop {
            if let Some(range) = self.next_frame()? {
                return Ok(Some(range));
            }
            match self.read_from(source) {
                Ok(0) if self.buffered() == 0 => return Ok(None),
                Ok(0) => return Err(truncated(self.buffered())),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(read_error(err)),
            }
        }
    }

    /// Ensures spare room after `end` for the next read, compacting first. The room asked for
    /// covers what the current frame still misses, capped at what has arrived so far (and at
    /// least `MIN_READ`): the buffer at most doubles per read however large a length claims.
    fn make_room(&mut self) -> Result<(), Error> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > self.keep {
                self.buf = Vec::new();
            }
        }
        let available = self.end - self.start;
        let missing = if available >= PREFIX {
            (PREFIX + self.declared_len()?).saturating_sub(available)
        } else {
            PREFIX - available
        };
        let room = missing.min(available.max(self.min_room)).max(self.min_room);
        if self.buf.len() - self.end >= room {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < room {
            // Exactly: a doubled capacity would count twice against a worker's memory cap.
            self.buf.reserve_exact(self.end + room - self.buf.len());
            self.buf.resize(self.end + room, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
fn read_error(err: io::Error) -> Error {
    match err.downcast::<Error>() {
        Ok(err) => err,
        Err(err) => Error::io("reading a frame failed", err),
    }
}

pub(crate) fn truncated(buffered: usize) -> Error {
    Error::new(
        ErrorKind::Codec,
        format!("the stream ended in the middle of a frame ({buffered} bytes of it received)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn frame(header: &Header, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = begin_frame(&mut buf, header);
        buf.extend_from_slice(payload);
        end_frame(&mut buf, start, DEFAULT_MAX_FRAME_LEN).unwrap();
        buf
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let run = Header::Run {
            seq: 9,
            task: 2,
            count: 3,
            timed: false,
        };
        let mut stream = frame(&run, b"abc");
        stream.extend(frame(&Header::Shutdown, b""));
        let mut source = Cursor::new(stream);
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
        let range = reader.read_frame(&mut source).unwrap().unwrap();
        let (header, payload) = parse_body(reader.body(range)).unwrap();
        assert_eq!((header, payload), (run, &b"abc"[..]));
        let range = reader.read_frame(&mut source).unwrap().unwrap();
        assert_eq!(parse_body(reader.body(range)).unwrap().0, Header::Shutdown);
        assert!(
            reader.read_frame(&mut source).unwrap().is_none(),
            "clean end of stream"
        );
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let mut stream = u32::MAX.to_le_bytes().to_vec();
        stream.extend_from_slice(&[0; 16]);
        let mut reader = FrameReader::new(1 << 20);
        let err = reader.read_frame(&mut Cursor::new(stream)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        assert!(
            reader.buf.len() <= MIN_READ,
            "allocated {} bytes",
            reader.buf.len()
        );
    }

    #[test]
    fn lying_length_within_the_limit_never_allocates_what_never_arrives() {
        // Claims 512 MiB, delivers 10 bytes, then the stream ends.
        let mut stream = (512u32 << 20).to_le_bytes().to_vec();
        stream.extend_from_slice(&[7; 10]);
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
        let err = reader.read_frame(&mut Cursor::new(stream)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(
            err.to_string().contains("ended in the middle of a frame"),
            "{err}"
        );
        assert!(
            reader.buf.len() <= 2 * MIN_READ,
            "allocated {} bytes",
            reader.buf.len()
        );
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let whole = frame(
            &Header::Run {
                seq: 1,
                task: 0,
                count: 1,
                timed: true,
            },
            &[1, 2, 3, 4],
        );
        for cut in 1..whole.len() {
            let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
            let err = reader
                .read_frame(&mut Cursor::new(&whole[..cut]))
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Codec, "cut at {cut}");
        }
    }

    #[test]
    fn corrupt_header_is_an_error_not_a_panic() {
        for garbage in [
            &[0xff_u8; 8][..],
            &[0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[],
        ] {
            let err = parse_body(garbage).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Codec);
        }
        // Every byte string up to 3 bytes long: decoding returns, whatever it returns.
        for a in 0..=255u8 {
            for b in [0u8, 1, 127, 128, 255] {
                let _ = parse_body(&[a, b]);
                let _ = parse_body(&[a, b, a]);
            }
        }
    }

    #[test]
    fn large_frames_arrive_through_small_reads() {
        struct Trickle(Cursor<Vec<u8>>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(1000);
                self.0.read(&mut buf[..n])
            }
        }
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let whole = frame(
            &Header::Results {
                seq: 5,
                first: 0,
                count: 1,
            },
            &payload,
        );
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
        let range = reader
            .read_frame(&mut Trickle(Cursor::new(whole)))
            .unwrap()
            .unwrap();
        let (_, got) = parse_body(reader.body(range)).unwrap();
        assert_eq!(got, &payload[..]);
    }

    #[test]
    fn small_frames_start_in_one_page_and_a_busy_stream_reads_more_at_once() {
        struct Counted(Cursor<Vec<u8>>, usize);
        impl Read for Counted {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 += 1;
                self.0.read(buf)
            }
        }
        let one = frame(&Header::Shutdown, &[7; 10]);
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
        let mut source = Counted(Cursor::new(one.clone()), 0);
        reader.read_frame(&mut source).unwrap().unwrap();
        assert!(reader.buf.len() <= MIN_READ, "one page for one small frame");

        // 20 000 small frames, ~300 KiB: the room doubles while reads come back full.
        let stream: Vec<u8> = (0..20_000).flat_map(|_| one.iter().copied()).collect();
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN);
        let mut source = Counted(Cursor::new(stream.clone()), 0);
        let mut frames = 0;
        while reader.read_frame(&mut source).unwrap().is_some() {
            frames += 1;
        }
        assert_eq!(frames, 20_000);
        let at_one_page = stream.len() / MIN_READ;
        assert!(
            source.1 < at_one_page / 4,
            "{} reads for {} bytes",
            source.1,
            stream.len()
        );
        assert!(reader.buf.len() <= 2 * MAX_READ, "{}", reader.buf.len());
    }

    #[test]
    fn end_frame_enforces_the_limit() {
        let mut buf = Vec::new();
        let start = begin_frame(&mut buf, &Header::Shutdown);
        buf.extend_from_slice(&[0; 100]);
        assert_eq!(
            end_frame(&mut buf, start, 50).unwrap_err().kind(),
            ErrorKind::Codec
        );
    }
}
