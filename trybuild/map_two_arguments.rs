use multiproc::Pool;

#[multiproc::task]
fn pow(x: u64, y: u32) -> u64 {
    x.pow(y)
}

fn run(pool: &Pool) {
    let _ = pool.map(pow, [(2, 3), (3, 2)]);
}

fn main() {}
