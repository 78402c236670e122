#[multiproc::task]
fn add(x: u64, #[cfg(any())] y: u64) -> u64 {
    x
}

fn main() {
    let _ = add(1);
}
