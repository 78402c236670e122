use multiproc::Pool;

fn run(pool: &Pool) {
    let _ = pool.map(|x: u64| x * x, [1, 2, 3]);
}

fn main() {}
