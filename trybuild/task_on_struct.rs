#[multiproc::task]
struct Job {
    id: u64,
}

fn main() {
    let _ = Job { id: 1 }.id;
}
