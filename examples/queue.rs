// cargo run --example queue
//! Port of the seed's `Queue` program: a child process puts a value on a queue shared with the
//! parent, which gets it. Prints `(42, None, "hello")`.

use multiproc::{Process, Queue, task};

type Message = (i32, Option<i32>, String);

/// Errors cross the process boundary as values the parent can decode: a message here.
#[task]
fn f(q: Queue<Message>) -> Result<(), String> {
    q.put((42, None, "hello".to_owned()))
        .map_err(|err| err.to_string())
}

#[multiproc::main]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let q = Queue::new()?;
    let mut p = Process::spawn(f, (q.clone(),))?;
    println!("{:?}", q.get()?); // prints "(42, None, \"hello\")"
    p.join()??; // the child's own outcome, then the task's
    Ok(())
}
