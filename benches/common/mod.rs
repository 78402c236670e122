//! Task bodies shared by the benchmark targets. `benches/compare.py` defines the same bodies
//! in Python, so the two sides run the same work.

use serde_bytes::ByteBuf;
use std::time::Duration;

/// W1, W1', apply, imap memory: the tiniest task, so that only the pool's cost shows.
#[multiproc::task]
pub fn square(x: u64) -> u64 {
    x * x
}

/// W2: burns `ms` milliseconds of this thread's CPU time. Spinning on CPU time rather than on
/// the wall clock keeps the work fixed when the machine is shared: a descheduled worker does
/// not get its task done for free. Returns the iterations, so the loop is not optimised away.
#[multiproc::task]
pub fn spin(ms: u64) -> u64 {
    spin_cpu(Duration::from_millis(ms))
}

pub fn spin_cpu(budget: Duration) -> u64 {
    let start = thread_cpu_time();
    let mut iterations = 0u64;
    while thread_cpu_time().saturating_sub(start) < budget {
        iterations = std::hint::black_box(iterations + 1);
    }
    iterations
}

fn thread_cpu_time() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    let now = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("the thread CPU clock exists");
    let secs = u64::try_from(now.tv_sec()).unwrap_or(0);
    Duration::new(secs, u32::try_from(now.tv_nsec()).unwrap_or(0))
}

/// W3: returns its payload, so 8 MiB travel each way. A `Vec<u8>` goes through serde as a
/// sequence of `u8`, one call per byte.
#[multiproc::task]
pub fn echo(data: Vec<u8>) -> Vec<u8> {
    data
}

/// W3 with `serde_bytes`: the same payload serialised as one byte string (a length and a copy).
#[multiproc::task]
pub fn echo_bytes(data: ByteBuf) -> ByteBuf {
    data
}

/// The W3 payload: `len` bytes of a repeating pattern (compare.py builds the same).
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| i as u8).collect()
}
