//! The core: `#[task]`, `Pool::map`, `starmap`, `apply`, panics, a worker killed from outside.

// Test functions share one signature for the harness, fallible or not.
#![allow(clippy::unnecessary_wraps)]

mod support;

use multiproc::{Chunking, ErrorKind, Pool, task};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use support::{TestResult, ensure, within};

/// An argument whose `Serialize` fails for 5 and panics for 7 (both in the parent, while
/// the call encodes its input).
#[derive(Deserialize, Debug)]
struct Awkward(u64);

impl Serialize for Awkward {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            5 => Err(serde::ser::Error::custom("five refuses to be encoded")),
            7 => panic!("seven explodes while being encoded"),
            x => s.serialize_u64(x),
        }
    }
}

#[task]
fn unwrap_awkward(value: Awkward) -> u64 {
    value.0
}

#[task]
fn square(x: u64) -> u64 {
    x * x
}

#[task]
fn pow(x: u64, y: u32) -> u64 {
    x.pow(y)
}

#[task]
fn answer() -> u64 {
    42
}

#[task]
fn nothing(_x: u8) {}

// Eight arguments is the point of this task.
#[allow(clippy::too_many_arguments, clippy::many_single_char_names)]
#[task]
fn eight(a: u8, b: u16, c: u32, d: u64, e: i8, f: i16, g: i32, h: i64) -> i128 {
    i128::from(a)
        + i128::from(b)
        + i128::from(c)
        + i128::from(d)
        + i128::from(e)
        + i128::from(f)
        + i128::from(g)
        + i128::from(h)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u32,
    customer: String,
    lines: Vec<(String, u32)>,
    note: Option<String>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Invoice {
    id: u32,
    total: u64,
    summary: BTreeMap<String, u32>,
}

#[task]
fn invoice(order: Order, unit_price: u64) -> Invoice {
    let total = order
        .lines
        .iter()
        .map(|(_, qty)| u64::from(*qty) * unit_price)
        .sum();
    let summary = order.lines.into_iter().collect();
    Invoice {
        id: order.id,
        total,
        summary,
    }
}

#[task]
fn shout(words: Vec<String>, suffix: Option<char>) -> Option<String> {
    if words.is_empty() {
        return None;
    }
    let mut out = words.join(" ").to_uppercase();
    out.extend(suffix);
    Some(out)
}

#[task]
fn fragile(x: u64) -> u64 {
    assert!(x != 13, "unlucky number {x}");
    x + 1
}

/// Item 1 panics and catches its own panic; item 2 unwinds with `resume_unwind`, which
/// skips the panic hook; the others return.
#[task]
fn catch_then_resume(x: u64) -> u64 {
    match x {
        1 => std::panic::catch_unwind(|| panic!("caught in item 1")).unwrap_or(1),
        2 => std::panic::resume_unwind(Box::new("resumed in item 2")),
        _ => x,
    }
}

#[task(name = "custom::renamed")]
fn renamed(x: i32) -> i32 {
    -x
}

mod nested {
    pub mod deeper {
        #[multiproc::task]
        pub fn triple(x: u32) -> u32 {
            x * 3
        }
    }
}

static EXIT_MARKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

extern "C" fn write_exit_marker() {
    if let Some(path) = EXIT_MARKER.get() {
        let _ = std::fs::write(path, std::process::id().to_string());
    }
}

/// Registers an at-exit handler in this worker, as a coverage runtime does to write its
/// profile when the process exits normally.
#[task]
fn arm_exit_marker(path: String) -> u32 {
    EXIT_MARKER.set(path).expect("armed once per worker");
    // SAFETY: registers a plain extern "C" function with no arguments, as atexit expects.
    assert_eq!(unsafe { nix::libc::atexit(write_exit_marker) }, 0);
    std::process::id()
}

const PLAIN_MAIN: &str = "MULTIPROC_TEST_PLAIN_MAIN";
/// Run as a program that prints the executable its pool's workers run.
const PRINT_WORKER_EXE: &str = "MULTIPROC_TEST_PRINT_WORKER_EXE";

#[task]
fn own_executable() -> String {
    std::fs::read_link("/proc/self/exe")
        .expect("/proc/self/exe")
        .to_string_lossy()
        .into_owned()
}

/// `MULTIPROC_WORKER_EXE` (for profilers that cannot run `/proc/self/exe`) makes workers
/// start from the named copy of the program.
fn workers_start_from_the_executable_named_by_the_environment() -> TestResult {
    let copy = std::env::temp_dir().join(format!("multiproc-worker-exe-{}", std::process::id()));
    std::fs::copy(std::env::current_exe()?, &copy)?;
    let output = std::process::Command::new(std::env::current_exe()?)
        .env(PRINT_WORKER_EXE, "1")
        .env("MULTIPROC_WORKER_EXE", &copy)
        .output()?;
    let _ = std::fs::remove_file(&copy);
    let printed = String::from_utf8_lossy(&output.stdout);
    ensure(
        output.status.success() && printed.trim() == copy.to_string_lossy(),
        format!(
            "workers ran {printed:?}, expected {}; stderr: {}",
            copy.display(),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Run as a program that starts a pool with a one-second start timeout and prints how the
/// start ended.
const BUILD_POOL: &str = "MULTIPROC_TEST_BUILD_POOL";

/// A worker that closes its channel but does not exit (here, a script that reads the first
/// frame from its stdin, where the channel arrives, closes it and sleeps for two minutes)
/// fails the start within the start timeout, and is killed: the start does not wait for it
/// to exit.
fn a_worker_that_closes_its_channel_and_lingers_fails_within_the_start_timeout() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let script = std::env::temp_dir().join(format!("multiproc-lingering-{}", std::process::id()));
    std::fs::write(
        &script,
        "#!/bin/sh\nhead -c 6 >/dev/null\nexec 0<&-\nexec sleep 120\n",
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let exe = std::env::current_exe()?;
    let output = within(Duration::from_mins(1), "a start with a lingering worker", {
        let script = script.clone();
        move || {
            std::process::Command::new(exe)
                .env(BUILD_POOL, "1")
                .env("MULTIPROC_WORKER_EXE", &script)
                .output()
        }
    })??;
    let _ = std::fs::remove_file(&script);
    let printed = String::from_utf8_lossy(&output.stdout);
    ensure(
        output.status.success()
            && printed.contains("start failed: Spawn")
            && printed.contains("without exiting, and was killed"),
        format!(
            "printed {printed:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Starts this very program again, as a task may start any program built with multiproc.
#[task]
fn run_this_program_again() -> String {
    let output = std::process::Command::new(std::env::current_exe().expect("current exe"))
        .env(PLAIN_MAIN, "1")
        .output()
        .expect("run it");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[task]
fn worker_pid() -> u32 {
    std::process::id()
}

/// What a task finds on stdin, and the signal disposition of SIGINT, in its worker.
#[task]
fn stdin_and_sigint() -> (usize, bool) {
    use std::io::Read;
    let mut input = Vec::new();
    let read = std::io::stdin()
        .read_to_end(&mut input)
        .map_or(usize::MAX, |_| input.len());
    // SAFETY: reads the current disposition by setting it to itself.
    let ignored = unsafe {
        let previous = nix::libc::signal(nix::libc::SIGINT, nix::libc::SIG_IGN);
        nix::libc::signal(nix::libc::SIGINT, previous);
        previous == nix::libc::SIG_IGN
    };
    (read, ignored)
}

/// The channel reaches a worker as its stdin (so that it can be started with `posix_spawn`),
/// but a task must find an empty stdin there, not the protocol; and SIGINT stays ignored.
fn a_task_reads_an_empty_stdin_and_ignores_sigint() -> TestResult {
    let (seen, after) = within(Duration::from_mins(1), "reading stdin in a task", || {
        let pool = Pool::new(1)?;
        let seen = pool.apply(stdin_and_sigint, ())?;
        // The channel still works after the task read stdin to its end.
        Ok::<_, multiproc::Error>((seen, pool.apply(square, (5,))?))
    })??;
    assert_eq!(seen, (0, true));
    assert_eq!(after, 25);
    Ok(())
}

fn seed_example() -> TestResult {
    let pool = Pool::new(4)?;
    assert_eq!(pool.map(square, [1, 2, 3, 4, 5])?, vec![1, 4, 9, 16, 25]);
    assert_eq!(pool.starmap(pow, [(1, 3), (2, 4)])?, vec![1, 16]);
    assert_eq!(pool.apply(pow, (2, 10))?, 1024);
    assert_eq!(square(3), 9);
    Ok(())
}

fn map_100_000_items() -> TestResult {
    let pool = Pool::new(2)?;
    let out = pool.map(square, 0..100_000u64)?;
    ensure(out.len() == 100_000, "length")?;
    for (i, value) in out.into_iter().enumerate() {
        ensure(
            value == (i as u64) * (i as u64),
            format!("item {i} is {value}"),
        )?;
    }
    Ok(())
}

fn empty_input() -> TestResult {
    let pool = Pool::new(2)?;
    ensure(
        pool.map(square, Vec::<u64>::new())?.is_empty(),
        "map of nothing",
    )?;
    ensure(
        pool.starmap(pow, Vec::new())?.is_empty(),
        "starmap of nothing",
    )?;
    Ok(())
}

fn zero_and_eight_arguments_and_unit() -> TestResult {
    let pool = Pool::new(2)?;
    assert_eq!(pool.apply(answer, ())?, 42);
    assert_eq!(pool.map(nothing, [1, 2, 3])?, vec![(), (), ()]);
    assert_eq!(pool.apply(eight, (1, 2, 3, 4, -5, -6, -7, -8))?, -16);
    Ok(())
}

fn structs_strings_vecs_options() -> TestResult {
    let pool = Pool::new(2)?;
    let orders: Vec<Order> = (0..50)
        .map(|id| Order {
            id,
            customer: format!("customer {id} ✓"),
            lines: vec![("apple".into(), id), ("pear".into(), 2)],
            note: (id % 2 == 0).then(|| "even".to_string()),
        })
        .collect();
    let args: Vec<(Order, u64)> = orders.iter().cloned().map(|o| (o, 3)).collect();
    let invoices = pool.starmap(invoice, args)?;
    for (order, got) in orders.into_iter().zip(invoices) {
        assert_eq!(got, invoice(order, 3));
    }
    let phrases = pool.starmap(
        shout,
        [
            (vec!["hi".to_string(), "there".to_string()], Some('!')),
            (vec![], None),
        ],
    )?;
    assert_eq!(phrases, vec![Some("HI THERE!".to_string()), None]);
    Ok(())
}

/// Another item's panic never stands for this one's: a panic the task caught itself (item 1)
/// is not reported for a later one that skips the panic hook (item 2, `resume_unwind`).
fn a_panic_is_reported_as_its_own() -> TestResult {
    let pool = Pool::new(1)?;
    let out: Vec<_> = pool
        .with_chunking(Chunking::Fixed(3))
        .imap(catch_then_resume, [1, 2, 3])
        .collect();
    let [Ok(1), Err(err), Ok(3)] = &out[..] else {
        return Err(format!("expected 1, an error, 3: {out:?}").into());
    };
    assert_eq!((err.kind(), err.index()), (ErrorKind::Panicked, Some(1)));
    assert_eq!(err.message(), "resumed in item 2");
    assert_eq!(err.location(), None, "{err}");
    Ok(())
}

fn panic_is_an_error_and_pool_lives_on() -> TestResult {
    let pool = Pool::new(2)?;
    let err = pool.map(fragile, 0..20).expect_err("item 13 panics");
    assert_eq!(err.kind(), ErrorKind::Panicked);
    assert_eq!(err.index(), Some(13));
    ensure(
        err.task().is_some_and(|t| t.ends_with("::fragile")),
        format!("task name: {err}"),
    )?;
    ensure(
        err.message().contains("unlucky number 13"),
        format!("message: {err}"),
    )?;
    ensure(
        err.location().is_some_and(|l| l.contains("pool_map.rs")),
        format!("location: {err}"),
    )?;
    let text = err.to_string();
    ensure(
        text.contains("panicked at") && text.contains("unlucky number 13"),
        text,
    )?;
    // The same pool, the same workers, keep working.
    let pids = pool.worker_pids();
    assert_eq!(pool.map(fragile, [1, 2, 3])?, vec![2, 3, 4]);
    assert_eq!(pool.worker_pids(), pids, "a panic must not cost a worker");
    Ok(())
}

fn killed_idle_worker_is_replaced() -> TestResult {
    let pool = Pool::new(2)?;
    assert_eq!(pool.map(square, [1, 2, 3])?, vec![1, 4, 9]);
    let victim = pool.worker_pids()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.cast_signed()),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    // Dead before the next call: its slot finds out only when it sends the next chunk.
    ensure(
        support::wait_gone(victim, std::time::Duration::from_secs(10)),
        "the kill took",
    )?;
    // The next calls succeed: the dead worker's slot starts a replacement.
    for _ in 0..3 {
        assert_eq!(
            pool.map(square, 0..100u64)?,
            (0..100u64).map(|x| x * x).collect::<Vec<_>>()
        );
    }
    ensure(
        !pool.worker_pids().contains(&victim),
        "the killed worker is gone from the pool",
    )?;
    Ok(())
}

fn tasks_run_in_other_processes() -> TestResult {
    let pool = Pool::new(2)?;
    let pids: std::collections::HashSet<u32> = pool
        .starmap(worker_pid, vec![(); 50])?
        .into_iter()
        .collect();
    ensure(!pids.contains(&std::process::id()), "ran in the parent")?;
    let workers: std::collections::HashSet<u32> = pool.worker_pids().into_iter().collect();
    ensure(
        pids.is_subset(&workers),
        format!("{pids:?} not within {workers:?}"),
    )?;
    Ok(())
}

fn names_override_and_nesting() -> TestResult {
    use multiproc::Task;
    assert_eq!(<renamed as Task>::NAME, "custom::renamed");
    assert_eq!(<square as Task>::NAME, "pool_map::square");
    assert_eq!(
        <nested::deeper::triple as Task>::NAME,
        "pool_map::nested::deeper::triple"
    );
    let pool = Pool::new(1)?;
    assert_eq!(pool.map(renamed, [1, -2])?, vec![-1, 2]);
    assert_eq!(pool.map(nested::deeper::triple, [1, 2])?, vec![3, 6]);
    Ok(())
}

fn still_an_ordinary_function() -> TestResult {
    assert_eq!(square(12), 144);
    assert_eq!(pow(3, 3), 27);
    let doubled: Vec<u64> = [1, 2, 3].into_iter().map(*square).collect();
    assert_eq!(doubled, vec![1, 4, 9]);
    Ok(())
}

fn close_join_lets_work_finish() -> TestResult {
    let pool = Pool::new(2)?;
    let pending = pool.map_async(square, 0..1000u64);
    pool.close();
    pool.join();
    ensure(pending.ready(), "close + join waits for queued work")?;
    assert_eq!(pending.get()?.len(), 1000);
    let refused = pool
        .map(square, [1])
        .expect_err("a closed pool refuses work");
    assert_eq!(refused.kind(), ErrorKind::Closed);
    Ok(())
}

/// A call of no items is refused by a closed pool too (as Python's), and is empty on a
/// running one.
fn a_closed_pool_refuses_calls_of_no_items() -> TestResult {
    let pool = Pool::new(1)?;
    ensure(pool.map(square, Vec::<u64>::new())?.is_empty(), "map")?;
    ensure(
        pool.imap(square, Vec::<u64>::new()).next().is_none(),
        "imap",
    )?;
    // Made before `close()`: it just ends, as a call of items made then runs.
    let before = pool.imap(square, Vec::<u64>::new());
    pool.close();
    ensure(before.count() == 0, "an empty imap made before close")?;
    let refused_async = pool.map_async(square, Vec::<u64>::new());
    ensure(
        refused_async.successful() == Some(false),
        "a refused call is not successful",
    )?;
    let refused = [
        pool.map(square, Vec::<u64>::new()).map(|_| ()),
        pool.starmap(pow, Vec::<(u64, u32)>::new()).map(|_| ()),
        refused_async.get().map(|_| ()),
    ];
    for outcome in refused {
        let err = outcome.expect_err("refused");
        ensure(
            err.kind() == ErrorKind::Closed && err.task().is_some() && err.index().is_none(),
            format!("{err:?}"),
        )?;
    }
    for ordered in [true, false] {
        let mut stream = if ordered {
            pool.imap(square, Vec::<u64>::new())
        } else {
            pool.imap_unordered(square, Vec::<u64>::new())
        };
        let err = stream.next().expect("one error").expect_err("refused");
        ensure(err.kind() == ErrorKind::Closed, format!("{err:?}"))?;
        ensure(stream.next().is_none(), "then the end")?;
    }
    pool.join();
    Ok(())
}

fn drop_leaves_no_worker_behind() -> TestResult {
    let pool = Pool::new(3)?;
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 3);
    drop(pool);
    for pid in pids {
        ensure(
            !support::alive(pid),
            format!("worker {pid} outlived its pool"),
        )?;
    }
    Ok(())
}

fn dropping_an_idle_pool_lets_workers_exit_normally() -> TestResult {
    let path = std::env::temp_dir()
        .join(format!("multiproc-exit-marker-{}", std::process::id()))
        .to_string_lossy()
        .into_owned();
    let _ = std::fs::remove_file(&path);
    let pool = Pool::new(1)?;
    let pid = pool.apply(arm_exit_marker, (path.clone(),))?;
    drop(pool); // terminates, but the worker is idle: it exits normally
    let marker = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    ensure(
        marker.ok() == Some(pid.to_string()),
        "the worker's at-exit handler ran",
    )?;
    Ok(())
}

fn a_task_can_start_another_multiproc_program() -> TestResult {
    let pool = Pool::new(1)?;
    // The worker's own start-up variables must not leak into it: it runs its `main`.
    assert_eq!(pool.apply(run_this_program_again, ())?, "plain main ran\n");
    Ok(())
}

fn builder_and_default_size() -> TestResult {
    let pool = Pool::builder().build()?;
    let expected = std::thread::available_parallelism()?.get();
    assert_eq!(pool.processes(), expected);
    assert_eq!(pool.worker_pids().len(), expected);
    let err = Pool::new(0).expect_err("zero processes");
    assert_eq!(err.kind(), ErrorKind::Spawn);
    // Without polling before sleeping, with a long window, and with one too long to add to
    // a clock reading (it polls until done): the same results, and no overflow.
    for window in [Duration::ZERO, Duration::from_millis(5), Duration::MAX] {
        let pool = Pool::builder().processes(2).spin(window).build()?;
        assert_eq!(pool.apply(square, (9,))?, 81);
        assert_eq!(pool.map(square, 0..1000)?[999], 999 * 999);
        assert_eq!(
            pool.imap(square, 0..10).map(Result::unwrap).sum::<u64>(),
            285
        );
    }
    // Durations too long to add to a clock reading mean "no limit", never a panic.
    let pool = Pool::builder()
        .processes(1)
        .start_timeout(Duration::MAX)
        .build()?;
    let pending = pool.apply_async(square, (4,));
    assert!(pending.wait_timeout(Duration::MAX));
    assert_eq!(pending.get_timeout(Duration::MAX)?, 16);
    Ok(())
}

fn explicit_chunking() -> TestResult {
    use multiproc::Chunking;
    let pool = Pool::new(2)?;
    for size in [1, 7, 1000] {
        let out = pool
            .with_chunking(Chunking::Fixed(size))
            .map(square, 0..500u64)?;
        assert_eq!(out, (0..500u64).map(|x| x * x).collect::<Vec<_>>());
    }
    Ok(())
}

/// Arguments that cannot be encoded fail their own items, whatever the chunking, and the
/// stream goes on: neither the items that share their chunk nor the caller (a panicking
/// `Serialize`) suffer for it.
fn an_argument_that_cannot_be_encoded_fails_only_its_item() -> TestResult {
    let pool = Pool::new(2)?;
    for chunking in [Chunking::Auto, Chunking::Fixed(1), Chunking::Fixed(4)] {
        for ordered in [true, false] {
            let call = pool.with_chunking(chunking);
            let input = (0..12).map(Awkward);
            let out: Vec<(u64, Result<u64, multiproc::Error>)> = if ordered {
                (0..12).zip(call.imap(unwrap_awkward, input)).collect()
            } else {
                // Unordered: the item comes from the value, or from the error's index.
                call.imap_unordered(unwrap_awkward, input)
                    .map(|r| match &r {
                        Ok(x) => (*x, r),
                        Err(err) => (err.index().expect("an index") as u64, r),
                    })
                    .collect()
            };
            let mut seen: Vec<u64> = out.iter().map(|(x, _)| *x).collect();
            seen.sort_unstable();
            ensure(
                seen == (0..12).collect::<Vec<_>>(),
                format!("{chunking:?}, ordered {ordered}: items {seen:?}"),
            )?;
            for (x, result) in out {
                match (x, result) {
                    (5 | 7, Err(err)) => {
                        ensure(
                            err.kind() == ErrorKind::Codec && err.index() == Some(x as usize),
                            format!("{chunking:?}: item {x}: {err}"),
                        )?;
                        // (postcard keeps no message for a custom error: only the panic's.)
                        if x == 7 {
                            ensure(
                                err.to_string().contains("seven explodes"),
                                format!("item 7: {err}"),
                            )?;
                        }
                    }
                    (x, Ok(value)) if x != 5 && x != 7 => ensure(value == x, "value")?,
                    (x, other) => {
                        return Err(format!("{chunking:?}: item {x}: {other:?}").into());
                    }
                }
            }
        }
    }
    Ok(())
}

/// `map` returns the error of the first item whose arguments cannot be encoded, by its
/// position.
fn map_names_the_item_whose_arguments_cannot_be_encoded() -> TestResult {
    let pool = Pool::new(2)?;
    for chunking in [Chunking::Auto, Chunking::Fixed(4)] {
        let err = pool
            .with_chunking(chunking)
            .map(unwrap_awkward, (0..12).map(Awkward))
            .expect_err("items 5 and 7 cannot be encoded");
        ensure(
            err.kind() == ErrorKind::Codec && err.index() == Some(5),
            format!("{chunking:?}: {err}"),
        )?;
    }
    Ok(())
}

#[multiproc::main]
fn main() {
    if std::env::var_os(PLAIN_MAIN).is_some() {
        println!("plain main ran");
        return;
    }
    if std::env::var_os(BUILD_POOL).is_some() {
        let started = Pool::builder()
            .processes(1)
            .start_timeout(Duration::from_secs(1))
            .build();
        match started {
            Ok(_) => println!("started"),
            Err(err) => println!("start failed: {:?}: {err}", err.kind()),
        }
        return;
    }
    if std::env::var_os(PRINT_WORKER_EXE).is_some() {
        let pool = Pool::new(1).expect("a pool");
        println!("{}", pool.apply(own_executable, ()).expect("a task"));
        return;
    }
    support::run(tests![
        an_argument_that_cannot_be_encoded_fails_only_its_item,
        map_names_the_item_whose_arguments_cannot_be_encoded,
        a_task_can_start_another_multiproc_program,
        a_task_reads_an_empty_stdin_and_ignores_sigint,
        workers_start_from_the_executable_named_by_the_environment,
        a_worker_that_closes_its_channel_and_lingers_fails_within_the_start_timeout,
        seed_example,
        map_100_000_items,
        empty_input,
        zero_and_eight_arguments_and_unit,
        structs_strings_vecs_options,
        panic_is_an_error_and_pool_lives_on,
        a_panic_is_reported_as_its_own,
        killed_idle_worker_is_replaced,
        tasks_run_in_other_processes,
        names_override_and_nesting,
        still_an_ordinary_function,
        close_join_lets_work_finish,
        a_closed_pool_refuses_calls_of_no_items,
        drop_leaves_no_worker_behind,
        dropping_an_idle_pool_lets_workers_exit_normally,
        builder_and_default_size,
        explicit_chunking,
    ]);
}
