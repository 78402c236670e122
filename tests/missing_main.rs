//! A program whose `fn main` lacks `#[multiproc::main]`: its re-executed children run `main`
//! again instead of serving tasks. The parent must report the missing attribute promptly,
//! and the children must not spawn children of their own.

use multiproc::{ErrorKind, Pool, task};
use std::time::{Duration, Instant};

#[task]
fn square(x: u64) -> u64 {
    x * x
}

// Deliberately no #[multiproc::main].
fn main() {
    let is_child = std::env::var_os("MULTIPROC_WORKER").is_some();
    let started = Instant::now();
    let result = Pool::new(2);
    if is_child {
        // A child that never passed through the worker entry may not spawn: this is what
        // stops the recursion. It reports to its parent and exits.
        let err = result.expect_err("a child without the worker entry must not start a pool");
        assert_eq!(err.kind(), ErrorKind::Spawn);
        std::process::exit(3);
    }
    let err = result.expect_err("the workers never reach the worker entry");
    let elapsed = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Spawn, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("#[multiproc::main]"),
        "the error names the missing attribute: {text}"
    );
    // Generous: the point is that it does not hang until a start-up timeout (30 s).
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    let _ = square(2);
    println!("missing_main: 1 passed, 0 failed");
}
