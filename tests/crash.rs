//! Fault tolerance: crashes, timeouts that kill, memory caps, retries, recycling,
//! initializers, and a fault-injection run that kills workers at random.

mod support;

use multiproc::{Chunking, ErrorKind, Pool, task};
use std::time::Duration;
use support::{TestResult, ensure, fork_then_abort, wait_gone, within};

#[task]
fn square(x: u64) -> u64 {
    x * x
}

/// Item 1 aborts, 2 segfaults, 3 exits with code 3; the others return.
#[task]
fn misbehave(x: u64) -> u64 {
    match x {
        1 => std::process::abort(),
        2 => {
            // SAFETY: deliberately not: a write through a null pointer, to crash the worker.
            unsafe { std::ptr::null_mut::<u64>().write_volatile(x) };
            x
        }
        3 => std::process::exit(3),
        _ => x * 10,
    }
}

/// Starts a child process that would live for ten minutes, records its pid, then hangs.
/// The child is never waited for: the timeout kills it with the worker's process group.
#[allow(clippy::zombie_processes)]
#[task]
fn hang_with_a_child(pid_file: String) -> u64 {
    let child = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep");
    std::fs::write(&pid_file, child.id().to_string()).expect("write pid");
    loop {
        std::thread::park();
    }
}

#[task]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[task]
fn allocate_forever(_x: u8) -> usize {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1; 16 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Crashes the first time it sees its marker missing, succeeds after.
#[task]
fn crash_once(marker: String) -> u64 {
    if std::fs::metadata(&marker).is_err() {
        std::fs::write(&marker, b"crashed once").expect("marker");
        std::process::abort();
    }
    7
}

#[task]
fn say_then_abort(x: u64) -> u64 {
    eprintln!("about to fail on item {x}");
    std::process::abort();
}

#[task]
fn pid_of_worker(_x: u64) -> u32 {
    std::process::id()
}

static MODEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[task]
fn load_model(name: String) {
    MODEL
        .set(format!("model {name}"))
        .expect("initialized once per worker");
}

#[task]
fn use_model(x: u64) -> String {
    format!("{} on {x}", MODEL.get().map_or("no model", String::as_str))
}

#[task]
fn failing_initializer(reason: String) {
    panic!("cannot load: {reason}");
}

#[task]
fn slow_item(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(1));
    x
}

/// Sleeps, then returns a large string (4 MiB): its outcome takes several reads to arrive.
#[task]
fn big_after_ms(ms: u64) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    "x".repeat(4 << 20)
}

#[task]
fn text_len(text: String) -> usize {
    text.len()
}

#[task]
fn hang_forever() {
    loop {
        std::thread::park();
    }
}

/// The first worker to run it goes on; every other one waits at the gate first.
#[task]
fn first_through(marker: String, gate: String) {
    let first = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
        .is_ok();
    if !first {
        support::pass_gate(&gate);
    }
}

/// Panics when the marker file exists: an initializer that starts failing on command.
#[task]
fn init_unless_marker(marker: String) {
    assert!(std::fs::metadata(&marker).is_err(), "the marker says no");
}

/// Reports this worker's pid through a FIFO, waits at the gate, then aborts (when `x` is 0).
#[task]
fn abort_after_gate(args: (String, String, u64)) -> u64 {
    let (report, gate, x) = args;
    if x == 0 {
        // Blocks until the test reads it: an event, not a file to poll.
        std::fs::write(&report, std::process::id().to_string()).expect("report the pid");
        support::pass_gate(&gate);
        std::process::abort();
    }
    x
}

fn temp_path(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("multiproc-crash-{}-{name}", std::process::id()))
        .to_string_lossy()
        .into_owned()
}

fn abort_segfault_exit_are_crashes_of_one_item() -> TestResult {
    let pool = Pool::new(2)?;
    for chunking in [Chunking::Fixed(1), Chunking::Fixed(4), Chunking::Auto] {
        let out: Vec<_> = pool.with_chunking(chunking).imap(misbehave, 0..8).collect();
        assert_eq!(out.len(), 8);
        for (i, item) in out.into_iter().enumerate() {
            let err = match (i, item) {
                (1..=3, Err(err)) => err,
                (1..=3, Ok(v)) => return Err(format!("item {i} returned {v}").into()),
                (_, Ok(v)) => {
                    assert_eq!(v, i as u64 * 10);
                    continue;
                }
                (_, Err(err)) => return Err(format!("item {i} failed: {err}").into()),
            };
            assert_eq!(
                (err.kind(), err.index()),
                (ErrorKind::Crashed, Some(i)),
                "{err}"
            );
            ensure(
                err.task().is_some_and(|t| t.ends_with("::misbehave")),
                err.to_string(),
            )?;
            match i {
                1 => assert_eq!(err.signal(), Some(6), "SIGABRT: {err}"),
                2 => assert_eq!(err.signal(), Some(11), "SIGSEGV: {err}"),
                _ => assert_eq!(err.exit_code(), Some(3), "{err}"),
            }
        }
    }
    let text = pool
        .map(misbehave, [0, 2])
        .expect_err("map reports the crash")
        .to_string();
    ensure(text.contains("SIGSEGV") && text.contains("misbehave"), text)?;
    assert_eq!(
        pool.map(square, 0..10)?,
        (0..10).map(|x| x * x).collect::<Vec<_>>()
    );
    Ok(())
}

/// A worker that dies while a process its task forked holds its end of the channel open (so
/// the channel never ends) is seen dead at once: its item is `Crashed`, also under a
/// deadline (not `Timeout`), and the forked process goes with the worker's process group.
fn a_crash_is_seen_while_a_process_the_task_forked_holds_the_channel() -> TestResult {
    let pool = Pool::new(1)?;
    let outcome = support::within(Duration::from_mins(1), "two crashing calls", move || {
        let mut seen = Vec::new();
        for timeout in [None, Some(Duration::from_secs(30))] {
            let pid_file = temp_path("forked-child");
            let err = match timeout {
                None => pool.apply(fork_then_abort, (pid_file.clone(),)),
                Some(after) => pool
                    .with_timeout(after)
                    .apply(fork_then_abort, (pid_file.clone(),)),
            }
            .expect_err("the worker aborted");
            seen.push((err.kind(), err.signal(), forked_by(&pid_file)));
        }
        assert_eq!(pool.apply(square, (3,)).expect("the pool goes on"), 9);
        seen
    })?;
    for (kind, signal, forked) in outcome {
        assert_eq!((kind, signal), (ErrorKind::Crashed, Some(6)), "SIGABRT");
        killed_with_the_worker(forked?)?;
    }
    Ok(())
}

/// The pid `fork_then_abort` wrote to `pid_file`, which goes.
fn forked_by(pid_file: &str) -> Result<u32, String> {
    let pid = std::fs::read_to_string(pid_file).map_err(|err| err.to_string())?;
    let _ = std::fs::remove_file(pid_file);
    pid.parse().map_err(|_| format!("not a pid: {pid:?}"))
}

fn killed_with_the_worker(forked: u32) -> TestResult {
    ensure(
        wait_gone(forked, Duration::from_secs(30)),
        format!("the forked process {forked} was killed with the worker"),
    )
}

/// An initializer that kills its worker while a process it forked holds the worker's end of
/// the channel open fails the start at once, not at the start timeout; the forked process
/// goes with the worker's process group.
fn an_initializer_crashing_behind_a_forked_process_fails_the_start_at_once() -> TestResult {
    let pid_file = temp_path("forked-by-initializer");
    let builder = Pool::builder()
        .processes(1)
        .start_timeout(Duration::from_mins(10))
        .initializer(fork_then_abort, (pid_file.clone(),));
    let err = support::within(Duration::from_mins(1), "a failing start", move || {
        builder.build().map(drop)
    })?
    .expect_err("the initializer aborts its worker");
    assert_eq!(err.kind(), ErrorKind::Spawn, "{err}");
    killed_with_the_worker(forked_by(&pid_file)?)
}

fn timeout_kills_the_task_and_what_it_started() -> TestResult {
    let pool = Pool::builder()
        .processes(2)
        .task_timeout(Duration::from_secs(1))
        .build()?;
    let pid_file = temp_path("sleep-pid");
    let hanging = pool.apply_async(hang_with_a_child, (pid_file.clone(),));
    // Other tasks keep running meanwhile, on the other worker.
    assert_eq!(
        pool.map(square, 0..100)?,
        (0..100).map(|x| x * x).collect::<Vec<_>>()
    );
    let err = hanging.get().expect_err("it hangs forever");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    ensure(err.to_string().contains("deadline"), err.to_string())?;
    let grandchild: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    let _ = std::fs::remove_file(&pid_file);
    ensure(
        wait_gone(grandchild, Duration::from_secs(10)),
        "the task's own child was killed too",
    )?;
    assert_eq!(pool.map(square, [2, 3])?, vec![4, 9]);
    Ok(())
}

fn per_call_timeout() -> TestResult {
    let pool = Pool::new(2)?;
    let out: Vec<_> = pool
        .with_chunking(Chunking::Fixed(1))
        .with_timeout(Duration::from_millis(1500))
        .imap(sleep_ms, [10, 60_000, 20, 30])
        .collect();
    assert_eq!(out[0].as_ref().ok(), Some(&10));
    assert_eq!(
        out[1].as_ref().map_err(multiproc::Error::kind).err(),
        Some(ErrorKind::Timeout)
    );
    assert_eq!(out[2].as_ref().ok(), Some(&20));
    assert_eq!(out[3].as_ref().ok(), Some(&30));
    // Without the per-call timeout, the same pool sets none.
    assert_eq!(pool.apply(sleep_ms, (5,))?, 5);
    Ok(())
}

fn memory_cap_ends_a_runaway_task() -> TestResult {
    let pool = Pool::builder()
        .processes(1)
        .max_memory_per_child(1 << 30)
        .build()?;
    let err = pool
        .apply(allocate_forever, (0,))
        .expect_err("runs out of its address space");
    assert_eq!(err.kind(), ErrorKind::Crashed, "{err}");
    ensure(
        err.stderr_tail()
            .is_some_and(|tail| tail.contains("memory allocation")),
        format!("the allocation failure is quoted: {err}"),
    )?;
    assert_eq!(pool.apply(square, (4,))?, 16);
    Ok(())
}

fn retries_run_a_crashed_task_again() -> TestResult {
    let marker = temp_path("crash-once");
    let _ = std::fs::remove_file(&marker);
    let pool = Pool::new(1)?;
    assert_eq!(
        pool.with_retries(1).apply(crash_once, (marker.clone(),))?,
        7
    );
    let _ = std::fs::remove_file(&marker);
    let err = pool
        .apply(crash_once, (marker.clone(),))
        .expect_err("no retries by default");
    assert_eq!(err.kind(), ErrorKind::Crashed);
    let _ = std::fs::remove_file(&marker);
    Ok(())
}

fn stderr_tail_is_quoted() -> TestResult {
    let pool = Pool::new(1)?;
    let err = pool.apply(say_then_abort, (42,)).expect_err("aborts");
    ensure(
        err.stderr_tail()
            .is_some_and(|tail| tail.contains("about to fail on item 42")),
        format!("{err:?}"),
    )?;
    ensure(
        err.to_string().contains("about to fail on item 42"),
        err.to_string(),
    )?;
    Ok(())
}

/// Says what went wrong, prints a backtrace (as the standard library does with
/// `RUST_BACKTRACE` set), then aborts.
#[task]
fn say_then_backtrace_then_abort() -> u8 {
    eprintln!("memory allocation of 2147483648 bytes failed");
    eprintln!("stack backtrace:");
    for frame in 0..40 {
        eprintln!("  {frame:>2}: some::function::name");
        eprintln!("             at ./src/some/file.rs:{frame}:5");
    }
    eprintln!(
        "note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace."
    );
    std::process::abort();
}

/// A backtrace printed as a worker dies does not push the line that says what went wrong
/// out of the error's quote.
fn the_quote_keeps_what_went_wrong_before_a_backtrace() -> TestResult {
    let pool = Pool::new(1)?;
    let err = pool
        .apply(say_then_backtrace_then_abort, ())
        .expect_err("aborts");
    let tail = err.stderr_tail().unwrap_or_default();
    ensure(
        tail.contains("memory allocation of 2147483648 bytes failed")
            && tail.contains("[80 lines of backtrace, on stderr]")
            && tail.contains("note: Some details are omitted"),
        tail.to_owned(),
    )
}

/// When no worker can start at all (a memory cap no process fits in), a call on a pool of
/// three fails instead of waiting forever: the last slots to give up pass the work on to
/// the one left, which was never woken.
fn a_call_fails_when_no_worker_of_three_can_start() -> TestResult {
    let pool = Pool::builder()
        .processes(3)
        .max_memory_per_child(1)
        .build()?;
    let outcome = within(Duration::from_mins(2), "apply", move || {
        let outcome = pool.apply(square, (3,)).map_err(|err| err.kind());
        (outcome, pool)
    })?;
    ensure(outcome.0.is_err(), format!("{:?}", outcome.0))
}

fn workers_are_recycled_after_max_tasks() -> TestResult {
    let pool = Pool::builder()
        .processes(1)
        .max_tasks_per_child(2)
        .build()?;
    let pids = pool
        .with_chunking(Chunking::Fixed(1))
        .map(pid_of_worker, 0..10)?;
    let mut counts = std::collections::HashMap::new();
    for pid in &pids {
        *counts.entry(pid).or_insert(0) += 1;
    }
    ensure(
        counts.values().all(|&n| n <= 2),
        format!("a worker ran more than 2: {counts:?}"),
    )?;
    ensure(
        counts.len() >= 5,
        format!("expected at least 5 workers: {counts:?}"),
    )?;
    Ok(())
}

/// An initializer that appends its worker's pid to the file `log`: a trace of each start.
#[task]
fn log_start(log: String) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .expect("open the log");
    writeln!(file, "{}", std::process::id()).expect("write the log");
}

#[task]
fn square_at_gate(gate: String, x: u64) -> u64 {
    support::pass_gate(&gate);
    x * x
}

/// Appends its pid to `log`, then returns `mib` MiB; meanwhile a thread aborts the worker as
/// soon as bytes wait in one of its sockets' send queues (`SIOCOUTQ`): while it sends the
/// outcome, after the task finished.
#[task]
fn die_while_answering(log: String, mib: usize) -> serde_bytes::ByteBuf {
    // A task returning `()` called as a statement: CI's clippy pins that this is not taken
    // for a struct literal with no effect (the task's name is a constant).
    log_start(log);
    let sockets = support::sockets();
    std::thread::spawn(move || {
        loop {
            for &fd in &sockets {
                let mut queued: nix::libc::c_int = 0;
                // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
                let ok = unsafe { nix::libc::ioctl(fd, nix::libc::TIOCOUTQ, &raw mut queued) };
                if ok == 0 && queued > 0 {
                    std::process::abort();
                }
            }
            std::hint::spin_loop();
        }
    });
    serde_bytes::ByteBuf::from(vec![1u8; mib << 20])
}

/// With a deadline, an item whose worker dies after it finished, before its outcome came
/// back, fails instead of running again: it ran, and with a deadline nothing runs twice.
fn with_a_deadline_a_finished_item_whose_outcome_was_lost_does_not_run_again() -> TestResult {
    let log = temp_path("answering");
    let pool = Pool::new(1)?;
    let err = pool
        .with_timeout(Duration::from_mins(1))
        .with_chunking(Chunking::Fixed(1))
        .starmap(die_while_answering, [(log.clone(), 16)])
        .map(|out| out.len())
        .expect_err("the worker died");
    let runs = std::fs::read_to_string(&log)?.lines().count();
    let _ = std::fs::remove_file(&log);
    ensure(
        err.kind() == ErrorKind::Crashed && err.message().contains("after it finished"),
        err.to_string(),
    )?;
    ensure(runs == 1, format!("it ran {runs} times"))
}

/// A closing pool with nothing left to run starts no replacement for a worker it retires
/// (`max_tasks_per_child`): `join` used to start one, initializer and all, only to stop it.
fn a_closing_pool_starts_no_replacement_it_cannot_use() -> TestResult {
    let log = temp_path("starts");
    let gate = support::Gate::new();
    let pool = Pool::builder()
        .processes(1)
        .max_tasks_per_child(1)
        .initializer(log_start, (log.clone(),))
        .build()?;
    let out = pool.starmap_async(square_at_gate, [(gate.path(), 3)]);
    pool.close();
    // The task is running (the gate waits for it): it finishes after the close.
    gate.open();
    support::within(Duration::from_mins(1), "join", move || pool.join())?;
    ensure(out.get()? == [9], "the output")?;
    let starts = std::fs::read_to_string(&log)?.lines().count();
    let _ = std::fs::remove_file(&log);
    ensure(starts == 1, format!("{starts} workers started"))
}

fn initializer_runs_in_every_worker() -> TestResult {
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(3)
        .initializer(load_model, ("tiny".to_string(),))
        .build()?;
    let out = pool
        .with_chunking(Chunking::Fixed(1))
        .map(use_model, 0..12)?;
    for (i, line) in out.iter().enumerate() {
        assert_eq!(line, &format!("model tiny on {i}"));
    }
    Ok(())
}

/// `build` returns once one worker is ready; the others finish starting in the background
/// (here: one is held in its initializer), and `worker_pids` waits for them.
fn a_pool_runs_as_soon_as_its_first_worker_is_ready() -> TestResult {
    let marker = temp_path("first-through");
    let _ = std::fs::remove_file(&marker);
    let gate = support::Gate::new();
    let path = gate.path();
    let claimed = marker.clone();
    let (pool, out) = support::within(Duration::from_mins(1), "build and a task", move || {
        let pool = Pool::builder()
            .processes(2)
            .initializer(first_through, (claimed, path))
            .build()?;
        let out = pool.apply(square, (6,))?;
        Ok::<_, multiproc::Error>((pool, out))
    })??;
    assert_eq!(out, 36);
    // Let the second worker finish its initializer: then both are listed.
    gate.open();
    let pids = support::within(Duration::from_mins(1), "worker_pids", move || {
        pool.worker_pids()
    })?;
    let _ = std::fs::remove_file(&marker);
    assert_eq!(pids.len(), 2, "{pids:?}");
    Ok(())
}

/// A worker that never finishes starting (held in its initializer past the start-up
/// timeout) does not outlive a `close`: `join` ends, and new work is refused as `Closed`,
/// not as a start-up failure of the pool.
fn a_closed_pool_with_a_worker_that_never_started_refuses_work_as_closed() -> TestResult {
    let marker = temp_path("never-started");
    let _ = std::fs::remove_file(&marker);
    let gate = support::Gate::new(); // never opened
    let path = gate.path();
    let claimed = marker.clone();
    let err = support::within(Duration::from_mins(1), "close and join", move || {
        let pool = Pool::builder()
            .processes(2)
            .start_timeout(Duration::from_secs(1))
            .initializer(first_through, (claimed, path))
            .build()?;
        assert_eq!(pool.apply(square, (3,))?, 9);
        pool.close();
        pool.join();
        Ok::<_, multiproc::Error>(pool.apply(square, (3,)).expect_err("closed"))
    })??;
    let _ = std::fs::remove_file(&marker);
    drop(gate);
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    Ok(())
}

fn failing_initializer_is_a_clear_error() -> TestResult {
    let err = Pool::builder()
        .processes(2)
        .initializer(failing_initializer, ("no such file".to_string(),))
        .build()
        .expect_err("the initializer panics");
    assert_eq!(err.kind(), ErrorKind::Spawn);
    let text = err.to_string();
    ensure(
        text.contains("failing_initializer") && text.contains("cannot load: no such file"),
        text,
    )?;
    Ok(())
}

fn a_timed_call_behind_short_chunks_still_times_out() -> TestResult {
    let pool = Pool::new(1)?;
    // Short untimed chunks keep the worker's socket full of prefetched work...
    let fast = pool
        .with_chunking(Chunking::Fixed(1))
        .map_async(square, 0..20_000);
    // ...and a timed call arrives behind them: its deadline must still be kept.
    let slow = pool
        .with_timeout(Duration::from_millis(300))
        .apply_async(sleep_ms, (60_000,));
    let outcome = support::within(Duration::from_secs(30), "the timed call", move || {
        slow.get()
    })?;
    assert_eq!(
        outcome.expect_err("killed at its deadline").kind(),
        ErrorKind::Timeout
    );
    assert_eq!(fast.get()?.len(), 20_000);
    Ok(())
}

fn a_task_done_in_time_is_not_killed_while_its_result_arrives() -> TestResult {
    let pool = Pool::new(1)?;
    // Each item takes 0.4 s of its 1 s deadline; their results take several reads each.
    let out = pool
        .with_chunking(Chunking::Fixed(4))
        .with_timeout(Duration::from_secs(1))
        .map(big_after_ms, [400, 400, 400, 400])?;
    ensure(
        out.iter().all(|text| text.len() == 4 << 20),
        "four full results",
    )?;
    Ok(())
}

fn an_argument_too_large_for_the_memory_cap_fails_instead_of_looping() -> TestResult {
    let pool = Pool::builder()
        .processes(1)
        .max_memory_per_child(256 << 20)
        .build()?;
    let huge = "x".repeat(300 << 20);
    let outcome = support::within(Duration::from_mins(2), "an oversized argument", move || {
        pool.apply(text_len, (huge,)).map(|_| pool)
    })?;
    let err = outcome.expect_err("no worker can receive it");
    assert_eq!(err.kind(), ErrorKind::Crashed, "{err}");
    ensure(
        err.to_string().contains("max_memory_per_child"),
        err.to_string(),
    )?;
    Ok(())
}

#[task]
fn bytes_len(data: serde_bytes::ByteBuf) -> usize {
    data.len()
}

/// Shared-memory regions for large frames must not eat into `max_memory_per_child`: an
/// argument well within the cap (the worker holds it twice: as received and decoded) runs,
/// its frame taking the socket rather than regions of a worker's address space.
fn a_large_argument_within_the_memory_cap_runs() -> TestResult {
    let pool = Pool::builder()
        .processes(1)
        .max_memory_per_child(512 << 20)
        .build()?;
    let data = serde_bytes::ByteBuf::from(vec![1u8; 160 << 20]);
    let len = support::within(Duration::from_mins(2), "a large argument", move || {
        pool.apply(bytes_len, (data,))
    })??;
    assert_eq!(len, 160 << 20);
    Ok(())
}

fn a_hanging_initializer_is_bounded_by_the_start_timeout() -> TestResult {
    build_fails_at_the_start_timeout(hang_forever, "start-up timeout")
}

/// Builds a pool of one whose `initializer` never answers, under a start timeout of one
/// second: the build must fail, of kind `Spawn`, with `expected` in its message.
fn build_fails_at_the_start_timeout<T>(initializer: T, expected: &str) -> TestResult
where
    T: multiproc::Task<Args = ()> + Send + 'static,
{
    let built = support::within(
        Duration::from_mins(1),
        "build with an initializer that never answers",
        move || {
            Pool::builder()
                .processes(1)
                .start_timeout(Duration::from_secs(1))
                .initializer(initializer, ())
                .build()
                .map(drop)
        },
    )?;
    let err = built.expect_err("the initializer never answers");
    assert_eq!(err.kind(), ErrorKind::Spawn);
    ensure(err.to_string().contains(expected), err.to_string())
}

/// Replaces the worker with `sleep 120`: its channel (close-on-exec) closes, the process
/// lingers.
#[task]
fn exec_sleep() {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("sleep").arg("120").exec();
    panic!("exec failed: {err}");
}

/// An initializer that closes its worker's channel and lingers (here by exec'ing another
/// program) fails the start at the start timeout, instead of holding it until that
/// program exits.
fn an_initializer_that_execs_away_is_bounded_by_the_start_timeout() -> TestResult {
    build_fails_at_the_start_timeout(exec_sleep, "without the worker exiting")
}

fn work_put_back_after_close_fails_when_no_worker_is_left() -> TestResult {
    let marker = temp_path("init-marker");
    let _ = std::fs::remove_file(&marker);
    let pool = Pool::builder()
        .processes(2)
        .initializer(init_unless_marker, (marker.clone(),))
        .build()?;
    let (gate, report) = (support::Gate::new(), support::Gate::new());
    // One chunk of two items: item 0 holds its worker at the gate, item 1 waits behind it.
    let items = [
        (report.path(), gate.path(), 0),
        (report.path(), gate.path(), 1),
    ];
    let result = pool
        .with_chunking(Chunking::Fixed(2))
        .map_async(abort_after_gate, items);
    // The gated item reports its worker's pid; the other worker is idle.
    let busy: u32 = std::fs::read_to_string(report.path())?.trim().parse()?;
    pool.close();
    for idle in pool.worker_pids().into_iter().filter(|&pid| pid != busy) {
        ensure(
            wait_gone(idle, Duration::from_secs(30)),
            "the idle worker left the closed pool",
        )?;
    }
    // From now on no worker can start; item 0 crashes its worker and item 1 goes back in line.
    std::fs::write(&marker, b"no more")?;
    gate.open();
    let resolved = result.wait_timeout(Duration::from_mins(1));
    let _ = std::fs::remove_file(&marker);
    ensure(
        resolved,
        "the put-back item resolved instead of waiting for a worker forever",
    )?;
    let err = result.get().expect_err("item 0 crashed");
    assert_eq!((err.kind(), err.index()), (ErrorKind::Crashed, Some(0)));
    Ok(())
}

/// Items 1 000 to 1 003 abort their worker; the others return at once.
#[task]
fn abort_in_a_row(x: u64) -> u64 {
    if (1000..1004).contains(&x) {
        std::process::abort();
    }
    x
}

/// A worker runs the short chunks it has queued before it answers, so when an item crashes,
/// chunks ahead of it in the same batch have finished but their outcomes are lost: they run
/// again, and must not be charged with the death, however many workers die in a row (the
/// culprit is known each time). Four crashes in a row, without and with retries (sixteen
/// deaths), fail only the items that crashed.
fn crashes_in_a_row_fail_no_innocent_item() -> TestResult {
    let pool = Pool::new(1)?;
    for retries in [0, 3] {
        let out = pool
            .with_chunking(Chunking::Fixed(1))
            .with_retries(retries)
            .imap(abort_in_a_row, 0..1100);
        for (i, item) in (0u64..).zip(out) {
            match item {
                Ok(value) => ensure(value == i, format!("item {i}: {value}"))?,
                Err(err) => ensure(
                    (1000..1004).contains(&i) && err.kind() == ErrorKind::Crashed,
                    format!("retries {retries}, item {i} failed: {err}"),
                )?,
            }
        }
    }
    Ok(())
}

fn random_kills_lose_and_duplicate_nothing() -> TestResult {
    const ITEMS: u64 = 10_000;
    const KILLS: usize = 50;
    let pool = std::sync::Arc::new(Pool::new(2)?);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (pool, done) = (std::sync::Arc::clone(&pool), std::sync::Arc::clone(&done));
        std::thread::spawn(move || {
            let mut kills = 0;
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            while kills < KILLS && !done.load(std::sync::atomic::Ordering::Relaxed) {
                let pids = pool.worker_pids();
                if pids.is_empty() {
                    std::thread::yield_now();
                    continue;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let victim = pids[(seed % pids.len() as u64) as usize];
                let pid = nix::unistd::Pid::from_raw(victim.cast_signed());
                if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    kills += 1;
                    // Wait for this death (an event) before choosing the next victim.
                    wait_gone(victim, Duration::from_secs(10));
                }
            }
            kills
        })
    };
    let mut seen = 0u64;
    let mut crashed = 0;
    for (i, item) in pool.imap(slow_item, 0..ITEMS).enumerate() {
        match item {
            Ok(value) => assert_eq!(value, i as u64, "item {i} out of place"),
            Err(err) => {
                assert_eq!(
                    (err.kind(), err.index()),
                    (ErrorKind::Crashed, Some(i)),
                    "{err}"
                );
                crashed += 1;
            }
        }
        seen += 1;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.join().expect("killer");
    assert_eq!(seen, ITEMS, "every item reported exactly once");
    ensure(
        crashed <= kills,
        format!("{crashed} crashed items for {kills} kills"),
    )?;
    eprintln!("fault injection: {kills} kills, {crashed} items reported as crashed");
    assert_eq!(pool.map(square, [5])?, vec![25]);
    Ok(())
}

/// Records that item `x` ran (a side effect: a line appended to `log`); item `x` aborts its
/// worker when `x % every == every - 1`.
#[task]
fn record_then_maybe_abort(log: String, x: u64, every: u64) -> u64 {
    use std::io::Write;
    if x % every == every - 1 {
        std::process::abort();
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .expect("open the log");
    file.write_all(format!("{x}\n").as_bytes()).expect("append");
    x
}

/// Under a deadline, a worker answers each chunk as it ends: with chunks of one item, a
/// crash then fails the item that crashed and runs no other twice (the README's advice for
/// side effects that must not repeat). Frequent crashes, some while the pool writes the
/// next chunks to the dying worker: the results it sent before are read first.
fn with_a_deadline_chunks_of_one_never_run_twice() -> TestResult {
    const ITEMS: u64 = 2000;
    for (workers, every, rounds) in [(1, 500, 1), (2, 10, 3)] {
        for round in 0..rounds {
            let log = temp_path(&format!("side-effects-{every}-{round}"));
            let _ = std::fs::remove_file(&log);
            let pool = Pool::new(workers)?;
            let err = pool
                .with_chunking(Chunking::Fixed(1))
                .with_timeout(Duration::from_mins(1))
                .starmap(
                    record_then_maybe_abort,
                    (0..ITEMS).map(|x| (log.clone(), x, every)),
                )
                .expect_err("items crash");
            ensure(
                err.kind() == ErrorKind::Crashed && err.index() == Some(every as usize - 1),
                err.to_string(),
            )?;
            let text = std::fs::read_to_string(&log)?;
            let _ = std::fs::remove_file(&log);
            let mut runs = vec![0u32; ITEMS as usize];
            for line in text.lines() {
                runs[line.parse::<usize>()?] += 1;
            }
            let twice: Vec<usize> = (0..runs.len()).filter(|&x| runs[x] > 1).collect();
            let never: Vec<usize> = (0..runs.len())
                .filter(|&x| runs[x] == 0 && x as u64 % every != every - 1)
                .collect();
            ensure(
                twice.is_empty() && never.is_empty(),
                format!(
                    "crash every {every}, round {round}: ran twice: {:?}; never ran: {:?}",
                    &twice[..twice.len().min(20)],
                    &never[..never.len().min(20)]
                ),
            )?;
        }
    }
    Ok(())
}

#[multiproc::main]
fn main() {
    support::run(tests![
        a_closing_pool_starts_no_replacement_it_cannot_use,
        with_a_deadline_a_finished_item_whose_outcome_was_lost_does_not_run_again,
        with_a_deadline_chunks_of_one_never_run_twice,
        crashes_in_a_row_fail_no_innocent_item,
        an_initializer_that_execs_away_is_bounded_by_the_start_timeout,
        abort_segfault_exit_are_crashes_of_one_item,
        a_crash_is_seen_while_a_process_the_task_forked_holds_the_channel,
        an_initializer_crashing_behind_a_forked_process_fails_the_start_at_once,
        timeout_kills_the_task_and_what_it_started,
        per_call_timeout,
        memory_cap_ends_a_runaway_task,
        retries_run_a_crashed_task_again,
        stderr_tail_is_quoted,
        the_quote_keeps_what_went_wrong_before_a_backtrace,
        a_call_fails_when_no_worker_of_three_can_start,
        workers_are_recycled_after_max_tasks,
        initializer_runs_in_every_worker,
        failing_initializer_is_a_clear_error,
        random_kills_lose_and_duplicate_nothing,
        a_timed_call_behind_short_chunks_still_times_out,
        a_task_done_in_time_is_not_killed_while_its_result_arrives,
        an_argument_too_large_for_the_memory_cap_fails_instead_of_looping,
        a_pool_runs_as_soon_as_its_first_worker_is_ready,
        a_closed_pool_with_a_worker_that_never_started_refuses_work_as_closed,
        a_large_argument_within_the_memory_cap_runs,
        a_hanging_initializer_is_bounded_by_the_start_timeout,
        work_put_back_after_close_fails_when_no_worker_is_left,
    ]);
}
