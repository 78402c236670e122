// cargo run --example pool_async
//! Port of the seed's `multi_async.py`: `map_async` and `starmap_async` return at once with an
//! `AsyncResult`; `get()` is where the program waits. Prints `[1, 4, 9, 16, 25]` and
//! `[1, 16, 243, 4096, 78125]`, each after the result's type, as the seed does.

use multiproc::{AsyncResult, Pool, task};

#[task]
fn f(x: u64) -> u64 {
    x * x
}

#[task]
fn g(x: u64, y: u32) -> u64 {
    x.pow(y)
}

/// The type of a value without module paths (`AsyncResult<Vec<u64>>`), as Python's
/// `type(result)` prints its class.
fn type_name_of<T>(_: &T) -> String {
    let full = std::any::type_name::<T>();
    let mut short = String::new();
    for (i, part) in full.split(['<', '>', ',']).enumerate() {
        if i > 0 {
            // Re-insert the delimiter that preceded this part.
            let at = full
                .split(['<', '>', ','])
                .take(i)
                .map(|p| p.len() + 1)
                .sum::<usize>()
                - 1;
            short.push_str(&full[at..=at]);
        }
        short.push_str(part.rsplit("::").next().unwrap_or(part));
    }
    short
}

#[multiproc::main]
fn main() -> Result<(), multiproc::Error> {
    {
        let pool = Pool::new(4)?;
        let result: AsyncResult<Vec<u64>> = pool.map_async(f, [1, 2, 3, 4, 5]);
        println!("{}", type_name_of(&result));
        println!("{:?}", result.get()?);
    }
    {
        let pool = Pool::new(4)?;
        let result = pool.starmap_async(g, [(1, 3), (2, 4), (3, 5), (4, 6), (5, 7)]);
        println!("{}", type_name_of(&result));
        println!("{:?}", result.get()?);
    }
    Ok(())
}
