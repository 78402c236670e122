// cargo run --example process
//! Port of the seed's `Process` program: a task run in a child process of its own, started and
//! joined, once per name. Prints `hello alice` then `hello bob`.

use multiproc::{Process, task};

#[task]
fn f(name: String) {
    println!("hello {name}");
}

#[multiproc::main]
fn main() -> Result<(), multiproc::Error> {
    let mut p0 = Process::new(f, ("alice".to_owned(),));
    p0.start()?;
    // Joined before the second starts, so the two lines always come in this order (the
    // seed starts both first, and its order then depends on the scheduler).
    p0.join()?;
    let mut p1 = Process::spawn(f, ("bob".to_owned(),))?;
    p1.join()?;
    Ok(())
}
