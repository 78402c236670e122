// A deprecated task warns where it is called, and nowhere in what the attribute generates.
#![deny(deprecated)]

#[multiproc::task]
#[deprecated = "use cube"]
fn square(x: u64) -> u64 {
    x * x
}

fn main() {
    let _ = square(3);
}
