// `crate = path` for a crate that reaches multiproc under another name, e.g. a facade crate
// that re-exports it.

pub extern crate multiproc as parallel;

mod facade {
    pub use ::parallel as multiproc;
}

#[parallel::task(crate = ::parallel)]
fn square(x: u64) -> u64 {
    x * x
}

#[facade::multiproc::task(crate = crate::facade::multiproc, name = "facade::cube")]
fn cube(x: u64) -> u64 {
    x * x * x
}

#[facade::multiproc::main(crate = crate::facade::multiproc)]
fn main() {
    use parallel::Task;
    assert_eq!(square(3), 9);
    assert_eq!(<cube as Task>::NAME, "facade::cube");
}
