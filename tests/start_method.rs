//! Both ways of starting a worker (`StartMethod`): a worker forked by the fork server and one
//! that runs the executable again see the same thing (the caller's environment and working
//! directory as they are when the pool starts, none of its state), report a crash the same
//! way, and the pool goes on with `exec` when the fork server is gone. Each case runs as
//! its own process (this binary again), single-threaded where it changes its environment.

mod support;

use multiproc::{Pool, PoolBuilder, StartMethod, task};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use support::{TestResult, alive, children, ensure};

const SCENARIO: &str = "MULTIPROC_TEST_START_SCENARIO";

/// Changed by the scenario's `main` before its pools start: a worker must not see that.
static STATE: AtomicU32 = AtomicU32::new(1);

/// What a worker sees of the world it was started in.
#[task]
fn observe(var: String) -> (Option<String>, String, u32, Vec<String>) {
    let dir =
        std::env::current_dir().map_or_else(|err| err.to_string(), |dir| dir.display().to_string());
    (
        std::env::var(var).ok(),
        dir,
        STATE.load(Ordering::SeqCst),
        std::env::args().collect(),
    )
}

#[task]
fn abort_with(note: String) -> u8 {
    eprintln!("{note}");
    std::process::abort();
}

/// Lines of [`noisy`]: 256 KiB in all, four times what a pipe holds.
const NOISY_LINES: usize = 4096;
const NOISY_LINE: &str = "a worker writes much to stderr .................................";

/// Writes `lines` lines of 64 bytes to stderr: an initializer that logs as much as a model
/// loader's progress, say.
#[task]
fn noisy(lines: usize) {
    for _ in 0..lines {
        eprintln!("{NOISY_LINE}");
    }
}

#[task]
fn own_pid() -> u32 {
    std::process::id()
}

#[task]
fn square(x: u64) -> u64 {
    x * x
}

/// Pins the calling thread to one CPU through glibc (`pthread_self`), then says what the
/// kernel thinks: this process's CPUs, and whether its robust-mutex list is registered. A
/// forked worker whose glibc still took it for the fork server would pin the server.
#[task]
fn pin_through_glibc() -> (Vec<usize>, Vec<usize>, bool, Vec<String>) {
    use nix::libc;
    use nix::sched::{CpuSet, sched_getaffinity};
    use nix::unistd::Pid;
    let allowed = |set: CpuSet| -> Vec<usize> {
        (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect()
    };
    let before = allowed(sched_getaffinity(Pid::from_raw(0)).expect("affinity"));
    let first = before[0];
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and pthread_setaffinity_np take it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(first, &mut set);
        libc::pthread_setaffinity_np(
            libc::pthread_self(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &raw const set,
        )
    };
    assert_eq!(rc, 0, "pthread_setaffinity_np");
    let after = allowed(sched_getaffinity(Pid::from_raw(0)).expect("affinity"));
    let mut head: *mut libc::c_void = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: get_robust_list(0, ...) writes this thread's list head and its length.
    let got = unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &raw mut head, &raw mut len) };
    (
        before,
        after,
        got == 0 && !head.is_null(),
        std::env::args().collect(),
    )
}

/// The worker's parent and its umask, as the kernel has them.
#[task]
fn parent_and_umask() -> (u32, String) {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let umask = status
        .lines()
        .find_map(|line| line.strip_prefix("Umask:"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    (nix::unistd::getppid().as_raw().cast_unsigned(), umask)
}

/// The worker's limit of open files, soft and hard.
#[task]
fn open_files_limit() -> (u64, u64) {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit")
}

/// The lines of the worker's `/proc/self/status` that start with one of `keys`.
#[task]
fn status_lines(keys: Vec<String>) -> Vec<String> {
    own_status_lines(&keys, "/proc/self/status")
}

fn own_status_lines(keys: &[String], path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("status")
        .lines()
        .filter(|line| keys.iter().any(|key| line.starts_with(key.as_str())))
        .map(str::to_owned)
        .collect()
}

/// A pool inside a worker: the worker has no fork server of its own, so its workers run the
/// executable again.
#[task]
fn square_in_a_nested_pool(x: u64) -> u64 {
    let pool = Pool::new(1).expect("a pool inside a worker");
    pool.apply(square, (x,)).expect("nested apply")
}

fn method(name: &str) -> StartMethod {
    match name {
        "spawn" => StartMethod::Spawn,
        _ => StartMethod::ForkServer,
    }
}

/// Runs `scenario` in a fresh copy of this binary with `method`; what it printed.
fn run_scenario(scenario: &str, method: &str) -> Result<String, Box<dyn std::error::Error>> {
    run_scenario_in(scenario, method, &std::env::current_dir()?)
}

/// Runs `scenario` with each start method; each must print `ok`.
fn ok_with_both(scenario: &str) -> TestResult {
    for method in ["fork", "spawn"] {
        let out = run_scenario(scenario, method)?;
        ensure(out.trim() == "ok", format!("{scenario} ({method}): {out}"))?;
    }
    Ok(())
}

/// Runs `scenario` with the fork server; it must print `ok`.
fn ok_forked(scenario: &str) -> TestResult {
    let out = run_scenario(scenario, "fork")?;
    ensure(out.trim() == "ok", out)
}

/// [`run_scenario`], started in `dir`.
fn run_scenario_in(
    scenario: &str,
    method: &str,
    dir: &std::path::Path,
) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new(std::env::current_exe()?)
        .current_dir(dir)
        // The scenarios need the fork server, whatever this test run was started with.
        .env_remove("MULTIPROC_START_METHOD")
        .env(SCENARIO, format!("{scenario}:{method}"))
        // For the scenario to remove before its pool starts.
        .env("MULTIPROC_TEST_REMOVED", "present")
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    ensure(
        out.status.success(),
        format!(
            "scenario {scenario} ({method}) failed: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    Ok(stdout)
}

/// The scenarios, run single-threaded first thing in `main`; they print what the test checks.
fn scenario(which: &str) -> ! {
    let (scenario, name) = which.split_once(':').expect("scenario:method");
    let builder = Pool::builder().processes(1).start_method(method(name));
    match scenario {
        "observe" => scenario_observe(builder),
        "crash" => scenario_crash(builder),
        "umask" => scenario_umask(builder),
        "limits" => scenario_limits(builder),
        "forked-child" => scenario_forked_child(builder),
        "server-stopped" => scenario_server_stopped(builder),
        "thread-sandbox" => scenario_thread_sandbox(builder),
        "glibc" => scenario_glibc(builder),
        "deleted-start-dir" => scenario_deleted_start_dir(builder),
        "fork-while-starting" => scenario_fork_while_starting(builder),
        "server-killed" => scenario_server_killed(builder),
        "large-pool" => scenario_large_pool(builder),
        "threads" => scenario_threads(builder, name),
        "killed-before-use" => scenario_killed_before_use(builder),
        "concurrent-callers" => scenario_concurrent_callers(builder),
        "stuck-idle-workers" => scenario_stuck_idle_workers(builder),
        "answers-later" => scenario_answers_later(builder),
        "idle-past-start-timeout" => scenario_idle_past_start_timeout(builder),
        "unused" => scenario_unused(&builder),
        "lazy" => scenario_lazy(&builder),
        "noisy-initializer" => scenario_noisy_initializer(builder),
        "stderr-held" => scenario_stderr_held(builder),
        "terminal" => scenario_terminal(builder),
        other => panic!("unknown scenario {other}"),
    }
    std::process::exit(0);
}

/// Prints `line` to stdout (flushed), returns its pid.
#[task]
fn print_line(line: String) -> u32 {
    use std::io::Write;
    let mut out = std::io::stdout();
    writeln!(out, "{line}").expect("print");
    out.flush().expect("flush");
    std::process::id()
}

/// A task prints to the program's stdout, a terminal with `tostop` set.
fn scenario_terminal(builder: PoolBuilder) {
    use std::io::Write;
    let pool = builder.build().expect("pool");
    let pid = pool
        .apply(print_line, ("printed by the worker".to_owned(),))
        .expect("apply");
    println!("done, worker {pid}");
    let _ = std::io::stdout().flush();
}

/// A worker runs in a process group of its own (so that it can be killed with what it
/// started), which on a terminal is a background group: with `stty tostop`, its writes to
/// the terminal would stop it (SIGTTOU), and the call wait forever. It ignores SIGTTOU, so
/// they go through, as from the program itself.
fn a_worker_prints_to_a_terminal_with_tostop() -> TestResult {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    for method in ["fork", "spawn"] {
        let pty = nix::pty::openpty(None, None)?;
        let mut attrs = tcgetattr(&pty.slave)?;
        attrs.local_flags |= LocalFlags::TOSTOP;
        tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs)?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env_remove("MULTIPROC_START_METHOD")
            .env(SCENARIO, format!("terminal:{method}"))
            .stdout(std::fs::File::from(pty.slave));
        // SAFETY: setsid and ioctl are async-signal-safe: the child, in a session of its
        // own, takes the terminal on its stdout as its controlling one (its foreground).
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()?;
                if nix::libc::ioctl(1, nix::libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        drop(command);
        let mut master = std::fs::File::from(pty.master);
        let read = support::within(
            std::time::Duration::from_mins(1),
            "the scenario",
            move || {
                // Until every copy of the terminal's other end is closed (EIO).
                let mut out = Vec::new();
                let _ = master.read_to_end(&mut out);
                String::from_utf8_lossy(&out).into_owned()
            },
        );
        let out = match read {
            Ok(out) => out,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err.into());
            }
        };
        let status = child.wait()?;
        ensure(
            status.success() && out.contains("printed by the worker") && out.contains("done"),
            format!("{method}: {status}: {out:?}"),
        )?;
    }
    Ok(())
}

/// An initializer that writes more to stderr than a pipe holds: the pool starts (the
/// worker's stderr is read while it starts), and all of it is forwarded by the time the pool
/// is dropped.
fn scenario_noisy_initializer(builder: PoolBuilder) {
    let pool = builder
        .start_timeout(std::time::Duration::from_secs(30))
        .initializer(noisy, (NOISY_LINES,))
        .build()
        .expect("pool");
    assert_eq!(pool.apply(square, (3,)).expect("apply"), 9);
    drop(pool);
    println!("ok");
}

/// The program holds std's lock on its stderr while tasks that write there run: the pool
/// forwards their output without that lock (as a worker writing to an inherited stderr
/// would), so the map ends, and a deadline is kept meanwhile.
fn scenario_stderr_held(builder: PoolBuilder) {
    let pool = builder
        .processes(2)
        .task_timeout(std::time::Duration::from_mins(1))
        .build()
        .expect("pool");
    let held = std::io::stderr().lock();
    let outputs = pool
        .with_chunking(multiproc::Chunking::Fixed(1))
        .map(noisy, vec![NOISY_LINES / 16; 16])
        .expect("map");
    drop(held);
    assert_eq!(outputs.len(), 16);
    drop(pool);
    println!("ok");
}

/// Runs `scenario` with `method`, killed if it has not ended within a minute; it must print
/// `ok`, and its stderr must hold every line its workers wrote with [`noisy`].
fn ok_with_every_noisy_line(scenario: &str) -> TestResult {
    for method in ["fork", "spawn"] {
        let (status, stdout, stderr) = support::run_self_within(
            &[(SCENARIO, &format!("{scenario}:{method}"))],
            std::time::Duration::from_mins(1),
        )?;
        ensure(
            status.success() && stdout.trim() == "ok",
            format!("{method}: {status}: {stdout}"),
        )?;
        let forwarded = stderr.lines().filter(|line| *line == NOISY_LINE).count();
        ensure(
            forwarded == NOISY_LINES,
            format!("{method}: {forwarded} of {NOISY_LINES} lines reached stderr"),
        )?;
    }
    Ok(())
}

fn an_initializer_that_writes_much_to_stderr_starts() -> TestResult {
    ok_with_every_noisy_line("noisy-initializer")
}

fn a_map_ends_while_the_program_holds_its_stderr() -> TestResult {
    ok_with_every_noisy_line("stderr-held")
}

/// A forked worker pins itself through glibc and checks its robust-mutex list.
fn scenario_glibc(builder: PoolBuilder) {
    let pool = builder.build().expect("pool");
    let (before, after, robust, args) = pool.apply(pin_through_glibc, ()).expect("apply");
    assert_eq!(
        args,
        std::env::args().collect::<Vec<_>>(),
        "the worker was forked"
    );
    assert!(robust, "the robust-mutex list is registered");
    assert_eq!(after, before[..1], "pinned itself");
    println!("ok");
}

/// A thread that sandboxes and pins itself, then starts a pool: its workers must keep both,
/// as a worker run from the executable by that thread would.
fn scenario_thread_sandbox(builder: PoolBuilder) {
    std::thread::spawn(move || {
        use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        nix::sys::prctl::set_no_new_privs().expect("no_new_privs");
        let allowed = sched_getaffinity(Pid::from_raw(0)).expect("affinity");
        let first = (0..CpuSet::count())
            .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
            .expect("a CPU");
        let mut one = CpuSet::new();
        one.set(first).expect("cpu");
        sched_setaffinity(Pid::from_raw(0), &one).expect("pin this thread");
        let keys = vec!["NoNewPrivs:".to_owned(), "Cpus_allowed:".to_owned()];
        let own = own_status_lines(&keys, "/proc/thread-self/status");
        let pool = builder.build().expect("pool");
        let theirs = pool.apply(status_lines, (keys,)).expect("status");
        assert_eq!(theirs, own, "the worker keeps what its starting thread has");
    })
    .join()
    .expect("the thread");
    println!("ok");
}

/// The program's start directory removed, then a pool started elsewhere: the workers work
/// where the caller does.
fn scenario_deleted_start_dir(builder: PoolBuilder) {
    let start = std::env::current_dir().expect("start dir");
    let elsewhere = std::env::temp_dir().canonicalize().expect("temp dir");
    std::env::set_current_dir(&elsewhere).expect("chdir");
    std::fs::remove_dir(&start).expect("remove the start dir");
    let pool = builder.build().expect("pool");
    let (_, cwd, ..) = pool.apply(observe, ("HOME".to_owned(),)).expect("observe");
    assert_eq!(cwd, elsewhere.display().to_string());
    println!("ok");
}

/// Copies of the program made with `fork` while another thread starts pools: each copy
/// starts a pool of its own (none may hang on the lock that thread held).
fn scenario_fork_while_starting(builder: PoolBuilder) {
    use std::sync::atomic::AtomicBool;
    static DONE: AtomicBool = AtomicBool::new(false);
    let for_copies = builder.clone();
    let busy = std::thread::spawn(move || {
        while !DONE.load(Ordering::SeqCst) {
            drop(builder.clone().build().expect("pool in the busy thread"));
        }
    });
    for _ in 0..20 {
        // SAFETY: the child only starts a pool, under an alarm, and exits; the test is
        // about exactly what a multi-threaded program's copy can do.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                nix::unistd::alarm::set(20);
                let pool = for_copies.clone().build().expect("pool in a copy");
                let ok = pool.apply(square, (3,)).is_ok_and(|nine| nine == 9);
                // SAFETY: ends the copy at once, without running the original's at-exit
                // work a second time.
                unsafe { nix::libc::_exit(i32::from(!ok)) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
    DONE.store(true, Ordering::SeqCst);
    busy.join().expect("busy thread");
    println!("ok");
}

fn scenario_observe(builder: PoolBuilder) {
    let dir = std::env::temp_dir();
    // SAFETY: this process is single-threaded here: no pool has started yet.
    unsafe {
        std::env::set_var("MULTIPROC_TEST_SET_LATE", "late");
        std::env::remove_var("MULTIPROC_TEST_REMOVED");
    }
    std::env::set_current_dir(&dir).expect("chdir");
    STATE.store(2, Ordering::SeqCst);
    let pool = builder.build().expect("pool");
    let (late, cwd, state, args) = pool
        .apply(observe, ("MULTIPROC_TEST_SET_LATE".to_owned(),))
        .expect("observe");
    let (removed, ..) = pool
        .apply(observe, ("MULTIPROC_TEST_REMOVED".to_owned(),))
        .expect("observe");
    let expected = dir.canonicalize().expect("temp dir");
    assert_eq!(
        late.as_deref(),
        Some("late"),
        "a variable set before the pool"
    );
    assert_eq!(removed, None, "a variable removed before the pool");
    assert_eq!(
        std::path::Path::new(&cwd).canonicalize().ok(),
        Some(expected)
    );
    assert_eq!(state, 1, "a worker starts from the program as it started");
    let own: Vec<String> = std::env::args().collect();
    // A forked worker is a copy of this program; a spawned one runs the executable
    // with no arguments. That difference is what shows which way it started.
    println!("same-args={}", args == own);
}

fn scenario_crash(builder: PoolBuilder) {
    let pool = builder.build().expect("pool");
    let err = pool
        .apply(abort_with, ("a last word".to_owned(),))
        .expect_err("aborted");
    assert_eq!(err.signal(), Some(6), "SIGABRT: {err}");
    assert!(
        err.stderr_tail()
            .is_some_and(|tail| tail.contains("a last word")),
        "stderr quoted: {err}"
    );
    assert_eq!(
        pool.map(square, [3, 4]).expect("after a crash"),
        vec![9, 16]
    );
    println!("ok");
}

fn scenario_umask(builder: PoolBuilder) {
    // A forked worker would keep the umask the program started with: the parent's
    // new one must send it to `exec`.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let pool = builder.build().expect("pool");
    let (_, umask) = pool.apply(parent_and_umask, ()).expect("umask");
    assert_eq!(umask, "0077");
    println!("ok");
}

fn scenario_limits(builder: PoolBuilder) {
    // A forked worker would keep the limits the program started with: it takes the
    // parent's new ones.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, soft - 7, hard).expect("setrlimit");
    let pool = builder.build().expect("pool");
    let limit = pool.apply(open_files_limit, ()).expect("limit");
    assert_eq!(limit, (soft - 7, hard));
    println!("ok");
}

/// How many of this process's threads are a pool's slot threads.
fn slot_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("multiproc-slot"))
        .count()
}

/// A pool whose workers the fork server started has no thread of its own until work needs
/// one: `apply` borrows an idle worker from the calling thread, and the first queued work
/// starts a thread. Its drop stops and reaps the workers all the same. (A pool that runs
/// the executable starts a thread per worker, which starts the worker.)
fn scenario_threads(builder: PoolBuilder, method: &str) {
    let pool = builder.processes(2).build().expect("pool");
    let eager = if method == "spawn" { 2 } else { 0 };
    assert_eq!(slot_threads(), eager, "threads after build");
    for x in 0..3 {
        assert_eq!(pool.apply(square, (x,)).expect("apply"), x * x);
    }
    assert_eq!(slot_threads(), eager, "threads after apply");
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 2, "two workers");
    assert!(pids.iter().all(|&pid| alive(pid)), "running");
    let squares = pool.map_async(square, 0..10u64).get().expect("map_async");
    assert_eq!(squares, (0..10u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(slot_threads() >= 1, "queued work starts a thread");
    drop(pool);
    assert!(
        pids.iter().all(|&pid| !alive(pid)),
        "the drop stopped and reaped {pids:?}"
    );
    println!("ok");
}

/// A worker killed before its pool used it: the first call still gets its answer (from a
/// replacement), whether the worker had finished its start or not.
fn scenario_killed_before_use(builder: PoolBuilder) {
    let pool = builder.build().expect("pool");
    let pids = pool.worker_pids();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0].cast_signed()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the worker");
    assert_eq!(pool.apply(square, (4,)).expect("apply"), 16);
    assert_ne!(pool.worker_pids(), pids, "replaced");
    println!("ok");
}

/// Idle workers that cannot exit (stopped) are killed when the drop's grace runs out: one
/// grace for them all (a second, on terminate), not one after the other.
fn scenario_stuck_idle_workers(builder: PoolBuilder) {
    let pool = builder.processes(4).build().expect("pool");
    assert_eq!(pool.apply(square, (2,)).expect("apply"), 4);
    let pids = pool.worker_pids();
    for &pid in &pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.cast_signed()),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .expect("stop a worker");
    }
    let started = std::time::Instant::now();
    drop(pool);
    let took = started.elapsed();
    assert!(pids.iter().all(|&pid| !alive(pid)), "killed and reaped");
    // Four graces one after the other would take 4 s.
    assert!(took < std::time::Duration::from_secs(3), "took {took:?}");
    println!("ok");
}

/// Callers on several threads share two workers: they borrow them, queue behind them, and
/// start their threads, all at once.
fn scenario_concurrent_callers(builder: PoolBuilder) {
    let pool = builder.processes(2).build().expect("pool");
    std::thread::scope(|scope| {
        for caller in 0..6u64 {
            let pool = &pool;
            scope.spawn(move || {
                for x in 0..40u64 {
                    let x = caller * 100 + x;
                    assert_eq!(pool.apply(square, (x,)).expect("apply"), x * x);
                }
            });
        }
    });
    println!("ok");
}

/// More workers than the fork server is sent requests for at a time: every one of them is
/// forked (a copy of this program, arguments and all), and the pool runs.
fn scenario_large_pool(builder: PoolBuilder) {
    let pool = builder.processes(20).build().expect("pool");
    let mut pids = pool.worker_pids();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 20, "20 workers");
    let own = std::fs::read("/proc/self/cmdline").expect("cmdline");
    for pid in pids {
        let theirs = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        assert_eq!(theirs, own, "worker {pid} was forked");
    }
    assert_eq!(
        pool.map(square, 0..100u64).expect("map"),
        (0..100u64).map(|x| x * x).collect::<Vec<_>>()
    );
    println!("ok");
}

/// `build` does not wait for the fork server's answers: it returns while the server is
/// stopped (waiting for them would give the server up after 2 s and kill it), and the
/// workers are forked once the server goes on; the first call reads the answer.
fn scenario_answers_later(builder: PoolBuilder) {
    let server = children(std::process::id());
    assert_eq!(server.len(), 1, "the fork server");
    let server_pid = nix::unistd::Pid::from_raw(server[0].cast_signed());
    nix::sys::signal::kill(server_pid, nix::sys::signal::Signal::SIGSTOP).expect("stop");
    let pool = builder.processes(2).build().expect("pool");
    assert_eq!(
        children(std::process::id()),
        server,
        "built with nothing forked yet"
    );
    nix::sys::signal::kill(server_pid, nix::sys::signal::Signal::SIGCONT).expect("continue");
    assert_eq!(pool.apply(square, (3,)).expect("apply"), 9);
    let mut pids = pool.worker_pids();
    pids.sort_unstable();
    assert_eq!(pids.len(), 2, "two workers");
    let own = std::fs::read("/proc/self/cmdline").expect("cmdline");
    for &pid in &pids {
        let theirs = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        assert_eq!(theirs, own, "worker {pid} was forked");
    }
    let mut expected = server.clone();
    expected.extend(&pids);
    expected.sort_unstable();
    assert_eq!(
        children(std::process::id()),
        expected,
        "the server and its two"
    );
    println!("ok");
}

/// A pool idle for longer than its start timeout before its first call: the call runs on
/// the worker forked for it, whose `Ready` has waited in its socket all along (the timeout
/// counts from the call, as a handshake's would).
fn scenario_idle_past_start_timeout(builder: PoolBuilder) {
    let timeout = std::time::Duration::from_millis(300);
    let pool = builder.start_timeout(timeout).build().expect("pool");
    let pid = *pool.worker_pids().first().expect("a forked worker");
    // The idle time is what is tested here: nothing to wait for instead. (The worker's
    // `Ready` has been in its socket all along; the call reads it within a start timeout
    // from the call, and reads what is there before it gives the worker up.)
    std::thread::sleep(timeout * 2);
    assert_eq!(pool.apply(own_pid, ()).expect("apply"), pid, "not replaced");
    println!("ok");
}

/// Pools dropped or terminated before any use, their fork-server answers still unread: every
/// worker forked for them is stopped and reaped, and the next pool's start reads past them.
fn scenario_unused(builder: &PoolBuilder) {
    // This process's children once the fork server has forked every worker asked of it so
    // far (it answers in order: a probe pool's answer comes after theirs), the probe's
    // worker stopped again. Without it, a worker a drop failed to stop could be forked
    // only after the check.
    let settled = || {
        let probe = builder.clone().build().expect("probe pool");
        assert_eq!(probe.worker_pids().len(), 1, "the probe's worker");
        drop(probe);
        children(std::process::id())
    };
    let server = children(std::process::id());
    assert_eq!(server.len(), 1, "the fork server");
    drop(builder.clone().processes(4).build().expect("pool"));
    assert_eq!(settled(), server, "dropped unused");
    let pool = builder.clone().processes(3).build().expect("pool");
    pool.terminate();
    drop(pool);
    assert_eq!(settled(), server, "terminated unused");
    // A pool started while another's answers are owed reads them first, into that pool's
    // own: each then has its own workers.
    let first = builder.clone().processes(2).build().expect("pool");
    let second = builder.clone().processes(2).build().expect("pool");
    assert_eq!(second.apply(square, (5,)).expect("apply"), 25);
    assert_eq!(first.apply(square, (6,)).expect("apply"), 36);
    let mut pids = first.worker_pids();
    pids.extend(second.worker_pids());
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 4, "four workers: {pids:?}");
    drop((first, second));
    assert_eq!(settled(), server, "all stopped");
    println!("ok");
}

/// Waits (in the task) until `count` workers have arrived in the directory `dir`, 30 s at
/// most, then returns its pid: items that only finish when that many run side by side.
#[task]
fn meet(dir: String, count: usize) -> u32 {
    let pid = std::process::id();
    std::fs::write(format!("{dir}/{pid}"), b"").expect("arrive");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(&dir).map_or(0, Iterator::count) < count
        && std::time::Instant::now() < until
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    pid
}

/// A pool of forked workers starts one at once and the others when there is work for them
/// (or `worker_pids` asks): one `apply` needs one worker, a `map` of three items that must
/// run side by side gets three.
fn scenario_lazy(builder: &PoolBuilder) {
    let me = std::process::id();
    let server = children(me);
    assert_eq!(server.len(), 1, "the fork server");
    let pool = builder.clone().processes(3).build().expect("pool");
    assert_eq!(pool.apply(square, (4,)).expect("apply"), 16);
    assert_eq!(children(me).len(), 2, "one worker for one apply");
    let dir = std::env::temp_dir().join(format!("multiproc-meet-{me}"));
    std::fs::create_dir_all(&dir).expect("dir");
    let dir_name = dir.to_string_lossy().into_owned();
    let pids = pool
        .with_chunking(multiproc::Chunking::Fixed(1))
        .starmap(meet, (0..3).map(|_| (dir_name.clone(), 3)))
        .expect("map");
    let _ = std::fs::remove_dir_all(&dir);
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three side by side: {pids:?}");
    assert_eq!(pool.worker_pids().len(), 3, "all three listed");
    drop(pool);
    // `worker_pids` starts those not yet asked for.
    let pool = builder.clone().processes(4).build().expect("pool");
    assert_eq!(pool.worker_pids().len(), 4, "listed, so started");
    drop(pool);
    println!("ok");
}

fn scenario_forked_child(builder: PoolBuilder) {
    // A copy of the program made with `fork` has its parent's fork server, whose
    // workers would not be its children: it starts its own by `exec`.
    let server = children(std::process::id());
    // SAFETY: this process is single-threaded here; the child only starts a pool
    // and exits.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let pool = builder.build().expect("pool in a forked copy");
            let (parent, _) = pool.apply(parent_and_umask, ()).expect("apply");
            assert_eq!(parent, std::process::id(), "the worker is ours");
            drop(pool);
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).expect("wait");
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
        }
    }
    assert!(server.iter().all(|&pid| alive(pid)), "the server lives on");
    let pool = builder.build().expect("pool");
    assert_eq!(pool.apply(square, (5,)).expect("apply"), 25);
    println!("ok");
}

fn scenario_server_stopped(builder: PoolBuilder) {
    // A stopped server answers nothing: the start gives it up after a bounded wait
    // and runs the executable instead.
    let server = children(std::process::id());
    assert_eq!(server.len(), 1, "the fork server");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server[0].cast_signed()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stop the server");
    let started = std::time::Instant::now();
    let pool = builder.build().expect("pool past a stopped server");
    assert_eq!(pool.apply(square, (6,)).expect("apply"), 36);
    println!("started in {:?}", started.elapsed());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "well within the 30 s start timeout"
    );
    assert!(
        !children(std::process::id()).contains(&server[0]),
        "the server was given up and reaped"
    );
    println!("ok");
}

fn scenario_server_killed(builder: PoolBuilder) {
    // Before any pool, this process's only child is the fork server (if it has one).
    let server = children(std::process::id());
    println!("children={}", server.len());
    for &pid in &server {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.cast_signed()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the server");
    }
    let pool = builder.processes(2).build().expect("pool without a server");
    assert_eq!(
        pool.map(square, 0..10u64).expect("map"),
        (0..10u64).map(|x| x * x).collect::<Vec<_>>()
    );
    for pid in server {
        assert!(!alive(pid), "the dead server was reaped");
        assert!(!pool.worker_pids().contains(&pid));
    }
    println!("ok");
}

fn workers_see_the_environment_and_directory_of_the_caller() -> TestResult {
    let forked = run_scenario("observe", "fork")?;
    ensure(
        forked.contains("same-args=true"),
        format!("forked: {forked}"),
    )?;
    let spawned = run_scenario("observe", "spawn")?;
    ensure(
        spawned.contains("same-args=false"),
        format!("spawned: {spawned}"),
    )
}

fn workers_forked_or_spawned_report_a_crash_alike() -> TestResult {
    ok_with_both("crash")
}

fn a_large_pool_forks_every_worker() -> TestResult {
    ok_forked("large-pool")
}

fn a_pool_runs_no_thread_until_its_work_needs_one() -> TestResult {
    ok_with_both("threads")
}

fn a_worker_killed_before_its_first_use_is_replaced() -> TestResult {
    ok_with_both("killed-before-use")
}

fn stuck_idle_workers_share_one_grace() -> TestResult {
    ok_with_both("stuck-idle-workers")
}

fn concurrent_callers_share_the_workers() -> TestResult {
    ok_with_both("concurrent-callers")
}

fn a_pool_starts_without_waiting_for_the_fork_server() -> TestResult {
    ok_forked("answers-later")
}

fn a_worker_waits_for_its_first_call_past_the_start_timeout() -> TestResult {
    ok_forked("idle-past-start-timeout")
}

fn pools_dropped_before_use_leave_no_worker() -> TestResult {
    ok_forked("unused")
}

fn a_pool_starts_its_workers_as_work_needs_them() -> TestResult {
    ok_forked("lazy")
}

#[task]
fn sleep_then_pid(ms: u64) -> u32 {
    std::thread::sleep(std::time::Duration::from_millis(ms));
    std::process::id()
}

/// `worker_pids` lists every worker of a fresh pool whatever else started them meanwhile:
/// right after a burst of calls woke the others, and from two threads at once.
fn worker_pids_lists_workers_started_meanwhile() -> TestResult {
    let pool = Pool::new(4)?;
    let pending: Vec<_> = (0..4)
        .map(|_| pool.apply_async(sleep_then_pid, (200,)))
        .collect();
    let pids = pool.worker_pids();
    for result in pending {
        result.get()?;
    }
    ensure(pids.len() == 4, format!("after a burst: {pids:?}"))?;
    for round in 0..5 {
        let pool = std::sync::Arc::new(Pool::new(4)?);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let other = {
            let (pool, barrier) = (
                std::sync::Arc::clone(&pool),
                std::sync::Arc::clone(&barrier),
            );
            std::thread::spawn(move || {
                barrier.wait();
                pool.worker_pids()
            })
        };
        barrier.wait();
        let mine = pool.worker_pids();
        let theirs = other.join().expect("thread");
        ensure(
            mine.len() == 4 && theirs.len() == 4,
            format!("round {round}: {mine:?} and {theirs:?}"),
        )?;
    }
    Ok(())
}

fn a_pool_starts_when_the_fork_server_is_gone() -> TestResult {
    let out = run_scenario("server-killed", "fork")?;
    ensure(out.contains("children=1") && out.contains("ok"), out)
}

fn glibc_knows_a_forked_worker_as_itself() -> TestResult {
    ok_forked("glibc")
}

fn a_changed_umask_reaches_the_workers() -> TestResult {
    ok_with_both("umask")
}

fn changed_resource_limits_reach_the_workers() -> TestResult {
    ok_with_both("limits")
}

fn a_copy_made_by_fork_starts_its_own_workers() -> TestResult {
    ok_forked("forked-child")
}

fn an_environment_set_var_refuses_gets_spawned_workers() -> TestResult {
    // An entry `=ODD=1`, whose name (`=ODD`) std's `set_var` would refuse in a forked worker.
    let out = Command::new(std::env::current_exe()?)
        .env(SCENARIO, "observe:fork")
        .env("MULTIPROC_TEST_REMOVED", "present")
        .env("=ODD", "1")
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    ensure(
        out.status.success() && stdout.contains("same-args=false"),
        format!(
            "{}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn a_stopped_fork_server_does_not_hold_a_start() -> TestResult {
    let out = run_scenario("server-stopped", "fork")?;
    ensure(out.contains("ok"), out)
}

fn workers_keep_the_sandbox_of_the_thread_that_starts_them() -> TestResult {
    ok_with_both("thread-sandbox")
}

fn workers_work_where_the_caller_does_after_the_start_dir_is_gone() -> TestResult {
    for method in ["fork", "spawn"] {
        let dir = std::env::temp_dir().join(format!(
            "multiproc-start-dir-{}-{method}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let out = run_scenario_in("deleted-start-dir", method, &dir);
        let _ = std::fs::remove_dir(&dir);
        let out = out?;
        ensure(out.trim() == "ok", format!("{method}: {out}"))?;
    }
    Ok(())
}

fn copies_made_by_fork_while_pools_start_do_not_hang() -> TestResult {
    ok_forked("fork-while-starting")
}

fn a_worker_starts_a_pool_of_its_own() -> TestResult {
    for method in [StartMethod::ForkServer, StartMethod::Spawn] {
        let pool = Pool::builder().processes(1).start_method(method).build()?;
        ensure(
            pool.apply(square_in_a_nested_pool, (7,))? == 49,
            format!("{method:?}"),
        )?;
    }
    Ok(())
}

fn a_program_started_with_spawn_has_no_fork_server() -> TestResult {
    let out = Command::new(std::env::current_exe()?)
        .env(SCENARIO, "server-killed:fork")
        .env("MULTIPROC_START_METHOD", "spawn")
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    ensure(
        out.status.success() && stdout.contains("children=0") && stdout.contains("ok"),
        format!(
            "{}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[multiproc::main]
fn main() {
    if let Ok(which) = std::env::var(SCENARIO) {
        scenario(&which);
    }
    support::run(tests![
        a_pool_starts_its_workers_as_work_needs_them,
        worker_pids_lists_workers_started_meanwhile,
        a_worker_prints_to_a_terminal_with_tostop,
        an_initializer_that_writes_much_to_stderr_starts,
        a_map_ends_while_the_program_holds_its_stderr,
        workers_see_the_environment_and_directory_of_the_caller,
        workers_forked_or_spawned_report_a_crash_alike,
        a_pool_starts_when_the_fork_server_is_gone,
        a_worker_starts_a_pool_of_its_own,
        glibc_knows_a_forked_worker_as_itself,
        a_changed_umask_reaches_the_workers,
        changed_resource_limits_reach_the_workers,
        a_copy_made_by_fork_starts_its_own_workers,
        an_environment_set_var_refuses_gets_spawned_workers,
        a_stopped_fork_server_does_not_hold_a_start,
        workers_keep_the_sandbox_of_the_thread_that_starts_them,
        workers_work_where_the_caller_does_after_the_start_dir_is_gone,
        copies_made_by_fork_while_pools_start_do_not_hang,
        a_program_started_with_spawn_has_no_fork_server,
        a_large_pool_forks_every_worker,
        a_pool_runs_no_thread_until_its_work_needs_one,
        a_worker_killed_before_its_first_use_is_replaced,
        concurrent_callers_share_the_workers,
        stuck_idle_workers_share_one_grace,
        a_pool_starts_without_waiting_for_the_fork_server,
        a_worker_waits_for_its_first_call_past_the_start_timeout,
        pools_dropped_before_use_leave_no_worker,
    ]);
}
