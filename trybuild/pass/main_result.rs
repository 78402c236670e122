// `#[multiproc::main]` keeps `fn main`'s return type and body.

#[multiproc::task]
fn square(x: u64) -> u64 {
    x * x
}

#[multiproc::main]
fn main() -> Result<(), multiproc::Error> {
    let _pool_type_checks = |pool: multiproc::Pool| pool.map(square, [1, 2]);
    assert_eq!(square(4), 16);
    Ok(())
}
