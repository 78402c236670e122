// `Point` derives neither `Serialize` nor `Deserialize`.
struct Point {
    x: f64,
    y: f64,
}

#[multiproc::task]
fn norm(p: Point) -> f64 {
    (p.x * p.x + p.y * p.y).sqrt()
}

// `norm` is a task only once `Point` can be sent, so a call site reports the same fix.
fn run(pool: &multiproc::Pool) {
    let _ = pool.map(norm, [Point { x: 3.0, y: 4.0 }]);
}

fn main() {}
