//! Blocking calls (`apply`, and the last chunk of `map` or `starmap`) run on an idle worker
//! from the caller's own thread instead of through the worker's slot thread: the same
//! guarantees must hold there. Deadlines kill, terminate ends the call, a panic while
//! decoding a result is that item's error, recycling and many callers at once still work.

mod support;

use multiproc::{Chunking, ErrorKind, Pool, task};
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::Arc;
use std::time::Duration;
use support::{Gate, TestResult, ensure, within};

#[task]
fn square(x: u64) -> u64 {
    x * x
}

#[task]
fn worker_pid(_x: u64) -> u32 {
    std::process::id()
}

#[task]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Passes the gate, then never returns.
#[task]
fn gate_then_hang(gate: String) -> u64 {
    support::pass_gate(&gate);
    loop {
        std::thread::park();
    }
}

/// A value whose decoding panics in the parent when it is 13.
#[derive(Debug, Serialize)]
struct Touchy(u64);

impl<'de> Deserialize<'de> for Touchy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(deserializer)?;
        assert!(value != 13, "unlucky number");
        Ok(Touchy(value))
    }
}

#[task]
fn touchy(x: u64) -> Touchy {
    Touchy(x)
}

fn apply_past_its_deadline_is_killed_and_the_pool_goes_on() -> TestResult {
    let outcome = within(Duration::from_mins(1), "a timed apply", || {
        let pool = Pool::new(1)?;
        let gate = Gate::new();
        let err = pool
            .with_timeout(Duration::from_millis(200))
            .apply(gate_then_hang, (gate.path(),));
        // The task waits at the gate: let it through so that it hangs past the deadline.
        drop(gate);
        let after = pool.apply(square, (7,))?;
        Ok::<_, multiproc::Error>((err, after))
    })?;
    let (err, after) = outcome?;
    let err = err.expect_err("ran past its deadline");
    ensure(err.kind() == ErrorKind::Timeout, format!("{err}"))?;
    ensure(after == 49, format!("the next apply returned {after}"))
}

fn terminate_ends_an_apply_in_progress_with_closed() -> TestResult {
    let pool = Arc::new(Pool::new(1)?);
    let gate = Gate::new();
    let caller = {
        let pool = Arc::clone(&pool);
        let path = gate.path();
        std::thread::spawn(move || pool.apply(gate_then_hang, (path,)))
    };
    // Returns once the task has opened the gate: it is running, in the caller's round trip.
    gate.open();
    pool.terminate();
    let result = within(Duration::from_secs(30), "the terminated apply", move || {
        caller.join().expect("the caller thread")
    })?;
    let err = result.expect_err("terminated");
    ensure(err.kind() == ErrorKind::Closed, format!("{err}"))?;
    within(Duration::from_secs(30), "join after terminate", move || {
        pool.join();
    })?;
    Ok(())
}

/// A long polling window (`PoolBuilder::spin`) never postpones a deadline, a bounded wait or
/// a terminate: each ends far sooner than the window.
fn polling_gives_way_to_deadlines_waits_and_terminate() -> TestResult {
    let pool = Arc::new(
        Pool::builder()
            .processes(2)
            .spin(Duration::from_mins(1))
            .build()?,
    );
    let timed = {
        let pool = Arc::clone(&pool);
        within(Duration::from_secs(20), "a timed apply", move || {
            pool.with_timeout(Duration::from_millis(50))
                .apply(sleep_ms, (60_000,))
        })?
    };
    let err = timed.expect_err("past its deadline");
    ensure(err.kind() == ErrorKind::Timeout, format!("{err}"))?;
    // Occupies one worker for good.
    let first = Gate::new();
    let pending = pool.apply_async(gate_then_hang, (first.path(),));
    let (ready, pending) = within(Duration::from_secs(20), "wait_timeout", move || {
        (pending.wait_timeout(Duration::from_millis(10)), pending)
    })?;
    ensure(!ready, "the task waits at its gate")?;
    first.open();
    // The other worker runs this one from the caller's thread, which polls for its reply.
    let second = Gate::new();
    let caller = {
        let pool = Arc::clone(&pool);
        let path = second.path();
        std::thread::spawn(move || pool.apply(gate_then_hang, (path,)))
    };
    second.open();
    pool.terminate();
    let result = within(
        Duration::from_secs(20),
        "an apply ended by terminate",
        move || caller.join().expect("the caller thread"),
    )?;
    let err = result.expect_err("terminated");
    ensure(err.kind() == ErrorKind::Closed, format!("{err}"))?;
    drop(pending);
    Ok(())
}

fn a_panic_while_decoding_a_result_is_that_items_error() -> TestResult {
    let (direct, queued, after) = within(Duration::from_mins(1), "decoding panics", || {
        let pool = Pool::new(1)?;
        let direct = pool.apply(touchy, (13,));
        // The same through the slot thread: the first two chunks are queued, the last runs
        // from this thread.
        let queued = pool
            .with_chunking(Chunking::Fixed(1))
            .map(touchy, [1, 13, 2]);
        let after = pool.apply(touchy, (12,))?;
        Ok::<_, multiproc::Error>((direct, queued, after))
    })??;
    let err = direct.expect_err("decoding panics");
    ensure(err.kind() == ErrorKind::Codec, format!("{err}"))?;
    ensure(err.to_string().contains("unlucky number"), format!("{err}"))?;
    let err = queued.expect_err("decoding panics");
    ensure(
        err.kind() == ErrorKind::Codec && err.index() == Some(1),
        format!("{err}"),
    )?;
    ensure(after.0 == 12, format!("{after:?}"))
}

fn recycling_after_each_task_works_for_apply() -> TestResult {
    let pids = within(Duration::from_mins(1), "recycled applies", || {
        let pool = Pool::builder()
            .processes(1)
            .max_tasks_per_child(1)
            .build()?;
        (0..5)
            .map(|x| pool.apply(worker_pid, (x,)))
            .collect::<Result<Vec<_>, _>>()
    })??;
    let distinct: std::collections::HashSet<_> = pids.iter().collect();
    ensure(
        distinct.len() == 5,
        format!("one task per worker: {pids:?}"),
    )
}

fn many_threads_applying_at_once_get_their_own_results() -> TestResult {
    let pool = Arc::new(Pool::new(2)?);
    let threads: Vec<_> = (0..8u64)
        .map(|thread| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || -> Result<(), String> {
                for i in 0..300 {
                    let x = thread * 1000 + i;
                    let got = pool.apply(square, (x,)).map_err(|err| err.to_string())?;
                    if got != x * x {
                        return Err(format!("apply({x}) returned {got}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    within(
        Duration::from_mins(2),
        "8 threads x 300 applies",
        move || {
            threads
                .into_iter()
                .map(|thread| thread.join().expect("a caller thread"))
                .collect::<Result<Vec<()>, String>>()
        },
    )??;
    Ok(())
}

#[multiproc::main]
fn main() {
    support::run(tests![
        apply_past_its_deadline_is_killed_and_the_pool_goes_on,
        terminate_ends_an_apply_in_progress_with_closed,
        polling_gives_way_to_deadlines_waits_and_terminate,
        a_panic_while_decoding_a_result_is_that_items_error,
        recycling_after_each_task_works_for_apply,
        many_threads_applying_at_once_get_their_own_results,
    ]);
}
