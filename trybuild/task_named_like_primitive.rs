// The task's unit struct would hide the primitive type `f64` in this module.
#[multiproc::task]
fn f64(x: f64) -> f64 {
    x * 2.0
}

fn main() {
    let _ = f64(1.0);
}
