#[multiproc::task]
fn largest<T: PartialOrd>(items: Vec<T>) -> Option<T> {
    items.into_iter().reduce(|a, b| if b > a { b } else { a })
}

fn main() {}
