use multiproc::Pool;

#[multiproc::task]
fn square(x: u64) -> u64 {
    x * x
}

fn run(pool: &Pool) {
    let _ = pool.map(square, ["1", "2", "3"]);
}

fn main() {}
