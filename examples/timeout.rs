// cargo run --example timeout
//! Port of the seed's `timeout.py`. A task sleeps `n` seconds, then appends `n` to `result.log`.
//! `map_async` over 0..8 on 4 workers, then:
//!
//! 1. `get_timeout(5 s)` gives up with a timeout error: tasks 0 to 4 finished in time, and
//!    leaving the pool's scope terminates it, as Python's `with Pool` does, so result.log
//!    holds exactly 0 to 4.
//! 2. The seed's recommended pattern: `wait()` inside the pool's scope, `get` outside it, with
//!    a 9 s timeout. It prints `[0, 1, 2, 3, 4, 5, 6, 7]`. (In Python, a `get` outside the
//!    scope without the `wait` inside hangs or times out; here a result whose work completed
//!    is always readable, and work a dropped pool cannot finish resolves to an error.)

use multiproc::{ErrorKind, Pool, task};
use std::io::Write;
use std::time::Duration;

const LOG: &str = "result.log";

#[task]
fn sleep(duration: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(duration));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG)
        .expect("result.log is writable");
    writeln!(file, "{duration}").expect("append to result.log");
    duration
}

#[multiproc::main]
fn main() -> Result<(), multiproc::Error> {
    let _ = std::fs::remove_file(LOG);
    {
        let pool = Pool::new(4)?;
        let result = pool.map_async(sleep, 0..8);
        match result.get_timeout(Duration::from_secs(5)) {
            Ok(values) => println!("{values:?}"),
            Err(err) if err.kind() == ErrorKind::Timeout => println!("TimeoutError"),
            Err(err) => return Err(err),
        }
    } // the pool is terminated here: tasks 5, 6 and 7 are killed
    let log = std::fs::read_to_string(LOG).unwrap_or_default();
    print!("$ cat {LOG}\n{log}");

    let _ = std::fs::remove_file(LOG);
    let result;
    {
        let pool = Pool::new(4)?;
        result = pool.map_async(sleep, 0..8);
        result.wait();
    }
    match result.get_timeout(Duration::from_secs(9)) {
        Ok(values) => println!("{values:?}"),
        Err(err) if err.kind() == ErrorKind::Timeout => println!("TimeoutError"),
        Err(err) => return Err(err),
    }
    let _ = std::fs::remove_file(LOG);
    Ok(())
}
