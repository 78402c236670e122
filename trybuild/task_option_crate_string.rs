#[multiproc::task(crate = "multiproc")]
fn square(x: u64) -> u64 {
    x * x
}

fn main() {}
