struct Counter {
    start: u64,
}

impl Counter {
    #[multiproc::task]
    fn add(&self, x: u64) -> u64 {
        self.start + x
    }
}

fn main() {
    let _ = Counter { start: 1 }.add(2);
}
