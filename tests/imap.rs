//! `imap` and `imap_unordered`: lazy input, bounded memory, order, errors in the stream,
//! and dropping a stream early.

mod support;

use multiproc::{Chunking, ErrorKind, Pool, task};
use serde_bytes::ByteBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::{Gate, TestResult, ensure, within};

#[task]
fn square(x: u64) -> u64 {
    x * x
}

/// Later items finish sooner: output order differs from completion order.
#[task]
fn slower_first(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20u64.saturating_sub(x)));
    x
}

#[task]
fn fragile(x: u64) -> u64 {
    assert!(x != 5, "item five");
    x * 10
}

/// Item 0 waits at the gate; the others return at once.
#[task]
fn first_waits(gate: String, x: u64) -> u64 {
    if x == 0 {
        support::pass_gate(&gate);
    }
    x
}

#[task]
fn length_of(data: ByteBuf) -> usize {
    data.len()
}

#[task]
fn mebibyte(x: u8) -> ByteBuf {
    ByteBuf::from(vec![x; 1 << 20])
}

/// Results small at first, then 256 KiB each.
#[task]
fn growing(i: u64) -> ByteBuf {
    ByteBuf::from(vec![1u8; if i < 2000 { 8 } else { 256 << 10 }])
}

/// Sleeps 20 ms.
#[task]
fn slow(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20));
    x
}

/// Small, short items get a deep window (hundreds in flight); large or slow ones do not: with
/// arguments or results of 1 MiB, results that grow to 256 KiB after small ones, or items of
/// 20 ms, one-item chunks keep to ten per worker, so the input is never read far ahead of
/// what the caller has consumed (and other calls' work is not queued behind it).
fn large_items_are_not_read_far_ahead() -> TestResult {
    let pool = Pool::new(2)?;
    // How many items of `input` a stream has pulled, after the caller has taken `taken`.
    let read_ahead = |chunking, taken: usize, run: &dyn Fn(Chunking, Counted) -> TestResult| {
        let pulled = Arc::new(AtomicUsize::new(0));
        run(chunking, Counted(Arc::clone(&pulled), 0))?;
        Ok::<_, Box<dyn std::error::Error>>(pulled.load(Ordering::SeqCst) - taken)
    };
    let one = Chunking::Fixed(1);

    let ahead = read_ahead(one, 5, &|chunking, input| {
        let input = input
            .take(200)
            .map(|i| ByteBuf::from(vec![i as u8; 1 << 20]));
        let mut stream = pool.with_chunking(chunking).imap(length_of, input);
        for _ in 0..5 {
            ensure(stream.next().expect("an item")? == 1 << 20, "length")?;
        }
        Ok(())
    })?;
    ensure(
        ahead <= 32,
        format!("large arguments: {ahead} items read ahead"),
    )?;

    let ahead = read_ahead(one, 5, &|chunking, input| {
        let input = input.take(200).map(|i| i as u8);
        let mut stream = pool.with_chunking(chunking).imap(mebibyte, input);
        for _ in 0..5 {
            ensure(stream.next().expect("an item")?.len() == 1 << 20, "length")?;
        }
        Ok(())
    })?;
    ensure(
        ahead <= 32,
        format!("large results: {ahead} items read ahead"),
    )?;

    // Items already in flight when the results grow run as they are; then the window
    // shrinks: 16 MiB of 256 KiB results is 64 items (ten chunks per worker are 20).
    let ahead = read_ahead(one, 2400, &|chunking, input| {
        let mut stream = pool.with_chunking(chunking).imap(growing, input);
        for _ in 0..2400 {
            stream.next().expect("an item")?;
        }
        Ok(())
    })?;
    ensure(
        ahead <= 80,
        format!("growing results: {ahead} items read ahead"),
    )?;

    for chunking in [one, Chunking::Auto] {
        let ahead = read_ahead(chunking, 10, &|chunking, input| {
            let mut stream = pool.with_chunking(chunking).imap(slow, input);
            for _ in 0..10 {
                stream.next().expect("an item")?;
            }
            Ok(())
        })?;
        ensure(
            ahead <= 32,
            format!("{chunking:?}, slow items: {ahead} read ahead"),
        )?;
    }
    Ok(())
}

/// `0, 1, 2, ...`, counting in the shared counter how many have been pulled.
struct Counted(Arc<AtomicUsize>, u64);

impl Iterator for Counted {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1 += 1;
        Some(self.1 - 1)
    }
}

/// `size_hint` passes the input's upper bound through, and never promises more than comes.
fn size_hint_bounds_what_comes() -> TestResult {
    let pool = Pool::new(2)?;
    let mut stream = pool.imap(square, 0..10u64);
    ensure(
        stream.size_hint() == (0, Some(10)),
        format!("{:?}", stream.size_hint()),
    )?;
    let mut left = 10;
    while let Some(output) = stream.next() {
        output?;
        left -= 1;
        let (low, high) = stream.size_hint();
        ensure(
            low <= left && high == Some(left),
            format!("{left} left, hint {low}..{high:?}"),
        )?;
    }
    ensure(left == 0, "all came")?;
    let endless = pool.imap(square, 0..);
    ensure(endless.size_hint().1.is_none(), "an endless input")
}

fn imap_keeps_input_order() -> TestResult {
    let pool = Pool::new(2)?;
    let out: Vec<u64> = pool
        .with_chunking(Chunking::Fixed(1))
        .imap(slower_first, 0..20)
        .collect::<Result<_, _>>()?;
    assert_eq!(out, (0..20).collect::<Vec<_>>());
    Ok(())
}

fn imap_unordered_yields_in_completion_order() -> TestResult {
    let pool = Pool::new(2)?;
    let gate = Gate::new();
    let path = gate.path();
    // Item 0 cannot finish before the gate opens, so completion order must put it last.
    let mut stream = pool
        .with_chunking(Chunking::Fixed(1))
        .imap_unordered(first_waits_unary, (0..10).map(move |x| (path.clone(), x)));
    let mut seen = Vec::new();
    for _ in 0..9 {
        seen.push(stream.next().expect("nine items come first")?);
    }
    ensure(
        !seen.contains(&0),
        format!("item 0 came out before its gate opened: {seen:?}"),
    )?;
    gate.open();
    seen.push(stream.next().expect("the tenth")?);
    ensure(stream.next().is_none(), "exactly ten")?;
    assert_eq!(seen[9], 0);
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    Ok(())
}

/// `imap` takes one-argument tasks: the gate and the value travel as one tuple.
#[task]
fn first_waits_unary(args: (String, u64)) -> u64 {
    first_waits(args.0, args.1)
}

fn a_new_call_is_not_queued_behind_one_busy_worker() -> TestResult {
    let pool = Pool::new(2)?;
    let gate = Gate::new();
    let path = gate.path();
    // A call of short chunks: the pool learns that this task's chunks are quick.
    let warm: Vec<u64> = pool
        .with_chunking(Chunking::Fixed(1))
        .map(first_waits_unary, (1..200).map(|x| (path.clone(), x)))?;
    assert_eq!(warm.len(), 199);
    // The same task, a new call, whose first item holds its worker. Nothing of this call may
    // be sent ahead to that worker before one of its own chunks was measured: the other nine
    // items must all come out through the other worker while the first is held.
    let path2 = path.clone();
    let mut stream = pool
        .with_chunking(Chunking::Fixed(1))
        .imap_unordered(first_waits_unary, (0..10).map(move |x| (path2.clone(), x)));
    let (nine, stream) = within(
        Duration::from_mins(1),
        "nine items beside a held one",
        move || {
            let nine: Vec<_> = stream.by_ref().take(9).collect();
            (nine, stream)
        },
    )
    .inspect_err(|_| gate.open())?;
    let mut nine: Vec<u64> = nine.into_iter().collect::<Result<_, _>>()?;
    nine.sort_unstable();
    assert_eq!(nine, (1..10).collect::<Vec<_>>());
    gate.open();
    let last: Vec<u64> = stream.collect::<Result<_, _>>()?;
    assert_eq!(last, vec![0]);
    Ok(())
}

fn imap_over_an_infinite_input_with_take() -> TestResult {
    let pool = Pool::new(2)?;
    let first = within(Duration::from_mins(2), "imap(0..).take(1000)", move || {
        pool.imap(square, 0..)
            .take(1000)
            .collect::<Result<Vec<u64>, _>>()
    })??;
    assert_eq!(first, (0..1000).map(|x| x * x).collect::<Vec<_>>());
    Ok(())
}

fn imap_memory_stays_flat_over_a_long_stream() -> TestResult {
    let pool = Pool::new(2)?;
    let total = 3_000_000u64;
    let mut stream = pool.imap(square, 0..total);
    let mut checked = 0u64;
    let mut baseline = 0;
    for (i, out) in stream.by_ref().enumerate() {
        let i = i as u64;
        ensure(out? == i * i, format!("item {i}"))?;
        checked += 1;
        if i == 300_000 {
            baseline = support::rss_kib();
        }
    }
    assert_eq!(checked, total);
    // (No test of this binary panics in the parent: with RUST_BACKTRACE set, printing a
    // backtrace loads the debug symbols, tens of MiB of this process's memory.)
    let growth_kib = support::rss_kib().saturating_sub(baseline);
    // Generous: holding every result, or reading the input ahead, would take far more
    // (3 million results alone are over 20 MiB).
    ensure(
        growth_kib < 16 * 1024,
        format!("parent RSS grew by {growth_kib} KiB"),
    )?;
    Ok(())
}

fn a_panic_mid_stream_is_an_error_in_place() -> TestResult {
    let pool = Pool::new(2)?;
    for chunking in [Chunking::Fixed(1), Chunking::Fixed(4), Chunking::Auto] {
        let out: Vec<_> = pool.with_chunking(chunking).imap(fragile, 0..10).collect();
        assert_eq!(out.len(), 10);
        for (i, item) in out.into_iter().enumerate() {
            match item {
                Ok(value) => assert_eq!(value, i as u64 * 10),
                Err(err) => {
                    assert_eq!(
                        (i, err.kind(), err.index()),
                        (5, ErrorKind::Panicked, Some(5))
                    );
                }
            }
        }
    }
    let mut unordered: Vec<_> = pool.imap_unordered(fragile, 0..10).collect();
    unordered.retain(Result::is_err);
    assert_eq!(unordered.len(), 1);
    Ok(())
}

fn dropping_a_stream_early_then_using_the_pool() -> TestResult {
    let pool = Pool::new(2)?;
    let mut stream = pool
        .with_chunking(Chunking::Fixed(1))
        .imap(slower_first, 0..1_000_000);
    assert_eq!(stream.next().expect("first")?, 0);
    assert_eq!(stream.next().expect("second")?, 1);
    drop(stream);
    let out = within(
        Duration::from_mins(2),
        "map after a dropped imap",
        move || pool.map(square, 0..1000),
    )??;
    assert_eq!(out, (0..1000).map(|x| x * x).collect::<Vec<_>>());
    Ok(())
}

fn chunk_sizes_do_not_change_results() -> TestResult {
    let pool = Pool::new(2)?;
    let expected: Vec<u64> = (0..2000).map(|x| x * x).collect();
    for chunking in [
        Chunking::Fixed(1),
        Chunking::Fixed(3),
        Chunking::Fixed(500),
        Chunking::Auto,
    ] {
        let ordered: Vec<u64> = pool
            .with_chunking(chunking)
            .imap(square, 0..2000)
            .collect::<Result<_, _>>()?;
        assert_eq!(ordered, expected, "{chunking:?}");
        let mut unordered: Vec<u64> = pool
            .with_chunking(chunking)
            .imap_unordered(square, 0..2000)
            .collect::<Result<_, _>>()?;
        unordered.sort_unstable();
        assert_eq!(unordered, expected, "{chunking:?}");
    }
    Ok(())
}

fn a_stream_outliving_its_pool_ends_with_closed_errors() -> TestResult {
    let pool = Pool::new(1)?;
    let mut stream = pool
        .with_chunking(Chunking::Fixed(1))
        .imap(slower_first, 0..1000);
    assert_eq!(stream.next().expect("first")?, 0);
    drop(pool);
    let rest = within(
        Duration::from_mins(1),
        "draining after the pool is gone",
        move || stream.collect::<Vec<_>>(),
    )?;
    ensure(rest.len() < 999, "a dropped pool stops the stream")?;
    ensure(
        rest.iter().any(Result::is_err),
        "what could not run is reported",
    )?;
    for err in rest.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.kind(), ErrorKind::Closed);
    }
    Ok(())
}

/// A fixed chunk larger than any input is one chunk, as for `map` (the window it sets must
/// not overflow).
fn a_fixed_chunk_larger_than_any_input_streams() -> TestResult {
    let pool = Pool::new(2)?;
    let out = within(
        Duration::from_mins(1),
        "imap with Fixed(usize::MAX)",
        move || {
            pool.with_chunking(Chunking::Fixed(usize::MAX))
                .imap(square, 0..10u64)
                .collect::<Result<Vec<_>, _>>()
        },
    )??;
    ensure(out == (0..10).map(|x| x * x).collect::<Vec<_>>(), "values")
}

/// An `imap` made before `close()` runs to its end, whether it had started or not (as
/// Python's does); `join` then returns.
fn an_imap_made_before_close_runs_to_its_end() -> TestResult {
    let pool = Pool::new(2)?;
    let fresh = pool.imap(square, 0..20u64);
    let mut started = pool
        .with_chunking(Chunking::Fixed(1))
        .imap(square, 0..200u64);
    ensure(started.next().expect("a first output")? == 0, "first")?;
    pool.close();
    let (fresh, started) = within(Duration::from_mins(1), "reading after close", move || {
        (
            fresh.collect::<Result<Vec<_>, _>>(),
            started.collect::<Result<Vec<_>, _>>(),
        )
    })?;
    ensure(
        fresh? == (0..20).map(|x| x * x).collect::<Vec<_>>(),
        "fresh",
    )?;
    ensure(
        started? == (1..200).map(|x| x * x).collect::<Vec<_>>(),
        "started",
    )?;
    within(Duration::from_mins(1), "join", move || pool.join())?;
    Ok(())
}

/// `join` ends a stream made before `close()` that is still to be read: it does not wait for
/// a reader that may never come, and the stream then ends with `Closed` errors.
fn join_ends_a_stream_made_before_close() -> TestResult {
    let pool = Pool::new(2)?;
    let stream = pool.imap(square, 0..);
    pool.close();
    within(Duration::from_mins(1), "join", move || pool.join())?;
    let rest = within(Duration::from_mins(1), "reading after join", move || {
        stream.collect::<Vec<_>>()
    })?;
    ensure(!rest.is_empty(), "the stream says why it ended")?;
    for item in rest {
        ensure(
            item.as_ref()
                .is_err_and(|err| err.kind() == ErrorKind::Closed),
            format!("{item:?}"),
        )?;
    }
    Ok(())
}

/// A stream that has pulled all of an exact-size input ends then, not at its next read: the
/// workers of a closed pool leave once its work is done, while it is unread.
fn a_stream_that_pulled_all_its_input_lets_a_closed_pool_go() -> TestResult {
    let pool = Pool::new(1)?;
    let worker = pool.worker_pids()[0];
    // Twenty items: exactly the first window of one worker with chunks of two.
    let mut stream = pool
        .with_chunking(Chunking::Fixed(2))
        .imap(square, 0..20u64);
    ensure(stream.next().expect("a first output")? == 0, "first")?;
    pool.close();
    ensure(
        support::wait_gone(worker, Duration::from_mins(1)),
        "the worker left once the work was done",
    )?;
    let rest = stream.collect::<Result<Vec<_>, _>>()?;
    ensure(
        rest == (1..20).map(|x| x * x).collect::<Vec<_>>(),
        "the rest",
    )?;
    within(Duration::from_mins(1), "join", move || pool.join())?;
    Ok(())
}

#[multiproc::main]
fn main() {
    support::run(tests![
        size_hint_bounds_what_comes,
        imap_keeps_input_order,
        imap_unordered_yields_in_completion_order,
        a_new_call_is_not_queued_behind_one_busy_worker,
        imap_over_an_infinite_input_with_take,
        imap_memory_stays_flat_over_a_long_stream,
        large_items_are_not_read_far_ahead,
        a_panic_mid_stream_is_an_error_in_place,
        dropping_a_stream_early_then_using_the_pool,
        chunk_sizes_do_not_change_results,
        a_stream_outliving_its_pool_ends_with_closed_errors,
        a_fixed_chunk_larger_than_any_input_streams,
        an_imap_made_before_close_runs_to_its_end,
        join_ends_a_stream_made_before_close,
        a_stream_that_pulled_all_its_input_lets_a_closed_pool_go,
    ]);
}
