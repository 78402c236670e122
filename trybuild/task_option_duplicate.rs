#[multiproc::task(name = "jobs::square", name = "jobs::sq")]
fn square(x: u64) -> u64 {
    x * x
}

fn main() {}
