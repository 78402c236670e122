use serde::Serialize;

// Serializable, but a parent cannot read it back: no `Deserialize`.
#[derive(Serialize)]
struct Report {
    lines: usize,
}

#[multiproc::task]
fn count(text: String) -> Report {
    Report {
        lines: text.lines().count(),
    }
}

fn main() {}

fn run(pool: &multiproc::Pool) {
    let _ = pool.map(count, [String::new()]);
}
