// Callers reach a task through a function pointer, which carries no `must_use`: it would be
// silently ignored, so it is refused.
#![deny(unused_must_use)]

#[multiproc::task]
#[must_use]
fn square(x: u64) -> u64 {
    x * x
}

fn main() {
    square(3);
}
