//! `Process`: every method, outcomes (value, panic, crash, signals), timeouts, and no orphan
//! in any case: a running process dropped, a parent killed, a child that starts its own
//! long-lived process.

mod support;

use multiproc::{ErrorKind, Process, Sender, pipe, task};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{Gate, TestResult, ensure, fork_then_abort, pass_gate, wait_gone, within};

const LIMIT: Duration = Duration::from_mins(1);
const SCENARIO: &str = "MULTIPROC_TEST_PROCESS_SCENARIO";

#[task]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[task]
fn own_pid() -> u32 {
    std::process::id()
}

#[task]
fn wait_at(gate: String) -> String {
    pass_gate(&gate);
    "through".to_owned()
}

#[task]
fn fail(how: String) -> u8 {
    match how.as_str() {
        "panic" => panic!("no such user: {how}"),
        "abort" => {
            eprintln!("about to abort");
            std::process::abort()
        }
        "exit" => std::process::exit(3),
        _ => 0,
    }
}

#[task]
fn park_forever() {
    loop {
        std::thread::park();
    }
}

/// Starts `sleep 600` and returns its pid without waiting for it.
#[allow(clippy::zombie_processes)]
#[task]
fn start_sleeper() -> u32 {
    Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep")
        .id()
}

/// Starts `sleep 600`, sends its pid, then hangs.
#[task]
fn hang_with_a_child(pids: Sender<u32>) {
    pids.send(start_sleeper()).expect("send the pid");
    loop {
        std::thread::park();
    }
}

/// Starts `sleep 600`, sends its pid, writes a line to stderr, and returns.
#[task]
fn leave_a_child_behind(pids: Sender<u32>) {
    let sleeper = start_sleeper();
    pids.send(sleeper).expect("send the pid");
    eprintln!("leaving {sleeper}");
}

/// Moves into its parent's process group (the same session), says so, then hangs.
#[task]
fn leave_own_group(moved: Sender<()>) {
    let parent_group = nix::unistd::getpgid(Some(nix::unistd::getppid())).expect("getpgid");
    nix::unistd::setpgid(Pid::from_raw(0), parent_group).expect("setpgid");
    moved.send(()).expect("say it moved");
    loop {
        std::thread::park();
    }
}

fn new_start_join_and_accessors() -> TestResult {
    let mut p = Process::new(add, (2, 3));
    assert!(!p.is_alive());
    assert_eq!((p.pid(), p.exit_status()), (None, None));
    let err = p.join().expect_err("not started");
    assert_eq!(err.kind(), ErrorKind::Spawn, "{err}");
    p.start()?;
    let pid = p.pid().expect("a started process has a pid");
    ensure(pid != std::process::id(), "a process of its own")?;
    assert_eq!(p.join()?, 5);
    assert!(!p.is_alive());
    assert!(p.exit_status().is_some_and(|s| s.success()), "{p:?}");
    let err = p.join().expect_err("joined already");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    let err = p.start().expect_err("started already");
    assert_eq!(err.kind(), ErrorKind::Spawn, "{err}");
    ensure(format!("{p:?}").contains("::add"), format!("{p:?}"))?;
    Ok(())
}

fn spawn_runs_processes_side_by_side() -> TestResult {
    let mut processes = (0..4)
        .map(|_| Process::spawn(own_pid, ()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut pids = Vec::new();
    for p in &mut processes {
        let reported = p.join()?;
        assert_eq!(Some(reported), p.pid());
        pids.push(reported);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 4, "four distinct processes");
    Ok(())
}

fn a_panic_is_an_error_and_the_process_exits_cleanly() -> TestResult {
    let mut p = Process::spawn(fail, ("panic".to_owned(),))?;
    let err = p.join().expect_err("it panics");
    assert_eq!(err.kind(), ErrorKind::Panicked, "{err}");
    assert_eq!(err.message(), "no such user: panic");
    ensure(
        err.location().is_some_and(|at| at.contains("process.rs")),
        format!("{err:?}"),
    )?;
    ensure(
        err.task().is_some_and(|t| t.ends_with("::fail")),
        err.to_string(),
    )?;
    assert!(p.exit_status().is_some_and(|s| s.success()));
    Ok(())
}

fn a_crash_is_an_error_with_its_signal_exit_code_and_stderr() -> TestResult {
    let mut p = Process::spawn(fail, ("abort".to_owned(),))?;
    let err = p.join().expect_err("it aborts");
    assert_eq!(err.kind(), ErrorKind::Crashed, "{err}");
    assert_eq!(err.signal(), Some(Signal::SIGABRT as i32), "{err}");
    ensure(
        err.stderr_tail()
            .is_some_and(|t| t.contains("about to abort")),
        err.to_string(),
    )?;
    assert_eq!(
        p.exit_status().and_then(|s| s.signal()),
        Some(Signal::SIGABRT as i32)
    );
    let mut p = Process::spawn(fail, ("exit".to_owned(),))?;
    let err = p.join().expect_err("it exits mid-task");
    assert_eq!((err.kind(), err.exit_code()), (ErrorKind::Crashed, Some(3)));
    assert_eq!(p.exit_status().and_then(|s| s.code()), Some(3));
    Ok(())
}

fn join_timeout_leaves_it_running() -> TestResult {
    let gate = Gate::new();
    let mut p = Process::spawn(wait_at, (gate.path(),))?;
    let err = p
        .join_timeout(Duration::from_millis(50))
        .expect_err("held at the gate");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(p.is_alive());
    gate.open();
    let out = within(LIMIT, "join after the gate opened", move || {
        (p.join_timeout(Duration::from_hours(1)), p.is_alive())
    })?;
    assert_eq!(out.0?, "through");
    assert!(!out.1);
    Ok(())
}

fn terminate_and_kill_signal_it() -> TestResult {
    for (signal, stop) in [
        (
            Signal::SIGTERM,
            Process::terminate as fn(&Process<park_forever>),
        ),
        (Signal::SIGKILL, Process::kill),
    ] {
        let mut p = Process::spawn(park_forever, ())?;
        stop(&p);
        let (joined, status) = within(LIMIT, "join after a signal", move || {
            (p.join(), p.exit_status())
        })?;
        let err = joined.expect_err("stopped");
        assert_eq!(err.kind(), ErrorKind::Crashed, "{err}");
        assert_eq!(err.signal(), Some(signal as i32), "{err}");
        ensure(
            err.to_string().contains(&format!(
                "was stopped before the task finished (killed by {signal:?})"
            )),
            err.to_string(),
        )?;
        assert_eq!(status.and_then(|s| s.signal()), Some(signal as i32));
    }
    // Signalling a process that has exited does nothing.
    let mut p = Process::spawn(add, (1, 1))?;
    assert_eq!(p.join()?, 2);
    p.terminate();
    p.kill();
    assert!(p.exit_status().is_some_and(|s| s.success()));
    Ok(())
}

fn dropping_a_running_process_kills_it_and_what_it_started() -> TestResult {
    let (tx, rx) = pipe()?;
    let p = Process::spawn(hang_with_a_child, (tx,))?;
    let pid = p.pid().expect("started");
    let grandchild = rx.recv()?;
    within(LIMIT, "dropping a running process", move || drop(p))?;
    ensure(
        !support::alive(pid),
        "the child is gone (and reaped) once drop returns",
    )?;
    ensure(
        wait_gone(grandchild, LIMIT),
        "the child's own child was killed with it",
    )?;
    Ok(())
}

/// A child that left its process group is signalled on its own: `kill`, `terminate` and a
/// drop reach it (signalling its old, empty group alone left it running, and the drop waited
/// for it forever).
fn a_child_that_left_its_process_group_is_still_stopped() -> TestResult {
    for how in ["kill", "terminate", "drop"] {
        let (tx, rx) = pipe()?;
        let p = Process::spawn(leave_own_group, (tx,))?;
        let pid = p.pid().expect("started");
        rx.recv()?;
        let p = match how {
            "kill" => Some(p).inspect(Process::kill),
            "terminate" => Some(p).inspect(Process::terminate),
            _ => within(Duration::from_secs(30), "the drop", move || drop(p)).map(|()| None)?,
        };
        let gone = wait_gone(pid, Duration::from_secs(30));
        // Whatever happened, nothing is left behind.
        let _ = kill(Pid::from_raw(pid.cast_signed()), Signal::SIGKILL);
        drop(p);
        ensure(gone, format!("{how} left process {pid} running"))?;
    }
    Ok(())
}

fn a_process_outlives_the_thread_that_started_it() -> TestResult {
    let gate = Gate::new();
    let path = gate.path();
    // On Linux the parent-death signal follows the thread that spawned a child: the
    // supervisor thread spawns it, so the starting thread may end first.
    let mut p = std::thread::spawn(move || Process::spawn(wait_at, (path,)))
        .join()
        .map_err(|_| "the starting thread panicked")??;
    gate.open();
    assert_eq!(p.join()?, "through");
    Ok(())
}

/// A child that dies while a process it forked holds its end of the channel open (so the
/// channel never ends): `join` reports the crash at once.
fn a_crash_is_seen_while_a_process_the_child_forked_holds_the_channel() -> TestResult {
    let pid_file = std::env::temp_dir()
        .join(format!("multiproc-process-{}-forked", std::process::id()))
        .to_string_lossy()
        .into_owned();
    let mut p = Process::spawn(fork_then_abort, (pid_file.clone(),))?;
    let err = within(LIMIT, "join", move || p.join())?.expect_err("the child aborted");
    let forked: i32 = std::fs::read_to_string(&pid_file)?.parse()?;
    std::fs::remove_file(&pid_file)?;
    kill(Pid::from_raw(forked), Signal::SIGKILL)?;
    assert_eq!(
        (err.kind(), err.signal()),
        (ErrorKind::Crashed, Some(6)),
        "{err}"
    );
    Ok(())
}

fn a_child_that_starts_a_long_lived_process_still_joins() -> TestResult {
    let mut p = Process::spawn(start_sleeper, ())?;
    let (sleeper, status) = within(LIMIT, "join", move || (p.join(), p.exit_status()))?;
    let sleeper = sleeper?;
    assert!(status.is_some_and(|s| s.success()));
    ensure(
        support::alive(sleeper),
        "the sleeper was not killed by a clean exit",
    )?;
    kill(Pid::from_raw(sleeper.cast_signed()), Signal::SIGKILL)?;
    Ok(())
}

/// Starts `sh`, which waits at `gate`, then writes a line to its stderr (the child's, which
/// it inherited), then writes to `marker` whether that write succeeded. Returns its pid at
/// once.
#[allow(clippy::zombie_processes)]
#[task]
fn start_late_stderr_writer(gate: String, marker: String) -> u32 {
    Command::new("sh")
        .arg("-c")
        .arg(
            r#"trap '' PIPE; cat "$0" > /dev/null
            if echo "a process the child started writes" >&2; then echo ok > "$1"
            else echo "write failed" > "$1"; fi"#,
        )
        .arg(gate)
        .arg(marker)
        .spawn()
        .expect("spawn sh")
        .id()
}

/// A process the child started can write to the stderr it inherited after the child is
/// joined (the pipe is read, and forwarded, until every process holding it is gone).
fn a_process_the_child_started_can_write_to_stderr_after_join() -> TestResult {
    let gate = Gate::new();
    let marker = std::env::temp_dir()
        .join(format!("multiproc-late-stderr-{}", std::process::id()))
        .to_string_lossy()
        .into_owned();
    let _ = std::fs::remove_file(&marker);
    let mut p = Process::spawn(start_late_stderr_writer, (gate.path(), marker.clone()))?;
    let pid = within(LIMIT, "join", move || p.join())??;
    gate.open();
    ensure(wait_gone(pid, LIMIT), "the writer finished")?;
    let wrote = std::fs::read_to_string(&marker).unwrap_or_default();
    let _ = std::fs::remove_file(&marker);
    ensure(
        wrote.trim() == "ok",
        format!("the writer says {:?}", wrote.trim()),
    )
}

/// A `Process` whose child has exited but is not reaped yet (its supervisor waits for the
/// forwarder to write the child's last stderr to a full stderr) is not running: dropping it
/// signals nothing, and what the task left running lives on. Prints whether it did.
fn scenario_drop_exited() -> ! {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let (_keep_reader, writer) = nix::unistd::pipe().expect("pipe");
    fcntl(&writer, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("non-blocking");
    while nix::unistd::write(&writer, &[b'.'; 4096]).is_ok() {}
    fcntl(&writer, FcntlArg::F_SETFL(OFlag::empty())).expect("blocking");
    nix::unistd::dup2_stderr(&writer).expect("dup2");
    let (tx, rx) = pipe().expect("pipe");
    let p = Process::spawn(leave_a_child_behind, (tx,)).expect("spawn");
    let sleeper = rx.recv().expect("the sleeper's pid");
    let child = Pid::from_raw(p.pid().expect("started").cast_signed());
    waitid(Id::Pid(child), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT).expect("waitid");
    drop(p);
    let alive = support::alive(sleeper);
    let _ = kill(Pid::from_raw(sleeper.cast_signed()), Signal::SIGKILL);
    println!("sleeper {}", if alive { "alive" } else { "killed" });
    std::process::exit(0);
}

fn dropping_a_process_that_exited_unreaped_kills_nothing() -> TestResult {
    let (status, stdout, _) = support::run_self_within(&[(SCENARIO, "drop-exited")], LIMIT)?;
    ensure(
        status.success() && stdout.trim() == "sleeper alive",
        format!("{status}: {stdout}"),
    )
}

/// The scenario process: starts a `Process` that never ends, from a thread that then
/// exits, reports the child's pid, and waits to be killed.
fn scenario() -> ! {
    let p = std::thread::spawn(|| Process::spawn(park_forever, ()).expect("spawn"))
        .join()
        .expect("thread");
    println!("{}", p.pid().expect("pid"));
    loop {
        std::thread::park();
    }
}

fn children_die_with_a_killed_parent() -> TestResult {
    let mut parent = Command::new(std::env::current_exe()?)
        .env(SCENARIO, "1")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(parent.stdout.take().expect("piped")).read_line(&mut line)?;
    let child: u32 = line.trim().parse()?;
    kill(Pid::from_raw(parent.id().cast_signed()), Signal::SIGKILL)?;
    parent.wait()?;
    ensure(wait_gone(child, LIMIT), "the child died with its parent")?;
    Ok(())
}

#[multiproc::main]
fn main() {
    match std::env::var(SCENARIO).as_deref() {
        Ok("drop-exited") => scenario_drop_exited(),
        Ok(_) => scenario(),
        Err(_) => {}
    }
    support::run(tests![
        new_start_join_and_accessors,
        spawn_runs_processes_side_by_side,
        a_panic_is_an_error_and_the_process_exits_cleanly,
        a_crash_is_an_error_with_its_signal_exit_code_and_stderr,
        join_timeout_leaves_it_running,
        terminate_and_kill_signal_it,
        dropping_a_running_process_kills_it_and_what_it_started,
        dropping_a_process_that_exited_unreaped_kills_nothing,
        a_child_that_left_its_process_group_is_still_stopped,
        a_process_outlives_the_thread_that_started_it,
        a_child_that_starts_a_long_lived_process_still_joins,
        a_process_the_child_started_can_write_to_stderr_after_join,
        a_crash_is_seen_while_a_process_the_child_forked_holds_the_channel,
        children_die_with_a_killed_parent,
    ]);
}
