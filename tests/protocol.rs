//! Bad bytes on the wire are errors for the items concerned, never a panic, a hang or an
//! unbounded allocation, and the pool goes on.

mod support;

use multiproc::{Chunking, ErrorKind, Pool, task};
use serde::{Deserialize, Deserializer, Serialize};
use serde_bytes::ByteBuf;
use std::time::Duration;
use support::{TestResult, ensure};

/// Serializes fine in the worker, refuses to deserialize in the parent.
#[derive(Debug, Serialize)]
struct Unreadable(u8);

impl<'de> Deserialize<'de> for Unreadable {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("this type refuses to be decoded"))
    }
}

#[task]
fn unreadable(x: u8) -> Unreadable {
    Unreadable(x)
}

#[task]
fn echo(x: u64) -> u64 {
    x
}

/// Crosses to the worker, where its decoding panics when it is 13.
#[derive(Debug, Serialize)]
struct Fussy(u64);

impl<'de> Deserialize<'de> for Fussy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(deserializer)?;
        assert!(value != 13, "fussy about 13");
        Ok(Fussy(value))
    }
}

#[task]
fn fussy(x: Fussy) -> u64 {
    x.0
}

/// Aborts its worker on 0: the items of its chunk behind that are sent again, which means
/// finding their arguments in the chunk, in the parent.
#[task]
fn fussy_abort_on_zero(x: Fussy) -> u64 {
    if x.0 == 0 {
        std::process::abort();
    }
    x.0
}

/// A result whose encoding in the worker panics when it is 13.
#[derive(Debug, Deserialize)]
struct Picky(u64);

impl Serialize for Picky {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        assert!(self.0 != 13, "picky about 13");
        serializer.serialize_u64(self.0)
    }
}

#[task]
fn picky(x: u64) -> Picky {
    Picky(x)
}

/// A result whose drop in the worker, once it is encoded, panics when it is 13.
#[derive(Debug, Serialize, Deserialize)]
struct Brittle(u64);

impl Drop for Brittle {
    fn drop(&mut self) {
        assert!(self.0 != 13 || std::thread::panicking(), "brittle at 13");
    }
}

#[task]
fn brittle(x: u64) -> Brittle {
    Brittle(x)
}

#[task]
fn bytes(len: usize) -> Vec<u8> {
    vec![7; len]
}

#[task]
fn length(data: Vec<u8>) -> usize {
    data.len()
}

/// Writes a frame header claiming 4 GiB onto the worker's own channel to the parent, as a
/// corrupted or malicious worker would. The channel is the worker's Unix socket.
#[task]
fn corrupt_channel(_x: u8) -> u8 {
    support::write_raw_frame(&[0xff; 16]);
    0
}

#[task]
fn reversed(data: ByteBuf) -> ByteBuf {
    ByteBuf::from(data.into_vec().into_iter().rev().collect::<Vec<u8>>())
}

#[task]
fn patterned_of(len: usize, salt: u8) -> ByteBuf {
    ByteBuf::from(support::patterned(len, salt))
}

/// Aborts its worker the first time it sees `marker` missing; returns the data's length.
#[task]
fn abort_once(marker: String, data: ByteBuf) -> usize {
    if std::fs::metadata(&marker).is_err() {
        std::fs::write(&marker, b"crashed once").expect("marker");
        std::process::abort();
    }
    data.len()
}

/// Sends a `Shared` frame (header variant 7: number 1, `len` bytes as a varint) that the
/// parent must refuse: no region, or one shorter than `len`.
#[task]
fn forge_shared_frame(len_varint: Vec<u8>) -> u8 {
    let mut body = vec![7, 1];
    body.extend_from_slice(&len_varint);
    let mut frame = u32::try_from(body.len())
        .expect("short")
        .to_le_bytes()
        .to_vec();
    frame.extend_from_slice(&body);
    support::write_raw_frame(&frame);
    0
}

#[task]
fn own_pid() -> u32 {
    std::process::id()
}

/// Sizes of the shared regions (memfds named `multiproc-region`) mapped by process `pid`.
fn region_mappings(pid: u32) -> Vec<usize> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("multiproc-region"))
        .filter_map(|line| {
            let (from, to) = line.split_whitespace().next()?.split_once('-')?;
            let from = usize::from_str_radix(from, 16).ok()?;
            let to = usize::from_str_radix(to, 16).ok()?;
            Some(to - from)
        })
        .collect()
}

/// One large call must not pin its regions in every worker for the life of the pool:
/// regions over 32 MiB are given up, by both sides, once the worker has been idle for a
/// second; smaller ones stay for the next call.
fn large_regions_are_given_up_when_the_worker_is_idle() -> TestResult {
    let pool = Pool::new(1)?;
    let pid = pool.apply(own_pid, ())?;
    let small = ByteBuf::from(support::patterned(4 << 20, 5));
    for _ in 0..2 {
        assert_eq!(pool.apply(reversed, (small.clone(),))?.len(), small.len());
    }
    // A later call is answered after the worker has read everything sent before it.
    assert_eq!(pool.apply(own_pid, ())?, pid);
    let kept = region_mappings(pid);
    ensure(
        !kept.is_empty() && kept.iter().all(|&len| len <= 32 << 20),
        format!("small regions stay mapped: {kept:?}"),
    )?;
    let big = ByteBuf::from(support::patterned(40 << 20, 6));
    for _ in 0..2 {
        assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    }
    let large = |sizes: &[usize]| sizes.iter().any(|&len| len > 32 << 20);
    ensure(
        large(&region_mappings(pid)),
        "calls that follow each other keep their large regions",
    )?;
    // They go after an idle second; nothing signals it, so this looks every 20 ms, for at
    // most 30 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (worker, parent) = (region_mappings(pid), region_mappings(std::process::id()));
        if !large(&worker) && !large(&parent) {
            break;
        }
        ensure(
            std::time::Instant::now() < deadline,
            format!("regions over 32 MiB still mapped: worker {worker:?}, parent {parent:?}"),
        )?;
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the pool goes on, with regions made again when needed.
    assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    Ok(())
}

fn undecodable_result_is_a_codec_error() -> TestResult {
    let pool = Pool::new(1)?;
    let err = pool
        .map(unreadable, [1, 2])
        .expect_err("the parent cannot decode the result");
    assert_eq!(err.kind(), ErrorKind::Codec);
    ensure(
        err.task().is_some_and(|t| t.ends_with("::unreadable")),
        err.to_string(),
    )?;
    assert_eq!(err.index(), Some(0));
    assert_eq!(pool.map(echo, [5, 6])?, vec![5, 6]);
    Ok(())
}

/// The user's code around a task in the worker (the arguments' `Deserialize`, the result's
/// `Serialize` and `Drop`) may panic as the task may: that fails its item, with the panic's
/// message, and the worker goes on.
fn a_panic_in_the_workers_serde_fails_its_item_not_the_worker() -> TestResult {
    let pool = Pool::new(1)?;
    let worker = pool.worker_pids();
    let one = pool.with_chunking(Chunking::Fixed(1));
    // The middle item's error, the others' values.
    let middle = |out: Vec<Result<u64, multiproc::Error>>| -> Result<multiproc::Error, String> {
        match <[_; 3]>::try_from(out) {
            Ok([Ok(1), Err(err), Ok(3)]) if err.index() == Some(1) => Ok(err),
            other => Err(format!("expected 1, an error, 3: {other:?}")),
        }
    };
    // Its kind, and what its text says.
    let says = |err: multiproc::Error, kind: ErrorKind, what: &[&str]| {
        let text = err.to_string();
        ensure(
            err.kind() == kind && what.iter().all(|part| text.contains(part)),
            format!("expected {kind:?} saying {what:?}: {text}"),
        )
    };
    let err = middle(one.imap(fussy, [1, 13, 3].map(Fussy)).collect())?;
    says(
        err,
        ErrorKind::Codec,
        &["decoding them panicked", "fussy about 13"],
    )?;
    let picked = one.imap(picky, [1, 13, 3]).map(|r| r.map(|p| p.0));
    let err = middle(picked.collect())?;
    says(
        err,
        ErrorKind::Codec,
        &["encoding it panicked", "picky about 13"],
    )?;
    let dropped = one.imap(brittle, [1, 13, 3]).map(|r| r.map(|b| b.0));
    says(
        middle(dropped.collect())?,
        ErrorKind::Panicked,
        &["brittle at 13"],
    )?;
    // In one chunk, where the next item's arguments start after a panicking decode is
    // unknown: the items after it fail with it.
    let out: Vec<_> = pool
        .with_chunking(Chunking::Fixed(3))
        .imap(fussy, [1, 13, 3].map(Fussy))
        .collect();
    ensure(
        matches!(&out[..], [Ok(1), Err(a), Err(b)]
            if a.kind() == ErrorKind::Codec && b.kind() == ErrorKind::Codec),
        format!("{out:?}"),
    )?;
    assert_eq!(pool.worker_pids(), worker, "no worker died");
    assert_eq!(pool.map(echo, [5, 6])?, vec![5, 6]);
    Ok(())
}

/// Items sent again after their worker died are found in their chunk by decoding the
/// arguments before them, in the parent, with the user's `Deserialize`: one that panics
/// there fails the items it leaves unplaced, and the pool goes on.
fn items_whose_arguments_cannot_be_found_again_fail_after_a_crash() -> TestResult {
    let pool = Pool::new(1)?;
    let out: Vec<_> = pool
        .with_chunking(Chunking::Fixed(3))
        .imap(fussy_abort_on_zero, [0, 13, 3].map(Fussy))
        .collect();
    let [Err(crashed), Err(first), Err(second)] = &out[..] else {
        return Err(format!("expected three errors: {out:?}").into());
    };
    assert_eq!(crashed.kind(), ErrorKind::Crashed, "{crashed}");
    for (err, index) in [(first, 1), (second, 2)] {
        assert_eq!((err.kind(), err.index()), (ErrorKind::Codec, Some(index)));
        ensure(
            err.to_string().contains("could not be sent again"),
            err.to_string(),
        )?;
    }
    assert_eq!(pool.map(echo, [5, 6])?, vec![5, 6]);
    Ok(())
}

fn corrupt_frame_from_a_worker_fails_its_item_and_the_pool_goes_on() -> TestResult {
    let pool = Pool::new(1)?;
    let before = pool.worker_pids();
    let err = pool
        .apply(corrupt_channel, (1,))
        .expect_err("corrupt frame");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    ensure(err.to_string().contains("malformed"), err.to_string())?;
    // The offending worker was replaced; the pool works.
    assert_eq!(pool.map(echo, 0..100)?, (0..100).collect::<Vec<_>>());
    ensure(
        pool.worker_pids() != before,
        "the corrupt worker was replaced",
    )?;
    Ok(())
}

fn oversized_results_and_arguments_are_item_errors() -> TestResult {
    let pool = Pool::builder()
        .processes(1)
        .max_frame_len(1 << 20)
        .build()?;
    let err = pool
        .apply(bytes, (2 << 20,))
        .expect_err("result over the limit");
    assert_eq!(err.kind(), ErrorKind::Codec);
    ensure(
        err.to_string().contains("exceeds the limit"),
        err.to_string(),
    )?;
    let err = pool
        .apply(length, (vec![0; 2 << 20],))
        .expect_err("arguments over the limit");
    assert_eq!(err.kind(), ErrorKind::Codec);
    ensure(
        err.to_string().contains("exceeds the limit"),
        err.to_string(),
    )?;
    // Within the limit, the same pool works.
    assert_eq!(pool.apply(bytes, (1000,))?.len(), 1000);
    assert_eq!(pool.apply(length, (vec![1; 1000],))?, 1000);
    Ok(())
}

/// `Chunking::Auto` sizes chunks by bytes as well as by count: 32 items of 1.5 MiB on two
/// workers would be chunks of four items (6 MiB frames) by count alone, over a 4 MiB frame
/// limit; sized by bytes, each item travels alone and fits. `Fixed(4)` shows the limit bites.
fn auto_chunks_of_large_items_stay_small() -> TestResult {
    let pool = Pool::builder()
        .processes(2)
        .max_frame_len(4 << 20)
        .build()?;
    let inputs = || (0..32u8).map(|salt| ByteBuf::from(support::patterned(3 << 19, salt)));
    let out = pool.map(reversed, inputs())?;
    for (salt, data) in (0..32u8).zip(&out) {
        let mut expected = support::patterned(3 << 19, salt);
        expected.reverse();
        ensure(data.as_slice() == expected, format!("item {salt}"))?;
    }
    // `imap` adapts its chunks to the time per item, within the same byte budget.
    for (salt, data) in (0..32u8).zip(pool.imap(reversed, inputs())) {
        ensure(data?.len() == 3 << 19, format!("imap item {salt}"))?;
    }
    let err = pool
        .with_chunking(Chunking::Fixed(4))
        .map(reversed, inputs())
        .expect_err("chunks of four items exceed the frame limit");
    assert_eq!(err.kind(), ErrorKind::Codec);
    Ok(())
}

fn large_payloads_round_trip() -> TestResult {
    let pool = Pool::new(2)?;
    let sizes = [0usize, 1, 65_535, 65_536, 1 << 20, 8 << 20];
    let out = pool.map(bytes, sizes)?;
    for (size, data) in sizes.iter().zip(&out) {
        ensure(
            data.len() == *size && data.iter().all(|&b| b == 7),
            format!("size {size}"),
        )?;
    }
    assert_eq!(pool.map(length, out)?, sizes.to_vec());
    Ok(())
}

/// Frames from 100 KiB to 9 MiB, both ways, go through the socket or through the shared
/// regions (256 KiB and up, when a region is free), which grow and are reused: every byte
/// must come back where it belongs, in order, whatever the path.
fn large_frames_through_shared_memory_keep_every_byte() -> TestResult {
    let pool = Pool::new(2)?;
    let sizes = [
        100 << 10,
        (256 << 10) - 64,
        256 << 10,
        (256 << 10) + 1,
        1 << 20,
        3 << 20,
        6 << 20,
        300 << 10,
        5 << 20,
        1 << 20,
    ];
    for round in 0..2u8 {
        let inputs: Vec<ByteBuf> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| ByteBuf::from(support::patterned(len, round.wrapping_add(i as u8))))
            .collect();
        let expected: Vec<ByteBuf> = inputs
            .iter()
            .map(|data| ByteBuf::from(data.iter().rev().copied().collect::<Vec<u8>>()))
            .collect();
        let out = pool
            .with_chunking(multiproc::Chunking::Fixed(1))
            .map(reversed, inputs)?;
        ensure(out == expected, format!("round {round}: a reply differs"))?;
        // Small requests, large replies: replies go by the socket until the parent gives the
        // worker a replies region large enough.
        let out = pool
            .with_chunking(multiproc::Chunking::Fixed(1))
            .starmap(patterned_of, sizes.iter().map(|&len| (len, round)))?;
        for (data, &len) in out.iter().zip(&sizes) {
            ensure(
                **data == support::patterned(len, round),
                format!("round {round}: {len} bytes differ"),
            )?;
        }
    }
    Ok(())
}

/// A worker that dies while its request sits in shared memory: the request runs again on
/// its replacement, which gets regions of its own.
fn a_shared_request_runs_again_after_its_worker_dies() -> TestResult {
    let marker = std::env::temp_dir().join(format!("multiproc-abort-once-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let pool = Pool::new(1)?;
    let marker = marker.to_string_lossy().into_owned();
    let data = ByteBuf::from(support::patterned(4 << 20, 3));
    let len = pool
        .with_retries(1)
        .apply(abort_once, (marker.clone(), data.clone()))?;
    let _ = std::fs::remove_file(&marker);
    assert_eq!(len, data.len());
    assert_eq!(pool.apply(reversed, (data.clone(),))?.len(), data.len());
    Ok(())
}

/// A worker that announces a shared frame it has no region for, or one that overruns its
/// region, breaks the protocol: its item fails with a clear error, the pool goes on.
fn a_forged_shared_frame_is_an_error() -> TestResult {
    let pool = Pool::new(1)?;
    let err = pool
        .apply(forge_shared_frame, (vec![0x10],))
        .expect_err("no region yet");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    ensure(err.to_string().contains("no region"), err.to_string())?;
    // Give the new worker regions, then overrun its replies region.
    let big = ByteBuf::from(support::patterned(2 << 20, 1));
    assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    let err = pool
        .apply(forge_shared_frame, (vec![0xff, 0xff, 0xff, 0xff, 0x0f],))
        .expect_err("overruns the region");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    ensure(err.to_string().contains("overruns"), err.to_string())?;
    assert_eq!(pool.apply(reversed, (big.clone(),))?.len(), big.len());
    Ok(())
}

#[multiproc::main]
fn main() {
    support::run(tests![
        undecodable_result_is_a_codec_error,
        a_panic_in_the_workers_serde_fails_its_item_not_the_worker,
        items_whose_arguments_cannot_be_found_again_fail_after_a_crash,
        corrupt_frame_from_a_worker_fails_its_item_and_the_pool_goes_on,
        oversized_results_and_arguments_are_item_errors,
        auto_chunks_of_large_items_stay_small,
        large_payloads_round_trip,
        large_frames_through_shared_memory_keep_every_byte,
        a_shared_request_runs_again_after_its_worker_dies,
        a_forged_shared_frame_is_an_error,
        large_regions_are_given_up_when_the_worker_is_idle,
    ]);
}
