//! No worker outlives its parent: killed with SIGKILL, or stopped by Ctrl-C, the parent
//! takes every worker, and the fork server, with it within a second. The "parent" here is
//! this test binary run again as a scenario: it starts a pool, reports its worker pids, and
//! runs a long map.

mod support;

use multiproc::{Pool, task};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{TestResult, ensure, wait_gone};

const SCENARIO: &str = "MULTIPROC_TEST_ORPHAN_SCENARIO";

#[task]
fn busy(_x: u64) -> u64 {
    loop {
        std::thread::park();
    }
}

#[task]
fn square(x: u64) -> u64 {
    x * x
}

/// The scenario process: a pool of 2 busy with a map that never ends.
fn scenario() -> ! {
    let pool = Pool::new(2).expect("pool");
    let pids: Vec<String> = pool.worker_pids().iter().map(u32::to_string).collect();
    println!("{}", pids.join(" "));
    let _ = pool.map(busy, 0..4);
    unreachable!("the map never ends");
}

/// Starts the scenario in its own process group (as a shell starts a job) and returns it
/// with its children's pids (workers and fork server), once the workers are busy.
fn start_scenario() -> Result<(std::process::Child, Vec<u32>), Box<dyn std::error::Error>> {
    let mut child = Command::new(std::env::current_exe()?)
        .env(SCENARIO, "1")
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let pids: Vec<u32> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert_eq!(pids.len(), 2, "scenario said {line:?}");
    // Every child of the scenario: its workers and its fork server (where it has one: not
    // with MULTIPROC_START_METHOD=spawn, say; tests/start_method.rs checks that it does).
    let all = support::children(child.id());
    assert!(
        pids.iter().all(|pid| all.contains(pid)) && all.len() <= 3,
        "workers {pids:?} and at most a fork server expected among the children {all:?}"
    );
    Ok((child, all))
}

/// Stops a busy scenario parent with `stop`, checks it died of `signal`, then that every
/// child is gone within one second.
fn workers_die_with_parent(
    stop: impl FnOnce(Pid) -> nix::Result<()>,
    signal: Signal,
) -> TestResult {
    let (mut parent, children) = start_scenario()?;
    stop(Pid::from_raw(parent.id().cast_signed()))?;
    assert_eq!(parent.wait()?.signal(), Some(signal as i32));
    for pid in children {
        ensure(
            wait_gone(pid, Duration::from_secs(1)),
            format!("child {pid} outlived its parent"),
        )?;
    }
    Ok(())
}

fn workers_die_with_a_sigkilled_parent() -> TestResult {
    workers_die_with_parent(|parent| kill(parent, Signal::SIGKILL), Signal::SIGKILL)
}

fn ctrl_c_stops_the_parent_and_its_workers() -> TestResult {
    // What a terminal does on Ctrl-C: SIGINT to the foreground process group.
    workers_die_with_parent(|parent| killpg(parent, Signal::SIGINT), Signal::SIGINT)
}

fn workers_ignore_sigint() -> TestResult {
    let pool = Pool::new(1)?;
    let pid = pool.worker_pids()[0];
    // SigIgn in /proc/PID/status is the mask of ignored signals; SIGINT is signal 2.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ignored = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .map(|mask| u64::from_str_radix(mask.trim(), 16))
        .ok_or("no SigIgn line")??;
    ensure(
        ignored & (1 << (2 - 1)) != 0,
        format!("SIGINT not ignored: {ignored:#x}"),
    )?;
    kill(Pid::from_raw(pid.cast_signed()), Signal::SIGINT)?;
    assert_eq!(pool.map(square, [3])?, vec![9]);
    assert_eq!(pool.worker_pids(), vec![pid], "the worker survived SIGINT");
    Ok(())
}

#[multiproc::main]
fn main() {
    if std::env::var_os(SCENARIO).is_some() {
        scenario();
    }
    support::run(tests![
        workers_die_with_a_sigkilled_parent,
        ctrl_c_stops_the_parent_and_its_workers,
        workers_ignore_sigint,
    ]);
}
