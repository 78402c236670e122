//! What one wake-up costs on this machine: a one-byte round trip to a child process, made
//! directly (two wake-ups: child, then caller; `apply` on an idle pool does this now) or
//! relayed through a second thread of the caller, as a pool's slot thread relays chunks
//! (four: relay, child, relay, caller), with the relay waiting on a condvar or spinning. No
//! multiproc code runs here: it is the floor under `apply` and W1', for BENCHMARKS.md.
//!
//! `cargo bench --bench hops [-- ROUND_TRIPS]`; prints one JSON line per variant.

use std::io::{Read, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// The child: echoes every byte until end of input.
fn echo() {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut byte = [0u8; 1];
    while input.read_exact(&mut byte).is_ok() {
        if output
            .write_all(&byte)
            .and_then(|()| output.flush())
            .is_err()
        {
            break;
        }
    }
}

struct Child {
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl Child {
    fn round_trip(&mut self) {
        let mut byte = [7u8];
        self.stdin.write_all(&byte).expect("writing to the child");
        self.stdout
            .read_exact(&mut byte)
            .expect("reading from the child");
    }
}

fn spawn() -> (std::process::Child, Child) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg("echo")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the echo child");
    let pipes = Child {
        stdin: child.stdin.take().expect("piped"),
        stdout: child.stdout.take().expect("piped"),
    };
    (child, pipes)
}

fn direct(n: u32) -> f64 {
    let (mut process, mut child) = spawn();
    child.round_trip();
    let start = Instant::now();
    for _ in 0..n {
        child.round_trip();
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(child);
    let _ = process.wait();
    seconds
}

/// Requests and replies between the caller and the relay thread: a counter each way.
#[derive(Default)]
struct Mailbox {
    asked: AtomicU32,
    answered: AtomicU32,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Mailbox {
    fn wait_for(&self, counter: &AtomicU32, value: u32, spin: bool) {
        if spin {
            while counter.load(Ordering::Acquire) != value {
                std::hint::spin_loop();
            }
            return;
        }
        let mut guard = self.lock.lock().expect("lock");
        while counter.load(Ordering::Acquire) != value {
            guard = self.changed.wait(guard).expect("lock");
        }
    }

    fn bump(&self, counter: &AtomicU32, spin: bool) {
        if spin {
            counter.fetch_add(1, Ordering::Release);
            return;
        }
        let _guard = self.lock.lock().expect("lock");
        counter.fetch_add(1, Ordering::Release);
        self.changed.notify_all();
    }
}

fn relayed(n: u32, spin: bool) -> f64 {
    let (mut process, mut child) = spawn();
    child.round_trip();
    let mailbox = Arc::new(Mailbox::default());
    let relay = {
        let mailbox = Arc::clone(&mailbox);
        std::thread::spawn(move || {
            for i in 1..=n {
                mailbox.wait_for(&mailbox.asked, i, spin);
                child.round_trip();
                mailbox.bump(&mailbox.answered, spin);
            }
        })
    };
    let start = Instant::now();
    for i in 1..=n {
        mailbox.bump(&mailbox.asked, spin);
        mailbox.wait_for(&mailbox.answered, i, spin);
    }
    let seconds = start.elapsed().as_secs_f64();
    relay.join().expect("relay thread");
    let _ = process.wait();
    seconds
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("echo") {
        echo();
        return;
    }
    let n: u32 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(20_000);
    for (variant, seconds) in [
        ("direct", direct(n)),
        ("relay_condvar", relayed(n, false)),
        ("relay_spin", relayed(n, true)),
    ] {
        let us = seconds * 1e6 / f64::from(n);
        println!("{{\"workload\": \"hops\", \"variant\": \"{variant}\", \"round_trip_us\": {us}}}");
    }
}
