// A `cfg_attr` that only sets a lint cannot remove the argument: allowed.
#[multiproc::task]
fn ignore_second(x: u64, #[cfg_attr(all(), allow(unused_variables))] unused: u64) -> u64 {
    x
}

#[multiproc::main]
fn main() {
    assert_eq!(ignore_second(1, 2), 1);
}
