//! W4 helper: the whole life of a small program that uses a pool. It starts a pool of 2
//! workers, runs one task, and exits. `benches/compare.py` times it end to end, many times,
//! through `workloads w4`; a Python twin lives in compare.py. With the argument `bare` it
//! exits before starting the pool: the floor of a process of this executable. With `all`
//! it starts both workers first (`worker_pids`; one task needs one): `.ci/coverage` runs it
//! so, to see a profile written by each.

use multiproc::{Pool, task};

#[task]
fn square(x: u64) -> u64 {
    x * x
}

#[multiproc::main]
fn main() -> Result<(), multiproc::Error> {
    if std::env::args().nth(1).as_deref() == Some("bare") {
        return Ok(());
    }
    let pool = Pool::new(2)?;
    if std::env::args().nth(1).as_deref() == Some("all") {
        assert_eq!(pool.worker_pids().len(), 2);
    }
    assert_eq!(pool.apply(square, (7,))?, 49);
    Ok(())
}
