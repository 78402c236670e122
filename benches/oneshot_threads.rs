//! W4's bound: the program of `oneshot.rs` with threads in place of processes, a rayon pool
//! of 2 that runs one task, then exits. Issue 7 calls this "the bound" of W4 (1.5 ms when
//! the issue was written; its target for multiproc, 2.5 ms). `benches/compare.py` times it
//! from the same launcher in the same rounds, so that W4 can be read against what this
//! machine allows at the moment of the run.

fn square(x: u64) -> u64 {
    x * x
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("building a rayon pool");
    assert_eq!(pool.install(|| square(7)), 49);
}
