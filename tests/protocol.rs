//! Bad bytes on the wire are errors for the items concerned, never a panic, a hang or an
//! unbounded allocation, and the pool goes on.

mod support;

use multiproc::{ErrorKind, Pool, task};
use serde::{Deserialize, Deserializer, Serialize};
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
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let fd: i32 = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|to| to.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .min()
        .expect("the worker's channel");
    // SAFETY: the worker's channel descriptor; ManuallyDrop keeps it open for the worker.
    let mut channel = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    channel.write_all(&[0xff; 16]).expect("write");
    0
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

#[multiproc::main]
fn main() {
    support::run(tests![
        undecodable_result_is_a_codec_error,
        corrupt_frame_from_a_worker_fails_its_item_and_the_pool_goes_on,
        oversized_results_and_arguments_are_item_errors,
        large_payloads_round_trip,
    ]);
}
