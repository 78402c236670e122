//! Divan benchmarks of a pool's costs, one per workload of issue 7 that fits a timing loop:
//! W1 (map of tiny tasks), W1' (one task per message), apply round trip, W2 (CPU-bound,
//! serial and on 2 workers), W3 (8 MiB in and out, as `Vec<u8>` and with `serde_bytes`).
//!
//! `cargo bench --bench pool`. The side-by-side with Python, W4 (a whole process) and the
//! imap memory case are in `benches/compare.py` and `benches/workloads.rs`; see BENCHMARKS.md.

mod common;

use common::{echo, echo_bytes, payload, spin, spin_cpu, square};
use divan::Bencher;
use divan::counter::{BytesCount, ItemsCount};
use multiproc::{Chunking, Pool};
use serde_bytes::ByteBuf;
use std::time::Duration;

const WORKERS: usize = 2;
const W1_ITEMS: u64 = 1_000_000;
const W1P_ITEMS: u64 = 1_000;
const W2_TASKS: usize = 64;
const W2_MS: u64 = 25;
const W3_TASKS: usize = 4;
const W3_LEN: usize = 8 << 20;

#[multiproc::main]
fn main() {
    divan::main();
}

/// A started pool whose workers have each run a chunk already. (`worker_pids` starts those
/// a short map may not need: a pool asks for its workers as work needs them.)
fn pool() -> Pool {
    let pool = Pool::new(WORKERS).expect("starting the pool");
    assert_eq!(pool.worker_pids().len(), WORKERS, "every worker started");
    pool.map(square, 0..1000).expect("warm-up map");
    pool
}

/// W1: `map` of a million `x * x` with the default chunking; the counter gives time per task.
#[divan::bench(sample_count = 10, sample_size = 1)]
fn w1_map_tiny(bencher: Bencher) {
    let pool = pool();
    bencher
        .counter(ItemsCount::new(W1_ITEMS))
        .bench_local(|| pool.map(square, 0..W1_ITEMS).expect("map"));
}

/// W1': `imap` with one item per message: the per-message cost of the protocol.
#[divan::bench(sample_count = 20, sample_size = 1)]
fn w1p_imap_one_per_message(bencher: Bencher) {
    let pool = pool();
    bencher.counter(ItemsCount::new(W1P_ITEMS)).bench_local(|| {
        pool.with_chunking(Chunking::Fixed(1))
            .imap(square, 0..W1P_ITEMS)
            .try_fold(0u64, |sum, x| x.map(|x| sum.wrapping_add(x)))
            .expect("imap")
    });
}

/// One `apply` at a time: the latency of a round trip to a worker and back.
#[divan::bench(sample_count = 200, sample_size = 10)]
fn apply_round_trip(bencher: Bencher) {
    let pool = pool();
    bencher.bench_local(|| pool.apply(square, (divan::black_box(7),)).expect("apply"));
}

/// W2, serial: 64 tasks of 25 ms of CPU in this thread. Divide by `w2_pool` for the speedup.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn w2_serial(bencher: Bencher) {
    bencher.bench_local(|| {
        for _ in 0..W2_TASKS {
            divan::black_box(spin_cpu(Duration::from_millis(W2_MS)));
        }
    });
}

/// W2 on a pool of 2: ideally half of `w2_serial`.
#[divan::bench(sample_count = 3, sample_size = 1)]
fn w2_pool(bencher: Bencher) {
    let pool = pool();
    bencher.bench_local(|| pool.map(spin, vec![W2_MS; W2_TASKS]).expect("map"));
}

/// W3: 8 MiB in and 8 MiB out per task as `Vec<u8>` (serde sees a sequence of bytes).
/// The byte counter counts both directions.
#[divan::bench(sample_count = 5, sample_size = 1)]
fn w3_echo_vec(bencher: Bencher) {
    let pool = pool();
    let template = payload(W3_LEN);
    bencher
        .counter(BytesCount::new(2 * W3_TASKS * W3_LEN))
        .with_inputs(|| vec![template.clone(); W3_TASKS])
        .bench_local_values(|inputs| pool.map(echo, inputs).expect("map"));
}

/// W3 with `serde_bytes::ByteBuf`: the same payload serialised as one byte string.
#[divan::bench(sample_count = 5, sample_size = 1)]
fn w3_echo_serde_bytes(bencher: Bencher) {
    let pool = pool();
    let template = ByteBuf::from(payload(W3_LEN));
    bencher
        .counter(BytesCount::new(2 * W3_TASKS * W3_LEN))
        .with_inputs(|| vec![template.clone(); W3_TASKS])
        .bench_local_values(|inputs| pool.map(echo_bytes, inputs).expect("map"));
}
