use std::rc::Rc;

#[multiproc::task]
fn scale(factor: u64, values: Rc<Vec<u64>>) -> Vec<u64> {
    values.iter().map(|v| v * factor).collect()
}

fn run(pool: &multiproc::Pool) {
    let _ = pool.starmap(scale, [(2, Rc::new(vec![1, 2]))]);
}

fn main() {}
