//! Two tasks registered under one name: the first pool refuses to start, naming both.

use multiproc::{ErrorKind, Pool, task};

#[task(name = "shared::name")]
fn first(x: u64) -> u64 {
    x
}

mod elsewhere {
    #[multiproc::task(name = "shared::name")]
    pub fn second(x: u64) -> u64 {
        x + 1
    }
}

#[multiproc::main]
fn main() {
    let err = Pool::new(1).expect_err("duplicate names must be refused");
    assert_eq!(err.kind(), ErrorKind::Spawn);
    let text = err.to_string();
    assert!(text.contains("`shared::name`"), "{text}");
    assert!(
        text.contains("duplicate_names.rs:5"),
        "names the first: {text}"
    );
    assert!(
        text.contains("duplicate_names.rs:11"),
        "names the second: {text}"
    );
    assert!(text.contains("#[task(name"), "says how to fix it: {text}");
    let _ = (first(1), elsewhere::second(1));
    println!("duplicate_names: 1 passed, 0 failed");
}
