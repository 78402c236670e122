//! A worker's stderr, forwarded to the program's (`runtime/src/stderr.rs`): whole lines,
//! nothing lost, in order with the errors that quote it, in a copy made by `fork`, without a
//! forwarding thread, and never in the way of a deadline. Each case runs as its own process
//! (this binary again), so that its stderr can be read.

mod support;

use multiproc::{Pool, PoolBuilder, StartMethod, task};
use std::io::Write;
use std::process::Command;
use support::{TestResult, ensure};

const SCENARIO: &str = "MULTIPROC_TEST_STDERR_SCENARIO";
const FIFO: &str = "MULTIPROC_TEST_STDERR_FIFO";

#[task]
fn say(line: String) -> u32 {
    eprintln!("{line}");
    std::process::id()
}

#[task]
fn square(x: u64) -> u64 {
    x * x
}

/// Writes `bytes` (rounded up to KiB) to stderr, in lines of 1 KiB; how many it wrote.
fn write_lines(bytes: usize) -> usize {
    let line = [b'f'; 1023];
    let mut err = std::io::stderr();
    let mut written = 0;
    while written < bytes {
        err.write_all(&line).unwrap();
        err.write_all(b"\n").unwrap();
        written += 1024;
    }
    written
}

/// Writes `bytes` to stderr, in lines of 1 KiB, and returns.
#[task]
fn flood(bytes: usize) -> usize {
    write_lines(bytes)
}

/// Returns at once; a thread of the worker waits until the FIFO is opened for writing, then
/// writes `note` (as is: no newline added) to stderr and ends the worker.
#[task]
fn linger(fifo: String, note: String) -> u32 {
    std::thread::spawn(move || {
        let _ = std::fs::File::open(&fifo);
        let _ = std::io::stderr().write_all(note.as_bytes());
        std::process::exit(0);
    });
    std::process::id()
}

fn method(name: &str) -> StartMethod {
    match name {
        "fork" => StartMethod::ForkServer,
        "spawn" => StartMethod::Spawn,
        other => panic!("unknown start method {other}"),
    }
}

fn scenario(which: &str) -> ! {
    let (scenario, name) = which.split_once(':').expect("scenario:method");
    let builder = Pool::builder().processes(1).start_method(method(name));
    match scenario {
        "fork-after-forwarding" => scenario_fork_after_forwarding(builder),
        "idle-death" => scenario_idle_death(builder),
        "leaks-and-long-lines" => scenario_leaks_and_long_lines(builder),
        "no-thread" => scenario_no_thread(builder),
        "full-after-limit" => scenario_full_stderr(builder, true),
        "full" => scenario_full_stderr(builder, false),
        "crash-order" => scenario_crash_order(builder),
        "spin-flood" => scenario_spin_flood(builder),
        other => panic!("unknown scenario {other}"),
    }
    std::process::exit(0);
}

/// The forwarding thread runs (a worker wrote to stderr); then the program forks, and the
/// copy starts a pool of its own (which `forkserver` documents as supported: it `exec`s its
/// workers), whose worker writes a line to stderr.
fn scenario_fork_after_forwarding(builder: PoolBuilder) {
    let pool = builder.clone().build().expect("pool");
    pool.apply(say, ("parent-before-fork".to_owned(),))
        .expect("apply");
    drop(pool);
    // SAFETY: the copy only starts a pool and exits, as `scenario_forked_child` in
    // tests/start_method.rs does.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let pool = builder.build().expect("pool in the copy");
            pool.apply(say, ("copy-worker-line".to_owned(),))
                .expect("apply in the copy");
            let started = std::time::Instant::now();
            drop(pool);
            println!("copy: drop took {:?}", started.elapsed());
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).expect("wait");
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
        }
    }
    println!("ok");
}

/// A worker that is idle (its slot does not watch it) writes to stderr for the first time
/// and exits; the next call finds it gone when it sends it a chunk.
fn scenario_idle_death(builder: PoolBuilder) {
    let fifo = std::env::var(FIFO).expect("fifo path");
    let pool = builder.build().expect("pool");
    for note in ["idle-death-with-newline\n", "idle-death-without-newline"] {
        let pid = pool
            .apply(linger, (fifo.clone(), note.to_owned()))
            .expect("apply");
        // Lets the worker's thread go on: it writes, then exits.
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .expect("fifo"),
        );
        // Waits for the worker's exit without reaping it (that is the pool's).
        nix::sys::wait::waitid(
            nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(pid.cast_signed())),
            nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
        )
        .expect("waitid");
        // Sent to the dead worker first: found out, replaced, run again.
        assert_eq!(pool.apply(square, (3,)).expect("apply after the death"), 9);
    }
    drop(pool);
    println!("ok");
}

/// Starts a process that holds this worker's stderr (and lives until it is killed).
#[allow(clippy::zombie_processes)]
#[task]
fn hold_stderr() -> u32 {
    let child = Command::new("sleep")
        .arg("600")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sleep");
    eprintln!("started a holder");
    child.id()
}

/// Writes a line of `len` bytes, 1000 at a time.
#[task]
fn long_line(len: usize) -> usize {
    let line = vec![b'x'; len];
    let mut err = std::io::stderr();
    for piece in line.chunks(1000) {
        err.write_all(piece).unwrap();
    }
    err.write_all(b"\n").unwrap();
    len
}

#[task]
fn crash_after(lines: usize, last: String) -> u8 {
    for i in 0..lines {
        eprintln!("filler {i:05} ..................................................");
    }
    eprintln!("{last}");
    std::process::abort();
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Workers that wrote to stderr and were replaced (60 of them), then workers whose tasks
/// started a process that holds their stderr past the pool: no pipe is left open once those
/// processes are gone; and a line of 4 MiB without a newline arrives whole.
fn scenario_leaks_and_long_lines(builder: PoolBuilder) {
    let pool = builder
        .clone()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .expect("pool");
    pool.with_chunking(multiproc::Chunking::Fixed(1))
        .map(say, (0..60).map(|i| format!("line {i}")))
        .expect("map");
    drop(pool);
    // The forwarding thread's wake-up pipe stays: counted from here.
    let before = fds();
    let pool = builder.clone().processes(2).build().expect("pool");
    let holders: Vec<u32> = (0..4)
        .map(|_| pool.apply(hold_stderr, ()).expect("hold"))
        .collect();
    drop(pool);
    for holder in holders {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder.cast_signed()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill a holder");
        assert!(
            support::wait_gone(holder, std::time::Duration::from_mins(1)),
            "a holder ended"
        );
    }
    // The forwarding thread closes each pipe at its end of stream, which has come.
    let limit = std::time::Instant::now() + std::time::Duration::from_mins(1);
    while fds() > before && std::time::Instant::now() < limit {
        std::thread::yield_now();
    }
    assert_eq!(fds(), before, "pipes left open");
    let pool = builder.processes(1).build().expect("pool");
    assert_eq!(pool.apply(long_line, (4 << 20,)).expect("long"), 4 << 20);
    pool.apply(say, ("after-the-long-line".to_owned(),))
        .expect("say");
    drop(pool);
    println!("ok");
}

/// Workers that crash after writing much to stderr: the error comes after their last
/// line (the program's next line follows it).
fn scenario_crash_order(builder: PoolBuilder) {
    let pool = builder.build().expect("pool");
    for i in 0..20 {
        let err = pool
            .apply(crash_after, (600, format!("LAST {i}")))
            .expect_err("crash");
        assert!(
            err.stderr_tail()
                .is_some_and(|tail| tail.ends_with(&format!("LAST {i}"))),
            "{err}"
        );
        eprintln!("MARK {i}");
    }
    drop(pool);
    println!("ok");
}

/// Writes `text` as is (no newline added), then goes on for a while: its result comes in
/// well after the slot's spin (50 us) is over, so the slot has polled its stderr first.
#[task]
fn write_then_work(text: String) -> u32 {
    std::io::stderr().write_all(text.as_bytes()).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_millis(20);
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
    std::process::id()
}

#[repr(C)]
struct Rlimit {
    cur: u64,
    max: u64,
}

unsafe extern "C" {
    fn setrlimit(resource: i32, limit: *const Rlimit) -> i32;
    fn getrlimit(resource: i32, limit: *mut Rlimit) -> i32;
    fn setresuid(ruid: u32, euid: u32, suid: u32) -> i32;
    fn geteuid() -> u32;
}

const RLIMIT_NPROC: i32 = 6;

/// No thread can be started when a worker first writes to stderr (a process or thread
/// limit reached): the forwarding falls back to the slot threads.
fn scenario_no_thread(builder: PoolBuilder) {
    let pool = builder.build().expect("pool");
    // The pool's threads exist from here.
    assert_eq!(pool.apply(square, (3,)).expect("apply"), 9);
    refuse_threads_while(|| {
        let a = pool
            .apply(write_then_work, ("worker-begins ".to_owned(),))
            .expect("apply");
        eprintln!("program-line");
        let b = pool
            .apply(write_then_work, ("worker-ends\n".to_owned(),))
            .expect("apply");
        assert_eq!(a, b, "one worker");
    });
    drop(pool);
    println!("ok");
}

/// Writes more than two pipes hold to stderr, then runs until it is stopped.
#[task]
fn flood_then_spin(bytes: usize) -> u8 {
    write_lines(bytes);
    loop {
        std::hint::spin_loop();
    }
}

/// Runs `f` while this process can start no thread: `RLIMIT_NPROC` at 0 (for root, which
/// the limit does not bind, as nobody, keeping root as the saved user id to come back).
fn refuse_threads_while<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { geteuid() } == 0;
    let mut old = Rlimit { cur: 0, max: 0 };
    // SAFETY: plain libc calls with valid pointers.
    unsafe {
        assert_eq!(getrlimit(RLIMIT_NPROC, &raw mut old), 0);
        let none = Rlimit {
            cur: 0,
            max: old.max,
        };
        assert_eq!(setrlimit(RLIMIT_NPROC, &raw const none), 0);
        if root {
            assert_eq!(setresuid(65534, 65534, 0), 0);
        }
    }
    assert!(
        std::thread::Builder::new().spawn(|| {}).is_err(),
        "threads are refused"
    );
    let out = f();
    // SAFETY: as above.
    unsafe {
        if root {
            assert_eq!(setresuid(0, 0, 0), 0);
        }
        assert_eq!(setrlimit(RLIMIT_NPROC, &raw const old), 0);
    }
    assert!(
        std::thread::Builder::new().spawn(|| {}).is_ok(),
        "threads again"
    );
    out
}

/// A task writes much to a stderr that takes nothing (a pipe nobody reads), then runs past
/// its deadline: the deadline is kept (the forwarding thread waits on the full stderr, the
/// slot thread does not). `transient`: threads were refused for one moment earlier, when a
/// worker first wrote to stderr.
fn scenario_full_stderr(builder: PoolBuilder, transient: bool) {
    let pool = builder
        .task_timeout(std::time::Duration::from_secs(2))
        .build()
        .expect("pool");
    assert_eq!(pool.apply(square, (3,)).expect("apply"), 9);
    if transient {
        refuse_threads_while(|| {
            pool.apply(say, ("said while threads are refused".to_owned(),))
                .expect("apply")
        });
    } else {
        pool.apply(say, ("said".to_owned(),)).expect("apply");
    }
    let saved = nix::unistd::dup(std::io::stderr()).expect("dup");
    let (_keep_reader, writer) = nix::unistd::pipe().expect("pipe");
    nix::unistd::dup2_stderr(&writer).expect("dup2");
    let pool = std::sync::Arc::new(pool);
    let (tx, rx) = std::sync::mpsc::channel();
    let caller = std::sync::Arc::clone(&pool);
    std::thread::spawn(move || {
        let _ = tx.send(
            caller
                .apply(flood_then_spin, (512 * 1024,))
                .map(|_| ())
                .map_err(|e| e.kind()),
        );
    });
    let outcome = rx.recv_timeout(std::time::Duration::from_secs(30));
    println!("outcome: {outcome:?}");
    let _ = std::io::stdout().flush();
    if outcome.is_err() {
        // The slot is stuck: leave without dropping the pool.
        std::process::exit(3);
    }
    nix::unistd::dup2_stderr(&saved).expect("dup2 back");
    println!("ok");
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

/// A caller that polls for its outcome for a long window (`spin`) still drains the stderr
/// of a task that writes more than the pipe holds before it returns.
fn scenario_spin_flood(builder: PoolBuilder) {
    let pool = builder
        .spin(std::time::Duration::from_mins(10))
        .build()
        .expect("pool");
    let written = pool.apply(flood, (256 * 1024,)).expect("apply");
    println!("flooded {written}");
    let _ = std::io::stdout().flush();
    drop(pool);
    std::process::exit(0);
}

/// Runs `scenario` with `method` (and `envs`): see [`support::run_self_within`].
fn run_scenario_within(
    scenario: &str,
    method: &str,
    envs: &[(&str, &str)],
    limit: std::time::Duration,
) -> Result<(std::process::ExitStatus, String, String), Box<dyn std::error::Error>> {
    let which = format!("{scenario}:{method}");
    let mut all = vec![(SCENARIO, which.as_str())];
    all.extend_from_slice(envs);
    support::run_self_within(&all, limit)
}

/// A copy of the program made with `fork` after the forwarding thread started has none of
/// its threads: it starts its own forwarder.
fn a_copy_made_by_fork_forwards_its_workers_stderr() -> TestResult {
    for method in ["fork", "spawn"] {
        let (status, stdout, stderr) = run_scenario_within(
            "fork-after-forwarding",
            method,
            &[],
            std::time::Duration::from_mins(1),
        )?;
        let context = format!("{method}: {status}\nstdout: {stdout}\nstderr: {stderr}");
        ensure(
            status.success() && stdout.lines().last() == Some("ok"),
            context.clone(),
        )?;
        ensure(
            stderr.lines().any(|line| line == "parent-before-fork"),
            context.clone(),
        )?;
        ensure(
            stderr.lines().any(|line| line == "copy-worker-line"),
            format!("the copy's worker's line did not reach stderr\n{context}"),
        )?;
    }
    Ok(())
}

/// A worker's first output, written while it was idle just before it exited, ends without
/// a newline: it must still reach stderr.
fn the_last_words_of_a_worker_that_died_idle_reach_stderr() -> TestResult {
    for method in ["fork", "spawn"] {
        let dir =
            std::env::temp_dir().join(format!("multiproc-stderr-{}-{method}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU)?;
        let result = run_scenario_within(
            "idle-death",
            method,
            &[(FIFO, fifo.to_str().expect("utf-8 path"))],
            std::time::Duration::from_mins(1),
        );
        let _ = std::fs::remove_dir_all(&dir);
        let (status, stdout, stderr) = result?;
        let context = format!("{method}: {status}\nstdout: {stdout}\nstderr: {stderr:?}");
        ensure(status.success() && stdout.trim() == "ok", context.clone())?;
        ensure(
            stderr.contains("idle-death-with-newline\n"),
            context.clone(),
        )?;
        ensure(
            stderr.contains("idle-death-without-newline"),
            format!("the worker's last, unended line did not reach stderr\n{context}"),
        )?;
    }
    Ok(())
}

fn no_pipe_is_left_open_and_a_long_line_arrives_whole() -> TestResult {
    let (status, stdout, stderr) = run_scenario_within(
        "leaks-and-long-lines",
        "fork",
        &[],
        std::time::Duration::from_mins(2),
    )?;
    ensure(
        status.success() && stdout.trim() == "ok",
        format!("{status}\nstdout: {stdout}"),
    )?;
    ensure(
        stderr
            .lines()
            .any(|line| line.len() == 4 << 20 && line.bytes().all(|b| b == b'x')),
        "the 4 MiB line arrived in one piece",
    )?;
    ensure(
        stderr.lines().any(|line| line == "after-the-long-line"),
        "the line after it",
    )
}

/// The error about a crash comes after the worker's last words on stderr.
fn a_crashed_workers_last_lines_come_before_its_error() -> TestResult {
    let (status, stdout, stderr) = run_scenario_within(
        "crash-order",
        "fork",
        &[],
        std::time::Duration::from_mins(1),
    )?;
    ensure(
        status.success() && stdout.trim() == "ok",
        format!("{status}\nstdout: {stdout}"),
    )?;
    let marks: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("LAST") || line.starts_with("MARK"))
        .collect();
    let expected: Vec<String> = (0..20)
        .flat_map(|i| [format!("LAST {i}"), format!("MARK {i}")])
        .collect();
    ensure(marks == expected, format!("{marks:?}"))
}

/// Without a forwarding thread (none can be started), lines are still whole.
fn a_line_is_whole_when_no_thread_can_start() -> TestResult {
    let (status, stdout, stderr) =
        run_scenario_within("no-thread", "fork", &[], std::time::Duration::from_mins(1))?;
    let context = format!("{status}\nstdout: {stdout}\nstderr: {stderr:?}");
    ensure(status.success() && stdout.trim() == "ok", context.clone())?;
    ensure(
        stderr.lines().any(|line| line == "program-line")
            && stderr
                .lines()
                .any(|line| line == "worker-begins worker-ends"),
        format!("a worker's line was cut by the program's\n{context}"),
    )
}

/// A thread limit reached once, when a worker first writes to stderr, does not turn the
/// forwarding into the slot threads' for the rest of the program: a task that floods a full
/// stderr still times out.
fn a_deadline_is_kept_with_a_full_stderr_after_threads_were_refused_once() -> TestResult {
    for scenario in ["full", "full-after-limit"] {
        let (status, stdout, stderr) =
            run_scenario_within(scenario, "fork", &[], std::time::Duration::from_mins(1))?;
        let stderr: String = stderr.chars().take(400).collect();
        ensure(
            status.success()
                && stdout.contains("outcome: Ok(Err(Timeout))")
                && stdout.trim_end().ends_with("ok"),
            format!("{scenario}: {status}\nstdout: {stdout}\nstderr: {stderr:?}"),
        )?;
    }
    Ok(())
}

/// A caller polling for its outcome without sleeping does not leave a task that floods its
/// stderr blocked until the window ends.
fn a_spinning_caller_drains_a_flooding_tasks_stderr() -> TestResult {
    for method in ["fork", "spawn"] {
        let (status, stdout, stderr) =
            run_scenario_within("spin-flood", method, &[], std::time::Duration::from_mins(1))?;
        let lines = stderr
            .lines()
            .filter(|line| *line == "f".repeat(1023))
            .count();
        ensure(
            status.success() && stdout.contains("flooded 262144") && lines == 256,
            format!("{method}: {status}, {lines} lines\nstdout: {stdout}"),
        )?;
    }
    Ok(())
}

#[multiproc::main]
fn main() {
    if let Ok(which) = std::env::var(SCENARIO) {
        scenario(&which);
    }
    support::run(tests![
        a_deadline_is_kept_with_a_full_stderr_after_threads_were_refused_once,
        a_line_is_whole_when_no_thread_can_start,
        no_pipe_is_left_open_and_a_long_line_arrives_whole,
        a_crashed_workers_last_lines_come_before_its_error,
        a_copy_made_by_fork_forwards_its_workers_stderr,
        the_last_words_of_a_worker_that_died_idle_reach_stderr,
        a_spinning_caller_drains_a_flooding_tasks_stderr,
    ]);
}
