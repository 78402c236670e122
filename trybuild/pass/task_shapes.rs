// Every shape `#[task]` supports compiles, can still be called directly, and fits the pool
// method meant for it.

use multiproc::{Pool, Task};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

#[multiproc::task]
fn answer() -> u64 {
    42
}

#[multiproc::task]
fn log(_line: String) {}

#[multiproc::task]
fn eight(a: u8, b: u16, c: u32, d: u64, e: i8, f: i16, g: i32, h: i64) -> i128 {
    i128::from(a)
        + i128::from(b)
        + i128::from(c)
        + i128::from(d)
        + i128::from(e)
        + i128::from(f)
        + i128::from(g)
        + i128::from(h)
}

#[multiproc::task]
fn parse(text: String) -> Result<u64, String> {
    text.parse().map_err(|err| format!("{text:?}: {err}"))
}

#[derive(Serialize, Deserialize)]
pub struct Point {
    x: f64,
    y: f64,
}

/// Docs and attributes are kept.
#[multiproc::task]
#[inline]
pub fn norm(Point { x, y }: Point, (scale, _): (f64, u8), mut _unused: u8, _: ()) -> f64 {
    _unused = 0;
    (x * x + y * y).sqrt() * scale
}

#[multiproc::task]
fn owned_cow(text: Cow<'static, str>) -> Box<str> {
    text.into_owned().into_boxed_str()
}

#[multiproc::task(name = "shapes::renamed")]
fn renamed(x: u64) -> u64 {
    x
}

mod outer {
    pub mod inner {
        #[multiproc::task]
        pub fn nested(x: u64) -> u64 {
            x + 1
        }
    }
}

#[multiproc::task]
fn r#type(x: u8) -> u8 {
    x
}

// A `cfg` below the attribute goes on every generated item: all of them or none compile.
#[multiproc::task]
#[cfg(all())]
fn kept(x: u8) -> u8 {
    x
}

#[multiproc::task]
#[cfg(any())]
fn dropped(x: NotEvenAType) -> u8 {
    x.0
}

// Type-checked, never called: running a pool is the integration tests' job.
#[allow(dead_code)]
fn with_pool(pool: &Pool) -> Result<(), multiproc::Error> {
    let _: u64 = pool.apply(answer, ())?;
    let _: Vec<()> = pool.map(log, vec![String::from("a")])?;
    let _: Vec<i128> = pool.starmap(eight, [(1, 2, 3, 4, 5, 6, 7, 8)])?;
    let _: Vec<Result<u64, String>> = pool.map(parse, [String::from("7")])?;
    let _: Vec<u64> = pool.map(outer::inner::nested, 0..4)?;
    let _: Vec<u64> = pool.imap(renamed, 0..4).collect::<Result<_, _>>()?;
    let _: Vec<u8> = pool.map(kept, [1])?;
    Ok(())
}

#[multiproc::main]
fn main() {
    assert_eq!(answer(), 42);
    assert_eq!(eight(1, 2, 3, 4, 5, 6, 7, 8), 36);
    assert_eq!(parse(String::from("7")), Ok(7));
    assert_eq!(norm(Point { x: 3.0, y: 4.0 }, (2.0, 0), 1, ()), 10.0);
    assert_eq!(&*owned_cow(Cow::Borrowed("hi")), "hi");
    assert_eq!(outer::inner::nested(1), 2);
    assert_eq!(r#type(3), 3);
    assert_eq!(<renamed as Task>::NAME, "shapes::renamed");
    assert!(<outer::inner::nested as Task>::NAME.ends_with("::outer::inner::nested"));
    assert_eq!(<eight as Task>::call((1, 1, 1, 1, 1, 1, 1, 1)), 8);
    assert_eq!(kept(5), 5);
    log(String::new());
}
