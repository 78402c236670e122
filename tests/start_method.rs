//! Both ways of starting a worker (`StartMethod`): a worker forked by the fork server and one
//! that runs the executable again see the same thing (the caller's environment and working
//! directory as they are when the pool starts, none of its state), report a crash the same
//! way, and the pool goes on with `exec` when the fork server is gone. Each case runs as
//! its own process (this binary again), single-threaded where it changes its environment.

mod support;

use multiproc::{Pool, StartMethod, task};
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

#[task]
fn square(x: u64) -> u64 {
    x * x
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
    let out = Command::new(std::env::current_exe()?)
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
        "observe" => {
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
        "crash" => {
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
        "server-killed" => {
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
        other => panic!("unknown scenario {other}"),
    }
    std::process::exit(0);
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
    for method in ["fork", "spawn"] {
        let out = run_scenario("crash", method)?;
        ensure(out.trim() == "ok", format!("{method}: {out}"))?;
    }
    Ok(())
}

fn a_pool_starts_when_the_fork_server_is_gone() -> TestResult {
    let out = run_scenario("server-killed", "fork")?;
    ensure(out.contains("children=1") && out.contains("ok"), out)
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
        workers_see_the_environment_and_directory_of_the_caller,
        workers_forked_or_spawned_report_a_crash_alike,
        a_pool_starts_when_the_fork_server_is_gone,
        a_worker_starts_a_pool_of_its_own,
        a_program_started_with_spawn_has_no_fork_server,
    ]);
}
