struct Job;

#[multiproc::task]
impl Job {
    fn run(x: u64) -> u64 {
        x + 1
    }
}

fn main() {
    let _ = Job::run(1);
}
