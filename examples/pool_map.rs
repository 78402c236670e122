// cargo run --example pool_map
//! Port of the seed's `multi.py`: `map` of a one-argument task and `starmap` of a two-argument
//! task on pools of 4 worker processes. Prints `[1, 4, 9, 16, 25]` and `[1, 16, 243, 4096, 78125]`.

use multiproc::{Pool, task};

#[task]
fn f(x: u64) -> u64 {
    x * x
}

#[task]
fn g(x: u64, y: u32) -> u64 {
    x.pow(y)
}

#[multiproc::main]
fn main() -> Result<(), multiproc::Error> {
    {
        let pool = Pool::new(4)?;
        let result = pool.map(f, [1, 2, 3, 4, 5])?;
        println!("{result:?}");
    }
    {
        let pool = Pool::new(4)?;
        let result = pool.starmap(g, [(1, 3), (2, 4), (3, 5), (4, 6), (5, 7)])?;
        println!("{result:?}");
    }
    Ok(())
}
