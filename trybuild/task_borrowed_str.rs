#[multiproc::task]
fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

fn main() {
    // The function is still emitted, so this call reports nothing more.
    let _ = word_count("a b");
}
