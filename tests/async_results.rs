//! `map_async`, `starmap_async`, `apply_async` and `AsyncResult`: never blocking, never
//! hanging, readable after the pool is gone, and awaitable.

mod support;

use multiproc::{AsyncResult, ErrorKind, Pool, task};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::{Gate, TestResult, ensure, within};

#[task]
fn square(x: u64) -> u64 {
    x * x
}

#[task]
fn pow(x: u64, y: u32) -> u64 {
    x.pow(y)
}

/// Waits at the gate, then returns `value`.
#[task]
fn gated(gate: String, value: u64) -> u64 {
    support::pass_gate(&gate);
    value
}

/// Set in the parent's `main` only: workers never run its body.
static IN_PARENT: AtomicBool = AtomicBool::new(false);

/// An output that must be read: dropping it unread in the parent panics (a drop bomb).
#[derive(serde::Serialize, serde::Deserialize)]
struct MustRead(u64);

impl Drop for MustRead {
    fn drop(&mut self) {
        assert!(
            !IN_PARENT.load(Ordering::Relaxed) || std::thread::panicking(),
            "MustRead({}) dropped unread",
            self.0
        );
    }
}

/// Says it has started (writes to the FIFO `started`, which the test reads), waits at the
/// gate, then returns a [`MustRead`]; empty paths skip either.
#[task]
fn must_read((started, gate, value): (String, String, u64)) -> MustRead {
    if !started.is_empty() {
        let _ = std::fs::write(&started, b"started");
    }
    if !gate.is_empty() {
        support::pass_gate(&gate);
    }
    MustRead(value)
}

#[task]
fn boom(x: u64) -> u64 {
    assert!(x < 3, "too big: {x}");
    x
}

fn map_starmap_apply_async_values() -> TestResult {
    let pool = Pool::new(2)?;
    let r: AsyncResult<Vec<u64>> = pool.map_async(square, 0..8);
    let s = pool.starmap_async(pow, [(1, 3), (2, 4)]);
    let a = pool.apply_async(pow, (2, 10));
    assert_eq!(r.get()?, vec![0, 1, 4, 9, 16, 25, 36, 49]);
    assert_eq!(s.get()?, vec![1, 16]);
    assert_eq!(a.get()?, 1024);
    Ok(())
}

fn returns_at_once_and_reports_readiness() -> TestResult {
    let pool = Pool::new(2)?;
    let gate = Gate::new();
    let r = pool.apply_async(gated, (gate.path(), 7));
    // The task cannot finish before the gate opens: every check below is deterministic.
    ensure(!r.ready(), "ready before the work could finish")?;
    assert_eq!(r.successful(), None);
    ensure(
        !r.wait_timeout(Duration::from_millis(50)),
        "wait_timeout returned true early",
    )?;
    gate.open();
    r.wait();
    ensure(r.ready(), "ready after wait")?;
    assert_eq!(r.successful(), Some(true));
    assert_eq!(r.get()?, 7);
    Ok(())
}

fn successful_is_false_after_a_failure() -> TestResult {
    let pool = Pool::new(2)?;
    let r = pool.map_async(boom, 0..5);
    r.wait();
    assert_eq!(r.successful(), Some(false));
    let err = r.get().expect_err("item 3 panics");
    assert_eq!((err.kind(), err.index()), (ErrorKind::Panicked, Some(3)));
    Ok(())
}

fn get_timeout_kills_nothing() -> TestResult {
    let pool = Pool::new(1)?;
    let pids = pool.worker_pids();
    let gate = Gate::new();
    let r = pool.apply_async(gated, (gate.path(), 1));
    let err = r
        .get_timeout(Duration::from_millis(50))
        .expect_err("not ready");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    // It names the task, not an item.
    assert_eq!(err.task(), Some("async_results::gated"));
    assert_eq!(err.index(), None);
    // The work goes on: the worker was not killed, and once the task ends it is free again.
    gate.open();
    assert_eq!(pool.map(square, [3])?, vec![9]);
    assert_eq!(pool.worker_pids(), pids);
    Ok(())
}

fn wait_timeout_then_get_recovers_the_value() -> TestResult {
    let pool = Pool::new(1)?;
    let gate = Gate::new();
    let r = pool.apply_async(gated, (gate.path(), 5));
    ensure(!r.wait_timeout(Duration::from_millis(20)), "not yet")?;
    gate.open();
    r.wait();
    assert_eq!(r.get_timeout(Duration::from_mins(1))?, 5);
    Ok(())
}

fn completed_results_outlive_the_pool() -> TestResult {
    let pool = Pool::new(2)?;
    let r = pool.map_async(square, 0..100);
    r.wait();
    drop(pool);
    assert_eq!(r.get()?, (0..100).map(|x| x * x).collect::<Vec<_>>());
    Ok(())
}

fn unfinishable_work_resolves_to_closed() -> TestResult {
    let pool = Pool::new(1)?;
    let gate = Gate::new();
    let running = pool.apply_async(gated, (gate.path(), 1));
    let queued = pool.map_async(square, 0..10);
    drop(pool); // terminates: the gated task is killed, the queued work never runs
    let (running, queued) = within(
        Duration::from_mins(1),
        "results of a dropped pool",
        move || (running.get(), queued.get()),
    )?;
    assert_eq!(running.expect_err("killed").kind(), ErrorKind::Closed);
    assert_eq!(queued.expect_err("never ran").kind(), ErrorKind::Closed);
    Ok(())
}

fn terminate_resolves_waiting_callers() -> TestResult {
    let pool = std::sync::Arc::new(Pool::new(1)?);
    let gate = Gate::new();
    let r = pool.apply_async(gated, (gate.path(), 1));
    let terminator = {
        let pool = std::sync::Arc::clone(&pool);
        std::thread::spawn(move || pool.terminate())
    };
    let outcome = within(Duration::from_mins(1), "get after terminate", move || {
        r.get()
    })?;
    terminator.join().expect("terminate");
    assert_eq!(outcome.expect_err("terminated").kind(), ErrorKind::Closed);
    Ok(())
}

fn async_result_is_a_future() -> TestResult {
    let pool = Pool::new(2)?;
    let squares = pollster::block_on(pool.map_async(square, [1, 2, 3]))?;
    assert_eq!(squares, vec![1, 4, 9]);
    let gate = Gate::new();
    let pending = pool.apply_async(gated, (gate.path(), 11));
    let opener = std::thread::spawn(move || gate.open());
    assert_eq!(pollster::block_on(pending)?, 11);
    opener.join().expect("gate");
    Ok(())
}

fn async_result_is_send() -> TestResult {
    fn assert_send<T: Send>(_: &T) {}
    let pool = Pool::new(1)?;
    let r = pool.map_async(square, [4]);
    assert_send(&r);
    let handle = std::thread::spawn(move || r.get());
    assert_eq!(handle.join().expect("thread")?, vec![16]);
    Ok(())
}

/// Outputs nobody reads (their `AsyncResult` or `imap` dropped before they came) are
/// dropped on the pool's thread: a `Drop` of theirs that panics (here, on purpose) unwound
/// that thread, and the next call on a pool of one waited forever.
fn outputs_whose_drop_panics_leave_the_pool_serving() -> TestResult {
    for dropped in ["map_async", "imap"] {
        let pool = Pool::new(1)?;
        let (started, gate) = (Gate::new(), Gate::new());
        let held = (started.path(), gate.path(), 1);
        // Dropped once the gated item runs (its worker has it: a queued one would be
        // dropped unrun, and the gate below would wait for it forever).
        let is_running = || std::fs::read(started.path()).map(drop);
        if dropped == "map_async" {
            let outputs = pool.map_async(must_read, [held]);
            is_running()?;
            drop(outputs);
        } else {
            let mut outputs = pool
                .with_chunking(multiproc::Chunking::Fixed(1))
                .imap(must_read, [(String::new(), String::new(), 0), held]);
            std::mem::forget(outputs.next().expect("one output")?);
            is_running()?;
            drop(outputs);
        }
        // The output comes now, to nobody.
        gate.open();
        let after = within(
            Duration::from_secs(30),
            &format!("an apply after a dropped {dropped}"),
            move || pool.apply(square, (3,)),
        )?;
        ensure(after.is_ok_and(|x| x == 9), dropped)?;
    }
    Ok(())
}

#[multiproc::main]
fn main() {
    IN_PARENT.store(true, Ordering::Relaxed);
    support::run(tests![
        outputs_whose_drop_panics_leave_the_pool_serving,
        map_starmap_apply_async_values,
        returns_at_once_and_reports_readiness,
        successful_is_false_after_a_failure,
        get_timeout_kills_nothing,
        wait_timeout_then_get_recovers_the_value,
        completed_results_outlive_the_pool,
        unfinishable_work_resolves_to_closed,
        terminate_resolves_waiting_callers,
        async_result_is_a_future,
        async_result_is_send,
    ]);
}
