// cargo run --example pipe
//! Port of the seed's `Pipe` program: a child process sends a value through a one-way pipe and
//! the parent receives it. Prints `(42, None, "hello")`.

use multiproc::{Process, Sender, pipe, task};

type Message = (i32, Option<i32>, String);

/// Errors cross the process boundary as values the parent can decode: a message here.
#[task]
fn f(conn: Sender<Message>) -> Result<(), String> {
    conn.send((42, None, "hello".to_owned()))
        .map_err(|err| err.to_string())
}

#[multiproc::main]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (sender, receiver) = pipe::<Message>()?;
    let mut p = Process::spawn(f, (sender,))?;
    println!("{:?}", receiver.recv()?); // prints "(42, None, \"hello\")"
    p.join()??; // the child's own outcome, then the task's
    Ok(())
}
