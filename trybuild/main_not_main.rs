#[multiproc::main]
fn run() {}

fn main() {
    run();
}
